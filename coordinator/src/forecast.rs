//! Capacity forecast, the pure maths: a bounded, downsampled history of one
//! figure (a source's recovery-point bytes, a pool disk's used bytes), its growth
//! trend, and the days until it reaches its limit.
//!
//! The trend is the Theil–Sen estimator: the median of the slopes between every
//! pair of samples in the window. One sample far off the line (a one-off spike, a
//! burst of churn that was pruned again) moves only the slopes of the pairs it is
//! in, about 1/n of them, so the median barely moves; a least-squares fit would be
//! dragged by it. Days until full are `(limit - used now) / growth per day`. No
//! trend — fewer than [`MIN_SAMPLES`] samples, or growth that is flat or shrinking
//! — is no forecast (`None`), never a number.
//!
//! A history keeps at most [`MAX_SAMPLES`] samples, spaced at least
//! `window / MAX_SAMPLES` apart, and none older than the window: a pass over every
//! series costs at most `MAX_SAMPLES²/2` slopes each, whatever the heartbeat rate.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most samples a history keeps.
pub const MAX_SAMPLES: usize = 128;
/// Fewest samples a trend is computed from.
pub const MIN_SAMPLES: usize = 6;
/// The format version of a stored [`History`].
pub const HISTORY_VERSION: u32 = 1;

const DAY_MS: f64 = 86_400_000.0;

/// The coordinator's `forecast_warn_days` and `forecast_window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForecastSettings {
    /// A disk or allocation forecast to be full sooner than this raises a warning.
    pub warn_days: f64,
    /// How far back the trend looks.
    pub window: Duration,
}

impl Default for ForecastSettings {
    fn default() -> Self {
        ForecastSettings {
            warn_days: 14.0,
            window: Duration::from_secs(7 * 86_400),
        }
    }
}

impl ForecastSettings {
    /// The least time between two kept samples.
    pub fn spacing_ms(&self) -> i64 {
        (self.window.as_millis() / MAX_SAMPLES as u128).max(1) as i64
    }

    /// The window in milliseconds.
    pub fn window_ms(&self) -> i64 {
        self.window.as_millis().min(i64::MAX as u128) as i64
    }
}

/// One figure over time: `(unix ms, bytes)`, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub v: u32,
    pub samples: Vec<(i64, u64)>,
}

impl History {
    /// Records `bytes` seen at `t_ms`. Kept only when at least the spacing after
    /// the last kept sample; samples older than the window are dropped, and so are
    /// samples "after" `t_ms` (the clock was set back). Returns whether the history
    /// changed (and should be stored).
    pub fn record(&mut self, t_ms: i64, bytes: u64, s: &ForecastSettings) -> bool {
        let before = self.samples.len();
        self.v = HISTORY_VERSION;
        self.samples.retain(|(t, _)| *t <= t_ms);
        let cutoff = t_ms.saturating_sub(s.window_ms());
        self.samples.retain(|(t, _)| *t >= cutoff);
        let mut changed = self.samples.len() != before;
        let due = self
            .samples
            .last()
            .is_none_or(|(t, _)| t_ms - t >= s.spacing_ms());
        if due {
            self.samples.push((t_ms, bytes));
            changed = true;
        }
        if self.samples.len() > MAX_SAMPLES {
            let extra = self.samples.len() - MAX_SAMPLES;
            self.samples.drain(..extra);
        }
        changed
    }
}

/// Growth in bytes per day: the median slope over every pair of samples (Theil–Sen);
/// `None` with fewer than [`MIN_SAMPLES`] samples or none apart in time.
pub fn growth_per_day(samples: &[(i64, u64)]) -> Option<f64> {
    if samples.len() < MIN_SAMPLES {
        return None;
    }
    let mut slopes = Vec::with_capacity(samples.len() * (samples.len() - 1) / 2);
    for (i, (ti, yi)) in samples.iter().enumerate() {
        for (tj, yj) in &samples[i + 1..] {
            if tj != ti {
                let dy = *yj as f64 - *yi as f64;
                slopes.push(dy / (*tj - *ti) as f64);
            }
        }
    }
    if slopes.is_empty() {
        return None;
    }
    slopes.sort_by(f64::total_cmp);
    let n = slopes.len();
    let median = if n % 2 == 1 {
        slopes[n / 2]
    } else {
        (slopes[n / 2 - 1] + slopes[n / 2]) / 2.0
    };
    Some(median * DAY_MS)
}

/// What one figure is heading for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Forecast {
    /// Bytes used now.
    pub used_bytes: u64,
    /// Bytes it may reach (the allocation, the disk's capacity).
    pub limit_bytes: u64,
    /// The trend over the window; `None` with too few samples.
    pub growth_per_day: Option<f64>,
    /// `None`: no forecast (no trend, flat or shrinking, or no limit).
    pub days_until_full: Option<f64>,
    /// Samples the trend was made from.
    pub samples: usize,
}

impl Forecast {
    /// The forecast of a figure at `used_bytes` now, with `limit_bytes`.
    pub fn of(history: &History, used_bytes: u64, limit_bytes: u64) -> Forecast {
        let growth = growth_per_day(&history.samples);
        Forecast {
            used_bytes,
            limit_bytes,
            growth_per_day: growth,
            days_until_full: days_until_full(used_bytes, limit_bytes, growth),
            samples: history.samples.len(),
        }
    }

    /// The sum of several figures (a group's sources, a node's disks): used,
    /// limits and growth add up; no growth at all when none of them has a trend.
    pub fn sum(parts: &[Forecast]) -> Forecast {
        let used = parts
            .iter()
            .fold(0u64, |a, p| a.saturating_add(p.used_bytes));
        let limit = parts
            .iter()
            .fold(0u64, |a, p| a.saturating_add(p.limit_bytes));
        let growth = parts
            .iter()
            .filter_map(|p| p.growth_per_day)
            .fold(None, |a: Option<f64>, g| Some(a.unwrap_or(0.0) + g));
        Forecast {
            used_bytes: used,
            limit_bytes: limit,
            growth_per_day: growth,
            days_until_full: days_until_full(used, limit, growth),
            samples: parts.iter().map(|p| p.samples).min().unwrap_or(0),
        }
    }

    /// Whether it is forecast full in less than `days`.
    pub fn full_within(&self, days: f64) -> bool {
        self.days_until_full.is_some_and(|d| d < days)
    }
}

/// Days until `used` reaches `limit` at `growth` bytes per day; 0 when already
/// there; `None` without a limit or a positive trend.
pub fn days_until_full(used: u64, limit: u64, growth: Option<f64>) -> Option<f64> {
    let g = growth.filter(|g| g.is_finite() && *g > 0.0)?;
    if limit == 0 {
        return None;
    }
    if used >= limit {
        return Some(0.0);
    }
    Some((limit - used) as f64 / g)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    /// A little over the spacing of a 7-day window (78.75 min): every sample is kept.
    const STEP_MS: i64 = 80 * 60_000;

    /// A deterministic ±`amp` noise (a small LCG), so the test is the same each run.
    fn noise(seed: &mut u64, amp: f64) -> f64 {
        *seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * amp
    }

    fn settings() -> ForecastSettings {
        ForecastSettings {
            warn_days: 14.0,
            window: Duration::from_secs(7 * 86_400),
        }
    }

    /// A source growing 2 GiB a day with ±0.3 GiB noise per sample and one spike of
    /// +40 GiB (a burst that was pruned again), sampled for a week: the
    /// days until its 100 GiB allocation is full are within 10% of the true value.
    #[test]
    fn steady_growth_with_noise_and_a_spike_is_forecast_within_ten_percent() {
        let s = settings();
        let mut h = History::default();
        let mut seed = 7;
        let rate_per_step = 2.0 * GIB as f64 * STEP_MS as f64 / 86_400_000.0;
        let start = 1_700_000_000_000i64;
        let mut used = 0;
        for i in 0..126 {
            let t = start + i * STEP_MS;
            let truth = 10.0 * GIB as f64 + rate_per_step * i as f64;
            let mut y = truth + noise(&mut seed, 0.3 * GIB as f64);
            if i == 100 {
                y += 40.0 * GIB as f64;
            }
            used = truth as u64;
            h.record(t, y as u64, &s);
        }
        assert_eq!(h.samples.len(), 126, "every sample is kept");
        assert!(
            h.samples.iter().any(|(_, y)| *y > 40 * GIB),
            "the spike is in"
        );
        let limit = 100 * GIB;
        let f = Forecast::of(&h, used, limit);
        let truth = (limit - used) as f64 / (2.0 * GIB as f64);
        let days = f.days_until_full.expect("a forecast");
        assert!(
            (days - truth).abs() <= truth * 0.10,
            "forecast {days:.2} days, true {truth:.2}"
        );
        let g = f.growth_per_day.expect("a trend") / GIB as f64;
        assert!((g - 2.0).abs() < 0.2, "growth {g:.3} GiB/day");
        assert!(f.full_within(truth * 1.2) && !f.full_within(truth * 0.8));
    }

    /// A least-squares line would be dragged by the spike; the median is not: the
    /// same spike alone on flat data leaves no forecast.
    #[test]
    fn flat_or_shrinking_or_too_short_is_no_forecast() {
        let s = settings();
        let start = 1_700_000_000_000i64;
        let mut flat = History::default();
        let mut shrinking = History::default();
        let mut short = History::default();
        for i in 0..48 {
            let t = start + i * STEP_MS;
            let spike = if i == 20 { 30 * GIB } else { 0 };
            flat.record(t, 50 * GIB + spike, &s);
            shrinking.record(t, 50 * GIB - i as u64 * (GIB / 10), &s);
            if i < MIN_SAMPLES as i64 - 1 {
                short.record(t, i as u64 * GIB, &s);
            }
        }
        let f = Forecast::of(&flat, 50 * GIB, 100 * GIB);
        assert_eq!(f.growth_per_day, Some(0.0));
        assert_eq!(f.days_until_full, None);
        let f = Forecast::of(&shrinking, 45 * GIB, 100 * GIB);
        assert!(f.growth_per_day.is_some_and(|g| g < 0.0), "{f:?}");
        assert_eq!(f.days_until_full, None);
        let f = Forecast::of(&short, 4 * GIB, 100 * GIB);
        assert_eq!((f.growth_per_day, f.days_until_full), (None, None));
        assert!(!f.full_within(1e9));
    }

    /// Samples closer than the spacing are not kept, none older than the window
    /// stays, and a clock set back drops what now lies "in the future".
    #[test]
    fn the_history_is_bounded_and_downsampled() {
        let s = ForecastSettings {
            warn_days: 1.0,
            window: Duration::from_secs(128),
        };
        assert_eq!(s.spacing_ms(), 1000);
        let mut h = History::default();
        assert!(h.record(10_000, 1, &s));
        assert!(!h.record(10_500, 2, &s), "closer than the spacing");
        assert!(h.record(11_000, 3, &s));
        for i in 0..1000 {
            h.record(12_000 + i * 1000, i as u64, &s);
        }
        assert!(h.samples.len() <= MAX_SAMPLES);
        let newest = h.samples.last().expect("samples").0;
        assert!(h.samples[0].0 >= newest - 128_000, "{:?}", h.samples[0]);
        assert!(h.record(newest - 10_500, 7, &s));
        assert!(h.samples.iter().all(|(t, _)| *t <= newest - 10_500));
    }

    /// Full already is 0 days; no limit is no forecast; sums add up.
    #[test]
    fn edges_and_sums() {
        assert_eq!(days_until_full(10, 10, Some(1.0)), Some(0.0));
        assert_eq!(days_until_full(5, 0, Some(1.0)), None);
        assert_eq!(days_until_full(5, 10, Some(f64::NAN)), None);
        assert_eq!(days_until_full(0, 10, Some(2.0)), Some(5.0));
        let a = Forecast {
            used_bytes: 10,
            limit_bytes: 100,
            growth_per_day: Some(5.0),
            days_until_full: Some(18.0),
            samples: 10,
        };
        let b = Forecast {
            used_bytes: 20,
            limit_bytes: 100,
            growth_per_day: None,
            days_until_full: None,
            samples: 2,
        };
        let s = Forecast::sum(&[a, b]);
        assert_eq!((s.used_bytes, s.limit_bytes), (30, 200));
        assert_eq!(s.growth_per_day, Some(5.0));
        assert_eq!(s.days_until_full, Some(34.0));
        assert_eq!(Forecast::sum(&[b]).days_until_full, None);
    }
}

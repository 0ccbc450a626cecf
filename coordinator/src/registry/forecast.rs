//! The capacity forecast's state: each data source's and each pool disk's history
//! of used bytes (tree `forecast`, JSON with `v`, keys `source/<name>` and
//! `disk/<node>/<path>`), recorded at every heartbeat, and the report and alerts
//! made from it. The maths is [`crate::forecast`].

use bulwark_common::config::format_size;

use super::*;
use crate::forecast::{Forecast, ForecastSettings, History};

/// One forecast and what it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct ForecastRow {
    /// The source's, group's or node's name, or the disk's path.
    pub name: String,
    /// The node of a source or disk (empty for a group, or a source not placed).
    pub node: String,
    pub forecast: Forecast,
}

/// `bulwark forecast`: per source (recovery-point space against its allocation),
/// group and node (sums of theirs), and pool disk (used against capacity).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForecastReport {
    pub sources: Vec<ForecastRow>,
    pub groups: Vec<ForecastRow>,
    pub nodes: Vec<ForecastRow>,
    pub disks: Vec<ForecastRow>,
    pub settings: ForecastSettings,
}

pub(super) fn source_key(source: &str) -> String {
    format!("source/{source}")
}

pub(super) fn disk_key(node: &str, path: &str) -> String {
    format!("disk/{node}/{path}")
}

/// The alert key of a pool disk: `forecast/<node>/<path without its leading />`.
pub fn disk_alert_key(node: &str, path: &str) -> String {
    format!("forecast/{node}/{}", path.trim_start_matches('/'))
}

/// Days for people: `0.4`, `12.5`, `3650+`.
fn days(d: f64) -> String {
    if d >= 3650.0 {
        "3650+".into()
    } else {
        format!("{d:.1}")
    }
}

impl Registry {
    /// Sets `forecast_warn_days` and `forecast_window`.
    pub fn with_forecast(mut self, s: ForecastSettings) -> Registry {
        self.forecast_settings = s;
        self
    }

    /// `forecast_warn_days` and `forecast_window`.
    pub fn forecast_settings(&self) -> ForecastSettings {
        self.forecast_settings
    }

    /// Adds a heartbeat's figures to the histories: each source assigned to `node`
    /// (its recovery-point bytes) and each of the node's disks (used bytes).
    pub(super) fn record_usage(&self, node: &str, hb: &Heartbeat) -> Result<()> {
        let now = now_ms();
        for u in &hb.sources {
            if matches!(self.source(&u.source), Ok(s) if s.node.as_deref() == Some(node)) {
                self.record_sample(&source_key(&u.source), now, u.usage.points_used_bytes)?;
            }
        }
        for d in &hb.disks {
            self.record_sample(&disk_key(node, &d.path), now, d.used_bytes)?;
        }
        Ok(())
    }

    fn history(&self, key: &str) -> Result<History> {
        Ok(match self.state.get(FORECAST, key.as_bytes())? {
            None => History::default(),
            // A history that cannot be read starts again rather than stop heartbeats.
            Some(v) => dec(&v).unwrap_or_else(|e| {
                tracing::warn!(key, "forecast history dropped: {e}");
                History::default()
            }),
        })
    }

    pub(super) fn record_sample(&self, key: &str, t_ms: i64, bytes: u64) -> Result<()> {
        let mut h = self.history(key)?;
        if h.record(t_ms, bytes, &self.forecast_settings) {
            self.state.put(FORECAST, key.as_bytes(), enc(&h)?)?;
        }
        Ok(())
    }

    /// The forecast of every placed source, group, node and pool disk.
    pub fn forecast_report(&self) -> Result<ForecastReport> {
        let mut report = ForecastReport {
            settings: self.forecast_settings,
            ..Default::default()
        };
        let mut groups: std::collections::BTreeMap<String, Vec<Forecast>> = Default::default();
        for s in self.sources()? {
            let Some(node) = s.node.clone() else { continue };
            let f = Forecast::of(
                &self.history(&source_key(&s.name))?,
                s.usage.points_used_bytes,
                s.usage.points_alloc_bytes,
            );
            if !s.group.is_empty() {
                groups.entry(s.group.clone()).or_default().push(f);
            }
            report.sources.push(ForecastRow {
                name: s.name,
                node,
                forecast: f,
            });
        }
        for (name, parts) in groups {
            report.groups.push(ForecastRow {
                name,
                node: String::new(),
                forecast: Forecast::sum(&parts),
            });
        }
        for n in self.nodes()? {
            let mut parts = Vec::new();
            for d in &n.disks {
                let f = Forecast::of(
                    &self.history(&disk_key(&n.name, &d.path))?,
                    d.used_bytes,
                    d.capacity_bytes,
                );
                parts.push(f);
                report.disks.push(ForecastRow {
                    name: d.path.clone(),
                    node: n.name.clone(),
                    forecast: f,
                });
            }
            report.nodes.push(ForecastRow {
                name: n.name.clone(),
                node: n.name.clone(),
                forecast: Forecast::sum(&parts),
            });
        }
        Ok(report)
    }

    /// Drops the histories of sources and disks the report no longer has.
    pub fn prune_forecast_histories(&self, report: &ForecastReport) -> Result<usize> {
        let keep: std::collections::HashSet<String> = report
            .sources
            .iter()
            .map(|r| source_key(&r.name))
            .chain(report.disks.iter().map(|r| disk_key(&r.node, &r.name)))
            .collect();
        let mut dropped = 0;
        for (k, v) in self.state.scan(FORECAST, b"")? {
            if !keep.contains(String::from_utf8_lossy(&k).as_ref()) {
                // Not under `placement`: a history a heartbeat wrote meanwhile stays.
                let txn = Txn::new()
                    .when(FORECAST, k.clone(), Some(v))
                    .delete(FORECAST, k);
                if self.state.commit(txn)? {
                    dropped += 1;
                }
            }
        }
        Ok(dropped)
    }

    /// Raises (and resolves) the forecast's warnings: `forecast/<node>/<disk>` for a
    /// pool disk and `forecast/<source>` for a source's recovery-point allocation
    /// forecast full in less than `forecast_warn_days`.
    pub fn report_forecast_alerts(&self, report: &ForecastReport) -> Result<()> {
        self.report_alerts("forecast", &forecast_alerts(report))
    }
}

/// The alerts of a report (see [`Registry::report_forecast_alerts`]).
pub fn forecast_alerts(report: &ForecastReport) -> Vec<Alert> {
    let warn = report.settings.warn_days;
    let window = bulwark_common::time::format_duration_ms(report.settings.window_ms() as u64);
    let trend = |f: &Forecast| {
        format!(
            "{} of {} used, growing {}/day over the last {window}",
            format_size(f.used_bytes),
            format_size(f.limit_bytes),
            format_size(f.growth_per_day.unwrap_or(0.0).max(0.0) as u64),
        )
    };
    let mut out = Vec::new();
    for d in report.disks.iter().filter(|r| r.forecast.full_within(warn)) {
        let f = &d.forecast;
        out.push(Alert::warning(
            disk_alert_key(&d.node, &d.name),
            d.node.clone(),
            format!(
                "pool disk {} of node {} is forecast full in {} days ({}; forecast_warn_days {warn}): add capacity, move sources off (`bulwark rebalance`, `bulwark drain`) or shorten retention",
                d.name,
                d.node,
                days(f.days_until_full.unwrap_or(0.0)),
                trend(f)
            ),
        ));
    }
    for s in report
        .sources
        .iter()
        .filter(|r| r.forecast.full_within(warn))
    {
        let f = &s.forecast;
        out.push(Alert::warning(
            format!("forecast/{}", s.name),
            s.name.clone(),
            format!(
                "recovery-point space of {} is forecast full in {} days ({}; forecast_warn_days {warn}): `bulwark allocate {} --points SIZE` or shorten its retention",
                s.name,
                days(f.days_until_full.unwrap_or(0.0)),
                trend(f),
                s.name
            ),
        ));
    }
    out
}

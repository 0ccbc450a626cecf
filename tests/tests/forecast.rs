//! The capacity forecast end to end: a source whose points grow steadily (a sync of
//! incompressible rewritten blocks every two seconds) gets a trend and a
//! days-until-full from the coordinator within 10% of the true value (the growth the
//! test itself measured over the same window), the warnings `forecast/<source>` and
//! `forecast/<node>/<disk>` open under `forecast_warn_days`, the history survives a
//! coordinator restart, and the warnings resolve when the disk gets more capacity and
//! the allocation grows while the source keeps growing. The coordinator exports the
//! forecast as gauges. (Robustness to a spike and no forecast when flat are the unit
//! tests' of `coordinator/src/forecast.rs` and `registry/tests.rs`.)

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bulwark_tests::{Fleet, MIB, Value, free_port, json_str, poll, rewrite_random_blocks};

const SOURCE: &str = "host-1-data";
const SIZE: u64 = 8 * MIB;
const WARN_DAYS: f64 = 0.1;
/// One sync of new blocks every PERIOD.
const PERIOD: Duration = Duration::from_secs(2);
/// The coordinator's `forecast_window`, in seconds; the growth runs longer than
/// this before the forecast is checked, so the window holds only steady growth.
const WINDOW_S: u64 = 50;
const WINDOW: Duration = Duration::from_secs(WINDOW_S);

/// The source's `points_used_bytes` in `sources --json`.
fn points_used(fleet: &Fleet) -> u64 {
    let info = fleet.source_info(SOURCE);
    info["points_used_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no points_used_bytes in {info}"))
}

/// The least-squares slope of `(seconds, bytes)`, in bytes a day.
fn slope_per_day(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mt, mb) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (t, y)| (a + t / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (t, y)| {
        (a + (t - mt) * (y - mb), b + (t - mt) * (t - mt))
    });
    num / den * 86_400.0
}

/// Keeps the source growing: a sync of 16 new blocks every PERIOD (at once when the
/// last one overran).
struct Growth {
    start: Instant,
    syncs: u32,
}

impl Growth {
    fn due(&self) -> Instant {
        self.start + PERIOD * self.syncs
    }

    /// Waits for the next slot and syncs.
    fn step(&mut self, fleet: &Fleet, volume: &std::path::Path) {
        std::thread::sleep(self.due().saturating_duration_since(Instant::now()));
        rewrite_random_blocks(volume, 16);
        fleet.sync(SOURCE);
        self.syncs += 1;
    }

    /// Syncs only when one is due (inside a poll).
    fn keep_up(&mut self, fleet: &Fleet, volume: &std::path::Path) {
        if Instant::now() >= self.due() {
            self.step(fleet, volume);
        }
    }
}

/// The row of `forecast --json` in `list` named `name`.
fn row(f: &Value, list: &str, name: &str) -> Value {
    f.get(list)
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|r| r.get("name").and_then(Value::as_str) == Some(name))
                .cloned()
        })
        .unwrap_or_else(|| panic!("no {list} row {name} in {f}"))
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn metrics(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    resp
}

#[test]
fn a_growing_source_is_warned_before_it_fills_and_resolved_when_space_grows() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    // A 50-second window sampled about every second (heartbeats every second).
    let mut fleet = Fleet::builder()
        .coordinator_extra(&format!(
            "forecast_warn_days = {WARN_DAYS}\nforecast_window = \"{WINDOW_S}s\"\nmetrics_listen = \"{metrics_addr}\""
        ))
        .node_capacity("2GiB")
        .node("node-1")
        .agent_source("host-1", SOURCE, None, SIZE, "")
        .start();
    fleet.cli(&["allocate", SOURCE, "--points", "128MiB"]);
    fleet.sync(SOURCE);
    let disk = fleet.node_dir("node-1").join("disk1").display().to_string();
    let disk_key = format!("forecast/node-1/{}", disk.trim_start_matches('/'));
    let source_key = format!("forecast/{SOURCE}");

    // One MiB of new before-images a sync, a sync every two seconds: about 42 GiB a
    // day, so the source's 128 MiB is a few thousandths of a day away and the 2 GiB
    // disk a few hundredths, both under WARN_DAYS. After each sync the test records
    // the source's points_used_bytes and the time: the growth it sees over the
    // window is the truth the forecast (sampled at heartbeats, a Theil-Sen trend)
    // is held to.
    let volume = fleet.volume(SOURCE);
    let mut open = (None, None);
    let mut growth = Growth {
        start: Instant::now(),
        syncs: 0,
    };
    let mut seen: Vec<(f64, f64)> = Vec::new();
    for _ in 0..60 {
        growth.step(&fleet, &volume);
        seen.push((
            growth.start.elapsed().as_secs_f64(),
            points_used(&fleet) as f64,
        ));
        open = (fleet.open_alert(&source_key), fleet.open_alert(&disk_key));
        if open.0.is_some() && open.1.is_some() && growth.start.elapsed() > WINDOW + 2 * PERIOD {
            break;
        }
    }
    let (Some(src_alert), Some(disk_alert)) = open else {
        let f = fleet.cli_json(&["forecast", "--json"]);
        panic!("after 60 syncs the warnings are not both open: {open:?}; forecast: {f}");
    };
    // The forecast's days against the true days: the same used and limit, at the
    // growth the test measured over the window.
    let f = fleet.cli_json(&["forecast", "--json"]);
    let s = row(&f, "sources", SOURCE);
    let now = growth.start.elapsed().as_secs_f64();
    let recent: Vec<(f64, f64)> = seen
        .iter()
        .copied()
        .filter(|(t, _)| *t >= now - WINDOW.as_secs_f64())
        .collect();
    let true_growth = slope_per_day(&recent);
    let left = s["limit_bytes"].as_f64().expect("limit") - s["used_bytes"].as_f64().expect("used");
    let truth = left / true_growth;
    let days = num(&s, "days_until_full").unwrap_or_else(|| panic!("no forecast: {s}"));
    // Heartbeats every second: the window holds dozens of samples, not a handful.
    assert!(s["samples"].as_u64().is_some_and(|n| n >= 20), "{s}");
    assert!(
        (days - truth).abs() <= 0.10 * truth,
        "forecast {days:.6} days, true {truth:.6} (growth {true_growth:.0} B/day over {} samples of the test); {s}",
        recent.len()
    );
    assert_eq!(json_str(&src_alert, "severity"), "warning", "{src_alert}");
    assert_eq!(json_str(&src_alert, "subject"), SOURCE, "{src_alert}");
    assert!(
        json_str(&src_alert, "message").contains("bulwark allocate"),
        "{src_alert}"
    );
    assert_eq!(json_str(&disk_alert, "subject"), "node-1", "{disk_alert}");

    assert_eq!(num(&f, "warn_days"), Some(WARN_DAYS), "{f}");
    let trend = num(&s, "growth_bytes_per_day").expect("a trend");
    assert!(days < WARN_DAYS && trend > 0.0, "{s}");
    assert_eq!(json_str(&s, "node"), "node-1", "{s}");
    assert_eq!(s["limit_bytes"], 128 * MIB, "{s}");
    let d = row(&f, "disks", &disk);
    assert!(
        num(&d, "days_until_full").is_some_and(|x| x < WARN_DAYS),
        "{d}"
    );
    let n = row(&f, "nodes", "node-1");
    assert_eq!(n["limit_bytes"], 2048 * MIB, "{n}");
    let text = fleet.cli(&["forecast"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("WARN") && text.contains(SOURCE), "{text}");
    let scraped = metrics(&metrics_addr);
    assert!(
        scraped.contains(&format!(
            "bulwark_source_forecast_days_until_full{{source=\"{SOURCE}\"}}"
        )) && scraped.contains("bulwark_forecast_days_until_full{node=\"node-1\""),
        "{scraped}"
    );

    // The history is the coordinator's state: right after a restart, before any
    // new sample, the trend is still there.
    fleet.coordinator().restart();
    fleet.wait_coordinator();
    let after = fleet.cli_json(&["forecast", "--json"]);
    let s2 = row(&after, "sources", SOURCE);
    assert!(
        num(&s2, "growth_bytes_per_day").is_some_and(|g| g > 0.0),
        "the trend did not survive the restart: {s2}"
    );

    // More capacity for the disk (the node restarted with a larger one) and more
    // space for the source, each well beyond what the trend fills in WARN_DAYS.
    let disk_growth = num(&d, "growth_bytes_per_day").expect("a disk trend");
    let need = trend.max(disk_growth) * WARN_DAYS;
    let used = d["used_bytes"].as_u64().expect("used_bytes");
    let capacity_mib = (used as f64 + 8.0 * need) as u64 / MIB + 4096;
    let points_mib = (s["used_bytes"].as_u64().unwrap_or(0) as f64 + 4.0 * need) as u64 / MIB + 64;
    let cfg = fleet.node("node-1").config_path().to_path_buf();
    let text = std::fs::read_to_string(&cfg).expect("read node.toml");
    assert!(text.contains("capacity = \"2GiB\""), "{text}");
    std::fs::write(
        &cfg,
        text.replace(
            "capacity = \"2GiB\"",
            &format!("capacity = \"{capacity_mib}MiB\""),
        ),
    )
    .expect("write node.toml");
    fleet.node("node-1").restart();
    poll(
        "the disk's forecast warning to resolve",
        Duration::from_secs(60),
        || {
            growth.keep_up(&fleet, &volume);
            match fleet.open_alert(&disk_key) {
                None => Ok(()),
                Some(a) => Err(format!("still open: {a}")),
            }
        },
    );
    fleet.cli(&["allocate", SOURCE, "--points", &format!("{points_mib}MiB")]);
    poll(
        "the source's forecast warning to resolve",
        Duration::from_secs(60),
        || {
            growth.keep_up(&fleet, &volume);
            match fleet.open_alert(&source_key) {
                None => Ok(()),
                Some(a) => Err(format!("still open: {a}")),
            }
        },
    );
    let all = fleet.cli_json(&["alerts", "--all", "--json"]);
    for key in [&source_key, &disk_key] {
        assert!(
            all.as_array().is_some_and(|a| a.iter().any(|x| {
                x.get("key").and_then(Value::as_str) == Some(key.as_str())
                    && x.get("resolved").and_then(Value::as_bool) == Some(true)
            })),
            "{key} is not listed resolved: {all}"
        );
    }
}

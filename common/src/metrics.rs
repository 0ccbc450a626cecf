//! The process's metrics: one registry of counters, gauges and histograms with
//! labels, read by two exporters — the Prometheus text endpoint (`metrics_listen`,
//! opt-in per daemon) and OTLP (when OpenTelemetry export is on).
//!
//! Every family is declared in [`FAMILIES`] with its kind and help; updates name a
//! family and label values. Updates happen per sync, batch or heartbeat, never per
//! block, so one mutex is cheap.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};

/// How far a long operation is (a sync, check, ship, restore or export): bytes done
/// of the total (0 = not known yet). Shared between the work and whoever shows it.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// What a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Seconds, with [`BUCKETS`].
    Histogram,
}

/// Histogram bucket bounds (seconds).
pub const BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// Every metric family: name, kind, help.
pub const FAMILIES: &[(&str, Kind, &str)] = &[
    (
        "bulwark_synced_bytes_total",
        Kind::Counter,
        "Payload bytes of blocks applied by syncs (node) or sent (agent), per data source",
    ),
    (
        "bulwark_synced_blocks_total",
        Kind::Counter,
        "Blocks applied by syncs (node) or sent (agent), per data source",
    ),
    (
        "bulwark_log_bytes_total",
        Kind::Counter,
        "Log bytes shipped (agent) or stored (node), per log source",
    ),
    (
        "bulwark_syncs_total",
        Kind::Counter,
        "Syncs and ships that ended, per data source and outcome (committed, failed)",
    ),
    (
        "bulwark_sync_duration_seconds",
        Kind::Histogram,
        "Duration of committed syncs and ships, per data source",
    ),
    (
        "bulwark_replica_lag_seconds",
        Kind::Gauge,
        "Age of each data source's newest recovery point on its node",
    ),
    (
        "bulwark_pool_capacity_bytes",
        Kind::Gauge,
        "Capacity of each pool disk",
    ),
    (
        "bulwark_pool_allocated_bytes",
        Kind::Gauge,
        "Bytes of each pool disk allocated to data sources",
    ),
    (
        "bulwark_pool_used_bytes",
        Kind::Gauge,
        "Bytes of each pool disk used by data sources",
    ),
    (
        "bulwark_live_streams",
        Kind::Gauge,
        "Syncs, ships and restores streaming now",
    ),
    (
        "bulwark_refusals_total",
        Kind::Counter,
        "Calls refused, per reason (role, no-rule, no-certificate, bad-certificate, revoked, enrollment, not-owner, not-assigned, stale-epoch, space, bad-input)",
    ),
    (
        "bulwark_source_logical_bytes",
        Kind::Gauge,
        "Bytes of each data source's recovery points before the node's compression (node)",
    ),
    (
        "bulwark_source_stored_bytes",
        Kind::Gauge,
        "Bytes each data source's recovery points take on the node's pool disk, compressed (node)",
    ),
    (
        "bulwark_alerts_active",
        Kind::Gauge,
        "Open alerts, per severity (coordinator)",
    ),
    (
        "bulwark_forecast_days_until_full",
        Kind::Gauge,
        "Days until each pool disk is full at its growth trend, per node and disk (coordinator; absent without a forecast)",
    ),
    (
        "bulwark_forecast_growth_bytes_per_day",
        Kind::Gauge,
        "Growth trend of each pool disk's used bytes, per node and disk (coordinator)",
    ),
    (
        "bulwark_source_forecast_days_until_full",
        Kind::Gauge,
        "Days until each data source's recovery-point allocation is full at its growth trend (coordinator; absent without a forecast)",
    ),
];

type Labels = Vec<(String, String)>;

#[derive(Debug, Clone)]
enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram {
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

fn registry() -> &'static Mutex<BTreeMap<(&'static str, Labels), Value>> {
    static R: OnceLock<Mutex<BTreeMap<(&'static str, Labels), Value>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

fn family(name: &str) -> Option<(&'static str, Kind)> {
    FAMILIES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(n, k, _)| (*n, *k))
}

fn labels(l: &[(&str, &str)]) -> Labels {
    l.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn update(
    name: &str,
    l: &[(&str, &str)],
    f: impl FnOnce(&mut Value),
    init: impl FnOnce() -> Value,
) {
    let Some((name, _)) = family(name) else {
        debug_assert!(false, "metric family {name} is not declared");
        return;
    };
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    f(r.entry((name, labels(l))).or_insert_with(init));
}

/// Adds to a counter.
pub fn counter_add(name: &str, l: &[(&str, &str)], v: u64) {
    update(
        name,
        l,
        |x| {
            if let Value::Counter(c) = x {
                *c += v;
            }
        },
        || Value::Counter(0),
    );
}

/// Sets a gauge.
pub fn gauge_set(name: &str, l: &[(&str, &str)], v: f64) {
    update(
        name,
        l,
        |x| {
            if let Value::Gauge(g) = x {
                *g = v;
            }
        },
        || Value::Gauge(0.0),
    );
}

/// Replaces every series of gauge family `name` with `series` at once (a scrape
/// never sees the family half updated); series not listed are gone.
pub fn gauge_set_all(name: &str, series: &[(Vec<(&str, &str)>, f64)]) {
    let Some((name, Kind::Gauge)) = family(name) else {
        debug_assert!(false, "gauge family {name} is not declared");
        return;
    };
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.retain(|(n, _), _| *n != name);
    for (l, v) in series {
        r.insert((name, labels(l)), Value::Gauge(*v));
    }
}

/// Records one observation (seconds) in a histogram.
pub fn observe(name: &str, l: &[(&str, &str)], seconds: f64) {
    update(
        name,
        l,
        |x| {
            if let Value::Histogram { counts, sum, count } = x {
                for (i, b) in BUCKETS.iter().enumerate() {
                    if seconds <= *b {
                        counts[i] += 1;
                    }
                }
                *sum += seconds;
                *count += 1;
            }
        },
        || Value::Histogram {
            counts: vec![0; BUCKETS.len()],
            sum: 0.0,
            count: 0,
        },
    );
}

/// What a committed sync or log ship moved.
#[derive(Debug, Clone, Copy)]
pub struct SyncFigures {
    /// A log ship (counted in `bulwark_log_bytes_total`, no blocks).
    pub log: bool,
    pub bytes: u64,
    pub blocks: u64,
    pub seconds: f64,
}

/// Counts a sync or ship of `source` that ended: committed with its figures, or
/// failed (`None`). The node counts what it applied, the agent what it sent.
pub fn record_sync(source: &str, done: Option<SyncFigures>) {
    let l = [("source", source)];
    let outcome = match done {
        Some(f) => {
            if f.log {
                counter_add("bulwark_log_bytes_total", &l, f.bytes);
            } else {
                counter_add("bulwark_synced_bytes_total", &l, f.bytes);
                counter_add("bulwark_synced_blocks_total", &l, f.blocks);
            }
            observe("bulwark_sync_duration_seconds", &l, f.seconds);
            "committed"
        }
        None => "failed",
    };
    counter_add(
        "bulwark_syncs_total",
        &[("source", source), ("outcome", outcome)],
        1,
    );
}

/// Removes every series of a family whose labels include `label = value` (a data
/// source that left this node).
pub fn forget(name: &str, label: &str, value: &str) {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.retain(|(n, l), _| !(*n == name && l.iter().any(|(k, v)| k == label && v == value)));
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_text(l: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Every series in the Prometheus text exposition format (version 0.0.4).
pub fn render() -> String {
    let r = registry().lock().unwrap_or_else(|e| e.into_inner());
    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        let series: Vec<_> = r.iter().filter(|((n, _), _)| n == name).collect();
        if series.is_empty() {
            continue;
        }
        let t = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {t}\n"));
        for ((_, l), v) in series {
            match v {
                Value::Counter(c) => out.push_str(&format!("{name}{} {c}\n", label_text(l, None))),
                Value::Gauge(g) => {
                    out.push_str(&format!("{name}{} {}\n", label_text(l, None), number(*g)))
                }
                Value::Histogram { counts, sum, count } => {
                    for (b, c) in BUCKETS.iter().zip(counts) {
                        out.push_str(&format!(
                            "{name}_bucket{} {c}\n",
                            label_text(l, Some(("le", number(*b))))
                        ));
                    }
                    out.push_str(&format!(
                        "{name}_bucket{} {count}\n",
                        label_text(l, Some(("le", "+Inf".into())))
                    ));
                    out.push_str(&format!(
                        "{name}_sum{} {}\n",
                        label_text(l, None),
                        number(*sum)
                    ));
                    out.push_str(&format!("{name}_count{} {count}\n", label_text(l, None)));
                }
            }
        }
    }
    out
}

fn snapshot(name: &'static str) -> Vec<(Labels, Value)> {
    let r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.iter()
        .filter(|((n, _), _)| *n == name)
        .map(|((_, l), v)| (l.clone(), v.clone()))
        .collect()
}

fn attrs(l: &Labels) -> Vec<opentelemetry::KeyValue> {
    l.iter()
        .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone()))
        .collect()
}

/// Registers every family with `meter` as an observable instrument that reads this
/// registry at each export (histograms export their count and sum as counters:
/// `<name>_count`, `<name>_sum`).
pub fn export_to_otel(meter: &opentelemetry::metrics::Meter) {
    for (name, kind, help) in FAMILIES {
        let name: &'static str = name;
        match kind {
            Kind::Counter => {
                meter
                    .u64_observable_counter(name)
                    .with_description(*help)
                    .with_callback(move |o| {
                        for (l, v) in snapshot(name) {
                            if let Value::Counter(c) = v {
                                o.observe(c, &attrs(&l));
                            }
                        }
                    })
                    .build();
            }
            Kind::Gauge => {
                meter
                    .f64_observable_gauge(name)
                    .with_description(*help)
                    .with_callback(move |o| {
                        for (l, v) in snapshot(name) {
                            if let Value::Gauge(g) = v {
                                o.observe(g, &attrs(&l));
                            }
                        }
                    })
                    .build();
            }
            Kind::Histogram => {
                meter
                    .u64_observable_counter(format!("{name}_count"))
                    .with_description(*help)
                    .with_callback(move |o| {
                        for (l, v) in snapshot(name) {
                            if let Value::Histogram { count, .. } = v {
                                o.observe(count, &attrs(&l));
                            }
                        }
                    })
                    .build();
                meter
                    .f64_observable_counter(format!("{name}_sum"))
                    .with_description(*help)
                    .with_callback(move |o| {
                        for (l, v) in snapshot(name) {
                            if let Value::Histogram { sum, .. } = v {
                                o.observe(sum, &attrs(&l));
                            }
                        }
                    })
                    .build();
            }
        }
    }
}

/// Serves [`render`] at `GET /metrics` on `listener` until `stop`: plain HTTP/1.1,
/// one request per connection. Anything else gets 404 (or 405 for other methods).
pub async fn serve(listener: tokio::net::TcpListener, stop: tokio_util::sync::CancellationToken) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut conn, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf);
            let mut words = head.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, body, ctype) = match (method, path.split('?').next().unwrap_or("")) {
                ("GET", "/metrics") => (
                    "200 OK",
                    render(),
                    "text/plain; version=0.0.4; charset=utf-8",
                ),
                ("GET", _) => ("404 Not Found", "try /metrics\n".into(), "text/plain"),
                _ => ("405 Method Not Allowed", String::new(), "text/plain"),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        counter_add("bulwark_synced_bytes_total", &[("source", "a\"b")], 5);
        counter_add("bulwark_synced_bytes_total", &[("source", "a\"b")], 7);
        gauge_set("bulwark_live_streams", &[], 2.0);
        observe("bulwark_sync_duration_seconds", &[("source", "x")], 0.2);
        let text = render();
        assert!(
            text.contains("# TYPE bulwark_synced_bytes_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("bulwark_synced_bytes_total{source=\"a\\\"b\"} 12\n"),
            "{text}"
        );
        assert!(text.contains("bulwark_live_streams 2\n"), "{text}");
        assert!(text.contains("bulwark_sync_duration_seconds_bucket{source=\"x\",le=\"0.1\"} 0\n"));
        assert!(
            text.contains("bulwark_sync_duration_seconds_bucket{source=\"x\",le=\"0.25\"} 1\n")
        );
        assert!(
            text.contains("bulwark_sync_duration_seconds_bucket{source=\"x\",le=\"+Inf\"} 1\n")
        );
        assert!(text.contains("bulwark_sync_duration_seconds_count{source=\"x\"} 1\n"));
        forget("bulwark_synced_bytes_total", "source", "a\"b");
        assert!(!render().contains("a\\\"b"));
        let l = vec![("node", "n1"), ("disk", "/d1")];
        gauge_set_all("bulwark_forecast_days_until_full", &[(l.clone(), 3.5)]);
        assert!(
            render().contains("bulwark_forecast_days_until_full{node=\"n1\",disk=\"/d1\"} 3.5\n")
        );
        gauge_set_all("bulwark_forecast_days_until_full", &[]);
        assert!(!render().contains("bulwark_forecast_days_until_full"));
    }
}

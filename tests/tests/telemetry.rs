//! OpenTelemetry end to end: an OTLP collector inside the test (a tonic server of the
//! standard trace and metrics services) receives what the real coordinator, node,
//! agent and CLI export. One `bulwark sync --wait` gives one trace across at least
//! three services with intact parent links and the read/send/apply/commit spans; the
//! exported byte counters equal the bytes synced; and the node's Prometheus
//! endpoint, scraped over HTTP, parses as the text exposition format and says the
//! same.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::time::Duration;

use bulwark_tests::otlp::{Collector, Span, start_collector};
use bulwark_tests::{Fleet, MIB, json_u64, poll};

/// GET `path` from `addr` over plain HTTP/1.1; returns status line and body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// Parses the Prometheus text exposition format (0.0.4) strictly enough to catch
/// what a scraper would reject; returns the samples as (name, labels, value).
/// One sample of the exposition: name, labels, value.
type Sample = (String, HashMap<String, String>, f64);

fn parse_exposition(body: &str) -> Result<Vec<Sample>, String> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for (no, line) in body.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}: {line:?}", no + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut w = rest.splitn(3, ' ');
            match (w.next(), w.next(), w.next()) {
                (Some("HELP"), Some(n), _) if valid_name(n) => {}
                (Some("TYPE"), Some(n), Some(t)) if valid_name(n) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(at("unknown type"));
                    }
                    if types.insert(n.to_string(), t.to_string()).is_some() {
                        return Err(at("TYPE given twice"));
                    }
                }
                _ => return Err(at("bad comment line")),
            }
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| at("bad value"))?,
        };
        let (name, labels) = match name_labels.split_once('{') {
            None => (name_labels.to_string(), HashMap::new()),
            Some((n, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .ok_or_else(|| at("unclosed labels"))?;
                let mut labels = HashMap::new();
                let mut chars = inner.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    if !valid_name(&key) || chars.next() != Some('"') {
                        return Err(at("bad label"));
                    }
                    let mut val = String::new();
                    loop {
                        match chars.next() {
                            Some('\\') => match chars.next() {
                                Some('n') => val.push('\n'),
                                Some(c @ ('\\' | '"')) => val.push(c),
                                _ => return Err(at("bad escape")),
                            },
                            Some('"') => break,
                            Some(c) => val.push(c),
                            None => return Err(at("unterminated label value")),
                        }
                    }
                    labels.insert(key, val);
                    match chars.next() {
                        Some(',') | None => {}
                        _ => return Err(at("junk after a label")),
                    }
                }
                (n.to_string(), labels)
            }
        };
        if !valid_name(&name) {
            return Err(at("bad metric name"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(&name);
        if !types.contains_key(family) {
            return Err(at("sample before its TYPE"));
        }
        samples.push((name, labels, value));
    }
    Ok(samples)
}

#[test]
fn one_sync_is_one_trace_and_the_metrics_count_its_bytes() {
    let rt = bulwark_tests::runtime();
    let collector = Collector::default();
    let endpoint = start_collector(&rt, collector.clone());
    let metrics_port = bulwark_tests::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut fleet = Fleet::builder()
        .node("node-1")
        .node_extra(&format!("metrics_listen = \"{metrics_addr}\""))
        .agent("host-1", "host-1-data", 8 * MIB)
        .build();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=e2e"),
    ];
    fleet.coordinator().start_with_env(&env);
    fleet.wait_coordinator();
    fleet.node("node-1").start_with_env(&env);
    fleet.wait_nodes_up(&["node-1".to_string()]);
    fleet.agent("host-1").start_with_env(&env);
    fleet.wait_agents_connected(&["host-1".to_string()]);

    let mut cmd = fleet.cli_command(fleet.admin(), &["sync", "host-1-data", "--wait", "--json"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let bytes = json_u64(&result, "bytes_sent");
    assert_eq!(bytes, 8 * MIB, "a first sync sends everything: {result}");

    // The trace: rooted at the CLI's span, through coordinator, agent and node.
    let spans = poll(
        "one trace across the fleet",
        Duration::from_secs(30),
        || {
            let r = collector.0.lock().unwrap_or_else(|e| e.into_inner());
            let root = r
                .spans
                .iter()
                .find(|s| s.service == "bulwark" && s.name == "bulwark sync")
                .ok_or_else(|| {
                    let seen: HashSet<(&str, &str)> = r
                        .spans
                        .iter()
                        .map(|s| (s.service.as_str(), s.name.as_str()))
                        .collect();
                    format!("no CLI span yet; spans so far: {seen:?}")
                })?;
            let trace: Vec<Span> = r
                .spans
                .iter()
                .filter(|s| s.trace == root.trace)
                .cloned()
                .collect();
            let names: HashSet<&str> = trace.iter().map(|s| s.name.as_str()).collect();
            for want in ["send_extents", "read_extents", "apply", "commit"] {
                if !names.contains(want) {
                    return Err(format!("no {want} span yet in {names:?}"));
                }
            }
            // Each process exports its spans when they end, in batches: wait until
            // every parent has arrived (the coordinator's Sync span ends last).
            let ids: HashSet<&[u8]> = trace.iter().map(|s| s.id.as_slice()).collect();
            if let Some(orphan) = trace
                .iter()
                .find(|s| !s.parent.is_empty() && !ids.contains(s.parent.as_slice()))
            {
                return Err(format!(
                    "the parent of {} ({}) has not arrived yet",
                    orphan.name, orphan.service
                ));
            }
            Ok(trace)
        },
    );
    let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert!(
        services.len() >= 3
            && [
                "bulwark",
                "bulwark-coordinator",
                "bulwark-agent",
                "bulwark-node"
            ]
            .iter()
            .all(|s| services.contains(s)),
        "services in the trace: {services:?}"
    );
    let ids: HashSet<&[u8]> = spans.iter().map(|s| s.id.as_slice()).collect();
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root: {roots:?}");
    assert_eq!(roots[0].name, "bulwark sync");
    for s in &spans {
        assert!(
            s.parent.is_empty() || ids.contains(s.parent.as_slice()),
            "span {} of {} has a parent that is not in the trace",
            s.name,
            s.service
        );
    }
    // The node's spans descend from the agent's, which descend from the CLI's.
    let by_id: HashMap<&[u8], &Span> = spans.iter().map(|s| (s.id.as_slice(), s)).collect();
    let chain = |s: &Span| {
        let mut out = vec![s.service.clone()];
        let mut cur = s;
        while let Some(p) = by_id.get(cur.parent.as_slice()) {
            out.push(p.service.clone());
            cur = p;
        }
        out
    };
    let apply = spans
        .iter()
        .find(|s| s.name == "apply" && s.service == "bulwark-node")
        .expect("the node's apply span");
    // The data source and point are attributes of the sync's spans.
    let point = json_u64(&result, "point").to_string();
    for service in ["bulwark-node", "bulwark-agent"] {
        let sync = spans
            .iter()
            .find(|s| s.name == "sync" && s.service == service)
            .unwrap_or_else(|| panic!("no sync span from {service}"));
        assert_eq!(
            sync.attributes.get("source").map(String::as_str),
            Some("host-1-data"),
            "{sync:?}"
        );
        assert_eq!(sync.attributes.get("point"), Some(&point), "{sync:?}");
    }
    let c = chain(apply);
    assert!(
        c.contains(&"bulwark-agent".to_string()) && c.last() == Some(&"bulwark".to_string()),
        "apply's ancestry: {c:?}"
    );

    // The logs name the trace: its id is in the span fields of the lines the node
    // and the agent wrote for this sync.
    let trace_hex: String = spans[0].trace.iter().map(|b| format!("{b:02x}")).collect();
    for daemon in ["node-1", "host-1"] {
        let log = if daemon == "node-1" {
            fleet.node(daemon).log_text()
        } else {
            fleet.agent(daemon).log_text()
        };
        assert!(
            log.contains(&format!("trace_id={trace_hex}")),
            "{daemon}'s log does not name trace {trace_hex}:\n{log}"
        );
    }

    // Exported metrics count exactly the bytes synced, on the node and the agent.
    for service in ["bulwark-node", "bulwark-agent"] {
        poll(
            &format!("{service}'s synced bytes over OTLP"),
            Duration::from_secs(30),
            || {
                let r = collector.0.lock().unwrap_or_else(|e| e.into_inner());
                let v = r
                    .metrics
                    .iter()
                    .rev()
                    .find(|(svc, name, a, _)| {
                        svc == service
                            && name == "bulwark_synced_bytes_total"
                            && a.get("source").map(String::as_str) == Some("host-1-data")
                    })
                    .map(|m| m.3);
                match v {
                    Some(v) if v == bytes as f64 => Ok(()),
                    other => Err(format!("latest value {other:?}, want {bytes}")),
                }
            },
        );
    }

    // The Prometheus endpoint: the text format, with the same count.
    let (status, body) = http_get(&metrics_addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let samples = parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let synced = samples
        .iter()
        .find(|(n, l, _)| {
            n == "bulwark_synced_bytes_total"
                && l.get("source").map(String::as_str) == Some("host-1-data")
        })
        .unwrap_or_else(|| panic!("no synced bytes sample:\n{body}"));
    assert_eq!(synced.2, bytes as f64);
    for family in [
        "bulwark_sync_duration_seconds_count",
        "bulwark_pool_capacity_bytes",
        "bulwark_live_streams",
    ] {
        poll(family, Duration::from_secs(15), || {
            let (_, body) = http_get(&metrics_addr, "/metrics");
            if body.lines().any(|l| l.starts_with(family)) {
                Ok(())
            } else {
                Err(format!("not in:\n{body}"))
            }
        });
    }
    let (status, _) = http_get(&metrics_addr, "/nothing");
    assert!(status.contains("404"), "{status}");
    // The parser rejects what a scraper would.
    assert!(parse_exposition("bulwark_x 1\n").is_err());
    assert!(parse_exposition("# TYPE bulwark_x counter\nbulwark_x{a=\"b} 1\n").is_err());
    fleet.stop_all();
}

/// A running sync's progress reaches the CLI: `sources --json` shows the agent's
/// figures while `sync --wait` runs (the node is slowed so there is time to look:
/// it sleeps 2 s after each group of batches it writes, so the sync takes at least
/// 2 s; the agent reports every 500 ms).
#[test]
fn a_running_sync_reports_its_progress() {
    let mut fleet = Fleet::builder()
        .node("node-1")
        .agent("host-1", "host-1-data", 16 * MIB)
        .build();
    fleet.coordinator().start();
    fleet.wait_coordinator();
    fleet
        .node("node-1")
        .start_with_env(&[("BULWARK_FAILPOINTS", "node-after-batch=sleep(2000)")]);
    fleet.wait_nodes_up(&["node-1".to_string()]);
    fleet.agent("host-1").start();
    fleet.wait_agents_connected(&["host-1".to_string()]);
    let sync = fleet.cli_spawn(&["sync", "host-1-data", "--wait", "--json"]);
    let seen = poll(
        "progress in sources --json",
        Duration::from_secs(30),
        || {
            let s = fleet.source_info("host-1-data");
            let p = &s["progress"];
            if p["op"] == "sync" && p["done_bytes"].as_u64().is_some_and(|d| d > 0) {
                Ok(p.clone())
            } else {
                Err(format!("{s}"))
            }
        },
    );
    assert_eq!(seen["total_bytes"], 16 * MIB, "{seen}");
    let out = sync
        .wait(Duration::from_secs(60))
        .expect("sync --wait ends");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Once done, no progress is shown.
    poll("progress cleared", Duration::from_secs(10), || {
        let s = fleet.source_info("host-1-data");
        if s["progress"].is_null() {
            Ok(())
        } else {
            Err(format!("{s}"))
        }
    });
}

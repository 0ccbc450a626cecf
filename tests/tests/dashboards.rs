//! The pictures in deploy/: the Grafana dashboard (`deploy/grafana/*.json`) and the
//! Prometheus alerting rules (`deploy/prometheus/*.yml`). Every PromQL expression in
//! them may name only metric families the daemons export
//! (`bulwark_common::metrics::FAMILIES`; a histogram also as `_bucket`, `_count`
//! and `_sum`), or Prometheus's own `up`; together they cover throughput, lag,
//! syncs by outcome, pool fill, the forecast, refusals and alerts; and
//! `promtool check rules` accepts the rules file (skipped, listed, where promtool
//! is not installed: Debian's `prometheus` package has it).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bulwark_common::metrics::{FAMILIES, Kind};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Files of `dir` ending in `ext`, sorted.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.to_string_lossy().ends_with(ext))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no *{ext} in {}", dir.display());
    v
}

/// Every `expr` string anywhere in a Grafana dashboard.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

/// Every `expr:` of a rules file: on its line (plain or quoted), or a block
/// scalar (`|`, `>`) on the more-indented lines after it.
fn rule_exprs(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            // The key's own column (after a `- ` when the key opens a list item).
            let indent = line.find("expr:").unwrap_or(0);
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(block.join(" "));
        } else {
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            out.push(unquoted.to_string());
        }
    }
    out
}

/// PromQL words that are not metric names: operators, modifiers, aggregations.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// Words after which a parenthesised list holds label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names an expression selects: identifiers outside strings, label
/// matchers (`{...}`) and ranges (`[...]`), not called as functions, not
/// keywords, and not the label lists of `by (...)` and its kin.
fn metric_names(expr: &str) -> Vec<String> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut braces, mut brackets) = (0, 0i32, 0i32);
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i += 1;
            while i < c.len() && c[i] != ch {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        match ch {
            '{' => braces += 1,
            '}' => braces -= 1,
            '[' => brackets += 1,
            ']' => brackets -= 1,
            _ => {}
        }
        let starts_word = ch.is_ascii_alphabetic() || ch == '_' || ch == ':';
        if ch.is_ascii_digit() || ch == '$' || (starts_word && (braces > 0 || brackets > 0)) {
            // A number, a duration, a variable, or a word inside a matcher/range.
            i += 1;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !starts_word {
            i += 1;
            continue;
        }
        let start = i;
        while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
            i += 1;
        }
        let word: String = c[start..i].iter().collect();
        let mut j = i;
        while j < c.len() && c[j].is_whitespace() {
            j += 1;
        }
        let called = j < c.len() && c[j] == '(';
        if LABEL_LISTS.contains(&word.as_str()) && called {
            while j < c.len() && c[j] != ')' {
                j += 1;
            }
            i = j + 1;
            continue;
        }
        if !called && !KEYWORDS.contains(&word.as_str()) {
            out.push(word);
        }
    }
    out
}

/// Whether `name` is a series the daemons export (or Prometheus's own `up`).
fn exported(name: &str) -> bool {
    if name == "up" {
        return true;
    }
    FAMILIES.iter().any(|(family, kind, _)| {
        name == *family
            || (*kind == Kind::Histogram
                && ["_bucket", "_count", "_sum"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(family)))
    })
}

/// Checks every expression of `file`; returns the metric names they use.
fn check(file: &Path, exprs: &[String], offences: &mut Vec<String>) -> BTreeSet<String> {
    assert!(
        !exprs.is_empty(),
        "no expression found in {}",
        file.display()
    );
    let mut used = BTreeSet::new();
    for e in exprs {
        let names = metric_names(e);
        if !names.iter().any(|n| n.starts_with("bulwark_") || n == "up") {
            offences.push(format!("{}: `{e}` names no metric", file.display()));
        }
        for n in names {
            if !exported(&n) {
                offences.push(format!(
                    "{}: `{e}` uses {n}, which no daemon exports (common/src/metrics.rs FAMILIES)",
                    file.display()
                ));
            }
            used.insert(n);
        }
    }
    used
}

#[test]
fn the_extractor_finds_metric_names_and_only_them() {
    let names = metric_names(
        r#"histogram_quantile(0.95, sum by (le, source) (rate(bulwark_sync_duration_seconds_bucket{job=~"$j", source!="x"}[$__rate_interval]))) / on (source) group_left bulwark_x offset 5m > 1e3 unless count without (a) (up) and sum(rate(m_total[5m:1m]))"#,
    );
    assert_eq!(
        names,
        [
            "bulwark_sync_duration_seconds_bucket",
            "bulwark_x",
            "up",
            "m_total"
        ]
    );
    assert!(exported("bulwark_sync_duration_seconds_count"));
    assert!(!exported("bulwark_syncs_total_bucket"));
    assert!(!exported("bulwark_nothing"));
    let rules = "  - alert: A\n    expr: a_total > 1\n  - expr: |\n      sum(b)\n        / c\n    for: 5m\n  - expr: \"d{x=\\\"1\\\"}\"\n";
    assert_eq!(
        rule_exprs(rules),
        ["a_total > 1", "sum(b) / c", "d{x=\\\"1\\\"}"]
    );
}

#[test]
fn every_query_of_the_dashboards_and_rules_names_an_exported_family() {
    let mut offences = Vec::new();
    let mut used = BTreeSet::new();
    let mut panels = 0;
    for f in files(&deploy().join("grafana"), ".json") {
        let text = std::fs::read_to_string(&f).expect("read the dashboard");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", f.display()));
        let mut exprs = Vec::new();
        dashboard_exprs(&v, &mut exprs);
        panels += exprs.len();
        used.extend(check(&f, &exprs, &mut offences));
    }
    let mut rules = 0;
    for f in files(&deploy().join("prometheus"), ".yml") {
        let exprs = rule_exprs(&std::fs::read_to_string(&f).expect("read the rules"));
        rules += exprs.len();
        used.extend(check(&f, &exprs, &mut offences));
    }
    assert!(offences.is_empty(), "{}", offences.join("\n"));
    assert!(
        panels >= 12 && rules >= 8,
        "{panels} queries, {rules} rules"
    );
    // The pictures operators expect: throughput, lag, syncs by outcome, pool fill,
    // the forecast, refusals and alerts.
    for family in [
        "bulwark_synced_bytes_total",
        "bulwark_replica_lag_seconds",
        "bulwark_syncs_total",
        "bulwark_pool_used_bytes",
        "bulwark_pool_capacity_bytes",
        "bulwark_forecast_days_until_full",
        "bulwark_source_forecast_days_until_full",
        "bulwark_refusals_total",
        "bulwark_alerts_active",
    ] {
        assert!(used.contains(family), "no query uses {family}: {used:?}");
    }
}

#[test]
fn promtool_accepts_the_rules() {
    if !bulwark_tests::have_tool("promtool", "Debian package prometheus") {
        return;
    }
    for f in files(&deploy().join("prometheus"), ".yml") {
        let out = std::process::Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&f)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool check rules {}:\n{}{}",
            f.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

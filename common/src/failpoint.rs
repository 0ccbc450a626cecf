//! Fault points for crash tests: named places in the code where a test can make the
//! process pause or abort, so that `kill -9` lands at an exact step of a sync.
//!
//! They are armed only through the `BULWARK_FAILPOINTS` environment variable, read
//! once at start-up: `name=action[,name=action...]` where action is `abort`,
//! `pause` (sleep for an hour, for a test to kill the process), or `sleep(MS)`, and
//! may end in `@N` to act from the N-th time the point is reached (default 1). A
//! process without the variable pays one atomic load per point.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    Abort,
    Pause,
    Sleep(u64),
}

#[derive(Debug)]
struct Armed {
    action: Action,
    from_hit: u64,
    hits: AtomicU64,
}

static POINTS: OnceLock<HashMap<String, Armed>> = OnceLock::new();

/// An item of `BULWARK_FAILPOINTS` that does not parse, and why.
#[derive(Debug, thiserror::Error)]
enum SpecError {
    #[error("failpoint `{0}` has no `=action`")]
    NoAction(String),
    #[error("failpoint `{item}`: `@{count}` is not a count")]
    Count { item: String, count: String },
    #[error("failpoint `{0}`: bad sleep milliseconds")]
    Sleep(String),
    #[error("failpoint `{item}`: unknown action `{action}`")]
    Unknown { item: String, action: String },
}

fn parse(spec: &str) -> Result<HashMap<String, Armed>, SpecError> {
    let mut map = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, rest) = item
            .split_once('=')
            .ok_or_else(|| SpecError::NoAction(item.to_string()))?;
        let (action, from_hit) = match rest.split_once('@') {
            Some((a, n)) => (
                a,
                n.parse::<u64>().map_err(|_| SpecError::Count {
                    item: item.to_string(),
                    count: n.to_string(),
                })?,
            ),
            None => (rest, 1),
        };
        let action = match action {
            "abort" => Action::Abort,
            "pause" => Action::Pause,
            a if a.starts_with("sleep(") && a.ends_with(')') => Action::Sleep(
                a["sleep(".len()..a.len() - 1]
                    .parse()
                    .map_err(|_| SpecError::Sleep(item.to_string()))?,
            ),
            other => {
                return Err(SpecError::Unknown {
                    item: item.to_string(),
                    action: other.to_string(),
                });
            }
        };
        map.insert(
            name.to_string(),
            Armed {
                action,
                from_hit,
                hits: AtomicU64::new(0),
            },
        );
    }
    Ok(map)
}

fn points() -> &'static HashMap<String, Armed> {
    POINTS.get_or_init(|| match std::env::var("BULWARK_FAILPOINTS") {
        Ok(spec) => match parse(&spec) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("BULWARK_FAILPOINTS: {e}");
                std::process::exit(2);
            }
        },
        Err(_) => HashMap::new(),
    })
}

/// Reaches the fault point `name`: does nothing unless a test armed it. Blocking:
/// call it from blocking code (the store), not from an async task.
pub fn hit(name: &str) {
    let points = points();
    if points.is_empty() {
        return;
    }
    let Some(p) = points.get(name) else { return };
    let n = p.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if n < p.from_hit {
        return;
    }
    // Tests wait for this line before they kill the process.
    eprintln!("failpoint {name} reached (hit {n}): {:?}", p.action);
    match p.action {
        Action::Abort => std::process::abort(),
        Action::Pause => std::thread::sleep(Duration::from_secs(3600)),
        Action::Sleep(ms) => std::thread::sleep(Duration::from_millis(ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let m = parse("a=abort, b=sleep(20)@3,c=pause").expect("valid spec");
        assert_eq!(m["a"].action, Action::Abort);
        assert_eq!(m["b"].action, Action::Sleep(20));
        assert_eq!(m["b"].from_hit, 3);
        assert_eq!(m["c"].action, Action::Pause);
        assert!(parse("a").is_err());
        assert!(parse("a=explode").is_err());
        assert!(parse("a=abort@x").is_err());
    }
}

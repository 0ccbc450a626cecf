//! Fault points for crash tests: named places in the code where a test can make the
//! process pause or abort, so that `kill -9` lands at an exact step of a sync.
//!
//! They are armed only through the `BULWARK_FAILPOINTS` environment variable, read
//! once at start-up: `name=action[,name=action...]` where action is `abort`,
//! `pause` (sleep for an hour, for a test to kill the process), `sleep(MS)`, or
//! `errno(NAME)` (`EIO`, `ENOSPC`, `EDQUOT`, `EROFS`: the I/O call at an I/O fault
//! point, [`io`], fails with that error, as if the file system had returned it),
//! and may end in `@N` to act from the N-th time the point is reached (default 1)
//! on. A process without the variable pays one atomic load per point.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    Abort,
    Pause,
    Sleep(u64),
    /// The I/O call at the point fails with this `errno` (see [`io`]).
    Errno(Errno),
}

/// The errors an I/O fault point can return: the ones a full, failing or
/// read-only disk gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    Eio,
    Enospc,
    Edquot,
    Erofs,
}

impl Errno {
    const ALL: [(&'static str, Errno); 4] = [
        ("EIO", Errno::Eio),
        ("ENOSPC", Errno::Enospc),
        ("EDQUOT", Errno::Edquot),
        ("EROFS", Errno::Erofs),
    ];

    fn parse(name: &str) -> Option<Errno> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, e)| *e)
    }

    /// The raw `errno` value.
    pub fn raw(self) -> i32 {
        match self {
            Errno::Eio => libc::EIO,
            Errno::Enospc => libc::ENOSPC,
            Errno::Edquot => libc::EDQUOT,
            Errno::Erofs => libc::EROFS,
        }
    }
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
    #[error("failpoint `{item}`: unknown errno `{errno}` (known: EIO, ENOSPC, EDQUOT, EROFS)")]
    Errno { item: String, errno: String },
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
            a if a.starts_with("errno(") && a.ends_with(')') => {
                let errno = &a["errno(".len()..a.len() - 1];
                Action::Errno(Errno::parse(errno).ok_or_else(|| SpecError::Errno {
                    item: item.to_string(),
                    errno: errno.to_string(),
                })?)
            }
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
/// call it from blocking code (the store), not from an async task. A point armed
/// with `errno(..)` is an I/O fault point: reach it with [`io`].
pub fn hit(name: &str) {
    if let Some(Action::Errno(_)) = reach(name) {
        eprintln!("failpoint {name} is armed with errno, but it is not an I/O fault point");
    }
}

/// Reaches the I/O fault point `name`, placed just before an I/O call: an error
/// (`errno(..)`) when a test armed it so, which the caller returns as that call's
/// error; the other actions act as at [`hit`].
pub fn io(name: &str) -> std::io::Result<()> {
    match reach(name) {
        Some(Action::Errno(e)) => Err(std::io::Error::from_raw_os_error(e.raw())),
        _ => Ok(()),
    }
}

/// The action armed at `name`, done (but an errno, returned) when the point acts.
fn reach(name: &str) -> Option<Action> {
    let points = points();
    if points.is_empty() {
        return None;
    }
    let p = points.get(name)?;
    let n = p.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if n < p.from_hit {
        return None;
    }
    // Tests wait for this line before they kill the process.
    eprintln!("failpoint {name} reached (hit {n}): {:?}", p.action);
    match p.action {
        Action::Abort => std::process::abort(),
        Action::Pause => std::thread::sleep(Duration::from_secs(3600)),
        Action::Sleep(ms) => std::thread::sleep(Duration::from_millis(ms)),
        Action::Errno(_) => {}
    }
    Some(p.action)
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

    #[test]
    fn parses_errno_actions() {
        let m = parse("w=errno(EIO),f=errno(ENOSPC)@2,q=errno(EDQUOT),r=errno(EROFS)")
            .expect("valid spec");
        assert_eq!(m["w"].action, Action::Errno(Errno::Eio));
        assert_eq!(m["w"].from_hit, 1);
        assert_eq!(m["f"].action, Action::Errno(Errno::Enospc));
        assert_eq!(m["f"].from_hit, 2);
        assert_eq!(m["q"].action, Action::Errno(Errno::Edquot));
        assert_eq!(m["r"].action, Action::Errno(Errno::Erofs));
        assert_eq!(Errno::Enospc.raw(), libc::ENOSPC);
        let e = parse("w=errno(EBOGUS)").expect_err("unknown errno");
        assert!(e.to_string().contains("unknown errno `EBOGUS`"), "{e}");
        assert!(e.to_string().contains("`w=errno(EBOGUS)`"), "{e}");
        for bad in ["w=errno()", "w=errno(eio)", "w=errno(EIO", "w=errno(5)"] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
    }

    /// An unarmed I/O fault point is no error; the error of an armed one is the
    /// errno's, as the OS would give it.
    #[test]
    fn an_unarmed_io_point_passes() {
        assert!(io("no-such-point").is_ok());
        let e = std::io::Error::from_raw_os_error(Errno::Enospc.raw());
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
    }
}

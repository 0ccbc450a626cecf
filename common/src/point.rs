//! Recovery-point vocabulary shared by the node (which records points), the
//! coordinator (which lists them) and the CLI (which prints them).

use bulwark_proto as pb;
use serde::{Deserialize, Serialize};

/// Whether a point is crash- or application-consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    Crash,
    App,
}

/// How a point came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    Full,
    Incremental,
    Check,
    Log,
}

impl Consistency {
    /// The word used in CLI output and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::App => "app",
        }
    }
    /// From the wire; unspecified means crash-consistent.
    pub fn from_proto(v: i32) -> Consistency {
        match pb::Consistency::try_from(v) {
            Ok(pb::Consistency::App) => Consistency::App,
            _ => Consistency::Crash,
        }
    }
    /// To the wire.
    pub fn to_proto(self) -> i32 {
        match self {
            Consistency::Crash => pb::Consistency::Crash as i32,
            Consistency::App => pb::Consistency::App as i32,
        }
    }
}

impl PointKind {
    /// The word used in CLI output and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::Full => "full",
            PointKind::Incremental => "incremental",
            PointKind::Check => "check",
            PointKind::Log => "log",
        }
    }
    /// From the wire; `None` when unspecified or unknown.
    pub fn from_proto(v: i32) -> Option<PointKind> {
        match pb::PointKind::try_from(v).ok()? {
            pb::PointKind::Full => Some(PointKind::Full),
            pb::PointKind::Incremental => Some(PointKind::Incremental),
            pb::PointKind::Check => Some(PointKind::Check),
            pb::PointKind::Log => Some(PointKind::Log),
            pb::PointKind::Unspecified => None,
        }
    }
    /// To the wire.
    pub fn to_proto(self) -> i32 {
        (match self {
            PointKind::Full => pb::PointKind::Full,
            PointKind::Incremental => pb::PointKind::Incremental,
            PointKind::Check => pb::PointKind::Check,
            PointKind::Log => pb::PointKind::Log,
        }) as i32
    }
}

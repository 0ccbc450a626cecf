//! The Bulwark admin CLI, `bulwark`: fleet PKI, listings, policy, and syncs and
//! restores relayed by the coordinator. Every listing takes `--json`; the exit code
//! is 0 only on success.
//!
//! [`args`] defines the command line and [`dispatch::run`] hands each command to
//! its module. Commands never import the dispatcher, nor it them beyond calling
//! them; what several commands share sits in [`admin`], [`output`], [`json`],
//! [`parse`] and [`progress`].

/// The connection to the coordinator: `--coordinator`/`--ca`/... and the client.
pub mod admin;
/// `bulwark alerts`.
pub mod alerts;
/// The command line: `Cli` and its `Command`s.
pub mod args;
/// `bulwark status`: every configured coordinator asked on its own, and etcd's health.
pub mod coordinators;
/// `bulwark demo`: a whole fleet in this process.
pub mod demo;
/// `run`: a parsed command line to the module that carries it out.
pub mod dispatch;
/// `bulwark completions` and `bulwark man`.
pub mod docs;
/// `bulwark export` and `bulwark mount`: a point read straight from its node.
pub mod export;
/// `bulwark forecast`: days until allocations and pool disks are full.
pub mod forecast;
/// `bulwark group ...`: protection groups.
pub mod groups;
/// The JSON shapes of a source, a point, a retention and a lock.
pub mod json;
/// `bulwark nodes`, `agents`, `drain` and `rebalance`.
pub mod nodes;
/// Tables, `--json` output and the words and figures commands share.
pub mod output;
/// Value parsers for sizes, durations and times.
pub mod parse;
/// `bulwark pki`: the fleet CA and certificates.
pub mod pki;
/// `bulwark points` and `bulwark verify`.
pub mod points;
/// `bulwark quota`, `retention`, `lock` and `remove`.
pub mod policy;
/// Progress display while a long operation runs.
pub mod progress;
/// `bulwark restore`.
pub mod restore;
/// `bulwark revoke` and `bulwark revocations`.
pub mod revocation;
/// `bulwark sources` and `bulwark allocate`.
pub mod sources;
/// `bulwark status`.
pub mod status;
/// `bulwark sync` and `bulwark check`, and how a finished sync is told.
pub mod sync;
/// `bulwark token create`: enrollment tokens.
pub mod tokens;
/// `bulwark workers [--node N]`: a daemon's background loops and their state.
pub mod workers;

pub use args::Cli;
pub use dispatch::run;

//! Code that two or more Bulwark binaries share, and nothing else.
//!
//! - [`pki`] — the fleet CA and the certificates it signs (`bulwark pki`), and
//!   reading roles, identities and validity back from certificates.
//! - [`revocation`] — the fleet's revocation list and CRL, as every daemon enforces it.
//! - [`tls`] — the fleet's mutual TLS: server and client configurations, the peer
//!   identity taken from a certificate's SPIFFE URI SAN, and role checks.
//! - [`access`] — who may call which RPC: one table, enforced before every handler.
//! - [`keyfile`] — key and certificate files, written without following planted links.
//! - [`failover`] — several coordinators: the list a client dials in order, moving on
//!   when one is unreachable or answers that it is not the leader (the leader hint).
//! - [`enroll`] — a host's enrollment, and renewing a certificate once.
//! - [`renewal`] — the `renewal` worker: a daemon renewing its own certificate.
//! - [`config`] — TOML loading with errors that name the file and key; sizes and
//!   durations as operators write them.
//! - [`alloc`] — a data source's default space on a node.
//! - [`block`] — blocks, extents and BLAKE3 checksums, and the checks the node and the
//!   agent both make on them.
//! - [`point`] — recovery-point vocabulary shared by node, coordinator and CLI.
//! - [`retention`] — which recovery points a node keeps (count, age, GFS thinning).
//! - [`name`] — names of sources, agents, nodes and groups: one safe path component,
//!   checked once where they are received.
//! - [`text`] — makes other processes' text safe to print.
//! - [`time`] — Unix milliseconds on the wire, RFC 3339 and durations for people.
//! - [`worker`] — a daemon's background loops as named workers with a state, a
//!   last error and an ordered stop (`bulwark workers`).
//! - [`daemon`] — what the daemons' `main` functions share (command line, runtime,
//!   exit codes).
//! - [`metrics`] — counters, gauges and histograms, exported to Prometheus and OTLP.
//! - [`telemetry`] — tracing and OpenTelemetry set-up, trace context across RPCs.
//! - [`shutdown`] — SIGTERM and Ctrl-C as one cancellation token.
//! - [`failpoint`] — named crash points the tests arm.
//! - [`malloc`] — the allocator's tuning.
//! - `testkit` (hidden) — for tests only: a skipped test says so in one fixed form.

pub mod access;
pub mod alloc;
pub mod block;
pub mod config;
pub mod daemon;
pub mod enroll;
pub mod failover;
pub mod failpoint;
pub mod keyfile;
pub mod malloc;
pub mod metrics;
pub mod name;
pub mod pki;
pub mod point;
pub mod renewal;
pub mod retention;
pub mod revocation;
pub mod shutdown;
pub mod telemetry;
#[doc(hidden)]
pub mod testkit;
pub mod text;
pub mod time;
pub mod tls;
pub mod worker;

/// The version every binary reports to its peers.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Whether a coordinator or node at version `server` serves a peer (agent, or a
/// node registering) at version `peer`, both `MAJOR.MINOR.PATCH`: the same major,
/// and the server at the peer's minor version or one newer. So a fleet upgrades
/// coordinator first, then nodes, then agents, one minor version at a time, and
/// never has to stop everything at once. The error says which side to upgrade.
pub fn compatible(server: &str, peer: &str) -> Result<(), String> {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.trim().split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some((major, minor))
    };
    let (Some((sm, sn)), Some((pm, pn))) = (parse(server), parse(peer)) else {
        return Err(format!(
            "version \"{peer}\" is not MAJOR.MINOR.PATCH (this side is {server})"
        ));
    };
    if sm != pm || pn > sn {
        return Err(format!(
            "version {peer} is newer than this {server}: upgrade the coordinator, then the nodes, before the agents"
        ));
    }
    if sn - pn > 1 {
        return Err(format!(
            "version {peer} is more than one minor version older than this {server}: upgrade it (one minor version at a time)"
        ));
    }
    Ok(())
}

/// Largest gRPC message any Bulwark server or client accepts. Extent batches are at
/// most [`block::MAX_BATCH_BYTES`] of payload, so anything near this is malformed.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Largest message the coordinator takes: hellos, reports and heartbeats (a
/// heartbeat of tens of thousands of sources fits).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

#[cfg(test)]
mod version_tests {
    use super::compatible;

    #[test]
    fn one_minor_version_of_skew_is_served() {
        assert!(compatible("0.2.3", "0.2.0").is_ok());
        assert!(compatible("0.2.3", "0.1.9").is_ok());
        assert!(
            compatible("0.2.0", "0.0.9")
                .expect_err("refused")
                .contains("more than one minor")
        );
        assert!(
            compatible("0.1.0", "0.2.0")
                .expect_err("refused")
                .contains("newer")
        );
        assert!(compatible("1.0.0", "0.9.0").is_err());
        assert!(
            compatible("0.1.0", "banana")
                .expect_err("refused")
                .contains("MAJOR.MINOR")
        );
    }
}

//! `bulwark export`: a recovery point copied from its storage node straight to a
//! file on the operator's machine. The coordinator says which node holds the source;
//! the CLI then reads the point from the node over mTLS with its admin certificate
//! (nodes serve restores to the admin role), checking every block's checksum, and
//! writes it the way an agent's restore does (`FILE.bulwark-partial`, fsync, rename).

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use bulwark_agent::restore::{RestoreOutcome, restore_point};
use bulwark_common::config::{TlsFiles, format_size};
use bulwark_common::tls::{self, Role, Target, TlsIdentity};
use bulwark_proto as pb;
use bulwark_proto::node_client::NodeClient;

use crate::cli::Admin;

/// Exports `point` (0 = newest) of `source` to the new file `to`, showing progress
/// on standard error.
pub async fn export(
    admin: &mut Admin,
    files: &TlsFiles,
    source: &str,
    point: u64,
    to: &Path,
) -> anyhow::Result<RestoreOutcome> {
    let at = admin
        .client
        .locate(pb::LocateRequest {
            source: source.to_string(),
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    let identity = TlsIdentity::load(files)?;
    let target = Target::parse(&at.node_address)
        .map_err(|m| anyhow!("node {} has a bad address: {m}", at.node))?;
    let channel = tls::channel(&target, identity.client_config(Role::Node)?)
        .await
        .map_err(anyhow::Error::msg)?;
    let node =
        NodeClient::new(channel).max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES);
    let done = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn(show_progress(done.clone(), at.size_bytes));
    let r = restore_point(source, point, to, Vec::new(), node, Some(done)).await;
    ticker.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    r.map_err(|e| anyhow!("export of {source} from node {} failed: {e}", at.node))
}

/// Bytes, rate and time left: rewritten in place on a terminal, a plain line every
/// 10 seconds otherwise.
async fn show_progress(done: Arc<AtomicU64>, total: u64) {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(10)
    };
    loop {
        tokio::time::sleep(every).await;
        let n = done.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = n as f64 / secs;
        let left = if rate > 0.0 {
            format!("{:.0} s left", total.saturating_sub(n) as f64 / rate)
        } else {
            "-".into()
        };
        let line = format!(
            "{} of {} ({:.0}%), {}/s, {left}",
            format_size(n),
            format_size(total),
            n as f64 * 100.0 / total.max(1) as f64,
            format_size(rate as u64)
        );
        if tty {
            eprint!("\r{line:<70}");
        } else {
            eprintln!("{line}");
        }
    }
}

//! `bulwark export`: a recovery point copied from its storage node straight to a
//! file on the operator's machine. The coordinator says which node holds the source;
//! the CLI then reads the point from the node over mTLS with its admin certificate
//! (nodes serve restores to the admin role), checking every block's checksum, and
//! writes it the way an agent's restore does (`FILE.bulwark-partial`, fsync, rename).
//! The node must present the certificate of the node the coordinator named: any
//! other process at that address (another node's certificate included) is refused
//! in the handshake. `bulwark mount` checks the NBD listener the same way
//! ([`check_nbd_node`]) before it prints the URL.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use bulwark_agent::restore::{RestoreOutcome, restore_point};
use bulwark_common::config::{TlsFiles, format_size};
use bulwark_common::metrics::Progress;
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
    let channel = tls::channel(
        &target,
        identity.client_config_for(Role::Node, Some(&at.node))?,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let node =
        NodeClient::new(channel).max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES);
    let progress = Arc::new(Progress::default());
    let ticker = tokio::spawn(show_progress(format!("export {source}"), progress.clone()));
    let r = restore_point(source, point, to, Vec::new(), node, Some(progress)).await;
    ticker.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    r.map_err(|e| anyhow!("export of {source} from node {} failed: {e}", at.node))
}

/// Checks that the NBD listener at `nbd_address` (`host:port`) presents the
/// certificate of node `node`: the NBD greeting, `NBD_OPT_STARTTLS`, a TLS
/// handshake that accepts only that node, then `NBD_OPT_ABORT`. The NBD client the
/// operator runs next (qemu, nbd-client) checks the CA only, not the node's name.
pub async fn check_nbd_node(files: &TlsFiles, nbd_address: &str, node: &str) -> anyhow::Result<()> {
    use bulwark_nbd::proto;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = Target::parse(nbd_address)
        .map_err(|m| anyhow!("node {node} has a bad NBD address: {m}"))?;
    let identity = TlsIdentity::load(files)?;
    let config = identity.client_config_for(Role::Node, Some(node))?;
    let what =
        |e: &dyn std::fmt::Display| anyhow!("NBD listener {nbd_address} of node {node}: {e}");
    let run = async {
        let mut s = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| what(&e))?;
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).await.map_err(|e| what(&e))?;
        if proto::be_u64(&greet[0..8]) != proto::NBD_MAGIC
            || proto::be_u64(&greet[8..16]) != proto::IHAVEOPT
        {
            return Err(what(&"not an NBD server (no newstyle greeting)"));
        }
        let flags = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        s.write_all(&flags.to_be_bytes())
            .await
            .map_err(|e| what(&e))?;
        s.write_all(&proto::encode_option_header(proto::OPT_STARTTLS, 0))
            .await
            .map_err(|e| what(&e))?;
        let mut h = [0u8; proto::OptionReplyHeader::LEN];
        s.read_exact(&mut h).await.map_err(|e| what(&e))?;
        let reply = proto::OptionReplyHeader::decode(&h).map_err(|e| what(&e))?;
        if reply.typ != proto::REP_ACK {
            return Err(what(&format!("STARTTLS refused (reply {:#x})", reply.typ)));
        }
        let name =
            rustls::pki_types::ServerName::try_from(target.host.clone()).map_err(|e| what(&e))?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, s)
            .await
            .map_err(|e| what(&e))?;
        let _ = tls
            .write_all(&proto::encode_option_header(proto::OPT_ABORT, 0))
            .await;
        let _ = tls.shutdown().await;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .map_err(|_| what(&"no answer within 15 s"))?
}

/// A progress bar with bytes, rate and time left, rewritten in place on a terminal;
/// a plain line every 10 seconds otherwise. Runs until aborted; nothing is shown
/// while `total` is 0 (not known yet).
pub async fn show_progress(label: String, progress: Arc<Progress>) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(10)
    };
    // The rate is measured from the first figure seen (a remote operation may have
    // started before this display).
    let mut first: Option<(Instant, u64)> = None;
    loop {
        tokio::time::sleep(every).await;
        let n = progress.done.load(Ordering::Relaxed);
        let total = progress.total.load(Ordering::Relaxed);
        if total == 0 {
            continue;
        }
        let (t0, n0) = *first.get_or_insert((Instant::now(), n));
        let secs = t0.elapsed().as_secs_f64().max(0.001);
        let rate = n.saturating_sub(n0) as f64 / secs;
        let left = if rate > 0.0 {
            format!("{:.0} s left", total.saturating_sub(n) as f64 / rate)
        } else {
            "-".into()
        };
        let frac = (n as f64 / total as f64).clamp(0.0, 1.0);
        let figures = format!(
            "{} of {} ({:.0}%), {}/s, {left}",
            format_size(n),
            format_size(total),
            frac * 100.0,
            format_size(rate as u64)
        );
        if tty {
            const WIDTH: usize = 24;
            let filled = (frac * WIDTH as f64).round() as usize;
            let bar = format!("{}{}", "#".repeat(filled), "-".repeat(WIDTH - filled));
            eprint!("\r{label} [{bar}] {figures:<60}");
        } else {
            eprintln!("{label}: {figures}");
        }
    }
}

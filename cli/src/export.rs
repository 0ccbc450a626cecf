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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bulwark_agent::restore::{RestoreOutcome, restore_point};
use bulwark_common::config::{TlsFiles, format_size};
use bulwark_common::metrics::Progress;
use bulwark_common::tls::{Role, Target, TlsIdentity};
use bulwark_proto as pb;
use clap::Args;
use serde_json::json;

use crate::admin::Admin;
use crate::output::print_json;
use crate::progress::show_progress;

/// `bulwark export SOURCE --to FILE`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Data source name.
    pub source: String,
    /// Point id (default: the newest).
    #[arg(long)]
    pub point: Option<u64>,
    /// A new file.
    #[arg(long)]
    pub to: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark mount SOURCE`.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// Data source name.
    pub source: String,
    /// Point id (default: the newest now).
    #[arg(long)]
    pub point: Option<u64>,
    /// Also lay out this CLI's certificate in DIR the way qemu's
    /// `tls-creds-x509` wants it (ca-cert.pem, client-cert.pem, client-key.pem).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark export`.
pub async fn export(admin: &mut Admin, files: &TlsFiles, a: ExportArgs) -> anyhow::Result<()> {
    let source = &a.source;
    let r = export_point(admin, files, source, a.point.unwrap_or(0), &a.to).await?;
    if a.json {
        print_json(&json!({
            "source": source, "point": r.point, "path": r.path,
            "bytes_written": r.bytes_written, "duration_ms": r.duration_ms,
        }))?;
    } else {
        println!(
            "{source}: point {} exported to {} ({} in {:.1} s), every block checked",
            r.point,
            r.path.display(),
            format_size(r.bytes_written),
            r.duration_ms as f64 / 1000.0
        );
    }
    Ok(())
}

/// `bulwark mount`: checks the node's NBD listener and prints the URL.
pub async fn mount(admin: &mut Admin, files: &TlsFiles, a: MountArgs) -> anyhow::Result<()> {
    let source = &a.source;
    let at = admin
        .client
        .locate(pb::LocateRequest {
            source: source.clone(),
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    if at.nbd_address.is_empty() {
        bail!(
            "node {} serves no NBD exports: set nbd_listen in its node.toml",
            at.node
        );
    }
    let points = admin.points(source).await?;
    let id = match a.point {
        Some(p) => points
            .iter()
            .find(|x| x.id == p)
            .map(|x| x.id)
            .ok_or_else(|| anyhow!("{source} has no point {p}"))?,
        None => points
            .last()
            .map(|x| x.id)
            .ok_or_else(|| anyhow!("{source} has no recovery point yet"))?,
    };
    // The listener must be the node the coordinator named (qemu checks the
    // CA only).
    check_nbd_node(files, &at.nbd_address, &at.node).await?;
    let url = format!("nbd://{}/{source}@{id}", at.nbd_address);
    if let Some(dir) = &a.tls_dir {
        qemu_tls_dir(files, dir)?;
    }
    if a.json {
        print_json(&json!({
            "url": url, "source": source, "point": id, "node": at.node,
            "size_bytes": at.size_bytes,
            "tls_dir": a.tls_dir.as_ref().map(|d| d.display().to_string()),
        }))?;
    } else {
        let dir = a
            .tls_dir
            .as_ref()
            .map_or("DIR".to_string(), |d| d.display().to_string());
        println!("{url}");
        println!(
            "read-only, TLS with an admin certificate; for example:\n  qemu-img convert -O raw --object tls-creds-x509,id=tls0,dir={dir},endpoint=client \\\n    --image-opts driver=nbd,server.type=inet,server.host={},server.port={},export={source}@{id},tls-creds=tls0 point.raw",
            at.nbd_address.rsplit_once(':').map_or("", |(h, _)| h),
            at.nbd_address.rsplit_once(':').map_or("", |(_, p)| p),
        );
    }
    Ok(())
}

/// Copies the CLI's CA, certificate and key into `dir` under the names qemu's
/// `tls-creds-x509` object reads; the key stays owner-only.
fn qemu_tls_dir(files: &TlsFiles, dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (from, name) in [
        (&files.ca, "ca-cert.pem"),
        (&files.cert, "client-cert.pem"),
        (&files.key, "client-key.pem"),
    ] {
        let to = dir.join(name);
        std::fs::copy(from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    let key = dir.join("client-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} owner-only", key.display()))?;
    Ok(())
}

/// Exports `point` (0 = newest) of `source` to the new file `to`, showing progress
/// on standard error.
pub async fn export_point(
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
    let node = crate::admin::node_client(&identity, &at.node, &at.node_address).await?;
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

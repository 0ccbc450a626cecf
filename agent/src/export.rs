//! The NBD export of an `nbd-filter` source: whoever can open it reads and writes
//! the protected disk, so only the host's own writer may.
//!
//! Two ways, one per source:
//!
//! - **A Unix socket** (`nbd_socket`), the default: the agent's user only. The
//!   socket's directory must be the agent's: created mode 0700 when missing; an
//!   existing one must be a real directory (not a symlink) owned by the agent's
//!   user with no group or other permissions, else the agent refuses to start and
//!   says which. It is not tightened in place: a directory the operator made with
//!   wider permissions (`/run/bulwark` at 0750, say) may be shared on purpose, and
//!   changing a shared directory behind the operator's back would be worse than a
//!   clear refusal. No directory above it may let others rename it away and put
//!   their own in its place (writable by another user without the sticky bit, or
//!   owned by another user than root or the agent's). Inside it, the socket is bound
//!   (nobody else can reach the directory meanwhile) and then made 0600. A socket
//!   left by an agent that did not stop cleanly is removed only if it is a socket,
//!   owned by the agent's user, with nobody listening.
//! - **TLS on a loopback port** (`nbd_listen` with `nbd_tls = true`), for a writer
//!   that runs as another user (a QEMU under libvirt): clients upgrade with
//!   `NBD_OPT_STARTTLS`, present a certificate of the fleet CA, and get the export
//!   only if its role is `nbd_client_role`. A certificate of another role is
//!   refused with `NBD_REP_ERR_POLICY`; one from another CA, or none, fails the TLS
//!   handshake. The server presents the agent's own certificate (qemu checks it
//!   against the address it dialled: issue it with `--ip 127.0.0.1`). TLS
//!   connections are served by the server's tokio path, not the spliced blocking
//!   one: expect the Unix socket to be faster.
//!
//! Plain TCP is refused when the config is loaded (`crate::config`). Both kinds
//! take the agent's `nbd_max_connections` and `nbd_handshake_timeout`.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bulwark_common::tls::{Identity, Role, TlsIdentity};
use bulwark_nbd::limits::Limits;
use bulwark_nbd::{Backend, ExportResolver, Refusal, ServerOptions, serve_tls_tcp, serve_unix};
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::config::NbdEndpoint;

/// The effective user id of the agent, which owns what it creates.
#[allow(unsafe_code)]
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// Listens on the export of `source` and serves `backend` there until `stop`; the
/// task joins `exports`. Errors name the source and the path or address.
pub async fn start_export(
    source: &str,
    endpoint: NbdEndpoint,
    backend: Arc<dyn Backend>,
    limits: Limits,
    identity: &TlsIdentity,
    exports: &mut tokio::task::JoinSet<()>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let opts = Arc::new(limits.apply(ServerOptions {
        export_name: source.to_string(),
        ..ServerOptions::default()
    }));
    match &endpoint {
        NbdEndpoint::Unix(path) => {
            let listener = listen_private(path)
                .with_context(|| format!("data source {source}: nbd_socket {}", path.display()))?;
            let path = path.clone();
            exports.spawn(async move {
                serve_unix(listener, backend, opts, stop).await;
                let _ = std::fs::remove_file(&path);
            });
            tracing::info!(source, export = %endpoint, "NBD export ready (mode 0600, this user only)");
        }
        NbdEndpoint::Tls { addr, client_role } => {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("data source {source}: nbd_listen: cannot listen on {addr}")
            })?;
            let bound = listener.local_addr()?;
            warn_without_ip_san(source, identity, bound.ip());
            let gate = Arc::new(RoleGate {
                backend,
                source: source.to_string(),
                role: *client_role,
                trust_domain: identity.trust_domain.clone(),
            });
            let tls = identity.server_config().with_context(|| {
                format!("data source {source}: the TLS configuration of the NBD export")
            })?;
            exports.spawn(serve_tls_tcp(listener, tls, gate, opts, stop));
            tracing::info!(
                source,
                export = %NbdEndpoint::Tls { addr: bound, client_role: *client_role },
                "NBD export ready"
            );
        }
    }
    Ok(())
}

/// qemu checks the server's certificate against the address it dialled; say so at
/// start rather than leave the operator with a handshake failure.
fn warn_without_ip_san(source: &str, identity: &TlsIdentity, ip: std::net::IpAddr) {
    let (_, ips) = bulwark_common::tls::dns_and_ip_sans(identity.current_cert().as_ref());
    if !ips.iter().any(|i| i.parse() == Ok(ip)) {
        tracing::warn!(
            source,
            %ip,
            "this agent's certificate has no IP address SAN {ip}: clients that check the server's name (qemu does) will refuse the NBD export; issue it with `bulwark pki issue --role agent --name NAME --ip {ip}`, or connect with tls-hostname set to one of its DNS names"
        );
    }
}

/// The single export of a TLS listener, for fleet certificates of one role.
struct RoleGate {
    backend: Arc<dyn Backend>,
    source: String,
    role: Role,
    trust_domain: String,
}

impl ExportResolver for RoleGate {
    fn resolve(
        &self,
        name: &str,
        peer_certs: &[CertificateDer<'static>],
    ) -> Result<Arc<dyn Backend>, Refusal> {
        // Who first: a stranger learns nothing about the export.
        let who = bulwark_nbd::client_identity(peer_certs, &self.trust_domain)?;
        if who.role != self.role {
            tracing::warn!(source = %self.source, client = %who, "NBD export refused: it is for {} certificates only (nbd_client_role)", self.role);
            return Err(Refusal::Forbidden(format!(
                "{who} may not use the export of {}: it is for {} certificates only",
                self.source, self.role
            )));
        }
        if !name.is_empty() && name != self.source {
            return Err(Refusal::Unknown(format!(
                "no export named {name:?}; this one is {:?} (or the default, empty name)",
                self.source
            )));
        }
        tracing::info!(source = %self.source, client = %who, "NBD export opened over TLS");
        Ok(Arc::clone(&self.backend))
    }

    fn list(&self, peer_certs: &[CertificateDer<'static>]) -> Vec<String> {
        let allowed = peer_certs.first().is_some_and(|c| {
            Identity::parse(c.as_ref(), &self.trust_domain).is_ok_and(|w| w.role == self.role)
        });
        if allowed {
            vec![self.source.clone()]
        } else {
            Vec::new()
        }
    }
}

/// Binds `path` as a socket only the agent's user can reach (see the module docs).
fn listen_private(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| anyhow::anyhow!("a socket path needs a directory"))?;
    private_dir(dir)?;
    remove_stale_socket(path)?;
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    // Reachable by nobody else meanwhile: the directory is ours, 0700.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} mode 0600", path.display()))?;
    Ok(listener)
}

/// Makes `dir` (mode 0700) when it is missing, then checks that it and the
/// directories above it keep others out.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(dir).is_err() {
        // Parents made on the way are the agent's and private too. If another
        // process makes it first, the checks below judge what is there.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let me = euid();
    let m = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot inspect {}", dir.display()))?;
    let problem = if m.file_type().is_symlink() {
        Some("is a symbolic link".to_string())
    } else if !m.is_dir() {
        Some("is not a directory".to_string())
    } else if m.uid() != me {
        Some(format!(
            "is owned by uid {}, not by this agent's user (uid {me})",
            m.uid()
        ))
    } else if m.mode() & 0o077 != 0 {
        Some(format!(
            "has mode {:04o}: group or others could reach the socket",
            m.mode() & 0o7777
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        anyhow::bail!(
            "the socket's directory {} {problem}; it must be a directory of the agent's own with mode 0700 (e.g. /run/bulwark/nbd, which the agent creates)",
            dir.display()
        );
    }
    // Every directory above it too: whoever may rename one of them can put a
    // tree of their own where the socket's path leads.
    for above in dir
        .ancestors()
        .skip(1)
        .filter(|p| !p.as_os_str().is_empty())
    {
        let p = std::fs::metadata(above)
            .with_context(|| format!("cannot inspect {}", above.display()))?;
        let others_write = p.mode() & 0o022 != 0 && p.mode() & 0o1000 == 0;
        if others_write || (p.uid() != me && p.uid() != 0) {
            anyhow::bail!(
                "the socket's directory {} is under {} (mode {:04o}, uid {}), where another user could rename it away and put a directory of their own in its place; use a path whose every directory is owned by root or the agent's user and not writable by others (or has the sticky bit, like /tmp)",
                dir.display(),
                above.display(),
                p.mode() & 0o7777,
                p.uid()
            );
        }
    }
    Ok(())
}

/// Removes a socket left by an agent that did not stop cleanly; refuses one that
/// something still listens on, one another user owns, or a path that is not a
/// socket.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot inspect {}", path.display()))),
        Ok(m) if !m.file_type().is_socket() => {
            anyhow::bail!("exists and is not a socket; refusing to replace it")
        }
        Ok(m) if m.uid() != euid() => anyhow::bail!(
            "an old socket there is owned by uid {}, not by this agent's user (uid {}); refusing to remove it",
            m.uid(),
            euid()
        ),
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!("another process is serving on it")
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn refused(dir: &Path, why: &str) {
        let e = format!("{:#}", private_dir(dir).unwrap_err());
        assert!(
            e.contains(&dir.display().to_string()) && e.contains(why),
            "{e}"
        );
    }

    /// Missing directories are made 0700 (parents too); a socket comes out 0600.
    #[tokio::test]
    async fn the_socket_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("run").join("nbd").join("vm.sock");
        let listener = listen_private(&sock).unwrap();
        assert_eq!(mode(&tmp.path().join("run")), 0o700);
        assert_eq!(mode(&tmp.path().join("run/nbd")), 0o700);
        let m = std::fs::symlink_metadata(&sock).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o7777, 0o600);
        // Someone listens: not stale, not removed.
        let e = format!("{:#}", listen_private(&sock).unwrap_err());
        assert!(e.contains("another process is serving on it"), "{e}");
        drop(listener);
        // Nobody listens any more: stale, replaced.
        let again = listen_private(&sock).unwrap();
        assert_eq!(mode(&sock), 0o600);
        drop(again);
        // A file that is not a socket is never replaced.
        std::fs::remove_file(&sock).unwrap();
        std::fs::write(&sock, b"data").unwrap();
        let e = format!("{:#}", listen_private(&sock).unwrap_err());
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&sock).unwrap(), b"data");
    }

    /// An existing directory with group or other permissions, a symlink, or a
    /// file is refused, naming it and why; nothing is changed.
    #[test]
    fn a_directory_others_reach_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        for m in [0o750, 0o705, 0o755, 0o710] {
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(m)).unwrap();
            refused(&open, &format!("has mode {m:04o}"));
            assert_eq!(mode(&open), m, "the directory was changed");
        }
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
        private_dir(&open).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        refused(&link, "is a symbolic link");
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        refused(&file, "is not a directory");
    }

    /// Run as root (the tests here are): a directory or a stale socket owned by
    /// another user is refused, and so is a directory whose parent another user
    /// could write to.
    #[test]
    fn what_another_user_owns_is_refused() {
        if !bulwark_common::testkit::have_root("this test gives files to another user") {
            return;
        }
        let nobody = 65534;
        let tmp = tempfile::tempdir().unwrap();
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(nobody), Some(nobody)).unwrap();
        refused(&theirs, "is owned by uid 65534");
        // Our directory inside a directory anyone may write to (no sticky bit).
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let ours = shared.join("nbd");
        refused(&ours, "could rename it away");
        // With the sticky bit (like /tmp), others cannot rename what is ours.
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        private_dir(&ours).unwrap();
        // Further up: a directory anyone may write to, above one of ours.
        let deep = shared.join("deep");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::create_dir(&deep).unwrap();
        std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o755)).unwrap();
        refused(&deep.join("nbd"), "is under");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        private_dir(&deep.join("nbd")).unwrap();
        // Inside a directory another user owns.
        let their_parent = theirs.join("nbd");
        std::fs::create_dir(&their_parent).unwrap();
        std::fs::set_permissions(&their_parent, std::fs::Permissions::from_mode(0o700)).unwrap();
        refused(&their_parent, "could rename it away");
        // A stale socket another user owns is left alone.
        let sock = ours.join("vm.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        std::os::unix::fs::chown(&sock, Some(nobody), Some(nobody)).unwrap();
        let e = format!("{:#}", remove_stale_socket(&sock).unwrap_err());
        assert!(e.contains("owned by uid 65534"), "{e}");
        assert!(sock.exists());
    }
}

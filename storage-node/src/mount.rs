//! Read-only NBD exports of recovery points (`bulwark mount`), over TLS with the
//! fleet's client certificates.
//!
//! The node listens on `nbd_listen`; a client first upgrades with `NBD_OPT_STARTTLS`
//! (nothing is served in the clear), proves a fleet certificate of the admin role,
//! then asks for the export `SOURCE@POINT` (or `SOURCE` for the newest point at the
//! time it connects). Each connection gets its own [`PointView`], which stays exact
//! while syncs and prunes go on. Writes are refused: the export is read-only.

use std::io;
use std::sync::Arc;

use bulwark_common::tls::Role;
use bulwark_nbd::{Backend, ExportResolver, Refusal};
use rustls::pki_types::CertificateDer;

use crate::store::{PointView, SourceLocks, Store, StoreError};

/// An NBD export of one point.
pub struct PointExport(pub Arc<PointView>);

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

impl Backend for PointExport {
    fn size(&self) -> u64 {
        self.0.geometry().size_bytes
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64, _: bool) -> io::Result<()> {
        Err(read_only())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(read_only())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Err(read_only())
    }
}

/// Finds `SOURCE@POINT` in the store for admin certificates of the fleet.
pub struct PointExports {
    pub store: Store,
    pub locks: Arc<SourceLocks>,
    pub trust_domain: String,
}

/// Splits an export name into source and point (0 = newest).
pub fn parse_export(name: &str) -> Option<(&str, u64)> {
    let (source, point) = match name.split_once('@') {
        Some((s, p)) => (s, p.parse().ok().filter(|p| *p > 0)?),
        None => (name, 0),
    };
    bulwark_common::pki::valid_name(source).then_some((source, point))
}

impl ExportResolver for PointExports {
    fn resolve(
        &self,
        name: &str,
        peer_certs: &[CertificateDer<'static>],
    ) -> Result<Arc<dyn Backend>, Refusal> {
        let who = bulwark_nbd::client_identity(peer_certs, &self.trust_domain)?;
        if who.role != Role::Admin {
            tracing::warn!(client = %who, export = name, "NBD export refused: not an admin");
            return Err(Refusal::Forbidden(format!(
                "{who} may not read recovery points: an admin certificate is required"
            )));
        }
        let (source, point) = parse_export(name).ok_or_else(|| {
            Refusal::Unknown(format!(
                "export names are SOURCE@POINT or SOURCE; {name:?} is neither"
            ))
        })?;
        // Opened under the source's read lock, so no sync is half-applied.
        let lock = self.locks.get(source);
        let _guard = lock.blocking_read();
        match self.store.open_view(source, point) {
            Ok(view) => {
                tracing::info!(client = %who, source, point = view.point(), "NBD export of a recovery point opened");
                Ok(Arc::new(PointExport(view)))
            }
            Err(e @ (StoreError::NoPoints(_) | StoreError::NoSuchPoint { .. })) => {
                Err(Refusal::Unknown(e.to_string()))
            }
            Err(e) => {
                tracing::warn!(source, point, "cannot export the point: {e}");
                Err(Refusal::Forbidden(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_export;

    #[test]
    fn export_names() {
        assert_eq!(parse_export("vol@3"), Some(("vol", 3)));
        assert_eq!(parse_export("vol"), Some(("vol", 0)));
        assert_eq!(parse_export("vol@0"), None);
        assert_eq!(parse_export("vol@x"), None);
        assert_eq!(parse_export("../x@1"), None);
    }
}

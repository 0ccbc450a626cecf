//! The host's side of enrollment and renewal (`bulwark-agent enroll`,
//! `bulwark-node enroll`, and the daemons' renewal before expiry).
//!
//! Enrollment: the key is made here and never leaves; a CSR goes to the
//! coordinator's enrollment listener over TLS that checks the server against the CA
//! fingerprint in the token (the CA is taken from the server's chain only if its
//! BLAKE3 matches), with the token as the proof; the certificate and the CA come
//! back and are written beside the key.
//!
//! Renewal: with less than a third of its validity left, a daemon makes a new key,
//! asks the coordinator (`Renew`, over its current mTLS identity) to sign it, writes
//! the files (a temporary file, fsync, rename) and swaps them into its TLS
//! configuration without a restart ([`crate::tls::TlsIdentity::reload`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bulwark_proto as pb;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::keyfile::{FileError, pending_path, rename_into, write_atomic, write_file};
use crate::pki::{CertError, Identity, PkiError, Role};
use crate::tls::{ConnectError, Target, TargetError};

/// An enrollment that failed, and why.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("that is not a Bulwark enrollment token (bwt1.<secret>.<fingerprint>)")]
    NotAToken,
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("{0}")]
    Tls(#[source] rustls::Error),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Key(#[from] PkiError),
    #[error("enrollment refused by {target}: {message}")]
    Refused { target: String, message: String },
    #[error("the server's CA was never checked")]
    Unchecked,
    #[error("the coordinator sent a bad name {0:?}")]
    BadName(String),
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists already: remove it (or use another --dir) and enroll with a new token")]
    Exists { path: PathBuf },
    #[error(transparent)]
    File(#[from] FileError),
}

/// A renewal that failed, and why.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error(transparent)]
    Key(#[from] PkiError),
    /// The signer refused (its message, e.g. the coordinator's status).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(transparent)]
    File(#[from] FileError),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts the server only if its chain holds the CA with the token's fingerprint,
/// its certificate verifies against that CA for the host name dialled, and it is the
/// coordinator.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    found: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| blake3::hash(c.as_ref()).to_hex().as_str() == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server did not present the fleet CA named in the token (fingerprint mismatch): is this the right coordinator and enrollment address?"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        let general = |e: CertError| rustls::Error::General(e.to_string());
        let uri = crate::pki::spiffe_uri(ca.as_ref()).map_err(general)?;
        let td = uri.trim_start_matches("spiffe://").trim_end_matches('/');
        let id = Identity::parse(end_entity.as_ref(), td).map_err(general)?;
        if id.role != Role::Coordinator {
            return Err(rustls::Error::General(format!(
                "the enrollment server is {id}, not the coordinator"
            )));
        }
        *self.found.lock().unwrap_or_else(|e| e.into_inner()) = Some(ca.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What enrollment wrote.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Enrolls this host as `role` with the coordinator's enrollment listener at `url`
/// (`https://host:7442`), writing `dir/ca.crt`, `dir/NAME.crt` and `dir/NAME.key`.
/// The certificate's name, and a node's DNS names and addresses, come from the
/// token (`bulwark token create --dns/--ip`), never from this host.
pub async fn enroll(
    url: &str,
    token: &str,
    role: Role,
    dir: &Path,
) -> Result<Enrolled, EnrollError> {
    let fingerprint = token
        .trim()
        .split('.')
        .nth(2)
        .filter(|f| f.len() == 64 && f.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or(EnrollError::NotAToken)?
        .to_string();
    let target = Target::parse(url)?;
    let verifier = Arc::new(PinnedCa {
        fingerprint,
        found: Mutex::new(None),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(EnrollError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let channel = crate::tls::channel(&target, Arc::new(cfg)).await?;
    let (key_pem, csr_pem) = crate::pki::make_csr()?;
    let r = pb::enrollment_client::EnrollmentClient::new(channel)
        .enroll(pb::EnrollRequest {
            token: token.trim().to_string(),
            role: role.as_str().to_string(),
            csr_pem,
            dns: Vec::new(),
            ips: Vec::new(),
        })
        .await
        .map_err(|s| EnrollError::Refused {
            target: target.to_string(),
            message: s.message().to_string(),
        })?
        .into_inner();
    if verifier
        .found
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_none()
    {
        return Err(EnrollError::Unchecked);
    }
    if !crate::pki::valid_name(&r.name) {
        return Err(EnrollError::BadName(r.name));
    }
    std::fs::create_dir_all(dir).map_err(|source| EnrollError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let out = Enrolled {
        ca: dir.join("ca.crt"),
        cert: dir.join(format!("{}.crt", r.name)),
        key: dir.join(format!("{}.key", r.name)),
        name: r.name,
    };
    for p in [&out.cert, &out.key] {
        if p.exists() {
            return Err(EnrollError::Exists { path: p.clone() });
        }
    }
    write_atomic(&out.key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&out.cert, r.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&out.ca, r.ca_pem.as_bytes(), 0o644)?;
    Ok(out)
}

/// Whether a certificate valid from `not_before_ms` to `not_after_ms` should be
/// renewed at `now_ms`: less than a third of its validity left.
pub fn due_for_renewal(not_before_ms: i64, not_after_ms: i64, now_ms: i64) -> bool {
    let life = (not_after_ms - not_before_ms).max(1);
    not_after_ms - now_ms < life / 3
}

/// Signs a CSR for a renewal: `(csr_pem, dns, ips)` → the certificate PEM. Nodes
/// and agents ask the coordinator ([`coordinator_signer`]); the coordinator signs its
/// own with the CA key it holds for enrollment.
pub type RenewSigner = Box<
    dyn FnMut(
            String,
            Vec<String>,
            Vec<String>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>
        + Send,
>;

/// A [`RenewSigner`] that asks the coordinator (`Renew`, over this process's
/// current identity).
pub fn coordinator_signer(
    client: pb::coordinator_client::CoordinatorClient<crate::failover::CoordinatorChannel>,
) -> RenewSigner {
    Box::new(move |csr_pem, dns, ips| {
        let mut client = client.clone();
        Box::pin(async move {
            client
                .renew(pb::RenewRequest { csr_pem, dns, ips })
                .await
                .map(|r| r.into_inner().cert_pem)
                .map_err(|s| format!("the coordinator refused the renewal: {}", s.message()))
        })
    })
}

/// Renews this process's certificate with `sign` and writes `files.cert` and
/// `files.key`. Returns the new certificate's expiry.
pub async fn renew(
    sign: &mut RenewSigner,
    files: &crate::config::TlsFiles,
    dns: Vec<String>,
    ips: Vec<String>,
) -> Result<i64, RenewError> {
    let (key_pem, csr_pem) = crate::pki::make_csr()?;
    let cert_pem = sign(csr_pem, dns, ips).await.map_err(RenewError::Refused)?;
    let der = crate::pki::parse_certs_pem(cert_pem.as_bytes())?;
    let not_after = crate::pki::not_after_ms(der.first().ok_or(CertError::NoPem)?.as_ref())?;
    // Both new files are made durable first, then the key is renamed, then the
    // certificate. A crash between the two renames leaves the new key beside the old
    // certificate and the new certificate still in `CERT.bulwark-new`, which
    // `TlsIdentity::load` then finishes renaming (see there).
    let cert_new = pending_path(&files.cert);
    let key_new = pending_path(&files.key);
    write_file(&cert_new, cert_pem.as_bytes(), 0o644)?;
    if let Err(e) = write_file(&key_new, key_pem.as_bytes(), 0o600) {
        // Ours, just written: no half of a renewal is left behind.
        let _ = std::fs::remove_file(&cert_new);
        return Err(e.into());
    }
    // Crash tests kill here: both new files durable, neither in place yet.
    crate::failpoint::hit("renew-after-write");
    rename_into(&key_new, &files.key)?;
    // And here: the new key in place beside the old certificate.
    crate::failpoint::hit("renew-between-renames");
    rename_into(&cert_new, &files.cert)?;
    for d in [files.key.parent(), files.cert.parent()]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::File::open(d).and_then(|d| d.sync_all());
    }
    Ok(not_after)
}

#[cfg(test)]
mod tests {
    use crate::keyfile::{pending_path, write_atomic};
    use crate::pki::{LeafRequest, Role, Signer};
    use crate::tls::TlsIdentity;

    /// Agent host-1's certificate request.
    fn host_1() -> LeafRequest {
        LeafRequest {
            role: Role::Agent,
            name: "host-1".into(),
            dns: vec![],
            ips: vec![],
            days: 30,
        }
    }

    /// A fresh CA and agent host-1's certificate: the temporary directory, the
    /// agent's files, and the CA's certificate and key.
    fn agent_with_a_certificate() -> (
        tempfile::TempDir,
        crate::config::TlsFiles,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        let dir = tempfile::tempdir().expect("tmp");
        crate::pki::init(dir.path(), "test.fleet").expect("ca");
        let issued = crate::pki::issue(dir.path(), &host_1()).expect("issue");
        let files = crate::config::TlsFiles {
            ca: dir.path().join("ca.crt"),
            cert: issued.cert.clone(),
            key: issued.key.clone(),
            renew_before: None,
        };
        let (ca_crt, ca_key) = crate::pki::ca_paths(dir.path());
        (dir, files, ca_crt, ca_key)
    }

    /// A crash between renaming the new key and the new certificate: the next load
    /// finishes the renewal instead of failing on a mismatched pair.
    #[test]
    fn an_interrupted_renewal_is_finished_at_load() {
        let (_dir, files, ca_crt, ca_key) = agent_with_a_certificate();
        let req = host_1();
        let signer = Signer::load(&ca_crt, &ca_key).expect("signer");
        let (key_pem, csr) = crate::pki::make_csr().expect("csr");
        let cert_pem = signer.sign_csr(&csr, &req).expect("sign");
        // As `renew` does, stopped after the key's rename.
        std::fs::write(pending_path(&files.cert), &cert_pem).expect("pending cert");
        std::fs::write(&files.key, &key_pem).expect("new key");
        let id = TlsIdentity::load(&files).expect("load finishes the renewal");
        assert_eq!(id.me.name, "host-1");
        assert_eq!(
            std::fs::read_to_string(&files.cert).expect("cert"),
            cert_pem
        );
        assert!(!pending_path(&files.cert).exists());
        // A key that matches nothing pending is reported, not papered over.
        let (other_key, _) = crate::pki::make_csr().expect("csr");
        std::fs::write(&files.key, other_key).expect("key");
        assert!(TlsIdentity::load(&files).is_err());
    }

    /// A symbolic link planted where a renewal writes its new files is neither
    /// followed nor replaced: the renewal fails naming it, and the file it points
    /// to is untouched. A stale regular file of ours is replaced.
    #[tokio::test]
    async fn renewal_does_not_write_through_a_planted_link() {
        use std::os::unix::fs::symlink;
        let (dir, files, ca_crt, ca_key) = agent_with_a_certificate();
        let req = host_1();
        let signer = std::sync::Arc::new(Signer::load(&ca_crt, &ca_key).expect("signer"));
        let make_signer = || -> super::RenewSigner {
            let signer = signer.clone();
            let req = req.clone();
            Box::new(move |csr, _, _| {
                let r = signer.sign_csr(&csr, &req).map_err(|e| e.to_string());
                Box::pin(async move { r })
            })
        };
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        let old_key = std::fs::read(&files.key).expect("key");
        let old_cert = std::fs::read(&files.cert).expect("cert");
        for planted in [pending_path(&files.key), pending_path(&files.cert)] {
            symlink(&victim, &planted).expect("symlink");
            let e = super::renew(&mut make_signer(), &files, vec![], vec![])
                .await
                .expect_err("a planted link");
            assert!(e.to_string().contains("not a regular file"), "{e}");
            assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
            assert_eq!(std::fs::read(&files.key).expect("key"), old_key);
            assert_eq!(std::fs::read(&files.cert).expect("cert"), old_cert);
            std::fs::remove_file(&planted).expect("unplant");
        }
        // The temporary file of write_atomic likewise.
        let target = dir.path().join("out.pem");
        let mut tmp = target.as_os_str().to_owned();
        tmp.push(".bulwark-tmp");
        symlink(&victim, &tmp).expect("symlink");
        assert!(write_atomic(&target, b"new", 0o644).is_err());
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
        std::fs::remove_file(&tmp).expect("unplant");
        // A stale regular file left by an interrupted renewal is replaced.
        std::fs::write(pending_path(&files.key), b"stale").expect("stale");
        super::renew(&mut make_signer(), &files, vec![], vec![])
            .await
            .expect("renewed over a stale file");
        assert_ne!(std::fs::read(&files.key).expect("key"), old_key);
        TlsIdentity::load(&files).expect("the renewed pair loads");
        // A link where an interrupted renewal's certificate would wait is not
        // renamed into place.
        let pending = pending_path(&files.cert);
        symlink(old_cert_path(&dir, &old_cert), &pending).expect("symlink");
        let _ = TlsIdentity::load(&files);
        assert!(
            !std::fs::symlink_metadata(&files.cert)
                .expect("cert")
                .file_type()
                .is_symlink()
        );
        assert!(std::fs::symlink_metadata(&pending).is_ok(), "left alone");
    }

    fn old_cert_path(dir: &tempfile::TempDir, pem: &[u8]) -> std::path::PathBuf {
        let p = dir.path().join("old-cert.pem");
        std::fs::write(&p, pem).expect("old cert");
        p
    }

    #[test]
    fn renews_in_the_last_third() {
        assert!(!super::due_for_renewal(0, 90, 50));
        assert!(super::due_for_renewal(0, 90, 61));
        assert!(super::due_for_renewal(0, 90, 100));
    }
}

//! The fleet CA and the certificates it signs.
//!
//! `init` makes a self-signed CA (ECDSA P-256) whose URI SAN `spiffe://<trust-domain>`
//! records the fleet's trust domain. `issue` signs a leaf for one process: URI SAN
//! `spiffe://<trust-domain>/<role>/<name>`, plus DNS names and IP addresses for the
//! servers that others dial, usable for both TLS server and client authentication.
//! Private keys are written with mode 0600.
//!
//! It also reads certificates back: the [`Role`] and [`Identity`] a certificate's
//! SPIFFE URI SAN names, its validity and SANs. This module is the bottom of the
//! certificate stack and imports none of the others: `tls` builds rustls
//! configurations on it, and `enroll` enrolls and renews with both.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};

use rustls::pki_types::CertificateDer;

/// A PKI operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} already exists; remove it first or pick another name")]
    Exists { path: PathBuf },
    #[error("invalid trust domain \"{0}\": use lowercase letters, digits, dots and dashes")]
    TrustDomain(String),
    #[error("invalid name \"{0}\": use letters, digits, dots, dashes and underscores")]
    Name(String),
    #[error("{path} is not a Bulwark CA certificate: {source}")]
    NotACa {
        path: PathBuf,
        #[source]
        source: CertError,
    },
    #[error("{path} is not a Bulwark CA certificate: no certificate in file")]
    NoCa { path: PathBuf },
    #[error("{path} is not a Bulwark CA certificate: URI SAN {uri} is not spiffe://<trust-domain>")]
    NotACaUri { path: PathBuf, uri: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// A certificate that could not be read, or does not name a process of this fleet.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("unreadable certificate: {0}")]
    Unreadable(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("bad subjectAltName: {0}")]
    BadSan(#[source] x509_parser::error::X509Error),
    #[error("certificate has no subjectAltName")]
    NoSan,
    #[error("certificate has no URI SAN")]
    NoUriSan,
    #[error("bad PEM: {0}")]
    Pem(#[source] std::io::Error),
    #[error("no PEM certificate found")]
    NoPem,
    #[error("URI SAN {uri} is not a spiffe:// id")]
    NotSpiffe { uri: String },
    #[error("{uri} is not spiffe://<trust-domain>/<role>/<name>")]
    NotAProcess { uri: String },
    #[error("certificate {uri} belongs to trust domain {found}, not {expected}")]
    TrustDomain {
        uri: String,
        found: String,
        expected: String,
    },
    #[error("certificate {uri}: {source}")]
    Role {
        uri: String,
        #[source]
        source: UnknownRole,
    },
    #[error("certificate {uri}: invalid name")]
    Name { uri: String },
}

/// What a certificate allows its holder to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Coordinator,
    Node,
    Agent,
    Admin,
    /// An admin certificate made only for lifting governance retention locks: kept
    /// apart from the everyday admin key, so a stolen admin key cannot do it.
    Officer,
}

impl Role {
    /// Every role, in the order the docs list them.
    pub const ALL: [Role; 5] = [
        Role::Coordinator,
        Role::Node,
        Role::Agent,
        Role::Admin,
        Role::Officer,
    ];

    /// The word used in SPIFFE ids and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Node => "node",
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::Officer => "officer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that names no [`Role`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role \"{0}\" (use coordinator, node, agent, admin or officer)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// Who is on the other end of a connection, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

impl Identity {
    /// Reads the SPIFFE URI SAN of a DER certificate and checks its trust domain.
    pub fn parse(der: &[u8], trust_domain: &str) -> Result<Identity, CertError> {
        let uri = spiffe_uri(der)?;
        let Some(rest) = uri.strip_prefix("spiffe://") else {
            return Err(CertError::NotSpiffe { uri });
        };
        let mut parts = rest.split('/');
        let (td, role, name) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(td), Some(role), Some(name), None) => (td, role, name),
            _ => return Err(CertError::NotAProcess { uri }),
        };
        if td != trust_domain {
            return Err(CertError::TrustDomain {
                found: td.to_string(),
                expected: trust_domain.to_string(),
                uri,
            });
        }
        let role = match role.parse::<Role>() {
            Ok(role) => role,
            Err(source) => return Err(CertError::Role { uri, source }),
        };
        if !valid_name(name) {
            return Err(CertError::Name { uri });
        }
        Ok(Identity {
            role,
            name: name.to_string(),
        })
    }
}

fn parse_der(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, CertError> {
    use x509_parser::prelude::*;
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(CertError::Unreadable)
}

/// The URI SAN of a DER certificate (the first one, which Bulwark sets).
pub fn spiffe_uri(der: &[u8]) -> Result<String, CertError> {
    use x509_parser::prelude::*;
    let cert = parse_der(der)?;
    let san = cert
        .subject_alternative_name()
        .map_err(CertError::BadSan)?
        .ok_or(CertError::NoSan)?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .ok_or(CertError::NoUriSan)
}

/// When a DER certificate becomes valid, in Unix milliseconds.
pub fn not_before_ms(der: &[u8]) -> Result<i64, CertError> {
    Ok(parse_der(der)?.validity().not_before.timestamp() * 1000)
}

/// When a DER certificate expires, in Unix milliseconds.
pub fn not_after_ms(der: &[u8]) -> Result<i64, CertError> {
    Ok(parse_der(der)?.validity().not_after.timestamp() * 1000)
}

/// The DNS names and IP addresses among a DER certificate's SANs.
pub fn dns_and_ip_sans(der: &[u8]) -> (Vec<String>, Vec<String>) {
    use x509_parser::prelude::*;
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Ok(cert) = parse_der(der)
        && let Ok(Some(san)) = cert.subject_alternative_name()
    {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(b);
                        ips.push(std::net::Ipv6Addr::from(a).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    (dns, ips)
}

/// Parses every certificate of a PEM buffer.
pub fn parse_certs_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &pem[..]).collect();
    let certs = certs.map_err(CertError::Pem)?;
    if certs.is_empty() {
        return Err(CertError::NoPem);
    }
    Ok(certs)
}

/// Checks a trust domain: `bulwark.local`, `prod-eu`.
pub fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
}

/// Checks a process or data source name: `node-1`, `host_7.eu`.
pub fn valid_name(name: &str) -> bool {
    crate::name::is_valid(name)
}

/// Writes `path` with mode 0600 (owner read/write only), refusing to overwrite.
fn write_private(path: &Path, content: &str) -> Result<(), PkiError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            PkiError::Io {
                path: path.to_path_buf(),
                error: e,
            }
        }
    })?;
    f.write_all(content.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn write_public(path: &Path, content: &str) -> Result<(), PkiError> {
    if path.exists() {
        return Err(PkiError::Exists {
            path: path.to_path_buf(),
        });
    }
    fs::write(path, content).map_err(io_err(path))
}

/// Paths of the CA files in a PKI directory.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.crt"), dir.join("ca.key"))
}

/// Creates `dir/ca.crt` and `dir/ca.key` for a new fleet.
pub fn init(dir: &Path, trust_domain: &str) -> Result<PathBuf, PkiError> {
    if !valid_trust_domain(trust_domain) {
        return Err(PkiError::TrustDomain(trust_domain.to_string()));
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (crt, key) = ca_paths(dir);
    for p in [&crt, &key] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    let key_pair = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("Bulwark fleet CA ({trust_domain})"),
    );
    dn.push(DnType::OrganizationName, "Bulwark");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&key_pair)?;
    write_private(&key, &key_pair.serialize_pem())?;
    write_public(&crt, &cert.pem())?;
    Ok(crt)
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafRequest {
    pub role: Role,
    pub name: String,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Validity in days from now (may be negative, for tests of expired certificates).
    pub days: i64,
}

/// Files written by [`issue`].
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub spiffe_id: String,
}

/// Reads the trust domain recorded in a CA certificate.
pub fn trust_domain_of_ca(ca_pem_path: &Path) -> Result<String, PkiError> {
    let pem = fs::read(ca_pem_path).map_err(io_err(ca_pem_path))?;
    let not_a_ca = |source| PkiError::NotACa {
        path: ca_pem_path.to_path_buf(),
        source,
    };
    let ders = parse_certs_pem(&pem).map_err(not_a_ca)?;
    let der = ders.first().ok_or_else(|| PkiError::NoCa {
        path: ca_pem_path.to_path_buf(),
    })?;
    let uri = spiffe_uri(der.as_ref()).map_err(not_a_ca)?;
    uri.strip_prefix("spiffe://")
        .map(|s| s.trim_end_matches('/').to_string())
        .filter(|s| !s.contains('/'))
        .ok_or_else(|| PkiError::NotACaUri {
            path: ca_pem_path.to_path_buf(),
            uri: uri.clone(),
        })
}

/// The certificate of one process: URI SAN `spiffe://<td>/<role>/<name>` plus the
/// DNS names and addresses asked for, server and client use, `days` of validity, a
/// random serial number. Valid from an hour ago (clock skew), but never from
/// `not_before_after_ms` or earlier: a certificate issued for a name after its
/// revocation must not date from before it, or it would be refused as revoked.
fn leaf_params(
    trust_domain: &str,
    req: &LeafRequest,
    not_before_after_ms: Option<i64>,
) -> Result<(CertificateParams, String), PkiError> {
    let spiffe_id = format!("spiffe://{trust_domain}/{}/{}", req.role, req.name);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{} {}", req.role, req.name));
    dn.push(DnType::OrganizationName, "Bulwark");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    // keyEncipherment too: GnuTLS (qemu's NBD client with tls-creds-x509) refuses a
    // certificate without it, although TLS 1.3 never enciphers with the key.
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    // Random, not derived from the key: a key used again (a CSR sent twice) must not
    // get the serial of a certificate the CRL lists.
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let mut sans = vec![SanType::URI(spiffe_id.clone().try_into()?)];
    for d in &req.dns {
        sans.push(SanType::DnsName(d.clone().try_into()?));
    }
    for ip in &req.ips {
        sans.push(SanType::IpAddress(*ip));
    }
    params.subject_alt_names = sans;
    let now = time::OffsetDateTime::now_utc();
    if req.days >= 0 {
        params.not_before = now - time::Duration::hours(1);
        if let Some(ms) = not_before_after_ms {
            // Certificate times have whole seconds: the next second after it.
            let floor = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000) + 1)
                .map_err(|_| PkiError::Rcgen(rcgen::Error::Time))?;
            params.not_before = params.not_before.max(floor);
        }
        params.not_after = now + time::Duration::days(req.days);
    } else {
        params.not_before = now + time::Duration::days(req.days - 1);
        params.not_after = now + time::Duration::days(req.days);
    }
    Ok((params, spiffe_id))
}

/// The fleet CA's fingerprint as enrollment tokens carry it: BLAKE3 of the first
/// certificate's DER, hex.
pub fn ca_fingerprint(ca_pem: &[u8]) -> Result<String, CertError> {
    let ders = parse_certs_pem(ca_pem)?;
    let der = ders.first().ok_or(CertError::NoPem)?;
    Ok(blake3::hash(der.as_ref()).to_hex().to_string())
}

/// A new key and a certificate signing request for it (PEM): the host's side of
/// enrollment and renewal. The CA decides the names; the CSR only carries the key.
pub fn make_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Signs certificates with the fleet CA's key (the coordinator, when enrollment is
/// on).
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    pub trust_domain: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.trust_domain)
    }
}

impl Signer {
    /// Loads the CA certificate and key.
    pub fn load(ca_crt: &Path, ca_key: &Path) -> Result<Signer, PkiError> {
        let trust_domain = trust_domain_of_ca(ca_crt)?;
        let ca_pem = fs::read_to_string(ca_crt).map_err(io_err(ca_crt))?;
        let key_pem = fs::read_to_string(ca_key).map_err(io_err(ca_key))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&key_pem)?)?;
        Ok(Signer {
            issuer,
            trust_domain,
            ca_pem,
        })
    }

    /// Signs the key of `csr_pem` as `req` says (names and SANs come from `req`,
    /// never from the CSR); returns the certificate PEM.
    pub fn sign_csr(&self, csr_pem: &str, req: &LeafRequest) -> Result<String, PkiError> {
        self.sign_csr_after(csr_pem, req, None)
    }

    /// [`Signer::sign_csr`] for a certificate whose notBefore must be later than
    /// `revoked_at_ms` (the name was revoked then).
    pub fn sign_csr_after(
        &self,
        csr_pem: &str,
        req: &LeafRequest,
        revoked_at_ms: Option<i64>,
    ) -> Result<String, PkiError> {
        if !valid_name(&req.name) {
            return Err(PkiError::Name(req.name.clone()));
        }
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let (params, _) = leaf_params(&self.trust_domain, req, revoked_at_ms)?;
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// An X.509 CRL signed by the fleet CA listing `revoked` (serial bytes, when
    /// revoked in Unix ms), numbered `number`; valid for 30 days (Bulwark's own
    /// verifiers accept it after that too; the coordinator signs a new one at every
    /// change and start). Returns DER and PEM.
    pub fn sign_crl(
        &self,
        number: u64,
        revoked: &[(Vec<u8>, i64)],
    ) -> Result<(Vec<u8>, String), PkiError> {
        let now = time::OffsetDateTime::now_utc();
        let at = |ms: i64| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .unwrap_or(now)
        };
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(30),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(serial, ms)| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: at(*ms),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        Ok((crl.der().to_vec(), crl.pem()?))
    }
}

/// Signs a certificate for one process with the CA in `dir`; writes `dir/N.crt` and
/// `dir/N.key`.
pub fn issue(dir: &Path, req: &LeafRequest) -> Result<Issued, PkiError> {
    if !valid_name(&req.name) {
        return Err(PkiError::Name(req.name.clone()));
    }
    let (ca_crt, ca_key) = ca_paths(dir);
    let trust_domain = trust_domain_of_ca(&ca_crt)?;
    let ca_pem = fs::read_to_string(&ca_crt).map_err(io_err(&ca_crt))?;
    let ca_key_pem = fs::read_to_string(&ca_key).map_err(io_err(&ca_key))?;
    let ca_key_pair = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key_pair)?;

    let cert_path = dir.join(format!("{}.crt", req.name));
    let key_path = dir.join(format!("{}.key", req.name));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    let (params, spiffe_id) = leaf_params(&trust_domain, req, None)?;
    let key_pair = KeyPair::generate()?;
    let cert = params.signed_by(&key_pair, &issuer)?;
    write_private(&key_path, &key_pair.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        spiffe_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_issue() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "test.fleet").expect("init");
        assert!(matches!(
            init(dir.path(), "test.fleet"),
            Err(PkiError::Exists { .. })
        ));
        assert_eq!(
            trust_domain_of_ca(&dir.path().join("ca.crt")).expect("td"),
            "test.fleet"
        );
        let issued = issue(
            dir.path(),
            &LeafRequest {
                role: Role::Node,
                name: "node-1".into(),
                dns: vec!["localhost".into()],
                ips: vec!["127.0.0.1".parse().expect("ip")],
                days: 30,
            },
        )
        .expect("issue");
        assert_eq!(issued.spiffe_id, "spiffe://test.fleet/node/node-1");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&issued.key).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let pem = fs::read(&issued.cert).expect("cert");
        let der = parse_certs_pem(&pem).expect("pem");
        let id = Identity::parse(der[0].as_ref(), "test.fleet").expect("identity");
        assert_eq!(id.role, Role::Node);
        assert_eq!(id.name, "node-1");
        assert!(Identity::parse(der[0].as_ref(), "other.fleet").is_err());
        assert!(matches!(
            issue(
                dir.path(),
                &LeafRequest {
                    role: Role::Agent,
                    name: "bad/name".into(),
                    dns: vec![],
                    ips: vec![],
                    days: 1
                }
            ),
            Err(PkiError::Name(_))
        ));
    }
}

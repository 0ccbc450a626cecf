//! Enrollment: one-time tokens, the `Enrollment` service that turns a token and a
//! CSR into a certificate, and renewal for processes that already have one.
//!
//! A token is `bwt1.<secret>.<CA fingerprint>`: the secret (16 random bytes, hex)
//! is kept only as its BLAKE3 in the state's `tokens` tree ([`TOKENS`]) with the
//! role, name, expiry and, once redeemed, when; the fingerprint (BLAKE3 of the CA certificate)
//! lets the enrolling host check the coordinator before it trusts anything it says.
//! The private key never leaves the host: it sends a CSR, and the certificate's
//! names come from the token, never from the CSR or the request: a node's DNS names
//! and addresses are the admin's (`bulwark token create --dns/--ip`), and a renewal
//! keeps those of the certificate the caller presented.
//!
//! Revocation (`crate::revocation`): a token made at or before its identity's
//! revocation is refused (it may have leaked with the host); a token made after
//! it enrolls the name again. Every certificate signed here dates from after the
//! identity's revocation and is recorded with its serial, so a later revocation's
//! CRL names it. A token is used up only once its CSR has been signed, so a bad
//! request does not burn it; using it up is one commit conditioned on the record
//! checked, so of two enrollments racing with one token (even on two
//! coordinators) one wins.

use std::net::IpAddr;
use std::sync::Arc;

use bulwark_common::pki::{LeafRequest, Signer};
use bulwark_common::tls::Role;
use bulwark_proto as pb;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::state::{StateError, StateStore, TreeName, Txn};

/// Prefix of every token (format version 1).
pub const TOKEN_PREFIX: &str = "bwt1";

/// The state tree of the tokens, by BLAKE3 of the secret (hex).
pub const TOKENS: TreeName = "tokens";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    v: u32,
    role: String,
    name: String,
    created_ms: i64,
    expires_ms: i64,
    /// When it was redeemed (0 = not yet).
    used_ms: i64,
    /// Nodes: the DNS names and addresses of the certificate (the admin's).
    #[serde(default)]
    dns: Vec<String>,
    #[serde(default)]
    ips: Vec<String>,
}

/// A token checked and ready to be used up.
struct Redeemable {
    key: String,
    /// The record as checked: using it up is conditioned on it.
    old: Vec<u8>,
    rec: TokenRecord,
}

/// Tokens and the CA signer (present when `[enrollment]` is configured).
pub struct Enroller {
    state: Arc<dyn StateStore>,
    signer: Signer,
    fingerprint: String,
    cert_days: i64,
    revocations: Option<Arc<crate::revocation::RevocationStore>>,
}

impl std::fmt::Debug for Enroller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Enroller({:?})", self.signer)
    }
}

fn enrollable(role: &str) -> Result<Role, Status> {
    match role.parse::<Role>() {
        Ok(r @ (Role::Node | Role::Agent)) => Ok(r),
        _ => Err(Status::invalid_argument(format!(
            "tokens are for role node or agent, not \"{role}\""
        ))),
    }
}

/// A failure of the token store, as the caller sees it (the one mapping of
/// `crate::error`: "not the leader" stays distinct from a store that fails).
fn token_store(e: StateError) -> Status {
    let st = Status::from(crate::registry::RegistryError::from(e));
    Status::new(st.code(), format!("token store: {}", st.message()))
}

fn parse_ips(ips: &[String]) -> Result<Vec<IpAddr>, Status> {
    ips.iter()
        .map(|i| {
            i.parse()
                .map_err(|_| Status::invalid_argument(format!("\"{i}\" is not an IP address")))
        })
        .collect()
}

impl Enroller {
    /// Loads the CA key; tokens are kept in `state` (the registry's).
    pub fn new(
        state: Arc<dyn StateStore>,
        ca_crt: &std::path::Path,
        ca_key: &std::path::Path,
        cert_days: i64,
    ) -> anyhow::Result<Enroller> {
        let signer = Signer::load(ca_crt, ca_key)?;
        let fingerprint = bulwark_common::pki::ca_fingerprint(signer.ca_pem.as_bytes())
            .map_err(anyhow::Error::msg)?;
        Ok(Enroller {
            state,
            signer,
            fingerprint,
            cert_days,
            revocations: None,
        })
    }

    /// Checks tokens and signed certificates against the revocation list and
    /// records what is signed there.
    pub fn with_revocations(mut self, r: Arc<crate::revocation::RevocationStore>) -> Self {
        self.revocations = Some(r);
        self
    }

    fn revoked_at(&self, role: Role, name: &str) -> Option<i64> {
        self.revocations.as_ref()?.revoked_at(role, name)
    }

    /// Records a certificate signed here (its serial, for a later CRL).
    fn issued(&self, cert_pem: &str) {
        let Some(r) = &self.revocations else { return };
        match bulwark_common::tls::parse_certs_pem(cert_pem.as_bytes()).and_then(|d| {
            bulwark_common::revocation::CertFacts::parse(
                d.first()
                    .ok_or(bulwark_common::pki::CertError::NoPem)?
                    .as_ref(),
                &self.signer.trust_domain,
            )
        }) {
            Ok(f) => r.note_certificate(&f, "issued"),
            Err(e) => tracing::warn!("cannot record a certificate just signed: {e}"),
        }
    }

    /// Makes a token for `role`/`name`, valid `ttl_ms`; a node's token also carries
    /// the DNS names and IP addresses its certificate will have.
    pub fn create(
        &self,
        role: &str,
        name: &str,
        ttl_ms: u64,
        dns: &[String],
        ips: &[String],
    ) -> Result<(String, i64), Status> {
        let r = enrollable(role)?;
        if r != Role::Node && !(dns.is_empty() && ips.is_empty()) {
            return Err(Status::invalid_argument(
                "--dns/--ip are for node tokens: agents only dial out, nobody dials them by name",
            ));
        }
        parse_ips(ips)?;
        for d in dns {
            let ok = !d.is_empty()
                && d.len() <= 253
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '*');
            if !ok {
                return Err(Status::invalid_argument(format!(
                    "\"{d}\" is not a DNS name (letters, digits, '.', '-')"
                )));
            }
        }
        if !bulwark_common::pki::valid_name(name) {
            return Err(Status::invalid_argument(format!(
                "\"{name}\" is not a valid name (letters, digits, '.', '-', '_')"
            )));
        }
        if ttl_ms < 1000 {
            return Err(Status::invalid_argument(
                "a token's --ttl must be at least 1s",
            ));
        }
        let secret: [u8; 16] = rand::random();
        let secret_hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let now = bulwark_common::time::now_ms();
        let expires_ms = now.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
        let rec = TokenRecord {
            v: 1,
            role: role.to_string(),
            name: name.to_string(),
            created_ms: now,
            expires_ms,
            used_ms: 0,
            dns: dns.to_vec(),
            ips: ips.to_vec(),
        };
        let key = blake3::hash(secret_hex.as_bytes()).to_hex().to_string();
        let value = serde_json::to_vec(&rec).map_err(|e| Status::internal(e.to_string()))?;
        self.state
            .put(TOKENS, key.as_bytes(), value)
            .map_err(token_store)?;
        tracing::info!(role, name, expires_ms, "enrollment token created");
        Ok((
            format!("{TOKEN_PREFIX}.{secret_hex}.{}", self.fingerprint),
            expires_ms,
        ))
    }

    /// Checks `token` for a `role` process: known, unused, unexpired, of that role,
    /// and made after any revocation of its identity. Nothing is used up yet.
    fn check(&self, token: &str, role: &str) -> Result<Redeemable, Status> {
        let mut parts = token.trim().split('.');
        let (Some(TOKEN_PREFIX), Some(secret), Some(_fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Status::invalid_argument(
                "that is not a Bulwark enrollment token (bwt1.<secret>.<fingerprint>)",
            ));
        };
        let key = blake3::hash(secret.as_bytes()).to_hex().to_string();
        let unknown = || Status::permission_denied("unknown enrollment token");
        let old = self
            .state
            .get(TOKENS, key.as_bytes())
            .map_err(token_store)?
            .ok_or_else(unknown)?;
        let rec: TokenRecord =
            serde_json::from_slice(&old).map_err(|e| Status::internal(e.to_string()))?;
        let now = bulwark_common::time::now_ms();
        if rec.used_ms != 0 {
            return Err(Status::permission_denied(format!(
                "this token was already used (at {}); a token enrolls one host once: make another with `bulwark token create`",
                bulwark_common::time::rfc3339_ms(rec.used_ms)
            )));
        }
        if rec.expires_ms <= now {
            return Err(Status::permission_denied(format!(
                "this token expired at {}: make another with `bulwark token create`",
                bulwark_common::time::rfc3339_ms(rec.expires_ms)
            )));
        }
        if rec.role != role {
            return Err(Status::permission_denied(format!(
                "this token is for a {} (named {}), not for a {role}",
                rec.role, rec.name
            )));
        }
        let r = enrollable(&rec.role)?;
        if let Some(at) = self.revoked_at(r, &rec.name)
            && rec.created_ms <= at
        {
            return Err(Status::permission_denied(format!(
                "{} {} was revoked at {}, after this token was made (it may have leaked with the host): make a new token with `bulwark token create`",
                rec.role,
                rec.name,
                bulwark_common::time::rfc3339_ms(at)
            )));
        }
        Ok(Redeemable { key, old, rec })
    }

    /// Uses up a checked token: once only (two hosts racing with one token: only
    /// one swap succeeds).
    fn consume(&self, t: Redeemable) -> Result<TokenRecord, Status> {
        let Redeemable { key, old, rec } = t;
        let mut used = rec.clone();
        used.used_ms = bulwark_common::time::now_ms();
        let new = serde_json::to_vec(&used).map_err(|e| Status::internal(e.to_string()))?;
        let swap =
            Txn::new()
                .when(TOKENS, key.as_bytes(), Some(old))
                .put(TOKENS, key.as_bytes(), new);
        if !self.state.commit(swap).map_err(token_store)? {
            return Err(Status::permission_denied(
                "this token was just used by another enrollment",
            ));
        }
        Ok(rec)
    }

    /// Signs `csr` for `role`/`name` with these SANs (servers only), dated after
    /// any revocation of the identity.
    fn sign(
        &self,
        role: Role,
        name: &str,
        csr: &str,
        dns: &[String],
        ips: &[String],
    ) -> Result<String, Status> {
        // Only servers are dialled by others: agents get no DNS or IP names.
        let (dns, ips) = if matches!(role, Role::Node | Role::Coordinator) {
            (dns.to_vec(), parse_ips(ips)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let pem = self
            .signer
            .sign_csr_after(
                csr,
                &LeafRequest {
                    role,
                    name: name.to_string(),
                    dns,
                    ips,
                    days: self.cert_days,
                },
                self.revoked_at(role, name),
            )
            .map_err(|e| Status::invalid_argument(format!("cannot sign the request: {e}")))?;
        self.issued(&pem);
        Ok(pem)
    }

    /// Signs the coordinator's own renewed certificate (named `name`, keeping the
    /// DNS names and addresses of the current one).
    pub fn sign_own(
        &self,
        name: &str,
        csr: &str,
        dns: &[String],
        ips: &[String],
    ) -> Result<String, String> {
        self.sign(Role::Coordinator, name, csr, dns, ips)
            .map_err(|s| s.message().to_string())
    }

    /// `Renew`: a new certificate for `role`/`name` (the caller's own), with the
    /// DNS names and addresses of the certificate it presented (`presented`, DER):
    /// what the request asks for is ignored, so a node cannot give itself a name
    /// the admin did not. Refused to a revoked certificate.
    pub fn renew(
        &self,
        role: Role,
        name: &str,
        presented: &[u8],
        r: &pb::RenewRequest,
    ) -> Result<pb::RenewResponse, Status> {
        if !matches!(role, Role::Node | Role::Agent) {
            return Err(Status::permission_denied(
                "only nodes and agents renew here",
            ));
        }
        let facts =
            bulwark_common::revocation::CertFacts::parse(presented, &self.signer.trust_domain)
                .map_err(|m| Status::unauthenticated(format!("the presented certificate: {m}")))?;
        if facts.identity.role != role || facts.identity.name != name {
            return Err(Status::permission_denied(
                "the presented certificate is not the caller's",
            ));
        }
        if let Some(at) = self.revoked_at(role, name)
            && facts.not_before_ms <= at
        {
            tracing::warn!(%role, name, "renewal refused: revoked");
            bulwark_common::metrics::counter_add(
                "bulwark_refusals_total",
                &[("reason", "revoked")],
                1,
            );
            return Err(Status::permission_denied(format!(
                "{role} {name} was revoked at {}: it cannot renew",
                bulwark_common::time::rfc3339_ms(at)
            )));
        }
        let (dns, ips) = bulwark_common::tls::dns_and_ip_sans(presented);
        let cert_pem = self.sign(role, name, &r.csr_pem, &dns, &ips)?;
        tracing::info!(%role, name, "certificate renewed");
        Ok(pb::RenewResponse {
            cert_pem,
            ca_pem: self.signer.ca_pem.clone(),
        })
    }
}

/// The `Enrollment` service (its own listener).
#[derive(Clone)]
pub struct EnrollmentApi(pub Arc<Enroller>);

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for EnrollmentApi {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let peer = req.remote_addr();
        let r = req.into_inner();
        let role = enrollable(&r.role)?;
        let refused = |s: Status| {
            tracing::warn!(?peer, role = %r.role, "enrollment refused: {}", s.message());
            bulwark_common::metrics::counter_add(
                "bulwark_refusals_total",
                &[("reason", "enrollment")],
                1,
            );
            s
        };
        let answer = self.0.enroll(role, &r).map_err(refused)?;
        tracing::info!(?peer, role = %r.role, name = %answer.name, "host enrolled");
        Ok(Response::new(answer))
    }
}

impl Enroller {
    /// Enrolls a host with a one-time token: checks the token, signs the CSR for
    /// the names the token carries (EnrollRequest.dns/ips are ignored), and only
    /// then uses the token up, so a bad CSR does not burn it.
    fn enroll(&self, role: Role, r: &pb::EnrollRequest) -> Result<pb::EnrollResponse, Status> {
        let token = self.check(&r.token, &r.role)?;
        let (name, dns, ips) = (
            token.rec.name.clone(),
            token.rec.dns.clone(),
            token.rec.ips.clone(),
        );
        let cert_pem = self.sign(role, &name, &r.csr_pem, &dns, &ips)?;
        let rec = self.consume(token)?;
        Ok(pb::EnrollResponse {
            name: rec.name,
            cert_pem,
            ca_pem: self.signer.ca_pem.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::enrollment_server::Enrollment;

    struct Setup {
        _dir: tempfile::TempDir,
        enroller: Arc<Enroller>,
        revocations: Arc<crate::revocation::RevocationStore>,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().expect("tmp");
        let pki = dir.path().join("pki");
        bulwark_common::pki::init(&pki, "test.fleet").expect("ca");
        let (crt, key) = bulwark_common::pki::ca_paths(&pki);
        let registry = Arc::new(
            crate::registry::Registry::open(
                &dir.path().join("data"),
                std::time::Duration::from_secs(30),
            )
            .expect("registry"),
        );
        let mut roots = rustls::RootCertStore::empty();
        let ca =
            bulwark_common::tls::parse_certs_pem(&std::fs::read(&crt).expect("ca")).expect("pem");
        roots.add(ca[0].clone()).expect("root");
        let tls = Arc::new(
            bulwark_common::revocation::Revocations::new(Arc::new(roots), "test.fleet")
                .expect("revs"),
        );
        let revocations = Arc::new(
            crate::revocation::RevocationStore::open(
                registry.clone(),
                Some(Signer::load(&crt, &key).expect("signer")),
                &dir.path().join("data"),
                tls,
            )
            .expect("store"),
        );
        let enroller = Arc::new(
            Enroller::new(registry.state().clone(), &crt, &key, 30)
                .expect("enroller")
                .with_revocations(revocations.clone()),
        );
        Setup {
            _dir: dir,
            enroller,
            revocations,
        }
    }

    async fn enroll(
        s: &Setup,
        token: &str,
        role: &str,
        csr_pem: &str,
    ) -> Result<pb::EnrollResponse, Status> {
        EnrollmentApi(s.enroller.clone())
            .enroll(Request::new(pb::EnrollRequest {
                token: token.into(),
                role: role.into(),
                csr_pem: csr_pem.into(),
                dns: vec!["evil.example".into()],
                ips: vec!["10.6.6.6".into()],
            }))
            .await
            .map(|r| r.into_inner())
    }

    fn facts(pem: &str) -> bulwark_common::revocation::CertFacts {
        let der = bulwark_common::tls::parse_certs_pem(pem.as_bytes()).expect("pem");
        bulwark_common::revocation::CertFacts::parse(der[0].as_ref(), "test.fleet").expect("cert")
    }

    /// Two enrollments that both checked one token before either used it up (two
    /// coordinators, or two requests at once): the commit conditioned on the
    /// record checked lets one through, and the token stays used once.
    #[test]
    fn of_two_enrollments_racing_with_one_token_one_wins() {
        let s = setup();
        let (token, _) = s
            .enroller
            .create("agent", "host-2", 60_000, &[], &[])
            .expect("token");
        let first = s.enroller.check(&token, "agent").expect("check");
        let second = s.enroller.check(&token, "agent").expect("check");
        let used = s.enroller.consume(first).expect("the first wins");
        assert_eq!(used.name, "host-2");
        let e = s.enroller.consume(second).expect_err("the second loses");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("just used"), "{e:?}");
        let e = s.enroller.check(&token, "agent").err().expect("used up");
        assert!(e.message().contains("already used"), "{e:?}");
    }

    /// A request whose CSR does not check out is refused and leaves the token
    /// usable; the token is used up by the enrollment that succeeds.
    #[tokio::test]
    async fn a_bad_csr_does_not_burn_the_token() {
        let s = setup();
        let (token, _) = s
            .enroller
            .create("agent", "host-1", 60_000, &[], &[])
            .expect("token");
        let e = enroll(&s, &token, "agent", "not a CSR")
            .await
            .expect_err("bad CSR");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("cannot sign"), "{e:?}");
        let (_, csr) = bulwark_common::pki::make_csr().expect("csr");
        let ok = enroll(&s, &token, "agent", &csr).await.expect("enrolled");
        assert_eq!(ok.name, "host-1");
        // Names asked for in the request never reach an agent's certificate.
        let der = bulwark_common::tls::parse_certs_pem(ok.cert_pem.as_bytes()).expect("pem");
        assert_eq!(
            bulwark_common::tls::dns_and_ip_sans(der[0].as_ref()),
            (vec![], vec![])
        );
        let again = enroll(&s, &token, "agent", &csr).await.expect_err("used");
        assert!(again.message().contains("already used"), "{again:?}");
    }

    /// A node's certificate names what its token names, not what it asks for.
    #[tokio::test]
    async fn a_nodes_names_come_from_its_token() {
        let s = setup();
        assert!(
            s.enroller
                .create("agent", "a", 60_000, &["a.example".into()], &[])
                .is_err()
        );
        assert!(
            s.enroller
                .create("node", "n", 60_000, &[], &["not-an-ip".into()])
                .is_err()
        );
        let (token, _) = s
            .enroller
            .create(
                "node",
                "node-7",
                60_000,
                &["node-7.example".into()],
                &["127.0.0.1".into()],
            )
            .expect("token");
        let (_, csr) = bulwark_common::pki::make_csr().expect("csr");
        let r = enroll(&s, &token, "node", &csr).await.expect("enrolled");
        let der = bulwark_common::tls::parse_certs_pem(r.cert_pem.as_bytes()).expect("pem");
        let (dns, ips) = bulwark_common::tls::dns_and_ip_sans(der[0].as_ref());
        assert_eq!(dns, vec!["node-7.example".to_string()]);
        assert_eq!(ips, vec!["127.0.0.1".to_string()]);
        // A renewal keeps the names of the certificate presented, whatever it asks.
        let (_, csr) = bulwark_common::pki::make_csr().expect("csr");
        let renewed = s
            .enroller
            .renew(
                Role::Node,
                "node-7",
                der[0].as_ref(),
                &pb::RenewRequest {
                    csr_pem: csr,
                    dns: vec!["evil.example".into()],
                    ips: vec!["10.6.6.6".into()],
                },
            )
            .expect("renewed");
        let der2 = bulwark_common::tls::parse_certs_pem(renewed.cert_pem.as_bytes()).expect("pem");
        assert_eq!(
            bulwark_common::tls::dns_and_ip_sans(der2[0].as_ref()),
            (dns, ips)
        );
        // Another identity's certificate is not the caller's.
        let (_, csr) = bulwark_common::pki::make_csr().expect("csr");
        assert!(
            s.enroller
                .renew(
                    Role::Node,
                    "node-8",
                    der[0].as_ref(),
                    &pb::RenewRequest {
                        csr_pem: csr,
                        ..Default::default()
                    },
                )
                .is_err()
        );
    }

    /// After a revocation: tokens made before it are refused, the revoked
    /// certificate cannot renew, a new token enrolls the name again with a
    /// certificate dated after the revocation, whose serial is recorded.
    #[tokio::test]
    async fn revocation_stops_old_tokens_and_renewal_but_not_new_tokens() {
        let s = setup();
        let (_, csr) = bulwark_common::pki::make_csr().expect("csr");
        let (first, _) = s
            .enroller
            .create("agent", "a1", 60_000, &[], &[])
            .expect("token");
        let (old, _) = s
            .enroller
            .create("agent", "a1", 60_000, &[], &[])
            .expect("token");
        let cert = enroll(&s, &first, "agent", &csr).await.expect("enrolled");
        let presented = facts(&cert.cert_pem);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let rev = s
            .revocations
            .revoke("agent", "a1", "admin")
            .expect("revoke");
        // The coordinator issued that certificate: the CRL names its serial.
        assert_eq!(rev.serials, vec![presented.serial.clone()]);
        let e = enroll(&s, &old, "agent", &csr)
            .await
            .expect_err("old token");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("was revoked"), "{e:?}");
        let der = bulwark_common::tls::parse_certs_pem(cert.cert_pem.as_bytes()).expect("pem");
        let e = s
            .enroller
            .renew(
                Role::Agent,
                "a1",
                der[0].as_ref(),
                &pb::RenewRequest {
                    csr_pem: csr.clone(),
                    ..Default::default()
                },
            )
            .expect_err("renew");
        assert!(e.message().contains("cannot renew"), "{e:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
        let (fresh, _) = s
            .enroller
            .create("agent", "a1", 60_000, &[], &[])
            .expect("token");
        let again = enroll(&s, &fresh, "agent", &csr)
            .await
            .expect("re-enrolled");
        let f = facts(&again.cert_pem);
        assert!(f.not_before_ms > rev.revoked_at_ms, "{f:?} {rev:?}");
        assert_ne!(f.serial, presented.serial, "a new serial for the same key");
    }
}

//! Enrollment: one-time tokens, the `Enrollment` service that turns a token and a
//! CSR into a certificate, and renewal for processes that already have one.
//!
//! A token is `bwt1.<secret>.<CA fingerprint>`: the secret (16 random bytes, hex)
//! is kept only as its BLAKE3 in the registry's `tokens` tree with the role, name,
//! expiry and, once redeemed, when; the fingerprint (BLAKE3 of the CA certificate)
//! lets the enrolling host check the coordinator before it trusts anything it says.
//! The private key never leaves the host: it sends a CSR, and the certificate's
//! names come from the token, never from the CSR.

use std::net::IpAddr;
use std::sync::Arc;

use bulwark_common::pki::{LeafRequest, Signer};
use bulwark_common::tls::Role;
use bulwark_proto as pb;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

/// Prefix of every token (format version 1).
pub const TOKEN_PREFIX: &str = "bwt1";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    v: u32,
    role: String,
    name: String,
    created_ms: i64,
    expires_ms: i64,
    /// When it was redeemed (0 = not yet).
    used_ms: i64,
}

/// Tokens and the CA signer (present when `[enrollment]` is configured).
pub struct Enroller {
    tokens: sled::Tree,
    signer: Signer,
    fingerprint: String,
    cert_days: i64,
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

fn parse_ips(ips: &[String]) -> Result<Vec<IpAddr>, Status> {
    ips.iter()
        .map(|i| {
            i.parse()
                .map_err(|_| Status::invalid_argument(format!("\"{i}\" is not an IP address")))
        })
        .collect()
}

impl Enroller {
    /// Loads the CA key; `tokens` is the registry's tree.
    pub fn new(
        tokens: sled::Tree,
        ca_crt: &std::path::Path,
        ca_key: &std::path::Path,
        cert_days: i64,
    ) -> anyhow::Result<Enroller> {
        let signer = Signer::load(ca_crt, ca_key)?;
        let fingerprint = bulwark_common::pki::ca_fingerprint(signer.ca_pem.as_bytes())
            .map_err(anyhow::Error::msg)?;
        Ok(Enroller {
            tokens,
            signer,
            fingerprint,
            cert_days,
        })
    }

    /// Makes a token for `role`/`name`, valid `ttl_ms`.
    pub fn create(&self, role: &str, name: &str, ttl_ms: u64) -> Result<(String, i64), Status> {
        enrollable(role)?;
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
        };
        let key = blake3::hash(secret_hex.as_bytes()).to_hex().to_string();
        let value = serde_json::to_vec(&rec).map_err(|e| Status::internal(e.to_string()))?;
        self.tokens
            .insert(key.as_bytes(), value)
            .and_then(|_| self.tokens.flush().map(|_| ()))
            .map_err(|e| Status::internal(format!("token store: {e}")))?;
        tracing::info!(role, name, expires_ms, "enrollment token created");
        Ok((
            format!("{TOKEN_PREFIX}.{secret_hex}.{}", self.fingerprint),
            expires_ms,
        ))
    }

    /// Redeems `token` for an `role` process: once only, before it expires.
    fn redeem(&self, token: &str, role: &str) -> Result<TokenRecord, Status> {
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
            .tokens
            .get(key.as_bytes())
            .map_err(|e| Status::internal(e.to_string()))?
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
        let mut used = rec.clone();
        used.used_ms = now;
        let new = serde_json::to_vec(&used).map_err(|e| Status::internal(e.to_string()))?;
        // Two hosts racing with one token: only one swap succeeds.
        match self
            .tokens
            .compare_and_swap(key.as_bytes(), Some(old), Some(new))
            .map_err(|e| Status::internal(e.to_string()))?
        {
            Ok(()) => {}
            Err(_) => {
                return Err(Status::permission_denied(
                    "this token was just used by another enrollment",
                ));
            }
        }
        self.tokens
            .flush()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(rec)
    }

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
        self.signer
            .sign_csr(
                csr,
                &LeafRequest {
                    role,
                    name: name.to_string(),
                    dns,
                    ips,
                    days: self.cert_days,
                },
            )
            .map_err(|e| Status::invalid_argument(format!("cannot sign the request: {e}")))
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

    /// `Renew`: a new certificate for `role`/`name` (the caller's own).
    pub fn renew(
        &self,
        role: Role,
        name: &str,
        r: &pb::RenewRequest,
    ) -> Result<pb::RenewResponse, Status> {
        if !matches!(role, Role::Node | Role::Agent) {
            return Err(Status::permission_denied(
                "only nodes and agents renew here",
            ));
        }
        let cert_pem = self.sign(role, name, &r.csr_pem, &r.dns, &r.ips)?;
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
        let rec = match self.0.redeem(&r.token, &r.role) {
            Ok(rec) => rec,
            Err(s) => {
                tracing::warn!(?peer, role = %r.role, "enrollment refused: {}", s.message());
                bulwark_common::metrics::counter_add(
                    "bulwark_refusals_total",
                    &[("reason", "enrollment")],
                    1,
                );
                return Err(s);
            }
        };
        let cert_pem = self.0.sign(role, &rec.name, &r.csr_pem, &r.dns, &r.ips)?;
        tracing::info!(?peer, role = %rec.role, name = %rec.name, "host enrolled");
        Ok(Response::new(pb::EnrollResponse {
            name: rec.name,
            cert_pem,
            ca_pem: self.0.signer.ca_pem.clone(),
        }))
    }
}

//! Who may call what: one table for every RPC of every Bulwark server.
//!
//! Each server's access layer looks the method's path up in [`RULES`] before any
//! handler runs: a caller whose certificate role is not listed gets
//! `PermissionDenied`, and a method with no row is refused to everyone (a new RPC
//! without a rule fails closed, and `tests/tests/role_matrix.rs` fails). Handlers
//! make the finer checks a role alone cannot (an agent only for its own sources, a
//! node only for sources moving to it, an officer only to lower governance locks).
//!
//! [`AccessLayer`] is that layer: a tower layer around every service of a server
//! (`Server::builder().layer(..)`), which runs before any handler. It reads the
//! caller's certificate from the connection (tonic's `TlsConnectInfo`), refuses a
//! caller without one or with one the revocation list revokes (`Unauthenticated`),
//! refuses a role the method's rule does not list (`PermissionDenied`, naming the
//! method and its roles), logs and counts every refusal (`bulwark_refusals_total`),
//! and hands the caller's [`crate::tls::Identity`] and certificate expiry to the
//! handlers in the request's extensions, where `tls::require` reads them again.

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::revocation::{CertFacts, Revocations};
use crate::tls::{CertExpiry, Role, TlsIdentity};

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Holders of a fleet certificate of one of these roles.
    Roles(&'static [Role]),
    /// Anyone with a fleet certificate of any role (health checks).
    AnyRole,
    /// Served on a listener without client certificates (enrollment: the caller
    /// proves itself with a one-time token).
    Token,
}

use Role::{Admin, Agent, Coordinator, Node, Officer};

/// Every RPC, by its gRPC path, with who may call it.
pub const RULES: &[(&str, Access)] = &[
    // Coordinator: nodes.
    (
        "/bulwark.v1.Coordinator/RegisterNode",
        Access::Roles(&[Node]),
    ),
    (
        "/bulwark.v1.Coordinator/NodeHeartbeat",
        Access::Roles(&[Node]),
    ),
    (
        "/bulwark.v1.Coordinator/GetAssignment",
        Access::Roles(&[Node, Agent]),
    ),
    // Coordinator: agents.
    ("/bulwark.v1.Coordinator/Control", Access::Roles(&[Agent])),
    (
        "/bulwark.v1.Coordinator/Renew",
        Access::Roles(&[Node, Agent]),
    ),
    (
        "/bulwark.v1.Coordinator/ListRevocations",
        Access::Roles(&[Admin, Node, Agent]),
    ),
    // Coordinator: the admin CLI.
    ("/bulwark.v1.Coordinator/ListNodes", Access::Roles(&[Admin])),
    (
        "/bulwark.v1.Coordinator/ListAgents",
        Access::Roles(&[Admin]),
    ),
    (
        "/bulwark.v1.Coordinator/ListSources",
        Access::Roles(&[Admin]),
    ),
    (
        "/bulwark.v1.Coordinator/ListPoints",
        Access::Roles(&[Admin]),
    ),
    ("/bulwark.v1.Coordinator/Sync", Access::Roles(&[Admin])),
    ("/bulwark.v1.Coordinator/Restore", Access::Roles(&[Admin])),
    ("/bulwark.v1.Coordinator/Allocate", Access::Roles(&[Admin])),
    (
        "/bulwark.v1.Coordinator/ListAlerts",
        Access::Roles(&[Admin]),
    ),
    (
        "/bulwark.v1.Coordinator/Locate",
        Access::Roles(&[Admin, Officer]),
    ),
    ("/bulwark.v1.Coordinator/Verify", Access::Roles(&[Admin])),
    ("/bulwark.v1.Coordinator/Drain", Access::Roles(&[Admin])),
    ("/bulwark.v1.Coordinator/Rebalance", Access::Roles(&[Admin])),
    ("/bulwark.v1.Coordinator/PutGroup", Access::Roles(&[Admin])),
    (
        "/bulwark.v1.Coordinator/ListGroups",
        Access::Roles(&[Admin]),
    ),
    (
        "/bulwark.v1.Coordinator/DeleteGroup",
        Access::Roles(&[Admin]),
    ),
    ("/bulwark.v1.Coordinator/SetGroup", Access::Roles(&[Admin])),
    (
        "/bulwark.v1.Coordinator/CreateToken",
        Access::Roles(&[Admin]),
    ),
    ("/bulwark.v1.Coordinator/Revoke", Access::Roles(&[Admin])),
    ("/bulwark.v1.Coordinator/SetQuota", Access::Roles(&[Admin])),
    (
        "/bulwark.v1.Coordinator/ListQuotas",
        Access::Roles(&[Admin]),
    ),
    (
        "/bulwark.v1.Coordinator/SetRetention",
        Access::Roles(&[Admin]),
    ),
    (
        "/bulwark.v1.Coordinator/AllowGroup",
        Access::Roles(&[Admin]),
    ),
    (
        "/bulwark.v1.Coordinator/Lock",
        Access::Roles(&[Admin, Officer]),
    ),
    (
        "/bulwark.v1.Coordinator/RemoveSource",
        Access::Roles(&[Admin]),
    ),
    (
        "/bulwark.v1.Coordinator/ListWorkers",
        Access::Roles(&[Admin]),
    ),
    ("/bulwark.v1.Coordinator/Forecast", Access::Roles(&[Admin])),
    (
        "/bulwark.v1.Coordinator/GetCoordinatorStatus",
        Access::Roles(&[Admin]),
    ),
    // Enrollment listener (no client certificate).
    ("/bulwark.v1.Enrollment/Enroll", Access::Token),
    // Node: the data path.
    ("/bulwark.v1.Node/Sync", Access::Roles(&[Agent])),
    ("/bulwark.v1.Node/ShipLog", Access::Roles(&[Agent])),
    ("/bulwark.v1.Node/Restore", Access::Roles(&[Agent, Admin])),
    (
        "/bulwark.v1.Node/RestoreLog",
        Access::Roles(&[Agent, Admin]),
    ),
    // Node: the coordinator.
    ("/bulwark.v1.Node/ListPoints", Access::Roles(&[Coordinator])),
    (
        "/bulwark.v1.Node/GrantRestore",
        Access::Roles(&[Coordinator]),
    ),
    ("/bulwark.v1.Node/Verify", Access::Roles(&[Coordinator])),
    ("/bulwark.v1.Node/Import", Access::Roles(&[Coordinator])),
    ("/bulwark.v1.Node/DropSource", Access::Roles(&[Coordinator])),
    (
        "/bulwark.v1.Node/SetLock",
        Access::Roles(&[Coordinator, Admin, Officer]),
    ),
    ("/bulwark.v1.Node/ListWorkers", Access::Roles(&[Admin])),
    // Node: other nodes (moves).
    ("/bulwark.v1.Node/Export", Access::Roles(&[Node])),
    // Health checks, on every server.
    ("/grpc.health.v1.Health/Check", Access::AnyRole),
    ("/grpc.health.v1.Health/Watch", Access::AnyRole),
];

/// Called with each caller's certificate facts once the call is let through (the
/// coordinator records the serial numbers it sees, for its CRL).
pub type OnCertificate = Arc<dyn Fn(&CertFacts) + Send + Sync>;

/// The access layer of a server (see the module docs).
#[derive(Clone)]
pub struct AccessLayer {
    check: Arc<Check>,
}

struct Check {
    trust_domain: String,
    revocations: Option<Arc<Revocations>>,
    /// The enrollment listener: only [`Access::Token`] methods, no certificate.
    enrollment: bool,
    on_certificate: Option<OnCertificate>,
}

impl std::fmt::Debug for AccessLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AccessLayer({}{})",
            self.check.trust_domain,
            if self.check.enrollment {
                ", enrollment"
            } else {
                ""
            }
        )
    }
}

impl AccessLayer {
    /// The layer of a listener that requires fleet certificates (the
    /// coordinator's and the node's), enforcing `identity`'s revocation list.
    pub fn new(identity: &TlsIdentity) -> AccessLayer {
        AccessLayer {
            check: Arc::new(Check {
                trust_domain: identity.trust_domain.clone(),
                revocations: Some(identity.revocations().clone()),
                enrollment: false,
                on_certificate: None,
            }),
        }
    }

    /// The layer of the enrollment listener: its callers have no certificate yet,
    /// and only the methods whose rule is [`Access::Token`] are served.
    pub fn enrollment(trust_domain: &str) -> AccessLayer {
        AccessLayer {
            check: Arc::new(Check {
                trust_domain: trust_domain.to_string(),
                revocations: None,
                enrollment: true,
                on_certificate: None,
            }),
        }
    }

    /// Also calls `f` with the certificate of every caller let through.
    pub fn on_certificate(self, f: OnCertificate) -> AccessLayer {
        AccessLayer {
            check: Arc::new(Check {
                trust_domain: self.check.trust_domain.clone(),
                revocations: self.check.revocations.clone(),
                enrollment: self.check.enrollment,
                on_certificate: Some(f),
            }),
        }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = AccessService<S>;
    fn layer(&self, inner: S) -> AccessService<S> {
        AccessService {
            inner,
            check: self.check.clone(),
        }
    }
}

/// See [`AccessLayer`].
#[derive(Clone)]
pub struct AccessService<S> {
    inner: S,
    check: Arc<Check>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for AccessService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::Ready<Result<Self::Response, S::Error>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self.check.admit(&mut req) {
            Ok(()) => futures::future::Either::Right(self.inner.call(req)),
            Err(status) => {
                futures::future::Either::Left(futures::future::ready(Ok(status.into_http::<RB>())))
            }
        }
    }
}

/// Logs and counts a refusal; returns it.
fn refuse(status: Status, reason: &str, path: &str, caller: &str, peer: &str) -> Status {
    tracing::warn!(method = %path, caller, peer, "refused call: {}", status.message());
    crate::metrics::counter_add("bulwark_refusals_total", &[("reason", reason)], 1);
    status
}

impl Check {
    fn admit<B>(&self, req: &mut http::Request<B>) -> Result<(), Status> {
        let path = req.uri().path().to_string();
        let method = method_of(&path);
        let info = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .cloned();
        let peer = info
            .as_ref()
            .and_then(|i| i.get_ref().remote_addr())
            .map(|a| a.to_string())
            .unwrap_or_default();
        if self.enrollment {
            return match rule(&path) {
                Some(Access::Token) => Ok(()),
                _ => Err(refuse(
                    Status::permission_denied(format!(
                        "{method} is not served on the enrollment listener (it serves Enroll only)"
                    )),
                    "role",
                    &path,
                    "",
                    &peer,
                )),
            };
        }
        let leaf = info
            .and_then(|i| i.peer_certs())
            .and_then(|c| c.first().cloned());
        let Some(leaf) = leaf else {
            return Err(refuse(
                Status::unauthenticated(
                    "no client certificate: every call needs a fleet certificate",
                ),
                "no-certificate",
                &path,
                "",
                &peer,
            ));
        };
        let facts = CertFacts::parse(leaf.as_ref(), &self.trust_domain).map_err(|m| {
            refuse(
                Status::unauthenticated(format!("the client certificate is not usable: {m}")),
                "bad-certificate",
                &path,
                "",
                &peer,
            )
        })?;
        let id = &facts.identity;
        let caller = id.to_string();
        if let Some(why) = self
            .revocations
            .as_ref()
            .and_then(|r| r.snapshot().refusal(&facts))
        {
            return Err(refuse(
                Status::unauthenticated(why),
                "revoked",
                &path,
                &caller,
                &peer,
            ));
        }
        match rule(&path) {
            Some(Access::AnyRole) => {}
            Some(Access::Roles(roles)) if roles.contains(&id.role) => {}
            Some(Access::Roles(roles)) => {
                let wanted: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
                return Err(refuse(
                    Status::permission_denied(format!(
                        "{method} is for {} certificates; the caller is {id}",
                        wanted.join(" or ")
                    )),
                    "role",
                    &path,
                    &caller,
                    &peer,
                ));
            }
            Some(Access::Token) => {
                return Err(refuse(
                    Status::permission_denied(format!(
                        "{method} is served on the coordinator's enrollment listener only; the caller is {id}"
                    )),
                    "role",
                    &path,
                    &caller,
                    &peer,
                ));
            }
            None => {
                return Err(refuse(
                    Status::permission_denied(format!(
                        "{path} has no access rule: refused to everyone (the caller is {id})"
                    )),
                    "no-rule",
                    &path,
                    &caller,
                    &peer,
                ));
            }
        }
        if let Some(f) = &self.on_certificate {
            f(&facts);
        }
        req.extensions_mut().insert(CertExpiry(facts.not_after_ms));
        req.extensions_mut().insert(facts.identity);
        Ok(())
    }
}

/// The rule for a gRPC path (`/package.Service/Method`), if it has one.
pub fn rule(path: &str) -> Option<Access> {
    RULES.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// Whether `role` may call the method at `path`; `false` for a path with no rule.
pub fn allows(path: &str, role: Role) -> bool {
    match rule(path) {
        Some(Access::Roles(roles)) => roles.contains(&role),
        Some(Access::AnyRole) => true,
        Some(Access::Token) | None => false,
    }
}

/// The method part of a path, for messages: `Sync` of `/bulwark.v1.Node/Sync`.
pub fn method_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_is_a_path_once() {
        let mut seen = std::collections::HashSet::new();
        for (p, _) in RULES {
            assert!(p.starts_with('/') && p.matches('/').count() == 2, "{p}");
            assert!(seen.insert(*p), "{p} has two rules");
        }
    }

    #[test]
    fn unknown_paths_are_refused() {
        assert!(!allows("/bulwark.v1.Node/Nope", Role::Admin));
        assert!(allows("/bulwark.v1.Node/Sync", Role::Agent));
        assert!(!allows("/bulwark.v1.Node/Sync", Role::Admin));
        assert!(!allows("/bulwark.v1.Enrollment/Enroll", Role::Agent));
        assert_eq!(method_of("/bulwark.v1.Node/Sync"), "Sync");
    }
}

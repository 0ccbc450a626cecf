//! Who may call what: one table for every RPC of every Bulwark server.
//!
//! Each server's access layer looks the method's path up in [`RULES`] before any
//! handler runs: a caller whose certificate role is not listed gets
//! `PermissionDenied`, and a method with no row is refused to everyone (a new RPC
//! without a rule fails closed, and `tests/tests/role_matrix.rs` fails). Handlers
//! make the finer checks a role alone cannot (an agent only for its own sources, a
//! node only for sources moving to it, an officer only to lower governance locks).

use crate::tls::Role;

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
    // Node: other nodes (moves).
    ("/bulwark.v1.Node/Export", Access::Roles(&[Node])),
    // Health checks, on every server.
    ("/grpc.health.v1.Health/Check", Access::AnyRole),
    ("/grpc.health.v1.Health/Watch", Access::AnyRole),
];

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

//! Alerts: the conditions each origin (a node, the schedule, the monitor, an
//! agent's Hello) raises, kept open until the origin no longer lists them.

use super::*;

/// A condition an origin raises now (see [`Registry::report_alerts`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Alert {
    /// Stable across reports: the same condition keeps its key.
    pub key: String,
    /// "warning" or "critical" (as the origin says).
    pub severity: String,
    /// What it is about: a node, agent or data source.
    pub subject: String,
    pub message: String,
}

impl Alert {
    /// A `warning` about `subject`.
    pub fn warning(key: String, subject: String, message: String) -> Alert {
        Alert {
            key,
            severity: "warning".into(),
            subject,
            message,
        }
    }

    /// A `critical` alert about `subject`.
    pub fn critical(key: String, subject: String, message: String) -> Alert {
        Alert {
            key,
            severity: "critical".into(),
            subject,
            message,
        }
    }
}

impl Registry {
    /// Takes the full list of conditions `origin` raises now: new ones are opened,
    /// standing ones refreshed, and open ones it no longer lists are resolved.
    pub fn report_alerts(&self, origin: &str, alerts: &[Alert]) -> Result<()> {
        // Callers do not all hold `placement`: each change is conditioned on the
        // record it read (`update`, and the resolve below).
        let now = now_ms();
        let mut listed = std::collections::HashSet::new();
        for a in alerts {
            listed.insert(a.key.clone());
            let mut opened = false;
            self.update(ALERTS, &a.key, |existing: Option<AlertRecord>| {
                opened = false;
                Ok(Some(match existing {
                    Some(mut r) if r.resolved_ms == 0 => {
                        r.last_seen_ms = now;
                        r.message = a.message.clone();
                        r.severity = a.severity.clone();
                        r
                    }
                    _ => {
                        opened = true;
                        AlertRecord {
                            v: FORMAT_VERSION,
                            key: a.key.clone(),
                            severity: a.severity.clone(),
                            subject: a.subject.clone(),
                            message: a.message.clone(),
                            origin: origin.to_string(),
                            first_seen_ms: now,
                            last_seen_ms: now,
                            resolved_ms: 0,
                        }
                    }
                }))
            })?;
            if opened {
                tracing::warn!(alert = %a.key, severity = %a.severity, subject = %a.subject, "{}", a.message);
            }
        }
        let mut open: HashMap<String, u64> = HashMap::new();
        for (k, v) in self.state.scan(ALERTS, b"")? {
            let mut r: AlertRecord = dec(&v)?;
            if r.origin == origin && r.resolved_ms == 0 && !listed.contains(&r.key) {
                r.resolved_ms = now;
                let txn =
                    Txn::new()
                        .when(ALERTS, k.clone(), Some(v))
                        .put(ALERTS, k.clone(), enc(&r)?);
                if self.state.commit(txn)? {
                    tracing::info!(alert = %r.key, "alert resolved");
                } else if let Some(now_r) = self.state.get(ALERTS, &k)? {
                    // Changed meanwhile (raised again): as it is now.
                    r = dec(&now_r)?;
                }
            }
            if r.resolved_ms == 0 {
                *open.entry(r.severity.clone()).or_default() += 1;
            }
        }
        for severity in ["warning", "critical"] {
            let n = open.get(severity).copied().unwrap_or(0);
            bulwark_common::metrics::gauge_set(
                "bulwark_alerts_active",
                &[("severity", severity)],
                n as f64,
            );
        }
        Ok(())
    }

    /// Alerts, open ones first, then (with `all`) resolved ones; newest first.
    pub fn alerts(&self, all: bool) -> Result<Vec<AlertRecord>> {
        let mut out: Vec<AlertRecord> = self
            .read_all::<AlertRecord>(ALERTS)?
            .into_iter()
            .filter(|a| all || a.resolved_ms == 0)
            .collect();
        out.sort_by(|a, b| {
            (a.resolved_ms != 0)
                .cmp(&(b.resolved_ms != 0))
                .then(b.last_seen_ms.cmp(&a.last_seen_ms))
        });
        Ok(out)
    }

    /// Raises (and resolves) the alerts of what the admin's policy refused of
    /// `agent`'s proposals: retention and space keys, and group claims.
    pub fn refresh_policy_alerts(&self, agent: &str) -> Result<()> {
        let mut alerts = Vec::new();
        for s in self.sources()?.into_iter().filter(|s| s.agent == agent) {
            for why in &self.effective(&s).refused {
                let key = why.split(':').next().unwrap_or("policy");
                alerts.push(Alert {
                    key: format!("policy-refused/{}/{key}", s.name),
                    severity: "warning".into(),
                    subject: s.name.clone(),
                    message: format!(
                        "agent {agent}'s config proposes for {}: {why}; the admin's value applies and no point is lost",
                        s.name
                    ),
                });
            }
            if !s.claimed_group.is_empty() && s.claimed_group != s.group {
                alerts.push(Alert {
                    key: format!("group-refused/{}", s.name),
                    severity: "warning".into(),
                    subject: s.name.clone(),
                    message: format!(
                        "agent {agent}'s config puts {} in group {}, which the admin has not allowed: `bulwark group add {} {}` or `bulwark group allow {} {agent}`",
                        s.name, s.claimed_group, s.claimed_group, s.name, s.claimed_group
                    ),
                });
            }
        }
        self.report_alerts(&format!("policy/{agent}"), &alerts)
    }
}

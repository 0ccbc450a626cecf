//! Renewal of a daemon's own certificate, as a [`Worker`]: once an hour (and at
//! start) it checks whether the certificate presented now is due — a third of its
//! life left, or the `renew_before` of its TLS files — and if so asks for a new one
//! through a [`RenewSigner`] (the coordinator's `Renew` for nodes and agents; the
//! coordinator signs its own), writes it with [`crate::enroll::renew`] and loads it
//! without a restart.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::TlsFiles;
use crate::enroll::{RenewError, RenewSigner, due_for_renewal, renew};
use crate::tls::TlsIdentity;
use crate::worker::Worker;

/// How often a daemon checks whether its certificate is due.
pub const RENEWAL_CHECK: Duration = Duration::from_secs(3600);

/// The `renewal` worker of a daemon.
pub struct Renewal {
    identity: TlsIdentity,
    files: TlsFiles,
    sign: RenewSigner,
    every: Duration,
    /// Whether "the coordinator has no [enrollment]" was said already (once).
    off_logged: bool,
}

impl Renewal {
    /// Renews `identity`'s certificate (loaded from `files`) through `sign`,
    /// checking every `every`.
    pub fn new(
        identity: TlsIdentity,
        files: TlsFiles,
        sign: RenewSigner,
        every: Duration,
    ) -> Renewal {
        Renewal {
            identity,
            files,
            sign,
            every,
            off_logged: false,
        }
    }
}

impl Worker for Renewal {
    fn name(&self) -> String {
        "renewal".into()
    }

    fn period(&self) -> Duration {
        self.every
    }

    fn runs_at_start(&self) -> bool {
        true
    }

    async fn run(&mut self, _stop: &CancellationToken) -> Result<(), String> {
        let der = self.identity.current_cert();
        let (Ok(from), Ok(until)) = (
            crate::tls::not_before_ms(der.as_ref()),
            crate::tls::not_after_ms(der.as_ref()),
        ) else {
            return Err(format!(
                "cannot read the validity of the certificate {}",
                self.files.cert.display()
            ));
        };
        let now = crate::time::now_ms();
        let due = match self.files.renew_before {
            Some(d) => until - now < i64::try_from(d.0.as_millis()).unwrap_or(i64::MAX),
            None => due_for_renewal(from, until, now),
        };
        if !due {
            return Ok(());
        }
        let (dns, ips) = crate::tls::dns_and_ip_sans(der.as_ref());
        match renew(&mut self.sign, &self.files, dns, ips).await {
            Ok(not_after) => {
                self.identity
                    .reload(&self.files)
                    .map_err(|e| format!("renewed certificate not loaded: {e}"))?;
                tracing::info!(
                    cert = %self.files.cert.display(),
                    expires = %crate::time::rfc3339_ms(not_after),
                    "certificate renewed"
                );
                Ok(())
            }
            Err(RenewError::Refused(m)) if m.contains("enrollment is off") => {
                if !self.off_logged {
                    tracing::warn!(
                        expires = %crate::time::rfc3339_ms(until),
                        "certificate due for renewal, but the coordinator has no [enrollment]: renew it by hand"
                    );
                    self.off_logged = true;
                }
                Ok(())
            }
            Err(e) => Err(format!("certificate renewal failed (retried later): {e}")),
        }
    }
}

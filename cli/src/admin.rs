//! The connection to the coordinator: where it is and which certificate to show
//! ([`ConnArgs`]), and the connected client every command that asks the fleet
//! uses ([`Admin`]).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use bulwark_common::config::TlsFiles;
use bulwark_common::failover::{CoordinatorChannel, CoordinatorList};
use bulwark_common::telemetry::TracedChannel;
use bulwark_common::tls::{self, Role, Target, TlsIdentity};
use bulwark_proto as pb;
use bulwark_proto::coordinator_client::CoordinatorClient;
use bulwark_proto::node_client::NodeClient;
use clap::Args;

/// How to reach the coordinator.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Coordinator address, https://host:port; several, comma-separated, are tried in
    /// order (moving on when one is unreachable or not the leader).
    #[arg(long, env = "BULWARK_COORDINATOR", global = true)]
    pub coordinator: Option<String>,
    /// Fleet CA certificate (PEM).
    #[arg(long, env = "BULWARK_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Admin certificate (PEM).
    #[arg(long, env = "BULWARK_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Private key of the admin certificate (PEM).
    #[arg(long, env = "BULWARK_KEY", global = true)]
    pub key: Option<PathBuf>,
}

impl ConnArgs {
    /// The coordinator's address and the admin's TLS files; says which flag or
    /// variable is missing.
    pub fn files(&self) -> anyhow::Result<(String, TlsFiles)> {
        let missing =
            |what: &str, flag: &str, var: &str| anyhow!("no {what}: pass {flag} or set {var}");
        let coordinator = self.coordinator.clone().ok_or_else(|| {
            missing(
                "coordinator address",
                "--coordinator",
                "BULWARK_COORDINATOR",
            )
        })?;
        let files = TlsFiles {
            renew_before: None,
            ca: self
                .ca
                .clone()
                .ok_or_else(|| missing("CA certificate", "--ca", "BULWARK_CA"))?,
            cert: self
                .cert
                .clone()
                .ok_or_else(|| missing("admin certificate", "--cert", "BULWARK_CERT"))?,
            key: self
                .key
                .clone()
                .ok_or_else(|| missing("admin key", "--key", "BULWARK_KEY"))?,
        };
        Ok((coordinator, files))
    }
}

/// A client of storage node `name` at `address`, dialled with `identity`'s
/// certificate: the node must present that node's certificate.
pub async fn node_client(
    identity: &TlsIdentity,
    name: &str,
    address: &str,
) -> anyhow::Result<NodeClient<TracedChannel>> {
    let target =
        Target::parse(address).map_err(|m| anyhow!("node {name} has a bad address: {m}"))?;
    let channel = tls::channel(&target, identity.client_config_for(Role::Node, Some(name))?)
        .await
        .map_err(|e| anyhow!("node {name} at {address}: {e}"))?;
    Ok(NodeClient::new(channel).max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES))
}

/// A connected admin client.
pub struct Admin {
    pub client: CoordinatorClient<CoordinatorChannel>,
    /// The coordinator that answered (one of the list).
    pub target: String,
    /// Every configured coordinator, and the TLS to reach them (`bulwark status`
    /// asks each one).
    pub list: CoordinatorList,
    pub tls: std::sync::Arc<rustls::ClientConfig>,
}

impl Admin {
    /// Connects with the given files to the first coordinator of `coordinator` (a
    /// comma-separated list) that answers.
    pub async fn connect(coordinator: &str, files: &TlsFiles) -> anyhow::Result<Admin> {
        let identity = TlsIdentity::load(files)?;
        let list = CoordinatorList::parse_commas(coordinator)
            .map_err(|m| anyhow!("--coordinator (or BULWARK_COORDINATOR): {m}"))?;
        let tls = identity.client_config(Role::Coordinator)?;
        let channel = CoordinatorChannel::connect(&list, tls.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        let target = channel.address().to_string();
        Ok(Admin {
            client: CoordinatorClient::new(channel)
                .max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES),
            target,
            list,
            tls,
        })
    }

    /// A client of the one coordinator at `target` (no failover to the others).
    pub async fn connect_one(
        &self,
        target: &Target,
    ) -> anyhow::Result<CoordinatorClient<CoordinatorChannel>> {
        let list = CoordinatorList::parse(&[target.to_string()])
            .map_err(|m| anyhow!("coordinator {target}: {m}"))?;
        let channel = CoordinatorChannel::connect(&list, self.tls.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(CoordinatorClient::new(channel))
    }

    /// The coordinator's refusal, explained for people.
    pub fn err(&self, s: tonic::Status) -> anyhow::Error {
        anyhow!(tls::explain_status(
            &format!("coordinator {}", self.target),
            &s
        ))
    }

    /// Runs a sync and waits for its result; also returns the agent that ran it.
    pub async fn sync_wait(&mut self, source: &str) -> anyhow::Result<(pb::SyncResult, String)> {
        self.sync_request(source, true, false, false)
            .await?
            .ok_or_else(|| anyhow!("the coordinator returned no sync result"))
    }

    /// Asks for a sync or check; with `wait`, returns its result and agent.
    pub async fn sync_request(
        &mut self,
        source: &str,
        wait: bool,
        check: bool,
        deep: bool,
    ) -> anyhow::Result<Option<(pb::SyncResult, String)>> {
        let r = self
            .client
            .sync(pb::SyncRequest {
                source: source.into(),
                wait,
                check,
                deep,
            })
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        if !wait {
            println!(
                "{} of {source} started on agent {}",
                if check { "check" } else { "sync" },
                r.agent
            );
            return Ok(None);
        }
        let result = r
            .result
            .ok_or_else(|| anyhow!("the coordinator returned no sync result"))?;
        Ok(Some((result, r.agent)))
    }

    /// Runs a restore and waits for its result.
    pub async fn restore_wait(
        &mut self,
        source: &str,
        point: u64,
        to: &Path,
        agent: Option<&str>,
    ) -> anyhow::Result<pb::RestoreResult> {
        self.restore_request(pb::RestoreRequest {
            source: source.into(),
            point,
            path: to.display().to_string(),
            agent: agent.unwrap_or_default().to_string(),
            wait: true,
            at_ms: 0,
        })
        .await
    }

    /// Runs a restore as asked and waits for its result.
    pub async fn restore_request(
        &mut self,
        mut req: pb::RestoreRequest,
    ) -> anyhow::Result<pb::RestoreResult> {
        req.wait = true;
        let r = self
            .client
            .restore(req)
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        r.result
            .ok_or_else(|| anyhow!("the coordinator returned no restore result"))
    }

    /// Points of a source, oldest first.
    pub async fn points(&mut self, source: &str) -> anyhow::Result<Vec<pb::Point>> {
        Ok(self
            .client
            .list_points(pb::ListPointsRequest {
                source: source.into(),
            })
            .await
            .map_err(|s| self.err(s))?
            .into_inner()
            .points)
    }
}

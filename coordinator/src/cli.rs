//! The admin CLI, `bulwark`: fleet PKI, listings, and syncs and restores relayed by
//! the coordinator. Every listing takes `--json`; the exit code is 0 only on success.

use bulwark_common::telemetry::TracedChannel;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use bulwark_common::config::{TlsFiles, format_size};
use bulwark_common::point::{Consistency, PointKind};
use bulwark_common::time::rfc3339_ms;
use bulwark_common::tls::{self, Role, Target, TlsIdentity};
use bulwark_proto as pb;
use bulwark_proto::coordinator_client::CoordinatorClient;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

mod policy;

/// Bulwark admin CLI: manage the fleet's certificates, look at nodes, agents, data
/// sources and recovery points, and run syncs and restores.
///
/// Connection to the coordinator comes from --coordinator/--ca/--cert/--key or the
/// BULWARK_COORDINATOR/BULWARK_CA/BULWARK_CERT/BULWARK_KEY variables; the
/// certificate must have the admin role (`bulwark pki issue --role admin`).
#[derive(Parser, Debug)]
#[command(name = "bulwark", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the coordinator.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Coordinator address, https://host:port.
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

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Make the fleet CA and sign certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// One screen on the whole fleet: nodes, space, data sources by state, groups,
    /// open alerts.
    Status(ListArgs),
    /// List storage nodes with their space.
    Nodes(ListArgs),
    /// List agents and whether they are connected.
    Agents(ListArgs),
    /// List data sources, where they live and their newest point.
    Sources {
        /// Say why one data source lives on its node instead of listing.
        #[arg(long, value_name = "NAME")]
        explain: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sync a data source now.
    Sync {
        /// Data source name.
        source: String,
        /// Wait until the sync has made its recovery point.
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a consistency check: compare every block of the source with the node's
    /// checksums, send only the blocks that differ, and make a new point.
    Check {
        /// Data source name.
        source: String,
        /// Recompute the node's checksums from the replica's bytes (finds and repairs
        /// damage inside the replica; reads the whole replica on the node).
        #[arg(long)]
        deep: bool,
        /// Wait until the check has made its recovery point.
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the recovery points of a data source, oldest first.
    Points {
        /// Data source name.
        source: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a recovery point to a path on an agent's host.
    Restore {
        /// Data source name.
        source: String,
        /// Point id (default: the newest).
        #[arg(long, conflicts_with = "at")]
        point: Option<u64>,
        /// Restore to a moment (RFC 3339, e.g. 2026-12-02T15:04:05Z): the newest
        /// volume point at or before it plus the logs up to it, from the volume and
        /// log sources of SOURCE's protection group, into the directory --to:
        /// `volume`, `logs/` and `restore.json` (which says how to replay).
        #[arg(long, value_parser = parse_time)]
        at: Option<i64>,
        /// Absolute path on the agent's host: a new file, or a block device; for a
        /// log source or --at, a new or empty directory.
        #[arg(long)]
        to: PathBuf,
        /// Agent that writes the restore (default: the source's own agent).
        #[arg(long)]
        agent: Option<String>,
        /// Wait until the restore is written and checked.
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a data source's space on its node: replica space and recovery-point
    /// space (e.g. `--points 20GiB`). Takes effect at once on the node (and at the
    /// source's next sync at the latest).
    Allocate {
        /// Data source name.
        source: String,
        /// Replica space (at least the volume plus its checksums).
        #[arg(long, value_parser = parse_size)]
        replica: Option<u64>,
        /// Recovery-point space.
        #[arg(long, value_parser = parse_size)]
        points: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set an agent's quota (largest source, total space), or list quotas.
    Quota(policy::QuotaArgs),
    /// Set a data source's retention: the admin's floor, which its agent's config
    /// can only lengthen (`--clear` goes back to the group's or the fleet minimum).
    Retention(policy::RetentionArgs),
    /// Lock a data source's (or a group's) recovery points against pruning and
    /// deletion for a minimum age: governance (an officer certificate may lift
    /// it) or compliance (nobody can; it can only be lengthened).
    Lock(policy::LockArgs),
    /// Stop protecting a data source and delete its points on its node (refused
    /// while any point is locked).
    Remove {
        /// Data source name.
        source: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List alerts: open ones, and with --all the resolved ones too.
    Alerts {
        /// Also resolved alerts.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read a data source's stored data on its node and check every checksum;
    /// damaged replica blocks are repaired from the agent when it still has them,
    /// and points that stay damaged are marked. Exits 1 when damage remains.
    Verify {
        /// Data source name.
        source: String,
        /// Only this point (and the data it depends on); default: every point.
        #[arg(long)]
        point: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy a recovery point from its storage node to a local file on this machine,
    /// checking every block's checksum.
    Export {
        /// Data source name.
        source: String,
        /// Point id (default: the newest).
        #[arg(long)]
        point: Option<u64>,
        /// A new file.
        #[arg(long)]
        to: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export a recovery point read-only over NBD (TLS, admin certificate) from its
    /// storage node, for `qemu-img convert` or the kernel NBD client and `mount -o
    /// ro`. Prints the URL to use.
    Mount {
        /// Data source name.
        source: String,
        /// Point id (default: the newest now).
        #[arg(long)]
        point: Option<u64>,
        /// Also lay out this CLI's certificate in DIR the way qemu's
        /// `tls-creds-x509` wants it (ca-cert.pem, client-cert.pem, client-key.pem).
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Protection groups: a sync schedule and retention shared by data sources.
    #[command(subcommand)]
    Group(GroupCommand),
    /// One-time enrollment tokens (the coordinator needs an [enrollment] table).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Revoke every certificate of ROLE NAME issued up to now: its connections are
    /// refused and its open streams cut within one heartbeat interval, it cannot
    /// renew, and its old enrollment tokens stop working. A certificate issued for
    /// the name later (a token made from now on) is accepted again.
    Revoke {
        /// coordinator, node, agent, admin or officer.
        role: String,
        /// The name in the certificate (node or agent name, ...).
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List revoked identities: role, name, when, by whom, serials in the CRL.
    Revocations(ListArgs),
    /// Move every data source off a node (it gets no new ones from now on); waits
    /// until the moves are done. Each move copies replica and points node to node,
    /// verifies every checksum, then switches the source with a new epoch.
    Drain {
        /// Node name.
        node: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move data sources until node fill ratios are within the coordinator's
    /// rebalance_spread_percent of each other, moving as few bytes as it can.
    Rebalance {
        /// Only say what would move.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (`bulwark completions bash > /etc/bash_completion.d/bulwark`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (bulwark.1 and one per command) into DIR, or print
    /// bulwark.1 to standard output.
    Man {
        /// Directory for bulwark.1, bulwark-sync.1, ...
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run a whole fleet on this machine, protect a sample volume, restore it, and
    /// clean up.
    Demo {
        /// Keep the demo's directory instead of deleting it.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a group, or change one: its sync interval and (optionally) retention,
    /// which then wins over what agents' configs say.
    Create {
        name: String,
        /// Time between syncs of each source (`15m`); the coordinator spreads the
        /// sources' start times over it.
        #[arg(long, value_parser = parse_duration_ms)]
        interval: u64,
        /// Keep this many newest points.
        #[arg(long)]
        keep: Option<u32>,
        /// Keep the newest point of this many hours / days / weeks / months.
        #[arg(long)]
        hourly: Option<u32>,
        #[arg(long)]
        daily: Option<u32>,
        #[arg(long)]
        weekly: Option<u32>,
        #[arg(long)]
        monthly: Option<u32>,
        /// Drop points older than this (never the newest).
        #[arg(long, value_parser = parse_duration_ms)]
        max_age: Option<u64>,
        /// Also make a point at this time of day, UTC (`02:00`); repeatable.
        #[arg(long = "at", value_parser = parse_time_of_day)]
        at: Vec<u32>,
        /// Replica space of each member (over its agent's config).
        #[arg(long, value_parser = parse_size)]
        replica_space: Option<u64>,
        /// Recovery-point space of each member (over its agent's config).
        #[arg(long, value_parser = parse_size)]
        points_space: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// List groups with their sources.
    List(ListArgs),
    /// Put data sources in a group.
    Add {
        group: String,
        sources: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Take data sources out of their group (back to their agent's schedule).
    Remove {
        sources: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a group that has no sources.
    Delete {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Let agents whose name matches PATTERN (`*` = anything, e.g. `db-*`) put
    /// their sources in the group from their own config; `--remove` takes it back.
    Allow {
        group: String,
        pattern: String,
        #[arg(long)]
        remove: bool,
        #[arg(long)]
        json: bool,
    },
}

fn parse_time_of_day(s: &str) -> Result<u32, String> {
    let bad = || format!("invalid time of day {s:?}: expected HH:MM (UTC)");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// `bulwark token`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a one-time token with which a host gets its certificate
    /// (`bulwark-agent enroll --coordinator https://HOST:7442 --token T`): it is
    /// printed once and can be used once, before it expires.
    Create {
        /// `agent` or `node`.
        #[arg(long)]
        role: String,
        /// The name the certificate will carry (the agent's or node's `name`).
        #[arg(long)]
        name: String,
        /// How long the token may be used (`1h`).
        #[arg(long, value_parser = parse_duration_ms, default_value = "1h")]
        ttl: u64,
        /// Nodes: a DNS name agents dial it by, put in its certificate
        /// (repeatable). A node's names come from here, never from the node.
        #[arg(long)]
        dns: Vec<String>,
        /// Nodes: an IP address agents dial it by (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        #[arg(long)]
        json: bool,
    },
}

fn parse_duration_ms(s: &str) -> Result<u64, String> {
    bulwark_common::config::parse_duration(s).map(|d| d.as_millis() as u64)
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum PkiCommand {
    /// Create a fleet CA (ca.crt, ca.key) in DIR.
    Init {
        /// Directory for the CA files.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain of the fleet (in every SPIFFE id).
        #[arg(long, default_value = "bulwark.local")]
        trust_domain: String,
    },
    /// Sign a certificate for one process: writes DIR/NAME.crt and DIR/NAME.key.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// coordinator, node, agent, admin or officer (lifts governance locks;
        /// keep its key apart from the admin's).
        #[arg(long, value_parser = |s: &str| s.parse::<Role>())]
        role: Role,
        /// Name of the process (node name, agent name, ...).
        #[arg(long)]
        name: String,
        /// DNS name others dial this server by (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP address others dial this server by (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365, allow_negative_numbers = true)]
        days: i64,
    },
}

/// A connected admin client.
pub struct Admin {
    pub client: CoordinatorClient<TracedChannel>,
    pub target: String,
}

impl Admin {
    /// Connects with the given files.
    pub async fn connect(coordinator: &str, files: &TlsFiles) -> anyhow::Result<Admin> {
        let identity = TlsIdentity::load(files)?;
        let target = Target::parse(coordinator).map_err(|m| anyhow!("--coordinator: {m}"))?;
        let channel = tls::channel(&target, identity.client_config(Role::Coordinator)?)
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(Admin {
            client: CoordinatorClient::new(channel)
                .max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES),
            target: target.to_string(),
        })
    }

    pub(crate) fn err(&self, s: tonic::Status) -> anyhow::Error {
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

fn conn_files(c: &ConnArgs) -> anyhow::Result<(String, TlsFiles)> {
    let missing =
        |what: &str, flag: &str, var: &str| anyhow!("no {what}: pass {flag} or set {var}");
    let coordinator = c.coordinator.clone().ok_or_else(|| {
        missing(
            "coordinator address",
            "--coordinator",
            "BULWARK_COORDINATOR",
        )
    })?;
    let files = TlsFiles {
        renew_before: None,
        ca: c
            .ca
            .clone()
            .ok_or_else(|| missing("CA certificate", "--ca", "BULWARK_CA"))?,
        cert: c
            .cert
            .clone()
            .ok_or_else(|| missing("admin certificate", "--cert", "BULWARK_CERT"))?,
        key: c
            .key
            .clone()
            .ok_or_else(|| missing("admin key", "--key", "BULWARK_KEY"))?,
    };
    Ok((coordinator, files))
}

/// Prints rows as aligned columns under a header.
/// Prints rows under a header. Every cell is escaped: agents and nodes choose
/// much of what is shown (errors, warnings, tracker names, versions), and a
/// hostile one must not reach the admin's terminal with control sequences.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| bulwark_common::text::escape(c)).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = widths[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Prints a listing: a JSON array with `--json`, else a table.
fn listing<T>(
    items: &[T],
    json: bool,
    header: &[&str],
    to_json: impl Fn(&T) -> Value,
    to_row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    if json {
        print_json(&Value::Array(items.iter().map(to_json).collect()))
    } else {
        table(header, &items.iter().map(to_row).collect::<Vec<_>>());
        Ok(())
    }
}

fn dash_if_empty(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn kind_word(kind: i32) -> &'static str {
    PointKind::from_proto(kind).map_or("unknown", PointKind::as_str)
}

/// JSON of a point, as `bulwark points --json` prints it.
pub fn point_json(p: &pb::Point) -> Value {
    json!({
        "id": p.id,
        "created_at": rfc3339_ms(p.created_at_ms),
        "consistency": Consistency::from_proto(p.consistency).as_str(),
        "kind": kind_word(p.kind),
        "blocks_changed": p.blocks_changed,
        "bytes_changed": p.bytes_changed,
        "stored_bytes": p.stored_bytes,
        "damaged_blocks": p.damaged_blocks,
        "files_changed": p.files_changed,
        "lock": policy::point_lock_json(p),
    })
}

/// JSON of a sync result, as `bulwark sync --wait --json` prints it.
pub fn sync_json(r: &pb::SyncResult, agent: &str) -> Value {
    json!({
        "source": r.source,
        "agent": agent,
        "point": r.point,
        "kind": kind_word(r.kind),
        "bytes_sent": r.bytes_sent,
        "blocks_sent": r.blocks_sent,
        "blocks_scanned": r.blocks_scanned,
        "blocks_read": r.blocks_read,
        "duration_ms": r.duration_ms,
        "consistency": Consistency::from_proto(r.consistency).as_str(),
        "damaged_blocks": r.damaged_blocks,
        "warnings": r.warnings,
        "files_sent": r.files_sent,
        "bytes_read": r.bytes_read,
    })
}

/// A duration for people: `850 ms`, `12.3 s`.
pub fn format_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// One line about a finished sync, for people.
pub fn sync_line(r: &pb::SyncResult) -> String {
    let kind = PointKind::from_proto(r.kind);
    let mut line = if kind == Some(PointKind::Log) {
        format!(
            "{}: point {} (log): {} appended to {} files sent ({} read on the host) in {}",
            r.source,
            r.point,
            format_size(r.bytes_sent),
            r.files_sent,
            format_size(r.bytes_read),
            format_ms(r.duration_ms)
        )
    } else if kind == Some(PointKind::Check) {
        format!(
            "{}: point {} (check, {}): {} blocks compared, {} differed and were sent ({}) in {}",
            r.source,
            r.point,
            Consistency::from_proto(r.consistency).as_str(),
            r.blocks_scanned,
            r.blocks_sent,
            format_size(r.bytes_sent),
            format_ms(r.duration_ms)
        )
    } else {
        format!(
            "{}: point {} ({}, {}): {} of {} blocks sent ({}) in {}",
            r.source,
            r.point,
            kind_word(r.kind),
            Consistency::from_proto(r.consistency).as_str(),
            r.blocks_sent,
            r.blocks_scanned,
            format_size(r.bytes_sent),
            format_ms(r.duration_ms)
        )
    };
    if r.damaged_blocks > 0 {
        line.push_str(&format!(
            "; {} damaged replica blocks repaired",
            r.damaged_blocks
        ));
    }
    for w in &r.warnings {
        line.push_str(&format!("\n  warning: {}", bulwark_common::text::escape(w)));
    }
    line
}

/// `bulwark sync` and `bulwark check`.
async fn sync_command(
    admin: &mut Admin,
    source: &str,
    wait: bool,
    check: bool,
    deep: bool,
    json: bool,
) -> anyhow::Result<()> {
    if deep && !check {
        bail!("--deep is only for check");
    }
    if !wait && json {
        let r = admin
            .client
            .sync(pb::SyncRequest {
                source: source.into(),
                wait: false,
                check,
                deep,
            })
            .await
            .map_err(|s| admin.err(s))?
            .into_inner();
        return print_json(&json!({"source": source, "agent": r.agent, "started": true}));
    }
    let op = if check { "check" } else { "sync" };
    let shown = (wait && !json).then(|| watch_progress(admin, op, source));
    let done = admin.sync_request(source, wait, check, deep).await;
    end_progress(shown);
    if let Some((r, agent)) = done? {
        if json {
            print_json(&sync_json(&r, &agent))?;
        } else {
            println!("{}", sync_line(&r));
        }
    }
    Ok(())
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pki(p) => return pki(p),
        Command::Demo { keep } => return crate::demo::run(keep).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "bulwark",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Command::Man { dir } => return man_pages(dir.as_deref()),
        _ => {}
    }
    let (coordinator, files) = conn_files(&cli.conn)?;
    let mut admin = Admin::connect(&coordinator, &files).await?;
    match cli.command {
        Command::Nodes(a) => {
            let nodes = admin
                .client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(|s| admin.err(s))?
                .into_inner()
                .nodes;
            listing(
                &nodes,
                a.json,
                &[
                    "NAME",
                    "ADDRESS",
                    "STATE",
                    "CAPACITY",
                    "ALLOCATED",
                    "USED",
                    "SOURCES",
                ],
                |n| {
                    json!({
                        "name": n.name, "address": n.address, "state": n.state,
                        "capacity_bytes": n.capacity_bytes, "allocated_bytes": n.allocated_bytes,
                        "used_bytes": n.used_bytes, "sources": n.sources,
                        "live_streams": n.live_streams, "last_seen": rfc3339_ms(n.last_seen_ms),
                        "ingest_bytes_per_sec": n.ingest_bytes_per_sec, "nbd_address": n.nbd_address, "version": n.version,
                        "health": n.health,
                    })
                },
                |n| {
                    vec![
                        n.name.clone(),
                        n.address.clone(),
                        n.state.clone(),
                        format_size(n.capacity_bytes),
                        format_size(n.allocated_bytes),
                        format_size(n.used_bytes),
                        n.sources.to_string(),
                    ]
                },
            )?;
        }
        Command::Agents(a) => {
            let agents = admin
                .client
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(|s| admin.err(s))?
                .into_inner()
                .agents;
            listing(
                &agents,
                a.json,
                &["NAME", "STATE", "SOURCES", "LAST SEEN"],
                |g| {
                    json!({
                        "name": g.name, "connected": g.connected, "sources": g.sources,
                        "last_seen": rfc3339_ms(g.last_seen_ms), "version": g.version,
                    })
                },
                |g| {
                    vec![
                        g.name.clone(),
                        if g.connected {
                            "connected"
                        } else {
                            "disconnected"
                        }
                        .into(),
                        g.sources.join(","),
                        rfc3339_ms(g.last_seen_ms),
                    ]
                },
            )?;
        }
        Command::Sources { explain, json } => {
            let sources = admin
                .client
                .list_sources(pb::ListSourcesRequest {})
                .await
                .map_err(|s| admin.err(s))?
                .into_inner()
                .sources;
            if let Some(name) = explain {
                let s = sources
                    .iter()
                    .find(|s| s.name == name)
                    .ok_or_else(|| anyhow!("no data source named {name}"))?;
                let why = if s.placement.is_empty() {
                    "placed before this coordinator recorded its reasons".to_string()
                } else {
                    s.placement.clone()
                };
                if json {
                    print_json(&json!({"name": s.name, "node": s.node, "explain": why}))?;
                } else {
                    println!("{}: {}", s.name, why.replace("; ", "\n  "));
                }
                return Ok(());
            }
            listing(
                &sources,
                json,
                &[
                    "NAME",
                    "AGENT",
                    "NODE",
                    "STATE",
                    "TRACKER",
                    "SIZE",
                    "POINT SPACE",
                    "LAST POINT",
                    "ERROR",
                ],
                source_json,
                |s| {
                    vec![
                        s.name.clone(),
                        s.agent.clone(),
                        dash_if_empty(&s.node),
                        s.state.clone(),
                        s.tracker.clone(),
                        format_size(s.size_bytes),
                        if s.points_alloc_bytes == 0 {
                            "-".into()
                        } else {
                            format!(
                                "{} of {}",
                                format_size(s.points_used_bytes),
                                format_size(s.points_alloc_bytes)
                            )
                        },
                        if s.last_point == 0 {
                            "-".into()
                        } else {
                            s.last_point.to_string()
                        },
                        if s.error.is_empty() {
                            s.warning.clone()
                        } else {
                            s.error.clone()
                        },
                    ]
                },
            )?;
        }
        Command::Sync { source, wait, json } => {
            sync_command(&mut admin, &source, wait, false, false, json).await?;
        }
        Command::Check {
            source,
            deep,
            wait,
            json,
        } => {
            sync_command(&mut admin, &source, wait, true, deep, json).await?;
        }
        Command::Points { source, json } => {
            let points = admin.points(&source).await?;
            listing(
                &points,
                json,
                &[
                    "ID",
                    "CREATED",
                    "CONSISTENCY",
                    "KIND",
                    "BLOCKS",
                    "CHANGED",
                    "LOCKED UNTIL",
                ],
                point_json,
                |p| {
                    vec![
                        p.id.to_string(),
                        rfc3339_ms(p.created_at_ms),
                        Consistency::from_proto(p.consistency).as_str().into(),
                        kind_word(p.kind).into(),
                        if PointKind::from_proto(p.kind) == Some(PointKind::Log) {
                            format!("{} files", p.files_changed)
                        } else {
                            p.blocks_changed.to_string()
                        },
                        format_size(p.bytes_changed),
                        if p.locked_until_ms > 0 {
                            rfc3339_ms(p.locked_until_ms)
                        } else {
                            "-".into()
                        },
                    ]
                },
            )?;
        }
        Command::Restore {
            source,
            point,
            at,
            to,
            agent,
            wait,
            json,
        } => {
            if !to.is_absolute() {
                bail!(
                    "--to {} must be an absolute path on the agent's host",
                    to.display()
                );
            }
            let req = pb::RestoreRequest {
                source: source.clone(),
                point: point.unwrap_or(0),
                path: to.display().to_string(),
                agent: agent.clone().unwrap_or_default(),
                wait,
                at_ms: at.unwrap_or(0),
            };
            if wait {
                let shown = (!json).then(|| watch_progress(&admin, "restore", &source));
                let r = admin.restore_request(req).await;
                end_progress(shown);
                let r = r?;
                if json {
                    let mut v = json!({
                        "source": r.source, "point": r.point, "path": r.path, "agent": r.agent,
                        "bytes_written": r.bytes_written, "duration_ms": r.duration_ms,
                    });
                    if !r.log_source.is_empty() {
                        v["log_source"] = json!(r.log_source);
                        v["log_point"] = json!(r.log_point);
                        v["log_files"] = json!(r.log_files);
                        v["log_point_created_at"] = json!(rfc3339_ms(r.log_point_created_ms));
                    }
                    if r.at_ms != 0 {
                        v["at"] = json!(rfc3339_ms(r.at_ms));
                    }
                    print_json(&v)?;
                } else if r.at_ms != 0 {
                    println!(
                        "{}: restored to {} in {} on agent {} ({} in {:.1} s), every byte checked",
                        bulwark_common::text::escape(&r.source),
                        rfc3339_ms(r.at_ms),
                        bulwark_common::text::escape(&r.path),
                        r.agent,
                        format_size(r.bytes_written),
                        r.duration_ms as f64 / 1000.0
                    );
                    if r.point != 0 {
                        println!(
                            "  volume  point {} -> {}/volume",
                            r.point,
                            bulwark_common::text::escape(&r.path)
                        );
                    }
                    if !r.log_source.is_empty() {
                        println!(
                            "  logs    {} point {} (shipped {}), {} files -> {}/logs",
                            bulwark_common::text::escape(&r.log_source),
                            r.log_point,
                            rfc3339_ms(r.log_point_created_ms),
                            r.log_files,
                            bulwark_common::text::escape(&r.path)
                        );
                    }
                    println!(
                        "  see {}/restore.json for how to replay the logs",
                        bulwark_common::text::escape(&r.path)
                    );
                } else if !r.log_source.is_empty() {
                    println!(
                        "{}: log point {} restored to {} on agent {} ({} files, {} in {:.1} s), every byte checked",
                        bulwark_common::text::escape(&r.source),
                        r.point,
                        bulwark_common::text::escape(&r.path),
                        r.agent,
                        r.log_files,
                        format_size(r.bytes_written),
                        r.duration_ms as f64 / 1000.0
                    );
                } else {
                    println!(
                        "{}: point {} restored to {} on agent {} ({} in {:.1} s), every block checked",
                        bulwark_common::text::escape(&r.source),
                        r.point,
                        bulwark_common::text::escape(&r.path),
                        r.agent,
                        format_size(r.bytes_written),
                        r.duration_ms as f64 / 1000.0
                    );
                }
            } else {
                let r = admin
                    .client
                    .restore(req)
                    .await
                    .map_err(|s| admin.err(s))?
                    .into_inner();
                if json {
                    print_json(&json!({"source": source, "agent": r.agent, "started": true}))?;
                } else {
                    println!("restore of {source} started on agent {}", r.agent);
                }
            }
        }
        Command::Allocate {
            source,
            replica,
            points,
            json,
        } => {
            let s = admin
                .client
                .allocate(pb::AllocateRequest {
                    source: source.clone(),
                    replica_alloc_bytes: replica.unwrap_or(0),
                    points_alloc_bytes: points.unwrap_or(0),
                })
                .await
                .map_err(|s| admin.err(s))?
                .into_inner()
                .source
                .ok_or_else(|| anyhow!("the coordinator returned no source"))?;
            if json {
                print_json(&source_json(&s))?;
            } else {
                println!(
                    "{}: allocation set to {} in all on node {} (the node applies it now, and at the next sync at the latest)",
                    s.name,
                    format_size(s.allocated_bytes),
                    dash_if_empty(&s.node)
                );
            }
        }
        Command::Quota(a) => policy::quota(&mut admin, a).await?,
        Command::Lock(a) => policy::lock(&mut admin, &files, a).await?,
        Command::Remove { source, json } => policy::remove(&mut admin, source, json).await?,
        Command::Retention(a) => policy::retention(&mut admin, a).await?,
        Command::Alerts { all, json } => {
            let alerts = admin
                .client
                .list_alerts(pb::ListAlertsRequest { all })
                .await
                .map_err(|s| admin.err(s))?
                .into_inner()
                .alerts;
            listing(
                &alerts,
                json,
                &["SEVERITY", "SUBJECT", "SINCE", "STATE", "MESSAGE"],
                |a| {
                    json!({
                        "key": a.key, "severity": a.severity, "subject": a.subject,
                        "message": a.message, "origin": a.origin,
                        "first_seen": rfc3339_ms(a.first_seen_ms),
                        "last_seen": rfc3339_ms(a.last_seen_ms),
                        "resolved": a.resolved,
                        "resolved_at": if a.resolved { rfc3339_ms(a.resolved_ms) } else { String::new() },
                    })
                },
                |a| {
                    vec![
                        a.severity.clone(),
                        a.subject.clone(),
                        rfc3339_ms(a.first_seen_ms),
                        if a.resolved { "resolved" } else { "open" }.into(),
                        a.message.clone(),
                    ]
                },
            )?;
        }
        Command::Verify {
            source,
            point,
            json,
        } => {
            let r = admin
                .client
                .verify(pb::VerifyRequest {
                    source: source.clone(),
                    point: point.unwrap_or(0),
                })
                .await
                .map_err(|s| admin.err(s))?
                .into_inner()
                .report
                .ok_or_else(|| anyhow!("the coordinator returned no report"))?;
            let left: Vec<u64> = r.damaged_points.iter().map(|p| p.id).collect();
            if json {
                print_json(&json!({
                    "source": r.source, "blocks_checked": r.blocks_checked,
                    "bytes_read": r.bytes_read, "duration_ms": r.duration_ms,
                    "damaged_replica_blocks": r.damaged_replica_blocks,
                    "repaired_blocks": r.repaired_blocks, "repair_error": r.repair_error,
                    "damaged_points": r.damaged_points.iter().map(|p| json!({
                        "id": p.id, "damaged_blocks": p.damaged_blocks,
                    })).collect::<Vec<_>>(),
                }))?;
            } else {
                println!(
                    "{}: {} blocks checked ({} read in {:.1} s)",
                    r.source,
                    r.blocks_checked,
                    format_size(r.bytes_read),
                    r.duration_ms as f64 / 1000.0
                );
                if !r.damaged_replica_blocks.is_empty() {
                    println!(
                        "  {} replica block(s) were damaged; {} re-sent by the agent{}",
                        r.damaged_replica_blocks.len(),
                        r.repaired_blocks,
                        if r.repair_error.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", r.repair_error)
                        }
                    );
                }
                for p in &r.damaged_points {
                    println!(
                        "  point {} is damaged: blocks {:?} cannot be restored",
                        p.id, p.damaged_blocks
                    );
                }
                if left.is_empty() {
                    println!("  every point is intact");
                }
            }
            if !left.is_empty() {
                bail!("{source}: points {left:?} are damaged");
            }
        }
        Command::Export {
            source,
            point,
            to,
            json,
        } => {
            let r =
                crate::export::export(&mut admin, &files, &source, point.unwrap_or(0), &to).await?;
            if json {
                print_json(&json!({
                    "source": source, "point": r.point, "path": r.path,
                    "bytes_written": r.bytes_written, "duration_ms": r.duration_ms,
                }))?;
            } else {
                println!(
                    "{source}: point {} exported to {} ({} in {:.1} s), every block checked",
                    r.point,
                    r.path.display(),
                    format_size(r.bytes_written),
                    r.duration_ms as f64 / 1000.0
                );
            }
        }
        Command::Mount {
            source,
            point,
            tls_dir,
            json,
        } => {
            let at = admin
                .client
                .locate(pb::LocateRequest {
                    source: source.clone(),
                })
                .await
                .map_err(|s| admin.err(s))?
                .into_inner();
            if at.nbd_address.is_empty() {
                bail!(
                    "node {} serves no NBD exports: set nbd_listen in its node.toml",
                    at.node
                );
            }
            let points = admin.points(&source).await?;
            let id = match point {
                Some(p) => points
                    .iter()
                    .find(|x| x.id == p)
                    .map(|x| x.id)
                    .ok_or_else(|| anyhow!("{source} has no point {p}"))?,
                None => points
                    .last()
                    .map(|x| x.id)
                    .ok_or_else(|| anyhow!("{source} has no recovery point yet"))?,
            };
            // The listener must be the node the coordinator named (qemu checks the
            // CA only).
            crate::export::check_nbd_node(&files, &at.nbd_address, &at.node).await?;
            let url = format!("nbd://{}/{source}@{id}", at.nbd_address);
            if let Some(dir) = &tls_dir {
                qemu_tls_dir(&files, dir)?;
            }
            if json {
                print_json(&json!({
                    "url": url, "source": source, "point": id, "node": at.node,
                    "size_bytes": at.size_bytes,
                    "tls_dir": tls_dir.as_ref().map(|d| d.display().to_string()),
                }))?;
            } else {
                let dir = tls_dir
                    .as_ref()
                    .map_or("DIR".to_string(), |d| d.display().to_string());
                println!("{url}");
                println!(
                    "read-only, TLS with an admin certificate; for example:\n  qemu-img convert -O raw --object tls-creds-x509,id=tls0,dir={dir},endpoint=client \\\n    --image-opts driver=nbd,server.type=inet,server.host={},server.port={},export={source}@{id},tls-creds=tls0 point.raw",
                    at.nbd_address.rsplit_once(':').map_or("", |(h, _)| h),
                    at.nbd_address.rsplit_once(':').map_or("", |(_, p)| p),
                );
            }
        }
        Command::Group(g) => group_command(&mut admin, g).await?,
        Command::Revoke { role, name, json } => {
            crate::revocation_cli::revoke(&mut admin, &role, &name, json).await?
        }
        Command::Revocations(a) => crate::revocation_cli::list(&mut admin, a.json).await?,
        Command::Token(TokenCommand::Create {
            role,
            name,
            ttl,
            dns,
            ip,
            json,
        }) => {
            let r = admin
                .client
                .create_token(pb::CreateTokenRequest {
                    role: role.clone(),
                    name: name.clone(),
                    ttl_ms: ttl,
                    dns,
                    ips: ip.iter().map(IpAddr::to_string).collect(),
                })
                .await
                .map_err(|s| admin.err(s))?
                .into_inner();
            if json {
                print_json(&json!({
                    "token": r.token, "role": role, "name": name,
                    "expires_at": rfc3339_ms(r.expires_at_ms),
                }))?;
            } else {
                println!("{}", r.token);
                eprintln!(
                    "one-time token for {role} {name}, valid until {}",
                    rfc3339_ms(r.expires_at_ms)
                );
            }
        }
        Command::Status(a) => status(&mut admin, a.json).await?,
        Command::Drain { node, json } => {
            let r = admin
                .client
                .drain(pb::DrainRequest { node: node.clone() })
                .await
                .map_err(|s| admin.err(s))?
                .into_inner();
            print_moves(&r, json, &format!("drain of {node}"))?;
        }
        Command::Rebalance { dry_run, json } => {
            let r = admin
                .client
                .rebalance(pb::RebalanceRequest { dry_run })
                .await
                .map_err(|s| admin.err(s))?
                .into_inner();
            print_moves(&r, json, "rebalance")?;
        }
        Command::Pki(_)
        | Command::Demo { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => {}
    }
    Ok(())
}

/// `bulwark man`: the manual from the clap definitions.
fn man_pages(dir: Option<&Path>) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("cannot write the manual pages into {}", dir.display()))?;
    Ok(())
}

/// `bulwark status`.
async fn status(admin: &mut Admin, json: bool) -> anyhow::Result<()> {
    let c = &mut admin.client;
    let nodes = c.list_nodes(pb::ListNodesRequest {}).await;
    let sources = c.list_sources(pb::ListSourcesRequest {}).await;
    let alerts = c.list_alerts(pb::ListAlertsRequest { all: false }).await;
    let groups = c.list_groups(pb::ListGroupsRequest {}).await;
    let (nodes, sources, alerts, groups) = match (nodes, sources, alerts, groups) {
        (Ok(n), Ok(s), Ok(a), Ok(g)) => (
            n.into_inner().nodes,
            s.into_inner().sources,
            a.into_inner().alerts,
            g.into_inner().groups,
        ),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => {
            return Err(admin.err(e));
        }
    };
    let count = |xs: Vec<&str>| {
        let mut m: std::collections::BTreeMap<String, usize> = Default::default();
        for x in xs {
            *m.entry(x.to_string()).or_default() += 1;
        }
        m
    };
    let node_states = count(nodes.iter().map(|n| n.state.as_str()).collect());
    let source_states = count(sources.iter().map(|s| s.state.as_str()).collect());
    let severities = count(alerts.iter().map(|a| a.severity.as_str()).collect());
    let capacity: u64 = nodes.iter().map(|n| n.capacity_bytes).sum();
    let allocated: u64 = nodes.iter().map(|n| n.allocated_bytes).sum();
    let used: u64 = nodes.iter().map(|n| n.used_bytes).sum();
    let now = bulwark_common::time::now_ms();
    let oldest_sync = sources
        .iter()
        .filter(|s| s.last_sync_ms > 0)
        .min_by_key(|s| s.last_sync_ms);
    let never = sources.iter().filter(|s| s.last_sync_ms == 0).count();
    if json {
        return print_json(&json!({
            "coordinator": admin.target,
            "nodes": node_states, "capacity_bytes": capacity,
            "allocated_bytes": allocated, "used_bytes": used,
            "sources": source_states, "sources_never_synced": never,
            "oldest_sync": oldest_sync.map(|s| json!({
                "source": s.name, "at": rfc3339_ms(s.last_sync_ms),
            })),
            "groups": groups.len(),
            "alerts": severities,
        }));
    }
    let list = |m: &std::collections::BTreeMap<String, usize>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!("coordinator  {}", admin.target);
    println!("nodes        {}", list(&node_states));
    println!(
        "space        {} allocated of {} ({:.0}%), {} used",
        format_size(allocated),
        format_size(capacity),
        allocated as f64 * 100.0 / capacity.max(1) as f64,
        format_size(used)
    );
    println!(
        "sources      {}{}",
        list(&source_states),
        if never > 0 {
            format!("; {never} never synced")
        } else {
            String::new()
        }
    );
    if let Some(s) = oldest_sync {
        println!(
            "oldest sync  {} ({} s ago)",
            s.name,
            (now - s.last_sync_ms).max(0) / 1000
        );
    }
    println!("groups       {}", groups.len());
    println!("alerts       {}", list(&severities));
    for a in alerts.iter().take(5) {
        println!(
            "  {} {}: {}",
            a.severity,
            bulwark_common::text::escape(&a.subject),
            bulwark_common::text::escape(&a.message)
        );
    }
    if alerts.len() > 5 {
        println!("  ... {} more: bulwark alerts", alerts.len() - 5);
    }
    Ok(())
}

async fn group_command(admin: &mut Admin, cmd: GroupCommand) -> anyhow::Result<()> {
    let group_json = |g: &pb::Group| {
        json!({
            "name": g.name, "interval_ms": g.interval_ms, "sources": g.sources,
            "replica_alloc_bytes": g.replica_alloc_bytes, "points_alloc_bytes": g.points_alloc_bytes,
            "point_times": g.point_times.iter().map(|m| format!("{:02}:{:02}", m / 60, m % 60)).collect::<Vec<_>>(),
            "retention": g.retention.as_ref().map(|r| json!({
                "keep": r.keep, "max_age_ms": r.max_age_ms, "hourly": r.hourly,
                "daily": r.daily, "weekly": r.weekly, "monthly": r.monthly,
            })),
        })
    };
    match cmd {
        GroupCommand::Create {
            name,
            interval,
            keep,
            hourly,
            daily,
            weekly,
            monthly,
            max_age,
            at,
            replica_space,
            points_space,
            json,
        } => {
            let any = keep.is_some()
                || hourly.is_some()
                || daily.is_some()
                || weekly.is_some()
                || monthly.is_some()
                || max_age.is_some();
            let retention = any.then(|| pb::Retention {
                keep: keep.unwrap_or(0),
                max_age_ms: max_age.unwrap_or(0),
                hourly: hourly.unwrap_or(0),
                daily: daily.unwrap_or(0),
                weekly: weekly.unwrap_or(0),
                monthly: monthly.unwrap_or(0),
            });
            let g = admin
                .client
                .put_group(pb::Group {
                    name,
                    interval_ms: interval,
                    retention,
                    sources: Vec::new(),
                    point_times: at,
                    replica_alloc_bytes: replica_space.unwrap_or(0),
                    points_alloc_bytes: points_space.unwrap_or(0),
                    ..Default::default()
                })
                .await
                .map_err(|s| admin.err(s))?
                .into_inner();
            if json {
                print_json(&group_json(&g))?;
            } else {
                println!(
                    "group {}: a sync every {}, {} source(s)",
                    g.name,
                    format_ms(g.interval_ms),
                    g.sources.len()
                );
            }
        }
        GroupCommand::List(a) => {
            let groups = admin
                .client
                .list_groups(pb::ListGroupsRequest {})
                .await
                .map_err(|s| admin.err(s))?
                .into_inner()
                .groups;
            listing(
                &groups,
                a.json,
                &["NAME", "INTERVAL", "RETENTION", "SOURCES"],
                group_json,
                |g| {
                    vec![
                        g.name.clone(),
                        format_ms(g.interval_ms),
                        g.retention.as_ref().map_or("agents' own".to_string(), |r| {
                            bulwark_common::retention::Retention::from_proto(Some(r)).describe()
                        }),
                        g.sources.join(","),
                    ]
                },
            )?;
        }
        GroupCommand::Add {
            group,
            sources,
            json,
        } => {
            admin
                .client
                .set_group(pb::SetGroupRequest {
                    group: group.clone(),
                    sources: sources.clone(),
                })
                .await
                .map_err(|s| admin.err(s))?;
            if json {
                print_json(&json!({"group": group, "sources": sources}))?;
            } else {
                println!("{} now in group {group}", sources.join(", "));
            }
        }
        GroupCommand::Remove { sources, json } => {
            admin
                .client
                .set_group(pb::SetGroupRequest {
                    group: String::new(),
                    sources: sources.clone(),
                })
                .await
                .map_err(|s| admin.err(s))?;
            if json {
                print_json(&json!({"group": "", "sources": sources}))?;
            } else {
                println!("{} in no group now", sources.join(", "));
            }
        }
        GroupCommand::Delete { name, json } => {
            admin
                .client
                .delete_group(pb::DeleteGroupRequest { name: name.clone() })
                .await
                .map_err(|s| admin.err(s))?;
            if json {
                print_json(&json!({"deleted": name}))?;
            } else {
                println!("group {name} deleted");
            }
        }
        GroupCommand::Allow {
            group,
            pattern,
            remove,
            json,
        } => policy::group_allow(admin, group, pattern, remove, json).await?,
    }
    Ok(())
}

/// Prints a drain's or rebalance's moves; fails when one failed.
fn print_moves(r: &pb::MoveReport, json: bool, what: &str) -> anyhow::Result<()> {
    if json {
        print_json(&json!({
            "dry_run": r.dry_run,
            "spread_before": r.spread_before, "spread_after": r.spread_after,
            "lower_bound_bytes": r.lower_bound_bytes,
            "moves": r.moves.iter().map(|m| json!({
                "source": m.source, "from": m.from, "to": m.to, "bytes": m.bytes,
                "points": m.points, "duration_ms": m.duration_ms, "error": m.error,
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        for m in &r.moves {
            let verb = if r.dry_run { "would move" } else { "moved" };
            if m.error.is_empty() {
                println!(
                    "{verb} {} from {} to {} ({})",
                    m.source,
                    m.from,
                    m.to,
                    format_size(m.bytes)
                );
            } else {
                println!(
                    "did not move {} from {}: {}",
                    m.source,
                    m.from,
                    bulwark_common::text::escape(&m.error)
                );
            }
        }
        println!(
            "{what}: {} move(s); fill spread {:.1}% -> {:.1}%",
            r.moves.len(),
            r.spread_before * 100.0,
            r.spread_after * 100.0
        );
    }
    let failed: Vec<&str> = r
        .moves
        .iter()
        .filter(|m| !m.error.is_empty())
        .map(|m| m.source.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("{what}: {} not moved: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

/// Copies the CLI's CA, certificate and key into `dir` under the names qemu's
/// `tls-creds-x509` object reads; the key stays owner-only.
fn qemu_tls_dir(files: &TlsFiles, dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (from, name) in [
        (&files.ca, "ca-cert.pem"),
        (&files.cert, "client-cert.pem"),
        (&files.key, "client-key.pem"),
    ] {
        let to = dir.join(name);
        std::fs::copy(from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    let key = dir.join("client-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} owner-only", key.display()))?;
    Ok(())
}

/// Shows the progress the source's agent reports (through `sources`) while a
/// `--wait` runs; stop it with [`end_progress`].
fn watch_progress(admin: &Admin, op: &str, source: &str) -> tokio::task::JoinHandle<()> {
    let mut client = admin.client.clone();
    let source = source.to_string();
    let progress = std::sync::Arc::new(bulwark_common::metrics::Progress::default());
    let label = format!("{op} {source}");
    tokio::spawn(async move {
        // The display shows nothing until the first report gives a total.
        let display = crate::export::show_progress(label, progress.clone());
        let poll = async {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let Ok(r) = client.list_sources(pb::ListSourcesRequest {}).await else {
                    continue;
                };
                let found = r
                    .into_inner()
                    .sources
                    .into_iter()
                    .find(|x| x.name == source);
                let Some((p, size)) = found.and_then(|s| s.progress.map(|p| (p, s.size_bytes)))
                else {
                    continue;
                };
                let total = if p.total_bytes > 0 {
                    p.total_bytes
                } else {
                    size
                };
                progress
                    .done
                    .store(p.done_bytes, std::sync::atomic::Ordering::Relaxed);
                progress
                    .total
                    .store(total, std::sync::atomic::Ordering::Relaxed);
            }
        };
        tokio::select! {
            _ = display => {}
            _ = poll => {}
        }
    })
}

/// Stops a [`watch_progress`] display and ends its line on a terminal.
fn end_progress(shown: Option<tokio::task::JoinHandle<()>>) {
    if let Some(t) = shown {
        t.abort();
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!();
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    bulwark_common::config::parse_size(s)
}

fn parse_time(s: &str) -> Result<i64, String> {
    bulwark_common::time::parse_rfc3339_ms(s)
}

/// A source as `bulwark sources --json` prints it.
fn source_json(s: &pb::SourceInfo) -> Value {
    json!({
        "name": s.name, "agent": s.agent, "node": s.node,
        "kind": if s.kind == pb::SourceKind::Log as i32 { "log" } else { "volume" },
        "state": s.state, "size_bytes": s.size_bytes, "last_point": s.last_point,
        "epoch": s.epoch, "block_size": s.block_size,
        "last_sync": rfc3339_ms(s.last_sync_ms), "error": s.error,
        "allocated_bytes": s.allocated_bytes,
        "replica_alloc_bytes": s.replica_alloc_bytes,
        "points_alloc_bytes": s.points_alloc_bytes,
        "points_used_bytes": s.points_used_bytes,
        "used_bytes": s.used_bytes, "points": s.points,
        "last_verify": if s.last_verify_ms > 0 { rfc3339_ms(s.last_verify_ms) } else { String::new() },
        "verify_result": s.verify_result,
        "group": s.group,
        "next_sync": if s.next_sync_ms > 0 { rfc3339_ms(s.next_sync_ms) } else { String::new() },
        "progress": s.progress.as_ref().map(|p| json!({
            "op": p.op, "done_bytes": p.done_bytes, "total_bytes": p.total_bytes,
        })),
        "tracker": s.tracker, "warning": s.warning,
        "retention": policy::retention_json(s.retention.as_ref()),
        "retention_from": s.retention_from,
        "policy_refused": s.policy_refused,
        "lock": policy::lock_json(s.lock.as_ref()),
    })
}

fn pki(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init { dir, trust_domain } => {
            let crt = bulwark_common::pki::init(&dir, &trust_domain)?;
            println!(
                "fleet CA for trust domain {trust_domain} written to {} (key: {})",
                crt.display(),
                dir.join("ca.key").display()
            );
            println!("keep ca.key offline; copy only ca.crt to the fleet's hosts");
        }
        PkiCommand::Issue {
            dir,
            role,
            name,
            dns,
            ip,
            days,
        } => {
            let issued = bulwark_common::pki::issue(
                &dir,
                &bulwark_common::pki::LeafRequest {
                    role,
                    name,
                    dns,
                    ips: ip,
                    days,
                },
            )
            .with_context(|| {
                format!(
                    "cannot issue a certificate with the CA in {}",
                    dir.display()
                )
            })?;
            println!(
                "{} signed: {} (key {})",
                issued.spiffe_id,
                issued.cert.display(),
                issued.key.display()
            );
        }
    }
    Ok(())
}

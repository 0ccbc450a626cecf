//! A whole fleet on 127.0.0.1: a fresh CA, certificates, config files and the real
//! daemons, in a temporary directory per test.
//!
//! Layout of the directory (`Fleet::root`):
//!
//! ```text
//! pki/                      ca.crt, ca.key, <name>.crt, <name>.key
//! coordinator/              coordinator.toml, data/
//! <node>/                   node.toml, the node's data_dir; disk1/ is its pool disk
//! <agent>/                  agent.toml, state/, <source>.img (the protected volumes)
//! scratch/                  restores and saved images made by the tests
//! logs/<name>.log           stdout+stderr of each daemon (every run appended)
//! logs/cli.log              every CLI command the harness ran, with its result
//! ```

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use bulwark_common::config::TlsFiles;
use bulwark_common::tls::Role;
use serde_json::Value;

use crate::bins::{self, AGENT, CLI, COORDINATOR, NODE};
use crate::process::{Background, Daemon, describe, run, scrub_env, show_output, tail};
use crate::{free_port, json_str, json_u64, poll};

/// How long readiness waits (coordinator answering, nodes up, agents connected) last.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one CLI command may run (syncs and restores of 64 MiB included).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(240);
/// Lines of each log printed when a test fails.
const TAIL_LINES: usize = 60;
/// Set to any value to keep the fleet directory even when the test passes.
pub const KEEP_ENV: &str = "BULWARK_E2E_KEEP";

/// Runs the CLI without connection flags (`pki ...`); panics on failure.
pub fn cli_plain(args: &[&str]) -> Output {
    let mut cmd = Command::new(bins::bin(CLI));
    scrub_env(&mut cmd);
    cmd.args(args);
    let described = describe(&cmd);
    let out = run(cmd, CLI_TIMEOUT);
    assert!(
        out.status.success(),
        "CLI command failed\n{}",
        show_output(&described, &out)
    );
    out
}

/// A fleet CA made with `bulwark pki init`, and the certificates it issued.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// `bulwark pki init --dir DIR` (default trust domain).
    pub fn init(dir: &Path) -> Pki {
        Pki::init_with(dir, None)
    }

    /// `bulwark pki init --dir DIR [--trust-domain T]`.
    pub fn init_with(dir: &Path, trust_domain: Option<&str>) -> Pki {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let d = dir.to_string_lossy();
        let mut args = vec!["pki", "init", "--dir", &d];
        if let Some(td) = trust_domain {
            args.extend(["--trust-domain", td]);
        }
        cli_plain(&args);
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        for f in [pki.ca(), dir.join("ca.key")] {
            assert!(
                f.is_file(),
                "`bulwark pki init` did not write {}",
                f.display()
            );
        }
        pki
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ca.crt`.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The files of a certificate issued earlier under `name`.
    pub fn files(&self, name: &str) -> TlsFiles {
        TlsFiles {
            ca: self.ca(),
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
            renew_before: None,
        }
    }

    /// `bulwark pki issue --role ROLE --name NAME`; servers (coordinator and node
    /// roles) also get `--ip 127.0.0.1 --dns localhost`.
    pub fn issue(&self, role: &str, name: &str) -> TlsFiles {
        let server: &[&str] = if role == "coordinator" || role == "node" {
            &["--ip", "127.0.0.1", "--dns", "localhost"]
        } else {
            &[]
        };
        self.issue_with(role, name, server)
    }

    /// `bulwark pki issue --role ROLE --name NAME EXTRA...`.
    pub fn issue_with(&self, role: &str, name: &str, extra: &[&str]) -> TlsFiles {
        let d = self.dir.to_string_lossy();
        let mut args = vec!["pki", "issue", "--dir", &d, "--role", role, "--name", name];
        args.extend_from_slice(extra);
        cli_plain(&args);
        let files = self.files(name);
        for f in [&files.cert, &files.key] {
            assert!(
                f.is_file(),
                "`bulwark pki issue` did not write {}",
                f.display()
            );
        }
        files
    }
}

/// A path as a TOML basic string.
pub fn toml_path(p: &Path) -> String {
    let s = p.to_string_lossy();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn tls_table(tls: &TlsFiles) -> String {
    let mut t = format!(
        "[tls]\nca = {}\ncert = {}\nkey = {}\n",
        toml_path(&tls.ca),
        toml_path(&tls.cert),
        toml_path(&tls.key)
    );
    if let Some(d) = &tls.renew_before {
        t.push_str(&format!("renew_before = \"{}s\"\n", d.0.as_secs()));
    }
    t
}

/// `coordinator.toml`.
pub fn coordinator_toml(port: u16, data_dir: &Path, tls: &TlsFiles) -> String {
    coordinator_toml_with(port, data_dir, tls, "")
}

/// [`coordinator_toml`] with `extra` top-level lines.
pub fn coordinator_toml_with(port: u16, data_dir: &Path, tls: &TlsFiles, extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:{port}\"\ndata_dir = {}\n{extra}\n\n{}",
        toml_path(data_dir),
        tls_table(tls)
    )
}

/// `node.toml` with one pool disk.
pub fn node_toml(
    name: &str,
    port: u16,
    coordinator_url: &str,
    data_dir: &Path,
    disk: &Path,
    capacity: &str,
    tls: &TlsFiles,
) -> String {
    node_toml_with(
        name,
        port,
        coordinator_url,
        data_dir,
        disk,
        capacity,
        tls,
        "",
    )
}

/// [`node_toml`] with `extra` lines before the pool's disk: top-level keys
/// (`nbd_listen`), then optionally a `[pool]` table (`on_full`, `auto_grow`).
#[allow(clippy::too_many_arguments)]
pub fn node_toml_with(
    name: &str,
    port: u16,
    coordinator_url: &str,
    data_dir: &Path,
    disk: &Path,
    capacity: &str,
    tls: &TlsFiles,
    extra: &str,
) -> String {
    format!(
        "name = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\ncoordinator = \"{coordinator_url}\"\n\
         data_dir = {}\nheartbeat_interval = \"1s\"\n{extra}\n\n[[pool.disks]]\npath = {}\n\
         capacity = \"{capacity}\"\n\n{}",
        toml_path(data_dir),
        toml_path(disk),
        tls_table(tls)
    )
}

/// `agent.toml`: each source a volume image file, fingerprint tracker, 64 KiB blocks,
/// hourly syncs (so only the tests' `sync` commands run syncs).
pub fn agent_toml(
    name: &str,
    coordinator_url: &str,
    state_dir: &Path,
    sources: &[(&str, &Path)],
    sync_interval: &str,
    tls: &TlsFiles,
) -> String {
    let with: Vec<(&str, &Path, &str)> = sources.iter().map(|(s, p)| (*s, *p, "")).collect();
    agent_toml_with(name, coordinator_url, state_dir, &with, sync_interval, tls)
}

/// [`agent_toml`] with extra lines per source; when they set `tracker`, the default
/// `fingerprint` line is left out.
pub fn agent_toml_with(
    name: &str,
    coordinator_url: &str,
    state_dir: &Path,
    sources: &[(&str, &Path, &str)],
    sync_interval: &str,
    tls: &TlsFiles,
) -> String {
    let mut s = format!(
        "name = \"{name}\"\ncoordinator = \"{coordinator_url}\"\nstate_dir = {}\n\n",
        toml_path(state_dir)
    );
    for (source, path, extra) in sources {
        if extra.contains("kind = \"log\"") {
            // A log source: a directory; its extra lines say the rest (glob, group).
            s.push_str(&format!(
                "[[sources]]\nname = \"{source}\"\npath = {}\nsync_interval = \"{sync_interval}\"\n{extra}\n\n",
                toml_path(path)
            ));
            continue;
        }
        let tracker = if extra.contains("tracker") {
            ""
        } else {
            "tracker = \"fingerprint\"\n"
        };
        s.push_str(&format!(
            "[[sources]]\nname = \"{source}\"\nkind = \"volume\"\npath = {}\n\
             {tracker}block_size = \"64KiB\"\nsync_interval = \"{sync_interval}\"\n{extra}\n\n",
            toml_path(path)
        ));
    }
    s.push_str(&tls_table(tls));
    s
}

fn write_file(path: &Path, text: &str) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// What fleet to make.
#[derive(Debug, Clone)]
pub struct FleetBuilder {
    nodes: Vec<String>,
    node_capacity: String,
    /// Capacities of single nodes, over `node_capacity`.
    node_capacities: HashMap<String, String>,
    /// Extra lines of every node's config (see [`node_toml_with`]).
    node_extra: String,
    /// Extra top-level lines of the coordinator's config.
    coordinator_extra: String,
    /// Turn on token enrollment (the coordinator gets the CA key and an
    /// enrollment listener, and so also signs the revocation list's CRL).
    enrollment: bool,
    /// Nodes and agents renew their certificates at every start (see
    /// [`FleetBuilder::renew_at_start`]).
    renew_at_start: bool,
    /// `sync_interval` of every data source (default `1h`: tests sync on command).
    sync_interval: String,
    /// Per agent: its sources as (name, size, an existing volume to use instead of a
    /// new random file).
    agents: Vec<(String, Vec<PlannedSource>)>,
    /// The coordinator addresses nodes, agents and the CLI are given, `{coordinator}`
    /// standing for the fleet's own (see [`FleetBuilder::coordinator_list`]).
    coordinator_list: Option<Vec<String>>,
}

impl Default for FleetBuilder {
    fn default() -> Self {
        FleetBuilder {
            nodes: Vec::new(),
            node_capacity: "100GiB".into(),
            node_capacities: HashMap::new(),
            node_extra: String::new(),
            coordinator_extra: String::new(),
            enrollment: false,
            renew_at_start: false,
            sync_interval: "1h".into(),
            agents: Vec::new(),
            coordinator_list: None,
        }
    }
}

/// A source to be set up: name, size, an existing volume to use instead of a new
/// random file, and extra lines of its `[[sources]]` table.
type PlannedSource = (String, u64, Option<PathBuf>, String);

impl FleetBuilder {
    /// Adds a storage node (one pool disk, `disk1`).
    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(name.to_string());
        self
    }

    /// Adds a storage node whose disk has its own capacity.
    pub fn node_sized(mut self, name: &str, capacity: &str) -> Self {
        self.node_capacities
            .insert(name.to_string(), capacity.to_string());
        self.node(name)
    }

    /// The `sync_interval` of every data source (default `1h`).
    pub fn sync_interval(mut self, interval: &str) -> Self {
        self.sync_interval = interval.to_string();
        self
    }

    /// Extra top-level lines of the coordinator's config (`scrub_interval`).
    pub fn coordinator_extra(mut self, extra: &str) -> Self {
        self.coordinator_extra = extra.to_string();
        self
    }

    /// The coordinator addresses every node and agent (`coordinators = [...]`) and
    /// the CLI (`--coordinator a,b`) are given, in this order; `{coordinator}` stands
    /// for the fleet's own coordinator, the others are extra addresses (a free port
    /// nothing listens on, say). Default: the fleet's coordinator alone, written as
    /// `coordinator = "..."`.
    pub fn coordinator_list(mut self, list: &[&str]) -> Self {
        self.coordinator_list = Some(list.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Turns on token enrollment: `[enrollment]` with the CA key and a listener
    /// on a free port ([`Fleet::enrollment_url`]); the coordinator then also signs
    /// the revocation list as a CRL.
    pub fn enrollment(mut self) -> Self {
        self.enrollment = true;
        self
    }

    /// Nodes and agents renew their certificates at every start: their `[tls]`
    /// has a `renew_before` longer than any certificate's life (and the coordinator
    /// signs renewals, so this turns on [`FleetBuilder::enrollment`]).
    pub fn renew_at_start(mut self) -> Self {
        self.renew_at_start = true;
        self.enrollment()
    }

    /// `tls` as issued, with the renewal rule of [`FleetBuilder::renew_at_start`].
    fn renewing(&self, mut tls: TlsFiles) -> TlsFiles {
        if self.renew_at_start {
            tls.renew_before = Some(bulwark_common::config::HumanDuration(
                std::time::Duration::from_secs(400 * 86_400),
            ));
        }
        tls
    }

    /// Extra lines of every node's config: top-level keys, then optionally a
    /// `[pool]` table.
    pub fn node_extra(mut self, extra: &str) -> Self {
        self.node_extra = extra.to_string();
        self
    }

    /// The capacity of every node's disk (default `100GiB`).
    pub fn node_capacity(mut self, capacity: &str) -> Self {
        self.node_capacity = capacity.to_string();
        self
    }

    /// Adds a volume data source `source` of `size_bytes` random bytes to agent
    /// `agent` (adding the agent if it is new).
    pub fn agent(self, agent: &str, source: &str, size_bytes: u64) -> Self {
        self.add_source(agent, (source.to_string(), size_bytes, None, String::new()))
    }

    /// Adds a data source with extra lines in its `[[sources]]` table (a tracker and
    /// its keys, quiesce hooks); `path` is an existing volume, or `None` for a new
    /// random file of `size_bytes`. `{root}` in `extra` becomes the fleet's directory.
    pub fn agent_source(
        self,
        agent: &str,
        source: &str,
        path: Option<&Path>,
        size_bytes: u64,
        extra: &str,
    ) -> Self {
        self.add_source(
            agent,
            (
                source.to_string(),
                size_bytes,
                path.map(Path::to_path_buf),
                extra.to_string(),
            ),
        )
    }

    /// Adds a log data source: the existing directory `dir`, with extra lines in its
    /// `[[sources]]` table (`glob`, `group`).
    pub fn agent_log(self, agent: &str, source: &str, dir: &Path, extra: &str) -> Self {
        self.add_source(
            agent,
            (
                source.to_string(),
                0,
                Some(dir.to_path_buf()),
                format!("kind = \"log\"\n{extra}"),
            ),
        )
    }

    /// Adds a data source whose volume already exists (a block device, say) of
    /// `size_bytes` to agent `agent`. Its content is the test's business.
    pub fn agent_volume(self, agent: &str, source: &str, path: &Path, size_bytes: u64) -> Self {
        self.add_source(
            agent,
            (
                source.to_string(),
                size_bytes,
                Some(path.to_path_buf()),
                String::new(),
            ),
        )
    }

    fn add_source(mut self, agent: &str, entry: PlannedSource) -> Self {
        match self.agents.iter_mut().find(|(a, _)| a == agent) {
            Some((_, sources)) => sources.push(entry),
            None => self.agents.push((agent.to_string(), vec![entry])),
        }
        self
    }

    /// Makes the directory, CA, certificates, configs and volumes; starts nothing.
    pub fn build(self) -> Fleet {
        let tmp = tempfile::Builder::new()
            .prefix("bulwark-e2e-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let root = tmp.path().to_path_buf();
        eprintln!("bulwark fleet in {}", root.display());
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs).expect("cannot create logs/");
        std::fs::create_dir_all(root.join("scratch")).expect("cannot create scratch/");

        let pki = Pki::init(&root.join("pki"));
        let admin = pki.issue("admin", "admin");

        let cport = free_port();
        let coordinator_url = format!("https://127.0.0.1:{cport}");
        let ctls = pki.issue("coordinator", "coordinator");
        let cdir = root.join("coordinator");
        let cconfig = cdir.join("coordinator.toml");
        let mut ctoml =
            coordinator_toml_with(cport, &cdir.join("data"), &ctls, &self.coordinator_extra);
        let enrollment_url = self.enrollment.then(|| {
            let port = free_port();
            ctoml.push_str(&format!(
                "\n[enrollment]\nlisten = \"127.0.0.1:{port}\"\nca_key = {}\n",
                toml_path(&pki.dir().join("ca.key"))
            ));
            format!("https://127.0.0.1:{port}")
        });
        write_file(&cconfig, &ctoml);
        let coordinator = Daemon::new(
            "coordinator",
            bins::bin(COORDINATOR),
            cconfig,
            logs.join("coordinator.log"),
            Some(cport),
        );

        let list: Vec<String> = match &self.coordinator_list {
            Some(l) => l
                .iter()
                .map(|a| a.replace("{coordinator}", &coordinator_url))
                .collect(),
            None => vec![coordinator_url.clone()],
        };
        // A list of several replaces the one `coordinator = ` line the configs have.
        let with_list = |text: String| {
            if list.len() == 1 {
                return text;
            }
            let quoted: Vec<String> = list.iter().map(|a| format!("\"{a}\"")).collect();
            text.replacen(
                &format!("coordinator = \"{coordinator_url}\"\n"),
                &format!("coordinators = [{}]\n", quoted.join(", ")),
                1,
            )
        };
        let mut nodes = Vec::new();
        for name in &self.nodes {
            let port = free_port();
            let tls = self.renewing(pki.issue("node", name));
            let dir = root.join(name);
            let config = dir.join("node.toml");
            let disk = dir.join("disk1");
            std::fs::create_dir_all(&disk).expect("cannot create the node's disk");
            write_file(
                &config,
                &with_list(node_toml_with(
                    name,
                    port,
                    &coordinator_url,
                    &dir,
                    &disk,
                    self.node_capacities
                        .get(name)
                        .unwrap_or(&self.node_capacity),
                    &tls,
                    &self.node_extra,
                )),
            );
            nodes.push(Daemon::new(
                name,
                bins::bin(NODE),
                config,
                logs.join(format!("{name}.log")),
                Some(port),
            ));
        }

        let mut agents = Vec::new();
        let mut sources = Vec::new();
        for (name, srcs) in &self.agents {
            let tls = self.renewing(pki.issue("agent", name));
            let dir = root.join(name);
            let state = dir.join("state");
            std::fs::create_dir_all(&state).expect("cannot create the agent's state dir");
            let mut list = Vec::new();
            for (source, size, existing, extra) in srcs {
                assert!(
                    !sources.iter().any(|s: &SourceEntry| &s.name == source),
                    "source {source} is listed twice"
                );
                let path = match existing {
                    Some(p) => p.clone(),
                    None => {
                        let path = dir.join(format!("{source}.img"));
                        crate::files::write_random_file(&path, *size);
                        path
                    }
                };
                sources.push(SourceEntry {
                    name: source.clone(),
                    agent: name.clone(),
                    path: path.clone(),
                    size: *size,
                });
                let extra = extra.replace("{root}", &root.display().to_string());
                list.push((source.clone(), path, extra));
            }
            let refs: Vec<(&str, &Path, &str)> = list
                .iter()
                .map(|(s, p, e)| (s.as_str(), p.as_path(), e.as_str()))
                .collect();
            let config = dir.join("agent.toml");
            write_file(
                &config,
                &with_list(agent_toml_with(
                    name,
                    &coordinator_url,
                    &state,
                    &refs,
                    &self.sync_interval,
                    &tls,
                )),
            );
            agents.push(Daemon::new(
                name,
                bins::bin(AGENT),
                config,
                logs.join(format!("{name}.log")),
                None,
            ));
        }

        Fleet {
            tmp: Some(tmp),
            cli_log: logs.join("cli.log"),
            root,
            pki,
            admin,
            cli_coordinators: list.join(","),
            coordinator_url,
            enrollment_url,
            coordinator,
            nodes,
            agents,
            sources,
        }
    }

    /// [`FleetBuilder::build`], then starts the coordinator, the nodes and the agents,
    /// each group once the previous one is ready.
    pub fn start(self) -> Fleet {
        let mut fleet = self.build();
        fleet.start_all();
        fleet
    }
}

#[derive(Debug, Clone)]
struct SourceEntry {
    name: String,
    agent: String,
    path: PathBuf,
    size: u64,
}

/// A running (or stoppable) fleet. Dropping it SIGKILLs every daemon; if the thread
/// is panicking it prints the end of every log and keeps the directory.
pub struct Fleet {
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    pki: Pki,
    admin: TlsFiles,
    /// What the CLI gets as `--coordinator` (the fleet's list, comma-separated).
    cli_coordinators: String,
    coordinator_url: String,
    enrollment_url: Option<String>,
    coordinator: Daemon,
    nodes: Vec<Daemon>,
    agents: Vec<Daemon>,
    sources: Vec<SourceEntry>,
    cli_log: PathBuf,
}

impl Fleet {
    /// A builder.
    pub fn builder() -> FleetBuilder {
        FleetBuilder::default()
    }

    // ----- paths and identities -------------------------------------------------

    /// The fleet's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The fleet CA.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The admin certificate the CLI uses.
    pub fn admin(&self) -> &TlsFiles {
        &self.admin
    }

    /// The certificate files of a fleet member (`coordinator`, a node, an agent,
    /// `admin`).
    pub fn identity(&self, name: &str) -> TlsFiles {
        self.pki.files(name)
    }

    /// `https://127.0.0.1:PORT` of the coordinator.
    pub fn coordinator_url(&self) -> &str {
        &self.coordinator_url
    }

    /// `https://127.0.0.1:PORT` of the coordinator's enrollment listener; panics
    /// unless the fleet was built with [`FleetBuilder::enrollment`].
    pub fn enrollment_url(&self) -> &str {
        self.enrollment_url
            .as_deref()
            .expect("the fleet was built without .enrollment()")
    }

    /// The coordinator's data directory (its sled registry, `crl.der`, `crl.pem`).
    pub fn coordinator_data_dir(&self) -> PathBuf {
        self.root.join("coordinator").join("data")
    }

    /// The coordinator's port.
    pub fn coordinator_port(&self) -> u16 {
        self.coordinator.port().expect("the coordinator listens")
    }

    /// The volume image of a data source.
    pub fn volume(&self, source: &str) -> PathBuf {
        self.source_entry(source).path.clone()
    }

    /// The configured size of a data source.
    pub fn volume_size(&self, source: &str) -> u64 {
        self.source_entry(source).size
    }

    /// The agent that protects `source`.
    pub fn source_agent(&self, source: &str) -> String {
        self.source_entry(source).agent.clone()
    }

    fn source_entry(&self, source: &str) -> &SourceEntry {
        self.sources
            .iter()
            .find(|s| s.name == source)
            .unwrap_or_else(|| panic!("the fleet has no source {source}"))
    }

    /// The names of every data source, in the order they were added.
    pub fn source_names(&self) -> Vec<String> {
        self.sources.iter().map(|s| s.name.clone()).collect()
    }

    /// A node's directory (its `data_dir`).
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join(node)
    }

    /// Where a node keeps a data source's replica: `<node>/disk1/bulwark/<source>/`.
    pub fn node_source_dir(&self, node: &str, source: &str) -> PathBuf {
        self.node_dir(node)
            .join("disk1")
            .join("bulwark")
            .join(source)
    }

    /// A path under `scratch/` (not created).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.root.join("scratch").join(name)
    }

    /// Copies a source's volume to `scratch/<name>` and returns that path.
    pub fn save_volume(&self, source: &str, name: &str) -> PathBuf {
        let to = self.scratch(name);
        std::fs::copy(self.volume(source), &to).unwrap_or_else(|e| {
            panic!(
                "cannot copy the volume of {source} to {}: {e}",
                to.display()
            )
        });
        to
    }

    // ----- processes --------------------------------------------------------------

    /// The coordinator process.
    pub fn coordinator(&mut self) -> &mut Daemon {
        &mut self.coordinator
    }

    /// A node process.
    pub fn node(&mut self, name: &str) -> &mut Daemon {
        self.nodes
            .iter_mut()
            .find(|d| d.name() == name)
            .unwrap_or_else(|| panic!("the fleet has no node {name}"))
    }

    /// An agent process.
    pub fn agent(&mut self, name: &str) -> &mut Daemon {
        self.agents
            .iter_mut()
            .find(|d| d.name() == name)
            .unwrap_or_else(|| panic!("the fleet has no agent {name}"))
    }

    /// Names of the nodes.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|d| d.name().to_string()).collect()
    }

    /// Names of the agents.
    pub fn agent_names(&self) -> Vec<String> {
        self.agents.iter().map(|d| d.name().to_string()).collect()
    }

    fn all_daemons(&mut self) -> impl Iterator<Item = &mut Daemon> {
        std::iter::once(&mut self.coordinator)
            .chain(self.nodes.iter_mut())
            .chain(self.agents.iter_mut())
    }

    /// Panics (with the end of its log) if a started daemon has exited.
    pub fn assert_all_alive(&mut self) {
        for d in self.all_daemons() {
            d.assert_alive();
        }
    }

    /// Stops the coordinator and starts it again listening on `port` (its data kept),
    /// then waits until it answers and the running nodes and agents are back: with a
    /// [`FleetBuilder::coordinator_list`] holding both addresses they find it there.
    pub fn move_coordinator(&mut self, port: u16) {
        let old = self.coordinator_port();
        self.coordinator.stop();
        let config = self.coordinator.config_path().to_path_buf();
        let text = std::fs::read_to_string(&config).expect("read coordinator.toml");
        let from = format!("listen = \"127.0.0.1:{old}\"\n");
        assert!(text.contains(&from), "coordinator.toml has no {from:?}");
        write_file(
            &config,
            &text.replacen(&from, &format!("listen = \"127.0.0.1:{port}\"\n"), 1),
        );
        self.coordinator.set_port(Some(port));
        self.coordinator_url = format!("https://127.0.0.1:{port}");
        self.coordinator.start();
        self.wait_ready();
    }

    /// Starts the coordinator and waits until it answers; then the nodes, waiting until
    /// they are up; then the agents, waiting until they are connected and their sources
    /// are assigned.
    pub fn start_all(&mut self) {
        self.coordinator.start();
        self.wait_coordinator();
        for n in &mut self.nodes {
            n.start();
        }
        let nodes = self.node_names();
        self.wait_nodes_up(&nodes);
        for a in &mut self.agents {
            a.start();
        }
        let agents = self.agent_names();
        self.wait_agents_connected(&agents);
    }

    /// SIGTERMs every running daemon, agents first, then nodes, then the coordinator;
    /// returns each one's exit status.
    pub fn stop_all(&mut self) -> Vec<(String, ExitStatus)> {
        let mut out = Vec::new();
        for d in self
            .agents
            .iter_mut()
            .chain(self.nodes.iter_mut())
            .chain(std::iter::once(&mut self.coordinator))
        {
            if d.pid().is_some() {
                let status = d.stop();
                out.push((d.name().to_string(), status));
            }
        }
        out
    }

    /// Waits until the coordinator answers `nodes --json`.
    pub fn wait_coordinator(&mut self) {
        poll(
            "the coordinator to answer `bulwark nodes --json`",
            READY_TIMEOUT,
            || {
                self.assert_all_alive();
                self.cli_json_try(&["nodes", "--json"]).map(|_| ())
            },
        );
    }

    /// Whether the node on `port` completes a TLS and HTTP/2 handshake with the admin
    /// certificate (a bare TCP probe would be logged as a refused TLS connection).
    pub fn node_tls_ready(&self, port: u16) -> Result<(), String> {
        let url = format!("https://127.0.0.1:{port}");
        crate::block_on(async {
            tokio::time::timeout(
                Duration::from_secs(5),
                crate::grpc::channel(&url, &self.admin, Role::Node),
            )
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map(|_| ())
        })
    }

    /// Waits until every node in `names` completes a TLS handshake on its port and
    /// `nodes --json` shows it `up`.
    pub fn wait_nodes_up(&mut self, names: &[String]) {
        let ports: Vec<(String, u16)> = names
            .iter()
            .map(|n| (n.clone(), self.node(n).port().expect("nodes listen")))
            .collect();
        poll(&format!("nodes {names:?} to be up"), READY_TIMEOUT, || {
            self.assert_all_alive();
            for (name, port) in &ports {
                self.node_tls_ready(*port)
                    .map_err(|e| format!("{name} does not accept connections yet: {e}"))?;
            }
            let nodes = self.cli_json_try(&["nodes", "--json"])?;
            let list = nodes
                .as_array()
                .ok_or(format!("`nodes --json` is not an array: {nodes}"))?;
            for (name, _) in &ports {
                let state = list
                    .iter()
                    .find(|n| n.get("name").and_then(Value::as_str) == Some(name))
                    .and_then(|n| n.get("state"))
                    .and_then(Value::as_str);
                if state != Some("up") {
                    return Err(format!("{name} is {state:?} in {nodes}"));
                }
            }
            Ok(())
        });
    }

    /// Waits until every agent in `names` is connected and each of its sources is
    /// assigned to a node.
    pub fn wait_agents_connected(&mut self, names: &[String]) {
        let sources: Vec<String> = self
            .sources
            .iter()
            .filter(|s| names.contains(&s.agent))
            .map(|s| s.name.clone())
            .collect();
        poll(
            &format!("agents {names:?} to be connected and {sources:?} assigned"),
            READY_TIMEOUT,
            || {
                self.assert_all_alive();
                let agents = self.cli_json_try(&["agents", "--json"])?;
                let list = agents
                    .as_array()
                    .ok_or(format!("`agents --json` is not an array: {agents}"))?;
                for name in names {
                    let connected = list
                        .iter()
                        .find(|a| a.get("name").and_then(Value::as_str) == Some(name))
                        .and_then(|a| a.get("connected"))
                        .and_then(Value::as_bool);
                    if connected != Some(true) {
                        return Err(format!("{name} is not connected in {agents}"));
                    }
                }
                let all = self.cli_json_try(&["sources", "--json"])?;
                let list = all
                    .as_array()
                    .ok_or(format!("`sources --json` is not an array: {all}"))?;
                for s in &sources {
                    let node = list
                        .iter()
                        .find(|x| x.get("name").and_then(Value::as_str) == Some(s))
                        .and_then(|x| x.get("node"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if node.is_empty() {
                        return Err(format!("{s} is not assigned to a node in {all}"));
                    }
                }
                Ok(())
            },
        );
    }

    /// Waits until everything that is running is ready (coordinator answering, nodes
    /// up, agents connected).
    pub fn wait_ready(&mut self) {
        if self.coordinator.pid().is_some() {
            self.wait_coordinator();
        }
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .filter(|d| d.pid().is_some())
            .map(|d| d.name().to_string())
            .collect();
        self.wait_nodes_up(&nodes);
        let agents: Vec<String> = self
            .agents
            .iter()
            .filter(|d| d.pid().is_some())
            .map(|d| d.name().to_string())
            .collect();
        self.wait_agents_connected(&agents);
    }

    // ----- the CLI ------------------------------------------------------------------

    /// The CLI command with connection flags for `id`, followed by `args`.
    pub fn cli_command(&self, id: &TlsFiles, args: &[&str]) -> Command {
        let mut cmd = Command::new(bins::bin(CLI));
        scrub_env(&mut cmd);
        cmd.arg("--coordinator")
            .arg(&self.cli_coordinators)
            .arg("--ca")
            .arg(&id.ca)
            .arg("--cert")
            .arg(&id.cert)
            .arg("--key")
            .arg(&id.key)
            .args(args);
        cmd
    }

    fn log_cli(&self, described: &str, out: &Output) {
        let cut = |b: &[u8]| {
            let s = String::from_utf8_lossy(b);
            if s.len() > 4000 {
                let mut end = 4000;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                format!("{}... ({} bytes)", &s[..end], s.len())
            } else {
                s.into_owned()
            }
        };
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.cli_log)
        {
            let _ = writeln!(
                f,
                "$ {described}\n-> {}\nstdout: {}\nstderr: {}\n",
                out.status,
                cut(&out.stdout).trim_end(),
                cut(&out.stderr).trim_end()
            );
        }
    }

    /// Runs the CLI as `id` and returns its output, whatever the exit code.
    pub fn cli_as(&self, id: &TlsFiles, args: &[&str]) -> Output {
        let cmd = self.cli_command(id, args);
        let described = describe(&cmd);
        let out = run(cmd, CLI_TIMEOUT);
        self.log_cli(&described, &out);
        out
    }

    /// Runs the CLI as admin; panics with the command, exit code, stdout and stderr
    /// unless it exits 0.
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = self.cli_as(&self.admin, args);
        if !out.status.success() {
            let described = describe(&self.cli_command(&self.admin, args));
            panic!("CLI command failed\n{}", show_output(&described, &out));
        }
        out
    }

    /// Restores every point of `source` in `expected` (id, saved volume) and
    /// compares it with the saved volume, byte for byte; `tag` names the moment.
    pub fn restore_points(&self, source: &str, expected: &[(u64, &Path)], tag: &str) {
        for (id, image) in expected {
            let to = self.scratch(&format!("{tag}-restore-{id}.img"));
            self.restore(source, Some(*id), &to, None);
            crate::files::assert_same_file(&to, image, &format!("{tag}: point {id}"));
            std::fs::remove_file(&to).expect("remove the restored file");
        }
    }

    /// The open alert with `key` (`bulwark alerts --json`), if there is one.
    pub fn open_alert(&self, key: &str) -> Option<Value> {
        self.cli_json(&["alerts", "--json"])
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|x| x.get("key").and_then(Value::as_str) == Some(key))
                    .cloned()
            })
    }

    /// Runs the CLI as admin and parses its stdout as JSON; panics on failure.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            let described = describe(&self.cli_command(&self.admin, args));
            panic!(
                "CLI output is not JSON ({e})\n{}",
                show_output(&described, &out)
            )
        })
    }

    /// Like [`Fleet::cli_json`] but returns failures as `Err` (for polling).
    pub fn cli_json_try(&self, args: &[&str]) -> Result<Value, String> {
        let out = self.cli_as(&self.admin, args);
        if !out.status.success() {
            return Err(format!(
                "`bulwark {}` exited {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "`bulwark {}` printed no JSON ({e}): {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs the CLI as admin, expecting it to fail; returns the exit code and stderr.
    pub fn cli_expect_fail(&self, args: &[&str]) -> (i32, String) {
        self.cli_expect_fail_as(&self.admin.clone(), args)
    }

    /// Runs the CLI as `id`, expecting it to fail; returns the exit code and stderr.
    /// Panics if it succeeds or is killed by a signal.
    pub fn cli_expect_fail_as(&self, id: &TlsFiles, args: &[&str]) -> (i32, String) {
        let out = self.cli_as(id, args);
        let described = describe(&self.cli_command(id, args));
        match out.status.code() {
            Some(0) => panic!(
                "CLI command succeeded but was expected to fail\n{}",
                show_output(&described, &out)
            ),
            Some(code) => (code, String::from_utf8_lossy(&out.stderr).into_owned()),
            None => panic!(
                "CLI command was killed by a signal\n{}",
                show_output(&described, &out)
            ),
        }
    }

    /// Starts the CLI as admin in the background.
    pub fn cli_spawn(&self, args: &[&str]) -> Background {
        Background::spawn(self.cli_command(&self.admin, args))
    }

    // ----- typed shortcuts over the CLI ------------------------------------------------

    /// `nodes --json`.
    pub fn nodes(&self) -> Vec<Value> {
        as_array(self.cli_json(&["nodes", "--json"]), "nodes --json")
    }

    /// `agents --json`.
    pub fn agents(&self) -> Vec<Value> {
        as_array(self.cli_json(&["agents", "--json"]), "agents --json")
    }

    /// `sources --json`.
    pub fn sources(&self) -> Vec<Value> {
        as_array(self.cli_json(&["sources", "--json"]), "sources --json")
    }

    /// The `sources --json` entry of one source.
    pub fn source_info(&self, source: &str) -> Value {
        let all = self.sources();
        all.iter()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(source))
            .cloned()
            .unwrap_or_else(|| panic!("`sources --json` has no {source}: {all:?}"))
    }

    /// The `nodes --json` entry of one node.
    pub fn node_info(&self, node: &str) -> Value {
        let all = self.nodes();
        all.iter()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(node))
            .cloned()
            .unwrap_or_else(|| panic!("`nodes --json` has no {node}: {all:?}"))
    }

    /// The node that holds `source` (from `sources --json`).
    pub fn source_node(&self, source: &str) -> String {
        json_str(&self.source_info(source), "node")
    }

    /// The address agents dial for `node` (from `nodes --json`).
    pub fn node_address(&self, node: &str) -> String {
        json_str(&self.node_info(node), "address")
    }

    /// `sync SOURCE --wait --json`.
    pub fn sync(&self, source: &str) -> Value {
        let v = self.cli_json(&["sync", source, "--wait", "--json"]);
        assert!(
            v.is_object(),
            "`sync {source} --wait --json` printed {v}, not an object"
        );
        v
    }

    /// `points SOURCE --json`, oldest first.
    pub fn points(&self, source: &str) -> Vec<Value> {
        as_array(
            self.cli_json(&["points", source, "--json"]),
            &format!("points {source} --json"),
        )
    }

    /// The ids of `points SOURCE --json`, oldest first.
    pub fn point_ids(&self, source: &str) -> Vec<u64> {
        self.points(source)
            .iter()
            .map(|p| json_u64(p, "id"))
            .collect()
    }

    /// `restore SOURCE [--point ID] --to PATH [--agent NAME] --wait --json`; checks
    /// that it reports the point and path asked for.
    pub fn restore(
        &self,
        source: &str,
        point: Option<u64>,
        to: &Path,
        agent: Option<&str>,
    ) -> Value {
        let to_s = to.to_string_lossy().into_owned();
        let point_s = point.map(|p| p.to_string());
        let mut args = vec!["restore", source];
        if let Some(p) = &point_s {
            args.extend(["--point", p]);
        }
        args.extend(["--to", &to_s]);
        if let Some(a) = agent {
            args.extend(["--agent", a]);
        }
        args.extend(["--wait", "--json"]);
        let v = self.cli_json(&args);
        if let Some(p) = point {
            assert_eq!(
                json_u64(&v, "point"),
                p,
                "restore reported another point: {v}"
            );
        }
        assert!(
            to.exists(),
            "restore reported {v} but {} does not exist",
            to.display()
        );
        v
    }

    /// Prints the end of every log to stderr.
    pub fn dump_logs(&self) {
        eprintln!("===== bulwark fleet in {} =====", self.root.display());
        let mut paths: Vec<PathBuf> = std::iter::once(&self.coordinator)
            .chain(self.nodes.iter())
            .chain(self.agents.iter())
            .map(|d| d.log_path().to_path_buf())
            .collect();
        paths.push(self.cli_log.clone());
        for p in paths {
            eprintln!(
                "----- last {TAIL_LINES} lines of {} -----\n{}",
                p.display(),
                tail(&p, TAIL_LINES)
            );
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for d in self.all_daemons() {
            d.kill_quietly();
        }
        let panicking = std::thread::panicking();
        if panicking {
            self.dump_logs();
        }
        if (panicking || std::env::var_os(KEEP_ENV).is_some())
            && let Some(tmp) = self.tmp.take()
        {
            let kept = tmp.keep();
            eprintln!("kept the fleet directory {}", kept.display());
        }
    }
}

fn as_array(v: Value, what: &str) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        other => panic!("`bulwark {what}` printed {other}, not an array"),
    }
}

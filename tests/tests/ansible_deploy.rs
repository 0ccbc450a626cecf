//! The Ansible roles of deploy/ansible deploy a working fleet.
//!
//! `ansible-playbook site.yml` installs a coordinator, two storage nodes and an agent
//! for localhost (`ansible_connection: local`) into a scratch root
//! (`-e bulwark_root=...`): binaries, certificates, configs rendered from inventory
//! variables, systemd units. systemd is not PID 1 here, so the test starts each
//! daemon from the `ExecStart=`, `User=` and `Environment=` lines of its rendered unit
//! (the coordinator and the nodes as the `bulwark` user the roles created, which
//! proves the directory and key permissions are enough), syncs a volume, restores it
//! and compares the bytes. Then it checks that a second run changes nothing, that the
//! rendered units match deploy/systemd/ (and pass `systemd-analyze verify` where it
//! exists), and that `ansible-lint` passes.
//!
//! Needs root and `ansible-playbook` (found through `BULWARK_ANSIBLE_BIN`, then the CI
//! venv /opt/bulwark-ci-venv/bin, then PATH); without them it skips, saying which is
//! missing (`BULWARK-SKIP`).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::bins::{self, CLI};
use bulwark_tests::process::{describe, run, scrub_env, show_output, tail};
use bulwark_tests::{
    MIB, Pki, TlsFiles, Value, assert_same_file, free_port, json_str, json_u64, poll,
    write_random_file,
};

/// A directory holding `ansible-playbook` (and usually `ansible-lint`).
const ANSIBLE_BIN_ENV: &str = "BULWARK_ANSIBLE_BIN";
/// Where .ci/run installs ansible-core and ansible-lint.
const CI_VENV_BIN: &str = "/opt/bulwark-ci-venv/bin";
const SOURCE: &str = "host-1-data";
const SIZE: u64 = 16 * MIB;
const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(300);
const CLI_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `name` in the directory of `BULWARK_ANSIBLE_BIN`, the CI venv, or PATH.
fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os(ANSIBLE_BIN_ENV) {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from(CI_VENV_BIN));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// uid and gid of a local user, from /etc/passwd.
fn lookup_user(name: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == name)
        .map(|f| {
            (
                f[2].parse().expect("numeric uid"),
                f[3].parse().expect("numeric gid"),
            )
        })
        .unwrap_or_else(|| panic!("no user {name} in /etc/passwd after the playbook ran"))
}

/// The deploy/ansible directory of this checkout.
fn ansible_dir() -> PathBuf {
    bins::workspace_root().join("deploy").join("ansible")
}

/// Environment for ansible-playbook and ansible-lint: no colours, temporary files in
/// the test's directory, the tools' own directory first on PATH.
fn ansible_command(tool: &Path, scratch: &Path) -> Command {
    let mut cmd = Command::new(tool);
    scrub_env(&mut cmd);
    let bin_dir = tool.parent().expect("a tool has a directory");
    let mut path = vec![bin_dir.to_path_buf()];
    if let Some(p) = std::env::var_os("PATH") {
        path.extend(std::env::split_paths(&p));
    }
    let ansible = scratch.join("ansible");
    cmd.current_dir(ansible_dir())
        .env("PATH", std::env::join_paths(path).expect("PATH"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .env("ANSIBLE_PIPELINING", "1")
        .env("ANSIBLE_HOME", ansible.join("home"))
        .env("ANSIBLE_LOCAL_TEMP", ansible.join("local"))
        .env("ANSIBLE_REMOTE_TEMP", ansible.join("remote"))
        .env("XDG_CACHE_HOME", ansible.join("cache"))
        .env_remove("ANSIBLE_CONFIG");
    cmd
}

/// Copies the four binaries to `dir`: other cargo builds sharing the target directory
/// may replace them while the test runs, and the second run must see the same files.
fn snapshot_binaries(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create the binaries' directory");
    for b in [CLI, bins::COORDINATOR, bins::NODE, bins::AGENT] {
        std::fs::copy(bins::bin(b), dir.join(b))
            .unwrap_or_else(|e| panic!("cannot copy {b} to {}: {e}", dir.display()));
    }
}

/// Runs the playbook; returns its output (panics, showing it, unless it succeeds).
fn run_playbook(tool: &Path, scratch: &Path, inventory: &Path, root: &Path) -> Output {
    let mut cmd = ansible_command(tool, scratch);
    // One host at a time: every host of this inventory is this machine, and two
    // `useradd bulwark` at once would race for /etc/passwd.
    cmd.arg("-i")
        .arg(inventory)
        .arg("site.yml")
        .args(["--forks", "1"])
        .arg("-e")
        .arg(format!("bulwark_root={}", root.display()))
        .arg("-e")
        .arg(format!("bulwark_bin_dir={}", scratch.join("bin").display()));
    let described = describe(&cmd);
    let out = run(cmd, PLAYBOOK_TIMEOUT);
    assert!(
        out.status.success(),
        "ansible-playbook failed\n{}",
        show_output(&described, &out)
    );
    out
}

/// The PLAY RECAP of ansible-playbook's output: host -> (counter -> value).
fn play_recap(stdout: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut recap = BTreeMap::new();
    let Some(at) = stdout.find("PLAY RECAP") else {
        panic!("no PLAY RECAP in the playbook's output:\n{stdout}");
    };
    for line in stdout[at..].lines().skip(1) {
        let Some((host, counters)) = line.split_once(" : ") else {
            if line.trim().is_empty() {
                continue;
            }
            break;
        };
        let counts = counters
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| {
                let n = v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad recap counter {k}={v} in {line:?}"));
                (k.to_string(), n)
            })
            .collect();
        recap.insert(host.trim().to_string(), counts);
    }
    recap
}

/// Keeps the test's directory when the test fails, and says where it is.
struct KeepOnFailure(Option<tempfile::TempDir>);

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(tmp) = self.0.take()
        {
            eprintln!("kept the test directory {}", tmp.keep().display());
        }
    }
}

/// A daemon started from its rendered unit; SIGKILLed on drop.
struct Service {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Service {
    /// Starts what `ExecStart=` of `unit` says, as `User=`/`Group=` (root if unset),
    /// with its `Environment=`, output appended to `log`.
    fn start(name: &str, unit: &Path, log: PathBuf) -> Service {
        let text = std::fs::read_to_string(unit)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", unit.display()));
        let directive = |key: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix(&format!("{key}=")))
                .map(str::to_string)
                .collect()
        };
        let exec = directive("ExecStart");
        assert_eq!(
            exec.len(),
            1,
            "one ExecStart= in {}:\n{text}",
            unit.display()
        );
        let argv: Vec<&str> = exec[0].split_whitespace().collect();
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]);
        scrub_env(&mut cmd);
        cmd.env_remove("RUST_LOG");
        for env in directive("Environment") {
            let (k, v) = env
                .split_once('=')
                .unwrap_or_else(|| panic!("Environment={env} in {}", unit.display()));
            cmd.env(k, v);
        }
        if let Some(user) = directive("User").first() {
            let (uid, gid) = lookup_user(user);
            // std drops the supplementary groups when root sets a uid.
            cmd.uid(uid).gid(gid);
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = out.try_clone().expect("dup the log file");
        let described = describe(&cmd);
        let child = cmd
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {described}: {e}"));
        Service {
            name: name.to_string(),
            log,
            child: Some(child),
        }
    }

    fn assert_alive(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!(
                "{} exited ({status}); its log:\n{}",
                self.name,
                tail(&self.log, 60)
            );
        }
    }

    /// SIGTERM and wait (the units' KillSignal=); SIGKILL after 20 s.
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(term.success(), "kill -TERM {} failed", child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not stop within 20 s of SIGTERM; its log:\n{}",
                    self.name,
                    tail(&self.log, 60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- end of {} ({}) -----\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 60)
            );
        }
    }
}

/// The admin CLI against the deployed coordinator.
struct Admin {
    url: String,
    id: TlsFiles,
}

impl Admin {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bins::bin(CLI));
        scrub_env(&mut cmd);
        cmd.arg("--coordinator")
            .arg(&self.url)
            .arg("--ca")
            .arg(&self.id.ca)
            .arg("--cert")
            .arg(&self.id.cert)
            .arg("--key")
            .arg(&self.id.key)
            .args(args);
        cmd
    }

    fn json_try(&self, args: &[&str]) -> Result<Value, String> {
        let cmd = self.command(args);
        let described = describe(&cmd);
        let out = run(cmd, CLI_TIMEOUT);
        if !out.status.success() {
            return Err(show_output(&described, &out));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("not JSON ({e})\n{}", show_output(&described, &out)))
    }

    fn json(&self, args: &[&str]) -> Value {
        self.json_try(args).unwrap_or_else(|e| panic!("{e}"))
    }
}

fn find_named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?
        .iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
}

/// The non-comment, non-blank lines of a unit, with `root` taken out of paths.
fn unit_lines(text: &str, root: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.replace(root, ""))
        .collect()
}

#[test]
fn ansible_deploys_a_working_fleet_idempotently() {
    let Some(playbook) = find_tool("ansible-playbook") else {
        bulwark_tests::skip(
            "ansible",
            &format!(
                "ansible-playbook not found (set {ANSIBLE_BIN_ENV}, or install it in \
                 {CI_VENV_BIN} as .ci/run does, or put it on PATH)"
            ),
        );
        return;
    };
    if !bulwark_tests::have_root("the roles create the `bulwark` system user and chown to it") {
        return;
    }
    let started = Instant::now();

    let tmp = tempfile::Builder::new()
        .prefix("bulwark-ansible-")
        .tempdir()
        .expect("temporary directory");
    // The coordinator and the nodes run as `bulwark`: let them reach the scratch root.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the scratch directory");
    let scratch = tmp.path().to_path_buf();
    let _keep = KeepOnFailure(Some(tmp));
    snapshot_binaries(&scratch.join("bin"));
    let root = scratch.join("root");
    let logs = scratch.join("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");

    // The fleet PKI, on the "controller".
    let pki = Pki::init(&scratch.join("pki"));
    pki.issue("coordinator", "coordinator");
    pki.issue("node", "node-1");
    pki.issue("node", "node-2");
    pki.issue("agent", "host-1");
    let admin = pki.issue("admin", "admin");

    let volume = scratch.join("volumes").join(format!("{SOURCE}.img"));
    write_random_file(&volume, SIZE);

    let (coordinator_port, node1_port, node2_port) = (free_port(), free_port(), free_port());
    let coordinator_url = format!("https://127.0.0.1:{coordinator_port}");
    // JSON is YAML: the inventory plugin reads it as inventory.yml.
    let inventory = serde_json::json!({
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                "bulwark_pki_dir": pki.dir(),
                "bulwark_fleet_coordinator": coordinator_url,
            },
            "children": {
                "bulwark_coordinators": { "hosts": { "coordinator": {
                    "bulwark_coordinator_listen": format!("127.0.0.1:{coordinator_port}"),
                    "bulwark_coordinator_scrub_interval": "0",
                    "bulwark_coordinator_max_syncs_per_node": 4,
                }}},
                "bulwark_nodes": {
                    "vars": { "bulwark_node_heartbeat_interval": "1s" },
                    "hosts": {
                        // The defaults of the role (data_dir, unit, config file) and the
                        // disks of deploy/systemd/bulwark-node.service.
                        "node-1": {
                            "bulwark_node_listen": format!("127.0.0.1:{node1_port}"),
                            "bulwark_node_disks": [
                                { "path": "/srv/bulwark/disk1", "capacity": "10GiB" },
                                { "path": "/srv/bulwark/disk2", "capacity": "5GiB" },
                            ],
                        },
                        // A second node on the same host: its own everything.
                        "node-2": {
                            "bulwark_node_listen": format!("127.0.0.1:{node2_port}"),
                            "bulwark_node_data_dir": "/var/lib/bulwark/node-2",
                            "bulwark_node_service_name": "bulwark-node-2",
                            "bulwark_node_config_file": "/etc/bulwark/node-2.toml",
                            "bulwark_node_disks": [
                                { "path": "/srv/bulwark/node-2/disk1", "capacity": "10GiB" },
                            ],
                        },
                    },
                },
                "bulwark_agents": { "hosts": { "host-1": {
                    "bulwark_agent_sources": [{
                        "name": SOURCE,
                        "kind": "volume",
                        "path": volume,
                        "tracker": "fingerprint",
                        "block_size": "64KiB",
                        "sync_interval": "1h",
                        "retention": { "keep": 5 },
                    }],
                }}},
            },
        },
    });
    let inventory_path = scratch.join("inventory.yml");
    std::fs::write(
        &inventory_path,
        serde_json::to_string_pretty(&inventory).expect("inventory JSON"),
    )
    .expect("write the inventory");

    // ----- first run: installs everything --------------------------------------------
    let first = run_playbook(&playbook, &scratch, &inventory_path, &root);
    let first_out = String::from_utf8_lossy(&first.stdout).into_owned();
    let recap = play_recap(&first_out);
    for host in ["coordinator", "node-1", "node-2", "host-1"] {
        let counts = recap
            .get(host)
            .unwrap_or_else(|| panic!("{host} is not in the PLAY RECAP:\n{first_out}"));
        assert_eq!(counts.get("failed"), Some(&0), "{host}:\n{first_out}");
        assert!(
            counts.get("changed").is_some_and(|c| *c > 0),
            "the first run changes {host}:\n{first_out}"
        );
    }
    eprintln!("first playbook run done after {:?}", started.elapsed());

    // What landed where, with which owner and mode.
    let (bulwark_uid, _) = lookup_user("bulwark");
    let check = |path: &str, uid: u32, mode: u32| {
        let p = root.join(path.trim_start_matches('/'));
        let m = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(
            (m.uid(), m.mode() & 0o7777),
            (uid, mode),
            "owner and mode of {}",
            p.display()
        );
    };
    check("/etc/bulwark/pki/node-1.key", bulwark_uid, 0o600);
    check("/etc/bulwark/pki/coordinator.key", bulwark_uid, 0o600);
    check("/etc/bulwark/pki/host-1.key", 0, 0o600);
    check("/etc/bulwark/pki/ca.crt", 0, 0o644);
    check("/etc/bulwark/node.toml", 0, 0o640);
    check("/etc/bulwark/agent.toml", 0, 0o600);
    check("/var/lib/bulwark/coordinator", bulwark_uid, 0o700);
    check("/var/lib/bulwark/node-2", bulwark_uid, 0o700);
    check("/srv/bulwark/disk2", bulwark_uid, 0o700);
    check("/srv/bulwark/node-2/disk1", bulwark_uid, 0o700);
    check("/var/lib/bulwark/agent", 0, 0o700);
    check("/usr/local/bin/bulwark-node", 0, 0o755);
    assert!(
        !root.join("etc/bulwark/pki/ca.key").exists(),
        "the CA key stays on the controller"
    );

    // The rendered units are the ones in deploy/systemd/ (for the role's defaults).
    let root_s = root.to_string_lossy().into_owned();
    let units = root.join("etc/systemd/system");
    for unit in ["bulwark-coordinator", "bulwark-node", "bulwark-agent"] {
        let file = format!("{unit}.service");
        let rendered = std::fs::read_to_string(units.join(&file)).expect("rendered unit");
        let shipped =
            std::fs::read_to_string(bins::workspace_root().join("deploy/systemd").join(&file))
                .expect("deploy/systemd unit");
        assert_eq!(
            unit_lines(&rendered, &root_s),
            unit_lines(&shipped, &root_s),
            "the role's {file} differs from deploy/systemd/{file} (comments aside)"
        );
    }
    let node2_unit = std::fs::read_to_string(units.join("bulwark-node-2.service")).expect("unit");
    let disk = format!("{root_s}/srv/bulwark/node-2/disk1");
    assert!(
        node2_unit.contains(&format!(
            "ReadWritePaths={root_s}/var/lib/bulwark/node-2 {disk}\n"
        )) && node2_unit.contains(&format!("RequiresMountsFor={disk}\n")),
        "node-2's unit:\n{node2_unit}"
    );
    if bulwark_tests::on_path("systemd-analyze") {
        for unit in [
            "bulwark-coordinator",
            "bulwark-node",
            "bulwark-node-2",
            "bulwark-agent",
        ] {
            let path = units.join(format!("{unit}.service"));
            let mut cmd = Command::new("systemd-analyze");
            cmd.arg("verify").arg(&path);
            let described = describe(&cmd);
            let out = run(cmd, Duration::from_secs(60));
            let stderr = String::from_utf8_lossy(&out.stderr);
            // It also reports on the host's own units; only ours matter.
            let ours: Vec<&str> = stderr.lines().filter(|l| l.contains(unit)).collect();
            assert!(
                out.status.success() && ours.is_empty(),
                "systemd-analyze verify complains about {unit}: {ours:?}\n{}",
                show_output(&described, &out)
            );
        }
    } else {
        // Not a skip of the test, which goes on; but a check it did not make.
        bulwark_tests::skip(
            "systemd-analyze",
            "systemd-analyze is not installed: the units are not verified (the rest of \
             the test runs)",
        );
    }

    // ----- the deployed fleet works ------------------------------------------------
    let unit = |name: &str| units.join(format!("{name}.service"));
    let log = |name: &str| logs.join(format!("{name}.log"));
    let admin = Admin {
        url: coordinator_url.clone(),
        id: admin,
    };
    let mut coordinator = Service::start(
        "coordinator",
        &unit("bulwark-coordinator"),
        log("coordinator"),
    );
    poll("the coordinator to answer", READY_TIMEOUT, || {
        coordinator.assert_alive();
        admin.json_try(&["nodes", "--json"]).map(|_| ())
    });
    let mut nodes = [
        Service::start("node-1", &unit("bulwark-node"), log("node-1")),
        Service::start("node-2", &unit("bulwark-node-2"), log("node-2")),
    ];
    poll("both nodes to be up", READY_TIMEOUT, || {
        nodes.iter_mut().for_each(Service::assert_alive);
        let list = admin.json_try(&["nodes", "--json"])?;
        for n in ["node-1", "node-2"] {
            let state = find_named(&list, n).and_then(|v| v.get("state"));
            if state.and_then(Value::as_str) != Some("up") {
                return Err(format!("{n} is not up: {list}"));
            }
        }
        Ok(())
    });
    let mut agent = Service::start("host-1", &unit("bulwark-agent"), log("host-1"));
    poll(
        "host-1 to connect and its source to be placed",
        READY_TIMEOUT,
        || {
            agent.assert_alive();
            let agents = admin.json_try(&["agents", "--json"])?;
            let connected = find_named(&agents, "host-1")
                .and_then(|a| a.get("connected"))
                .and_then(Value::as_bool);
            if connected != Some(true) {
                return Err(format!("host-1 is not connected: {agents}"));
            }
            let sources = admin.json_try(&["sources", "--json"])?;
            let node = find_named(&sources, SOURCE)
                .and_then(|s| s.get("node"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if node.is_empty() {
                return Err(format!("{SOURCE} is not placed: {sources}"));
            }
            Ok(())
        },
    );

    let sync = admin.json(&["sync", SOURCE, "--wait", "--json"]);
    assert_eq!(
        json_u64(&sync, "blocks_scanned"),
        SIZE / bulwark_tests::BLOCK_SIZE,
        "{sync}"
    );
    assert_eq!(
        json_u64(&sync, "bytes_sent"),
        SIZE,
        "a first sync is full: {sync}"
    );
    let restored = root
        .join("var/lib/bulwark/restore")
        .join(format!("{SOURCE}.img"));
    let restored_s = restored.to_string_lossy().into_owned();
    let r = admin.json(&["restore", SOURCE, "--to", &restored_s, "--wait", "--json"]);
    assert_eq!(json_u64(&r, "point"), json_u64(&sync, "point"), "{r}");
    assert_same_file(
        &restored,
        &volume,
        "the volume restored by the deployed fleet",
    );
    let placed = find_named(&admin.json(&["sources", "--json"]), SOURCE)
        .map(|s| json_str(s, "node"))
        .expect("the source is listed");
    eprintln!(
        "synced and restored {SOURCE} through {placed} after {:?}",
        started.elapsed()
    );

    // Agents first, then the nodes, then the coordinator; each stops cleanly.
    for s in std::iter::once(&mut agent)
        .chain(nodes.iter_mut())
        .chain(std::iter::once(&mut coordinator))
    {
        let status = s.stop();
        assert!(
            status.success(),
            "{} exited {status} on SIGTERM; its log:\n{}",
            s.name,
            tail(&s.log, 40)
        );
    }

    // ----- second run: nothing to change ---------------------------------------------
    let second = run_playbook(&playbook, &scratch, &inventory_path, &root);
    let second_out = String::from_utf8_lossy(&second.stdout).into_owned();
    let recap = play_recap(&second_out);
    assert_eq!(recap.len(), 4, "four hosts in the recap:\n{second_out}");
    for (host, counts) in &recap {
        assert!(
            counts.get("changed") == Some(&0) && counts.get("failed") == Some(&0),
            "the second run changed or failed something on {host} ({counts:?}):\n{second_out}"
        );
    }
    eprintln!(
        "second playbook run (no change) done after {:?}",
        started.elapsed()
    );

    // ----- ansible-lint --------------------------------------------------------------
    match find_tool("ansible-lint") {
        None => eprintln!("ansible-lint not found: the roles are not linted"),
        Some(lint) => {
            let mut cmd = ansible_command(&lint, &scratch);
            cmd.args(["--offline", "--strict", "--nocolor"]);
            let described = describe(&cmd);
            let out = run(cmd, Duration::from_secs(300));
            assert!(
                out.status.success(),
                "ansible-lint found problems in deploy/ansible\n{}",
                show_output(&described, &out)
            );
        }
    }
    eprintln!("done after {:?}", started.elapsed());
}

/// The coordinator role with `bulwark_coordinator_state_backend: etcd` on two
/// hosts: each coordinator.toml has `[state]` with the endpoints, prefix, lease,
/// TLS files and its own `advertise`, and the daemon's config loader accepts it.
/// Renders the template only (no deploy), so it needs neither root nor etcd.
#[test]
fn the_coordinator_role_renders_an_etcd_state_for_each_coordinator() {
    let Some(playbook) = find_tool("ansible-playbook") else {
        bulwark_tests::skip(
            "ansible",
            &format!("ansible-playbook not found (set {ANSIBLE_BIN_ENV}, or put it on PATH)"),
        );
        return;
    };
    let tmp = tempfile::tempdir().expect("temporary directory");
    let scratch = tmp.path();
    let roles = ansible_dir().join("roles");
    let out_dir = scratch.join("rendered");
    std::fs::create_dir_all(&out_dir).expect("rendered dir");
    let play = serde_json::json!([{
        "hosts": "bulwark_coordinators",
        "gather_facts": false,
        "tasks": [
            { "ansible.builtin.include_vars": { "file": roles.join("bulwark/defaults/main.yml") } },
            { "ansible.builtin.include_vars": {
                "file": roles.join("bulwark_coordinator/defaults/main.yml") } },
            { "ansible.builtin.template": {
                "src": roles.join("bulwark_coordinator/templates/coordinator.toml.j2"),
                "dest": format!("{}/{{{{ inventory_hostname }}}}.toml", out_dir.display()),
                "mode": "0644",
            }},
        ],
    }]);
    let inventory = serde_json::json!({ "all": {
        "vars": {
            "ansible_connection": "local",
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        },
        "children": { "bulwark_coordinators": { "hosts": {
            "coord-1.example.net": {}, "coord-2.example.net": {},
        }}},
    }});
    // Extra vars: above the include_vars of the role defaults, as inventory
    // variables are above role defaults in a real run.
    let extra = serde_json::json!({
        "bulwark_root": scratch.join("root"),
        "bulwark_coordinator_state_backend": "etcd",
        "bulwark_coordinator_etcd_endpoints": ["https://etcd-1:2379", "https://etcd-2:2379", "https://etcd-3:2379"],
        "bulwark_coordinator_etcd_prefix": "/bulwark-prod",
        "bulwark_coordinator_leader_lease": "6s",
        "bulwark_coordinator_etcd_ca": "/srv/etcd-pki/ca.crt",
        "bulwark_coordinator_etcd_cert": "/srv/etcd-pki/client.crt",
        "bulwark_coordinator_etcd_key": "/srv/etcd-pki/client.key",
    });
    for (name, v) in [
        ("play.yml", &play),
        ("inventory.yml", &inventory),
        ("extra.json", &extra),
    ] {
        std::fs::write(scratch.join(name), v.to_string()).expect("write a playbook file");
    }
    let mut cmd = ansible_command(&playbook, scratch);
    cmd.arg("-i")
        .arg(scratch.join("inventory.yml"))
        .arg(scratch.join("play.yml"))
        .arg("-e")
        .arg(format!("@{}", scratch.join("extra.json").display()));
    let described = describe(&cmd);
    let out = run(cmd, PLAYBOOK_TIMEOUT);
    assert!(out.status.success(), "{}", show_output(&described, &out));
    for host in ["coord-1.example.net", "coord-2.example.net"] {
        let path = out_dir.join(format!("{host}.toml"));
        let cfg = bulwark_coordinator::config::CoordinatorConfig::load(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let bulwark_coordinator::config::StateConfig::Etcd(e) = &cfg.state else {
            panic!("{}: not the etcd backend: {:?}", path.display(), cfg.state);
        };
        assert_eq!(e.advertise, format!("https://{host}:7440"));
        assert_eq!(e.options.endpoints.len(), 3);
        assert_eq!(e.options.prefix, "/bulwark-prod");
        assert_eq!(e.leader_lease, Duration::from_secs(6));
        let tls = e.options.tls.as_ref().expect("etcd TLS files");
        assert!(tls.ca.ends_with("etc/bulwark/pki/etcd-ca.crt"), "{tls:?}");
        assert!(
            tls.key.ends_with("etc/bulwark/pki/etcd-client.key"),
            "{tls:?}"
        );
    }
}

//! Every daemon refuses a bad config file at start-up with a message that names the
//! file and the key, and exits non-zero.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use bulwark_tests::bins::{self, AGENT, COORDINATOR, NODE};
use bulwark_tests::fleet::{agent_toml, coordinator_toml, node_toml};
use bulwark_tests::process::{describe, run, scrub_env, show_output};
use bulwark_tests::{Pki, free_port};

/// A directory with a CA, certificates and a valid config for each daemon.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    /// (binary, valid config text)
    configs: Vec<(&'static str, String)>,
}

fn setup() -> Setup {
    let tmp = tempfile::Builder::new()
        .prefix("bulwark-e2e-config-")
        .tempdir()
        .expect("cannot create a temporary directory");
    let dir = tmp.path().to_path_buf();
    let pki = Pki::init(&dir.join("pki"));
    let coordinator_url = format!("https://127.0.0.1:{}", free_port());
    let volume = dir.join("vol.img");
    std::fs::write(&volume, vec![0u8; 1 << 20]).expect("cannot write the volume");
    let configs = vec![
        (
            COORDINATOR,
            coordinator_toml(
                free_port(),
                &dir.join("coordinator"),
                &pki.issue("coordinator", "coordinator"),
            ),
        ),
        (
            NODE,
            node_toml(
                "node-1",
                free_port(),
                &coordinator_url,
                &dir.join("node-1"),
                &dir.join("node-1").join("disk1"),
                "100GiB",
                &pki.issue("node", "node-1"),
            ),
        ),
        (
            AGENT,
            agent_toml(
                "host-1",
                &coordinator_url,
                &dir.join("host-1"),
                &[("host-1-data", volume.as_path())],
                "1h",
                &pki.issue("agent", "host-1"),
            ),
        ),
    ];
    Setup {
        _tmp: tmp,
        dir,
        configs,
    }
}

/// Runs `<binary> --config <path>`, which must exit (not keep running) and exit
/// non-zero; returns its output.
fn run_expect_failure(binary: &str, config: &Path) -> Output {
    let mut cmd = Command::new(bins::bin(binary));
    scrub_env(&mut cmd);
    cmd.arg("--config").arg(config);
    let described = describe(&cmd);
    let out = run(cmd, Duration::from_secs(30));
    match out.status.code() {
        Some(0) => panic!(
            "{binary} exited 0 with a bad config\n{}",
            show_output(&described, &out)
        ),
        Some(_) => out,
        None => panic!(
            "{binary} was killed by a signal\n{}",
            show_output(&described, &out)
        ),
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
    p
}

#[test]
fn missing_config_file_is_named() {
    let s = setup();
    for (binary, _) in &s.configs {
        let path = s.dir.join(format!("missing-{binary}.toml"));
        let out = run_expect_failure(binary, &path);
        let err = stderr(&out);
        assert!(
            err.contains(&*path.to_string_lossy()),
            "{binary}: stderr does not name the missing file {}:\n{err}",
            path.display()
        );
    }
}

#[test]
fn unknown_key_is_named() {
    let s = setup();
    for (binary, text) in &s.configs {
        // Top-level keys go before the first table.
        let bad = format!("colour = \"blue\"\n{text}");
        let path = write_config(&s.dir, &format!("{binary}-unknown-key.toml"), &bad);
        let out = run_expect_failure(binary, &path);
        let err = stderr(&out);
        assert!(
            err.contains(&*path.to_string_lossy()) && err.contains("colour"),
            "{binary}: stderr does not name the file {} and the key `colour`:\n{err}",
            path.display()
        );
    }
}

#[test]
fn bad_size_names_the_key_and_value() {
    let s = setup();
    let cases = [
        (
            NODE,
            "capacity = \"100GiB\"",
            "capacity = \"12XB\"",
            "capacity",
        ),
        (
            AGENT,
            "block_size = \"64KiB\"",
            "block_size = \"12XB\"",
            "block_size",
        ),
    ];
    for (binary, good, bad, key) in cases {
        let text = &s
            .configs
            .iter()
            .find(|(b, _)| *b == binary)
            .expect("a config for every daemon")
            .1;
        assert!(
            text.contains(good),
            "the {binary} config has no `{good}`:\n{text}"
        );
        let path = write_config(
            &s.dir,
            &format!("{binary}-bad-size.toml"),
            &text.replace(good, bad),
        );
        let out = run_expect_failure(binary, &path);
        let err = stderr(&out);
        assert!(
            err.contains(&*path.to_string_lossy()) && err.contains(key) && err.contains("12XB"),
            "{binary}: stderr does not name the file {}, the key `{key}` and the value 12XB:\n{err}",
            path.display()
        );
    }
}

/// Writes `text` as agent config `file`; the agent must refuse it, naming the file,
/// `sources[0].KEY` and saying `why`.
fn assert_agent_refused(s: &Setup, file: &str, text: &str, key: &str, why: &str) {
    let path = write_config(&s.dir, file, text);
    let err = stderr(&run_expect_failure(AGENT, &path));
    assert!(
        err.contains(&*path.to_string_lossy())
            && err.contains(&format!("sources[0].{key}"))
            && err.contains(why),
        "{file}: stderr does not name the file, sources[0].{key} and say \"{why}\":\n{err}\nconfig:\n{text}"
    );
}

#[test]
fn tracker_and_quiesce_mistakes_name_the_key() {
    let s = setup();
    let text = &s
        .configs
        .iter()
        .find(|(b, _)| *b == AGENT)
        .expect("an agent config")
        .1;
    let tracker = "tracker = \"fingerprint\"";
    assert!(text.contains(tracker), "{text}");
    let cases = [
        (
            "tracker = \"nbd-filter\"".to_string(),
            "nbd_socket",
            "needs nbd_socket",
        ),
        (
            "tracker = \"nbd-filter\"\nnbd_listen = \"0.0.0.0:10809\"".to_string(),
            "nbd_listen",
            "not a loopback address",
        ),
        // Plain TCP on loopback: any local user could read and write the disk.
        (
            "tracker = \"nbd-filter\"\nnbd_listen = \"127.0.0.1:10809\"".to_string(),
            "nbd_listen",
            "plain TCP would let any local user read and write the disk",
        ),
        (
            "tracker = \"nbd-filter\"\nnbd_listen = \"127.0.0.1:10809\"\nnbd_tls = true"
                .to_string(),
            "nbd_client_role",
            "needs nbd_client_role",
        ),
        (
            "tracker = \"nbd-filter\"\nnbd_socket = \"/tmp/x.sock\"\nnbd_tls = true".to_string(),
            "nbd_tls",
            "only used with nbd_listen",
        ),
        (
            format!("{tracker}\nnbd_socket = \"/tmp/x.sock\""),
            "nbd_socket",
            "only used with tracker = \"nbd-filter\"",
        ),
        (
            format!("{tracker}\nqmp_socket = \"/run/vm1/qmp.sock\""),
            "qmp_socket",
            "only used with tracker = \"qcow2-bitmap\"",
        ),
        (
            "tracker = \"dm-era\"".to_string(),
            "era_metadata",
            "needs era_metadata",
        ),
        (
            format!("{tracker}\nfsfreeze = \"/\""),
            "fsfreeze",
            "would stop this host",
        ),
        (
            format!("{tracker}\nrequire_app_consistent = true"),
            "require_app_consistent",
            "no pre_snapshot",
        ),
        (
            "tracker = \"qcow2-bitmap\"\nsnapshot_command = \"true\"".to_string(),
            "snapshot_command",
            "not supported",
        ),
    ];
    for (i, (replacement, key, why)) in cases.iter().enumerate() {
        let text = text.replace(tracker, replacement);
        assert_agent_refused(&s, &format!("agent-tracker-{i}.toml"), &text, key, why);
    }
}

#[test]
fn log_source_mistakes_name_the_key() {
    let s = setup();
    let text = &s
        .configs
        .iter()
        .find(|(b, _)| *b == AGENT)
        .expect("an agent config")
        .1;
    let kind = "kind = \"volume\"";
    assert!(text.contains(kind), "{text}");
    let cases = [
        (
            format!("{kind}\nglob = \"*\""),
            "glob",
            "only used with kind = \"log\"",
        ),
        (
            "kind = \"log\"\nglob = \"a/b\"".into(),
            "glob",
            "may not contain /",
        ),
        (
            "kind = \"log\"\nglob = \"[ab\"".into(),
            "glob",
            "no closing ]",
        ),
        (
            "kind = \"log\"\nnbd_socket = \"/tmp/x.sock\"".into(),
            "nbd_socket",
            "only used with kind = \"volume\"",
        ),
        (
            "kind = \"log\"\npre_snapshot = \"true\"".into(),
            "pre_snapshot",
            "only used with kind = \"volume\"",
        ),
        ("kind = \"journal\"".into(), "kind", "is not volume or log"),
    ];
    for (i, (replacement, key, why)) in cases.iter().enumerate() {
        let text = text.replace(kind, replacement);
        assert_agent_refused(&s, &format!("agent-log-{i}.toml"), &text, key, why);
    }
    // A log source whose path is not a directory stops the agent at start.
    let path = write_config(
        &s.dir,
        "agent-log-file.toml",
        &text.replace(kind, "kind = \"log\""),
    );
    let err = stderr(&run_expect_failure(AGENT, &path));
    assert!(err.contains("is not a directory"), "{err}");
}

/// dm-era where it cannot work (no device-mapper here, or a plain file as the
/// origin) stops the agent at start with a message naming the source and why.
#[test]
fn dm_era_that_cannot_work_is_refused_at_start() {
    let s = setup();
    let text = &s
        .configs
        .iter()
        .find(|(b, _)| *b == AGENT)
        .expect("an agent config")
        .1;
    let meta = s.dir.join("era-meta");
    std::fs::write(&meta, vec![0u8; 4096]).expect("metadata file");
    let bad = text.replace(
        "tracker = \"fingerprint\"",
        &format!(
            "tracker = \"dm-era\"\nera_metadata = \"{}\"",
            meta.display()
        ),
    );
    let path = write_config(&s.dir, "agent-dm-era.toml", &bad);
    let out = run_expect_failure(AGENT, &path);
    let err = stderr(&out);
    assert!(
        err.contains("data source host-1-data") && err.contains("dm-era"),
        "stderr does not name the source and the tracker:\n{err}"
    );
}

/// The NBD limits of both daemons name their key: too small, or set where there is
/// no NBD listener to limit.
#[test]
fn nbd_limit_mistakes_name_the_key() {
    let s = setup();
    let config = |binary: &str| {
        s.configs
            .iter()
            .find(|(b, _)| *b == binary)
            .expect("a config for every daemon")
            .1
            .clone()
    };
    let node = config(NODE);
    let with_nbd = |extra: &str| format!("nbd_listen = \"127.0.0.1:0\"\n{extra}\n{node}");
    let cases = [
        (
            with_nbd("nbd_max_connections = 0"),
            "nbd_max_connections",
            "at least 1",
        ),
        (
            with_nbd("nbd_handshake_timeout = \"100ms\""),
            "nbd_handshake_timeout",
            "at least 1s",
        ),
        (
            format!("nbd_handshake_timeout = \"5s\"\n{node}"),
            "nbd_handshake_timeout",
            "only used with nbd_listen",
        ),
    ];
    for (i, (text, key, why)) in cases.iter().enumerate() {
        let path = write_config(&s.dir, &format!("node-nbd-{i}.toml"), text);
        let err = stderr(&run_expect_failure(NODE, &path));
        assert!(
            err.contains(&*path.to_string_lossy())
                && err.contains(&format!("`{key}`"))
                && err.contains(why),
            "node: stderr does not name the file, `{key}` and say \"{why}\":\n{err}"
        );
    }
    // The agent's: only with an nbd-filter source.
    let agent = config(AGENT);
    let path = write_config(
        &s.dir,
        "agent-nbd-limit.toml",
        &format!("nbd_max_connections = 8\n{agent}"),
    );
    let err = stderr(&run_expect_failure(AGENT, &path));
    assert!(
        err.contains(&*path.to_string_lossy())
            && err.contains("`nbd_max_connections`")
            && err.contains("only used with an nbd-filter data source"),
        "{err}"
    );
}

/// An nbd_socket whose directory others can reach (here mode 0755) stops the agent
/// at start, naming the directory and the problem; the directory is left as it was.
#[test]
fn nbd_socket_in_a_directory_others_reach_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup();
    let text = &s
        .configs
        .iter()
        .find(|(b, _)| *b == AGENT)
        .expect("an agent config")
        .1;
    let open = s.dir.join("shared-run");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bad = text.replace(
        "tracker = \"fingerprint\"",
        &format!(
            "tracker = \"nbd-filter\"\nnbd_socket = \"{}\"",
            open.join("vm.sock").display()
        ),
    );
    let path = write_config(&s.dir, "agent-nbd-open-dir.toml", &bad);
    let err = stderr(&run_expect_failure(AGENT, &path));
    assert!(
        err.contains("data source host-1-data")
            && err.contains(&open.display().to_string())
            && err.contains("has mode 0755"),
        "stderr does not name the source, the directory and its mode:\n{err}"
    );
    let mode = std::fs::metadata(&open).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755, "the agent changed the directory's mode");
    assert!(!open.join("vm.sock").exists(), "a socket was made anyway");
}

/// The admin's policy and the stream limits name their key when they are wrong.
#[test]
fn policy_and_stream_limit_mistakes_name_the_key() {
    let s = setup();
    let config = |binary: &str| {
        s.configs
            .iter()
            .find(|(b, _)| *b == binary)
            .expect("a config for every daemon")
            .1
            .clone()
    };
    let coordinator = config(COORDINATOR);
    let node = config(NODE);
    let cases = [
        (
            COORDINATOR,
            format!("{coordinator}\n[policy]\nreplica_percent = 50\n"),
            "policy.replica_percent",
            "not between 100 and 1000",
        ),
        (
            COORDINATOR,
            format!("{coordinator}\n[policy.min_retention]\nkepe = 3\n"),
            "kepe",
            "unknown field",
        ),
        (
            COORDINATOR,
            format!("stream_idle_timeout = \"5s\"\n{coordinator}"),
            "stream_idle_timeout",
            "at least 20s",
        ),
        (
            NODE,
            format!("max_syncs_per_agent = 0\n{node}"),
            "max_syncs_per_agent",
            "at least 1",
        ),
        (
            NODE,
            format!("stream_idle_timeout = \"100ms\"\n{node}"),
            "stream_idle_timeout",
            "at least 1s",
        ),
    ];
    for (i, (binary, text, key, why)) in cases.iter().enumerate() {
        let path = write_config(&s.dir, &format!("policy-{i}.toml"), text);
        let err = stderr(&run_expect_failure(binary, &path));
        assert!(
            err.contains(&*path.to_string_lossy()) && err.contains(key) && err.contains(why),
            "{binary}: stderr does not name the file, {key} and say \"{why}\":\n{err}"
        );
    }
}

/// The activity log's keys name themselves when wrong: out of range, not a multiple
/// of the block size, or set on a tracker that has no activity log.
#[test]
fn activity_log_mistakes_name_the_key() {
    let s = setup();
    let agent = s
        .configs
        .iter()
        .find(|(b, _)| *b == AGENT)
        .expect("an agent config")
        .1
        .clone();
    let socket = s.dir.join("al-nbd").join("al.sock");
    let filter = |extra: &str| {
        agent.replace(
            "tracker = \"fingerprint\"",
            &format!(
                "tracker = \"nbd-filter\"\nnbd_socket = \"{}\"\n{extra}",
                socket.display()
            ),
        )
    };
    let cases = [
        (
            filter("activity_extents = 8"),
            "activity_extents",
            "is not between 64 and 65536",
        ),
        (
            filter("activity_region = \"100KiB\""),
            "activity_region",
            "is not a multiple of block_size",
        ),
        (
            filter("bitmap_checkpoint = \"2h\""),
            "bitmap_checkpoint",
            "between 1s and 1h",
        ),
        (
            filter("activity_log = false\nactivity_extents = 128"),
            "activity_extents",
            "not used with activity_log = false",
        ),
        (
            agent.replace(
                "tracker = \"fingerprint\"",
                "tracker = \"fingerprint\"\nbitmap_checkpoint = \"10s\"",
            ),
            "bitmap_checkpoint",
            "only used with tracker = \"nbd-filter\"",
        ),
    ];
    for (i, (text, key, why)) in cases.iter().enumerate() {
        assert_ne!(text, &agent, "case {i} changed nothing");
        let path = write_config(&s.dir, &format!("agent-al-{i}.toml"), text);
        let err = stderr(&run_expect_failure(AGENT, &path));
        assert!(
            err.contains(&*path.to_string_lossy()) && err.contains(key) && err.contains(why),
            "agent: stderr does not name the file, `{key}` and say \"{why}\":\n{err}"
        );
    }
}

//! Issue 6's acceptance: point-in-time recovery of a real PostgreSQL from a volume
//! source on its data directory and a log source on its WAL archive.
//!
//! The test starts Debian's PostgreSQL on 127.0.0.1 as an unprivileged user, with
//! `archive_command` copying each finished WAL segment into the log source's
//! directory (as `.NAME.part`, then renamed: the glob `0*` never sees a partial
//! copy). The volume source is a tar of the cleanly stopped data directory in a
//! fixed-size file. Three batches of rows go in, each followed by a WAL switch, its
//! archiving and a log ship; the moment T is taken between batches 2 and 3.
//! `bulwark restore --at T` then gives the base backup and the WAL as of the first
//! ship after T (batch 3's segment included); a new cluster made from them with
//! `recovery_target_time = T` has batches 1 and 2 and not batch 3.
//!
//! Skipped, saying which is missing (`BULWARK-SKIP`), when not root (PostgreSQL must
//! run as another user) or when PostgreSQL, `runuser`, `tar` or an unprivileged
//! user is missing.

use std::fs::{File, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bulwark_common::time::{now_ms, parse_rfc3339_ms, rfc3339_ms};
use bulwark_tests::fleet::KEEP_ENV;
use bulwark_tests::process::{describe, run, show_output, tail};
use bulwark_tests::{Fleet, MIB, Value, assert_same_file, free_port, json_str, json_u64, poll};

const AGENT: &str = "host-1";
/// The volume source: a tar of the data directory, padded with zeros.
const VOLUME: &str = "host-1-pg";
/// The log source: the WAL archive.
const WAL: &str = "host-1-wal";
/// The protection group that pairs them for `restore --at`.
const GROUP: &str = "db";
/// Size of the volume file (the tar of a fresh cluster is about 28 MiB).
const VOLUME_SIZE: u64 = 64 * MIB;
/// WAL segment size given to initdb, in MiB: small segments, small ships.
const WAL_SEGMENT_MIB: u64 = 1;
/// How long one PostgreSQL command may take.
const PG_TIMEOUT: Duration = Duration::from_secs(60);
/// Rows of each batch (distinct, so the counts say which batch is which).
const BATCHES: [(u32, u32); 3] = [(1, 100), (2, 200), (3, 300)];

/// The PostgreSQL binaries and the unprivileged user that runs them.
#[derive(Debug, Clone)]
struct Pg {
    bin: PathBuf,
    user: String,
    /// The unix socket directory of every server.
    sockets: PathBuf,
    /// The working directory of every command (one the user can enter).
    cwd: PathBuf,
}

impl Pg {
    /// `runuser -u USER -- BIN/TOOL ARGS`.
    fn command(&self, tool: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", &self.user, "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .current_dir(&self.cwd)
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT");
        cmd
    }

    fn try_run(&self, tool: &str, args: &[&str]) -> Result<Output, String> {
        let cmd = self.command(tool, args);
        let described = describe(&cmd);
        let out = run(cmd, PG_TIMEOUT);
        if out.status.success() {
            Ok(out)
        } else {
            Err(show_output(&described, &out))
        }
    }

    /// Runs a PostgreSQL tool as the user; panics with its output unless it exits 0.
    fn run(&self, tool: &str, args: &[&str]) -> Output {
        self.try_run(tool, args)
            .unwrap_or_else(|e| panic!("PostgreSQL command failed\n{e}"))
    }

    /// Runs `sql` (one statement per element, each its own transaction) with psql on
    /// the server at `port`; returns the unaligned, tuples-only output.
    fn try_psql(&self, port: u16, sql: &[&str]) -> Result<String, String> {
        let sockets = self.sockets.to_string_lossy().into_owned();
        let port = port.to_string();
        let mut args = vec![
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &sockets,
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
        ];
        for s in sql {
            args.extend(["-c", s]);
        }
        self.try_run("psql", &args)
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    fn psql(&self, port: u16, sql: &[&str]) -> String {
        self.try_psql(port, sql)
            .unwrap_or_else(|e| panic!("psql failed\n{e}"))
    }

    /// `chown -R USER: path`.
    fn give(&self, path: &Path) {
        let mut cmd = Command::new("chown");
        cmd.arg("-R").arg(format!("{}:", self.user)).arg(path);
        let described = describe(&cmd);
        let out = run(cmd, PG_TIMEOUT);
        assert!(out.status.success(), "{}", show_output(&described, &out));
    }
}

/// Stdout of a command that exits 0, trimmed; `None` otherwise.
fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The directory holding initdb, pg_ctl, postgres and psql: `pg_config --bindir`,
/// else the newest `/usr/lib/postgresql/*/bin`.
fn find_bindir() -> Option<PathBuf> {
    let complete = |d: &Path| {
        ["initdb", "pg_ctl", "postgres", "psql"]
            .iter()
            .all(|t| d.join(t).is_file())
    };
    if let Some(d) = output_of("pg_config", &["--bindir"]).map(PathBuf::from)
        && complete(&d)
    {
        return Some(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| complete(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

/// The PostgreSQL tools and user; `None` where one is missing (the test skips,
/// recorded with the missing facility).
fn prerequisites() -> Option<(PathBuf, String)> {
    if !bulwark_tests::have_root(
        "the test starts PostgreSQL as an unprivileged user with runuser, which needs root",
    ) {
        return None;
    }
    for (tool, package) in [
        ("runuser", "util-linux"),
        ("tar", "tar"),
        ("chown", "coreutils"),
    ] {
        if !bulwark_tests::have_tool(tool, package) {
            return None;
        }
    }
    let Some(bin) = find_bindir() else {
        bulwark_tests::skip(
            "postgresql",
            "PostgreSQL is not installed (no initdb, pg_ctl, postgres and psql in \
             `pg_config --bindir` or /usr/lib/postgresql/*/bin; Debian package `postgresql`)",
        );
        return None;
    };
    let Some(user) = ["postgres", "nobody"]
        .into_iter()
        .find(|u| output_of("id", &["-u", u]).is_some_and(|id| id != "0"))
    else {
        bulwark_tests::skip(
            "user-nobody",
            "no unprivileged user (`postgres` or `nobody`) to run PostgreSQL as",
        );
        return None;
    };
    Some((bin, user.to_string()))
}

/// A PostgreSQL server of a data directory. Dropping it stops the server
/// (`pg_ctl stop -m immediate`) and, when the thread panics, prints its log.
struct Server {
    pg: Pg,
    name: &'static str,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    running: bool,
}

impl Server {
    fn new(pg: &Pg, name: &'static str, data: &Path, log: &Path, port: u16) -> Server {
        Server {
            pg: pg.clone(),
            name,
            data: data.to_path_buf(),
            log: log.to_path_buf(),
            port,
            running: false,
        }
    }

    /// `pg_ctl start -w`: returns once the server accepts connections.
    fn start(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let log = self.log.to_string_lossy().into_owned();
        // Marked first: a server that started but was slow to answer is stopped too.
        self.running = true;
        if let Err(e) = self.pg.try_run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-t", "60", "start"],
        ) {
            panic!(
                "the {} PostgreSQL server did not start\n{e}\n----- {} -----\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 80)
            );
        }
    }

    /// `pg_ctl stop -m MODE -w`.
    fn stop(&mut self, mode: &str) -> Result<(), String> {
        let data = self.data.to_string_lossy().into_owned();
        self.pg
            .try_run("pg_ctl", &["-D", &data, "-m", mode, "-w", "stop"])?;
        self.running = false;
        Ok(())
    }

    fn psql(&self, sql: &[&str]) -> String {
        self.pg.psql(self.port, sql)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.running
            && let Err(e) = self.stop("immediate")
        {
            self.running = false;
            eprintln!("could not stop the {} PostgreSQL server: {e}", self.name);
        }
        if std::thread::panicking() {
            eprintln!(
                "----- last 80 lines of the {} PostgreSQL server's log {} -----\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 80)
            );
        }
    }
}

/// A temporary directory that every user can enter (PostgreSQL's files live in
/// it), kept when the test fails or `BULWARK_E2E_KEEP` is set.
struct PgDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl PgDir {
    fn new() -> Result<PgDir, String> {
        let dir = tempfile::Builder::new()
            .prefix("bulwark-pg-")
            .tempdir_in("/tmp")
            .map_err(|e| format!("cannot create a directory in /tmp: {e}"))?;
        let path = dir.path().to_path_buf();
        std::fs::set_permissions(&path, Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
        for a in path.ancestors().skip(1) {
            let mode = std::fs::metadata(a)
                .map_err(|e| format!("cannot stat {}: {e}", a.display()))?
                .permissions()
                .mode();
            if mode & 0o001 == 0 {
                return Err(format!(
                    "{} (mode {mode:o}) cannot be entered by other users",
                    a.display()
                ));
            }
        }
        Ok(PgDir {
            dir: Some(dir),
            path,
        })
    }
}

impl Drop for PgDir {
    fn drop(&mut self) {
        if (std::thread::panicking() || std::env::var_os(KEEP_ENV).is_some())
            && let Some(d) = self.dir.take()
        {
            eprintln!("kept the PostgreSQL directory {}", d.keep().display());
        }
    }
}

/// Makes a directory owned by the PostgreSQL user with `mode`.
fn user_dir(pg: &Pg, path: &Path, mode: u32) {
    std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    std::fs::set_permissions(path, Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    pg.give(path);
}

/// Appends settings to a cluster's `postgresql.conf` (later lines win).
fn append_conf(data: &Path, lines: &str) {
    use std::io::Write;
    let path = data.join("postgresql.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    f.write_all(format!("\n# bulwark postgres_pitr test\n{lines}\n").as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// A path inside a single-quoted PostgreSQL setting.
fn conf_path(p: &Path) -> String {
    p.to_string_lossy().replace('\'', "''")
}

/// Runs a root command (tar) with a deadline; panics with its output on failure.
fn run_ok(program: &str, args: &[&str]) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let described = describe(&cmd);
    let out = run(cmd, PG_TIMEOUT);
    assert!(out.status.success(), "{}", show_output(&described, &out));
}

/// Names of the files in `dir`, sorted.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// One batch on the primary: insert its rows, switch WAL, wait until the segment
/// holding them is in the archive, ship the archive. Returns the segment's name and
/// the ship's point id.
fn batch(fleet: &Fleet, primary: &Server, wal_dir: &Path, (n, rows): (u32, u32)) -> (String, u64) {
    let insert = format!("insert into t(batch) select {n} from generate_series(1, {rows})");
    primary.psql(&[&insert]);
    let segment = primary.psql(&["select pg_walfile_name(pg_switch_wal())"]);
    assert!(
        segment.len() == 24 && segment.starts_with('0'),
        "pg_walfile_name gave {segment:?}"
    );
    poll(
        &format!(
            "WAL segment {segment} of batch {n} to be archived into {}",
            wal_dir.display()
        ),
        Duration::from_secs(30),
        || {
            if wal_dir.join(&segment).is_file() {
                Ok(())
            } else {
                Err(format!(
                    "the archive holds {:?}; pg_stat_archiver: {}",
                    file_names(wal_dir),
                    primary
                        .pg
                        .try_psql(
                            primary.port,
                            &["select last_archived_wal, failed_count, last_failed_wal from pg_stat_archiver"]
                        )
                        .unwrap_or_else(|e| e)
                ))
            }
        },
    );
    let ship = fleet.sync(WAL);
    assert_eq!(
        json_str(&ship, "kind"),
        "log",
        "ship after batch {n}: {ship}"
    );
    assert_eq!(
        json_u64(&ship, "files_sent"),
        1,
        "the ship after batch {n} sends exactly the new segment {segment}: {ship}"
    );
    assert_eq!(
        json_u64(&ship, "bytes_sent"),
        WAL_SEGMENT_MIB * MIB,
        "the ship after batch {n} sends the {WAL_SEGMENT_MIB} MiB of {segment}: {ship}"
    );
    (segment, json_u64(&ship, "point"))
}

#[test]
fn postgres_restores_to_a_moment_between_batches() {
    let started = Instant::now();
    let Some((bin, user)) = prerequisites() else {
        return;
    };
    // The daemons are built first: a failed build leaves no PostgreSQL directory.
    bulwark_tests::bins::bin_dir();
    // Setting up the directory is no facility: its failure is the test's.
    let dir = PgDir::new().unwrap_or_else(|why| panic!("the PostgreSQL directory: {why}"));
    let root = dir.path.clone();
    eprintln!(
        "PostgreSQL from {} as {user}, files in {}",
        bin.display(),
        root.display()
    );
    let pg = Pg {
        bin,
        user,
        sockets: root.join("run"),
        cwd: root.clone(),
    };
    let data = root.join("data");
    let wal_dir = root.join("wal");
    let pg_logs = root.join("pglogs");
    user_dir(&pg, &data, 0o700);
    user_dir(&pg, &pg.sockets, 0o755);
    user_dir(&pg, &wal_dir, 0o755);
    user_dir(&pg, &pg_logs, 0o755);

    // A cluster with WAL archiving into the log source's directory.
    let data_s = data.to_string_lossy().into_owned();
    let segsize = WAL_SEGMENT_MIB.to_string();
    pg.run(
        "initdb",
        &[
            "-D",
            &data_s,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--wal-segsize",
            &segsize,
            "--no-sync",
        ],
    );
    let port = free_port();
    let w = conf_path(&wal_dir);
    append_conf(
        &data,
        &format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = replica\narchive_mode = on\n\
             archive_command = 'cp %p {w}/.%f.part && mv {w}/.%f.part {w}/%f'\n\
             archive_timeout = 0\n",
            conf_path(&pg.sockets)
        ),
    );

    // The base backup: a tar of the cleanly stopped data directory, in a volume of a
    // fixed size (GNU tar reads past the trailing zeros).
    let volume = root.join("volume.img");
    let volume_s = volume.to_string_lossy().into_owned();
    let root_s = root.to_string_lossy().into_owned();
    run_ok("tar", &["-C", &root_s, "-cf", &volume_s, "data"]);
    let tar_len = std::fs::metadata(&volume).expect("the tar").len();
    assert!(
        tar_len <= VOLUME_SIZE,
        "the tar of the data directory is {tar_len} bytes, more than the {VOLUME_SIZE}-byte volume"
    );
    File::options()
        .write(true)
        .open(&volume)
        .and_then(|f| f.set_len(VOLUME_SIZE))
        .expect("pad the volume");

    let fleet = Fleet::builder()
        .node("node-1")
        .agent_source(AGENT, VOLUME, Some(&volume), VOLUME_SIZE, "group = \"db\"")
        .agent_log(AGENT, WAL, &wal_dir, "glob = \"0*\"\ngroup = \"db\"")
        .start();
    let fleet_started = started.elapsed();
    // A long interval: the coordinator starts no volume sync of its own during the test.
    fleet.cli(&["group", "create", GROUP, "--interval", "30d"]);
    // The agent's config asks for the group; the admin lets the host join it.
    fleet.cli(&["group", "allow", GROUP, AGENT]);
    for s in [VOLUME, WAL] {
        let info = fleet.source_info(s);
        assert_eq!(
            json_str(&info, "group"),
            GROUP,
            "{s} is in group {GROUP}: {info}"
        );
    }

    let v = fleet.sync(VOLUME);
    let volume_point = json_u64(&v, "point");
    // The archive is still empty: a ship of nothing.
    let empty = fleet.sync(WAL);
    assert_eq!(
        json_u64(&empty, "files_sent"),
        0,
        "nothing to ship yet: {empty}"
    );

    let mut primary = Server::new(&pg, "primary", &data, &pg_logs.join("primary.log"), port);
    primary.start();
    primary.psql(&[
        "create table t(batch int not null, at timestamptz not null default clock_timestamp())",
    ]);

    let (seg1, _) = batch(&fleet, &primary, &wal_dir, BATCHES[0]);
    std::thread::sleep(Duration::from_millis(700));
    let (seg2, ship2) = batch(&fleet, &primary, &wal_dir, BATCHES[1]);
    // T: after batch 2's commit and its ship, before batch 3.
    std::thread::sleep(Duration::from_millis(1000));
    let t_ms = now_ms();
    let t = rfc3339_ms(t_ms);
    std::thread::sleep(Duration::from_millis(1000));
    let (seg3, ship3) = batch(&fleet, &primary, &wal_dir, BATCHES[2]);
    assert!(
        seg1 < seg2 && seg2 < seg3,
        "each batch is in a later segment: {seg1}, {seg2}, {seg3}"
    );
    assert_eq!(
        primary.psql(&["select batch, count(*) from t group by batch order by batch"]),
        "1|100\n2|200\n3|300",
        "the primary has every batch"
    );
    let last_commit = primary.psql(&["select max(at) from t where batch = 2"]);
    let first_after = primary.psql(&["select min(at) from t where batch = 3"]);
    eprintln!("T = {t}; batch 2 written by {last_commit}, batch 3 from {first_after}");
    primary.stop("fast").expect("stop the primary");

    // Restore to T, named by the volume source of the group.
    let to = root.join("restore");
    let to_s = to.to_string_lossy().into_owned();
    let r = fleet.cli_json(&[
        "restore", VOLUME, "--at", &t, "--to", &to_s, "--wait", "--json",
    ]);
    assert_eq!(
        json_u64(&r, "point"),
        volume_point,
        "the volume point at or before T: {r}"
    );
    assert_eq!(json_str(&r, "log_source"), WAL, "{r}");
    assert_eq!(
        json_u64(&r, "log_point"),
        ship3,
        "the first ship at or after T (the one after batch 3), not {ship2} (before T): {r}"
    );
    assert_eq!(
        json_u64(&r, "log_files"),
        3,
        "{seg1}, {seg2} and {seg3}: {r}"
    );
    assert_eq!(
        parse_rfc3339_ms(&json_str(&r, "at")),
        Ok(t_ms),
        "the restore reports the moment asked for: {r}"
    );

    let manifest_path = to.join("restore.json");
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(&manifest_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", manifest_path.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", manifest_path.display()));
    assert_eq!(manifest["volume"]["source"], VOLUME, "{manifest}");
    assert_eq!(manifest["volume"]["point"], volume_point, "{manifest}");
    assert_eq!(manifest["volume"]["path"], "volume", "{manifest}");
    assert_eq!(manifest["logs"]["source"], WAL, "{manifest}");
    assert_eq!(manifest["logs"]["point"], ship3, "{manifest}");
    assert_eq!(manifest["logs"]["path"], "logs", "{manifest}");
    let restore_command = manifest["postgresql"]["restore_command"]
        .as_str()
        .unwrap_or_else(|| panic!("restore.json has no postgresql.restore_command: {manifest}"))
        .to_string();
    assert!(
        restore_command.contains(&format!("{to_s}/logs/%f")) && restore_command.contains("%p"),
        "restore.json's restore_command copies from {to_s}/logs: {manifest}"
    );
    let target = manifest["postgresql"]["recovery_target_time"]
        .as_str()
        .unwrap_or_else(|| {
            panic!("restore.json has no postgresql.recovery_target_time: {manifest}")
        });
    assert_eq!(
        parse_rfc3339_ms(target),
        Ok(t_ms),
        "restore.json's recovery_target_time is T: {manifest}"
    );

    assert_same_file(
        &to.join("volume"),
        &volume,
        "the restored volume is the base backup",
    );
    let logs = file_names(&to.join("logs"));
    assert_eq!(
        logs,
        vec![seg1.clone(), seg2.clone(), seg3.clone()],
        "logs/ holds the archive as of the first ship after T, batch 3's segment {seg3} \
         included (so recovery_target_time, not a short archive, must stop the replay)"
    );
    for s in [&seg1, &seg2, &seg3] {
        assert_same_file(
            &to.join("logs").join(s),
            &wal_dir.join(s),
            "a restored WAL segment",
        );
    }

    // A new cluster from the restore: the data directory out of the volume, the WAL
    // through restore_command, replayed up to T and promoted.
    let restored = root.join("restored");
    std::fs::create_dir(&restored).expect("mkdir restored");
    let volume_copy = to.join("volume").to_string_lossy().into_owned();
    let restored_s = restored.to_string_lossy().into_owned();
    run_ok("tar", &["-C", &restored_s, "-xf", &volume_copy]);
    let rdata = restored.join("data");
    let _ = std::fs::remove_file(rdata.join("postmaster.pid"));
    std::fs::set_permissions(&rdata, Permissions::from_mode(0o700)).expect("chmod the data dir");
    File::create(rdata.join("recovery.signal")).expect("recovery.signal");
    // restore.json's recovery_target_time as given: "+00:00", never "Z", which
    // PostgreSQL refuses in this setting.
    assert!(
        !target.ends_with('Z'),
        "PostgreSQL refuses a Z zone here: {target}"
    );
    let target_pg = target.to_string();
    let rport = free_port();
    append_conf(
        &rdata,
        &format!(
            "port = {rport}\narchive_mode = off\nrestore_command = '{}'\n\
             recovery_target_time = '{target_pg}'\nrecovery_target_action = 'promote'\n",
            restore_command.replace('\'', "''")
        ),
    );
    pg.give(&restored);
    let rlog = pg_logs.join("restored.log");
    let mut copy = Server::new(&pg, "restored", &rdata, &rlog, rport);
    copy.start();
    poll(
        "the restored server to finish recovery and promote",
        PG_TIMEOUT,
        || match pg.try_psql(rport, &["select pg_is_in_recovery()"]) {
            Ok(s) if s == "f" => Ok(()),
            Ok(s) => Err(format!(
                "pg_is_in_recovery() = {s}; log:\n{}",
                tail(&rlog, 10)
            )),
            Err(e) => Err(e),
        },
    );
    let rows = copy.psql(&["select batch, count(*) from t group by batch order by batch"]);
    assert_eq!(
        rows, "1|100\n2|200",
        "the restored database has batches 1 and 2 and not batch 3 (batch|rows); T = {t}"
    );
    let log = std::fs::read_to_string(&rlog).expect("the restored server's log");
    assert!(
        log.contains(&format!("restored log file \"{seg3}\" from archive")),
        "recovery read batch 3's segment {seg3} from logs/:\n{log}"
    );
    assert!(
        log.contains("recovery stopping before commit of transaction"),
        "the recovery target stopped the replay before batch 3's commit:\n{log}"
    );
    copy.stop("fast").expect("stop the restored server");
    eprintln!(
        "postgres_pitr took {:.1} s ({:.1} s until the fleet was up, daemon build included)",
        started.elapsed().as_secs_f64(),
        fleet_started.as_secs_f64()
    );
}

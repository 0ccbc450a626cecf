//! Real etcd clusters for the etcd state backend's tests: 1 or 3 members on free
//! 127.0.0.1 ports, data directories in a temporary directory, optionally TLS with
//! client certificates (a CA and certificates made with `bulwark_common::pki`).
//! Members can be killed with SIGKILL and started again; everything is stopped on
//! drop.
//!
//! [`EtcdCluster::start`] returns `None` after printing the skip line (facility
//! `etcd`) when no `etcd` binary is installed (Debian: `etcd-server`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bulwark_proto::etcd::{RangeRequest, kv_client::KvClient};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::free_port;
use crate::process::tail;

/// TLS files of a cluster started with TLS: the CA, the members' certificate, and
/// a client certificate and key the coordinator presents.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub member_cert: PathBuf,
    pub member_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster (see the module docs).
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    tls: Option<EtcdTlsFiles>,
    token: String,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdCluster({})", self.endpoints().join(","))
    }
}

/// How long a cluster or a restarted member gets to become healthy.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

impl EtcdCluster {
    /// Starts `n` members without TLS and waits until every one serves a
    /// linearizable read. `None` (skip printed) without an `etcd` binary.
    pub fn start(n: usize) -> Option<EtcdCluster> {
        Self::start_with(n, false)
    }

    /// [`EtcdCluster::start`] with TLS on the client port and client certificates
    /// required (`--client-cert-auth`).
    pub fn start_tls(n: usize) -> Option<EtcdCluster> {
        Self::start_with(n, true)
    }

    fn start_with(n: usize, tls: bool) -> Option<EtcdCluster> {
        if !crate::have_tool("etcd", "Debian package etcd-server") {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir for etcd");
        let tls = tls.then(|| make_certs(dir.path()));
        let members = (1..=n)
            .map(|i| Member {
                name: format!("e{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.path().join(format!("e{i}.data")),
                log: dir.path().join(format!("e{i}.log")),
                child: None,
            })
            .collect();
        let mut c = EtcdCluster {
            dir,
            members,
            tls,
            token: format!("bulwark-test-{}", rand::random::<u64>()),
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_healthy(i);
        }
        Some(c)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client URLs, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.members[i].client_port
        )
    }

    /// The TLS files, for a cluster started with [`EtcdCluster::start_tls`].
    pub fn tls(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref()
    }

    /// A directory that lives as long as the cluster.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let client = self.endpoint(i);
        let m = &self.members[i];
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token]);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.member_cert)
                .arg("--key-file")
                .arg(&t.member_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", m.log.display()));
        let err = log.try_clone().expect("duplicate the etcd log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd member {}: {e}", m.name));
        self.members[i].child = Some(child);
    }

    /// Waits until member `i` serves a linearizable read (so it is up and the
    /// cluster has a quorum); panics with the end of its log otherwise.
    pub fn wait_healthy(&mut self, i: usize) {
        let url = self.endpoint(i);
        let tls = self.tls.clone();
        let m = &mut self.members[i];
        let log = m.log.clone();
        let child = m.child.as_mut();
        if let Some(c) = child
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!(
                "etcd member {} exited ({status}):\n{}",
                m.name,
                tail(&log, 30)
            );
        }
        crate::poll(
            &format!("etcd member {url} to serve reads"),
            HEALTHY_TIMEOUT,
            || {
                crate::block_on(probe(&url, tls.as_ref()))
                    .map_err(|e| format!("{e}; end of {}:\n{}", log.display(), tail(&log, 5)))
            },
        );
    }

    /// SIGKILL of member `i`, waiting for it to exit.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory and waits until it serves
    /// reads (which needs a quorum with the others).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Starts member `i` again without waiting (when it cannot have a quorum yet).
    pub fn start_member(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// The end of member `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        tail(&self.members[i].log, lines)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// One linearizable read through member `url`, with a short deadline.
async fn probe(url: &str, tls: Option<&EtcdTlsFiles>) -> Result<(), String> {
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2));
    if let Some(t) = tls {
        ep = ep.tls_config(client_tls(t)).map_err(|e| e.to_string())?;
    }
    let ch = ep.connect().await.map_err(|e| format!("connect: {e}"))?;
    KvClient::new(ch)
        .range(RangeRequest {
            key: b"/bulwark-test-health".to_vec(),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|s| format!("range: {s}"))
}

/// tonic's client TLS for the cluster's files.
pub fn client_tls(t: &EtcdTlsFiles) -> ClientTlsConfig {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&t.ca)))
        .identity(Identity::from_pem(
            read(&t.client_cert),
            read(&t.client_key),
        ))
}

/// A CA, one certificate for every member (127.0.0.1, localhost) and one client
/// certificate, in `dir/pki`.
fn make_certs(dir: &Path) -> EtcdTlsFiles {
    use bulwark_common::pki::{LeafRequest, Role, init, issue};
    let pki = dir.join("pki");
    let ca = init(&pki, "etcd.test").expect("etcd test CA");
    let leaf = |name: &str, role: Role| {
        issue(
            &pki,
            &LeafRequest {
                role,
                name: name.into(),
                dns: vec!["localhost".into()],
                ips: vec!["127.0.0.1".parse().expect("an IP address")],
                days: 30,
            },
        )
        .unwrap_or_else(|e| panic!("issue {name}: {e}"))
    };
    let member = leaf("etcd-member", Role::Node);
    let client = leaf("coordinator", Role::Coordinator);
    EtcdTlsFiles {
        ca,
        member_cert: member.cert,
        member_key: member.key,
        client_cert: client.cert,
        client_key: client.key,
    }
}

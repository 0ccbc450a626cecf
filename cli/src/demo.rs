//! `bulwark demo`: a whole fleet on this machine — a fresh CA, a coordinator, two
//! storage nodes and an agent, each over real mutual TLS on 127.0.0.1 — protecting
//! a sample volume through a full sync, scattered rewrites, an incremental sync and
//! two restores checked by BLAKE3. The daemons run as tasks of this process, started
//! from TOML configs the demo writes, exactly as their own binaries start them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulwark_common::config::{TlsFiles, format_size};
use bulwark_common::tls::Role;
use bulwark_proto as pb;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::output::format_ms;
use crate::sync::sync_line;

const VOLUME_BYTES: usize = 64 << 20;
const BLOCK: usize = 64 << 10;
const REWRITES: usize = 40;

fn say(s: impl AsRef<str>) {
    println!("{}", s.as_ref());
}

fn tls_toml(pki: &Path, name: &str) -> String {
    format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.join("ca.crt").display(),
        pki.join(format!("{name}.crt")).display(),
        pki.join(format!("{name}.key")).display()
    )
}

fn hash_file(path: &Path) -> anyhow::Result<blake3::Hash> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(h.finalize())
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out waiting for {what}")
}

/// Runs the demo; removes its directory afterwards unless `keep`.
pub async fn run(keep: bool) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("bulwark-demo-").tempdir()?;
    let dir = tmp.path().to_path_buf();
    let result = demo(&dir).await;
    if keep {
        let kept = tmp.keep();
        say(format!(
            "\nThe demo's files are kept in {}.",
            kept.display()
        ));
    } else {
        drop(tmp);
    }
    match result {
        Ok(()) => {
            say("\nDemo finished: every restored point matched the volume byte for byte.");
            Ok(())
        }
        Err(e) => Err(e.context("the demo failed")),
    }
}

/// The fleet's running daemons and how to stop them.
struct Fleet {
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

async fn demo(dir: &Path) -> anyhow::Result<()> {
    let pki = dir.join("pki");
    say(format!("Bulwark demo in {}\n", dir.display()));
    make_pki(&pki)?;
    let mut fleet = Fleet {
        shutdown: CancellationToken::new(),
        tasks: Vec::new(),
    };
    let (caddr, coordinator_url) = start_coordinator(dir, &pki, &mut fleet).await?;
    start_nodes(dir, &pki, &coordinator_url, &mut fleet).await?;
    let files = TlsFiles {
        ca: pki.join("ca.crt"),
        cert: pki.join("admin.crt"),
        key: pki.join("admin.key"),
        renew_before: None,
    };
    let mut admin = Admin::connect(&coordinator_url, &files).await?;
    let mut c = admin.client.clone();
    wait_for("both storage nodes", async || {
        c.list_nodes(pb::ListNodesRequest {})
            .await
            .map(|r| {
                r.into_inner()
                    .nodes
                    .iter()
                    .filter(|n| n.state == "up")
                    .count()
                    == 2
            })
            .unwrap_or(false)
    })
    .await?;
    say(format!(
        "2. Started the coordinator on {caddr} and two storage nodes (20 GiB pools); both registered."
    ));
    let volume = dir.join("sample-volume.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let mut image = vec![0u8; VOLUME_BYTES];
    // Data with holes, like a real disk: three quarters written, the rest zeros.
    rng.fill(&mut image[..VOLUME_BYTES * 3 / 4]);
    std::fs::write(&volume, &image)?;
    let node = start_agent(dir, &pki, &coordinator_url, &volume, &admin, &mut fleet).await?;
    sync_and_restore(dir, &mut admin, &node, &volume, &mut image, &mut rng).await?;
    say("11. Stopping the fleet.");
    fleet.stop().await
}

/// Step 1: the fleet CA and a certificate for each process and the admin.
fn make_pki(pki: &Path) -> anyhow::Result<()> {
    bulwark_common::pki::init(pki, "demo.bulwark")?;
    for (role, name) in [
        (Role::Coordinator, "coordinator"),
        (Role::Node, "node-1"),
        (Role::Node, "node-2"),
        (Role::Agent, "demo-host"),
        (Role::Admin, "admin"),
    ] {
        bulwark_common::pki::issue(
            pki,
            &bulwark_common::pki::LeafRequest {
                role,
                name: name.into(),
                dns: vec!["localhost".into()],
                ips: vec!["127.0.0.1".parse()?],
                days: 1,
            },
        )?;
    }
    say(
        "1. Made a fleet CA (trust domain demo.bulwark) and signed certificates for a coordinator,",
    );
    say("   two storage nodes, an agent and an admin. Every connection below is TLS 1.3 with");
    say("   client certificates, and each side checks the other's role.");
    Ok(())
}

/// Starts the coordinator from a `coordinator.toml`; returns its address and URL.
async fn start_coordinator(
    dir: &Path,
    pki: &Path,
    fleet: &mut Fleet,
) -> anyhow::Result<(std::net::SocketAddr, String)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let caddr = listener.local_addr()?;
    let coordinator_url = format!("https://{caddr}");
    let ctoml = dir.join("coordinator.toml");
    std::fs::write(
        &ctoml,
        format!(
            "listen = \"{caddr}\"\ndata_dir = \"{}\"\n{}",
            dir.join("coordinator").display(),
            tls_toml(pki, "coordinator")
        ),
    )?;
    let cfg = bulwark_coordinator::config::CoordinatorConfig::load(&ctoml)?;
    fleet
        .tasks
        .push(tokio::spawn(bulwark_coordinator::server::run(
            cfg,
            listener,
            fleet.shutdown.clone(),
        )));
    Ok((caddr, coordinator_url))
}

/// Starts two storage nodes from their `node-N.toml`s.
async fn start_nodes(
    dir: &Path,
    pki: &Path,
    coordinator_url: &str,
    fleet: &mut Fleet,
) -> anyhow::Result<()> {
    for name in ["node-1", "node-2"] {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        std::fs::create_dir_all(dir.join(name).join("disk1"))?;
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"{name}\"\nlisten = \"{addr}\"\ncoordinator = \"{coordinator_url}\"\ndata_dir = \"{}\"\nheartbeat_interval = \"1s\"\n[[pool.disks]]\npath = \"{}\"\ncapacity = \"20GiB\"\n{}",
                dir.join(name).join("data").display(),
                dir.join(name).join("disk1").display(),
                tls_toml(pki, name)
            ),
        )?;
        let cfg = bulwark_node::config::NodeConfig::load(&path)?;
        fleet.tasks.push(tokio::spawn(bulwark_node::server::run(
            cfg,
            listener,
            fleet.shutdown.clone(),
        )));
    }
    Ok(())
}

/// Step 3: starts the agent protecting `volume` and waits until it is connected;
/// returns the node the coordinator placed the volume on.
async fn start_agent(
    dir: &Path,
    pki: &Path,
    coordinator_url: &str,
    volume: &Path,
    admin: &Admin,
    fleet: &mut Fleet,
) -> anyhow::Result<String> {
    let atoml = dir.join("agent.toml");
    std::fs::write(
        &atoml,
        format!(
            "name = \"demo-host\"\ncoordinator = \"{coordinator_url}\"\nstate_dir = \"{}\"\n[[sources]]\nname = \"demo-data\"\nkind = \"volume\"\npath = \"{}\"\ntracker = \"fingerprint\"\nblock_size = \"64KiB\"\nsync_interval = \"1h\"\n{}",
            dir.join("agent-state").display(),
            volume.display(),
            tls_toml(pki, "demo-host")
        ),
    )?;
    let cfg = bulwark_agent::config::AgentConfig::load(&atoml)?;
    fleet.tasks.push(tokio::spawn(bulwark_agent::server::run(
        cfg,
        fleet.shutdown.clone(),
    )));
    let mut c = admin.client.clone();
    wait_for("the agent", async || {
        c.list_agents(pb::ListAgentsRequest {})
            .await
            .map(|r| r.into_inner().agents.iter().any(|a| a.connected))
            .unwrap_or(false)
    })
    .await?;
    let sources = c
        .list_sources(pb::ListSourcesRequest {})
        .await?
        .into_inner()
        .sources;
    let node = sources.first().map(|s| s.node.clone()).unwrap_or_default();
    say(format!(
        "3. Started agent demo-host protecting {} ({}); the coordinator placed it on {node}.",
        volume.display(),
        format_size(VOLUME_BYTES as u64)
    ));
    Ok(node)
}

/// Steps 4 to 10: a full sync, scattered rewrites, an incremental sync, both
/// points restored and compared, and a deep consistency check.
async fn sync_and_restore(
    dir: &Path,
    admin: &mut Admin,
    node: &str,
    volume: &Path,
    image: &mut [u8],
    rng: &mut rand::rngs::StdRng,
) -> anyhow::Result<()> {
    // Full sync.
    let (r1, _) = admin.sync_wait("demo-data").await?;
    let hash1 = blake3::hash(image);
    say(format!("4. Full sync: {}", sync_line(&r1)));
    say("   (the unwritten quarter of the volume was recognised as zeros and not sent)");

    // Scattered rewrites, then the incremental sync.
    let blocks = VOLUME_BYTES / BLOCK;
    let mut touched = std::collections::BTreeSet::new();
    while touched.len() < REWRITES {
        touched.insert(rng.random_range(0..blocks));
    }
    for b in &touched {
        rng.fill(&mut image[b * BLOCK..(b + 1) * BLOCK]);
    }
    std::fs::write(volume, &*image)?;
    let hash2 = blake3::hash(image);
    say(format!(
        "5. Rewrote {REWRITES} scattered 64 KiB blocks of the volume."
    ));
    let (r2, _) = admin.sync_wait("demo-data").await?;
    say(format!("6. Incremental sync: {}", sync_line(&r2)));
    if r2.blocks_sent != REWRITES as u64 {
        bail!(
            "the incremental sync sent {} blocks, expected {REWRITES}",
            r2.blocks_sent
        );
    }

    let points = admin.points("demo-data").await?;
    say(format!(
        "7. {node} now holds {} recovery points of demo-data.",
        points.len()
    ));
    restore_and_compare(dir, admin, [(8, r1.point, hash1), (9, r2.point, hash2)]).await?;
    deep_check(admin).await
}

/// Steps 8 and 9: restores each point and compares it with the volume as it was.
async fn restore_and_compare(
    dir: &Path,
    admin: &mut Admin,
    steps: [(u32, u64, blake3::Hash); 2],
) -> anyhow::Result<()> {
    for (step, point, want) in steps {
        let to: PathBuf = dir.join(format!("restored-point-{point}.img"));
        let r = admin.restore_wait("demo-data", point, &to, None).await?;
        let got = hash_file(&to)?;
        if got != want {
            bail!(
                "restored point {point} differs from the volume as it was (BLAKE3 {got} vs {want})"
            );
        }
        say(format!(
            "{step}. Restored point {point} to {} ({} in {}): BLAKE3 {} matches the volume at that point.",
            to.display(),
            format_size(r.bytes_written),
            format_ms(r.duration_ms),
            &got.to_hex()[..16]
        ));
    }
    Ok(())
}

/// Step 10: a deep consistency check — the node recomputes its checksums from
/// the replica — which must find nothing on an intact replica.
async fn deep_check(admin: &mut Admin) -> anyhow::Result<()> {
    let (r3, _) = admin
        .sync_request("demo-data", true, true, true)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the check returned no result"))?;
    say(format!("10. Deep consistency check: {}", sync_line(&r3)));
    if r3.blocks_sent != 0 || r3.damaged_blocks != 0 {
        bail!(
            "the check found {} differing and {} damaged blocks on an intact replica",
            r3.blocks_sent,
            r3.damaged_blocks
        );
    }
    Ok(())
}

impl Fleet {
    /// Cancels every daemon and waits for each to stop cleanly.
    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for t in self.tasks {
            match tokio::time::timeout(Duration::from_secs(10), t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => bail!("a daemon failed: {e:#}"),
                Ok(Err(e)) => bail!("a daemon panicked: {e}"),
                Err(_) => bail!("a daemon did not stop within 10 s"),
            }
        }
        Ok(())
    }
}

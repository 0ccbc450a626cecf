//! Load test: one storage node receives full syncs from N concurrent agents at once
//! (default 500), each over its own mTLS connection with its own agent certificate,
//! registered with the coordinator through its own control stream — simulated in
//! this one process, against the real coordinator and node binaries.
//!
//! Prints how many syncs committed and were refused, latency percentiles, the
//! node's peak memory (VmHWM) and its memory after the load. Run it with
//! `bash bench/fanin.sh` (raises the open-file limit, builds release binaries).
//!
//! Options: `--agents N` (500), `--kib K` per volume (256), `--block-kib B` (64).

use std::time::{Duration, Instant};

use bulwark_common::block::Digest;
use bulwark_common::pki::{self, LeafRequest};
use bulwark_common::tls::Role;
use bulwark_proto as pb;
use bulwark_tests::{Fleet, TlsFiles, grpc};
use tokio_stream::StreamExt;

fn vm(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// One simulated agent: registers its source over a control stream (kept open while
/// it syncs), then runs one full sync of `size` random bytes to the node.
async fn agent(
    coordinator: String,
    id: TlsFiles,
    name: String,
    size: u64,
    block: u32,
) -> Result<Duration, String> {
    let source = format!("{name}-data");
    let mut coord = grpc::coordinator_client(&coordinator, &id).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            sources: vec![pb::SourceSpec {
                name: source.clone(),
                kind: pb::SourceKind::Volume as i32,
                size_bytes: size,
                block_size: block,
                tracker: "fingerprint".into(),
                inconsistent: false,
                recheck_bytes: 0,
                busy: false,
                policy: None,
                group: String::new(),
            }],
            version: bulwark_common::VERSION.into(),
        })),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut commands = coord
        .control(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("control stream refused: {}", s.message()))?
        .into_inner();
    let welcome = match commands.next().await {
        Some(Ok(pb::CoordinatorCommand {
            cmd: Some(pb::coordinator_command::Cmd::Welcome(w)),
        })) => w,
        other => return Err(format!("no Welcome: {other:?}")),
    };
    let a = welcome
        .sources
        .first()
        .and_then(|r| r.assignment.clone())
        .ok_or("the source was not placed")?;
    let data: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
    let checksums: Vec<bytes::Bytes> = data
        .chunks(block as usize)
        .map(|c| bytes::Bytes::copy_from_slice(&Digest::of(c).0))
        .collect();
    let started = Instant::now();
    let mut node = grpc::node_client(&a.node_address, &id).await;
    let begin = pb::SyncBegin {
        source: source.clone(),
        epoch: a.epoch,
        size_bytes: size,
        block_size: block,
        base_point: 0,
        consistency: pb::Consistency::Crash as i32,
        kind: pb::PointKind::Full as i32,
        want_digests: false,
        deep: false,
    };
    let rest = vec![
        pb::SyncMessage {
            msg: Some(pb::sync_message::Msg::Extents(pb::ExtentBatch {
                extents: vec![pb::Extent {
                    offset: 0,
                    data: data.into(),
                    checksums,
                    ..Default::default()
                }],
            })),
        },
        pb::SyncMessage {
            msg: Some(pb::sync_message::Msg::Commit(pb::SyncCommit {
                blocks_scanned: size.div_ceil(u64::from(block)),
                blocks_sent: size.div_ceil(u64::from(block)),
                bytes_sent: size,
                consistency: 0,
            })),
        },
    ];
    let ex = grpc::sync_exchange(&mut node, begin, rest, Duration::from_secs(600)).await;
    drop(tx);
    if ex.committed() {
        Ok(started.elapsed())
    } else {
        Err(format!("{:?}", ex.status))
    }
}

fn main() {
    let agents = bulwark_tests::example_arg("--agents", 500) as usize;
    let size = bulwark_tests::example_arg("--kib", 256) * 1024;
    let block = (bulwark_tests::example_arg("--block-kib", 64) * 1024) as u32;
    let mut fleet = Fleet::builder()
        .node("node-1")
        .node_capacity("100TiB")
        .start();
    let node_pid = fleet.node("node-1").pid().unwrap_or(0);
    let coordinator = fleet.coordinator_url().to_string();
    let pki_dir = fleet.pki().dir().to_path_buf();
    eprintln!("issuing {agents} agent certificates");
    let ids: Vec<(String, TlsFiles)> = (0..agents)
        .map(|i| {
            let name = format!("load-{i:04}");
            let issued = pki::issue(
                &pki_dir,
                &LeafRequest {
                    role: Role::Agent,
                    name: name.clone(),
                    dns: Vec::new(),
                    ips: Vec::new(),
                    days: 1,
                },
            )
            .unwrap_or_else(|e| panic!("cannot issue {name}: {e}"));
            (
                name,
                TlsFiles {
                    ca: fleet.pki().ca(),
                    cert: issued.cert,
                    key: issued.key,
                    renew_before: None,
                },
            )
        })
        .collect();
    let rss_before = vm(node_pid, "VmRSS:");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let started = Instant::now();
    let results: Vec<Result<Duration, String>> = rt.block_on(async {
        let tasks: Vec<_> = ids
            .into_iter()
            .map(|(name, id)| tokio::spawn(agent(coordinator.clone(), id, name, size, block)))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap_or_else(|e| Err(e.to_string())));
        }
        out
    });
    let wall = started.elapsed();
    let mut lat: Vec<f64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(Duration::as_secs_f64)
        .collect();
    lat.sort_by(f64::total_cmp);
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let pct = |p: usize| {
        lat.get((lat.len() * p / 100).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let hwm = vm(node_pid, "VmHWM:");
    let rss_after = vm(node_pid, "VmRSS:");
    println!(
        "fan-in load: {agents} simulated agents, one full sync each of {} KiB ({} KiB blocks), all at once, to one node over mTLS",
        size / 1024,
        block / 1024
    );
    println!(
        "committed {} of {agents}, refused or failed {}; wall {:.2} s ({:.1} MB/s in all)",
        lat.len(),
        failed.len(),
        wall.as_secs_f64(),
        (lat.len() as u64 * size) as f64 / wall.as_secs_f64() / 1e6
    );
    println!(
        "sync latency: p50 {:.2} s, p90 {:.2} s, p99 {:.2} s, max {:.2} s",
        pct(50),
        pct(90),
        pct(99),
        lat.last().copied().unwrap_or(0.0)
    );
    println!(
        "node memory: {} MiB before, peak {} MiB (VmHWM), {} MiB after",
        rss_before / 1024,
        hwm / 1024,
        rss_after / 1024
    );
    for f in failed.iter().take(5) {
        println!("failure: {f}");
    }
    let _ = fleet.stop_all();
    if !failed.is_empty() {
        std::process::exit(1);
    }
}

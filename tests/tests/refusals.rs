//! What the fleet refuses, and that a refusal changes nothing: after each one the
//! points are the same, the newest point still restores byte for byte, and the node's
//! replica files are untouched.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use bulwark_proto::{
    Consistency, Extent, ExtentBatch, PointKind, SyncBegin, SyncCommit, SyncMessage, sync_message,
};
use bulwark_tests::grpc::{TlsProbe, node_client, probe_without_client_cert, sync_exchange};
use bulwark_tests::{
    BLOCK_SIZE, Fleet, MIB, Pki, TlsFiles, Value, assert_same_file, block_on, dir_hashes, json_str,
    json_u64, poll,
};
use rand::RngCore;
use tonic::Code;

const SIZE: u64 = 4 * MIB;
const SOURCES: [(&str, &str); 2] = [("host-1", "host-1-data"), ("host-2", "host-2-data")];

/// The state a refusal must leave as it was.
struct Baseline {
    points: HashMap<String, Vec<Value>>,
    replicas: HashMap<String, (PathBuf, BTreeMap<PathBuf, blake3::Hash>)>,
}

/// One node, two agents with a small volume each, both synced once.
fn setup() -> (Fleet, Baseline) {
    let mut builder = Fleet::builder().node("node-1");
    for (agent, source) in SOURCES {
        builder = builder.agent(agent, source, SIZE);
    }
    let fleet = builder.start();
    let mut points = HashMap::new();
    let mut replicas = HashMap::new();
    for (_, source) in SOURCES {
        let r = fleet.sync(source);
        assert_eq!(json_u64(&r, "point"), 1, "first sync of {source}: {r}");
        let p = fleet.points(source);
        assert_eq!(p.len(), 1, "points of {source} after one sync: {p:?}");
        points.insert(source.to_string(), p);
        let dir = fleet.node_source_dir(&fleet.source_node(source), source);
        assert!(
            dir.is_dir(),
            "expected the replica of {source} in {} (<disk>/bulwark/<source>/)",
            dir.display()
        );
        let hashes = dir_hashes(&dir);
        assert!(!hashes.is_empty(), "{} holds no files", dir.display());
        replicas.insert(source.to_string(), (dir, hashes));
    }
    (fleet, Baseline { points, replicas })
}

/// Checks that nothing changed since [`setup`].
fn assert_unchanged(fleet: &Fleet, base: &Baseline, after: &str) {
    for (_, source) in SOURCES {
        let (dir, hashes) = &base.replicas[source];
        assert_eq!(
            &dir_hashes(dir),
            hashes,
            "the replica files of {source} in {} changed after {after}",
            dir.display()
        );
        assert_eq!(
            &fleet.points(source),
            &base.points[source],
            "the points of {source} changed after {after}"
        );
        let to = fleet.scratch(&format!("{source}-after-{}.img", after.replace(' ', "-")));
        let r = fleet.restore(source, None, &to, None);
        assert_eq!(
            json_u64(&r, "point"),
            1,
            "restore of the newest point of {source}: {r}"
        );
        assert_same_file(
            &to,
            &fleet.volume(source),
            &format!("restore of {source} after {after}"),
        );
    }
}

fn random_block() -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    rand::rng().fill_bytes(&mut b);
    b
}

fn batch(offset: u64, data: Vec<u8>, checksum: Vec<u8>) -> SyncMessage {
    SyncMessage {
        msg: Some(sync_message::Msg::Extents(ExtentBatch {
            extents: vec![Extent {
                offset,
                data: data.into(),
                checksums: vec![checksum.into()],
                ..Default::default()
            }],
        })),
    }
}

fn commit() -> SyncMessage {
    SyncMessage {
        msg: Some(sync_message::Msg::Commit(SyncCommit {
            blocks_scanned: SIZE / BLOCK_SIZE,
            blocks_sent: 1,
            bytes_sent: BLOCK_SIZE,
            consistency: 0,
        })),
    }
}

/// A `SyncBegin` for `source` as the coordinator describes it (epoch, size) on top of
/// its newest point; and the address of its node.
fn begin_for(fleet: &Fleet, source: &str) -> (SyncBegin, String) {
    let info = fleet.source_info(source);
    let address = fleet.node_address(&json_str(&info, "node"));
    let newest = fleet.point_ids(source).last().copied().unwrap_or(0);
    let begin = SyncBegin {
        source: source.to_string(),
        epoch: json_u64(&info, "epoch"),
        size_bytes: json_u64(&info, "size_bytes"),
        block_size: BLOCK_SIZE as u32,
        base_point: newest,
        consistency: Consistency::Crash as i32,
        kind: PointKind::Incremental as i32,
        want_digests: false,
        deep: false,
    };
    assert_eq!(begin.size_bytes, SIZE, "size of {source} in {info}");
    (begin, address)
}

/// Sends `begin` then `rest` to the node at `address` as `id`; returns the status the
/// stream ended with (panics if the node accepted it).
fn refused_sync(
    address: &str,
    id: &TlsFiles,
    begin: SyncBegin,
    rest: Vec<SyncMessage>,
    what: &str,
) -> tonic::Status {
    let ex = block_on(async {
        let mut client = node_client(address, id).await;
        sync_exchange(&mut client, begin, rest, Duration::from_secs(60)).await
    });
    assert!(
        !ex.committed(),
        "{what}: the node committed a point: {ex:?}"
    );
    ex.expect_error(what).clone()
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// The coordinator's log lines that refuse a TLS connection and give one of `why`.
fn refusals_logged(fleet: &mut Fleet, why: &[&str]) -> Vec<String> {
    fleet
        .coordinator()
        .log_since_start()
        .lines()
        .filter(|l| {
            l.contains("refused TLS connection: invalid peer certificate: ")
                && why.iter().any(|w| l.contains(w))
        })
        .map(str::to_string)
        .collect()
}

/// Runs `bulwark nodes` as `id`, which the coordinator must refuse in the TLS
/// handshake: the CLI fails and says to check the certificate, and the coordinator
/// logs a new refusal that gives one of `why` (its verifier's reason, so a refusal
/// for any other reason, or none at all, fails the test).
fn assert_handshake_refused(fleet: &mut Fleet, id: &TlsFiles, why: &[&str], what: &str) {
    let before = refusals_logged(fleet, why).len();
    let (_, stderr) = fleet.cli_expect_fail_as(id, &["nodes", "--json"]);
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "the CLI does not explain that {what} was refused: {stderr}"
    );
    poll(
        &format!("the coordinator to log why it refused {what}"),
        Duration::from_secs(10),
        || {
            let lines = refusals_logged(fleet, why);
            if lines.len() > before {
                Ok(())
            } else {
                let log = fleet.coordinator().log_since_start();
                let refused: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("refused TLS connection"))
                    .collect();
                Err(format!(
                    "no new refusal giving one of {why:?}; the coordinator's refusals: {refused:#?}"
                ))
            }
        },
    );
}

#[test]
fn refuses_a_client_without_a_certificate() {
    let (mut fleet, base) = setup();
    const LINE: &str = "refused TLS connection";
    let before = count(&fleet.coordinator().log_since_start(), LINE);
    let port = fleet.coordinator_port();
    let ca = fleet.pki().ca();
    let probe = block_on(probe_without_client_cert(
        port,
        &ca,
        Duration::from_secs(15),
    ));
    match &probe {
        TlsProbe::HandshakeFailed(_) | TlsProbe::ReadFailed(_) => {}
        other => panic!(
            "a TLS client without a certificate was not refused with an error by the coordinator: {other:?}"
        ),
    }
    poll(
        "the coordinator to log the refused TLS connection",
        Duration::from_secs(10),
        || {
            let n = count(&fleet.coordinator().log_since_start(), LINE);
            if n > before {
                Ok(())
            } else {
                Err(format!("{LINE:?} logged {n} time(s), as before the probe"))
            }
        },
    );
    assert_unchanged(&fleet, &base, "a client without a certificate");
}

#[test]
fn refuses_a_certificate_from_another_ca() {
    let (mut fleet, base) = setup();
    let other = Pki::init(&fleet.root().join("other-pki"));
    let foreign = other.issue("admin", "admin");
    // The fleet's CA to check the server, a certificate signed by another CA.
    let id = TlsFiles {
        ca: fleet.pki().ca(),
        cert: foreign.cert,
        key: foreign.key,
        renew_before: None,
    };
    // rustls at the coordinator: the issuer is unknown, or (the other CA has the
    // same name) the signature does not verify with the fleet CA's key.
    assert_handshake_refused(
        &mut fleet,
        &id,
        &["UnknownIssuer", "BadSignature"],
        "a certificate from another CA",
    );
    assert_unchanged(&fleet, &base, "a certificate from another CA");
}

#[test]
fn refuses_an_agent_certificate_for_admin_commands() {
    let (fleet, base) = setup();
    let (_, stderr) = fleet.cli_expect_fail_as(&fleet.identity("host-1"), &["nodes", "--json"]);
    let lower = stderr.to_lowercase();
    assert!(
        lower.contains("permission denied") && lower.contains("admin"),
        "expected a permission denied that names the admin role: {stderr}"
    );
    assert_unchanged(&fleet, &base, "an agent calling admin RPCs");
}

#[test]
fn refuses_a_sync_of_another_agents_source() {
    let (fleet, base) = setup();
    let (begin, address) = begin_for(&fleet, "host-1-data");
    let data = random_block();
    let sum = blake3::hash(&data).as_bytes().to_vec();
    let status = refused_sync(
        &address,
        &fleet.identity("host-2"),
        begin,
        vec![batch(0, data, sum), commit()],
        "host-2 syncing host-1-data",
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("host-1-data"),
        "the refusal does not name the source: {status:?}"
    );
    assert_unchanged(&fleet, &base, "host-2 syncing host-1-data");
}

#[test]
fn refuses_a_block_with_a_wrong_checksum() {
    let (fleet, base) = setup();
    let (begin, address) = begin_for(&fleet, "host-1-data");
    let data = random_block();
    let mut wrong = blake3::hash(&data).as_bytes().to_vec();
    for b in &mut wrong {
        *b ^= 0x5a;
    }
    let status = refused_sync(
        &address,
        &fleet.identity("host-1"),
        begin,
        vec![batch(0, data, wrong), commit()],
        "a block with a wrong checksum",
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().to_lowercase().contains("checksum"),
        "the refusal does not mention the checksum: {status:?}"
    );
    assert_unchanged(&fleet, &base, "a wrong checksum");
}

#[test]
fn refuses_an_extent_past_the_volume_end() {
    let (fleet, base) = setup();
    let (begin, address) = begin_for(&fleet, "host-1-data");
    let data = random_block();
    let sum = blake3::hash(&data).as_bytes().to_vec();
    let status = refused_sync(
        &address,
        &fleet.identity("host-1"),
        begin,
        vec![batch(SIZE, data, sum), commit()],
        "an extent past the volume's end",
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("past the volume's end"),
        "the refusal does not say the extent is past the volume's end: {status:?}"
    );
    assert_unchanged(&fleet, &base, "an extent past the end");
}

#[test]
fn refuses_an_expired_certificate() {
    let (mut fleet, base) = setup();
    let expired = fleet
        .pki()
        .issue_with("admin", "expired-admin", &["--days", "-1"]);
    assert_handshake_refused(
        &mut fleet,
        &expired,
        &["certificate expired"],
        "an expired certificate",
    );
    assert_unchanged(&fleet, &base, "an expired admin certificate");
}

#[test]
fn refuses_a_node_certificate_for_admin_commands() {
    let (fleet, base) = setup();
    let (_, stderr) = fleet.cli_expect_fail_as(
        &fleet.identity("node-1"),
        &["sync", "host-1-data", "--wait"],
    );
    let lower = stderr.to_lowercase();
    assert!(
        lower.contains("permission denied") && lower.contains("admin"),
        "expected a permission denied that names the admin role: {stderr}"
    );
    assert_unchanged(&fleet, &base, "a node certificate calling admin RPCs");
}

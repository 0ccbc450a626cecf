//! Issue 27: `compress = "zstd"` on the wire. An agent with compression on syncs a
//! compressible volume (log-like text) and an incompressible one (random bytes):
//! the first puts fewer bytes on the wire than it syncs, the second sends its
//! extents raw; every point restores byte for byte. A hostile host that speaks the
//! sync stream itself with compressed extents (a decompression bomb, a wrong
//! logical length, a logical length over the batch limit, a frame whose blocks fail
//! their checksums, bytes that are no frame, an unknown codec) is refused with an
//! error that says what was wrong, and no point appears.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use bulwark_proto as pb;
use bulwark_tests::hostile::{HeldSync, sync_begin, sync_msg};
use bulwark_tests::{BLOCK_SIZE, Fleet, MIB, assert_same_file, json_u64, runtime};
use tonic::Code;

const AGENT: &str = "zhost";
const TEXT: &str = "z-text";
const RANDOM: &str = "z-random";
const SIZE: u64 = 16 * MIB;

/// Log-like text: compressible as real logs are (a few times), not trivially.
fn text(len: u64, seed: u64) -> Vec<u8> {
    let words = [
        "accepted",
        "connection",
        "from",
        "session",
        "closed",
        "user",
        "postgres",
        "checkpoint",
        "starting",
        "complete",
        "wrote",
        "buffers",
        "WAL",
        "file(s)",
        "added",
        "removed",
        "recycled",
        "write=",
        "sync=",
        "total=",
        "GET",
        "/api/v1",
        "200",
        "404",
        "ms",
        "kernel:",
        "eth0:",
        "link",
        "up",
        "cron[",
        "]:",
        "CMD",
    ];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let t = next() % 86_400;
        let line = format!(
            "2026-11-07T{:02}:{:02}:{:02}.{:03}Z host{} app[{}]:",
            t / 3600,
            t / 60 % 60,
            t % 60,
            next() % 1000,
            next() % 8,
            next() % 32768
        );
        out.extend_from_slice(line.as_bytes());
        for _ in 0..(4 + next() % 10) {
            out.push(b' ');
            out.extend_from_slice(words[(next() % words.len() as u64) as usize].as_bytes());
            if next() % 3 == 0 {
                out.extend_from_slice(format!("={}", next() % 100_000).as_bytes());
            }
        }
        out.push(b'\n');
    }
    out.truncate(len as usize);
    out
}

/// Overwrites `blocks` whole blocks of `path` at `first`, `first + stride`, ...
/// with fresh text.
fn rewrite_text(path: &Path, first: u64, stride: u64, blocks: u64, seed: u64) {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the volume");
    for i in 0..blocks {
        f.seek(SeekFrom::Start((first + i * stride) * BLOCK_SIZE))
            .expect("seek");
        f.write_all(&text(BLOCK_SIZE, seed + i)).expect("write");
    }
    f.sync_all().expect("fsync the volume");
}

#[test]
fn compressed_syncs_send_fewer_bytes_and_restore_byte_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("text.img");
    std::fs::write(&volume, text(SIZE, 7)).expect("write the text volume");
    let mut fleet = Fleet::builder()
        .node("n1")
        .agent_source(AGENT, TEXT, Some(&volume), SIZE, "compress = \"zstd\"")
        .agent_source(AGENT, RANDOM, None, SIZE, "compress = \"zstd\"")
        .start();
    let mut saved = Vec::new();
    for round in 0..3u64 {
        if round > 0 {
            rewrite_text(&fleet.volume(TEXT), round * 3, 5, 40, round * 1000);
            bulwark_tests::rewrite_random_blocks(&fleet.volume(RANDOM), 25);
        }
        let t = fleet.sync(TEXT);
        let sent = json_u64(&t, "bytes_sent");
        let wire = json_u64(&t, "wire_bytes");
        let want = if round == 0 { SIZE } else { 40 * BLOCK_SIZE };
        assert_eq!(sent, want, "sync {round} of {TEXT}: {t}");
        assert!(
            wire > 0 && wire * 2 < sent,
            "sync {round} of {TEXT}: log-like text should travel in less than half its bytes: {t}"
        );
        let r = fleet.sync(RANDOM);
        assert_eq!(
            json_u64(&r, "wire_bytes"),
            json_u64(&r, "bytes_sent"),
            "sync {round} of {RANDOM}: random blocks do not shrink, so they go raw: {r}"
        );
        for (source, res) in [(TEXT, &t), (RANDOM, &r)] {
            let point = json_u64(res, "point");
            let copy = fleet.save_volume(source, &format!("{source}-p{point}.img"));
            saved.push((source, point, copy));
        }
    }
    // Every point, the oldest first, restores to the bytes the volume had.
    for (source, point, copy) in &saved {
        let to = fleet.scratch(&format!("{source}-restore-{point}.img"));
        let r = fleet.restore(source, Some(*point), &to, None);
        assert_eq!(json_u64(&r, "bytes_written"), SIZE, "restore {r}");
        assert_same_file(&to, copy, &format!("restore of point {point} of {source}"));
    }
    fleet.assert_all_alive();
}

/// One extent of `blocks` blocks at block `first`: checksums of `plain`, data as
/// given, with `codec` and `logical_len`.
fn extent(first: u64, plain: &[u8], data: Vec<u8>, codec: i32, logical_len: u64) -> pb::Extent {
    pb::Extent {
        offset: first * BLOCK_SIZE,
        data: data.into(),
        checksums: plain
            .chunks(BLOCK_SIZE as usize)
            .map(|b| blake3::hash(b).as_bytes().to_vec().into())
            .collect(),
        codec,
        logical_len,
    }
}

fn zstd_frame(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).expect("zstd compresses")
}

#[test]
fn hostile_compressed_extents_are_refused_and_keep_no_point() {
    let mut fleet = Fleet::builder()
        .node("n1")
        .agent_source(AGENT, TEXT, None, SIZE, "compress = \"zstd\"")
        .start();
    fleet.sync(TEXT);
    let before = fleet.point_ids(TEXT);
    let rt = runtime();
    let address = fleet.node_address("n1");
    let id = fleet.identity(AGENT);
    let zstd = pb::Codec::Zstd as i32;
    let bs = BLOCK_SIZE as usize;
    let two = text(2 * BLOCK_SIZE, 99);
    // A bomb: one block declared, 256 MiB of zeros in a frame of a few KiB.
    let zeros = vec![0u8; 256 * MIB as usize];
    let bomb = zstd_frame(&zeros);
    drop(zeros);
    let mut flipped = two.clone();
    flipped[bs + 5] ^= 1;
    let cases: Vec<(&str, pb::Extent, &[&str])> = vec![
        (
            "a decompression bomb",
            extent(0, &[0u8; BLOCK_SIZE as usize], bomb, zstd, BLOCK_SIZE),
            &["does not decode into its declared 65536 bytes"],
        ),
        (
            "a frame shorter than its logical length",
            extent(
                0,
                &text(3 * BLOCK_SIZE, 99),
                zstd_frame(&two),
                zstd,
                3 * BLOCK_SIZE,
            ),
            &["decodes to 131072 bytes, not its declared 196608"],
        ),
        (
            "a logical length of part of a block",
            extent(0, &two, zstd_frame(&two), zstd, 2 * BLOCK_SIZE - 1),
            &["compressed extent at offset 0", "block"],
        ),
        (
            "a logical length over the batch limit",
            extent(0, &two, zstd_frame(&two), zstd, 1 << 40),
            &["batches hold at most 1048576"],
        ),
        (
            "a frame whose blocks fail their checksums",
            extent(0, &two, zstd_frame(&flipped), zstd, 2 * BLOCK_SIZE),
            &["checksum"],
        ),
        (
            "bytes that are no zstd frame",
            extent(0, &two, two.clone(), zstd, 2 * BLOCK_SIZE),
            &["does not decode"],
        ),
        (
            "an unknown codec",
            extent(0, &two, zstd_frame(&two), 9, 2 * BLOCK_SIZE),
            &["unknown codec 9"],
        ),
    ];
    for (what, e, words) in cases {
        let base = *fleet.point_ids(TEXT).last().expect("a point");
        let begin = sync_begin(TEXT, 1, SIZE, base);
        let mut s = HeldSync::open(
            &rt,
            &address,
            &id,
            Some(sync_msg(pb::sync_message::Msg::Begin(begin))),
        );
        s.wait_ready(&rt, what);
        let batch = pb::ExtentBatch { extents: vec![e] };
        s.send(&rt, sync_msg(pb::sync_message::Msg::Extents(batch)));
        let (status, _) = s.wait_error(&rt, what, Duration::from_secs(30));
        eprintln!("{what}: {status:?}");
        assert!(
            status.code() == Code::InvalidArgument
                && status.message().contains(TEXT)
                && words.iter().all(|w| status.message().contains(w)),
            "{what} should be refused saying {words:?}: {status:?}"
        );
        assert_eq!(fleet.point_ids(TEXT), before, "points after {what}");
    }
    fleet.assert_all_alive();
    // The honest agent still syncs, and its points restore.
    let r = fleet.sync(TEXT);
    let point = json_u64(&r, "point");
    let copy = fleet.save_volume(TEXT, "after.img");
    let to = fleet.scratch("after-restore.img");
    fleet.restore(TEXT, Some(point), &to, None);
    assert_same_file(&to, &copy, "restore after the refusals");
}

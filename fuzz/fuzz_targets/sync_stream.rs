//! Sequences of sync stream messages against an in-process store: `SyncBegin`s
//! with any geometry, base and kind, `ExtentBatch`es of extents that are
//! overlapping, unaligned, out of range, cut short or carry the wrong checksums,
//! raw or zstd-compressed (with a wrong logical length, a frame that decodes to more
//! than declared, bytes that are no frame, an unknown codec),
//! `SyncCommit`s and empty messages, in any order. Each stream is driven through
//! the steps the node's sync service takes (storage-node/src/node/sync.rs), minus
//! gRPC and the coordinator: `SyncStart::try_from` (wire.rs), the registered
//! geometry check of admission, `Store::begin_sync` on the base `open_sync` picks,
//! `verify_batch`, `BeforeImageReader::prepare_many`, `SyncTxn::apply_prepared`,
//! and at `SyncCommit` `SyncTxn::commit` and `Store::settle`; anything else rolls
//! back with `SyncTxn::abort`.
//!
//! Properties: nothing panics, and a stream that is refused or ends before its
//! commit leaves the source's newest point as it was (no partial point); one
//! that commits makes its point the newest, restorable to the volume's size.
#![no_main]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use arbitrary::Arbitrary;
use bulwark_common::block::{Digest, Geometry};
use bulwark_common::point::Consistency;
use bulwark_node::node::sync::verify_batch;
use bulwark_node::store::{PoolDisk, RestoreItem, Store};
use bulwark_node::wire::SyncStart;
use bulwark_proto as pb;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// The registered volume: 4 KiB << (shift % 3) blocks, 1 to 16 of them, and a
    /// last partial block of `tail % block size` bytes.
    shift: u8,
    blocks: u8,
    tail: u16,
    streams: Vec<Stream>,
}

/// One sync stream: `begin` then `rest`, except when `lead % 8 == 0`, when it is
/// `rest` alone (which may start with anything).
#[derive(Arbitrary, Debug)]
struct Stream {
    lead: u8,
    begin: Begin,
    rest: Vec<Msg>,
}

impl Stream {
    fn messages(&self, name: &str, g: Geometry) -> Vec<pb::SyncMessage> {
        let begin = (self.lead % 8 != 0).then(|| begin_message(&self.begin, name, g));
        begin
            .into_iter()
            .chain(self.rest.iter().take(12).map(|m| message(m, name, g)))
            .collect()
    }
}

#[derive(Arbitrary, Debug)]
enum Msg {
    Begin(Begin),
    Extents(Vec<Ext>),
    Commit {
        app: bool,
    },
    /// A message with no `msg` set.
    Nothing,
}

#[derive(Arbitrary, Debug)]
struct Begin {
    /// 0: an invalid name, 1: another source, else the stream's.
    name: u8,
    geometry: GeometryChoice,
    base_point: u8,
    consistency: i8,
    kind: i8,
    want_digests: bool,
    deep: bool,
}

#[derive(Arbitrary, Debug)]
enum GeometryChoice {
    Registered,
    Raw { size_bytes: u64, block_size: u32 },
}

#[derive(Arbitrary, Debug)]
struct Ext {
    /// Block the extent starts at (past the end too), moved by `nudge` bytes.
    first_block: u8,
    nudge: i16,
    /// Blocks of data, 0 to 4, less `cut % 4096` bytes.
    blocks: u8,
    cut: u16,
    fill: u8,
    sums: Sums,
    /// How the data goes on the wire (the agent's `compress`, or a hostile frame).
    enc: Enc,
}

#[derive(Arbitrary, Debug)]
enum Enc {
    Raw,
    /// One zstd frame, as `compress = "zstd"` sends it.
    Zstd,
    /// A zstd frame whose declared logical length is off by `delta` bytes.
    ZstdWrongLen(i16),
    /// A zstd frame of `extra` KiB more zeros than declared (a decompression bomb).
    Bomb(u8),
    /// Bytes that are no zstd frame.
    Garbage,
    /// A codec no node knows.
    Unknown(i32),
    /// Raw, with a logical length that differs from the data.
    RawWithLen(u16),
}

#[derive(Arbitrary, Debug)]
enum Sums {
    Right,
    OneMissing,
    OneExtra,
    Corrupt(u8),
    Short(u8),
}

struct Fixture {
    store: Store,
    count: AtomicU64,
    /// Streams committed, refused at their start, and rolled back after it.
    committed: AtomicU64,
    refused: AtomicU64,
    rolled_back: AtomicU64,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = bulwark_fuzz::scratch();
        let disk = dir.join("disk");
        std::fs::create_dir_all(&disk).expect("pool disk");
        let disks = vec![PoolDisk {
            path: disk,
            // Logical: the store's room check, not the tmpfs, decides.
            capacity_bytes: 1 << 40,
        }];
        Fixture {
            store: Store::open(&dir.join("data"), disks).expect("open the store"),
            count: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            rolled_back: AtomicU64::new(0),
        }
    })
}

fn extent(e: &Ext, g: Geometry) -> pb::Extent {
    let bs = u64::from(g.block_size);
    let offset = (u64::from(e.first_block) * bs).wrapping_add_signed(i64::from(e.nudge));
    let len = (u64::from(e.blocks % 5) * bs).saturating_sub(u64::from(e.cut % 4096));
    let data: Vec<u8> = (0..len).map(|i| e.fill ^ (i / 4096) as u8).collect();
    let mut sums: Vec<Vec<u8>> = data
        .chunks(bs as usize)
        .map(|c| Digest::of(c).0.to_vec())
        .collect();
    match e.sums {
        Sums::Right => {}
        Sums::OneMissing => {
            sums.pop();
        }
        Sums::OneExtra => sums.push(vec![0; 32]),
        Sums::Corrupt(i) => {
            let n = sums.len();
            if let Some(s) = sums.get_mut(usize::from(i) % n.max(1)) {
                s[usize::from(i) % 32] ^= 1;
            }
        }
        Sums::Short(i) => {
            let n = sums.len();
            if let Some(s) = sums.get_mut(usize::from(i) % n.max(1)) {
                s.truncate(usize::from(i) % 32);
            }
        }
    }
    let (data, codec, logical_len) = encode(&e.enc, data);
    pb::Extent {
        offset,
        data: data.into(),
        checksums: sums.into_iter().map(Into::into).collect(),
        codec,
        logical_len,
    }
}

/// The wire form of `data` as `enc` says: (bytes, codec, logical length).
fn encode(enc: &Enc, data: Vec<u8>) -> (Vec<u8>, i32, u64) {
    let zstd = pb::Codec::Zstd as i32;
    let len = data.len() as u64;
    let frame = |d: &[u8]| zstd::bulk::compress(d, 1).expect("zstd compresses");
    match *enc {
        Enc::Raw => (data, 0, 0),
        Enc::Zstd => (frame(&data), zstd, len),
        Enc::ZstdWrongLen(delta) => (
            frame(&data),
            zstd,
            len.wrapping_add_signed(i64::from(delta)),
        ),
        Enc::Bomb(extra) => {
            let mut big = data;
            big.resize(big.len() + (usize::from(extra) + 1) * 1024, 0);
            (frame(&big), zstd, len)
        }
        Enc::Garbage => (data, zstd, len),
        Enc::Unknown(c) => (data, c, len),
        Enc::RawWithLen(l) => (data, 0, u64::from(l)),
    }
}

fn begin_message(b: &Begin, name: &str, g: Geometry) -> pb::SyncMessage {
    let (size_bytes, block_size) = match b.geometry {
        GeometryChoice::Registered => (g.size_bytes, g.block_size),
        GeometryChoice::Raw {
            size_bytes,
            block_size,
        } => (size_bytes, block_size),
    };
    let begin = pb::SyncBegin {
        source: match b.name {
            0 => "no/such name".into(),
            1 => "other".into(),
            _ => name.into(),
        },
        size_bytes,
        block_size,
        base_point: u64::from(b.base_point % 8),
        consistency: i32::from(b.consistency % 4),
        kind: i32::from(b.kind % 4),
        want_digests: b.want_digests,
        deep: b.deep,
        ..Default::default()
    };
    pb::SyncMessage {
        msg: Some(pb::sync_message::Msg::Begin(begin)),
    }
}

fn message(m: &Msg, name: &str, g: Geometry) -> pb::SyncMessage {
    use pb::sync_message::Msg as M;
    let msg = match m {
        Msg::Begin(b) => return begin_message(b, name, g),
        Msg::Extents(es) => Some(M::Extents(pb::ExtentBatch {
            extents: es.iter().take(8).map(|e| extent(e, g)).collect(),
        })),
        Msg::Commit { app } => Some(M::Commit(pb::SyncCommit {
            consistency: if *app { pb::Consistency::App as i32 } else { 0 },
            ..Default::default()
        })),
        Msg::Nothing => None,
    };
    pb::SyncMessage { msg }
}

/// One stream, as the service runs it: `Ok(Some(point))` committed,
/// `Ok(None)`/`Err` refused or rolled back.
fn drive(
    store: &Store,
    name: &str,
    registered: Geometry,
    msgs: Vec<pb::SyncMessage>,
) -> Result<Option<u64>, String> {
    use pb::sync_message::Msg as M;
    let mut msgs = msgs.into_iter();
    let start = SyncStart::try_from(msgs.next()).map_err(|e| format!("refused: {e}"))?;
    // Admission: the coordinator assigned this source, with this geometry.
    if start.source.as_str() != name {
        return Err("refused: not assigned here".into());
    }
    if start.geometry != registered {
        return Err("refused: not as registered".into());
    }
    // open_sync
    let newest = store
        .newest_point(name)
        .map_err(|e| e.to_string())?
        .map_or(0, |p| p.id);
    let spec = start.spec(newest, None);
    let mut txn = store
        .begin_sync(spec)
        .map_err(|e| format!("refused: {e}"))?;
    if start.want_digests && newest > 0 {
        let count = start.geometry.block_count();
        if start.deep {
            let _ = store.recompute_digests(name, 0, count);
        } else {
            let _ = store.read_digests(name, 0, count);
        }
    }
    let reader = match txn.before_images() {
        Ok(r) => r,
        Err(e) => {
            txn.abort().map_err(|e| format!("abort: {e}"))?;
            return Err(e.to_string());
        }
    };
    let mut failed = None;
    for msg in msgs {
        match msg.msg {
            Some(M::Extents(b)) if b.extents.is_empty() => {}
            Some(M::Extents(b)) => {
                let step = verify_batch(b, start.geometry, name)
                    .map_err(|s| s.message().to_string())
                    .and_then(|v| reader.prepare_many(vec![v]).map_err(|e| e.to_string()))
                    .and_then(|p| txn.apply_prepared(p).map_err(|e| e.to_string()));
                if let Err(e) = step {
                    failed = Some(e);
                    break;
                }
            }
            Some(M::Commit(c)) => {
                drop(reader);
                if c.consistency != 0 {
                    txn.set_consistency(Consistency::from_proto(c.consistency));
                }
                let point = txn.commit().map_err(|e| format!("commit: {e}"))?;
                // Committed: a settle that fails would be a bug, not a refusal.
                if let Err(e) = store.settle(name) {
                    panic!("the settle of committed point {} failed: {e}", point.id);
                }
                return Ok(Some(point.id));
            }
            Some(M::Begin(_)) | None => {
                failed = Some("unexpected message".into());
                break;
            }
        }
    }
    drop(reader);
    txn.abort().map_err(|e| format!("abort: {e}"))?;
    Err(failed.unwrap_or_else(|| "ended before SyncCommit".into()))
}

fn newest(store: &Store, name: &str) -> Option<u64> {
    store
        .newest_point(name)
        .expect("read the newest point")
        .map(|p| p.id)
}

fuzz_target!(|input: Input| {
    let f = fixture();
    let block_size = 4096u32 << (input.shift % 3);
    let size = u64::from(input.blocks % 16 + 1) * u64::from(block_size)
        + u64::from(input.tail) % u64::from(block_size);
    let registered = Geometry::new(size, block_size).expect("a valid geometry");
    // A source of its own for every input: each starts from nothing.
    let name = format!("v{}", f.count.fetch_add(1, Ordering::Relaxed));
    for stream in input.streams.iter().take(4) {
        let msgs = stream.messages(&name, registered);
        let before = newest(&f.store, &name);
        let outcome = drive(&f.store, &name, registered, msgs);
        let after = newest(&f.store, &name);
        match outcome {
            Ok(Some(point)) => {
                assert_eq!(after, Some(point), "a committed point is the newest");
                assert!(before.is_none_or(|b| b < point));
                let mut r = f
                    .store
                    .restore(&name, point)
                    .expect("restore a committed point");
                let mut bytes = 0;
                while let Some(item) = r.next_item().expect("read a committed point") {
                    if let RestoreItem::Data { data, .. } = item {
                        bytes += data.len() as u64;
                    }
                }
                assert!(bytes <= registered.size_bytes);
            }
            Ok(None) | Err(_) => {
                assert_eq!(before, after, "a refused sync left a point: {outcome:?}");
            }
        }
        if std::env::var_os("BULWARK_FUZZ_DEBUG").is_some() {
            eprintln!("sync_stream: {name}: {outcome:?}");
        }
        let counter = match &outcome {
            Ok(Some(_)) => &f.committed,
            Err(e) if e.starts_with("refused:") => &f.refused,
            _ => &f.rolled_back,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    let n = f.count.load(Ordering::Relaxed);
    if n.is_power_of_two() && n >= 1024 {
        eprintln!(
            "sync_stream: {n} inputs; streams committed {}, refused at SyncBegin {}, rolled back {}",
            f.committed.load(Ordering::Relaxed),
            f.refused.load(Ordering::Relaxed),
            f.rolled_back.load(Ordering::Relaxed)
        );
    }
    let _ = f.store.drop_source(&name);
});

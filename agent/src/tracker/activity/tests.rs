//! The activity log's crash property: a model of the filter (a volume, the node's
//! newest point, the dirty map, checkpoints, syncs) drives the real [`Activity`] over
//! a simulated log device that keeps only what was synced, crashes at a random step,
//! and checks that the re-check set after recovery holds every block that differs
//! from the node. Two deliberate bugs ([`Mutation`]) must make it fail.

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use proptest::strategy::ValueTree;

use super::*;
use crate::tracker::bitmap::DirtyMap;

/// A deliberate bug the property test must catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mutation {
    None,
    /// Slots are written but never synced: a crash loses them.
    SkipLogSync,
    /// A region leaves the log before a checkpoint covers its writes.
    EvictUncovered,
}

const BS: u64 = 4096;
const PER_REGION: u64 = 4;
const REGIONS: u64 = 64;
const BLOCKS: u64 = PER_REGION * REGIONS;

fn geometry() -> Geometry {
    Geometry::new(BLOCKS * BS, BS as u32).expect("geometry")
}

/// A log device that keeps what was written and, apart, what was synced.
#[derive(Clone)]
struct SimDevice(Arc<Mutex<(Vec<u8>, Vec<u8>)>>);

impl LogDevice for SimDevice {
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut d = lock(&self.0);
        let o = offset as usize;
        d.0[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        let mut d = lock(&self.0);
        d.1 = d.0.clone();
        Ok(())
    }
}

/// The filter's record, checkpointed "durably" into memory.
struct SimRecord {
    map: DirtyMap,
    frozen: Mutex<Option<Bitmap>>,
    base: Mutex<u64>,
    durable: Mutex<Option<(u64, Bitmap)>>,
}

impl Checkpoint for SimRecord {
    fn write_checkpoint(&self) -> std::io::Result<()> {
        let mut bits = self.map.snapshot();
        if let Some(f) = &*lock(&self.frozen) {
            bits.union_with(f);
        }
        *lock(&self.durable) = Some((*lock(&self.base), bits));
        Ok(())
    }
    fn invalidate(&self, _why: &str) -> std::io::Result<()> {
        *lock(&self.durable) = None;
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Write `count` blocks from `block` with byte `fill`.
    Write {
        block: u64,
        count: u64,
        fill: u8,
    },
    Checkpoint,
    /// A sync freezes the map (and checkpoints) ...
    Freeze,
    /// ... and the node commits what it read (the volume's frozen blocks, read now).
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..BLOCKS, 1..=6u64, any::<u8>()).prop_map(|(block, count, fill)| Op::Write {
            block,
            count: count.min(BLOCKS - block),
            fill,
        }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Freeze),
        1 => Just(Op::Commit),
    ]
}

/// An activity log of `extents` slots over a fresh simulated device, and the
/// simulated record it checkpoints.
fn simulated(extents: u32) -> (Activity, SimDevice, Arc<SimRecord>) {
    let g = geometry();
    let cfg = ActivityConfig {
        extents,
        region_bytes: PER_REGION * BS,
        checkpoint: Duration::from_secs(60),
    };
    let mut image = vec![0u8; ((1 + u64::from(extents)) * SECTOR) as usize];
    image[..SECTOR as usize].copy_from_slice(&header(extents, cfg.region_bytes, g));
    let dev = SimDevice(Arc::new(Mutex::new((image.clone(), image))));
    let record = Arc::new(SimRecord {
        map: DirtyMap::new(g),
        frozen: Mutex::new(None),
        base: Mutex::new(1),
        durable: Mutex::new(None),
    });
    let act = Activity::on_device(
        Box::new(dev.clone()),
        Path::new("sim.al"),
        g,
        cfg,
        record.clone(),
    );
    (act, dev, record)
}

/// Runs `ops` and crashes at step `crash_at` (a write crashes after its log update
/// when `phase` is 1, after its data write when 2). Err: a differing block the
/// recovery would not re-check.
fn run(ops: &[Op], crash_at: usize, phase: u8, mutation: Mutation) -> Result<(), String> {
    let (mut act, dev, record) = simulated(4);
    record.write_checkpoint().map_err(|e| e.to_string())?;
    act.mutation = mutation;
    // Point 1: the volume and the node both all zero.
    let mut volume = vec![0u8; BLOCKS as usize];
    let mut node = volume.clone();
    for (i, op) in ops.iter().enumerate() {
        let crash = i == crash_at;
        match op {
            Op::Write { block, count, fill } => {
                if crash && phase == 0 {
                    break;
                }
                let w = act
                    .begin_write(block * BS, count * BS)
                    .map_err(|e| e.to_string())?;
                if crash && phase == 1 {
                    break;
                }
                for b in *block..block + count {
                    volume[b as usize] = *fill;
                }
                if crash {
                    break;
                }
                record.map.mark(block * BS, count * BS);
                drop(w);
            }
            _ if crash => break,
            Op::Checkpoint => act.checkpoint().map_err(|e| e.to_string())?,
            Op::Freeze => {
                {
                    let mut f = lock(&record.frozen);
                    let mut taken = record.map.take();
                    if let Some(old) = f.take() {
                        taken.union_with(&old);
                    }
                    *f = Some(taken);
                }
                act.checkpoint().map_err(|e| e.to_string())?;
            }
            Op::Commit => {
                let Some(f) = lock(&record.frozen).take() else {
                    continue;
                };
                for (first, n) in f.runs() {
                    for b in first..first + n {
                        node[b as usize] = volume[b as usize];
                    }
                }
                *lock(&record.base) += 1;
                act.checkpoint().map_err(|e| e.to_string())?;
            }
        }
    }
    // The crash: only what was synced of the log, only the durable checkpoint.
    let durable_log = lock(&dev.0).1.clone();
    let hot =
        parse_log(&durable_log, Path::new("sim.al"), geometry()).map_err(|e| e.to_string())?;
    let Some((_, mut recheck)) = lock(&record.durable).clone() else {
        return Ok(()); // no checkpoint: a full consistency check, nothing to prove
    };
    recheck.union_with(&hot);
    for b in 0..BLOCKS {
        if volume[b as usize] != node[b as usize] && !recheck.get(b) {
            return Err(format!(
                "block {b} differs from the node but is neither in the checkpoint nor in a logged region"
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever the writes, checkpoints and syncs, and wherever the crash, the
    /// re-check after it covers every block that differs from the node's newest
    /// point (so the recovering sync makes the node's copy identical to the volume).
    #[test]
    fn the_recheck_covers_every_differing_block(
        ops in proptest::collection::vec(op(), 1..80),
        crash in any::<prop::sample::Index>(),
        phase in 0u8..3,
    ) {
        let at = crash.index(ops.len());
        prop_assert_eq!(run(&ops, at, phase, Mutation::None), Ok(()));
    }
}

/// Each deliberate bug is caught: some random run fails with it.
fn caught(mutation: Mutation) -> bool {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = (
        proptest::collection::vec(op(), 1..80),
        any::<prop::sample::Index>(),
        0u8..3,
    );
    (0..2000).any(|_| {
        let (ops, crash, phase) = strategy.new_tree(&mut runner).expect("a case").current();
        run(&ops, crash.index(ops.len()), phase, mutation).is_err()
    })
}

#[test]
fn skipping_the_log_sync_is_caught() {
    assert!(caught(Mutation::SkipLogSync));
}

#[test]
fn evicting_before_a_checkpoint_is_caught() {
    assert!(caught(Mutation::EvictUncovered));
}

/// Threads writing through the log while checkpoints run: every region with a
/// write in flight or written since the last checkpoint stays logged.
#[test]
fn concurrent_writers_never_lose_a_region() {
    let g = geometry();
    let (act, dev, record) = simulated(8);
    let act = Arc::new(act);
    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let (act, stop) = (&act, &stop);
        s.spawn(move || {
            while !stop.load(SeqCst) {
                act.checkpoint().expect("checkpoint");
                std::thread::yield_now();
            }
        });
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let (record, dev, failures) = (&record, &dev, &failures);
                s.spawn(move || {
                    for i in 0..3000u64 {
                        let block = (i * 7 + t * 13) * 31 % BLOCKS;
                        let w = act.begin_write(block * BS, BS).expect("logged");
                        // While the write is in flight its region is in the synced log.
                        let logged =
                            parse_log(&lock(&dev.0).1, Path::new("sim.al"), g).expect("log");
                        if !logged.get(block) {
                            lock(failures).push(block);
                        }
                        record.map.mark(block * BS, BS);
                        drop(w);
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        stop.store(true, SeqCst);
    });
    assert_eq!(*lock(&failures), Vec::<u64>::new());
}

#[test]
fn one_torn_slot_reads_as_empty_two_are_damage() {
    let g = geometry();
    let slots = 4u32;
    let mut image = vec![0u8; ((1 + u64::from(slots)) * SECTOR) as usize];
    image[..SECTOR as usize].copy_from_slice(&header(slots, PER_REGION * BS, g));
    let s1 = slot_sector(3, 1);
    image[SECTOR as usize..2 * SECTOR as usize].copy_from_slice(&s1);
    let got = parse_log(&image, Path::new("t.al"), g).expect("valid");
    assert_eq!(got.runs().collect::<Vec<_>>(), vec![(12, 4)]);
    // A torn slot: garbage in slot 2.
    image[2 * SECTOR as usize + 5] = 0xff;
    image[2 * SECTOR as usize] = b'B';
    let got = parse_log(&image, Path::new("t.al"), g).expect("one bad slot is a torn write");
    assert_eq!(got.count(), 4);
    image[3 * SECTOR as usize + 7] = 0x11;
    assert!(matches!(
        parse_log(&image, Path::new("t.al"), g),
        Err(LogError::Damaged { .. })
    ));
    // A region past the end is damage, not a silent skip.
    let mut image2 = vec![0u8; ((1 + u64::from(slots)) * SECTOR) as usize];
    image2[..SECTOR as usize].copy_from_slice(&header(slots, PER_REGION * BS, g));
    image2[SECTOR as usize..2 * SECTOR as usize].copy_from_slice(&slot_sector(REGIONS, 1));
    assert!(matches!(
        parse_log(&image2, Path::new("t.al"), g),
        Err(LogError::Damaged { .. })
    ));
}

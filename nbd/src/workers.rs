//! The threads that run one connection's requests (`Workers`), started on demand up
//! to a limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::replies::lock;

type Job = Box<dyn FnOnce() + Send>;

/// The threads that run one connection's requests, started as needed up to a
/// limit. Idle threads take turns waiting on the job queue, so a request goes to a
/// thread that is already waiting, and a thread that finishes one request picks up
/// the next queued one without sleeping in between. This costs about half the
/// context switches per request of tokio's shared blocking pool.
pub(crate) struct Workers {
    tx: std::sync::mpsc::Sender<Job>,
    rx: Arc<Mutex<std::sync::mpsc::Receiver<Job>>>,
    counts: Arc<WorkerCounts>,
    /// Threads started; only the one reading requests changes it.
    spawned: AtomicUsize,
    max: usize,
    /// For a job that finds no thread of our own.
    runtime: tokio::runtime::Handle,
}

#[derive(Default)]
struct WorkerCounts {
    /// Threads waiting for a job (or about to).
    idle: AtomicUsize,
    /// Jobs sent and not yet taken.
    queued: AtomicUsize,
}

impl Workers {
    /// Call from within the runtime.
    pub(crate) fn new(max: usize) -> Workers {
        let (tx, rx) = std::sync::mpsc::channel();
        Workers {
            tx,
            rx: Arc::new(Mutex::new(rx)),
            counts: Arc::default(),
            spawned: AtomicUsize::new(0),
            max: max.max(1),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Queues a job, starting another thread when the jobs already waiting would
    /// leave no idle thread for it and the limit allows. The counts are read
    /// racily; at worst a thread starts a little early or late.
    pub(crate) fn run(&self, job: Job) {
        let spawned = self.spawned.load(Ordering::Relaxed);
        let busy =
            self.counts.queued.load(Ordering::Acquire) >= self.counts.idle.load(Ordering::Acquire);
        if busy && spawned < self.max {
            let (rx, counts) = (Arc::clone(&self.rx), Arc::clone(&self.counts));
            match std::thread::Builder::new()
                .name("nbd-io".into())
                .spawn(move || worker(&rx, &counts))
            {
                Ok(_) => self.spawned.store(spawned + 1, Ordering::Relaxed),
                Err(e) if spawned == 0 => {
                    // No thread of our own: borrow one from tokio's pool.
                    tracing::warn!("cannot start an NBD I/O thread: {e}");
                    self.runtime.spawn_blocking(job);
                    return;
                }
                Err(e) => tracing::debug!("cannot start another NBD I/O thread: {e}"),
            }
        }
        self.counts.queued.fetch_add(1, Ordering::AcqRel);
        // Cannot fail: the receiver lives as long as `self`.
        let _ = self.tx.send(job);
    }
}

/// One I/O thread: runs jobs until the connection drops its sender.
fn worker(rx: &Mutex<std::sync::mpsc::Receiver<Job>>, counts: &WorkerCounts) {
    loop {
        counts.idle.fetch_add(1, Ordering::AcqRel);
        let job = lock(rx).recv();
        counts.idle.fetch_sub(1, Ordering::AcqRel);
        match job {
            Ok(job) => {
                counts.queued.fetch_sub(1, Ordering::AcqRel);
                job();
            }
            Err(_) => return,
        }
    }
}

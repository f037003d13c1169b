//! One background thread for the whole process that removes expired entries
//! of every cache at that cache's `sweep_interval`.
//!
//! The thread holds caches weakly: a dropped cache is forgotten at its next
//! due time. It is started on the first cache that can sweep; if the thread
//! cannot be spawned, expiry still happens on reads.

use std::sync::{OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Something the sweeper can sweep.
pub(crate) trait Sweep: Send + Sync {
    fn sweep(&self);
}

struct Job {
    due: Instant,
    every: Duration,
    target: Weak<dyn Sweep>,
}

#[derive(Default)]
struct Sweeper {
    jobs: Mutex<Vec<Job>>,
    changed: Condvar,
}

static SWEEPER: OnceLock<Option<&'static Sweeper>> = OnceLock::new();

/// Longer than any process runs.
const NEVER: Duration = Duration::from_secs(30 * 365 * 24 * 3_600);

/// Sweeps `target` every `every` until it is dropped.
pub(crate) fn register(target: Weak<dyn Sweep>, every: Duration) {
    let sweeper = SWEEPER.get_or_init(|| {
        let sweeper: &'static Sweeper = Box::leak(Box::default());
        std::thread::Builder::new().name("nebulex-sweeper".into()).spawn(move || run(sweeper)).ok().map(|_| sweeper)
    });
    if let Some(sweeper) = sweeper {
        // An interval no clock can add is as good as never.
        let every = every.min(NEVER);
        sweeper.jobs.lock().push(Job { due: Instant::now() + every, every, target });
        sweeper.changed.notify_one();
    }
}

fn run(sweeper: &Sweeper) {
    let mut jobs = sweeper.jobs.lock();
    loop {
        jobs.retain(|j| j.target.strong_count() > 0);
        let now = Instant::now();
        let mut due = Vec::new();
        for job in jobs.iter_mut().filter(|j| j.due <= now) {
            job.due = now + job.every;
            due.push(job.target.clone());
        }
        if !due.is_empty() {
            drop(jobs);
            for target in due {
                if let Some(target) = target.upgrade() {
                    // A listener that panics must not end sweeping for every
                    // cache; nor must what the cache holds, if its last
                    // handle went meanwhile and it is dropped here.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                        target.sweep();
                        drop(target);
                    }));
                }
            }
            jobs = sweeper.jobs.lock();
            continue;
        }
        match jobs.iter().map(|j| j.due).min() {
            Some(next) => {
                sweeper.changed.wait_until(&mut jobs, next);
            }
            None => sweeper.changed.wait(&mut jobs),
        }
    }
}

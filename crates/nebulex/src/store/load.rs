//! Single-flight loads: concurrent `get_or_insert_with` callers of one key run
//! the loader once, and a load that an invalidation overtook stores nothing.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

use parking_lot::{Condvar, Mutex};

use crate::store::shard::MapHasher;

pub(crate) type Loads<K, V> = HashMap<K, Arc<Load<V>>, MapHasher>;

/// How a load ended, for the callers that waited on it.
pub(crate) enum Outcome<V> {
    Loaded(V),
    /// The loader returned this error (type-erased `Arc<E>`).
    Failed(Arc<dyn Any + Send + Sync>),
    /// The loader panicked: waiters load for themselves.
    Abandoned,
}

impl<V: Clone> Clone for Outcome<V> {
    fn clone(&self) -> Self {
        match self {
            Outcome::Loaded(v) => Outcome::Loaded(v.clone()),
            Outcome::Failed(e) => Outcome::Failed(e.clone()),
            Outcome::Abandoned => Outcome::Abandoned,
        }
    }
}

/// One load in flight.
pub(crate) struct Load<V> {
    outcome: Mutex<Option<Outcome<V>>>,
    done: Condvar,
    /// Async callers waiting for the outcome.
    wakers: Mutex<Vec<Waker>>,
    /// Set (under the shard lock) when a write or delete of the key happened
    /// after the load started: its result is then not stored.
    stale: AtomicBool,
}

impl<V: Clone> Load<V> {
    pub(crate) fn new() -> Self {
        Load {
            outcome: Mutex::new(None),
            done: Condvar::new(),
            wakers: Mutex::default(),
            stale: AtomicBool::new(false),
        }
    }

    pub(crate) fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    pub(crate) fn finish(&self, outcome: Outcome<V>) {
        *self.outcome.lock() = Some(outcome);
        self.done.notify_all();
        std::mem::take(&mut *self.wakers.lock()).into_iter().for_each(Waker::wake);
    }

    /// Waits, without blocking the thread, until the loader finishes.
    pub(crate) async fn finished(&self) -> Outcome<V> {
        std::future::poll_fn(|cx| {
            if let Some(o) = self.outcome.lock().as_ref() {
                return Poll::Ready(o.clone());
            }
            let mut wakers = self.wakers.lock();
            // Checked again under the wakers' lock: `finish` sets the outcome
            // before it takes the wakers, so it cannot slip in between.
            if let Some(o) = self.outcome.lock().as_ref() {
                return Poll::Ready(o.clone());
            }
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Blocks until the loader finishes.
    pub(crate) fn wait(&self) -> Outcome<V> {
        let mut outcome = self.outcome.lock();
        loop {
            if let Some(o) = outcome.as_ref() {
                return o.clone();
            }
            self.done.wait(&mut outcome);
        }
    }
}

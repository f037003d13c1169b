//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nebulex::CacheEntryEvent;
use nebulex_streams::{Item, Lagged, Subscription, Telemetry, TryRecvError};

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The next item waiting in `sub`, as `recv` would give it; `None` if nothing
/// is waiting (`Empty`) or the stream is closed.
pub fn try_item<K>(sub: &mut Subscription<K>) -> Option<Item<K>> {
    match sub.try_recv() {
        Ok(event) => Some(Ok(event)),
        Err(TryRecvError::Lagged(n)) => Some(Err(Lagged(n))),
        Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => None,
    }
}

/// The next event waiting in `sub`: events are delivered on the writing
/// thread, so after a write returns its event is already there.
#[track_caller]
pub fn event<K: std::fmt::Debug>(sub: &mut Subscription<K>) -> Arc<CacheEntryEvent<K>> {
    match sub.try_recv() {
        Ok(event) => event,
        other => panic!("expected an event waiting, got {other:?}"),
    }
}

/// Everything waiting in `sub`, until `Empty` or `Closed`.
pub fn drain<K>(sub: &mut Subscription<K>) -> Vec<Item<K>> {
    std::iter::from_fn(|| try_item(sub)).collect()
}

/// Only the events of `items`; panics on a `Lagged`.
#[track_caller]
pub fn events_only<K: std::fmt::Debug>(items: Vec<Item<K>>) -> Vec<Arc<CacheEntryEvent<K>>> {
    items.into_iter().map(|i| i.expect("no Lagged expected")).collect()
}

/// `recv` with a deadline: the outer `None` means it timed out.
pub async fn recv_within<K>(sub: &mut Subscription<K>, within: Duration) -> Option<Option<Item<K>>> {
    tokio::time::timeout(within, sub.recv()).await.ok()
}

/// Polls `cond` until it holds or `within` passes; returns whether it held.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::yield_now();
    }
}

/// An observer that records every report.
pub struct Recorded<K>(pub Arc<Mutex<Vec<Telemetry<K>>>>);

impl<K: Clone + Send + Sync + 'static> Recorded<K> {
    pub fn new() -> Self {
        Recorded(Arc::new(Mutex::new(Vec::new())))
    }

    /// The observer function to give `StreamsBuilder::observer`.
    pub fn observer(&self) -> impl Fn(&Telemetry<K>) + Send + Sync + 'static {
        let log = self.0.clone();
        move |t: &Telemetry<K>| log.lock().unwrap().push(t.clone())
    }

    /// Everything recorded so far.
    pub fn all(&self) -> Vec<Telemetry<K>> {
        self.0.lock().unwrap().clone()
    }

    /// Forgets what was recorded.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

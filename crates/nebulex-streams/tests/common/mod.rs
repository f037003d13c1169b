//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nebulex::{Cache, CacheEntryEvent};
use nebulex_streams::{Item, Lagged, Streams, Subscription, Telemetry, TryRecvError};

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

/// A thread that stops the stream of a cache as soon as `lookup` shows one,
/// again and again until dropped: to race a stream's start.
pub struct Stopper {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Stopper {
    pub fn spawn<K, V>(cache: &Cache<K, V>) -> Self
    where
        K: Eq + Hash + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        let (cache, done) = (cache.clone(), Arc::new(AtomicBool::new(false)));
        let stop = done.clone();
        let thread = std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some(streams) = Streams::lookup(&cache) {
                    streams.stop();
                }
            }
        });
        Stopper { done, thread: Some(thread) }
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

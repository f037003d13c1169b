//! The background sweep is shared by every cache of the process: one cache's
//! panicking listener, or a panic as a cache is dropped on its thread, must
//! not stop it for the others.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nebulex::{Cache, Command, EventFilter, EventType};

#[test]
fn a_panicking_listener_does_not_stop_the_sweep_of_other_caches() {
    let every = Duration::from_millis(10);
    let faulty: Cache<u32, u32> = Cache::builder().name("faulty").sweep_interval(every).build().unwrap();
    faulty
        .register_event_listener("boom", EventFilter::only([EventType::Expired]), |_| panic!("listener bug"))
        .unwrap();
    let healthy: Cache<u32, u32> = Cache::builder().name("healthy").sweep_interval(every).build().unwrap();

    faulty.put_with_ttl(1, 1, Duration::from_millis(1));
    // Wait until the faulty cache's sweep has run (and panicked) at least once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !faulty.is_empty() {
        assert!(Instant::now() < deadline, "the faulty cache was never swept");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The sweeper still sweeps the healthy cache afterwards.
    healthy.put_with_ttl(2, 2, Duration::from_millis(1));
    while !healthy.is_empty() {
        assert!(Instant::now() < deadline, "the sweep stopped after a listener panicked");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[derive(Debug)]
struct PanicsOnDrop {
    fuse: Arc<AtomicBool>,
}

impl Clone for PanicsOnDrop {
    fn clone(&self) -> Self {
        PanicsOnDrop { fuse: Arc::new(AtomicBool::new(false)) }
    }
}

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        if self.fuse.swap(false, Ordering::SeqCst) {
            panic!("a value's Drop panics as its cache is dropped");
        }
    }
}

/// Waits up to `patience` for the background sweep to expire something of
/// `cache` (a `put_with_ttl` of 1 ms, never read).
fn swept_within(cache: &Cache<u32, u32>, key: u32, patience: Duration) -> bool {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let id = format!("probe-{key}");
    cache
        .register_event_listener(id.clone(), EventFilter::only([EventType::Expired]), move |e| {
            if e.command == Command::Sweep {
                let _ = tx.lock().unwrap().send(());
            }
        })
        .unwrap();
    cache.put_with_ttl(key, 0, Duration::from_millis(1));
    let swept = rx.recv_timeout(patience).is_ok();
    cache.unregister_event_listener(&id);
    swept
}

/// The sweeper may hold a cache's last handle: the cache is then dropped on
/// its thread, and a panic there (a value's `Drop`) must not end it.
#[test]
fn a_panic_while_the_sweeper_drops_a_cache_does_not_stop_the_sweep_of_other_caches() {
    let other: Cache<u32, u32> =
        Cache::builder().name("other").sweep_interval(Duration::from_millis(1)).build().unwrap();
    assert!(swept_within(&other, 1, Duration::from_secs(5)), "sanity: the sweeper sweeps `other`");

    let doomed: Cache<u32, PanicsOnDrop> =
        Cache::builder().name("doomed").sweep_interval(Duration::from_millis(1)).build().unwrap();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let hooks = Mutex::new((entered_tx, release_rx));
    // Holds the sweeper inside `doomed`'s sweep (it then holds a strong
    // handle) until the test has dropped its own handle.
    doomed
        .register_event_listener("hold", EventFilter::only([EventType::Expired]), move |e| {
            if e.command == Command::Sweep {
                let hooks = hooks.lock().unwrap();
                let _ = hooks.0.send(());
                let _ = hooks.1.recv_timeout(Duration::from_secs(10));
            }
        })
        .unwrap();
    doomed.put(2, PanicsOnDrop { fuse: Arc::new(AtomicBool::new(true)) });
    doomed.put_with_ttl(1, PanicsOnDrop { fuse: Arc::new(AtomicBool::new(false)) }, Duration::from_millis(1));
    entered_rx.recv_timeout(Duration::from_secs(10)).expect("the sweeper expired key 1");
    drop(doomed); // the sweeper's handle is now the last one
    release_tx.send(()).unwrap();

    let since = Instant::now();
    let swept = swept_within(&other, 2, Duration::from_secs(3));
    assert!(
        swept,
        "after `doomed` was dropped on the sweeper thread with a panicking value, `other` \
         (sweep_interval 1 ms) was not swept for {:?}: the sweeper thread is dead",
        since.elapsed()
    );
}

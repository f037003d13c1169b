//! The background sweep is shared by every cache of the process: one cache's
//! panicking listener must not stop it for the others.

use std::time::{Duration, Instant};

use nebulex::{Cache, EventFilter, EventType};

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

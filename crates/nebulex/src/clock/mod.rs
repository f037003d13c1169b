//! Time as the cache sees it: monotonic nanoseconds, real or manual, for
//! expiry; and the wall clock its events are stamped with.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use counter::Counter;

mod counter;

/// A clock that only moves when told to, for tests and simulations of expiry.
///
/// Give it to [`CacheBuilder::clock`](crate::CacheBuilder::clock); the cache
/// then judges every time to live by it (the periodic sweep still runs on real
/// time, and removes what this clock says has expired).
///
/// ```
/// use std::time::Duration;
/// use nebulex::{Cache, ManualClock};
///
/// let clock = ManualClock::new();
/// let cache: Cache<&str, i32> = Cache::builder().clock(clock.clone()).build()?;
/// cache.put_with_ttl("k", 1, Duration::from_secs(10));
/// clock.advance(Duration::from_secs(9));
/// assert_eq!(cache.get("k"), Some(1));
/// clock.advance(Duration::from_secs(1));
/// assert_eq!(cache.get("k"), None);
/// # Ok::<(), nebulex::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at its origin.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward (it stops at `u64::MAX` nanoseconds, some
    /// 584 years from its origin).
    pub fn advance(&self, by: Duration) {
        let by = saturating_nanos(by);
        let _ = self.nanos.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some(n.saturating_add(by)));
    }

    /// How far the clock has moved since its origin.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock").field("elapsed", &self.elapsed()).finish()
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Clock {
    /// The process's monotonic counter ([`monotonic_nanos`]).
    System,
    Manual(ManualClock),
}

impl Clock {
    /// The system clock, its counter calibrated now (once per process) rather
    /// than in the first write with a time to live.
    pub(crate) fn system() -> Self {
        counter();
        Clock::System
    }

    /// Nanoseconds since the clock's origin, plus one so that 0 can mean
    /// "never"; at most `u64::MAX - 1`, so that a deadline (which saturates
    /// at `u64::MAX`) is always later than the time it was set at, even at a
    /// manual clock's end.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        match self {
            Clock::System => monotonic_nanos(),
            Clock::Manual(m) => m.nanos.load(Ordering::SeqCst),
        }
        .saturating_add(1)
        .min(u64::MAX - 1)
    }
}

/// The counter, calibrated on first use (once per process, usually in under
/// a millisecond, at most 200 ms): when the first cache is built.
///
/// It reads the CPU's time-stamp counter where that is invariant, kept to
/// the system's monotonic clock (see [`counter`](mod@counter)). The system
/// clock costs some 30 ns a read and, on x86, waits for the memory accesses
/// in flight: in the write path, where the table's own cache misses are still
/// pending, it cost a tenth of an event's time, and in a run of lookups on
/// entries with a time to live it kept one lookup's cache misses from
/// overlapping the next's (a third of the lookups' rate).
#[inline]
fn counter() -> &'static Counter {
    static COUNTER: OnceLock<Counter> = OnceLock::new();
    COUNTER.get_or_init(Counter::new)
}

/// Nanoseconds since the process first read the counter; never less than
/// the calling thread's previous reading.
#[inline]
pub(crate) fn monotonic_nanos() -> u64 {
    thread_local! {
        static LAST: Cell<u64> = const { Cell::new(0) };
    }
    LAST.with(|last| counter().nanos(last))
}

/// [`monotonic_nanos`], not held at the thread's previous reading (which
/// may be ahead of the system clock by what the counter's last line ran
/// ahead).
fn unheld_nanos() -> u64 {
    counter().nanos(&Cell::new(0))
}

pub(crate) fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// How often the events' wall clock is set again from the system's.
const WALL_RESYNC: Duration = Duration::from_millis(100);
/// A sync's reading of the system clock is taken again when the counter's
/// readings around it are further apart than this...
const SYNC_BRACKET_NANOS: u64 = 10_000;
/// ...this many times at most (the narrowest bracket wins).
const SYNC_TRIES: usize = 4;

/// The wall clock events are stamped with: the monotonic counter plus an
/// offset to the system's wall clock, taken again every [`WALL_RESYNC`]: it
/// keeps within microseconds of a steadily running system clock, and
/// follows its adjustments within that interval.
struct WallClock {
    /// Unix nanoseconds minus [`monotonic_nanos`], at the last sync.
    offset: AtomicU64,
    /// [`monotonic_nanos`] at which to sync again.
    next_sync: AtomicU64,
}

impl WallClock {
    fn new() -> Self {
        let clock = WallClock { offset: AtomicU64::new(0), next_sync: AtomicU64::new(0) };
        clock.sync();
        clock
    }

    /// Sets the offset from the system clock; returns the Unix nanoseconds now.
    ///
    /// The system clock's reading is bracketed by two of the counter's and
    /// taken again (a few times at most) when the bracket is wide: a thread
    /// preempted in between would otherwise skew every stamp until the next
    /// sync.
    #[cold]
    fn sync(&self) -> u64 {
        let mut best = (u64::MAX, 0);
        for _ in 0..SYNC_TRIES {
            let before = unheld_nanos();
            let wall = unix_nanos(SystemTime::now());
            let after = unheld_nanos();
            let width = after.saturating_sub(before);
            if width < best.0 {
                best = (width, wall.wrapping_sub(before.saturating_add(width / 2)));
            }
            if width <= SYNC_BRACKET_NANOS {
                break;
            }
        }
        // Threads syncing at once each store a valid offset.
        let (_, offset) = best;
        self.offset.store(offset, Ordering::Relaxed);
        let since = monotonic_nanos();
        self.next_sync.store(since.saturating_add(saturating_nanos(WALL_RESYNC)), Ordering::Relaxed);
        offset.wrapping_add(since)
    }

    #[inline]
    fn unix_nanos(&self) -> u64 {
        let since = monotonic_nanos();
        if since >= self.next_sync.load(Ordering::Relaxed) {
            return self.sync();
        }
        self.offset.load(Ordering::Relaxed).wrapping_add(since)
    }
}

/// The wall clock events are stamped with, set from the system clock on
/// first use (once per process; the counter it reads is calibrated then too,
/// if it is not yet).
#[inline]
fn wall() -> &'static WallClock {
    static WALL: OnceLock<WallClock> = OnceLock::new();
    WALL.get_or_init(WallClock::new)
}

/// Sets the events' wall clock now, if it is not yet.
pub(crate) fn start_wall_clock() {
    wall();
}

/// Now, by the wall clock events are stamped with.
#[inline]
pub(crate) fn wall_now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(wall().unix_nanos())
}

/// `t` in nanoseconds since the Unix epoch (0 before it, `u64::MAX` after
/// the year 2554).
fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, saturating_nanos)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn the_expiry_clock_keeps_pace_with_the_monotonic_clock() {
        counter::tests::assert_keeps_pace(|| Clock::System.now());
    }

    #[test]
    fn a_manual_clock_stops_at_its_end() {
        let clock = ManualClock::new();
        clock.advance(Duration::MAX);
        clock.advance(Duration::from_nanos(1));
        assert_eq!(clock.elapsed(), Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn the_event_clock_keeps_to_the_system_clock() {
        // Across more than one resync interval, every reading falls between
        // the system clock's readings around it, give or take 1 ms.
        let slack = Duration::from_millis(1);
        let started = Instant::now();
        let mut readings = 0;
        while started.elapsed() < WALL_RESYNC * 3 {
            let before = SystemTime::now();
            let t = wall_now();
            let after = SystemTime::now();
            assert!(t + slack >= before && t <= after + slack, "{t:?} not within {before:?}..{after:?}");
            readings += 1;
        }
        assert!(readings > 1000, "{readings} readings");
    }
}

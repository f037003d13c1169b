//! Time as the cache sees it: monotonic nanoseconds, real or manual.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(saturating_nanos(by), Ordering::SeqCst);
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
    System(Instant),
    Manual(ManualClock),
}

impl Clock {
    /// Nanoseconds since the clock's origin, plus one so that 0 can mean "never".
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        1 + match self {
            Clock::System(origin) => saturating_nanos(origin.elapsed()),
            Clock::Manual(m) => m.nanos.load(Ordering::SeqCst),
        }
    }
}

pub(crate) fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

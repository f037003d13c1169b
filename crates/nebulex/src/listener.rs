//! Event listeners: code the cache calls inline on every write.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::event::{CacheEntryEvent, EventType};

/// The set of event types a listener wants, changeable while it is registered.
///
/// Clones share the set: the registrant keeps a clone and can widen or narrow
/// it at any time with [`EventFilter::set`]. The cache builds an event only if
/// some listener wants its type, so a listener that wants nothing costs a write
/// almost nothing.
///
/// ```
/// use nebulex::{EventFilter, EventType};
/// let filter = EventFilter::only([EventType::Inserted]);
/// assert!(filter.contains(EventType::Inserted));
/// assert!(!filter.contains(EventType::Deleted));
/// filter.set(EventType::ALL);
/// assert!(filter.contains(EventType::Deleted));
/// ```
#[derive(Clone)]
pub struct EventFilter {
    mask: Arc<AtomicU8>,
}

impl EventFilter {
    /// Every event type.
    pub fn all() -> Self {
        Self::only(EventType::ALL)
    }

    /// No event type (until [`set`](Self::set) says otherwise).
    pub fn none() -> Self {
        Self::from_mask(0)
    }

    /// Just these event types.
    pub fn only(types: impl IntoIterator<Item = EventType>) -> Self {
        Self::from_mask(mask_of(types))
    }

    /// A filter from a bit mask of [`EventType::bit`]s.
    pub fn from_mask(mask: u8) -> Self {
        EventFilter { mask: Arc::new(AtomicU8::new(mask)) }
    }

    /// Replaces the set of types, for every clone of this filter.
    pub fn set(&self, types: impl IntoIterator<Item = EventType>) {
        self.set_mask(mask_of(types));
    }

    /// Replaces the set of types with a bit mask of [`EventType::bit`]s.
    pub fn set_mask(&self, mask: u8) {
        self.mask.store(mask, Ordering::Release);
    }

    /// The current bit mask.
    #[inline]
    pub fn mask(&self) -> u8 {
        self.mask.load(Ordering::Relaxed)
    }

    /// Whether the filter currently wants events of this type.
    #[inline]
    pub fn contains(&self, kind: EventType) -> bool {
        self.mask() & kind.bit() != 0
    }
}

impl Default for EventFilter {
    fn default() -> Self {
        Self::all()
    }
}

impl fmt::Debug for EventFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.mask();
        f.debug_set().entries(EventType::ALL.into_iter().filter(|t| m & t.bit() != 0)).finish()
    }
}

fn mask_of(types: impl IntoIterator<Item = EventType>) -> u8 {
    types.into_iter().fold(0, |m, t| m | t.bit())
}

pub(crate) type ListenerFn<K> = dyn Fn(&CacheEntryEvent<K>) + Send + Sync;

pub(crate) struct Listener<K> {
    pub(crate) id: String,
    pub(crate) filter: EventFilter,
    pub(crate) f: Box<ListenerFn<K>>,
}

/// The listeners of a cache, as one immutable snapshot that every shard holds.
pub(crate) type Listeners<K> = Arc<[Arc<Listener<K>>]>;

/// The union of what the listeners want right now.
#[inline]
pub(crate) fn wanted<K>(listeners: &[Arc<Listener<K>>]) -> u8 {
    listeners.iter().fold(0, |m, l| m | l.filter.mask())
}

/// Whether any of the listeners wants events of this type right now.
#[inline]
pub(crate) fn listens<K>(listeners: &[Arc<Listener<K>>], kind: EventType) -> bool {
    !listeners.is_empty() && wanted(listeners) & kind.bit() != 0
}

//! Cache entry events: what changed, where, and in which order.
//!
//! Every write to a [`Cache`](crate::Cache) produces exactly one
//! [`CacheEntryEvent`] per effect (see the table on [`Cache`](crate::Cache#events)). Events
//! carry keys, never values: they say *what* changed, and a reader fetches the
//! value if it wants it.

use std::collections::HashSet;
use std::fmt;
use std::sync::OnceLock;
use std::time::SystemTime;

use parking_lot::Mutex;

/// An interned string: a cache's name, or a stream topic.
///
/// Names are interned once per distinct string for the life of the process
/// (they are few: one per cache name and per stream partition), so that an
/// event carries its cache's name and topic with a plain copy — no reference
/// count that writer and reader threads would fight over on every event.
///
/// ```
/// use nebulex::Name;
/// let a = Name::new("users");
/// let b = Name::new(&String::from("users"));
/// assert_eq!(a, b);
/// assert_eq!(&*a, "users");
/// assert!(std::ptr::eq(a.as_str(), b.as_str())); // one copy
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(&'static str);

impl Name {
    /// The interned copy of `name`.
    pub fn new(name: &str) -> Self {
        static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let mut names = NAMES.get_or_init(Default::default).lock();
        match names.get(name) {
            Some(interned) => Name(interned),
            None => {
                let interned: &'static str = Box::leak(name.to_owned().into_boxed_str());
                names.insert(interned);
                Name(interned)
            }
        }
    }

    /// The string.
    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl std::ops::Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.0
    }
}

impl From<&str> for Name {
    fn from(name: &str) -> Self {
        Name::new(name)
    }
}

impl From<String> for Name {
    fn from(name: String) -> Self {
        Name::new(&name)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

/// The name of a cache, carried by every event it emits.
///
/// ```
/// use nebulex::{Cache, CacheName};
///
/// let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
/// let name: CacheName = cache.name();
/// assert_eq!(name, "users");
/// assert_eq!(name, CacheName::new("users"));
/// # Ok::<(), nebulex::Error>(())
/// ```
pub type CacheName = Name;

/// The kind of change an event reports.
///
/// ```
/// use nebulex::{EventFilter, EventType};
///
/// assert_eq!("Expired".parse::<EventType>(), Ok(EventType::Expired));
/// assert!("renamed".parse::<EventType>().is_err());
/// assert_eq!(EventType::Evicted.to_string(), "evicted");
///
/// let mask = EventType::Inserted.bit() | EventType::Deleted.bit();
/// let filter = EventFilter::from_mask(mask);
/// assert!(filter.contains(EventType::Deleted) && !filter.contains(EventType::Updated));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum EventType {
    /// A key without a live entry got one.
    Inserted,
    /// A live entry got a new value or a new expiry.
    Updated,
    /// An entry was removed by a delete (or a delete was asked for).
    Deleted,
    /// An entry outlived its time to live and was removed.
    Expired,
    /// An entry was removed to keep the cache within `max_entries`.
    Evicted,
}

impl EventType {
    /// Every event type, in declaration order.
    pub const ALL: [EventType; 5] =
        [EventType::Inserted, EventType::Updated, EventType::Deleted, EventType::Expired, EventType::Evicted];

    /// The lowercase name: `inserted`, `updated`, `deleted`, `expired`, `evicted`.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::Inserted => "inserted",
            EventType::Updated => "updated",
            EventType::Deleted => "deleted",
            EventType::Expired => "expired",
            EventType::Evicted => "evicted",
        }
    }

    /// This type as a bit of an [`EventFilter`](crate::EventFilter) mask.
    pub const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL.into_iter().find(|t| t.as_str().eq_ignore_ascii_case(s.trim())).ok_or_else(|| {
            format!("unknown event type `{s}` (expected one of inserted, updated, deleted, expired, evicted)")
        })
    }
}

/// Which entries an event is about.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use nebulex::{Cache, EventFilter, Query, Target};
///
/// let cache: Cache<&str, u32> = Cache::builder().build()?;
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = seen.clone();
/// cache.register_event_listener("log", EventFilter::all(), move |e| log.lock().unwrap().push(e.target.clone()))?;
/// cache.put("a", 1);
/// cache.put_all([("b", 2), ("c", 3)]);
/// cache.delete_all(Query::All);
///
/// let targets = seen.lock().unwrap();
/// assert_eq!(*targets, [Target::Key("a"), Target::Keys(vec!["b", "c"]), Target::All]);
/// assert_eq!(targets[1].keys(), ["b", "c"]);
/// assert!(targets[2].keys().is_empty());
/// # Ok::<(), nebulex::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Target<K> {
    /// One key.
    Key(K),
    /// Several keys, written or removed by one call.
    Keys(Vec<K>),
    /// Every entry of the cache (`delete_all(Query::All)`).
    All,
}

impl<K> Target<K> {
    /// The keys named by this target: one, several, or none for [`Target::All`].
    pub fn keys(&self) -> &[K] {
        match self {
            Target::Key(k) => std::slice::from_ref(k),
            Target::Keys(ks) => ks,
            Target::All => &[],
        }
    }
}

/// The cache call that caused an event.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use nebulex::{Cache, Command, EventFilter};
///
/// let cache: Cache<&str, i64> = Cache::builder().build()?;
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = seen.clone();
/// cache.register_event_listener("log", EventFilter::all(), move |e| log.lock().unwrap().push(e.command))?;
/// cache.put("hits", 1);
/// cache.incr("hits", 2);
/// cache.take("hits");
///
/// assert_eq!(*seen.lock().unwrap(), [Command::Put, Command::Incr, Command::Take]);
/// assert_eq!(Command::PutNew.to_string(), "put_new");
/// assert_eq!(Command::ALL[Command::Take as usize], Command::Take); // index = wire code
/// # Ok::<(), nebulex::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[allow(missing_docs)]
pub enum Command {
    Put,
    PutNew,
    Replace,
    PutAll,
    PutNewAll,
    Delete,
    Take,
    DeleteAll,
    Update,
    Incr,
    Decr,
    Expire,
    Touch,
    /// A read (`get`, `get_all`, `contains_key`, `ttl`) found the entry expired.
    Get,
    /// The periodic sweep found the entry expired.
    Sweep,
    /// The size bound removed the entry.
    Evict,
    /// `get_or_insert_with` and its kin stored a loaded value, or found the
    /// key's entry expired (the `Expired` event before the load).
    Load,
}

impl Command {
    /// Every command, in declaration order (its index is its wire code).
    pub const ALL: [Command; 17] = [
        Command::Put,
        Command::PutNew,
        Command::Replace,
        Command::PutAll,
        Command::PutNewAll,
        Command::Delete,
        Command::Take,
        Command::DeleteAll,
        Command::Update,
        Command::Incr,
        Command::Decr,
        Command::Expire,
        Command::Touch,
        Command::Get,
        Command::Sweep,
        Command::Evict,
        Command::Load,
    ];

    /// The snake_case name of the call, e.g. `put_new`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Command::Put => "put",
            Command::PutNew => "put_new",
            Command::Replace => "replace",
            Command::PutAll => "put_all",
            Command::PutNewAll => "put_new_all",
            Command::Delete => "delete",
            Command::Take => "take",
            Command::DeleteAll => "delete_all",
            Command::Update => "update",
            Command::Incr => "incr",
            Command::Decr => "decr",
            Command::Expire => "expire",
            Command::Touch => "touch",
            Command::Get => "get",
            Command::Sweep => "sweep",
            Command::Evict => "evict",
            Command::Load => "load",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity of one node of a cluster: one cache instance.
///
/// Every [`Cache`](crate::Cache) gets a random id when it is built (or the one
/// given to [`CacheBuilder::node_id`](crate::CacheBuilder::node_id)); its
/// events carry it, so a receiver can tell its own events from other nodes'.
///
/// ```
/// use nebulex::{Cache, NodeId};
///
/// let cache: Cache<String, u32> = Cache::builder().node_id(NodeId(42)).build()?;
/// assert_eq!(cache.node_id(), NodeId(42));
/// assert_eq!(cache.node_id().to_string(), "000000000000002a");
/// assert_eq!(format!("{:?}", NodeId(42)), "NodeId(000000000000002a)");
/// assert_ne!(NodeId::random(), NodeId::random());
/// # Ok::<(), nebulex::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NodeId(pub u64);

impl NodeId {
    /// A fresh random id.
    pub fn random() -> Self {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        if let Ok(d) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
            h.write_u128(d.as_nanos());
        }
        NodeId(h.finish())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:016x})", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Where an event comes from and where it is going.
///
/// A cache fills in `node` and `timestamp`; a stream (`nebulex-streams`)
/// fills in the routing fields when it hands the event on.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use std::time::SystemTime;
/// use nebulex::{Cache, EventFilter};
///
/// let cache: Cache<String, u32> = Cache::builder().build()?;
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = seen.clone();
/// cache.register_event_listener("log", EventFilter::all(), move |e| log.lock().unwrap().push(e.metadata.clone()))?;
/// cache.put("user:1".to_string(), 30);
///
/// let meta = seen.lock().unwrap().pop().unwrap();
/// assert_eq!(meta.node, cache.node_id());
/// assert_eq!((meta.partition, meta.partitions, meta.topic, meta.seq), (None, None, None, 0));
/// assert!(meta.timestamp <= SystemTime::now());
/// # Ok::<(), nebulex::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventMetadata {
    /// The node whose cache emitted the event.
    pub node: NodeId,
    /// The stream partition that carries the event (`None` until a stream
    /// routes it, and on an unpartitioned stream).
    pub partition: Option<u32>,
    /// The stream's partition count (`None` for an unpartitioned stream).
    pub partitions: Option<u32>,
    /// The stream topic (channel) that carried the event, once routed.
    pub topic: Option<Name>,
    /// The event's sequence number within its partition (0 until routed).
    pub seq: u64,
    /// When the write took effect, by the writer's wall clock (read through
    /// the CPU's time-stamp counter where it is invariant, and kept within
    /// microseconds of the system clock: set again from it ten times a
    /// second).
    pub timestamp: SystemTime,
}

/// One change of a cache, as the cache emitted it.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use nebulex::{Cache, CacheEntryEvent, Command, EventFilter, EventType, Target};
///
/// let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
/// let seen: Arc<Mutex<Vec<CacheEntryEvent<String>>>> = Arc::default();
/// let log = seen.clone();
/// cache.register_event_listener("log", EventFilter::all(), move |e| log.lock().unwrap().push(e.clone()))?;
/// cache.put("user:1".to_string(), 30);
/// cache.put("user:1".to_string(), 31);
///
/// let seen = seen.lock().unwrap();
/// let (first, second) = (&seen[0], &seen[1]);
/// assert_eq!(first.cache, "users");
/// assert_eq!((first.kind, first.command), (EventType::Inserted, Command::Put));
/// assert_eq!(first.target, Target::Key("user:1".to_string()));
/// assert_eq!(second.kind, EventType::Updated);
/// assert!(second.version > first.version);
/// assert_eq!(first.metadata.node, cache.node_id());
/// # Ok::<(), nebulex::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheEntryEvent<K> {
    /// The cache that changed.
    pub cache: CacheName,
    /// What kind of change.
    pub kind: EventType,
    /// Which entries changed.
    pub target: Target<K>,
    /// The call that changed them.
    pub command: Command,
    /// Strictly increases with every write of the same key.
    pub version: u64,
    /// Origin, routing and ordering information.
    pub metadata: EventMetadata,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_displays_lowercase_and_parses_back() {
        for t in EventType::ALL {
            assert_eq!(t.to_string().parse::<EventType>(), Ok(t));
        }
        assert_eq!(EventType::Inserted.to_string(), "inserted");
        assert!("nope".parse::<EventType>().is_err());
    }

    #[test]
    fn event_type_bits_are_distinct() {
        let all = EventType::ALL.iter().fold(0u8, |m, t| {
            assert_eq!(m & t.bit(), 0);
            m | t.bit()
        });
        assert_eq!(all, 0b1_1111);
    }
}

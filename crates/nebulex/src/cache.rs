//! The cache: a sharded in-process store whose every write emits an exact
//! [`CacheEntryEvent`].

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::Duration;

use indexmap::IndexMap;
use parking_lot::{Mutex, MutexGuard};

use crate::builder::{CacheBuilder, Config};
use crate::clock::{saturating_nanos, start_wall_clock, wall_now, Clock};
use crate::error::Error;
use crate::event::{CacheEntryEvent, CacheName, Command, EventMetadata, EventType, NodeId, Target};
use crate::extensions::Extensions;
use crate::listener::{listens, EventFilter, Listener, Listeners};
use crate::query::Query;
use crate::store::load::{Load, Outcome};
use crate::store::shard::{no_listeners, MapHasher, Shard, Slot};
use crate::store::sweeper::{self, Sweep};

/// Deadline records a sweep takes from a shard per hold of its lock (about
/// 15 µs of removals without listeners; each record's entry also costs its
/// event).
const SWEEP_BATCH: usize = 256;

/// A concurrent in-process cache whose every change emits an exact event.
///
/// * [Writing and reading](#writing-and-reading)
/// * [Events](#events)
/// * [Expiry and eviction](#expiry-and-eviction)
/// * [Listeners](#listeners)
///
/// `Cache` is a cheap handle (`Arc` inside): clone it freely, share it between
/// threads. The cache lives while some handle does.
///
/// # Writing and reading
///
/// ```
/// use nebulex::Cache;
///
/// let cache: Cache<String, u32> = Cache::builder().name("users").build()?;
/// cache.put("user:1".to_string(), 30);
/// assert_eq!(cache.get("user:1"), Some(30));
/// assert!(!cache.put_new("user:1".to_string(), 31));
/// assert_eq!(cache.update("user:1".to_string(), 0, |age| age + 1), 31);
/// assert_eq!(cache.take("user:1"), Some(31));
/// assert!(cache.is_empty());
/// # Ok::<(), nebulex::Error>(())
/// ```
///
/// # Events
///
/// | call | event |
/// |---|---|
/// | `put`, `put_with_ttl` | `Inserted` if there was no live entry, else `Updated` |
/// | `put_new` / `replace` | `Inserted` / `Updated` when it wrote |
/// | `put_all` / `put_new_all` | `Inserted` for new keys, `Updated` for existing ones, target `Keys` |
/// | `get`, `get_all`, `contains_key`, `ttl` | `Expired` if the read found the entry expired |
/// | `take` | `Deleted` when it removed a live entry |
/// | `delete` | `Deleted` **always**: other nodes may hold the key |
/// | `delete_all` | `Deleted`, target `All` or `Keys` |
/// | `expire`, `touch` | `Updated` |
/// | `update`, `incr`, `decr` | `Inserted` or `Updated` |
/// | `get_or_insert_with` | `Inserted` when it stored a loaded value |
///
/// Every event is emitted while the key's shard is locked, so for any key the
/// events reach listeners in the order the writes took effect, and each
/// event's `version` is greater than the key's previous one.
///
/// A key whose `Clone` panics leaves a single-key call's entry as it was, with
/// no event (the key is copied for the event before anything changes); a
/// bulk call stops at such a key, or at one whose `Hash` or `Eq` panics, and
/// announces what it changed before it. Either way the panic reaches the
/// caller.
///
/// The values a call replaces or removes are dropped once it has made its
/// change, emitted its events and released its locks: a value's `Drop` may
/// call the cache, and one that panics leaves the cache whole (the panic
/// reaches the caller, after every other value was dropped). Keys are
/// dropped under a shard's lock: a key's `Drop` must neither panic nor call
/// the cache.
///
/// # Expiry and eviction
///
/// An expired entry is never returned. It is removed, with exactly one
/// `Expired` event, by whichever comes first: a call that finds it (a write
/// that must evict counts, when the entry is among those it looks at), or
/// the periodic sweep (see [`CacheBuilder::sweep_interval`]). Until then it still
/// counts in [`len`](Self::len); [`count_all`](Self::count_all) counts live
/// entries only.
///
/// With [`max_entries`](CacheBuilder::max_entries), each shard keeps its share
/// of the bound, and a write past it evicts the least used of a few sampled
/// entries (LFU with aging), each with exactly one `Evicted` event — never
/// the entry a single-key write just stored, which would otherwise lose to
/// every entry used since it came in; an
/// expired entry among those sampled goes first, with its `Expired` event.
///
/// # Listeners
///
/// See [`register_event_listener`](Self::register_event_listener). Streams
/// (`nebulex-streams`) are the main listener.
pub struct Cache<K, V> {
    inner: Arc<Inner<K, V>>,
}

/// A handle that does not keep the cache alive; see [`Cache::downgrade`].
///
/// ```
/// use nebulex::Cache;
///
/// let cache: Cache<&str, u32> = Cache::builder().build()?;
/// let weak = cache.downgrade();
/// cache.put("a", 1);
/// assert_eq!(weak.upgrade().and_then(|c| c.get("a")), Some(1));
/// drop(cache);
/// assert!(weak.upgrade().is_none());
/// # Ok::<(), nebulex::Error>(())
/// ```
pub struct WeakCache<K, V> {
    inner: Weak<Inner<K, V>>,
}

/// Keeps each shard's lock on a cache line of its own.
#[repr(align(128))]
struct Padded<T>(T);

type LockedShard<K, V> = Padded<Mutex<Shard<K, V>>>;

struct Inner<K, V> {
    name: CacheName,
    node: NodeId,
    shards: Box<[LockedShard<K, V>]>,
    shard_mask: usize,
    selector: MapHasher,
    max_entries: Option<usize>,
    /// Time to live of `put`, in nanoseconds; 0 = none.
    default_ttl: u64,
    clock: Clock,
    /// The listeners, as the snapshot every shard copies; also serialises
    /// registrations.
    listeners: Mutex<Listeners<K>>,
    extensions: Extensions,
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Cache { inner: self.inner.clone() }
    }
}

impl<K, V> Clone for WeakCache<K, V> {
    fn clone(&self) -> Self {
        WeakCache { inner: self.inner.clone() }
    }
}

impl<K, V> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.inner.name)
            .field("node", &self.inner.node)
            .field("max_entries", &self.inner.max_entries)
            .field("shards", &self.inner.shards.len())
            .finish_non_exhaustive()
    }
}

impl<K, V> fmt::Debug for WeakCache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WeakCache")
    }
}

impl<K, V> WeakCache<K, V> {
    /// The cache, if some [`Cache`] handle still keeps it alive.
    pub fn upgrade(&self) -> Option<Cache<K, V>> {
        self.inner.upgrade().map(|inner| Cache { inner })
    }
}

/// How a single-key write treats an existing entry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `put`: write whatever is there.
    Upsert,
    /// `put_new`: write only if no live entry.
    OnlyNew,
    /// `replace`: write only over a live entry.
    OnlyExisting,
}

fn ttl_nanos(ttl: Duration) -> u64 {
    saturating_nanos(ttl).max(1)
}

impl<K, V> Cache<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Starts building a cache; see [`CacheBuilder`] for the options.
    pub fn builder() -> CacheBuilder<K, V> {
        CacheBuilder::default()
    }

    pub(crate) fn from_config(config: Config) -> Self {
        let seed = NodeId::random().0;
        let map_hasher = MapHasher::with_seed(seed.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15);
        let shards = (0..config.shards)
            .map(|i| {
                let cap = config
                    .max_entries
                    .map_or(usize::MAX, |max| max / config.shards + usize::from(i < max % config.shards));
                let shard_seed = seed.wrapping_add(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                Padded(Mutex::new(Shard::new(cap, no_listeners(), shard_seed, map_hasher)))
            })
            .collect();
        let inner = Arc::new(Inner {
            name: CacheName::new(&config.name),
            node: config.node,
            shards,
            shard_mask: config.shards - 1,
            selector: MapHasher::with_seed(seed),
            max_entries: config.max_entries,
            default_ttl: config.default_ttl.map_or(0, ttl_nanos),
            clock: config.clock,
            listeners: Mutex::new(no_listeners()),
            extensions: Extensions::default(),
        });
        let weak: Weak<dyn Sweep> = Arc::downgrade(&inner) as Weak<Inner<K, V>>;
        sweeper::register(weak, config.sweep_interval);
        Cache { inner }
    }

    /// The cache's name.
    pub fn name(&self) -> CacheName {
        self.inner.name
    }

    /// The cache's node id (carried by its events).
    pub fn node_id(&self) -> NodeId {
        self.inner.node
    }

    /// The size bound, if any.
    pub fn max_entries(&self) -> Option<usize> {
        self.inner.max_entries
    }

    /// Values attached to this cache by other crates (such as its stream).
    pub fn extensions(&self) -> &Extensions {
        &self.inner.extensions
    }

    /// A handle that does not keep the cache alive.
    pub fn downgrade(&self) -> WeakCache<K, V> {
        WeakCache { inner: Arc::downgrade(&self.inner) }
    }

    /// Whether two handles are the same cache.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    // ----- writes -------------------------------------------------------

    /// Stores `value` under `key` with the default time to live.
    ///
    /// Emits `Inserted` if the key had no live entry, else `Updated`.
    pub fn put(&self, key: K, value: V) {
        self.inner.write(key, value, self.inner.default_ttl, Mode::Upsert, Command::Put);
    }

    /// Stores `value` under `key`, expiring after `ttl` (a zero `ttl` counts
    /// as one nanosecond: the entry expires as soon as the clock moves, which
    /// for a [`ManualClock`](crate::ManualClock) means its next `advance`).
    pub fn put_with_ttl(&self, key: K, value: V, ttl: Duration) {
        self.inner.write(key, value, ttl_nanos(ttl), Mode::Upsert, Command::Put);
    }

    /// Stores `value` only if `key` has no live entry; returns whether it did
    /// (with an `Inserted` event).
    pub fn put_new(&self, key: K, value: V) -> bool {
        self.inner.write(key, value, self.inner.default_ttl, Mode::OnlyNew, Command::PutNew)
    }

    /// Stores `value` only if `key` has a live entry; returns whether it did
    /// (with an `Updated` event).
    pub fn replace(&self, key: K, value: V) -> bool {
        self.inner.write(key, value, self.inner.default_ttl, Mode::OnlyExisting, Command::Replace)
    }

    /// Stores every pair (the last value of a repeated key wins), emitting one
    /// `Inserted` event naming the new keys and one `Updated` event naming
    /// the existing ones.
    ///
    /// A key whose `Hash`, `Eq` or `Clone` panics stops the call where it
    /// stands: the events name what it stored before, then the panic reaches
    /// the caller.
    pub fn put_all(&self, entries: impl IntoIterator<Item = (K, V)>) {
        self.inner.write_all(entries, false);
    }

    /// Stores every pair if none of the keys has a live entry, else nothing;
    /// returns whether it stored them (with one `Inserted` event).
    pub fn put_new_all(&self, entries: impl IntoIterator<Item = (K, V)>) -> bool {
        self.inner.write_all(entries, true)
    }

    /// Applies `f` to the live value of `key` and stores the result, or stores
    /// `default` if there is none; returns the stored value.
    ///
    /// An existing entry keeps its time to live; a new one gets the default.
    /// `f` runs while the key's shard is locked: it must be quick and must not
    /// call this cache.
    pub fn update(&self, key: K, default: V, f: impl FnOnce(&V) -> V) -> V {
        self.inner.update(key, default, f, Command::Update)
    }

    // ----- reads --------------------------------------------------------

    /// The live value of `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.inner.get(key)
    }

    /// The live values of the given keys that have one.
    pub fn get_all<'q, Q>(&self, keys: impl IntoIterator<Item = &'q Q>) -> HashMap<K, V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized + 'q,
    {
        keys.into_iter()
            .filter_map(|q| {
                let mut guard = self.inner.lock_for(q);
                let s = &mut *guard;
                let (i, k, slot) = s.map.get_full_mut(q)?;
                if slot.is_expired(|| self.inner.clock.now()) {
                    self.inner.remove_expired(s, i, Command::Get);
                    return None;
                }
                Some((k.clone(), slot.value.clone()))
            })
            .collect()
    }

    /// Whether `key` has a live entry.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.inner.with_live(key, Command::Get, |_, _| ()).is_some()
    }

    /// The remaining time to live of `key`: `None` if it has no live entry,
    /// `Some(None)` if it never expires.
    pub fn ttl<Q>(&self, key: &Q) -> Option<Option<Duration>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let clock = &self.inner.clock;
        self.inner.with_live(key, Command::Get, |_, slot| {
            (slot.expires_at != 0).then(|| Duration::from_nanos(slot.expires_at.saturating_sub(clock.now())))
        })
    }

    /// The number of entries stored, including expired ones that no call or
    /// sweep has removed yet. Never more than `max_entries`.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.0.lock().map.len()).sum()
    }

    /// Whether the cache stores no entry.
    pub fn is_empty(&self) -> bool {
        self.inner.shards.iter().all(|s| s.0.lock().map.is_empty())
    }

    /// The number of live entries the query selects (no event).
    pub fn count_all(&self, query: Query<K, V>) -> usize {
        self.inner.count_all(query)
    }

    // ----- removals -----------------------------------------------------

    /// Removes and returns the live value of `key` (with a `Deleted` event
    /// when there was one).
    pub fn take<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut guard = self.inner.lock_for(key);
        let s = &mut *guard;
        let (i, _, slot) = s.map.get_full_mut(key)?;
        if slot.is_expired(|| self.inner.clock.now()) {
            self.inner.remove_expired(s, i, Command::Take);
            return None;
        }
        let (k, slot) = s.map.remove_index(i)?;
        s.mark_load_stale::<K>(&k);
        let version = s.next_version();
        self.inner.emit(&s.listeners, EventType::Deleted, Command::Take, version, || Target::Key(k));
        Some(slot.value)
    }

    /// Removes `key`'s entry; returns whether a live one was removed.
    ///
    /// Emits `Deleted` **always**, entry or not: a delete is an invalidation
    /// signal, and other nodes of a cluster may hold the key.
    pub fn delete<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized + ToOwned<Owned = K>,
    {
        let mut guard = self.inner.lock_for(key);
        let s = &mut *guard;
        // The key is copied for the event first: a `Clone` that panics
        // leaves the entry be.
        let event_key = listens(&s.listeners, EventType::Deleted).then(|| key.to_owned());
        s.mark_load_stale(key);
        let mut removed = false;
        if let Some((i, _, slot)) = s.map.get_full_mut(key) {
            if slot.is_expired(|| self.inner.clock.now()) {
                self.inner.remove_expired(s, i, Command::Delete);
            } else {
                s.remove_index(i);
                removed = true;
            }
        }
        let version = s.next_version();
        if let Some(key) = event_key {
            self.inner.emit(&s.listeners, EventType::Deleted, Command::Delete, version, || Target::Key(key));
        }
        removed
    }

    /// Removes the entries the query selects; returns how many live ones it
    /// removed. Emits `Deleted` with target `All` or `Keys(keys)` (each key
    /// once) always — whether or not the keys had entries — and with
    /// `Keys(removed)` for a filter that removed any. An empty key list
    /// removes nothing and emits nothing.
    ///
    /// A panic in the filter or in a key's `Hash`, `Eq` or `Clone` stops the
    /// call where it stands: the event names the keys it got to (for a
    /// filter, exactly the removed ones), then the panic reaches the caller.
    pub fn delete_all(&self, query: Query<K, V>) -> usize {
        self.inner.delete_all(query)
    }

    // ----- expiry -------------------------------------------------------

    /// Gives `key`'s live entry a new time to live from now; returns whether
    /// there was one (with an `Updated` event).
    pub fn expire<Q>(&self, key: &Q, ttl: Duration) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let clock = &self.inner.clock;
        self.inner.touch_live(key, Command::Expire, |slot| slot.set_ttl(ttl_nanos(ttl), || clock.now()))
    }

    /// Restarts the time to live of `key`'s live entry (as last set by a
    /// write or [`expire`](Self::expire)) from now; returns whether there was one (with an `Updated`
    /// event).
    pub fn touch<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let clock = &self.inner.clock;
        self.inner.touch_live(key, Command::Touch, |slot| slot.set_ttl(slot.ttl, || clock.now()))
    }

    /// Removes every entry expired at the time of the call (each with an
    /// `Expired` event) and returns how many; the periodic sweep does the
    /// same. It looks only at the entries whose deadlines have passed, and
    /// holds a shard's lock for a few hundred of them at a time, handing it
    /// to any call waiting for it in between: entries expiring in bulk do not
    /// hold up the calls on their shard for the whole shard's sweep.
    pub fn sweep_expired(&self) -> usize {
        self.inner.sweep_expired()
    }

    // ----- loading ------------------------------------------------------

    /// The live value of `key`, or the one `load` returns, which is stored
    /// (with an `Inserted` event) and returned.
    ///
    /// Concurrent callers for one key run `load` once: the others wait for its
    /// value. `load` runs without any lock held. If a write or delete of the
    /// key happens while `load` runs (a `delete_all` with a filter counts for
    /// every key: it cannot judge a value not stored yet), the loaded value
    /// is returned but not stored, since it may be older than what that
    /// write said; a caller arriving after that write or delete does not
    /// wait for that load. A call that changes nothing (a `replace` that
    /// finds no entry) leaves it be.
    ///
    /// `load` must not load `key` itself from this cache: it would wait for
    /// its own load. A caller that waits blocks its thread: in async code,
    /// use [`get_or_insert_with_async`](Self::get_or_insert_with_async)
    /// (on a one-thread runtime, a blocking wait for a load that a task of
    /// the same runtime leads never ends).
    pub fn get_or_insert_with(&self, key: K, load: impl FnOnce() -> V) -> V {
        match self.inner.load::<std::convert::Infallible>(key, || Ok(load())) {
            Ok(v) => v,
            Err(never) => match *never {},
        }
    }

    /// Like [`get_or_insert_with`](Self::get_or_insert_with) with a loader
    /// that can fail: nothing is stored then, and every caller waiting on
    /// that load gets the same error.
    pub fn try_get_or_insert_with<E>(&self, key: K, load: impl FnOnce() -> Result<V, E>) -> Result<V, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        self.inner.load(key, load)
    }

    /// [`get_or_insert_with`](Self::get_or_insert_with) for a loader that is
    /// async (a database client, another service): the same single flight
    /// and the same rule for a write or delete that overtakes the load, and
    /// callers waiting for another's load do not block their thread.
    ///
    /// If the future leading a load is dropped before it ends, nothing is
    /// stored, and the callers waiting on it load for themselves.
    ///
    /// ```
    /// use nebulex::Cache;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let cache: Cache<String, String> = Cache::builder().build().unwrap();
    /// // Stands for a database read.
    /// async fn read(id: &str) -> String {
    ///     format!("record {id}")
    /// }
    /// let v = cache.get_or_insert_with_async("user:1".to_string(), || read("1")).await;
    /// assert_eq!(v, "record 1");
    /// assert_eq!(cache.get("user:1").as_deref(), Some("record 1"));
    /// # });
    /// ```
    pub async fn get_or_insert_with_async<F>(&self, key: K, load: impl FnOnce() -> F) -> V
    where
        F: Future<Output = V>,
    {
        let loaded = self.inner.load_async::<std::convert::Infallible, _>(key, || async { Ok(load().await) }).await;
        match loaded {
            Ok(v) => v,
            Err(never) => match *never {},
        }
    }

    /// [`try_get_or_insert_with`](Self::try_get_or_insert_with) for an async
    /// loader; see [`get_or_insert_with_async`](Self::get_or_insert_with_async).
    pub async fn try_get_or_insert_with_async<E, F>(&self, key: K, load: impl FnOnce() -> F) -> Result<V, Arc<E>>
    where
        E: Send + Sync + 'static,
        F: Future<Output = Result<V, E>>,
    {
        self.inner.load_async(key, load).await
    }

    // ----- invalidation -------------------------------------------------

    /// Removes `key`'s entry **without emitting an event**; returns whether it
    /// held one. For applying a change that already happened elsewhere (a
    /// cluster invalidator), where an event would echo it back. A load of the
    /// key in flight will not store its result.
    pub fn invalidate<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut s = self.inner.lock_for(key);
        s.mark_load_stale(key);
        let Some((_, slot)) = s.map.remove(key) else { return false };
        s.bury(slot.value);
        true
    }

    /// Removes, without events, every entry whose key `pred` selects; returns
    /// how many. Loads in flight of the keys it selects will not store their
    /// results.
    pub fn invalidate_where(&self, mut pred: impl FnMut(&K) -> bool) -> usize {
        let mut removed = 0;
        for i in 0..self.inner.shards.len() {
            let mut s = self.inner.lock_shard(i);
            s.mark_loads_stale_where(&mut pred);
            removed += s.remove_where(|k, _| pred(k));
        }
        removed
    }

    // ----- listeners ----------------------------------------------------

    /// Calls `f` with every event whose type `filter` wants, until
    /// [`unregister_event_listener`](Self::unregister_event_listener).
    ///
    /// `f` runs **inline on the thread whose call made the change (a write, a
    /// read that found its entry expired, the sweeper), while the key's shard
    /// is locked**: that is what gives per-key order. So it must be fast, must
    /// not block, and must not call back into this cache (it would deadlock).
    /// Hand events to another thread (as streams do) for anything more.
    ///
    /// If `f` panics, the panic is caught once the panic hook has printed it:
    /// the call that emitted the event completes, and the other listeners
    /// still get the event.
    ///
    /// When no listener wants an event type, writes do not even build those
    /// events; a filter can be changed at any time with [`EventFilter::set`].
    ///
    /// Registering (or unregistering) takes every shard's lock at once, so
    /// that no call can tell a listener of some keys and not others: it waits
    /// for the calls in flight, listeners included.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use nebulex::{Cache, EventFilter, EventType};
    ///
    /// let cache: Cache<&str, i32> = Cache::builder().build()?;
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = seen.clone();
    /// cache.register_event_listener("log", EventFilter::all(), move |e| {
    ///     log.lock().unwrap().push(e.kind);
    /// })?;
    /// cache.put("a", 1);
    /// cache.put("a", 2);
    /// cache.delete(&"a"); // `K` is `&str`, so `delete` takes a `&&str`
    /// assert_eq!(*seen.lock().unwrap(), [EventType::Inserted, EventType::Updated, EventType::Deleted]);
    /// assert!(cache.unregister_event_listener("log"));
    /// # Ok::<(), nebulex::Error>(())
    /// ```
    pub fn register_event_listener(
        &self,
        id: impl Into<String>,
        filter: EventFilter,
        f: impl Fn(&CacheEntryEvent<K>) + Send + Sync + 'static,
    ) -> Result<(), Error> {
        let id = id.into();
        // Here, rather than in the first write that has an event.
        start_wall_clock();
        let mut master = self.inner.listeners.lock();
        if master.iter().any(|l| l.id == id) {
            return Err(Error::ListenerExists(id));
        }
        let listener = Arc::new(Listener { id, filter, f: Box::new(f) });
        let next: Listeners<K> = master.iter().cloned().chain(std::iter::once(listener)).collect();
        let _old = self.inner.install_listeners(&mut master, next);
        Ok(())
    }

    /// Removes the listener registered under `id`; returns whether there was one.
    pub fn unregister_event_listener(&self, id: &str) -> bool {
        let mut master = self.inner.listeners.lock();
        if !master.iter().any(|l| l.id == id) {
            return false;
        }
        let next: Listeners<K> = master.iter().filter(|l| l.id != id).cloned().collect();
        let old = self.inner.install_listeners(&mut master, next);
        // The last handle on the removed listener goes with `old`, once no
        // lock is held: whatever its closure held may call into the cache
        // (even register or unregister a listener) as it drops.
        drop(master);
        drop(old);
        true
    }
}

impl<K> Cache<K, i64>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
{
    /// Adds `by` to the counter under `key` (a missing one starts from 0) and
    /// returns the new value; wraps around on overflow.
    pub fn incr(&self, key: K, by: i64) -> i64 {
        self.inner.update(key, by, |v| v.wrapping_add(by), Command::Incr)
    }

    /// Subtracts `by` from the counter under `key` (a missing one starts from
    /// 0) and returns the new value; wraps around on overflow.
    pub fn decr(&self, key: K, by: i64) -> i64 {
        self.inner.update(key, 0i64.wrapping_sub(by), |v| v.wrapping_sub(by), Command::Decr)
    }
}

/// A shard's lock. The values the call holding it replaced or removed
/// ([`Shard::bury`]) are dropped once it is released: a value's `Drop` may
/// panic, or call the cache.
struct Guard<'a, K, V>(Option<MutexGuard<'a, Shard<K, V>>>);

impl<'a, K, V> Guard<'a, K, V> {
    fn new(guard: MutexGuard<'a, Shard<K, V>>) -> Self {
        Guard(Some(guard))
    }

    /// Lets a thread waiting for the lock have it, then takes it back; the
    /// values buried so far are dropped meanwhile.
    fn bump(&mut self) {
        let Some(guard) = self.0.as_mut() else { return };
        let dead = dead_of(guard);
        let panicked = MutexGuard::unlocked_fair(guard, || drop_each(dead));
        panicked.resume();
    }
}

impl<K, V> std::ops::Deref for Guard<'_, K, V> {
    type Target = Shard<K, V>;
    #[inline]
    fn deref(&self) -> &Shard<K, V> {
        let Some(guard) = self.0.as_deref() else { unreachable!("a shard's guard is emptied only as it drops") };
        guard
    }
}

impl<K, V> std::ops::DerefMut for Guard<'_, K, V> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Shard<K, V> {
        let Some(guard) = self.0.as_deref_mut() else { unreachable!("a shard's guard is emptied only as it drops") };
        guard
    }
}

impl<K, V> Drop for Guard<'_, K, V> {
    #[inline]
    fn drop(&mut self) {
        let Some(mut guard) = self.0.take() else { return };
        if guard.dead.is_empty() {
            return;
        }
        let dead = dead_of(&mut guard);
        drop(guard);
        drop_each(dead).resume();
    }
}

/// The values buried under `guard`, taken to drop once it is released
/// (while a panic unwinds, they are left for the next call: a second panic
/// would abort the process).
fn dead_of<K, V>(guard: &mut Shard<K, V>) -> Vec<V> {
    if std::thread::panicking() {
        return Vec::new();
    }
    std::mem::take(&mut guard.dead)
}

/// Releases several shards' locks, then drops the values their call buried
/// (a value's `Drop` calling the cache must find none of them held).
fn release<K, V>(mut guards: Vec<Guard<'_, K, V>>) {
    let dead: Vec<Vec<V>> = guards.iter_mut().filter(|g| !g.dead.is_empty()).map(|g| dead_of(g)).collect();
    drop(guards);
    drop_each(dead.into_iter().flatten()).resume();
}

/// Drops each value, even after one's `Drop` panicked (the first panic is
/// held for the caller to raise: two at once would abort the process).
fn drop_each<V>(values: impl IntoIterator<Item = V>) -> Held {
    let mut first = None;
    for value in values {
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(move || drop(value))) {
            first.get_or_insert(panic);
        }
    }
    Held(first)
}

impl<K, V> Inner<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    #[inline]
    fn shard_index<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (self.selector.hash_one(key) as usize) & self.shard_mask
    }

    #[inline]
    fn lock_for<Q: Hash + ?Sized>(&self, key: &Q) -> Guard<'_, K, V> {
        self.lock_shard(self.shard_index(key))
    }

    /// Locks shard `i`.
    #[inline]
    fn lock_shard(&self, i: usize) -> Guard<'_, K, V> {
        Guard::new(self.shards[i].0.lock())
    }

    /// Locks several shards in index order (so two callers cannot deadlock);
    /// `slots[i]` is the position of shard `i`'s guard, if locked.
    fn lock_shards(&self, shard_ids: impl IntoIterator<Item = usize>) -> (Vec<Guard<'_, K, V>>, Vec<Option<usize>>) {
        let mut wanted = vec![false; self.shards.len()];
        shard_ids.into_iter().for_each(|i| wanted[i] = true);
        let mut slots = vec![None; self.shards.len()];
        let mut guards = Vec::new();
        for (i, _) in wanted.iter().enumerate().filter(|(_, w)| **w) {
            slots[i] = Some(guards.len());
            guards.push(self.lock_shard(i));
        }
        (guards, slots)
    }

    /// One version for an event that spans several shards: above every
    /// version those shards gave out.
    fn shared_version(guards: &mut [Guard<'_, K, V>]) -> u64 {
        let version = guards.iter().map(|g| g.version).max().unwrap_or(0) + 1;
        guards.iter_mut().for_each(|g| g.version = version);
        version
    }

    /// Gives every shard the listener list `next` at once, under all their
    /// locks: a call that emits one event for keys of several shards uses
    /// one shard's list, so a listener must not be in some shards' lists
    /// and not yet (or no longer) in others', or it would hear of a key a
    /// bulk call wrote and miss what the key's own shard did next.
    /// Returns the list replaced, for the caller to drop once it holds no
    /// lock.
    #[must_use]
    fn install_listeners(&self, master: &mut Listeners<K>, next: Listeners<K>) -> Listeners<K> {
        let (mut guards, _) = self.lock_shards(0..self.shards.len());
        for g in guards.iter_mut() {
            g.listeners = next.clone(); // (the master list still holds the old ones)
        }
        drop(guards);
        std::mem::replace(master, next)
    }

    /// Builds the event and calls the listeners that want it, if any does.
    #[inline]
    fn emit(
        &self,
        listeners: &[Arc<Listener<K>>],
        kind: EventType,
        command: Command,
        version: u64,
        target: impl FnOnce() -> Target<K>,
    ) {
        if !listens(listeners, kind) {
            return;
        }
        let event = CacheEntryEvent {
            cache: self.name,
            kind,
            target: target(),
            command,
            version,
            metadata: EventMetadata {
                node: self.node,
                partition: None,
                partitions: None,
                topic: None,
                seq: 0,
                timestamp: wall_now(),
            },
        };
        for l in listeners.iter().filter(|l| l.filter.contains(kind)) {
            // A listener's panic (printed by the panic hook) is caught: the
            // call, under whose lock this runs, completes, and the other
            // listeners still hear the event.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| (l.f)(&event)));
        }
    }

    /// Removes the expired entry at `index`, with its `Expired` event.
    fn remove_expired(&self, s: &mut Shard<K, V>, index: usize, command: Command) {
        if let Some(k) = s.remove_index(index) {
            s.mark_load_stale(&k);
            let version = s.next_version();
            self.emit(&s.listeners, EventType::Expired, command, version, || Target::Key(k));
        }
    }

    /// Brings a shard back within its bound after a write of `command`:
    /// evicts the least used of a sample (`Evicted`), or an expired entry
    /// met in it, which is removed as one a call found (`Expired`). The
    /// entry at index `spare`, the one a single-key write just stored, is
    /// not among them: a write is not its own victim.
    #[inline]
    fn trim(&self, s: &mut Shard<K, V>, command: Command, spare: Option<usize>) {
        while s.over_capacity() {
            let Some((k, expired)) = s.evict_one(|| self.clock.now(), spare) else { break };
            s.mark_load_stale(&k);
            let version = s.next_version();
            let (kind, command) =
                if expired { (EventType::Expired, command) } else { (EventType::Evicted, Command::Evict) };
            self.emit(&s.listeners, kind, command, version, || Target::Key(k));
        }
    }

    fn write(&self, key: K, value: V, ttl: u64, mode: Mode, command: Command) -> bool {
        let now = || self.clock.now();
        let mut guard = self.lock_for(&key);
        let s = &mut *guard;
        let bounded = s.bounded();
        let hash = s.map.hash(&key);
        // A load of the key in flight is overtaken only by a write that
        // happens (not by a `put_new` or `replace` that does nothing).
        match s.map.get_full_mut_hashed(hash, &key) {
            Some((_, _, slot)) if !slot.is_expired(now) => {
                if mode == Mode::OnlyNew {
                    return false;
                }
                let old = std::mem::replace(&mut slot.value, value);
                let expires_at = slot.set_ttl(ttl, now);
                if bounded {
                    slot.used();
                }
                s.bury(old);
                s.mark_load_stale(&key);
                s.expires_hashed(hash, expires_at);
                s.age();
                let version = s.next_version();
                self.emit(&s.listeners, EventType::Updated, command, version, || Target::Key(key));
                true
            }
            found => {
                let expired = found.map(|(i, _, _)| i);
                if mode == Mode::OnlyExisting {
                    if let Some(i) = expired {
                        self.remove_expired(s, i, command);
                    }
                    return false;
                }
                // The key is copied for the event before an expired entry
                // goes: a `Clone` that panics leaves it be.
                let event_key = inserted_key(s, &key);
                if let Some(i) = expired {
                    self.remove_expired(s, i, command);
                }
                s.mark_load_stale(&key);
                self.insert_new(s, hash, key, event_key, Slot::new(value, ttl, now), command);
                true
            }
        }
    }

    /// Inserts an entry for a key that has none (whose hash, `map.hash`, is
    /// `hash`), with its `Inserted` event (of `event_key`, the key's copy
    /// from [`inserted_key`]), then keeps the shard within its bound.
    #[inline]
    fn insert_new(
        &self,
        s: &mut Shard<K, V>,
        hash: u64,
        key: K,
        event_key: Option<K>,
        slot: Slot<V>,
        command: Command,
    ) {
        let index = s.insert_hashed(hash, key, slot);
        let version = s.next_version();
        if let Some(key) = event_key {
            self.emit(&s.listeners, EventType::Inserted, command, version, || Target::Key(key));
        }
        self.trim(s, command, Some(index));
    }

    fn write_all(&self, entries: impl IntoIterator<Item = (K, V)>, only_new: bool) -> bool {
        let ttl = self.default_ttl;
        let now = || self.clock.now();
        let command = if only_new { Command::PutNewAll } else { Command::PutAll };
        // Repeated keys: the last value wins, the first position stays.
        let mut batch: IndexMap<K, V, MapHasher> = IndexMap::with_hasher(self.selector);
        batch.extend(entries);
        if batch.is_empty() {
            return true;
        }
        let (mut guards, slots) = self.lock_shards(batch.keys().map(|k| self.shard_index(k)));
        let shard_of = |k: &K| slots[self.shard_index(k)].unwrap_or(0);
        if only_new {
            let any_live = batch.keys().any(|k| {
                let s = &guards[shard_of(k)];
                s.map.get(k).is_some_and(|slot| !slot.is_expired(now))
            });
            if any_live {
                return false;
            }
        }
        let (mut inserted, mut updated) = (Vec::new(), Vec::new());
        // A key's `Hash`, `Eq` or `Clone` that panics stops the call where it
        // stands: what it stored so far still has its events.
        let written = hold_panic(|| {
            for (key, value) in batch {
                let s = &mut *guards[shard_of(&key)];
                s.mark_load_stale(&key);
                let hash = s.map.hash(&key);
                match s.map.get_full_mut_hashed(hash, &key) {
                    Some((_, _, slot)) if !slot.is_expired(now) => {
                        let old = std::mem::replace(&mut slot.value, value);
                        let expires_at = slot.set_ttl(ttl, now);
                        s.bury(old);
                        s.expires_hashed(hash, expires_at);
                        updated.push(key);
                    }
                    found => {
                        if let Some((i, _, _)) = found {
                            self.remove_expired(s, i, command);
                        }
                        s.insert_hashed(hash, key.clone(), Slot::new(value, ttl, now));
                        inserted.push(key);
                    }
                }
            }
        });
        let version = Self::shared_version(&mut guards);
        let listeners = guards[0].listeners.clone();
        if !inserted.is_empty() {
            self.emit(&listeners, EventType::Inserted, command, version, || Target::Keys(inserted));
        }
        if !updated.is_empty() {
            self.emit(&listeners, EventType::Updated, command, version, || Target::Keys(updated));
        }
        for g in guards.iter_mut() {
            self.trim(g, command, None);
        }
        release(guards);
        written.resume();
        true
    }

    fn update(&self, key: K, default: V, f: impl FnOnce(&V) -> V, command: Command) -> V {
        let ttl = self.default_ttl;
        let now = || self.clock.now();
        let mut guard = self.lock_for(&key);
        let s = &mut *guard;
        let bounded = s.bounded();
        let hash = s.map.hash(&key);
        match s.map.get_full_mut_hashed(hash, &key) {
            Some((_, _, slot)) if !slot.is_expired(now) => {
                let value = f(&slot.value);
                let old = std::mem::replace(&mut slot.value, value.clone());
                if bounded {
                    slot.used();
                }
                s.bury(old);
                s.mark_load_stale(&key);
                s.age();
                let version = s.next_version();
                self.emit(&s.listeners, EventType::Updated, command, version, || Target::Key(key));
                value
            }
            found => {
                let expired = found.map(|(i, _, _)| i);
                // The key is copied for the event before anything changes.
                let event_key = inserted_key(s, &key);
                if let Some(i) = expired {
                    self.remove_expired(s, i, command);
                }
                s.mark_load_stale(&key);
                self.insert_new(s, hash, key, event_key, Slot::new(default.clone(), ttl, now), command);
                default
            }
        }
    }

    fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut guard = self.lock_for(key);
        let s = &mut *guard;
        let bounded = s.bounded();
        let (i, _, slot) = s.map.get_full_mut(key)?;
        if slot.is_expired(|| self.clock.now()) {
            self.remove_expired(s, i, Command::Get);
            return None;
        }
        let value = slot.value.clone();
        if bounded {
            slot.used();
            s.age();
        }
        Some(value)
    }

    /// Runs `f` on `key`'s live entry; removes it (with `Expired`) if expired.
    fn with_live<Q, R>(&self, key: &Q, command: Command, f: impl FnOnce(&K, &Slot<V>) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut guard = self.lock_for(key);
        let s = &mut *guard;
        let (i, k, slot) = s.map.get_full_mut(key)?;
        if slot.is_expired(|| self.clock.now()) {
            self.remove_expired(s, i, command);
            return None;
        }
        Some(f(k, slot))
    }

    /// Changes `key`'s live entry's expiry with `set_ttl` (which returns the
    /// new `expires_at`), with an `Updated` event.
    fn touch_live<Q>(&self, key: &Q, command: Command, set_ttl: impl FnOnce(&mut Slot<V>) -> u64) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut guard = self.lock_for(key);
        let s = &mut *guard;
        let Some((i, k, slot)) = s.map.get_full_mut(key) else { return false };
        if slot.is_expired(|| self.clock.now()) {
            self.remove_expired(s, i, command);
            return false;
        }
        // The key is copied for the event first: a `Clone` that panics
        // leaves the entry as it was.
        let event_key = listens(&s.listeners, EventType::Updated).then(|| k.clone());
        let expires_at = set_ttl(slot);
        s.expires(key, expires_at);
        s.mark_load_stale(key);
        let version = s.next_version();
        if let Some(k) = event_key {
            self.emit(&s.listeners, EventType::Updated, command, version, || Target::Key(k));
        }
        true
    }

    fn count_all(&self, query: Query<K, V>) -> usize {
        let now = self.clock.now();
        let live = |slot: &Slot<V>| !slot.is_expired(|| now);
        match query {
            Query::All => self.shards.iter().map(|s| s.0.lock().map.iter().filter(|(_, v)| live(v)).count()).sum(),
            Query::Keys(keys) => {
                let mut seen = std::collections::HashSet::with_capacity_and_hasher(keys.len(), self.selector);
                keys.into_iter()
                    .filter(|k| seen.insert(k.clone()))
                    .filter(|k| self.lock_for(k).map.get(k).is_some_and(live))
                    .count()
            }
            Query::Filter(f) => self
                .shards
                .iter()
                .map(|s| s.0.lock().map.iter().filter(|(k, v)| live(v) && f(k, &v.value)).count())
                .sum(),
        }
    }

    fn delete_all(&self, query: Query<K, V>) -> usize {
        match query {
            Query::All => {
                let (mut guards, _) = self.lock_shards(0..self.shards.len());
                let mut removed = 0;
                for s in guards.iter_mut() {
                    self.remove_all_expired(s, Command::DeleteAll);
                    removed += s.map.len();
                    s.clear();
                    s.mark_loads_stale();
                }
                let version = Self::shared_version(&mut guards);
                self.emit(&guards[0].listeners, EventType::Deleted, Command::DeleteAll, version, || Target::All);
                release(guards);
                removed
            }
            Query::Keys(keys) => {
                if keys.is_empty() {
                    return 0;
                }
                // The event names each key once, in first-seen order.
                let mut seen = std::collections::HashSet::with_capacity_and_hasher(keys.len(), self.selector);
                let mut keys: Vec<K> = keys.into_iter().filter(|k| seen.insert(k.clone())).collect();
                let (mut guards, slots) = self.lock_shards(keys.iter().map(|k| self.shard_index(k)));
                let (mut removed, mut judged) = (0, 0);
                // A key's `Hash` or `Eq` that panics stops the call where it
                // stands: the event names the keys judged before it.
                let deleted = hold_panic(|| {
                    for k in &keys {
                        let s = &mut *guards[slots[self.shard_index(k)].unwrap_or(0)];
                        s.mark_load_stale(k);
                        if let Some((i, _, slot)) = s.map.get_full_mut(k) {
                            if slot.is_expired(|| self.clock.now()) {
                                self.remove_expired(s, i, Command::DeleteAll);
                            } else {
                                s.remove_index(i);
                                removed += 1;
                            }
                        }
                        judged += 1;
                    }
                });
                keys.truncate(judged);
                if !keys.is_empty() {
                    let version = Self::shared_version(&mut guards);
                    self.emit(&guards[0].listeners, EventType::Deleted, Command::DeleteAll, version, || {
                        Target::Keys(keys)
                    });
                }
                release(guards);
                deleted.resume();
                removed
            }
            Query::Filter(f) => {
                let (mut guards, _) = self.lock_shards(0..self.shards.len());
                let mut removed = Vec::new();
                // A predicate that panics stops the call where it stands: what
                // it removed so far still has its event, then the panic goes on.
                let mut panicked = None;
                for s in guards.iter_mut() {
                    self.remove_all_expired(s, Command::DeleteAll);
                    s.remove_where(|k, slot| {
                        if panicked.is_some() {
                            return false;
                        }
                        // The key is copied for the event before the entry
                        // goes: a `Clone` that panics leaves its entry be.
                        let judged = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            let hit = f(k, &slot.value);
                            if hit {
                                removed.push(k.clone());
                            }
                            hit
                        }));
                        match judged {
                            Ok(hit) => hit,
                            Err(panic) => {
                                panicked = Some(panic);
                                false
                            }
                        }
                    });
                    // A load in flight has no value the filter could judge
                    // yet: it is overtaken, to be safe.
                    s.mark_loads_stale();
                    if panicked.is_some() {
                        break;
                    }
                }
                let count = removed.len();
                if count > 0 {
                    let version = Self::shared_version(&mut guards);
                    self.emit(&guards[0].listeners, EventType::Deleted, Command::DeleteAll, version, || {
                        Target::Keys(removed)
                    });
                }
                release(guards);
                Held(panicked).resume();
                count
            }
        }
    }

    /// Removes every expired entry of a shard, each with an `Expired` event.
    fn remove_all_expired(&self, s: &mut Shard<K, V>, command: Command) -> usize {
        self.remove_expired_batch(s, || self.clock.now(), command, usize::MAX).0
    }

    /// Removes entries of a shard expired at `now()`, each with an `Expired`
    /// event, up to `limit` deadline records' worth; returns how many it
    /// removed and whether a record is still due.
    fn remove_expired_batch(
        &self,
        s: &mut Shard<K, V>,
        now: impl FnOnce() -> u64,
        command: Command,
        limit: usize,
    ) -> (usize, bool) {
        let mut expired = Vec::new();
        let more = s.remove_expired_at(now, limit, |k| expired.push(k));
        let count = expired.len();
        for k in expired {
            s.mark_load_stale(&k);
            let version = s.next_version();
            self.emit(&s.listeners, EventType::Expired, command, version, || Target::Key(k));
        }
        (count, more)
    }

    /// Sweeps what expired by the time of the call (the clock is read once,
    /// when a shard first has deadlines), shard by shard, [`SWEEP_BATCH`]
    /// records per hold of a shard's lock: between two batches the lock goes
    /// to a thread waiting for it, so entries expiring in bulk hold up no
    /// call for the whole shard's sweep.
    fn sweep_expired(&self) -> usize {
        let mut now = None;
        let mut swept = 0;
        for i in 0..self.shards.len() {
            let mut guard = self.lock_shard(i);
            loop {
                let at = || *now.get_or_insert_with(|| self.clock.now());
                let (removed, more) = self.remove_expired_batch(&mut guard, at, Command::Sweep, SWEEP_BATCH);
                swept += removed;
                if !more {
                    break;
                }
                guard.bump();
            }
        }
        swept
    }

    fn load<E>(&self, key: K, load: impl FnOnce() -> Result<V, E>) -> Result<V, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        loop {
            match self.begin_load(&key) {
                Begin::Hit(value) => return Ok(value),
                Begin::Wait(running) => match settled(running.wait()) {
                    Some(result) => return result,
                    None => continue,
                },
                Begin::Lead(running) => {
                    let flight = Flight { inner: self, key: &key, load: &running, outcome: Outcome::Abandoned };
                    return self.land(flight, load());
                }
            }
        }
    }

    /// [`load`](Self::load) with a loader that is a future: waiting for
    /// another caller's load does not block the thread. If the future that
    /// leads a load is dropped, its waiters load for themselves.
    async fn load_async<E, F>(&self, key: K, load: impl FnOnce() -> F) -> Result<V, Arc<E>>
    where
        E: Send + Sync + 'static,
        F: Future<Output = Result<V, E>>,
    {
        loop {
            match self.begin_load(&key) {
                Begin::Hit(value) => return Ok(value),
                Begin::Wait(running) => match settled(running.finished().await) {
                    Some(result) => return result,
                    None => continue,
                },
                Begin::Lead(running) => {
                    let flight = Flight { inner: self, key: &key, load: &running, outcome: Outcome::Abandoned };
                    let loaded = load().await;
                    return self.land(flight, loaded);
                }
            }
        }
    }

    /// The live value of `key`, or the load to wait for, or a new load for
    /// this caller to lead (registered: callers from now on wait for it).
    fn begin_load(&self, key: &K) -> Begin<V> {
        let mut guard = self.lock_for(key);
        let s = &mut *guard;
        let mut expired = None;
        if let Some((i, _, slot)) = s.map.get_full_mut(key) {
            if !slot.is_expired(|| self.clock.now()) {
                let value = slot.value.clone();
                if s.bounded() {
                    s.record_use(i);
                }
                return Begin::Hit(value);
            }
            expired = Some(i);
        }
        let owned = match expired {
            Some(i) => {
                // The key is copied before the expired entry goes (a `Clone`
                // that panics leaves it be), which overtakes any load of it.
                let owned = key.clone();
                self.remove_expired(s, i, Command::Load);
                owned
            }
            None => match s.loads.get(key) {
                Some(running) => return Begin::Wait(running.clone()),
                None => key.clone(),
            },
        };
        let running = Arc::new(Load::new());
        s.loads.insert(owned, running.clone());
        Begin::Lead(running)
    }

    /// Ends a led load with its loader's result: stores a loaded value
    /// (unless a write overtook it) and hands the outcome to its waiters.
    fn land<E>(&self, mut flight: Flight<'_, K, V>, loaded: Result<V, E>) -> Result<V, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        match loaded {
            Ok(value) => {
                self.store_loaded(flight.key, flight.load, value.clone());
                flight.outcome = Outcome::Loaded(value.clone());
                Ok(value)
            }
            Err(e) => {
                let e = Arc::new(e);
                flight.outcome = Outcome::Failed(e.clone());
                Err(e)
            }
        }
    }

    /// Stores a loaded value unless a write or delete overtook the load.
    fn store_loaded(&self, key: &K, running: &Arc<Load<V>>, value: V) {
        let mut guard = self.lock_for(key);
        let s = &mut *guard;
        s.forget_load(key, running);
        if running.is_stale() || s.map.contains_key(key) {
            return;
        }
        let ttl = self.default_ttl;
        let hash = s.map.hash(key);
        let event_key = inserted_key(s, key);
        self.insert_new(s, hash, key.clone(), event_key, Slot::new(value, ttl, || self.clock.now()), Command::Load);
    }
}

/// A copy of `key` for its `Inserted` event, if a listener wants one: made
/// before the call changes anything, so that a `Clone` that panics leaves
/// the entry as it was. (And before the key moves into the table: reading it
/// back from the table's fresh line would stall the write, 7-10 % of an
/// event's time.)
#[inline]
fn inserted_key<K: Clone, V>(s: &Shard<K, V>, key: &K) -> Option<K> {
    listens(&s.listeners, EventType::Inserted).then(|| key.clone())
}

/// A panic held back while a bulk call announces what it changed before it.
struct Held(Option<Box<dyn std::any::Any + Send>>);

impl Held {
    /// Raises the held panic again, if there is one.
    fn resume(self) {
        if let Some(panic) = self.0 {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Runs `f`, holding a panic from it (a key's `Hash`, `Eq` or `Clone`)
/// until the caller has emitted the events of what `f` did before it.
fn hold_panic(f: impl FnOnce()) -> Held {
    Held(std::panic::catch_unwind(AssertUnwindSafe(f)).err())
}

/// Where a load starts: see [`Inner::begin_load`].
enum Begin<V> {
    Hit(V),
    Wait(Arc<Load<V>>),
    Lead(Arc<Load<V>>),
}

/// What a waiter makes of another caller's load: its result, or `None` to
/// try again (the loader panicked or was dropped, or failed with an error of
/// another type than this caller's).
fn settled<V, E: Send + Sync + 'static>(outcome: Outcome<V>) -> Option<Result<V, Arc<E>>> {
    match outcome {
        Outcome::Loaded(v) => Some(Ok(v)),
        Outcome::Failed(e) => e.downcast::<E>().ok().map(Err),
        Outcome::Abandoned => None,
    }
}

/// Finishes a load for its waiters however the loader ends, panics included.
struct Flight<'a, K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    inner: &'a Inner<K, V>,
    key: &'a K,
    load: &'a Arc<Load<V>>,
    outcome: Outcome<V>,
}

impl<K, V> Drop for Flight<'_, K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        let forgotten = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.inner.lock_for(self.key).forget_load(self.key, self.load)
        }));
        if forgotten.is_err() {
            // The key's `Hash` or `Eq` panicked: the load is found by itself
            // instead, or later callers of the key would wait on it for ever.
            for shard in self.inner.shards.iter() {
                shard.0.lock().loads.retain(|_, load| !Arc::ptr_eq(load, self.load));
            }
        }
        self.load.finish(std::mem::replace(&mut self.outcome, Outcome::Abandoned));
        // The caller hears of the panic, unless it is unwinding from one
        // already (in `store_loaded`, say).
        if let Err(panic) = forgotten {
            if !std::thread::panicking() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl<K, V> Sweep for Inner<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn sweep(&self) {
        self.sweep_expired();
    }
}

impl<K, V> Drop for Inner<K, V> {
    fn drop(&mut self) {
        // Extensions (such as a stream) may hold listeners of their own; drop
        // them before the shards, outside of any lock.
        drop(self.extensions.drain());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;

    /// A listener registered while another call holds a shard (here a
    /// listener that blocks) must not start hearing of keys some shards
    /// before others: a bulk write over shards 0 and 2 would tell it of the
    /// key of shard 2, whose own deletion it would then miss.
    #[test]
    fn a_listener_is_installed_in_every_shard_at_once() {
        let cache: Cache<u32, u32> = Cache::builder().shards(4).build().unwrap();
        let inner = &cache.inner;
        let key_in = |shard: usize| (0u32..).find(|k| inner.shard_index(k) == shard).unwrap();
        let (a, b, c) = (key_in(0), key_in(1), key_in(2));
        let in_shard_0 =
            |id: &str| inner.shards[0].0.try_lock().is_some_and(|s| s.listeners.iter().any(|l| l.id == id));

        // "hold" blocks on b's event, holding shard 1, until released.
        let (held_tx, held_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        cache
            .register_event_listener("hold", EventFilter::all(), move |e| {
                if e.target == Target::Key(b) {
                    let _ = held_tx.send(());
                    let _ = release_rx.lock().recv();
                }
            })
            .unwrap();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (cache, in_shard_0) = (&cache, &in_shard_0);
        std::thread::scope(|s| {
            s.spawn(move || cache.put(b, 0));
            held_rx.recv().unwrap();
            let log = heard.clone();
            s.spawn(move || {
                cache.register_event_listener("late", EventFilter::all(), move |e| {
                    log.lock().push((e.kind, e.target.clone()))
                })
            });
            let (done_tx, done_rx) = mpsc::channel();
            s.spawn(move || {
                // Once "late" is in shard 0's list, or after a while (it waits
                // for shard 1 with every shard it has).
                let since = Instant::now();
                while !in_shard_0("late") && since.elapsed() < Duration::from_millis(200) {
                    std::thread::yield_now();
                }
                cache.put_all([(a, 1), (c, 1)]);
                cache.delete(&c);
                let _ = done_tx.send(());
            });
            // The writes finish before shard 1 is let go only if "late" was
            // installed in shard 0 alone.
            let _ = done_rx.recv_timeout(Duration::from_secs(1));
            release_tx.send(()).unwrap();
        });
        let heard = heard.lock();
        let last_of_c = heard.iter().rev().find(|(_, t)| match t {
            Target::Key(k) => *k == c,
            Target::Keys(ks) => ks.contains(&c),
            Target::All => true,
        });
        assert!(!cache.contains_key(&c));
        assert!(
            last_of_c.is_none_or(|(kind, _)| *kind == EventType::Deleted),
            "the listener heard {c} written and not deleted: {heard:?}"
        );
    }
}

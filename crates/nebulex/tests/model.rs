//! Model-based test: random sequences of every cache call, checked against a
//! plain map with expiry times, on a manual clock.
//!
//! For every call the model predicts the answer and the exact events (`Expired`
//! events of one call compared as a set, since a shard's order is not the
//! model's). With `max_entries`, the model cannot know which key is evicted:
//! it takes the `Evicted` events the call emitted (they always come last) and
//! removes those keys, checking that each named a key the cache held. At the
//! end, the whole event stream replays to exactly the keys the cache holds.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{assert_versions_increase, brief, replay, Brief, Recorder};
use nebulex::{Cache, Command as C, EventType, ManualClock, Query, Target};
use proptest::collection::vec;
use proptest::prelude::*;

use EventType::{Deleted, Evicted, Expired, Inserted, Updated};

const KEYS: u8 = 16;

#[derive(Clone, Debug)]
enum Op {
    Put(u8, i64),
    PutWithTtl(u8, i64, u64),
    PutNew(u8, i64),
    Replace(u8, i64),
    PutAll(Vec<(u8, i64)>),
    PutNewAll(Vec<(u8, i64)>),
    Get(u8),
    GetAll(Vec<u8>),
    ContainsKey(u8),
    Take(u8),
    Delete(u8),
    DeleteAll,
    DeleteKeys(Vec<u8>),
    DeleteWhere(i64, i64),
    CountAll,
    CountKeys(Vec<u8>),
    CountWhere(i64, i64),
    Ttl(u8),
    Expire(u8, u64),
    Touch(u8),
    Update(u8, i64, i64),
    Incr(u8, i64),
    Decr(u8, i64),
    Load(u8, i64),
    TryLoad(u8, Option<i64>),
    Sweep,
    Advance(u64),
    Len,
}

#[derive(Clone, Debug, PartialEq)]
enum Answer {
    Unit,
    Bool(bool),
    Opt(Option<i64>),
    Map(HashMap<u8, i64>),
    Count(usize),
    Ttl(Option<Option<Duration>>),
    Val(i64),
    Loaded(Result<i64, ()>),
}

/// The filter of `DeleteWhere` / `CountWhere`.
fn pred(m: i64, r: i64) -> impl Fn(&u8, &i64) -> bool + Send + Sync + Copy + 'static {
    move |k, v| (i64::from(*k) + *v).rem_euclid(m) == r
}

fn op() -> impl Strategy<Value = Op> {
    let k = || 0..KEYS;
    let v = || -50i64..50;
    let ttl = || 1u64..40;
    let pairs = || vec((0..KEYS, -50i64..50), 0..6);
    let keys = || vec(0..KEYS, 1..6);
    prop_oneof![
        6 => (k(), v()).prop_map(|(k, v)| Op::Put(k, v)),
        4 => (k(), v(), ttl()).prop_map(|(k, v, t)| Op::PutWithTtl(k, v, t)),
        3 => (k(), v()).prop_map(|(k, v)| Op::PutNew(k, v)),
        3 => (k(), v()).prop_map(|(k, v)| Op::Replace(k, v)),
        2 => pairs().prop_map(Op::PutAll),
        2 => pairs().prop_map(Op::PutNewAll),
        4 => k().prop_map(Op::Get),
        2 => vec(0..KEYS, 0..6).prop_map(Op::GetAll),
        3 => k().prop_map(Op::ContainsKey),
        3 => k().prop_map(Op::Take),
        3 => k().prop_map(Op::Delete),
        1 => Just(Op::DeleteAll),
        2 => keys().prop_map(Op::DeleteKeys),
        2 => (2i64..5).prop_flat_map(|m| (Just(m), 0..m)).prop_map(|(m, r)| Op::DeleteWhere(m, r)),
        1 => Just(Op::CountAll),
        1 => keys().prop_map(Op::CountKeys),
        1 => (2i64..5).prop_flat_map(|m| (Just(m), 0..m)).prop_map(|(m, r)| Op::CountWhere(m, r)),
        2 => k().prop_map(Op::Ttl),
        2 => (k(), ttl()).prop_map(|(k, t)| Op::Expire(k, t)),
        2 => k().prop_map(Op::Touch),
        2 => (k(), v(), v()).prop_map(|(k, d, x)| Op::Update(k, d, x)),
        2 => (k(), v()).prop_map(|(k, by)| Op::Incr(k, by)),
        2 => (k(), v()).prop_map(|(k, by)| Op::Decr(k, by)),
        3 => (k(), v()).prop_map(|(k, v)| Op::Load(k, v)),
        2 => (k(), proptest::option::of(v())).prop_map(|(k, v)| Op::TryLoad(k, v)),
        1 => Just(Op::Sweep),
        4 => (0u64..25).prop_map(Op::Advance),
        1 => Just(Op::Len),
    ]
}

#[derive(Clone, Debug)]
struct Entry {
    value: i64,
    /// The time to live it was last written with (what `touch` restarts).
    ttl: Option<u64>,
    expires_at: Option<u64>,
}

/// What the cache should hold: every stored entry, expired ones included until
/// a call or a sweep removes them. Times in milliseconds.
struct Model {
    now: u64,
    map: BTreeMap<u8, Entry>,
    default_ttl: Option<u64>,
}

impl Model {
    fn is_expired(&self, e: &Entry) -> bool {
        e.expires_at.is_some_and(|t| self.now >= t)
    }

    fn is_live(&self, k: u8) -> bool {
        self.map.get(&k).is_some_and(|e| !self.is_expired(e))
    }

    fn entry(&self, value: i64, ttl: Option<u64>) -> Entry {
        Entry { value, ttl, expires_at: ttl.map(|t| self.now + t) }
    }

    /// Removes `k`'s entry if it is expired (with its `Expired` event); returns
    /// the live value, if any.
    fn purge(&mut self, k: u8, cmd: C, evs: &mut Vec<Brief<u8>>) -> Option<i64> {
        let e = self.map.get(&k)?;
        if self.is_expired(e) {
            self.map.remove(&k);
            evs.push((Expired, Target::Key(k), cmd));
            None
        } else {
            Some(e.value)
        }
    }

    fn purge_all(&mut self, cmd: C, evs: &mut Vec<Brief<u8>>) -> usize {
        let dead: Vec<u8> = self.map.iter().filter(|(_, e)| self.is_expired(e)).map(|(k, _)| *k).collect();
        for k in &dead {
            self.map.remove(k);
            evs.push((Expired, Target::Key(*k), cmd));
        }
        dead.len()
    }

    fn live_count(&self, f: impl Fn(&u8, &i64) -> bool) -> usize {
        self.map.iter().filter(|(k, e)| !self.is_expired(e) && f(k, &e.value)).count()
    }

    /// A batch as `put_all` sees it: repeated keys keep their first position
    /// and their last value.
    fn batch(pairs: &[(u8, i64)]) -> Vec<(u8, i64)> {
        let mut out: Vec<(u8, i64)> = Vec::new();
        for &(k, v) in pairs {
            match out.iter_mut().find(|(x, _)| *x == k) {
                Some(slot) => slot.1 = v,
                None => out.push((k, v)),
            }
        }
        out
    }

    /// Applies `op`; returns the answer and the events (without evictions).
    fn apply(&mut self, op: &Op) -> (Answer, Vec<Brief<u8>>) {
        let mut evs = Vec::new();
        let ev = &mut evs;
        let dttl = self.default_ttl;
        let answer = match *op {
            Op::Put(k, v) => self.put(k, v, dttl, ev),
            Op::PutWithTtl(k, v, t) => self.put(k, v, Some(t), ev),
            Op::PutNew(k, v) => {
                if self.purge(k, C::PutNew, ev).is_some() {
                    Answer::Bool(false)
                } else {
                    self.map.insert(k, self.entry(v, dttl));
                    ev.push((Inserted, Target::Key(k), C::PutNew));
                    Answer::Bool(true)
                }
            }
            Op::Replace(k, v) => {
                if self.purge(k, C::Replace, ev).is_some() {
                    self.map.insert(k, self.entry(v, dttl));
                    ev.push((Updated, Target::Key(k), C::Replace));
                    Answer::Bool(true)
                } else {
                    Answer::Bool(false)
                }
            }
            Op::PutAll(ref pairs) => {
                let (mut ins, mut upd) = (Vec::new(), Vec::new());
                for (k, v) in Self::batch(pairs) {
                    if self.purge(k, C::PutAll, ev).is_some() {
                        upd.push(k)
                    } else {
                        ins.push(k)
                    }
                    self.map.insert(k, self.entry(v, dttl));
                }
                if !ins.is_empty() {
                    ev.push((Inserted, Target::Keys(ins), C::PutAll));
                }
                if !upd.is_empty() {
                    ev.push((Updated, Target::Keys(upd), C::PutAll));
                }
                Answer::Unit
            }
            Op::PutNewAll(ref pairs) => {
                let batch = Self::batch(pairs);
                if batch.iter().any(|(k, _)| self.is_live(*k)) {
                    Answer::Bool(false)
                } else {
                    for &(k, v) in &batch {
                        self.purge(k, C::PutNewAll, ev);
                        self.map.insert(k, self.entry(v, dttl));
                    }
                    if !batch.is_empty() {
                        ev.push((Inserted, Target::Keys(batch.iter().map(|(k, _)| *k).collect()), C::PutNewAll));
                    }
                    Answer::Bool(true)
                }
            }
            Op::Get(k) => Answer::Opt(self.purge(k, C::Get, ev)),
            Op::GetAll(ref ks) => {
                let mut out = HashMap::new();
                for &k in ks {
                    if let Some(v) = self.purge(k, C::Get, ev) {
                        out.insert(k, v);
                    }
                }
                Answer::Map(out)
            }
            Op::ContainsKey(k) => Answer::Bool(self.purge(k, C::Get, ev).is_some()),
            Op::Ttl(k) => {
                let now = self.now;
                Answer::Ttl(
                    self.purge(k, C::Get, ev).map(|_| self.map[&k].expires_at.map(|t| Duration::from_millis(t - now))),
                )
            }
            Op::Take(k) => {
                let v = self.purge(k, C::Take, ev);
                if v.is_some() {
                    self.map.remove(&k);
                    ev.push((Deleted, Target::Key(k), C::Take));
                }
                Answer::Opt(v)
            }
            Op::Delete(k) => {
                let live = self.purge(k, C::Delete, ev).is_some();
                self.map.remove(&k);
                ev.push((Deleted, Target::Key(k), C::Delete));
                Answer::Bool(live)
            }
            Op::DeleteAll => {
                self.purge_all(C::DeleteAll, ev);
                let n = self.map.len();
                self.map.clear();
                ev.push((Deleted, Target::All, C::DeleteAll));
                Answer::Count(n)
            }
            Op::DeleteKeys(ref ks) => {
                let mut n = 0;
                for &k in ks {
                    if self.purge(k, C::DeleteAll, ev).is_some() {
                        self.map.remove(&k);
                        n += 1;
                    }
                }
                if !ks.is_empty() {
                    // The event names each key once, in first-seen order.
                    let mut named = Vec::new();
                    for &k in ks {
                        if !named.contains(&k) {
                            named.push(k);
                        }
                    }
                    ev.push((Deleted, Target::Keys(named), C::DeleteAll));
                }
                Answer::Count(n)
            }
            Op::DeleteWhere(m, r) => {
                self.purge_all(C::DeleteAll, ev);
                let f = pred(m, r);
                let hit: Vec<u8> = self.map.iter().filter(|(k, e)| f(k, &e.value)).map(|(k, _)| *k).collect();
                for k in &hit {
                    self.map.remove(k);
                }
                let n = hit.len();
                if n > 0 {
                    ev.push((Deleted, Target::Keys(hit), C::DeleteAll));
                }
                Answer::Count(n)
            }
            Op::CountAll => Answer::Count(self.live_count(|_, _| true)),
            Op::CountKeys(ref ks) => {
                let distinct: HashSet<u8> = ks.iter().copied().collect();
                Answer::Count(distinct.into_iter().filter(|k| self.is_live(*k)).count())
            }
            Op::CountWhere(m, r) => Answer::Count(self.live_count(pred(m, r))),
            Op::Expire(k, t) => self.retime(k, C::Expire, Some(t), ev),
            Op::Touch(k) => self.retime(k, C::Touch, None, ev),
            Op::Update(k, d, x) => self.update(k, d, |v| v.wrapping_add(x), C::Update, ev),
            Op::Incr(k, by) => self.update(k, by, |v| v.wrapping_add(by), C::Incr, ev),
            Op::Decr(k, by) => self.update(k, 0i64.wrapping_sub(by), |v| v.wrapping_sub(by), C::Decr, ev),
            Op::Load(k, v) => match self.purge(k, C::Load, ev) {
                Some(x) => Answer::Val(x),
                None => {
                    self.map.insert(k, self.entry(v, dttl));
                    ev.push((Inserted, Target::Key(k), C::Load));
                    Answer::Val(v)
                }
            },
            Op::TryLoad(k, v) => match (self.purge(k, C::Load, ev), v) {
                (Some(x), _) => Answer::Loaded(Ok(x)),
                (None, Some(v)) => {
                    self.map.insert(k, self.entry(v, dttl));
                    ev.push((Inserted, Target::Key(k), C::Load));
                    Answer::Loaded(Ok(v))
                }
                (None, None) => Answer::Loaded(Err(())),
            },
            Op::Sweep => Answer::Count(self.purge_all(C::Sweep, ev)),
            Op::Advance(d) => {
                self.now += d;
                Answer::Unit
            }
            Op::Len => Answer::Count(self.map.len()),
        };
        (answer, evs)
    }

    fn put(&mut self, k: u8, v: i64, ttl: Option<u64>, ev: &mut Vec<Brief<u8>>) -> Answer {
        let kind = if self.purge(k, C::Put, ev).is_some() { Updated } else { Inserted };
        self.map.insert(k, self.entry(v, ttl));
        ev.push((kind, Target::Key(k), C::Put));
        Answer::Unit
    }

    /// `expire` (a new ttl) or `touch` (restart the last one).
    fn retime(&mut self, k: u8, cmd: C, ttl: Option<u64>, ev: &mut Vec<Brief<u8>>) -> Answer {
        if self.purge(k, cmd, ev).is_none() {
            return Answer::Bool(false);
        }
        let now = self.now;
        let e = self.map.get_mut(&k).unwrap();
        if ttl.is_some() {
            e.ttl = ttl;
        }
        e.expires_at = e.ttl.map(|t| now + t);
        ev.push((Updated, Target::Key(k), cmd));
        Answer::Bool(true)
    }

    fn update(&mut self, k: u8, default: i64, f: impl Fn(i64) -> i64, cmd: C, ev: &mut Vec<Brief<u8>>) -> Answer {
        match self.purge(k, cmd, ev) {
            Some(v) => {
                let nv = f(v);
                self.map.get_mut(&k).unwrap().value = nv;
                ev.push((Updated, Target::Key(k), cmd));
                Answer::Val(nv)
            }
            None => {
                self.map.insert(k, self.entry(default, self.default_ttl));
                ev.push((Inserted, Target::Key(k), cmd));
                Answer::Val(default)
            }
        }
    }
}

/// Runs `op` on the cache; `loaded` tells whether a loader ran.
fn run(cache: &Cache<u8, i64>, clock: &ManualClock, op: &Op, loaded: &Arc<AtomicBool>) -> Answer {
    let ms = Duration::from_millis;
    match *op {
        Op::Put(k, v) => {
            cache.put(k, v);
            Answer::Unit
        }
        Op::PutWithTtl(k, v, t) => {
            cache.put_with_ttl(k, v, ms(t));
            Answer::Unit
        }
        Op::PutNew(k, v) => Answer::Bool(cache.put_new(k, v)),
        Op::Replace(k, v) => Answer::Bool(cache.replace(k, v)),
        Op::PutAll(ref pairs) => {
            cache.put_all(pairs.iter().copied());
            Answer::Unit
        }
        Op::PutNewAll(ref pairs) => Answer::Bool(cache.put_new_all(pairs.iter().copied())),
        Op::Get(k) => Answer::Opt(cache.get(&k)),
        Op::GetAll(ref ks) => Answer::Map(cache.get_all(ks.iter())),
        Op::ContainsKey(k) => Answer::Bool(cache.contains_key(&k)),
        Op::Take(k) => Answer::Opt(cache.take(&k)),
        Op::Delete(k) => Answer::Bool(cache.delete(&k)),
        Op::DeleteAll => Answer::Count(cache.delete_all(Query::All)),
        Op::DeleteKeys(ref ks) => Answer::Count(cache.delete_all(Query::Keys(ks.clone()))),
        Op::DeleteWhere(m, r) => Answer::Count(cache.delete_all(Query::filter(pred(m, r)))),
        Op::CountAll => Answer::Count(cache.count_all(Query::All)),
        Op::CountKeys(ref ks) => Answer::Count(cache.count_all(Query::Keys(ks.clone()))),
        Op::CountWhere(m, r) => Answer::Count(cache.count_all(Query::filter(pred(m, r)))),
        Op::Ttl(k) => Answer::Ttl(cache.ttl(&k)),
        Op::Expire(k, t) => Answer::Bool(cache.expire(&k, ms(t))),
        Op::Touch(k) => Answer::Bool(cache.touch(&k)),
        Op::Update(k, d, x) => Answer::Val(cache.update(k, d, |v| v.wrapping_add(x))),
        Op::Incr(k, by) => Answer::Val(cache.incr(k, by)),
        Op::Decr(k, by) => Answer::Val(cache.decr(k, by)),
        Op::Load(k, v) => Answer::Val(cache.get_or_insert_with(k, || {
            loaded.store(true, Ordering::SeqCst);
            v
        })),
        Op::TryLoad(k, v) => Answer::Loaded(
            cache
                .try_get_or_insert_with(k, || {
                    loaded.store(true, Ordering::SeqCst);
                    v.ok_or("load failed")
                })
                .map_err(|_| ()),
        ),
        Op::Sweep => Answer::Count(cache.sweep_expired()),
        Op::Advance(d) => {
            clock.advance(ms(d));
            Answer::Unit
        }
        Op::Len => Answer::Count(cache.len()),
    }
}

/// Puts an op's events in a comparable order: the `Expired` events (always a
/// prefix) sorted by key, and the keys a filter removed sorted.
fn normalize(op: &Op, mut evs: Vec<Brief<u8>>) -> Vec<Brief<u8>> {
    let expired = evs.iter().take_while(|e| e.0 == Expired).count();
    evs[..expired].sort_by_key(|e| e.1.keys().to_vec());
    if let Op::DeleteWhere(..) = op {
        for e in &mut evs {
            if let (Deleted, Target::Keys(ks), _) = e {
                ks.sort_unstable();
            }
        }
    }
    evs
}

#[derive(Clone, Copy, Debug)]
struct Setup {
    max_entries: Option<usize>,
    shards: Option<usize>,
    default_ttl: Option<u64>,
}

fn check(setup: Setup, ops: &[Op]) {
    let clock = ManualClock::new();
    let mut b = Cache::<u8, i64>::builder()
        .name("model")
        .clock(clock.clone())
        // The background sweep would remove expired entries at times the model
        // cannot know; sweeps are done by `Op::Sweep` instead.
        .sweep_interval(Duration::from_secs(3600));
    if let Some(max) = setup.max_entries {
        b = b.max_entries(max);
    }
    if let Some(s) = setup.shards {
        b = b.shards(s);
    }
    if let Some(t) = setup.default_ttl {
        b = b.default_ttl(Duration::from_millis(t));
    }
    let cache = b.build().unwrap();
    let rec = Recorder::attach(&cache);
    let mut model = Model { now: 0, map: BTreeMap::new(), default_ttl: setup.default_ttl };
    let loaded = Arc::new(AtomicBool::new(false));
    let mut all_events = Vec::new();

    for (i, op) in ops.iter().enumerate() {
        let live_before = match op {
            Op::Load(k, _) | Op::TryLoad(k, _) => model.is_live(*k),
            _ => true,
        };
        loaded.store(false, Ordering::SeqCst);
        let got = run(&cache, &clock, op, &loaded);
        let (want, want_events) = model.apply(op);
        let ctx = || format!("op #{i} {op:?} ({setup:?})");
        assert_eq!(got, want, "answer of {}", ctx());
        if matches!(op, Op::Load(..) | Op::TryLoad(..)) {
            assert_eq!(loaded.load(Ordering::SeqCst), !live_before, "loader ran iff no live entry: {}", ctx());
        }

        let events = rec.take();
        let briefs: Vec<Brief<u8>> = events.iter().map(brief).collect();
        // The call's own events, then what bringing its shard back within the
        // bound removed: evicted entries, or expired ones it met (those are
        // removed as expired, by the call).
        let (main, evicted) = briefs.split_at(want_events.len().min(briefs.len()));
        assert_eq!(normalize(op, main.to_vec()), normalize(op, want_events.clone()), "events of {}", ctx());
        match setup.max_entries {
            None => assert!(evicted.is_empty(), "eviction in an unbounded cache: {}", ctx()),
            Some(max) => {
                if setup.shards == Some(1) || max < 64 && setup.shards.is_none() {
                    // One shard: evictions bring the cache back to its bound exactly.
                    assert_eq!(evicted.len(), model.map.len().saturating_sub(max), "evictions of {}", ctx());
                }
                for e in evicted {
                    let Target::Key(k) = e.1 else { panic!("eviction of several keys: {e:?}") };
                    match e.0 {
                        Evicted => assert_eq!(e.2, C::Evict, "{}", ctx()),
                        Expired => {
                            assert!(!model.is_live(k), "{k} removed as expired while live: {}", ctx());
                            // By the write that made room: its command, as its own events'.
                            assert_eq!(Some(e.2), main.last().map(|m| m.2), "{}", ctx());
                        }
                        _ => panic!("{e:?} after the events of {}", ctx()),
                    }
                    assert!(model.map.remove(&k).is_some(), "removed {k} that the cache did not hold: {}", ctx());
                }
                assert!(cache.len() <= max, "len {} > max_entries {max} after {}", cache.len(), ctx());
            }
        }
        assert_eq!(cache.len(), model.map.len(), "len after {}", ctx());
        all_events.extend(events);
    }

    // Read every key (expiring what is expired), then replay everything.
    let held: HashSet<u8> = (0..KEYS).filter(|k| cache.contains_key(k)).collect();
    all_events.extend(rec.take());
    let replayed = replay(&all_events);
    assert_eq!(replayed, held, "the event stream replays to the cache's keys ({setup:?})");
    assert_eq!(cache.count_all(Query::All), held.len());
    assert_eq!(cache.len(), held.len());
    let model_live: HashSet<u8> = (0..KEYS).filter(|k| model.is_live(*k)).collect();
    assert_eq!(model_live, held);
    assert_versions_increase(&all_events);
}

proptest! {
    // XorShift: the default ChaCha generator dominates the run time in debug builds.
    #![proptest_config(ProptestConfig {
        cases: 256,
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    })]

    #[test]
    fn unbounded_cache_matches_the_model(ops in vec(op(), 1..200)) {
        check(Setup { max_entries: None, shards: None, default_ttl: None }, &ops);
    }

    #[test]
    fn unbounded_cache_with_default_ttl_matches_the_model(ops in vec(op(), 1..200), ttl in 1u64..60) {
        check(Setup { max_entries: None, shards: None, default_ttl: Some(ttl) }, &ops);
    }

    #[test]
    fn unbounded_single_shard_cache_matches_the_model(ops in vec(op(), 1..200)) {
        check(Setup { max_entries: None, shards: Some(1), default_ttl: None }, &ops);
    }

    #[test]
    fn bounded_single_shard_cache_matches_the_model_given_its_evictions(ops in vec(op(), 1..200)) {
        check(Setup { max_entries: Some(4), shards: Some(1), default_ttl: None }, &ops);
    }

    #[test]
    fn bounded_cache_with_default_shards_matches_the_model_given_its_evictions(
        ops in vec(op(), 1..200),
        ttl in proptest::option::of(1u64..60),
    ) {
        check(Setup { max_entries: Some(4), shards: None, default_ttl: ttl }, &ops);
    }

    #[test]
    fn bounded_cache_with_uneven_shards_matches_the_model_given_its_evictions(ops in vec(op(), 1..200)) {
        check(Setup { max_entries: Some(5), shards: Some(4), default_ttl: None }, &ops);
    }
}

//! Selecting entries for `count_all` and `delete_all`.

use std::fmt;

/// The predicate of [`Query::Filter`].
///
/// ```
/// use nebulex::{Cache, Predicate, Query};
///
/// let adults: Box<Predicate<String, u32>> = Box::new(|_name, age| *age >= 18);
/// let cache: Cache<String, u32> = Cache::builder().build()?;
/// cache.put_all([("ann".to_string(), 31), ("bob".to_string(), 12)]);
/// assert_eq!(cache.count_all(Query::Filter(adults)), 1);
/// # Ok::<(), nebulex::Error>(())
/// ```
pub type Predicate<K, V> = dyn Fn(&K, &V) -> bool + Send + Sync;

/// Which entries `count_all` / `delete_all` act on.
///
/// ```
/// use nebulex::{Cache, Query};
///
/// let cache: Cache<u32, u32> = Cache::builder().build()?;
/// cache.put_all((0..10).map(|i| (i, i * 10)));
/// assert_eq!(cache.count_all(Query::filter(|_, v| *v >= 50)), 5);
/// assert_eq!(cache.delete_all(Query::Keys(vec![0, 1, 99])), 2);
/// assert_eq!(cache.delete_all(Query::All), 8);
/// # Ok::<(), nebulex::Error>(())
/// ```
pub enum Query<K, V> {
    /// Every entry.
    All,
    /// The entries of these keys.
    Keys(Vec<K>),
    /// The entries for which the predicate holds. It runs with a shard locked:
    /// it must not call the cache.
    Filter(Box<Predicate<K, V>>),
}

impl<K, V> Query<K, V> {
    /// A [`Query::Filter`] from a closure.
    pub fn filter(f: impl Fn(&K, &V) -> bool + Send + Sync + 'static) -> Self {
        Query::Filter(Box::new(f))
    }
}

impl<K: fmt::Debug, V> fmt::Debug for Query<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Query::All => f.write_str("All"),
            Query::Keys(ks) => f.debug_tuple("Keys").field(ks).finish(),
            Query::Filter(_) => f.write_str("Filter(..)"),
        }
    }
}

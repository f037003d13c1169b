//! Typed values that other crates attach to a cache (the stream started on it,
//! for instance), so they live as long as the cache and can be found from it.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

type AnyArc = Arc<dyn Any + Send + Sync>;

/// A map from a type to one shared value of that type, attached to a cache.
///
/// Values live until removed or until the cache is dropped. This is how
/// `nebulex-streams` finds the stream started on a cache.
///
/// ```
/// use std::sync::Arc;
/// use nebulex::Cache;
///
/// struct Tag(&'static str);
/// let cache: Cache<u32, u32> = Cache::builder().build()?;
/// assert!(cache.extensions().try_insert(Arc::new(Tag("a"))).is_ok());
/// assert!(cache.extensions().try_insert(Arc::new(Tag("b"))).is_err());
/// assert_eq!(cache.extensions().get::<Tag>().map(|t| t.0), Some("a"));
/// # Ok::<(), nebulex::Error>(())
/// ```
#[derive(Default)]
pub struct Extensions {
    map: Mutex<HashMap<TypeId, AnyArc>>,
}

impl Extensions {
    /// The value of type `T`, if one is attached.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let v = self.map.lock().get(&TypeId::of::<T>())?.clone();
        v.downcast().ok()
    }

    /// Attaches `value` unless a value of type `T` is already attached, which
    /// is then returned as the error.
    pub fn try_insert<T: Any + Send + Sync>(&self, value: Arc<T>) -> Result<(), Arc<T>> {
        let mut map = self.map.lock();
        if let Some(existing) = map.get(&TypeId::of::<T>()) {
            if let Ok(existing) = existing.clone().downcast::<T>() {
                return Err(existing);
            }
        }
        map.insert(TypeId::of::<T>(), value);
        Ok(())
    }

    /// Detaches and returns the value of type `T` if `pred` selects it, in
    /// one step (no other caller can swap it in between).
    pub fn remove_if<T: Any + Send + Sync>(&self, pred: impl FnOnce(&T) -> bool) -> Option<Arc<T>> {
        let mut map = self.map.lock();
        let value = map.get(&TypeId::of::<T>())?.clone().downcast::<T>().ok()?;
        if !pred(&value) {
            return None;
        }
        map.remove(&TypeId::of::<T>());
        Some(value)
    }

    /// Detaches and returns the value of type `T`.
    pub fn remove<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.map.lock().remove(&TypeId::of::<T>())?.downcast().ok()
    }

    /// Takes every value out, so they can be dropped outside of any lock.
    pub(crate) fn drain(&self) -> Vec<AnyArc> {
        self.map.lock().drain().map(|(_, v)| v).collect()
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions").field("len", &self.map.lock().len()).finish()
    }
}

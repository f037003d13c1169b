//! Errors of the cache.

/// What can go wrong when building or configuring a [`Cache`](crate::Cache).
///
/// ```
/// use nebulex::{Cache, Error, EventFilter};
///
/// let err = Cache::<String, u32>::builder().name("").build().unwrap_err();
/// assert_eq!(err, Error::InvalidOption { option: "name", reason: "must not be empty".into() });
/// assert_eq!(err.to_string(), "invalid option `name`: must not be empty");
///
/// let cache: Cache<String, u32> = Cache::builder().build()?;
/// cache.register_event_listener("log", EventFilter::all(), |_| {})?;
/// let err = cache.register_event_listener("log", EventFilter::all(), |_| {}).unwrap_err();
/// assert_eq!(err, Error::ListenerExists("log".into()));
/// # Ok::<(), nebulex::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A builder option has a value the cache cannot work with.
    #[error("invalid option `{option}`: {reason}")]
    InvalidOption {
        /// The option's name, as the builder method spells it.
        option: &'static str,
        /// Why the value was refused.
        reason: String,
    },
    /// A listener with this id is already registered on the cache.
    #[error("an event listener with id `{0}` is already registered")]
    ListenerExists(String),
}

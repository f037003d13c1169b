//! Errors of the cache.

/// What can go wrong when building or configuring a [`Cache`](crate::Cache).
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

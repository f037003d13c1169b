//! Errors of streams, subscriptions and transports.

/// What can go wrong when starting a stream, subscribing, or reaching the
/// cluster.
///
/// ```
/// use nebulex::Cache;
/// use nebulex_streams::{Error, Streams, StreamsExt, SubscribeOptions};
///
/// let cache: Cache<String, u32> = Cache::builder().build()?; // a `nebulex::Error` converts
/// assert_eq!(cache.subscribe(SubscribeOptions::new()).unwrap_err(), Error::StreamNotStarted);
/// let _streams = Streams::builder(&cache).partitions(2).start()?;
///
/// let err = cache.subscribe(SubscribeOptions::new().partition(2)).unwrap_err();
/// assert_eq!(err, Error::PartitionOutOfRange { partition: 2, partitions: 2 });
/// assert_eq!(err.to_string(), "partition 2 is out of range: the stream has 2 partitions");
/// let err = cache.subscribe(SubscribeOptions::new().events([])).unwrap_err();
/// assert_eq!(err, Error::EmptyEventFilter);
/// # Ok::<(), nebulex_streams::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The cache already has a started stream; stop it first.
    #[error("a stream is already started on this cache")]
    AlreadyStarted,
    /// A builder or subscription option has a value that cannot work.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// `subscribe` on a cache without a started stream.
    #[error("no stream is started on this cache")]
    StreamNotStarted,
    /// `SubscribeOptions::events` was given no event type.
    #[error("the event filter is empty: a subscription must want at least one event type")]
    EmptyEventFilter,
    /// A partition number at or past the partition count.
    #[error("partition {partition} is out of range: the stream has {partitions} partitions")]
    PartitionOutOfRange {
        /// The partition asked for.
        partition: u32,
        /// The stream's partition count.
        partitions: u32,
    },
    /// A partition was asked of a stream that is not partitioned.
    #[error("the stream is not partitioned")]
    NotPartitioned,
    /// A cluster transport (the memory bus included) or an invalidator
    /// needs a tokio runtime, and there is none here.
    #[error("a cluster transport or an invalidator needs a tokio runtime: start it from within one")]
    NoRuntime,
    /// The cluster transport failed (bad URL, unreachable server, lost connection).
    #[error("transport: {0}")]
    Transport(String),
    /// The cache refused something the stream asked of it.
    #[error(transparent)]
    Cache(#[from] nebulex::Error),
}

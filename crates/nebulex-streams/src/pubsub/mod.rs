//! Cluster transports: how frames reach the other nodes.
//!
//! A [`PubSub`] names an engine — the in-process [`memory`] bus, [Redis
//! Pub/Sub](redis) or [NATS](nats) — and opens one `Link` per started
//! stream. Every transport has the same shape:
//!
//! * `open(…, LinkConfig) -> Result<Arc<dyn Link>, Error>`, called from
//!   `Streams::start()` on the ambient tokio runtime, never blocking: it
//!   spawns the tasks that connect, subscribe one channel per partition,
//!   reconnect with exponential backoff and resubscribe;
//! * inbound frames and connection changes go to the stream's `Hooks`;
//! * `Link::publish` sends a batch of frames; a frame that cannot be sent is
//!   lost, and the receivers see the jump in its sequence numbers as a gap.
//!
//! Channel names are `{prefix}:{cache}:{partition}` (`{prefix}:{cache}` when
//! the stream is not partitioned); the prefix defaults to `nbx`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use nebulex::NodeId;
use tokio::sync::watch;

use crate::error::Error;

pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;

pub use memory::MemoryBus;

/// The cluster transport of a stream: which engine carries frames between
/// nodes. Constructors never fail; a bad URL or an unreachable server surfaces
/// from `Streams::start()` or `Streams::ready()`.
///
/// ```
/// use nebulex_streams::PubSub;
///
/// let bus = PubSub::memory(); // clones share one in-process bus
/// # #[cfg(all(feature = "redis", feature = "nats"))] {
/// let redis = PubSub::redis("redis://127.0.0.1:6379/");
/// let nats = PubSub::nats("nats://127.0.0.1:4222");
/// assert_eq!(redis.describe(), "redis://127.0.0.1:6379/");
/// # let _ = nats;
/// # }
/// # let _ = bus;
/// ```
#[derive(Clone)]
pub struct PubSub {
    pub(crate) engine: Engine,
}

#[derive(Clone)]
pub(crate) enum Engine {
    Memory(MemoryBus),
    #[cfg(feature = "redis")]
    Redis(String),
    #[cfg(feature = "nats")]
    Nats(String),
}

impl PubSub {
    /// An in-process bus carrying the same encoded frames as the network
    /// transports. Clones share the bus: two caches of one name on one bus
    /// are two nodes of one cluster. See [`MemoryBus`] for fault injection.
    pub fn memory() -> Self {
        PubSub { engine: Engine::Memory(MemoryBus::new()) }
    }

    /// Redis Pub/Sub at `url` (`redis://[user:pass@]host:port[/db]`,
    /// `rediss://host:port` for TLS with the `tls` feature, on by default;
    /// `rediss://…/#insecure` skips the certificate check, for self-signed
    /// test servers only).
    #[cfg(feature = "redis")]
    pub fn redis(url: impl Into<String>) -> Self {
        PubSub { engine: Engine::Redis(url.into()) }
    }

    /// NATS core publish/subscribe at `url` (`nats://[user:pass@]host:port`
    /// or `nats://token@host:port`, percent-encoded; several servers:
    /// comma-separated).
    #[cfg(feature = "nats")]
    pub fn nats(url: impl Into<String>) -> Self {
        PubSub { engine: Engine::Nats(url.into()) }
    }

    /// The in-process bus, if this is one (for fault injection).
    pub fn as_memory(&self) -> Option<&MemoryBus> {
        match &self.engine {
            Engine::Memory(bus) => Some(bus),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The engine and address, without credentials.
    pub fn describe(&self) -> String {
        match &self.engine {
            Engine::Memory(_) => "memory".to_string(),
            #[cfg(feature = "redis")]
            Engine::Redis(url) => redact(url),
            #[cfg(feature = "nats")]
            Engine::Nats(url) => redact(url),
        }
    }

    pub(crate) fn open(&self, config: LinkConfig) -> Result<Arc<dyn Link>, Error> {
        match &self.engine {
            Engine::Memory(bus) => memory::open(bus, config),
            #[cfg(feature = "redis")]
            Engine::Redis(url) => redis::open(url, config),
            #[cfg(feature = "nats")]
            Engine::Nats(url) => nats::open(url, config),
        }
    }
}

impl From<MemoryBus> for PubSub {
    fn from(bus: MemoryBus) -> Self {
        PubSub { engine: Engine::Memory(bus) }
    }
}

impl fmt::Debug for PubSub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PubSub").field(&self.describe()).finish()
    }
}

/// `scheme://user:pass@host` without the credentials; also without the
/// scheme (NATS takes `user:pass@host`), and for each server of a list. The
/// query is left out too: the Redis client also takes credentials there
/// (`redis+unix:///path?user=u&pass=p`).
#[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(dead_code))]
fn redact(url: &str) -> String {
    let server = |url: &str| {
        let (scheme, rest) = url.find("://").map_or(("", url), |i| url.split_at(i + 3));
        // (Whatever follows a query goes with it.)
        let rest = rest.find('?').map_or(rest, |i| &rest[..i]);
        // (The last `@`: a password may hold one, a host cannot.)
        let rest = rest.rfind('@').map_or(rest, |at| &rest[at + 1..]);
        format!("{scheme}{rest}")
    };
    url.split(',').map(server).collect::<Vec<_>>().join(",")
}

/// Reconnection delays: `initial`, doubling up to `max`, with jitter.
///
/// Set a stream's with
/// [`StreamsBuilder::backoff`](crate::StreamsBuilder::backoff).
///
/// ```
/// use std::time::Duration;
/// use nebulex_streams::Backoff;
///
/// let backoff = Backoff::default();
/// assert_eq!(backoff, Backoff { initial: Duration::from_millis(50), max: Duration::from_secs(5) });
/// // Each delay is the doubled base, less a random part of up to a quarter.
/// let first = backoff.delay(0);
/// assert!(first > Duration::from_micros(37_500) && first <= Duration::from_millis(50));
/// let third = backoff.delay(2);
/// assert!(third > Duration::from_millis(150) && third <= Duration::from_millis(200));
/// assert!(backoff.delay(30) <= backoff.max);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(50), max: Duration::from_secs(5) }
    }
}

impl Backoff {
    /// The delay before reconnection attempt `attempt` (0-based), jittered
    /// by up to a quarter so that nodes do not reconnect in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.initial.saturating_mul(1u32 << attempt.min(20)).min(self.max);
        let jitter = (NodeId::random().0 % 1024) as u32;
        // Up to a quarter of `base`, without overflowing for any `base`.
        base.saturating_sub((base / 4096).saturating_mul(jitter))
    }
}

/// How long a connection attempt to a server may take before it counts as
/// failed.
#[cfg(any(feature = "redis", feature = "nats"))]
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How a session of a network transport ended.
#[cfg(any(feature = "redis", feature = "nats"))]
enum Ended {
    /// Its connection was lost, or given up on: the link starts over.
    Lost,
    /// The link was closed.
    Stopped,
}

/// The loop of both network transports, until the link is closed: makes a
/// session (`connect`: a connection with every channel subscribed, within
/// `timeout`), says the link is up, then in (`ready`), hands the session to
/// `run` until it ends, says a lost one is down (`lost` says why), and after
/// a failed or lost session starts over on the backoff.
#[cfg(any(feature = "redis", feature = "nats"))]
async fn keep_subscribed<S>(
    config: &LinkConfig,
    (server, timeout, lost): (&str, Duration, &str),
    mut stop: watch::Receiver<bool>,
    mut connect: impl FnMut() -> BoxFuture<'static, Result<S, String>>,
    mut run: impl FnMut(S, watch::Receiver<bool>) -> BoxFuture<'static, Ended>,
) {
    let mut attempt = 0u32;
    loop {
        let connected = tokio::select! {
            r = tokio::time::timeout(timeout, connect()) => {
                r.unwrap_or_else(|_| Err(format!("no answer from {server} within {timeout:?}")))
            }
            _ = stop.changed() => return,
        };
        match connected {
            Ok(session) => {
                attempt = 0;
                // Up before ready: what `Streams::ready()` lets go on (an
                // invalidator started then, say) must find the link up, or
                // take it for an outage.
                (config.hooks.on_state)(LinkState::Up);
                config.ready.send_replace(Some(Ok(())));
                if let Ended::Stopped = run(session, stop.clone()).await {
                    return;
                }
                tracing::warn!(target: "nebulex_streams", "{lost}; reconnecting");
                (config.hooks.on_state)(LinkState::Down(lost.into()));
            }
            Err(e) => {
                tracing::warn!(target: "nebulex_streams", error = %e, attempt, "cannot join {server}");
                if config.ready.borrow().is_none() {
                    config.ready.send_replace(Some(Err(Error::Transport(e))));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.backoff.delay(attempt)) => {}
            _ = stop.changed() => return,
        }
        attempt = attempt.saturating_add(1);
    }
}

/// A connection change a transport reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkState {
    /// Every channel is subscribed (first time, or again after a loss).
    Up,
    /// The connection was lost: frames may have been missed.
    Down(String),
    /// The connection stays up, but frames were dropped on the way in (a
    /// client's queue overflowed).
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    Dropped(String),
}

/// Called with a frame's channel index and bytes.
pub(crate) type FrameHook = dyn Fn(usize, &[u8]) + Send + Sync;

/// What a transport calls: the stream's inbound side.
pub(crate) struct Hooks {
    /// A frame arrived on channel `index`.
    pub(crate) on_frame: Box<FrameHook>,
    /// The connection changed.
    pub(crate) on_state: Box<dyn Fn(LinkState) + Send + Sync>,
}

/// What a transport needs to open a link.
pub(crate) struct LinkConfig {
    /// This node.
    pub(crate) node: NodeId,
    /// The channel of each partition, by index.
    pub(crate) channels: Vec<String>,
    /// Reconnection delays (the network transports').
    #[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(dead_code))]
    pub(crate) backoff: Backoff,
    pub(crate) hooks: Arc<Hooks>,
    /// How long a subscription that hears this node's own frames may hear
    /// nothing at all (its heartbeats come back once a heartbeat at least)
    /// before its connection is taken for hung, and made again.
    #[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(dead_code))]
    pub(crate) liveness: Duration,
    /// Set to `Some(Ok)` once subscribed; `Some(Err)` if the first attempt
    /// fails (the link keeps trying, and sets `Some(Ok)` once it is in).
    pub(crate) ready: Ready,
}

/// Runs a network link's receiving task on `rt`. Should it panic (a bug of
/// ours or of the client's), nothing would be heard again, unannounced: the
/// link says instead that it is down, for good, so that the stream's
/// readers are told of a loss and an invalidator keeps flushing rather than
/// serve what it can no longer hear about; and a link not yet in says it
/// failed.
#[cfg(any(feature = "redis", feature = "nats"))]
pub(crate) fn spawn_receiver(
    rt: &tokio::runtime::Handle,
    (hooks, ready): (Arc<Hooks>, Ready),
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use futures::FutureExt;
    rt.spawn(async move {
        let Err(panic) = std::panic::AssertUnwindSafe(task).catch_unwind().await else { return };
        let message = crate::telemetry::panic_message(panic.as_ref()).to_owned();
        // (The hooks report through the application's logger and recorder,
        // which may panic too.)
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tracing::error!(target: "nebulex_streams", panic = %message,
                "the cluster link's receiving task panicked: the link is down for good");
            ready.send_if_modified(|r| {
                let unset = r.is_none();
                if unset {
                    *r = Some(Err(Error::Transport(format!("the receiving task panicked: {message}"))));
                }
                unset
            });
            (hooks.on_state)(LinkState::Down("the receiving task panicked".into()));
        }));
    });
}

/// Where a link tells whether it is in (see [`LinkConfig::ready`]).
pub(crate) type Ready = watch::Sender<Option<Result<(), Error>>>;

/// One stream's connection to the engine.
pub(crate) trait Link: Send + Sync {
    /// Sends frames `(channel index, bytes)`, in order. Returns how many could
    /// not be sent.
    fn publish(&self, frames: Vec<(usize, Arc<[u8]>)>) -> BoxFuture<'_, usize>;
    /// Waits until what was published is written out, for a client that
    /// holds frames back after [`publish`](Self::publish) returned (before a
    /// close, which would drop them).
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Closes the connection and stops its tasks.
    fn close(&self);
}

/// The ambient tokio runtime, or [`Error::NoRuntime`].
pub(crate) fn runtime() -> Result<tokio::runtime::Handle, Error> {
    tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_not_described() {
        assert_eq!(redact("redis://user:secret@localhost:6379/0"), "redis://localhost:6379/0");
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact("alice:s3cret@127.0.0.1:4222"), "127.0.0.1:4222", "no scheme");
        assert_eq!(redact("a:p@h1:4222,nats://b:q@h2:4222"), "h1:4222,nats://h2:4222", "a list");
        assert_eq!(redact("rediss://:p@ss@host:6380/#insecure"), "rediss://host:6380/#insecure");
        assert_eq!(redact("redis+unix:///tmp/redis.sock?user=alice&pass=s3cret"), "redis+unix:///tmp/redis.sock");
        assert_eq!(redact("redis://host/0?password=p@ss&protocol=resp3#insecure"), "redis://host/0");
        assert_eq!(redact("redis://:p#ss@host:6379"), "redis://host:6379");
    }

    #[test]
    fn backoff_doubles_up_to_its_max() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1) };
        assert!(b.delay(0) <= Duration::from_millis(100) && b.delay(0) >= Duration::from_millis(75));
        assert!(b.delay(2) <= Duration::from_millis(400) && b.delay(2) >= Duration::from_millis(300));
        assert!(b.delay(30) <= Duration::from_secs(1));
    }

    /// `Streams::ready()` returning means the link is up: an invalidator
    /// started then would otherwise see an outage and flush its cache a
    /// heartbeat later.
    #[cfg(any(feature = "redis", feature = "nats"))]
    #[tokio::test]
    async fn a_link_is_up_before_it_says_it_is_ready() {
        let (ready, mut readiness) = watch::channel(None);
        let seen = readiness.clone();
        let (states, mut log) = tokio::sync::mpsc::unbounded_channel();
        let hooks = Hooks {
            on_frame: Box::new(|_, _| {}),
            // Whether `ready` was already said when the link came up.
            on_state: Box::new(move |state| {
                let _ = states.send((matches!(state, LinkState::Up), seen.borrow().is_some()));
            }),
        };
        let config = LinkConfig {
            node: NodeId(1),
            channels: vec!["c".into()],
            backoff: Backoff::default(),
            hooks: Arc::new(hooks),
            liveness: Duration::from_secs(1),
            ready,
        };
        let (stop_tx, stop) = watch::channel(false);
        let link = tokio::spawn(async move {
            keep_subscribed(
                &config,
                ("a server", Duration::from_secs(5), "lost"),
                stop,
                || Box::pin(async { Ok(()) }),
                |(), mut stop| {
                    Box::pin(async move {
                        let _ = stop.changed().await;
                        Ended::Stopped
                    })
                },
            )
            .await
        });
        readiness.wait_for(Option::is_some).await.expect("the link says whether it is in");
        assert!(matches!(*readiness.borrow(), Some(Ok(()))));
        assert_eq!(log.recv().await, Some((true, false)), "up, and not yet ready");
        stop_tx.send_replace(true);
        link.await.expect("the link task ends");
    }

    /// A receiving task that panics leaves the link down, and a stream
    /// waiting for it told that it failed, not waiting for ever.
    #[cfg(any(feature = "redis", feature = "nats"))]
    #[tokio::test]
    async fn a_receiving_task_that_panics_leaves_the_link_down_and_not_ready() {
        let (ready, mut readiness) = watch::channel(None);
        let (states, mut log) = tokio::sync::mpsc::unbounded_channel();
        let hooks = Hooks {
            on_frame: Box::new(|_, _| {}),
            on_state: Box::new(move |state| {
                let _ = states.send(format!("{state:?}"));
            }),
        };
        spawn_receiver(&tokio::runtime::Handle::current(), (Arc::new(hooks), ready), async { panic!("a bug") });
        readiness.wait_for(Option::is_some).await.expect("the link says whether it is in");
        let told = format!("{:?}", *readiness.borrow());
        assert!(told.contains("the receiving task panicked: a bug"), "{told}");
        assert_eq!(log.recv().await.as_deref(), Some(r#"Down("the receiving task panicked")"#));
    }

    #[test]
    fn backoff_delays_of_any_size_do_not_overflow() {
        let b = Backoff { initial: Duration::MAX, max: Duration::MAX };
        for attempt in [0, 1, 30] {
            let d = b.delay(attempt);
            assert!(d <= Duration::MAX && d >= Duration::MAX - Duration::MAX / 4, "{d:?}");
        }
    }
}

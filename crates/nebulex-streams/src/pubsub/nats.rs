//! The NATS transport: core NATS publish/subscribe, one subject per partition.
//!
//! One client connection per node publishes and subscribes. The client
//! reconnects by itself a few times and resubscribes; past those, the link
//! starts over with a new client, until it is closed. Connection events are
//! turned into the stream's link state (a lost connection is a gap on every
//! partition). Delays between reconnection attempts follow the stream's
//! backoff.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::ConnectOptions;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use super::{
    keep_subscribed, redact, runtime, spawn_receiver, Ended, Hooks, Link, LinkConfig, LinkState, CONNECT_TIMEOUT,
};
use crate::error::Error;

struct NatsLink {
    client: watch::Receiver<Option<async_nats::Client>>,
    channels: Vec<String>,
    shutdown: watch::Sender<bool>,
}

/// Connects to NATS at `url` in background tasks.
pub(crate) fn open(url: &str, config: LinkConfig) -> Result<Arc<dyn Link>, Error> {
    let addrs: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Transport(format!("invalid NATS URL `{}`: {e}", redact(url))))?;
    if let Some((channel, why)) = config.channels.iter().find_map(|c| subject_fault(c).map(|why| (c, why))) {
        return Err(Error::InvalidOption(format!(
            "the channel `{channel}` (prefix, cache name and partition) is no NATS subject: {why}"
        )));
    }
    let rt = runtime()?;
    let (shutdown, stop) = watch::channel(false);
    let (client_tx, client_rx) = watch::channel(None);
    let link = Arc::new(NatsLink { client: client_rx, channels: config.channels.clone(), shutdown });
    let guard = (config.hooks.clone(), config.ready.clone());
    spawn_receiver(&rt, guard, run(addrs, config, client_tx, stop));
    Ok(link)
}

/// Why `channel` cannot be subscribed to as a NATS subject of its own, if
/// it cannot: NATS splits subjects into tokens at dots, and takes a token
/// `*` or `>` for a wildcard (that would match other caches' channels).
fn subject_fault(channel: &str) -> Option<&'static str> {
    if channel.chars().any(char::is_whitespace) {
        Some("it holds white space")
    } else if channel.split('.').any(str::is_empty) {
        Some("it starts or ends with a dot, or holds two in a row")
    } else if channel.split('.').any(|token| token == "*" || token == ">") {
        Some("a `*` or `>` between dots is a wildcard")
    } else {
        None
    }
}

/// The shortest time between two pings of the server.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(100);

/// Credentials given in a server URL.
#[derive(Debug, PartialEq)]
enum Credentials {
    UserPassword(String, String),
    Token(String),
}

/// The credentials of the first server URL that has any: `user:pass@` or
/// `token@`, percent-decoded.
fn credentials(addrs: &[async_nats::ServerAddr]) -> Option<Credentials> {
    addrs.iter().find_map(|a| {
        let user = percent_decoded(a.username()?);
        Some(match a.password() {
            Some(pass) => Credentials::UserPassword(user, percent_decoded(pass)),
            None => Credentials::Token(user),
        })
    })
}

/// `s` with its `%XX` escapes decoded.
fn percent_decoded(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// How long connecting, subscribing every channel and the server's answer
/// may take before the attempt counts as failed.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's options. The client reconnects by itself a few times (one
/// attempt per server, twice), then gives up; the link then starts over with
/// a new client, on its own backoff, until it is closed. So a closed link
/// stops trying soon, even with the server unreachable. `subscribed` says
/// when the link has subscribed every channel: from then on, the client's
/// own reconnections (which resubscribe) report the link up.
///
/// Credentials in the URL (`nats://user:pass@host`, `nats://token@host`)
/// are the client's. The client pings the server twice per `liveness`, and
/// takes the connection for lost after two pings unanswered: a hung
/// connection is found out about as soon as with Redis.
fn options(
    addrs: &[async_nats::ServerAddr],
    config: &LinkConfig,
    hooks: Arc<Hooks>,
    subscribed: Arc<AtomicBool>,
) -> ConnectOptions {
    let backoff = config.backoff;
    let events = Arc::new(ClientEvents::new(hooks, subscribed));
    let options = match credentials(addrs) {
        Some(Credentials::UserPassword(user, pass)) => ConnectOptions::with_user_and_password(user, pass),
        Some(Credentials::Token(token)) => ConnectOptions::with_token(token),
        None => ConnectOptions::new(),
    };
    options
        // Our own frames need not come back.
        .no_echo()
        .ping_interval((config.liveness / 2).max(MIN_PING_INTERVAL))
        .connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(addrs.len().max(1) * 2)
        .reconnect_delay_callback(move |attempts| backoff.delay(attempts.saturating_sub(1) as u32))
        .event_callback(move |event| {
            let events = events.clone();
            async move { events.on(event) }
        })
}

/// Turns one client's connection events into the link's state.
///
/// The client hands its events over through a bounded queue (128) that drops
/// what does not fit, and a flood of slow-consumer events may crowd out a
/// `Disconnected`. Any `Connected` but the client's first (its initial
/// connection's) is a reconnection, so a loss: told even if its
/// `Disconnected` was dropped.
struct ClientEvents {
    hooks: Arc<Hooks>,
    /// The link has subscribed every channel: a connection is up from then.
    subscribed: Arc<AtomicBool>,
    /// The client's initial connection was told.
    connected: AtomicBool,
    /// A `Disconnected` was told since the last `Connected`.
    down: AtomicBool,
}

impl ClientEvents {
    fn new(hooks: Arc<Hooks>, subscribed: Arc<AtomicBool>) -> Self {
        ClientEvents { hooks, subscribed, connected: AtomicBool::new(false), down: AtomicBool::new(false) }
    }

    fn on(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Disconnected => {
                self.down.store(true, Ordering::Release);
                tracing::warn!(target: "nebulex_streams", "NATS connection lost; reconnecting");
                (self.hooks.on_state)(LinkState::Down("NATS connection lost".into()));
            }
            async_nats::Event::Connected => {
                let reconnected = self.connected.swap(true, Ordering::AcqRel);
                if reconnected && !self.down.swap(false, Ordering::AcqRel) {
                    tracing::warn!(target: "nebulex_streams", "NATS connection lost and back (the client's notice \
                        of the loss was dropped)");
                    (self.hooks.on_state)(LinkState::Down("NATS connection lost".into()));
                }
                if self.subscribed.load(Ordering::Acquire) {
                    (self.hooks.on_state)(LinkState::Up);
                }
            }
            // The client's queue of a subscription was full: it dropped
            // messages, and says so for each.
            async_nats::Event::SlowConsumer(_) => {
                (self.hooks.on_state)(LinkState::Dropped("the NATS client dropped messages: slow consumer".into()))
            }
            other => tracing::debug!(target: "nebulex_streams", event = %other, "NATS"),
        }
    }
}

/// Connects, subscribes every channel and hands frames to the stream,
/// starting over with a new client when one gives up, until shut down.
async fn run(
    addrs: Vec<async_nats::ServerAddr>,
    config: LinkConfig,
    client_tx: watch::Sender<Option<async_nats::Client>>,
    stop: watch::Receiver<bool>,
) {
    let (addrs, channels): (Arc<[_]>, Arc<[String]>) = (addrs.into(), config.channels.clone().into());
    let hooks = config.hooks.clone();
    let connect = || {
        let subscribed = Arc::new(AtomicBool::new(false));
        let options = options(&addrs, &config, hooks.clone(), subscribed.clone());
        let (addrs, channels, client_tx) = (addrs.clone(), channels.clone(), client_tx.clone());
        async move {
            let (client, subscribers) = session(options, &addrs, &channels).await?;
            subscribed.store(true, Ordering::Release);
            client_tx.send_replace(Some(client));
            Ok(subscribers)
        }
        .boxed()
    };
    let run = |subscribers, stop| {
        let (hooks, client_tx) = (hooks.clone(), client_tx.clone());
        async move {
            let ended = pump(subscribers, &hooks, stop).await;
            // Dropping the last handle of the client ends its connection.
            client_tx.send_replace(None);
            ended
        }
        .boxed()
    };
    let server = ("NATS", SESSION_TIMEOUT, "NATS connection lost, and the client gave up reconnecting");
    keep_subscribed(&config, server, stop, connect, run).await;
}

/// A connected client with every channel subscribed, once the server has
/// seen the subscriptions.
async fn session(
    options: ConnectOptions,
    addrs: &[async_nats::ServerAddr],
    channels: &[String],
) -> Result<(async_nats::Client, Vec<async_nats::Subscriber>), String> {
    let client = options.connect(addrs).await.map_err(|e| format!("cannot connect to NATS: {e}"))?;
    let mut subscribers = Vec::with_capacity(channels.len());
    for channel in channels {
        let subscriber = client.subscribe(channel.clone()).await;
        subscribers.push(subscriber.map_err(|e| format!("cannot subscribe to NATS `{channel}`: {e}"))?);
    }
    client.flush().await.map_err(|e| format!("NATS flush failed: {e}"))?;
    Ok((client, subscribers))
}

/// Reads frames until the client gives up or the link is closed.
async fn pump(subscribers: Vec<async_nats::Subscriber>, hooks: &Hooks, mut stop: watch::Receiver<bool>) -> Ended {
    let mut merged = futures::stream::select_all(
        subscribers.into_iter().enumerate().map(|(index, s)| s.map(move |msg| (index, msg)).boxed()),
    );
    loop {
        tokio::select! {
            next = merged.next() => match next {
                Some((index, msg)) => (hooks.on_frame)(index, &msg.payload),
                None => return Ended::Lost,
            },
            _ = stop.changed() => return Ended::Stopped,
        }
    }
}

impl Link for NatsLink {
    fn publish(&self, frames: Vec<(usize, Arc<[u8]>)>) -> BoxFuture<'_, usize> {
        Box::pin(async move {
            let total = frames.len();
            let Some(client) = self.client.borrow().clone() else { return total };
            if client.connection_state() != async_nats::connection::State::Connected {
                return total;
            }
            let mut failed = 0;
            for (index, bytes) in frames {
                let Some(channel) = self.channels.get(index) else {
                    failed += 1;
                    continue;
                };
                let payload = bytes::Bytes::copy_from_slice(&bytes);
                if client.publish(channel.clone(), payload).await.is_err() {
                    failed += 1;
                }
            }
            failed
        })
    }

    /// The client writes published messages in the background: waits for
    /// the server's answer to a ping sent after them.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(client) = self.client.borrow().clone() else { return };
            if let Err(e) = client.flush().await {
                tracing::warn!(target: "nebulex_streams", error = %e, "NATS: frames may not have been written");
            }
        })
    }

    fn close(&self) {
        self.shutdown.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(urls: &[&str]) -> Option<Credentials> {
        let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().expect("a NATS URL")).collect();
        credentials(&addrs)
    }

    /// A client's events, and the link states they told.
    fn told(subscribed_after: usize, events: Vec<async_nats::Event>) -> Vec<LinkState> {
        let states = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = states.clone();
        let hooks = Hooks {
            on_frame: Box::new(|_, _| {}),
            on_state: Box::new(move |s| seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(s)),
        };
        let subscribed = Arc::new(AtomicBool::new(false));
        let client = ClientEvents::new(Arc::new(hooks), subscribed.clone());
        for (i, event) in events.into_iter().enumerate() {
            subscribed.store(i >= subscribed_after, Ordering::Release);
            client.on(event);
        }
        let told = states.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        told
    }

    #[test]
    fn a_reconnection_whose_disconnection_the_client_dropped_is_a_loss_all_the_same() {
        use async_nats::Event::{Connected, Disconnected, SlowConsumer};
        let (down, up) = (LinkState::Down("NATS connection lost".into()), LinkState::Up);
        // Told in full.
        assert_eq!(told(1, vec![Connected, Disconnected, Connected]), [down.clone(), up.clone()]);
        // The `Disconnected` crowded out by slow-consumer events.
        let dropped = LinkState::Dropped("the NATS client dropped messages: slow consumer".into());
        assert_eq!(told(1, vec![Connected, SlowConsumer(1), Connected]), [dropped, down.clone(), up.clone()]);
        // The initial connection, told before or after the link subscribed:
        // no loss.
        assert_eq!(told(1, vec![Connected]), []);
        assert_eq!(told(0, vec![Connected]), [up]);
    }

    #[test]
    fn channels_that_are_no_subject_of_their_own_are_found() {
        for fine in ["nbx:users", "nbx:users.v2:3", "nbx:a*b", "ns.nbx:users:0"] {
            assert_eq!(subject_fault(fine), None, "{fine}");
        }
        for bad in ["nbx:my users", "nbx:users.", "nbx:a..b", ".nbx:users", "nbx:x.*", "nbx:x.>.y", "*"] {
            assert!(subject_fault(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn credentials_come_from_the_first_url_that_has_any_percent_decoded() {
        assert_eq!(of(&["nats://127.0.0.1:4222"]), None);
        let alice = Credentials::UserPassword("alice".into(), "p@ss:w/rd".into());
        assert_eq!(of(&["nats://127.0.0.1:1", "nats://alice:p%40ss%3Aw%2Frd@127.0.0.1:2"]), Some(alice));
        assert_eq!(of(&["nats://s3cr%65t@127.0.0.1:4222"]), Some(Credentials::Token("s3cret".into())));
    }
}

//! The NATS transport: core NATS publish/subscribe, one subject per partition.
//!
//! One client connection per node publishes and subscribes. The client
//! reconnects by itself and resubscribes; its connection events are turned
//! into the stream's link state (a lost connection is a gap on every
//! partition). Delays between reconnection attempts follow the stream's
//! backoff.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::watch;

use super::{redact, runtime, Backoff, Hooks, Link, LinkConfig, LinkState, Ready};
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
    let rt = runtime()?;
    let (shutdown, stop) = watch::channel(false);
    let (client_tx, client_rx) = watch::channel(None);
    let link = Arc::new(NatsLink { client: client_rx, channels: config.channels.clone(), shutdown });
    rt.spawn(run(addrs, config, client_tx, stop));
    Ok(link)
}

/// The client's options. It keeps trying to connect from the start; the first
/// failed attempt is reported to `ready` (as Redis's first failure is), so
/// that an unreachable server does not leave `ready()` waiting.
fn options(backoff: Backoff, hooks: Arc<Hooks>, ready: Ready) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        // Our own frames need not come back.
        .no_echo()
        .connection_timeout(Duration::from_secs(2))
        .retry_on_initial_connect()
        .reconnect_delay_callback(move |attempts| backoff.delay(attempts.saturating_sub(1) as u32))
        .event_callback(move |event| {
            let (hooks, ready) = (hooks.clone(), ready.clone());
            async move {
                match event {
                    async_nats::Event::ClientError(e) => {
                        tracing::debug!(target: "nebulex_streams", error = %e, "NATS");
                        ready.send_if_modified(|r| {
                            let first = r.is_none();
                            if first {
                                *r = Some(Err(Error::Transport(format!("cannot connect to NATS: {e}"))));
                            }
                            first
                        });
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(target: "nebulex_streams", "NATS connection lost; reconnecting");
                        (hooks.on_state)(LinkState::Down("NATS connection lost".into()));
                    }
                    async_nats::Event::Connected => (hooks.on_state)(LinkState::Up),
                    other => tracing::debug!(target: "nebulex_streams", event = %other, "NATS"),
                }
            }
        })
}

async fn run(
    addrs: Vec<async_nats::ServerAddr>,
    config: LinkConfig,
    client_tx: watch::Sender<Option<async_nats::Client>>,
    mut stop: watch::Receiver<bool>,
) {
    let LinkConfig { channels, backoff, hooks, ready, .. } = config;
    let connecting = options(backoff, hooks.clone(), ready.clone()).connect(addrs.as_slice());
    let client = tokio::select! {
        c = connecting => match c {
            Ok(c) => c,
            Err(e) => {
                ready.send_replace(Some(Err(Error::Transport(format!("cannot connect to NATS: {e}")))));
                return;
            }
        },
        _ = stop.changed() => return,
    };
    let mut subscribers = Vec::with_capacity(channels.len());
    for channel in &channels {
        match client.subscribe(channel.clone()).await {
            Ok(s) => subscribers.push(s),
            Err(e) => {
                ready.send_replace(Some(Err(Error::Transport(format!("cannot subscribe to NATS `{channel}`: {e}")))));
                return;
            }
        }
    }
    // The subscriptions are registered once the server has seen them.
    if let Err(e) = client.flush().await {
        tracing::warn!(target: "nebulex_streams", error = %e, "NATS flush failed");
    }
    client_tx.send_replace(Some(client));
    ready.send_replace(Some(Ok(())));
    let mut merged = futures::stream::select_all(
        subscribers.into_iter().enumerate().map(|(index, s)| s.map(move |msg| (index, msg)).boxed()),
    );
    loop {
        tokio::select! {
            next = merged.next() => match next {
                Some((index, msg)) => (hooks.on_frame)(index, &msg.payload),
                None => return,
            },
            _ = stop.changed() => return,
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

    fn close(&self) {
        self.shutdown.send_replace(true);
    }
}

//! The in-process transport: a bus carrying encoded frames between the nodes
//! (streams) of one process, with fault injection for tests.
//!
//! Delivery is synchronous: a published frame is handed to every subscribed
//! node's inbound side before `publish` returns, including the publisher's
//! own (which ignores its echo, as it does over Redis).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use nebulex::NodeId;
use parking_lot::Mutex;

use super::{Hooks, Link, LinkConfig, LinkState};
use crate::error::Error;

/// An in-process pub/sub bus. Clones share it.
///
/// Besides carrying frames, it can misbehave on purpose, so that tests can
/// prove what the receivers do about loss:
///
/// ```
/// use nebulex::NodeId;
/// use nebulex_streams::pubsub::MemoryBus;
///
/// let bus = MemoryBus::new();
/// bus.drop_frames(3);            // the next 3 frames published are lost
/// bus.cut(NodeId(7));            // node 7 loses its connection...
/// bus.restore(NodeId(7));        // ...and gets it back
/// assert_eq!(bus.frames_dropped(), 0);
/// ```
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<BusInner>,
}

type FramePredicate = Box<dyn Fn(&str, &[u8]) -> bool + Send + Sync>;

#[derive(Default)]
struct BusInner {
    links: Mutex<Vec<Arc<MemoryLink>>>,
    /// Frames still to drop.
    to_drop: AtomicU64,
    /// Frames still to drop among those a predicate selects.
    to_drop_where: Mutex<Vec<(u64, FramePredicate)>>,
    /// Frames dropped so far.
    dropped: AtomicU64,
    /// Frames delivered so far (to any number of nodes).
    published: AtomicU64,
}

struct MemoryLink {
    node: NodeId,
    channels: Vec<String>,
    hooks: Arc<Hooks>,
    cut: AtomicBool,
    bus: MemoryBus,
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loses the next `n` frames published on the bus (on any channel).
    pub fn drop_frames(&self, n: u64) {
        self.inner.to_drop.fetch_add(n, Ordering::SeqCst);
    }

    /// Loses the next `n` frames for which `pred(channel, frame)` holds — to
    /// lose, say, one node's frames that carry events but not its heartbeats.
    pub fn drop_frames_where(&self, n: u64, pred: impl Fn(&str, &[u8]) -> bool + Send + Sync + 'static) {
        self.inner.to_drop_where.lock().push((n, Box::new(pred)));
    }

    /// How many frames the bus has lost on purpose.
    pub fn frames_dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::SeqCst)
    }

    /// How many frames the bus has carried.
    pub fn frames_published(&self) -> u64 {
        self.inner.published.load(Ordering::SeqCst)
    }

    /// Cuts `node`'s connection: it receives nothing and cannot publish until
    /// [`restore`](Self::restore), and its stream sees a lost connection.
    pub fn cut(&self, node: NodeId) {
        for link in self.links_of(node) {
            if !link.cut.swap(true, Ordering::SeqCst) {
                (link.hooks.on_state)(LinkState::Down("connection cut".into()));
            }
        }
    }

    /// Restores a connection cut by [`cut`](Self::cut).
    pub fn restore(&self, node: NodeId) {
        for link in self.links_of(node) {
            if link.cut.swap(false, Ordering::SeqCst) {
                (link.hooks.on_state)(LinkState::Up);
            }
        }
    }

    /// Publishes raw bytes on `channel`, as any client of the engine could:
    /// for tests of what receivers do with garbage or forged frames.
    pub fn publish_raw(&self, channel: &str, bytes: &[u8]) {
        self.deliver(channel, bytes);
    }

    fn links_of(&self, node: NodeId) -> Vec<Arc<MemoryLink>> {
        self.inner.links.lock().iter().filter(|l| l.node == node).cloned().collect()
    }

    fn deliver(&self, channel: &str, bytes: &[u8]) {
        self.inner.published.fetch_add(1, Ordering::SeqCst);
        let receivers: Vec<(Arc<MemoryLink>, usize)> = self
            .inner
            .links
            .lock()
            .iter()
            .filter(|l| !l.cut.load(Ordering::SeqCst))
            .filter_map(|l| l.channels.iter().position(|c| c == channel).map(|i| (l.clone(), i)))
            .collect();
        for (link, index) in receivers {
            (link.hooks.on_frame)(index, bytes);
        }
    }

    /// Takes one frame's worth of the drops asked for, if any apply.
    fn should_drop(&self, channel: &str, bytes: &[u8]) -> bool {
        let mut taken = {
            let mut rules = self.inner.to_drop_where.lock();
            let hit = rules.iter_mut().find(|(n, pred)| *n > 0 && pred(channel, bytes));
            let taken = hit.map(|(n, _)| *n -= 1).is_some();
            rules.retain(|(n, _)| *n > 0);
            taken
        };
        taken =
            taken || self.inner.to_drop.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if taken {
            self.inner.dropped.fetch_add(1, Ordering::SeqCst);
        }
        taken
    }
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus")
            .field("links", &self.inner.links.lock().len())
            .field("published", &self.frames_published())
            .field("dropped", &self.frames_dropped())
            .finish()
    }
}

impl Link for MemoryLink {
    fn publish(&self, frames: Vec<(usize, Arc<[u8]>)>) -> BoxFuture<'_, usize> {
        let mut failed = 0;
        for (index, bytes) in frames {
            if self.cut.load(Ordering::SeqCst) {
                failed += 1;
                continue;
            }
            let Some(channel) = self.channels.get(index) else {
                failed += 1;
                continue;
            };
            if !self.bus.should_drop(channel, &bytes) {
                self.bus.deliver(channel, &bytes);
            }
        }
        Box::pin(std::future::ready(failed))
    }

    fn close(&self) {
        self.bus.inner.links.lock().retain(|l| !std::ptr::eq(Arc::as_ptr(l), self));
    }
}

/// Joins the bus.
pub(crate) fn open(bus: &MemoryBus, config: LinkConfig) -> Result<Arc<dyn Link>, Error> {
    let link = Arc::new(MemoryLink {
        node: config.node,
        channels: config.channels,
        hooks: config.hooks,
        cut: AtomicBool::new(false),
        bus: bus.clone(),
    });
    bus.inner.links.lock().push(link.clone());
    (link.hooks.on_state)(LinkState::Up);
    config.ready.send_replace(Some(Ok(())));
    Ok(link)
}

//! Frames: how events cross the network between nodes.
//!
//! A frame carries a batch of one node's events of one partition. The layout
//! is specified in `docs/wire-format.md`, so other languages can read it:
//!
//! ```text
//! frame = version:u8 (1) | flags:u8 | body:MessagePack | tag:32 bytes (if flags & 1)
//! body  = [origin:u64, epoch:u64, cache:str, partition:u32, partitions:u32,
//!          first_seq:u64, sent_at_us:u64, events:[event, ...]]
//! event = [kind:u8, command:u8, version:u64, timestamp_us:u64, target]
//! target = [0, key] | [1, [key, ...]] | [2]
//! tag   = HMAC-SHA256(signing key, version | flags | body)
//! ```
//!
//! Decoding never panics and never trusts a length it has not checked: a
//! frame that is too large, truncated, of another version, malformed, of
//! another cache or partition count, or unsigned / badly signed when a key is
//! set, is refused with a [`RejectReason`].

use std::fmt;
use std::marker::PhantomData;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use nebulex::{CacheEntryEvent, CacheName, Command, EventMetadata, EventType, Name, NodeId, Target};
use serde::de::{self, DeserializeOwned, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;

/// The wire format version this crate writes and reads.
pub const WIRE_VERSION: u8 = 1;
/// Flag bit: the frame ends with an HMAC-SHA256 tag.
pub const FLAG_SIGNED: u8 = 1;
/// Flag bit: the sender's stream stopped after this frame (a heartbeat), so
/// its numbering on the partition ended cleanly ([`FrameHeader::last`]).
pub const FLAG_LAST: u8 = 2;
/// Length of the tag of a signed frame.
pub const TAG_LEN: usize = 32;
/// The default largest frame accepted, in bytes.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;
/// Text from a refused frame, cut to [`MAX_REASON_CHARS`] characters: a
/// reason is logged and reported for every refused frame, and a frame may
/// carry a megabyte of text.
pub(crate) fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_REASON_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// The most characters of a frame's own text a [`RejectReason`] carries.
pub const MAX_REASON_CHARS: usize = 200;

/// How deep a frame's MessagePack may nest: the frame's own five levels
/// (body, events, event, target, keys) leave the rest to a key's type.
pub const MAX_DEPTH: usize = 32;

/// Why a frame from the network was refused.
///
/// ```
/// use nebulex_streams::wire::{decode, DecodeLimits, RejectReason};
///
/// let limits = DecodeLimits::default();
/// let err = decode::<String>(&[1], &limits).unwrap_err();
/// assert_eq!(err, RejectReason::Truncated { size: 1 });
/// assert_eq!((err.label(), err.to_string().as_str()), ("truncated", "frame is truncated (1 bytes)"));
/// assert_eq!(decode::<String>(&[9, 0], &limits).unwrap_err(), RejectReason::Version(9));
/// assert_eq!(decode::<String>(&[1, 0x80], &limits).unwrap_err(), RejectReason::Flags(0x80));
/// assert!(matches!(decode::<String>(b"\x01\x00garbage", &limits), Err(RejectReason::Malformed(_))));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// Larger than the configured limit.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The frame's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Too short to hold a header (or its tag).
    #[error("frame is truncated ({size} bytes)")]
    Truncated {
        /// The frame's size.
        size: usize,
    },
    /// A version this crate does not read.
    #[error("unsupported wire version {0}")]
    Version(u8),
    /// Flag bits this version does not define are set.
    #[error("unknown flags {0:#04x}")]
    Flags(u8),
    /// A signing key is set and the frame carries no tag.
    #[error("frame is not signed, and a signing key is set")]
    Unsigned,
    /// The tag does not match the frame.
    #[error("frame signature does not match")]
    BadSignature,
    /// The body is not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A frame of another cache.
    #[error("frame is for cache `{got}`, not `{expected}`")]
    ForeignCache {
        /// The frame's cache.
        got: String,
        /// This stream's cache.
        expected: String,
    },
    /// A frame whose sequence numbers were already received from its origin.
    #[error("replayed frame: sequence {seq} was already received (expected {expected})")]
    Replayed {
        /// The frame's first sequence number.
        seq: u64,
        /// The next sequence number expected from its origin.
        expected: u64,
    },
    /// A heartbeat sent no later than the last frame taken from its origin
    /// (each frame's send time is later than the one before): a replay,
    /// which its sequence number, still the next one, cannot tell. Labelled
    /// `replay` too.
    #[error("replayed frame: sent at {sent_at_us} µs, not after its origin's last frame ({last_us} µs)")]
    Resent {
        /// The frame's send time, µs since the Unix epoch.
        sent_at_us: u64,
        /// The send time of the origin's last frame taken.
        last_us: u64,
    },
    /// A frame of an origin's earlier epoch (before it restarted): a replay.
    /// Refused while the origin's current stream runs, and for the last
    /// epochs the origin left (4 are kept per origin). A lower epoch not
    /// among those, once the current stream stopped or fell silent, is
    /// taken for the origin restarted with its clock set back, and is
    /// followed; if the epoch it replaced then goes on from where it stood,
    /// that lower epoch was a replay, and the receiver goes back.
    #[error("frame of epoch {epoch:#x}, which its origin left for its current epoch {current:#x}")]
    OldEpoch {
        /// The frame's epoch.
        epoch: u64,
        /// The origin's current epoch.
        current: u64,
    },
    /// A frame of a stream with another partition count.
    #[error("frame says {got} partitions, this stream has {expected}")]
    PartitionCount {
        /// The frame's partition count.
        got: u32,
        /// This stream's.
        expected: u32,
    },
    /// A frame whose partition is not the one of the channel it came on.
    #[error("frame of partition {got} arrived on the channel of partition {expected}")]
    WrongPartition {
        /// The frame's partition.
        got: u32,
        /// The channel's partition.
        expected: u32,
    },
    /// A frame with this node's own id but another epoch: another node uses
    /// the same id (each node's id must be its own), or a forgery.
    #[error("frame of another stream (epoch {epoch:#x}) with this node's own id")]
    SameNodeId {
        /// The frame's epoch.
        epoch: u64,
    },
    /// A frame of an origin not followed yet on its partition, while the
    /// receiver follows as many there as it may
    /// ([`MAX_ORIGINS_PER_PARTITION`](crate::MAX_ORIGINS_PER_PARTITION)),
    /// every one of them live. The partition's readers are told of a loss.
    #[error("frame of a new origin, while {limit} origins are followed on its partition, all live")]
    TooManyOrigins {
        /// The most origins followed on a partition.
        limit: usize,
    },
}

impl RejectReason {
    /// A short label for metrics (`reason` label).
    pub fn label(&self) -> &'static str {
        match self {
            RejectReason::TooLarge { .. } => "too_large",
            RejectReason::Truncated { .. } => "truncated",
            RejectReason::Version(_) => "version",
            RejectReason::Flags(_) => "flags",
            RejectReason::Unsigned => "unsigned",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::Malformed(_) => "malformed",
            RejectReason::ForeignCache { .. } => "foreign_cache",
            RejectReason::PartitionCount { .. } => "partition_count",
            RejectReason::Replayed { .. } | RejectReason::Resent { .. } => "replay",
            RejectReason::OldEpoch { .. } => "old_epoch",
            RejectReason::WrongPartition { .. } => "wrong_partition",
            RejectReason::SameNodeId { .. } => "same_node_id",
            RejectReason::TooManyOrigins { .. } => "too_many_origins",
        }
    }
}

/// The header of a frame: who sent it, for which partition, from which sequence number.
///
/// A frame without events is a heartbeat: it tells the next sequence number.
///
/// ```
/// use std::sync::Arc;
/// use nebulex::{CacheEntryEvent, NodeId};
/// use nebulex_streams::wire::{decode, encode, DecodeLimits, FrameHeader};
///
/// let header = FrameHeader {
///     origin: NodeId(7),
///     epoch: 1,
///     cache: "users".into(),
///     partition: 0,
///     partitions: 0, // unpartitioned
///     first_seq: 42,
///     sent_at_us: 0,
///     last: false,
/// };
/// let no_events: Vec<Arc<CacheEntryEvent<String>>> = Vec::new();
/// let frame = decode::<String>(&encode(&header, &no_events, None)?, &DecodeLimits::default())?;
/// assert_eq!(frame.header, header);
/// assert!(frame.events.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    /// The sending node.
    pub origin: NodeId,
    /// The sending stream's epoch, new at each start: the milliseconds since
    /// the Unix epoch in the high 48 bits, 16 random bits below (so it grows
    /// from one start to the next).
    pub epoch: u64,
    /// The cache's name.
    pub cache: String,
    /// The partition.
    pub partition: u32,
    /// The partition count (0: an unpartitioned stream).
    pub partitions: u32,
    /// The sequence number of the first event; the others follow one by one.
    pub first_seq: u64,
    /// When the frame was sent (µs since the Unix epoch).
    pub sent_at_us: u64,
    /// The sender's stream stopped after this frame: nothing of this epoch
    /// follows on the partition. (Without it, a new epoch of the same node
    /// means it restarted without stopping, and may have lost events.)
    pub last: bool,
}

/// A decoded frame.
///
/// ```
/// use nebulex::{Name, NodeId};
/// use nebulex_streams::wire::{decode, encode, DecodeLimits, Frame, FrameHeader};
///
/// # let event = |seq, key: &str| std::sync::Arc::new(nebulex::CacheEntryEvent {
/// #     cache: nebulex::Name::new("users"), kind: nebulex::EventType::Inserted,
/// #     target: nebulex::Target::Key(key.to_string()), command: nebulex::Command::Put, version: 1,
/// #     metadata: nebulex::EventMetadata { node: nebulex::NodeId(7), partition: Some(1), partitions: Some(4),
/// #         topic: None, seq, timestamp: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000) },
/// # });
/// # let header = FrameHeader {
/// #     origin: nebulex::NodeId(7), epoch: 1, cache: "users".into(),
/// #     partition: 1, partitions: 4, first_seq: 100, sent_at_us: 0, last: false,
/// # };
/// let bytes = encode(&header, &[event(100, "a"), event(101, "b")], None)?; // header.first_seq: 100
/// let frame: Frame<String> = decode(&bytes, &DecodeLimits::default())?;
/// let events = frame.into_events(Name::new("users"), Name::new("nbx:users:1"));
/// assert_eq!(events[1].metadata.seq, 101); // first_seq + index
/// assert_eq!(events[1].metadata.node, NodeId(7)); // the header's origin
/// assert_eq!((events[1].metadata.partition, events[1].metadata.partitions), (Some(1), Some(4)));
/// assert_eq!(events[1].metadata.topic, Some(Name::new("nbx:users:1")));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<K> {
    /// The header.
    pub header: FrameHeader,
    /// The events, in order.
    pub events: Vec<WireEvent<K>>,
}

/// One event as it travels.
///
/// ```
/// use nebulex::{Command, EventType};
/// use nebulex_streams::wire::{decode, encode, unix_micros, DecodeLimits, FrameHeader, WireEvent};
///
/// # let event = |seq, key: &str| std::sync::Arc::new(nebulex::CacheEntryEvent {
/// #     cache: nebulex::Name::new("users"), kind: nebulex::EventType::Inserted,
/// #     target: nebulex::Target::Key(key.to_string()), command: nebulex::Command::Put, version: 1,
/// #     metadata: nebulex::EventMetadata { node: nebulex::NodeId(7), partition: Some(1), partitions: Some(4),
/// #         topic: None, seq, timestamp: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000) },
/// # });
/// # let header = FrameHeader {
/// #     origin: nebulex::NodeId(7), epoch: 1, cache: "users".into(),
/// #     partition: 1, partitions: 4, first_seq: 100, sent_at_us: 0, last: false,
/// # };
/// let sent = event(100, "user:1");
/// let frame = decode::<String>(&encode(&header, &[sent.clone()], None)?, &DecodeLimits::default())?;
/// let wire: &WireEvent<String> = &frame.events[0];
/// assert_eq!((wire.kind, wire.command, wire.version), (EventType::Inserted, Command::Put, 1));
/// assert_eq!(wire.timestamp_us, unix_micros(sent.metadata.timestamp));
/// assert_eq!(wire.target, sent.target);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireEvent<K> {
    /// What changed.
    pub kind: EventType,
    /// The call that changed it.
    pub command: Command,
    /// The per-key version on the origin node.
    pub version: u64,
    /// When the write took effect on the origin (µs since the Unix epoch).
    pub timestamp_us: u64,
    /// Which entries.
    pub target: Target<K>,
}

impl<K> Frame<K> {
    /// The events as the local stream hands them to subscribers.
    pub fn into_events(self, cache: CacheName, topic: Name) -> Vec<CacheEntryEvent<K>> {
        let h = self.header;
        let partitioned = h.partitions > 0;
        self.events
            .into_iter()
            .enumerate()
            .map(|(i, e)| CacheEntryEvent {
                cache,
                kind: e.kind,
                target: e.target,
                command: e.command,
                version: e.version,
                metadata: EventMetadata {
                    node: h.origin,
                    partition: partitioned.then_some(h.partition),
                    partitions: partitioned.then_some(h.partitions),
                    topic: Some(topic),
                    seq: h.first_seq.wrapping_add(i as u64),
                    // (A time no platform can hold is read as the epoch.)
                    timestamp: UNIX_EPOCH.checked_add(Duration::from_micros(e.timestamp_us)).unwrap_or(UNIX_EPOCH),
                },
            })
            .collect()
    }
}

/// Microseconds since the Unix epoch (0 before it).
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use nebulex_streams::wire::unix_micros;
///
/// assert_eq!(unix_micros(UNIX_EPOCH + Duration::from_nanos(1_500_999)), 1_500);
/// assert_eq!(unix_micros(UNIX_EPOCH - Duration::from_secs(1)), 0);
/// ```
pub fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

type HmacSha256 = Hmac<Sha256>;

/// Encodes a frame of `events` (all of `header.partition`).
///
/// ```
/// use std::sync::Arc;
/// use std::time::SystemTime;
/// use nebulex::{CacheEntryEvent, Command, EventMetadata, EventType, Name, NodeId, Target};
/// use nebulex_streams::wire::{decode, encode, unix_micros, DecodeLimits, FrameHeader, WIRE_VERSION};
///
/// let event = Arc::new(CacheEntryEvent {
///     cache: Name::new("users"), kind: EventType::Deleted, command: Command::DeleteAll, version: 3,
///     target: Target::Keys(vec!["a".to_string(), "b".to_string()]),
///     metadata: EventMetadata { node: NodeId(7), partition: Some(1), partitions: Some(4), topic: None, seq: 100,
///         timestamp: SystemTime::now() },
/// });
/// let header = FrameHeader {
///     origin: NodeId(7), epoch: 1, cache: "users".into(), partition: 1, partitions: 4, first_seq: 100,
///     sent_at_us: unix_micros(SystemTime::now()),
///     last: false,
/// };
/// let bytes = encode(&header, &[event.clone()], None)?;
/// assert_eq!(bytes[0], WIRE_VERSION);
/// let frame = decode::<String>(&bytes, &DecodeLimits::default())?;
/// assert_eq!(frame.header, header);
/// assert_eq!(frame.events[0].target, event.target);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode<K: Serialize>(
    header: &FrameHeader,
    events: &[impl AsRef<CacheEntryEvent<K>>],
    signing_key: Option<&[u8]>,
) -> Result<Vec<u8>, String> {
    let body = (
        header.origin.0,
        header.epoch,
        &header.cache,
        header.partition,
        header.partitions,
        header.first_seq,
        header.sent_at_us,
        EventsOut(events, PhantomData),
    );
    let mut out = Vec::with_capacity(64 + events.len() * 32);
    out.push(WIRE_VERSION);
    let signed = if signing_key.is_some() { FLAG_SIGNED } else { 0 };
    out.push(signed | if header.last { FLAG_LAST } else { 0 });
    rmp_serde::encode::write(&mut out, &body).map_err(|e| e.to_string())?;
    if let Some(key) = signing_key {
        let tag = tag_of(key, &out);
        out.extend_from_slice(&tag);
    }
    Ok(out)
}

fn tag_of(key: &[u8], bytes: &[u8]) -> [u8; TAG_LEN] {
    // HMAC takes keys of any length.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return [0; TAG_LEN],
    };
    mac.update(bytes);
    mac.finalize().into_bytes().into()
}

/// The origin node of a frame, read from its first bytes without decoding
/// the rest (`None` if they are not a version 1 frame's). Receivers use it to
/// drop their own frames, which Redis echoes back, before paying for a full
/// decode; it checks nothing else.
///
/// ```
/// # use std::sync::Arc;
/// # use nebulex::{CacheEntryEvent, NodeId};
/// use nebulex_streams::wire::{encode, peek_origin, FrameHeader};
/// let header = FrameHeader {
///     origin: NodeId(7), epoch: 1, cache: "users".into(), partition: 0, partitions: 0, first_seq: 1, sent_at_us: 0, last: false,
/// };
/// let frame = encode::<String>(&header, &[] as &[Arc<CacheEntryEvent<String>>], None)?;
/// assert_eq!(peek_origin(&frame), Some(NodeId(7)));
/// assert_eq!(peek_origin(b"garbage"), None);
/// # Ok::<(), String>(())
/// ```
pub fn peek_origin(bytes: &[u8]) -> Option<NodeId> {
    peek_origin_epoch(bytes).map(|(origin, _)| origin)
}

/// The origin and epoch of a frame, and the header fields after them, read
/// without decoding the rest.
fn peek_origin_epoch_rest(bytes: &[u8]) -> Option<(NodeId, u64, &[u8])> {
    if bytes.first() != Some(&WIRE_VERSION) {
        return None;
    }
    let mut body = bytes.get(2..)?;
    rmp::decode::read_array_len(&mut body).ok()?;
    let origin = rmp::decode::read_int(&mut body).ok().map(NodeId)?;
    let epoch = rmp::decode::read_int(&mut body).ok()?;
    Some((origin, epoch, body))
}

/// The origin and epoch of a frame, read without decoding the rest.
pub(crate) fn peek_origin_epoch(bytes: &[u8]) -> Option<(NodeId, u64)> {
    peek_origin_epoch_rest(bytes).map(|(origin, epoch, _)| (origin, epoch))
}

/// The origin and send time (`sent_at_us`) of a frame, read without decoding
/// its events.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn peek_origin_sent(bytes: &[u8]) -> Option<(NodeId, u64)> {
    let (origin, _, mut body) = peek_origin_epoch_rest(bytes)?;
    let cache = rmp::decode::read_str_len(&mut body).ok()? as usize;
    body = body.get(cache..)?;
    for _ in 0..3 {
        // partition, partitions, first_seq
        let _: u64 = rmp::decode::read_int(&mut body).ok()?;
    }
    Some((origin, rmp::decode::read_int(&mut body).ok()?))
}

/// What a decoder checks beyond the format.
///
/// ```
/// use nebulex_streams::wire::{decode, encode, DecodeLimits, FrameHeader, RejectReason};
///
/// # let event = |seq, key: &str| std::sync::Arc::new(nebulex::CacheEntryEvent {
/// #     cache: nebulex::Name::new("users"), kind: nebulex::EventType::Inserted,
/// #     target: nebulex::Target::Key(key.to_string()), command: nebulex::Command::Put, version: 1,
/// #     metadata: nebulex::EventMetadata { node: nebulex::NodeId(7), partition: Some(1), partitions: Some(4),
/// #         topic: None, seq, timestamp: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000) },
/// # });
/// # let header = FrameHeader {
/// #     origin: nebulex::NodeId(7), epoch: 1, cache: "users".into(),
/// #     partition: 1, partitions: 4, first_seq: 100, sent_at_us: 0, last: false,
/// # };
/// let key = Some(&b"cluster secret"[..]);
/// let signed = encode(&header, &[event(100, "a")], key)?;
/// let limits = DecodeLimits { signing_key: key, ..Default::default() };
/// assert!(decode::<String>(&signed, &limits).is_ok());
///
/// let unsigned = encode(&header, &[event(100, "a")], None)?;
/// assert_eq!(decode::<String>(&unsigned, &limits).unwrap_err(), RejectReason::Unsigned);
/// let small = DecodeLimits { max_frame_bytes: 16, ..Default::default() };
/// assert!(matches!(decode::<String>(&unsigned, &small), Err(RejectReason::TooLarge { limit: 16, .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct DecodeLimits<'a> {
    /// The largest frame accepted (0: [`DEFAULT_MAX_FRAME_BYTES`]).
    pub max_frame_bytes: usize,
    /// If set, frames must carry a valid tag made with this key.
    pub signing_key: Option<&'a [u8]>,
}

/// Decodes a frame, checking its size, version, signature and shape.
///
/// ```
/// use nebulex::Target;
/// use nebulex_streams::wire::{decode, encode, DecodeLimits, FrameHeader, RejectReason};
///
/// # let event = |seq, key: &str| std::sync::Arc::new(nebulex::CacheEntryEvent {
/// #     cache: nebulex::Name::new("users"), kind: nebulex::EventType::Inserted,
/// #     target: nebulex::Target::Key(key.to_string()), command: nebulex::Command::Put, version: 1,
/// #     metadata: nebulex::EventMetadata { node: nebulex::NodeId(7), partition: Some(1), partitions: Some(4),
/// #         topic: None, seq, timestamp: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000) },
/// # });
/// # let header = FrameHeader {
/// #     origin: nebulex::NodeId(7), epoch: 1, cache: "users".into(),
/// #     partition: 1, partitions: 4, first_seq: 100, sent_at_us: 0, last: false,
/// # };
/// let key = Some(&b"cluster secret"[..]);
/// let mut bytes = encode(&header, &[event(100, "user:1")], key)?;
/// let limits = DecodeLimits { signing_key: key, ..Default::default() };
/// let frame = decode::<String>(&bytes, &limits)?;
/// assert_eq!(frame.events[0].target, Target::Key("user:1".to_string()));
/// // Keys must decode as the stream's key type.
/// assert!(matches!(decode::<u64>(&bytes, &limits), Err(RejectReason::Malformed(_))));
/// bytes[10] ^= 1; // tampered with on the way
/// assert_eq!(decode::<String>(&bytes, &limits).unwrap_err(), RejectReason::BadSignature);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn decode<K: DeserializeOwned>(bytes: &[u8], limits: &DecodeLimits<'_>) -> Result<Frame<K>, RejectReason> {
    let limit = if limits.max_frame_bytes == 0 { DEFAULT_MAX_FRAME_BYTES } else { limits.max_frame_bytes };
    if bytes.len() > limit {
        return Err(RejectReason::TooLarge { size: bytes.len(), limit });
    }
    let [version, flags, ..] = *bytes else {
        return Err(RejectReason::Truncated { size: bytes.len() });
    };
    if version != WIRE_VERSION {
        return Err(RejectReason::Version(version));
    }
    if flags & !(FLAG_SIGNED | FLAG_LAST) != 0 {
        return Err(RejectReason::Flags(flags));
    }
    let last = flags & FLAG_LAST != 0;
    let signed = flags & FLAG_SIGNED != 0;
    let body_end = if signed {
        bytes.len().checked_sub(TAG_LEN).filter(|&end| end > 2).ok_or(RejectReason::Truncated { size: bytes.len() })?
    } else {
        bytes.len()
    };
    if let Some(key) = limits.signing_key {
        if !signed {
            return Err(RejectReason::Unsigned);
        }
        let mut mac = HmacSha256::new_from_slice(key).map_err(|_| RejectReason::BadSignature)?;
        mac.update(&bytes[..body_end]);
        mac.verify_slice(&bytes[body_end..]).map_err(|_| RejectReason::BadSignature)?;
    }
    let body = &bytes[2..body_end];
    // The frame nests five levels deep, plus its keys': a deeper frame is
    // garbage, refused before its nesting can exhaust a thread's stack.
    // (Measured here, over every map and array: the deserializer does not
    // count the map that holds an enum's variant.)
    if nesting(body) > MAX_DEPTH {
        return Err(RejectReason::Malformed(format!("nested deeper than {MAX_DEPTH} levels")));
    }
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(body));
    de.set_max_depth(MAX_DEPTH + 1); // (its count stops one level short)
    type Body<K> = (u64, u64, String, u32, u32, u64, u64, Vec<EventIn<K>>);
    let (origin, epoch, cache, partition, partitions, first_seq, sent_at_us, events): Body<K> =
        Deserialize::deserialize(&mut de).map_err(|e| RejectReason::Malformed(clip(&e.to_string())))?;
    if de.position() as usize != body.len() {
        return Err(RejectReason::Malformed(format!("{} trailing bytes", body.len() - de.position() as usize)));
    }
    if partitions > 0 && partition >= partitions {
        return Err(RejectReason::Malformed(format!("partition {partition} of {partitions}")));
    }
    Ok(Frame {
        header: FrameHeader {
            origin: NodeId(origin),
            epoch,
            cache,
            partition,
            partitions,
            first_seq,
            sent_at_us,
            last,
        },
        events: events.into_iter().map(|e| e.0).collect(),
    })
}

/// How deep the MessagePack values of `body` nest (arrays and maps, the
/// body's own included), read without recursion; it stops counting at
/// `MAX_DEPTH + 1`, and at anything it cannot read (a decoder then says
/// what is wrong with it). A frame's body (its bytes after the version and
/// flags, before a signature's tag) that nests deeper than [`MAX_DEPTH`] is
/// refused: this is how [`decode`] counts, for tools that read frames
/// without it.
///
/// ```
/// use nebulex_streams::wire::{nesting, MAX_DEPTH};
///
/// assert_eq!(nesting(&[0x92, 0x91, 0x01, 0x80]), 2); // [[1], {}]
/// assert_eq!(nesting(&[0x91; 100]), MAX_DEPTH + 1); // counted no further
/// ```
pub fn nesting(body: &[u8]) -> usize {
    // Values still to read at each open level; the body is one value.
    let mut pending: Vec<u64> = vec![1];
    let mut deepest = 0;
    let mut at = 0usize;
    let read = |at: usize, n: usize| -> Option<u64> {
        let bytes = body.get(at..at.checked_add(n)?)?;
        Some(bytes.iter().fold(0u64, |v, b| v << 8 | u64::from(*b)))
    };
    while let Some(left) = pending.last_mut() {
        if *left == 0 {
            pending.pop();
            continue;
        }
        *left -= 1;
        let Some(&marker) = body.get(at) else { break };
        at += 1;
        // (Bytes to skip; for an array or a map, its items.)
        let (skip, items): (Option<u64>, Option<u64>) = match marker {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (Some(0), None),
            0x80..=0x8f => (Some(0), Some(2 * u64::from(marker & 0x0f))),
            0x90..=0x9f => (Some(0), Some(u64::from(marker & 0x0f))),
            0xa0..=0xbf => (Some(u64::from(marker & 0x1f)), None),
            0xc4 | 0xd9 => (read(at, 1).map(|n| 1 + n), None),
            0xc5 | 0xda => (read(at, 2).map(|n| 2 + n), None),
            0xc6 | 0xdb => (read(at, 4).map(|n| 4 + n), None),
            0xc7 => (read(at, 1).map(|n| 2 + n), None),
            0xc8 => (read(at, 2).map(|n| 3 + n), None),
            0xc9 => (read(at, 4).map(|n| 5 + n), None),
            0xca => (Some(4), None),
            0xcb => (Some(8), None),
            0xcc..=0xcf => (Some(1 << (marker - 0xcc)), None),
            0xd0..=0xd3 => (Some(1 << (marker - 0xd0)), None),
            0xd4..=0xd8 => (Some(1 + (1 << (marker - 0xd4))), None),
            0xdc => (Some(2), read(at, 2)),
            0xdd => (Some(4), read(at, 4)),
            0xde => (Some(2), read(at, 2).map(|n| 2 * n)),
            0xdf => (Some(4), read(at, 4).map(|n| 2 * n)),
            0xc1 => (None, None),
        };
        let Some(next) = skip.and_then(|n| usize::try_from(n).ok()).and_then(|n| at.checked_add(n)) else { break };
        at = next;
        if let Some(items) = items {
            // One level below the open ones (the body's own is the first).
            deepest = deepest.max(pending.len());
            if deepest > MAX_DEPTH {
                break;
            }
            if items > 0 {
                pending.push(items);
            }
        }
    }
    deepest
}

struct EventsOut<'a, K, E>(&'a [E], PhantomData<K>);

impl<K: Serialize, E: AsRef<CacheEntryEvent<K>>> Serialize for EventsOut<'_, K, E> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|e| EventOut(e.as_ref())))
    }
}

struct EventOut<'a, K>(&'a CacheEntryEvent<K>);

impl<K: Serialize> Serialize for EventOut<'_, K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut t = s.serialize_tuple(5)?;
        t.serialize_element(&(e.kind as u8))?;
        t.serialize_element(&(e.command as u8))?;
        t.serialize_element(&e.version)?;
        t.serialize_element(&unix_micros(e.metadata.timestamp))?;
        t.serialize_element(&TargetOut(&e.target))?;
        t.end()
    }
}

struct TargetOut<'a, K>(&'a Target<K>);

impl<K: Serialize> Serialize for TargetOut<'_, K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Target::Key(k) => (0u8, k).serialize(s),
            Target::Keys(ks) => (1u8, ks).serialize(s),
            Target::All => (2u8,).serialize(s),
        }
    }
}

struct EventIn<K>(WireEvent<K>);

impl<'de, K: DeserializeOwned> Deserialize<'de> for EventIn<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, command, version, timestamp_us, TargetIn(target)): (u8, u8, u64, u64, TargetIn<K>) =
            Deserialize::deserialize(d)?;
        let kind = *EventType::ALL
            .get(usize::from(kind))
            .ok_or_else(|| de::Error::custom(format!("unknown event kind {kind}")))?;
        let command = *Command::ALL
            .get(usize::from(command))
            .ok_or_else(|| de::Error::custom(format!("unknown command {command}")))?;
        Ok(EventIn(WireEvent { kind, command, version, timestamp_us, target }))
    }
}

struct TargetIn<K>(Target<K>);

impl<'de, K: DeserializeOwned> Deserialize<'de> for TargetIn<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<K>(PhantomData<K>);
        impl<'de, K: DeserializeOwned> Visitor<'de> for V<K> {
            type Value = TargetIn<K>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a target: [0, key], [1, [keys]] or [2]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let tag: u8 = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let target = match tag {
                    0 => Target::Key(seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?),
                    1 => Target::Keys(seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?),
                    2 => Target::All,
                    other => return Err(de::Error::custom(format!("unknown target tag {other}"))),
                };
                // Refused unread when the format says how many are left.
                if seq.size_hint().is_some_and(|n| n > 0) || seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("target has extra elements"));
                }
                Ok(TargetIn(target))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn event(kind: EventType, target: Target<String>) -> Arc<CacheEntryEvent<String>> {
        Arc::new(CacheEntryEvent {
            cache: Name::new("users"),
            kind,
            target,
            command: Command::Put,
            version: 7,
            metadata: EventMetadata {
                node: NodeId(1),
                partition: Some(1),
                partitions: Some(4),
                topic: None,
                seq: 0,
                timestamp: UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_000),
            },
        })
    }

    fn header() -> FrameHeader {
        FrameHeader {
            origin: NodeId(0xfeed),
            epoch: 42,
            cache: "users".into(),
            partition: 1,
            partitions: 4,
            first_seq: 100,
            sent_at_us: 5,
            last: false,
        }
    }

    #[test]
    fn the_origin_and_send_time_are_read_without_decoding_the_events() {
        let long_name = FrameHeader { cache: "c".repeat(300), sent_at_us: u64::MAX - 1, ..header() };
        for (h, key) in
            [(header(), None), (long_name, Some(&b"k3y"[..])), (FrameHeader { first_seq: u64::MAX, ..header() }, None)]
        {
            let bytes = encode(&h, &[event(EventType::Inserted, Target::Key("k".into()))], key).unwrap();
            assert_eq!(peek_origin_sent(&bytes), Some((h.origin, h.sent_at_us)));
            for cut in [0, 1, 2, 3] {
                assert_eq!(peek_origin_sent(&bytes[..cut.min(bytes.len())]), None, "cut at {cut}");
            }
        }
        assert_eq!(peek_origin_sent(b"\x01\x00garbage"), None);
    }

    #[test]
    fn frames_round_trip_with_every_target() {
        let events = vec![
            event(EventType::Inserted, Target::Key("user:1".into())),
            event(EventType::Deleted, Target::Keys(vec!["a".into(), "b".into()])),
            event(EventType::Deleted, Target::All),
        ];
        let bytes = encode(&header(), &events, None).unwrap();
        let frame: Frame<String> = decode(&bytes, &DecodeLimits::default()).unwrap();
        assert_eq!(frame.header, header());
        assert_eq!(frame.events.len(), 3);
        assert_eq!(frame.events[1].target, Target::Keys(vec!["a".into(), "b".into()]));
        assert_eq!(frame.events[0].timestamp_us, 1_700_000_000_000_000);
        assert_eq!(frame.events[2].target, Target::All);
    }

    #[test]
    fn signed_frames_are_checked_when_a_key_is_set() {
        let events = vec![event(EventType::Inserted, Target::Key("k".into()))];
        let key = Some(&b"secret"[..]);
        let signed = encode(&header(), &events, key).unwrap();
        let unsigned = encode(&header(), &events, None).unwrap();
        let with_key = DecodeLimits { signing_key: key, ..Default::default() };
        assert!(decode::<String>(&signed, &with_key).is_ok());
        assert_eq!(decode::<String>(&unsigned, &with_key).unwrap_err(), RejectReason::Unsigned);
        let mut forged = signed.clone();
        forged[10] ^= 1;
        assert_eq!(decode::<String>(&forged, &with_key).unwrap_err(), RejectReason::BadSignature);
        let other = DecodeLimits { signing_key: Some(b"other"), ..Default::default() };
        assert_eq!(decode::<String>(&signed, &other).unwrap_err(), RejectReason::BadSignature);
    }

    #[test]
    fn hostile_frames_are_rejected_with_a_reason() {
        let events = vec![event(EventType::Inserted, Target::Key("k".into()))];
        let good = encode(&header(), &events, None).unwrap();
        let limits = DecodeLimits::default();
        assert!(matches!(decode::<String>(&[], &limits), Err(RejectReason::Truncated { .. })));
        assert!(matches!(decode::<String>(&[1], &limits), Err(RejectReason::Truncated { .. })));
        let mut v2 = good.clone();
        v2[0] = 2;
        assert_eq!(decode::<String>(&v2, &limits).unwrap_err(), RejectReason::Version(2));
        for cut in 2..good.len() {
            assert!(matches!(decode::<String>(&good[..cut], &limits), Err(RejectReason::Malformed(_))), "cut {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(decode::<String>(&trailing, &limits), Err(RejectReason::Malformed(_))));
        let small = DecodeLimits { max_frame_bytes: 8, ..Default::default() };
        assert!(matches!(decode::<String>(&good, &small), Err(RejectReason::TooLarge { .. })));
        // A key of the wrong type.
        assert!(matches!(decode::<u64>(&good, &limits), Err(RejectReason::Malformed(_))));
    }

    /// A frame whose body is the header's seven fields then `events` (raw
    /// MessagePack of the events array's elements, `count` of them).
    fn raw_frame(count: u8, events: &[u8]) -> Vec<u8> {
        let mut bytes = vec![WIRE_VERSION, 0, 0x98];
        for part in [
            rmp_serde::to_vec(&1u64).unwrap(),
            rmp_serde::to_vec(&1u64).unwrap(),
            rmp_serde::to_vec("users").unwrap(),
            rmp_serde::to_vec(&0u32).unwrap(),
            rmp_serde::to_vec(&1u32).unwrap(),
            rmp_serde::to_vec(&1u64).unwrap(),
            rmp_serde::to_vec(&0u64).unwrap(),
        ] {
            bytes.extend(part);
        }
        bytes.push(0x90 | count);
        bytes.extend_from_slice(events);
        bytes
    }

    /// `depth` nested one-element arrays around an empty one.
    fn nested(depth: usize) -> Vec<u8> {
        let mut bytes = vec![0x91; depth];
        bytes.push(0x90);
        bytes
    }

    /// A key type whose values nest: `[[[]]]` is three levels.
    #[derive(Debug, serde::Deserialize)]
    struct Nest(#[allow(dead_code)] Vec<Nest>);

    #[test]
    fn deep_nesting_is_refused_without_exhausting_the_stack() {
        // A small stack: the MessagePack reader's own depth limit (1,024
        // levels) would exhaust it in a debug build; ours keeps it small.
        let decoding = std::thread::Builder::new().stack_size(256 * 1024).spawn(decode_deep_frames).unwrap();
        decoding.join().unwrap();
    }

    fn decode_deep_frames() {
        let limits = DecodeLimits::default();
        // [kind, command, version, timestamp, target]: five elements.
        let event_with = |target: &[u8]| [&[0x95, 0, 0, 1, 0][..], target].concat();

        let too_deep = RejectReason::Malformed(format!("nested deeper than {MAX_DEPTH} levels"));
        // An `All` target with a deeply nested extra element.
        let extra = event_with(&[&[0x92, 2][..], &nested(100_000)].concat());
        assert_eq!(decode::<String>(&raw_frame(1, &extra), &limits).map(|_| ()), Err(too_deep.clone()));
        // A key whose type nests, nested deeper than the limit.
        let deep = event_with(&[&[0x92, 0][..], &nested(100_000)].concat());
        assert_eq!(decode::<Nest>(&raw_frame(1, &deep), &limits).map(|_| ()), Err(too_deep));
        // An `All` target with an extra element within the limit.
        let extra = event_with(&[&[0x92, 2][..], &nested(4)].concat());
        let err = decode::<String>(&raw_frame(1, &extra), &limits).unwrap_err();
        assert!(matches!(&err, RejectReason::Malformed(m) if m.contains("extra elements")), "{err:?}");

        // Within the limit, the same key type decodes.
        let fine = event_with(&[&[0x92, 0][..], &nested(MAX_DEPTH - 8)].concat());
        let frame = decode::<Nest>(&raw_frame(1, &fine), &limits).unwrap();
        assert_eq!(frame.events.len(), 1);
    }

    #[test]
    fn reasons_carry_at_most_a_clip_of_the_frame_s_text() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(10_000);
        let clipped = clip(&long);
        assert_eq!(clipped.chars().count(), MAX_REASON_CHARS + 1);
        assert!(clipped.ends_with('…'));
        // A key of the wrong type that is a long string: the reason is short.
        let events = vec![event(EventType::Inserted, Target::Key("x".repeat(100_000)))];
        let frame = encode(&header(), &events, None).unwrap();
        let RejectReason::Malformed(reason) = decode::<u64>(&frame, &DecodeLimits::default()).unwrap_err() else {
            panic!("not malformed")
        };
        assert!(reason.chars().count() <= MAX_REASON_CHARS + 1, "{} chars", reason.chars().count());
    }
}

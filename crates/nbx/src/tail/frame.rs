//! Decoding of the frames `nbx tail` reads, without knowing the key type:
//! MessagePack into `rmpv::Value`, with the checks of a frame's own bytes
//! (size, version, flags, signature, shape), the reasons a frame is refused,
//! and the display of decoded keys as text and as JSON.

use std::fmt::{self, Write as _};
use std::io;

use hmac::{Hmac, Mac};
use nebulex::{Command, EventType};
use rmpv::Value;
use serde_json::json;
use sha2::Sha256;

/// The wire version this tail reads.
const WIRE_VERSION: u8 = 1;
/// Flag bit of a signed frame.
const FLAG_SIGNED: u8 = 1;
/// Flag bit of a stopping stream's last frame (a heartbeat).
const FLAG_LAST: u8 = 2;
/// Length of a signed frame's tag.
const TAG_LEN: usize = 32;
/// How deep `rmpv` may recurse: deeper than any frame the nodes accept
/// (their limit, [`wire::MAX_DEPTH`](nebulex_streams::wire::MAX_DEPTH), is
/// checked first, as they count it: `rmpv` counts each value, and a map's
/// keys and values each, so its depth runs ahead of theirs).
const RMPV_DEPTH: usize = 4 * nebulex_streams::wire::MAX_DEPTH + 8;

/// Why a frame was refused; the labels are the nodes' (`RejectReason::label`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reject {
    TooLarge(usize),
    Truncated,
    Version(u8),
    Flags(u8),
    Unsigned,
    BadSignature,
    Malformed(String),
    ForeignCache(String),
    PartitionCount(String),
    WrongPartition(String),
    Replayed {
        first_seq: u64,
        next: u64,
    },
    /// A heartbeat sent no later than the origin's last frame taken: its
    /// number is still the next one, its send time tells the replay.
    Resent {
        sent_at_us: u64,
        last_us: u64,
    },
    /// A frame of an origin not followed yet, while the tail follows as many
    /// as it may, all live.
    TooManyOrigins(usize),
    OldEpoch {
        epoch: u64,
        current: u64,
    },
}

impl Reject {
    pub(super) fn label(&self) -> &'static str {
        match self {
            Reject::TooLarge(_) => "too_large",
            Reject::Truncated => "truncated",
            Reject::Version(_) => "version",
            Reject::Unsigned => "unsigned",
            Reject::BadSignature => "bad_signature",
            Reject::Flags(_) => "flags",
            Reject::Malformed(_) => "malformed",
            Reject::Replayed { .. } | Reject::Resent { .. } => "replay",
            Reject::TooManyOrigins(_) => "too_many_origins",
            Reject::OldEpoch { .. } => "old_epoch",
            Reject::ForeignCache(_) => "foreign_cache",
            Reject::PartitionCount(_) => "partition_count",
            Reject::WrongPartition(_) => "wrong_partition",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::TooLarge(limit) => write!(f, "larger than the limit of {limit} bytes"),
            Reject::Truncated => f.write_str("too short to hold a frame"),
            Reject::Version(v) => write!(f, "unsupported wire version {v}"),
            Reject::Flags(flags) => write!(f, "unknown flags {flags:#04x}"),
            Reject::Unsigned => f.write_str("not signed, and a signing key is set"),
            Reject::BadSignature => f.write_str("signature does not match"),
            Reject::Malformed(msg) => f.write_str(msg),
            Reject::ForeignCache(got) => write!(f, "frame of cache `{got}`"),
            Reject::PartitionCount(msg) | Reject::WrongPartition(msg) => f.write_str(msg),
            Reject::Replayed { first_seq, next } => {
                write!(f, "replayed frame: sequence {first_seq} already seen (expected {next})")
            }
            Reject::TooManyOrigins(limit) => write!(f, "frame of a new origin, while {limit} are followed, all live"),
            Reject::Resent { sent_at_us, last_us } => {
                write!(
                    f,
                    "replayed heartbeat: sent at {sent_at_us} µs, not after the origin's last frame ({last_us} µs)"
                )
            }
            Reject::OldEpoch { epoch, current } => {
                write!(f, "frame of epoch {epoch:016x}, older than the origin's current epoch {current:016x}")
            }
        }
    }
}

/// A frame, decoded generically.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawFrame {
    pub(super) origin: u64,
    pub(super) epoch: u64,
    pub(super) cache: String,
    pub(super) partition: u32,
    pub(super) partitions: u32,
    pub(super) first_seq: u64,
    /// When the origin sent it, µs since the Unix epoch (0: unknown); later
    /// with each frame of a partition.
    pub(super) sent_at_us: u64,
    /// The origin's stream stopped: its last frame (a heartbeat).
    pub(super) last: bool,
    pub(super) events: Vec<RawEvent>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawEvent {
    pub(super) kind: EventType,
    pub(super) command: Command,
    pub(super) version: u64,
    pub(super) timestamp_us: u64,
    pub(super) target: RawTarget,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum RawTarget {
    Key(Value),
    Keys(Vec<Value>),
    All,
}

impl RawTarget {
    pub(super) fn keys(&self) -> &[Value] {
        match self {
            RawTarget::Key(k) => std::slice::from_ref(k),
            RawTarget::Keys(ks) => ks,
            RawTarget::All => &[],
        }
    }
}

fn malformed(msg: impl Into<String>) -> Reject {
    Reject::Malformed(msg.into())
}

fn uint(v: &Value, what: &str) -> Result<u64, Reject> {
    v.as_u64().ok_or_else(|| malformed(format!("{what} is not an unsigned integer: {}", Key(v))))
}

fn uint32(v: &Value, what: &str) -> Result<u32, Reject> {
    u32::try_from(uint(v, what)?).map_err(|_| malformed(format!("{what} does not fit 32 bits")))
}

fn array<'v>(v: &'v Value, len: Option<usize>, what: &str) -> Result<&'v [Value], Reject> {
    match v {
        Value::Array(items) if len.is_none_or(|n| n == items.len()) => Ok(items),
        Value::Array(items) => {
            Err(malformed(format!("{what} has {} elements, expected {}", items.len(), len.unwrap_or_default())))
        }
        other => Err(malformed(format!("{what} is not an array: {}", Key(other)))),
    }
}

/// Decodes and checks a frame as `wire::decode` does (checks 1–7 of
/// `docs/wire-format.md` §8), without knowing the key type.
pub(super) fn decode(bytes: &[u8], signing_key: Option<&[u8]>, max_frame_bytes: usize) -> Result<RawFrame, Reject> {
    if bytes.len() > max_frame_bytes {
        return Err(Reject::TooLarge(max_frame_bytes));
    }
    let [version, flags, ..] = *bytes else { return Err(Reject::Truncated) };
    if version != WIRE_VERSION {
        return Err(Reject::Version(version));
    }
    if flags & !(FLAG_SIGNED | FLAG_LAST) != 0 {
        return Err(Reject::Flags(flags));
    }
    let signed = flags & FLAG_SIGNED != 0;
    let body_end = if signed {
        bytes.len().checked_sub(TAG_LEN).filter(|&end| end > 2).ok_or(Reject::Truncated)?
    } else {
        bytes.len()
    };
    if let Some(key) = signing_key {
        if !signed {
            return Err(Reject::Unsigned);
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| Reject::BadSignature)?;
        mac.update(&bytes[..body_end]);
        mac.verify_slice(&bytes[body_end..]).map_err(|_| Reject::BadSignature)?;
    }
    let body = &bytes[2..body_end];
    let nodes_limit = nebulex_streams::wire::MAX_DEPTH;
    if nebulex_streams::wire::nesting(body) > nodes_limit {
        return Err(malformed(format!("nested deeper than {nodes_limit} levels")));
    }
    let mut cursor = io::Cursor::new(body);
    let value = rmpv::decode::read_value_with_max_depth(&mut cursor, RMPV_DEPTH)
        .map_err(|e| malformed(format!("not MessagePack: {e}")))?;
    let read = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
    if read != body.len() {
        return Err(malformed(format!("{} trailing bytes", body.len().saturating_sub(read))));
    }
    let fields = array(&value, Some(8), "body")?;
    let cache = match &fields[2] {
        Value::String(s) => s.as_str().ok_or_else(|| malformed("cache name is not UTF-8"))?.to_string(),
        Value::Binary(b) => String::from_utf8(b.clone()).map_err(|_| malformed("cache name is not UTF-8"))?,
        other => return Err(malformed(format!("cache name is not a string: {}", Key(other)))),
    };
    let frame = RawFrame {
        origin: uint(&fields[0], "origin")?,
        epoch: uint(&fields[1], "epoch")?,
        cache,
        partition: uint32(&fields[3], "partition")?,
        partitions: uint32(&fields[4], "partitions")?,
        first_seq: uint(&fields[5], "first_seq")?,
        sent_at_us: uint(&fields[6], "sent_at_us")?,
        last: flags & FLAG_LAST != 0,
        events: array(&fields[7], None, "events")?.iter().map(decode_event).collect::<Result<_, _>>()?,
    };
    if frame.partitions > 0 && frame.partition >= frame.partitions {
        return Err(malformed(format!("partition {} of {}", frame.partition, frame.partitions)));
    }
    Ok(frame)
}

fn decode_event(v: &Value) -> Result<RawEvent, Reject> {
    let fields = array(v, Some(5), "event")?;
    let kind = uint(&fields[0], "event kind")?;
    let kind = usize::try_from(kind)
        .ok()
        .and_then(|k| EventType::ALL.get(k).copied())
        .ok_or_else(|| malformed(format!("unknown event kind {kind}")))?;
    let command = uint(&fields[1], "command")?;
    let command = usize::try_from(command)
        .ok()
        .and_then(|c| Command::ALL.get(c).copied())
        .ok_or_else(|| malformed(format!("unknown command {command}")))?;
    let target = array(&fields[4], None, "target")?;
    let tag = target.first().ok_or_else(|| malformed("empty target"))?;
    let target = match (uint(tag, "target tag")?, target.len()) {
        (0, 2) => RawTarget::Key(target[1].clone()),
        (1, 2) => RawTarget::Keys(array(&target[1], None, "target keys")?.to_vec()),
        (2, 1) => RawTarget::All,
        (tag @ 0..=2, len) => return Err(malformed(format!("target of tag {tag} has {len} elements"))),
        (tag, _) => return Err(malformed(format!("unknown target tag {tag}"))),
    };
    Ok(RawEvent {
        kind,
        command,
        version: uint(&fields[2], "version")?,
        timestamp_us: uint(&fields[3], "timestamp")?,
        target,
    })
}

/// A key, shown generically: strings quoted, arrays as tuples, maps as
/// `{k: v}`, binary as hex.
pub(super) struct Key<'a>(pub(super) &'a Value);

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Value::Nil => f.write_str("nil"),
            Value::Boolean(b) => write!(f, "{b}"),
            Value::Integer(i) => write!(f, "{i}"),
            Value::F32(x) => write!(f, "{x:?}"),
            Value::F64(x) => write!(f, "{x:?}"),
            Value::String(s) => match s.as_str() {
                Some(s) => write!(f, "{s:?}"),
                None => write!(f, "str(0x{})", hex(s.as_bytes())),
            },
            Value::Binary(b) => write!(f, "0x{}", hex(b)),
            Value::Array(items) => {
                f.write_str("(")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{}", Key(item))?;
                }
                f.write_str(")")
            }
            Value::Map(entries) => {
                f.write_str("{")?;
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{}: {}", Key(k), Key(v))?;
                }
                f.write_str("}")
            }
            Value::Ext(ty, data) => write!(f, "ext({ty}, 0x{})", hex(data)),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A key as a JSON value.
pub(super) fn key_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Nil => serde_json::Value::Null,
        Value::Boolean(b) => json!(b),
        Value::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => json!(u),
            (None, Some(s)) => json!(s),
            _ => serde_json::Value::Null,
        },
        Value::F32(x) => serde_json::Number::from_f64(f64::from(*x)).map_or(serde_json::Value::Null, Into::into),
        Value::F64(x) => serde_json::Number::from_f64(*x).map_or(serde_json::Value::Null, Into::into),
        Value::String(s) => match s.as_str() {
            Some(s) => json!(s),
            None => json!({ "bin": hex(s.as_bytes()) }),
        },
        Value::Binary(b) => json!({ "bin": hex(b) }),
        Value::Array(items) => serde_json::Value::Array(items.iter().map(key_json).collect()),
        Value::Map(entries) => {
            if entries.iter().all(|(k, _)| k.as_str().is_some()) {
                let mut map = serde_json::Map::new();
                for (k, v) in entries {
                    map.insert(k.as_str().unwrap_or_default().to_string(), key_json(v));
                }
                serde_json::Value::Object(map)
            } else {
                serde_json::Value::Array(entries.iter().map(|(k, v)| json!([key_json(k), key_json(v)])).collect())
            }
        }
        Value::Ext(ty, data) => json!({ "ext": ty, "data": hex(data) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of one event whose key is nested `levels` deep: arrays
    /// around an empty one, arrays around a number, or maps.
    fn nested_key_frame(levels: usize, shape: usize) -> Vec<u8> {
        use nebulex::{CacheEntryEvent, Command, EventMetadata, EventType, Name, NodeId, Target};
        let mut key = match shape {
            0 => json!([]),
            1 => json!([7]),
            _ => json!({"k": 7}),
        };
        for _ in 1..levels {
            key = if shape == 2 { json!({ "k": key }) } else { json!([key]) };
        }
        let header = nebulex_streams::wire::FrameHeader {
            origin: NodeId(1),
            epoch: 1,
            cache: "users".into(),
            partition: 0,
            partitions: 0,
            first_seq: 1,
            sent_at_us: 1,
            last: false,
        };
        let event = std::sync::Arc::new(CacheEntryEvent {
            cache: Name::new("users"),
            kind: EventType::Inserted,
            target: Target::Key(key),
            command: Command::Put,
            version: 1,
            metadata: EventMetadata {
                node: NodeId(1),
                partition: None,
                partitions: None,
                topic: None,
                seq: 1,
                timestamp: std::time::SystemTime::UNIX_EPOCH,
            },
        });
        nebulex_streams::wire::encode(&header, &[event], None).unwrap_or_default()
    }

    #[test]
    fn frames_are_refused_for_their_nesting_exactly_where_the_nodes_refuse_them() {
        use nebulex_streams::wire::{DecodeLimits, MAX_DEPTH as NODES};
        for shape in 0..3 {
            for levels in NODES - 8..NODES + 4 {
                let bytes = nested_key_frame(levels, shape);
                let limits = DecodeLimits::default();
                let node = nebulex_streams::wire::decode::<serde_json::Value>(&bytes, &limits).is_ok();
                let tail = decode(&bytes, None, usize::MAX).is_ok();
                assert_eq!(tail, node, "a key of shape {shape} nested {levels} levels: the nodes accept it: {node}");
            }
            assert!(decode(&nested_key_frame(NODES - 8, shape), None, usize::MAX).is_ok(), "some are accepted");
            assert!(decode(&nested_key_frame(NODES + 3, shape), None, usize::MAX).is_err(), "some are refused");
        }
    }

    #[test]
    fn generic_values_print_and_convert_to_json() {
        let v = Value::Array(vec![
            Value::Nil,
            Value::Boolean(true),
            Value::from(-3),
            Value::F64(1.5),
            Value::Binary(vec![0xde, 0xad]),
            Value::Map(vec![(Value::from("a"), Value::from(1)), (Value::from(2), Value::from("b"))]),
            Value::Ext(5, vec![1]),
        ]);
        assert_eq!(Key(&v).to_string(), r#"(nil, true, -3, 1.5, 0xdead, {"a": 1, 2: "b"}, ext(5, 0x01))"#);
        assert_eq!(
            key_json(&v),
            json!([null, true, -3, 1.5, {"bin": "dead"}, [["a", 1], [2, "b"]], {"ext": 5, "data": "01"}])
        );
        let object = Value::Map(vec![(Value::from("id"), Value::from(u64::MAX))]);
        assert_eq!(key_json(&object), json!({"id": u64::MAX}));
    }
}

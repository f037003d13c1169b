//! Properties of the wire format (`docs/wire-format.md`):
//! - any batch round-trips `encode` → `decode` exactly, for `String` and
//!   `(u32, String)` keys, any header, signed or not;
//! - `decode` of arbitrary bytes never panics (it returns a frame or a
//!   `RejectReason`);
//! - with a signing key set, any single-byte change or truncation of a signed
//!   frame is refused.

#![allow(clippy::unwrap_used, missing_docs)]

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use nebulex::{CacheEntryEvent, Command, EventMetadata, EventType, NodeId, Target};
use nebulex_streams::wire::{self, DecodeLimits, Frame, FrameHeader, RejectReason, WireEvent};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn kind() -> impl Strategy<Value = EventType> {
    select(EventType::ALL.to_vec())
}

fn command() -> impl Strategy<Value = Command> {
    select(Command::ALL.to_vec())
}

fn target<K: Clone + Debug>(key: impl Strategy<Value = K> + Clone) -> impl Strategy<Value = Target<K>> {
    prop_oneof![
        key.clone().prop_map(Target::Key),
        prop::collection::vec(key, 0..6).prop_map(Target::Keys),
        Just(Target::All),
    ]
}

fn wire_event<K: Clone + Debug>(key: impl Strategy<Value = K> + Clone) -> impl Strategy<Value = WireEvent<K>> {
    (kind(), command(), any::<u64>(), any::<u64>(), target(key)).prop_map(
        |(kind, command, version, timestamp_us, target)| WireEvent { kind, command, version, timestamp_us, target },
    )
}

/// Any header: partition and partitions independent (some are invalid).
fn any_header() -> impl Strategy<Value = FrameHeader> {
    (any::<u64>(), any::<u64>(), any::<String>(), any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
        |(origin, epoch, cache, partition, partitions, first_seq, sent_at_us)| FrameHeader {
            origin: NodeId(origin),
            epoch,
            cache,
            partition,
            partitions,
            first_seq,
            sent_at_us,
            last: false,
        },
    )
}

/// A header a stream could send: `partition < partitions`, or 0 of 0 (unpartitioned).
fn valid_header() -> impl Strategy<Value = FrameHeader> {
    (any_header(), any::<bool>()).prop_map(|(mut h, partitioned)| {
        if partitioned {
            h.partitions = h.partitions.max(1);
            h.partition %= h.partitions;
        } else {
            h.partitions = 0;
            h.partition = 0;
        }
        h
    })
}

fn signing_key() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop::option::of(prop::collection::vec(any::<u8>(), 0..80))
}

fn tuple_key() -> impl Strategy<Value = (u32, String)> + Clone {
    (any::<u32>(), any::<String>())
}

/// The event `encode` takes for a wire event (the metadata it does not send is arbitrary).
fn as_cache_event<K: Clone>(e: &WireEvent<K>) -> Arc<CacheEntryEvent<K>> {
    Arc::new(CacheEntryEvent {
        cache: "not sent".into(),
        kind: e.kind,
        target: e.target.clone(),
        command: e.command,
        version: e.version,
        metadata: EventMetadata {
            node: NodeId(1),
            partition: Some(3),
            partitions: Some(9),
            topic: None,
            seq: 12,
            timestamp: UNIX_EPOCH + Duration::from_micros(e.timestamp_us),
        },
    })
}

fn encode<K: Serialize + Clone>(header: &FrameHeader, events: &[WireEvent<K>], key: Option<&[u8]>) -> Vec<u8> {
    let events: Vec<_> = events.iter().map(as_cache_event).collect();
    wire::encode(header, &events, key).expect("encode")
}

fn limits(key: Option<&[u8]>) -> DecodeLimits<'_> {
    DecodeLimits { signing_key: key, ..Default::default() }
}

/// Encodes and decodes, checking the frame comes back exactly (or is
/// refused as malformed, for a partition out of its count).
fn check_round_trip<K>(
    header: FrameHeader,
    events: Vec<WireEvent<K>>,
    key: Option<Vec<u8>>,
) -> Result<(), TestCaseError>
where
    K: Serialize + DeserializeOwned + Clone + PartialEq + Debug,
{
    let bytes = encode(&header, &events, key.as_deref());
    prop_assert_eq!(bytes[0], wire::WIRE_VERSION);
    prop_assert_eq!(bytes[1], u8::from(key.is_some()));
    let decoded = wire::decode::<K>(&bytes, &limits(key.as_deref()));
    if header.partitions > 0 && header.partition >= header.partitions {
        prop_assert!(matches!(decoded, Err(RejectReason::Malformed(_))), "{:?}", decoded);
        return Ok(());
    }
    let expected = Ok(Frame { header, events });
    prop_assert_eq!(&decoded, &expected);
    // A reader without a key reads a signed frame too (it skips the tag).
    prop_assert_eq!(&wire::decode::<K>(&bytes, &limits(None)), &expected);
    // The size limit is inclusive.
    let exact = DecodeLimits { max_frame_bytes: bytes.len(), signing_key: key.as_deref() };
    prop_assert_eq!(&wire::decode::<K>(&bytes, &exact), &expected);
    let under = DecodeLimits { max_frame_bytes: bytes.len() - 1, signing_key: key.as_deref() };
    prop_assert_eq!(
        wire::decode::<K>(&bytes, &under).unwrap_err(),
        RejectReason::TooLarge { size: bytes.len(), limit: bytes.len() - 1 }
    );
    Ok(())
}

/// Every way `decode` can be called on `bytes`: two key types, with and without a key.
fn decode_every_way(bytes: &[u8]) {
    let key = Some(&b"k"[..]);
    let _ = wire::decode::<String>(bytes, &limits(None));
    let _ = wire::decode::<String>(bytes, &limits(key));
    let _ = wire::decode::<(u32, String)>(bytes, &limits(None));
    let _ = wire::decode::<(u32, String)>(bytes, &limits(key));
}

/// What a changed signed frame may be refused for.
fn refused_as_tampered(r: &RejectReason) -> bool {
    matches!(
        r,
        RejectReason::BadSignature
            | RejectReason::Unsigned
            | RejectReason::Version(_)
            | RejectReason::Flags(_)
            | RejectReason::Truncated { .. }
    )
}

proptest! {
    #[test]
    fn string_key_batches_round_trip(
        header in any_header(),
        events in prop::collection::vec(wire_event(any::<String>()), 0..8),
        key in signing_key(),
    ) {
        check_round_trip(header, events, key)?;
    }

    #[test]
    fn tuple_key_batches_round_trip(
        header in any_header(),
        events in prop::collection::vec(wire_event(tuple_key()), 0..8),
        key in signing_key(),
    ) {
        check_round_trip(header, events, key)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        decode_every_way(&bytes);
    }

    /// Past the header, so the MessagePack reader gets garbage to chew on.
    #[test]
    fn arbitrary_bodies_never_panic(flags in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut bytes = vec![wire::WIRE_VERSION, flags];
        bytes.extend_from_slice(&body);
        decode_every_way(&bytes);
    }

    /// Valid frames with a few bytes changed: deep in the decoder, still no panic.
    #[test]
    fn mangled_frames_never_panic(
        header in valid_header(),
        events in prop::collection::vec(wire_event(tuple_key()), 0..6),
        edits in prop::collection::vec((any::<Index>(), any::<u8>()), 1..6),
        cut in any::<Index>(),
    ) {
        let mut bytes = encode(&header, &events, None);
        for (at, value) in edits {
            let at = at.index(bytes.len());
            bytes[at] = value;
        }
        decode_every_way(&bytes);
        let cut = cut.index(bytes.len() + 1);
        decode_every_way(&bytes[..cut]);
    }

    #[test]
    fn any_single_byte_change_of_a_signed_frame_is_refused(
        header in valid_header(),
        events in prop::collection::vec(wire_event(any::<String>()), 0..6),
        key in prop::collection::vec(any::<u8>(), 1..64),
        at in any::<Index>(),
        flip in 1u8..=255,
    ) {
        let bytes = encode(&header, &events, Some(&key));
        let with_key = limits(Some(&key));
        prop_assert!(wire::decode::<String>(&bytes, &with_key).is_ok());
        let mut forged = bytes.clone();
        let at = at.index(forged.len());
        forged[at] ^= flip;
        match wire::decode::<String>(&forged, &with_key) {
            Ok(frame) => prop_assert!(false, "byte {} ^ {:#04x} accepted: {:?}", at, flip, frame),
            Err(r) => prop_assert!(refused_as_tampered(&r), "byte {}: {:?}", at, r),
        }
    }

    #[test]
    fn any_truncation_or_extension_of_a_signed_frame_is_refused(
        header in valid_header(),
        events in prop::collection::vec(wire_event(tuple_key()), 0..6),
        key in prop::collection::vec(any::<u8>(), 1..64),
        cut in any::<Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..40),
    ) {
        let bytes = encode(&header, &events, Some(&key));
        let with_key = limits(Some(&key));
        let cut = cut.index(bytes.len());
        let r = wire::decode::<(u32, String)>(&bytes[..cut], &with_key);
        prop_assert!(r.as_ref().is_err_and(refused_as_tampered), "cut at {}: {:?}", cut, r);
        let mut longer = bytes.clone();
        longer.extend_from_slice(&extra);
        let r = wire::decode::<(u32, String)>(&longer, &with_key);
        prop_assert!(r.as_ref().is_err_and(refused_as_tampered), "{} bytes appended: {:?}", extra.len(), r);
    }
}

/// Exhaustively: every byte of one signed frame, every change of it.
#[test]
fn every_change_of_every_byte_of_a_signed_frame_is_refused() {
    let header = FrameHeader {
        origin: NodeId(7),
        epoch: 0x1122_3344_5566_7788,
        cache: "users".into(),
        partition: 1,
        partitions: 4,
        first_seq: 100,
        sent_at_us: 1_700_000_000_123_456,
        last: false,
    };
    let events = vec![
        WireEvent {
            kind: EventType::Inserted,
            command: Command::Put,
            version: 1,
            timestamp_us: 1_700_000_000_000_000,
            target: Target::Key("user:1".to_string()),
        },
        WireEvent {
            kind: EventType::Deleted,
            command: Command::DeleteAll,
            version: 2,
            timestamp_us: 1_700_000_000_000_001,
            target: Target::Keys(vec!["a".to_string(), "b".to_string()]),
        },
    ];
    let key = b"secret";
    let bytes = encode(&header, &events, Some(key));
    let with_key = limits(Some(key));
    assert!(wire::decode::<String>(&bytes, &with_key).is_ok());
    for at in 0..bytes.len() {
        for flip in 1..=255u8 {
            let mut forged = bytes.clone();
            forged[at] ^= flip;
            let r = wire::decode::<String>(&forged, &with_key);
            assert!(r.as_ref().is_err_and(refused_as_tampered), "byte {at} ^ {flip:#04x}: {r:?}");
        }
    }
    for cut in 0..bytes.len() {
        let r = wire::decode::<String>(&bytes[..cut], &with_key);
        assert!(r.as_ref().is_err_and(refused_as_tampered), "cut at {cut}: {r:?}");
    }
    // Which reason, where: the version byte, the flag bit, the rest.
    let reason = |at: usize, flip: u8| {
        let mut forged = bytes.clone();
        forged[at] ^= flip;
        wire::decode::<String>(&forged, &with_key).unwrap_err()
    };
    assert_eq!(reason(0, 0x01), RejectReason::Version(0));
    assert_eq!(reason(1, 0x01), RejectReason::Unsigned);
    // The LAST flag is covered by the tag: setting it forges the frame.
    assert_eq!(reason(1, 0x02), RejectReason::BadSignature);
    assert_eq!(reason(1, 0x04), RejectReason::Flags(0x05));
    assert_eq!(reason(10, 0x80), RejectReason::BadSignature);
    assert_eq!(reason(bytes.len() - 1, 0x01), RejectReason::BadSignature);
}

/// A frame of cache "users", unpartitioned, from origin 1: `count` events,
/// their MessagePack as given.
fn raw_frame(count: u8, events: &[u8]) -> Vec<u8> {
    let mut frame = vec![1, 0, 0x98, 1, 1, 0xa5, b'u', b's', b'e', b'r', b's', 0, 0, 1, 0, 0x90 | count];
    frame.extend_from_slice(events);
    frame
}

/// One `Inserted` event by `Put` of a key whose MessagePack is `key`: the
/// key nests four levels down (body, events, event, target).
fn key_event(key: &[u8]) -> Vec<u8> {
    [&[0x95, 0, 0, 1, 0, 0x92, 0][..], key].concat()
}

/// A key type whose values nest as deep as they are built: as maps.
#[derive(Debug, serde::Deserialize)]
enum Tree {
    Leaf(#[allow(dead_code)] u32),
    Node(#[allow(dead_code)] Box<Tree>),
}

/// A `Tree` of `nodes` nodes above its leaf: `nodes + 1` levels of maps.
fn tree(nodes: usize) -> Vec<u8> {
    [b"\x81\xa4Node".repeat(nodes), b"\x81\xa4Leaf\x00".to_vec()].concat()
}

/// The same, as arrays.
#[derive(Debug, serde::Deserialize)]
struct Nest(#[allow(dead_code)] Vec<Nest>);

/// A `Nest` of `levels` arrays, the innermost empty.
fn nest(levels: usize) -> Vec<u8> {
    [vec![0x91; levels - 1], vec![0x90]].concat()
}

/// A frame nests at most `MAX_DEPTH` levels, whatever its keys nest by (an
/// enum's variant is a map too): deeper, it is refused, and never exhausts
/// the stack, however deep.
#[test]
fn frames_nested_deeper_than_the_limit_are_refused_whatever_nests() {
    use nebulex_streams::wire::MAX_DEPTH;
    let limits = DecodeLimits::default();
    let key_levels = MAX_DEPTH - 4;
    assert!(wire::decode::<Tree>(&raw_frame(1, &key_event(&tree(key_levels - 1))), &limits).is_ok());
    assert!(wire::decode::<Nest>(&raw_frame(1, &key_event(&nest(key_levels))), &limits).is_ok());
    let too_deep = format!("nested deeper than {MAX_DEPTH} levels");
    for frame in [
        raw_frame(1, &key_event(&tree(key_levels))),
        raw_frame(1, &key_event(&nest(key_levels + 1))),
        raw_frame(1, &key_event(&tree(150_000))),
    ] {
        let refused = wire::decode::<Tree>(&frame, &limits).map(|_| ());
        assert_eq!(refused, Err(RejectReason::Malformed(too_deep.clone())), "{} bytes", frame.len());
    }
}

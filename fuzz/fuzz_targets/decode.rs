//! Feeds arbitrary bytes to `nebulex_streams::wire::decode`, for `String` and
//! `(u32, String)` keys, with and without a signing key and with a small size
//! limit. Decoding must never panic (nor allocate without bound); whatever it
//! accepts must satisfy the format's rules and survive a re-encode.
//!
//! Run from the repository root: `cargo +nightly fuzz run decode`.
#![no_main]

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use nebulex::{CacheEntryEvent, EventMetadata};
use nebulex_streams::wire::{self, DecodeLimits, Frame};
use serde::de::DeserializeOwned;
use serde::Serialize;

const KEY: &[u8] = b"fuzz signing key";

fn check<K>(data: &[u8], limits: &DecodeLimits<'_>)
where
    K: Serialize + DeserializeOwned + Clone + PartialEq + Debug,
{
    let Ok(frame) = wire::decode::<K>(data, limits) else { return };
    let h = &frame.header;
    assert!(h.partitions == 0 || h.partition < h.partitions, "accepted partition {} of {}", h.partition, h.partitions);
    assert_eq!(data[0], wire::WIRE_VERSION);
    if limits.signing_key.is_some() {
        assert!(data[1] & wire::FLAG_SIGNED != 0, "accepted an unsigned frame with a key set");
    }
    // What was accepted encodes again, and that decodes to the same frame
    // (the bytes may differ: a foreign writer may use longer encodings).
    let header = frame.header.clone();
    let events: Vec<Arc<CacheEntryEvent<K>>> = frame
        .events
        .iter()
        .map(|e| {
            Arc::new(CacheEntryEvent {
                // Not sent (the header names the cache); a fixed name, as it may be interned.
                cache: "fuzz".into(),
                kind: e.kind,
                target: e.target.clone(),
                command: e.command,
                version: e.version,
                metadata: EventMetadata {
                    node: header.origin,
                    partition: None,
                    partitions: None,
                    topic: None,
                    seq: 0,
                    timestamp: UNIX_EPOCH + Duration::from_micros(e.timestamp_us),
                },
            })
        })
        .collect();
    let again = wire::encode(&header, &events, limits.signing_key).expect("re-encode an accepted frame");
    let unlimited = DecodeLimits { max_frame_bytes: usize::MAX, signing_key: limits.signing_key };
    let back: Frame<K> = wire::decode(&again, &unlimited).expect("decode a re-encoded frame");
    assert_eq!(back, frame);
}

fuzz_target!(|data: &[u8]| {
    let plain = DecodeLimits::default();
    let keyed = DecodeLimits { signing_key: Some(KEY), ..Default::default() };
    let small = DecodeLimits { max_frame_bytes: 64, ..Default::default() };
    for limits in [&plain, &keyed, &small] {
        check::<String>(data, limits);
        check::<(u32, String)>(data, limits);
    }
});

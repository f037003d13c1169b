//! Cross-language check of the wire format (`docs/wire-format.md`): frames
//! made by `nebulex_streams::wire::encode` are decoded by an independent
//! Python reader (`tests/python/decode_frame.py`, using the `msgpack` package
//! and Python's own `hmac`), and a frame made by that Python script is decoded
//! here. Needs `python3` with `msgpack` (`python3 -m pip install msgpack`):
//! without them this test fails, it never passes silently.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use nebulex::{CacheEntryEvent, Command, EventMetadata, EventType, NodeId, Target};
use nebulex_streams::wire::{self, DecodeLimits, FrameHeader, RejectReason};
use serde::Serialize;

/// The key the signed fixtures use (the Python script uses the same).
const SIGNING_KEY: &[u8] = b"secret";

/// An event as `encode` takes it (anything `AsRef<CacheEntryEvent<K>>`: an `Arc`).
fn event<K>(
    kind: EventType,
    command: Command,
    version: u64,
    timestamp_us: u64,
    target: Target<K>,
) -> Arc<CacheEntryEvent<K>> {
    Arc::new(CacheEntryEvent {
        cache: "ignored: the header names the cache".into(),
        kind,
        target,
        command,
        version,
        metadata: EventMetadata {
            node: NodeId(0),
            partition: None,
            partitions: None,
            topic: None,
            seq: 0,
            timestamp: UNIX_EPOCH + Duration::from_micros(timestamp_us),
        },
    })
}

fn header(
    origin: u64,
    epoch: u64,
    cache: &str,
    partition: u32,
    partitions: u32,
    first_seq: u64,
    sent_at_us: u64,
) -> FrameHeader {
    FrameHeader {
        origin: NodeId(origin),
        epoch,
        cache: cache.into(),
        partition,
        partitions,
        first_seq,
        sent_at_us,
        last: false,
    }
}

/// The header of the worked example of `docs/wire-format.md`.
fn example_header() -> FrameHeader {
    header(7, 0x1122_3344_5566_7788, "users", 1, 4, 100, 1_700_000_000_123_456)
}

/// The frame of the worked example of `docs/wire-format.md`.
fn example_frame(signing_key: Option<&[u8]>) -> Vec<u8> {
    let events =
        [event(EventType::Inserted, Command::Put, 1, 1_700_000_000_000_000, Target::Key("user:1".to_string()))];
    wire::encode(&example_header(), &events, signing_key).expect("encode")
}

/// A struct key: serde (rmp-serde's default) writes it as an array of its fields.
#[derive(Serialize)]
struct UserKey {
    tenant: u32,
    id: String,
}

/// Every fixture, by file name. `decode_frame.py` knows what each must hold.
fn fixtures() -> Vec<(&'static str, Vec<u8>)> {
    const TS: u64 = 1_700_000_000_000_000;
    let s = |k: &str| k.to_string();
    vec![
        ("01-key.frame", example_frame(None)),
        (
            "02-keys.frame",
            wire::encode(
                &header(0xfeed, 1, "sessions", 0, 0, 1, 2),
                &[
                    event(
                        EventType::Inserted,
                        Command::PutAll,
                        1,
                        TS + 1,
                        Target::Keys(vec![s("a"), s("b"), s("ключ")]),
                    ),
                    event(EventType::Evicted, Command::Evict, 9, TS + 2, Target::Keys(vec![s("x")])),
                ],
                None,
            )
            .expect("encode"),
        ),
        (
            "03-all.frame",
            wire::encode::<String>(
                &header(3, 0, "users", 3, 4, 1 << 40, 0),
                &[event(EventType::Deleted, Command::DeleteAll, 0, TS + 3, Target::All)],
                None,
            )
            .expect("encode"),
        ),
        (
            "04-signed.frame",
            wire::encode(
                &header(u64::MAX, u64::MAX - 1, "users", 2, 4, 500, TS + 10),
                &[
                    event(EventType::Updated, Command::Incr, (1 << 32) + 5, TS + 4, Target::Key(s("counter:1"))),
                    event(EventType::Expired, Command::Sweep, 4, TS + 5, Target::Key(s("s"))),
                ],
                Some(SIGNING_KEY),
            )
            .expect("encode"),
        ),
        (
            "05-tuple.frame",
            wire::encode(
                &header(9, 10, "orders", 0, 1, 7, 11),
                &[
                    event(EventType::Inserted, Command::Load, 1, TS + 6, Target::Key((42u32, s("alice")))),
                    event(
                        EventType::Deleted,
                        Command::Delete,
                        2,
                        TS + 7,
                        Target::Keys(vec![(1, s("a")), (u32::MAX, s("z"))]),
                    ),
                ],
                None,
            )
            .expect("encode"),
        ),
        (
            "06-struct.frame",
            wire::encode(
                &header(9, 10, "profiles", 0, 0, 1, 12),
                &[event(
                    EventType::Updated,
                    Command::Replace,
                    3,
                    TS + 8,
                    Target::Key(UserKey { tenant: 7, id: s("bob") }),
                )],
                None,
            )
            .expect("encode"),
        ),
        ("07-last.frame", {
            let last = FrameHeader { last: true, ..header(9, 10, "users", 1, 4, 42, 13) };
            let none: &[Arc<CacheEntryEvent<String>>] = &[];
            wire::encode(&last, none, None).expect("encode")
        }),
    ]
}

/// The default router's hash of some keys, for `decode_frame.py` to recompute
/// (docs/wire-format.md §5): one line per key, `kind key-as-hex... hash`.
fn stable_hashes() -> String {
    use nebulex_streams::stable_hash;
    let hex = |s: &str| if s.is_empty() { "-".to_string() } else { s.bytes().map(|b| format!("{b:02x}")).collect() };
    let mut out = String::new();
    // Strings of every length around the 8-byte chunks, and non-ASCII.
    let strings =
        ["", "a", "user:1", "user:12", "user:123", "user:1234", "0123456789abcdef", "0123456789abcdefg", "ключ"];
    for s in strings {
        out += &format!("str {} {}\n", hex(s), stable_hash(s));
    }
    for n in [0u64, 1, 255, 1 << 40, u64::MAX] {
        out += &format!("u64 {n} {}\n", stable_hash(&n));
    }
    for n in [0i32, -1, i32::MIN] {
        out += &format!("i32 {n} {}\n", stable_hash(&n));
    }
    for (n, s) in [(42u32, "alice"), (u32::MAX, "")] {
        out += &format!("u32_str {n} {} {}\n", hex(s), stable_hash(&(n, s.to_string())));
    }
    // And the partition the default router picks, with 4 partitions.
    for s in ["user:1", "user:2", "user:3", "k0", "k1"] {
        out += &format!("partition4 {} {}\n", hex(s), nebulex_streams::partition_of(s, 4));
    }
    out
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/decode_frame.py")
}

/// Fails, with how to fix it, unless `python3` can import `msgpack`.
fn require_python_msgpack() {
    const HOW: &str = "install it with `python3 -m pip install msgpack` (or `pip install msgpack`; \
                       Debian: `apt-get install -y python3-msgpack`); `scripts/test` does this for you";
    match Process::new("python3").args(["-c", "import msgpack"]).output() {
        Err(e) => panic!(
            "this test needs `python3` on PATH to run the cross-language wire check ({e}): \
             install Python 3, then the msgpack module: {HOW}"
        ),
        Ok(out) if !out.status.success() => panic!(
            "this test needs the Python `msgpack` module, which `python3` cannot import: {HOW}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("nebulex-wire-python-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn python_decodes_rust_frames_and_rust_decodes_python_frames() {
    require_python_msgpack();
    let dir = TempDir::new();
    for (name, bytes) in fixtures() {
        std::fs::write(dir.0.join(name), bytes).expect("write fixture");
    }
    std::fs::write(dir.0.join("hashes.txt"), stable_hashes()).expect("write hashes");
    let out = Process::new("python3").arg(script()).arg(&dir.0).output().expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "decode_frame.py failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("ok hashes.txt"), "the stable hashes were not checked:\n{stdout}");
    // Every fixture was checked, none skipped.
    for (name, _) in fixtures() {
        assert!(stdout.contains(&format!("ok {name}")), "{name} was not checked:\n{stdout}");
    }

    // The frame the Python script made, signed, decodes here.
    let bytes = std::fs::read(dir.0.join("py-signed.frame")).expect("decode_frame.py writes py-signed.frame");
    let keyed = DecodeLimits { signing_key: Some(SIGNING_KEY), ..Default::default() };
    let frame = wire::decode::<String>(&bytes, &keyed).expect("Rust decodes the Python frame");
    assert_eq!(frame.header, header(12_345, 0xdead_beef_0000_0001, "users", 3, 4, 41, 1_700_000_000_999_999));
    let got: Vec<_> =
        frame.events.iter().map(|e| (e.kind, e.command, e.version, e.timestamp_us, e.target.clone())).collect();
    assert_eq!(
        got,
        [
            (EventType::Inserted, Command::PutNew, 1, 1_700_000_000_000_001, Target::Key("py:1".to_string())),
            (
                EventType::Deleted,
                Command::DeleteAll,
                6,
                1_700_000_000_000_002,
                Target::Keys(vec!["py:2".into(), "py:3".into()])
            ),
            (EventType::Deleted, Command::DeleteAll, 7, 1_700_000_000_000_003, Target::All),
        ]
    );
    let wrong = DecodeLimits { signing_key: Some(b"not the key"), ..Default::default() };
    assert_eq!(wire::decode::<String>(&bytes, &wrong).unwrap_err(), RejectReason::BadSignature);
}

/// The worked example of `docs/wire-format.md` is what the encoder writes.
#[test]
fn the_documented_example_is_what_the_encoder_writes() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/wire-format.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/wire-format.md");
    for (marker, key) in [("example-frame", None), ("example-frame-signed", Some(SIGNING_KEY))] {
        let documented = hex_block(&doc, marker);
        let encoded: String = example_frame(key).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(documented, encoded, "the hex of `{marker}` in docs/wire-format.md is not what the encoder writes");
    }
}

/// The hex digits of the fenced block following `<!-- {marker} -->`.
fn hex_block(doc: &str, marker: &str) -> String {
    let tag = format!("<!-- {marker} -->");
    let start = doc.find(&tag).unwrap_or_else(|| panic!("{tag} is missing from docs/wire-format.md")) + tag.len();
    let rest = &doc[start..];
    let open = rest.find("```").expect("a fenced block after the marker");
    let body = &rest[open + 3..];
    let body = &body[body.find('\n').expect("fence line") + 1..];
    let close = body.find("```").expect("the block's closing fence");
    body[..close]
        .lines()
        // Lines are `offset: hex ... | comment`: keep the hex.
        .map(|line| {
            let line = line.split('|').next().unwrap_or("");
            line.split_once(':').map_or(line, |(_, hex)| hex)
        })
        .flat_map(|hex| hex.chars().filter(|c| !c.is_whitespace()))
        .collect()
}

/// Prints the worked example's bytes, to regenerate `docs/wire-format.md`:
/// `cargo test -p nebulex-streams --test wire_python -- --ignored --nocapture`.
#[test]
#[ignore = "a tool: prints the documented example frames"]
fn print_the_documented_example() {
    for (marker, key) in [("example-frame", None), ("example-frame-signed", Some(SIGNING_KEY))] {
        let bytes = example_frame(key);
        println!("<!-- {marker} --> ({} bytes)", bytes.len());
        for (i, chunk) in bytes.chunks(16).enumerate() {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            println!("{:04x}: {}", i * 16, hex.join(" "));
        }
    }
}

#!/usr/bin/env python3
"""An independent reader (and writer) of nebulex-streams frames, version 1.

Written from docs/wire-format.md only, with the `msgpack` package and the
standard library's `hmac`: it proves that another language can read and make
the frames the Rust encoder makes.

    python3 decode_frame.py DIR

DIR holds the fixtures the Rust test `tests/wire_python.rs` wrote (`NN-*.frame`).
Every fixture is decoded and each of its fields checked, with its exact
MessagePack type; the signed one's HMAC-SHA256 tag is verified. Then the
script writes `DIR/py-signed.frame`, a signed frame of its own, which the Rust
test decodes. Prints `ok NAME` per fixture; exits non-zero on any mismatch.

Needs `pip install msgpack` (`python3 -m pip install msgpack`).
"""

import hashlib
import hmac
import os
import sys

try:
    import msgpack
except ImportError:  # pragma: no cover - the Rust test checks this first
    sys.exit("decode_frame.py needs the msgpack module: python3 -m pip install msgpack")

WIRE_VERSION = 1
FLAG_SIGNED = 0x01
FLAG_LAST = 0x02
TAG_LEN = 32
SIGNING_KEY = b"secret"  # the key tests/wire_python.rs signs with

# Event kind codes (EventType in declaration order).
KINDS = ["inserted", "updated", "deleted", "expired", "evicted"]
# Command codes: the order of nebulex::Command::ALL.
COMMANDS = [
    "put", "put_new", "replace", "put_all", "put_new_all", "delete", "take",
    "delete_all", "update", "incr", "decr", "expire", "touch", "get", "sweep",
    "evict", "load",
]
TARGET_KEY, TARGET_KEYS, TARGET_ALL = 0, 1, 2
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

TS = 1_700_000_000_000_000


class Reject(Exception):
    """A frame this reader refuses (the Rust RejectReason label is the first arg)."""


def split_frame(frame, signing_key=None):
    """Checks the envelope; returns (flags, body bytes, tag or None)."""
    if len(frame) < 2:
        raise Reject("truncated", len(frame))
    version, flags = frame[0], frame[1]
    if version != WIRE_VERSION:
        raise Reject("version", version)
    if flags & ~(FLAG_SIGNED | FLAG_LAST):
        raise Reject("flags", flags)
    signed = bool(flags & FLAG_SIGNED)
    if signed:
        if len(frame) - TAG_LEN <= 2:
            raise Reject("truncated", len(frame))
        body, tag = frame[2:-TAG_LEN], frame[-TAG_LEN:]
    else:
        body, tag = frame[2:], None
    if signing_key is not None:
        if not signed:
            raise Reject("unsigned")
        # The tag covers version | flags | body: everything before it.
        expected = hmac.new(signing_key, frame[:-TAG_LEN], hashlib.sha256).digest()
        if not hmac.compare_digest(expected, tag):
            raise Reject("bad_signature")
    return flags, body, tag


def is_uint(v, bits):
    return type(v) is int and 0 <= v <= 2**bits - 1


def decode(frame, signing_key=None):
    """Decodes a frame to a dict, checking every type the spec gives."""
    flags, body, tag = split_frame(frame, signing_key)
    try:
        # One MessagePack object, nothing after it (ExtraData otherwise);
        # raw=False: str is text, bin stays bytes.
        obj = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 - any failure is a malformed body
        raise Reject("malformed", repr(e))
    if not (isinstance(obj, list) and len(obj) == 8):
        raise Reject("malformed", "body is not an array of 8")
    origin, epoch, cache, partition, partitions, first_seq, sent_at_us, events = obj
    for name, value, bits in [("origin", origin, 64), ("epoch", epoch, 64), ("partition", partition, 32),
                              ("partitions", partitions, 32), ("first_seq", first_seq, 64),
                              ("sent_at_us", sent_at_us, 64)]:
        if not is_uint(value, bits):
            raise Reject("malformed", f"{name} is not a u{bits}: {value!r}")
    if type(cache) is not str:
        raise Reject("malformed", "cache is not a str")
    if partitions > 0 and partition >= partitions:
        raise Reject("malformed", f"partition {partition} of {partitions}")
    if not isinstance(events, list):
        raise Reject("malformed", "events is not an array")
    out = []
    for e in events:
        if not (isinstance(e, list) and len(e) == 5):
            raise Reject("malformed", f"event is not an array of 5: {e!r}")
        kind, command, version, timestamp_us, target = e
        if not (is_uint(kind, 8) and kind < len(KINDS)):
            raise Reject("malformed", f"unknown event kind {kind!r}")
        if not (is_uint(command, 8) and command < len(COMMANDS)):
            raise Reject("malformed", f"unknown command {command!r}")
        if not (is_uint(version, 64) and is_uint(timestamp_us, 64)):
            raise Reject("malformed", "version / timestamp_us not u64")
        if not (isinstance(target, list) and target and is_uint(target[0], 8)):
            raise Reject("malformed", f"bad target {target!r}")
        if target[0] == TARGET_KEY and len(target) == 2:
            tgt = ("key", target[1])
        elif target[0] == TARGET_KEYS and len(target) == 2 and isinstance(target[1], list):
            tgt = ("keys", target[1])
        elif target[0] == TARGET_ALL and len(target) == 1:
            tgt = ("all",)
        else:
            raise Reject("malformed", f"bad target {target!r}")
        out.append({
            "kind": KINDS[kind], "command": COMMANDS[command], "version": version,
            "timestamp_us": timestamp_us, "target": tgt,
        })
    return {
        "signed": bool(flags & FLAG_SIGNED), "flags": flags, "tag": tag, "body": body,
        "origin": origin, "epoch": epoch, "cache": cache, "partition": partition,
        "partitions": partitions, "first_seq": first_seq, "sent_at_us": sent_at_us,
        "last": bool(flags & FLAG_LAST), "events": out,
    }


def encode(header, events, signing_key=None):
    """Makes a frame: the inverse of decode, as another language would."""
    body = msgpack.packb([
        header["origin"], header["epoch"], header["cache"], header["partition"],
        header["partitions"], header["first_seq"], header["sent_at_us"],
        [[KINDS.index(e["kind"]), COMMANDS.index(e["command"]), e["version"], e["timestamp_us"],
          [TARGET_KEY, e["target"][1]] if e["target"][0] == "key"
          else [TARGET_KEYS, list(e["target"][1])] if e["target"][0] == "keys"
          else [TARGET_ALL]]
         for e in events],
    ], use_bin_type=True)
    flags = (FLAG_SIGNED if signing_key is not None else 0) | (FLAG_LAST if header.get("last") else 0)
    head = bytes([WIRE_VERSION, flags])
    frame = head + body
    if signing_key is not None:
        frame += hmac.new(signing_key, frame, hashlib.sha256).digest()
    return frame


def ev(kind, command, version, timestamp_us, target):
    return {"kind": kind, "command": command, "version": version, "timestamp_us": timestamp_us, "target": target}


def hdr(origin, epoch, cache, partition, partitions, first_seq, sent_at_us, last=False):
    return {"origin": origin, "epoch": epoch, "cache": cache, "partition": partition,
            "partitions": partitions, "first_seq": first_seq, "sent_at_us": sent_at_us, "last": last}


# What each fixture of tests/wire_python.rs holds: (header, events, signed).
EXPECTED = {
    "01-key.frame": (
        hdr(7, 0x1122334455667788, "users", 1, 4, 100, 1_700_000_000_123_456),
        [ev("inserted", "put", 1, TS, ("key", "user:1"))],
        False,
    ),
    "02-keys.frame": (
        hdr(0xFEED, 1, "sessions", 0, 0, 1, 2),
        [ev("inserted", "put_all", 1, TS + 1, ("keys", ["a", "b", "ключ"])),
         ev("evicted", "evict", 9, TS + 2, ("keys", ["x"]))],
        False,
    ),
    "03-all.frame": (
        hdr(3, 0, "users", 3, 4, 1 << 40, 0),
        [ev("deleted", "delete_all", 0, TS + 3, ("all",))],
        False,
    ),
    "04-signed.frame": (
        hdr(U64_MAX, U64_MAX - 1, "users", 2, 4, 500, TS + 10),
        [ev("updated", "incr", (1 << 32) + 5, TS + 4, ("key", "counter:1")),
         ev("expired", "sweep", 4, TS + 5, ("key", "s"))],
        True,
    ),
    # (u32, String) keys are arrays [int, str].
    "05-tuple.frame": (
        hdr(9, 10, "orders", 0, 1, 7, 11),
        [ev("inserted", "load", 1, TS + 6, ("key", [42, "alice"])),
         ev("deleted", "delete", 2, TS + 7, ("keys", [[1, "a"], [U32_MAX, "z"]]))],
        False,
    ),
    # A struct key { tenant: u32, id: String } is the array of its fields.
    "06-struct.frame": (
        hdr(9, 10, "profiles", 0, 0, 1, 12),
        [ev("updated", "replace", 3, TS + 8, ("key", [7, "bob"]))],
        False,
    ),
    # The last heartbeat of a stopping stream: no events, flag LAST.
    "07-last.frame": (
        hdr(9, 10, "users", 1, 4, 42, 13, last=True),
        [],
        False,
    ),
}


# The default router's hash (src/router.rs StableHasher), docs/wire-format.md §5.
M64 = 2**64 - 1


def _mix(state, word):
    x = ((state ^ word) * 0x9E3779B97F4A7C15) & M64
    return ((x << 31) | (x >> 33)) & M64


def _finish(h):
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & M64
    return h ^ (h >> 33)


def _hash_str(state, s):
    data = s.encode("utf-8")
    full = len(data) - len(data) % 8
    for i in range(0, full, 8):
        state = _mix(state, int.from_bytes(data[i:i + 8], "little"))
    rest = data[full:]
    if rest:
        state = _mix(state, int.from_bytes(rest.ljust(8, b"\0"), "little") ^ (len(rest) << 59))
    return _mix(state, 0xFF)  # Rust's str hash ends with write_u8(0xff)


def stable_hash(*fields):
    """stable_hash of a key: a str, an int (given as its unsigned word), or a tuple of those."""
    state = 0x243F6A8885A308D3
    for f in fields:
        state = _hash_str(state, f) if isinstance(f, str) else _mix(state, f)
    return _finish(state)


def check_hashes(path):
    def text(h):
        return "" if h == "-" else bytes.fromhex(h).decode("utf-8")
    n = 0
    with open(path) as f:
        for line in f:
            kind, *args = line.split()
            if kind == "str":
                got, want = stable_hash(text(args[0])), int(args[1])
            elif kind == "u64":
                got, want = stable_hash(int(args[0])), int(args[1])
            elif kind == "i32":
                got, want = stable_hash(int(args[0]) & 0xFFFFFFFF), int(args[1])
            elif kind == "u32_str":
                got, want = stable_hash(int(args[0]), text(args[1])), int(args[2])
            elif kind == "partition4":
                got, want = stable_hash(text(args[0])) % 4, int(args[1])
            else:
                raise AssertionError(f"unknown line {line!r}")
            check(got == want, f"stable hash {line.strip()!r}: Python says {got}")
            n += 1
    check(n > 0, "no hashes checked")
    return n


def same(a, b):
    """Equal, with the same Python types all the way down (str is not bytes, int is not bool)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def must_reject(frame, label, key=None):
    try:
        decode(frame, key)
    except Reject as r:
        check(r.args[0] == label, f"expected reject {label}, got {r.args}")
        return
    raise AssertionError(f"expected reject {label}, but it decoded")


def check_fixture(name, frame):
    header, events, signed = EXPECTED[name]
    key = SIGNING_KEY if signed else None
    got = decode(frame, key)
    check(frame[0] == WIRE_VERSION, f"{name}: version byte {frame[0]}")
    want_flags = (FLAG_SIGNED if signed else 0) | (FLAG_LAST if header["last"] else 0)
    check(got["flags"] == want_flags, f"{name}: flags {got['flags']:#04x}")
    for field, want in header.items():
        check(same(got[field], want), f"{name}: {field} = {got[field]!r}, expected {want!r}")
    check(len(got["events"]) == len(events), f"{name}: {len(got['events'])} events, expected {len(events)}")
    for i, (g, w) in enumerate(zip(got["events"], events)):
        check(same(g, w), f"{name}: event {i} = {g!r}, expected {w!r}")
    # The encoder writes the most compact MessagePack encoding of every value,
    # as msgpack-python does: re-encoding the decoded body gives the same bytes.
    check(msgpack.packb(msgpack.unpackb(got["body"], raw=False), use_bin_type=True) == got["body"],
          f"{name}: the body is not in the compact encoding")
    # And a frame made here from the expected values is byte-identical
    # (up to the tag, which depends only on the bytes before it).
    check(encode(header, events, key) == frame, f"{name}: re-encoding in Python gives other bytes")
    if signed:
        tag = hmac.new(SIGNING_KEY, frame[:-TAG_LEN], hashlib.sha256).digest()
        check(hmac.compare_digest(tag, frame[-TAG_LEN:]), f"{name}: HMAC tag mismatch")
        must_reject(frame, "bad_signature", b"other key")
        for i in (0 + 2, len(frame) // 2, len(frame) - 1):
            forged = bytearray(frame)
            forged[i] ^= 0x01
            must_reject(bytes(forged), "bad_signature", SIGNING_KEY)
        # A reader without a key skips the tag.
        check(same(decode(frame)["events"], events), f"{name}: unkeyed decode of a signed frame")
    else:
        must_reject(frame, "unsigned", SIGNING_KEY)
    bumped = bytes([2]) + frame[1:]
    must_reject(bumped, "version")
    must_reject(frame[:1], "truncated")
    if not signed:
        must_reject(frame + b"\x00", "malformed")   # trailing bytes
        must_reject(frame[:-1], "malformed")         # cut short


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DIR")
    d = sys.argv[1]
    hashes = os.path.join(d, "hashes.txt")
    if os.path.exists(hashes):
        print(f"ok hashes.txt ({check_hashes(hashes)} keys)")
    names = sorted(n for n in os.listdir(d) if n.endswith(".frame") and not n.startswith("py-"))
    check(names == sorted(EXPECTED), f"fixtures {names}, expected {sorted(EXPECTED)}")
    for name in names:
        with open(os.path.join(d, name), "rb") as f:
            frame = f.read()
        check_fixture(name, frame)
        print(f"ok {name} ({len(frame)} bytes)")

    # A frame of our own, for the Rust side to decode (tests/wire_python.rs).
    mine = encode(
        hdr(12_345, 0xDEADBEEF00000001, "users", 3, 4, 41, 1_700_000_000_999_999),
        [ev("inserted", "put_new", 1, TS + 1, ("key", "py:1")),
         ev("deleted", "delete_all", 6, TS + 2, ("keys", ["py:2", "py:3"])),
         ev("deleted", "delete_all", 7, TS + 3, ("all",))],
        SIGNING_KEY,
    )
    check(decode(mine, SIGNING_KEY)["first_seq"] == 41, "own frame round trip")
    with open(os.path.join(d, "py-signed.frame"), "wb") as f:
        f.write(mine)
    print(f"wrote py-signed.frame ({len(mine)} bytes)")


if __name__ == "__main__":
    try:
        main()
    except (AssertionError, Reject) as e:
        print(f"FAIL: {e!r}", file=sys.stderr)
        sys.exit(1)

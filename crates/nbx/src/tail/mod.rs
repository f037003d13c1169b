//! `nbx tail`: a live view of a cluster's cache entry events.
//!
//! The tail joins the cluster's channels directly, with its own Redis or NATS
//! connection: it is no node (no `Cache`, no `Streams`), it never publishes,
//! and the nodes do not know it is there. Every frame is decoded
//! generically (MessagePack into `rmpv::Value`, following
//! `docs/wire-format.md`), so it shows the keys of any cache, whatever the
//! key type: strings, numbers, tuples and structs (arrays), maps, binary.
//!
//! Like a node, it checks each frame (version, signature when a key is
//! given, shape, cache name, partition count, channel) and tracks the
//! sequence numbers of every (origin, epoch, partition): a jump is printed as
//! a gap, a refused frame as `REJECTED`. Heartbeats (empty frames) are not
//! printed but keep the numbering current, so a lost last frame still shows
//! as a gap within one heartbeat.

mod frame;

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::dates::civil_from_days;
use futures::StreamExt;
use nebulex::EventType;
use serde_json::json;

use self::frame::{decode, key_json, Key, RawEvent, RawFrame, RawTarget, Reject};

/// The largest partition count of a stream (`nebulex_streams::MAX_PARTITIONS`).
const MAX_PARTITIONS: u32 = 4096;
/// How long connecting (and subscribing) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between reconnection attempts after a lost connection.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Options of `nbx tail`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("server").required(true).args(["redis", "nats"])))]
#[command(after_help = "\
Output (one line per item, flushed at once, so it can be piped to jq):
  TIME  ORIGIN  pPARTITION  seq SEQ  KIND  COMMAND  vVERSION  KEYS
  TIME  GAP n events missed from ORIGIN on partition P
  TIME  GAP unknown number of events missed from ORIGIN on partition P (fell
        silent without stopping: no frame for 5 s, the nodes' default
        heartbeat times SILENT_HEARTBEATS; or restarted without stopping)
  TIME  GAP unknown number of events missed on every partition (connection
        lost)
  TIME  REJECTED reason: detail (N bytes) on CHANNEL
TIME is the event's time on its origin (UTC); ORIGIN is the sending node's id
in hex; partition `-` is an unpartitioned stream. Keys are decoded generically:
strings quoted, tuples and structs as (1, \"a\"), maps as {k: v}, binary as 0x..,
`*` for every entry (delete_all). Status messages go to stderr.

With --json, each line is one object with a \"type\" of \"event\", \"gap\" or
\"rejected\"; events have time, timestamp_us (the same time, in microseconds
since the Unix epoch), origin, epoch, cache, channel, partition (null when
unpartitioned), partitions, seq, kind, command, version, target (\"key\",
\"keys\" or \"all\") and keys (JSON values: binary as {\"bin\": hex}, maps with
non-string keys as [[k, v], ...]); gaps have time, origin (null for a lost
connection), channel, partition, missed (null: unknown) and reason.

Ctrl-C stops it (exit code 0).")]
pub(crate) struct TailArgs {
    /// Join the cluster through this Redis server, e.g. redis://127.0.0.1:6379/
    /// (exactly one of --redis and --nats is required).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Join the cluster through this NATS server, e.g. nats://127.0.0.1:4222
    /// (several servers: comma-separated).
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// The cache's name, as the nodes build it (`Cache::builder().name(..)`).
    #[arg(long, value_name = "NAME")]
    cache: String,
    /// The stream's partition count: subscribe channels PREFIX:NAME:0 ..
    /// PREFIX:NAME:N-1 and refuse frames of another count [default: any: with
    /// Redis, pattern PREFIX:NAME:* plus the unpartitioned channel PREFIX:NAME;
    /// with NATS (no wildcard can match inside a subject token), PREFIX:NAME and
    /// PREFIX:NAME:0 .. PREFIX:NAME:4095]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PARTITIONS)))]
    partitions: Option<u32>,
    /// The channel prefix the nodes use (`StreamsBuilder::prefix`).
    #[arg(long, value_name = "P", default_value = "nbx")]
    prefix: String,
    /// Only these event kinds, comma-separated: inserted, updated, deleted,
    /// expired, evicted [default: all]
    #[arg(long, value_name = "KINDS", value_delimiter = ',', value_parser = parse_kind)]
    events: Vec<EventType>,
    /// Only this partition (subscribes its channel PREFIX:NAME:N alone)
    /// [default: every partition]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..i64::from(MAX_PARTITIONS)))]
    partition: Option<u32>,
    /// Only events with a string key starting with P (a multi-key event is
    /// shown whole if any of its keys matches; delete_all of every entry is
    /// shown too, as it removes those keys as well) [default: every key]
    #[arg(long, value_name = "P")]
    key_prefix: Option<String>,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// The nodes' signing key (`StreamsBuilder::signing_key`): frames that are
    /// unsigned or badly signed are then shown as rejected. The environment
    /// variable NBX_SIGNING_KEY is read when this is absent (keeping the key
    /// out of the process list) [default: none: every frame is accepted,
    /// signed or not, and tags are not checked]
    #[arg(long, value_name = "K")]
    signing_key: Option<String>,
    /// Frames larger than this many bytes are rejected (as the nodes'
    /// `max_frame_bytes`, whose default this is).
    #[arg(long, value_name = "BYTES", default_value_t = nebulex_streams::wire::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
}

fn parse_kind(s: &str) -> Result<EventType, String> {
    s.parse()
}

/// Runs `nbx tail` until Ctrl-C (or a broken stdout pipe).
pub(crate) fn run(args: &TailArgs) -> Result<(), Box<dyn std::error::Error>> {
    let plan = Plan::new(args)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut tail = Tail::new(args, plan.base.clone());
    let outcome = rt.block_on(async {
        match (&args.redis, &args.nats) {
            (Some(url), _) => redis_loop(url, &plan, &mut tail).await,
            (None, Some(url)) => nats_loop(url, &plan, &mut tail).await,
            (None, None) => Err("one of --redis and --nats is required".into()),
        }
    });
    // Do not wait for the NATS client's background tasks.
    rt.shutdown_background();
    match outcome {
        Err(TailError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e.to_string().into()),
        Ok(()) => Ok(()),
    }
}

/// Why the tail stopped.
#[derive(Debug)]
enum TailError {
    /// Writing to stdout failed.
    Output(io::Error),
    /// Connecting or subscribing failed.
    Setup(String),
}

impl fmt::Display for TailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TailError::Output(e) => write!(f, "cannot write to stdout: {e}"),
            TailError::Setup(msg) => f.write_str(msg),
        }
    }
}

impl From<io::Error> for TailError {
    fn from(e: io::Error) -> Self {
        TailError::Output(e)
    }
}

impl From<String> for TailError {
    fn from(msg: String) -> Self {
        TailError::Setup(msg)
    }
}

impl From<&str> for TailError {
    fn from(msg: &str) -> Self {
        TailError::Setup(msg.to_string())
    }
}

/// The channels to subscribe.
#[derive(Debug)]
struct Plan {
    /// `{prefix}:{cache}`.
    base: String,
    /// Channels (Redis channels, NATS subjects) subscribed by name.
    channels: Vec<String>,
    /// A Redis pattern for the partition channels, when their count is unknown.
    redis_pattern: Option<String>,
    /// For NATS, when the count is unknown: every possible partition subject.
    nats_all_partitions: bool,
}

impl Plan {
    fn new(args: &TailArgs) -> Result<Plan, String> {
        if args.prefix.is_empty() || args.prefix.contains(char::is_whitespace) {
            return Err(format!("--prefix must be non-empty without spaces, got `{}`", args.prefix));
        }
        if args.cache.is_empty() || args.cache.contains(char::is_whitespace) {
            return Err(format!("--cache must be non-empty without spaces, got `{}`", args.cache));
        }
        if args.signing_key.as_deref() == Some("") {
            return Err("--signing-key must not be empty".into());
        }
        if args.max_frame_bytes < 64 {
            return Err(format!("--max-frame-bytes must be at least 64, got {}", args.max_frame_bytes));
        }
        if let (Some(p), Some(n)) = (args.partition, args.partitions) {
            if p >= n {
                return Err(format!("--partition {p} is out of range: the stream has {n} partitions (0..{})", n - 1));
            }
        }
        let base = format!("{}:{}", args.prefix, args.cache);
        let mut plan = Plan { channels: Vec::new(), redis_pattern: None, nats_all_partitions: false, base };
        match (args.partition, args.partitions) {
            (Some(p), _) => plan.channels.push(format!("{}:{p}", plan.base)),
            (None, Some(n)) => plan.channels.extend((0..n).map(|p| format!("{}:{p}", plan.base))),
            (None, None) => {
                plan.channels.push(plan.base.clone());
                if args.redis.is_some() {
                    plan.redis_pattern = Some(format!("{}:*", glob_escape(&plan.base)));
                } else {
                    plan.nats_all_partitions = true;
                }
            }
        }
        Ok(plan)
    }

    /// What the tail listens to, for the "subscribed" message.
    fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if self.channels.len() > 3 {
            parts.push(format!(
                "{} .. {} ({} channels)",
                self.channels[0],
                self.channels[self.channels.len() - 1],
                self.channels.len()
            ));
        } else {
            parts.extend(self.channels.iter().cloned());
        }
        if let Some(pattern) = &self.redis_pattern {
            parts.push(format!("pattern {pattern}"));
        }
        if self.nats_all_partitions {
            parts.push(format!("{0}:0 .. {0}:{1}", self.base, MAX_PARTITIONS - 1));
        }
        parts.join(", ")
    }
}

/// Escapes Redis glob metacharacters, so a cache name is matched literally.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => format!("{}://{}", &url[..scheme_end], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// A Redis error on one line; an answer that is not Redis's says so.
fn one_line(e: &redis::RedisError) -> String {
    if e.kind() == redis::ErrorKind::Parse {
        return "its answer is not Redis's (is this a Redis server?)".into();
    }
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The next pause before reconnecting.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(10))).min(MAX_BACKOFF)
}

async fn redis_subscribe(client: &redis::Client, plan: &Plan) -> Result<redis::aio::PubSubStream, String> {
    let mut pubsub = client.get_async_pubsub().await.map_err(|e| one_line(&e))?;
    if !plan.channels.is_empty() {
        pubsub.subscribe(&plan.channels).await.map_err(|e| format!("SUBSCRIBE failed: {}", one_line(&e)))?;
    }
    if let Some(pattern) = &plan.redis_pattern {
        pubsub.psubscribe(pattern).await.map_err(|e| format!("PSUBSCRIBE failed: {}", one_line(&e)))?;
    }
    Ok(pubsub.into_on_message())
}

async fn redis_loop(url: &str, plan: &Plan, tail: &mut Tail) -> Result<(), TailError> {
    let client = redis::Client::open(url).map_err(|e| format!("invalid Redis URL `{}`: {e}", redact(url)))?;
    let addr = client.get_connection_info().addr().to_string();
    let connect = async {
        match tokio::time::timeout(CONNECT_TIMEOUT, redis_subscribe(&client, plan)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
        }
    };
    let mut stream = tokio::select! {
        r = connect => r.map_err(|e| format!("cannot connect to Redis at {addr}: {e}"))?,
        _ = tokio::signal::ctrl_c() => return Ok(()),
    };
    eprintln!("nbx tail: subscribed to {} on Redis at {addr} (Ctrl-C to stop)", plan.describe());
    tail.listening();
    let mut silence = silence_ticks();
    loop {
        tokio::select! {
            _ = silence.tick() => tail.check_silence()?,
            msg = stream.next() => match msg {
                Some(msg) => tail.on_message(msg.get_channel_name(), msg.get_payload_bytes())?,
                None => {
                    eprintln!("nbx tail: connection to Redis at {addr} lost; reconnecting");
                    tail.connection_lost("connection to Redis lost")?;
                    let mut attempt = 0u32;
                    stream = loop {
                        tokio::select! {
                            _ = tokio::time::sleep(backoff(attempt)) => {}
                            _ = tokio::signal::ctrl_c() => return Ok(()),
                        }
                        let again = tokio::select! {
                            r = tokio::time::timeout(CONNECT_TIMEOUT, redis_subscribe(&client, plan)) => r,
                            _ = tokio::signal::ctrl_c() => return Ok(()),
                        };
                        match again {
                            Ok(Ok(stream)) => break stream,
                            Ok(Err(e)) => eprintln!("nbx tail: cannot reconnect to Redis at {addr}: {e}"),
                            Err(_) => eprintln!("nbx tail: cannot reconnect to Redis at {addr}: no answer"),
                        }
                        attempt = attempt.saturating_add(1);
                    };
                    tail.connection_back();
                    eprintln!("nbx tail: subscribed again to {} on Redis at {addr}", plan.describe());
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn nats_loop(url: &str, plan: &Plan, tail: &mut Tail) -> Result<(), TailError> {
    let addrs: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid NATS URL `{}`: {e}", redact(url)))?;
    let shown = addrs.iter().map(|a| format!("{}:{}", a.host(), a.port())).collect::<Vec<_>>().join(", ");
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    // Credentials of the URL: `user:pass@` or `token@`.
    let decoded = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let options = match addrs.iter().find_map(|a| Some((a.username()?, a.password()))) {
        Some((user, Some(pass))) => async_nats::ConnectOptions::with_user_and_password(decoded(user), decoded(pass)),
        Some((token, None)) => async_nats::ConnectOptions::with_token(decoded(token)),
        None => async_nats::ConnectOptions::new(),
    };
    let options = options.name("nbx tail").connection_timeout(CONNECT_TIMEOUT).event_callback(move |event| {
        let tx = events_tx.clone();
        async move {
            let _ = tx.send(event);
        }
    });
    let client = tokio::select! {
        c = options.connect(addrs.as_slice()) => c.map_err(|e| format!("cannot connect to NATS at {shown}: {e}"))?,
        _ = tokio::signal::ctrl_c() => return Ok(()),
    };
    let mut subjects = plan.channels.clone();
    if plan.nats_all_partitions {
        subjects.extend((0..MAX_PARTITIONS).map(|p| format!("{}:{p}", plan.base)));
    }
    let mut subscribers = Vec::with_capacity(subjects.len());
    for subject in subjects {
        let sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|e| format!("cannot subscribe to `{subject}` on NATS at {shown}: {e}"))?;
        subscribers.push(sub);
    }
    // The subscriptions hold once the server has seen them.
    tokio::time::timeout(CONNECT_TIMEOUT, client.flush())
        .await
        .map_err(|_| format!("NATS at {shown} did not answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot subscribe on NATS at {shown}: {e}"))?;
    eprintln!("nbx tail: subscribed to {} on NATS at {shown} (Ctrl-C to stop)", plan.describe());
    tail.listening();
    let mut merged = futures::stream::select_all(subscribers);
    let mut connected = true;
    let mut silence = silence_ticks();
    loop {
        tokio::select! {
            // (Not while the connection is down: then nothing can be heard.)
            _ = silence.tick(), if connected => tail.check_silence()?,
            msg = merged.next() => match msg {
                Some(msg) => tail.on_message(msg.subject.as_str(), &msg.payload)?,
                None => return Err(format!("the NATS connection to {shown} was closed").into()),
            },
            Some(event) = events.recv() => match event {
                async_nats::Event::Disconnected if connected => {
                    connected = false;
                    eprintln!("nbx tail: connection to NATS at {shown} lost; reconnecting");
                    tail.connection_lost("connection to NATS lost")?;
                }
                async_nats::Event::Connected if !connected => {
                    connected = true;
                    tail.connection_back();
                    eprintln!("nbx tail: reconnected to NATS at {shown}");
                }
                async_nats::Event::SlowConsumer(_) => {
                    // The client dropped messages for a subscription: the gap
                    // shows in the sequence numbers.
                    eprintln!("nbx tail: falling behind: the NATS client dropped messages");
                }
                _ => {}
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// When to look for origins fallen silent.
fn silence_ticks() -> tokio::time::Interval {
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// Which channel a message came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChannelKind {
    /// `{prefix}:{cache}`: an unpartitioned stream.
    Plain,
    /// `{prefix}:{cache}:{partition}`.
    Partition(u32),
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` for `us` microseconds since the Unix epoch.
fn rfc3339(us: u64) -> String {
    let secs = us / 1_000_000;
    let (y, m, d) = civil_from_days(i64::try_from(secs / 86_400).unwrap_or(i64::MAX));
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z", s / 3600, s / 60 % 60, s % 60, us % 1_000_000)
}

/// `HH:MM:SS.fff` (UTC) for the text output.
fn clock(us: u64) -> String {
    let secs = us / 1_000_000;
    let s = secs % 86_400;
    format!("{:02}:{:02}:{:02}.{:03}", s / 3600, s / 60 % 60, s % 60, us % 1_000_000 / 1000)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Earlier epochs of an origin the tail remembers, as the nodes do: frames
/// of those stay refused as replays, even after the origin came back with a
/// lower epoch (its clock was set back), unless one goes on from where it
/// was left (see [`Numbering::goes_on`]).
const EARLIER_EPOCHS: usize = 4;

/// How long an origin may be unheard before the tail takes its stream for
/// gone, as the nodes do with their default heartbeat of 1 s.
const SILENT: Duration = Duration::from_secs(nebulex_streams::SILENT_HEARTBEATS as u64);

/// How many (origin, partition) pairs the tail follows at most.
const MAX_ORIGINS: usize = 65_536;

/// Why an origin's unsent events are taken for lost when it falls silent.
const SILENT_REASON: &str = "fell silent without stopping";
/// Why they are when it starts a new stream without having stopped the last.
const RESTART_REASON: &str = "restarted without stopping";

/// A frame that passed the checks, and what its numbering says was lost
/// before it.
struct Accepted {
    frame: RawFrame,
    /// Its origin started a new stream without having stopped the last one
    /// (an unknown number of that one's events may be lost).
    restarted_unstopped: bool,
    /// Events missed before it, in its stream.
    gap: Option<u64>,
}

/// An epoch an origin left, and where it stood then.
#[derive(Debug, Clone, Copy)]
struct Left {
    epoch: u64,
    /// The next sequence number it expected (none before its first frame).
    next: Option<u64>,
    /// The send time of its last frame taken.
    sent_us: u64,
    /// It had not ended cleanly: it may go on.
    open: bool,
}

/// What the tail remembers of one (origin, stream, partition), following the
/// nodes' rules (`docs/wire-format.md`).
#[derive(Debug)]
struct Numbering {
    /// The origin's current epoch (epochs grow across its restarts, unless
    /// its clock was set back).
    epoch: u64,
    /// The epochs it left, latest first (the current one, closed, until it
    /// restarts).
    earlier: [Left; EARLIER_EPOCHS],
    /// The next sequence number expected (none before its first frame).
    next: Option<u64>,
    /// Its last frame said its stream stopped cleanly.
    ended: bool,
    /// When a frame of it last arrived (or the tail's connection came back).
    heard: Instant,
    /// Shown as fallen silent, until heard again.
    silent: bool,
    /// The send time of the last frame taken (0: none had one): a heartbeat
    /// sent no later is a replay.
    sent_us: u64,
}

impl Numbering {
    fn new(epoch: u64, now: Instant) -> Self {
        Numbering {
            epoch,
            earlier: [Left { epoch, next: None, sent_us: 0, open: false }; EARLIER_EPOCHS],
            next: None,
            ended: false,
            heard: now,
            silent: false,
            sent_us: 0,
        }
    }

    /// Whether the origin's stream is gone: it stopped cleanly, or fell silent.
    fn gone(&self, now: Instant) -> bool {
        self.ended || now.saturating_duration_since(self.heard) >= SILENT
    }

    /// The current epoch, as it is left.
    fn leaving(&self) -> Left {
        Left { epoch: self.epoch, next: self.next, sent_us: self.sent_us, open: !self.ended }
    }

    /// The origin's stream started again in `epoch`, numbered from 1.
    fn restart(&mut self, epoch: u64, now: Instant) {
        let mut earlier = self.earlier;
        earlier.rotate_right(1);
        earlier[0] = self.leaving();
        *self = Numbering { earlier, next: Some(1), ..Numbering::new(epoch, now) };
    }

    /// Whether `frame` goes on with the epoch left at `earlier[i]`, as the
    /// nodes judge it: not ended, from where its numbering stood, sent after
    /// its last frame taken (not a replay of it); and a later epoch than the
    /// current one, or the current one is gone (then the epoch left for it
    /// may have been the origin's real stream all along).
    fn goes_on(&self, i: usize, frame: &RawFrame, now: Instant) -> bool {
        let left = self.earlier[i];
        left.open
            && (frame.epoch > self.epoch || self.gone(now))
            && left.next.is_none_or(|next| frame.first_seq >= next)
            && (left.sent_us == 0 || frame.sent_at_us > left.sent_us)
    }

    /// Back to the epoch left at `earlier[i]`, from where its numbering
    /// stood (what was sent meanwhile is then a gap of known size), leaving
    /// the current one.
    fn resume(&mut self, i: usize, now: Instant) {
        let left = self.earlier[i];
        let mut earlier = self.earlier;
        earlier[i] = self.leaving();
        *self = Numbering { earlier, next: left.next, sent_us: left.sent_us, ..Numbering::new(left.epoch, now) };
    }
}

/// The decoding, checking, numbering and printing of frames, apart from the
/// transport.
struct Tail {
    /// `{prefix}:{cache}`.
    base: String,
    cache: String,
    partitions: Option<u32>,
    kinds: u8,
    key_prefix: Option<String>,
    json: bool,
    signing_key: Option<Vec<u8>>,
    max_frame_bytes: usize,
    /// Per (origin, partitions, partition).
    numbering: HashMap<(u64, u32, u32), Numbering>,
    /// The most entries of `numbering` ([`MAX_ORIGINS`]).
    max_origins: usize,
    /// Since when it has listened (first subscribed): then and the Unix
    /// time in milliseconds.
    listening: Option<(Instant, u64)>,
    out: Box<dyn Write>,
}

impl Tail {
    fn new(args: &TailArgs, base: String) -> Self {
        let kinds = if args.events.is_empty() { 0xff } else { args.events.iter().fold(0, |m, k| m | k.bit()) };
        Tail {
            base,
            cache: args.cache.clone(),
            partitions: args.partitions,
            kinds,
            key_prefix: args.key_prefix.clone(),
            json: args.json,
            signing_key: args
                .signing_key
                .clone()
                .or_else(|| std::env::var("NBX_SIGNING_KEY").ok())
                .filter(|k| !k.is_empty())
                .map(String::into_bytes),
            max_frame_bytes: args.max_frame_bytes,
            numbering: HashMap::new(),
            max_origins: MAX_ORIGINS,
            listening: None,
            out: Box::new(io::stdout()),
        }
    }

    /// It has subscribed: from now on, an origin whose stream started later
    /// is heard from its first number.
    fn listening(&mut self) {
        self.listening_at(Instant::now(), now_us() / 1_000);
    }

    fn listening_at(&mut self, now: Instant, unix_ms: u64) {
        self.listening.get_or_insert((now, unix_ms));
    }

    /// Whether it has listened since the stream that sent `frame` started,
    /// as the nodes judge it: that stream has run for less (the frame's send
    /// time less its epoch's start, by the origin's clock) than the tail has
    /// listened (by its own); for a frame without a usable send time, by
    /// the two start times.
    fn listened_since_start(&self, frame: &RawFrame, now: Instant) -> bool {
        let Some((since, since_ms)) = self.listening else { return false };
        // (An epoch holds its stream's start, Unix milliseconds, above 16 bits.)
        let (started, sent) = (frame.epoch >> 16, frame.sent_at_us / 1_000);
        if frame.sent_at_us == 0 || sent < started {
            return started > since_ms;
        }
        Duration::from_millis(sent - started) < now.saturating_duration_since(since)
    }

    /// The channel's kind, or none for channels of other streams that a
    /// pattern also matches (`nbx:users:x:0` of a cache named `users:x`).
    fn channel_kind(&self, channel: &str) -> Option<ChannelKind> {
        if channel == self.base {
            return Some(ChannelKind::Plain);
        }
        let digits = channel.strip_prefix(self.base.as_str())?.strip_prefix(':')?;
        let canonical = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        if !canonical {
            return None;
        }
        digits.parse().ok().map(ChannelKind::Partition)
    }

    /// Handles one message of the transport.
    fn on_message(&mut self, channel: &str, payload: &[u8]) -> io::Result<()> {
        self.on_message_at(channel, payload, Instant::now())
    }

    /// Handles one message of the transport, arrived at `now`.
    fn on_message_at(&mut self, channel: &str, payload: &[u8], now: Instant) -> io::Result<()> {
        let Some(kind) = self.channel_kind(channel) else { return Ok(()) };
        match self.accept(kind, payload, now) {
            Ok(Accepted { frame, restarted_unstopped, gap }) => {
                if restarted_unstopped {
                    self.print_gap(Some(frame.origin), kind, None, channel, Some(RESTART_REASON))?;
                }
                if let Some(missed) = gap {
                    self.print_gap(Some(frame.origin), kind, Some(missed), channel, None)?;
                }
                self.print_events(&frame, channel)
            }
            Err(reject) => self.print_rejected(channel, &reject, payload.len()),
        }
    }

    /// Decodes and checks a frame, and updates the numbering.
    fn accept(&mut self, channel: ChannelKind, payload: &[u8], now: Instant) -> Result<Accepted, Reject> {
        let frame = decode(payload, self.signing_key.as_deref(), self.max_frame_bytes)?;
        if frame.cache != self.cache {
            return Err(Reject::ForeignCache(frame.cache));
        }
        match channel {
            ChannelKind::Plain => {
                if frame.partitions != 0 {
                    return Err(Reject::PartitionCount(format!(
                        "frame of a stream of {} partitions on the unpartitioned channel",
                        frame.partitions
                    )));
                }
                if frame.partition != 0 {
                    return Err(Reject::WrongPartition(format!(
                        "frame of partition {} on the unpartitioned channel",
                        frame.partition
                    )));
                }
            }
            ChannelKind::Partition(p) => {
                match self.partitions {
                    Some(n) if frame.partitions != n => {
                        return Err(Reject::PartitionCount(format!(
                            "frame says {} partitions, the stream has {n}",
                            frame.partitions
                        )));
                    }
                    _ if frame.partitions == 0 => {
                        return Err(Reject::PartitionCount(format!(
                            "frame of an unpartitioned stream on the channel of partition {p}"
                        )));
                    }
                    _ => {}
                }
                if frame.partition != p {
                    return Err(Reject::WrongPartition(format!(
                        "frame of partition {} on the channel of partition {p}",
                        frame.partition
                    )));
                }
            }
        }
        let n = frame.events.len() as u64;
        let mut restarted_unstopped = false;
        let key = (frame.origin, frame.partitions, frame.partition);
        if !self.numbering.contains_key(&key) && self.numbering.len() >= self.max_origins {
            // Made-up origins cannot grow the tail without bound: those gone
            // (stopped, or silent) make room; if every one is live, no more.
            self.numbering.retain(|_, n| !n.gone(now));
            if self.numbering.len() >= self.max_origins {
                return Err(Reject::TooManyOrigins(self.max_origins));
            }
        }
        // If it has listened since the origin's stream started, it heard from
        // its first number (1): a later one means frames were lost.
        let first = self.listened_since_start(&frame, now).then_some(1);
        let entry =
            self.numbering.entry(key).or_insert_with(|| Numbering { next: first, ..Numbering::new(frame.epoch, now) });
        if frame.epoch != entry.epoch {
            // An epoch it left is a replay, unless it goes on from where it
            // was left; so is a lower one while its current stream lives.
            // Otherwise the origin restarted its stream (a lower epoch: with
            // its clock set back).
            let left = entry.earlier.iter().position(|l| l.epoch == frame.epoch);
            match left {
                Some(i) if entry.goes_on(i, &frame, now) => entry.resume(i, now),
                _ if left.is_some() || (frame.epoch < entry.epoch && !entry.gone(now)) => {
                    return Err(Reject::OldEpoch { epoch: frame.epoch, current: entry.epoch });
                }
                _ => {
                    // Without a LAST frame (or its silence shown), its last
                    // events may be lost, as the nodes report it.
                    restarted_unstopped = !entry.ended && !entry.silent;
                    entry.restart(frame.epoch, now);
                }
            }
        }
        // (After this tail's connection was lost, too: the jump counts what
        // was published meanwhile.)
        let gap = match entry.next {
            None => None,
            Some(next) if frame.first_seq < next => {
                return Err(Reject::Replayed { first_seq: frame.first_seq, next });
            }
            // A heartbeat's number is still the next one: its send time,
            // which the origin makes later with each frame, tells a replay.
            Some(_) if n == 0 && frame.sent_at_us != 0 && frame.sent_at_us <= entry.sent_us => {
                return Err(Reject::Resent { sent_at_us: frame.sent_at_us, last_us: entry.sent_us });
            }
            Some(next) => (frame.first_seq > next).then(|| frame.first_seq - next),
        };
        entry.next = Some(frame.first_seq.wrapping_add(n));
        entry.sent_us = entry.sent_us.max(frame.sent_at_us);
        entry.ended = frame.last;
        entry.heard = now;
        entry.silent = false;
        Ok(Accepted { frame, restarted_unstopped, gap })
    }

    /// Whether an event passes the `--events` and `--key-prefix` filters.
    fn wanted(&self, event: &RawEvent) -> bool {
        if self.kinds & event.kind.bit() == 0 {
            return false;
        }
        match (&self.key_prefix, &event.target) {
            (None, _) | (Some(_), RawTarget::All) => true,
            (Some(prefix), target) => {
                target.keys().iter().any(|k| k.as_str().is_some_and(|s| s.starts_with(prefix.as_str())))
            }
        }
    }

    fn print_events(&mut self, frame: &RawFrame, channel: &str) -> io::Result<()> {
        let partition = (frame.partitions > 0).then_some(frame.partition);
        for (i, event) in frame.events.iter().enumerate() {
            if !self.wanted(event) {
                continue;
            }
            let seq = frame.first_seq.wrapping_add(i as u64);
            let line = if self.json {
                let (target, keys) = match &event.target {
                    RawTarget::Key(k) => ("key", vec![key_json(k)]),
                    RawTarget::Keys(ks) => ("keys", ks.iter().map(key_json).collect()),
                    RawTarget::All => ("all", Vec::new()),
                };
                json!({
                    "type": "event",
                    "time": rfc3339(event.timestamp_us),
                    "timestamp_us": event.timestamp_us,
                    "origin": format!("{:016x}", frame.origin),
                    "epoch": format!("{:016x}", frame.epoch),
                    "cache": frame.cache,
                    "channel": channel,
                    "partition": partition,
                    "partitions": frame.partitions,
                    "seq": seq,
                    "kind": event.kind.as_str(),
                    "command": event.command.as_str(),
                    "version": event.version,
                    "target": target,
                    "keys": keys,
                })
                .to_string()
            } else {
                let keys = match &event.target {
                    RawTarget::Key(k) => Key(k).to_string(),
                    RawTarget::Keys(ks) => {
                        let shown: Vec<String> = ks.iter().map(|k| Key(k).to_string()).collect();
                        format!("[{}]", shown.join(", "))
                    }
                    RawTarget::All => "* (every entry)".to_string(),
                };
                let part = partition.map_or_else(|| "-".to_string(), |p| p.to_string());
                format!(
                    "{}  {:016x}  p{part:<3} seq {seq:<7} {:<8} {:<11} v{:<5} {keys}",
                    clock(event.timestamp_us),
                    frame.origin,
                    event.kind.as_str(),
                    event.command.as_str(),
                    event.version,
                )
            };
            self.line(&line)?;
        }
        Ok(())
    }

    fn print_gap(
        &mut self,
        origin: Option<u64>,
        channel: ChannelKind,
        missed: Option<u64>,
        channel_name: &str,
        reason: Option<&str>,
    ) -> io::Result<()> {
        let partition = match channel {
            ChannelKind::Plain => None,
            ChannelKind::Partition(p) => Some(p),
        };
        let now = now_us();
        let line = if self.json {
            json!({
                "type": "gap",
                "time": rfc3339(now),
                "origin": origin.map(|o| format!("{o:016x}")),
                "channel": channel_name,
                "partition": partition,
                "missed": missed,
                "reason": reason.unwrap_or("sequence jump"),
            })
            .to_string()
        } else {
            let part = partition.map_or_else(|| "-".to_string(), |p| p.to_string());
            match (missed, origin) {
                (Some(n), Some(o)) => {
                    format!("{}  GAP {n} events missed from {o:016x} on partition {part}", clock(now))
                }
                (None, Some(o)) => format!(
                    "{}  GAP unknown number of events missed from {o:016x} on partition {part} ({})",
                    clock(now),
                    reason.unwrap_or("fell silent")
                ),
                _ => format!(
                    "{}  GAP unknown number of events missed on every partition ({})",
                    clock(now),
                    reason.unwrap_or("connection lost")
                ),
            }
        };
        self.line(&line)
    }

    fn print_rejected(&mut self, channel: &str, reject: &Reject, size: usize) -> io::Result<()> {
        let now = now_us();
        let line = if self.json {
            json!({
                "type": "rejected",
                "time": rfc3339(now),
                "channel": channel,
                "reason": reject.label(),
                "detail": reject.to_string(),
                "bytes": size,
            })
            .to_string()
        } else {
            format!("{}  REJECTED {}: {reject} ({size} bytes) on {channel}", clock(now), reject.label())
        };
        self.line(&line)
    }

    /// The connection was lost: whatever is published meanwhile is gone (an
    /// unknown number now; each origin's jump, counted, at its next frame).
    fn connection_lost(&mut self, reason: &str) -> io::Result<()> {
        let base = self.base.clone();
        self.print_gap(None, ChannelKind::Plain, None, &base, Some(reason))
    }

    /// Shows, once, each origin unheard for [`SILENT`] on a partition
    /// whose stream there did not stop cleanly: it died, or lost its way to
    /// the server, and what it had not sent is lost (the nodes report it as
    /// a loss of unknown size too).
    fn check_silence(&mut self) -> io::Result<()> {
        self.check_silence_at(Instant::now())
    }

    /// [`check_silence`](Self::check_silence) at `now`.
    fn check_silence_at(&mut self, now: Instant) -> io::Result<()> {
        let mut silent: Vec<(u64, u32, u32)> = self
            .numbering
            .iter_mut()
            .filter(|(_, n)| !n.ended && !n.silent && now.saturating_duration_since(n.heard) >= SILENT)
            .map(|(&key, n)| {
                n.silent = true;
                key
            })
            .collect();
        silent.sort_unstable();
        for (origin, partitions, partition) in silent {
            let (kind, channel) = if partitions == 0 {
                (ChannelKind::Plain, self.base.clone())
            } else {
                (ChannelKind::Partition(partition), format!("{}:{partition}", self.base))
            };
            self.print_gap(Some(origin), kind, None, &channel, Some(SILENT_REASON))?;
        }
        Ok(())
    }

    /// The connection is back: nothing could be heard while it was down, so
    /// every origin's silence counts from now.
    fn connection_back(&mut self) {
        let now = Instant::now();
        self.numbering.values_mut().for_each(|n| n.heard = now);
    }

    fn line(&mut self, line: &str) -> io::Result<()> {
        self.out.write_all(line.as_bytes())?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use clap::Parser;
    use nebulex::{CacheEntryEvent, Command, EventMetadata, Name, NodeId, Target};
    use nebulex_streams::wire::{self, FrameHeader};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        tail: TailArgs,
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn take(&self) -> Vec<String> {
            let bytes = std::mem::take(&mut *self.0.lock().expect("lock"));
            String::from_utf8(bytes).expect("utf-8").lines().map(str::to_string).collect()
        }
    }

    fn tail(args: &[&str]) -> (Tail, Captured) {
        let cli = Cli::try_parse_from(std::iter::once("tail").chain(args.iter().copied())).expect("arguments");
        let plan = Plan::new(&cli.tail).expect("plan");
        let mut tail = Tail::new(&cli.tail, plan.base);
        let captured = Captured::default();
        tail.out = Box::new(captured.clone());
        (tail, captured)
    }

    /// A frame's header, sent later than any made before (as an origin
    /// sends its frames).
    fn header(partition: u32, partitions: u32, first_seq: u64) -> FrameHeader {
        static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        FrameHeader {
            origin: NodeId(0xabc),
            epoch: 7,
            cache: "users".into(),
            partition,
            partitions,
            first_seq,
            sent_at_us: SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
            last: false,
        }
    }

    fn event<K>(kind: EventType, target: Target<K>) -> Arc<CacheEntryEvent<K>> {
        Arc::new(CacheEntryEvent {
            cache: Name::new("users"),
            kind,
            target,
            command: Command::Put,
            version: 3,
            metadata: EventMetadata {
                node: NodeId(0xabc),
                partition: None,
                partitions: None,
                topic: None,
                seq: 0,
                timestamp: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            },
        })
    }

    /// Each printed line holds the expected text at its place, and there
    /// are as many lines as expected.
    #[track_caller]
    fn assert_lines(lines: &[String], expected: &[&str]) {
        assert_eq!(lines.len(), expected.len(), "{lines:?}");
        for (line, want) in lines.iter().zip(expected) {
            assert!(line.contains(want), "{line:?} lacks {want:?}");
        }
    }

    macro_rules! frame {
        ($h:expr, $events:expr, $key:expr) => {
            wire::encode($h, $events, $key).expect("encode")
        };
    }

    #[test]
    fn keys_of_any_type_are_shown_generically() {
        let (mut t, out) = tail(&["--redis", "redis://x/", "--cache", "users"]);
        let tuple = vec![event(EventType::Inserted, Target::Key((42u32, "alice".to_string())))];
        t.on_message("nbx:users:1", &frame!(&header(1, 4, 1), &tuple, None)).unwrap();
        let map = vec![event(
            EventType::Deleted,
            Target::Keys(vec![std::collections::BTreeMap::from([("a".to_string(), vec![1u8, 2])])]),
        )];
        t.on_message("nbx:users:1", &frame!(&header(1, 4, 2), &map, None)).unwrap();
        let all = vec![event::<u64>(EventType::Deleted, Target::All)];
        t.on_message("nbx:users:1", &frame!(&header(1, 4, 3), &all, None)).unwrap();
        let lines = out.take();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("22:13:20.123  0000000000000abc  p1"), "{}", lines[0]);
        assert!(lines[0].ends_with("inserted put         v3     (42, \"alice\")"), "{}", lines[0]);
        assert!(lines[1].ends_with("[{\"a\": (1, 2)}]"), "{}", lines[1]);
        assert!(lines[2].ends_with("* (every entry)"), "{}", lines[2]);
    }

    #[test]
    fn json_lines_carry_every_field() {
        let (mut t, out) = tail(&["--redis", "redis://x/", "--cache", "users", "--json"]);
        let events = vec![
            event(EventType::Inserted, Target::Key("user:1".to_string())),
            event(EventType::Updated, Target::Keys(vec!["a".to_string(), "b".to_string()])),
        ];
        t.on_message("nbx:users", &frame!(&header(0, 0, 10), &events, None)).unwrap();
        let lines: Vec<serde_json::Value> = out.take().iter().map(|l| serde_json::from_str(l).expect("json")).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["type"], "event");
        assert_eq!(lines[0]["time"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(lines[0]["origin"], "0000000000000abc");
        assert_eq!(lines[0]["partition"], serde_json::Value::Null);
        assert_eq!(lines[0]["seq"], 10);
        assert_eq!(lines[0]["kind"], "inserted");
        assert_eq!(lines[0]["command"], "put");
        assert_eq!(lines[0]["version"], 3);
        assert_eq!(lines[0]["keys"], json!(["user:1"]));
        assert_eq!(lines[1]["seq"], 11);
        assert_eq!(lines[1]["target"], "keys");
        assert_eq!(lines[1]["keys"], json!(["a", "b"]));
    }

    #[test]
    fn origins_are_followed_up_to_a_bound_and_those_gone_make_room() {
        let (mut t, out) = tail(&["--redis", "redis://x/", "--cache", "users"]);
        t.max_origins = 2;
        let one = vec![event(EventType::Inserted, Target::Key("k".to_string()))];
        let none: Vec<Arc<CacheEntryEvent<String>>> = Vec::new();
        let from = |origin, first_seq, last| FrameHeader { origin: NodeId(origin), first_seq, last, ..header(0, 0, 0) };
        t.on_message("nbx:users", &frame!(&from(1, 1, false), &one, None)).unwrap();
        t.on_message("nbx:users", &frame!(&from(2, 1, false), &one, None)).unwrap();
        t.on_message("nbx:users", &frame!(&from(3, 1, false), &one, None)).unwrap(); // refused: 1 and 2 live
        t.on_message("nbx:users", &frame!(&from(1, 2, true), &none, None)).unwrap(); // 1 stops
        t.on_message("nbx:users", &frame!(&from(3, 1, false), &one, None)).unwrap(); // room made
        let lines = out.take();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            lines[2].contains("REJECTED too_many_origins: frame of a new origin, while 2 are followed"),
            "{}",
            lines[2]
        );
        assert!(lines[3].contains("0000000000000003"), "{}", lines[3]);
    }

    #[test]
    fn a_replayed_heartbeat_is_refused_by_its_send_time() {
        let (mut t, out) = tail(&["--redis", "redis://x/", "--cache", "users"]);
        let one = vec![event(EventType::Inserted, Target::Key("k".to_string()))];
        let none: Vec<Arc<CacheEntryEvent<String>>> = Vec::new();
        t.on_message("nbx:users:2", &frame!(&header(2, 4, 1), &one, None)).unwrap();
        let beat = frame!(&header(2, 4, 2), &none, None);
        t.on_message("nbx:users:2", &beat).unwrap(); // its number is the next one: taken
        t.on_message("nbx:users:2", &beat).unwrap(); // the same again: a replay
        let mut unknown = header(2, 4, 2);
        unknown.sent_at_us = 0;
        t.on_message("nbx:users:2", &frame!(&unknown, &none, None)).unwrap(); // no send time: judged by its number
        t.on_message("nbx:users:2", &frame!(&header(2, 4, 2), &none, None)).unwrap(); // sent later: taken
        let lines = out.take();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("seq 1 "), "{}", lines[0]);
        assert!(lines[1].contains("REJECTED replay: replayed heartbeat: sent at "), "{}", lines[1]);
    }

    #[test]
    fn gaps_replays_and_heartbeats_are_tracked_per_origin_epoch_and_partition() {
        let (mut t, out) = tail(&["--redis", "redis://x/", "--cache", "users"]);
        let one = vec![event(EventType::Inserted, Target::Key("k".to_string()))];
        let none: Vec<Arc<CacheEntryEvent<String>>> = Vec::new();
        t.on_message("nbx:users:2", &frame!(&header(2, 4, 5), &one, None)).unwrap(); // first: no gap
        t.on_message("nbx:users:2", &frame!(&header(2, 4, 6), &none, None)).unwrap(); // heartbeat
        t.on_message("nbx:users:2", &frame!(&header(2, 4, 9), &none, None)).unwrap(); // heartbeat after loss
        t.on_message("nbx:users:2", &frame!(&header(2, 4, 9), &one, None)).unwrap();
        t.on_message("nbx:users:2", &frame!(&header(2, 4, 9), &one, None)).unwrap(); // replay
        t.on_message("nbx:users:3", &frame!(&header(3, 4, 100), &one, None)).unwrap(); // other partition
        let mut restarted = header(2, 4, 1);
        restarted.epoch = 8;
        t.on_message("nbx:users:2", &frame!(&restarted, &one, None)).unwrap(); // new epoch, unstopped
        t.on_message("nbx:users:2", &frame!(&header(2, 4, 10), &one, None)).unwrap(); // old epoch
        let lines = out.take();
        assert_eq!(lines.len(), 8, "{lines:?}");
        assert!(lines[0].contains("seq 5 "), "{}", lines[0]);
        assert!(lines[1].ends_with("GAP 3 events missed from 0000000000000abc on partition 2"), "{}", lines[1]);
        assert!(lines[2].contains("seq 9 "), "{}", lines[2]);
        assert!(lines[3].contains("REJECTED replay: replayed frame: sequence 9 already seen (expected 10)"));
        assert!(lines[4].contains("p3   seq 100"), "{}", lines[4]);
        assert!(
            lines[5].ends_with(
                "GAP unknown number of events missed from 0000000000000abc on partition 2 (restarted without stopping)"
            ),
            "{}",
            lines[5]
        );
        assert!(lines[6].contains("p2   seq 1 "), "{}", lines[6]);
        assert!(lines[7].contains("REJECTED old_epoch: frame of epoch 0000000000000007, older"), "{}", lines[7]);
        t.connection_lost("connection to Redis lost").unwrap();
        t.connection_back();
        t.on_message("nbx:users:2", &frame!(&restarted, &one, None)).unwrap(); // seen before the loss
        restarted.first_seq = 50;
        t.on_message("nbx:users:2", &frame!(&restarted, &one, None)).unwrap(); // the jump, counted
        let lines = out.take();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines[0].contains("GAP unknown number of events missed"), "{}", lines[0]);
        assert!(
            lines[1].contains("REJECTED replay: replayed frame: sequence 1 already seen (expected 2)"),
            "{}",
            lines[1]
        );
        assert!(lines[2].ends_with("GAP 48 events missed from 0000000000000abc on partition 2"), "{}", lines[2]);
        assert!(lines[3].contains("seq 50 "), "{}", lines[3]);
    }

    #[test]
    fn a_node_restarted_with_its_clock_set_back_is_followed_once_its_stream_is_gone() {
        let (mut t, out) = tail(&["--redis", "redis://x/", "--cache", "users"]);
        let one = vec![event(EventType::Inserted, Target::Key("k".to_string()))];
        let at = |epoch, first_seq, last| FrameHeader { epoch, first_seq, last, ..header(1, 4, 0) };
        let now = Instant::now();
        t.on_message_at("nbx:users:1", &frame!(&at(7, 1, false), &one, None), now).unwrap();
        // A lower epoch while epoch 7 lives: a replay.
        t.on_message_at("nbx:users:1", &frame!(&at(5, 1, false), &one, None), now).unwrap();
        // Epoch 7 falls silent: the origin is taken for gone, and its lower
        // epoch (a restart with the clock set back) is followed.
        let later = now + SILENT;
        t.check_silence_at(later).unwrap();
        t.on_message_at("nbx:users:1", &frame!(&at(5, 1, false), &one, None), later).unwrap();
        t.on_message_at("nbx:users:1", &frame!(&at(5, 3, false), &one, None), later).unwrap();
        // Epoch 5 stops cleanly; a restart with a still lower epoch is
        // followed at once, and a frame of an epoch it left, from before
        // where that one stood, stays a replay.
        let none: Vec<Arc<CacheEntryEvent<String>>> = Vec::new();
        t.on_message_at("nbx:users:1", &frame!(&at(5, 4, true), &none, None), later).unwrap();
        t.on_message_at("nbx:users:1", &frame!(&at(4, 1, false), &one, None), later).unwrap();
        t.on_message_at("nbx:users:1", &frame!(&at(7, 1, false), &one, None), later).unwrap();
        let lines = out.take();
        let expected = [
            "p1   seq 1 ",
            "REJECTED old_epoch: frame of epoch 0000000000000005",
            "GAP unknown number of events missed from 0000000000000abc on partition 1 (fell silent without stopping)",
            "p1   seq 1 ",
            "GAP 1 events missed",
            "p1   seq 3 ",
            "p1   seq 1 ",
            "REJECTED old_epoch: frame of epoch 0000000000000007",
        ];
        assert_lines(&lines, &expected);
    }

    /// As the nodes: the first frame of an origin whose stream started after
    /// the tail began to listen is judged from that stream's first number,
    /// so the frames missed before it are a gap; an origin whose stream ran
    /// before is followed from its first frame heard.
    #[test]
    fn an_origin_started_since_the_tail_listens_is_heard_from_its_first_number() {
        let (mut t, out) = tail(&["--redis", "redis://x/", "--cache", "users", "--json"]);
        let one = vec![event(EventType::Inserted, Target::Key("k".to_string()))];
        let (now, since_ms) = (Instant::now(), 1_800_000_000_000);
        t.listening_at(now, since_ms);
        let started = |origin, started_ms: u64, sent_ms: u64| FrameHeader {
            origin: NodeId(origin),
            epoch: started_ms << 16,
            first_seq: 3,
            sent_at_us: sent_ms * 1_000,
            ..header(1, 4, 0)
        };
        let later = now + Duration::from_secs(1);
        // Started 5 ms after the tail listened, sent 2 ms after it started.
        t.on_message_at("nbx:users:1", &frame!(&started(1, since_ms + 5, since_ms + 7), &one, None), later).unwrap();
        // Started an hour before: its frames before this one were not the tail's to hear.
        t.on_message_at("nbx:users:1", &frame!(&started(2, since_ms - 3_600_000, since_ms), &one, None), later)
            .unwrap();
        // No send time: judged by the start times.
        let unsent = |origin, started_ms: u64| FrameHeader { sent_at_us: 0, ..started(origin, started_ms, 0) };
        t.on_message_at("nbx:users:1", &frame!(&unsent(3, since_ms + 1), &one, None), later).unwrap();
        t.on_message_at("nbx:users:1", &frame!(&unsent(4, since_ms - 1), &one, None), later).unwrap();
        let kinds: Vec<(String, u64)> = out
            .take()
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
                (
                    v["type"].as_str().unwrap_or_default().to_string(),
                    v["origin"].as_str().map_or(0, |o| u64::from_str_radix(o, 16).unwrap_or(0)),
                )
            })
            .collect();
        let expected = [("gap", 1), ("event", 1), ("event", 2), ("gap", 3), ("event", 3), ("event", 4)];
        assert_eq!(kinds, expected.map(|(k, o)| (k.to_string(), o)), "{kinds:?}");
    }

    /// As the nodes: a replayed frame of an epoch the origin left (never
    /// heard here) brings that epoch back, and once it falls silent, the
    /// epoch left for it goes on from where it stood.
    #[test]
    fn a_left_epoch_brought_back_by_a_replay_gives_way_once_it_falls_silent() {
        let (mut t, out) = tail(&["--redis", "redis://x/", "--cache", "users"]);
        let one = vec![event(EventType::Inserted, Target::Key("k".to_string()))];
        let at = |epoch, first_seq, sent_at_us| FrameHeader { epoch, first_seq, sent_at_us, ..header(1, 4, 0) };
        let (hi, lo) = (7, 5);
        let now = Instant::now();
        t.on_message_at("nbx:users:1", &frame!(&at(hi, 1, 10), &one, None), now).unwrap();
        let later = now + SILENT;
        t.check_silence_at(later).unwrap();
        t.on_message_at("nbx:users:1", &frame!(&at(lo, 1, 5), &one, None), later).unwrap();
        t.on_message_at("nbx:users:1", &frame!(&at(hi, 2, 30), &one, None), later).unwrap();
        t.on_message_at("nbx:users:1", &frame!(&at(lo, 2, 6), &one, None), later).unwrap();
        let latest = later + SILENT;
        t.check_silence_at(latest).unwrap();
        t.on_message_at("nbx:users:1", &frame!(&at(lo, 3, 7), &one, None), latest).unwrap();
        let lines = out.take();
        let expected = [
            "p1   seq 1 ",
            "GAP unknown number of events missed from 0000000000000abc on partition 1 (fell silent without stopping)",
            "p1   seq 1 ",
            "p1   seq 2 ",
            "REJECTED old_epoch: frame of epoch 0000000000000005",
            "GAP unknown number of events missed from 0000000000000abc on partition 1 (fell silent without stopping)",
            "GAP 1 events missed",
            "p1   seq 3 ",
        ];
        assert_lines(&lines, &expected);
    }

    #[test]
    fn an_origin_fallen_silent_without_stopping_is_shown_once_as_a_gap_of_unknown_size() {
        let (mut t, out) = tail(&["--redis", "redis://x/", "--cache", "users", "--json"]);
        let one = vec![event(EventType::Inserted, Target::Key("k".to_string()))];
        let none: Vec<Arc<CacheEntryEvent<String>>> = Vec::new();
        let from = |origin, partition, first_seq, last| FrameHeader {
            origin: NodeId(origin),
            first_seq,
            last,
            ..header(partition, 4, 0)
        };
        let now = Instant::now();
        t.on_message_at("nbx:users:1", &frame!(&from(0xa, 1, 1, false), &one, None), now).unwrap();
        // 0xb stops cleanly: its silence is no loss.
        t.on_message_at("nbx:users:2", &frame!(&from(0xb, 2, 1, true), &none, None), now).unwrap();
        out.take();
        t.check_silence_at(now + SILENT / 2).unwrap();
        assert_eq!(out.take(), Vec::<String>::new(), "not silent yet");
        t.check_silence_at(now + SILENT).unwrap();
        let lines = out.take();
        let [line] = &lines[..] else { panic!("{lines:?}") };
        let gap: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(gap["type"], "gap");
        assert_eq!(gap["origin"], "000000000000000a");
        assert_eq!((gap["channel"].as_str(), gap["partition"].as_u64()), (Some("nbx:users:1"), Some(1)));
        assert!(gap["missed"].is_null(), "{gap}");
        assert_eq!(gap["reason"], SILENT_REASON);
        t.check_silence_at(now + SILENT * 3).unwrap();
        assert_eq!(out.take(), Vec::<String>::new(), "shown once");
        // Heard again, then silent again: shown again.
        let back = now + SILENT * 4;
        t.on_message_at("nbx:users:1", &frame!(&from(0xa, 1, 2, false), &one, None), back).unwrap();
        out.take();
        t.check_silence_at(back + SILENT).unwrap();
        assert_eq!(out.take().len(), 1);
    }

    #[test]
    fn hostile_frames_are_rejected_with_a_reason() {
        let (mut t, out) =
            tail(&["--redis", "redis://x/", "--cache", "users", "--partitions", "4", "--signing-key", "secret"]);
        let one = vec![event(EventType::Inserted, Target::Key("k".to_string()))];
        let signed = frame!(&header(1, 4, 1), &one, Some(b"secret"));
        t.on_message("nbx:users:1", &signed).unwrap();
        t.on_message("nbx:users", b"garbage").unwrap();
        t.on_message("nbx:users:1", &[1]).unwrap();
        t.on_message("nbx:users:1", &frame!(&header(1, 4, 2), &one, None)).unwrap();
        t.on_message("nbx:users:1", &frame!(&header(1, 4, 2), &one, Some(b"other"))).unwrap();
        let mut cut = signed.clone();
        cut.truncate(20);
        t.on_message("nbx:users:1", &cut).unwrap();
        t.on_message("nbx:users:2", &frame!(&header(1, 4, 2), &one, Some(b"secret"))).unwrap();
        t.on_message("nbx:users:1", &frame!(&header(1, 8, 2), &one, Some(b"secret"))).unwrap();
        let mut foreign = header(1, 4, 2);
        foreign.cache = "orders".into();
        t.on_message("nbx:users:1", &frame!(&foreign, &one, Some(b"secret"))).unwrap();
        let mut flagged = frame!(&header(1, 4, 2), &one, None);
        flagged[1] = 0x04;
        t.on_message("nbx:users:1", &flagged).unwrap();
        t.on_message("nbx:users:x:1", b"not ours").unwrap(); // another cache's channel: ignored
        let lines = out.take();
        let expected = [
            "inserted",
            "REJECTED version: unsupported wire version 103 (7 bytes) on nbx:users",
            "REJECTED truncated: too short to hold a frame (1 bytes)",
            "REJECTED unsigned:",
            "REJECTED bad_signature:",
            "REJECTED truncated: too short to hold a frame (20 bytes)",
            "REJECTED wrong_partition: frame of partition 1 on the channel of partition 2",
            "REJECTED partition_count: frame says 8 partitions, the stream has 4",
            "REJECTED foreign_cache: frame of cache `orders`",
            "REJECTED flags: unknown flags 0x04",
        ];
        assert_lines(&lines, &expected);
        // Without a key, the truncated signed frame is malformed.
        let (mut t, out) = tail(&["--redis", "redis://x/", "--cache", "users"]);
        let mut cut = frame!(&header(1, 4, 1), &one, None);
        cut.truncate(20);
        t.on_message("nbx:users:1", &cut).unwrap();
        let mut trailing = frame!(&header(1, 4, 1), &one, None);
        trailing.push(0xc0);
        t.on_message("nbx:users:1", &trailing).unwrap();
        let lines = out.take();
        assert!(lines[0].contains("REJECTED malformed: not MessagePack"), "{}", lines[0]);
        assert!(lines[1].contains("REJECTED malformed: 1 trailing bytes"), "{}", lines[1]);
    }

    #[test]
    fn filters_keep_the_asked_kinds_and_keys() {
        let (mut t, out) = tail(&[
            "--redis",
            "redis://x/",
            "--cache",
            "users",
            "--events",
            "inserted,deleted",
            "--key-prefix",
            "user:",
        ]);
        let events = vec![
            event(EventType::Inserted, Target::Key("user:1".to_string())),
            event(EventType::Updated, Target::Key("user:1".to_string())),
            event(EventType::Inserted, Target::Key("order:1".to_string())),
            event(EventType::Deleted, Target::Keys(vec!["order:2".to_string(), "user:2".to_string()])),
            event(EventType::Deleted, Target::All),
        ];
        t.on_message("nbx:users:0", &frame!(&header(0, 1, 1), &events, None)).unwrap();
        let lines = out.take();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].ends_with("\"user:1\""));
        assert!(lines[1].ends_with("[\"order:2\", \"user:2\"]"));
        assert!(lines[2].ends_with("* (every entry)"));
    }

    #[test]
    fn channels_follow_the_options() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("tail").chain(args.iter().copied())).expect("arguments");
            Plan::new(&cli.tail)
        };
        let p = parse(&["--redis", "redis://x/", "--cache", "users"]).unwrap();
        assert_eq!(p.channels, ["nbx:users"]);
        assert_eq!(p.redis_pattern.as_deref(), Some("nbx:users:*"));
        let p = parse(&["--redis", "redis://x/", "--cache", "a*b", "--prefix", "p"]).unwrap();
        assert_eq!(p.redis_pattern.as_deref(), Some("p:a\\*b:*"));
        let p = parse(&["--nats", "nats://x", "--cache", "users", "--partitions", "3"]).unwrap();
        assert_eq!(p.channels, ["nbx:users:0", "nbx:users:1", "nbx:users:2"]);
        let p = parse(&["--nats", "nats://x", "--cache", "users"]).unwrap();
        assert!(p.nats_all_partitions);
        let p = parse(&["--nats", "nats://x", "--cache", "users", "--partition", "2"]).unwrap();
        assert_eq!(p.channels, ["nbx:users:2"]);
        assert!(parse(&["--nats", "nats://x", "--cache", "users", "--partition", "4", "--partitions", "4"]).is_err());
        assert!(Cli::try_parse_from(["tail", "--cache", "users"]).is_err());
        assert!(Cli::try_parse_from(["tail", "--cache", "u", "--redis", "r", "--nats", "n"]).is_err());
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        assert_eq!(clock(1_700_000_000_123_456), "22:13:20.123");
    }
}

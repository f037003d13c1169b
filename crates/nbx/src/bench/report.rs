//! The report: every figure with its ratio to the peer and its target, as
//! one JSON object or as a table.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::cluster::{ClusterFigures, TransportFigures};
use super::hit_ratio::HitRatio;
use super::listener::ListenerOverhead;
use super::memory::Memory;
use super::stream::{Latencies, StreamFigures};
use super::sweep::Sweep;
use super::throughput::Throughput;
use crate::dates::civil_from_days;

/// Everything one run measured.
pub(crate) struct Figures {
    /// Whether the run was `--quick`.
    pub(crate) quick: bool,
    /// Single-thread put/get rates, ours and the peers'.
    pub(crate) throughput: Throughput,
    /// The time to sweep the entries that came due among all the others.
    pub(crate) sweep: Sweep,
    /// Put time with an idle stream against none.
    pub(crate) listener: ListenerOverhead,
    /// End-to-end stream throughput, with 1 and 4 partitions, paired with
    /// moka's inserts.
    pub(crate) stream: StreamFigures,
    /// Read-through hit ratio on a Zipf trace.
    pub(crate) hit_ratio: HitRatio,
    /// Heap bytes per entry.
    pub(crate) memory: Memory,
    /// Put-to-subscriber latency, beside its peers.
    pub(crate) latency: Latencies,
    /// Node to node over Redis and NATS, and the invalidator, against the
    /// engines' raw clients.
    pub(crate) cluster: ClusterFigures,
}

/// A goal for one figure.
#[derive(Clone, Copy)]
enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met(self, value: f64) -> bool {
        match self {
            Self::AtLeast(goal) => value >= goal,
            Self::AtMost(goal) => value <= goal,
        }
    }

    fn label(self) -> String {
        match self {
            Self::AtLeast(goal) => format!(">= {goal}"),
            Self::AtMost(goal) => format!("<= {goal}"),
        }
    }
}

/// One line of the table.
struct Row {
    figure: String,
    ours: String,
    peer: String,
    /// Ours ÷ the peer's, when there is a peer.
    ratio: Option<f64>,
    /// The goal, and the value it applies to (the ratio, or ours alone).
    target: Option<(Target, f64)>,
}

/// `a / b`, 0 when `b` is 0.
pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

/// A rate rounded to a whole number.
fn whole(x: f64) -> u64 {
    // `as` saturates: negative or NaN gives 0, which no rate here is.
    x.round() as u64
}

/// `x` rounded to `digits` decimals.
fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

impl Figures {
    fn put_vs_moka(&self) -> f64 {
        ratio(self.throughput.put, self.throughput.moka_insert)
    }
    fn put_vs_quick_cache(&self) -> f64 {
        ratio(self.throughput.put, self.throughput.quick_cache_insert)
    }
    fn get_vs_moka(&self) -> f64 {
        ratio(self.throughput.get, self.throughput.moka_get)
    }
    fn put_ttl_vs_moka(&self) -> f64 {
        ratio(self.throughput.ttl.put, self.throughput.moka_ttl.put)
    }
    fn get_ttl_vs_moka(&self) -> f64 {
        ratio(self.throughput.ttl.get, self.throughput.moka_ttl.get)
    }
    /// Our sweep's time over moka's (lower is better).
    fn sweep_time_vs_moka(&self) -> f64 {
        ratio(self.sweep.ours.as_secs_f64(), self.sweep.moka.as_secs_f64())
    }
    fn stream_vs_moka(&self) -> f64 {
        self.stream.vs_moka
    }
    fn partitions4_vs_1(&self) -> f64 {
        self.stream.four_vs_one
    }
    fn hit_ratio_vs_moka(&self) -> f64 {
        ratio(self.hit_ratio.ours, self.hit_ratio.moka)
    }
    fn memory_vs_moka(&self) -> f64 {
        ratio(self.memory.ours, self.memory.moka)
    }

    /// The latency figures of `"local"` (to the nanosecond: some are under a
    /// microsecond).
    fn latency_json(&self) -> Value {
        let l = &self.latency;
        json!({
            "stream_latency_p50_us": round(l.stream.p50_us, 3),
            "stream_latency_p99_us": round(l.stream.p99_us, 3),
            "channel_latency_p50_us": round(l.channel.p50_us, 3),
            "channel_latency_p99_us": round(l.channel.p99_us, 3),
            "stream_latency_vs_channel_p99": round(ratio(l.stream.p99_us, l.channel.p99_us), 3),
            "stream_busy_poll_latency_p50_us": round(l.busy_poll.p50_us, 3),
            "stream_busy_poll_latency_p99_us": round(l.busy_poll.p99_us, 3),
            "spin_handover_latency_p50_us": round(l.spin.p50_us, 3),
            "spin_handover_latency_p99_us": round(l.spin.p99_us, 3),
            "stream_busy_poll_vs_spin_p99": round(ratio(l.busy_poll.p99_us, l.spin.p99_us), 3),
        })
    }

    /// `{"local": {...}, "cluster": {...}, "meta": {"date", "cores", "quick"}}`;
    /// `"cluster": {"skipped": reason}` when no server is installed.
    pub(crate) fn to_json(&self) -> Value {
        let t = &self.throughput;
        let mut local = json!({
            "put_ops_per_sec": whole(t.put),
            "moka_insert_ops_per_sec": whole(t.moka_insert),
            "quick_cache_insert_ops_per_sec": whole(t.quick_cache_insert),
            "put_vs_moka": round(self.put_vs_moka(), 3),
            "put_vs_quick_cache": round(self.put_vs_quick_cache(), 3),
            "get_ops_per_sec": whole(t.get),
            "moka_get_ops_per_sec": whole(t.moka_get),
            "get_vs_moka": round(self.get_vs_moka(), 3),
            "put_ttl_ops_per_sec": whole(t.ttl.put),
            "moka_ttl_insert_ops_per_sec": whole(t.moka_ttl.put),
            "put_ttl_vs_moka": round(self.put_ttl_vs_moka(), 3),
            "get_ttl_ops_per_sec": whole(t.ttl.get),
            "moka_ttl_get_ops_per_sec": whole(t.moka_ttl.get),
            "get_ttl_vs_moka": round(self.get_ttl_vs_moka(), 3),
            "sweep_entries": self.sweep.entries,
            "sweep_due_entries": self.sweep.due,
            "sweep_us": round(self.sweep.ours.as_secs_f64() * 1e6, 1),
            "moka_sweep_us": round(self.sweep.moka.as_secs_f64() * 1e6, 1),
            "sweep_time_vs_moka": round(self.sweep_time_vs_moka(), 3),
            "listener_overhead": round(self.listener.ratio(), 3),
            "stream_e2e_events_per_sec": whole(self.stream.one.events_per_sec),
            "stream_e2e_lagged": self.stream.one.lagged,
            "stream_vs_moka": round(self.stream_vs_moka(), 3),
            "channel_e2e_events_per_sec": whole(self.stream.channel),
            "stream_vs_channel": round(self.stream.vs_channel, 3),
            "partitions4_e2e_events_per_sec": whole(self.stream.four.events_per_sec),
            "partitions4_e2e_lagged": self.stream.four.lagged,
            "partitions4_vs_1": round(self.partitions4_vs_1(), 3),
            "hit_ratio": round(self.hit_ratio.ours, 4),
            "moka_hit_ratio": round(self.hit_ratio.moka, 4),
            "hit_ratio_vs_moka": round(self.hit_ratio_vs_moka(), 3),
            "bytes_per_entry": round(self.memory.ours, 1),
            "moka_bytes_per_entry": round(self.memory.moka, 1),
            "memory_vs_moka": round(self.memory_vs_moka(), 3),
        });
        // Two `json!` calls: one holding every key passes the macro's
        // recursion limit. Both are objects.
        if let (Value::Object(local), Value::Object(latency)) = (&mut local, self.latency_json()) {
            local.extend(latency);
        }
        json!({
            "local": local,
            "cluster": self.cluster.to_json(),
            "meta": {
                "date": utc_now(),
                "cores": std::thread::available_parallelism().map_or(1, usize::from),
                "quick": self.quick,
            },
        })
    }

    /// Table rows of the cluster figures (none when skipped).
    fn cluster_rows(&self) -> Vec<Row> {
        let c = &self.cluster;
        let mut rows = Vec::new();
        for (name, peer, transport) in [("redis", "PUBLISH", &c.redis), ("nats", "publish", &c.nats)] {
            let Some(t) = transport else { continue };
            // The figures the brief sets targets for: Redis throughput,
            // and both engines' latency tails.
            let throughput_target = (name == "redis").then_some(Target::AtLeast(1.0));
            rows.push(Row {
                figure: format!("{name} events/s vs raw {peer}"),
                ours: ops(t.events.per_sec),
                peer: ops(t.raw_publish_per_sec),
                ratio: Some(vs_raw_publish(t)),
                target: throughput_target.map(|goal| (goal, vs_raw_publish(t))),
            });
            rows.push(latency_row(
                &format!("{name} latency p50 (us) vs raw"),
                t.latency.p50_us,
                t.raw_latency.p50_us,
                None,
            ));
            rows.push(Row {
                target: Some((Target::AtMost(2.0), latency_vs_raw_p99(t))),
                ..latency_row(&format!("{name} latency p99 (us) vs raw"), t.latency.p99_us, t.raw_latency.p99_us, None)
            });
        }
        if let Some(i) = &c.invalidation {
            let rate = ratio(i.per_sec, i.raw_publish_per_sec);
            rows.push(Row {
                figure: "invalidations/s vs raw PUBLISH".into(),
                ours: ops(i.per_sec),
                peer: ops(i.raw_publish_per_sec),
                ratio: Some(rate),
                target: Some((Target::AtLeast(1.0), rate)),
            });
            rows.push(latency_row("invalidation p50 (us) vs raw", i.latency.p50_us, i.raw_latency.p50_us, None));
            let p99 = ratio(i.latency.p99_us, i.raw_latency.p99_us);
            rows.push(Row {
                target: Some((Target::AtMost(2.0), p99)),
                ..latency_row("invalidation p99 (us) vs raw", i.latency.p99_us, i.raw_latency.p99_us, None)
            });
        }
        rows
    }

    fn rows(&self) -> Vec<Row> {
        let (t, l) = (&self.throughput, &self.latency);
        let vs = |figure: &str, ours: f64, peer: f64, value: f64, target| Row {
            figure: figure.into(),
            ours: ops(ours),
            peer: ops(peer),
            ratio: Some(value),
            target: Some((target, value)),
        };
        let mut rows = vec![
            vs("put ops/s vs moka", t.put, t.moka_insert, self.put_vs_moka(), Target::AtLeast(5.0)),
            vs(
                "put ops/s vs quick_cache",
                t.put,
                t.quick_cache_insert,
                self.put_vs_quick_cache(),
                Target::AtLeast(1.0),
            ),
            vs("get ops/s vs moka", t.get, t.moka_get, self.get_vs_moka(), Target::AtLeast(2.0)),
            Row {
                figure: "put ops/s vs moka, 1 h TTL".into(),
                ours: ops(t.ttl.put),
                peer: ops(t.moka_ttl.put),
                ratio: Some(self.put_ttl_vs_moka()),
                target: None,
            },
            Row {
                figure: "get ops/s vs moka, 1 h TTL".into(),
                ours: ops(t.ttl.get),
                peer: ops(t.moka_ttl.get),
                ratio: Some(self.get_ttl_vs_moka()),
                target: None,
            },
            Row {
                figure: format!("sweep us, {} due of {}, vs moka", self.sweep.due, self.sweep.entries),
                ours: format!("{:.1}", self.sweep.ours.as_secs_f64() * 1e6),
                peer: format!("{:.1}", self.sweep.moka.as_secs_f64() * 1e6),
                ratio: Some(self.sweep_time_vs_moka()),
                target: None,
            },
            Row {
                figure: "put ms, idle stream vs none".into(),
                ours: format!("{:.1}", self.listener.streamed.as_secs_f64() * 1e3),
                peer: format!("{:.1}", self.listener.plain.as_secs_f64() * 1e3),
                ratio: Some(self.listener.ratio()),
                target: Some((Target::AtMost(1.10), self.listener.ratio())),
            },
            vs(
                "stream e2e events/s vs moka put",
                self.stream.one.events_per_sec,
                self.stream.moka_insert,
                self.stream_vs_moka(),
                Target::AtLeast(3.0),
            ),
            Row {
                figure: "stream e2e events/s vs map + channel".into(),
                ours: ops(self.stream.one.events_per_sec),
                peer: ops(self.stream.channel),
                ratio: Some(self.stream.vs_channel),
                target: None,
            },
            vs(
                "4 partitions e2e vs 1",
                self.stream.four.events_per_sec,
                self.stream.one.events_per_sec,
                self.partitions4_vs_1(),
                Target::AtLeast(0.9),
            ),
            Row {
                figure: "hit ratio, Zipf 0.99 (vs moka)".into(),
                ours: format!("{:.4}", self.hit_ratio.ours),
                peer: format!("{:.4}", self.hit_ratio.moka),
                ratio: Some(self.hit_ratio_vs_moka()),
                target: Some((Target::AtLeast(0.95), self.hit_ratio_vs_moka())),
            },
            Row {
                figure: "heap bytes/entry vs moka".into(),
                ours: format!("{:.1}", self.memory.ours),
                peer: format!("{:.1}", self.memory.moka),
                ratio: Some(self.memory_vs_moka()),
                target: Some((Target::AtMost(1.0), self.memory_vs_moka())),
            },
            latency_row("stream latency p50 (us) vs tokio channel", l.stream.p50_us, l.channel.p50_us, None),
            latency_row(
                "stream latency p99 (us) vs tokio channel",
                l.stream.p99_us,
                l.channel.p99_us,
                Some(LATENCY_TARGET),
            ),
            latency_row("busy-poll latency p50 (us) vs spin", l.busy_poll.p50_us, l.spin.p50_us, None),
            latency_row("busy-poll latency p99 (us) vs spin", l.busy_poll.p99_us, l.spin.p99_us, None),
        ];
        rows.extend(self.cluster_rows());
        rows
    }

    /// A readable table: figure, ours, peer, ratio, target, and whether the
    /// target is met.
    pub(crate) fn to_table(&self) -> String {
        let mut out = String::new();
        let mode = if self.quick { "quick" } else { "full" };
        let _ = writeln!(
            out,
            "nbx bench ({mode}, {}, {} cores; ratio = ours / peer; stream lagged: {} / {})",
            utc_now(),
            std::thread::available_parallelism().map_or(1, usize::from),
            self.stream.one.lagged,
            self.stream.four.lagged,
        );
        let c = &self.cluster;
        let count =
            |t: &Option<TransportFigures>, of: fn(&TransportFigures) -> String| t.as_ref().map_or("-".to_string(), of);
        let lagged = |t: &TransportFigures| t.events.lagged.to_string();
        let raw_lost = |t: &TransportFigures| t.raw_lost.to_string();
        let _ = writeln!(
            out,
            "cluster: {} events per throughput figure; lagged: redis {}, nats {}; raw lost: redis {}, nats {}; \
             invalidator resyncs: {}",
            c.events,
            count(&c.redis, lagged),
            count(&c.nats, lagged),
            count(&c.redis, raw_lost),
            count(&c.nats, raw_lost),
            c.invalidation.as_ref().map_or("-".to_string(), |i| i.resyncs.to_string()),
        );
        if !c.skipped.is_empty() {
            let _ = writeln!(out, "cluster: skipped: {}", c.skipped.join("; "));
        }
        let rows = self.rows();
        let width = rows.iter().map(|r| r.figure.chars().count()).max().unwrap_or(0);
        table_line(&mut out, width, ["figure", "ours", "peer", "ratio", "target", "met"]);
        for row in rows {
            let ratio = row.ratio.map_or_else(|| "-".to_string(), |r| format!("{r:.3}"));
            let (target, met) = match row.target {
                Some((target, value)) => (target.label(), if target.met(value) { "yes" } else { "NO" }),
                None => ("-".to_string(), ""),
            };
            table_line(&mut out, width, [&row.figure, &row.ours, &row.peer, &ratio, &target, met]);
        }
        if let Some(floor) = self.latency_floor_note() {
            let _ = writeln!(out, "{floor}");
        }
        out
    }

    /// When the stream and even the spin hand-over missed the latency
    /// target: a line under the table that says so.
    fn latency_floor_note(&self) -> Option<String> {
        let l = &self.latency;
        (!LATENCY_TARGET.met(l.stream.p99_us) && !LATENCY_TARGET.met(l.spin.p99_us)).then(|| {
            format!(
                "note: the spin hand-over, whose threads never sleep, had a p99 of {:.1} us in windows beside the \
                 stream's: this machine held no hand-over between two cores to the target ({} us) in this run",
                l.spin.p99_us,
                LATENCY_TARGET.label()
            )
        })
    }
}

/// The goal for the stream's p99 latency, in microseconds.
const LATENCY_TARGET: Target = Target::AtMost(50.0);

impl ClusterFigures {
    /// The cluster figures: every measured one, and `skipped` with the
    /// reasons for any that were not.
    pub(crate) fn to_json(&self) -> Value {
        let c = self;
        let mut out = Map::new();
        let skipped = c.skipped.join("; ");
        if c.redis.is_none() && c.nats.is_none() && c.invalidation.is_none() {
            out.insert("skipped".into(), json!(skipped));
            return Value::Object(out);
        }
        out.insert("events".into(), json!(c.events));
        for (name, transport) in [("redis", &c.redis), ("nats", &c.nats)] {
            let Some(t) = transport else { continue };
            let mut put = |key: &str, value: Value| out.insert(format!("{name}_{key}"), value);
            put("events_per_sec", json!(whole(t.events.per_sec)));
            put("lagged", json!(t.events.lagged));
            put("raw_publish_per_sec", json!(whole(t.raw_publish_per_sec)));
            put("raw_lost", json!(t.raw_lost));
            put("vs_raw_publish", json!(round(vs_raw_publish(t), 3)));
            put("latency_p50_us", json!(round(t.latency.p50_us, 1)));
            put("latency_p99_us", json!(round(t.latency.p99_us, 1)));
            put("raw_latency_p50_us", json!(round(t.raw_latency.p50_us, 1)));
            put("raw_latency_p99_us", json!(round(t.raw_latency.p99_us, 1)));
            put("latency_vs_raw_p99", json!(round(latency_vs_raw_p99(t), 3)));
        }
        if let Some(i) = &c.invalidation {
            out.insert("invalidations_per_sec".into(), json!(whole(i.per_sec)));
            out.insert("invalidations_vs_raw_publish".into(), json!(round(ratio(i.per_sec, i.raw_publish_per_sec), 3)));
            out.insert("invalidation_p50_us".into(), json!(round(i.latency.p50_us, 1)));
            out.insert("invalidation_p99_us".into(), json!(round(i.latency.p99_us, 1)));
            out.insert(
                "invalidation_vs_raw_p99".into(),
                json!(round(ratio(i.latency.p99_us, i.raw_latency.p99_us), 3)),
            );
            out.insert("invalidation_resyncs".into(), json!(i.resyncs));
        }
        if !c.skipped.is_empty() {
            out.insert("skipped".into(), json!(skipped));
        }
        Value::Object(out)
    }
}

/// A row of latencies in microseconds, ours beside a peer's; `target`
/// applies to ours (a goal for the ratio replaces the row's `target`).
fn latency_row(figure: &str, ours: f64, peer: f64, target: Option<Target>) -> Row {
    // Two decimals below 10 us, where the sub-microsecond figures are.
    let us = |x: f64| if x < 10.0 { format!("{x:.2}") } else { format!("{x:.1}") };
    Row {
        figure: figure.into(),
        ours: us(ours),
        peer: us(peer),
        ratio: Some(ratio(ours, peer)),
        target: target.map(|goal| (goal, ours)),
    }
}

/// Ours ÷ the raw client's messages per second.
fn vs_raw_publish(t: &TransportFigures) -> f64 {
    ratio(t.events.per_sec, t.raw_publish_per_sec)
}

/// Ours ÷ the raw client's p99 latency.
fn latency_vs_raw_p99(t: &TransportFigures) -> f64 {
    ratio(t.latency.p99_us, t.raw_latency.p99_us)
}

/// One line of the table (figure, ours, peer, ratio, target, met), its
/// first column `width` characters wide.
fn table_line(out: &mut String, width: usize, [figure, ours, peer, ratio, target, met]: [&str; 6]) {
    let line = format!("{figure:<width$} {ours:>14} {peer:>14} {ratio:>8}  {target:<8} {met}");
    let _ = writeln!(out, "{}", line.trim_end());
}

/// Operations per second with thousands separators.
pub(crate) fn ops(rate: f64) -> String {
    let digits = format!("{:.0}", rate.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The current UTC time, `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3_600, rem % 3_600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }

    #[test]
    fn thousands() {
        assert_eq!(ops(0.0), "0");
        assert_eq!(ops(999.0), "999");
        assert_eq!(ops(1_000.0), "1,000");
        assert_eq!(ops(12_345_678.4), "12,345,678");
    }

    #[test]
    fn cluster_without_servers_is_skipped_with_the_reason() {
        let cluster = ClusterFigures {
            events: 10,
            redis: None,
            nats: None,
            invalidation: None,
            skipped: vec!["redis-server is not installed".into(), "nats-server is not installed".into()],
        };
        assert_eq!(
            cluster.to_json(),
            json!({"skipped": "redis-server is not installed; nats-server is not installed"})
        );
    }

    #[test]
    fn cluster_figures_and_their_ratios() {
        use super::super::cluster::Events;
        let transport = || TransportFigures {
            events: Events { per_sec: 400_000.0, lagged: 0 },
            raw_publish_per_sec: 200_000.0,
            raw_lost: 0,
            latency: super::super::stream::Latency { p50_us: 60.0, p99_us: 150.0 },
            raw_latency: super::super::stream::Latency { p50_us: 40.0, p99_us: 100.0 },
        };
        let cluster = ClusterFigures {
            events: 10,
            redis: Some(transport()),
            nats: None,
            invalidation: None,
            skipped: vec!["nats-server is not installed".into()],
        };
        let json = cluster.to_json();
        assert_eq!(json["redis_events_per_sec"], json!(400_000));
        assert_eq!(json["redis_vs_raw_publish"], json!(2.0));
        assert_eq!(json["redis_latency_vs_raw_p99"], json!(1.5));
        assert_eq!(json["redis_lagged"], json!(0));
        assert_eq!(json["redis_raw_lost"], json!(0));
        assert_eq!(json["skipped"], json!("nats-server is not installed"));
        assert!(json.get("nats_events_per_sec").is_none());
    }

    #[test]
    fn the_table_lines_up_under_its_header() {
        let table = super::super::chart::tests::figures(true).to_table();
        let lines: Vec<&str> =
            table.lines().skip_while(|l| !l.starts_with("figure ")).take_while(|l| !l.starts_with("note: ")).collect();
        assert!(lines.len() > 20, "{table}");
        // Every value column ends where its header does.
        let ends = |line: &str| -> Vec<usize> {
            let mut ends = Vec::new();
            let chars: Vec<char> = line.chars().collect();
            for i in 1..chars.len() {
                if chars[i] == ' ' && chars[i - 1] != ' ' {
                    ends.push(i);
                }
            }
            ends
        };
        let header: Vec<usize> = ends(lines[0]);
        let (ours_end, ratio_end) = (header[1], header[3]);
        for line in &lines[1..] {
            let line_ends = ends(line);
            assert!(line_ends.contains(&ours_end) && line_ends.contains(&ratio_end), "{line:?} misaligned in\n{table}");
        }
    }

    #[test]
    fn latency_figures_sit_in_local_beside_their_peers() {
        use super::super::stream::Latency;
        let mut figures = super::super::chart::tests::figures(false);
        figures.latency = Latencies {
            stream: Latency { p50_us: 30.0, p99_us: 90.0 },
            channel: Latency { p50_us: 30.0, p99_us: 60.0 },
            busy_poll: Latency { p50_us: 0.8, p99_us: 40.0 },
            spin: Latency { p50_us: 0.1, p99_us: 20.0 },
        };
        let json = figures.to_json();
        let local = &json["local"];
        assert_eq!(local["put_vs_moka"], json!(round(6e6 / 7e5, 3)), "the other figures stay");
        assert_eq!(local["stream_latency_p99_us"], json!(90.0));
        assert_eq!(local["stream_latency_vs_channel_p99"], json!(1.5));
        assert_eq!(local["stream_busy_poll_latency_p50_us"], json!(0.8));
        assert_eq!(local["spin_handover_latency_p99_us"], json!(20.0));
        assert_eq!(local["stream_busy_poll_vs_spin_p99"], json!(2.0));
        let table = figures.to_table();
        let row = table.lines().find(|l| l.starts_with("busy-poll latency p99")).expect("a busy-poll row");
        assert!(row.contains("40.0") && row.contains("20.0") && row.contains("2.000"), "{row}");
        assert!(!table.contains("note:"), "the spin hand-over met the target: no note\n{table}");

        figures.latency.spin.p99_us = 169.1;
        let table = figures.to_table();
        let note = table.lines().last().expect("a last line");
        assert!(note.starts_with("note: the spin hand-over") && note.contains("169.1 us") && note.contains("<= 50 us"));

        figures.latency.stream.p99_us = 45.0;
        assert!(!figures.to_table().contains("note:"), "the stream met the target: no note");
    }

    #[test]
    fn targets() {
        assert!(Target::AtLeast(5.0).met(5.0));
        assert!(!Target::AtLeast(5.0).met(4.9));
        assert!(Target::AtMost(1.1).met(1.05));
        assert!(!Target::AtMost(1.1).met(1.2));
    }
}

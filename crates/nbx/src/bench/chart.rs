//! `--svg FILE`: the rates of the report as a bar chart, ours beside the
//! peers' in each configuration, on a log scale (they span three orders of
//! magnitude, from network events to in-process puts).
//!
//! Drawn with plotters' SVG backend alone: no system fonts are needed, the
//! text goes into the SVG as `<text>` and the viewer renders it.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{ops, Figures};
use super::BenchResult;

/// Width and height of the picture, in pixels.
const WIDTH: u32 = 1_100;
/// Height of one bar row, in pixels.
const ROW: u32 = 26;

/// Ours.
const OURS: RGBColor = RGBColor(31, 119, 180);
/// A peer (moka, quick_cache, a raw client).
const PEER: RGBColor = RGBColor(170, 170, 170);

/// One bar.
struct Bar {
    label: String,
    value: f64,
    ours: bool,
}

/// A configuration: ours and the peers measured beside it.
struct Group {
    title: &'static str,
    bars: Vec<Bar>,
}

fn bar(label: &str, value: f64, ours: bool) -> Bar {
    Bar { label: label.to_string(), value, ours }
}

/// The configurations of the chart; the cluster ones only when measured.
fn groups(f: &Figures) -> Vec<Group> {
    let t = &f.throughput;
    let mut groups = vec![
        Group {
            title: "put",
            bars: vec![
                bar("nebulex put", t.put, true),
                bar("moka insert", t.moka_insert, false),
                bar("quick_cache insert", t.quick_cache_insert, false),
            ],
        },
        Group { title: "get", bars: vec![bar("nebulex get", t.get, true), bar("moka get", t.moka_get, false)] },
        Group {
            title: "put, 1 h TTL",
            bars: vec![
                bar("nebulex put, 1 h TTL", t.ttl.put, true),
                bar("moka insert, 1 h TTL", t.moka_ttl.put, false),
            ],
        },
        Group {
            title: "get, 1 h TTL",
            bars: vec![bar("nebulex get, 1 h TTL", t.ttl.get, true), bar("moka get, 1 h TTL", t.moka_ttl.get, false)],
        },
        Group {
            title: "stream e2e",
            bars: vec![
                bar("stream e2e, 1 partition", f.stream.one.events_per_sec, true),
                bar("stream e2e, 4 partitions", f.stream.four.events_per_sec, true),
                bar("moka insert", t.moka_insert, false),
                bar("map + channel (hardware's reach)", f.stream.channel, false),
            ],
        },
    ];
    let c = &f.cluster;
    if let Some(redis) = &c.redis {
        groups.push(Group {
            title: "Redis",
            bars: vec![
                bar("redis events, node to node", redis.events.per_sec, true),
                bar("redis raw PUBLISH", redis.raw_publish_per_sec, false),
            ],
        });
    }
    if let Some(nats) = &c.nats {
        groups.push(Group {
            title: "NATS",
            bars: vec![
                bar("nats events, node to node", nats.events.per_sec, true),
                bar("nats raw publish", nats.raw_publish_per_sec, false),
            ],
        });
    }
    if let Some(inv) = &c.invalidation {
        groups.push(Group {
            title: "Invalidator",
            bars: vec![
                bar("invalidations (redis)", inv.per_sec, true),
                bar("redis raw PUBLISH", inv.raw_publish_per_sec, false),
            ],
        });
    }
    groups
}

/// The chart as an SVG document.
pub(crate) fn svg(figures: &Figures) -> BenchResult<String> {
    let groups = groups(figures);
    // Rows, top to bottom: each group's title, then its bars.
    let rows: usize = groups.iter().map(|g| g.bars.len() + 1).sum();
    let values = groups.iter().flat_map(|g| g.bars.iter().map(|b| b.value)).filter(|v| *v > 0.0);
    let (low, high) = values.fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    // From a whole power of ten below the values; room for the labels above.
    let low = 10f64.powf((low.min(high) / 2.0).log10().floor()).max(1.0);
    let high = high * 2.5;
    let height = 100 + ROW * rows as u32;
    let subtitle = format!(
        "{} run, {} cores; blue: nebulex, grey: the peer measured beside it in the same run",
        if figures.quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(1, usize::from),
    );

    let mut out = String::new();
    {
        let full = SVGBackend::with_string(&mut out, (WIDTH, height)).into_drawing_area();
        full.fill(&WHITE)?;
        let area = full.titled("nbx bench: operations or events per second (log scale)", ("sans-serif", 20))?;
        area.draw(&Text::new(subtitle, (12, 2), ("sans-serif", 12).into_font().color(&BLACK.mix(0.7))))?;
        let mut chart = ChartBuilder::on(&area)
            .margin_top(24)
            .margin_right(100)
            .margin_left(10)
            .margin_bottom(10)
            .x_label_area_size(30)
            .y_label_area_size(190)
            .build_cartesian_2d((low..high).log_scale(), 0f64..rows as f64)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_label_formatter(&|v| compact(*v))
            .label_style(("sans-serif", 12))
            .draw()?;

        // The middle of row `row` (0 at the top), in chart coordinates.
        let middle = |row: usize| (rows - row) as f64 - 0.5;
        let label_style = ("sans-serif", 12).into_font().color(&BLACK).pos(Pos::new(HPos::Right, VPos::Center));
        let value_style = ("sans-serif", 12).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
        let title_style =
            ("sans-serif", 13).into_font().style(FontStyle::Bold).color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
        let mut row = 0usize;
        for group in &groups {
            let (x, y) = chart.backend_coord(&(low, middle(row)));
            full.draw(&Text::new(group.title, (x - 180, y), title_style.clone()))?;
            row += 1;
            for b in &group.bars {
                let color = if b.ours { OURS } else { PEER };
                let value = b.value.max(low);
                let (top, bottom) = (middle(row) + 0.4, middle(row) - 0.4);
                chart.draw_series(std::iter::once(Rectangle::new([(low, bottom), (value, top)], color.filled())))?;
                chart.draw_series(std::iter::once(Text::new(
                    format!("{}/s", ops(b.value)),
                    (value * 1.06, middle(row)),
                    value_style.clone(),
                )))?;
                let (x, y) = chart.backend_coord(&(low, middle(row)));
                full.draw(&Text::new(b.label.clone(), (x - 8, y), label_style.clone()))?;
                row += 1;
            }
        }
        full.present()?;
    }
    Ok(out)
}

/// `1.5M`, `650k`, `900`.
fn compact(x: f64) -> String {
    if x >= 1e6 {
        format!("{}M", trim(x / 1e6))
    } else if x >= 1e3 {
        format!("{}k", trim(x / 1e3))
    } else {
        format!("{x:.0}")
    }
}

/// One decimal, without a trailing `.0`.
fn trim(x: f64) -> String {
    let s = format!("{x:.1}");
    s.strip_suffix(".0").map_or(s.clone(), str::to_string)
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::super::cluster::{ClusterFigures, Events, TransportFigures};
    use super::super::hit_ratio::HitRatio;
    use super::super::invalidation::Invalidation;
    use super::super::listener::ListenerOverhead;
    use super::super::memory::Memory;
    use super::super::stream::{E2e, Latencies, Latency, StreamFigures};
    use super::super::sweep::Sweep;
    use super::super::throughput::{PutGet, Throughput};
    use super::*;

    /// Figures of a run, with or without the cluster's.
    pub(crate) fn figures(cluster: bool) -> Figures {
        let latency = || Latency { p50_us: 50.0, p99_us: 100.0 };
        let transport = || TransportFigures {
            events: Events { per_sec: 1_000_000.0, lagged: 0 },
            raw_publish_per_sec: 300_000.0,
            raw_lost: 0,
            latency: latency(),
            raw_latency: latency(),
        };
        Figures {
            quick: true,
            throughput: Throughput {
                put: 6e6,
                moka_insert: 7e5,
                quick_cache_insert: 5e6,
                get: 9e6,
                moka_get: 6e5,
                ttl: PutGet { put: 5e6, get: 8e6 },
                moka_ttl: PutGet { put: 6e5, get: 5e5 },
            },
            sweep: Sweep {
                entries: 1_000_000,
                due: 278,
                ours: Duration::from_micros(200),
                moka: Duration::from_micros(900),
            },
            listener: ListenerOverhead { plain: Duration::from_millis(100), streamed: Duration::from_millis(102) },
            stream: StreamFigures {
                one: E2e { events_per_sec: 2e6, lagged: 0 },
                four: E2e { events_per_sec: 2.1e6, lagged: 0 },
                moka_insert: 7e5,
                vs_moka: 2.9,
                four_vs_one: 1.05,
                channel: 5e6,
                vs_channel: 0.4,
            },
            hit_ratio: HitRatio { ours: 0.6, moka: 0.63 },
            memory: Memory { ours: 86.0, moka: 241.0 },
            latency: Latencies { stream: latency(), channel: latency(), busy_poll: latency(), spin: latency() },
            cluster: ClusterFigures {
                events: 1_000,
                redis: cluster.then(transport),
                nats: cluster.then(transport),
                invalidation: cluster.then(|| Invalidation {
                    per_sec: 800_000.0,
                    resyncs: 0,
                    latency: latency(),
                    raw_publish_per_sec: 300_000.0,
                    raw_latency: latency(),
                }),
                skipped: if cluster { Vec::new() } else { vec!["redis-server is not installed".into()] },
            },
        }
    }

    #[test]
    fn chart_shows_ours_beside_every_peer() {
        let svg = svg(&figures(true)).expect("an SVG");
        assert!(svg.starts_with("<svg"), "{svg}");
        for label in [
            "nebulex put",
            "quick_cache insert",
            "moka get",
            "moka get, 1 h TTL",
            "stream e2e, 4 partitions",
            "map + channel (hardware",
            "redis events, node to node",
            "redis raw PUBLISH",
            "nats raw publish",
            "invalidations (redis)",
            "6,000,000/s",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        assert_eq!(svg.matches(&format!("fill=\"#{:02X}{:02X}{:02X}\"", OURS.0, OURS.1, OURS.2)).count(), 9);
    }

    #[test]
    fn chart_leaves_out_what_was_not_measured() {
        let svg = svg(&figures(false)).expect("an SVG");
        assert!(svg.contains("nebulex get"));
        assert!(!svg.contains("redis"), "no cluster bars without servers");
    }

    #[test]
    fn compact_rates() {
        assert_eq!(compact(1_500_000.0), "1.5M");
        assert_eq!(compact(650_000.0), "650k");
        assert_eq!(compact(10_000.0), "10k");
        assert_eq!(compact(900.0), "900");
    }
}

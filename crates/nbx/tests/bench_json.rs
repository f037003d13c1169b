//! `nbx bench --quick --json`: one JSON object on stdout holding every local
//! and cluster figure as a finite positive number, and the whole quick run
//! (local and cluster, on the machine's 2 cores) within a minute.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// The quick run's time budget (the requirement).
const BUDGET: Duration = Duration::from_secs(60);

/// Figures under `"local"`.
const LOCAL: &[&str] = &[
    "put_ops_per_sec",
    "moka_insert_ops_per_sec",
    "quick_cache_insert_ops_per_sec",
    "put_vs_moka",
    "put_vs_quick_cache",
    "get_vs_moka",
    "put_ttl_ops_per_sec",
    "moka_ttl_insert_ops_per_sec",
    "put_ttl_vs_moka",
    "get_ttl_ops_per_sec",
    "moka_ttl_get_ops_per_sec",
    "get_ttl_vs_moka",
    "sweep_entries",
    "sweep_due_entries",
    "sweep_us",
    "moka_sweep_us",
    "sweep_time_vs_moka",
    "listener_overhead",
    "stream_e2e_events_per_sec",
    "stream_vs_moka",
    "channel_e2e_events_per_sec",
    "stream_vs_channel",
    "partitions4_e2e_events_per_sec",
    "hit_ratio_vs_moka",
    "bytes_per_entry",
    "moka_bytes_per_entry",
    "memory_vs_moka",
    "stream_latency_p50_us",
    "stream_latency_p99_us",
    "channel_latency_p50_us",
    "channel_latency_p99_us",
    "stream_latency_vs_channel_p99",
    "stream_busy_poll_latency_p50_us",
    "stream_busy_poll_latency_p99_us",
    "spin_handover_latency_p50_us",
    "spin_handover_latency_p99_us",
    "stream_busy_poll_vs_spin_p99",
];

/// Figures under `"cluster"`.
const CLUSTER: &[&str] = &[
    "redis_events_per_sec",
    "redis_raw_publish_per_sec",
    "redis_vs_raw_publish",
    "redis_latency_p50_us",
    "redis_latency_p99_us",
    "redis_raw_latency_p50_us",
    "redis_raw_latency_p99_us",
    "redis_latency_vs_raw_p99",
    "nats_events_per_sec",
    "nats_raw_publish_per_sec",
    "nats_vs_raw_publish",
    "nats_latency_p50_us",
    "nats_latency_p99_us",
    "nats_raw_latency_p99_us",
    "nats_latency_vs_raw_p99",
    "invalidations_per_sec",
    "invalidations_vs_raw_publish",
    "invalidation_p50_us",
    "invalidation_p99_us",
    "invalidation_vs_raw_p99",
];

/// Counts under `"cluster"`: present, 0 when nothing was lost.
const CLUSTER_COUNTS: &[&str] =
    &["redis_lagged", "nats_lagged", "redis_raw_lost", "nats_raw_lost", "invalidation_resyncs"];

/// The optimized `nbx`: the budget is for a release build. Under a debug
/// `cargo test`, builds it first (not timed; nearly free when up to date).
fn release_binary() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_nbx"));
    if !cfg!(debug_assertions) {
        return built;
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "-p", "nbx", "--manifest-path"])
        .arg(&manifest)
        .status()
        .expect("run cargo build --release -p nbx");
    assert!(status.success(), "cargo build --release -p nbx failed");
    // target/debug/nbx -> target/release/nbx
    let target = built.parent().and_then(|profile| profile.parent()).expect("a target directory");
    target.join("release").join(built.file_name().expect("a file name"))
}

/// `object[key]`, which must be a finite number, above zero when `positive`
/// (else at least zero).
fn number(object: &Map<String, Value>, section: &str, key: &str, positive: bool) -> f64 {
    let value = object.get(key).unwrap_or_else(|| panic!("{section}.{key} is missing from {object:?}"));
    let x = value.as_f64().unwrap_or_else(|| panic!("{section}.{key} is not a number: {value}"));
    assert!(x.is_finite(), "{section}.{key} is not finite: {x}");
    if positive {
        assert!(x > 0.0, "{section}.{key} is not positive: {x}");
    } else {
        assert!(x >= 0.0, "{section}.{key} is negative: {x}");
    }
    x
}

#[test]
fn quick_json_report_has_every_figure_within_a_minute() {
    for server in ["redis-server", "nats-server"] {
        assert!(
            nebulex_testkit::available(server),
            "the cluster figures need {server}: install it (Debian: apt-get install -y {server}), as scripts/test does"
        );
    }
    let binary = release_binary();

    let start = Instant::now();
    let output = Command::new(&binary).args(["bench", "--quick", "--json"]).output().expect("run nbx bench");
    let elapsed = start.elapsed();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "nbx bench failed ({}):\n{stderr}", output.status);
    let stdout = String::from_utf8(output.stdout).expect("stdout is UTF-8");
    let documents: Vec<Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stdout}"));
    assert_eq!(documents.len(), 1, "stdout holds exactly one JSON document:\n{stdout}");
    let report = documents[0].as_object().unwrap_or_else(|| panic!("the report is not an object: {stdout}"));

    let local = report.get("local").and_then(Value::as_object).expect("a \"local\" object");
    for key in LOCAL {
        number(local, "local", key, true);
    }
    let cluster = report.get("cluster").and_then(Value::as_object).expect("a \"cluster\" object");
    assert!(!cluster.contains_key("skipped"), "cluster figures skipped: {:?}", cluster.get("skipped"));
    for key in CLUSTER {
        number(cluster, "cluster", key, true);
    }
    for key in CLUSTER_COUNTS {
        number(cluster, "cluster", key, false);
    }

    assert!(
        elapsed < BUDGET,
        "nbx bench --quick took {:.1} s, over the {BUDGET:?} budget:\n{stderr}",
        elapsed.as_secs_f64()
    );
}

//! What a started stream with no subscriber costs a writer (guarantee 2 of
//! the design: at most 10 %).

use std::time::Duration;

use nebulex_streams::Streams;

use super::workload::{median, time, Keys};
use super::{new_cache, BenchResult, Config};

/// Median fill times with and without a stream.
pub(crate) struct ListenerOverhead {
    /// Median time to put every key into a fresh cache with no stream.
    pub(crate) plain: Duration,
    /// Median time to put every key into a fresh cache whose stream is
    /// started but has no subscriber.
    pub(crate) streamed: Duration,
}

impl ListenerOverhead {
    /// `streamed / plain`: 1.0 means the stream costs nothing.
    pub(crate) fn ratio(&self) -> f64 {
        self.streamed.as_secs_f64() / self.plain.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// Alternates plain and streamed fills for `config.listener_rounds` rounds,
/// swapping which goes first every round, and takes the median of each side
/// so that noise does not favour one.
pub(crate) fn measure(config: &Config, keys: &Keys) -> BenchResult<ListenerOverhead> {
    let (mut plain, mut streamed) = (Vec::new(), Vec::new());
    for round in 0..config.listener_rounds {
        for with_stream in [round % 2 == 1, round % 2 == 0] {
            let elapsed = fill(config, keys, with_stream)?.as_secs_f64();
            if with_stream {
                streamed.push(elapsed);
            } else {
                plain.push(elapsed);
            }
        }
    }
    Ok(ListenerOverhead {
        plain: Duration::from_secs_f64(median(&plain)),
        streamed: Duration::from_secs_f64(median(&streamed)),
    })
}

/// Time to put every key into a fresh cache, with or without a started
/// stream (never with a subscriber).
fn fill(config: &Config, keys: &Keys, with_stream: bool) -> BenchResult<Duration> {
    let cache = new_cache(config.capacity)?;
    let streams = if with_stream { Some(Streams::builder(&cache).start()?) } else { None };
    let elapsed = time(|| {
        for &k in &keys.insert {
            cache.put(k, k);
        }
    });
    if let Some(streams) = streams {
        streams.stop();
    }
    Ok(elapsed)
}

//! The monotonic counter both of the cache's clocks read: the CPU's
//! time-stamp counter, mapped to the system's monotonic clock by a line that
//! is fitted again and again as the process runs.
//!
//! The counter's rate is first estimated in well under a millisecond, when
//! the process starts: on a busy machine that estimate was measured up to
//! 0.03 % off (a second an hour), and the system clock itself is steered by
//! NTP (by up to 0.05 %), which a fixed rate would not follow. So every so
//! often (after 1 ms, then twice as long each time, up to every
//! [`MAX_INTERVAL`]) one reader takes a reading of both clocks and starts a
//! new line: its rate is measured over the whole run so far, and it is
//! steered so as to meet the system clock by the next reading. A line starts
//! a little ahead of the reading it comes from ([`LEAD`]), so that no thread
//! can still be reading by the old line past the new one's start: a thread's
//! readings never go back, whichever thread fits the lines.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use super::saturating_nanos;

/// Slopes are nanoseconds per tick, in fixed point with this many bits of fraction.
const FRACTION_BITS: u32 = 32;
/// How far ahead of its reading a new line starts, in nanoseconds.
const LEAD: u64 = 50_000;
/// When the first new line is fitted, in nanoseconds after the start.
const FIRST_INTERVAL: u64 = 1_000_000;
/// The longest time between two fits, in nanoseconds.
const MAX_INTERVAL: u64 = 100_000_000;
/// How many readings of both clocks a fit takes (the narrowest one counts).
const READING_TRIES: usize = 4;
/// How many times a fit is taken again when its thread was held up so long
/// that the new line's start has already passed.
const FIT_TRIES: usize = 4;
/// How many lines are kept for readers (a reader that finds the one it read
/// overwritten meanwhile reads again).
const SLOTS: usize = 4;

/// `nanos + (tick - from) × slope`: one piece of the map from ticks to nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Line {
    from: u64,
    nanos: u64,
    slope: u64,
}

impl Line {
    /// The nanoseconds at `tick` (the line's start, for a tick before it).
    #[inline]
    fn at(self, tick: u64) -> u64 {
        self.nanos.saturating_add(scale(tick.saturating_sub(self.from), self.slope))
    }
}

/// The line in force, the one it follows (for ticks before its start), and
/// the tick at which the next one is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    before: Line,
    line: Line,
    fit_at: u64,
}

impl Segment {
    #[inline]
    fn at(self, tick: u64) -> u64 {
        if tick < self.line.from {
            self.before.at(tick)
        } else {
            self.line.at(tick)
        }
    }
}

/// `ticks × slope` in nanoseconds.
#[inline]
fn scale(ticks: u64, slope: u64) -> u64 {
    u64::try_from((u128::from(ticks) * u128::from(slope)) >> FRACTION_BITS).unwrap_or(u64::MAX)
}

/// The slope that covers `nanos` in `ticks`, if there were any ticks.
fn slope(nanos: u64, ticks: u64) -> Option<u64> {
    let slope = (u128::from(nanos) << FRACTION_BITS).checked_div(u128::from(ticks))?;
    Some(u64::try_from(slope).unwrap_or(u64::MAX))
}

/// How many ticks `nanos` take at `slope`.
fn ticks(nanos: u64, slope: u64) -> u64 {
    (u128::from(nanos) << FRACTION_BITS)
        .checked_div(u128::from(slope))
        .map_or(u64::MAX, |t| u64::try_from(t).unwrap_or(u64::MAX))
}

/// What fitting a new line needs to know of the earlier ones.
#[derive(Debug)]
struct Fit {
    /// The first reading of both clocks: the rate is measured from it.
    first: (u64, u64),
    /// Nanoseconds from the last fit to the next.
    interval: u64,
}

impl Fit {
    fn next_interval(&self) -> u64 {
        self.interval.saturating_mul(2).min(MAX_INTERVAL)
    }

    /// The segment that follows `current`, from a `reading` of both clocks
    /// (a tick and the system's nanoseconds at it), and whether the rate is
    /// to be measured from that reading on.
    ///
    /// The new line starts [`LEAD`] after the reading, where it meets the
    /// current one, with the rate measured since the first reading, steered
    /// to make up the difference between the two clocks by the next fit (its
    /// slope stays within half and twice the rate).
    ///
    /// Two things restart the measure of the rate. The system clock ahead by
    /// more than the interval (the counter was stopped, say) is caught up
    /// with at once. Ticks that went back (a counter reset on resuming from
    /// a suspend) start the new line where the current one was due to be
    /// fitted, and keep it there until its start.
    fn next(&self, current: Segment, reading: (u64, u64)) -> (Segment, bool) {
        let (tick, nanos) = reading;
        let went_back = tick < current.fit_at;
        let rate = slope(nanos.saturating_sub(self.first.1), tick.saturating_sub(self.first.0))
            .filter(|&rate| rate > 0 && !went_back)
            .unwrap_or(current.line.slope);
        let interval = self.next_interval();
        let lead = ticks(LEAD, rate);
        let from = tick.saturating_add(lead);
        let span = ticks(interval, rate).max(1);
        let ours = if went_back { current.at(current.fit_at.saturating_add(lead)) } else { current.at(from) };
        let theirs = nanos.saturating_add(LEAD);
        let stepped = theirs >= ours.saturating_add(interval);
        let line = if stepped {
            // The rate measured across the leap is no rate.
            Line { from, nanos: theirs, slope: current.line.slope }
        } else if theirs >= ours {
            let steer = slope(theirs - ours, span).unwrap_or(0);
            Line { from, nanos: ours, slope: rate.saturating_add(steer).min(rate.saturating_mul(2)) }
        } else {
            let steer = slope(ours - theirs, span).unwrap_or(0);
            Line { from, nanos: ours, slope: rate.saturating_sub(steer).max(rate / 2) }
        };
        // Until the new line's start, ticks past the reading stand still.
        let before = if went_back { Line { from: tick, nanos: line.nanos, slope: 0 } } else { current.line };
        (Segment { before, line, fit_at: from.saturating_add(span) }, stepped || went_back)
    }
}

/// The segments readers read, without locks: each is written to its own slot
/// before it is published, and a reader checks that the slot it read was not
/// overwritten meanwhile (a sequence lock per slot; a writer never writes the
/// slot in force).
struct Published {
    generation: AtomicU64,
    slots: [Slot; SLOTS],
}

#[derive(Default)]
struct Slot {
    /// The generation the slot holds (`u64::MAX` while it is written).
    generation: AtomicU64,
    fields: [AtomicU64; 7],
}

impl Published {
    fn new(first: Segment) -> Self {
        let published = Published { generation: AtomicU64::new(0), slots: Default::default() };
        published.write(0, first);
        published
    }

    fn slot(&self, generation: u64) -> &Slot {
        // The remainder is below `SLOTS`.
        &self.slots[usize::try_from(generation % SLOTS as u64).unwrap_or(0)]
    }

    #[inline]
    fn load(&self) -> Segment {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            let slot = self.slot(generation);
            let f = slot.fields.each_ref().map(|f| f.load(Ordering::Relaxed));
            fence(Ordering::Acquire);
            if slot.generation.load(Ordering::Relaxed) == generation {
                return Segment {
                    before: Line { from: f[0], nanos: f[1], slope: f[2] },
                    line: Line { from: f[3], nanos: f[4], slope: f[5] },
                    fit_at: f[6],
                };
            }
        }
    }

    /// Publishes `segment`; one writer at a time.
    fn store(&self, segment: Segment) {
        let generation = self.generation.load(Ordering::Relaxed).wrapping_add(1);
        self.write(generation, segment);
        self.generation.store(generation, Ordering::Release);
    }

    fn write(&self, generation: u64, s: Segment) {
        let slot = self.slot(generation);
        slot.generation.store(u64::MAX, Ordering::Relaxed);
        fence(Ordering::Release);
        let fields = [s.before.from, s.before.nanos, s.before.slope, s.line.from, s.line.nanos, s.line.slope, s.fit_at];
        for (field, value) in slot.fields.iter().zip(fields) {
            field.store(value, Ordering::Relaxed);
        }
        slot.generation.store(generation, Ordering::Release);
    }
}

/// The time-stamp counter (or, where it is not invariant, the system's
/// monotonic clock), read in nanoseconds since the counter was made.
pub(super) struct Counter {
    clock: quanta::Clock,
    origin: Instant,
    published: Published,
    fit: Mutex<Fit>,
}

impl Counter {
    /// A counter whose first line has the rate estimated by `quanta`.
    pub(super) fn new() -> Self {
        let clock = quanta::Clock::new();
        let slope = clock.delta_as_nanos(0, 1 << FRACTION_BITS).max(1);
        Self::with_slope(clock, slope)
    }

    fn with_slope(clock: quanta::Clock, slope: u64) -> Self {
        let (tick, origin) = narrowest(&clock, Instant::now).unwrap_or_else(|| (clock.raw(), Instant::now()));
        let line = Line { from: tick, nanos: 0, slope };
        let first = Segment { before: line, line, fit_at: tick.saturating_add(ticks(FIRST_INTERVAL, slope)) };
        let fit = Fit { first: (tick, 0), interval: FIRST_INTERVAL };
        Counter { clock, origin, published: Published::new(first), fit: Mutex::new(fit) }
    }

    /// Nanoseconds since the counter was made.
    #[inline]
    pub(super) fn nanos(&self) -> u64 {
        let tick = self.clock.raw();
        let segment = self.published.load();
        if tick >= segment.fit_at || tick < segment.before.from {
            self.fit();
        }
        segment.at(tick)
    }

    /// Fits the next line, unless another thread is at it.
    #[cold]
    fn fit(&self) {
        let Some(mut fit) = self.fit.try_lock() else { return };
        let current = self.published.load();
        let tick = self.clock.raw();
        if tick < current.fit_at && tick >= current.before.from {
            return; // fitted meanwhile
        }
        for attempt in 1..=FIT_TRIES {
            // Ticks that went back (a thread moved to a core whose counter
            // is behind) give no reading: the fit stays due.
            let Some(reading) = narrowest(&self.clock, || saturating_nanos(self.origin.elapsed())) else { return };
            let (next, restart) = fit.next(current, reading);
            // A thread may still read by the current line until the new one
            // is published: that must be before the new one starts.
            if self.clock.raw() < next.line.from || attempt == FIT_TRIES {
                self.published.store(next);
                fit.interval = fit.next_interval();
                if restart {
                    fit.first = reading;
                }
                return;
            }
        }
    }
}

/// A tick and `read()` at it: the narrowest of a few brackets of ticks around
/// a call of `read`, if the ticks went forward in any.
fn narrowest<T>(clock: &quanta::Clock, mut read: impl FnMut() -> T) -> Option<(u64, T)> {
    let mut best: Option<(u64, u64, T)> = None;
    for _ in 0..READING_TRIES {
        let before = clock.raw();
        let value = read();
        let Some(width) = clock.raw().checked_sub(before) else { continue };
        if best.as_ref().is_none_or(|&(narrowest, ..)| width < narrowest) {
            best = Some((width, before + width / 2, value));
        }
    }
    best.map(|(_, tick, value)| (tick, value))
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::*;

    /// Follows a counter of 3 ticks per nanosecond whose first line was
    /// `skew` times too fast, fitting lines as a reader would, and checks
    /// every step against the system clock, which reads `system(tick)`
    /// (within `noise` nanoseconds). Returns the largest gap after `settled`
    /// nanoseconds.
    fn follow(skew: f64, noise: u64, settled: u64, system: impl Fn(u64) -> u64) -> u64 {
        follow_ticks(skew, noise, settled, system, |tick| tick)
    }

    /// As [`follow`], with the counter reading `counter(tick)`; `settled` is
    /// in the system clock's nanoseconds since the start, without leaps.
    fn follow_ticks(
        skew: f64,
        noise: u64,
        settled: u64,
        system: impl Fn(u64) -> u64,
        counter: impl Fn(u64) -> u64,
    ) -> u64 {
        let true_slope = (1u64 << FRACTION_BITS) / 3;
        // Rounding the skewed slope is part of the skew.
        let slope = (true_slope as f64 * skew) as u64;
        let start = 1_000_000;
        let line = Line { from: start, nanos: 0, slope };
        let mut segment = Segment { before: line, line, fit_at: start + ticks(FIRST_INTERVAL, slope) };
        let mut fit = Fit { first: (start, system(start)), interval: FIRST_INTERVAL };
        let (mut last, mut worst, mut fits) = (0, 0, 0);
        // 1 s in steps of 10 µs.
        for step in 0..100_000u64 {
            let real = start + step * 30_000;
            let tick = counter(real);
            if tick >= segment.fit_at || tick < segment.before.from {
                let wobble = if fits % 2 == 0 { noise } else { 0 };
                let reading = (tick, system(real) + wobble);
                let (next, restart) = fit.next(segment, reading);
                segment = next;
                fit.interval = fit.next_interval();
                if restart {
                    fit.first = reading;
                }
                fits += 1;
            }
            let ours = segment.at(tick);
            assert!(ours >= last, "went back from {last} to {ours} at tick {tick}");
            last = ours;
            if (real - start) / 3 >= settled {
                worst = worst.max(ours.abs_diff(system(real)));
            }
        }
        assert!(fits > 10, "{fits} fits");
        worst
    }

    #[test]
    fn a_miscalibrated_counter_is_brought_to_the_system_clock() {
        let system = |tick: u64| (tick - 1_000_000) / 3;
        for skew in [1.0, 0.98, 1.02, 0.5, 1.6] {
            // Within 1 µs of the system clock after 10 ms, without noise; and
            // within a few times the noise with it.
            let worst = follow(skew, 0, 10_000_000, system);
            assert!(worst <= 1_000, "{skew}: {worst} ns off after settling");
            let worst = follow(skew, 200, 10_000_000, system);
            assert!(worst <= 1_000, "{skew} with noise: {worst} ns off after settling");
        }
    }

    #[test]
    fn a_system_clock_far_ahead_is_caught_up_with_at_once() {
        // The system clock leaps 1 s ahead after 300 ms (the counter was
        // stopped, say): the counter leaps too, without going back.
        let system = |tick: u64| {
            let nanos = (tick - 1_000_000) / 3;
            if nanos >= 300_000_000 {
                nanos + 1_000_000_000
            } else {
                nanos
            }
        };
        let worst = follow(1.0, 0, 600_000_000, system);
        assert!(worst <= 1_000, "{worst} ns off after the leap");
    }

    #[test]
    fn a_counter_that_goes_back_is_followed_without_going_back() {
        // The counter restarts from near zero after 300 ms (reset on
        // resuming, say) while the system clock goes on: the readings stand
        // still for a moment, then keep to the system clock again.
        let system = |tick: u64| (tick - 1_000_000) / 3;
        let counter = |tick: u64| if tick >= 901_000_000 { tick - 900_000_000 } else { tick };
        let worst = follow_ticks(1.0, 0, 500_000_000, system, counter);
        assert!(worst <= 1_000, "{worst} ns off after the reset");
    }

    #[test]
    fn a_line_is_in_force_only_from_its_start() {
        let before = Line { from: 100, nanos: 10, slope: 1 << FRACTION_BITS };
        let line = Line { from: 200, nanos: 110, slope: 2 << FRACTION_BITS };
        let segment = Segment { before, line, fit_at: 300 };
        assert_eq!(segment.at(50), 10, "before the first line's start: its start");
        assert_eq!(segment.at(150), 60);
        assert_eq!(segment.at(200), 110);
        assert_eq!(segment.at(250), 210);
        assert_eq!(Line { from: 0, nanos: u64::MAX - 1, slope: u64::MAX }.at(u64::MAX), u64::MAX, "saturates");
    }

    /// Over 300 ms, `read` never goes back and measures the time the
    /// system's monotonic clock measures, give or take 1 ms. Its first and
    /// last readings are each taken between two of the system clock's, so
    /// that a thread preempted next to one of them widens the bounds rather
    /// than failing the check.
    pub(in crate::clock) fn assert_keeps_pace(mut read: impl FnMut() -> u64) {
        let slack = Duration::from_millis(1);
        let mut bracket = || {
            let before = Instant::now();
            let reading = read();
            (before, reading, Instant::now())
        };
        let (start_before, first, start_after) = bracket();
        let mut last = first;
        while start_after.elapsed() < Duration::from_millis(300) {
            let (_, now, _) = bracket();
            assert!(now >= last, "went back from {last} to {now}");
            last = now;
        }
        let (end_before, end, end_after) = bracket();
        assert!(end >= last, "went back from {last} to {end}");
        let ours = Duration::from_nanos(end - first);
        let (shortest, longest) = (end_before - start_after, end_after - start_before);
        assert!(
            ours + slack >= shortest && ours <= longest + slack,
            "{ours:?} against the system's {shortest:?}..{longest:?}"
        );
    }

    #[test]
    fn a_counter_started_a_twentieth_too_fast_keeps_to_the_system_clock() {
        // The live counter and its fits, from a first estimate 5% off, read
        // by two threads at once (either may fit the next line).
        let clock = quanta::Clock::new();
        let slope = clock.delta_as_nanos(0, 1 << FRACTION_BITS);
        let counter = Counter::with_slope(clock, slope + slope / 20);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| assert_keeps_pace(|| counter.nanos()));
            }
        });
    }
}

//! The monotonic counter both of the cache's clocks read: the CPU's
//! time-stamp counter, mapped to the system's monotonic clock by a line that
//! is set again from the system clock as the process runs.
//!
//! The counter's rate is first estimated when the first cache is built
//! (usually in under a millisecond): on a busy machine that estimate was
//! measured up to 0.03 % off (a second an hour), and the system clock itself
//! is steered by NTP (by up to 0.05 %), which a fixed rate would not follow.
//! So the first reading due (after 1 ms, then twice as long each time, up to
//! every [`MAX_INTERVAL`]) reads both clocks and starts a new line there, at
//! the system clock's reading, with the rate measured over the whole run so
//! far. A reading never goes back for its thread: a line that set the time
//! back (by the little its predecessor ran ahead) holds that thread's
//! readings where they were until it catches up.

use std::cell::Cell;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use super::saturating_nanos;

/// Rates are nanoseconds per tick, in fixed point with this many bits of fraction.
const FRACTION_BITS: u32 = 32;
/// When the first line after the start is due, in nanoseconds.
const FIRST_INTERVAL: u64 = 1_000_000;
/// The longest time between two lines, in nanoseconds.
const MAX_INTERVAL: u64 = 100_000_000;
/// How many readings of both clocks a new line takes (the narrowest one counts).
const READING_TRIES: usize = 4;
/// A reading of both clocks whose ticks around the system clock's are
/// further apart than this many nanoseconds (the thread was preempted in
/// each try) starts no line: the line stays due.
const READING_WIDTH: u64 = 20_000;
/// One of the clocks leapt (the counter stopped, or was reset) when the
/// system clock's nanoseconds since the last line's start differ from what
/// the rate measured over the whole run makes of the counter's ticks by more
/// than this fraction of them (or 10 µs).
const LEAP_FRACTION: u64 = 1_000;
/// How many lines are kept for readers (a reader that finds the one it read
/// overwritten meanwhile reads again).
const SLOTS: usize = 4;

/// `nanos + (tick - from) × rate`, and the tick from which the next line is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Line {
    from: u64,
    nanos: u64,
    rate: u64,
    due: u64,
}

impl Line {
    /// The nanoseconds at `tick` (the line's start, for a tick before it).
    #[inline]
    fn at(self, tick: u64) -> u64 {
        self.nanos.saturating_add(scale(tick.saturating_sub(self.from), self.rate))
    }

    /// Whether a reader at `tick` should start the next line: it is due, or
    /// the tick is before this line's start (the counter went back, or the
    /// reader's tick was read before this line was).
    #[inline]
    fn needs_next(self, tick: u64) -> bool {
        tick >= self.due || tick < self.from
    }
}

/// `ticks × rate` in nanoseconds.
#[inline]
fn scale(ticks: u64, rate: u64) -> u64 {
    u64::try_from((u128::from(ticks) * u128::from(rate)) >> FRACTION_BITS).unwrap_or(u64::MAX)
}

/// The rate that covers `nanos` in `ticks`, if there were any ticks.
fn rate(nanos: u64, ticks: u64) -> Option<u64> {
    let rate = (u128::from(nanos) << FRACTION_BITS).checked_div(u128::from(ticks))?;
    Some(u64::try_from(rate).unwrap_or(u64::MAX))
}

/// How many ticks `nanos` take at `rate` (all of them at a rate of 0).
fn ticks(nanos: u64, rate: u64) -> u64 {
    (u128::from(nanos) << FRACTION_BITS)
        .checked_div(u128::from(rate))
        .map_or(u64::MAX, |t| u64::try_from(t).unwrap_or(u64::MAX))
}

/// What starting a new line needs to know of the earlier ones.
#[derive(Debug)]
struct Fit {
    /// The reading of both clocks the rate is measured from: the first one,
    /// or the last one after which a clock leapt.
    first: (u64, u64),
    /// Nanoseconds from the last line's start to the next one's.
    interval: u64,
}

impl Fit {
    /// The line that follows `current`, from a `reading` of both clocks (a
    /// tick and the system's nanoseconds at it): it starts at the reading,
    /// with the rate measured since [`first`](Self::first). If one of the
    /// clocks leapt since `current` started, it keeps `current`'s rate
    /// instead, and the rate is measured from this reading on.
    fn next(&mut self, current: Line, reading: (u64, u64)) -> Line {
        let (tick, nanos) = reading;
        let measured = rate(nanos.saturating_sub(self.first.1), tick.saturating_sub(self.first.0));
        let leapt = tick < current.from
            || nanos < current.nanos
            || measured.is_none_or(|measured| {
                let (theirs, ours) = (nanos - current.nanos, scale(tick - current.from, measured));
                theirs.abs_diff(ours) > (theirs / LEAP_FRACTION).max(10_000)
            });
        let rate = match measured {
            Some(rate) if !leapt => rate,
            _ => current.rate,
        }
        .max(1);
        if leapt {
            self.first = reading;
        }
        self.interval = self.interval.saturating_mul(2).min(MAX_INTERVAL);
        Line { from: tick, nanos, rate, due: tick.saturating_add(ticks(self.interval, rate).max(1)) }
    }
}

/// The lines readers read, without locks: each is written to its own slot
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
    fields: [AtomicU64; 4],
}

impl Published {
    fn new(first: Line) -> Self {
        let published = Published { generation: AtomicU64::new(0), slots: Default::default() };
        published.write(0, first);
        published
    }

    fn slot(&self, generation: u64) -> &Slot {
        // The remainder is below `SLOTS`.
        &self.slots[usize::try_from(generation % SLOTS as u64).unwrap_or(0)]
    }

    #[inline]
    fn load(&self) -> Line {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            let slot = self.slot(generation);
            let [from, nanos, rate, due] = slot.fields.each_ref().map(|f| f.load(Ordering::Relaxed));
            fence(Ordering::Acquire);
            if slot.generation.load(Ordering::Relaxed) == generation {
                return Line { from, nanos, rate, due };
            }
        }
    }

    /// Publishes `line`; one writer at a time.
    fn store(&self, line: Line) {
        // Generations wrap after 2^64 - 1 lines, skipping the writing mark.
        let generation = self.generation.load(Ordering::Relaxed).wrapping_add(1) % u64::MAX;
        self.write(generation, line);
        self.generation.store(generation, Ordering::Release);
    }

    fn write(&self, generation: u64, line: Line) {
        let slot = self.slot(generation);
        slot.generation.store(u64::MAX, Ordering::Relaxed);
        fence(Ordering::Release);
        for (field, value) in slot.fields.iter().zip([line.from, line.nanos, line.rate, line.due]) {
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
        let rate = clock.delta_as_nanos(0, 1 << FRACTION_BITS);
        Self::with_rate(clock, rate)
    }

    fn with_rate(clock: quanta::Clock, rate: u64) -> Self {
        let (tick, origin) =
            narrowest(&clock, Instant::now).map_or_else(|| (clock.raw(), Instant::now()), |(_, tick, at)| (tick, at));
        let rate = rate.max(1);
        let first = Line { from: tick, nanos: 0, rate, due: tick.saturating_add(ticks(FIRST_INTERVAL, rate)) };
        let fit = Fit { first: (tick, 0), interval: FIRST_INTERVAL };
        Counter { clock, origin, published: Published::new(first), fit: Mutex::new(fit) }
    }

    /// Nanoseconds since the counter was made; never less than `last`, the
    /// calling thread's previous reading, which it updates.
    #[inline]
    pub(super) fn nanos(&self, last: &Cell<u64>) -> u64 {
        let tick = self.clock.raw();
        let mut line = self.published.load();
        if line.needs_next(tick) {
            line = self.next_line();
        }
        let nanos = line.at(tick).max(last.get());
        last.set(nanos);
        nanos
    }

    /// Starts the next line, unless another thread is at it; returns the
    /// line in force then.
    #[cold]
    fn next_line(&self) -> Line {
        if let Some(mut fit) = self.fit.try_lock() {
            let current = self.published.load();
            // The caller's tick may have been read before `current` started.
            if current.needs_next(self.clock.raw()) {
                let reading = narrowest(&self.clock, || saturating_nanos(self.origin.elapsed()));
                if let Some((width, tick, nanos)) = reading {
                    if width <= ticks(READING_WIDTH, current.rate) {
                        self.published.store(fit.next(current, (tick, nanos)));
                    }
                }
            }
        }
        self.published.load()
    }
}

/// The narrowest of a few brackets of ticks around a call of `read`, if the
/// ticks went forward in any (a thread moved to a core whose counter is
/// behind): its width, its middle tick and what `read` returned.
fn narrowest<T>(clock: &quanta::Clock, mut read: impl FnMut() -> T) -> Option<(u64, u64, T)> {
    let mut best: Option<(u64, u64, T)> = None;
    for _ in 0..READING_TRIES {
        let before = clock.raw();
        let value = read();
        let Some(width) = clock.raw().checked_sub(before) else { continue };
        if best.as_ref().is_none_or(|&(narrowest, ..)| width < narrowest) {
            best = Some((width, before + width / 2, value));
        }
    }
    best
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::*;

    const START: u64 = 1_000_000;
    /// The simulated counter's true rate: 3 ticks a nanosecond.
    const TRUE_RATE: u64 = (1 << FRACTION_BITS) / 3;

    /// A simulated run of 1 s in steps of 10 µs: the counter reads
    /// `counter(real)` at each real tick (3 a nanosecond from [`START`]),
    /// the system clock `system(real)` (give or take `noise` ns), and the
    /// first line's rate is `skew` times the true one. One thread reads, as
    /// [`Counter::nanos`] does, except at the `idle` steps. Returns the
    /// largest gap between its readings and the system clock from `settled`
    /// ns of the run on, and the largest step back its lines took (which
    /// the thread's last reading held back), from `settled` on too.
    fn run(
        skew: f64,
        noise: u64,
        settled: u64,
        idle: std::ops::Range<u64>,
        system: impl Fn(u64) -> u64,
        counter: impl Fn(u64) -> u64,
    ) -> (u64, u64) {
        let rate = (TRUE_RATE as f64 * skew) as u64;
        let mut line = Line { from: START, nanos: system(START), rate, due: START + ticks(FIRST_INTERVAL, rate) };
        let mut fit = Fit { first: (START, system(START)), interval: FIRST_INTERVAL };
        let last = Cell::new(0u64);
        let (mut worst, mut back, mut lines) = (0, 0, 0);
        for step in (0..100_000u64).filter(|step| !idle.contains(step)) {
            let real = START + step * 30_000;
            let tick = counter(real);
            if line.needs_next(tick) {
                let wobble = if lines % 2 == 0 { noise } else { 0 };
                line = fit.next(line, (tick, system(real) + wobble));
                lines += 1;
            }
            let unclamped = line.at(tick);
            let nanos = unclamped.max(last.get());
            if (real - START) / 3 >= settled {
                worst = worst.max(nanos.abs_diff(system(real)));
                back = back.max(last.get().saturating_sub(unclamped));
            }
            last.set(nanos);
        }
        assert!(lines > 2, "{lines} lines");
        (worst, back)
    }

    fn steady(real: u64) -> u64 {
        (real - START) / 3
    }

    #[test]
    fn a_miscalibrated_counter_is_brought_to_the_system_clock() {
        for skew in [1.0, 0.9997, 1.0003, 0.98, 1.02, 0.5, 1.6] {
            // Within 1 µs of the system clock once the first lines have
            // measured the rate (here after 10 ms), with or without noise
            // in the readings; its lines never set it back by more.
            for noise in [0, 200] {
                let (worst, back) = run(skew, noise, 10_000_000, 0..0, steady, |real| real);
                assert!(worst <= 1_000, "skew {skew}, noise {noise}: {worst} ns off after settling");
                assert!(back <= 1_000, "skew {skew}, noise {noise}: set back {back} ns after settling");
            }
        }
    }

    #[test]
    fn a_reading_after_an_idle_spell_is_on_time() {
        // Read for 10 ms, idle for 980 ms (no line is started), then read
        // again: the first reading after it starts a new line, on time.
        let (worst, _) = run(1.0003, 200, 990_000_000, 1_000..99_000, steady, |real| real);
        assert!(worst <= 1_000, "{worst} ns off after the idle time");
    }

    #[test]
    fn a_system_clock_that_leaps_ahead_is_followed_at_once() {
        // The system clock leaps 1 s ahead after 300 ms (the counter was
        // stopped, say): the next line (due at 327 ms) leaps too, and the
        // rate measured across the leap is not taken.
        let system = |real: u64| steady(real) + if steady(real) >= 300_000_000 { 1_000_000_000 } else { 0 };
        let (worst, _) = run(1.0, 0, 330_000_000, 0..0, system, |real| real);
        assert!(worst <= 1_000, "{worst} ns off after the leap");
    }

    #[test]
    fn a_counter_that_goes_back_is_followed_without_going_back() {
        // The counter restarts from near zero after 300 ms (a reset on
        // resuming, say) while the system clock goes on: the first reading
        // after it starts a new line at the system clock, and readings keep
        // to the system clock again at once (the run checks they never go
        // back).
        let counter = |real: u64| if real >= 901_000_000 { real - 900_000_000 } else { real };
        let (worst, _) = run(1.0, 0, 300_000_000, 0..0, steady, counter);
        assert!(worst <= 1_000, "{worst} ns off after the reset");
    }

    #[test]
    fn a_line_reads_from_its_start_and_saturates() {
        let line = Line { from: 100, nanos: 10, rate: 2 << FRACTION_BITS, due: 300 };
        assert_eq!(line.at(50), 10, "before its start: its start");
        assert_eq!(line.at(150), 110);
        assert!(!line.needs_next(299) && line.needs_next(300) && line.needs_next(99));
        let line = Line { from: 0, nanos: u64::MAX - 1, rate: u64::MAX, due: u64::MAX };
        assert_eq!(line.at(u64::MAX), u64::MAX);
        assert_eq!(ticks(1, 0), u64::MAX, "no rate: never due");
        assert_eq!(rate(1, 0), None);
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
        // The live counter and its lines, from a first estimate 5% off, read
        // by two threads at once (either may start the next line).
        let clock = quanta::Clock::new();
        let rate = clock.delta_as_nanos(0, 1 << FRACTION_BITS);
        let counter = Counter::with_rate(clock, rate + rate / 20);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let last = Cell::new(0);
                    assert_keeps_pace(|| counter.nanos(&last));
                });
            }
        });
    }
}

//! The monotonic counter both of the cache's clocks read: the CPU's
//! time-stamp counter, mapped to the system's monotonic clock by a line that
//! is set again from the system clock as the process runs.
//!
//! The counter's rate is first estimated when the first cache is built
//! (usually in under a millisecond): on a busy machine that estimate was
//! measured up to 0.03 % off (a second an hour), and the system clock itself
//! is steered by NTP (by up to 0.05 % to correct a drift, and by several
//! percent for a while to slew a large offset away), which a fixed rate
//! would not follow.
//! So a line holds only until it is due (1 ms after the start, then twice as
//! long each time, up to [`MAX_INTERVAL`]). The first reader past that reads
//! the system clock and starts the next line there, with the rate the two
//! clocks kept since the last one; a reader past it that cannot (another is
//! at it) reads the system clock itself. A reading is thus never further from
//! the system clock than a line's rate can stray in one interval, plus the
//! error of reading both clocks at once (microseconds), unless the counter
//! stops while the system clock goes on, or changes its rate (then by up to
//! that change over one interval, for up to two lines).
//!
//! A reading never goes back for its thread: a line that sets the time back
//! (by what its predecessor ran ahead) holds that thread's readings where
//! they were until it catches up.

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
/// each try) starts no line.
const READING_WIDTH: u64 = 20_000;
/// One of the clocks leapt (the counter stopped, or was reset, or the system
/// was suspended) when the system clock's nanoseconds since the last line's
/// start differ from what that line makes of the counter's ticks by more
/// than this fraction of them, or [`LEAP_FLOOR`]...
const LEAP_FRACTION: u64 = 1_000;
/// ...nanoseconds (over twice the error of two readings of both clocks).
const LEAP_FLOOR: u64 = 50_000;
/// How many lines are kept for readers (a reader that finds the one it read
/// overwritten meanwhile reads again).
const SLOTS: usize = 4;

/// `nanos + (tick - from) × rate`, held until the tick `due`.
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

    /// Whether the line does not hold at `tick`: it is due, or the tick is
    /// before its start (the counter went back, or the tick was read before
    /// this line was started).
    #[inline]
    fn ends_before(self, tick: u64) -> bool {
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
    /// Nanoseconds from the last line's start to the next one's.
    interval: u64,
    /// Whether the current line's rate can tell a leap: not when it was
    /// kept across one (it may be the rate that made the line stray).
    trusted: bool,
}

impl Fit {
    /// The line that follows `current`, from a `reading` of both clocks (a
    /// tick and the system's nanoseconds at it): it starts at the reading,
    /// with the rate the two clocks kept since `current` started (which
    /// began at the previous reading).
    ///
    /// If the reading shows that one of the clocks leapt since then (it is
    /// further from `current` than [`LEAP_FRACTION`] allows), the rate
    /// measured across the leap is no rate: the new line keeps `current`'s.
    /// A rate so kept is not trusted to tell the next leap (a first estimate
    /// far off, or a system clock that began to slew, looks like a leap
    /// too): the line after takes the rate measured whatever it shows.
    fn next(&mut self, current: Line, reading: (u64, u64)) -> Line {
        let (tick, nanos) = reading;
        let leapt = tick < current.from
            || nanos < current.nanos
            || self.trusted && {
                let (theirs, ours) = (nanos - current.nanos, scale(tick - current.from, current.rate));
                theirs.abs_diff(ours) > (theirs / LEAP_FRACTION).max(LEAP_FLOOR)
            };
        self.trusted = !leapt;
        let measured = rate(nanos.saturating_sub(current.nanos), tick.saturating_sub(current.from));
        let rate = match measured {
            Some(rate) if !leapt => rate,
            _ => current.rate,
        }
        .max(1);
        self.interval = self.interval.saturating_mul(2).min(MAX_INTERVAL);
        Line { from: tick, nanos, rate, due: tick.saturating_add(ticks(self.interval, rate).max(1)) }
    }
}

/// The two clocks a [`Counter`] maps one to the other.
pub(super) trait Source {
    /// The counter's ticks.
    fn tick(&self) -> u64;
    /// The system clock's nanoseconds since the source was made.
    fn nanos(&self) -> u64;
}

/// The time-stamp counter, through `quanta` (which reads the system's
/// monotonic clock instead where the counter is not invariant), and the
/// system's monotonic clock.
pub(super) struct System {
    clock: quanta::Clock,
    origin: Instant,
}

impl Source for System {
    #[inline]
    fn tick(&self) -> u64 {
        self.clock.raw()
    }

    fn nanos(&self) -> u64 {
        saturating_nanos(self.origin.elapsed())
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

/// The counter: [`Source::tick`] read as nanoseconds of [`Source::nanos`].
pub(super) struct Counter<S = System> {
    source: S,
    published: Published,
    fit: Mutex<Fit>,
}

impl Counter {
    /// A counter whose first line has the rate estimated by `quanta`.
    pub(super) fn new() -> Self {
        let clock = quanta::Clock::new();
        let rate = clock.delta_as_nanos(0, 1 << FRACTION_BITS);
        Counter::with_rate(System { clock, origin: Instant::now() }, rate)
    }
}

impl<S: Source> Counter<S> {
    fn with_rate(source: S, rate: u64) -> Self {
        let (tick, nanos) = narrowest(&source).map_or_else(|| (source.tick(), source.nanos()), |(_, t, n)| (t, n));
        let rate = rate.max(1);
        let first = Line { from: tick, nanos, rate, due: tick.saturating_add(ticks(FIRST_INTERVAL, rate)) };
        let fit = Fit { interval: FIRST_INTERVAL, trusted: true };
        Counter { source, published: Published::new(first), fit: Mutex::new(fit) }
    }

    /// The system clock's nanoseconds now, by the counter; never less than
    /// `last`, the calling thread's previous reading, which it updates.
    #[inline]
    pub(super) fn nanos(&self, last: &Cell<u64>) -> u64 {
        let tick = self.source.tick();
        let line = self.published.load();
        let nanos = if line.ends_before(tick) { self.past_line() } else { line.at(tick) };
        let nanos = nanos.max(last.get());
        last.set(nanos);
        nanos
    }

    /// A reading for a thread whose tick the line in force does not cover:
    /// it starts the next line, or reads by one started meanwhile, or (while
    /// another thread is starting one, or when the clocks cannot be read
    /// together) reads the system clock itself.
    #[cold]
    fn past_line(&self) -> u64 {
        if let Some(mut fit) = self.fit.try_lock() {
            let current = self.published.load();
            let tick = self.source.tick();
            if !current.ends_before(tick) {
                return current.at(tick); // started meanwhile
            }
            if let Some((width, tick, nanos)) = narrowest(&self.source) {
                if width <= ticks(READING_WIDTH, current.rate) {
                    self.published.store(fit.next(current, (tick, nanos)));
                    return nanos;
                }
            }
        }
        self.source.nanos()
    }
}

/// The narrowest of a few brackets of ticks around a reading of the system
/// clock, if the ticks went forward in any (a thread moved to a core whose
/// counter is behind): its width in ticks, its middle tick, and the system
/// clock's nanoseconds.
fn narrowest(source: &impl Source) -> Option<(u64, u64, u64)> {
    let mut best: Option<(u64, u64, u64)> = None;
    for _ in 0..READING_TRIES {
        let before = source.tick();
        let nanos = source.nanos();
        let Some(width) = source.tick().checked_sub(before) else { continue };
        if best.is_none_or(|(narrowest, ..)| width < narrowest) {
            best = Some((width, before + width / 2, nanos));
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

    /// Simulated clocks: at each real tick (3 a nanosecond from [`START`]),
    /// the counter reads `counter(real)` and the system clock
    /// `system(real)`, plus `noise` ns every other reading.
    struct Sim<C, Y> {
        real: Cell<u64>,
        counter: C,
        system: Y,
        noise: u64,
        reads: Cell<u64>,
        /// Real ticks each reading of the system clock takes.
        cost: Cell<u64>,
    }

    impl<C: Fn(u64) -> u64, Y: Fn(u64) -> u64> Source for Sim<C, Y> {
        fn tick(&self) -> u64 {
            (self.counter)(self.real.get())
        }

        fn nanos(&self) -> u64 {
            self.reads.set(self.reads.get() + 1);
            self.real.set(self.real.get() + self.cost.get());
            (self.system)(self.real.get()) + if self.reads.get() % 2 == 0 { self.noise } else { 0 }
        }
    }

    fn steady(real: u64) -> u64 {
        (real - START) / 3
    }

    fn same(real: u64) -> u64 {
        real
    }

    /// A counter over simulated clocks whose first line's rate is `skew`
    /// times the true one.
    fn sim<C: Fn(u64) -> u64, Y: Fn(u64) -> u64>(skew: f64, noise: u64, counter: C, system: Y) -> Counter<Sim<C, Y>> {
        let sim = Sim { real: Cell::new(START), counter, system, noise, reads: Cell::new(0), cost: Cell::new(0) };
        Counter::with_rate(sim, (TRUE_RATE as f64 * skew) as u64)
    }

    /// Reads `counter` by one thread every 2 µs for a second, but for the
    /// steps in `idle`; returns the largest gap between its readings
    /// and the system clock from `settled` ns of the run on.
    fn run<C: Fn(u64) -> u64, Y: Fn(u64) -> u64>(
        counter: &Counter<Sim<C, Y>>,
        settled: u64,
        idle: std::ops::Range<u64>,
    ) -> u64 {
        let last = Cell::new(0);
        let mut worst = 0;
        for step in (0..500_000u64).filter(|step| !idle.contains(step)) {
            let real = START + step * 6_000;
            counter.source.real.set(real);
            let nanos = counter.nanos(&last);
            if steady(real) >= settled {
                worst = worst.max(nanos.abs_diff((counter.source.system)(real)));
            }
        }
        worst
    }

    #[test]
    fn a_miscalibrated_counter_is_brought_to_the_system_clock() {
        for skew in [1.0, 0.9997, 1.0003, 0.98, 1.02, 0.5, 1.6] {
            // Within 1 µs of the system clock once the first lines have
            // measured the rate (here after 10 ms), with or without noise in
            // the system clock's readings.
            for noise in [0, 200] {
                let worst = run(&sim(skew, noise, same, steady), 10_000_000, 0..0);
                assert!(worst <= 1_000, "skew {skew}, noise {noise}: {worst} ns off after settling");
            }
        }
    }

    #[test]
    fn a_reading_after_an_idle_spell_is_on_time() {
        // Read for 10 ms, idle for 980 ms (no line is started), then read
        // again: the first reading after it is on time.
        let worst = run(&sim(1.0003, 200, same, steady), 990_000_000, 5_000..495_000);
        assert!(worst <= 1_000, "{worst} ns off after the idle time");
    }

    #[test]
    fn a_system_clock_that_leaps_ahead_is_followed_by_the_next_line() {
        // The system clock leaps 1 s ahead (the counter stopped, say), early
        // on or later: from the next line on (due by 2 ms or 327 ms), the
        // readings keep to it, at the rate measured before the leap.
        for (at, next_line) in [(500_000, 2_000_000), (300_000_000, 327_000_000)] {
            let system = move |real| steady(real) + if steady(real) >= at { 1_000_000_000 } else { 0 };
            let worst = run(&sim(1.0003, 0, same, system), next_line, 0..0);
            assert!(worst <= 1_000, "leap at {at} ns: {worst} ns off after it");
        }
    }

    #[test]
    fn a_system_clock_that_slews_is_followed() {
        // The system clock runs 1% or 8% fast from 300 ms to 450 ms (slewing
        // an offset away): meanwhile the readings stray by at most that much
        // of one longest interval (a line finds the change when it is due),
        // and within two intervals of its end they keep to it again.
        for percent in [1, 8] {
            let system = move |real| {
                let nanos = steady(real);
                nanos + nanos.clamp(300_000_000, 450_000_000).saturating_sub(300_000_000) * percent / 100
            };
            let worst = run(&sim(1.0, 0, same, system), 0, 0..0);
            assert!(worst <= MAX_INTERVAL * percent / 100 + 1_000, "{percent}%: {worst} ns off during the slew");
            let worst = run(&sim(1.0, 0, same, system), 650_000_000, 0..0);
            assert!(worst <= 1_000, "{percent}%: {worst} ns off after the slew");
        }
    }

    #[test]
    fn a_counter_that_leaps_ahead_is_read_on_time() {
        // The counter leaps an hour ahead while the system clock does not
        // (a suspend the counter ran through), early on or later: the first
        // reading after it is on time, and so are the next.
        for at in [500_000, 300_000_000] {
            let counter = move |real| real + if steady(real) >= at { 3 * 3_600_000_000_000 } else { 0 };
            let worst = run(&sim(1.0003, 0, counter, steady), at, 0..0);
            assert!(worst <= 1_000, "leap at {at} ns: {worst} ns off after it");
        }
    }

    #[test]
    fn a_counter_that_goes_back_is_read_on_time() {
        // The counter restarts from near zero after 300 ms (a reset on
        // resuming, say) while the system clock goes on: the first reading
        // after it is on time, and so are the next.
        let counter = |real| if real >= 901_000_000 { real - 900_000_000 } else { real };
        let worst = run(&sim(1.0003, 0, counter, steady), 300_000_000, 0..0);
        assert!(worst <= 1_000, "{worst} ns off after the reset");
    }

    #[test]
    fn a_reader_past_the_line_while_another_starts_the_next_reads_the_system_clock() {
        let counter = sim(1.0, 0, |real| real + if real > 3 * START { 30_000_000_000 } else { 0 }, steady);
        let last = Cell::new(0);
        counter.source.real.set(4 * START);
        let held = counter.fit.lock();
        assert_eq!(counter.nanos(&last), 1_000_000, "the system clock's reading");
        drop(held);
        counter.source.real.set(5 * START);
        assert_eq!(counter.nanos(&last), 1_333_333, "by the next line");
    }

    #[test]
    fn clocks_that_cannot_be_read_together_start_no_line() {
        // Each reading of the system clock takes 30 µs (a preempted thread):
        // past the line, the reading is the system clock's, and no line is
        // started until the clocks can be read together again.
        let counter = sim(1.0, 0, same, steady);
        let first = counter.published.load();
        counter.source.cost.set(90_000);
        counter.source.real.set(first.due);
        let nanos = counter.nanos(&Cell::new(0));
        assert_eq!(nanos, steady(counter.source.real.get()), "the system clock's reading");
        assert_eq!(counter.published.load(), first, "no line started");
        counter.source.cost.set(0);
        let real = counter.source.real.get() + 3;
        counter.source.real.set(real);
        assert_eq!(counter.nanos(&Cell::new(0)), steady(real));
        assert_ne!(counter.published.load(), first, "a line started");
    }

    #[test]
    fn a_thread_s_readings_never_go_back() {
        // A first line 2% fast is ahead when the next line is due, which
        // starts at the system clock's reading: the thread's readings stay
        // where they were until the system clock gets there.
        let counter = sim(1.02, 0, same, steady);
        let last = Cell::new(0);
        let due = counter.published.load().due;
        counter.source.real.set(due - 1);
        let ahead = counter.nanos(&last);
        assert!(ahead > steady(due) + 10_000, "{ahead} ns, 2% ahead of {}", steady(due - 1));
        counter.source.real.set(due);
        assert_eq!(counter.nanos(&last), ahead, "held");
        assert_eq!(counter.nanos(&Cell::new(0)), steady(due), "another thread's first reading");
        let caught_up = due + 3 * (ahead - steady(due)) + 30;
        counter.source.real.set(caught_up);
        assert!(counter.nanos(&last).abs_diff(steady(caught_up)) <= 1, "caught up");
    }

    #[test]
    fn a_line_reads_from_its_start_and_saturates() {
        let line = Line { from: 100, nanos: 10, rate: 2 << FRACTION_BITS, due: 300 };
        assert_eq!(line.at(50), 10, "before its start: its start");
        assert_eq!(line.at(150), 110);
        assert!(!line.ends_before(299) && line.ends_before(300) && line.ends_before(99));
        let line = Line { from: 0, nanos: u64::MAX - 1, rate: u64::MAX, due: u64::MAX };
        assert_eq!(line.at(u64::MAX), u64::MAX);
        assert_eq!(ticks(1, 0), u64::MAX, "no rate: never due");
        assert_eq!(rate(1, 0), None);
    }

    #[test]
    fn a_line_is_never_read_half_written() {
        // One thread publishes lines whose four fields are equal, as fast as
        // it can; another reads and checks them.
        let published = Published::new(Line { from: 0, nanos: 0, rate: 0, due: 0 });
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for g in 1..200_000 {
                    published.store(Line { from: g, nanos: g, rate: g, due: g });
                }
                done.store(true, Ordering::Release);
            });
            let mut reads = 0u64;
            while !done.load(Ordering::Acquire) || reads == 0 {
                let line = published.load();
                assert!(
                    line.nanos == line.from && line.rate == line.from && line.due == line.from,
                    "half written: {line:?}"
                );
                reads += 1;
            }
        });
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
        // The live counter, from a first estimate 5% off, read by two
        // threads at once (either may start the next line).
        let clock = quanta::Clock::new();
        let rate = clock.delta_as_nanos(0, 1 << FRACTION_BITS);
        let counter = Counter::with_rate(System { clock, origin: Instant::now() }, rate + rate / 20);
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

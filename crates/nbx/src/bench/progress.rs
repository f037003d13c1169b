//! Progress on stderr while the benchmark runs: a spinner per step when
//! stderr is a terminal, plain lines otherwise (logs, CI, `2>file`), so that
//! stdout carries nothing but the report.

use std::io::IsTerminal;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::BenchResult;

/// The spinner of the step in progress, if stderr is a terminal.
fn current() -> MutexGuard<'static, Option<ProgressBar>> {
    static CURRENT: OnceLock<Mutex<Option<ProgressBar>>> = OnceLock::new();
    // A step that panicked while printing leaves nothing worth guarding.
    CURRENT.get_or_init(|| Mutex::new(None)).lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether progress is drawn as spinners (stderr is a terminal).
fn interactive() -> bool {
    static INTERACTIVE: OnceLock<bool> = OnceLock::new();
    *INTERACTIVE.get_or_init(|| std::io::stderr().is_terminal())
}

/// Prints one detail line of the step in progress (above its spinner, if
/// there is one).
pub(crate) fn note(line: impl AsRef<str>) {
    let line = format!("nbx bench:   {}", line.as_ref());
    match current().as_ref() {
        Some(bar) => bar.println(line),
        None => eprintln!("{line}"),
    }
}

/// Runs one step, reporting its name and duration on stderr: a spinner with
/// the elapsed time on a terminal, a line before and after otherwise.
pub(crate) fn step<T>(name: &str, f: impl FnOnce() -> BenchResult<T>) -> BenchResult<T> {
    run_step(name, true, f)
}

/// [`step`] without the spinner's ticking thread, for a step that counts
/// every allocation of the process.
pub(crate) fn quiet_step<T>(name: &str, f: impl FnOnce() -> BenchResult<T>) -> BenchResult<T> {
    run_step(name, false, f)
}

fn run_step<T>(name: &str, ticking: bool, f: impl FnOnce() -> BenchResult<T>) -> BenchResult<T> {
    let start = Instant::now();
    if interactive() {
        let bar = ProgressBar::new_spinner().with_message(format!("nbx bench: {name}"));
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            bar.set_style(style);
        }
        if ticking {
            bar.enable_steady_tick(Duration::from_millis(100));
        } else {
            bar.tick();
        }
        *current() = Some(bar);
    } else {
        eprintln!("nbx bench: {name} ...");
    }
    let result = f();
    let line = match &result {
        Ok(_) => format!("nbx bench: {name}: {:.1} s", start.elapsed().as_secs_f64()),
        Err(_) => format!("nbx bench: {name}: failed"),
    };
    match current().take() {
        Some(bar) => {
            bar.finish_and_clear();
            eprintln!("{line}");
        }
        None => eprintln!("{line}"),
    }
    result.map_err(|err| format!("{name}: {err}").into())
}

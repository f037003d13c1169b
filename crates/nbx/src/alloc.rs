//! A counting global allocator: wraps mimalloc and, while tracking is on,
//! adds up the bytes allocated minus the bytes freed.
//!
//! mimalloc, not the system allocator: every cache of the benchmark, ours
//! and the peers, runs on the same allocator, one that many services use
//! (the README's performance notes say so).
//!
//! Tracking is switched on only around a measurement ([`measure`]), so the
//! throughput figures pay one relaxed load per allocation and nothing more
//! (an always-on shared counter would tax the allocation-heavy peers more
//! than us). The difference of live bytes over a window is exact whatever
//! happened before it: memory allocated earlier and freed inside the window
//! counts as a decrease, as it should.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc as Inner;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

static TRACKING: AtomicBool = AtomicBool::new(false);
static LIVE_DELTA: AtomicIsize = AtomicIsize::new(0);

/// mimalloc, plus a count of live heap bytes while tracking is on.
pub(crate) struct CountingAllocator;

#[inline]
fn track(delta: isize) {
    if TRACKING.load(Ordering::Relaxed) {
        LIVE_DELTA.fetch_add(delta, Ordering::Relaxed);
    }
}

/// Converts an allocation size to a signed delta (sizes never exceed
/// `isize::MAX`: `Layout` guarantees it).
#[inline]
fn signed(size: usize) -> isize {
    isize::try_from(size).unwrap_or(isize::MAX)
}

// SAFETY: every method forwards to mimalloc with the caller's arguments
// unchanged, so mimalloc's guarantees hold; the counting has no effect on the
// memory returned.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract (non-zero
        // size), which is `System::alloc`'s.
        let ptr = unsafe { Inner.alloc(layout) };
        if !ptr.is_null() {
            track(signed(layout.size()));
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { Inner.alloc_zeroed(layout) };
        if !ptr.is_null() {
            track(signed(layout.size()));
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller guarantees `ptr` came from this allocator (so from
        // mimalloc) with this `layout`.
        unsafe { Inner.dealloc(ptr, layout) };
        track(-signed(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `ptr` came from this allocator (so from
        // mimalloc) with this `layout`, and `new_size` is valid for it.
        let new_ptr = unsafe { Inner.realloc(ptr, layout, new_size) };
        if !new_ptr.is_null() {
            track(signed(new_size) - signed(layout.size()));
        }
        new_ptr
    }
}

/// Runs `f` with tracking on and returns its result with the change in live
/// heap bytes while it ran (allocated minus freed; the result is still alive,
/// so what it holds is counted).
///
/// Other threads' allocations in that window count too: call it while the
/// process is otherwise quiet.
pub(crate) fn measure<T>(f: impl FnOnce() -> T) -> (T, isize) {
    LIVE_DELTA.store(0, Ordering::SeqCst);
    TRACKING.store(true, Ordering::SeqCst);
    let value = f();
    TRACKING.store(false, Ordering::SeqCst);
    (value, LIVE_DELTA.load(Ordering::SeqCst))
}

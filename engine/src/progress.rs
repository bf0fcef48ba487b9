//! Progress counters shared between the engine's tasks and whoever shows
//! them (the CLI's progress bar polls them; nothing blocks on them).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters a running extract, restore or verify moves forward.
#[derive(Debug, Default)]
pub struct Progress {
    /// Ops read from the source or the backup.
    pub ops: AtomicU64,
    /// Ops expected in all, when known (0 when not).
    pub ops_total: AtomicU64,
    /// Bytes read from the source (input files) or the store.
    pub bytes_read: AtomicU64,
    /// Bytes expected to be read in all, when known (0 when not).
    pub bytes_read_total: AtomicU64,
    /// Bytes written to the store or the target.
    pub bytes_written: AtomicU64,
    /// Segments written or read.
    pub segments: AtomicU64,
}

impl Progress {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Sets a counter (totals).
    pub fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }
}

//! The one place that maps failures to process exit codes.

use ferry_engine::ErrorKind;

/// Everything worked (verify: the backup is sound).
pub const SUCCESS: u8 = 0;
/// A failure ferry has no better code for.
pub const UNEXPECTED: u8 = 1;
/// Bad usage: an unknown flag, a bad URL (clap uses 2 as well).
pub const USAGE: u8 = 2;
/// Stored data is damaged: a checksum, length, seq or manifest check failed.
pub const DAMAGED: u8 = 3;
/// The backup asked for does not exist, or is incomplete.
pub const NOT_FOUND: u8 = 4;
/// The source failed or gave bad input.
pub const SOURCE: u8 = 5;
/// The target failed or refused.
pub const TARGET: u8 = 6;
/// The object store failed: unreachable, denied, full.
pub const STORAGE: u8 = 7;
/// A live migration did not switch: it rolled back, or stopped before
/// holding any write. Clients write to the old plane, as before.
pub const MIGRATION_FAILED: u8 = 8;

/// Shown at the end of `ferry --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (verify: every check passed)
  1  unexpected failure
  2  bad usage: unknown flag, bad URL or option
  3  damaged backup: a checksum, length, seq or manifest check failed
  4  backup not found, or incomplete (no manifest: never restored)
  5  the source failed or gave bad input
  6  the target failed or refused
  7  the object store failed: unreachable, denied or full
  8  a live migration did not switch (rolled back): clients write to the old plane";

/// The exit code for an error that reached the top.
pub fn code_for(error: &anyhow::Error) -> u8 {
    if error
        .downcast_ref::<crate::commands::UsageError>()
        .is_some()
    {
        return USAGE;
    }
    match error.downcast_ref::<ferry_engine::Error>() {
        Some(error) => code_for_kind(error.kind()),
        None => UNEXPECTED,
    }
}

/// The exit code for a kind of engine error.
pub fn code_for_kind(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Damaged => DAMAGED,
        ErrorKind::NotFound => NOT_FOUND,
        ErrorKind::Source => SOURCE,
        ErrorKind::Target => TARGET,
        ErrorKind::Storage => STORAGE,
        ErrorKind::Usage => USAGE,
    }
}

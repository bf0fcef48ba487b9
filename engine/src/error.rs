//! The crate error: the per-module errors, kept whole so callers can match
//! on them, and sorted into [`ErrorKind`]s, the one place that decides how
//! a failure is reported (process exit codes in the CLI, gRPC codes in the
//! agents).

use crate::adapters::AdapterError;
use crate::backup::BackupError;
use crate::manifest::ManifestError;
use crate::migrations::MigrationError;
use crate::segment::SegmentError;
use crate::store::StoreError;

/// Any failure of the engine.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A segment failed one of its own checks.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// A manifest is unreadable or inconsistent.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A backup as a whole is missing, incomplete or damaged.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The object store failed or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A source or a sink failed, or gave bad input.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// A version migration failed or was refused.
    #[error(transparent)]
    Migration(#[from] MigrationError),
}

/// What sort of failure an [`Error`] is, from the user's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Stored data is damaged: a checksum, a length, a seq or a manifest
    /// does not add up. Restore from another backup.
    Damaged,
    /// The backup asked for does not exist or was never sealed.
    NotFound,
    /// The source gave bad input or failed.
    Source,
    /// The target refused or failed.
    Target,
    /// The object store failed (unreachable, denied, full).
    Storage,
    /// The request itself is wrong: a bad URL or option.
    Usage,
}

impl Error {
    /// Sorts the error for reporting.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Segment(_) | Error::Manifest(_) => ErrorKind::Damaged,
            Error::Backup(error) => error.kind(),
            Error::Store(error) => error.kind(),
            Error::Adapter(error) => error.kind(),
            Error::Migration(error) => error.kind(),
        }
    }
}

/// What the caller of a failed request should do: the one classification
/// that an agent's gRPC codes and a live migration's relay both read (the
/// relay resumes a [`Transient`](ErrorClass::Transient) failure and stops
/// at any other). Each adapter classes its own errors; nothing outside it
/// names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The same request may succeed later, or after a resume: a peer
    /// unreachable, a stream broken, a server busy.
    Transient,
    /// The caller must change course first: take a new snapshot (a
    /// compacted position), empty the target, use a higher epoch, fix
    /// credentials or TLS, free space.
    Precondition,
    /// The request or an op in it is wrong and never will be taken.
    Invalid,
    /// The request or an op in it is larger than the other side takes.
    TooLarge,
    /// Stored data is damaged.
    Damaged,
    /// What was asked for does not exist.
    NotFound,
}

impl Error {
    /// What the caller should do (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Adapter(error) => error.class(),
            _ => match self.kind() {
                ErrorKind::Usage => ErrorClass::Invalid,
                ErrorKind::Source | ErrorKind::Target | ErrorKind::Storage => ErrorClass::Transient,
                ErrorKind::Damaged => ErrorClass::Damaged,
                ErrorKind::NotFound => ErrorClass::NotFound,
            },
        }
    }
}

/// The engine's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

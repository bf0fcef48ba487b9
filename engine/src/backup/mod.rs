//! Backups: writing an op stream into sealed segments ([`write_backup`]),
//! reading it back in order with every check ([`read_backup`]), and checking
//! a whole backup without restoring it ([`verify_backup`]).

mod follow;
mod read;
mod verify;
mod write;

pub use follow::{FollowOptions, Followed, SILENT_BEATS, find_backup_to_follow, follow_backup};
pub use read::{RestoreOptions, find_backup, read_backup, read_segment};
pub use verify::{SegmentProblem, VerifyReport, verify_backup};
pub use write::{DEFAULT_HEARTBEAT_EVERY, DEFAULT_SEAL_AFTER, ExtractOptions, write_backup};

use time::OffsetDateTime;
use time::macros::format_description;

use crate::error::ErrorKind;
use crate::order::OrderError;

/// A backup as a whole is missing, unsealed or damaged.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The store holds no complete backup at all.
    #[error("no complete backup in {store}; take one with `ferry extract`")]
    NoCompleteBackup {
        /// The store.
        store: String,
    },
    /// No backup with this id.
    #[error("no backup {backup_id} in {store}; `ferry inspect {store}` lists them")]
    NotFound {
        /// The id asked for.
        backup_id: String,
        /// The store.
        store: String,
    },
    /// The backup has no manifest: its extract never finished.
    #[error(
        "backup {backup_id} is incomplete: it has {segments_found} segments but no manifest, so its extract never finished; it is never restored, take a new backup"
    )]
    Incomplete {
        /// The backup.
        backup_id: String,
        /// Segments found without a manifest.
        segments_found: u64,
    },
    /// A segment the manifest lists is not in the store.
    #[error(
        "segment {segment} of backup {backup_id} is missing from the store; the backup is damaged, restore from another one"
    )]
    SegmentMissing {
        /// The backup.
        backup_id: String,
        /// The segment, by name.
        segment: String,
    },
    /// A segment passes its own checks but is not the object the manifest sealed.
    #[error(
        "segment {segment} of backup {backup_id} has SHA-256 {actual}, the manifest says {expected}; the segment or the manifest was changed after the backup was sealed, restore from another one"
    )]
    Sha256Mismatch {
        /// The backup.
        backup_id: String,
        /// The segment, by name.
        segment: String,
        /// The manifest's SHA-256.
        expected: String,
        /// The SHA-256 of the object read.
        actual: String,
    },
    /// A segment's header disagrees with the manifest (another backup's
    /// segment, another seq range).
    #[error(
        "segment {segment} of backup {backup_id} does not match the manifest: {reason}; the backup is damaged, restore from another one"
    )]
    SegmentDisagrees {
        /// The backup.
        backup_id: String,
        /// The segment, by name.
        segment: String,
        /// What differs.
        reason: String,
    },
    /// Ops across segments are not contiguous (G1).
    #[error(
        "backup {backup_id}, segment {segment}: {source}; the backup is damaged, restore from another one"
    )]
    OutOfOrder {
        /// The backup.
        backup_id: String,
        /// Where the order broke.
        segment: String,
        /// The gap or repeat.
        source: OrderError,
    },
    /// A followed backup's extract stopped on an error.
    #[error(
        "the extract writing backup {backup_id} stopped: {reason}; the target holds the ops restored before it stopped (its checkpoint says which); take a new backup"
    )]
    ExtractFailed {
        /// The backup.
        backup_id: String,
        /// The extract's error, as it recorded it.
        reason: String,
    },
    /// A followed backup got no new segment and no manifest for too long.
    #[error(
        "backup {backup_id} got no new segment and no manifest for {waited_secs} s after {last}: its extract is gone or stuck (a killed extract records nothing); the target holds the ops through seq {applied_through}, and this restore, run again, resumes there once the backup is sealed; or take a new backup (--follow-timeout sets the wait)"
    )]
    Stalled {
        /// The backup.
        backup_id: String,
        /// The last segment restored, or the start record.
        last: String,
        /// The last seq read from the backup.
        applied_through: u64,
        /// How long the restore waited.
        waited_secs: u64,
    },
    /// A followed backup's extract stopped beating: killed, or its machine
    /// gone.
    #[error(
        "the extract writing backup {backup_id} stopped: its heartbeat has not changed for {silent_secs} s (it beat every {every_ms} ms), after {last}; a killed extract records nothing else. The target holds the ops through seq {applied_through}, and this restore, run again, resumes there once the backup is sealed; or take a new backup"
    )]
    ExtractSilent {
        /// The backup.
        backup_id: String,
        /// The last segment restored, or the start record.
        last: String,
        /// The last seq read from the backup.
        applied_through: u64,
        /// How long the heartbeat has not changed, as the restore saw it.
        silent_secs: u64,
        /// How often it beat.
        every_ms: u64,
    },
    /// `--follow` found no backup being written.
    #[error(
        "no backup started in {store} in the {waited_secs} s this restore waited for one; start `ferry extract --to {store}`, or name the backup with --backup"
    )]
    NothingToFollow {
        /// The store.
        store: String,
        /// How long the restore waited.
        waited_secs: u64,
    },
    /// `--follow` found more than one backup being written.
    #[error(
        "{} backups are being written in {store} ({}); name the one to follow with --backup",
        backup_ids.len(),
        backup_ids.join(", ")
    )]
    SeveralToFollow {
        /// The store.
        store: String,
        /// The backups being written.
        backup_ids: Vec<String>,
    },
    /// A segment restored while its backup was being written is not the
    /// one the manifest sealed.
    #[error(
        "segment {segment} of backup {backup_id} was restored while the backup was being written, and the manifest that sealed it disagrees: {reason}; the target may hold ops the sealed backup does not, restore another backup onto an empty target"
    )]
    FollowedDiffers {
        /// The backup.
        backup_id: String,
        /// The segment, by name.
        segment: String,
        /// What differs.
        reason: String,
    },
    /// The extract's counts disagree with what was written.
    #[error("backup {backup_id}: {reason}")]
    Internal {
        /// The backup.
        backup_id: String,
        /// What disagreed.
        reason: String,
    },
}

impl BackupError {
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            BackupError::NoCompleteBackup { .. }
            | BackupError::NotFound { .. }
            | BackupError::Incomplete { .. }
            | BackupError::NothingToFollow { .. } => ErrorKind::NotFound,
            BackupError::ExtractFailed { .. }
            | BackupError::Stalled { .. }
            | BackupError::ExtractSilent { .. } => ErrorKind::Source,
            BackupError::SeveralToFollow { .. } => ErrorKind::Usage,
            BackupError::FollowedDiffers { .. } => ErrorKind::Damaged,
            BackupError::SegmentMissing { .. }
            | BackupError::Sha256Mismatch { .. }
            | BackupError::SegmentDisagrees { .. }
            | BackupError::OutOfOrder { .. }
            | BackupError::Internal { .. } => ErrorKind::Damaged,
        }
    }
}

const ID_TIME_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year][month][day]T[hour][minute][second]Z");

/// A new backup id: its UTC creation time (so ids sort by age) and 32
/// random bits (so two extracts in one second never collide).
pub fn new_backup_id(created_at: OffsetDateTime) -> String {
    let time = created_at
        .to_offset(time::UtcOffset::UTC)
        .format(ID_TIME_FORMAT)
        .expect("the id format has only numeric fields");
    format!("{time}-{:08x}", rand::random::<u32>())
}

/// The creation time an id written by [`new_backup_id`] carries.
pub fn created_at_of_id(backup_id: &str) -> Option<OffsetDateTime> {
    let time = backup_id.get(..16)?;
    time::PrimitiveDateTime::parse(time, ID_TIME_FORMAT)
        .ok()
        .map(|time| time.assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_creation_time() {
        let created_at = time::macros::datetime!(2026-11-23 18:05:12 UTC);
        let id = new_backup_id(created_at);
        assert!(id.starts_with("20261123T180512Z-"), "{id}");
        assert_eq!(id.len(), 25);
        assert_eq!(created_at_of_id(&id), Some(created_at));
        assert_eq!(created_at_of_id("not-an-id"), None);
    }
}

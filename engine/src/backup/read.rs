//! Reading a backup back: segments fetched a few ahead, each checked in
//! full (its own checksums, its header against the manifest, its SHA-256)
//! on a blocking thread, then handed out in seq order.

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::BackupError;
use crate::manifest::{Manifest, SegmentEntry};
use crate::order::SeqTracker;
use crate::segment::{DecodedSegment, SegmentLimits, decode_segment};
use crate::store::BackupStore;
use crate::{Op, Result};

/// How a backup is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreOptions {
    /// The decompression cap.
    pub limits: SegmentLimits,
    /// Segments fetched and checked ahead of the one being applied.
    pub prefetch_segments: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            limits: SegmentLimits::default(),
            prefetch_segments: 2,
        }
    }
}

/// Finds the backup to restore: `backup_id`, or the latest complete one.
/// A backup without a manifest is refused, never guessed at.
pub async fn find_backup(store: &BackupStore, backup_id: Option<&str>) -> Result<Manifest> {
    if let Some(backup_id) = backup_id {
        if let Some(manifest) = store.get_manifest(backup_id).await? {
            return Ok(manifest);
        }
        let segments_found = store.list_segments(backup_id).await?.len() as u64;
        if segments_found == 0 && !store.backup_ids().await?.iter().any(|id| id == backup_id) {
            return Err(BackupError::NotFound {
                backup_id: backup_id.to_owned(),
                store: store.display().to_owned(),
            }
            .into());
        }
        return Err(BackupError::Incomplete {
            backup_id: backup_id.to_owned(),
            segments_found,
        }
        .into());
    }
    // Newest first; ids begin with their creation time.
    for backup_id in store.backup_ids().await?.iter().rev() {
        if let Some(manifest) = store.get_manifest(backup_id).await? {
            return Ok(manifest);
        }
    }
    Err(BackupError::NoCompleteBackup {
        store: store.display().to_owned(),
    }
    .into())
}

/// Ops handed to a sink at once. Ops are decoded batch by batch from the
/// segment's buffer, so a segment is never held as ops all at once.
const BATCH_OPS: usize = 1024;

/// Streams a backup's ops in batches, in seq order. Every segment passes
/// its checks (checksums, header against the manifest, SHA-256) before any
/// of its ops is handed out; the ops' own order is checked as they decode,
/// and across segments too (G1).
pub fn read_backup(
    store: BackupStore,
    manifest: Arc<Manifest>,
    options: RestoreOptions,
) -> impl Stream<Item = Result<Vec<Op>>> + Send + 'static {
    let backup_id = manifest.backup_id.clone();
    let mut tracker = SeqTracker::new();
    futures::stream::iter(manifest.segments.clone())
        .map(move |entry| {
            let store = store.clone();
            let backup_id = backup_id.clone();
            async move { read_segment(&store, &backup_id, &entry, options.limits).await }
        })
        .buffered(options.prefetch_segments.max(1))
        .map(move |segment| {
            let segment = segment?;
            tracker
                .try_advance(segment.header.first_seq)
                .map_err(|source| BackupError::OutOfOrder {
                    backup_id: manifest.backup_id.clone(),
                    segment: segment.segment.clone(),
                    source,
                })?;
            // The segment checks its own ops; resume after its last.
            tracker = SeqTracker::starting_at(segment.header.last_seq + 1);
            Ok::<_, crate::Error>(futures::stream::iter(batches_of(segment)))
        })
        .try_flatten()
}

/// A checked segment's ops in batches, decoded as they are taken.
pub(super) fn batches_of(segment: DecodedSegment) -> impl Iterator<Item = Result<Vec<Op>>> {
    let mut ops = segment.ops();
    std::iter::from_fn(move || {
        let batch: Result<Vec<Op>, _> = ops.by_ref().take(BATCH_OPS).collect();
        match batch {
            Ok(batch) if batch.is_empty() => None,
            Ok(batch) => Some(Ok(batch)),
            Err(error) => Some(Err(crate::Error::from(error))),
        }
    })
}

/// Fetches one segment of a backup and checks it in full (everything but
/// the ops themselves, which are checked as they decode).
pub async fn read_segment(
    store: &BackupStore,
    backup_id: &str,
    entry: &SegmentEntry,
    limits: SegmentLimits,
) -> Result<DecodedSegment> {
    let object = store
        .get_object(backup_id, &entry.path)
        .await?
        .ok_or_else(|| BackupError::SegmentMissing {
            backup_id: backup_id.to_owned(),
            segment: entry.name.clone(),
        })?;
    let backup_id = backup_id.to_owned();
    let entry = entry.clone();
    tokio::task::spawn_blocking(move || check_segment(&backup_id, &entry, object, limits))
        .await
        .expect("segment checks do not panic")
}

/// The segment's own checks first (so damage is named for what it is),
/// then its agreement with the manifest that sealed it.
fn check_segment(
    backup_id: &str,
    entry: &SegmentEntry,
    object: Bytes,
    limits: SegmentLimits,
) -> Result<DecodedSegment> {
    let sha256 = hex::encode(Sha256::digest(&object));
    let decoded = decode_segment(&entry.name, object, limits)?;
    let header = &decoded.header;
    let disagrees = |reason: String| BackupError::SegmentDisagrees {
        backup_id: backup_id.to_owned(),
        segment: entry.name.clone(),
        reason,
    };
    if header.stream_id != backup_id {
        return Err(disagrees(format!("it was written for backup {}", header.stream_id)).into());
    }
    if (
        header.first_seq,
        header.last_seq,
        header.op_count,
        header.uncompressed_bytes,
    ) != (
        entry.first_seq,
        entry.last_seq,
        entry.ops,
        entry.uncompressed_bytes,
    ) {
        return Err(disagrees(format!(
            "it holds seq {}..={} ({} ops, {} bytes), the manifest says seq {}..={} ({} ops, {} bytes)",
            header.first_seq,
            header.last_seq,
            header.op_count,
            header.uncompressed_bytes,
            entry.first_seq,
            entry.last_seq,
            entry.ops,
            entry.uncompressed_bytes
        ))
        .into());
    }
    if sha256 != entry.sha256 {
        return Err(BackupError::Sha256Mismatch {
            backup_id: backup_id.to_owned(),
            segment: entry.name.clone(),
            expected: entry.sha256.clone(),
            actual: sha256,
        }
        .into());
    }
    Ok(decoded)
}

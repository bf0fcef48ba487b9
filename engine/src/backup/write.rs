//! Writing a backup: ops → segments (a blocking thread compresses) →
//! uploads (a few at a time) → the manifest, last.
//!
//! Every hand-off is a bounded channel, so memory holds a few batches and a
//! few sealed segments whatever the size of the source.

use std::sync::Arc;

use futures::stream::{BoxStream, FuturesUnordered};
use futures::{StreamExt, TryStreamExt};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tracing::{debug, info, instrument, warn};

use super::{BackupError, new_backup_id};
use crate::adapters::{AdapterError, Extraction};
use crate::manifest::{
    FailureRecord, MANIFEST_FORMAT_VERSION, Manifest, SegmentEntry, SourceInfo, StartRecord,
    ToolInfo, Totals,
};
use crate::order::SeqTracker;
use crate::progress::Progress;
use crate::segment::{FORMAT_VERSION, SealedSegment, SegmentEncoder, SegmentOptions};
use crate::store::{BackupStore, UploadOptions};
use crate::{Error, Op, Result};

/// Batches of ops waiting for the encoder.
const OP_BATCH_QUEUE: usize = 4;
/// Sealed segments waiting for an upload slot.
const SEGMENT_QUEUE: usize = 1;

/// How an extract writes its backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractOptions {
    /// Segment size and compression level.
    pub segment: SegmentOptions,
    /// Multipart settings.
    pub upload: UploadOptions,
    /// Segments uploading at once.
    pub upload_concurrency: usize,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            segment: SegmentOptions::default(),
            upload: UploadOptions::default(),
            upload_concurrency: 2,
        }
    }
}

/// Writes the ops of `extraction` as a new backup in `store` and seals it
/// with its manifest. On any failure the manifest is not written, so the
/// partial backup shows as incomplete and is never restored.
#[instrument(skip_all, fields(store = %store.display()))]
pub async fn write_backup(
    store: &BackupStore,
    extraction: Extraction,
    options: ExtractOptions,
    progress: Arc<Progress>,
) -> Result<Manifest> {
    let created_at = OffsetDateTime::now_utc();
    let backup_id = new_backup_id(created_at);
    let Extraction { info: source, ops } = extraction;
    // Written first, so a restore can follow the backup as it is written.
    store
        .put_start_record(&StartRecord {
            format_version: MANIFEST_FORMAT_VERSION,
            backup_id: backup_id.clone(),
            created_at,
            tool: ToolInfo::current(),
            source: source.clone(),
            segment_format_version: FORMAT_VERSION,
        })
        .await?;
    info!(backup_id = %backup_id, "backup started");
    let written = write_segments(
        store, &backup_id, created_at, source, ops, options, progress,
    )
    .await;
    if let Err(error) = &written {
        // A follower stops on this at once; the backup stays unsealed.
        let record = FailureRecord {
            backup_id: backup_id.clone(),
            failed_at: OffsetDateTime::now_utc(),
            reason: error.to_string(),
        };
        if let Err(unrecorded) = store.put_failure(&record).await {
            warn!(backup_id = %backup_id, error = %unrecorded, "could not record the extract's failure in the store");
        }
    }
    written
}

/// The body of [`write_backup`] once its start record is written.
async fn write_segments(
    store: &BackupStore,
    backup_id: &str,
    created_at: OffsetDateTime,
    source: SourceInfo,
    mut ops: BoxStream<'static, Result<Vec<Op>>>,
    options: ExtractOptions,
    progress: Arc<Progress>,
) -> Result<Manifest> {
    let backup_id = backup_id.to_owned();

    let (op_sender, op_receiver) = mpsc::channel::<Vec<Op>>(OP_BATCH_QUEUE);
    let (segment_sender, segment_receiver) = mpsc::channel::<SealedSegment>(SEGMENT_QUEUE);
    let encoder = {
        let backup_id = backup_id.clone();
        tokio::task::spawn_blocking(move || {
            encode_segments(&backup_id, options.segment, op_receiver, segment_sender)
        })
    };
    let uploader = tokio::spawn(upload_segments(
        store.clone(),
        backup_id.clone(),
        segment_receiver,
        options,
        progress.clone(),
    ));

    let mut ops_fed = 0u64;
    let fed: Result<()> = async {
        while let Some(batch) = ops.try_next().await? {
            let count = batch.len() as u64;
            if op_sender.send(batch).await.is_err() {
                // The encoder or the uploader stopped; their error says why.
                break;
            }
            ops_fed += count;
            Progress::add(&progress.ops, count);
        }
        Ok(())
    }
    .await;
    drop(op_sender);
    drop(ops);
    let encoded = encoder.await.expect("the segment encoder does not panic");
    let uploaded = uploader.await.expect("the uploader does not panic");
    fed?;
    encoded?;
    let mut segments = uploaded?;
    segments.sort_by_key(|entry| entry.first_seq);

    let totals = segments
        .iter()
        .fold(Totals::default(), |mut totals, entry| {
            totals.ops += entry.ops;
            totals.segments += 1;
            totals.uncompressed_bytes += entry.uncompressed_bytes;
            totals.compressed_bytes += entry.compressed_bytes;
            totals
        });
    if totals.ops != ops_fed {
        return Err(BackupError::Internal {
            backup_id,
            reason: format!("{ops_fed} ops were read but {} were written", totals.ops),
        }
        .into());
    }
    let manifest = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        backup_id,
        created_at,
        completed_at: OffsetDateTime::now_utc(),
        tool: ToolInfo::current(),
        source,
        segment_format_version: FORMAT_VERSION,
        codec: "zstd".to_owned(),
        compression_level: options.segment.compression_level,
        totals,
        segments,
    };
    manifest.validate()?;
    store.put_manifest(&manifest).await?;
    info!(
        backup_id = %manifest.backup_id,
        ops = totals.ops,
        segments = totals.segments,
        compressed_bytes = totals.compressed_bytes,
        "backup sealed"
    );
    Ok(manifest)
}

/// The encoder thread: checks the source's seq order (G1) and cuts sealed
/// segments. Returns early, without error, when the uploader has stopped.
fn encode_segments(
    backup_id: &str,
    options: SegmentOptions,
    mut op_receiver: mpsc::Receiver<Vec<Op>>,
    segment_sender: mpsc::Sender<SealedSegment>,
) -> Result<()> {
    let mut tracker = SeqTracker::new();
    let mut encoder: Option<SegmentEncoder> = None;
    while let Some(batch) = op_receiver.blocking_recv() {
        for op in &batch {
            tracker
                .try_advance(op.seq)
                .map_err(|source| AdapterError::SourceOutOfOrder { source })?;
            let current = match encoder.as_mut() {
                Some(current) => current,
                None => encoder.insert(SegmentEncoder::new(backup_id, options)?),
            };
            current.push(op)?;
            if current.is_full() {
                let sealed = encoder.take().expect("just filled").seal()?;
                debug!(segment = %sealed.name, bytes = sealed.len(), "segment sealed");
                if segment_sender.blocking_send(sealed).is_err() {
                    return Ok(());
                }
            }
        }
    }
    if let Some(last) = encoder.filter(|encoder| !encoder.is_empty()) {
        // A closed uploader has its own error to report.
        let _ = segment_sender.blocking_send(last.seal()?);
    }
    Ok(())
}

/// The uploader: a few segments in flight at once; returns their manifest
/// entries in the order they finished.
async fn upload_segments(
    store: BackupStore,
    backup_id: String,
    mut segment_receiver: mpsc::Receiver<SealedSegment>,
    options: ExtractOptions,
    progress: Arc<Progress>,
) -> Result<Vec<SegmentEntry>> {
    let mut entries = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    let mut receiving = true;
    let concurrency = options.upload_concurrency.max(1);
    loop {
        tokio::select! {
            received = segment_receiver.recv(), if receiving && in_flight.len() < concurrency => {
                match received {
                    Some(segment) => in_flight.push(upload_one(&store, &backup_id, segment, options.upload)),
                    None => receiving = false,
                }
            }
            Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                let entry: SegmentEntry = result?;
                Progress::add(&progress.bytes_written, entry.compressed_bytes);
                Progress::add(&progress.segments, 1);
                entries.push(entry);
            }
            else => break,
        }
    }
    Ok(entries)
}

async fn upload_one(
    store: &BackupStore,
    backup_id: &str,
    segment: SealedSegment,
    options: UploadOptions,
) -> Result<SegmentEntry, Error> {
    store.put_segment(backup_id, &segment, options).await?;
    Ok(SegmentEntry {
        name: segment.name.to_string(),
        path: format!("segments/{}", segment.name.file_name()),
        first_seq: segment.header.first_seq,
        last_seq: segment.header.last_seq,
        ops: segment.header.op_count,
        uncompressed_bytes: segment.header.uncompressed_bytes,
        compressed_bytes: segment.len(),
        sha256: hex::encode(segment.sha256),
    })
}

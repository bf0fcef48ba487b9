//! Writing a backup: ops → segments (a blocking thread compresses) →
//! uploads (a few at a time) → the manifest, last.
//!
//! Every hand-off is a bounded channel, so memory holds a few batches and a
//! few sealed segments whatever the size of the source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, FuturesUnordered};
use futures::{StreamExt, TryStreamExt};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tracing::{debug, info, instrument, warn};

use super::{BackupError, new_backup_id};
use crate::adapters::{AdapterError, Extraction};
use crate::manifest::{
    FailureRecord, Heartbeat, MANIFEST_FORMAT_VERSION, Manifest, SegmentEntry, SourceInfo,
    StartRecord, ToolInfo, Totals,
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
/// How often a running extract rewrites its heartbeat by default.
pub const DEFAULT_HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// How long a segment holding ops stays open by default (`ferry extract
/// --seal-after` says the same).
pub const DEFAULT_SEAL_AFTER: Duration = Duration::from_secs(2);

/// How an extract writes its backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractOptions {
    /// Segment size and compression level.
    pub segment: SegmentOptions,
    /// A segment holding ops is sealed once it has been open this long,
    /// short of its size, so a restore following the backup gets the ops of
    /// a slow source within about this time (`None`: sealed by size only).
    pub seal_after: Option<Duration>,
    /// How often the extract rewrites its heartbeat (`alive.json`).
    pub heartbeat_every: Duration,
    /// Multipart settings.
    pub upload: UploadOptions,
    /// Segments uploading at once.
    pub upload_concurrency: usize,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            segment: SegmentOptions::default(),
            seal_after: Some(DEFAULT_SEAL_AFTER),
            heartbeat_every: DEFAULT_HEARTBEAT_EVERY,
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
    // The beat lasts as long as the writing: it stops with it, and with a
    // killed or aborted extract.
    let written = tokio::select! {
        written = write_segments(store, &backup_id, created_at, source, ops, options, progress) => written,
        never = beat(store, &backup_id, options.heartbeat_every) => match never {},
    };
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

/// Rewrites the backup's heartbeat every `every`, for ever. A beat the store
/// refuses is logged and the next one tried: the segments' own puts fail
/// the extract when the store is gone.
async fn beat(store: &BackupStore, backup_id: &str, every: Duration) -> std::convert::Infallible {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat = 0u64;
    loop {
        ticks.tick().await;
        beat += 1;
        let heartbeat = Heartbeat {
            backup_id: backup_id.to_owned(),
            beat,
            at: OffsetDateTime::now_utc(),
            every_ms: every.as_millis() as u64,
        };
        if let Err(error) = store.put_heartbeat(&heartbeat).await {
            warn!(backup_id, beat, %error, "could not write the extract's heartbeat");
        }
    }
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

    let (op_sender, op_receiver) = mpsc::channel::<ToEncoder>(OP_BATCH_QUEUE);
    let (segment_sender, segment_receiver) = mpsc::channel::<SealedSegment>(SEGMENT_QUEUE);
    let encoder = {
        let backup_id = backup_id.clone();
        tokio::task::spawn_blocking(move || {
            encode_segments(&backup_id, options, op_receiver, segment_sender)
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
    // The encoder looks at its open segment's age on every message; a quiet
    // source still sends it one a tick.
    let mut ticks = options
        .seal_after
        .filter(|after| !after.is_zero())
        .map(|after| {
            // A quarter: a quiet source's segment is sealed within 1.25 x
            // `after` (and no tick closer than 10 ms, whatever was asked).
            let period = (after / 4).max(Duration::from_millis(10));
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
    let fed: Result<()> = async {
        loop {
            let message = tokio::select! {
                batch = ops.try_next() => match batch? {
                    Some(batch) => batch,
                    None => break,
                },
                _ = async { ticks.as_mut().expect("guarded").tick().await }, if ticks.is_some() => {
                    if op_sender.send(ToEncoder::Tick).await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            let count = message.len() as u64;
            if op_sender.send(ToEncoder::Ops(message)).await.is_err() {
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

/// What the encoder thread is handed.
enum ToEncoder {
    /// The source's next ops.
    Ops(Vec<Op>),
    /// Time passed: seal the open segment if it is old enough.
    Tick,
}

/// The encoder thread: checks the source's seq order (G1) and cuts sealed
/// segments, when full or when open `seal_after`. Returns early, without
/// error, when the uploader has stopped.
fn encode_segments(
    backup_id: &str,
    options: ExtractOptions,
    mut op_receiver: mpsc::Receiver<ToEncoder>,
    segment_sender: mpsc::Sender<SealedSegment>,
) -> Result<()> {
    let mut tracker = SeqTracker::new();
    let mut open: Option<(SegmentEncoder, Instant)> = None;
    let seal = |encoder: SegmentEncoder| -> Result<bool> {
        let sealed = encoder.seal()?;
        debug!(segment = %sealed.name, bytes = sealed.len(), "segment sealed");
        Ok(segment_sender.blocking_send(sealed).is_ok())
    };
    while let Some(message) = op_receiver.blocking_recv() {
        if let ToEncoder::Ops(batch) = message {
            for op in &batch {
                tracker
                    .try_advance(op.seq)
                    .map_err(|source| AdapterError::SourceOutOfOrder { source })?;
                let (current, _) = match open.as_mut() {
                    Some(current) => current,
                    None => open.insert((
                        SegmentEncoder::new(backup_id, options.segment)?,
                        Instant::now(),
                    )),
                };
                current.push(op)?;
                if current.is_full() {
                    let (full, _) = open.take().expect("just filled");
                    if !seal(full)? {
                        return Ok(());
                    }
                }
            }
        }
        let old_enough = |(encoder, opened): &(SegmentEncoder, Instant)| {
            options
                .seal_after
                .is_some_and(|after| !encoder.is_empty() && opened.elapsed() >= after)
        };
        if open.as_ref().is_some_and(old_enough) {
            let (due, _) = open.take().expect("just checked");
            if !seal(due)? {
                return Ok(());
            }
        }
    }
    if let Some((last, _)) = open.filter(|(encoder, _)| !encoder.is_empty()) {
        // A closed uploader has its own error to report.
        let _ = seal(last)?;
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

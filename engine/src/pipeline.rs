//! ferry's jobs end to end: extract a source into a backup, restore a
//! backup onto a target. The CLI is a thin shell around these.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use tracing::info;

use crate::Result;
use crate::adapters::{Sink, Source, StreamInfo};
use crate::backup::{ExtractOptions, RestoreOptions, find_backup, read_backup, write_backup};
use crate::manifest::Manifest;
use crate::progress::Progress;
use crate::store::BackupStore;

/// What an extract did.
#[derive(Debug, Clone)]
pub struct ExtractSummary {
    /// The sealed backup's manifest.
    pub manifest: Manifest,
    /// Wall time of the whole extract.
    pub elapsed: Duration,
}

/// Extracts `source` into a new, sealed backup in `store`.
pub async fn extract(
    source: Box<dyn Source>,
    store: &BackupStore,
    options: ExtractOptions,
    progress: Arc<Progress>,
) -> Result<ExtractSummary> {
    let started = Instant::now();
    let extraction = source.open(progress.clone()).await?;
    let manifest = write_backup(store, extraction, options, progress).await?;
    Ok(ExtractSummary {
        manifest,
        elapsed: started.elapsed(),
    })
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreSummary {
    /// The backup restored.
    pub manifest: Manifest,
    /// Ops applied to the target by this run.
    pub ops: u64,
    /// Wall time of the whole restore.
    pub elapsed: Duration,
}

/// Restores a backup (`backup_id`, or the latest complete one) onto `sink`.
/// Every segment is checked before its ops reach the sink.
pub async fn restore(
    store: &BackupStore,
    backup_id: Option<&str>,
    mut sink: Box<dyn Sink>,
    options: RestoreOptions,
    progress: Arc<Progress>,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let manifest = Arc::new(find_backup(store, backup_id).await?);
    info!(backup_id = %manifest.backup_id, ops = manifest.totals.ops, "restore started");
    Progress::set(&progress.ops_total, manifest.totals.ops);
    Progress::set(&progress.bytes_read_total, manifest.totals.compressed_bytes);
    let resume_after = sink
        .begin(&StreamInfo {
            stream_id: manifest.backup_id.clone(),
            source_identity: manifest.source.identity.clone(),
            ops_total: Some(manifest.totals.ops),
            key_prefix: manifest
                .source
                .key_prefix
                .as_ref()
                .map(|prefix| prefix.clone().into_bytes()),
        })
        .await?
        .unwrap_or(0);
    if resume_after > 0 {
        info!(backup_id = %manifest.backup_id, applied_through_seq = resume_after, "the target holds part of this backup already; resuming");
        Progress::set(&progress.ops, resume_after.min(manifest.totals.ops));
    }
    // Every segment is still read and checked in full, the ones the target
    // holds already included: a resume trusts the backup no more than a
    // first run does.
    let mut segments = read_backup(store.clone(), manifest.clone(), options);
    let mut ops = 0u64;
    while let Some(mut batch) = segments.try_next().await? {
        batch.retain(|op| op.seq > resume_after);
        if batch.is_empty() {
            continue;
        }
        let count = batch.len() as u64;
        sink.apply(batch).await?;
        ops += count;
        Progress::add(&progress.ops, count);
    }
    sink.finish().await?;
    info!(backup_id = %manifest.backup_id, ops, "restore finished");
    Ok(RestoreSummary {
        manifest: Arc::unwrap_or_clone(manifest),
        ops,
        elapsed: started.elapsed(),
    })
}

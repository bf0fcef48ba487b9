//! ferry's jobs end to end: extract a source into a backup, restore a
//! backup onto a target. The CLI is a thin shell around these.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt, TryStreamExt};
use tracing::info;

use crate::adapters::{Sink, Source, StreamInfo};
use crate::backup::{
    ExtractOptions, FollowOptions, Followed, RestoreOptions, find_backup, find_backup_to_follow,
    follow_backup, read_backup, write_backup,
};
use crate::manifest::Manifest;
use crate::migrations::chain::{Chain, KeyCheck};
use crate::migrations::profile::Profile;
use crate::migrations::{MigrationError, off_the_runtime};
use crate::progress::Progress;
use crate::store::BackupStore;
use crate::{Op, Result};

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
    sink: Box<dyn Sink>,
    options: RestoreOptions,
    progress: Arc<Progress>,
) -> Result<RestoreSummary> {
    restore_migrated(store, backup_id, sink, options, progress, None).await
}

/// Restores a backup as [`restore`] does, its ops taken through a version
/// migration chain on the way when `migrations` is given.
///
/// With a chain, the backup is read twice: a first pass runs every op
/// through the chain and writes nothing, so a filter error, an output that
/// is not an op, or two keys landing on one is reported before the target
/// is touched; the second pass applies. Each batch is transformed whole
/// before the sink sees it. The chain numbers the ops it hands on, the same
/// way on every run, so a restore that resumes skips what the target holds.
pub async fn restore_migrated(
    store: &BackupStore,
    backup_id: Option<&str>,
    mut sink: Box<dyn Sink>,
    options: RestoreOptions,
    progress: Arc<Progress>,
    migrations: Option<MigrateOnRestore>,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let manifest = Arc::new(find_backup(store, backup_id).await?);
    info!(backup_id = %manifest.backup_id, ops = manifest.totals.ops, "restore started");
    let mut ops_total = manifest.totals.ops;
    let mut key_prefix = manifest
        .source
        .key_prefix
        .as_ref()
        .map(|prefix| prefix.clone().into_bytes());
    let chain = match migrations {
        None => None,
        Some(migrations) => {
            let scanned = prescan_chain(store, manifest.clone(), options, &migrations).await?;
            ops_total = scanned.handed_on;
            // The chain may move keys out of the backup's prefix: the
            // target must hold nothing where they land.
            if key_prefix.is_some()
                && let Some(landing) = scanned.output_prefix
            {
                key_prefix = Some(landing);
            }
            Some(migrations.chain(&manifest, store, options).await?)
        }
    };
    Progress::set(&progress.ops_total, ops_total);
    Progress::set(&progress.bytes_read_total, manifest.totals.compressed_bytes);
    let resume_after = sink
        .begin(&StreamInfo {
            stream_id: manifest.backup_id.clone(),
            source_identity: manifest.source.identity.clone(),
            ops_total: Some(ops_total),
            key_prefix,
        })
        .await?
        .unwrap_or(0);
    if resume_after > 0 {
        info!(backup_id = %manifest.backup_id, applied_through_seq = resume_after, "the target holds part of this backup already; resuming");
        Progress::set(&progress.ops, resume_after.min(ops_total));
    }
    // Every segment is still read and checked in full, the ones the target
    // holds already included: a resume trusts the backup no more than a
    // first run does.
    let segments = read_backup(store.clone(), manifest.clone(), options);
    let batches = match chain {
        None => segments.boxed(),
        Some(chain) => through_the_chain_ahead(segments, chain).boxed(),
    };
    let ops = apply_after(sink, batches, resume_after, &progress).await?;
    info!(backup_id = %manifest.backup_id, ops, "restore finished");
    Ok(RestoreSummary {
        manifest: Arc::unwrap_or_clone(manifest),
        ops,
        elapsed: started.elapsed(),
    })
}

/// Applies the ops after `resume_after` to `sink`, then finishes it; the
/// ops applied.
async fn apply_after(
    mut sink: Box<dyn Sink>,
    mut batches: futures::stream::BoxStream<'static, Result<Vec<Op>>>,
    resume_after: u64,
    progress: &Progress,
) -> Result<u64> {
    let mut ops = 0u64;
    while let Some(mut batch) = batches.try_next().await? {
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
    Ok(ops)
}

/// Restores a backup while it is still being written (`ferry restore
/// --follow`): `backup_id`, or the one being written in the store, waiting
/// for it to start. Its segments are applied as they are sealed, each on
/// its own checks, and all of them against the manifest once it lands; a
/// backup already sealed is restored as [`restore`] does. See
/// [`crate::backup::follow_backup`] for what stops it.
pub async fn restore_following(
    store: &BackupStore,
    backup_id: Option<&str>,
    mut sink: Box<dyn Sink>,
    options: RestoreOptions,
    follow: FollowOptions,
    progress: Arc<Progress>,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let start = match find_backup_to_follow(store, backup_id, follow).await? {
        Followed::Sealed(manifest) => {
            let backup_id = manifest.backup_id.clone();
            return restore(store, Some(&backup_id), sink, options, progress).await;
        }
        Followed::Writing(start) => start,
    };
    info!(backup_id = %start.backup_id, "following a backup being written");
    let resume_after = sink
        .begin(&StreamInfo {
            stream_id: start.backup_id.clone(),
            source_identity: start.source.identity.clone(),
            ops_total: None,
            key_prefix: start.source.key_prefix.clone().map(String::into_bytes),
        })
        .await?
        .unwrap_or(0);
    if resume_after > 0 {
        info!(backup_id = %start.backup_id, applied_through_seq = resume_after, "the target holds part of this backup already; resuming");
        Progress::set(&progress.ops, resume_after);
    }
    let (batches, sealed) = follow_backup(store.clone(), start, options, follow);
    let ops = apply_after(sink, batches.boxed(), resume_after, &progress).await?;
    let manifest = sealed
        .await
        .expect("a followed stream that ends without error was sealed");
    Progress::set(&progress.ops_total, manifest.totals.ops);
    info!(backup_id = %manifest.backup_id, ops, "restore finished");
    Ok(RestoreSummary {
        manifest,
        ops,
        elapsed: started.elapsed(),
    })
}

/// A version migration chain for a restore: `--migrations DIR --to-version V`.
#[derive(Debug, Clone)]
pub struct MigrateOnRestore {
    /// The platform profile.
    pub profile: Profile,
    /// The version the ops are written in on the target.
    pub to_version: String,
    /// The version the backup's ops are in, when neither the manifest nor
    /// the ops say (or to override them).
    pub from_version: Option<String>,
}

impl MigrateOnRestore {
    /// The version the backup's ops start in: `from_version` when given;
    /// else the manifest's source version when the source is the profile's
    /// platform; else the first op's `platform_version` when it is one of
    /// the profile's versions.
    pub async fn from_version_of(
        &self,
        manifest: &Arc<Manifest>,
        store: &BackupStore,
        options: RestoreOptions,
    ) -> Result<String> {
        if let Some(version) = &self.from_version {
            return Ok(version.clone());
        }
        if manifest.source.platform == self.profile.platform
            && let Some(version) = &manifest.source.platform_version
        {
            return Ok(version.clone());
        }
        let mut segments = read_backup(store.clone(), manifest.clone(), options);
        let first = segments.try_next().await?;
        let named = first
            .as_ref()
            .and_then(|batch| batch.first())
            .and_then(|op| std::str::from_utf8(&op.platform_version).ok())
            .filter(|version| self.profile.versions.iter().any(|known| known == version))
            .map(str::to_owned);
        named.ok_or_else(|| {
            MigrationError::NoFromVersion {
                platform: self.profile.platform.clone(),
                reason: format!(
                    "backup {} comes from platform {:?} (version {}), and its ops name no version of profile {:?}",
                    manifest.backup_id,
                    manifest.source.platform,
                    manifest.source.platform_version.as_deref().unwrap_or("unknown"),
                    self.profile.platform
                ),
            }
            .into()
        })
    }

    async fn chain(
        &self,
        manifest: &Arc<Manifest>,
        store: &BackupStore,
        options: RestoreOptions,
    ) -> Result<Chain> {
        let from = self.from_version_of(manifest, store, options).await?;
        Ok(Chain::new(self.profile.clone(), &from, &self.to_version)?)
    }
}

/// Batches of `segments` taken through `chain` on their own task, a batch
/// or two ahead of the sink: the filters (CPU) run while the target writes
/// the batch before. The first error, the backup's or the chain's, ends the
/// stream.
fn through_the_chain_ahead(
    segments: impl Stream<Item = Result<Vec<Op>>> + Send + 'static,
    mut chain: Chain,
) -> impl Stream<Item = Result<Vec<Op>>> + Send + 'static {
    let (sender, receiver) = tokio::sync::mpsc::channel(TRANSFORMED_AHEAD);
    tokio::spawn(async move {
        let mut segments = std::pin::pin!(segments);
        loop {
            let batch = match segments.try_next().await {
                Ok(Some(batch)) => batch,
                Ok(None) => return,
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
            };
            let (back, transformed) =
                off_the_runtime(chain, move |chain| chain.transform_batch(batch)).await;
            chain = back;
            let failed = transformed.is_err();
            // A sink that stopped reading dropped the receiver: stop too.
            if sender.send(transformed.map_err(Into::into)).await.is_err() || failed {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// Batches transformed ahead of the sink, at most.
const TRANSFORMED_AHEAD: usize = 2;

/// What the first pass of a restore through a chain found.
struct Prescanned {
    /// Ops the chain hands on.
    handed_on: u64,
    /// The longest prefix every output of the backup's prefixed ops shares
    /// (`None` without a prefix, or when there are none): where the chain
    /// lands the keys, which may be outside the backup's prefix (Mystic's
    /// `/v3/runs/` become `/v4/runs/`).
    output_prefix: Option<Vec<u8>>,
}

/// Runs every op of the backup through the chain and writes nothing: the
/// chain is planned (holes, missing `down`s), every filter runs, every
/// output is checked, and two source keys landing on one key are found,
/// all before the target is touched.
async fn prescan_chain(
    store: &BackupStore,
    manifest: Arc<Manifest>,
    options: RestoreOptions,
    migrations: &MigrateOnRestore,
) -> Result<Prescanned> {
    let chain = migrations.chain(&manifest, store, options).await?;
    info!(
        from = %chain.plan().from,
        to = %chain.plan().to,
        steps = chain.plan().steps.len(),
        "checking every op against the migration chain before writing"
    );
    // Ops under the backup's prefix are the keys; the others (etcd's
    // leases, named by id) say nothing of where keys land.
    let prefix = manifest.source.key_prefix.clone().map(String::into_bytes);
    let mut checking = (chain, KeyCheck::new(), None::<Vec<u8>>);
    let mut handed_on = 0u64;
    let mut segments = read_backup(store.clone(), manifest, options);
    while let Some(batch) = segments.try_next().await? {
        let prefix = prefix.clone();
        let (checked, outputs) = off_the_runtime(checking, move |(chain, check, landing)| {
            let (keys, others): (Vec<Op>, Vec<Op>) = batch.into_iter().partition(|op| {
                prefix
                    .as_ref()
                    .is_some_and(|prefix| op.key.starts_with(prefix))
            });
            let outputs = chain.transform_batch_checked(keys, check)?;
            for op in &outputs {
                *landing = Some(match landing.take() {
                    None => op.key.to_vec(),
                    Some(mut common) => {
                        let shared = common
                            .iter()
                            .zip(op.key.iter())
                            .take_while(|(one, other)| one == other)
                            .count();
                        common.truncate(shared);
                        common
                    }
                });
            }
            let others = chain.transform_batch_checked(others, check)?;
            Ok::<usize, MigrationError>(outputs.len() + others.len())
        })
        .await;
        checking = checked;
        handed_on += outputs? as u64;
    }
    Ok(Prescanned {
        handed_on,
        output_prefix: checking.2,
    })
}

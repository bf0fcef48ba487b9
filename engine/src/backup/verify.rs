//! Verifying a backup without restoring it: every segment read and checked,
//! every problem reported (not only the first).

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt;

use super::find_backup;
use super::read::read_segment;
use crate::progress::Progress;
use crate::segment::SegmentLimits;
use crate::store::BackupStore;
use crate::{Error, Result};

/// A segment that failed a check.
#[derive(Debug)]
pub struct SegmentProblem {
    /// The segment, by name.
    pub segment: String,
    /// What is wrong with it.
    pub error: Error,
}

/// What `verify` found.
#[derive(Debug)]
pub struct VerifyReport {
    /// The backup checked.
    pub backup_id: String,
    /// Segments the manifest lists.
    pub segments_listed: u64,
    /// Segments that passed every check.
    pub segments_ok: u64,
    /// Ops in the segments that passed.
    pub ops_ok: u64,
    /// Ops the manifest lists.
    pub ops_listed: u64,
    /// Every damaged or missing segment.
    pub problems: Vec<SegmentProblem>,
    /// Segment objects in the store that the manifest does not list (left
    /// by an interrupted upload retry, or planted): harmless to a restore,
    /// which never reads them, but worth knowing.
    pub unlisted_segments: Vec<String>,
}

impl VerifyReport {
    /// True when every segment passed every check.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
            && self.segments_ok == self.segments_listed
            && self.ops_ok == self.ops_listed
    }
}

/// Reads every segment of a backup (the latest complete one when
/// `backup_id` is `None`) and checks its checksums, SHA-256, header,
/// contiguity and counts. A manifest that is missing or does not add up is
/// an `Err`; damaged segments are listed in the report.
pub async fn verify_backup(
    store: &BackupStore,
    backup_id: Option<&str>,
    limits: SegmentLimits,
    progress: Arc<Progress>,
) -> Result<VerifyReport> {
    let manifest = find_backup(store, backup_id).await?;
    Progress::set(&progress.ops_total, manifest.totals.ops);
    Progress::set(&progress.bytes_read_total, manifest.totals.compressed_bytes);
    let backup_id = manifest.backup_id.clone();
    let mut report = VerifyReport {
        backup_id: backup_id.clone(),
        segments_listed: manifest.totals.segments,
        segments_ok: 0,
        ops_ok: 0,
        ops_listed: manifest.totals.ops,
        problems: Vec::new(),
        unlisted_segments: Vec::new(),
    };
    let mut results = futures::stream::iter(manifest.segments.iter())
        .map(|entry| {
            let backup_id = backup_id.clone();
            async move {
                let result = match read_segment(store, &backup_id, entry, limits).await {
                    // Decode every op: its encoding, its seq, the count.
                    Ok(segment) => tokio::task::spawn_blocking(move || {
                        segment
                            .ops()
                            .try_fold(0u64, |count, op| op.map(|_| count + 1))
                    })
                    .await
                    .expect("op decoding does not panic")
                    .map_err(Error::from),
                    Err(error) => Err(error),
                };
                (entry, result)
            }
        })
        .buffered(2);
    while let Some((entry, result)) = results.next().await {
        Progress::add(&progress.bytes_read, entry.compressed_bytes);
        Progress::add(&progress.segments, 1);
        match result {
            Ok(ops) => {
                report.segments_ok += 1;
                report.ops_ok += ops;
                Progress::add(&progress.ops, ops);
            }
            Err(error) => report.problems.push(SegmentProblem {
                segment: entry.name.clone(),
                error,
            }),
        }
    }
    let listed: BTreeSet<String> = manifest
        .segments
        .iter()
        .map(|entry| entry.name.clone())
        .collect();
    report.unlisted_segments = store
        .list_segments(&backup_id)
        .await?
        .into_iter()
        .map(|(name, _)| name.to_string())
        .filter(|name| !listed.contains(name))
        .collect();
    Ok(report)
}

//! Helpers shared by the engine's integration tests.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::sync::Arc;

use bytes::Bytes;
use ferry_engine::Op;
use ferry_engine::adapters::Extraction;
use ferry_engine::backup::{ExtractOptions, write_backup};
use ferry_engine::manifest::{Manifest, SourceInfo};
use ferry_engine::progress::Progress;
use ferry_engine::segment::SegmentOptions;
use ferry_engine::store::BackupStore;

/// `count` realistic ops, seqs 1..=count.
pub fn ops(count: u64) -> Vec<Op> {
    (1..=count)
        .map(|seq| Op {
            seq,
            position: seq + 100,
            txn: 0,
            txn_last: true,
            kind: Bytes::from_static(b"etcd.kv"),
            key: Bytes::from(format!("/pachyderm/pfs/commits/repo{}/{seq:040x}", seq % 7)),
            method: Bytes::from_static(b"Put"),
            body: Bytes::from(format!(
                r#"{{"seq":{seq},"origin":"USER","description":"commit number {seq}"}}"#
            )),
            content_type: Bytes::from_static(b"application/json"),
            platform_version: Bytes::from_static(b"1.12"),
            deps: Vec::new(),
        })
        .collect()
}

/// The batches a source would hand out.
pub fn extraction(ops: Vec<Op>, batch: usize) -> Extraction {
    let batches: Vec<ferry_engine::Result<Vec<Op>>> = ops
        .chunks(batch.max(1))
        .map(|chunk| Ok(chunk.to_vec()))
        .collect();
    Extraction {
        info: SourceInfo {
            platform: "test".to_owned(),
            ..SourceInfo::default()
        },
        ops: Box::pin(futures::stream::iter(batches)),
    }
}

/// Options that cut small segments, so a few hundred ops make several.
pub fn small_segments() -> ExtractOptions {
    ExtractOptions {
        segment: SegmentOptions {
            target_uncompressed_bytes: 16 * 1024,
            compression_level: 3,
        },
        ..ExtractOptions::default()
    }
}

/// A `file://` store in a fresh temporary folder.
pub fn file_store() -> (tempfile::TempDir, BackupStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("file://{}", dir.path().display());
    let store = BackupStore::open(&url, true).expect("file store opens");
    (dir, store)
}

/// Writes `ops` as a backup with small segments.
pub async fn backup_of(store: &BackupStore, ops: Vec<Op>) -> Manifest {
    write_backup(
        store,
        extraction(ops, 100),
        small_segments(),
        Arc::new(Progress::default()),
    )
    .await
    .expect("backup is written")
}

//! Damaged backups: each kind of damage is caught, by restore and by
//! verify, with its own error naming the segment; nothing damaged reaches a
//! target. The backups live in real files (a `file://` store).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use ferry_engine::backup::{BackupError, RestoreOptions, find_backup, read_backup, verify_backup};
use ferry_engine::manifest::{Manifest, ManifestError};
use ferry_engine::progress::Progress;
use ferry_engine::segment::{SegmentError, SegmentLimits};
use ferry_engine::store::BackupStore;
use ferry_engine::{Error, ErrorKind, Op};
use futures::TryStreamExt;

struct Damaged {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: BackupStore,
    manifest: Manifest,
}

impl Damaged {
    async fn new() -> Self {
        let (dir, store) = common::file_store();
        let manifest = common::backup_of(&store, common::ops(2_000)).await;
        assert!(
            manifest.totals.segments >= 4,
            "the tests need several segments"
        );
        Self {
            root: dir.path().join("backups").join(&manifest.backup_id),
            _dir: dir,
            store,
            manifest,
        }
    }

    /// The file of the segment at `index`, and its name.
    fn segment(&self, index: usize) -> (PathBuf, String) {
        let entry = &self.manifest.segments[index];
        (self.root.join(&entry.path), entry.name.clone())
    }

    fn manifest_path(&self) -> PathBuf {
        self.root.join("manifest.json")
    }

    /// Restores the backup into memory; the error if it fails.
    async fn restore(&self) -> Result<Vec<Op>, Error> {
        let manifest = find_backup(&self.store, Some(&self.manifest.backup_id)).await?;
        let batches: Vec<Vec<Op>> = read_backup(
            self.store.clone(),
            Arc::new(manifest),
            RestoreOptions::default(),
        )
        .try_collect()
        .await?;
        Ok(batches.into_iter().flatten().collect())
    }

    /// Verifies the backup; the problems it names, one per damaged segment.
    async fn verify(&self) -> Result<Vec<(String, Error)>, Error> {
        let report = verify_backup(
            &self.store,
            Some(&self.manifest.backup_id),
            SegmentLimits::default(),
            Arc::new(Progress::default()),
        )
        .await?;
        assert_eq!(report.is_ok(), report.problems.is_empty());
        Ok(report
            .problems
            .into_iter()
            .map(|problem| (problem.segment, problem.error))
            .collect())
    }
}

#[tokio::test]
async fn an_intact_backup_restores_and_verifies() {
    let backup = Damaged::new().await;
    assert_eq!(
        backup.restore().await.expect("restores"),
        common::ops(2_000)
    );
    assert!(backup.verify().await.expect("verifies").is_empty());
}

#[tokio::test]
async fn a_flipped_payload_byte_fails_the_segment_checksum() {
    let backup = Damaged::new().await;
    let (path, name) = backup.segment(2);
    let mut bytes = std::fs::read(&path).expect("segment");
    let last = bytes.len() - 10;
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes).expect("write");

    let error = backup
        .restore()
        .await
        .expect_err("a flipped byte is caught");
    assert!(
        matches!(&error, Error::Segment(SegmentError::PayloadChecksum { segment, .. }) if *segment == name),
        "{error:?}"
    );
    assert_eq!(error.kind(), ErrorKind::Damaged);
    assert!(
        error.to_string().contains(&name),
        "the message names the segment: {error}"
    );
    let problems = backup.verify().await.expect("verify runs");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, name);
}

#[tokio::test]
async fn a_flipped_header_byte_fails_the_header_checksum() {
    let backup = Damaged::new().await;
    let (path, name) = backup.segment(0);
    let mut bytes = std::fs::read(&path).expect("segment");
    bytes[20] ^= 0x40;
    std::fs::write(&path, bytes).expect("write");
    let error = backup.restore().await.expect_err("caught");
    assert!(
        matches!(&error, Error::Segment(SegmentError::HeaderChecksum { segment }) if *segment == name),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_truncated_segment_is_named_truncated() {
    let backup = Damaged::new().await;
    let (path, name) = backup.segment(1);
    let bytes = std::fs::read(&path).expect("segment");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("write");
    let error = backup.restore().await.expect_err("caught");
    assert!(
        matches!(&error, Error::Segment(SegmentError::Truncated { segment, expected_bytes, actual_bytes })
            if *segment == name && *expected_bytes == bytes.len() as u64 && *actual_bytes == bytes.len() as u64 - 100),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_deleted_segment_is_named_missing() {
    let backup = Damaged::new().await;
    let (path, name) = backup.segment(3);
    std::fs::remove_file(&path).expect("delete");
    let error = backup.restore().await.expect_err("caught");
    assert!(
        matches!(&error, Error::Backup(BackupError::SegmentMissing { segment, .. }) if *segment == name),
        "{error:?}"
    );
    let problems = backup.verify().await.expect("verify runs");
    assert_eq!(
        problems
            .iter()
            .map(|(segment, _)| segment.clone())
            .collect::<Vec<_>>(),
        vec![name]
    );
}

#[tokio::test]
async fn a_backup_without_manifest_is_incomplete_and_never_restored() {
    let backup = Damaged::new().await;
    std::fs::remove_file(backup.manifest_path()).expect("delete");
    let error = backup.restore().await.expect_err("caught");
    assert!(
        matches!(&error, Error::Backup(BackupError::Incomplete { segments_found, .. }) if *segments_found == backup.manifest.totals.segments),
        "{error:?}"
    );
    assert_eq!(error.kind(), ErrorKind::NotFound);
    let latest = find_backup(&backup.store, None)
        .await
        .expect_err("no complete backup");
    assert!(
        matches!(latest, Error::Backup(BackupError::NoCompleteBackup { .. })),
        "{latest:?}"
    );
    let listings = backup.store.list_backups().await.expect("lists");
    assert_eq!(listings.len(), 1);
    assert!(!listings[0].is_complete());
    assert_eq!(listings[0].segments_found, backup.manifest.totals.segments);
}

#[tokio::test]
async fn a_manifest_with_a_wrong_sha256_is_caught() {
    let backup = Damaged::new().await;
    let mut manifest = backup.manifest.clone();
    let name = manifest.segments[1].name.clone();
    manifest.segments[1].sha256 = "0".repeat(64);
    std::fs::write(backup.manifest_path(), manifest.to_json()).expect("write");
    let error = backup.restore().await.expect_err("caught");
    assert!(
        matches!(&error, Error::Backup(BackupError::Sha256Mismatch { segment, expected, .. }) if *segment == name && *expected == "0".repeat(64)),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_manifest_with_a_hole_is_inconsistent() {
    let backup = Damaged::new().await;
    let mut manifest = backup.manifest.clone();
    let removed = manifest.segments.remove(2);
    manifest.totals.segments -= 1;
    manifest.totals.ops -= removed.ops;
    std::fs::write(backup.manifest_path(), manifest.to_json()).expect("write");
    let error = backup.restore().await.expect_err("caught");
    assert!(
        matches!(&error, Error::Manifest(ManifestError::Inconsistent { segment, .. }) if *segment == manifest.segments[2].name),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_segment_from_another_backup_is_caught() {
    let backup = Damaged::new().await;
    // A second backup of the same ops: same seq ranges, another stream id.
    let other = common::backup_of(&backup.store, common::ops(2_000)).await;
    assert_eq!(other.segments[0].name, backup.manifest.segments[0].name);
    let (path, name) = backup.segment(0);
    let other_path = path
        .parent()
        .and_then(|segments| segments.parent())
        .and_then(|backup_dir| backup_dir.parent())
        .expect("layout")
        .join(&other.backup_id)
        .join(&other.segments[0].path);
    std::fs::copy(other_path, &path).expect("copy");
    let error = backup.restore().await.expect_err("caught");
    assert!(
        matches!(&error, Error::Backup(BackupError::SegmentDisagrees { segment, .. }) if *segment == name),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_segment_over_the_decompression_cap_is_refused() {
    let backup = Damaged::new().await;
    let report = verify_backup(
        &backup.store,
        None,
        SegmentLimits {
            max_uncompressed_bytes: 1024,
        },
        Arc::new(Progress::default()),
    )
    .await
    .expect("verify runs");
    assert_eq!(
        report.problems.len() as u64,
        backup.manifest.totals.segments
    );
    assert!(
        matches!(
            &report.problems[0].error,
            Error::Segment(SegmentError::TooLarge { limit: 1024, .. })
        ),
        "{:?}",
        report.problems[0].error
    );
}

#[tokio::test]
async fn verify_names_every_damaged_segment_not_only_the_first() {
    let backup = Damaged::new().await;
    let (first, first_name) = backup.segment(0);
    let (last, last_name) = backup.segment(backup.manifest.segments.len() - 1);
    for path in [&first, &last] {
        let mut bytes = std::fs::read(path).expect("segment");
        let middle = bytes.len() - 5;
        bytes[middle] ^= 0xff;
        std::fs::write(path, bytes).expect("write");
    }
    let problems = backup.verify().await.expect("verify runs");
    let named: Vec<String> = problems.into_iter().map(|(segment, _)| segment).collect();
    assert_eq!(named, vec![first_name, last_name]);
}

#[tokio::test]
async fn a_restore_from_a_damaged_backup_leaves_no_output_file() {
    let backup = Damaged::new().await;
    let (path, _) = backup.segment(3);
    std::fs::remove_file(&path).expect("delete");
    let out_dir = tempfile::tempdir().expect("temp dir");
    let out = out_dir.path().join("out.jsonl");
    let sink = ferry_engine::adapters::sink_from_url(
        &format!("jsonl://{}", out.display()),
        &Default::default(),
    )
    .expect("sink");
    let error = ferry_engine::pipeline::restore(
        &backup.store,
        None,
        sink,
        RestoreOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .expect_err("caught");
    assert!(
        matches!(error, Error::Backup(BackupError::SegmentMissing { .. })),
        "{error:?}"
    );
    let left: Vec<_> = std::fs::read_dir(out_dir.path()).expect("dir").collect();
    assert!(
        left.is_empty(),
        "a failed restore leaves neither the file nor its partial: {left:?}"
    );
}

//! A restore that follows a backup while its extract writes it: ops come
//! out before the backup is sealed, in order, all of them; a failed, a
//! killed or a tampered extract stops the follower with an error that names
//! it. The backups live in real files (a `file://` store).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_engine::adapters::Extraction;
use ferry_engine::backup::{
    BackupError, ExtractOptions, FollowOptions, Followed, RestoreOptions, SILENT_BEATS,
    find_backup_to_follow, follow_backup, write_backup,
};
use ferry_engine::manifest::{Manifest, SourceInfo, StartRecord};
use ferry_engine::progress::Progress;
use ferry_engine::segment::{SegmentEncoder, SegmentError};
use ferry_engine::store::BackupStore;
use ferry_engine::{Error, Op};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// An extract whose source hands out batches when the test says.
struct Extract {
    feed: mpsc::Sender<ferry_engine::Result<Vec<Op>>>,
    writer: JoinHandle<ferry_engine::Result<Manifest>>,
}

impl Extract {
    fn start(store: &BackupStore) -> Self {
        Self::start_with(store, common::small_segments())
    }

    fn start_with(store: &BackupStore, options: ExtractOptions) -> Self {
        let (feed, ops) = mpsc::channel(1);
        let extraction = Extraction {
            info: SourceInfo {
                platform: "test".to_owned(),
                identity: Some("source-1".to_owned()),
                ..SourceInfo::default()
            },
            ops: tokio_stream::wrappers::ReceiverStream::new(ops).boxed(),
        };
        let store = store.clone();
        let writer = tokio::spawn(async move {
            write_backup(&store, extraction, options, Arc::new(Progress::default())).await
        });
        Self { feed, writer }
    }

    async fn send(&self, ops: &[Op]) {
        for chunk in ops.chunks(100) {
            self.feed
                .send(Ok(chunk.to_vec()))
                .await
                .expect("the writer reads");
        }
    }

    /// Ends the source; the sealed manifest.
    async fn seal(self) -> Manifest {
        drop(self.feed);
        self.writer
            .await
            .expect("the writer does not panic")
            .expect("the backup is sealed")
    }
}

fn quick(stall_timeout: Duration) -> FollowOptions {
    FollowOptions {
        stall_timeout,
        max_poll_interval: Duration::from_millis(50),
        grace_for_earlier: Duration::from_millis(200),
    }
}

/// The one backup being written, found as a follower finds it.
async fn being_written(store: &BackupStore) -> StartRecord {
    match find_backup_to_follow(store, None, quick(Duration::from_secs(30)))
        .await
        .expect("a backup is being written")
    {
        Followed::Writing(start) => start,
        Followed::Sealed(manifest) => panic!("{} is sealed already", manifest.backup_id),
    }
}

/// Takes ops from a follower until `seq` has come, failing after 60 s
/// rather than hanging.
async fn take_through(
    ops: &mut (impl Stream<Item = ferry_engine::Result<Vec<Op>>> + Unpin),
    seq: u64,
    taken: &mut Vec<Op>,
) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while taken.last().map_or(0, |op| op.seq) < seq {
            let batch = ops
                .next()
                .await
                .expect("the follower goes on")
                .expect("the follower reads");
            taken.extend(batch);
        }
    })
    .await
    .expect("the follower hands out the ops of sealed segments before the backup is sealed");
}

/// Follows until the follower's error, checking that the ops it handed
/// out before are a prefix of `ops` and not empty: the last seq handed
/// out, and the error.
async fn follow_to_error(
    followed: impl Stream<Item = ferry_engine::Result<Vec<Op>>>,
    ops: &[Op],
) -> (u64, Error) {
    let mut followed = Box::pin(followed);
    let mut taken = Vec::new();
    let error = loop {
        match followed
            .next()
            .await
            .expect("the follower ends with an error")
        {
            Ok(batch) => taken.extend(batch),
            Err(error) => break error,
        }
    };
    let last = taken.last().map_or(0, |op| op.seq);
    assert!(last > 0, "the stored segments were handed out");
    assert_eq!(taken, ops[..last as usize].to_vec());
    (last, error)
}

async fn rest(ops: impl Stream<Item = ferry_engine::Result<Vec<Op>>>) -> Result<Vec<Op>, Error> {
    let batches: Vec<ferry_engine::Result<Vec<Op>>> = ops.collect().await;
    let mut all = Vec::new();
    for batch in batches {
        all.extend(batch?);
    }
    Ok(all)
}

fn segment_files(root: &Path, backup_id: &str) -> Vec<PathBuf> {
    let dir = root.join("backups").join(backup_id).join("segments");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.map(|entry| entry.expect("entry").path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// Waits until the extract has stored `count` segments.
async fn wait_for_segments(root: &Path, backup_id: &str, count: usize) -> Vec<PathBuf> {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let files = segment_files(root, backup_id);
            if files.len() >= count {
                return files;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the extract stores its segments")
}

#[tokio::test]
async fn a_follower_hands_out_sealed_segments_before_the_backup_is_sealed_and_all_ops_in_order() {
    let (_dir, store) = common::file_store();
    let ops = common::ops(3_000);
    let extract = Extract::start(&store);
    extract.send(&ops[..1_500]).await;
    let start = being_written(&store).await;
    assert_eq!(start.source.identity.as_deref(), Some("source-1"));
    let (followed, sealed) = follow_backup(
        store.clone(),
        start,
        RestoreOptions::default(),
        quick(Duration::from_secs(60)),
    );
    let mut followed = Box::pin(followed);
    // The extract is waiting for its source here: seq 1,000 can only come
    // from a segment read before the backup is sealed.
    let mut taken = Vec::new();
    take_through(&mut followed, 1_000, &mut taken).await;
    extract.send(&ops[1_500..]).await;
    let manifest = extract.seal().await;
    taken.extend(rest(followed).await.expect("the follower reads to the end"));
    assert_eq!(taken, ops);
    assert_eq!(sealed.await.expect("the manifest comes"), manifest);
}

#[tokio::test]
async fn a_follower_of_a_failed_extract_stops_with_the_extracts_reason() {
    let (_dir, store) = common::file_store();
    let extract = Extract::start(&store);
    extract.send(&common::ops(500)).await;
    let start = being_written(&store).await;
    let (followed, sealed) = follow_backup(
        store.clone(),
        start,
        RestoreOptions::default(),
        quick(Duration::from_secs(60)),
    );
    extract
        .feed
        .send(Err(BackupError::Internal {
            backup_id: "source".to_owned(),
            reason: "the source server went away".to_owned(),
        }
        .into()))
        .await
        .expect("the writer reads");
    let written = extract.writer.await.expect("no panic");
    assert!(written.is_err(), "the extract fails");
    let error = rest(followed).await.expect_err("the follower stops");
    let message = error.to_string();
    assert!(
        matches!(
            &error,
            Error::Backup(BackupError::ExtractFailed { reason, .. }) if reason.contains("the source server went away")
        ),
        "{message}"
    );
    assert!(sealed.await.is_err(), "no manifest");
}

#[tokio::test]
async fn a_follower_of_a_killed_extract_stops_after_its_timeout_naming_the_last_segment() {
    let (dir, store) = common::file_store();
    let ops = common::ops(2_000);
    let extract = Extract::start(&store);
    extract.send(&ops[..1_000]).await;
    let start = being_written(&store).await;
    let backup_id = start.backup_id.clone();
    let files = wait_for_segments(dir.path(), &backup_id, 2).await;
    // Killed: no failure record, no manifest, nothing more.
    extract.writer.abort();
    let _ = extract.writer.await;
    let stored = segment_files(dir.path(), &backup_id);
    assert!(stored.len() >= files.len());
    let (followed, _sealed) = follow_backup(
        store.clone(),
        start,
        RestoreOptions::default(),
        quick(Duration::from_millis(500)),
    );
    let (last, error) = follow_to_error(followed, &ops).await;
    match &error {
        Error::Backup(BackupError::Stalled {
            backup_id: stalled,
            last: named,
            applied_through,
            ..
        }) => {
            assert_eq!(stalled, &backup_id);
            assert_eq!(*applied_through, last);
            assert!(named.ends_with(&format!("{last:020}")), "{error}");
        }
        other => panic!("expected a stall, got {other}"),
    }
}

#[tokio::test]
async fn a_damaged_segment_stops_a_follower_before_any_of_its_ops() {
    let (dir, store) = common::file_store();
    let ops = common::ops(2_000);
    let extract = Extract::start(&store);
    extract.send(&ops[..1_000]).await;
    let start = being_written(&store).await;
    let files = wait_for_segments(dir.path(), &start.backup_id, 1).await;
    let mut bytes = std::fs::read(&files[0]).expect("segment");
    let middle = bytes.len() - 10;
    bytes[middle] ^= 0x40;
    std::fs::write(&files[0], bytes).expect("damaged");
    let (followed, _sealed) = follow_backup(
        store.clone(),
        start,
        RestoreOptions::default(),
        quick(Duration::from_secs(60)),
    );
    let mut followed = Box::pin(followed);
    let first = followed.next().await.expect("an answer");
    let error = first.expect_err("no op of a damaged segment is handed out");
    assert!(
        matches!(&error, Error::Segment(SegmentError::PayloadChecksum { .. })),
        "{error}"
    );
    extract.send(&ops[1_000..]).await;
    extract.seal().await;
}

#[tokio::test]
async fn a_segment_that_is_not_the_one_the_manifest_sealed_is_named_when_the_manifest_lands() {
    let (dir, store) = common::file_store();
    let ops = common::ops(2_000);
    let extract = Extract::start(&store);
    extract.send(&ops[..1_000]).await;
    let start = being_written(&store).await;
    let files = wait_for_segments(dir.path(), &start.backup_id, 1).await;
    // Another object for the same range of the same backup: it passes its
    // own checks, but it is not what the extract wrote.
    let original = std::fs::read(&files[0]).expect("segment");
    let decoded =
        ferry_engine::segment::decode_segment("first", Bytes::from(original), Default::default())
            .expect("decodes");
    let mut forged =
        SegmentEncoder::new(&start.backup_id, common::small_segments().segment).expect("encoder");
    for mut op in decoded.into_ops().expect("ops") {
        op.body = Bytes::from_static(b"{\"forged\":true}");
        forged.push(&op).expect("push");
    }
    std::fs::write(&files[0], forged.seal().expect("seal").to_bytes()).expect("forged");
    let (followed, sealed) = follow_backup(
        store.clone(),
        start,
        RestoreOptions::default(),
        quick(Duration::from_secs(60)),
    );
    let mut followed = Box::pin(followed);
    let mut taken = Vec::new();
    take_through(&mut followed, 1, &mut taken).await;
    extract.send(&ops[1_000..]).await;
    let manifest = extract.seal().await;
    let error = rest(followed).await.expect_err("the manifest disagrees");
    match &error {
        Error::Backup(BackupError::FollowedDiffers { segment, .. }) => {
            assert_eq!(segment, &manifest.segments[0].name);
        }
        other => panic!("expected the manifest to disagree, got {other}"),
    }
    assert!(sealed.await.is_err(), "the restore is not called complete");
}

#[tokio::test]
async fn a_follower_takes_only_the_backup_being_written_and_refuses_two() {
    let (dir, store) = common::file_store();
    // A backup sealed a moment before the follower looked (an extract
    // launched with it, and quicker) is the one it follows...
    let quick_one = common::backup_of(&store, common::ops(100)).await;
    let found = find_backup_to_follow(&store, None, quick(Duration::from_millis(300)))
        .await
        .expect("the backup just sealed");
    assert!(matches!(found, Followed::Sealed(sealed) if sealed == quick_one));
    // ... but not seconds later; nor is an extract killed long ago.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let old_id = "20200101T000000Z-0000abcd";
    let old = dir.path().join("backups").join(old_id);
    std::fs::create_dir_all(&old).expect("old backup");
    std::fs::write(
        old.join("started.json"),
        StartRecord {
            format_version: 1,
            backup_id: old_id.to_owned(),
            created_at: time::macros::datetime!(2020-01-01 00:00:00 UTC),
            tool: ferry_engine::manifest::ToolInfo::current(),
            source: SourceInfo::default(),
            segment_format_version: 1,
        }
        .to_json(),
    )
    .expect("start record");
    let nothing = find_backup_to_follow(&store, None, quick(Duration::from_millis(300)))
        .await
        .expect_err("nothing is being written");
    assert!(
        matches!(&nothing, Error::Backup(BackupError::NothingToFollow { .. })),
        "{nothing}"
    );
    let one = Extract::start(&store);
    one.send(&common::ops(10)).await;
    let start = being_written(&store).await;
    let two = Extract::start(&store);
    two.send(&common::ops(10)).await;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match find_backup_to_follow(&store, None, quick(Duration::from_secs(30))).await {
                Err(Error::Backup(BackupError::SeveralToFollow { backup_ids, .. })) => {
                    assert!(backup_ids.contains(&start.backup_id), "{backup_ids:?}");
                    return;
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
    .expect("two backups being written are refused");
    // Named, either is followed; sealed, it is restored as sealed.
    let named = find_backup_to_follow(
        &store,
        Some(&start.backup_id),
        quick(Duration::from_secs(1)),
    )
    .await
    .expect("named");
    assert!(matches!(named, Followed::Writing(_)));
    let manifest = one.seal().await;
    let named = find_backup_to_follow(
        &store,
        Some(&start.backup_id),
        quick(Duration::from_secs(1)),
    )
    .await
    .expect("named");
    assert!(matches!(named, Followed::Sealed(sealed) if sealed == manifest));
    two.seal().await;
}

/// Segments of 8 MiB that a few ops never fill.
fn big_segments(seal_after: Option<Duration>) -> ExtractOptions {
    ExtractOptions {
        seal_after,
        ..ExtractOptions::default()
    }
}

#[tokio::test]
async fn a_quiet_source_s_ops_are_sealed_after_seal_after_and_followed_before_more_come() {
    let (dir, store) = common::file_store();
    let ops = common::ops(40);
    let extract = Extract::start_with(&store, big_segments(Some(Duration::from_millis(200))));
    extract.send(&ops[..10]).await;
    // The source says nothing more until the follower has its 10 ops: only
    // the open segment's age can seal them.
    let start = being_written(&store).await;
    let backup_id = start.backup_id.clone();
    let (followed, sealed) = follow_backup(
        store.clone(),
        start,
        RestoreOptions::default(),
        quick(Duration::from_secs(30)),
    );
    let mut followed = Box::pin(followed);
    let mut taken = Vec::new();
    take_through(&mut followed, 10, &mut taken).await;
    assert_eq!(segment_files(dir.path(), &backup_id).len(), 1);
    extract.send(&ops[10..25]).await;
    take_through(&mut followed, 25, &mut taken).await;
    extract.send(&ops[25..]).await;
    let manifest = extract.seal().await;
    taken.extend(rest(followed).await.expect("the follower ends well"));
    assert_eq!(taken, ops);
    assert_eq!(manifest.totals.segments, 3, "{:?}", manifest.segments);
    assert_eq!(sealed.await.expect("the manifest comes"), manifest);
}

#[tokio::test]
async fn without_seal_after_a_quiet_source_s_ops_wait_for_a_full_segment() {
    let (dir, store) = common::file_store();
    let ops = common::ops(10);
    let extract = Extract::start_with(&store, big_segments(None));
    extract.send(&ops).await;
    let backup_id = being_written(&store).await.backup_id;
    // The control for the test above: the same quiet source, no timer.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(segment_files(dir.path(), &backup_id).is_empty());
    let manifest = extract.seal().await;
    assert_eq!(manifest.totals.segments, 1);
}

fn beating_every(every: Duration, options: ExtractOptions) -> ExtractOptions {
    ExtractOptions {
        heartbeat_every: every,
        ..options
    }
}

#[tokio::test]
async fn a_killed_extract_s_heartbeat_stops_its_follower_long_before_the_timeout() {
    let (dir, store) = common::file_store();
    let ops = common::ops(2_000);
    let every = Duration::from_millis(200);
    let extract = Extract::start_with(&store, beating_every(every, common::small_segments()));
    extract.send(&ops[..1_000]).await;
    let start = being_written(&store).await;
    let backup_id = start.backup_id.clone();
    wait_for_segments(dir.path(), &backup_id, 2).await;
    // Killed: no failure record, no manifest, no more beats.
    extract.writer.abort();
    let _ = extract.writer.await;
    // Only the silent heartbeat can stop it: the timeout is a minute.
    let (followed, _sealed) = follow_backup(
        store.clone(),
        start,
        RestoreOptions::default(),
        quick(Duration::from_secs(60)),
    );
    let (last, error) = follow_to_error(followed, &ops).await;
    match &error {
        Error::Backup(BackupError::ExtractSilent {
            backup_id: silent,
            last: named,
            applied_through,
            silent_secs,
            every_ms,
        }) => {
            assert_eq!(silent, &backup_id);
            assert_eq!(*applied_through, last);
            assert!(named.ends_with(&format!("{last:020}")), "{error}");
            assert!(*silent_secs < 60, "{error}");
            assert_eq!(*every_ms, 200);
        }
        other => panic!("expected a silent heartbeat, got {other}"),
    }
}

#[tokio::test]
async fn a_quiet_extract_that_beats_is_waited_for() {
    let (_dir, store) = common::file_store();
    let ops = common::ops(30);
    let every = Duration::from_millis(500);
    let options = beating_every(every, big_segments(Some(Duration::from_millis(100))));
    let extract = Extract::start_with(&store, options);
    extract.send(&ops[..10]).await;
    let start = being_written(&store).await;
    let (followed, sealed) = follow_backup(
        store.clone(),
        start,
        RestoreOptions::default(),
        quick(Duration::from_secs(60)),
    );
    let mut followed = Box::pin(followed);
    let mut taken = Vec::new();
    take_through(&mut followed, 10, &mut taken).await;
    // Quiet for twice the silence that calls an extract dead: it beats.
    tokio::time::sleep(every * SILENT_BEATS * 2).await;
    extract.send(&ops[10..]).await;
    let manifest = extract.seal().await;
    taken.extend(rest(followed).await.expect("the follower waited"));
    assert_eq!(taken, ops);
    assert_eq!(sealed.await.expect("the manifest comes"), manifest);
}

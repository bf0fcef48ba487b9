//! Following a backup while it is being written (`ferry restore --follow`):
//! a restore that starts on the first sealed segment instead of waiting for
//! the manifest, so an extract and a restore on different servers overlap
//! (a migration or a DR drill in about the time of the slower of the two).
//!
//! The extract writes a start record first (`started.json`: the stream's id
//! and source, what a sink's `begin` needs), then segments, each one object
//! put whole, then the manifest. The follower takes the segments in seq
//! order as they appear. A segment is applied on its own checks (magic,
//! header checksum, CRC-32C, zstd's content checksum, the backup it was
//! written for, seq continuity from the one before); its SHA-256 and sizes
//! are kept, and when the manifest lands every segment already applied is
//! checked against it before the restore calls the stream complete. The
//! rest are read as a sealed backup is. An extract that fails records why
//! (`failed.json`) and the follower stops with that reason; one that is
//! killed records nothing: its heartbeat (`alive.json`, rewritten every 2 s)
//! stops, and the follower stops once the beat has not changed for
//! [`SILENT_BEATS`] beats, or, from an extract without a heartbeat, after
//! waiting `stall_timeout` for a new segment, naming the last one. Either
//! way the target holds a prefix of the stream with its checkpoint (G4).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use super::read::{batches_of, read_segment};
use super::{BackupError, RestoreOptions, created_at_of_id};
use crate::manifest::{Manifest, SegmentEntry, StartRecord};
use crate::segment::{DecodedSegment, SegmentLimits, SegmentName, decode_segment};
use crate::store::BackupStore;
use crate::{Op, Result};

/// How a restore follows a backup being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowOptions {
    /// How long to wait for a backup to start, and then for each next
    /// segment (or the manifest), before giving up.
    pub stall_timeout: Duration,
    /// The longest pause between two looks at the store.
    pub max_poll_interval: Duration,
    /// Without a backup named: how long to wait for a backup to start
    /// before taking one that was being written already (an extract killed
    /// a moment ago looks like one still writing).
    pub grace_for_earlier: Duration,
}

impl Default for FollowOptions {
    fn default() -> Self {
        Self {
            stall_timeout: Duration::from_secs(300),
            max_poll_interval: Duration::from_secs(1),
            grace_for_earlier: Duration::from_secs(10),
        }
    }
}

/// The backup a following restore found.
#[derive(Debug, Clone)]
pub enum Followed {
    /// Sealed already: restored as any sealed backup is.
    Sealed(Manifest),
    /// Still being written: followed.
    Writing(StartRecord),
}

/// Finds the backup to follow: `backup_id`, waiting for it to start; or,
/// without one, the backup being written in the store, waiting for one to
/// start. A backup counts as being written when it started after this call
/// (first seen after it, or its id's time within two seconds before it;
/// sealed or not by the time it is seen), or when it has a start record, no
/// manifest, no failure record and an id less than `stall_timeout` old, so
/// an extract that was killed long ago is never taken. One that starts
/// after this call is taken over those there before, which are taken only
/// when none starts within `grace_for_earlier` (an extract killed a moment ago
/// looks like one still writing). Several of a kind are refused: name one.
pub async fn find_backup_to_follow(
    store: &BackupStore,
    backup_id: Option<&str>,
    follow: FollowOptions,
) -> Result<Followed> {
    let started = Instant::now();
    let mut pause = Pause::new(follow);
    if let Some(backup_id) = backup_id {
        loop {
            if let Some(manifest) = store.get_manifest(backup_id).await? {
                return Ok(Followed::Sealed(manifest));
            }
            if let Some(record) = store.get_start_record(backup_id).await? {
                return Ok(Followed::Writing(record));
            }
            if started.elapsed() >= follow.stall_timeout {
                // Segments and no start record: an older ferry's extract.
                return Err(BackupError::Incomplete {
                    backup_id: backup_id.to_owned(),
                    segments_found: store.list_segments(backup_id).await?.len() as u64,
                }
                .into());
            }
            pause.wait().await;
        }
    }
    let now = OffsetDateTime::now_utc();
    let known: BTreeSet<String> = store.backup_ids().await?.into_iter().collect();
    let recent_since = now - follow.stall_timeout;
    // Ids carry their start to the second: one started in the second or two
    // before this call (an extract launched with it, and quicker to list)
    // counts as started after it, even if it is there at the first look.
    let alongside_since = now - Duration::from_secs(2);
    loop {
        let mut candidates = Vec::new();
        for id in store.backup_ids().await? {
            let created = created_at_of_id(&id);
            let new =
                !known.contains(&id) || created.is_some_and(|created| created >= alongside_since);
            let recent = created.is_some_and(|created| created >= recent_since);
            if !new && !recent {
                continue;
            }
            if let Some(manifest) = store.get_manifest(&id).await? {
                if new {
                    candidates.push((new, Followed::Sealed(manifest)));
                }
            } else if let Some(record) = store.get_start_record(&id).await?
                && store.get_failure(&id).await?.is_none()
            {
                candidates.push((new, Followed::Writing(record)));
            }
        }
        // One that started after this restore did is the one it waits for,
        // whatever else was being written (or died) before. One that was
        // there already is taken only after a grace: an extract killed a
        // moment ago looks the same as one still writing, and the new
        // extract may be starting.
        let new: Vec<Followed> = candidates
            .iter()
            .filter(|(new, _)| *new)
            .map(|(_, followed)| followed.clone())
            .collect();
        let mut candidates: Vec<Followed> = match new.len() {
            0 if started.elapsed() < follow.stall_timeout.min(follow.grace_for_earlier) => {
                Vec::new()
            }
            0 => candidates
                .into_iter()
                .map(|(_, followed)| followed)
                .collect(),
            _ => new,
        };
        match candidates.len() {
            0 if started.elapsed() >= follow.stall_timeout => {
                return Err(BackupError::NothingToFollow {
                    store: store.display().to_owned(),
                    waited_secs: started.elapsed().as_secs(),
                }
                .into());
            }
            0 => pause.wait().await,
            1 => return Ok(candidates.pop().expect("one")),
            _ => {
                return Err(BackupError::SeveralToFollow {
                    store: store.display().to_owned(),
                    backup_ids: candidates
                        .iter()
                        .map(|followed| match followed {
                            Followed::Sealed(manifest) => manifest.backup_id.clone(),
                            Followed::Writing(record) => record.backup_id.clone(),
                        })
                        .collect(),
                }
                .into());
            }
        }
    }
}

/// Batches ahead of the sink, at most.
const BATCHES_AHEAD: usize = 4;
/// Beats an extract's heartbeat may miss, as its follower sees them, before
/// the follower calls the extract dead: a store slow to take a put or a busy
/// machine delays a beat, a dead extract stops them all.
pub const SILENT_BEATS: u32 = 6;

/// Streams the ops of a backup being written, in seq order, as its segments
/// appear; the manifest that sealed it comes through the receiver once the
/// last op has been handed out and every segment checked against it. The
/// stream ends early with an error when a segment fails its checks, the
/// extract records a failure, or nothing new comes for `stall_timeout`.
pub fn follow_backup(
    store: BackupStore,
    start: StartRecord,
    options: RestoreOptions,
    follow: FollowOptions,
) -> (
    impl Stream<Item = Result<Vec<Op>>> + Send + 'static,
    oneshot::Receiver<Manifest>,
) {
    let (sender, receiver) = mpsc::channel(BATCHES_AHEAD);
    let (sealed_sender, sealed) = oneshot::channel();
    tokio::spawn(async move {
        let mut follower = Follower {
            store,
            backup_id: start.backup_id,
            limits: options.limits,
            follow,
            applied: Vec::new(),
            heard: None,
            sender,
        };
        match follower.run().await {
            Ok(Some(manifest)) => {
                let _ = sealed_sender.send(manifest);
            }
            // The sink stopped reading; its own error says why.
            Ok(None) => {}
            Err(error) => {
                let _ = follower.sender.send(Err(error)).await;
            }
        }
    });
    (
        tokio_stream::wrappers::ReceiverStream::new(receiver),
        sealed,
    )
}

struct Follower {
    store: BackupStore,
    backup_id: String,
    limits: SegmentLimits,
    follow: FollowOptions,
    /// The segments handed out before the manifest was seen, as the
    /// manifest must list them.
    applied: Vec<SegmentEntry>,
    /// The extract's last heartbeat and when this follower first saw it.
    heard: Option<(u64, Instant)>,
    sender: mpsc::Sender<Result<Vec<Op>>>,
}

impl Follower {
    /// Follows to the end: `Ok(Some(manifest))` once sealed and checked,
    /// `Ok(None)` when the receiver went away.
    async fn run(&mut self) -> Result<Option<Manifest>> {
        let mut last_new = Instant::now();
        let mut pause = Pause::new(self.follow);
        loop {
            let after = self.applied.last().map(|entry| SegmentName {
                first_seq: entry.first_seq,
                last_seq: entry.last_seq,
            });
            let next_seq = after.map_or(1, |name| name.last_seq + 1);
            let listed = self
                .store
                .list_segments_after(&self.backup_id, after.as_ref())
                .await?;
            if let Some((name, _)) = listed.iter().find(|(name, _)| name.first_seq == next_seq) {
                let (entry, segment) = self.read_unsealed(*name).await?;
                debug!(backup_id = %self.backup_id, segment = %entry.name, "segment restored before the backup was sealed");
                self.applied.push(entry);
                if !self.hand_out(segment).await {
                    return Ok(None);
                }
                last_new = Instant::now();
                pause = Pause::new(self.follow);
                continue;
            }
            if let Some(manifest) = self.store.get_manifest(&self.backup_id).await? {
                return self.finish_sealed(manifest).await;
            }
            if let Some(failure) = self.store.get_failure(&self.backup_id).await? {
                return Err(BackupError::ExtractFailed {
                    backup_id: self.backup_id.clone(),
                    reason: failure.reason,
                }
                .into());
            }
            if let Some((silent, every)) = self.silence().await?
                && silent >= every * SILENT_BEATS
            {
                return Err(BackupError::ExtractSilent {
                    backup_id: self.backup_id.clone(),
                    last: self.last_applied(),
                    applied_through: next_seq - 1,
                    silent_secs: silent.as_secs(),
                    every_ms: every.as_millis() as u64,
                }
                .into());
            }
            if last_new.elapsed() >= self.follow.stall_timeout {
                return Err(BackupError::Stalled {
                    backup_id: self.backup_id.clone(),
                    last: self.last_applied(),
                    applied_through: next_seq - 1,
                    waited_secs: last_new.elapsed().as_secs(),
                }
                .into());
            }
            pause.wait().await;
        }
    }

    /// The last segment restored, or the start record, as errors name it.
    fn last_applied(&self) -> String {
        self.applied.last().map_or_else(
            || "its start record".to_owned(),
            |entry| format!("segment {}", entry.name),
        )
    }

    /// How long the extract's heartbeat has gone unchanged, as this follower
    /// saw it, and how often it beats; `None` without a heartbeat (an
    /// extract not beating yet, or older than heartbeats).
    async fn silence(&mut self) -> Result<Option<(Duration, Duration)>> {
        let Some(heartbeat) = self.store.get_heartbeat(&self.backup_id).await? else {
            return Ok(None);
        };
        let heard = match self.heard {
            Some((beat, since)) if beat == heartbeat.beat => since,
            _ => {
                self.heard = Some((heartbeat.beat, Instant::now()));
                return Ok(None);
            }
        };
        let every = Duration::from_millis(heartbeat.every_ms.max(1));
        Ok(Some((heard.elapsed(), every)))
    }

    /// Reads a segment no manifest lists yet, on its own checks.
    async fn read_unsealed(&self, name: SegmentName) -> Result<(SegmentEntry, DecodedSegment)> {
        let path = format!("segments/{}", name.file_name());
        let object = self
            .store
            .get_object(&self.backup_id, &path)
            .await?
            .ok_or_else(|| BackupError::SegmentMissing {
                backup_id: self.backup_id.clone(),
                segment: name.to_string(),
            })?;
        let backup_id = self.backup_id.clone();
        let limits = self.limits;
        tokio::task::spawn_blocking(move || check_unsealed(&backup_id, name, path, object, limits))
            .await
            .expect("segment checks do not panic")
    }

    /// Hands a checked segment's ops to the sink; false when it went away.
    async fn hand_out(&self, segment: DecodedSegment) -> bool {
        for batch in batches_of(segment) {
            let failed = batch.is_err();
            if self.sender.send(batch).await.is_err() || failed {
                return !failed;
            }
        }
        true
    }

    /// The manifest has landed: what was applied must be its first
    /// segments, byte for byte; the rest are read as a sealed backup's.
    async fn finish_sealed(&mut self, manifest: Manifest) -> Result<Option<Manifest>> {
        for (index, applied) in self.applied.iter().enumerate() {
            let differs = |reason: String| BackupError::FollowedDiffers {
                backup_id: self.backup_id.clone(),
                segment: applied.name.clone(),
                reason,
            };
            let Some(sealed) = manifest.segments.get(index) else {
                return Err(differs(format!(
                    "the manifest lists {} segments, ending at seq {}",
                    manifest.segments.len(),
                    manifest.last_seq()
                ))
                .into());
            };
            if sealed != applied {
                return Err(differs(format!(
                    "restored as seq {}..={} with SHA-256 {}, sealed as {} (seq {}..={}, SHA-256 {})",
                    applied.first_seq,
                    applied.last_seq,
                    applied.sha256,
                    sealed.name,
                    sealed.first_seq,
                    sealed.last_seq,
                    sealed.sha256
                ))
                .into());
            }
        }
        info!(
            backup_id = %self.backup_id,
            followed = self.applied.len(),
            segments = manifest.segments.len(),
            "the backup was sealed; every segment restored before agrees with its manifest"
        );
        let mut next_seq = self.applied.last().map_or(1, |entry| entry.last_seq + 1);
        for entry in &manifest.segments[self.applied.len()..] {
            let segment = read_segment(&self.store, &self.backup_id, entry, self.limits).await?;
            if segment.header.first_seq != next_seq {
                return Err(BackupError::SegmentDisagrees {
                    backup_id: self.backup_id.clone(),
                    segment: entry.name.clone(),
                    reason: format!(
                        "it starts at seq {} where seq {next_seq} was expected",
                        segment.header.first_seq
                    ),
                }
                .into());
            }
            next_seq = segment.header.last_seq + 1;
            if !self.hand_out(segment).await {
                return Ok(None);
            }
        }
        Ok(Some(manifest))
    }
}

/// A segment's own checks (so damage is named for what it is), that it was
/// written for this backup and holds the range its name says; its manifest
/// entry as the extract will write it.
fn check_unsealed(
    backup_id: &str,
    name: SegmentName,
    path: String,
    object: Bytes,
    limits: SegmentLimits,
) -> Result<(SegmentEntry, DecodedSegment)> {
    let sha256 = hex::encode(Sha256::digest(&object));
    let compressed_bytes = object.len() as u64;
    let decoded = decode_segment(&name.to_string(), object, limits)?;
    let header = &decoded.header;
    let disagrees = |reason: String| BackupError::SegmentDisagrees {
        backup_id: backup_id.to_owned(),
        segment: name.to_string(),
        reason,
    };
    if header.stream_id != backup_id {
        return Err(disagrees(format!("it was written for backup {}", header.stream_id)).into());
    }
    if (header.first_seq, header.last_seq) != (name.first_seq, name.last_seq) {
        return Err(disagrees(format!(
            "it holds seq {}..={}, its name says seq {}..={}",
            header.first_seq, header.last_seq, name.first_seq, name.last_seq
        ))
        .into());
    }
    let entry = SegmentEntry {
        name: name.to_string(),
        path,
        first_seq: header.first_seq,
        last_seq: header.last_seq,
        ops: header.op_count,
        uncompressed_bytes: header.uncompressed_bytes,
        compressed_bytes,
        sha256,
    };
    Ok((entry, decoded))
}

/// Pauses between looks at the store: 20 ms doubling to the options' most.
struct Pause {
    next: Duration,
    most: Duration,
}

impl Pause {
    fn new(follow: FollowOptions) -> Self {
        Self {
            next: Duration::from_millis(20).min(follow.max_poll_interval),
            most: follow.max_poll_interval,
        }
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.most);
    }
}

//! The live stream: a snapshot, then etcd's Watch, followed by a task
//! that batches each revision's ops.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_proto::etcd::etcdserverpb::watch_request::RequestUnion;
use ferry_proto::etcd::etcdserverpb::{
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use ferry_proto::etcd::mvccpb::Event;
use ferry_proto::etcd::mvccpb::event::EventType;
use futures::FutureExt;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use super::lease::{lease_op, lease_status, parse_lease_key};
use super::snapshot::{PAGES_AHEAD, count_keys, kv_op, produce, split_range};
use super::{EtcdSource, connect_with_status, key_range, source_error, source_info};
use crate::adapters::etcd::client::EtcdClient;
use crate::adapters::etcd::{EtcdConnection, EtcdError, KIND_KV, KIND_LEASE, RESERVED_PREFIX};
use crate::adapters::live::{LiveEvent, LiveFrom, LiveStream, Position, ProgressRequester};
use crate::progress::Progress;
use crate::{Op, Result};

/// Ops per live batch at most (a revision's group may exceed it alone).
const LIVE_BATCH_MAX_OPS: usize = 1000;
/// Bytes of keys and values per live batch at most (likewise).
const LIVE_BATCH_MAX_BYTES: usize = 1024 * 1024;
/// Bytes an op adds beyond its key and body, for batch sizing.
const OP_OVERHEAD_BYTES: usize = 32;
/// How long a watch may stay silent before ferry asks etcd where it stands,
/// so an idle source still reports its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Events a live stream holds ahead of its consumer.
const LIVE_EVENTS_AHEAD: usize = 8;
/// Watch responses already received that are gathered into the same
/// batches before a progress report.
const COALESCED_RESPONSES: usize = 256;
/// Consecutive failed attempts to (re)open the watch before the stream
/// gives up with the last error.
const WATCH_ATTEMPTS: u32 = 10;

impl EtcdSource {
    /// Opens a live stream: a snapshot at one revision R, then every change
    /// after R, read with etcd's Watch, one group of ops per revision.
    ///
    /// A new stream ([`LiveFrom::snapshot`] `None`) snapshots the current
    /// revision. A resumed one names its R: when the target holds ops of the
    /// snapshot only (`from_seq_exclusive` below the snapshot's end, or the
    /// end unknown and `from_position_exclusive` not past R), the snapshot is
    /// read again at R — its seqs are the same for the same R — and the seqs
    /// the target holds are skipped; otherwise the snapshot is skipped and
    /// seqs continue at `from_seq_exclusive + 1`. Either way the watch
    /// starts at `max(R, from_position_exclusive) + 1`.
    ///
    /// The ops of a change: `etcd.kv` `Put` (body: the value; `deps`: its
    /// lease) or `Delete` (empty body), `position` and `txn` the revision,
    /// `txn_last` on the revision's last op. A lease not announced before in
    /// this stream is announced by an `etcd.lease` `LeaseGrant` op right
    /// before the key, in the same group. Keys under [`RESERVED_PREFIX`] are
    /// never sent, yet their revisions count as sent (ferry's fence key).
    /// A stream resumed past its snapshot has not seen the announcements
    /// made before the resume point, so it announces such a lease again the
    /// next time a key is put on it (granting an existing lease again
    /// changes nothing on a target): the ops after the resume point are the
    /// same as the unbroken stream's but for those grants.
    ///
    /// The watch covers the whole keyspace even with a prefix (keys outside
    /// it are dropped here), so every revision reaches the stream as an event
    /// and the reported position never runs ahead of what was sent: etcd 3.4
    /// may answer a progress request with a revision whose events are still
    /// in flight. The user therefore needs read access to the whole keyspace.
    pub async fn open_live(self, from: LiveFrom, progress: Arc<Progress>) -> Result<LiveStream> {
        let (client, status) = connect_with_status(&self.connection).await?;
        let cluster_id = status.header.as_ref().map_or(0, |header| header.cluster_id);
        let (start, end) = key_range(&self.options.prefix);
        let from_revision = from.from_position_exclusive.0 as i64;
        let (revision, snapshot) = match from.snapshot {
            Some(revision) if from.past_snapshot(revision) => (revision.0 as i64, None),
            requested => {
                let requested = requested.map(|revision| revision.0 as i64);
                let counted = count_keys(&client, &start, &end, requested.unwrap_or(0))
                    .await
                    .map_err(source_error)?;
                let revision = match requested {
                    Some(revision) => revision,
                    None => counted.header.as_ref().map_or(0, |header| header.revision),
                };
                Progress::set(&progress.ops_total, counted.count as u64);
                let ranges = split_range(
                    &client,
                    &start,
                    &end,
                    revision,
                    self.options.parallel.max(1),
                )
                .await?;
                (revision, Some(ranges))
            }
        };
        info!(
            revision,
            resume = from.snapshot.is_some(),
            snapshot = snapshot.is_some(),
            from_seq_exclusive = from.from_seq_exclusive,
            "etcd live stream opened"
        );
        let requester = ProgressRequester::default();
        let (sender, receiver) = mpsc::channel(LIVE_EVENTS_AHEAD);
        let follower = Follower {
            client,
            seq: from.from_seq_exclusive,
            position: revision.max(from_revision),
            head: revision.max(from_revision),
            prefix: self.options.prefix.clone(),
            announced: HashSet::new(),
            batch: LiveBatch::default(),
            sender,
            poke: requester.0.clone(),
            progress,
        };
        tokio::spawn(follower.run(revision, snapshot, from.from_seq_exclusive));
        Ok(LiveStream {
            info: source_info(&self.options.prefix, status.version, cluster_id, revision),
            snapshot_position: Position(revision as u64),
            events: Box::pin(ReceiverStream::new(receiver)),
            progress_requests: requester,
        })
    }
}

/// Ops gathered for the next [`LiveEvent::Batch`], whole groups only.
#[derive(Default)]
struct LiveBatch {
    ops: Vec<Op>,
    bytes: usize,
}

impl LiveBatch {
    /// Adds a group; returns the batch to send first when the group does not
    /// fit beside what is gathered.
    fn push_group(&mut self, group: Vec<Op>) -> Option<Vec<Op>> {
        let bytes: usize = group.iter().map(op_bytes).sum();
        let full = !self.ops.is_empty()
            && (self.ops.len() + group.len() > LIVE_BATCH_MAX_OPS
                || self.bytes + bytes > LIVE_BATCH_MAX_BYTES);
        let ready = if full { self.take() } else { None };
        self.ops.extend(group);
        self.bytes += bytes;
        ready
    }

    fn take(&mut self) -> Option<Vec<Op>> {
        self.bytes = 0;
        (!self.ops.is_empty()).then(|| std::mem::take(&mut self.ops))
    }
}

fn op_bytes(op: &Op) -> usize {
    op.key.len() + op.body.len() + OP_OVERHEAD_BYTES
}

/// Why a watch stopped.
enum WatchEnd {
    /// The consumer dropped the stream.
    Dropped,
    /// A failure worth opening the watch again for (etcd restarted, the
    /// connection broke).
    Broken(EtcdError),
    /// A failure that ends the stream.
    Fatal(crate::Error),
}

/// The task behind a live stream.
struct Follower {
    client: EtcdClient,
    /// The last seq handed to the batch.
    seq: u64,
    /// Every change at or below this revision is in the batch or sent.
    position: i64,
    /// The source's revision, as etcd last said.
    head: i64,
    prefix: Vec<u8>,
    /// Leases announced in this stream (by this process).
    announced: HashSet<i64>,
    batch: LiveBatch,
    sender: mpsc::Sender<Result<LiveEvent>>,
    poke: Arc<Notify>,
    progress: Arc<Progress>,
}

impl Follower {
    async fn run(
        mut self,
        revision: i64,
        snapshot: Option<Vec<(Vec<u8>, Vec<u8>)>>,
        skip_through_seq: u64,
    ) {
        if let Some(ranges) = snapshot {
            match self.snapshot(revision, ranges, skip_through_seq).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(error) => {
                    let _ = self.sender.send(Err(error)).await;
                    return;
                }
            }
        }
        let mut failures = 0u32;
        loop {
            match self.watch(&mut failures).await {
                WatchEnd::Dropped => return,
                WatchEnd::Fatal(error) => {
                    let _ = self.sender.send(Err(error)).await;
                    return;
                }
                WatchEnd::Broken(error) => {
                    if !self.flush().await {
                        return;
                    }
                    failures += 1;
                    if failures >= WATCH_ATTEMPTS {
                        let _ = self.sender.send(Err(source_error(error))).await;
                        return;
                    }
                    warn!(%error, attempt = failures, position = self.position, "etcd watch broke, opening it again");
                    tokio::time::sleep(Duration::from_millis(100 << failures.min(5))).await;
                    // A token may have expired while the watch was open.
                    if let Err(error) = self.client.reauthenticate().await {
                        debug!(%error, "cannot authenticate again yet");
                    }
                }
            }
        }
    }

    /// Streams the snapshot at `revision`, skipping seqs the target holds.
    /// False when the consumer is gone.
    async fn snapshot(
        &mut self,
        revision: i64,
        ranges: Vec<(Vec<u8>, Vec<u8>)>,
        skip_through_seq: u64,
    ) -> Result<bool> {
        let (pages, mut receiver) = mpsc::channel(PAGES_AHEAD);
        tokio::spawn(produce(
            self.client.clone(),
            revision,
            Vec::new(),
            true,
            ranges,
            pages,
        ));
        let mut last_seq = 0;
        while let Some(page) = receiver.recv().await {
            for op in page? {
                last_seq = op.seq;
                if &op.kind[..] == KIND_LEASE.as_bytes()
                    && let Some(id) = parse_lease_key(&op.key)
                {
                    self.announced.insert(id);
                }
                if op.seq <= skip_through_seq {
                    continue;
                }
                self.seq = op.seq;
                if let Some(ready) = self.batch.push_group(vec![op])
                    && !self.send(LiveEvent::Batch(ready)).await
                {
                    return Ok(false);
                }
            }
        }
        if skip_through_seq > last_seq {
            return Err(source_error(EtcdError::Request {
                endpoints: self.client.connection().display(),
                action: "resume a live stream".to_owned(),
                reason: format!(
                    "the target holds seq {skip_through_seq}, past the snapshot at revision {revision} (it ends at seq {last_seq}), but the resume names no revision past the snapshot; pass the target's applied position as well"
                ),
            }));
        }
        self.seq = last_seq;
        if !self.flush().await {
            return Ok(false);
        }
        Ok(self
            .send(LiveEvent::SnapshotComplete {
                through_seq: last_seq,
                position: revision as u64,
            })
            .await)
    }

    async fn send(&self, event: LiveEvent) -> bool {
        if let LiveEvent::Batch(ops) = &event {
            Progress::add(&self.progress.ops, ops.len() as u64);
        }
        self.sender.send(Ok(event)).await.is_ok()
    }

    /// Sends what the batch holds. False when the consumer is gone.
    async fn flush(&mut self) -> bool {
        match self.batch.take() {
            Some(ops) => self.send(LiveEvent::Batch(ops)).await,
            None => true,
        }
    }

    async fn report(&mut self) -> bool {
        self.flush().await
            && self
                .send(LiveEvent::Progress {
                    position: self.position as u64,
                    head_position: self.head.max(self.position) as u64,
                    through_seq: self.seq,
                })
                .await
    }

    /// One watch stream, from `position + 1`, until it breaks.
    async fn watch(&mut self, failures: &mut u32) -> WatchEnd {
        let (requests, request_stream) = mpsc::channel::<WatchRequest>(4);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                // The whole keyspace: see `open_live`.
                key: vec![0],
                range_end: vec![0],
                start_revision: self.position + 1,
                progress_notify: true,
                ..WatchCreateRequest::default()
            })),
        };
        if requests.send(create).await.is_err() {
            return WatchEnd::Dropped;
        }
        let connection = self.client.connection().clone();
        let mut responses = match self
            .client
            .watch()
            .watch(ReceiverStream::new(request_stream))
            .await
        {
            Ok(responses) => responses.into_inner(),
            Err(status) => return self.sorted(connection.failed("open a watch on", &status)),
        };
        let progress_request = || WatchRequest {
            request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
        };
        let mut idle = tokio::time::interval(PROGRESS_INTERVAL);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        idle.reset();
        loop {
            tokio::select! {
                message = responses.message() => {
                    let response = match self.received(message, &connection) {
                        Ok(response) => response,
                        Err(end) => return end,
                    };
                    *failures = 0;
                    idle.reset();
                    if let Some(end) = self.handle(response).await {
                        return end;
                    }
                    // Responses already here (a consumer that fell behind)
                    // go into the same batches: fewer, fuller batches let a
                    // target catch up.
                    for _ in 0..COALESCED_RESPONSES {
                        let Some(message) = responses.message().now_or_never() else {
                            break;
                        };
                        let response = match self.received(message, &connection) {
                            Ok(response) => response,
                            Err(end) => return end,
                        };
                        if let Some(end) = self.handle(response).await {
                            return end;
                        }
                    }
                    if !self.report().await {
                        return WatchEnd::Dropped;
                    }
                }
                _ = idle.tick() => {
                    if requests.send(progress_request()).await.is_err() {
                        return WatchEnd::Dropped;
                    }
                }
                () = self.poke.notified() => {
                    if requests.send(progress_request()).await.is_err() {
                        return WatchEnd::Dropped;
                    }
                }
                () = self.sender.closed() => return WatchEnd::Dropped,
            }
        }
    }

    /// Compaction and refused credentials end the stream; the rest is worth
    /// another attempt.
    /// A message of the watch stream: its response, or how the watch ends.
    fn received(
        &self,
        message: Result<Option<WatchResponse>, tonic::Status>,
        connection: &EtcdConnection,
    ) -> Result<WatchResponse, WatchEnd> {
        match message {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(WatchEnd::Broken(EtcdError::Unreachable {
                endpoints: connection.display(),
                reason: "the watch stream ended".to_owned(),
            })),
            Err(status) => Err(self.sorted(connection.failed("watch", &status))),
        }
    }

    fn sorted(&self, error: EtcdError) -> WatchEnd {
        match error {
            EtcdError::Compacted { .. } | EtcdError::Credentials { .. } => {
                WatchEnd::Fatal(source_error(error))
            }
            other => WatchEnd::Broken(other),
        }
    }

    /// Turns one watch response into groups of ops; `Some` when the watch
    /// must end.
    async fn handle(&mut self, response: WatchResponse) -> Option<WatchEnd> {
        let endpoints = self.client.connection().display();
        if let Some(header) = &response.header {
            self.head = self.head.max(header.revision);
        }
        if response.canceled {
            if response.compact_revision > 0 {
                return Some(WatchEnd::Fatal(source_error(EtcdError::Compacted {
                    endpoints,
                    reason: format!(
                        "the live stream needs the changes after revision {}, and etcd compacted through revision {}, so they are gone and the stream cannot resume. Start again from a new snapshot (a live migration: onto an emptied new plane)",
                        self.position, response.compact_revision
                    ),
                })));
            }
            return Some(WatchEnd::Broken(EtcdError::Request {
                endpoints,
                action: "watch".to_owned(),
                reason: format!("etcd canceled the watch: {}", response.cancel_reason),
            }));
        }
        let mut events = response.events.into_iter().peekable();
        while let Some(first) = events.next() {
            let revision = first.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            if revision <= self.position {
                return Some(WatchEnd::Fatal(source_error(EtcdError::Request {
                    endpoints,
                    action: "watch".to_owned(),
                    reason: format!(
                        "etcd sent a change at revision {revision} after the changes through revision {} (a revision split across watch responses, or out of order)",
                        self.position
                    ),
                })));
            }
            let mut group_events = vec![first];
            while let Some(next) = events
                .next_if(|event| event.kv.as_ref().map_or(0, |kv| kv.mod_revision) == revision)
            {
                group_events.push(next);
            }
            match self.group(revision, group_events).await {
                Ok(group) => {
                    self.position = revision;
                    if !group.is_empty()
                        && let Some(ready) = self.batch.push_group(group)
                        && !self.send(LiveEvent::Batch(ready)).await
                    {
                        return Some(WatchEnd::Dropped);
                    }
                }
                Err(error) => return Some(self.sorted(error)),
            }
        }
        None
    }

    /// The ops of one revision, numbered after `seq` (which moves only when
    /// the whole group is made).
    async fn group(&mut self, revision: i64, events: Vec<Event>) -> Result<Vec<Op>, EtcdError> {
        let position = revision as u64;
        let mut seq = self.seq;
        let mut group = Vec::new();
        let mut new_leases = Vec::new();
        for event in events {
            let Some(kv) = event.kv else { continue };
            if kv.key.starts_with(RESERVED_PREFIX)
                || (!self.prefix.is_empty() && !kv.key.starts_with(&self.prefix))
            {
                continue;
            }
            if event.r#type == EventType::Delete as i32 {
                seq += 1;
                group.push(Op {
                    seq,
                    position,
                    txn: position,
                    txn_last: false,
                    kind: Bytes::from_static(KIND_KV.as_bytes()),
                    key: Bytes::from(kv.key),
                    method: Bytes::from_static(b"Delete"),
                    body: Bytes::new(),
                    content_type: Bytes::new(),
                    platform_version: Bytes::new(),
                    deps: Vec::new(),
                });
                continue;
            }
            if kv.lease != 0
                && !self.announced.contains(&kv.lease)
                && !new_leases.contains(&kv.lease)
            {
                let lease = lease_status(&self.client, kv.lease).await?;
                new_leases.push(kv.lease);
                seq += 1;
                group.push(lease_op(seq, position, position, &lease));
            }
            seq += 1;
            let mut op = kv_op(seq, position, kv);
            op.txn = position;
            op.txn_last = false;
            group.push(op);
        }
        if let Some(last) = group.last_mut() {
            last.txn_last = true;
        }
        self.seq = seq;
        self.announced.extend(new_leases);
        Ok(group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(revision: u64, first_seq: u64, count: usize, value_bytes: usize) -> Vec<Op> {
        (0..count)
            .map(|index| Op {
                seq: first_seq + index as u64,
                position: revision,
                txn: revision,
                txn_last: index + 1 == count,
                key: Bytes::from(format!("k{index}")),
                body: Bytes::from(vec![0u8; value_bytes]),
                ..Op::default()
            })
            .collect()
    }

    #[test]
    fn live_batches_fill_up_without_splitting_a_revision() {
        let mut batch = LiveBatch::default();
        assert!(batch.push_group(group(10, 1, 600, 1)).is_none());
        // 600 + 600 is over the op limit: the first group goes alone.
        let ready = batch
            .push_group(group(11, 601, 600, 1))
            .expect("a full batch");
        assert_eq!(ready.len(), 600);
        assert!(ready.iter().all(|op| op.position == 10));
        // A group larger than a batch is never split.
        let ready = batch.push_group(group(12, 1201, 2500, 1)).expect("flushed");
        assert_eq!(ready.len(), 600);
        let rest = batch.take().expect("the large group");
        assert_eq!(rest.len(), 2500);
        assert!(rest.last().is_some_and(|op| op.txn_last));
        assert!(batch.take().is_none());
    }

    #[test]
    fn live_batches_stay_under_a_mebibyte_of_values() {
        let mut batch = LiveBatch::default();
        assert!(batch.push_group(group(10, 1, 1, 700 * 1024)).is_none());
        let ready = batch
            .push_group(group(11, 2, 1, 700 * 1024))
            .expect("two would be over a MiB");
        assert_eq!(ready.len(), 1);
        assert_eq!(batch.take().map(|ops| ops[0].seq), Some(2));
    }
}

//! Extracting etcd: one snapshot at one revision.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ferry_proto::etcd::etcdserverpb::range_request::{SortOrder, SortTarget};
use ferry_proto::etcd::etcdserverpb::watch_request::RequestUnion;
use ferry_proto::etcd::etcdserverpb::{
    LeaseLeasesRequest, LeaseTimeToLiveRequest, RangeRequest, RangeResponse, StatusRequest,
    StatusResponse, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use ferry_proto::etcd::mvccpb::event::EventType;
use ferry_proto::etcd::mvccpb::{Event, KeyValue};
use futures::FutureExt;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use super::client::EtcdClient;
use super::{EtcdConnection, EtcdError, KIND_KV, KIND_LEASE, RESERVED_PREFIX, prefix_end};
use crate::adapters::live::{LiveEvent, LiveFrom, LiveStream, Position, ProgressRequester};
use crate::adapters::{AdapterError, Extraction, Source};
use crate::manifest::SourceInfo;
use crate::progress::Progress;
use crate::{Op, Result};

/// Bytes of keys and values one Range page aims at: pages shrink for large
/// values, so memory stays bounded whatever the values' size.
const PAGE_TARGET_BYTES: usize = 4 * 1024 * 1024;
/// Keys one Range page holds at most. Not fewer: etcd 3.4 counts every key
/// left in the range to answer each page, so small pages make a read
/// quadratic. Measured on 2 cores, 100,000 keys of 200 bytes, one reader:
/// 1.15 s with 1,000-key pages, 0.45 s with 10,000 (the byte target caps
/// pages of larger values first).
const PAGE_MAX_KEYS: i64 = 10_000;
/// Pages each parallel reader fetches ahead of the merge.
const PAGES_AHEAD: usize = 2;

/// What to extract.
#[derive(Debug, Clone)]
pub struct EtcdSourceOptions {
    /// Only keys starting with this; empty for the whole keyspace.
    pub prefix: Vec<u8>,
    /// Key ranges read at once, all at the same revision.
    pub parallel: usize,
}

impl Default for EtcdSourceOptions {
    fn default() -> Self {
        Self {
            prefix: Vec::new(),
            parallel: 1,
        }
    }
}

/// One consistent snapshot of an etcd cluster (or a prefix of it).
#[derive(Debug)]
pub struct EtcdSource {
    connection: EtcdConnection,
    options: EtcdSourceOptions,
}

impl EtcdSource {
    /// A source reading `connection`'s cluster.
    pub fn new(connection: EtcdConnection, options: EtcdSourceOptions) -> Self {
        Self {
            connection,
            options,
        }
    }
}

fn source_error(error: EtcdError) -> crate::Error {
    AdapterError::source(error).into()
}

/// The key range to read: `[start, end)`, etcd style.
fn key_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        (vec![0], vec![0])
    } else {
        (prefix.to_vec(), prefix_end(prefix))
    }
}

/// Connects to `connection`'s cluster and reads its status (version, id).
async fn connect_with_status(connection: &EtcdConnection) -> Result<(EtcdClient, StatusResponse)> {
    let client = EtcdClient::connect(connection)
        .await
        .map_err(source_error)?;
    let status = client
        .call("read the status of", |mut services| async move {
            services.maintenance.status(StatusRequest {}).await
        })
        .await
        .map_err(source_error)?;
    Ok((client, status))
}

/// Counts the keys of `[start, end)` at `revision` (0: the current one);
/// the answer's header names the revision counted at.
pub(super) async fn count_keys(
    client: &EtcdClient,
    start: &[u8],
    end: &[u8],
    revision: i64,
) -> std::result::Result<RangeResponse, EtcdError> {
    let request = RangeRequest {
        key: start.to_vec(),
        range_end: end.to_vec(),
        count_only: true,
        revision,
        ..RangeRequest::default()
    };
    client
        .call("count the keys of", |mut services| {
            let request = request.clone();
            async move { services.kv.range(request).await }
        })
        .await
}

#[async_trait]
impl Source for EtcdSource {
    async fn open(self: Box<Self>, progress: Arc<Progress>) -> Result<Extraction> {
        let (client, status) = connect_with_status(&self.connection).await?;
        let (start, end) = key_range(&self.options.prefix);

        // R: the revision every read of this snapshot is made at.
        let counted = count_keys(&client, &start, &end, 0)
            .await
            .map_err(source_error)?;
        let header = counted.header.ok_or_else(|| {
            source_error(EtcdError::Request {
                endpoints: client.connection().display(),
                action: "count the keys".to_owned(),
                reason: "the response has no header".to_owned(),
            })
        })?;
        let revision = header.revision;
        let cluster_id = header.cluster_id;
        Progress::set(&progress.ops_total, counted.count as u64);
        info!(
            revision,
            keys = counted.count,
            "etcd snapshot revision chosen"
        );

        let leases = attached_leases(&client, &start, &end).await?;
        let ranges = split_range(
            &client,
            &start,
            &end,
            revision,
            self.options.parallel.max(1),
        )
        .await?;
        debug!(
            ranges = ranges.len(),
            leases = leases.len(),
            "etcd snapshot planned"
        );

        let (sender, receiver) = mpsc::channel::<Result<Vec<Op>>>(PAGES_AHEAD);
        tokio::spawn(produce(client, revision, leases, false, ranges, sender));
        Ok(Extraction {
            info: source_info(&self.options.prefix, status.version, cluster_id, revision),
            ops: Box::pin(ReceiverStream::new(receiver)),
        })
    }
}

/// What an etcd snapshot was taken from, for the manifest or a stream start.
fn source_info(prefix: &[u8], version: String, cluster_id: u64, revision: i64) -> SourceInfo {
    let key_prefix = match std::str::from_utf8(prefix) {
        Ok("") => None,
        Ok(prefix) => Some(prefix.to_owned()),
        // A binary prefix is not recorded: a restore then checks the
        // whole target keyspace for emptiness, which is stricter.
        Err(_) => None,
    };
    SourceInfo {
        platform: "etcd".to_owned(),
        platform_version: Some(version),
        identity: Some(format!("{cluster_id:016x}")),
        snapshot_position: Some(revision as u64),
        key_prefix,
        description: None,
    }
}

/// A lease to carry: its id and remaining TTL.
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    ttl: i64,
    granted_ttl: i64,
}

/// The leases that hold at least one key of the range, by id.
async fn attached_leases(client: &EtcdClient, start: &[u8], end: &[u8]) -> Result<Vec<Lease>> {
    let listed = client
        .call("list the leases of", |mut services| async move {
            services.lease.lease_leases(LeaseLeasesRequest {}).await
        })
        .await
        .map_err(source_error)?;
    let mut leases = Vec::new();
    for status in listed.leases {
        let alive = client
            .call("read a lease of", |mut services| async move {
                services
                    .lease
                    .lease_time_to_live(LeaseTimeToLiveRequest {
                        id: status.id,
                        keys: true,
                    })
                    .await
            })
            .await
            .map_err(source_error)?;
        if alive.keys.iter().any(|key| in_key_range(key, start, end)) {
            leases.push(Lease {
                id: status.id,
                // An expired lease still holds its keys until etcd revokes
                // them: they get the shortest lease a target grants.
                ttl: alive.ttl.max(1),
                granted_ttl: alive.granted_ttl,
            });
        }
    }
    leases.sort_by_key(|lease| lease.id);
    Ok(leases)
}

fn in_key_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    let after_start = key >= start;
    let before_end = end == [0] || key < end;
    after_start && before_end && !key.starts_with(RESERVED_PREFIX)
}

/// Splits `[start, end)` into up to `parts` ranges of keys that exist at
/// `revision`, cut evenly between the first and the last key (by their
/// bytes, not by count). The ranges are in key order, so reading them one
/// after the other gives the keys in order.
async fn split_range(
    client: &EtcdClient,
    start: &[u8],
    end: &[u8],
    revision: i64,
    parts: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    if parts == 1 {
        return Ok(vec![(start.to_vec(), end.to_vec())]);
    }
    let mut edges = Vec::new();
    for order in [SortOrder::Ascend, SortOrder::Descend] {
        let request = RangeRequest {
            key: start.to_vec(),
            range_end: end.to_vec(),
            revision,
            keys_only: true,
            limit: 1,
            sort_order: order as i32,
            sort_target: SortTarget::Key as i32,
            ..RangeRequest::default()
        };
        let response = client
            .call("read the range edges of", |mut services| {
                let request = request.clone();
                async move { services.kv.range(request).await }
            })
            .await
            .map_err(source_error)?;
        match response.kvs.into_iter().next() {
            Some(kv) => edges.push(kv.key),
            None => return Ok(vec![(start.to_vec(), end.to_vec())]),
        }
    }
    let (first, last) = (&edges[0], &edges[1]);
    let common = first
        .iter()
        .zip(last.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let number = |key: &[u8]| {
        let mut bytes = [0u8; 8];
        for (slot, byte) in bytes.iter_mut().zip(key.iter().skip(common)) {
            *slot = *byte;
        }
        u64::from_be_bytes(bytes)
    };
    let (low, high) = (number(first), number(last));
    let mut cuts: Vec<Vec<u8>> = (1..parts as u64)
        .map(|part| {
            let point = low + ((u128::from(high - low) * u128::from(part)) / parts as u128) as u64;
            let mut key = first[..common].to_vec();
            key.extend_from_slice(&point.to_be_bytes());
            while key.len() > common + 1 && key.last() == Some(&0) {
                key.pop();
            }
            key
        })
        .filter(|cut| cut.as_slice() > first.as_slice() && cut.as_slice() <= last.as_slice())
        .collect();
    cuts.dedup();
    let mut ranges = Vec::new();
    let mut from = start.to_vec();
    for cut in cuts {
        ranges.push((from, cut.clone()));
        from = cut;
    }
    ranges.push((from, end.to_vec()));
    Ok(ranges)
}

/// Streams the leases, then every key, numbering ops from 1. Ranges are
/// read by their own tasks, a few pages ahead; their pages are merged in
/// range order.
///
/// With `inline_leases`, `leases` is not used: each lease is announced right
/// before the first key attached to it, read as the key is read, so the
/// snapshot's ops (and their seqs) depend on the revision alone and a second
/// read at the same revision numbers them the same (a resumed live stream).
async fn produce(
    client: EtcdClient,
    revision: i64,
    leases: Vec<Lease>,
    inline_leases: bool,
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
    sender: mpsc::Sender<Result<Vec<Op>>>,
) {
    let position = revision as u64;
    let mut seq = 0u64;
    let lease_ops: Vec<Op> = leases
        .iter()
        .map(|lease| {
            seq += 1;
            lease_op(seq, position, 0, lease)
        })
        .collect();
    if !lease_ops.is_empty() && sender.send(Ok(lease_ops)).await.is_err() {
        return;
    }
    let mut announced = HashSet::new();
    let readers: Vec<mpsc::Receiver<Result<Vec<KeyValue>, EtcdError>>> = ranges
        .into_iter()
        .map(|(start, end)| {
            let (pages, receiver) = mpsc::channel(PAGES_AHEAD);
            tokio::spawn(read_range(client.clone(), revision, start, end, pages));
            receiver
        })
        .collect();
    for mut reader in readers {
        while let Some(page) = reader.recv().await {
            let kvs = match page {
                Ok(kvs) => kvs,
                Err(error) => {
                    let _ = sender.send(Err(source_error(error))).await;
                    return;
                }
            };
            let mut batch = Vec::with_capacity(kvs.len());
            for kv in kvs {
                if kv.key.starts_with(RESERVED_PREFIX) {
                    continue;
                }
                if inline_leases && kv.lease != 0 && announced.insert(kv.lease) {
                    match lease_status(&client, kv.lease).await {
                        Ok(lease) => {
                            seq += 1;
                            batch.push(lease_op(seq, position, 0, &lease));
                        }
                        Err(error) => {
                            let _ = sender.send(Err(source_error(error))).await;
                            return;
                        }
                    }
                }
                seq += 1;
                batch.push(kv_op(seq, position, kv));
            }
            if sender.send(Ok(batch)).await.is_err() {
                return;
            }
        }
    }
}

/// A lease's remaining TTL, as etcd tells it now. A lease gone already
/// (expired or revoked) gets the shortest TTL a target grants: its keys are
/// deleted by the source's next changes anyway.
async fn lease_status(client: &EtcdClient, id: i64) -> Result<Lease, EtcdError> {
    let alive = client
        .call("read a lease of", |mut services| async move {
            services
                .lease
                .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false })
                .await
        })
        .await?;
    Ok(Lease {
        id,
        ttl: alive.ttl.max(1),
        granted_ttl: alive.granted_ttl.max(0),
    })
}

/// The op that grants `lease` on a target. `txn` 0 makes it a transaction
/// of its own; otherwise it opens the group of that revision.
fn lease_op(seq: u64, position: u64, txn: u64, lease: &Lease) -> Op {
    Op {
        seq,
        position,
        txn,
        txn_last: txn == 0,
        kind: Bytes::from_static(KIND_LEASE.as_bytes()),
        key: Bytes::from(lease_key(lease.id)),
        method: Bytes::from_static(b"LeaseGrant"),
        body: Bytes::from(format!(
            r#"{{"id":{},"ttl":{},"granted_ttl":{}}}"#,
            lease.id, lease.ttl, lease.granted_ttl
        )),
        content_type: Bytes::from_static(b"application/json"),
        platform_version: Bytes::new(),
        deps: Vec::new(),
    }
}

/// The key of a lease's op.
pub(crate) fn lease_key(id: i64) -> String {
    format!("{id:016x}")
}

/// The lease id a lease op's key names ([`lease_key`]).
pub(crate) fn parse_lease_key(key: &[u8]) -> Option<i64> {
    i64::from_str_radix(std::str::from_utf8(key).ok()?, 16).ok()
}

/// The op of a key-value pair read at `position`.
pub(crate) fn kv_op(seq: u64, position: u64, kv: KeyValue) -> Op {
    let KeyValue {
        key, value, lease, ..
    } = kv;
    Op {
        seq,
        position,
        txn: 0,
        txn_last: true,
        kind: Bytes::from_static(KIND_KV.as_bytes()),
        key: Bytes::from(key),
        method: Bytes::from_static(b"Put"),
        body: Bytes::from(value),
        content_type: Bytes::new(),
        platform_version: Bytes::new(),
        deps: if lease == 0 {
            Vec::new()
        } else {
            vec![Bytes::from(lease_key(lease))]
        },
    }
}

/// Reads `[start, end)` at `revision` page by page, pages sized to about
/// [`PAGE_TARGET_BYTES`].
pub(super) async fn read_range(
    client: EtcdClient,
    revision: i64,
    start: Vec<u8>,
    end: Vec<u8>,
    pages: mpsc::Sender<Result<Vec<KeyValue>, EtcdError>>,
) {
    let mut cursor = start;
    let mut limit = 100i64;
    loop {
        let request = RangeRequest {
            key: cursor.clone(),
            range_end: end.clone(),
            revision,
            limit,
            ..RangeRequest::default()
        };
        let response = client
            .call("read a page of", |mut services| {
                let request = request.clone();
                async move { services.kv.range(request).await }
            })
            .await;
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                let _ = pages.send(Err(error)).await;
                return;
            }
        };
        let more = response.more;
        let kvs = response.kvs;
        let Some(last) = kvs.last() else {
            return;
        };
        let mut next = last.key.clone();
        next.push(0);
        let bytes: usize = kvs.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
        let average = (bytes / kvs.len()).max(1);
        limit = ((PAGE_TARGET_BYTES / average) as i64).clamp(1, PAGE_MAX_KEYS);
        if pages.send(Ok(kvs)).await.is_err() || !more {
            return;
        }
        cursor = next;
    }
}

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
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => {
                            return WatchEnd::Broken(EtcdError::Unreachable {
                                endpoints: connection.display(),
                                reason: "the watch stream ended".to_owned(),
                            });
                        }
                        Err(status) => return self.sorted(connection.failed("watch", &status)),
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
                        let response = match message {
                            Ok(Some(response)) => response,
                            Ok(None) => {
                                return WatchEnd::Broken(EtcdError::Unreachable {
                                    endpoints: connection.display(),
                                    reason: "the watch stream ended".to_owned(),
                                });
                            }
                            Err(status) => return self.sorted(connection.failed("watch", &status)),
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

/// What an etcd cluster is, for an agent's Describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdDescription {
    /// etcd's version, e.g. `3.4.23`.
    pub version: String,
    /// The cluster id, as 16 hex digits: stable across members and restarts.
    pub identity: String,
    /// The cluster's current revision.
    pub revision: i64,
}

/// Reads what `connection`'s cluster is.
pub async fn describe_cluster(connection: &EtcdConnection) -> Result<EtcdDescription> {
    let client = EtcdClient::connect(connection)
        .await
        .map_err(source_error)?;
    let status = client
        .call("read the status of", |mut services| async move {
            services.maintenance.status(StatusRequest {}).await
        })
        .await
        .map_err(source_error)?;
    let header = status.header.unwrap_or_default();
    Ok(EtcdDescription {
        version: status.version,
        identity: format!("{:016x}", header.cluster_id),
        revision: header.revision,
    })
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

    #[test]
    fn lease_keys_parse_as_hex() {
        assert_eq!(parse_lease_key(lease_key(0x5eed).as_bytes()), Some(0x5eed));
    }
}

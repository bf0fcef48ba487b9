//! Restoring into etcd: Txns that carry their own checkpoint.
//!
//! Every Txn puts ferry's checkpoint key (`__ferry__/checkpoints/<stream>`)
//! and requires that key to hold exactly the checkpoint of the Txn before it
//! (a value compare; `version == 0` for the first). Each checkpoint value is
//! unique (it names the seq it covers and a random id of the writing sink),
//! so a Txn takes effect only right after its predecessor: never twice,
//! never out of order, and never interleaved with another restore. Because
//! the guard needs nothing from the predecessor's answer, up to
//! [`EtcdSinkOptions::txns_in_flight`] Txns are sent before the first is
//! answered; one that reaches etcd before its predecessor fails its compare
//! and is sent again once the predecessor is in.
//!
//! With an epoch (G5, a live migration's attempt number) every Txn also
//! requires `__ferry__/epoch` to hold this sink's epoch, so a sink of an
//! older attempt has every Txn refused once a newer one has begun.
//!
//! # Lanes: a restore with Txns side by side
//!
//! etcd starts concurrent requests in no fixed order, so one chain with
//! several Txns in flight mostly resends them (see `txns_in_flight`). A
//! restore with [`EtcdSinkOptions::lanes`] = N instead keeps N chains, each
//! on its own checkpoint key: Txn t goes on lane t mod N
//! (`__ferry__/checkpoints/<stream>` for lane 0,
//! `__ferry__/checkpoints/<stream>/lanes/<j>` for lane j), guarded by the
//! value the lane's previous Txn wrote. At most N Txns are in flight and they
//! are confirmed oldest first, so when Txn t is sent every Txn up to t - N is
//! in; a Txn that writes a key of one in flight waits for it, so each key's
//! ops still land in seq order. Each lane checkpoint records the contiguous
//! seq every op through which has taken effect, and the seqs of its own Txn.
//! After a crash the applied ops are exactly: everything through the highest
//! contiguous seq of any lane, plus the Txn of each lane above it (a lane's
//! earlier Txn above it would mean its later one recorded a higher contiguous
//! seq). A resume skips those, and its first Txn on each lane requires the
//! lane's last value, so nothing takes effect twice. The last Txn of the
//! restore marks lane 0 complete and deletes the other lanes' keys: a
//! finished restore leaves the one checkpoint key a single chain leaves.
//! Txns of different keys may take effect up to N - 1 Txns out of seq order,
//! which a reader of the target could see during the restore; a live
//! stream, whose order matters while it runs, keeps one chain.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use ferry_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use ferry_proto::etcd::etcdserverpb::request_op::Request as TxnRequestOp;
use ferry_proto::etcd::etcdserverpb::response_op::Response as TxnResponseOp;
use ferry_proto::etcd::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, TxnResponse,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use super::client::EtcdClient;
use super::source::parse_lease_key;
use super::{
    CHECKPOINT_PREFIX, EPOCH_KEY, EtcdConnection, EtcdError, KIND_KV, KIND_LEASE, RESERVED_PREFIX,
    prefix_end, printable,
};
use crate::adapters::{AdapterError, Sink, StreamInfo};
use crate::order::SeqTracker;
use crate::{Op, Result};

/// Bytes kept free in every Txn for the checkpoint, its guards and the
/// request's framing.
const REQUEST_MARGIN_BYTES: usize = 1024;
/// Bytes a Put adds beyond its key and value (field tags, lengths, lease).
const PUT_OVERHEAD_BYTES: usize = 32;
/// How often a Txn that reached etcd before its predecessor is sent again.
const REORDER_RETRIES: usize = 8;

/// How a restore writes into etcd.
#[derive(Debug, Clone)]
pub struct EtcdSinkOptions {
    /// Ops per Txn at most, the checkpoint included: the target's
    /// `--max-txn-ops` (etcd's default: 128).
    pub max_txn_ops: usize,
    /// Bytes per Txn request at most: the target's `--max-request-bytes`
    /// (etcd's default: 1.5 MiB).
    pub max_request_bytes: usize,
    /// Keys starting with the first are written starting with the second.
    pub rewrite_prefix: Option<(Vec<u8>, Vec<u8>)>,
    /// Write even when the range already holds keys.
    pub allow_nonempty: bool,
    /// The migration attempt this sink writes for (G5); 0 for a plain
    /// restore. When above 0 the sink raises `__ferry__/epoch` to it at
    /// [`Sink::begin`] (and is refused if the target holds a higher one), and
    /// every Txn requires it still there.
    pub epoch: u64,
    /// Txns sent before the first of them is answered (at least 1). Each
    /// still takes effect only after its predecessor. Measured against etcd
    /// 3.4 (benches/, etcd-throughput): etcd starts concurrent requests in
    /// no fixed order, so about 4 in 10 pipelined Txns reach it before their
    /// predecessor and are sent again, and 4 in flight restore no faster than
    /// 1; hence the default of 1.
    pub txns_in_flight: usize,
    /// Independent checkpoint chains of a restore, one Txn in flight on
    /// each (at least 1; above 1, `txns_in_flight` is not used). See the
    /// module's documentation.
    pub lanes: usize,
    /// When true, [`Sink::apply`] returns only once every op it was given
    /// (through the last complete source transaction) is in the target, as
    /// an agent that acks what it applied needs. When false, the tail of a
    /// batch may wait for the next one to fill a Txn, and Txns stay in flight
    /// across calls until [`Sink::finish`]: faster for a restore.
    pub durable_each_apply: bool,
}

impl Default for EtcdSinkOptions {
    fn default() -> Self {
        Self {
            max_txn_ops: 128,
            max_request_bytes: 1_572_864,
            rewrite_prefix: None,
            allow_nonempty: false,
            epoch: 0,
            txns_in_flight: 1,
            lanes: 1,
            durable_each_apply: true,
        }
    }
}

/// What a restore records in the target, under
/// `__ferry__/checkpoints/<stream id>`, in the same Txn as the ops it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The stream (backup id).
    pub stream_id: String,
    /// The source the stream came from (e.g. etcd's cluster id).
    pub source_identity: Option<String>,
    /// Every op up to and including this seq has taken effect.
    pub applied_through_seq: u64,
    /// The source position of that op.
    pub applied_through_position: u64,
    /// The migration attempt that wrote it (G5); 0 for a restore.
    pub epoch: u64,
    /// True once the whole stream is applied.
    pub complete: bool,
    /// A random id of the sink that wrote it: two sinks of one stream never
    /// write the same value, so neither mistakes the other's Txn for its own.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub writer: String,
    /// Written by a restore in lanes: the lane and the Txn that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane_txn: Option<LaneTxn>,
}

/// The Txn that wrote a lane's checkpoint: every op of seqs
/// `first_seq..=last_seq` took effect with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneTxn {
    /// The lane (0 writes `__ferry__/checkpoints/<stream>`).
    pub lane: usize,
    /// The first seq it covers.
    pub first_seq: u64,
    /// The last seq it covers.
    pub last_seq: u64,
    /// The source position of that last op.
    pub last_position: u64,
}

/// Where a stream stands in the target: the contiguous checkpoint and the
/// ranges above it that a lane's Txn applied already, in seq order.
struct Resume {
    checkpoint: Checkpoint,
    applied_above: Vec<(u64, u64)>,
    /// True when any lane checkpoint was written by lanes.
    laned: bool,
}

/// Reads the stored checkpoints of a stream: lane 0 first, then the other
/// lanes with their lane numbers.
fn resume_point(
    connection: &EtcdConnection,
    stream_id: &str,
    stored: &[(usize, Vec<u8>)],
) -> Result<Option<Resume>> {
    let mut checkpoints = Vec::with_capacity(stored.len());
    for (lane, value) in stored {
        checkpoints.push(parse_checkpoint(
            connection,
            &lane_key(stream_id, *lane),
            value,
        )?);
    }
    let laned = stored.iter().any(|(lane, _)| *lane > 0)
        || checkpoints
            .iter()
            .any(|checkpoint| checkpoint.lane_txn.is_some());
    let Some(mut resume) = checkpoints
        .iter()
        .max_by_key(|checkpoint| checkpoint.applied_through_seq)
        .cloned()
    else {
        return Ok(None);
    };
    resume.complete = checkpoints.first().is_some_and(|first| first.complete);
    resume.epoch = checkpoints.iter().map(|c| c.epoch).max().unwrap_or(0);
    resume.lane_txn = None;
    let mut spans: Vec<LaneTxn> = checkpoints.iter().filter_map(|c| c.lane_txn).collect();
    spans.sort_by_key(|span| span.first_seq);
    let mut applied_above = Vec::new();
    for span in spans {
        if !applied_above.is_empty() || span.first_seq > resume.applied_through_seq + 1 {
            applied_above.push((span.first_seq, span.last_seq));
        } else if span.last_seq > resume.applied_through_seq {
            resume.applied_through_seq = span.last_seq;
            resume.applied_through_position = span.last_position;
        }
    }
    Ok(Some(Resume {
        checkpoint: resume,
        applied_above,
        laned,
    }))
}

/// A Txn sent and not yet answered.
struct InFlight {
    answer: JoinHandle<std::result::Result<TxnResponse, EtcdError>>,
    request: Arc<TxnRequest>,
    checkpoint: Checkpoint,
    /// The checkpoint value it writes.
    value: Vec<u8>,
    /// The first seq it covers (for messages).
    first_seq: u64,
    /// How often it was sent again for overtaking its predecessor.
    resent: usize,
    /// The keys it writes (in lanes: a Txn writing one of them waits).
    keys: HashSet<Vec<u8>>,
}

/// The end of the ops taken into the sink so far: its checkpoint is written
/// with the next Txn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Through {
    seq: u64,
    position: u64,
}

/// Ops applied to etcd exactly once (G4), fenced by an epoch (G5).
pub struct EtcdSink {
    connection: EtcdConnection,
    options: EtcdSinkOptions,
    client: Option<EtcdClient>,
    /// The last checkpoint etcd confirmed.
    checkpoint: Option<Checkpoint>,
    /// The checkpoint of the last Txn sent (confirmed or in flight), and its
    /// exact value in the target (`None`: the key does not exist yet): the
    /// next Txn requires it.
    sent: Option<Checkpoint>,
    sent_value: Option<Vec<u8>>,
    /// The checkpoint values etcd confirmed lately, oldest first: a Txn whose
    /// compare found one of them was only overtaken by its predecessor.
    confirmed_values: VecDeque<Option<Vec<u8>>>,
    in_flight: VecDeque<InFlight>,
    tracker: SeqTracker,
    granted_leases: HashSet<i64>,
    /// The range the restore writes into (the stream's prefix, rewritten),
    /// checked to be empty first; empty for the whole keyspace.
    target_prefix: Vec<u8>,
    /// The next Txn's operations, their keys and bytes.
    pending: Vec<RequestOp>,
    pending_keys: HashSet<Vec<u8>>,
    pending_bytes: usize,
    /// The ops of a source transaction whose last op has not come yet.
    group: Vec<Op>,
    /// The last op taken whole (its source transaction complete).
    taken_through: Option<Through>,
    writer: String,
    /// In lanes (see the module's documentation): the value last written on
    /// each lane (`None`: its key does not exist), the lane of the next
    /// Txn, the first seq taken since the last Txn, and the seq ranges above
    /// the resume point that a lane applied before this run.
    laned: bool,
    lane_values: Vec<Option<Vec<u8>>>,
    next_lane: usize,
    lane_first: Option<u64>,
    applied_above: VecDeque<(u64, u64)>,
}

fn target_error(error: EtcdError) -> crate::Error {
    AdapterError::target(error).into()
}

fn checkpoint_key(stream_id: &str) -> Vec<u8> {
    let mut key = CHECKPOINT_PREFIX.to_vec();
    key.extend_from_slice(stream_id.as_bytes());
    key
}

fn parse_epoch(connection: &EtcdConnection, value: &[u8]) -> Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| {
            target_error(EtcdError::Request {
                endpoints: connection.display(),
                action: "read the epoch".to_owned(),
                reason: format!(
                    "{} holds {:?}, not a decimal number",
                    printable(EPOCH_KEY),
                    String::from_utf8_lossy(value)
                ),
            })
        })
}

fn parse_checkpoint(connection: &EtcdConnection, key: &[u8], value: &[u8]) -> Result<Checkpoint> {
    serde_json::from_slice(value).map_err(|error| {
        target_error(EtcdError::Request {
            endpoints: connection.display(),
            action: "read the checkpoint".to_owned(),
            reason: format!("{} does not parse: {error}", printable(key)),
        })
    })
}

/// The key of a lane's checkpoint.
fn lane_key(stream_id: &str, lane: usize) -> Vec<u8> {
    let mut key = checkpoint_key(stream_id);
    if lane > 0 {
        key.extend_from_slice(format!("/lanes/{lane}").as_bytes());
    }
    key
}

/// The raw values of a stream's checkpoint keys (lane 0 first, then the
/// other lanes with their numbers; none when no key exists) and of the epoch
/// key.
async fn read_raw(
    client: &EtcdClient,
    connection: &EtcdConnection,
    stream_id: &str,
) -> Result<(Vec<(usize, Vec<u8>)>, Option<Vec<u8>>)> {
    let lanes_prefix = lane_key(stream_id, 0)
        .into_iter()
        .chain(b"/lanes/".iter().copied())
        .collect::<Vec<u8>>();
    let mut found = Vec::with_capacity(3);
    for (key, range_end) in [
        (lane_key(stream_id, 0), Vec::new()),
        (lanes_prefix.clone(), prefix_end(&lanes_prefix)),
        (EPOCH_KEY.to_vec(), Vec::new()),
    ] {
        let request = RangeRequest {
            key,
            range_end,
            ..RangeRequest::default()
        };
        let response = client
            .call("read the checkpoint from", |mut services| {
                let request = request.clone();
                async move { services.kv.range(request).await }
            })
            .await
            .map_err(target_error)?;
        found.push(response.kvs);
    }
    let epoch = found
        .pop()
        .and_then(|kvs| kvs.into_iter().next())
        .map(|kv| kv.value);
    let mut stored = Vec::new();
    for kv in found.into_iter().flatten() {
        let lane = if kv.key.len() > lanes_prefix.len() && kv.key.starts_with(&lanes_prefix) {
            std::str::from_utf8(&kv.key[lanes_prefix.len()..])
                .ok()
                .and_then(|lane| lane.parse().ok())
                .filter(|lane| *lane > 0)
                .ok_or_else(|| {
                    target_error(EtcdError::Request {
                        endpoints: connection.display(),
                        action: "read the checkpoint".to_owned(),
                        reason: format!("{} is not a lane's checkpoint key", printable(&kv.key)),
                    })
                })?
        } else {
            0
        };
        stored.push((lane, kv.value));
    }
    Ok((stored, epoch))
}

/// What the target holds for `stream_id`: its checkpoint (for a restore in
/// lanes, the highest seq every op through which took effect), if any, and
/// the highest epoch any sink raised it to (0 when none did). An agent
/// answers a Checkpoint RPC with it.
pub async fn read_checkpoint(
    connection: &EtcdConnection,
    stream_id: &str,
) -> Result<(Option<Checkpoint>, u64)> {
    let client = EtcdClient::connect(connection)
        .await
        .map_err(target_error)?;
    let (stored, epoch) = read_raw(&client, connection, stream_id).await?;
    let checkpoint = resume_point(connection, stream_id, &stored)?.map(|resume| resume.checkpoint);
    let epoch = match epoch {
        Some(value) => parse_epoch(connection, &value)?,
        None => 0,
    };
    Ok((checkpoint, epoch))
}

impl EtcdSink {
    /// A sink writing into `connection`'s cluster.
    pub fn new(connection: EtcdConnection, options: EtcdSinkOptions) -> Self {
        Self {
            connection,
            options,
            client: None,
            checkpoint: None,
            sent: None,
            sent_value: None,
            confirmed_values: VecDeque::new(),
            in_flight: VecDeque::new(),
            tracker: SeqTracker::new(),
            granted_leases: HashSet::new(),
            target_prefix: Vec::new(),
            pending: Vec::new(),
            pending_keys: HashSet::new(),
            pending_bytes: 0,
            group: Vec::new(),
            taken_through: None,
            writer: format!("{:016x}", rand::random::<u64>()),
            laned: false,
            lane_values: Vec::new(),
            next_lane: 0,
            lane_first: None,
            applied_above: VecDeque::new(),
        }
    }

    /// The last checkpoint the target confirmed: every op through its
    /// `applied_through_seq` has taken effect. `None` before
    /// [`Sink::begin`].
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoint.as_ref()
    }

    fn client(&self) -> &EtcdClient {
        self.client
            .as_ref()
            .expect("begin connects before anything is applied")
    }

    fn stale_epoch(&self, stored: u64) -> crate::Error {
        target_error(EtcdError::StaleEpoch {
            endpoints: self.connection.display(),
            stored,
            offered: self.options.epoch,
        })
    }

    /// Raises `__ferry__/epoch` to this sink's epoch with a compare-and-swap;
    /// refused when the target holds a higher one.
    async fn claim_epoch(&self) -> Result<()> {
        let epoch = self.options.epoch;
        for _ in 0..16 {
            let request = RangeRequest {
                key: EPOCH_KEY.to_vec(),
                ..RangeRequest::default()
            };
            let response = self
                .client()
                .call("read the epoch from", |mut services| {
                    let request = request.clone();
                    async move { services.kv.range(request).await }
                })
                .await
                .map_err(target_error)?;
            let stored = response.kvs.into_iter().next().map(|kv| kv.value);
            let stored_epoch = match &stored {
                Some(value) => parse_epoch(&self.connection, value)?,
                None => 0,
            };
            if stored_epoch > epoch {
                return Err(self.stale_epoch(stored_epoch));
            }
            if stored_epoch == epoch && stored.is_some() {
                return Ok(());
            }
            let guard = match stored {
                Some(value) => value_is(EPOCH_KEY.to_vec(), value),
                None => version_is_zero(EPOCH_KEY.to_vec()),
            };
            let request = TxnRequest {
                compare: vec![guard],
                success: vec![put(EPOCH_KEY.to_vec(), epoch.to_string().into_bytes(), 0)],
                failure: Vec::new(),
            };
            let response = self
                .client()
                .call("raise the epoch of", |mut services| {
                    let request = request.clone();
                    async move { services.kv.txn(request).await }
                })
                .await
                .map_err(target_error)?;
            if response.succeeded {
                info!(epoch, previous = stored_epoch, "epoch raised in the target");
                return Ok(());
            }
            // Another attempt moved it meanwhile: look again.
        }
        Err(target_error(EtcdError::Request {
            endpoints: self.connection.display(),
            action: "raise the epoch".to_owned(),
            reason: format!(
                "{} kept changing under ferry; is another migration attempt starting?",
                printable(EPOCH_KEY)
            ),
        }))
    }

    /// Up to `limit` keys of the target range that are not ferry's own.
    async fn existing_keys(&mut self, limit: usize) -> Result<Vec<Vec<u8>>> {
        let (start, end) = if self.target_prefix.is_empty() {
            (vec![0], vec![0])
        } else {
            (self.target_prefix.clone(), prefix_end(&self.target_prefix))
        };
        // The range, less ferry's reserved range, as up to two pieces.
        let reserved_end = prefix_end(RESERVED_PREFIX);
        let mut pieces = Vec::new();
        let before_end = if end == [0] || end.as_slice() > RESERVED_PREFIX {
            RESERVED_PREFIX.to_vec()
        } else {
            end.clone()
        };
        if start < before_end {
            pieces.push((start.clone(), before_end));
        }
        let after_start = if start.as_slice() > reserved_end.as_slice() {
            start.clone()
        } else {
            reserved_end
        };
        if end == [0] || after_start < end {
            pieces.push((after_start, end.clone()));
        }
        let mut found = Vec::new();
        for (from, to) in pieces {
            let request = RangeRequest {
                key: from,
                range_end: to,
                keys_only: true,
                limit: limit as i64,
                ..RangeRequest::default()
            };
            let response = self
                .client()
                .call("list the keys of", |mut services| {
                    let request = request.clone();
                    async move { services.kv.range(request).await }
                })
                .await
                .map_err(target_error)?;
            found.extend(response.kvs.into_iter().map(|kv| kv.key));
        }
        found.truncate(limit);
        Ok(found)
    }

    fn rewrite(&self, key: &[u8]) -> Vec<u8> {
        match &self.options.rewrite_prefix {
            Some((from, to)) if key.starts_with(from) => {
                let mut rewritten = to.clone();
                rewritten.extend_from_slice(&key[from.len()..]);
                rewritten
            }
            _ => key.to_vec(),
        }
    }

    fn request_budget(&self) -> usize {
        self.options
            .max_request_bytes
            .saturating_sub(REQUEST_MARGIN_BYTES)
            .max(1)
    }

    /// Ops per Txn besides the checkpoint.
    fn max_ops(&self) -> usize {
        self.options.max_txn_ops.saturating_sub(1).max(1)
    }

    /// Grants a lease under its source id; a lease that exists already (a
    /// resumed restore granted it) is left as it is.
    async fn grant_lease(&mut self, id: i64, ttl: i64) -> Result<()> {
        if self.granted_leases.contains(&id) {
            return Ok(());
        }
        let result = self
            .client()
            .call("grant a lease on", |mut services| async move {
                services
                    .lease
                    .lease_grant(LeaseGrantRequest {
                        ttl: ttl.max(1),
                        id,
                    })
                    .await
            })
            .await;
        match result {
            Ok(_) => {}
            Err(EtcdError::Request { reason, .. }) if reason.contains("lease already exists") => {}
            Err(error) => return Err(target_error(error)),
        }
        self.granted_leases.insert(id);
        Ok(())
    }

    /// The lease a Put attaches its key to, granted first when no
    /// `etcd.lease` op granted it. In a backup that is a lease that expired
    /// before the snapshot listed it: its keys get the shortest lease there
    /// is (1 s), as etcd would have revoked them anyway. A live stream should
    /// send the lease's `LeaseGrant` op before the Puts that use it.
    async fn lease_of(&mut self, op: &Op) -> Result<i64> {
        match op.deps.first() {
            Some(lease) => {
                let id = parse_lease_key(lease)
                    .ok_or_else(|| bad_op(op, "its lease reference is not a lease id"))?;
                self.grant_lease(id, 1).await?;
                Ok(id)
            }
            None => Ok(0),
        }
    }

    /// The compares every Txn of this sink makes besides its own guard.
    fn epoch_guard(&self) -> Option<Compare> {
        (self.options.epoch > 0).then(|| {
            value_is(
                EPOCH_KEY.to_vec(),
                self.options.epoch.to_string().into_bytes(),
            )
        })
    }

    /// Applies one op too large to share a Txn with the checkpoint: alone,
    /// after every Txn before it, and only if its key does not exist yet, so
    /// applying it again after a crash (before the checkpoint moved past it)
    /// changes nothing. With `--allow-nonempty` the key may exist before;
    /// then it is written unless it already holds the op's value.
    async fn apply_oversized(&mut self, op: &Op) -> Result<()> {
        self.drain().await?;
        let key = self.rewrite(&op.key);
        let lease = self.lease_of(op).await?;
        let guard = if self.options.allow_nonempty {
            Compare {
                result: CompareResult::NotEqual as i32,
                target: CompareTarget::Value as i32,
                key: key.clone(),
                range_end: Vec::new(),
                target_union: Some(TargetUnion::Value(op.body.to_vec())),
            }
        } else {
            version_is_zero(key.clone())
        };
        let mut compare = vec![guard];
        compare.extend(self.epoch_guard());
        let request = TxnRequest {
            compare,
            success: vec![put(key, op.body.to_vec(), lease)],
            failure: vec![range(EPOCH_KEY.to_vec())],
        };
        let response = self
            .client()
            .call("apply a Txn to", |mut services| {
                let request = request.clone();
                async move { services.kv.txn(request).await }
            })
            .await
            .map_err(target_error)?;
        if !response.succeeded
            && self.options.epoch > 0
            && let Some(stored) = failure_values(&response).first().cloned().flatten()
            && stored != self.options.epoch.to_string().into_bytes()
        {
            return Err(self.stale_epoch(parse_epoch(&self.connection, &stored)?));
        }
        debug!(
            seq = op.seq,
            applied = response.succeeded,
            "oversized op applied alone"
        );
        Ok(())
    }

    /// True for an op a lane applied before this resumed run (see the
    /// module's documentation): it is skipped, and the checkpoint moves past
    /// it with the next Txn.
    fn applied_before(&mut self, op: &Op) -> bool {
        while let Some(&(_, last)) = self.applied_above.front()
            && last < op.seq
        {
            self.applied_above.pop_front();
        }
        match self.applied_above.front() {
            Some(&(first, _)) if first <= op.seq && self.group.is_empty() => {
                self.taken_through = Some(Through {
                    seq: op.seq,
                    position: op.position,
                });
                true
            }
            _ => false,
        }
    }

    /// Takes one whole source transaction (or a single op) into the next
    /// Txn, sending the Txns before it when it does not fit with them.
    async fn take_group(&mut self, group: Vec<Op>) -> Result<()> {
        let (Some(first), Some(last)) = (group.first(), group.last()) else {
            return Ok(());
        };
        let through = Through {
            seq: last.seq,
            position: last.position,
        };
        let (first_seq, last_seq) = (first.seq, last.seq);
        let budget = self.request_budget();
        let max_ops = self.max_ops();
        let mut operations = Vec::with_capacity(group.len());
        let mut keys = HashSet::with_capacity(group.len());
        let mut bytes = 0usize;
        let mut oversized = None;
        for op in &group {
            match std::str::from_utf8(&op.kind) {
                Ok(KIND_LEASE) => {
                    let lease: LeaseBody = serde_json::from_slice(&op.body).map_err(|error| {
                        bad_op(op, &format!("its lease body does not parse: {error}"))
                    })?;
                    self.grant_lease(lease.id, lease.ttl).await?;
                }
                Ok(KIND_KV) if matches!(&op.method[..], b"Put" | b"Delete") => {
                    let key = self.rewrite(&op.key);
                    if !keys.insert(key.clone()) {
                        return Err(bad_op(
                            op,
                            &format!(
                                "its key is written twice in source transaction seq {first_seq}..={last_seq}; etcd refuses that in one Txn"
                            ),
                        ));
                    }
                    let size = if &op.method[..] == b"Put" {
                        op.key.len() + op.body.len() + PUT_OVERHEAD_BYTES
                    } else {
                        op.key.len() + PUT_OVERHEAD_BYTES
                    };
                    if size > self.options.max_request_bytes {
                        return Err(bad_op(
                            op,
                            &format!(
                                "its value of {} bytes is over the target's request limit of {} bytes; raise the target's --max-request-bytes and pass the same --max-request-bytes to ferry",
                                op.body.len(),
                                self.options.max_request_bytes
                            ),
                        ));
                    }
                    if size > budget {
                        oversized = Some(op);
                    }
                    bytes += size;
                    let operation = if &op.method[..] == b"Put" {
                        let lease = self.lease_of(op).await?;
                        put(key, op.body.to_vec(), lease)
                    } else {
                        delete(key)
                    };
                    operations.push(operation);
                }
                _ => {
                    return Err(bad_op(
                        op,
                        &format!(
                            "the etcd target applies etcd.kv Puts and Deletes and etcd.lease grants, not {} {}",
                            String::from_utf8_lossy(&op.kind),
                            String::from_utf8_lossy(&op.method)
                        ),
                    ));
                }
            }
        }
        if operations.len() > max_ops || (operations.len() > 1 && bytes > budget) {
            return Err(bad_op(
                first,
                &format!(
                    "its source transaction, seq {first_seq}..={last_seq}, writes {} keys in {bytes} bytes, more than one Txn holds beside ferry's checkpoint ({max_ops} ops, {budget} bytes); raise the target's --max-txn-ops (or --max-request-bytes) and pass the same values to ferry",
                    operations.len()
                ),
            ));
        }
        if let Some(op) = oversized {
            // Too large to share a Txn with the checkpoint.
            self.send_pending(false).await?;
            let op = op.clone();
            self.apply_oversized(&op).await?;
            self.lane_first.get_or_insert(first_seq);
            self.taken_through = Some(through);
            return self.send_pending(false).await;
        }
        if !self.pending.is_empty()
            && (self.pending.len() + operations.len() > max_ops
                || self.pending_bytes + bytes > budget
                || keys.iter().any(|key| self.pending_keys.contains(key)))
        {
            self.send_pending(false).await?;
        }
        self.pending.extend(operations);
        self.pending_keys.extend(keys);
        self.pending_bytes += bytes;
        self.lane_first.get_or_insert(first_seq);
        self.taken_through = Some(through);
        Ok(())
    }

    /// Sends the pending ops with the checkpoint through the last op taken;
    /// nothing when that checkpoint is written already (unless `complete`
    /// must be recorded).
    async fn send_pending(&mut self, complete: bool) -> Result<()> {
        if self.laned {
            return self.send_lane().await;
        }
        let sent = self.sent.clone().expect("begin sets the checkpoint");
        let through = self.taken_through.unwrap_or(Through {
            seq: sent.applied_through_seq,
            position: sent.applied_through_position,
        });
        if self.pending.is_empty()
            && through.seq == sent.applied_through_seq
            && (!complete || sent.complete)
        {
            return Ok(());
        }
        let mut checkpoint = sent;
        let first_seq = checkpoint.applied_through_seq + 1;
        checkpoint.applied_through_seq = through.seq;
        checkpoint.applied_through_position = through.position;
        checkpoint.complete = complete;
        checkpoint.epoch = self.options.epoch;
        checkpoint.writer = self.writer.clone();
        let key = checkpoint_key(&checkpoint.stream_id);
        let value = serde_json::to_vec(&checkpoint).expect("a checkpoint serializes");
        while self.in_flight.len() >= self.options.txns_in_flight.max(1) {
            self.complete_oldest().await?;
        }
        let guard = self.sent_value.clone();
        let keys = std::mem::take(&mut self.pending_keys);
        self.send_txn(
            key,
            guard,
            Vec::new(),
            checkpoint.clone(),
            value.clone(),
            first_seq,
            keys,
        )
        .await;
        self.sent = Some(checkpoint);
        self.sent_value = Some(value);
        Ok(())
    }

    /// In lanes: sends the ops taken since the last Txn on the next lane,
    /// once the lane's previous Txn (and with it every Txn before) is
    /// confirmed and no Txn in flight writes one of their keys.
    async fn send_lane(&mut self) -> Result<()> {
        let Some(first_seq) = self.lane_first else {
            return Ok(());
        };
        let through = self.taken_through.expect("ops were taken");
        let lanes = self.options.lanes.max(1);
        while self.in_flight.len() >= lanes
            || self
                .in_flight
                .iter()
                .any(|txn| !txn.keys.is_disjoint(&self.pending_keys))
        {
            self.complete_oldest().await?;
        }
        self.lane_first = None;
        let lane = self.next_lane;
        self.next_lane = (lane + 1) % lanes;
        // Every op through the confirmed checkpoint has taken effect.
        let mut checkpoint = self.checkpoint.clone().expect("begin sets the checkpoint");
        checkpoint.complete = false;
        checkpoint.epoch = self.options.epoch;
        checkpoint.writer = self.writer.clone();
        checkpoint.lane_txn = Some(LaneTxn {
            lane,
            first_seq,
            last_seq: through.seq,
            last_position: through.position,
        });
        let key = lane_key(&checkpoint.stream_id, lane);
        let value = serde_json::to_vec(&checkpoint).expect("a checkpoint serializes");
        let guard = self.lane_values[lane].clone();
        let keys = std::mem::take(&mut self.pending_keys);
        self.send_txn(
            key,
            guard,
            Vec::new(),
            checkpoint,
            value.clone(),
            first_seq,
            keys,
        )
        .await;
        self.lane_values[lane] = Some(value);
        Ok(())
    }

    /// In lanes, the end of the restore: once every Txn is in, one Txn marks
    /// lane 0 complete and deletes the other lanes' keys (each guarded by
    /// the value this restore knows in it).
    async fn finish_lanes(&mut self) -> Result<()> {
        self.send_lane().await?;
        self.drain().await?;
        let mut checkpoint = self.checkpoint.clone().expect("begin sets the checkpoint");
        let others: Vec<(usize, Vec<u8>)> = self
            .lane_values
            .iter()
            .enumerate()
            .skip(1)
            .filter_map(|(lane, value)| Some((lane, value.clone()?)))
            .collect();
        if let Some(through) = self.taken_through
            && through.seq > checkpoint.applied_through_seq
        {
            // The ops after the last Txn were applied by an earlier run.
            checkpoint.applied_through_seq = through.seq;
            checkpoint.applied_through_position = through.position;
        } else if checkpoint.complete && others.is_empty() {
            return Ok(());
        }
        checkpoint.complete = true;
        checkpoint.epoch = self.options.epoch;
        checkpoint.writer = self.writer.clone();
        checkpoint.lane_txn = None;
        let stream_id = checkpoint.stream_id.clone();
        let value = serde_json::to_vec(&checkpoint).expect("a checkpoint serializes");
        let mut guards = Vec::with_capacity(others.len());
        let mut deletes = Vec::with_capacity(others.len());
        for (lane, value) in others {
            guards.push(value_is(lane_key(&stream_id, lane), value));
            deletes.push(delete(lane_key(&stream_id, lane)));
        }
        let first_seq = checkpoint.applied_through_seq + 1;
        let guard = self.lane_values[0].clone();
        self.pending = deletes;
        self.send_txn(
            lane_key(&stream_id, 0),
            guard,
            guards,
            checkpoint,
            value,
            first_seq,
            HashSet::new(),
        )
        .await;
        self.drain().await?;
        self.lane_values
            .iter_mut()
            .skip(1)
            .for_each(|value| *value = None);
        Ok(())
    }

    /// Sends the pending operations in one Txn that also puts the checkpoint
    /// `value` at `key`, guarded by `key` holding `guard` (not existing, for
    /// `None`), by `extra_guards`, and by the epoch. Its answer is awaited by
    /// [`Self::complete_oldest`].
    #[allow(clippy::too_many_arguments)]
    async fn send_txn(
        &mut self,
        key: Vec<u8>,
        guard: Option<Vec<u8>>,
        extra_guards: Vec<Compare>,
        checkpoint: Checkpoint,
        value: Vec<u8>,
        first_seq: u64,
        keys: HashSet<Vec<u8>>,
    ) {
        let mut operations = std::mem::take(&mut self.pending);
        self.pending_keys.clear();
        self.pending_bytes = 0;
        let count = operations.len();
        operations.push(put(key.clone(), value.clone(), 0));
        let mut compare = vec![match guard {
            Some(previous) => value_is(key.clone(), previous),
            None => version_is_zero(key.clone()),
        }];
        compare.extend(extra_guards);
        compare.extend(self.epoch_guard());
        let request = Arc::new(TxnRequest {
            compare,
            success: operations,
            // On a failed compare, what the guards found.
            failure: vec![range(key), range(EPOCH_KEY.to_vec())],
        });
        debug!(
            ops = count,
            first_seq,
            lane = checkpoint.lane_txn.map(|txn| txn.lane),
            "etcd txn sent"
        );
        let answer = send_in_order(self.client().clone(), request.clone()).await;
        self.in_flight.push_back(InFlight {
            answer,
            request,
            checkpoint,
            value,
            first_seq,
            resent: 0,
            keys,
        });
    }

    /// Waits for every Txn in flight.
    async fn drain(&mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.complete_oldest().await?;
        }
        Ok(())
    }

    /// Waits for the oldest Txn in flight. When it reached etcd before its
    /// predecessor, it and every Txn sent after it (none of which can have
    /// applied: each needs the one before) are sent again, in order.
    async fn complete_oldest(&mut self) -> Result<()> {
        loop {
            let Some(oldest) = self.in_flight.front_mut() else {
                return Ok(());
            };
            let answer = take_answer(&mut oldest.answer).await;
            let mut txn = self.in_flight.pop_front().expect("the front exists");
            let last_seq = txn
                .checkpoint
                .lane_txn
                .map_or(txn.checkpoint.applied_through_seq, |lane_txn| {
                    lane_txn.last_seq
                });
            let seqs = format!("{}..={last_seq}", txn.first_seq);
            let response = answer
                .map_err(|error| match error {
                    EtcdError::TooLarge { endpoints, reason } => EtcdError::TooLarge {
                        endpoints,
                        reason: format!(
                            "{reason}; the Txn held seq {seqs}; pass the target's --max-request-bytes and --max-txn-ops to ferry"
                        ),
                    },
                    // The Txn carried its checkpoint, so it took no effect:
                    // the same command resumes at its first op.
                    EtcdError::NoSpace { endpoints, reason } => EtcdError::NoSpace {
                        endpoints,
                        reason: format!(
                            "{reason}, at the Txn of seq {seqs}, which took no effect; the checkpoint written with every Txn records exactly what did"
                        ),
                    },
                    other => other,
                })
                .map_err(target_error)?;
            if response.succeeded {
                debug!(
                    through_seq = txn.checkpoint.applied_through_seq,
                    "etcd txn applied"
                );
                self.confirmed_values.push_back(Some(txn.value));
                while self.confirmed_values.len() > 2 * self.options.txns_in_flight.max(1) + 2 {
                    self.confirmed_values.pop_front();
                }
                let mut confirmed = txn.checkpoint;
                if let Some(lane_txn) = confirmed.lane_txn.take() {
                    // Confirmed oldest first: every Txn before it is in too.
                    confirmed.applied_through_seq = lane_txn.last_seq;
                    confirmed.applied_through_position = lane_txn.last_position;
                }
                self.checkpoint = Some(confirmed);
                return Ok(());
            }
            let mut found = failure_values(&response).into_iter();
            let (found_checkpoint, found_epoch) = (found.next().flatten(), found.next().flatten());
            if self.options.epoch > 0
                && found_epoch.as_deref() != Some(self.options.epoch.to_string().as_bytes())
            {
                let stored = match found_epoch {
                    Some(value) => parse_epoch(&self.connection, &value)?,
                    None => 0,
                };
                return Err(self.stale_epoch(stored));
            }
            // Its predecessor is confirmed now (it is the oldest in flight);
            // a compare that found an earlier value of this sink's was
            // overtaken, and holds when sent again.
            let predecessor = self.confirmed_values.back().cloned().flatten();
            let overtaken = !self.laned
                && found_checkpoint != predecessor
                && self.confirmed_values.contains(&found_checkpoint);
            if !overtaken || txn.resent >= REORDER_RETRIES {
                return Err(target_error(EtcdError::Request {
                    endpoints: self.connection.display(),
                    action: "apply a Txn".to_owned(),
                    reason: format!(
                        "the checkpoint of stream {} changed under this restore (another restore of the same stream is running?); nothing of seq {seqs} was applied",
                        txn.checkpoint.stream_id
                    ),
                }));
            }
            debug!(seqs = %seqs, following = self.in_flight.len(), "etcd txn overtook its predecessor; sending it and those after it again");
            for later in self.in_flight.iter_mut() {
                // Refused as well (or about to be): wait, then send again.
                let _ = take_answer(&mut later.answer).await;
            }
            txn.resent += 1;
            self.in_flight.push_front(txn);
            let client = self.client().clone();
            for txn in self.in_flight.iter_mut() {
                txn.answer = send_in_order(client.clone(), txn.request.clone()).await;
            }
        }
    }
}

/// Sends a Txn before any sent after it: its task is first polled (which
/// hands the request to the connection) before this returns, since spawned
/// tasks may otherwise start in any order. The answer is awaited later.
async fn send_in_order(
    client: EtcdClient,
    request: Arc<TxnRequest>,
) -> JoinHandle<std::result::Result<TxnResponse, EtcdError>> {
    let (sent, on_its_way) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut call = std::pin::pin!(send_txn(client, request));
        let first = futures::poll!(call.as_mut());
        let _ = sent.send(());
        match first {
            std::task::Poll::Ready(answer) => answer,
            std::task::Poll::Pending => call.await,
        }
    });
    let _ = on_its_way.await;
    task
}

/// The answer of a Txn sent by [`send_in_order`].
async fn take_answer(
    answer: &mut JoinHandle<std::result::Result<TxnResponse, EtcdError>>,
) -> std::result::Result<TxnResponse, EtcdError> {
    answer.await.unwrap_or_else(|error| {
        Err(EtcdError::Request {
            endpoints: String::new(),
            action: "apply a Txn".to_owned(),
            reason: format!("the task sending it failed: {error}"),
        })
    })
}

async fn send_txn(
    client: EtcdClient,
    request: Arc<TxnRequest>,
) -> std::result::Result<TxnResponse, EtcdError> {
    client
        .call("apply a Txn to", |mut services| {
            let request = TxnRequest::clone(&request);
            async move { services.kv.txn(request).await }
        })
        .await
}

/// The value each Range of a failed Txn's failure branch found (`None`
/// where the key does not exist), in order.
fn failure_values(response: &TxnResponse) -> Vec<Option<Vec<u8>>> {
    response
        .responses
        .iter()
        .map(|op| match &op.response {
            Some(TxnResponseOp::ResponseRange(range)) => {
                range.kvs.first().map(|kv| kv.value.clone())
            }
            _ => None,
        })
        .collect()
}

fn bad_op(op: &Op, reason: &str) -> crate::Error {
    target_error(EtcdError::BadOp {
        seq: op.seq,
        key: printable(&op.key),
        reason: reason.to_owned(),
    })
}

fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(TxnRequestOp::RequestPut(PutRequest {
            key,
            value,
            lease,
            ..PutRequest::default()
        })),
    }
}

fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(TxnRequestOp::RequestDeleteRange(DeleteRangeRequest {
            key,
            ..DeleteRangeRequest::default()
        })),
    }
}

fn range(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(TxnRequestOp::RequestRange(RangeRequest {
            key,
            ..RangeRequest::default()
        })),
    }
}

fn value_is(key: Vec<u8>, value: Vec<u8>) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Value as i32,
        key,
        range_end: Vec::new(),
        target_union: Some(TargetUnion::Value(value)),
    }
}

fn version_is_zero(key: Vec<u8>) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Version as i32,
        key,
        range_end: Vec::new(),
        target_union: Some(TargetUnion::Version(0)),
    }
}

#[derive(Deserialize)]
struct LeaseBody {
    id: i64,
    ttl: i64,
}

#[async_trait]
impl Sink for EtcdSink {
    async fn begin(&mut self, stream: &StreamInfo) -> Result<Option<u64>> {
        self.client = Some(
            EtcdClient::connect(&self.connection)
                .await
                .map_err(target_error)?,
        );
        let connection = self.connection.clone();
        if self.options.epoch > 0 {
            self.claim_epoch().await?;
        }
        let (stored, _) = read_raw(self.client(), &connection, &stream.stream_id).await?;
        let resume = resume_point(&connection, &stream.stream_id, &stored)?;
        self.laned = self.options.lanes > 1 || resume.as_ref().is_some_and(|resume| resume.laned);
        if self.laned {
            let lanes = stored
                .iter()
                .map(|(lane, _)| lane + 1)
                .max()
                .unwrap_or(0)
                .max(self.options.lanes.max(1));
            self.lane_values = vec![None; lanes];
            for (lane, value) in &stored {
                self.lane_values[*lane] = Some(value.clone());
            }
        }
        if let Some(Resume {
            checkpoint,
            applied_above,
            ..
        }) = resume
        {
            if checkpoint.source_identity != stream.source_identity {
                return Err(target_error(EtcdError::OtherSource {
                    endpoints: connection.display(),
                    stream_id: stream.stream_id.clone(),
                    checkpoint_source: checkpoint
                        .source_identity
                        .clone()
                        .unwrap_or_else(|| "(none)".to_owned()),
                    backup_source: stream
                        .source_identity
                        .clone()
                        .unwrap_or_else(|| "(none)".to_owned()),
                }));
            }
            if checkpoint.epoch > self.options.epoch {
                return Err(self.stale_epoch(checkpoint.epoch));
            }
            info!(
                stream_id = %stream.stream_id,
                applied_through_seq = checkpoint.applied_through_seq,
                applied_above = ?applied_above,
                written_by_epoch = checkpoint.epoch,
                "resuming from the target's checkpoint"
            );
            self.tracker = SeqTracker::starting_at(checkpoint.applied_through_seq + 1);
            let resume = checkpoint.applied_through_seq;
            self.applied_above = applied_above.into();
            let value = stored
                .first()
                .filter(|(lane, _)| *lane == 0)
                .map(|(_, value)| value.clone());
            self.confirmed_values = VecDeque::from([value.clone()]);
            self.sent_value = value;
            self.sent = Some(checkpoint.clone());
            self.checkpoint = Some(checkpoint);
            return Ok(Some(resume));
        }
        self.target_prefix = stream
            .key_prefix
            .as_deref()
            .map(|prefix| self.rewrite(prefix))
            .unwrap_or_default();
        if let Some((_, to)) = &self.options.rewrite_prefix
            && self.target_prefix.is_empty()
        {
            self.target_prefix = to.clone();
        }
        if !self.options.allow_nonempty {
            let existing = self.existing_keys(5).await?;
            if !existing.is_empty() {
                let examples: Vec<String> = existing.iter().map(|key| printable(key)).collect();
                return Err(target_error(EtcdError::NotEmpty {
                    endpoints: connection.display(),
                    examples: examples.join(", "),
                }));
            }
        }
        let checkpoint = Checkpoint {
            stream_id: stream.stream_id.clone(),
            source_identity: stream.source_identity.clone(),
            applied_through_seq: 0,
            applied_through_position: 0,
            epoch: self.options.epoch,
            complete: false,
            writer: String::new(),
            lane_txn: None,
        };
        self.confirmed_values = VecDeque::from([None]);
        self.sent_value = None;
        self.sent = Some(checkpoint.clone());
        self.checkpoint = Some(checkpoint);
        Ok(None)
    }

    async fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        for op in ops {
            self.tracker
                .try_advance(op.seq)
                .map_err(|source| AdapterError::SourceOutOfOrder { source })?;
            if self.applied_before(&op) {
                continue;
            }
            if let Some(open) = self.group.first()
                && op.txn != open.txn
            {
                return Err(bad_op(
                    &op,
                    &format!(
                        "source transaction {} (from seq {}) ended without its last op; the source broke G3",
                        open.txn, open.seq
                    ),
                ));
            }
            let ends_group = op.txn == 0 || op.txn_last;
            self.group.push(op);
            if ends_group {
                let group = std::mem::take(&mut self.group);
                self.take_group(group).await?;
            }
        }
        if self.options.durable_each_apply {
            self.send_pending(false).await?;
            self.drain().await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        if let Some(open) = self.group.first() {
            return Err(bad_op(
                open,
                &format!(
                    "the stream ended inside source transaction {} (from seq {}); its ops were not applied",
                    open.txn, open.seq
                ),
            ));
        }
        if self.sent.is_none() {
            return Ok(());
        }
        if self.laned {
            return self.finish_lanes().await;
        }
        self.send_pending(true).await?;
        self.drain().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lane's stored value: contiguous through `contiguous`, its own Txn
    /// `first..=last`.
    fn lane(lane: usize, contiguous: u64, first: u64, last: u64) -> (usize, Vec<u8>) {
        let checkpoint = Checkpoint {
            stream_id: "s".to_owned(),
            source_identity: None,
            applied_through_seq: contiguous,
            applied_through_position: contiguous,
            epoch: 0,
            complete: false,
            writer: "w".to_owned(),
            lane_txn: Some(LaneTxn {
                lane,
                first_seq: first,
                last_seq: last,
                last_position: last,
            }),
        };
        (lane, serde_json::to_vec(&checkpoint).expect("serializes"))
    }

    fn resume(stored: &[(usize, Vec<u8>)]) -> (u64, Vec<(u64, u64)>) {
        let connection = EtcdConnection::from_url("etcd://127.0.0.1:1", None).expect("url");
        let resume = resume_point(&connection, "s", stored)
            .expect("parses")
            .expect("a checkpoint");
        assert!(resume.laned);
        (resume.checkpoint.applied_through_seq, resume.applied_above)
    }

    #[test]
    fn later_lanes_applied_before_an_earlier_one_are_skipped_not_resumed_from() {
        // 3 lanes, Txns of 10 ops: t3 (31..=40, lane 0) never applied; t4
        // and t5 did, sent when everything through 20 and 30 was in.
        let stored = [lane(0, 0, 1, 10), lane(1, 20, 41, 50), lane(2, 30, 51, 60)];
        assert_eq!(resume(&stored), (30, vec![(41, 50), (51, 60)]));
    }

    #[test]
    fn lanes_with_no_gap_resume_after_the_last_txn() {
        let stored = [lane(0, 10, 31, 40), lane(1, 20, 41, 50), lane(2, 0, 21, 30)];
        assert_eq!(resume(&stored), (50, vec![]));
    }

    #[test]
    fn a_single_chain_checkpoint_resumes_where_it_says() {
        let connection = EtcdConnection::from_url("etcd://127.0.0.1:1", None).expect("url");
        let checkpoint = Checkpoint {
            stream_id: "s".to_owned(),
            source_identity: None,
            applied_through_seq: 77,
            applied_through_position: 900,
            epoch: 0,
            complete: true,
            writer: String::new(),
            lane_txn: None,
        };
        let stored = [(0, serde_json::to_vec(&checkpoint).expect("serializes"))];
        let resume = resume_point(&connection, "s", &stored)
            .expect("parses")
            .expect("a checkpoint");
        assert!(!resume.laned);
        assert!(resume.applied_above.is_empty());
        assert_eq!(resume.checkpoint, checkpoint);
    }
}

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
}

fn target_error(error: EtcdError) -> crate::Error {
    AdapterError::EtcdTarget(error).into()
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

/// The raw values of the checkpoint key and the epoch key (`None` when a
/// key does not exist).
async fn read_raw(
    client: &EtcdClient,
    stream_id: &str,
) -> Result<(Option<Vec<u8>>, Option<Vec<u8>>)> {
    let mut values = Vec::with_capacity(2);
    for key in [checkpoint_key(stream_id), EPOCH_KEY.to_vec()] {
        let request = RangeRequest {
            key,
            ..RangeRequest::default()
        };
        let response = client
            .call("read the checkpoint from", |mut services| {
                let request = request.clone();
                async move { services.kv.range(request).await }
            })
            .await
            .map_err(target_error)?;
        values.push(response.kvs.into_iter().next().map(|kv| kv.value));
    }
    let epoch = values.pop().flatten();
    let checkpoint = values.pop().flatten();
    Ok((checkpoint, epoch))
}

/// What the target holds for `stream_id`: its checkpoint, if any, and the
/// highest epoch any sink raised it to (0 when none did). An agent answers
/// a Checkpoint RPC with it.
pub async fn read_checkpoint(
    connection: &EtcdConnection,
    stream_id: &str,
) -> Result<(Option<Checkpoint>, u64)> {
    let client = EtcdClient::connect(connection)
        .await
        .map_err(target_error)?;
    let (checkpoint, epoch) = read_raw(&client, stream_id).await?;
    let checkpoint = match checkpoint {
        Some(value) => Some(parse_checkpoint(
            connection,
            &checkpoint_key(stream_id),
            &value,
        )?),
        None => None,
    };
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
        self.taken_through = Some(through);
        Ok(())
    }

    /// Sends the pending ops with the checkpoint through the last op taken;
    /// nothing when that checkpoint is written already (unless `complete`
    /// must be recorded).
    async fn send_pending(&mut self, complete: bool) -> Result<()> {
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
        let mut operations = std::mem::take(&mut self.pending);
        self.pending_keys.clear();
        self.pending_bytes = 0;
        let count = operations.len();
        operations.push(put(key.clone(), value.clone(), 0));
        let guard = match &self.sent_value {
            Some(previous) => value_is(key.clone(), previous.clone()),
            None => version_is_zero(key.clone()),
        };
        let mut compare = vec![guard];
        compare.extend(self.epoch_guard());
        let request = Arc::new(TxnRequest {
            compare,
            success: operations,
            // On a failed compare, what the guards found.
            failure: vec![range(key), range(EPOCH_KEY.to_vec())],
        });
        while self.in_flight.len() >= self.options.txns_in_flight.max(1) {
            self.complete_oldest().await?;
        }
        debug!(ops = count, through_seq = through.seq, "etcd txn sent");
        let answer = send_in_order(self.client().clone(), request.clone()).await;
        self.in_flight.push_back(InFlight {
            answer,
            request,
            checkpoint: checkpoint.clone(),
            value: value.clone(),
            first_seq,
            resent: 0,
        });
        self.sent = Some(checkpoint);
        self.sent_value = Some(value);
        Ok(())
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
            let seqs = format!("{}..={}", txn.first_seq, txn.checkpoint.applied_through_seq);
            let response = answer
                .map_err(|error| match error {
                    EtcdError::TooLarge { endpoints, reason } => EtcdError::TooLarge {
                        endpoints,
                        reason: format!(
                            "{reason}; the Txn held seq {seqs}; pass the target's --max-request-bytes and --max-txn-ops to ferry"
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
                self.checkpoint = Some(txn.checkpoint);
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
            let overtaken = found_checkpoint != predecessor
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

fn parse_lease_key(key: &[u8]) -> Option<i64> {
    i64::from_str_radix(std::str::from_utf8(key).ok()?, 16).ok()
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
        let (stored, _) = read_raw(self.client(), &stream.stream_id).await?;
        if let Some(value) = stored {
            let key = checkpoint_key(&stream.stream_id);
            let checkpoint = parse_checkpoint(&connection, &key, &value)?;
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
                written_by_epoch = checkpoint.epoch,
                "resuming from the target's checkpoint"
            );
            self.tracker = SeqTracker::starting_at(checkpoint.applied_through_seq + 1);
            let resume = checkpoint.applied_through_seq;
            self.confirmed_values = VecDeque::from([Some(value.clone())]);
            self.sent_value = Some(value);
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
        self.send_pending(true).await?;
        self.drain().await
    }
}

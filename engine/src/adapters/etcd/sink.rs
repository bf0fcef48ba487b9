//! Restoring into etcd: Txns that carry their own checkpoint.

use std::collections::HashSet;

use async_trait::async_trait;
use ferry_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use ferry_proto::etcd::etcdserverpb::request_op::Request as TxnRequestOp;
use ferry_proto::etcd::etcdserverpb::{
    Compare, LeaseGrantRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use super::client::EtcdClient;
use super::{
    CHECKPOINT_PREFIX, EtcdConnection, EtcdError, KIND_KV, KIND_LEASE, RESERVED_PREFIX, prefix_end,
    printable,
};
use crate::adapters::{AdapterError, Sink, StreamInfo};
use crate::order::SeqTracker;
use crate::{Op, Result};

/// Bytes kept free in every Txn for the checkpoint, its guard and the
/// request's framing.
const REQUEST_MARGIN_BYTES: usize = 1024;
/// Bytes a Put adds beyond its key and value (field tags, lengths, lease).
const PUT_OVERHEAD_BYTES: usize = 32;

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
}

impl Default for EtcdSinkOptions {
    fn default() -> Self {
        Self {
            max_txn_ops: 128,
            max_request_bytes: 1_572_864,
            rewrite_prefix: None,
            allow_nonempty: false,
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
}

/// Ops applied to etcd exactly once (G4).
pub struct EtcdSink {
    connection: EtcdConnection,
    options: EtcdSinkOptions,
    client: Option<EtcdClient>,
    checkpoint: Option<Checkpoint>,
    /// The checkpoint key's mod revision, 0 while it does not exist: every
    /// Txn requires it unchanged, so two restores never interleave.
    checkpoint_revision: i64,
    tracker: SeqTracker,
    granted_leases: HashSet<i64>,
    /// The range the restore writes into (the stream's prefix, rewritten),
    /// checked to be empty first; empty for the whole keyspace.
    target_prefix: Vec<u8>,
    pending: Vec<Op>,
    pending_bytes: usize,
}

fn target_error(error: EtcdError) -> crate::Error {
    AdapterError::EtcdTarget(error).into()
}

impl EtcdSink {
    /// A sink writing into `connection`'s cluster.
    pub fn new(connection: EtcdConnection, options: EtcdSinkOptions) -> Self {
        Self {
            connection,
            options,
            client: None,
            checkpoint: None,
            checkpoint_revision: 0,
            tracker: SeqTracker::new(),
            granted_leases: HashSet::new(),
            target_prefix: Vec::new(),
            pending: Vec::new(),
            pending_bytes: 0,
        }
    }

    fn client(&self) -> &EtcdClient {
        self.client
            .as_ref()
            .expect("begin connects before anything is applied")
    }

    fn checkpoint_key(stream_id: &str) -> Vec<u8> {
        let mut key = CHECKPOINT_PREFIX.to_vec();
        key.extend_from_slice(stream_id.as_bytes());
        key
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

    /// Applies one op too large to share a Txn with the checkpoint: alone,
    /// and only if its key does not exist yet, so applying it again after a
    /// crash (before the checkpoint moved past it) changes nothing. With
    /// `--allow-nonempty` the key may exist before; then it is written
    /// unless it already holds the op's value.
    async fn apply_oversized(&mut self, op: &Op) -> Result<()> {
        let key = self.rewrite(&op.key);
        let lease = match op.deps.first() {
            Some(lease) => {
                let id = parse_lease_key(lease)
                    .ok_or_else(|| bad_op(op, "its lease reference is not a lease id"))?;
                self.grant_lease(id, 1).await?;
                id
            }
            None => 0,
        };
        let guard = if self.options.allow_nonempty {
            Compare {
                result: CompareResult::NotEqual as i32,
                target: CompareTarget::Value as i32,
                key: key.clone(),
                range_end: Vec::new(),
                target_union: Some(TargetUnion::Value(op.body.to_vec())),
            }
        } else {
            Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Version as i32,
                key: key.clone(),
                range_end: Vec::new(),
                target_union: Some(TargetUnion::Version(0)),
            }
        };
        let request = TxnRequest {
            compare: vec![guard],
            success: vec![put(key, op.body.to_vec(), lease)],
            failure: Vec::new(),
        };
        let response = self
            .client()
            .call("apply a Txn to", |mut services| {
                let request = request.clone();
                async move { services.kv.txn(request).await }
            })
            .await
            .map_err(target_error)?;
        debug!(
            seq = op.seq,
            applied = response.succeeded,
            "oversized op applied alone"
        );
        Ok(())
    }

    /// Applies the pending ops and the checkpoint through `through` in one Txn.
    async fn flush(&mut self, through: &Op, complete: bool) -> Result<()> {
        let mut checkpoint = self.checkpoint.clone().expect("begin sets the checkpoint");
        checkpoint.applied_through_seq = through.seq;
        checkpoint.applied_through_position = through.position;
        checkpoint.complete = complete;
        let checkpoint_key = Self::checkpoint_key(&checkpoint.stream_id);
        let mut operations = Vec::with_capacity(self.pending.len() + 1);
        for op in std::mem::take(&mut self.pending) {
            let key = self.rewrite(&op.key);
            let lease = match op.deps.first() {
                Some(lease) => {
                    let id = parse_lease_key(lease)
                        .ok_or_else(|| bad_op(&op, "its lease reference is not a lease id"))?;
                    // A lease that expired before the snapshot listed it:
                    // its keys get the shortest lease there is.
                    self.grant_lease(id, 1).await?;
                    id
                }
                None => 0,
            };
            operations.push(put(key, op.body.to_vec(), lease));
        }
        operations.push(put(
            checkpoint_key.clone(),
            serde_json::to_vec(&checkpoint).expect("a checkpoint serializes"),
            0,
        ));
        // The checkpoint must be as this restore left it: two restores of
        // one stream never interleave.
        let guard = if self.checkpoint_revision == 0 {
            Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Version as i32,
                key: checkpoint_key,
                range_end: Vec::new(),
                target_union: Some(TargetUnion::Version(0)),
            }
        } else {
            Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: checkpoint_key,
                range_end: Vec::new(),
                target_union: Some(TargetUnion::ModRevision(self.checkpoint_revision)),
            }
        };
        let count = operations.len() - 1;
        let request = TxnRequest {
            compare: vec![guard],
            success: operations,
            failure: Vec::new(),
        };
        let response = self
            .client()
            .call("apply a Txn to", |mut services| {
                let request = request.clone();
                async move { services.kv.txn(request).await }
            })
            .await
            .map_err(|error| match error {
                EtcdError::TooLarge { endpoints, reason } => EtcdError::TooLarge {
                    endpoints,
                    reason: format!(
                        "{reason}; the Txn held seq {}..={}; pass the target's --max-request-bytes and --max-txn-ops to ferry",
                        checkpoint_from(&checkpoint, count),
                        checkpoint.applied_through_seq
                    ),
                },
                other => other,
            })
            .map_err(target_error)?;
        if !response.succeeded {
            return Err(target_error(EtcdError::Request {
                endpoints: self.connection.display(),
                action: "apply a Txn".to_owned(),
                reason: format!(
                    "the checkpoint of stream {} changed under this restore (another restore of the same backup is running?); nothing of this batch was applied",
                    checkpoint.stream_id
                ),
            }));
        }
        self.checkpoint_revision = response.header.map_or(0, |header| header.revision);
        debug!(ops = count, through_seq = through.seq, "etcd txn applied");
        self.checkpoint = Some(checkpoint);
        self.pending_bytes = 0;
        Ok(())
    }
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

/// The first seq of a Txn of `count` ops ending at the checkpoint's.
fn checkpoint_from(checkpoint: &Checkpoint, count: usize) -> u64 {
    (checkpoint.applied_through_seq + 1).saturating_sub(count as u64)
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
        let key = Self::checkpoint_key(&stream.stream_id);
        let connection = self.connection.clone();
        let request = RangeRequest {
            key,
            ..RangeRequest::default()
        };
        let response = self
            .client()
            .call("read the checkpoint from", |mut services| {
                let request = request.clone();
                async move { services.kv.range(request).await }
            })
            .await
            .map_err(target_error)?;
        if let Some(kv) = response.kvs.first() {
            let checkpoint: Checkpoint = serde_json::from_slice(&kv.value).map_err(|error| {
                target_error(EtcdError::Request {
                    endpoints: connection.display(),
                    action: "read the checkpoint".to_owned(),
                    reason: format!("{} does not parse: {error}", printable(&kv.key)),
                })
            })?;
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
            info!(stream_id = %stream.stream_id, applied_through_seq = checkpoint.applied_through_seq, "resuming from the target's checkpoint");
            self.checkpoint_revision = kv.mod_revision;
            self.tracker = SeqTracker::starting_at(checkpoint.applied_through_seq + 1);
            let resume = checkpoint.applied_through_seq;
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
        self.checkpoint = Some(Checkpoint {
            stream_id: stream.stream_id.clone(),
            source_identity: stream.source_identity.clone(),
            applied_through_seq: 0,
            applied_through_position: 0,
            epoch: 0,
            complete: false,
        });
        Ok(None)
    }

    async fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        let max_ops = self.options.max_txn_ops.saturating_sub(1).max(1);
        let budget = self.request_budget();
        let mut last: Option<Op> = None;
        for op in ops {
            self.tracker
                .try_advance(op.seq)
                .map_err(|source| AdapterError::SourceOutOfOrder { source })?;
            match std::str::from_utf8(&op.kind) {
                Ok(KIND_LEASE) => {
                    if let Some(previous) = last.take().filter(|_| !self.pending.is_empty()) {
                        self.flush(&previous, false).await?;
                    }
                    let lease: LeaseBody = serde_json::from_slice(&op.body).map_err(|error| {
                        bad_op(&op, &format!("its lease body does not parse: {error}"))
                    })?;
                    self.grant_lease(lease.id, lease.ttl).await?;
                }
                Ok(KIND_KV) if &op.method[..] == b"Put" => {
                    let size = op.key.len() + op.body.len() + PUT_OVERHEAD_BYTES;
                    if size > self.options.max_request_bytes {
                        return Err(bad_op(
                            &op,
                            &format!(
                                "its value of {} bytes is over the target's request limit of {} bytes; raise the target's --max-request-bytes and pass the same --max-request-bytes to ferry",
                                op.body.len(),
                                self.options.max_request_bytes
                            ),
                        ));
                    }
                    if size > budget {
                        // Too large to share a Txn with the checkpoint.
                        if let Some(previous) = last.take().filter(|_| !self.pending.is_empty()) {
                            self.flush(&previous, false).await?;
                        }
                        self.apply_oversized(&op).await?;
                        self.flush(&op, false).await?;
                        continue;
                    }
                    if !self.pending.is_empty()
                        && (self.pending.len() >= max_ops || self.pending_bytes + size > budget)
                    {
                        let previous = last.clone().expect("pending ops have a last one");
                        self.flush(&previous, false).await?;
                    }
                    self.pending_bytes += size;
                    self.pending.push(op.clone());
                }
                _ => {
                    return Err(bad_op(
                        &op,
                        &format!(
                            "the etcd target applies etcd.kv Puts and etcd.lease grants, not {} {}",
                            String::from_utf8_lossy(&op.kind),
                            String::from_utf8_lossy(&op.method)
                        ),
                    ));
                }
            }
            last = Some(op);
        }
        // The rest, or leases only since the last Txn: record them too.
        if let Some(last) = last {
            self.flush(&last, false).await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        let Some(checkpoint) = self.checkpoint.clone() else {
            return Ok(());
        };
        if checkpoint.complete {
            return Ok(());
        }
        let through = Op {
            seq: checkpoint.applied_through_seq,
            position: checkpoint.applied_through_position,
            ..Op::default()
        };
        self.flush(&through, true).await
    }
}

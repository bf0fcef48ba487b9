//! Building a Txn: request ops and compares, their sizes, and packing
//! source transactions into Txns under the target's limits.

use std::collections::HashSet;

use ferry_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use ferry_proto::etcd::etcdserverpb::request_op::Request as TxnRequestOp;
use ferry_proto::etcd::etcdserverpb::response_op::Response as TxnResponseOp;
use ferry_proto::etcd::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, TxnResponse,
};
use serde::Deserialize;
use tracing::debug;

use super::checkpoint::parse_epoch;
use super::{EtcdSink, Through, target_error};
use crate::adapters::etcd::source::parse_lease_key;
use crate::adapters::etcd::{EPOCH_KEY, EtcdError, KIND_KV, KIND_LEASE, printable};
use crate::{Op, Result};

/// Bytes kept free in every Txn for the checkpoint, its guards and the
/// request's framing.
const REQUEST_MARGIN_BYTES: usize = 1024;
/// Bytes a Put adds beyond its key and value (field tags, lengths, lease).
const PUT_OVERHEAD_BYTES: usize = 32;

impl EtcdSink {
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
    pub(super) fn epoch_guard(&self) -> Option<Compare> {
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
    pub(super) fn applied_before(&mut self, op: &Op) -> bool {
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
    pub(super) async fn take_group(&mut self, group: Vec<Op>) -> Result<()> {
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
}

/// The value each Range of a failed Txn's failure branch found (`None`
/// where the key does not exist), in order.
pub(super) fn failure_values(response: &TxnResponse) -> Vec<Option<Vec<u8>>> {
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

pub(super) fn bad_op(op: &Op, reason: &str) -> crate::Error {
    target_error(EtcdError::BadOp {
        seq: op.seq,
        key: printable(&op.key),
        reason: reason.to_owned(),
    })
}

pub(super) fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(TxnRequestOp::RequestPut(PutRequest {
            key,
            value,
            lease,
            ..PutRequest::default()
        })),
    }
}

pub(super) fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(TxnRequestOp::RequestDeleteRange(DeleteRangeRequest {
            key,
            ..DeleteRangeRequest::default()
        })),
    }
}

pub(super) fn range(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(TxnRequestOp::RequestRange(RangeRequest {
            key,
            ..RangeRequest::default()
        })),
    }
}

pub(super) fn value_is(key: Vec<u8>, value: Vec<u8>) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Value as i32,
        key,
        range_end: Vec::new(),
        target_union: Some(TargetUnion::Value(value)),
    }
}

pub(super) fn version_is_zero(key: Vec<u8>) -> Compare {
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

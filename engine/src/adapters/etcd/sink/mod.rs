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

mod checkpoint;
mod lanes;
mod txn;

pub use checkpoint::{Checkpoint, read_checkpoint};

use std::collections::{HashSet, VecDeque};

use async_trait::async_trait;
use ferry_proto::etcd::etcdserverpb::{RangeRequest, RequestOp, TxnRequest};
use tracing::info;

use super::client::EtcdClient;
use super::{EPOCH_KEY, EtcdConnection, EtcdError, RESERVED_PREFIX, prefix_end, printable};
use crate::adapters::{AdapterError, Sink, StreamInfo};
use crate::order::SeqTracker;
use crate::{Op, Result};
use checkpoint::{Resume, parse_epoch, read_raw, resume_point};
use lanes::InFlight;
use txn::{bad_op, put, value_is, version_is_zero};

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
        AdapterError::StaleEpoch {
            target_name: self.connection.display(),
            stored,
            offered: self.options.epoch,
        }
        .into()
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

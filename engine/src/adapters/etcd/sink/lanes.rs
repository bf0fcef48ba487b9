//! Txns in flight: sending them in order on one chain or on lanes, and
//! confirming them oldest first.

use std::collections::HashSet;
use std::sync::Arc;

use ferry_proto::etcd::etcdserverpb::{Compare, TxnRequest, TxnResponse};
use tokio::task::JoinHandle;
use tracing::debug;

use super::checkpoint::{Checkpoint, LaneTxn, checkpoint_key, lane_key, parse_epoch};
use super::txn::{delete, failure_values, put, range, value_is, version_is_zero};
use super::{EtcdSink, Through, target_error};
use crate::Result;
use crate::adapters::etcd::client::EtcdClient;
use crate::adapters::etcd::{EPOCH_KEY, EtcdError};

/// How often a Txn that reached etcd before its predecessor is sent again.
const REORDER_RETRIES: usize = 8;

/// A Txn sent and not yet answered.
pub(super) struct InFlight {
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

impl EtcdSink {
    /// Sends the pending ops with the checkpoint through the last op taken;
    /// nothing when that checkpoint is written already (unless `complete`
    /// must be recorded).
    pub(super) async fn send_pending(&mut self, complete: bool) -> Result<()> {
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
    pub(super) async fn finish_lanes(&mut self) -> Result<()> {
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
    pub(super) async fn drain(&mut self) -> Result<()> {
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

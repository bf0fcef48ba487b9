//! The shared sink driver: what every exactly-once sink would otherwise
//! derive again, around a target that only knows its own transactions.
//!
//! A [`TransactionalTarget`] opens a stream (its stored checkpoint and
//! epoch), begins a target transaction, applies one op at a time inside it,
//! and commits it with the checkpoint written in the same transaction. The
//! [`SinkDriver`] around it is a [`Sink`] that owns:
//!
//! - **G1**: seqs contiguous from where the target stands; a gap or repeat
//!   is refused naming the seq, before anything of it is applied.
//! - **G3**: the ops of one source transaction go into one target
//!   transaction, streamed op by op as they arrive (a source transaction of
//!   a million rows is never held whole in memory); a commit happens only
//!   between source transactions, so a kill leaves each whole or absent.
//!   Several source transactions share a target transaction up to
//!   [`DriverOptions::ops_per_commit`] ops, for speed.
//! - **G4**: a stream resumes after the stored checkpoint; the checkpoint
//!   commits with the ops it covers.
//! - **G5**: an epoch lower than the stored one is refused at open; the
//!   target checks at every commit that the stored epoch is still this one.
//! - **G6**: an op whose `deps` name keys the target does not hold yet waits
//!   until an op of the stream creates them, within
//!   [`DriverOptions::dep_window`] ops; the target transaction stays open
//!   meanwhile (no checkpoint can cover a held op), so a kill still loses
//!   nothing. A dependency the stream never creates is an error naming the
//!   op and the key, at the end of the stream or when the window fills.
//!
//! A target without transactions implements `begin` and `commit` as nothing
//! but the checkpoint write, and makes `apply` idempotent: a resume then
//! applies again what followed the last checkpoint.

use std::collections::{HashSet, VecDeque};

use async_trait::async_trait;

use super::live::{Applied, Position, StoredStream};
use super::{AdapterError, Sink, StreamInfo};
use crate::order::SeqTracker;
use crate::{Op, Result};

/// A target that applies ops in transactions of its own.
///
/// # Contract
/// - `open` reads what the target holds of the stream, and takes the target
///   for `epoch` (raises its stored epoch to it) when the stored one is not
///   higher; the driver refuses a lower `epoch` before asking.
/// - Between `begin` and `commit`, nothing `apply` did is visible to a later
///   `open` unless `commit` returned `Ok`; `commit` writes `applied` (and
///   `complete`) as the stream's checkpoint in the same transaction, and
///   fails, with nothing of the transaction in, when the stored epoch is no
///   longer the one `open` took.
/// - `exists` sees what the target holds, the open transaction's own writes
///   included.
#[async_trait]
pub trait TransactionalTarget: Send {
    /// The target, for messages.
    fn name(&self) -> String;
    /// Reads the stream's checkpoint and stored epoch, then takes the target
    /// for `epoch` when the stored epoch is not higher.
    async fn open(&mut self, stream: &StreamInfo, epoch: u64) -> Result<StoredStream>;
    /// Begins a target transaction.
    async fn begin(&mut self) -> Result<()>;
    /// Applies `op` inside the open transaction.
    async fn apply(&mut self, op: &Op) -> Result<()>;
    /// Commits the open transaction with the checkpoint in it.
    async fn commit(&mut self, applied: Applied, complete: bool) -> Result<()>;
    /// Whether the target holds `key` (the open transaction seen).
    async fn exists(&mut self, key: &[u8]) -> Result<bool>;
    /// What `op` counts for against [`DriverOptions::ops_per_commit`]: 1,
    /// or more for an op that writes many records (a run of rows).
    fn weight(&self, _op: &Op) -> usize {
        1
    }
}

/// How a [`SinkDriver`] groups and waits.
#[derive(Debug, Clone, Copy)]
pub struct DriverOptions {
    /// Ops after which the target transaction commits, at the next end of
    /// a source transaction (each op counted by its
    /// [`TransactionalTarget::weight`]).
    pub ops_per_commit: usize,
    /// Ops held back at most, each waiting for a key named in its `deps`.
    pub dep_window: usize,
    /// Keys known to exist kept in memory at most (a cache in front of
    /// [`TransactionalTarget::exists`]).
    pub known_keys: usize,
    /// The migration attempt (G5); 0 for a restore.
    pub epoch: u64,
    /// The driver gets one lane of a stream split by its caller (which
    /// checked G1 on the whole stream): seqs must rise, with gaps.
    pub lane: bool,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            ops_per_commit: 1_000,
            dep_window: 10_000,
            known_keys: 100_000,
            epoch: 0,
            lane: false,
        }
    }
}

/// A [`Sink`] over a [`TransactionalTarget`]: see the module's
/// documentation.
pub struct SinkDriver<T> {
    target: T,
    options: DriverOptions,
    tracker: SeqTracker,
    /// A target transaction is open.
    in_transaction: bool,
    /// Ops applied in the open target transaction.
    ops_in_transaction: usize,
    /// The source transaction whose last op has not come yet.
    open_source_transaction: Option<u64>,
    /// The last op received, its source transaction whole: what a commit
    /// may record once nothing is held.
    through: Option<Applied>,
    /// What the target holds, as last committed.
    committed: Option<Applied>,
    /// Ops waiting for a dependency, in seq order.
    held: VecDeque<Op>,
    /// Keys the target holds, as far as this driver knows.
    known: HashSet<Vec<u8>>,
    /// An op with `deps` has come: from then on applied keys are
    /// remembered (before, [`TransactionalTarget::exists`] answers; a stream
    /// without deps, a database's rows, pays nothing per op).
    deps_seen: bool,
}

impl<T: TransactionalTarget> SinkDriver<T> {
    /// A driver applying onto `target`.
    pub fn new(target: T, options: DriverOptions) -> Self {
        Self {
            target,
            options,
            tracker: SeqTracker::new(),
            in_transaction: false,
            ops_in_transaction: 0,
            open_source_transaction: None,
            through: None,
            committed: None,
            held: VecDeque::new(),
            known: HashSet::new(),
            deps_seen: false,
        }
    }

    /// What the target holds of the stream, as last committed.
    pub fn applied(&self) -> Option<Applied> {
        self.committed
    }

    /// The target, for a test to look inside.
    pub fn target(&self) -> &T {
        &self.target
    }

    /// The target, for work outside the stream between two of its
    /// transactions (see [`Self::in_transaction`]): a PostgreSQL lane
    /// builds indexes in transactions of its own.
    pub fn target_mut(&mut self) -> &mut T {
        &mut self.target
    }

    /// True while a target transaction is open (begun, not committed).
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    fn remember(&mut self, key: &[u8]) {
        if self.known.len() >= self.options.known_keys {
            self.known.clear();
        }
        self.known.insert(key.to_vec());
    }

    /// The first of `op`'s deps the target does not hold.
    async fn missing_dep(&mut self, op: &Op) -> Result<Option<Vec<u8>>> {
        for dep in &op.deps {
            if self.known.contains(dep.as_ref()) {
                continue;
            }
            if self.target.exists(dep).await? {
                self.remember(dep);
                continue;
            }
            return Ok(Some(dep.to_vec()));
        }
        Ok(None)
    }

    async fn apply_now(&mut self, op: &Op) -> Result<()> {
        if !self.in_transaction {
            self.target.begin().await?;
            self.in_transaction = true;
            self.ops_in_transaction = 0;
        }
        self.target.apply(op).await?;
        self.ops_in_transaction += self.target.weight(op);
        if self.deps_seen {
            self.remember(&op.key);
        }
        Ok(())
    }

    /// Applies the held ops whose deps the target now holds, oldest first,
    /// again until none is released.
    async fn release_held(&mut self) -> Result<()> {
        loop {
            let mut released = false;
            let mut index = 0;
            while index < self.held.len() {
                let op = self.held[index].clone();
                let behind = self
                    .held
                    .iter()
                    .take(index)
                    .any(|earlier| earlier.key == op.key);
                if !behind && self.missing_dep(&op).await?.is_none() {
                    self.held.remove(index);
                    self.apply_now(&op).await?;
                    released = true;
                } else {
                    index += 1;
                }
            }
            if !released {
                return Ok(());
            }
        }
    }

    fn unmet(&self, op: &Op, dep: &[u8], why: &str) -> crate::Error {
        AdapterError::UnmetDependency {
            target_name: self.target.name(),
            seq: op.seq,
            key: String::from_utf8_lossy(&op.key).into_owned(),
            dep: String::from_utf8_lossy(dep).into_owned(),
            why: why.to_owned(),
        }
        .into()
    }

    /// Commits when the open target transaction may end here: between
    /// source transactions, nothing held.
    async fn commit_if_due(&mut self, force: bool, complete: bool) -> Result<()> {
        let boundary = self.open_source_transaction.is_none() && self.held.is_empty();
        let due = force || self.ops_in_transaction >= self.options.ops_per_commit;
        if !(boundary && due) {
            return Ok(());
        }
        let through = match self.through {
            Some(through) => through,
            // A stream (or a lane of one) that ends with nothing in: its
            // checkpoint still says it is complete.
            None if complete => Applied::default(),
            None => return Ok(()),
        };
        if !self.in_transaction {
            if self.committed == Some(through) && !complete {
                return Ok(());
            }
            self.target.begin().await?;
        }
        self.target.commit(through, complete).await?;
        self.in_transaction = false;
        self.ops_in_transaction = 0;
        self.committed = Some(through);
        Ok(())
    }
}

#[async_trait]
impl<T: TransactionalTarget> Sink for SinkDriver<T> {
    async fn begin(&mut self, stream: &StreamInfo) -> Result<Option<u64>> {
        let stored = self.target.open(stream, self.options.epoch).await?;
        if self.options.epoch < stored.epoch {
            return Err(AdapterError::StaleEpoch {
                target_name: self.target.name(),
                stored: stored.epoch,
                offered: self.options.epoch,
            }
            .into());
        }
        self.committed = stored.applied;
        self.through = stored.applied;
        let held_through = stored.applied.map_or(0, |applied| applied.through_seq);
        self.tracker = SeqTracker::starting_at(held_through + 1);
        Ok(stored.applied.map(|applied| applied.through_seq))
    }

    async fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        // G1 over the whole batch first: nothing of a broken batch applies.
        let mut tracker = self.tracker;
        for op in &ops {
            if self.options.lane && op.seq >= tracker.next_seq() {
                tracker = SeqTracker::starting_at(op.seq);
            }
            tracker
                .try_advance(op.seq)
                .map_err(|source| AdapterError::SourceOutOfOrder { source })?;
        }
        self.tracker = tracker;
        for op in ops {
            // G3: a source transaction ends with its `txn_last`; another
            // one starting first is a broken stream.
            match self.open_source_transaction {
                Some(open) if op.txn != open => {
                    return Err(AdapterError::BrokenTransaction {
                        target_name: self.target.name(),
                        seq: op.seq,
                        txn: open,
                    }
                    .into());
                }
                None if op.txn != 0 && !op.txn_last => {
                    self.open_source_transaction = Some(op.txn);
                }
                _ => {}
            }
            if op.txn_last {
                self.open_source_transaction = None;
            }
            self.deps_seen |= !op.deps.is_empty();
            let (seq, position) = (op.seq, op.position);
            // An op of a key an earlier op still waits for waits too: each
            // key's ops keep their order.
            let behind_held = self.held.iter().any(|held| held.key == op.key);
            let missing = match self.missing_dep(&op).await? {
                None if behind_held => Some(op.key.to_vec()),
                missing => missing,
            };
            match missing {
                Some(dep) => {
                    if self.held.len() >= self.options.dep_window {
                        let oldest = self.held.front().cloned().unwrap_or(op);
                        let waited = self.missing_dep(&oldest).await?.unwrap_or(dep);
                        return Err(self.unmet(
                            &oldest,
                            &waited,
                            &format!("no op of the next {} created it", self.options.dep_window),
                        ));
                    }
                    self.held.push_back(op);
                }
                None => {
                    self.apply_now(&op).await?;
                    if !self.held.is_empty() {
                        self.release_held().await?;
                    }
                }
            }
            if self.open_source_transaction.is_none() {
                self.through = Some(Applied {
                    through_seq: seq,
                    through_position: Position(position),
                });
            }
            self.commit_if_due(false, false).await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        self.finish_stream().await
    }
}

impl<T: TransactionalTarget> SinkDriver<T> {
    /// Commits what is applied, when the stream is between source
    /// transactions and nothing is held (a lane's caller lines its lanes up
    /// with it before an op that needs all of them).
    pub async fn commit_now(&mut self) -> Result<()> {
        self.commit_if_due(true, false).await
    }

    /// [`Sink::finish`] without the box.
    pub async fn finish_stream(&mut self) -> Result<()> {
        if let Some(op) = self.held.front().cloned() {
            let dep = self.missing_dep(&op).await?.unwrap_or_default();
            return Err(self.unmet(&op, &dep, "the stream ended without creating it"));
        }
        if let Some(txn) = self.open_source_transaction {
            return Err(AdapterError::BrokenTransaction {
                target_name: self.target.name(),
                seq: self.tracker.last_seq(),
                txn,
            }
            .into());
        }
        self.commit_if_due(true, true).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use super::*;
    use crate::ErrorClass;

    /// A transactional target in memory: committed state, the open
    /// transaction's writes, and a log of the calls.
    #[derive(Default)]
    struct Memory {
        committed: BTreeMap<Vec<u8>, Vec<u8>>,
        checkpoint: Option<(Applied, bool)>,
        epoch: u64,
        taken_epoch: u64,
        open: Option<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
        applied_keys: Vec<String>,
        commits: usize,
        /// The most ops one transaction held at once.
        largest_transaction: usize,
    }

    #[async_trait]
    impl TransactionalTarget for Memory {
        fn name(&self) -> String {
            "memory".to_owned()
        }

        async fn open(&mut self, _stream: &StreamInfo, epoch: u64) -> Result<StoredStream> {
            let stored = StoredStream {
                applied: self.checkpoint.map(|(applied, _)| applied),
                epoch: self.epoch,
            };
            if epoch >= self.epoch {
                self.epoch = epoch;
                self.taken_epoch = epoch;
            }
            Ok(stored)
        }

        async fn begin(&mut self) -> Result<()> {
            assert!(self.open.is_none(), "begin inside a transaction");
            self.open = Some(BTreeMap::new());
            Ok(())
        }

        async fn apply(&mut self, op: &Op) -> Result<()> {
            let open = self.open.as_mut().expect("apply outside a transaction");
            let value = (op.method.as_ref() == b"Put").then(|| op.body.to_vec());
            open.insert(op.key.to_vec(), value);
            self.largest_transaction = self.largest_transaction.max(open.len());
            self.applied_keys
                .push(String::from_utf8_lossy(&op.key).into_owned());
            Ok(())
        }

        async fn commit(&mut self, applied: Applied, complete: bool) -> Result<()> {
            let open = self.open.take().expect("commit outside a transaction");
            if self.epoch != self.taken_epoch {
                return Err(AdapterError::StaleEpoch {
                    target_name: self.name(),
                    stored: self.epoch,
                    offered: self.taken_epoch,
                }
                .into());
            }
            for (key, value) in open {
                match value {
                    Some(value) => self.committed.insert(key, value),
                    None => self.committed.remove(&key),
                };
            }
            self.checkpoint = Some((applied, complete));
            self.commits += 1;
            Ok(())
        }

        async fn exists(&mut self, key: &[u8]) -> Result<bool> {
            if let Some(Some(value)) = self.open.as_ref().map(|open| open.get(key)) {
                return Ok(value.is_some());
            }
            Ok(self.committed.contains_key(key))
        }
    }

    fn op(seq: u64, key: &str, deps: &[&str]) -> Op {
        Op {
            seq,
            position: seq,
            method: Bytes::from_static(b"Put"),
            key: Bytes::from(key.to_owned()),
            body: Bytes::from(format!("v{seq}")),
            deps: deps
                .iter()
                .map(|dep| Bytes::from(dep.to_string()))
                .collect(),
            ..Op::default()
        }
    }

    fn in_txn(mut ops: Vec<Op>, txn: u64) -> Vec<Op> {
        let last = ops.len() - 1;
        for (index, op) in ops.iter_mut().enumerate() {
            op.txn = txn;
            op.txn_last = index == last;
        }
        ops
    }

    fn driver(target: Memory, options: DriverOptions) -> SinkDriver<Memory> {
        SinkDriver::new(target, options)
    }

    async fn begun(target: Memory, options: DriverOptions) -> SinkDriver<Memory> {
        let mut driver = driver(target, options);
        driver
            .begin(&StreamInfo {
                stream_id: "s".to_owned(),
                ..StreamInfo::default()
            })
            .await
            .expect("begin");
        driver
    }

    #[tokio::test]
    async fn ops_in_reverse_dependency_order_wait_for_what_they_need() {
        // A model version needs its run, which needs its experiment: they
        // arrive the other way round.
        let mut sink = begun(Memory::default(), DriverOptions::default()).await;
        sink.apply(vec![
            op(1, "model/1", &["run/7"]),
            op(2, "run/7", &["experiment/3"]),
            op(3, "experiment/3", &[]),
            op(4, "unrelated", &[]),
        ])
        .await
        .expect("apply");
        assert_eq!(
            sink.target().applied_keys,
            ["experiment/3", "run/7", "model/1", "unrelated"]
        );
        Box::new(sink).finish().await.expect("finish");
    }

    #[tokio::test]
    async fn a_dependency_held_by_the_target_already_needs_no_wait() {
        let mut target = Memory::default();
        target
            .committed
            .insert(b"experiment/3".to_vec(), b"x".to_vec());
        let mut sink = begun(target, DriverOptions::default()).await;
        sink.apply(vec![op(1, "run/7", &["experiment/3"])])
            .await
            .expect("apply");
        assert_eq!(sink.target().applied_keys, ["run/7"]);
    }

    #[tokio::test]
    async fn an_unmet_dependency_at_the_end_names_the_op_and_the_key() {
        let mut sink = begun(Memory::default(), DriverOptions::default()).await;
        sink.apply(vec![
            op(1, "run/7", &["experiment/404"]),
            op(2, "other", &[]),
        ])
        .await
        .expect("held, not refused yet");
        let error = Box::new(sink).finish().await.expect_err("unmet");
        let text = error.to_string();
        assert!(text.contains("seq 1"), "{text}");
        assert!(text.contains("run/7"), "{text}");
        assert!(text.contains("experiment/404"), "{text}");
        assert_eq!(error.class(), ErrorClass::Invalid);
    }

    #[tokio::test]
    async fn the_wait_is_bounded_by_the_window() {
        let options = DriverOptions {
            dep_window: 2,
            ..DriverOptions::default()
        };
        let mut sink = begun(Memory::default(), options).await;
        let error = sink
            .apply(vec![
                op(1, "a", &["never"]),
                op(2, "b", &["never"]),
                op(3, "c", &["never"]),
            ])
            .await
            .expect_err("the window is full");
        let text = error.to_string();
        assert!(text.contains("seq 1") && text.contains("never"), "{text}");
        assert!(text.contains("next 2"), "{text}");
    }

    #[tokio::test]
    async fn a_held_op_keeps_the_checkpoint_before_it() {
        let options = DriverOptions {
            ops_per_commit: 1,
            ..DriverOptions::default()
        };
        let mut sink = begun(Memory::default(), options).await;
        sink.apply(vec![op(1, "a", &[]), op(2, "b", &["c"]), op(3, "x", &[])])
            .await
            .expect("apply");
        // Seq 1 committed alone; 2 waits, so nothing after it commits.
        assert_eq!(sink.applied().map(|applied| applied.through_seq), Some(1));
        sink.apply(vec![op(4, "c", &[])]).await.expect("apply");
        assert_eq!(sink.applied().map(|applied| applied.through_seq), Some(4));
        assert_eq!(sink.target().applied_keys, ["a", "x", "c", "b"]);
    }

    #[tokio::test]
    async fn a_later_op_of_a_held_key_waits_behind_it() {
        let mut sink = begun(Memory::default(), DriverOptions::default()).await;
        sink.apply(vec![
            op(1, "run/7", &["experiment/3"]),
            op(2, "run/7", &[]),
            op(3, "experiment/3", &[]),
        ])
        .await
        .expect("apply");
        assert_eq!(
            sink.target().applied_keys,
            ["experiment/3", "run/7", "run/7"]
        );
        Box::new(sink).finish().await.expect("finish");
    }

    #[tokio::test]
    async fn a_gap_is_refused_naming_the_seq_and_nothing_of_the_batch_applies() {
        let mut sink = begun(Memory::default(), DriverOptions::default()).await;
        let error = sink
            .apply(vec![op(1, "a", &[]), op(2, "b", &[]), op(4, "d", &[])])
            .await
            .expect_err("a gap");
        assert!(error.to_string().contains("seq 3 is missing"), "{error}");
        assert!(sink.target().applied_keys.is_empty());
    }

    #[tokio::test]
    async fn a_source_transaction_is_streamed_into_one_target_transaction() {
        let options = DriverOptions {
            ops_per_commit: 2,
            ..DriverOptions::default()
        };
        let mut sink = begun(Memory::default(), options).await;
        let big = in_txn(
            (1..=50)
                .map(|seq| op(seq, &format!("k{seq}"), &[]))
                .collect(),
            7,
        );
        // Across three batches, committed only at its end.
        sink.apply(big[..10].to_vec()).await.expect("apply");
        assert_eq!(sink.target().commits, 0);
        assert_eq!(sink.target().applied_keys.len(), 10, "streamed, not held");
        sink.apply(big[10..30].to_vec()).await.expect("apply");
        assert_eq!(sink.target().commits, 0);
        sink.apply(big[30..].to_vec()).await.expect("apply");
        assert_eq!(sink.target().commits, 1);
        assert_eq!(sink.target().largest_transaction, 50);
        assert_eq!(sink.applied().map(|applied| applied.through_seq), Some(50));
    }

    #[tokio::test]
    async fn a_killed_driver_resumes_after_its_checkpoint_with_nothing_twice() {
        let options = DriverOptions {
            ops_per_commit: 3,
            ..DriverOptions::default()
        };
        let ops: Vec<Op> = (1..=10)
            .map(|seq| op(seq, &format!("k{seq}"), &[]))
            .collect();
        let mut sink = begun(Memory::default(), options).await;
        sink.apply(ops[..7].to_vec()).await.expect("apply");
        // Killed: the open transaction (seq 7) is lost with it.
        let mut target = std::mem::take(&mut sink.target);
        target.open = None;
        assert_eq!(target.committed.len(), 6);
        let mut sink = driver(target, options);
        let held = sink
            .begin(&StreamInfo {
                stream_id: "s".to_owned(),
                ..StreamInfo::default()
            })
            .await
            .expect("begin");
        assert_eq!(held, Some(6));
        sink.apply(ops[6..].to_vec()).await.expect("apply the rest");
        Box::new(sink).finish().await.expect("finish");
    }

    #[tokio::test]
    async fn an_older_epoch_is_refused_and_a_superseded_one_commits_nothing() {
        let target = Memory {
            epoch: 5,
            ..Memory::default()
        };
        let mut older = driver(
            target,
            DriverOptions {
                epoch: 4,
                ..DriverOptions::default()
            },
        );
        let error = older
            .begin(&StreamInfo::default())
            .await
            .expect_err("stale");
        assert_eq!(error.class(), ErrorClass::Precondition);
        assert!(error.to_string().contains("(epoch) 5"), "{error}");

        let options = DriverOptions {
            epoch: 6,
            ops_per_commit: 1,
            ..DriverOptions::default()
        };
        let mut sink = begun(Memory::default(), options).await;
        sink.apply(vec![op(1, "a", &[])]).await.expect("apply");
        // A later attempt takes the target.
        sink.target.epoch = 7;
        let error = sink
            .apply(vec![op(2, "b", &[])])
            .await
            .expect_err("superseded");
        assert_eq!(error.class(), ErrorClass::Precondition);
        assert!(!sink.target().committed.contains_key(b"b".as_slice()));
    }

    #[tokio::test]
    async fn a_transaction_left_open_by_another_is_a_broken_stream() {
        let mut sink = begun(Memory::default(), DriverOptions::default()).await;
        let mut first = op(1, "a", &[]);
        first.txn = 3;
        let mut second = op(2, "b", &[]);
        second.txn = 4;
        second.txn_last = true;
        let error = sink.apply(vec![first, second]).await.expect_err("broken");
        assert_eq!(error.class(), ErrorClass::Damaged);
        assert!(error.to_string().contains("seq 2"), "{error}");
    }
}

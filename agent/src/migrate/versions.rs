//! The version-migration chain in a live migration's relay
//! (`ferry migrate --live --migrations DIR --to-version V`), and how a
//! broken stream is resumed through it.
//!
//! The relay takes each batch from the source agent through the chain
//! before the target agent sees it. The chain numbers its outputs 1, 2, 3,
//! ... by itself: a dropped op leaves no gap and a split one takes several
//! seqs, so the target's checkpoint (`applied_through_seq`) counts the
//! chain's outputs, not the source's ops. A resume must ask the source for
//! a *source* seq, so the relay keeps the way back:
//!
//! - **Boundaries.** After each source transaction (a snapshot op, or a
//!   revision's group of ops while following: `txn == 0` or `txn_last`),
//!   the relay records a [`Boundary`]: the source seq and position of that
//!   op, and the last output seq the chain had handed on then. The chain
//!   holds no other state between ops (it is deterministic, and its plans
//!   depend on the ops alone), so a boundary is all it takes to put the
//!   chain back where it stood: its next seq is `through_seq + 1`.
//! - **Bounded.** Once the target acks seq A, every boundary before the
//!   last one at or below A is dropped: only the transactions in flight
//!   keep one, and the relay stops reading from the source while more than
//!   [`MAX_BOUNDARIES`] are in flight, until acks catch up.
//! - **Resume.** The target tells its checkpoint T, read once the target
//!   agent has ended the broken session's Apply stream (it may still be
//!   applying batches it took in; a T that moves on after it was read would
//!   be past the boundaries kept). The relay takes the last boundary B with
//!   `through_seq <= T`: every source op through B's seq has all its
//!   outputs in the target (a transaction dropped whole counts too). The
//!   source is asked to resume after B (`from_seq_exclusive`,
//!   `from_position_exclusive`), the chain is set to number from
//!   `B.through_seq + 1`, and outputs at or below T are not sent again.
//! - **A checkpoint inside one source op's outputs.** The etcd sink applies
//!   a transaction whole in one Txn (G3), and the chain keeps `txn` on every
//!   output, so while following (every op belongs to its revision's
//!   transaction) T always falls on a boundary. In the snapshot, each op is
//!   a transaction of its own, so the outputs of an op the chain split may
//!   sit in two Txns and T may fall between them. The source reads a resumed
//!   snapshot again at R with the same seqs and the same ops, and the chain
//!   gives the same outputs with the same seqs, so the relay resumes after
//!   the boundary before that op and skips the outputs at or below T. After
//!   the snapshot, the source re-announces leases on a resume, so the ops of
//!   a revision read again may differ; a checkpoint inside one there cannot
//!   happen (see above) and is refused rather than guessed at.
//! - **Positions** pass through the chain unchanged (a filter cannot set
//!   one), so the target's `applied_through_position` and the cutover's
//!   drain to the fenced position compare source positions as before. The
//!   seqs of the source's progress reports are mapped to output seqs the
//!   same way, so "the target applied everything through F" still means it.

use std::collections::VecDeque;

use ferry_engine::Op;
use ferry_engine::adapters::digest::SetDigest;
use ferry_engine::adapters::live::DigestEntry;
use ferry_engine::migrations::chain::{Chain, KeyCheck};
use ferry_engine::migrations::{MigrationError, off_the_runtime, printable};
use ferry_proto::v1::ExtractRequest;
use ferry_proto::v1::extract_response::Event;

use super::error::{MigrateError, call_error};
use crate::client::SourceClient;

/// Source transactions in flight (sent, not yet acked) at most; past it the
/// relay waits for acks before it reads more from the source.
pub(crate) const MAX_BOUNDARIES: usize = 1 << 20;

/// Where the chain stood after one source transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Boundary {
    /// The transaction's last source seq.
    source_seq: u64,
    /// Its source position.
    position: u64,
    /// The last seq the chain had handed on after it.
    through_seq: u64,
}

/// Where to ask the source to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResumePoint {
    /// The source holds every op through this source seq in the target.
    pub from_seq_exclusive: u64,
    /// And every change through this source position.
    pub from_position_exclusive: u64,
    /// The target's checkpoint is past that boundary (inside the outputs
    /// of the snapshot op after it): outputs it holds are not sent again.
    pub inside_op: bool,
}

/// The chain of a live migration, with the way back from output seqs to
/// source seqs for as long as the target may not hold them.
pub(crate) struct RelayChain {
    chain: Chain,
    /// Every target key the stream's ops took, and the source key each came
    /// from: a second source key landing on one stops the relay before the
    /// target sees it.
    check: KeyCheck,
    /// Oldest first; the front is the last boundary at or below the
    /// target's last ack.
    boundaries: VecDeque<Boundary>,
    /// The last source op taken.
    last_source_seq: u64,
    /// The source seq the snapshot ends at, once the source said.
    source_snapshot_through_seq: Option<u64>,
    /// Outputs at or below this seq are in the target already.
    skip_through_seq: u64,
    /// The highest output seq ever handed on (a resume numbers again from
    /// below it).
    sent_through_seq: u64,
}

impl RelayChain {
    /// A relay chain at the start of a stream.
    pub(crate) fn new(chain: Chain) -> Self {
        let mut relay = Self {
            chain,
            check: KeyCheck::new(),
            boundaries: VecDeque::new(),
            last_source_seq: 0,
            source_snapshot_through_seq: None,
            skip_through_seq: 0,
            sent_through_seq: 0,
        };
        relay.restart();
        relay
    }

    /// Starts over, for a new stream (its seqs start at 1 again).
    pub(crate) fn restart(&mut self) {
        self.chain.set_next_seq(1);
        self.check = KeyCheck::new();
        self.boundaries = VecDeque::from([Boundary {
            source_seq: 0,
            position: 0,
            through_seq: 0,
        }]);
        self.last_source_seq = 0;
        self.source_snapshot_through_seq = None;
        self.skip_through_seq = 0;
        self.sent_through_seq = 0;
    }

    /// Source transactions whose outputs the target may not hold yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.boundaries.len() - 1
    }

    /// The last output seq handed on.
    fn through_seq(&self) -> u64 {
        self.chain.next_seq() - 1
    }

    /// Forgets the boundaries the target is past: it acked `applied_seq`.
    pub(crate) fn acked(&mut self, applied_seq: u64) {
        while self
            .boundaries
            .get(1)
            .is_some_and(|next| next.through_seq <= applied_seq)
        {
            self.boundaries.pop_front();
        }
    }

    /// Takes a batch from the source through the chain, one source
    /// transaction at a time, recording a boundary after each; returns the
    /// outputs the target does not hold yet.
    pub(crate) fn transform(&mut self, batch: Vec<Op>) -> Result<Vec<Op>, MigrationError> {
        let mut out = Vec::with_capacity(batch.len());
        let mut group = Vec::new();
        for op in batch {
            let ends = op.txn == 0 || op.txn_last;
            let (source_seq, position) = (op.seq, op.position);
            group.push(op);
            if ends {
                out.extend(
                    self.chain
                        .transform_batch_checked(std::mem::take(&mut group), &mut self.check)?,
                );
                self.last_source_seq = source_seq;
                self.boundaries.push_back(Boundary {
                    source_seq,
                    position,
                    through_seq: self.through_seq(),
                });
            }
        }
        if let Some(last) = group.last() {
            // A batch that ends inside a transaction (the source agent never
            // sends one): no boundary until it ends.
            self.last_source_seq = last.seq;
            out.extend(self.chain.transform_batch_checked(group, &mut self.check)?);
        }
        out.retain(|op| op.seq > self.skip_through_seq);
        self.sent_through_seq = self.sent_through_seq.max(self.through_seq());
        Ok(out)
    }

    /// The source's snapshot ended at source seq `source_through_seq`;
    /// returns the output seq it ended at.
    pub(crate) fn snapshot_complete(&mut self, source_through_seq: u64) -> u64 {
        self.source_snapshot_through_seq = Some(source_through_seq);
        self.output_seq_through(source_through_seq)
    }

    /// The source seq the snapshot ends at, for a resume request.
    pub(crate) fn source_snapshot_through_seq(&self) -> Option<u64> {
        self.source_snapshot_through_seq
    }

    /// The output seq through which the outputs of the source ops through
    /// `source_seq` go (a progress report's `through_seq`, mapped).
    pub(crate) fn output_seq_through(&self, source_seq: u64) -> u64 {
        if source_seq >= self.last_source_seq {
            return self.through_seq();
        }
        // Reports name the last op sent, so this is only an old one: the
        // last boundary at or below it (or the oldest one kept, which the
        // target holds already).
        let index = self
            .boundaries
            .partition_point(|boundary| boundary.source_seq <= source_seq);
        self.boundaries
            .get(index.saturating_sub(1))
            .map_or(0, |boundary| boundary.through_seq)
    }

    /// Sets the chain to go on after the target's checkpoint `target_seq`
    /// (an output seq) and says where the source is to resume.
    pub(crate) fn resume(&mut self, target_seq: u64) -> Result<ResumePoint, String> {
        let index = self
            .boundaries
            .partition_point(|boundary| boundary.through_seq <= target_seq);
        let Some(at) = index.checked_sub(1) else {
            return Err(format!(
                "the target's checkpoint (seq {target_seq}) is behind what it acked (seq {}); the target lost applied ops",
                self.boundaries
                    .front()
                    .map_or(0, |boundary| boundary.through_seq)
            ));
        };
        let boundary = self.boundaries[at];
        if target_seq > boundary.through_seq {
            // Inside the outputs of the source op after the boundary.
            let in_snapshot = self
                .source_snapshot_through_seq
                .is_none_or(|through| boundary.source_seq < through);
            if !in_snapshot {
                return Err(format!(
                    "the target's checkpoint (seq {target_seq}) falls inside the outputs of the source transaction after source seq {}, past the snapshot, where a resume cannot reproduce them; start a new migration",
                    boundary.source_seq
                ));
            }
        }
        if target_seq > self.sent_through_seq {
            return Err(format!(
                "the target's checkpoint (seq {target_seq}) is past every op sent (seq {}): another stream wrote it",
                self.sent_through_seq
            ));
        }
        self.boundaries.truncate(at + 1);
        self.chain.set_next_seq(boundary.through_seq + 1);
        self.last_source_seq = boundary.source_seq;
        self.skip_through_seq = target_seq;
        Ok(ResumePoint {
            from_seq_exclusive: boundary.source_seq,
            from_position_exclusive: boundary.position,
            inside_op: target_seq > boundary.through_seq,
        })
    }
}

/// What the check before a live migration through a chain read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prechecked {
    /// The source position the snapshot was read at.
    pub position: u64,
    /// Source ops read.
    pub source_ops: u64,
    /// Ops the chain made of them.
    pub outputs: u64,
}

/// Reads a snapshot of the source once through the chain and writes
/// nothing, as a restore with `--migrations` reads its backup first: a
/// filter error, an output that is not an op, or two source keys landing on
/// one key (Mystic's `Foo` and `FOO`) stops the migration before anything
/// is held, fenced or written. With `verify` (the target adapter's
/// [`DigestEntry`]), so does an output that `--verify` could not compare at
/// step 7 (see [`counted_in_the_digest`]).
/// Memory grows with the number of keys, as the restore's check does (16
/// bytes and the source key each).
///
/// Keys created after this snapshot are checked by the relay itself, which
/// stops before the target sees the second key.
pub(crate) async fn precheck(
    source: &mut SourceClient,
    chain: Chain,
    key_prefix: &[u8],
    verify: Option<fn(&Op) -> DigestEntry<'_>>,
    epoch: u64,
) -> Result<(Chain, Prechecked), MigrateError> {
    let counted = (KeyCheck::new(), 0u64, 0u64);
    let prefix = key_prefix.to_vec();
    let read = through_chain(
        source,
        chain,
        key_prefix,
        epoch,
        "check",
        counted,
        move |chain, (check, source_ops, outputs), batch| {
            *source_ops += batch.len() as u64;
            each_op_through(chain, batch, Some(check), |source, made| {
                if let Some(entry) = verify {
                    for output in made {
                        counted_in_the_digest(source, output, entry, &prefix)?;
                    }
                }
                *outputs += made.len() as u64;
                Ok(())
            })
        },
    )
    .await?;
    let (_, source_ops, outputs) = read.state;
    Ok((
        read.chain,
        Prechecked {
            position: read.position,
            source_ops,
            outputs,
        },
    ))
}

/// The chain's image of a source snapshot, summed up in a [`SetDigest`]:
/// what the new plane must hold once it has applied through the snapshot's
/// position (`--verify` through a version chain). `entry` is the target
/// adapter's word on what an op counts as in its digest, and every output
/// must count ([`counted_in_the_digest`]). Memory stays flat: the digest
/// does not depend on order.
pub(crate) async fn image_digest(
    source: &mut SourceClient,
    chain: Chain,
    key_prefix: &[u8],
    epoch: u64,
    entry: fn(&Op) -> DigestEntry<'_>,
) -> Result<(u64, SetDigest), MigrateError> {
    let prefix = key_prefix.to_vec();
    let read = through_chain(
        source,
        chain,
        key_prefix,
        epoch,
        "digest",
        SetDigest::default(),
        move |chain, digest, batch| {
            each_op_through(chain, batch, None, |source, made| {
                for output in made {
                    if let DigestEntry::Entry { key, value } =
                        counted_in_the_digest(source, output, entry, &prefix)?
                    {
                        digest.add(key, value);
                    }
                }
                Ok(())
            })
        },
    )
    .await?;
    Ok((read.position, read.state))
}

/// The seq and key of a source op, for messages about what a chain made of
/// it.
struct SourceOp {
    seq: u64,
    key: Vec<u8>,
}

/// Takes `batch` through `chain` one op at a time (recorded in `check`
/// when given) and hands each source op with what the chain made of it to
/// `each`.
fn each_op_through(
    chain: &mut Chain,
    batch: Vec<Op>,
    mut check: Option<&mut KeyCheck>,
    mut each: impl FnMut(&SourceOp, &[Op]) -> Result<(), MigrateError>,
) -> Result<(), MigrateError> {
    for op in batch {
        let source = SourceOp {
            seq: op.seq,
            key: op.key.to_vec(),
        };
        let made = match check.as_deref_mut() {
            Some(check) => chain.transform_batch_checked(vec![op], check),
            None => chain.transform_batch(vec![op]),
        }
        .map_err(MigrateError::Chain)?;
        each(&source, &made)?;
    }
    Ok(())
}

/// What an output of the chain counts as in `--verify`'s digest of the new
/// plane (never `Unverifiable`): what the target adapter says (`entry`: an etcd lease nothing, a
/// Put its key and value), as long as it stays under `key_prefix`; an
/// output the adapter cannot compare (a Delete, another method) or a key
/// the chain moves out of the prefix digested cannot be verified.
fn counted_in_the_digest<'a>(
    source: &SourceOp,
    output: &'a Op,
    entry: fn(&Op) -> DigestEntry<'_>,
    key_prefix: &[u8],
) -> Result<DigestEntry<'a>, MigrateError> {
    let what = match entry(output) {
        DigestEntry::Uncounted => return Ok(DigestEntry::Uncounted),
        counted @ DigestEntry::Entry { key, .. } if key.starts_with(key_prefix) => {
            return Ok(counted);
        }
        DigestEntry::Entry { key, .. } => format!("moved to {}", printable(key)),
        DigestEntry::Unverifiable => format!(
            "as a {} {}",
            String::from_utf8_lossy(&output.kind),
            String::from_utf8_lossy(&output.method)
        ),
    };
    Err(MigrateError::Chain(MigrationError::Unverifiable {
        what,
        seq: source.seq,
        key: printable(&source.key),
        key_prefix: printable(key_prefix),
    }))
}

/// What [`through_chain`] hands back.
struct ReadThrough<S> {
    chain: Chain,
    state: S,
    /// The source position the snapshot was read at.
    position: u64,
}

/// Reads a snapshot of the source (`follow: false`) and hands each batch,
/// with the chain and `state`, to `work` on tokio's blocking pool (the
/// chain's filters are CPU work). The chain numbers from 1 before and
/// after.
async fn through_chain<S, W>(
    source: &mut SourceClient,
    mut chain: Chain,
    key_prefix: &[u8],
    epoch: u64,
    purpose: &str,
    state: S,
    work: W,
) -> Result<ReadThrough<S>, MigrateError>
where
    S: Send + 'static,
    W: Fn(&mut Chain, &mut S, Vec<Op>) -> Result<(), MigrateError> + Send + Sync + Clone + 'static,
{
    let failed = |action: &str, status: tonic::Status| {
        call_error(
            "the source agent",
            &format!("{action} for the version chain's {purpose}"),
            status,
        )
    };
    let mut extract = source
        .extract(ExtractRequest {
            follow: false,
            epoch,
            key_prefix: key_prefix.to_vec().into(),
            ..ExtractRequest::default()
        })
        .await
        .map_err(|status| failed("open a snapshot", status))?
        .into_inner();
    chain.set_next_seq(1);
    let mut reading = (chain, state);
    let mut position = 0;
    loop {
        let message = extract
            .message()
            .await
            .map_err(|status| failed("read the snapshot", status))?;
        let Some(message) = message else {
            return Err(MigrateError::Invalid(
                "the source agent ended its snapshot before it said it was complete".to_owned(),
            ));
        };
        match message.event {
            Some(Event::Start(start)) => position = start.snapshot_position,
            Some(Event::Batch(batch)) => {
                let work = work.clone();
                let (read, done) =
                    off_the_runtime(reading, move |(chain, state)| work(chain, state, batch.ops))
                        .await;
                reading = read;
                done?;
                if batch.end_of_stream {
                    break;
                }
            }
            Some(Event::SnapshotComplete(_)) => break,
            Some(Event::Progress(_)) | None => {}
        }
    }
    let (mut chain, state) = reading;
    chain.set_next_seq(1);
    Ok(ReadThrough {
        chain,
        state,
        position,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ferry_engine::migrations::jq::{JqFilter, JqMigration, OpMatch};
    use ferry_engine::migrations::profile::Profile;

    use super::*;

    /// v1 -> v2: `/drop/...` keys are dropped, `/split/X` becomes `/split/X`
    /// and `/split/X/copy`, everything else passes.
    fn chain() -> Chain {
        let mut profile = Profile::new("test", vec!["v1".to_owned(), "v2".to_owned()]);
        profile
            .add_migration(Arc::new(JqMigration {
                id: "1_reshape".to_owned(),
                from: "v1".to_owned(),
                to: "v2".to_owned(),
                op_match: OpMatch::default(),
                op_match_down: None,
                up: JqFilter::compile(
                    r#"if (.key | startswith("/drop/")) then empty
                       elif (.key | startswith("/split/")) then (., (.key += "/copy"))
                       else . end"#,
                )
                .expect("compiles"),
                down: None,
            }))
            .expect("adds");
        Chain::new(profile, "v1", "v2").expect("plans")
    }

    fn op(seq: u64, key: &str, position: u64, txn: u64, txn_last: bool) -> Op {
        Op {
            seq,
            position,
            txn,
            txn_last,
            kind: "etcd.kv".into(),
            key: key.as_bytes().to_vec().into(),
            method: "Put".into(),
            body: "{}".into(),
            ..Op::default()
        }
    }

    /// A snapshot at position 10 (seqs 1..=5), then revisions 11 and 12.
    fn stream() -> Vec<Vec<Op>> {
        vec![
            vec![
                op(1, "/a", 10, 0, true),
                op(2, "/drop/b", 10, 0, true),
                op(3, "/split/c", 10, 0, true),
            ],
            vec![op(4, "/d", 10, 0, true), op(5, "/split/e", 10, 0, true)],
            vec![
                op(6, "/f", 11, 11, false),
                op(7, "/drop/g", 11, 11, true),
                op(8, "/drop/h", 12, 12, true),
                op(9, "/i", 13, 13, true),
            ],
        ]
    }

    fn keys(ops: &[Op]) -> Vec<(u64, String)> {
        ops.iter()
            .map(|op| (op.seq, String::from_utf8_lossy(&op.key).into_owned()))
            .collect()
    }

    /// Everything an unbroken run hands on.
    fn unbroken() -> Vec<(u64, String)> {
        let mut relay = RelayChain::new(chain());
        let mut all = Vec::new();
        for batch in stream() {
            all.extend(keys(&relay.transform(batch).expect("transforms")));
        }
        all
    }

    /// The source's ops after `from_seq_exclusive`, as a resumed source
    /// sends them.
    fn source_after(from_seq_exclusive: u64) -> Vec<Op> {
        stream()
            .into_iter()
            .flatten()
            .filter(|op| op.seq > from_seq_exclusive)
            .collect()
    }

    #[test]
    fn an_unbroken_stream_is_numbered_without_gaps() {
        let all = unbroken();
        let seqs: Vec<u64> = all.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
        assert_eq!(all[2].1, "/split/c/copy");
    }

    #[test]
    fn every_checkpoint_resumes_to_the_same_outputs_once() {
        let all = unbroken();
        // The sink may stop after any output in the snapshot (each op its
        // own transaction) and after any revision's group while following.
        let checkpoints = [0, 1, 2, 3, 4, 5, 6, 7, 8];
        for target_seq in checkpoints {
            let mut relay = RelayChain::new(chain());
            let mut sent = Vec::new();
            for batch in stream() {
                sent.extend(relay.transform(batch).expect("transforms"));
            }
            let resume = relay
                .resume(target_seq)
                .unwrap_or_else(|error| panic!("resume at {target_seq}: {error}"));
            let resent = relay
                .transform(source_after(resume.from_seq_exclusive))
                .expect("transforms");
            let mut target: Vec<(u64, String)> = all
                .iter()
                .filter(|(seq, _)| *seq <= target_seq)
                .cloned()
                .collect();
            target.extend(keys(&resent));
            assert_eq!(target, all, "resumed at target seq {target_seq}");
        }
    }

    #[test]
    fn a_resume_inside_a_split_snapshot_op_skips_what_the_target_holds() {
        let mut relay = RelayChain::new(chain());
        relay.transform(stream()[0].clone()).expect("transforms");
        // Outputs: 1 /a, 2 /split/c, 3 /split/c/copy; the target holds 2.
        let resume = relay.resume(2).expect("resumes");
        assert_eq!(resume.from_seq_exclusive, 2, "after /drop/b");
        assert!(resume.inside_op);
        // Broken again before the op came back: the same resume.
        assert_eq!(relay.resume(2).expect("resumes again"), resume);
        let resent = relay
            .transform(source_after(2)[..1].to_vec())
            .expect("transforms");
        assert_eq!(keys(&resent), [(3, "/split/c/copy".to_owned())]);
        let error = relay.resume(4).expect_err("never sent");
        assert!(error.contains("past every op sent"), "{error}");
    }

    #[test]
    fn a_resume_inside_a_revision_past_the_snapshot_is_refused() {
        let mut relay = RelayChain::new(chain());
        for batch in stream() {
            relay.transform(batch).expect("transforms");
        }
        relay.snapshot_complete(5);
        // Make a revision of two outputs: /split/x at 14.
        relay
            .transform(vec![op(10, "/split/x", 14, 14, true)])
            .expect("transforms");
        let error = relay.resume(9).expect_err("inside revision 14's outputs");
        assert!(error.contains("inside"), "{error}");
        let resume = relay.resume(10).expect("on the boundary");
        assert_eq!(
            resume,
            ResumePoint {
                from_seq_exclusive: 10,
                from_position_exclusive: 14,
                inside_op: false,
            }
        );
    }

    #[test]
    fn dropped_revisions_resume_after_them_and_acks_bound_the_boundaries() {
        let mut relay = RelayChain::new(chain());
        for batch in stream() {
            relay.transform(batch).expect("transforms");
        }
        relay.snapshot_complete(5);
        assert_eq!(relay.in_flight(), 8);
        assert_eq!(relay.output_seq_through(9), 8);
        assert_eq!(relay.output_seq_through(8), 7, "revision 12 was dropped");
        relay.acked(7);
        assert_eq!(relay.in_flight(), 1, "only revision 13 is in flight");
        // Output 7 (/f) ends revision 11; revision 12 was dropped whole.
        let resume = relay.resume(7).expect("resumes");
        assert_eq!(
            resume,
            ResumePoint {
                from_seq_exclusive: 8,
                from_position_exclusive: 12,
                inside_op: false,
            }
        );
        let resent = relay.transform(source_after(8)).expect("transforms");
        assert_eq!(keys(&resent), [(8, "/i".to_owned())]);
        let error = relay.resume(3).expect_err("behind the acks");
        assert!(error.contains("behind"), "{error}");
    }
}

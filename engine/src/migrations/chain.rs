//! The chain: from version v to version w one step at a time, planned in
//! full before any op moves, then applied to batches of ops in flight.
//!
//! - Up (w newer than v): for each pair of adjacent versions, the
//!   migrations between them in id order, each `up`.
//! - Down (w older): the same migrations in reverse, each `down`; one
//!   without a `down` filter refuses the whole chain up front.
//! - A pair of adjacent versions with no migration is a hole: refused up
//!   front, naming the pair.
//!
//! Ops come out with `platform_version` = w. The chain numbers the ops it
//! hands on 1, 2, 3, ... (ops dropped by a filter leave no gap, ops split
//! into several take several seqs), deterministically, so a restore that
//! resumes numbers them as the first run did. A transaction keeps its
//! `txn` and still ends with `txn_last`, even when its last op is dropped.
//!
//! A batch is transformed whole before any of it is handed on: an error in
//! any op stops the batch before the sink sees it. [`KeyCheck`] goes
//! further, over a whole stream read once before anything is written: two
//! source keys that end up at the same key are reported first.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::profile::Profile;
use super::{Direction, Migration, MigrationError, printable};
use crate::Op;

/// One migration, run one way.
#[derive(Clone)]
pub struct Step {
    /// The migration.
    pub migration: Arc<dyn Migration>,
    /// Which way.
    pub direction: Direction,
    /// The version ops are in before the step.
    pub from: String,
    /// The version ops are in after it.
    pub to: String,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{} {} ({} -> {})",
            self.migration.id(),
            self.direction,
            self.from,
            self.to
        )
    }
}

/// Every step from one version to another.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The profile's platform.
    pub platform: String,
    /// Where the ops start.
    pub from: String,
    /// Where they end.
    pub to: String,
    /// The steps, in order; empty when `from` is `to`.
    pub steps: Vec<Step>,
}

/// Plans the chain from `from` to `to`: refuses unknown versions, holes,
/// and down steps without a `down` filter, before anything runs.
pub fn plan(profile: &Profile, from: &str, to: &str) -> Result<Plan, MigrationError> {
    let start = profile.version_index(from)?;
    let end = profile.version_index(to)?;
    let mut steps = Vec::new();
    let hole = |lower: &str, upper: &str| MigrationError::Hole {
        platform: profile.platform.clone(),
        from: lower.to_owned(),
        to: upper.to_owned(),
        chain_from: from.to_owned(),
        chain_to: to.to_owned(),
    };
    if end > start {
        for index in start..end {
            let (lower, upper) = (&profile.versions[index], &profile.versions[index + 1]);
            let migrations = profile.migrations_between(lower, upper);
            if migrations.is_empty() {
                return Err(hole(lower, upper));
            }
            steps.extend(migrations.into_iter().map(|migration| Step {
                migration,
                direction: Direction::Up,
                from: lower.clone(),
                to: upper.clone(),
            }));
        }
    } else {
        for index in (end..start).rev() {
            let (lower, upper) = (&profile.versions[index], &profile.versions[index + 1]);
            let migrations = profile.migrations_between(lower, upper);
            if migrations.is_empty() {
                return Err(hole(upper, lower));
            }
            for migration in migrations.into_iter().rev() {
                if !migration.has_down() {
                    return Err(MigrationError::NoDown {
                        id: migration.id().to_owned(),
                        from: lower.clone(),
                        to: upper.clone(),
                    });
                }
                steps.push(Step {
                    migration,
                    direction: Direction::Down,
                    from: upper.clone(),
                    to: lower.clone(),
                });
            }
        }
    }
    Ok(Plan {
        platform: profile.platform.clone(),
        from: from.to_owned(),
        to: to.to_owned(),
        steps,
    })
}

/// Runs `steps` on one op: every op it becomes, in the last step's version.
///
/// A run of PostgreSQL rows as COPY text (`pg.rows`) is refused by any
/// step: its rows are out of every filter's sight (filters read rows as
/// JSON objects), so a migration that changes rows would pass them by
/// unchanged, whatever its match says.
pub fn run_steps(steps: &[Step], op: Op) -> Result<Vec<Op>, MigrationError> {
    if let Some(step) = steps.first()
        && op.kind.as_ref() == crate::adapters::postgres::KIND_ROWS.as_bytes()
    {
        return Err(MigrationError::Transform {
            id: step.migration.id().to_owned(),
            direction: step.direction,
            seq: op.seq,
            key: super::printable(&op.key),
            reason: "it carries PostgreSQL rows as COPY text (ferry extract --row-format copy), which no filter can read: extract again with --row-format json (the default) to restore through a version chain".to_owned(),
            filter: step.migration.describe(step.direction),
        });
    }
    let mut current = vec![op];
    for step in steps {
        let mut next = Vec::with_capacity(current.len());
        let version = Bytes::copy_from_slice(step.to.as_bytes());
        for op in current {
            let outputs = if step.migration.matches(step.direction, &op) {
                step.migration.apply(step.direction, op)?
            } else {
                vec![op]
            };
            next.extend(outputs.into_iter().map(|mut output| {
                output.platform_version = version.clone();
                output
            }));
        }
        current = next;
    }
    Ok(current)
}

/// A planned chain applied to a stream of batches.
pub struct Chain {
    profile: Profile,
    plan: Plan,
    /// Plans for ops that name another version of the profile than the
    /// stream's, made on first sight.
    other_plans: HashMap<Bytes, Plan>,
    to_version: Bytes,
    next_seq: u64,
}

impl Chain {
    /// A chain from `from` to `to` in `profile`, planned now.
    pub fn new(profile: Profile, from: &str, to: &str) -> Result<Self, MigrationError> {
        let plan = plan(&profile, from, to)?;
        Ok(Self {
            profile,
            to_version: Bytes::copy_from_slice(to.as_bytes()),
            plan,
            other_plans: HashMap::new(),
            next_seq: 1,
        })
    }

    /// The plan of the stream's version.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The seq the next op handed on gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Numbers the next op handed on `seq`: a stream resumed after a point
    /// whose outputs ended at `seq - 1` goes on as the first run did (the
    /// chain keeps no other state between ops).
    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq.max(1);
    }

    /// The steps for `op`: the stream's plan, or one from the op's own
    /// version when it names another version of the profile.
    fn steps_for(&mut self, op: &Op) -> Result<&[Step], MigrationError> {
        let own = &op.platform_version;
        let other = !own.is_empty()
            && own.as_ref() != self.plan.from.as_bytes()
            && std::str::from_utf8(own)
                .ok()
                .is_some_and(|version| self.profile.versions.iter().any(|known| known == version));
        if !other {
            return Ok(&self.plan.steps);
        }
        if !self.other_plans.contains_key(own) {
            let from = String::from_utf8_lossy(own).into_owned();
            let planned = plan(&self.profile, &from, &self.plan.to)?;
            self.other_plans.insert(own.clone(), planned);
        }
        Ok(&self.other_plans[own].steps)
    }

    /// Transforms one op: the ops it becomes, numbered, in the target
    /// version. Nothing is numbered when it fails.
    pub fn transform_op(&mut self, op: Op) -> Result<Vec<Op>, MigrationError> {
        let steps = self.steps_for(&op)?.to_vec();
        let (txn, txn_last) = (op.txn, op.txn_last);
        let mut outputs = run_steps(&steps, op)?;
        let count = outputs.len();
        for (index, output) in outputs.iter_mut().enumerate() {
            output.platform_version = self.to_version.clone();
            output.txn = txn;
            output.txn_last = if txn == 0 {
                true
            } else {
                txn_last && index + 1 == count
            };
        }
        Ok(outputs)
    }

    /// Transforms a whole batch before any of it is handed on; on an error,
    /// nothing of the batch is.
    pub fn transform_batch(&mut self, batch: Vec<Op>) -> Result<Vec<Op>, MigrationError> {
        self.transform_batch_with(batch, None)
    }

    /// As [`Chain::transform_batch`], and each op's outputs are recorded in
    /// `check` as they are made: two source keys landing on one key fail
    /// the batch before any of it is handed on.
    pub fn transform_batch_checked(
        &mut self,
        batch: Vec<Op>,
        check: &mut KeyCheck,
    ) -> Result<Vec<Op>, MigrationError> {
        self.transform_batch_with(batch, Some(check))
    }

    fn transform_batch_with(
        &mut self,
        batch: Vec<Op>,
        mut check: Option<&mut KeyCheck>,
    ) -> Result<Vec<Op>, MigrationError> {
        let mut out: Vec<Op> = Vec::with_capacity(batch.len());
        for op in batch {
            let (txn, txn_last) = (op.txn, op.txn_last);
            let source = check.is_some().then(|| op.clone());
            let outputs = self.transform_op(op)?;
            if let (Some(check), Some(source)) = (check.as_deref_mut(), &source) {
                check.observe(source, &outputs)?;
            }
            if outputs.is_empty() && txn != 0 && txn_last {
                // The transaction's last op was dropped: the one before it
                // ends it, when it is in this batch. (A transaction larger
                // than a batch, whose last op alone is dropped, stays open:
                // a known gap, see docs/DESIGN.md, "Version migrations".)
                if let Some(previous) = out.last_mut().filter(|previous| previous.txn == txn) {
                    previous.txn_last = true;
                }
            }
            out.extend(outputs);
        }
        for op in &mut out {
            op.seq = self.next_seq;
            self.next_seq += 1;
        }
        Ok(out)
    }
}

fn digest(kind: &[u8], key: &[u8]) -> [u8; 16] {
    let mut hasher = Sha256::new();
    hasher.update((kind.len() as u64).to_le_bytes());
    hasher.update(kind);
    hasher.update(key);
    let full = hasher.finalize();
    let mut short = [0u8; 16];
    short.copy_from_slice(&full[..16]);
    short
}

/// Finds source keys that a chain maps onto the same key, over a whole
/// stream, before anything is written.
///
/// It keeps one entry per distinct target key: 16 bytes of its SHA-256 and
/// the source key it came from, so its memory grows with the number of
/// keys (not with their values). The same source key met again (a key
/// changed twice in a live stream) is no collision, and a source key's
/// `Delete` frees the keys it had taken (a live stream that deletes `Foo`
/// and then creates `FOO` leaves one key in the source, and in the target).
#[derive(Default)]
pub struct KeyCheck {
    targets: HashMap<[u8; 16], (u64, Box<[u8]>)>,
    /// Keys that exist in the source, for in-place runs.
    sources: HashSet<[u8; 16]>,
    /// Keys an in-place run would write that differ from their source key.
    renamed: Vec<Renamed>,
}

/// A key an in-place run moves: the digest of where to, the op, from, to.
struct Renamed {
    digest: [u8; 16],
    seq: u64,
    source: Box<[u8]>,
    moved_to: Box<[u8]>,
}

impl KeyCheck {
    /// An empty check.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `source` became `outputs`; a second source key landing
    /// on a key already taken is an error naming both.
    pub fn observe(&mut self, source: &Op, outputs: &[Op]) -> Result<(), MigrationError> {
        if source.method.as_ref() == b"Delete" {
            for output in outputs {
                let target = digest(&output.kind, &output.key);
                if self
                    .targets
                    .get(&target)
                    .is_some_and(|(_, owner)| **owner == *source.key)
                {
                    self.targets.remove(&target);
                }
            }
            return Ok(());
        }
        for output in outputs {
            let target = digest(&output.kind, &output.key);
            match self.targets.get(&target) {
                Some((first_seq, first_key)) if **first_key != *source.key => {
                    return Err(MigrationError::Collision {
                        target_key: printable(&output.key),
                        first_key: printable(first_key),
                        first_seq: *first_seq,
                        second_key: printable(&source.key),
                        second_seq: source.seq,
                    });
                }
                Some(_) => {}
                None => {
                    self.targets
                        .insert(target, (source.seq, Box::from(source.key.as_ref())));
                }
            }
        }
        Ok(())
    }

    /// Also records, for a migration in place, that `source` exists and
    /// which keys it is moved to.
    pub fn observe_in_place(&mut self, source: &Op, outputs: &[Op]) -> Result<(), MigrationError> {
        self.observe(source, outputs)?;
        self.sources.insert(digest(&source.kind, &source.key));
        for output in outputs {
            if output.key != source.key {
                self.renamed.push(Renamed {
                    digest: digest(&output.kind, &output.key),
                    seq: source.seq,
                    source: Box::from(source.key.as_ref()),
                    moved_to: Box::from(output.key.as_ref()),
                });
            }
        }
        Ok(())
    }

    /// For a migration in place: refuses a key moved onto a key that exists
    /// in the source (it would be overwritten before its own turn).
    pub fn finish_in_place(&self, target: &str) -> Result<(), MigrationError> {
        for Renamed {
            digest,
            seq,
            source,
            moved_to,
        } in &self.renamed
        {
            if self.sources.contains(digest) {
                return Err(MigrationError::InPlace {
                    target: target.to_owned(),
                    reason: format!(
                        "the migration moves {} (read as op {seq}) to {}, which exists already; in place, a key may only move to a free key. Nothing was written",
                        printable(source),
                        printable(moved_to)
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::jq::{JqFilter, JqMigration, OpMatch};
    use super::*;

    fn jq(id: &str, from: &str, to: &str, up: &str, down: Option<&str>) -> Arc<dyn Migration> {
        Arc::new(JqMigration {
            id: id.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            op_match: OpMatch::default(),
            op_match_down: None,
            up: JqFilter::compile(up).expect("compiles"),
            down: down.map(|down| JqFilter::compile(down).expect("compiles")),
        })
    }

    fn profile() -> Profile {
        let mut profile = Profile::new("test", ["1", "2", "3", "4"].map(str::to_owned).to_vec());
        profile
            .add_migration(jq("2_b", "1", "2", ".body.b = 1", Some("del(.body.b)")))
            .expect("adds");
        profile
            .add_migration(jq("1_a", "1", "2", ".body.a = 1", Some("del(.body.a)")))
            .expect("adds");
        profile
            .add_migration(jq("3_c", "2", "3", ".body.c = 1", None))
            .expect("adds");
        profile
    }

    fn op(seq: u64, key: &str, txn: u64, txn_last: bool) -> Op {
        Op {
            seq,
            key: Bytes::copy_from_slice(key.as_bytes()),
            method: Bytes::from_static(b"Put"),
            body: Bytes::from_static(b"{}"),
            txn,
            txn_last,
            ..Op::default()
        }
    }

    #[test]
    fn up_runs_in_id_order_and_down_in_reverse() {
        let profile = profile();
        let up = plan(&profile, "1", "3").expect("plans");
        let ids: Vec<_> = up.steps.iter().map(|step| step.migration.id()).collect();
        assert_eq!(ids, ["1_a", "2_b", "3_c"]);
        let down = plan(&profile, "2", "1").expect("plans");
        let ids: Vec<_> = down.steps.iter().map(|step| step.migration.id()).collect();
        assert_eq!(ids, ["2_b", "1_a"]);
        assert!(plan(&profile, "2", "2").expect("plans").steps.is_empty());
    }

    #[test]
    fn holes_missing_downs_and_unknown_versions_are_refused_up_front() {
        let profile = profile();
        let error = plan(&profile, "1", "4").expect_err("3 -> 4 is a hole");
        assert!(
            matches!(&error, MigrationError::Hole { from, to, .. } if from == "3" && to == "4"),
            "{error}"
        );
        let error = plan(&profile, "3", "1").expect_err("3_c has no down");
        assert!(
            matches!(&error, MigrationError::NoDown { id, .. } if id == "3_c"),
            "{error}"
        );
        assert!(matches!(
            plan(&profile, "1", "9"),
            Err(MigrationError::UnknownVersion { .. })
        ));
    }

    #[test]
    fn dropped_ops_leave_no_gap_and_transactions_still_end() {
        let mut profile = Profile::new("test", vec!["1".to_owned(), "2".to_owned()]);
        profile
            .add_migration(jq(
                "1_drop",
                "1",
                "2",
                r#"if .key == "/drop" then empty else . end"#,
                None,
            ))
            .expect("adds");
        let mut chain = Chain::new(profile, "1", "2").expect("plans");
        let out = chain
            .transform_batch(vec![
                op(1, "/a", 5, false),
                op(2, "/drop", 5, true),
                op(3, "/b", 0, true),
            ])
            .expect("transforms");
        let seqs: Vec<_> = out.iter().map(|op| op.seq).collect();
        assert_eq!(seqs, [1, 2]);
        assert!(out[0].txn_last, "the transaction still ends");
        assert!(out.iter().all(|op| op.platform_version == "2"));
        let next = chain
            .transform_batch(vec![op(4, "/c", 0, true)])
            .expect("transforms");
        assert_eq!(next[0].seq, 3);
    }

    #[test]
    fn two_keys_landing_on_one_are_a_collision() {
        let mut check = KeyCheck::new();
        let first = op(1, "/v3/Foo", 0, true);
        let second = op(2, "/v3/FOO", 0, true);
        let lowered = op(1, "/v3/foo", 0, true);
        check
            .observe(&first, std::slice::from_ref(&lowered))
            .expect("first");
        check
            .observe(&first, std::slice::from_ref(&lowered))
            .expect("the same key again");
        let error = check
            .observe(&second, std::slice::from_ref(&lowered))
            .expect_err("a collision");
        let message = error.to_string();
        assert!(
            message.contains("/v3/Foo") && message.contains("/v3/FOO"),
            "{message}"
        );

        // Deleting the first frees its key: the second may take it, and
        // then the first may not come back.
        let mut deleted = first.clone();
        deleted.method = Bytes::from_static(b"Delete");
        check
            .observe(&second, std::slice::from_ref(&lowered))
            .expect_err("still taken");
        check
            .observe(&deleted, std::slice::from_ref(&lowered))
            .expect("a delete");
        check
            .observe(&second, std::slice::from_ref(&lowered))
            .expect("free after the delete");
        check
            .observe(&deleted, std::slice::from_ref(&lowered))
            .expect("deleting a key another owns changes nothing");
        check
            .observe(&first, &[lowered])
            .expect_err("taken by the second now");
    }

    #[test]
    fn a_checked_batch_fails_whole_on_a_collision() {
        let mut profile = Profile::new("test", vec!["1".to_owned(), "2".to_owned()]);
        profile
            .add_migration(jq("1_lower", "1", "2", ".key |= ascii_downcase", Some(".")))
            .expect("adds");
        let mut chain = Chain::new(profile, "1", "2").expect("plans");
        let mut check = KeyCheck::new();
        let first = chain
            .transform_batch_checked(
                vec![op(1, "/Foo", 0, true), op(2, "/bar", 0, true)],
                &mut check,
            )
            .expect("no collision yet");
        assert_eq!(first.len(), 2);
        let error = chain
            .transform_batch_checked(
                vec![op(3, "/baz", 0, true), op(4, "/FOO", 0, true)],
                &mut check,
            )
            .expect_err("/FOO lands on /foo");
        assert!(error.to_string().contains("/FOO"), "{error}");
    }
}

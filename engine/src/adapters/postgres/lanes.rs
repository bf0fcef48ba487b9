//! A restore on several connections at once: [`PgSink`] splits the stream
//! into lanes, as `pg_restore -j` loads tables side by side.
//!
//! Each lane is a [`SinkDriver`] over its own [`PgTarget`] (a connection)
//! with its own checkpoint row (`<stream>` for lane 0, `<stream>/lane-N`
//! for the others). The stream goes through in phases, with a barrier
//! (every lane commits what it was given) between two phases:
//! - the schema (extensions, enum types, sequences, tables), and later the
//!   foreign keys and sequence values: lane 0 alone; so too every op of a
//!   source transaction (a snapshot's rows are transactions of one op);
//! - rows: each in the lane its key hashes to, so every lane loads rows
//!   side by side however the stream orders its tables (an extract copies
//!   a large table in page ranges, and a table may fill the stream for a
//!   long stretch);
//! - indexes and keys (not foreign keys): after every row before them is
//!   in, built side by side: every lane takes the next table's builds
//!   (largest table first) as soon as it is free, a table's builds one
//!   after another, each in a transaction of its own (see "Builds" below).
//!   The ops then go through the lane their table hashes to, as any op.
//!
//! Exactly once (G4): an op belongs to one lane, always the same one (the
//! number of lanes is kept with the stream: a resume takes the stored
//! number, whatever `--pg-lanes` says), and a lane applies only the ops
//! after its own checkpoint. The stream resumes after the lowest lane's
//! checkpoint; each lane skips what it holds already.
//!
//! Builds: the lane that builds an index is whichever is free, not the
//! op's own, so a build is not counted by a checkpoint. The catalog counts
//! it: a build commits in a transaction of its own (under the epoch, as a
//! checkpoint), and an index or key the target holds already is skipped,
//! by the builders and by the op's lane. A restore killed among the
//! builds resumes before them (no checkpoint passed them yet) and builds
//! what is missing. Placing whole tables on free lanes, largest first, is
//! what `pg_restore -j` does: with one lane per table by hash, the lane
//! given the two largest tables' builds ran a second after the other went
//! idle.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::info;

use super::catalog::{Constraint, Index};
use super::sink::PgTarget;
use super::{
    FERRY_SCHEMA, KIND_CONSTRAINT, KIND_INDEX, KIND_ROW, KIND_ROWS, PgConnection, PgError,
    PgSinkOptions, quote_ident,
};
use crate::adapters::driver::{DriverOptions, SinkDriver};
use crate::adapters::{AdapterError, Sink, StreamInfo};
use crate::order::SeqTracker;
use crate::{Op, Result};

/// Batches queued for one lane at most.
const LANE_QUEUE: usize = 4;

/// What a lane is asked to do.
enum Work {
    /// Apply these ops, in order.
    Ops(Vec<Op>),
    /// Commit what is applied, then answer.
    Commit(oneshot::Sender<()>),
    /// The stream is over: check nothing waits, commit, mark the lane
    /// complete.
    Finish,
    /// Between two of the lane's transactions: take the next table's
    /// builds from the queue, build them (each in a transaction of its
    /// own), again until the queue is empty; then answer.
    Build(Arc<BuildQueue>, oneshot::Sender<()>),
}

/// The builds of a phase, a table's together, the largest table first.
type BuildQueue = Mutex<VecDeque<Vec<Op>>>;

struct Lane {
    work: mpsc::Sender<Work>,
    task: JoinHandle<Result<()>>,
    /// The lane holds the stream through this seq already (its checkpoint
    /// when the restore began).
    held_through: u64,
}

/// A PostgreSQL database as a [`Sink`]: lanes of the shared driver over
/// [`PgTarget`]s (see the module's documentation).
pub struct PgSink {
    connection: PgConnection,
    options: PgSinkOptions,
    lanes: Vec<Lane>,
    tracker: SeqTracker,
    /// Ops gathered for each lane, sent at the end of a batch or before a
    /// barrier.
    pending: Vec<Vec<Op>>,
    /// What the lanes are doing: ops of one phase run side by side (or,
    /// for [`Phase::Alone`], together in lane 0, one transaction as far as
    /// `--pg-ops-per-commit` lets them); a barrier stands between phases.
    phase: Phase,
    /// Indexes and keys of the current [`Phase::TableWork`], built side
    /// by side when the phase ends, then sent to their lanes.
    builds: Vec<Op>,
}

impl PgSink {
    /// A restore into the database `connection` reaches.
    pub fn new(connection: PgConnection, options: PgSinkOptions) -> Self {
        Self {
            connection,
            options,
            lanes: Vec::new(),
            tracker: SeqTracker::new(),
            pending: Vec::new(),
            phase: Phase::Alone,
            builds: Vec::new(),
        }
    }

    fn error(&self, error: PgError) -> crate::Error {
        AdapterError::target(error).into()
    }

    /// The number of lanes `stream` was begun with, when it was, and
    /// whether any lane of it committed something.
    async fn stored_lanes(&self, stream: &StreamInfo) -> Result<Option<(usize, bool)>> {
        let client = self
            .connection
            .connect()
            .await
            .map_err(|error| self.error(error))?;
        let server = self.connection.server();
        let exists: bool = client
            .query_one(
                "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
                &[&format!("{}.streams", quote_ident(FERRY_SCHEMA))],
            )
            .await
            .map_err(|error| {
                self.error(PgError::statement(
                    &server,
                    "looking for ferry's checkpoints",
                    &error,
                ))
            })?
            .get(0);
        if !exists {
            return Ok(None);
        }
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE stream_id = $1), count(*) FILTER (WHERE starts_with(stream_id, $1 || '/lane-')), \
                            coalesce(bool_or(through_seq > 0) FILTER (WHERE stream_id = $1 OR starts_with(stream_id, $1 || '/lane-')), false) \
                     FROM {}.streams",
                    quote_ident(FERRY_SCHEMA)
                ),
                &[&stream.stream_id],
            )
            .await
            .map_err(|error| self.error(PgError::statement(&server, "reading ferry's checkpoints", &error)))?;
        let (main, others, progress): (i64, i64, bool) = (row.get(0), row.get(1), row.get(2));
        Ok((main > 0).then_some((others as usize + 1, progress)))
    }

    /// Starts lane `index` for `stream`: its driver begun, its task running.
    /// `begun`: some lane of the stream committed already.
    async fn start_lane(&self, index: usize, stream: &StreamInfo, begun: bool) -> Result<Lane> {
        let mut options = self.options.clone();
        let mut lane_stream = stream.clone();
        if index > 0 {
            lane_stream.stream_id = format!("{}/lane-{index}", stream.stream_id);
        }
        // The target must be empty once per stream, before anything of it
        // went in: lane 0 checks it when no lane committed anything; the
        // others, and a resume, find the stream's own tables.
        if index > 0 || begun {
            options.allow_nonempty = true;
        }
        let driver_options = DriverOptions {
            ops_per_commit: options.ops_per_commit.max(1),
            epoch: options.epoch,
            lane: true,
            ..DriverOptions::default()
        };
        let mut driver = SinkDriver::new(
            PgTarget::new(self.connection.clone(), options),
            driver_options,
        );
        let held_through = Sink::begin(&mut driver, &lane_stream).await?.unwrap_or(0);
        let (work, mut queue) = mpsc::channel(LANE_QUEUE);
        let server = self.connection.server();
        let task = tokio::spawn(async move {
            while let Some(work) = queue.recv().await {
                match work {
                    Work::Ops(ops) => Sink::apply(&mut driver, ops).await?,
                    Work::Commit(done) => {
                        driver.commit_now().await?;
                        let _ = done.send(());
                    }
                    Work::Finish => return driver.finish_stream().await,
                    Work::Build(queue, done) => {
                        if driver.in_transaction() {
                            return Err(AdapterError::target(PgError::Unreachable {
                                server: server.clone(),
                                reason: format!(
                                    "lane {index} was asked to build while in a transaction"
                                ),
                            })
                            .into());
                        }
                        loop {
                            let table = queue.lock().expect("the build queue").pop_front();
                            let Some(table) = table else { break };
                            for op in &table {
                                if let Err(error) = driver.target_mut().build_alone(op).await {
                                    // The other lanes stop after the build
                                    // they are on: the error comes first.
                                    queue.lock().expect("the build queue").clear();
                                    return Err(error);
                                }
                            }
                        }
                        let _ = done.send(());
                    }
                }
            }
            // The sink went away without finishing the stream (it failed,
            // or was dropped): as after a kill, what is not committed is
            // not, and nothing is marked complete.
            Ok(())
        });
        Ok(Lane {
            work,
            task,
            held_through,
        })
    }

    /// The error that stopped lane `index` (its task ended).
    async fn lane_failure(&mut self, index: usize) -> crate::Error {
        let lane = &mut self.lanes[index];
        match (&mut lane.task).await {
            Ok(Err(error)) => error,
            Ok(Ok(())) => self.error(PgError::Unreachable {
                server: self.connection.server(),
                reason: format!("lane {index} of the restore stopped early"),
            }),
            Err(error) => self.error(PgError::Unreachable {
                server: self.connection.server(),
                reason: format!("lane {index} of the restore died: {error}"),
            }),
        }
    }

    async fn send(&mut self, index: usize, work: Work) -> Result<()> {
        if self.lanes[index].work.send(work).await.is_err() {
            return Err(self.lane_failure(index).await);
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        for index in 0..self.lanes.len() {
            if !self.pending[index].is_empty() {
                // The next batch is as large: made at its size, not grown
                // by doubling (each growth a fresh allocation to fault in).
                let capacity = self.pending[index].len();
                let ops = std::mem::replace(&mut self.pending[index], Vec::with_capacity(capacity));
                self.send(index, Work::Ops(ops)).await?;
            }
        }
        Ok(())
    }

    /// Builds the indexes and keys held in [`Self::builds`] side by side on
    /// every lane (see the module's documentation), then hands the ops to
    /// their lanes, which find them built.
    async fn build_held(&mut self) -> Result<()> {
        if self.builds.is_empty() {
            return Ok(());
        }
        let builds = std::mem::take(&mut self.builds);
        let tables: BTreeSet<String> = builds.iter().filter_map(build_table).collect();
        let sizes = self.table_sizes(tables.into_iter().collect()).await?;
        let order = build_order(&builds, &sizes);
        info!(
            builds = builds.len(),
            tables = order.len(),
            lanes = self.lanes.len(),
            "building indexes and keys side by side, the largest tables first"
        );
        let queue: Arc<BuildQueue> = Arc::new(Mutex::new(order));
        let mut answers = Vec::new();
        for index in 0..self.lanes.len() {
            let (done, answer) = oneshot::channel();
            self.send(index, Work::Build(queue.clone(), done)).await?;
            answers.push((index, answer));
        }
        for (index, answer) in answers {
            if answer.await.is_err() {
                return Err(self.lane_failure(index).await);
            }
        }
        let count = self.lanes.len();
        for op in builds {
            self.pending[route(&op, count).lane()].push(op);
        }
        Ok(())
    }

    /// The size on disk of each of `tables` (qualified names) on the
    /// target, 0 for one it does not hold.
    async fn table_sizes(&self, tables: Vec<String>) -> Result<BTreeMap<String, i64>> {
        let client = self
            .connection
            .connect()
            .await
            .map_err(|error| self.error(error))?;
        let rows = client
            .query(
                "SELECT name, coalesce(pg_catalog.pg_relation_size(pg_catalog.to_regclass(name)), 0) \
                 FROM unnest($1::text[]) AS name",
                &[&tables],
            )
            .await
            .map_err(|error| {
                self.error(PgError::statement(
                    &self.connection.server(),
                    "reading the sizes of the tables to index",
                    &error,
                ))
            })?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    /// Waits until each of `lanes` has committed everything sent to it.
    async fn commit(&mut self, lanes: std::ops::Range<usize>) -> Result<()> {
        let mut answers = Vec::new();
        for index in lanes {
            let (done, answer) = oneshot::channel();
            self.send(index, Work::Commit(done)).await?;
            answers.push((index, answer));
        }
        for (index, answer) in answers {
            if answer.await.is_err() {
                return Err(self.lane_failure(index).await);
            }
        }
        Ok(())
    }
}

/// Where an op goes, and with what it may run side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Needs every lane lined up first, then lane 0 alone: the schema
    /// (extensions, types, sequences, tables: one transaction, so a table
    /// that exists on the target already leaves nothing of it behind),
    /// foreign keys (they read two tables) and sequence values; and every
    /// op of a source transaction (a transaction is applied whole, and two
    /// transactions that change one key in the order they came).
    Alone,
    /// A row, in the lane its key hashes to: every lane loads rows of
    /// every table side by side, whatever order the tables come in.
    Row(usize),
    /// An index or a key of one table, in the lane its table hashes to:
    /// the builds of a table run one after another (a key takes the table's
    /// exclusive lock), those of other tables side by side.
    TableWork(usize),
}

impl Route {
    /// Ops of one phase run side by side; the phase changes at a barrier
    /// (every lane commits what it was given): a table's indexes and keys
    /// are built once every lane loaded the rows before them, and rows
    /// after an index go in once it is built.
    fn phase(self) -> Phase {
        match self {
            Route::Alone => Phase::Alone,
            Route::Row(_) => Phase::Rows,
            Route::TableWork(_) => Phase::TableWork,
        }
    }

    fn lane(self) -> usize {
        match self {
            Route::Alone => 0,
            Route::Row(lane) | Route::TableWork(lane) => lane,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Alone,
    Rows,
    TableWork,
}

/// `builds` (index and key ops) as the lanes take them: a table's
/// together, in stream order; the tables by their size on the target
/// (`sizes`, 0 when missing) times their number of builds, the largest
/// first, a tie in stream order.
fn build_order(builds: &[Op], sizes: &BTreeMap<String, i64>) -> VecDeque<Vec<Op>> {
    let mut tables: BTreeMap<String, Vec<Op>> = BTreeMap::new();
    for op in builds {
        let table = build_table(op).unwrap_or_default();
        tables.entry(table).or_default().push(op.clone());
    }
    let mut order: Vec<(i64, Vec<Op>)> = tables
        .into_iter()
        .map(|(table, ops)| {
            let size = sizes.get(&table).copied().unwrap_or(0);
            (size.saturating_mul(ops.len() as i64), ops)
        })
        .collect();
    order.sort_by(|(a, a_ops), (b, b_ops)| b.cmp(a).then(a_ops[0].seq.cmp(&b_ops[0].seq)));
    order.into_iter().map(|(_, ops)| ops).collect()
}

/// The table (qualified) of an index or key op, as [`route`] reads it.
fn build_table(op: &Op) -> Option<String> {
    let kind = op.kind.as_ref();
    if kind == KIND_INDEX.as_bytes() {
        let index: Index = serde_json::from_slice(&op.body).ok()?;
        Some(super::qualified(&index.schema, &index.table))
    } else if kind == KIND_CONSTRAINT.as_bytes() {
        let constraint: Constraint = serde_json::from_slice(&op.body).ok()?;
        Some(super::qualified(&constraint.schema, &constraint.table))
    } else {
        None
    }
}

/// The route of `op` over `lanes` lanes. CRC-32C, not std's hasher: a
/// resume by another build of ferry must route every op to the lane it
/// went to before.
fn route(op: &Op, lanes: usize) -> Route {
    let lane = |bytes: &[u8]| (crc32c::crc32c(bytes) as usize) % lanes;
    let table = |schema: &str, name: &str| {
        Route::TableWork(lane(super::source::row_key_prefix(schema, name).as_bytes()))
    };
    let kind = op.kind.as_ref();
    if op.txn != 0 {
        Route::Alone
    } else if kind == KIND_ROW.as_bytes() || kind == KIND_ROWS.as_bytes() {
        Route::Row(lane(&op.key))
    } else if kind == KIND_INDEX.as_bytes() {
        match serde_json::from_slice::<Index>(&op.body) {
            Ok(body) => table(&body.schema, &body.table),
            // Lane 0 alone reports what is wrong with it.
            Err(_) => Route::Alone,
        }
    } else if kind == KIND_CONSTRAINT.as_bytes() {
        match serde_json::from_slice::<Constraint>(&op.body) {
            // A foreign key needs the key it references, in another lane.
            Ok(body) if body.kind != "f" => table(&body.schema, &body.table),
            _ => Route::Alone,
        }
    } else {
        Route::Alone
    }
}

impl Drop for PgSink {
    /// A sink dropped before its stream finished stops its lanes at once,
    /// as a killed restore would: none of them commits anything more.
    fn drop(&mut self) {
        for lane in &self.lanes {
            lane.task.abort();
        }
    }
}

#[async_trait]
impl Sink for PgSink {
    async fn begin(&mut self, stream: &StreamInfo) -> Result<Option<u64>> {
        let wanted = self.options.lanes.max(1);
        let (lanes, begun) = match self.stored_lanes(stream).await? {
            Some((stored, begun)) => {
                if stored != wanted {
                    info!(
                        stored,
                        wanted, "the restore resumes with the lanes it began with"
                    );
                }
                (stored, begun)
            }
            None => (wanted, false),
        };
        // Lane 0 first: it checks the target and records the stream.
        self.lanes.push(self.start_lane(0, stream, begun).await?);
        for index in 1..lanes {
            let lane = self.start_lane(index, stream, begun).await?;
            self.lanes.push(lane);
        }
        self.pending = vec![Vec::new(); lanes];
        let through = self
            .lanes
            .iter()
            .map(|lane| lane.held_through)
            .min()
            .unwrap_or(0);
        self.tracker = SeqTracker::starting_at(through + 1);
        Ok((through > 0).then_some(through))
    }

    async fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        self.tracker
            .try_advance_all(ops.iter().map(|op| op.seq))
            .map_err(|source| AdapterError::SourceOutOfOrder { source })?;
        let count = self.lanes.len();
        for op in ops {
            let route = route(&op, count);
            if route.phase() != self.phase {
                // Everything before it is in first: what lane 0 did alone,
                // or what every lane did side by side.
                self.build_held().await?;
                self.flush().await?;
                let lined_up = if self.phase == Phase::Alone {
                    0..1
                } else {
                    0..count
                };
                self.commit(lined_up).await?;
                self.phase = route.phase();
            }
            let index = route.lane();
            if op.seq <= self.lanes[index].held_through {
                // The lane holds it already.
            } else if route.phase() == Phase::TableWork && count > 1 {
                self.builds.push(op);
            } else {
                self.pending[index].push(op);
            }
        }
        self.flush().await
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        self.build_held().await?;
        self.flush().await?;
        // Every lane finishes side by side; a lane that stopped already
        // has its error waiting in its task.
        for lane in &self.lanes {
            let _ = lane.work.send(Work::Finish).await;
        }
        let mut first_error = None;
        for lane in std::mem::take(&mut self.lanes) {
            drop(lane.work);
            let finished = match lane.task.await {
                Ok(finished) => finished,
                Err(error) => Err(self.error(PgError::Unreachable {
                    server: self.connection.server(),
                    reason: format!("a lane of the restore died: {error}"),
                })),
            };
            if let (Err(error), None) = (finished, &first_error) {
                first_error = Some(error);
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use bytes::Bytes;

    use super::*;
    use crate::adapters::postgres::KIND_TABLE;

    fn op(kind: &str, key: &str, body: String) -> Op {
        Op {
            kind: Bytes::from(kind.to_owned()),
            key: Bytes::from(key.to_owned()),
            body: Bytes::from(body),
            ..Op::default()
        }
    }

    fn constraint(table: &str, kind: &str) -> Op {
        let body = serde_json::json!({
            "schema": "public", "table": table, "name": format!("{table}_{kind}"),
            "type": kind, "definition": "PRIMARY KEY (id)",
        });
        op(KIND_CONSTRAINT, "", body.to_string())
    }

    #[test]
    fn rows_of_one_table_spread_over_every_lane() {
        let lanes: BTreeSet<usize> = (0..64)
            .map(|id| route(&op(KIND_ROW, &format!("public.runs/{id}"), "{}".into()), 4))
            .map(|route| {
                assert!(matches!(route, Route::Row(_)), "{route:?}");
                route.lane()
            })
            .collect();
        assert_eq!(lanes.len(), 4, "{lanes:?}");
    }

    #[test]
    fn a_tables_indexes_and_keys_share_a_lane_and_foreign_keys_go_alone() {
        let index = serde_json::json!({
            "schema": "public", "table": "runs", "name": "runs_ts",
            "definition": "CREATE INDEX runs_ts ON public.runs (ts)",
        });
        let index = route(&op(KIND_INDEX, "", index.to_string()), 4);
        assert!(matches!(index, Route::TableWork(_)), "{index:?}");
        assert_eq!(route(&constraint("runs", "p"), 4), index);
        assert_eq!(route(&constraint("runs", "u"), 4), index);
        assert_eq!(route(&constraint("runs", "f"), 4), Route::Alone);
        assert_eq!(route(&op(KIND_TABLE, "", "{}".into()), 4), Route::Alone);
        assert_eq!(
            route(&op(KIND_INDEX, "", "not json".into()), 4),
            Route::Alone
        );
    }

    #[test]
    fn builds_go_by_table_the_largest_first_a_tables_in_stream_order() {
        let index = |seq: u64, table: &str, name: &str| {
            let body = serde_json::json!({
                "schema": "public", "table": table, "name": name,
                "definition": format!("CREATE INDEX {name} ON public.{table} (x)"),
            });
            let mut op = op(KIND_INDEX, "", body.to_string());
            op.seq = seq;
            op
        };
        let mut key = constraint("big", "p");
        key.seq = 5;
        let builds = [
            index(1, "small", "small_x"),
            index(2, "big", "big_x"),
            index(3, "two", "two_x"),
            index(4, "two", "two_y"),
            key,
            index(6, "gone", "gone_x"),
            index(7, "tie", "tie_x"),
        ];
        let sizes: BTreeMap<String, i64> = [
            ("\"public\".\"small\"", 10),
            ("\"public\".\"big\"", 1000),
            ("\"public\".\"two\"", 600),
            ("\"public\".\"tie\"", 10),
        ]
        .into_iter()
        .map(|(name, size)| (name.to_owned(), size))
        .collect();
        let order: Vec<Vec<u64>> = build_order(&builds, &sizes)
            .into_iter()
            .map(|table| table.iter().map(|op| op.seq).collect())
            .collect();
        // big: 1000 x 2; two: 600 x 2; small and tie: 10 (stream order);
        // gone: not on the target, last.
        assert_eq!(order, [vec![2, 5], vec![3, 4], vec![1], vec![7], vec![6]]);
    }

    #[test]
    fn the_ops_of_a_source_transaction_go_together_in_order() {
        for id in 0..16 {
            let mut row = op(KIND_ROW, &format!("public.runs/{id}"), "{}".into());
            row.txn = 3;
            assert_eq!(route(&row, 4), Route::Alone, "{id}");
        }
    }

    #[test]
    fn the_route_does_not_change_between_builds() {
        // A resume by another build must find every op in the lane it went
        // to before: these are CRC-32C values, fixed.
        let row = route(&op(KIND_ROW, "public.runs/1", "{}".into()), 7);
        assert_eq!(
            row,
            Route::Row((crc32c::crc32c(b"public.runs/1") as usize) % 7)
        );
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }
}

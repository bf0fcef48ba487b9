//! A restore on several connections at once: [`PgSink`] splits the stream
//! into lanes by table, as `pg_restore -j` loads tables side by side.
//!
//! Each lane is a [`SinkDriver`] over its own [`PgTarget`] (a connection)
//! with its own checkpoint row (`<stream>` for lane 0, `<stream>/lane-N`
//! for the others), and takes a table's ops in seq order: its rows, its
//! indexes and keys. The other ops (the schema: extensions, enum types,
//! sequences, tables; then foreign keys and sequence values) wait for every
//! lane to commit what came before them, go through lane 0 together, and
//! commit before any lane goes on: a barrier.
//!
//! Exactly once (G4): an op belongs to one lane, always the same one (the
//! number of lanes is kept with the stream: a resume takes the stored
//! number, whatever `--pg-lanes` says), and a lane applies only the ops
//! after its own checkpoint. The stream resumes after the lowest lane's
//! checkpoint; each lane skips what it holds already.

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::info;

use super::catalog::{Constraint, Index};
use super::sink::PgTarget;
use super::{
    FERRY_SCHEMA, KIND_CONSTRAINT, KIND_INDEX, KIND_ROW, PgConnection, PgError, PgSinkOptions,
    quote_ident,
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
}

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
    /// The last op went through lane 0 alone (a barrier is behind it):
    /// ops that span tables run together, in one transaction of lane 0
    /// as far as `--pg-ops-per-commit` lets them.
    between_lanes: bool,
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
            between_lanes: false,
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
        let task = tokio::spawn(async move {
            while let Some(work) = queue.recv().await {
                match work {
                    Work::Ops(ops) => Sink::apply(&mut driver, ops).await?,
                    Work::Commit(done) => {
                        driver.commit_now().await?;
                        let _ = done.send(());
                    }
                }
            }
            driver.finish_stream().await
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
                let ops = std::mem::take(&mut self.pending[index]);
                self.send(index, Work::Ops(ops)).await?;
            }
        }
        Ok(())
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

/// The lane of an op that concerns one table, by the table's row-key
/// prefix; `None` for an op that needs every lane lined up first. A
/// table's CREATE is one of those: the schema (extensions, types,
/// sequences, tables) goes in as one transaction of lane 0, so a table that
/// exists on the target already leaves nothing of it behind.
fn lane_of(op: &Op, lanes: usize) -> Option<usize> {
    let table = |schema: &str, name: &str| Some(super::source::row_key_prefix(schema, name));
    let kind = op.kind.as_ref();
    let prefix = if kind == KIND_ROW.as_bytes() {
        let slash = op.key.iter().position(|byte| *byte == b'/')?;
        Some(String::from_utf8_lossy(&op.key[..=slash]).into_owned())
    } else if kind == KIND_INDEX.as_bytes() {
        let body: Index = serde_json::from_slice(&op.body).ok()?;
        table(&body.schema, &body.table)
    } else if kind == KIND_CONSTRAINT.as_bytes() {
        let body: Constraint = serde_json::from_slice(&op.body).ok()?;
        // A foreign key needs the key it references, in another lane.
        if body.kind == "f" {
            return None;
        }
        table(&body.schema, &body.table)
    } else {
        None
    }?;
    // CRC-32C, not std's hasher: a resume by another build of ferry must
    // route every op to the lane it went to before.
    Some((crc32c::crc32c(prefix.as_bytes()) as usize) % lanes)
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
        let mut tracker = self.tracker;
        for op in &ops {
            tracker
                .try_advance(op.seq)
                .map_err(|source| AdapterError::SourceOutOfOrder { source })?;
        }
        self.tracker = tracker;
        let count = self.lanes.len();
        for op in ops {
            match lane_of(&op, count) {
                Some(index) => {
                    if self.between_lanes {
                        // What lane 0 did alone is in before any lane
                        // goes on.
                        self.flush().await?;
                        self.commit(0..1).await?;
                        self.between_lanes = false;
                    }
                    if op.seq > self.lanes[index].held_through {
                        self.pending[index].push(op);
                    }
                }
                None => {
                    if !self.between_lanes {
                        // Everything the lanes did before it is in first.
                        self.flush().await?;
                        self.commit(0..count).await?;
                        self.between_lanes = true;
                    }
                    if op.seq > self.lanes[0].held_through {
                        self.pending[0].push(op);
                    }
                }
            }
        }
        self.flush().await
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        self.flush().await?;
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

//! The MLflow sink: replays an MLflow stream's requests onto a tracking
//! server, runs side by side, exactly once across kills.
//!
//! MLflow has no transactions, so exactly-once stands on three things:
//! - the checkpoint, a tag of the target's experiment 0
//!   (`ferry.checkpoint.<stream>`: the seq through which every request was
//!   answered), written only when every lane has finished every op before
//!   it, and once at `begin` (so a restore killed before its first
//!   checkpoint is resumed, not refused as a non-empty target);
//! - the old-to-new id map, whose entries are tags on what the sink made
//!   (`ferry.source_run_id` on a run, `ferry.source_experiment_id` on an
//!   experiment), read back at a resume;
//! - requests that are idempotent after the checkpoint: a run or an
//!   experiment already made is found and not made again, a model version
//!   that exists is left alone, a `log-batch` sent twice leaves one copy
//!   (MLflow's SQL store drops a metric point it already holds; params and
//!   tags are set to the same values), and what follows a run's deletion
//!   (only that deletion itself) is skipped on a run already deleted.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::client::MlflowClient;
use super::logged_models;
use super::source::{all_experiments, array, model_versions, next_page, server_version, text};
use super::traces::{self, Generation, TargetIds};
use super::{
    API, CHECKPOINT_TAG_PREFIX, Failure, KIND_LOGGED_MODEL, KIND_REQUIREMENT, KIND_RUN, KIND_TRACE,
    MlflowError, PARENT_RUN_TAG, SOURCE_EXPERIMENT_TAG, SOURCE_RUN_TAG, SOURCE_VERSION_TAG,
};
use crate::adapters::{AdapterError, Sink, StreamInfo};
use crate::order::SeqTracker;
use crate::{Op, Result};

/// How an MLflow restore writes.
#[derive(Debug, Clone)]
pub struct MlflowSinkOptions {
    /// Add to a target that already holds experiments, runs or models.
    pub allow_nonempty: bool,
    /// Lanes of runs applied side by side.
    pub concurrency: usize,
    /// Ops after which the checkpoint is written (also every 10 s).
    pub ops_per_checkpoint: usize,
}

impl Default for MlflowSinkOptions {
    fn default() -> Self {
        Self {
            allow_nonempty: false,
            concurrency: 8,
            ops_per_checkpoint: 5_000,
        }
    }
}

/// The longest a checkpoint waits while ops are applied.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// Ops queued on a lane at most.
const LANE_QUEUE: usize = 256;
/// The most ops of one source transaction held until its last op comes.
const MAX_TRANSACTION_OPS: usize = 100_000;

/// What every lane shares: the server and the id maps.
struct Shared {
    client: Arc<MlflowClient>,
    /// Source run id to target run id.
    runs: Mutex<HashMap<String, String>>,
    /// Source experiment id to target experiment id.
    experiments: Mutex<HashMap<String, String>>,
    /// (model, source version) to the target's version, where they differ.
    versions: Mutex<HashMap<(String, String), String>>,
    /// Models whose versions on the target were read into `versions`.
    versions_read: Mutex<HashSet<String>>,
    /// The target was empty when the stream began: ids are kept as the
    /// source's, gaps filled.
    same_ids: AtomicBool,
    /// The target's trace API, asked for at its first trace.
    trace_generation: tokio::sync::OnceCell<Generation>,
}

enum LaneMessage {
    Op(Box<Op>),
    Flush(oneshot::Sender<()>),
}

struct Lane {
    sender: mpsc::Sender<LaneMessage>,
    task: Option<JoinHandle<Result<()>>>,
}

/// Replays an MLflow stream onto a tracking server.
pub struct MlflowSink {
    shared: Arc<Shared>,
    options: MlflowSinkOptions,
    stream_id: String,
    tracker: SeqTracker,
    lanes: Vec<Lane>,
    /// The lane each run went to (a child run goes to its parent's).
    run_lanes: HashMap<String, usize>,
    /// The last op handed out, and ops since the checkpoint.
    last_seq: u64,
    since_checkpoint: usize,
    checkpointed_at: Instant,
    /// The ops of a source transaction whose last op has not come yet.
    open_transaction: Vec<Op>,
}

impl Drop for MlflowSink {
    /// A sink dropped without `finish` (its restore stopped) sends
    /// nothing more: what its lanes still held is cancelled, as a kill
    /// would, and the next restore resumes from the checkpoint.
    fn drop(&mut self) {
        for lane in &self.lanes {
            if let Some(task) = &lane.task {
                task.abort();
            }
        }
    }
}

impl MlflowSink {
    /// A sink writing to the server `client` talks to.
    pub fn new(client: Arc<MlflowClient>, options: MlflowSinkOptions) -> Self {
        Self {
            shared: Arc::new(Shared {
                client,
                runs: Mutex::new(HashMap::new()),
                experiments: Mutex::new(HashMap::new()),
                versions: Mutex::new(HashMap::new()),
                versions_read: Mutex::new(HashSet::new()),
                same_ids: AtomicBool::new(false),
                trace_generation: tokio::sync::OnceCell::new(),
            }),
            options,
            stream_id: String::new(),
            tracker: SeqTracker::new(),
            lanes: Vec::new(),
            run_lanes: HashMap::new(),
            last_seq: 0,
            since_checkpoint: 0,
            checkpointed_at: Instant::now(),
            open_transaction: Vec::new(),
        }
    }

    fn client(&self) -> &MlflowClient {
        &self.shared.client
    }

    fn checkpoint_tag(&self) -> String {
        format!("{CHECKPOINT_TAG_PREFIX}{}", self.stream_id)
    }

    /// The stream's checkpoint on the target, if any.
    async fn read_checkpoint(&self) -> Result<Option<Value>, MlflowError> {
        let answer = self
            .client()
            .get(&format!("{API}/experiments/get"), &[("experiment_id", "0")])
            .await
            .map_err(|error| match error.error_code() {
                Some("RESOURCE_DOES_NOT_EXIST") => MlflowError::NotEmpty {
                    server: self.client().name().to_owned(),
                    what: "it has no experiment 0 (Default), where ferry keeps its checkpoint"
                        .to_owned(),
                },
                _ => error,
            })?;
        let tag = self.checkpoint_tag();
        let Some(found) = array(&answer["experiment"], "tags")
            .iter()
            .find(|entry| text(entry, "key") == tag)
        else {
            return Ok(None);
        };
        let value = super::parse_json(text(found, "value").as_bytes()).map_err(|reason| {
            MlflowError::BadResponse {
                server: self.client().name().to_owned(),
                request: format!("the checkpoint tag {tag} of experiment 0"),
                reason,
            }
        })?;
        Ok(Some(value))
    }

    async fn write_checkpoint(&mut self, complete: bool) -> Result<()> {
        let value = json!({
            "seq": self.last_seq,
            "complete": complete,
            "same_ids": self.shared.same_ids.load(Ordering::Relaxed),
        });
        self.client()
            .post(
                &format!("{API}/experiments/set-experiment-tag"),
                &json!({
                    "experiment_id": "0",
                    "key": self.checkpoint_tag(),
                    "value": value.to_string(),
                }),
            )
            .await
            .map_err(AdapterError::target)?;
        self.since_checkpoint = 0;
        self.checkpointed_at = Instant::now();
        Ok(())
    }

    /// What the target holds besides experiment 0's emptiness: `None` when
    /// it is empty.
    async fn holdings(&self) -> Result<Option<String>, MlflowError> {
        let experiments = self
            .client()
            .post(
                &format!("{API}/experiments/search"),
                &json!({ "max_results": 10, "view_type": "ALL" }),
            )
            .await?;
        if let Some(other) = array(&experiments, "experiments")
            .iter()
            .find(|experiment| text(experiment, "experiment_id") != "0")
        {
            return Ok(Some(format!(
                "experiment {} ({:?})",
                text(other, "experiment_id"),
                text(other, "name")
            )));
        }
        let runs = self
            .client()
            .post(
                &format!("{API}/runs/search"),
                &json!({ "experiment_ids": ["0"], "run_view_type": "ALL", "max_results": 1 }),
            )
            .await?;
        if !array(&runs, "runs").is_empty() {
            return Ok(Some("runs in experiment 0".to_owned()));
        }
        let models = self
            .client()
            .get(
                &format!("{API}/registered-models/search"),
                &[("max_results", "1")],
            )
            .await?;
        if let Some(model) = array(&models, "registered_models").first() {
            return Ok(Some(format!("registered model {:?}", text(model, "name"))));
        }
        Ok(None)
    }

    /// Reads back the id map from the tags the sink left.
    async fn rebuild_maps(&self) -> Result<(), MlflowError> {
        let mut experiment_ids = Vec::new();
        for experiment in all_experiments(self.client()).await? {
            let id = text(&experiment, "experiment_id");
            if let Some(source) = tag_value(&experiment, SOURCE_EXPERIMENT_TAG) {
                lock(&self.shared.experiments).insert(source, id.clone());
            }
            experiment_ids.push(id);
        }
        for experiment_id in experiment_ids {
            let mut page_token: Option<String> = None;
            loop {
                let mut request = json!({
                    "experiment_ids": [experiment_id],
                    "run_view_type": "ALL",
                    "max_results": 1000,
                });
                if let Some(token) = &page_token {
                    request["page_token"] = json!(token);
                }
                let page = self
                    .client()
                    .post(&format!("{API}/runs/search"), &request)
                    .await?;
                for run in array(&page, "runs") {
                    if let Some(source) = tag_value(&run["data"], SOURCE_RUN_TAG) {
                        lock(&self.shared.runs).insert(source, text(&run["info"], "run_id"));
                    }
                }
                page_token = next_page(&page);
                if page_token.is_none() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn start_lanes(&mut self) {
        for _ in 0..self.options.concurrency.max(1) {
            let (sender, mut receiver) = mpsc::channel(LANE_QUEUE);
            let shared = self.shared.clone();
            let task = tokio::spawn(async move {
                while let Some(message) = receiver.recv().await {
                    match message {
                        LaneMessage::Op(op) => apply_op(&shared, &op).await?,
                        LaneMessage::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
                Ok(())
            });
            self.lanes.push(Lane {
                sender,
                task: Some(task),
            });
        }
    }

    /// The error a lane that stopped ended with.
    async fn lane_error(&mut self, index: usize) -> crate::Error {
        let failed = match self.lanes[index].task.take() {
            Some(task) => match task.await {
                Ok(Err(error)) => return error,
                Ok(Ok(())) => "it ended".to_owned(),
                Err(error) => error.to_string(),
            },
            None => "it stopped earlier".to_owned(),
        };
        AdapterError::target(MlflowError::BadResponse {
            server: self.client().name().to_owned(),
            request: format!("lane {index}"),
            reason: format!("the lane stopped without an error: {failed}"),
        })
        .into()
    }

    /// Waits until every lane has applied everything handed to it.
    async fn barrier(&mut self) -> Result<()> {
        let mut waits = Vec::with_capacity(self.lanes.len());
        for index in 0..self.lanes.len() {
            let (done, wait) = oneshot::channel();
            if self.lanes[index]
                .sender
                .send(LaneMessage::Flush(done))
                .await
                .is_err()
            {
                return Err(self.lane_error(index).await);
            }
            waits.push(wait);
        }
        for (index, wait) in waits.into_iter().enumerate() {
            if wait.await.is_err() {
                return Err(self.lane_error(index).await);
            }
        }
        Ok(())
    }

    /// Sends `op` to its lane (a run's), or applies it after every lane
    /// is idle (experiments, the registry), and checkpoints when due.
    async fn dispatch(&mut self, op: Op) -> Result<()> {
        let seq = op.seq;
        if op.kind.as_ref() == KIND_RUN.as_bytes() {
            let lane = self.lane_of(&op);
            if self.lanes[lane]
                .sender
                .send(LaneMessage::Op(Box::new(op)))
                .await
                .is_err()
            {
                return Err(self.lane_error(lane).await);
            }
        } else {
            // Experiments and the registry: after every run op before
            // them, one at a time.
            self.barrier().await?;
            apply_op(&self.shared, &op).await?;
        }
        self.last_seq = seq;
        self.since_checkpoint += 1;
        if self.since_checkpoint >= self.options.ops_per_checkpoint
            || self.checkpointed_at.elapsed() >= CHECKPOINT_EVERY
        {
            self.barrier().await?;
            self.write_checkpoint(false).await?;
        }
        Ok(())
    }

    /// The lane of a run's op: the run's own, else its parent's, else by
    /// its id.
    fn lane_of(&mut self, op: &Op) -> usize {
        let run = String::from_utf8_lossy(&op.key).into_owned();
        if let Some(&lane) = self.run_lanes.get(&run) {
            return lane;
        }
        let parent_lane = op.deps.iter().find_map(|dep| {
            let dep = String::from_utf8_lossy(dep);
            dep.starts_with("run/")
                .then(|| self.run_lanes.get(dep.as_ref()).copied())
                .flatten()
        });
        let lane = parent_lane
            .unwrap_or_else(|| crc32c::crc32c(&op.key) as usize % self.lanes.len().max(1));
        self.run_lanes.insert(run, lane);
        lane
    }
}

#[async_trait]
impl Sink for MlflowSink {
    async fn begin(&mut self, stream: &StreamInfo) -> Result<Option<u64>> {
        self.stream_id = stream.stream_id.clone();
        let stored = self.read_checkpoint().await.map_err(AdapterError::target)?;
        let resumed = match stored {
            Some(checkpoint) => {
                let seq = checkpoint["seq"].as_u64().unwrap_or(0);
                self.shared.same_ids.store(
                    checkpoint["same_ids"].as_bool().unwrap_or(false),
                    Ordering::Relaxed,
                );
                self.rebuild_maps().await.map_err(AdapterError::target)?;
                tracing::info!(
                    stream = %self.stream_id,
                    through_seq = seq,
                    runs = lock(&self.shared.runs).len(),
                    "resuming an MLflow restore from its checkpoint"
                );
                self.last_seq = seq;
                Some(seq)
            }
            None => {
                let holdings = self.holdings().await.map_err(AdapterError::target)?;
                if let Some(what) = &holdings
                    && !self.options.allow_nonempty
                {
                    return Err(AdapterError::target(MlflowError::NotEmpty {
                        server: self.client().name().to_owned(),
                        what: what.clone(),
                    })
                    .into());
                }
                self.shared
                    .same_ids
                    .store(holdings.is_none(), Ordering::Relaxed);
                self.write_checkpoint(false).await?;
                None
            }
        };
        self.tracker = SeqTracker::starting_at(self.last_seq + 1);
        self.start_lanes();
        Ok(resumed)
    }

    async fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        self.tracker
            .try_advance_all(ops.iter().map(|op| op.seq))
            .map_err(|source| AdapterError::SourceOutOfOrder { source })?;
        for op in ops {
            // G3 without server transactions: a source transaction's
            // requests are held until its last op came, then sent; a
            // stream cut inside one leaves none of it on the target.
            if let Some(open) = self.open_transaction.first().map(|first| first.txn)
                && op.txn != open
            {
                return Err(AdapterError::BrokenTransaction {
                    target_name: self.client().name().to_owned(),
                    seq: op.seq,
                    txn: open,
                }
                .into());
            }
            if op.txn == 0 || op.txn_last && self.open_transaction.is_empty() {
                self.dispatch(op).await?;
                continue;
            }
            if self.open_transaction.len() >= MAX_TRANSACTION_OPS {
                return Err(AdapterError::target(MlflowError::BadResponse {
                    server: self.client().name().to_owned(),
                    request: format!("op seq {} of source transaction {}", op.seq, op.txn),
                    reason: format!(
                        "a source transaction of more than {MAX_TRANSACTION_OPS} ops cannot be held to be sent whole: MLflow has no transactions"
                    ),
                })
                .into());
            }
            let last = op.txn_last;
            self.open_transaction.push(op);
            if last {
                for op in std::mem::take(&mut self.open_transaction) {
                    self.dispatch(op).await?;
                }
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        if let Some(open) = self.open_transaction.first() {
            return Err(AdapterError::target(MlflowError::BadResponse {
                server: self.client().name().to_owned(),
                request: format!("source transaction {} from op seq {}", open.txn, open.seq),
                reason: "the stream ended before the transaction's last op: none of it was sent"
                    .to_owned(),
            })
            .into());
        }
        self.barrier().await?;
        self.write_checkpoint(true).await?;
        for lane in std::mem::take(&mut self.lanes) {
            drop(lane.sender);
            if let Some(task) = lane.task {
                let _ = task.await;
            }
        }
        Ok(())
    }
}

/// The server refused a write because a row with the same primary key is
/// there (SQLite's, PostgreSQL's and MySQL's words for it).
fn holds_again(error: &MlflowError) -> bool {
    let MlflowError::Refused { message, .. } = error else {
        return false;
    };
    [
        "UNIQUE constraint failed",
        "duplicate key value violates unique constraint",
        "Duplicate entry",
    ]
    .iter()
    .any(|words| message.contains(words))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn tag_value(holder: &Value, key: &str) -> Option<String> {
    array(holder, "tags")
        .iter()
        .find(|tag| text(tag, "key") == key)
        .map(|tag| text(tag, "value"))
}

/// One op, applied: see the module's documentation for what makes each
/// request idempotent.
async fn apply_op(shared: &Shared, op: &Op) -> Result<()> {
    if [KIND_TRACE, KIND_LOGGED_MODEL, KIND_REQUIREMENT]
        .iter()
        .any(|kind| op.kind.as_ref() == kind.as_bytes())
    {
        return apply_version_dependent(shared, op)
            .await
            .map_err(|error| AdapterError::target(error).into());
    }
    let method = String::from_utf8_lossy(&op.method);
    let bad = |reason: String| -> crate::Error {
        AdapterError::target(MlflowError::BadOp {
            server: shared.client.name().to_owned(),
            seq: op.seq,
            key: String::from_utf8_lossy(&op.key).into_owned(),
            method: method.clone().into_owned(),
            reason,
        })
        .into()
    };
    let Some(request) = method.strip_prefix(&format!("POST {API}/")) else {
        return Err(bad(format!(
            "ferry's MLflow target replays POST {API}/... requests"
        )));
    };
    let body: Value = serde_json::from_slice(&op.body)
        .map_err(|error| bad(format!("its body is not JSON: {error}")))?;
    let replay = Replay { shared, op, body };
    let outcome = match request {
        "experiments/create" => replay.create_experiment().await,
        "experiments/delete" => replay.delete_experiment().await,
        "runs/create" => replay.create_run().await,
        "runs/log-batch" | "runs/log-inputs" | "runs/update" => replay.log(request).await,
        "runs/delete" => replay.delete_run().await,
        "registered-models/create" => replay.create_registered_model().await,
        "model-versions/create" => replay.create_model_version().await,
        "model-versions/transition-stage" | "registered-models/alias" => {
            replay.version_request(request).await
        }
        other => Err(Failure::Bad(format!(
            "{other} is not a request ferry's MLflow target replays"
        ))),
    };
    outcome.map_err(|failure| failure.into_error(|error| AdapterError::target(error).into(), bad))
}

/// An op whose request depends on the target's major version: a trace
/// (see the `traces` module), a logged model or a requirement (see the
/// `logged_models` module).
async fn apply_version_dependent(shared: &Shared, op: &Op) -> Result<(), MlflowError> {
    let generation = *shared
        .trace_generation
        .get_or_try_init(|| async {
            server_version(&shared.client)
                .await
                .map(|version| Generation::of(&version))
        })
        .await?;
    let experiment = |source: &str| lock(&shared.experiments).get(source).cloned();
    let run = |source: &str| lock(&shared.runs).get(source).cloned();
    let ids = TargetIds {
        experiment: &experiment,
        run: &run,
    };
    if op.kind.as_ref() == KIND_REQUIREMENT.as_bytes() {
        logged_models::check_requirement(&shared.client, generation, op)
    } else if op.kind.as_ref() == KIND_LOGGED_MODEL.as_bytes() {
        logged_models::apply(&shared.client, generation, op, &ids).await
    } else {
        traces::apply(&shared.client, generation, op, &ids).await
    }
}

struct Replay<'a> {
    shared: &'a Shared,
    op: &'a Op,
    body: Value,
}

impl Replay<'_> {
    fn client(&self) -> &MlflowClient {
        &self.shared.client
    }

    fn same_ids(&self) -> bool {
        self.shared.same_ids.load(Ordering::Relaxed)
    }

    async fn post(&self, request: &str, body: &Value) -> Result<Value, MlflowError> {
        self.client().post(&format!("{API}/{request}"), body).await
    }

    /// The target's id of a source experiment.
    fn experiment(&self, source: &str) -> Result<String, Failure> {
        lock(&self.shared.experiments)
            .get(source)
            .cloned()
            .ok_or_else(|| {
                Failure::Bad(format!(
                    "its experiment {source} is not on the target (the stream lacks its create)"
                ))
            })
    }

    /// The target's id of a source run.
    fn run(&self, source: &str) -> Result<String, Failure> {
        lock(&self.shared.runs).get(source).cloned().ok_or_else(|| {
            Failure::Bad(format!(
                "its run {source} is not on the target (the stream lacks its create)"
            ))
        })
    }

    async fn experiment_by_name(&self, name: &str) -> Result<Option<Value>, MlflowError> {
        match self
            .client()
            .get(
                &format!("{API}/experiments/get-by-name"),
                &[("experiment_name", name)],
            )
            .await
        {
            Ok(answer) => Ok(Some(answer["experiment"].clone())),
            Err(error) if error.error_code() == Some("RESOURCE_DOES_NOT_EXIST") => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn create_experiment(&self) -> Result<(), Failure> {
        let source_id = text(&self.body, "experiment_id");
        let name = text(&self.body, "name");
        let mut tags = array(&self.body, "tags").to_vec();
        tags.push(json!({ "key": SOURCE_EXPERIMENT_TAG, "value": source_id }));
        loop {
            let existing = self.experiment_by_name(&name).await?;
            let (target_id, deleted) = match &existing {
                Some(experiment) => (
                    text(experiment, "experiment_id"),
                    text(experiment, "lifecycle_stage") == "deleted",
                ),
                None => {
                    let created = self
                        .post("experiments/create", &json!({ "name": name, "tags": tags }))
                        .await?;
                    (text(&created, "experiment_id"), false)
                }
            };
            if let (true, Ok(wanted), Ok(got)) = (
                self.same_ids(),
                source_id.parse::<u64>(),
                target_id.parse::<u64>(),
            ) && got < wanted
                && got != 0
            {
                // An id the source no longer has: fill it as the source
                // did, with an experiment deleted, under another name.
                self.post(
                    "experiments/update",
                    &json!({
                        "experiment_id": target_id,
                        "new_name": format!("ferry-gap-{got}-before-{wanted}"),
                    }),
                )
                .await?;
                if !deleted {
                    self.post("experiments/delete", &json!({ "experiment_id": target_id }))
                        .await?;
                }
                continue;
            }
            lock(&self.shared.experiments).insert(source_id.clone(), target_id.clone());
            if existing.is_some() && !deleted {
                for tag in &tags {
                    self.post(
                        "experiments/set-experiment-tag",
                        &json!({
                            "experiment_id": target_id,
                            "key": tag["key"],
                            "value": tag["value"],
                        }),
                    )
                    .await?;
                }
            }
            return Ok(());
        }
    }

    async fn delete_experiment(&self) -> Result<(), Failure> {
        let target_id = self.experiment(&text(&self.body, "experiment_id"))?;
        let answer = self
            .client()
            .get(
                &format!("{API}/experiments/get"),
                &[("experiment_id", target_id.as_str())],
            )
            .await?;
        if text(&answer["experiment"], "lifecycle_stage") != "deleted" {
            self.post("experiments/delete", &json!({ "experiment_id": target_id }))
                .await?;
        }
        Ok(())
    }

    fn source_run(&self) -> String {
        String::from_utf8_lossy(&self.op.key)
            .strip_prefix("run/")
            .unwrap_or_default()
            .to_owned()
    }

    async fn create_run(&self) -> Result<(), Failure> {
        let source_run = self.source_run();
        if lock(&self.shared.runs).contains_key(&source_run) {
            return Ok(());
        }
        let mut body = self.body.clone();
        body["experiment_id"] = json!(self.experiment(&text(&self.body, "experiment_id"))?);
        body["tags"] = json!([{ "key": SOURCE_RUN_TAG, "value": source_run }]);
        let created = self.post("runs/create", &body).await?;
        let target_run = text(&created["run"]["info"], "run_id");
        if target_run.is_empty() {
            return Err(Failure::Bad(
                "the target's answer to runs/create names no run id".to_owned(),
            ));
        }
        lock(&self.shared.runs).insert(source_run, target_run);
        Ok(())
    }

    /// Whether the target's run is deleted: then every request of it in the
    /// stream was applied before (its deletion is its last).
    async fn run_deleted(&self, target_run: &str) -> Result<bool, MlflowError> {
        let answer = self
            .client()
            .get(&format!("{API}/runs/get"), &[("run_id", target_run)])
            .await?;
        Ok(text(&answer["run"]["info"], "lifecycle_stage") == "deleted")
    }

    async fn log(&self, request: &str) -> Result<(), Failure> {
        let target_run = self.run(&self.source_run())?;
        let mut body = self.body.clone();
        body["run_id"] = json!(target_run);
        if let Some(tags) = body.get_mut("tags").and_then(Value::as_array_mut) {
            for tag in tags {
                if text(tag, "key") == PARENT_RUN_TAG {
                    let parent = text(tag, "value");
                    match lock(&self.shared.runs).get(&parent) {
                        Some(target_parent) => tag["value"] = json!(target_parent),
                        None => tracing::warn!(
                            seq = self.op.seq,
                            run = %self.source_run(),
                            parent = %parent,
                            "the run's parent is not in the stream: its parent tag is kept as the source had it"
                        ),
                    }
                }
            }
        }
        match self.post(request, &body).await {
            Ok(_) => Ok(()),
            Err(error @ MlflowError::Refused { .. }) => {
                if self.run_deleted(&target_run).await? {
                    Ok(())
                } else if request == "runs/log-batch" && holds_again(&error) {
                    self.log_nan_points_one_by_one(body).await
                } else {
                    Err(error.into())
                }
            }
            Err(error) => Err(error.into()),
        }
    }

    /// A `log-batch` sent again after a kill, refused by a 2.x server
    /// because a NaN point of it is already there (its check for points it
    /// holds never matches NaN, then the insert breaks the primary key, and
    /// the whole batch is rolled back): the batch again without its NaN
    /// points, then each NaN point alone, where "already there" means it
    /// is.
    async fn log_nan_points_one_by_one(&self, mut body: Value) -> Result<(), Failure> {
        let metrics = std::mem::take(&mut body["metrics"]);
        let (nan, others): (Vec<Value>, Vec<Value>) = metrics
            .as_array()
            .into_iter()
            .flatten()
            .cloned()
            .partition(|metric| metric["value"] == "NaN");
        if nan.is_empty() {
            return Err(Failure::Bad(
                "the server says a point of this log-batch is already there, and none is NaN"
                    .to_owned(),
            ));
        }
        body["metrics"] = json!(others);
        self.post("runs/log-batch", &body).await?;
        for point in nan {
            let alone = json!({ "run_id": body["run_id"], "metrics": [point] });
            match self.post("runs/log-batch", &alone).await {
                Ok(_) => {}
                Err(error @ MlflowError::Refused { .. }) if holds_again(&error) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    async fn delete_run(&self) -> Result<(), Failure> {
        let target_run = self.run(&self.source_run())?;
        if self.run_deleted(&target_run).await? {
            return Ok(());
        }
        self.post("runs/delete", &json!({ "run_id": target_run }))
            .await?;
        Ok(())
    }

    async fn create_registered_model(&self) -> Result<(), Failure> {
        let name = text(&self.body, "name");
        let existing = self
            .client()
            .get(
                &format!("{API}/registered-models/get"),
                &[("name", name.as_str())],
            )
            .await;
        match existing {
            Ok(_) => {
                for tag in array(&self.body, "tags") {
                    self.post(
                        "registered-models/set-tag",
                        &json!({ "name": name, "key": tag["key"], "value": tag["value"] }),
                    )
                    .await?;
                }
                Ok(())
            }
            Err(error) if error.error_code() == Some("RESOURCE_DOES_NOT_EXIST") => {
                self.post("registered-models/create", &self.body).await?;
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The target's number of a source model version.
    /// The target's number of a source's model version: the same into a
    /// target that was empty, else what the map says, read back from the
    /// versions' `ferry.source_version` tags after a resume.
    async fn version(&self, name: &str, source_version: &str) -> Result<String, MlflowError> {
        if !self.same_ids() {
            self.read_versions(name).await?;
        }
        Ok(lock(&self.shared.versions)
            .get(&(name.to_owned(), source_version.to_owned()))
            .cloned()
            .unwrap_or_else(|| source_version.to_owned()))
    }

    /// Reads into the map, once per model, which of the target's versions
    /// of `name` were made from which source version (their tag).
    async fn read_versions(&self, name: &str) -> Result<(), MlflowError> {
        if lock(&self.shared.versions_read).contains(name) {
            return Ok(());
        }
        // A prompt's versions are found only by a search naming its tag.
        for prompt in [false, true] {
            for version in model_versions(self.client(), name, prompt).await? {
                if let Some(source) = tag_value(&version, SOURCE_VERSION_TAG) {
                    lock(&self.shared.versions)
                        .insert((name.to_owned(), source), text(&version, "version"));
                }
            }
        }
        lock(&self.shared.versions_read).insert(name.to_owned());
        Ok(())
    }

    async fn model_version_exists(&self, name: &str, version: &str) -> Result<bool, MlflowError> {
        match self
            .client()
            .get(
                &format!("{API}/model-versions/get"),
                &[("name", name), ("version", version)],
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(error) if error.error_code() == Some("RESOURCE_DOES_NOT_EXIST") => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn create_model_version(&self) -> Result<(), Failure> {
        let name = text(&self.body, "name");
        let wanted = text(&self.body, "version");
        if self.same_ids() {
            if self.model_version_exists(&name, &wanted).await? {
                return Ok(());
            }
        } else {
            self.read_versions(&name).await?;
            if lock(&self.shared.versions).contains_key(&(name.clone(), wanted.clone())) {
                return Ok(());
            }
        }
        let mut body = self.body.clone();
        if let Some(object) = body.as_object_mut() {
            object.remove("version");
        }
        if !self.same_ids() {
            // Numbers may differ: the version says which source version it
            // is, in the request that makes it, so a replay finds it.
            let mut tags = array(&self.body, "tags").to_vec();
            tags.push(json!({ "key": SOURCE_VERSION_TAG, "value": wanted }));
            body["tags"] = json!(tags);
        }
        let source_run = text(&self.body, "run_id");
        if !source_run.is_empty() {
            let target_run = self.run(&source_run)?;
            body["run_id"] = json!(target_run);
            let source = text(&self.body, "source");
            if !source.is_empty() {
                body["source"] = json!(
                    self.version_source(&source, &source_run, &target_run)
                        .await?
                );
            }
            let link = text(&self.body, "run_link");
            if !link.is_empty() {
                body["run_link"] = json!(self.run_link(&link, &source_run, &target_run)?);
            }
        }
        loop {
            let created = self.post("model-versions/create", &body).await?;
            let got = text(&created["model_version"], "version");
            match (wanted.parse::<u64>(), got.parse::<u64>()) {
                (Ok(wanted_number), Ok(got_number))
                    if self.same_ids() && got_number < wanted_number =>
                {
                    // A number the source deleted: deleted here too.
                    self.client()
                        .delete(
                            &format!("{API}/model-versions/delete"),
                            &json!({ "name": name, "version": got }),
                        )
                        .await?;
                }
                _ => {
                    lock(&self.shared.versions).insert((name, wanted), got);
                    return Ok(());
                }
            }
        }
    }

    /// A version's source on the target: under the target run's
    /// artifacts where it was under the source run's (the server checks
    /// that the run holds it, and with mapped ids the experiment in the
    /// path differs too), else with the run's id replaced.
    async fn version_source(
        &self,
        source: &str,
        source_run: &str,
        target_run: &str,
    ) -> Result<String, Failure> {
        let artifacts = format!("/{source_run}/artifacts");
        match source.find(&artifacts) {
            Some(at) if !self.same_ids() => {
                let run = self
                    .client()
                    .get(&format!("{API}/runs/get"), &[("run_id", target_run)])
                    .await?;
                let artifact_uri = text(&run["run"]["info"], "artifact_uri");
                Ok(format!("{artifact_uri}{}", &source[at + artifacts.len()..]))
            }
            _ => Ok(source.replace(source_run, target_run)),
        }
    }

    /// A version's link to its run (`.../#/experiments/<id>/runs/<id>`)
    /// with the target's ids.
    fn run_link(&self, link: &str, source_run: &str, target_run: &str) -> Result<String, Failure> {
        let run_part = format!("/runs/{source_run}");
        let Some(at) = link.find(&run_part) else {
            return Ok(link.replace(source_run, target_run));
        };
        let before = &link[..at];
        let experiment_at = before
            .rfind("/experiments/")
            .map(|found| found + "/experiments/".len());
        let rest = &link[at + run_part.len()..];
        Ok(match experiment_at {
            Some(start)
                if !self.same_ids() && before[start..].bytes().all(|b| b.is_ascii_digit()) =>
            {
                let experiment = self.experiment(&before[start..])?;
                format!("{}{experiment}/runs/{target_run}{rest}", &before[..start])
            }
            _ => format!("{before}/runs/{target_run}{rest}"),
        })
    }

    async fn version_request(&self, request: &str) -> Result<(), Failure> {
        let name = text(&self.body, "name");
        let mut body = self.body.clone();
        body["version"] = json!(self.version(&name, &text(&self.body, "version")).await?);
        self.post(request, &body).await?;
        Ok(())
    }
}

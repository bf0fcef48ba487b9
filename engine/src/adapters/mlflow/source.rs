//! The MLflow source: a crawl of the server through its REST API, paged,
//! sent as ops while it goes (see the module's table for the ops).
//!
//! Requests: one `experiments/search` page per 1,000 experiments; one
//! `runs/search` page per 100 runs (params, tags, inputs and the latest
//! metrics come with it); for each metric key, one bulk history call per
//! 80 runs (`get-history-bulk`: as many run ids as its request line holds,
//! taken across pages and experiments; at most 25,000 points a call: runs
//! past a full answer are asked again, and a single run whose history does
//! not fit is read with `get-history` alone), 4 calls in flight, a page
//! ahead of the ops; one search per 1,000 registered models and per
//! model's versions.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::client::MlflowClient;
use super::logged_models::{self, LOGGED_MODELS_REQUIREMENT};
use super::traces::{self, Generation};
use super::{
    API, CHECKPOINT_TAG_PREFIX, KIND_EXPERIMENT, KIND_LOGGED_MODEL, KIND_MODEL_VERSION,
    KIND_REGISTERED_MODEL, KIND_REQUIREMENT, KIND_RUN, KIND_TRACE, MlflowError, PARENT_RUN_TAG,
    SOURCE_EXPERIMENT_TAG, SOURCE_RUN_TAG, SOURCE_VERSION_TAG,
};
use crate::adapters::{AdapterError, Extraction, Source};
use crate::manifest::SourceInfo;
use crate::progress::Progress;
use crate::{Op, Result};

/// Runs asked for at once.
const RUN_PAGE: usize = 100;
/// Runs a bulk history call takes at most (the server's limit).
const BULK_RUNS: usize = 100;
/// Points a bulk history call returns at most (the server's limit).
const BULK_POINTS: usize = 25_000;
/// The bytes of a bulk history call's request line its run ids may take
/// (gunicorn's limit is 4,094 for the whole line: the path, a key of up to
/// [`BULK_KEY_BYTES`] encoded, and `max_results` take the rest). 32-hex
/// run ids: 80 a call.
const BULK_RUN_ID_BYTES: usize = 3_200;
/// A metric key's encoded bytes the request line leaves room for besides
/// the run ids; a longer key takes run ids' room.
const BULK_KEY_BYTES: usize = 750;
/// Bulk history calls in flight at once. A one-worker server answers one
/// at a time: a second in flight keeps it busy while ferry reads the
/// answer before; more serve servers with more workers.
const HISTORY_CALLS_IN_FLIGHT: usize = 4;
/// A `log-batch`'s limits (MLflow's own): entities in all, metrics, params
/// and tags, and bytes (below the server's 1 MB, for the envelope).
const BATCH_ENTITIES: usize = 1_000;
const BATCH_PARAMS: usize = 100;
const BATCH_TAGS: usize = 100;
const BATCH_BYTES: usize = 900_000;
/// The search filter that finds prompts (registered models and versions
/// tagged as prompts).
const PROMPT_FILTER: &str = "tags.`mlflow.prompt.is_prompt` = 'true'";
/// Ops sent to the stream at once, at most.
const OPS_PER_BATCH: usize = 1_000;
/// Bytes of op bodies sent to the stream at once, about: a run's metric
/// batches are up to 900 kB each, so a count alone would hold tens of MB
/// (and hold them back from a restore following the extract).
const BATCH_BODY_BYTES: usize = 1 << 20;

/// An MLflow tracking server to extract.
pub struct MlflowSource {
    client: Arc<MlflowClient>,
}

impl MlflowSource {
    /// A source reading the server `client` talks to.
    pub fn new(client: Arc<MlflowClient>) -> Self {
        Self { client }
    }
}

/// Every experiment of the server, deleted ones too, in id order (numeric
/// where the ids are numbers, as a SQL store's are).
pub(super) async fn all_experiments(client: &MlflowClient) -> Result<Vec<Value>, MlflowError> {
    let mut experiments = Vec::new();
    let mut page_token: Option<String> = None;
    loop {
        let mut request = json!({ "max_results": 1000, "view_type": "ALL" });
        if let Some(token) = &page_token {
            request["page_token"] = json!(token);
        }
        let page = client
            .post(&format!("{API}/experiments/search"), &request)
            .await?;
        experiments.extend(array(&page, "experiments").iter().cloned());
        page_token = next_page(&page);
        if page_token.is_none() {
            break;
        }
    }
    experiments.sort_by_key(|experiment| id_order(&text(experiment, "experiment_id")));
    Ok(experiments)
}

/// The server's version (`GET /version`).
/// Every version of the registered model `name` (of the prompt `name`
/// when `prompt`: a search finds a prompt's versions only by their tag).
pub(super) async fn model_versions(
    client: &MlflowClient,
    name: &str,
    prompt: bool,
) -> Result<Vec<Value>, MlflowError> {
    let filter = name_filter(name).ok_or_else(|| MlflowError::BadResponse {
        server: client.name().to_owned(),
        request: "GET model-versions/search".to_owned(),
        reason: format!(
            "registered model {name:?} holds both kinds of quote, which MLflow's search filter cannot name"
        ),
    })?;
    let filter = if prompt {
        format!("{filter} AND {PROMPT_FILTER}")
    } else {
        filter
    };
    let mut versions = Vec::new();
    let mut page_token: Option<String> = None;
    loop {
        let mut query = vec![("filter", filter.as_str()), ("max_results", "1000")];
        if let Some(token) = &page_token {
            query.push(("page_token", token));
        }
        let page = client
            .get(&format!("{API}/model-versions/search"), &query)
            .await?;
        versions.extend(array(&page, "model_versions").iter().cloned());
        page_token = next_page(&page);
        if page_token.is_none() {
            return Ok(versions);
        }
    }
}

pub(super) async fn server_version(client: &MlflowClient) -> Result<String, MlflowError> {
    let version = client.get_text("/version").await?;
    if version.is_empty() || version.len() > 64 || version.contains(char::is_whitespace) {
        return Err(MlflowError::BadResponse {
            server: client.name().to_owned(),
            request: "GET /version".to_owned(),
            reason: format!("{version:?} is not a version: is this an MLflow tracking server?"),
        });
    }
    Ok(version)
}

#[async_trait]
impl Source for MlflowSource {
    async fn open(self: Box<Self>, progress: Arc<Progress>) -> Result<Extraction> {
        let version = server_version(&self.client)
            .await
            .map_err(AdapterError::source)?;
        let info = SourceInfo {
            platform: "mlflow".to_owned(),
            platform_version: Some(version.clone()),
            identity: None,
            snapshot_position: None,
            key_prefix: None,
            description: Some(format!("MLflow {version} tracking server")),
        };
        let (sender, receiver) = mpsc::channel(4);
        let crawl = Crawl {
            client: self.client,
            version: Bytes::from(version),
            sender,
            batch: Vec::new(),
            batch_bytes: 0,
            next_seq: 1,
            emitted_runs: HashSet::new(),
            pages: None,
            progress,
        };
        tokio::spawn(crawl.run());
        let ops = tokio_stream::wrappers::ReceiverStream::new(receiver).boxed();
        Ok(Extraction { info, ops })
    }
}

/// Why a crawl stopped early.
enum Halt {
    /// The server failed: sent down the stream.
    Failed(MlflowError),
    /// Whoever read the stream went away.
    Closed,
}

impl From<MlflowError> for Halt {
    fn from(error: MlflowError) -> Self {
        Halt::Failed(error)
    }
}

/// The histories of one page of runs: points by run and key, and the
/// (run, key) pairs to read alone because they did not fit a bulk call.
#[derive(Default)]
struct Histories {
    points: HashMap<String, BTreeMap<String, Vec<Value>>>,
    alone: HashSet<(String, String)>,
}

impl Histories {
    /// The histories of `runs`, taken out.
    fn take_runs(&mut self, runs: &[Value]) -> Histories {
        let run_ids: HashSet<String> = runs
            .iter()
            .map(|run| text(&run["info"], "run_id"))
            .collect();
        let mut taken = Histories::default();
        for run_id in &run_ids {
            if let Some(points) = self.points.remove(run_id) {
                taken.points.insert(run_id.clone(), points);
            }
        }
        let (theirs, ours) = std::mem::take(&mut self.alone)
            .into_iter()
            .partition(|(run_id, _)| run_ids.contains(run_id));
        taken.alone = theirs;
        self.alone = ours;
        taken
    }
}

struct Crawl {
    client: Arc<MlflowClient>,
    version: Bytes,
    sender: mpsc::Sender<Result<Vec<Op>>>,
    batch: Vec<Op>,
    /// The bodies' bytes in `batch`.
    batch_bytes: usize,
    next_seq: u64,
    /// Runs already sent: a child run names its parent in `deps` only when
    /// the parent's create came first.
    emitted_runs: HashSet<String>,
    /// The experiments' runs, read a page ahead.
    pages: Option<PageReader>,
    progress: Arc<Progress>,
}

impl Crawl {
    async fn run(mut self) {
        let outcome = match self.crawl().await {
            Ok(()) => self.flush().await,
            Err(halt) => Err(halt),
        };
        if let Err(Halt::Failed(error)) = outcome {
            let _ = self
                .sender
                .send(Err(AdapterError::source(error).into()))
                .await;
        }
    }

    async fn crawl(&mut self) -> Result<(), Halt> {
        let experiments = all_experiments(&self.client).await?;
        let generation = Generation::of(&String::from_utf8_lossy(&self.version));
        let experiment_ids: Vec<String> = experiments
            .iter()
            .map(|experiment| text(experiment, "experiment_id"))
            .collect();
        if generation == Generation::V3 {
            // What a 2.x target cannot keep is said first, so a restore
            // onto one refuses before it writes anything.
            let models = logged_models::requirement(&self.client, &experiment_ids).await?;
            let assessments =
                traces::assessments_requirement(&self.client, &experiment_ids).await?;
            for (key, body) in [
                (LOGGED_MODELS_REQUIREMENT, models),
                (traces::ASSESSMENTS_REQUIREMENT, assessments),
            ] {
                if let Some(body) = body {
                    self.push_method(
                        KIND_REQUIREMENT,
                        key.to_owned(),
                        "GET /version".to_owned(),
                        &body,
                        Vec::new(),
                    )
                    .await?;
                }
            }
        }
        for experiment in &experiments {
            let id = text(experiment, "experiment_id");
            let tags = without_ferry_tags(array(experiment, "tags"));
            let body = json!({
                "experiment_id": id,
                "name": text(experiment, "name"),
                "artifact_location": text(experiment, "artifact_location"),
                "tags": tags,
            });
            self.push(
                KIND_EXPERIMENT,
                format!("experiment/{id}"),
                "experiments/create",
                &body,
                Vec::new(),
            )
            .await?;
        }
        // The experiments go now: the first runs wait for a bulk call's
        // worth of histories, and a following restore can start on these.
        self.flush().await?;
        self.pages = Some(PageReader::spawn(
            self.client.clone(),
            experiments
                .iter()
                .map(|experiment| text(experiment, "experiment_id"))
                .collect(),
        ));
        for experiment in &experiments {
            self.runs_of(&text(experiment, "experiment_id")).await?;
        }
        self.pages = None;
        if generation == Generation::V3 {
            for experiment_id in &experiment_ids {
                self.logged_models_of(experiment_id).await?;
            }
        }
        for experiment in &experiments {
            self.traces_of(&text(experiment, "experiment_id")).await?;
        }
        for experiment in &experiments {
            if text(experiment, "lifecycle_stage") == "deleted" {
                let id = text(experiment, "experiment_id");
                self.push(
                    KIND_EXPERIMENT,
                    format!("experiment/{id}"),
                    "experiments/delete",
                    &json!({ "experiment_id": id }),
                    Vec::new(),
                )
                .await?;
            }
        }
        self.registered_models().await
    }

    /// The runs of one experiment, in start-time order, a page at a time,
    /// as the page reader (a page ahead of this) gives them.
    async fn runs_of(&mut self, experiment_id: &str) -> Result<(), Halt> {
        // A child run whose parent has not been sent yet waits for it.
        let mut waiting: HashMap<String, Vec<(Value, Histories)>> = HashMap::new();
        loop {
            let Some(pages) = self.pages.as_mut() else {
                return Err(Halt::Failed(
                    self.out_of_step(experiment_id, "no page reader"),
                ));
            };
            let page = match pages.receiver.recv().await {
                Some(Ok(page)) => page,
                Some(Err(error)) => return Err(Halt::Failed(error)),
                None => {
                    return Err(Halt::Failed(
                        self.out_of_step(experiment_id, "the page reader ended"),
                    ));
                }
            };
            if page.experiment_id != experiment_id {
                let reason = format!("the page reader is at experiment {}", page.experiment_id);
                return Err(Halt::Failed(self.out_of_step(experiment_id, &reason)));
            }
            let RunPage {
                runs,
                mut histories,
                last,
                ..
            } = page;
            for run in runs {
                let own = histories.take_runs(std::slice::from_ref(&run));
                match parent_of(&run) {
                    Some(parent) if !self.emitted_runs.contains(&parent) => {
                        waiting.entry(parent).or_default().push((run, own));
                    }
                    _ => self.send_with_children(run, own, &mut waiting).await?,
                }
            }
            // A page's ops go as it ends, not when a thousand have piled up.
            self.flush().await?;
            if last {
                break;
            }
        }
        // Parents that are not in this experiment (or not at all): their
        // children go now, the parent tag kept as it is.
        let mut orphans: Vec<(Value, Histories)> = waiting.into_values().flatten().collect();
        orphans.sort_by_key(|(run, _)| number(&run["info"], "start_time"));
        let mut none = HashMap::new();
        for (run, own) in orphans {
            self.send_with_children(run, own, &mut none).await?;
        }
        Ok(())
    }

    /// The page reader is not where the crawl is: a bug, said as one.
    fn out_of_step(&self, experiment_id: &str, reason: &str) -> MlflowError {
        MlflowError::BadResponse {
            server: self.client.name().to_owned(),
            request: format!("POST {API}/runs/search of experiment {experiment_id}"),
            reason: format!(
                "ferry's page reader is out of step with its crawl ({reason}): a bug in ferry"
            ),
        }
    }

    /// Sends `run`, then the runs waiting for it, depth first.
    async fn send_with_children(
        &mut self,
        run: Value,
        histories: Histories,
        waiting: &mut HashMap<String, Vec<(Value, Histories)>>,
    ) -> Result<(), Halt> {
        let mut stack = vec![(run, histories)];
        while let Some((run, histories)) = stack.pop() {
            let run_id = text(&run["info"], "run_id");
            self.send_run(&run, histories).await?;
            if let Some(children) = waiting.remove(&run_id) {
                stack.extend(children.into_iter().rev());
            }
        }
        Ok(())
    }

    /// A run's ops: create, its params, tags and metrics in `log-batch`es,
    /// its dataset inputs, its end, its deletion.
    async fn send_run(&mut self, run: &Value, mut histories: Histories) -> Result<(), Halt> {
        let info = &run["info"];
        let run_id = text(info, "run_id");
        let experiment_id = text(info, "experiment_id");
        let key = format!("run/{run_id}");
        let mut deps = vec![format!("experiment/{experiment_id}")];
        if let Some(parent) = parent_of(run)
            && self.emitted_runs.contains(&parent)
        {
            deps.push(format!("run/{parent}"));
        }
        let mut create = json!({
            "experiment_id": experiment_id,
            "start_time": number(info, "start_time"),
        });
        for field in ["run_name", "user_id"] {
            if let Some(value) = info.get(field).filter(|value| !value.is_null()) {
                create[field] = value.clone();
            }
        }
        self.push(KIND_RUN, key.clone(), "runs/create", &create, deps)
            .await?;
        self.emitted_runs.insert(run_id.clone());

        let mut batch = LogBatch::new(&run_id);
        for param in array(&run["data"], "params") {
            if let Some(body) = batch.add(Entity::Param, param) {
                self.push(KIND_RUN, key.clone(), "runs/log-batch", &body, Vec::new())
                    .await?;
            }
        }
        for tag in array(&run["data"], "tags") {
            if is_ferry_tag(&text(tag, "key")) {
                continue;
            }
            if let Some(body) = batch.add(Entity::Tag, tag) {
                self.push(KIND_RUN, key.clone(), "runs/log-batch", &body, Vec::new())
                    .await?;
            }
        }
        let own_points = histories.points.remove(&run_id).unwrap_or_default();
        for points in own_points.into_values() {
            for point in points {
                if let Some(body) = batch.add(Entity::Metric, &point) {
                    self.push(KIND_RUN, key.clone(), "runs/log-batch", &body, Vec::new())
                        .await?;
                }
            }
        }
        let mut alone: Vec<String> = histories
            .alone
            .into_iter()
            .filter(|(run, _)| *run == run_id)
            .map(|(_, metric)| metric)
            .collect();
        alone.sort();
        for metric in alone {
            let mut page_token: Option<String> = None;
            loop {
                let mut query = vec![
                    ("run_id", run_id.as_str()),
                    ("metric_key", metric.as_str()),
                    ("max_results", "25000"),
                ];
                if let Some(token) = &page_token {
                    query.push(("page_token", token));
                }
                let page = self
                    .client
                    .get(&format!("{API}/metrics/get-history"), &query)
                    .await?;
                for point in array(&page, "metrics") {
                    if let Some(body) = batch.add(Entity::Metric, point) {
                        self.push(KIND_RUN, key.clone(), "runs/log-batch", &body, Vec::new())
                            .await?;
                    }
                }
                page_token = next_page(&page);
                if page_token.is_none() {
                    break;
                }
            }
        }
        if let Some(body) = batch.finish() {
            self.push(KIND_RUN, key.clone(), "runs/log-batch", &body, Vec::new())
                .await?;
        }

        let inputs = array(&run["inputs"], "dataset_inputs");
        if !inputs.is_empty() {
            let body = json!({ "run_id": run_id, "datasets": inputs });
            self.push(KIND_RUN, key.clone(), "runs/log-inputs", &body, Vec::new())
                .await?;
        }
        let status = text(info, "status");
        let end_time = info.get("end_time").filter(|value| !value.is_null());
        if status != "RUNNING" || end_time.is_some() {
            let mut update = json!({ "run_id": run_id, "status": status });
            if let Some(end_time) = end_time {
                update["end_time"] = end_time.clone();
            }
            if let Some(name) = info.get("run_name").filter(|value| !value.is_null()) {
                update["run_name"] = name.clone();
            }
            self.push(KIND_RUN, key.clone(), "runs/update", &update, Vec::new())
                .await?;
        }
        if text(info, "lifecycle_stage") == "deleted" {
            self.push(
                KIND_RUN,
                key,
                "runs/delete",
                &json!({ "run_id": run_id }),
                Vec::new(),
            )
            .await?;
        }
        Ok(())
    }

    /// Registered models, each with its versions in number order, their
    /// stages, then the model's aliases.
    /// Then the prompts: registered models tagged as prompts, which MLflow's
    /// searches leave out unless the filter names that tag.
    async fn registered_models(&mut self) -> Result<(), Halt> {
        for prompts in [false, true] {
            let mut page_token: Option<String> = None;
            loop {
                let mut query = vec![("max_results", "1000")];
                if prompts {
                    query.push(("filter", PROMPT_FILTER));
                }
                if let Some(token) = &page_token {
                    query.push(("page_token", token));
                }
                let page = self
                    .client
                    .get(&format!("{API}/registered-models/search"), &query)
                    .await?;
                for model in array(&page, "registered_models").to_vec() {
                    self.registered_model(&model, prompts).await?;
                }
                page_token = next_page(&page);
                if page_token.is_none() {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn registered_model(&mut self, model: &Value, prompt: bool) -> Result<(), Halt> {
        let name = text(model, "name");
        let key = format!("registered_model/{name}");
        let mut create = json!({ "name": name, "tags": array(model, "tags") });
        if let Some(description) = model.get("description").filter(|value| !value.is_null()) {
            create["description"] = description.clone();
        }
        self.push(
            KIND_REGISTERED_MODEL,
            key.clone(),
            "registered-models/create",
            &create,
            Vec::new(),
        )
        .await?;
        let mut versions = model_versions(&self.client, &name, prompt).await?;
        versions.sort_by_key(|version| id_order(&text(version, "version")));
        for version in &versions {
            let number = text(version, "version");
            let version_key = format!("model_version/{name}/{number}");
            let mut create = json!({
                "name": name,
                "version": number,
                "source": text(version, "source"),
                "tags": without_ferry_tags(array(version, "tags")),
            });
            for field in ["run_id", "run_link", "description"] {
                if let Some(value) = version
                    .get(field)
                    .filter(|value| value.as_str().is_some_and(|text| !text.is_empty()))
                {
                    create[field] = value.clone();
                }
            }
            let mut deps = vec![key.clone()];
            let run_id = text(version, "run_id");
            if self.emitted_runs.contains(&run_id) {
                deps.push(format!("run/{run_id}"));
            }
            self.push(
                KIND_MODEL_VERSION,
                version_key.clone(),
                "model-versions/create",
                &create,
                deps,
            )
            .await?;
            let stage = text(version, "current_stage");
            if !stage.is_empty() && stage != "None" {
                let body = json!({
                    "name": name,
                    "version": number,
                    "stage": stage,
                    "archive_existing_versions": false,
                });
                self.push(
                    KIND_MODEL_VERSION,
                    version_key,
                    "model-versions/transition-stage",
                    &body,
                    Vec::new(),
                )
                .await?;
            }
        }
        let mut aliases = array(model, "aliases").to_vec();
        aliases.sort_by_key(|alias| text(alias, "alias"));
        for alias in aliases {
            let body = json!({
                "name": name,
                "alias": text(&alias, "alias"),
                "version": text(&alias, "version"),
            });
            // An alias is kept with the version it names (one version may
            // have several; a version chain may add more to it).
            self.push(
                KIND_MODEL_VERSION,
                format!("model_version/{name}/{}", text(&alias, "version")),
                "registered-models/alias",
                &body,
                Vec::new(),
            )
            .await?;
        }
        Ok(())
    }

    /// The logged models of one experiment (3.x), a page at a time.
    async fn logged_models_of(&mut self, experiment_id: &str) -> Result<(), Halt> {
        let mut page_token: Option<String> = None;
        loop {
            let (models, next) = logged_models::page(
                &self.client,
                &[experiment_id.to_owned()],
                page_token.as_deref(),
            )
            .await?;
            for model in models {
                let body = logged_models::op_body(&model);
                let mut deps = vec![format!("experiment/{experiment_id}")];
                let run = text(&body, "source_run_id");
                if self.emitted_runs.contains(&run) {
                    deps.push(format!("run/{run}"));
                }
                self.push_method(
                    KIND_LOGGED_MODEL,
                    format!("logged_model/{}", text(&body, "model_id")),
                    format!("POST {API}/logged-models"),
                    &body,
                    deps,
                )
                .await?;
            }
            page_token = next;
            if page_token.is_none() {
                return Ok(());
            }
        }
    }

    /// The traces of one experiment, a page at a time, each as one op
    /// (see the `traces` module).
    async fn traces_of(&mut self, experiment_id: &str) -> Result<(), Halt> {
        let generation = Generation::of(&String::from_utf8_lossy(&self.version));
        let mut page_token: Option<String> = None;
        loop {
            let page = traces::page(
                &self.client,
                generation,
                experiment_id,
                page_token.as_deref(),
            )
            .await?;
            for trace in page.traces {
                let mut deps = vec![format!("experiment/{experiment_id}")];
                if let Some(run) = trace.run.filter(|run| self.emitted_runs.contains(run)) {
                    deps.push(format!("run/{run}"));
                }
                self.push_method(KIND_TRACE, trace.key, trace.method, &trace.body, deps)
                    .await?;
            }
            page_token = page.next_page_token;
            if page_token.is_none() {
                return Ok(());
            }
        }
    }

    /// Adds an op to the stream.
    async fn push(
        &mut self,
        kind: &'static str,
        key: String,
        request: &str,
        body: &Value,
        deps: Vec<String>,
    ) -> Result<(), Halt> {
        self.push_method(kind, key, format!("POST {API}/{request}"), body, deps)
            .await
    }

    /// Adds an op whose method is given whole (`POST /api/3.0/...`).
    async fn push_method(
        &mut self,
        kind: &'static str,
        key: String,
        method: String,
        body: &Value,
        deps: Vec<String>,
    ) -> Result<(), Halt> {
        let body = serde_json::to_vec(body).map_err(|error| {
            Halt::Failed(MlflowError::BadResponse {
                server: self.client.name().to_owned(),
                request: method.clone(),
                reason: format!("cannot encode the op: {error}"),
            })
        })?;
        let op = Op {
            seq: self.next_seq,
            position: 0,
            txn: 0,
            txn_last: true,
            kind: Bytes::from_static(kind.as_bytes()),
            key: Bytes::from(key),
            method: Bytes::from(method),
            body: Bytes::from(body),
            content_type: Bytes::from_static(b"application/json"),
            platform_version: self.version.clone(),
            deps: deps.into_iter().map(Bytes::from).collect(),
        };
        self.next_seq += 1;
        Progress::add(&self.progress.bytes_read, op.body.len() as u64);
        self.batch_bytes += op.body.len();
        self.batch.push(op);
        if self.batch.len() >= OPS_PER_BATCH || self.batch_bytes >= BATCH_BODY_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Halt> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.sender.send(Ok(batch)).await.map_err(|_| Halt::Closed)
    }
}

/// One page of an experiment's runs with their metric histories, read
/// ahead of the ops being sent.
struct RunPage {
    experiment_id: String,
    runs: Vec<Value>,
    histories: Histories,
    /// The experiment's last page.
    last: bool,
}

/// The task reading runs and their histories ahead of the crawl
/// (experiment after experiment, in the crawl's order), so the server is
/// asked for the next runs while the current ones are turned into ops.
///
/// A bulk history call costs the server a scan of every point of its key
/// (SQLite's index leads with the key, not the run), so the reader fills
/// its calls: it takes runs in the crawl's order across pages and
/// experiments, as many a call as fit (see [`runs_per_call`]), and hands a
/// page over once all its runs are read. It holds at most one call's runs
/// and the page that overflowed it, besides the page in the channel and
/// the crawl's.
struct PageReader {
    receiver: mpsc::Receiver<Result<RunPage, MlflowError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PageReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PageReader {
    fn spawn(client: Arc<MlflowClient>, experiment_ids: Vec<String>) -> Self {
        let (sender, receiver) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            if let Err(error) = read_pages(&client, experiment_ids, &sender).await {
                let _ = sender.send(Err(error)).await;
            }
        });
        Self { receiver, task }
    }
}

/// The page reader's work; stops quietly when the crawl went away.
///
/// Runs are taken in the crawl's order across pages and experiments; a
/// bulk call is made for as many of them as fit one (by count and by the
/// request line's length), and a page is handed over once all its runs are
/// read.
async fn read_pages(
    client: &MlflowClient,
    experiment_ids: Vec<String>,
    sender: &mpsc::Sender<Result<RunPage, MlflowError>>,
) -> Result<(), MlflowError> {
    let mut pending: VecDeque<RunPage> = VecDeque::new();
    // Runs at the front of `pending` whose histories are read, into `read`.
    let mut read_through = 0;
    let mut read = Histories::default();
    let count = experiment_ids.len();
    for (index, experiment_id) in experiment_ids.into_iter().enumerate() {
        let mut page_token: Option<String> = None;
        loop {
            let (page, next) = run_page(client, &experiment_id, page_token.as_deref()).await?;
            pending.push_back(page);
            page_token = next;
            let end = page_token.is_none() && index + 1 == count;
            loop {
                let unread: Vec<&Value> = pending
                    .iter()
                    .flat_map(|page| &page.runs)
                    .skip(read_through)
                    .collect();
                let fits = runs_per_call(unread.iter().map(|run| run_id_of(run)), 0);
                let full = fits < unread.len() || fits == BULK_RUNS;
                if unread.is_empty() || !(full || end) {
                    break;
                }
                let chunk = histories(client, &unread[..fits]).await?;
                read.points.extend(chunk.points);
                read.alone.extend(chunk.alone);
                read_through += fits;
            }
            while pending
                .front()
                .is_some_and(|page| page.runs.len() <= read_through)
            {
                let Some(mut page) = pending.pop_front() else {
                    break;
                };
                read_through -= page.runs.len();
                page.histories = read.take_runs(&page.runs);
                if sender.send(Ok(page)).await.is_err() {
                    return Ok(());
                }
            }
            if page_token.is_none() {
                break;
            }
        }
    }
    Ok(())
}

/// How many of `run_ids` (from the first) one bulk call takes: at most
/// [`BULK_RUNS`], and no more than fit [`BULK_RUN_ID_BYTES`] of its
/// request line, less what a long key takes beyond its room
/// (`key_excess`; a gunicorn server refuses a line over 4,094 bytes); one
/// at least.
fn runs_per_call<'a>(run_ids: impl Iterator<Item = &'a str>, key_excess: usize) -> usize {
    let budget = BULK_RUN_ID_BYTES.saturating_sub(key_excess);
    let mut bytes = 0;
    let mut fits = 0;
    for run_id in run_ids.take(BULK_RUNS) {
        // `run_id=ID&`, the id as it is encoded.
        bytes += "run_id=&".len() + encoded_len(run_id);
        if bytes > budget && fits > 0 {
            break;
        }
        fits += 1;
    }
    fits
}

/// The length of `text` in a URL's query, at most (every byte that is not
/// left as it is takes three).
fn encoded_len(text: &str) -> usize {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
                1
            } else {
                3
            }
        })
        .sum()
}

fn run_id_of(run: &Value) -> &str {
    run["info"]["run_id"].as_str().unwrap_or_default()
}

/// A page of an experiment's runs, in start-time order (their histories
/// not read yet); the next page's token.
async fn run_page(
    client: &MlflowClient,
    experiment_id: &str,
    page_token: Option<&str>,
) -> Result<(RunPage, Option<String>), MlflowError> {
    let mut request = json!({
        "experiment_ids": [experiment_id],
        "run_view_type": "ALL",
        "max_results": RUN_PAGE,
        "order_by": ["attributes.start_time ASC"],
    });
    if let Some(token) = page_token {
        request["page_token"] = json!(token);
    }
    let mut page = client.post(&format!("{API}/runs/search"), &request).await?;
    let runs = match page.get_mut("runs").map(Value::take) {
        Some(Value::Array(runs)) => runs,
        _ => Vec::new(),
    };
    let next = next_page(&page);
    Ok((
        RunPage {
            experiment_id: experiment_id.to_owned(),
            runs,
            histories: Histories::default(),
            last: next.is_none(),
        },
        next,
    ))
}

/// The metric histories of some runs: one bulk call per key per up to
/// 80 runs (see [`runs_per_call`]), again for what a full answer cut off; keys read side by side,
/// [`HISTORY_CALLS_IN_FLIGHT`] at a time.
async fn histories(client: &MlflowClient, runs: &[&Value]) -> Result<Histories, MlflowError> {
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for run in runs {
        let run_id = text(&run["info"], "run_id");
        for metric in array(&run["data"], "metrics") {
            by_key
                .entry(text(metric, "key"))
                .or_default()
                .push(run_id.clone());
        }
    }
    let mut keys = futures::stream::iter(by_key)
        .map(|(key, run_ids)| key_history(client, key, run_ids))
        .buffer_unordered(HISTORY_CALLS_IN_FLIGHT);
    let mut histories = Histories::default();
    // Each key's points are whole when its read ends; the order keys end
    // in does not matter (a run's keys are sent in key order).
    while let Some(read) = keys.next().await {
        let read = read?;
        for (run_id, points) in read.points {
            histories
                .points
                .entry(run_id)
                .or_default()
                .insert(read.key.clone(), points);
        }
        histories.alone.extend(
            read.alone
                .into_iter()
                .map(|run_id| (run_id, read.key.clone())),
        );
    }
    Ok(histories)
}

/// One key's history over a page's runs: points by run, and the runs whose
/// history of it did not fit a bulk call.
struct KeyHistory {
    key: String,
    points: HashMap<String, Vec<Value>>,
    alone: Vec<String>,
}

async fn key_history(
    client: &MlflowClient,
    key: String,
    mut run_ids: Vec<String>,
) -> Result<KeyHistory, MlflowError> {
    run_ids.sort();
    run_ids.dedup();
    let mut read = KeyHistory {
        key,
        points: HashMap::new(),
        alone: Vec::new(),
    };
    let max_results = BULK_POINTS.to_string();
    let mut rest: &[String] = &run_ids;
    while !rest.is_empty() {
        // A long key leaves fewer run ids room in the request line.
        let key_excess = encoded_len(&read.key).saturating_sub(BULK_KEY_BYTES);
        let fits = runs_per_call(rest.iter().map(String::as_str), key_excess);
        let chunk = &rest[..fits];
        let mut query: Vec<(&str, &str)> = chunk.iter().map(|id| ("run_id", id.as_str())).collect();
        query.push(("metric_key", &read.key));
        query.push(("max_results", &max_results));
        let mut answer = client
            .get("/ajax-api/2.0/mlflow/metrics/get-history-bulk", &query)
            .await?;
        let points = match answer.get_mut("metrics").map(Value::take) {
            Some(Value::Array(points)) => points,
            _ => Vec::new(),
        };
        let full = points.len() >= BULK_POINTS;
        // The answer is sorted by run id: every run before the last one it
        // names is whole; when it is full, the last run and those after it
        // are asked again.
        let last_named = points.last().map(|point| text(point, "run_id"));
        for mut point in points {
            let run_id = text(&point, "run_id");
            if full && Some(&run_id) == last_named.as_ref() {
                continue;
            }
            if let Some(object) = point.as_object_mut() {
                object.remove("run_id");
            }
            read.points.entry(run_id).or_default().push(point);
        }
        if !full {
            rest = &rest[chunk.len()..];
            continue;
        }
        let last = last_named.unwrap_or_default();
        let from = rest.iter().position(|id| *id == last).unwrap_or(0);
        if from == 0 {
            // One run's history fills a whole answer: read it alone.
            read.alone.push(rest[0].clone());
            read.points.remove(&rest[0]);
            rest = &rest[1..];
        } else {
            rest = &rest[from..];
        }
    }
    Ok(read)
}

/// What a `log-batch` entry is.
#[derive(Clone, Copy)]
enum Entity {
    Param,
    Tag,
    Metric,
}

/// A run's `log-batch` being filled to MLflow's limits.
struct LogBatch {
    run_id: String,
    params: Vec<Value>,
    tags: Vec<Value>,
    metrics: Vec<Value>,
    bytes: usize,
}

impl LogBatch {
    fn new(run_id: &str) -> Self {
        Self {
            run_id: run_id.to_owned(),
            params: Vec::new(),
            tags: Vec::new(),
            metrics: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds an entry; the full batch before it when it did not fit.
    fn add(&mut self, entity: Entity, value: &Value) -> Option<Value> {
        let value = match entity {
            Entity::Metric => json!({
                "key": value["key"],
                "value": value["value"],
                "timestamp": value["timestamp"],
                "step": value.get("step").cloned().unwrap_or(json!(0)),
            }),
            Entity::Param | Entity::Tag => json!({
                "key": value["key"],
                "value": value.get("value").cloned().unwrap_or(json!("")),
            }),
        };
        let size = value.to_string().len() + 1;
        let entities = self.params.len() + self.tags.len() + self.metrics.len();
        let full = entities >= BATCH_ENTITIES
            || self.bytes + size > BATCH_BYTES
            || match entity {
                Entity::Param => self.params.len() >= BATCH_PARAMS,
                Entity::Tag => self.tags.len() >= BATCH_TAGS,
                Entity::Metric => false,
            };
        let sent = if full { self.finish() } else { None };
        self.bytes += size;
        match entity {
            Entity::Param => self.params.push(value),
            Entity::Tag => self.tags.push(value),
            Entity::Metric => self.metrics.push(value),
        }
        sent
    }

    /// The batch so far, when it holds anything; empties it.
    fn finish(&mut self) -> Option<Value> {
        if self.params.is_empty() && self.tags.is_empty() && self.metrics.is_empty() {
            return None;
        }
        self.bytes = 0;
        Some(json!({
            "run_id": self.run_id,
            "params": std::mem::take(&mut self.params),
            "tags": std::mem::take(&mut self.tags),
            "metrics": std::mem::take(&mut self.metrics),
        }))
    }
}

/// A string field, empty when absent.
pub(super) fn text(value: &Value, field: &str) -> String {
    match value.get(field) {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Number(number)) => number.to_string(),
        _ => String::new(),
    }
}

/// A number field (MLflow writes int64 as a number or a string).
fn number(value: &Value, field: &str) -> i64 {
    match value.get(field) {
        Some(Value::Number(number)) => number.as_i64().unwrap_or_default(),
        Some(Value::String(text)) => text.parse().unwrap_or_default(),
        _ => 0,
    }
}

/// An array field, empty when absent.
pub(super) fn array<'a>(value: &'a Value, field: &str) -> &'a [Value] {
    value
        .get(field)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The token of the page after `page`, if there is one.
pub(super) fn next_page(page: &Value) -> Option<String> {
    page.get("next_page_token")
        .and_then(Value::as_str)
        .filter(|token| !token.is_empty())
        .map(str::to_owned)
}

/// Orders ids as numbers where they are, else as text after them.
fn id_order(id: &str) -> (u8, u64, String) {
    match id.parse::<u64>() {
        Ok(number) => (0, number, String::new()),
        Err(_) => (1, 0, id.to_owned()),
    }
}

/// The run's parent, from its `mlflow.parentRunId` tag.
fn parent_of(run: &Value) -> Option<String> {
    array(&run["data"], "tags")
        .iter()
        .find(|tag| text(tag, "key") == PARENT_RUN_TAG)
        .map(|tag| text(tag, "value"))
        .filter(|parent| !parent.is_empty())
}

/// `tags` without ferry's own.
fn without_ferry_tags(tags: &[Value]) -> Vec<Value> {
    tags.iter()
        .filter(|tag| !is_ferry_tag(&text(tag, "key")))
        .cloned()
        .collect()
}

/// ferry's own tags on a plane it restored into, which a backup of that
/// plane leaves behind.
fn is_ferry_tag(key: &str) -> bool {
    key == SOURCE_RUN_TAG
        || key == SOURCE_EXPERIMENT_TAG
        || key == SOURCE_VERSION_TAG
        || key.starts_with(CHECKPOINT_TAG_PREFIX)
}

/// `name = '...'` for a model-version search.
fn name_filter(name: &str) -> Option<String> {
    if !name.contains('\'') {
        Some(format!("name = '{name}'"))
    } else if !name.contains('"') {
        Some(format!("name = \"{name}\""))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_batches_keep_to_mlflows_limits() {
        let mut batch = LogBatch::new("r");
        let mut sent = Vec::new();
        for index in 0..250 {
            if let Some(body) = batch.add(
                Entity::Param,
                &json!({"key": format!("p{index}"), "value": "v"}),
            ) {
                sent.push(body);
            }
        }
        for index in 0..2_500 {
            if let Some(body) = batch.add(
                Entity::Metric,
                &json!({"key": "m", "value": "NaN", "timestamp": index, "step": index}),
            ) {
                sent.push(body);
            }
        }
        sent.extend(batch.finish());
        let count = |body: &Value, field: &str| body[field].as_array().map_or(0, Vec::len);
        assert_eq!(sent.iter().map(|b| count(b, "params")).sum::<usize>(), 250);
        assert_eq!(
            sent.iter().map(|b| count(b, "metrics")).sum::<usize>(),
            2_500
        );
        for body in &sent {
            assert!(count(body, "params") <= BATCH_PARAMS);
            assert!(
                count(body, "params") + count(body, "tags") + count(body, "metrics")
                    <= BATCH_ENTITIES
            );
            assert!(body.to_string().len() < 1_000_000);
        }
        assert_eq!(sent[3]["metrics"][0]["value"], "NaN");
    }

    #[test]
    fn large_values_split_by_bytes() {
        let mut batch = LogBatch::new("r");
        let big = "x".repeat(6_000);
        let mut sent = Vec::new();
        for index in 0..400 {
            if let Some(body) = batch.add(
                Entity::Tag,
                &json!({"key": format!("t{index}"), "value": big}),
            ) {
                sent.push(body);
            }
        }
        sent.extend(batch.finish());
        assert!(
            sent.iter()
                .all(|body| body.to_string().len() <= BATCH_BYTES + 1_000)
        );
        assert_eq!(sent.len(), 4);
    }

    /// Regression: 100 run ids in one bulk history call made a request line
    /// of 4,096 bytes, which gunicorn refuses (400 "Request Line is too
    /// large").
    #[test]
    fn bulk_calls_keep_their_request_line_under_gunicorns_limit() {
        let ids: Vec<String> = (0..250).map(|index| format!("{index:032x}")).collect();
        let fits = runs_per_call(ids.iter().map(String::as_str), 0);
        assert_eq!(fits, 80);
        let key = "k".repeat(250);
        let line = |fits: usize, key: &str| {
            let mut query: Vec<String> = ids[..fits]
                .iter()
                .map(|id| format!("run_id={id}"))
                .collect();
            query.push(format!("metric_key={key}"));
            query.push("max_results=25000".to_owned());
            format!(
                "GET /ajax-api/2.0/mlflow/metrics/get-history-bulk?{} HTTP/1.1",
                query.join("&")
            )
            .len()
        };
        assert!(line(fits, &key) < 4_094, "{}", line(fits, &key));
        let odd_key = "é/".repeat(250);
        let fewer = runs_per_call(
            ids.iter().map(String::as_str),
            encoded_len(&odd_key).saturating_sub(BULK_KEY_BYTES),
        );
        assert!(fewer < fits && line(fewer, &urlencode(&odd_key)) < 4_094);
        assert_eq!(
            runs_per_call(std::iter::once("x".repeat(5_000).as_str()), 0),
            1
        );
        assert_eq!(runs_per_call(ids[..7].iter().map(String::as_str), 0), 7);
    }

    fn urlencode(text: &str) -> String {
        text.bytes()
            .map(|byte| {
                if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
                    (byte as char).to_string()
                } else {
                    format!("%{byte:02X}")
                }
            })
            .collect()
    }

    #[test]
    fn names_with_quotes_are_filtered_with_the_other_quote() {
        assert_eq!(name_filter("m").as_deref(), Some("name = 'm'"));
        assert_eq!(name_filter("it's").as_deref(), Some("name = \"it's\""));
        assert_eq!(name_filter("a'b\"c"), None);
    }
}

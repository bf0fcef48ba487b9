//! MLflow 3.x logged models, and what a 2.x target cannot hold.
//!
//! A logged model (`m-…`, 3.x only) belongs to an experiment, may name the
//! run that made it, and has params, tags, a status and metrics (points
//! logged with `model_id`, which are also points of that run). The server
//! assigns its id (`POST /api/2.0/mlflow/logged-models` takes none), so a
//! restored model carries `ferry.source_model_id` and is found by it.
//!
//! One op per model, kind `mlflow.logged_model`, key
//! `logged_model/<source id>`, `POST /api/2.0/mlflow/logged-models` with
//! `{"model_id", "experiment_id", "name", "model_type", "source_run_id",
//! "params", "tags", "status", "metrics"}`; deps: its experiment, its run.
//! The sink creates it (params and tags with it), logs its metrics with
//! `runs/log-batch` naming the model (a point sent twice is kept once), and
//! finalizes it with its status.
//!
//! Before anything else, a stream from a 3.x server that holds logged
//! models starts with one `mlflow.requirement` op (`GET /version`, key
//! `requirement/logged_models`) naming them, so a restore onto 2.x refuses
//! at its first op, by name, before it makes any experiment or run.

use serde_json::{Value, json};

use super::client::MlflowClient;
use super::source::{array, next_page, text};
use super::{API, MlflowError, SOURCE_MODEL_TAG};
use crate::Op;
use crate::adapters::mlflow::traces::{self, Generation, TargetIds};

/// Models asked for at once.
const MODEL_PAGE: u64 = 100;
/// Experiments one search names at most.
const EXPERIMENTS_PER_SEARCH: usize = 100;
/// Models a requirement op names (the rest are counted).
const NAMED_IN_REQUIREMENT: usize = 20;
/// A `log-batch`'s metrics at most.
const METRICS_PER_BATCH: usize = 1_000;

/// The key of the requirement op a stream with logged models starts with.
pub(super) const LOGGED_MODELS_REQUIREMENT: &str = "requirement/logged_models";

/// One page of an experiment's logged models.
pub(super) async fn page(
    client: &MlflowClient,
    experiment_ids: &[String],
    page_token: Option<&str>,
) -> Result<(Vec<Value>, Option<String>), MlflowError> {
    let mut request = json!({ "experiment_ids": experiment_ids, "max_results": MODEL_PAGE });
    if let Some(token) = page_token {
        request["page_token"] = json!(token);
    }
    let answer = client
        .post(&format!("{API}/logged-models/search"), &request)
        .await?;
    Ok((array(&answer, "models").to_vec(), next_page(&answer)))
}

/// The requirement op's body for a server's logged models, or `None` when
/// it holds none: the count and the first models by name and id.
pub(super) async fn requirement(
    client: &MlflowClient,
    experiment_ids: &[String],
) -> Result<Option<Value>, MlflowError> {
    let mut count = 0_u64;
    let mut named = Vec::new();
    for chunk in experiment_ids.chunks(EXPERIMENTS_PER_SEARCH) {
        let mut page_token: Option<String> = None;
        loop {
            let (models, next) = page(client, chunk, page_token.as_deref()).await?;
            for model in &models {
                count += 1;
                if named.len() < NAMED_IN_REQUIREMENT {
                    named.push(json!({
                        "name": text(&model["info"], "name"),
                        "model_id": text(&model["info"], "model_id"),
                    }));
                }
            }
            page_token = next;
            if page_token.is_none() {
                break;
            }
        }
    }
    Ok((count > 0).then(|| {
        json!({
            "major_at_least": 3,
            "what": "logged models",
            "count": count,
            "named": named,
        })
    }))
}

/// A logged model as the op that makes it again.
pub(super) fn op_body(model: &Value) -> Value {
    let info = &model["info"];
    let tags: Vec<Value> = array(info, "tags")
        .iter()
        .filter(|tag| text(tag, "key") != SOURCE_MODEL_TAG)
        .cloned()
        .collect();
    json!({
        "model_id": text(info, "model_id"),
        "experiment_id": text(info, "experiment_id"),
        "name": text(info, "name"),
        "model_type": text(info, "model_type"),
        "source_run_id": text(info, "source_run_id"),
        "params": array(&model["data"], "params"),
        "tags": tags,
        "status": text(info, "status"),
        "metrics": array(&model["data"], "metrics"),
    })
}

fn bad(client: &MlflowClient, op: &Op, reason: String) -> MlflowError {
    MlflowError::BadOp {
        server: client.name().to_owned(),
        seq: op.seq,
        key: String::from_utf8_lossy(&op.key).into_owned(),
        method: String::from_utf8_lossy(&op.method).into_owned(),
        reason,
    }
}

/// A requirement op (logged models, or trace assessments: see
/// `traces::assessments_requirement`): a 2.x target refuses the stream,
/// naming what it cannot hold.
pub(super) fn check_requirement(
    client: &MlflowClient,
    target: Generation,
    op: &Op,
) -> Result<(), MlflowError> {
    let body: Value = serde_json::from_slice(&op.body)
        .map_err(|error| bad(client, op, format!("its body is not JSON: {error}")))?;
    if target == Generation::V3 {
        return Ok(());
    }
    let named = array(&body, "named");
    let count = body["count"].as_u64().unwrap_or(named.len() as u64);
    let what = match text(&body, "what") {
        what if what == traces::ASSESSMENTS => what,
        _ => "logged models".to_owned(),
    };
    let listed: Vec<String> = named
        .iter()
        .map(|named| {
            if what == traces::ASSESSMENTS {
                traces::assessment_label(named)
            } else {
                format!(
                    "logged model {} ({})",
                    text(named, "name"),
                    text(named, "model_id")
                )
            }
        })
        .collect();
    let more = count.saturating_sub(listed.len() as u64);
    let mut reason = format!("{}: MLflow 2.x has no {what}", listed.join(", "));
    if more > 0 {
        reason.push_str(&format!(" ({more} more not named)"));
    }
    reason.push_str("; nothing was restored: restore this backup onto an MLflow 3.x server");
    Err(bad(client, op, reason))
}

/// Makes a logged model on a 3.x target unless it is there (found by
/// `ferry.source_model_id`); logs its metrics and status either way.
pub(super) async fn apply(
    client: &MlflowClient,
    target: Generation,
    op: &Op,
    ids: &TargetIds<'_>,
) -> Result<(), MlflowError> {
    let body: Value = serde_json::from_slice(&op.body)
        .map_err(|error| bad(client, op, format!("its body is not JSON: {error}")))?;
    let source_id = text(&body, "model_id");
    let name = text(&body, "name");
    if target == Generation::V2 {
        return Err(bad(
            client,
            op,
            format!("logged model {name} ({source_id}): MLflow 2.x has no logged models"),
        ));
    }
    let source_experiment = text(&body, "experiment_id");
    let experiment = (ids.experiment)(&source_experiment).ok_or_else(|| {
        bad(
            client,
            op,
            format!(
                "logged model {name} ({source_id}): its experiment {source_experiment} is not on the target (the stream lacks its create)"
            ),
        )
    })?;
    let source_run = text(&body, "source_run_id");
    let run = if source_run.is_empty() {
        None
    } else {
        Some((ids.run)(&source_run).ok_or_else(|| {
            bad(
                client,
                op,
                format!(
                    "logged model {name} ({source_id}): its run {source_run} is not on the target (the stream lacks its create)"
                ),
            )
        })?)
    };
    let filter = format!("tags.`{SOURCE_MODEL_TAG}` = '{source_id}'");
    let found = client
        .post(
            &format!("{API}/logged-models/search"),
            &json!({ "experiment_ids": [experiment], "filter": filter, "max_results": 1 }),
        )
        .await?;
    let target_id = match array(&found, "models").first() {
        Some(model) => text(&model["info"], "model_id"),
        None => {
            let mut tags = array(&body, "tags").to_vec();
            tags.push(json!({ "key": SOURCE_MODEL_TAG, "value": source_id }));
            let mut create = json!({
                "experiment_id": experiment,
                "name": name,
                "params": array(&body, "params"),
                "tags": tags,
            });
            if let Some(run) = &run {
                create["source_run_id"] = json!(run);
            }
            let model_type = text(&body, "model_type");
            if !model_type.is_empty() {
                create["model_type"] = json!(model_type);
            }
            let created = client
                .post(&format!("{API}/logged-models"), &create)
                .await?;
            text(&created["model"]["info"], "model_id")
        }
    };
    if target_id.is_empty() {
        return Err(bad(
            client,
            op,
            format!("logged model {name} ({source_id}): the target's answer names no model id"),
        ));
    }
    // Its metrics, by the run each point was logged to: a point sent again
    // is kept once.
    let mut by_run: Vec<(String, Vec<Value>)> = Vec::new();
    for metric in array(&body, "metrics") {
        let metric_run = text(metric, "run_id");
        let target_run = if metric_run.is_empty() {
            run.clone()
        } else {
            (ids.run)(&metric_run)
        }
        .ok_or_else(|| {
            bad(
                client,
                op,
                format!(
                    "logged model {name} ({source_id}): a metric's run {metric_run} is not on the target"
                ),
            )
        })?;
        let mut point = json!({
            "key": metric["key"],
            "value": metric["value"],
            "timestamp": metric["timestamp"],
            "step": metric.get("step").cloned().unwrap_or(json!(0)),
            "model_id": target_id,
        });
        for field in ["dataset_name", "dataset_digest"] {
            if let Some(value) = metric.get(field) {
                point[field] = value.clone();
            }
        }
        match by_run.iter_mut().find(|(run, _)| *run == target_run) {
            Some((_, points)) => points.push(point),
            None => by_run.push((target_run, vec![point])),
        }
    }
    for (target_run, points) in by_run {
        for batch in points.chunks(METRICS_PER_BATCH) {
            client
                .post(
                    &format!("{API}/runs/log-batch"),
                    &json!({ "run_id": target_run, "metrics": batch }),
                )
                .await?;
        }
    }
    let status = text(&body, "status");
    if !status.is_empty() && status != "LOGGED_MODEL_PENDING" {
        client
            .patch(
                &format!("{API}/logged-models/{target_id}"),
                &json!({ "model_id": target_id, "status": status }),
            )
            .await?;
    }
    Ok(())
}

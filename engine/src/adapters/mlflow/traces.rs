//! MLflow traces: read from a 2.x or a 3.x server, written onto either.
//!
//! Where each version keeps a trace (see `tests/mlflow/NOTES.md`):
//! - 2.x: the trace's info (request id, experiment, start time, duration,
//!   status, request metadata, tags) in the database, read with `GET
//!   /api/2.0/mlflow/traces`; its spans in a `traces.json` artifact under
//!   the trace's `mlflow.artifactLocation` tag, read with `GET
//!   /ajax-api/2.0/mlflow/get-trace-artifact`. A writer cannot choose the
//!   request id (`POST /api/2.0/mlflow/traces` assigns one), so a restored
//!   trace carries `ferry.source_trace_id` and is found by it.
//! - 3.x: info and spans in the database. `POST /api/3.0/mlflow/traces`
//!   takes the whole info, the trace id included; spans come through the
//!   OTLP endpoint `POST /v1/traces`, which names the trace `tr-<OTel trace
//!   id>` whatever the writer says. So a 2.x trace restored onto 3.x is
//!   named as a 3.x client would have named it, `tr-` and the trace id its
//!   spans carry; a 3.x trace keeps its id.
//!
//! One op per trace, kind `mlflow.trace`, key `trace/<source id>`, deps on
//! its experiment and on the run it was made in (`mlflow.sourceRun`):
//! - from 2.x, `POST /api/2.0/mlflow/traces` with `{"request_id",
//!   "experiment_id", "timestamp_ms", "execution_time_ms", "status",
//!   "request_metadata", "tags", "trace_data"}`, `trace_data` being the
//!   `traces.json` the server holds (absent when it holds none, as for a
//!   trace never ended);
//! - from 3.x, `POST /api/3.0/mlflow/traces` with `{"trace": {"trace_info",
//!   "spans"}}` as `traces/get` gives it.
//!
//! A 3.x target takes both (a 2.x op is turned into a 3.x one by
//! [`v2_to_v3`], as the profile `examples/profiles/mlflow` does); a 2.x
//! target takes both too (a 3.x op turned into a 2.x one by [`v3_to_v2`],
//! the trace getting the id the 2.x server assigns).

use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::client::MlflowClient;
use super::source::{array, next_page, text};
use super::{Failure, MlflowError, SOURCE_TRACE_TAG};
use crate::Op;

/// The 2.x trace endpoint (also answered by 3.x servers).
pub const V2_TRACES: &str = "/api/2.0/mlflow/traces";
/// The 3.x trace endpoint.
pub const V3_TRACES: &str = "/api/3.0/mlflow/traces";
/// The OTLP span endpoint of a 3.x server.
const OTLP_TRACES: &str = "/v1/traces";
/// The header naming the experiment of spans sent to [`OTLP_TRACES`].
const EXPERIMENT_HEADER: &str = "x-mlflow-experiment-id";
/// Traces asked for at once.
const TRACE_PAGE: &str = "100";
/// Assessments a requirement op names (the rest are counted).
const NAMED_IN_REQUIREMENT: usize = 20;
/// The key of the requirement op a stream whose traces hold assessments
/// starts with.
pub(super) const ASSESSMENTS_REQUIREMENT: &str = "requirement/trace_assessments";
/// Trace tags a server writes for itself (where it keeps the spans):
/// never carried, the target writes its own.
const SERVER_TAGS: [&str; 2] = ["mlflow.artifactLocation", "mlflow.trace.spansLocation"];
/// Trace metadata a 3.x server writes for itself.
const SERVER_METADATA: [&str; 1] = ["mlflow.trace.infoFinalized"];
/// The metadata key naming the run a trace was made in.
const SOURCE_RUN_METADATA: &str = "mlflow.sourceRun";
/// The span attribute repeating the trace's id (as JSON, on 2.x).
const REQUEST_ID_ATTRIBUTE: &str = "mlflow.traceRequestId";

/// Which trace API a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// MLflow 2.x: trace info in the database, spans as an artifact.
    V2,
    /// MLflow 3.x: both in the database.
    V3,
}

impl Generation {
    /// The generation of a server's version (`GET /version`).
    pub fn of(version: &str) -> Self {
        match version
            .split('.')
            .next()
            .and_then(|major| major.parse::<u32>().ok())
        {
            Some(major) if major < 3 => Generation::V2,
            _ => Generation::V3,
        }
    }
}

/// One trace, as the op that makes it again.
pub(super) struct TraceOp {
    /// `trace/<source id>`.
    pub key: String,
    /// `POST /api/2.0/mlflow/traces` or `POST /api/3.0/mlflow/traces`.
    pub method: String,
    pub body: Value,
    /// The run it was made in, if any.
    pub run: Option<String>,
}

/// A page of an experiment's traces.
pub(super) struct TracePage {
    pub traces: Vec<TraceOp>,
    pub next_page_token: Option<String>,
}

/// One page of the traces of `experiment_id`, each read whole (info and
/// spans).
pub(super) async fn page(
    client: &MlflowClient,
    generation: Generation,
    experiment_id: &str,
    page_token: Option<&str>,
) -> Result<TracePage, MlflowError> {
    match generation {
        Generation::V2 => page_v2(client, experiment_id, page_token).await,
        Generation::V3 => page_v3(client, experiment_id, page_token).await,
    }
}

async fn page_v2(
    client: &MlflowClient,
    experiment_id: &str,
    page_token: Option<&str>,
) -> Result<TracePage, MlflowError> {
    let mut query = vec![
        ("experiment_ids", experiment_id),
        ("max_results", TRACE_PAGE),
        ("order_by", "timestamp_ms ASC"),
    ];
    if let Some(token) = page_token {
        query.push(("page_token", token));
    }
    let answer = client.get(V2_TRACES, &query).await?;
    let mut traces = Vec::new();
    for info in array(&answer, "traces") {
        let request_id = text(info, "request_id");
        let data = match client
            .get(
                "/ajax-api/2.0/mlflow/get-trace-artifact",
                &[("request_id", request_id.as_str())],
            )
            .await
        {
            Ok(data) => Some(data),
            // A trace that was never ended has no traces.json: 404
            // NOT_FOUND "Trace data not found".
            Err(MlflowError::Refused { status: 404, .. }) => None,
            Err(error) => return Err(error),
        };
        let tags: Vec<Value> = array(info, "tags")
            .iter()
            .filter(|tag| is_carried_tag(&text(tag, "key")))
            .cloned()
            .collect();
        let mut body = json!({
            "request_id": request_id,
            "experiment_id": text(info, "experiment_id"),
            "timestamp_ms": info.get("timestamp_ms").cloned().unwrap_or(json!(0)),
            "execution_time_ms": info.get("execution_time_ms").cloned().unwrap_or(json!(0)),
            "status": text(info, "status"),
            "request_metadata": array(info, "request_metadata"),
            "tags": tags,
        });
        if let Some(data) = data {
            body["trace_data"] = data;
        }
        let run = array(info, "request_metadata")
            .iter()
            .find(|entry| text(entry, "key") == SOURCE_RUN_METADATA)
            .map(|entry| text(entry, "value"));
        traces.push(TraceOp {
            key: format!("trace/{request_id}"),
            method: format!("POST {V2_TRACES}"),
            body,
            run,
        });
    }
    Ok(TracePage {
        traces,
        next_page_token: next_page(&answer),
    })
}

async fn page_v3(
    client: &MlflowClient,
    experiment_id: &str,
    page_token: Option<&str>,
) -> Result<TracePage, MlflowError> {
    let answer = search_v3(client, experiment_id, page_token).await?;
    let mut traces = Vec::new();
    for info in array(&answer, "traces") {
        let trace_id = text(info, "trace_id");
        let whole = client
            .get(
                &format!("{V3_TRACES}/get"),
                &[("trace_id", trace_id.as_str()), ("allow_partial", "true")],
            )
            .await?;
        let mut trace = whole["trace"].clone();
        if let Some(info) = trace.get_mut("trace_info").and_then(Value::as_object_mut) {
            drop_server_keys(info);
        }
        let run = trace["trace_info"]["trace_metadata"][SOURCE_RUN_METADATA]
            .as_str()
            .map(str::to_owned);
        traces.push(TraceOp {
            key: format!("trace/{trace_id}"),
            method: format!("POST {V3_TRACES}"),
            body: json!({ "trace": trace }),
            run,
        });
    }
    Ok(TracePage {
        traces,
        next_page_token: next_page(&answer),
    })
}

/// One page of `traces/search` over the experiment `experiment_id` (3.x):
/// the trace infos, assessments included, without their spans.
async fn search_v3(
    client: &MlflowClient,
    experiment_id: &str,
    page_token: Option<&str>,
) -> Result<Value, MlflowError> {
    let mut request = json!({
        "locations": [{
            "type": "MLFLOW_EXPERIMENT",
            "mlflow_experiment": { "experiment_id": experiment_id },
        }],
        "max_results": TRACE_PAGE.parse::<u32>().unwrap_or(100),
    });
    if let Some(token) = page_token {
        request["page_token"] = json!(token);
    }
    client.post(&format!("{V3_TRACES}/search"), &request).await
}

/// How [`v3_to_v2`] and a requirement op name what 2.x cannot keep.
pub(super) const ASSESSMENTS: &str = "trace assessments";

/// The requirement op's body for a 3.x server whose traces hold
/// assessments (feedback, expectations), which MLflow 2.x cannot keep, or
/// `None` when none does: the count and the first ones by name, id and
/// trace. One search page per 100 traces, before the stream begins, so a
/// restore onto 2.x refuses before it writes anything.
pub(super) async fn assessments_requirement(
    client: &MlflowClient,
    experiment_ids: &[String],
) -> Result<Option<Value>, MlflowError> {
    let mut count = 0_u64;
    let mut named = Vec::new();
    for experiment_id in experiment_ids {
        let mut page_token: Option<String> = None;
        loop {
            let answer = search_v3(client, experiment_id, page_token.as_deref()).await?;
            for info in array(&answer, "traces") {
                for assessment in array(info, "assessments") {
                    count += 1;
                    if named.len() < NAMED_IN_REQUIREMENT {
                        named.push(json!({
                            "name": text(assessment, "assessment_name"),
                            "assessment_id": text(assessment, "assessment_id"),
                            "trace_id": text(info, "trace_id"),
                        }));
                    }
                }
            }
            page_token = next_page(&answer);
            if page_token.is_none() {
                break;
            }
        }
    }
    Ok((count > 0).then(|| {
        json!({
            "major_at_least": 3,
            "what": ASSESSMENTS,
            "count": count,
            "named": named,
        })
    }))
}

/// How a requirement op names one assessment it lists.
pub(super) fn assessment_label(named: &Value) -> String {
    format!(
        "assessment {} ({}) of trace {}",
        text(named, "name"),
        text(named, "assessment_id"),
        text(named, "trace_id")
    )
}

/// Whether a trace tag is the trace's own (not the server's location, not
/// ferry's).
fn is_carried_tag(key: &str) -> bool {
    !SERVER_TAGS.contains(&key) && key != SOURCE_TRACE_TAG
}

/// Removes from a 3.x trace info what the server writes for itself.
fn drop_server_keys(info: &mut Map<String, Value>) {
    if let Some(tags) = info.get_mut("tags").and_then(Value::as_object_mut) {
        tags.retain(|key, _| is_carried_tag(key));
    }
    if let Some(metadata) = info
        .get_mut("trace_metadata")
        .and_then(Value::as_object_mut)
    {
        metadata.retain(|key, _| !SERVER_METADATA.contains(&key.as_str()));
    }
}

/// A 2.x trace op's body as the 3.x op that makes the same trace on a 3.x
/// server, the way MLflow's own `TraceInfoV2.to_v3` maps the fields:
/// `request_id` -> `trace_id` (`tr-` and the spans' OTel trace id, which
/// is what a 3.x server names it), `timestamp_ms` -> `request_time` (RFC
/// 3339), `execution_time_ms` -> `execution_duration` (`"0.141s"`), `status`
/// -> `state`, `request_metadata` -> `trace_metadata` (a map), `tags` -> a
/// map with `ferry.source_trace_id` (the 2.x id, which 3.x cannot keep), the
/// trace data's `request`/`response` -> the previews. The spans stay in
/// MLflow 2.x's span encoding, which the 3.x writer reads.
pub fn v2_to_v3(body: &Value) -> Result<Value, String> {
    let request_id = text(body, "request_id");
    if request_id.is_empty() {
        return Err("the 2.x trace names no request_id".to_owned());
    }
    let data = body.get("trace_data").cloned().unwrap_or(Value::Null);
    let spans = array(&data, "spans").to_vec();
    let trace_id = match spans.first() {
        Some(span) => format!("tr-{}", otel_trace_id(span)?),
        None => request_id.clone(),
    };
    let timestamp_ms = integer(body, "timestamp_ms");
    let execution_ms = integer(body, "execution_time_ms");
    let mut metadata = Map::new();
    for entry in array(body, "request_metadata") {
        metadata.insert(text(entry, "key"), json!(text(entry, "value")));
    }
    let mut tags = Map::new();
    for entry in array(body, "tags") {
        let key = text(entry, "key");
        if is_carried_tag(&key) {
            tags.insert(key, json!(text(entry, "value")));
        }
    }
    tags.insert(SOURCE_TRACE_TAG.to_owned(), json!(request_id));
    let state = match text(body, "status").as_str() {
        "TRACE_STATUS_UNSPECIFIED" | "" => "STATE_UNSPECIFIED".to_owned(),
        other => other.to_owned(),
    };
    let mut info = json!({
        "trace_id": trace_id,
        "trace_location": {
            "type": "MLFLOW_EXPERIMENT",
            "mlflow_experiment": { "experiment_id": text(body, "experiment_id") },
        },
        "request_time": rfc3339_ms(timestamp_ms)?,
        "execution_duration": format!("{}.{:03}s", execution_ms / 1000, execution_ms % 1000),
        "state": state,
        "trace_metadata": metadata,
        "tags": tags,
    });
    for (from, to) in [
        ("request", "request_preview"),
        ("response", "response_preview"),
    ] {
        if let Some(preview) = data.get(from).and_then(Value::as_str) {
            info[to] = json!(preview);
        }
    }
    Ok(json!({ "trace": { "trace_info": info, "spans": spans } }))
}

/// What a trace op is, for messages.
fn describe(op: &Op) -> (String, String) {
    (
        String::from_utf8_lossy(&op.key).into_owned(),
        String::from_utf8_lossy(&op.method).into_owned(),
    )
}

/// The ids a trace refers to, on the target.
pub(super) struct TargetIds<'a> {
    /// A source experiment's id on the target.
    pub experiment: &'a (dyn Fn(&str) -> Option<String> + Sync),
    /// A source run's id on the target.
    pub run: &'a (dyn Fn(&str) -> Option<String> + Sync),
}

/// Makes the trace of `op` on the target, unless it is there already
/// (found by the id it gets there, or by `ferry.source_trace_id`).
pub(super) async fn apply(
    client: &MlflowClient,
    target: Generation,
    op: &Op,
    ids: &TargetIds<'_>,
) -> Result<(), MlflowError> {
    let (key, method) = describe(op);
    let bad = |reason: String| MlflowError::BadOp {
        server: client.name().to_owned(),
        seq: op.seq,
        key: key.clone(),
        method: method.clone(),
        reason,
    };
    let body: Value = serde_json::from_slice(&op.body)
        .map_err(|error| bad(format!("its body is not JSON: {error}")))?;
    let v2 = format!("POST {V2_TRACES}");
    let v3 = format!("POST {V3_TRACES}");
    let written = match target {
        Generation::V3 => {
            let body = if method == v2 {
                v2_to_v3(&body).map_err(&bad)?
            } else if method == v3 {
                body
            } else {
                return Err(bad("it is not a trace request ferry replays".to_owned()));
            };
            write_v3(client, &body, ids).await
        }
        Generation::V2 if method == v2 => write_v2(client, &body, ids).await,
        Generation::V2 if method == v3 => {
            let body = v3_to_v2(&body).map_err(&bad)?;
            write_v2(client, &body, ids).await
        }
        Generation::V2 => return Err(bad("it is not a trace request ferry replays".to_owned())),
    };
    written.map_err(|failure| failure.into_error(|error| error, bad))
}

/// A 3.x trace op's body as the 2.x op that makes the same trace on a 2.x
/// server, the way MLflow's own `TraceInfoV2.from_v3` maps the fields, the
/// spans written in 2.x's encoding (hex ids, attributes as JSON text) into
/// the `traces.json` it keeps, the previews as its `request`/`response`.
pub fn v3_to_v2(body: &Value) -> Result<Value, String> {
    let trace = &body["trace"];
    let info = &trace["trace_info"];
    let trace_id = text(info, "trace_id");
    if trace_id.is_empty() {
        return Err("the 3.x trace names no trace_id".to_owned());
    }
    let assessments = array(info, "assessments");
    if !assessments.is_empty() {
        let names: Vec<String> = assessments
            .iter()
            .map(|assessment| {
                format!(
                    "{} ({})",
                    text(assessment, "assessment_name"),
                    text(assessment, "assessment_id")
                )
            })
            .collect();
        return Err(format!(
            "trace {trace_id} holds {} assessment(s), {}: MLflow 2.x has no {ASSESSMENTS}",
            names.len(),
            names.join(", ")
        ));
    }
    let pairs = |field: &str| -> Vec<Value> {
        info[field]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(key, _)| field != "tags" || is_carried_tag(key))
            .filter(|(key, _)| !SERVER_METADATA.contains(&key.as_str()))
            .map(|(key, value)| json!({ "key": key, "value": value }))
            .collect()
    };
    let spans = array(trace, "spans")
        .iter()
        .map(v2_span)
        .collect::<Result<Vec<_>, _>>()?;
    let status = match text(info, "state").as_str() {
        "STATE_UNSPECIFIED" | "" => "TRACE_STATUS_UNSPECIFIED".to_owned(),
        other => other.to_owned(),
    };
    let mut data = json!({ "spans": spans, "request": null, "response": null });
    for (from, to) in [
        ("request_preview", "request"),
        ("response_preview", "response"),
    ] {
        if let Some(preview) = info.get(from).filter(|value| value.is_string()) {
            data[to] = preview.clone();
        }
    }
    Ok(json!({
        "request_id": trace_id,
        "experiment_id": text(&info["trace_location"]["mlflow_experiment"], "experiment_id"),
        "timestamp_ms": rfc3339_to_ms(&text(info, "request_time"))?,
        "execution_time_ms": duration_ms(&text(info, "execution_duration"))?,
        "status": status,
        "request_metadata": pairs("trace_metadata"),
        "tags": pairs("tags"),
        "trace_data": data,
    }))
}

/// A span of 3.x's `traces/get` in MLflow 2.x's encoding.
fn v2_span(span: &Value) -> Result<Value, String> {
    let attributes: Map<String, Value> = array(span, "attributes")
        .iter()
        .map(|entry| {
            (
                text(entry, "key"),
                json!(from_any_value(&entry["value"]).to_string()),
            )
        })
        .collect();
    let events: Vec<Value> = array(span, "events")
        .iter()
        .map(|event| {
            let attributes: Map<String, Value> = array(event, "attributes")
                .iter()
                .map(|entry| (text(entry, "key"), from_any_value(&entry["value"])))
                .collect();
            json!({
                "name": text(event, "name"),
                "timestamp": integer(event, "time_unix_nano"),
                "attributes": attributes,
            })
        })
        .collect();
    let parent = text(span, "parent_span_id");
    let code = text(&span["status"], "code");
    Ok(json!({
        "name": text(span, "name"),
        "context": {
            "span_id": base64_id(&text(span, "span_id"))?,
            "trace_id": base64_id(&text(span, "trace_id"))?,
        },
        "parent_id": if parent.is_empty() { Value::Null } else { json!(base64_id(&parent)?) },
        "start_time": integer(span, "start_time_unix_nano"),
        "end_time": integer(span, "end_time_unix_nano"),
        "status_code": code.strip_prefix("STATUS_CODE_").unwrap_or(if code.is_empty() { "UNSET" } else { &code }),
        "status_message": text(&span["status"], "message"),
        "attributes": attributes,
        "events": events,
    }))
}

/// An OTLP any-value (as 3.x's `traces/get` writes it) as plain JSON.
fn from_any_value(value: &Value) -> Value {
    if let Some(text) = value.get("string_value") {
        return text.clone();
    }
    if let Some(number) = value.get("int_value") {
        return match number {
            Value::String(text) => text
                .parse::<i64>()
                .map_or_else(|_| number.clone(), |n| json!(n)),
            other => other.clone(),
        };
    }
    if let Some(number) = value.get("double_value") {
        return number.clone();
    }
    if let Some(flag) = value.get("bool_value") {
        return flag.clone();
    }
    if let Some(items) = value.get("array_value") {
        return Value::Array(array(items, "values").iter().map(from_any_value).collect());
    }
    if let Some(fields) = value.get("kvlist_value") {
        return Value::Object(
            array(fields, "values")
                .iter()
                .map(|entry| (text(entry, "key"), from_any_value(&entry["value"])))
                .collect(),
        );
    }
    if let Some(bytes) = value.get("bytes_value") {
        return bytes.clone();
    }
    Value::Null
}

/// RFC 3339 (`2023-11-14T22:13:20.123Z`) as milliseconds since the epoch.
fn rfc3339_to_ms(at: &str) -> Result<i64, String> {
    let parsed = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .map_err(|error| format!("its request_time {at:?} is not RFC 3339: {error}"))?;
    i64::try_from(parsed.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("its request_time {at:?} is out of range"))
}

/// A protobuf duration (`"0.141s"`) as milliseconds.
fn duration_ms(duration: &str) -> Result<i64, String> {
    if duration.is_empty() {
        return Ok(0);
    }
    let seconds: f64 = duration
        .strip_suffix('s')
        .and_then(|number| number.parse().ok())
        .ok_or_else(|| format!("its execution_duration {duration:?} is not a duration"))?;
    Ok((seconds * 1000.0).round() as i64)
}

/// A source run id in trace metadata, as the target's.
fn map_metadata_run(metadata: &mut Map<String, Value>, ids: &TargetIds<'_>) -> Result<(), String> {
    if let Some(run) = metadata.get(SOURCE_RUN_METADATA).and_then(Value::as_str) {
        let target = (ids.run)(run).ok_or_else(|| {
            format!("its run {run} is not on the target (the stream lacks its create)")
        })?;
        metadata.insert(SOURCE_RUN_METADATA.to_owned(), json!(target));
    }
    Ok(())
}

/// 3.x: the spans through OTLP (which creates the trace, named after the
/// spans' trace id), then the info, which the server merges into it as
/// given (times, state, metadata, tags). In that order the server keeps the
/// info's duration; the other way round it recomputes it from the spans.
async fn write_v3(client: &MlflowClient, body: &Value, ids: &TargetIds<'_>) -> Result<(), Failure> {
    let trace = &body["trace"];
    let mut info = trace["trace_info"]
        .as_object()
        .cloned()
        .ok_or_else(|| Failure::Bad("it holds no trace_info".to_owned()))?;
    let source_id = info
        .get("trace_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let source_experiment = text(
        &trace["trace_info"]["trace_location"]["mlflow_experiment"],
        "experiment_id",
    );
    let experiment = (ids.experiment)(&source_experiment).ok_or_else(|| {
        Failure::Bad(format!(
            "trace {source_id}: its experiment {source_experiment} is not on the target (the stream lacks its create)"
        ))
    })?;
    let spans = array(trace, "spans");
    let mut otlp = Vec::with_capacity(spans.len());
    let mut otel_trace: Option<String> = None;
    for span in spans {
        let (span_trace, converted) = otlp_span(span)
            .map_err(|reason| Failure::Bad(format!("trace {source_id}: {reason}")))?;
        match &otel_trace {
            Some(seen) if *seen != span_trace => {
                return Err(Failure::Bad(format!(
                    "trace {source_id}: its spans carry two OTel trace ids, {seen} and {span_trace}"
                )));
            }
            _ => otel_trace = Some(span_trace),
        }
        otlp.push(converted);
    }
    let target_id = match &otel_trace {
        Some(otel) => format!("tr-{otel}"),
        None => source_id.clone(),
    };
    let existing = match client.get(&format!("{V3_TRACES}/{target_id}"), &[]).await {
        Ok(answer) => Some(answer),
        Err(error) if error.error_code() == Some("RESOURCE_DOES_NOT_EXIST") => None,
        Err(error) => return Err(error.into()),
    };
    if let Some(existing) = &existing
        && existing["trace"]["trace_info"]["tags"]
            .get(SOURCE_TRACE_TAG)
            .is_some()
    {
        // Made by an earlier run of this restore, info last: complete.
        return Ok(());
    }
    if existing.is_none() && !otlp.is_empty() {
        let request = json!({
            "resourceSpans": [{
                "resource": { "attributes": [] },
                "scopeSpans": [{ "scope": {}, "spans": otlp }],
            }],
        });
        let encoded = serde_json::to_vec(&request)
            .map_err(|error| Failure::Bad(format!("cannot encode its spans: {error}")))?;
        client
            .send(
                reqwest::Method::POST,
                OTLP_TRACES,
                &[(EXPERIMENT_HEADER, experiment.as_str())],
                encoded,
            )
            .await?;
    }
    drop_server_keys(&mut info);
    info.insert("trace_id".to_owned(), json!(target_id));
    info.insert(
        "trace_location".to_owned(),
        json!({ "type": "MLFLOW_EXPERIMENT", "mlflow_experiment": { "experiment_id": experiment } }),
    );
    let tags = info
        .entry("tags")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| Failure::Bad(format!("trace {source_id}: its tags are not a map")))?;
    tags.entry(SOURCE_TRACE_TAG.to_owned())
        .or_insert_with(|| json!(source_id));
    if let Some(metadata) = info
        .get_mut("trace_metadata")
        .and_then(Value::as_object_mut)
    {
        map_metadata_run(metadata, ids)
            .map_err(|reason| Failure::Bad(format!("trace {source_id}: {reason}")))?;
    }
    client
        .post(V3_TRACES, &json!({ "trace": { "trace_info": info } }))
        .await?;
    Ok(())
}

/// 2.x: the trace is found by `ferry.source_trace_id`, else started (the
/// server names it); then its `traces.json` goes through the artifact proxy
/// to the location the server gave it, and the trace is ended with its
/// status and end time. A trace found still in progress is finished again.
async fn write_v2(client: &MlflowClient, body: &Value, ids: &TargetIds<'_>) -> Result<(), Failure> {
    let source_id = text(body, "request_id");
    let source_experiment = text(body, "experiment_id");
    let experiment = (ids.experiment)(&source_experiment).ok_or_else(|| {
        Failure::Bad(format!(
            "trace {source_id}: its experiment {source_experiment} is not on the target (the stream lacks its create)"
        ))
    })?;
    let status = text(body, "status");
    let filter = format!("tags.`{SOURCE_TRACE_TAG}` = '{source_id}'");
    let found = client
        .get(
            V2_TRACES,
            &[
                ("experiment_ids", experiment.as_str()),
                ("filter", filter.as_str()),
                ("max_results", "1"),
            ],
        )
        .await?;
    let info = match array(&found, "traces").first() {
        Some(existing) if text(existing, "status") != "IN_PROGRESS" || status == "IN_PROGRESS" => {
            return Ok(());
        }
        Some(existing) => existing.clone(),
        None => {
            let mut metadata: Map<String, Value> = array(body, "request_metadata")
                .iter()
                .map(|entry| (text(entry, "key"), json!(text(entry, "value"))))
                .collect();
            map_metadata_run(&mut metadata, ids)
                .map_err(|reason| Failure::Bad(format!("trace {source_id}: {reason}")))?;
            let mut tags: Vec<Value> = array(body, "tags")
                .iter()
                .filter(|tag| is_carried_tag(&text(tag, "key")))
                .cloned()
                .collect();
            tags.push(json!({ "key": SOURCE_TRACE_TAG, "value": source_id }));
            let started = client
                .post(
                    V2_TRACES,
                    &json!({
                        "experiment_id": experiment,
                        "timestamp_ms": integer(body, "timestamp_ms"),
                        "request_metadata": metadata
                            .into_iter()
                            .map(|(key, value)| json!({ "key": key, "value": value }))
                            .collect::<Vec<_>>(),
                        "tags": tags,
                    }),
                )
                .await?;
            started["trace_info"].clone()
        }
    };
    let target_id = text(&info, "request_id");
    if target_id.is_empty() {
        return Err(Failure::Bad(format!(
            "trace {source_id}: the target's answer names no request_id"
        )));
    }
    if let Some(data) = body.get("trace_data") {
        let location = array(&info, "tags")
            .iter()
            .find(|tag| text(tag, "key") == "mlflow.artifactLocation")
            .map(|tag| text(tag, "value"))
            .unwrap_or_default();
        let path = artifact_path(&location).ok_or_else(|| {
            Failure::Bad(format!(
                "trace {source_id}: the target keeps its data at {location:?}, not behind its artifact proxy (mlflow-artifacts:/...); start the target with --serve-artifacts"
            ))
        })?;
        let data = with_request_id(data, &source_id, &target_id);
        let encoded = serde_json::to_vec(&data)
            .map_err(|error| Failure::Bad(format!("cannot encode its spans: {error}")))?;
        client
            .send(
                reqwest::Method::PUT,
                &format!("/api/2.0/mlflow-artifacts/artifacts/{path}/traces.json"),
                &[],
                encoded,
            )
            .await?;
    }
    if status != "IN_PROGRESS" {
        let end = json!({
            "timestamp_ms": integer(body, "timestamp_ms") + integer(body, "execution_time_ms"),
            "status": status,
            "request_metadata": [],
            "tags": [],
        });
        client
            .patch(&format!("{V2_TRACES}/{target_id}"), &end)
            .await?;
    }
    Ok(())
}

/// The path under the artifact proxy of a `mlflow-artifacts:/...` location.
fn artifact_path(location: &str) -> Option<String> {
    let rest = location.strip_prefix("mlflow-artifacts:")?;
    // `mlflow-artifacts:/P` or `mlflow-artifacts://HOST/P`.
    let rest = match rest.strip_prefix("//") {
        Some(with_host) => with_host.split_once('/')?.1,
        None => rest.trim_start_matches('/'),
    };
    (!rest.is_empty()).then(|| rest.trim_end_matches('/').to_owned())
}

/// A 2.x `traces.json` whose spans name the target's request id.
fn with_request_id(data: &Value, source_id: &str, target_id: &str) -> Value {
    let mut data = data.clone();
    let source = json!(source_id).to_string();
    if let Some(spans) = data.get_mut("spans").and_then(Value::as_array_mut) {
        for span in spans {
            if let Some(value) = span["attributes"].get_mut(REQUEST_ID_ATTRIBUTE)
                && value.as_str() == Some(source.as_str())
            {
                *value = json!(json!(target_id).to_string());
            }
        }
    }
    data
}

/// The OTel trace id (hex) of a span in either encoding.
fn otel_trace_id(span: &Value) -> Result<String, String> {
    match span.get("context") {
        Some(context) => hex_id(&text(context, "trace_id")),
        None => base64_id(&text(span, "trace_id")),
    }
}

fn hex_id(id: &str) -> Result<String, String> {
    let id = id.trim_start_matches("0x").to_ascii_lowercase();
    if id.is_empty() || !id.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return Err(format!("a span id {id:?} is not hexadecimal"));
    }
    Ok(id)
}

fn base64_id(id: &str) -> Result<String, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(id)
        .map_err(|error| format!("a span id {id:?} is not base64: {error}"))?;
    if bytes.is_empty() {
        return Err("a span has an empty id".to_owned());
    }
    Ok(hex::encode(bytes))
}

/// A span as OTLP/JSON takes it (ids in hex), with its OTel trace id: from
/// MLflow 2.x's encoding (`context`, `parent_id`, attributes as JSON text,
/// `status_code`), or from 3.x's `traces/get` (ids in base64, attributes
/// as OTLP any-values already).
fn otlp_span(span: &Value) -> Result<(String, Value), String> {
    if let Some(context) = span.get("context") {
        let trace_id = hex_id(&text(context, "trace_id"))?;
        let mut converted = json!({
            "traceId": trace_id,
            "spanId": hex_id(&text(context, "span_id"))?,
            "name": text(span, "name"),
            "startTimeUnixNano": integer(span, "start_time").to_string(),
            "endTimeUnixNano": integer(span, "end_time").to_string(),
            "status": {
                "code": format!("STATUS_CODE_{}", match text(span, "status_code").as_str() {
                    "" => "UNSET".to_owned(),
                    code => code.to_owned(),
                }),
                "message": text(span, "status_message"),
            },
        });
        let parent = text(span, "parent_id");
        if !parent.is_empty() {
            converted["parentSpanId"] = json!(hex_id(&parent)?);
        }
        let attributes: Vec<Value> = span["attributes"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(key, value)| {
                // 2.x keeps each attribute as JSON text.
                let decoded = value
                    .as_str()
                    .and_then(|text| super::parse_json(text.as_bytes()).ok())
                    .unwrap_or_else(|| value.clone());
                json!({ "key": key, "value": any_value(&decoded) })
            })
            .collect();
        converted["attributes"] = json!(attributes);
        let events: Vec<Value> = array(span, "events")
            .iter()
            .map(|event| {
                let attributes: Vec<Value> = event["attributes"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(key, value)| json!({ "key": key, "value": any_value(value) }))
                    .collect();
                json!({
                    "name": text(event, "name"),
                    "timeUnixNano": integer(event, "timestamp").to_string(),
                    "attributes": attributes,
                })
            })
            .collect();
        converted["events"] = json!(events);
        return Ok((trace_id, converted));
    }
    let mut converted = span
        .as_object()
        .cloned()
        .ok_or_else(|| "a span is not an object".to_owned())?;
    let trace_id = base64_id(&text(span, "trace_id"))?;
    converted.remove("trace_id");
    converted.insert("traceId".to_owned(), json!(trace_id));
    let span_id = base64_id(&text(span, "span_id"))?;
    converted.remove("span_id");
    converted.insert("spanId".to_owned(), json!(span_id));
    let parent = text(span, "parent_span_id");
    converted.remove("parent_span_id");
    if !parent.is_empty() {
        converted.insert("parentSpanId".to_owned(), json!(base64_id(&parent)?));
    }
    Ok((trace_id, Value::Object(converted)))
}

/// A JSON value as an OTLP any-value.
fn any_value(value: &Value) -> Value {
    match value {
        Value::Null => json!({}),
        Value::Bool(flag) => json!({ "boolValue": flag }),
        Value::Number(number) => match (number.as_i64(), number.as_f64()) {
            (Some(integer), _) => json!({ "intValue": integer.to_string() }),
            (None, Some(float)) if number.is_f64() => json!({ "doubleValue": float }),
            _ => json!({ "stringValue": number.to_string() }),
        },
        Value::String(text) => json!({ "stringValue": text }),
        Value::Array(items) => {
            json!({ "arrayValue": { "values": items.iter().map(any_value).collect::<Vec<_>>() } })
        }
        Value::Object(fields) => json!({
            "kvlistValue": {
                "values": fields
                    .iter()
                    .map(|(key, value)| json!({ "key": key, "value": any_value(value) }))
                    .collect::<Vec<_>>(),
            },
        }),
    }
}

/// An integer field, written as a number or a string.
fn integer(value: &Value, field: &str) -> i64 {
    match value.get(field) {
        Some(Value::Number(number)) => number.as_i64().unwrap_or_default(),
        Some(Value::String(text)) => text.parse().unwrap_or_default(),
        _ => 0,
    }
}

/// Milliseconds since the epoch as RFC 3339 with milliseconds
/// (`2023-11-14T22:13:20.123Z`), as protobuf's JSON mapping of a timestamp.
fn rfc3339_ms(milliseconds: i64) -> Result<String, String> {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(milliseconds) * 1_000_000)
        .map_err(|error| format!("its time {milliseconds} ms is out of range: {error}"))?;
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format)
        .map_err(|error| format!("cannot write the time {milliseconds} ms: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_trace() -> Value {
        json!({
            "request_id": "2c0e9f29e8fc444dbc40088a8b95d59c",
            "experiment_id": "5",
            "timestamp_ms": 1_700_000_000_123_i64,
            "execution_time_ms": 141,
            "status": "OK",
            "request_metadata": [{"key": "mlflow.trace_schema.version", "value": "2"}],
            "tags": [
                {"key": "mlflow.traceName", "value": "root"},
                {"key": "mlflow.artifactLocation", "value": "mlflow-artifacts:/5/traces/x/artifacts"},
            ],
            "trace_data": {
                "spans": [{
                    "name": "root",
                    "context": {"span_id": "25ef39ade17db386", "trace_id": "c4c88ce400f9f62082d939cafdf6e97c"},
                    "parent_id": null,
                    "start_time": 1_700_000_000_123_445_614_i64,
                    "end_time": 1_700_000_000_264_941_251_i64,
                    "status_code": "ERROR",
                    "status_message": "ValueError: boom",
                    "attributes": {
                        "mlflow.traceRequestId": "\"2c0e9f29e8fc444dbc40088a8b95d59c\"",
                        "mlflow.spanInputs": "{\"q\": \"x\"}",
                        "k": "1",
                        "ratio": "0.5",
                    },
                    "events": [{"name": "exception", "timestamp": 5, "attributes": {"exception.type": "ValueError"}}],
                }],
                "request": "{\"q\": \"x\"}",
                "response": null,
            },
        })
    }

    #[test]
    fn a_2x_trace_becomes_the_3x_trace_mlflow_names_after_its_spans() {
        let v3 = v2_to_v3(&v2_trace()).expect("converts");
        let info = &v3["trace"]["trace_info"];
        assert_eq!(info["trace_id"], "tr-c4c88ce400f9f62082d939cafdf6e97c");
        assert_eq!(info["request_time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(info["execution_duration"], "0.141s");
        assert_eq!(info["state"], "OK");
        assert_eq!(
            info["trace_location"]["mlflow_experiment"]["experiment_id"],
            "5"
        );
        assert_eq!(info["trace_metadata"]["mlflow.trace_schema.version"], "2");
        assert_eq!(info["tags"]["mlflow.traceName"], "root");
        assert_eq!(
            info["tags"][SOURCE_TRACE_TAG],
            "2c0e9f29e8fc444dbc40088a8b95d59c"
        );
        assert!(info["tags"].get("mlflow.artifactLocation").is_none());
        assert_eq!(info["request_preview"], "{\"q\": \"x\"}");
        assert!(info.get("response_preview").is_none());
        assert_eq!(v3["trace"]["spans"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn spans_of_either_encoding_become_otlp_json_with_typed_values() {
        let v2 = &v2_trace()["trace_data"]["spans"][0];
        let (trace_id, span) = otlp_span(v2).expect("converts");
        assert_eq!(trace_id, "c4c88ce400f9f62082d939cafdf6e97c");
        assert_eq!(span["spanId"], "25ef39ade17db386");
        assert!(span.get("parentSpanId").is_none());
        assert_eq!(span["status"]["code"], "STATUS_CODE_ERROR");
        assert_eq!(span["startTimeUnixNano"], "1700000000123445614");
        let attribute = |key: &str| {
            span["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|entry| entry["key"] == key)
                .map(|entry| entry["value"].clone())
        };
        assert_eq!(attribute("k"), Some(json!({"intValue": "1"})));
        assert_eq!(attribute("ratio"), Some(json!({"doubleValue": 0.5})));
        assert_eq!(
            attribute("mlflow.spanInputs"),
            Some(json!({"kvlistValue": {"values": [{"key": "q", "value": {"stringValue": "x"}}]}}))
        );
        assert_eq!(
            span["events"][0]["attributes"][0]["value"],
            json!({"stringValue": "ValueError"})
        );

        let v3 = json!({
            "trace_id": "xMiM5AD59iCC2TnK/fbpfA==",
            "span_id": "Je85reF9s4Y=",
            "parent_span_id": "r7rBj/Rhh8E=",
            "name": "child",
            "attributes": [{"key": "n", "value": {"int_value": 2}}],
            "status": {"code": "STATUS_CODE_OK"},
        });
        let (trace_id, span) = otlp_span(&v3).expect("converts");
        assert_eq!(trace_id, "c4c88ce400f9f62082d939cafdf6e97c");
        assert_eq!(span["spanId"], "25ef39ade17db386");
        assert_eq!(span["parentSpanId"], "afbac18ff46187c1");
        assert!(span.get("trace_id").is_none() && span.get("span_id").is_none());
        assert_eq!(span["attributes"][0]["value"]["int_value"], 2);
    }

    #[test]
    fn a_restored_2x_trace_names_its_new_id_and_its_artifact_path() {
        let data = with_request_id(
            &v2_trace()["trace_data"],
            "2c0e9f29e8fc444dbc40088a8b95d59c",
            "ffff",
        );
        assert_eq!(
            data["spans"][0]["attributes"]["mlflow.traceRequestId"],
            "\"ffff\""
        );
        assert_eq!(
            artifact_path("mlflow-artifacts:/6/traces/ab/artifacts").as_deref(),
            Some("6/traces/ab/artifacts")
        );
        assert_eq!(
            artifact_path("mlflow-artifacts://host:5000/6/traces/ab/artifacts").as_deref(),
            Some("6/traces/ab/artifacts")
        );
        assert_eq!(artifact_path("/tmp/mlruns/6/traces/ab/artifacts"), None);
    }

    /// The profile's `up` (jq) and the sink's own mapping make the same
    /// 3.x trace of a 2.x one: a restore with the profile and one without
    /// write the same thing.
    #[test]
    fn the_profile_maps_a_2x_trace_as_the_sink_does() {
        use crate::migrations::chain::Chain;
        use crate::migrations::profile::Profile;

        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("examples/profiles/mlflow");
        let profile = Profile::load(&dir).expect("the mlflow profile loads");
        let mut chain = Chain::new(profile, "2", "3").expect("a chain from 2 to 3");
        for body in [v2_trace(), {
            let mut unended = v2_trace();
            unended
                .as_object_mut()
                .map(|object| object.remove("trace_data"));
            unended["status"] = json!("IN_PROGRESS");
            unended["execution_time_ms"] = json!(0);
            unended
        }] {
            let op = Op {
                seq: 1,
                position: 0,
                txn: 0,
                txn_last: true,
                kind: bytes::Bytes::from_static(b"mlflow.trace"),
                key: bytes::Bytes::from("trace/2c0e9f29e8fc444dbc40088a8b95d59c"),
                method: bytes::Bytes::from(format!("POST {V2_TRACES}")),
                body: bytes::Bytes::from(body.to_string()),
                content_type: bytes::Bytes::from_static(b"application/json"),
                platform_version: bytes::Bytes::from_static(b"2.22.5"),
                deps: Vec::new(),
            };
            let out = chain.transform_op(op).expect("the chain takes a trace op");
            assert_eq!(out.len(), 1);
            assert_eq!(
                out[0].method.as_ref(),
                format!("POST {V3_TRACES}").as_bytes()
            );
            let migrated: Value = serde_json::from_slice(&out[0].body).expect("JSON");
            assert_eq!(migrated, v2_to_v3(&body).expect("converts"), "{body}");
        }
    }

    #[test]
    fn a_3x_trace_with_assessments_is_refused_for_2x_naming_them() {
        let v3 = json!({"trace": {
            "trace_info": {
                "trace_id": "tr-c4c88ce400f9f62082d939cafdf6e97c",
                "trace_location": {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": "1"}},
                "request_time": "2023-11-14T22:13:20.123Z",
                "execution_duration": "0.141s",
                "state": "OK",
                "assessments": [
                    {"assessment_id": "a-1", "assessment_name": "relevance", "feedback": {"value": 0.75}},
                    {"assessment_id": "a-2", "assessment_name": "expected_answer", "expectation": {"value": "a0"}},
                ],
            },
            "spans": [],
        }});
        let refused = v3_to_v2(&v3).expect_err("2.x keeps no assessment");
        assert_eq!(
            refused,
            "trace tr-c4c88ce400f9f62082d939cafdf6e97c holds 2 assessment(s), relevance (a-1), \
             expected_answer (a-2): MLflow 2.x has no trace assessments"
        );
        let mut none = v3;
        none["trace"]["trace_info"]["assessments"] = json!([]);
        v3_to_v2(&none).expect("no assessment, nothing refused");
    }

    #[test]
    fn a_3x_trace_becomes_the_2x_trace_mlflow_would_keep() {
        let v3 = json!({"trace": {
            "trace_info": {
                "trace_id": "tr-c4c88ce400f9f62082d939cafdf6e97c",
                "trace_location": {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": "1"}},
                "request_time": "2023-11-14T22:13:20.123Z",
                "execution_duration": "0.141s",
                "state": "ERROR",
                "trace_metadata": {"mlflow.user": "root", "mlflow.trace.infoFinalized": "true"},
                "tags": {"mlflow.traceName": "root", "mlflow.trace.spansLocation": "TRACKING_STORE"},
                "request_preview": "{\"q\": \"x\"}",
            },
            "spans": [{
                "trace_id": "xMiM5AD59iCC2TnK/fbpfA==",
                "span_id": "r7rBj/Rhh8E=",
                "parent_span_id": "Je85reF9s4Y=",
                "name": "child",
                "start_time_unix_nano": 5,
                "end_time_unix_nano": "7",
                "attributes": [
                    {"key": "n", "value": {"int_value": 2}},
                    {"key": "inputs", "value": {"kvlist_value": {"values": [{"key": "q", "value": {"string_value": "x"}}]}}},
                ],
                "status": {"code": "STATUS_CODE_ERROR", "message": "boom"},
                "events": [{"name": "exception", "time_unix_nano": 6, "attributes": [{"key": "exception.type", "value": {"string_value": "ValueError"}}]}],
            }],
        }});
        let v2 = v3_to_v2(&v3).expect("converts");
        assert_eq!(v2["request_id"], "tr-c4c88ce400f9f62082d939cafdf6e97c");
        assert_eq!(v2["experiment_id"], "1");
        assert_eq!(v2["timestamp_ms"], 1_700_000_000_123_i64);
        assert_eq!(v2["execution_time_ms"], 141);
        assert_eq!(v2["status"], "ERROR");
        assert_eq!(
            v2["request_metadata"],
            json!([{"key": "mlflow.user", "value": "root"}])
        );
        assert_eq!(
            v2["tags"],
            json!([{"key": "mlflow.traceName", "value": "root"}])
        );
        let data = &v2["trace_data"];
        assert_eq!(data["request"], "{\"q\": \"x\"}");
        let span = &data["spans"][0];
        assert_eq!(span["context"]["span_id"], "afbac18ff46187c1");
        assert_eq!(
            span["context"]["trace_id"],
            "c4c88ce400f9f62082d939cafdf6e97c"
        );
        assert_eq!(span["parent_id"], "25ef39ade17db386");
        assert_eq!(span["end_time"], 7);
        assert_eq!(span["status_code"], "ERROR");
        assert_eq!(span["attributes"]["n"], "2");
        assert_eq!(span["attributes"]["inputs"], "{\"q\":\"x\"}");
        assert_eq!(
            span["events"][0]["attributes"]["exception.type"],
            "ValueError"
        );
        assert_eq!(span["events"][0]["timestamp"], 6);
        // And back: the spans as OTLP are the ones it came from.
        let (trace_id, otlp) = otlp_span(span).expect("converts");
        assert_eq!(trace_id, "c4c88ce400f9f62082d939cafdf6e97c");
        let n = otlp["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| entry["key"] == "n")
            .map(|entry| entry["value"].clone());
        assert_eq!(n, Some(json!({"intValue": "2"})));
    }

    #[test]
    fn versions_name_their_trace_api() {
        assert_eq!(Generation::of("2.22.5"), Generation::V2);
        assert_eq!(Generation::of("3.17.2"), Generation::V3);
    }
}

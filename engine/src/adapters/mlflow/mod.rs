//! The `mlflow` adapter: an MLflow tracking server and its model registry,
//! through MLflow's REST API, so any backend store behind the server works.
//!
//! - [`MlflowSource`]: crawls the server, paged: experiments (deleted ones
//!   too) with their tags; each experiment's runs (deleted ones too) in
//!   start-time order with their params, tags, dataset inputs and every
//!   point of every metric's history (the bulk history endpoint, up to 80 runs
//!   a call, where the server has it; paged `get-history` where a history
//!   does not fit one call); registered models with their versions, stages,
//!   aliases, tags and descriptions.
//! - [`MlflowSink`]: replays those requests onto another server, runs side
//!   by side on `--mlflow-concurrency` lanes (a run's requests in order on
//!   one lane, a child run on its parent's). Ids the target assigns go
//!   through an old-to-new map whose entries are tags on what was created
//!   (`ferry.source_run_id`, `ferry.source_experiment_id`); the checkpoint
//!   (the stream's last seq all of whose requests were answered) is a tag
//!   of the target's experiment 0. A killed restore, run again, rebuilds
//!   the map from the tags and replays from the checkpoint; every request
//!   is idempotent there (a run or an experiment that exists is found, not
//!   made again; MLflow's SQL store drops a metric point it already holds).
//!
//! The ops, each a request to MLflow's REST API, with the source's ids in
//! its body (the sink rewrites them), in this order:
//!
//! | kind | key | method (`POST /api/2.0/mlflow/...`) | body |
//! | --- | --- | --- | --- |
//! | `mlflow.experiment` | `experiment/<id>` | `experiments/create` | `{"experiment_id","name","artifact_location","tags"}` |
//! | `mlflow.run` | `run/<run id>` | `runs/create` | `{"experiment_id","run_name","user_id","start_time"}`; deps: its experiment, its parent run |
//! | `mlflow.run` | `run/<run id>` | `runs/log-batch` | `{"run_id","params","tags","metrics"}`, at most 1,000 entities, 100 params, 100 tags, ~1 MB |
//! | `mlflow.run` | `run/<run id>` | `runs/log-inputs` | `{"run_id","datasets"}` |
//! | `mlflow.run` | `run/<run id>` | `runs/update` | `{"run_id","status","end_time","run_name"}` |
//! | `mlflow.run` | `run/<run id>` | `runs/delete` | `{"run_id"}` (a deleted run, after its last request) |
//! | `mlflow.experiment` | `experiment/<id>` | `experiments/delete` | `{"experiment_id"}` (after every run) |
//! | `mlflow.registered_model` | `registered_model/<name>` | `registered-models/create` | `{"name","description","tags"}` |
//! | `mlflow.model_version` | `model_version/<name>/<version>` | `model-versions/create` | `{"name","version","source","run_id","run_link","description","tags"}`; deps: its model, its run |
//! | `mlflow.model_version` | `model_version/<name>/<version>` | `model-versions/transition-stage` | `{"name","version","stage","archive_existing_versions":false}` |
//! | `mlflow.model_version` | `model_version/<name>/<version>` | `registered-models/alias` | `{"name","alias","version"}` (after the model's versions) |
//! | `mlflow.requirement` | `requirement/logged_models` | `GET /version` | `{"major_at_least":3,"what","count","named"}`: first, when a 3.x source holds logged models; a 2.x target refuses it by name |
//! | `mlflow.requirement` | `requirement/trace_assessments` | `GET /version` | the same, `"what":"trace assessments"`, each named with its trace: first (after the one above), when a 3.x source's traces hold assessments; a 2.x target refuses it by name |
//! | `mlflow.logged_model` | `logged_model/<model id>` | `logged-models` | `{"model_id","experiment_id","name","model_type","source_run_id","params","tags","status","metrics"}`; deps: its experiment, its run (after every run) |
//! | `mlflow.trace` | `trace/<trace id>` | `traces` (from 2.x), or `POST /api/3.0/mlflow/traces` (from 3.x); either version takes either | the trace's info and spans (see the `traces` module); deps: its experiment, its run; before deleted experiments are deleted |
//!
//! A metric point's `value` is a JSON number, or `"NaN"`, `"Infinity"`,
//! `"-Infinity"` as protobuf's JSON mapping writes them (and MLflow's own
//! client sends them): a bare `NaN` in a `log-batch` is taken by the
//! server as 0.
//!
//! Into a target that was empty, experiment ids and model version numbers
//! come out as the source's, gaps included: where the target would assign
//! a lower id than the source's, the sink fills the gap with an experiment
//! (or a version) it renames and deletes, as the source's own deleted ones
//! are.

mod args;
mod client;
mod logged_models;
mod sink;
mod source;
mod traces;

pub use args::{ADAPTER, MlflowArgs, MlflowRestoreArgs};
pub use client::{Credentials, MlflowClient, RetryPolicy, parse_json};
pub use sink::{MlflowSink, MlflowSinkOptions};
pub use source::MlflowSource;
pub use traces::{Generation, v2_to_v3, v3_to_v2};

use crate::adapters::PlatformError;
use crate::error::ErrorClass;

/// The op kind of an experiment.
pub const KIND_EXPERIMENT: &str = "mlflow.experiment";
/// The op kind of a run.
pub const KIND_RUN: &str = "mlflow.run";
/// The op kind of a registered model.
pub const KIND_REGISTERED_MODEL: &str = "mlflow.registered_model";
/// The op kind of a model version.
pub const KIND_MODEL_VERSION: &str = "mlflow.model_version";
/// The op kind of a trace (see the `traces` module).
pub const KIND_TRACE: &str = "mlflow.trace";
/// The op kind of a logged model (3.x; see the `logged_models` module).
pub const KIND_LOGGED_MODEL: &str = "mlflow.logged_model";
/// The op kind of what a stream needs of its target, first in the stream
/// (a 3.x stream with logged models: see the `logged_models` module).
pub const KIND_REQUIREMENT: &str = "mlflow.requirement";

/// The REST API's prefix.
pub const API: &str = "/api/2.0/mlflow";

/// The tag on a target's run naming the source run it was made from.
pub const SOURCE_RUN_TAG: &str = "ferry.source_run_id";
/// The tag on a target's experiment naming the source experiment it was
/// made from.
pub const SOURCE_EXPERIMENT_TAG: &str = "ferry.source_experiment_id";
/// The tag on a target's model version naming the source's version number,
/// where they differ (a restore into a target that was not empty).
pub const SOURCE_VERSION_TAG: &str = "ferry.source_version";
/// The tag on a target's logged model naming the source model it was made
/// from.
pub const SOURCE_MODEL_TAG: &str = "ferry.source_model_id";
/// The tag on a target's trace naming the source trace it was made from.
pub const SOURCE_TRACE_TAG: &str = "ferry.source_trace_id";
/// The tag of the target's experiment 0 holding a stream's checkpoint,
/// followed by the stream's id.
pub const CHECKPOINT_TAG_PREFIX: &str = "ferry.checkpoint.";
/// The tag MLflow links a child run to its parent with.
pub const PARENT_RUN_TAG: &str = "mlflow.parentRunId";

/// An MLflow server failed, refused, or gave what ferry cannot carry.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    /// The URL is not an MLflow server's.
    #[error("cannot use {url}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A file named by a flag cannot be read.
    #[error("cannot read {path}: {error}")]
    File {
        /// The file.
        path: String,
        /// Why not.
        error: std::io::Error,
    },
    /// The server refused ferry's credentials.
    #[error(
        "MLflow at {server} refused {request} with HTTP {status}: {message}; ferry sent {used}: check the token or the user and password"
    )]
    Credentials {
        /// The server.
        server: String,
        /// The request.
        request: String,
        /// 401 or 403.
        status: u16,
        /// What ferry sent, never the secret.
        used: &'static str,
        /// The server's message.
        message: String,
    },
    /// The server refused a request (a 4xx no retry changes).
    #[error("MLflow at {server} refused {request} with HTTP {status} {error_code}: {message}")]
    Refused {
        /// The server.
        server: String,
        /// The request.
        request: String,
        /// The HTTP status.
        status: u16,
        /// MLflow's error code (`RESOURCE_ALREADY_EXISTS`...).
        error_code: String,
        /// The server's message.
        message: String,
    },
    /// The server kept failing (5xx, 429, no connection) through every try.
    #[error("MLflow at {server} did not answer {request} after {attempts} tries: {last}")]
    Unavailable {
        /// The server.
        server: String,
        /// The request.
        request: String,
        /// Tries made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The server answered with what ferry cannot read.
    #[error("MLflow at {server} answered {request} with what ferry cannot read: {reason}")]
    BadResponse {
        /// The server.
        server: String,
        /// The request.
        request: String,
        /// What is wrong.
        reason: String,
    },
    /// An op cannot be replayed.
    #[error("op seq {seq} ({key}, {method}) cannot be replayed on MLflow at {server}: {reason}")]
    BadOp {
        /// The server.
        server: String,
        /// The op.
        seq: u64,
        /// Its key.
        key: String,
        /// Its method.
        method: String,
        /// Why not.
        reason: String,
    },
    /// The target holds data and the restore was not told it may add to it.
    #[error(
        "MLflow at {server} is not empty ({what}); restore into an empty server, or pass --allow-nonempty to add to it (ids are then assigned by the target and mapped)"
    )]
    NotEmpty {
        /// The server.
        server: String,
        /// What it holds.
        what: String,
    },
}

impl MlflowError {
    /// MLflow's error code, when the server refused.
    pub fn error_code(&self) -> Option<&str> {
        match self {
            MlflowError::Refused { error_code, .. } => Some(error_code),
            _ => None,
        }
    }
}

impl PlatformError for MlflowError {
    fn class(&self) -> ErrorClass {
        match self {
            MlflowError::BadUrl { .. } | MlflowError::BadOp { .. } => ErrorClass::Invalid,
            MlflowError::File { .. }
            | MlflowError::Credentials { .. }
            | MlflowError::NotEmpty { .. } => ErrorClass::Precondition,
            MlflowError::Refused {
                status, error_code, ..
            } => match (*status, error_code.as_str()) {
                (404, _) | (_, "RESOURCE_DOES_NOT_EXIST") => ErrorClass::NotFound,
                (413, _) => ErrorClass::TooLarge,
                _ => ErrorClass::Invalid,
            },
            MlflowError::Unavailable { .. } => ErrorClass::Transient,
            MlflowError::BadResponse { .. } => ErrorClass::Invalid,
        }
    }

    fn is_usage(&self) -> bool {
        matches!(self, MlflowError::BadUrl { .. } | MlflowError::File { .. })
    }
}

/// Why replaying one op failed: the server refused it or could not be
/// reached (`Server`), or the op cannot be replayed as it is (`Bad`, a reason
/// its caller names with the op's seq and key).
pub(super) enum Failure {
    Server(MlflowError),
    Bad(String),
}

impl From<MlflowError> for Failure {
    fn from(error: MlflowError) -> Self {
        Failure::Server(error)
    }
}

impl Failure {
    /// The caller's error: `server` of a server's, `bad` of an op's reason.
    pub(super) fn into_error<E>(
        self,
        server: impl FnOnce(MlflowError) -> E,
        bad: impl FnOnce(String) -> E,
    ) -> E {
        match self {
            Failure::Server(error) => server(error),
            Failure::Bad(reason) => bad(reason),
        }
    }
}

/// The server's base URL (`http://HOST:PORT[/PATH]`) of an adapter URL,
/// `mlflow+http://HOST:PORT[/PATH]` or `mlflow+https://...`. Credentials in
/// the URL are refused: they would show in argv and logs.
pub fn base_url(url: &str) -> Result<String, MlflowError> {
    let shown = redacted(url);
    let bad = |reason: &str| MlflowError::BadUrl {
        url: shown.clone(),
        reason: reason.to_owned(),
    };
    let rest = url
        .strip_prefix("mlflow+")
        .ok_or_else(|| bad("an MLflow URL starts with mlflow+http:// or mlflow+https://"))?;
    let parsed = url::Url::parse(rest).map_err(|error| bad(&error.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(
            "an MLflow URL starts with mlflow+http:// or mlflow+https://",
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad(
            "credentials do not go in the URL (they would show in the process list and logs): set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or pass --mlflow-token-file",
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("name the server: mlflow+http://HOST:PORT"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("an MLflow URL takes no query or fragment"));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// `url` with what stands before an `@` of its authority (a user and
/// password) replaced by `***`.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_server_and_never_a_secret() {
        assert_eq!(
            base_url("mlflow+http://127.0.0.1:5000").expect("valid"),
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            base_url("mlflow+https://mlflow.example/prefix/").expect("valid"),
            "https://mlflow.example/prefix"
        );
        let secret = base_url("mlflow+http://me:hunter2@host:5000").expect_err("refused");
        assert!(!secret.to_string().contains("hunter2"), "{secret}");
        assert!(secret.to_string().contains("MLFLOW_TRACKING_TOKEN"));
        assert!(base_url("http://host:5000").is_err());
        assert!(base_url("mlflow+ftp://host").is_err());
    }
}

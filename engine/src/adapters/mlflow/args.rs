//! MLflow's own flags and its entry in the adapter registry: parsed first
//! (paths only), built second (the token read from the environment or a
//! file when the adapter is built).

use std::path::PathBuf;
use std::sync::Arc;

use super::client::{Credentials, MlflowClient, RetryPolicy};
use super::{MlflowError, MlflowSink, MlflowSinkOptions, MlflowSource, base_url};
use crate::Result;
use crate::adapters::registry::Adapter;
use crate::adapters::{AdapterError, Sink, SinkOptions, Source, SourceOptions};

/// MLflow in the registry: a batch source and sink.
pub const ADAPTER: Adapter = Adapter {
    name: "mlflow",
    schemes: &["mlflow+http", "mlflow+https"],
    urls: "mlflow+http://HOST:PORT[/PATH], mlflow+https://...",
    source: Some(source),
    sink: Some(sink),
    live_source: None,
    live_sink: None,
    in_place: None,
    digest_entry: None,
};

/// Credentials for MLflow: from the environment or a file, never from argv
/// or the URL.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "MLflow")]
pub struct MlflowArgs {
    /// A file whose first line is the MLflow token (sent as a bearer token); without it,
    /// MLFLOW_TRACKING_TOKEN, then MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, as
    /// MLflow's own clients read them.
    #[arg(long, value_name = "FILE")]
    pub mlflow_token_file: Option<PathBuf>,
}

impl MlflowArgs {
    /// The credentials these flags and the environment give (read now).
    pub fn credentials(&self) -> Result<Credentials, MlflowError> {
        let Some(path) = &self.mlflow_token_file else {
            return Ok(Credentials::from_env());
        };
        let text = std::fs::read_to_string(path).map_err(|error| MlflowError::File {
            path: path.display().to_string(),
            error,
        })?;
        let token = text.lines().next().unwrap_or_default().trim().to_owned();
        if token.is_empty() {
            return Err(MlflowError::File {
                path: path.display().to_string(),
                error: std::io::Error::other("its first line is empty"),
            });
        }
        Ok(Credentials::Token(token))
    }
}

/// Requests a restore has in flight at once when not told.
const DEFAULT_CONCURRENCY: u16 = 8;

/// How an MLflow restore writes.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "MLflow")]
pub struct MlflowRestoreArgs {
    /// MLflow: runs restored side by side (each run's requests in order on one lane, a child
    /// run on its parent's).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub mlflow_concurrency: u16,
    /// MLflow: ops after which the restore's checkpoint is written (also every 10 s); a killed
    /// restore sends at most this many requests again, each idempotent.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_OPS_PER_CHECKPOINT, value_parser = clap::value_parser!(u64).range(1..))]
    pub mlflow_ops_per_checkpoint: u64,
}

/// Ops between two checkpoints of a restore when not told.
const DEFAULT_OPS_PER_CHECKPOINT: u64 = 5_000;

impl Default for MlflowRestoreArgs {
    fn default() -> Self {
        Self {
            mlflow_concurrency: DEFAULT_CONCURRENCY,
            mlflow_ops_per_checkpoint: DEFAULT_OPS_PER_CHECKPOINT,
        }
    }
}

fn client(url: &str, args: &MlflowArgs) -> Result<Arc<MlflowClient>, MlflowError> {
    let base = base_url(url)?;
    Ok(Arc::new(MlflowClient::new(
        &base,
        args.credentials()?,
        RetryPolicy::default(),
    )?))
}

fn source(url: &str, options: &SourceOptions) -> Result<Box<dyn Source>> {
    if !options.prefix.is_empty() {
        return Err(AdapterError::BadUrl {
            url: url.to_owned(),
            reason:
                "an MLflow source takes the whole server: --prefix is for sources that hold keys"
                    .to_owned(),
        }
        .into());
    }
    let client = client(url, &options.connection.mlflow).map_err(AdapterError::source)?;
    Ok(Box::new(MlflowSource::new(client)))
}

fn sink(url: &str, options: &SinkOptions) -> Result<Box<dyn Sink>> {
    if options.rewrite_prefix.is_some() {
        return Err(AdapterError::BadUrl {
            url: url.to_owned(),
            reason: "MLflow's keys are its objects' ids: --rewrite-prefix does not apply"
                .to_owned(),
        }
        .into());
    }
    let client = client(url, &options.connection.mlflow).map_err(AdapterError::target)?;
    Ok(Box::new(MlflowSink::new(
        client,
        MlflowSinkOptions {
            allow_nonempty: options.allow_nonempty,
            concurrency: usize::from(options.restore.mlflow.mlflow_concurrency),
            ops_per_checkpoint: options.restore.mlflow.mlflow_ops_per_checkpoint as usize,
        },
    )))
}

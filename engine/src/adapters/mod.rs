//! Adapters: one module per control plane, each a [`Source`] of ops, a
//! [`Sink`] for them, or both, and for live migration a
//! [`LiveSource`](live::LiveSource) and a [`LiveSink`](live::LiveSink).
//! They are opened by URL through the [`registry`]:
//!
//! | URL | adapter |
//! | --- | --- |
//! | `jsonl:///path/file.jsonl`, `jsonl://-` | [`jsonl`]: JSON Lines in a file, or stdin / stdout |
//! | `etcd://HOST:PORT[,HOST:PORT...]` | [`etcd`]: an etcd v3 cluster (`etcds://` for TLS) |
//! | `postgres://[USER@]HOST[:PORT]/DB` | [`postgres`]: a PostgreSQL database |
//! | `mlflow+http://HOST:PORT` | [`mlflow`]: an MLflow tracking server (`mlflow+https://` for TLS) |

pub mod digest;
pub mod driver;
pub mod etcd;
pub mod fence_record;
pub mod jsonl;
pub mod live;
pub mod mlflow;
pub mod postgres;
pub mod registry;

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::{ErrorClass, ErrorKind};
use crate::manifest::SourceInfo;
use crate::order::OrderError;
use crate::progress::Progress;
use crate::{Op, Result};

/// A source's ops, and what it is.
pub struct Extraction {
    /// What the ops were taken from, for the manifest.
    pub info: SourceInfo,
    /// The ops in batches, seqs contiguous from 1 in source order (G1, G2).
    /// The stream ends after the last op; an `Err` ends it early.
    pub ops: BoxStream<'static, Result<Vec<Op>>>,
}

/// Where ops come from.
///
/// # Contract
/// - Ops carry seqs contiguous from 1, in the source's commit order (G1, G2).
/// - Ops of one source transaction are adjacent and share `txn`; the last
///   has `txn_last` set (G3).
/// - Batches are bounded (about a thousand ops or a MiB), and the stream is
///   produced as it is consumed: memory does not grow with the source.
/// - Errors name what and where (the file and line, the key, the revision).
#[async_trait]
pub trait Source: Send {
    /// Starts reading. `progress` receives bytes read as the source goes.
    async fn open(self: Box<Self>, progress: Arc<Progress>) -> Result<Extraction>;
}

/// The stream a sink is about to receive.
#[derive(Debug, Clone, Default)]
pub struct StreamInfo {
    /// The stream's id (a backup id).
    pub stream_id: String,
    /// The source it came from (e.g. etcd's cluster id), if it has one.
    pub source_identity: Option<String>,
    /// Ops in the stream, when known.
    pub ops_total: Option<u64>,
    /// The key prefix the stream is limited to, when it is.
    pub key_prefix: Option<Vec<u8>>,
}

/// Where ops go.
///
/// # Contract
/// - `begin` is called once, first. It returns the seq through which the
///   target already holds this stream (its checkpoint, G4), and the caller
///   then applies only the ops after it.
/// - `apply` receives batches in seq order, contiguous from where `begin`
///   said, and never reorders them (G2).
/// - Once `finish` returns `Ok`, every op applied is durable on the target;
///   an `Err` from either means the target may hold only a prefix of them.
#[async_trait]
pub trait Sink: Send {
    /// Prepares the target for `stream`; `Some(seq)` when the target holds
    /// the stream through `seq` already (a restore to resume).
    async fn begin(&mut self, stream: &StreamInfo) -> Result<Option<u64>> {
        let _ = stream;
        Ok(None)
    }
    /// Applies a batch of ops, in order.
    async fn apply(&mut self, ops: Vec<Op>) -> Result<()>;
    /// Makes everything applied durable and releases the target.
    async fn finish(self: Box<Self>) -> Result<()>;
}

/// A source or a sink failed, or gave bad input.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// No adapter takes this URL.
    #[error("cannot use {url}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading the source failed.
    #[error("cannot read {source_name}: {error}")]
    Read {
        /// The source, for people (a path, `stdin`).
        source_name: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A record of the source is not a valid op.
    #[error("{source_name} line {line}: {reason}")]
    InvalidRecord {
        /// The source, for people.
        source_name: String,
        /// The 1-based line (or record) number.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A source handed out ops out of order (G1): a bug in the adapter.
    #[error("the source gave ops out of order: {source}")]
    SourceOutOfOrder {
        /// The gap or repeat.
        source: OrderError,
    },
    /// An op cannot be written in the target's format.
    #[error("cannot write op seq {seq} to {target_name}: {reason}")]
    Unrepresentable {
        /// The target, for people.
        target_name: String,
        /// The op.
        seq: u64,
        /// Why not.
        reason: String,
    },
    /// The source failed, in its adapter's own words.
    #[error("{0}")]
    Source(Box<dyn PlatformError>),
    /// The target failed or refused, in its adapter's own words.
    #[error("{0}")]
    Target(Box<dyn PlatformError>),
    /// A newer migration attempt owns the target (G5).
    #[error(
        "{target_name} belongs to migration attempt (epoch) {stored}, newer than this one's {offered}; this attempt was superseded and wrote nothing more"
    )]
    StaleEpoch {
        /// The target, for people.
        target_name: String,
        /// The epoch the target holds.
        stored: u64,
        /// This sink's epoch.
        offered: u64,
    },
    /// An op names in its `deps` a key that neither the target nor the
    /// stream holds (G6).
    #[error(
        "cannot apply op seq {seq} (key {key}) to {target_name}: it depends on {dep}, and {why}"
    )]
    UnmetDependency {
        /// The target, for people.
        target_name: String,
        /// The op.
        seq: u64,
        /// Its key, printable.
        key: String,
        /// The key it waits for, printable.
        dep: String,
        /// Why the wait ended.
        why: String,
    },
    /// A source transaction was left open by the ops of another (G3).
    #[error(
        "op seq {seq} to {target_name} breaks source transaction {txn}, which has not ended with its last op (the stream broke G3)"
    )]
    BrokenTransaction {
        /// The target, for people.
        target_name: String,
        /// The op that came instead.
        seq: u64,
        /// The transaction left open.
        txn: u64,
    },
    /// Writing to the target failed.
    #[error("cannot write {target_name}: {error}")]
    Write {
        /// The target, for people (a path, `stdout`).
        target_name: String,
        /// The I/O error.
        error: std::io::Error,
    },
}

impl AdapterError {
    /// What the caller should do: each adapter classes its own errors.
    pub(crate) fn class(&self) -> ErrorClass {
        match self {
            AdapterError::Source(error) | AdapterError::Target(error) => error.class(),
            AdapterError::BadUrl { .. }
            | AdapterError::Unrepresentable { .. }
            | AdapterError::UnmetDependency { .. } => ErrorClass::Invalid,
            AdapterError::StaleEpoch { .. } => ErrorClass::Precondition,
            AdapterError::InvalidRecord { .. }
            | AdapterError::SourceOutOfOrder { .. }
            | AdapterError::BrokenTransaction { .. } => ErrorClass::Damaged,
            AdapterError::Read { .. } | AdapterError::Write { .. } => ErrorClass::Transient,
        }
    }

    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            AdapterError::BadUrl { .. } => ErrorKind::Usage,
            AdapterError::Read { .. }
            | AdapterError::InvalidRecord { .. }
            | AdapterError::SourceOutOfOrder { .. }
            | AdapterError::BrokenTransaction { .. } => ErrorKind::Source,
            AdapterError::Write { .. }
            | AdapterError::Unrepresentable { .. }
            | AdapterError::StaleEpoch { .. }
            | AdapterError::UnmetDependency { .. } => ErrorKind::Target,
            AdapterError::Source(error) | AdapterError::Target(error) if error.is_usage() => {
                ErrorKind::Usage
            }
            AdapterError::Source(_) => ErrorKind::Source,
            AdapterError::Target(_) => ErrorKind::Target,
        }
    }

    /// A failure of the source, in its adapter's words.
    pub fn source(error: impl PlatformError) -> Self {
        AdapterError::Source(Box::new(error))
    }

    /// A failure of the target, in its adapter's words.
    pub fn target(error: impl PlatformError) -> Self {
        AdapterError::Target(Box::new(error))
    }

    /// The adapter's own error, when it is an `E`.
    pub fn platform_error<E: PlatformError>(&self) -> Option<&E> {
        match self {
            AdapterError::Source(error) | AdapterError::Target(error) => {
                let error: &(dyn std::error::Error + 'static) = error.as_ref();
                error.downcast_ref::<E>()
            }
            _ => None,
        }
    }
}

/// An adapter's own error type: each adapter classes its failures, and
/// nothing outside it names them.
pub trait PlatformError: std::error::Error + Send + Sync + 'static {
    /// What the caller should do about it.
    fn class(&self) -> ErrorClass;
    /// True when the request itself is wrong (a URL, a file named by a
    /// flag) rather than the plane.
    fn is_usage(&self) -> bool {
        false
    }
}

pub use registry::{
    ADAPTERS, Adapter, ConnectionArgs, RestoreTuningArgs, SinkOptions, SourceArgs, SourceOptions,
    TargetLimitArgs, adapter_for, in_place_from_url, live_sink_from_url, live_source_from_url,
    sink_from_url, source_from_url,
};

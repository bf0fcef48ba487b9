//! The adapter registry: one table from URL scheme to an adapter's
//! factories, and the flags of every adapter, flattened into each command
//! that opens adapters by URL. A new control plane is a folder under
//! `adapters/` with an `ADAPTER` entry, a line in [`ADAPTERS`], and its
//! flags (if any) in the argument groups below.
//!
//! Parsing a command line reads nothing (flags hold paths); the factories
//! read credentials and files when the command builds its adapters.

use std::sync::Arc;

use super::live::{DigestEntry, LiveSink, LiveSource};
use super::{AdapterError, Sink, Source, etcd, jsonl, mlflow, postgres};
use crate::migrations::in_place::InPlaceTarget;
use crate::{Op, Result};

/// Builds a source from its URL.
pub type SourceFactory = fn(&str, &SourceOptions) -> Result<Box<dyn Source>>;
/// Builds a sink from its URL.
pub type SinkFactory = fn(&str, &SinkOptions) -> Result<Box<dyn Sink>>;
/// Builds a live source from its URL.
pub type LiveSourceFactory = fn(&str, &SourceOptions) -> Result<Arc<dyn LiveSource>>;
/// Builds a live sink from its URL.
pub type LiveSinkFactory = fn(&str, &SinkOptions) -> Result<Arc<dyn LiveSink>>;
/// Builds a target of in-place version migrations from its URL.
pub type InPlaceFactory = fn(&str, &SinkOptions) -> Result<Arc<dyn InPlaceTarget>>;

/// What an adapter can be built as, by URL.
#[derive(Debug, Clone, Copy)]
pub struct Adapter {
    /// Its name, as ops' kinds and manifests name its platform.
    pub name: &'static str,
    /// The URL schemes it takes (`etcd`, `etcds`).
    pub schemes: &'static [&'static str],
    /// Its URL forms, for help and errors.
    pub urls: &'static str,
    /// Builds a [`Source`] (extract).
    pub source: Option<SourceFactory>,
    /// Builds a [`Sink`] (restore).
    pub sink: Option<SinkFactory>,
    /// Builds a [`LiveSource`] (a source agent).
    pub live_source: Option<LiveSourceFactory>,
    /// Builds a [`LiveSink`] (a target agent).
    pub live_sink: Option<LiveSinkFactory>,
    /// Builds an [`InPlaceTarget`] (`ferry migrations`).
    pub in_place: Option<InPlaceFactory>,
    /// What an op counts as in its live sink's digest (`--verify` through a
    /// version chain); `None` when the adapter has no live sink.
    pub digest_entry: Option<fn(&Op) -> DigestEntry<'_>>,
}

/// Every adapter ferry has.
pub const ADAPTERS: &[Adapter] = &[
    jsonl::ADAPTER,
    etcd::ADAPTER,
    postgres::ADAPTER,
    mlflow::ADAPTER,
];

/// Credentials and TLS, each adapter's own: from the environment or files,
/// never from argv.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnectionArgs {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub etcd: etcd::EtcdArgs,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub postgres: postgres::PgArgs,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub mlflow: mlflow::MlflowArgs,
}

/// What an extract reads of its source beyond `--prefix`, each adapter's
/// own.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SourceArgs {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub postgres: postgres::PgSourceArgs,
}

/// What a target takes at most (its request limits), each adapter's own.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TargetLimitArgs {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub etcd: etcd::EtcdTxnArgs,
}

/// How a restore writes (lanes, requests in flight), each adapter's own.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RestoreTuningArgs {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub etcd: etcd::EtcdRestoreArgs,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub postgres: postgres::PgRestoreArgs,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub mlflow: mlflow::MlflowRestoreArgs,
}

/// What a source needs beyond its URL.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Only keys starting with this; empty for all.
    pub prefix: Vec<u8>,
    /// Parts of a snapshot read at once (at least 1).
    pub parallel: usize,
    /// Credentials and TLS.
    pub connection: ConnectionArgs,
    /// What to read beyond the prefix.
    pub source: SourceArgs,
}

/// What a sink needs beyond its URL.
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// Keys starting with the first are written starting with the second.
    pub rewrite_prefix: Option<(Vec<u8>, Vec<u8>)>,
    /// Write even when the target range already holds keys.
    pub allow_nonempty: bool,
    /// Credentials and TLS.
    pub connection: ConnectionArgs,
    /// The target's request limits.
    pub target: TargetLimitArgs,
    /// How a restore writes.
    pub restore: RestoreTuningArgs,
}

/// The adapter a URL's scheme names.
pub fn adapter_for(url: &str) -> Option<&'static Adapter> {
    let (scheme, _) = url.split_once("://")?;
    ADAPTERS
        .iter()
        .find(|adapter| adapter.schemes.contains(&scheme))
}

/// The adapter of that name, as agents describe their platform.
pub fn adapter_named(name: &str) -> Option<&'static Adapter> {
    ADAPTERS.iter().find(|adapter| adapter.name == name)
}

fn refuse(url: &str, role: &str, takes: fn(&Adapter) -> bool) -> crate::Error {
    let known: Vec<&str> = ADAPTERS
        .iter()
        .filter(|adapter| takes(adapter))
        .map(|adapter| adapter.urls)
        .collect();
    let reason = match adapter_for(url) {
        Some(adapter) => format!("{} cannot be {role}", adapter.name),
        None => format!("no adapter takes it as {role}"),
    };
    AdapterError::BadUrl {
        url: url.to_owned(),
        reason: format!("{reason}; known: {}", known.join("; ")),
    }
    .into()
}

/// Opens the source a URL names.
pub fn source_from_url(url: &str, options: &SourceOptions) -> Result<Box<dyn Source>> {
    match adapter_for(url).and_then(|adapter| adapter.source) {
        Some(build) => build(url, options),
        None => Err(refuse(url, "a source", |adapter| adapter.source.is_some())),
    }
}

/// Opens the sink a URL names.
pub fn sink_from_url(url: &str, options: &SinkOptions) -> Result<Box<dyn Sink>> {
    match adapter_for(url).and_then(|adapter| adapter.sink) {
        Some(build) => build(url, options),
        None => Err(refuse(url, "a target", |adapter| adapter.sink.is_some())),
    }
}

/// The live source a URL names (a source agent's plane).
pub fn live_source_from_url(url: &str, options: &SourceOptions) -> Result<Arc<dyn LiveSource>> {
    match adapter_for(url).and_then(|adapter| adapter.live_source) {
        Some(build) => build(url, options),
        None => Err(refuse(url, "a live source", |adapter| {
            adapter.live_source.is_some()
        })),
    }
}

/// The live sink a URL names (a target agent's plane).
pub fn live_sink_from_url(url: &str, options: &SinkOptions) -> Result<Arc<dyn LiveSink>> {
    match adapter_for(url).and_then(|adapter| adapter.live_sink) {
        Some(build) => build(url, options),
        None => Err(refuse(url, "a live target", |adapter| {
            adapter.live_sink.is_some()
        })),
    }
}

/// The target of in-place version migrations a URL names.
pub fn in_place_from_url(url: &str, options: &SinkOptions) -> Result<Arc<dyn InPlaceTarget>> {
    match adapter_for(url).and_then(|adapter| adapter.in_place) {
        Some(build) => build(url, options),
        None => Err(refuse(url, "migrated in place", |adapter| {
            adapter.in_place.is_some()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_names_one_adapter() {
        let mut schemes: Vec<&str> = ADAPTERS
            .iter()
            .flat_map(|adapter| adapter.schemes.iter().copied())
            .collect();
        let all = schemes.len();
        schemes.sort_unstable();
        schemes.dedup();
        assert_eq!(schemes.len(), all, "a scheme is taken twice");
    }

    #[test]
    fn an_unknown_scheme_is_refused_naming_what_is_known() {
        let error = source_from_url("mysql://db:3306", &SourceOptions::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(error.contains("mysql://db:3306"), "{error}");
        assert!(error.contains("no adapter takes it as a source"), "{error}");
        assert!(error.contains("etcd://HOST:PORT"), "{error}");
        assert!(error.contains("jsonl:///PATH"), "{error}");
    }

    #[test]
    fn a_batch_only_adapter_is_refused_as_a_live_one() {
        let error = live_source_from_url("jsonl:///tmp/x.jsonl", &SourceOptions::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(error.contains("jsonl cannot be a live source"), "{error}");
        assert!(!error.contains("jsonl:///PATH"), "{error}");
    }
}

//! etcd's own flags and its entry in the adapter registry: parsed first
//! (paths only: nothing is read while parsing), built second (the
//! credentials from the environment or the password file, the TLS files
//! when ferry connects).

use std::path::PathBuf;
use std::sync::Arc;

use super::in_place::EtcdInPlace;
use super::{
    EtcdConnection, EtcdError, EtcdLiveSink, EtcdLiveSource, EtcdSink, EtcdSinkOptions, EtcdSource,
    EtcdSourceOptions, EtcdTls,
};
use crate::Result;
use crate::adapters::live::{LiveSink, LiveSource};
use crate::adapters::registry::Adapter;
use crate::adapters::{AdapterError, Sink, SinkOptions, Source, SourceOptions};
use crate::migrations::in_place::{InPlaceOptions, InPlaceTarget};

/// etcd in the registry.
pub const ADAPTER: Adapter = Adapter {
    name: "etcd",
    schemes: &["etcd", "etcds"],
    urls: "etcd://HOST:PORT[,HOST:PORT...], etcds://... for TLS",
    source: Some(source),
    sink: Some(sink),
    live_source: Some(live_source),
    live_sink: Some(live_sink),
    in_place: Some(in_place),
    digest_entry: Some(super::live::digest_entry),
};

/// Credentials and TLS for etcd: from the environment or files, never from
/// argv.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "etcd")]
pub struct EtcdArgs {
    /// A file whose first line is the etcd password (the user is ETCD_USERNAME);
    /// without it, ETCD_USERNAME and ETCD_PASSWORD are used when set.
    #[arg(long, value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// etcd over TLS: PEM file of the CA that signed the members' certificates
    /// (etcds:// alone trusts the system's roots). Any --etcd-*-file of TLS turns TLS on.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// etcd over TLS: PEM file of ferry's client certificate (members with --client-cert-auth).
    #[arg(long, value_name = "FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,
    /// etcd over TLS: PEM file of the client certificate's private key.
    #[arg(long, value_name = "FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// The TLS files named.
    pub fn tls(&self) -> EtcdTls {
        EtcdTls {
            ca_file: self.etcd_ca_file.clone(),
            cert_file: self.etcd_cert_file.clone(),
            key_file: self.etcd_key_file.clone(),
        }
    }

    /// The cluster `url` names, with these credentials and TLS files.
    pub fn connection(&self, url: &str) -> Result<EtcdConnection, EtcdError> {
        EtcdConnection::from_url(url, self.etcd_password_file.as_ref())?.with_tls_files(&self.tls())
    }
}

/// The target's limits on a Txn.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "etcd")]
pub struct EtcdTxnArgs {
    /// etcd: ops per Txn at most, ferry's checkpoint included (the target's --max-txn-ops).
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u32).range(2..))]
    pub max_txn_ops: u32,
    /// etcd: bytes per Txn request at most (the target's --max-request-bytes).
    #[arg(long, value_name = "BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: usize,
}

impl Default for EtcdTxnArgs {
    fn default() -> Self {
        let defaults = EtcdSinkOptions::default();
        Self {
            max_txn_ops: defaults.max_txn_ops as u32,
            max_request_bytes: defaults.max_request_bytes,
        }
    }
}

/// Lanes of a restore when not told.
const DEFAULT_LANES: u16 = 4;
/// Txns in flight on one lane when not told.
const DEFAULT_TXNS_IN_FLIGHT: u16 = 1;

/// How a restore writes.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "etcd")]
pub struct EtcdRestoreArgs {
    /// etcd: Txns side by side, each on its own checkpoint chain (a lane); ops of one key stay in
    /// seq order, Txns of different keys may land up to N-1 Txns apart (see the README).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LANES, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub lanes: u16,
    /// etcd, with --lanes 1: Txns of the one chain sent before the first is answered (etcd
    /// reorders concurrent requests, so more than 1 rarely helps: see the README).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TXNS_IN_FLIGHT, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub txns_in_flight: u16,
}

impl Default for EtcdRestoreArgs {
    fn default() -> Self {
        Self {
            lanes: DEFAULT_LANES,
            txns_in_flight: DEFAULT_TXNS_IN_FLIGHT,
        }
    }
}

fn connection(
    url: &str,
    args: &EtcdArgs,
    error: fn(EtcdError) -> AdapterError,
) -> Result<EtcdConnection> {
    Ok(args.connection(url).map_err(error)?)
}

/// The sink options of a restore (or, with `epoch`, a live stream).
pub(crate) fn sink_options(options: &SinkOptions) -> EtcdSinkOptions {
    let txn = &options.target.etcd;
    let restore = &options.restore.etcd;
    EtcdSinkOptions {
        max_txn_ops: txn.max_txn_ops as usize,
        max_request_bytes: txn.max_request_bytes,
        rewrite_prefix: options.rewrite_prefix.clone(),
        allow_nonempty: options.allow_nonempty,
        epoch: 0,
        txns_in_flight: usize::from(restore.txns_in_flight),
        lanes: usize::from(restore.lanes),
        // A restore acks nothing: the tail of a batch may wait for the next.
        durable_each_apply: false,
    }
}

fn source(url: &str, options: &SourceOptions) -> Result<Box<dyn Source>> {
    let connection = connection(url, &options.connection.etcd, AdapterError::source)?;
    Ok(Box::new(EtcdSource::new(
        connection,
        EtcdSourceOptions {
            prefix: options.prefix.clone(),
            parallel: options.parallel.max(1),
        },
    )))
}

fn sink(url: &str, options: &SinkOptions) -> Result<Box<dyn Sink>> {
    let connection = connection(url, &options.connection.etcd, AdapterError::target)?;
    Ok(Box::new(EtcdSink::new(connection, sink_options(options))))
}

fn live_source(url: &str, options: &SourceOptions) -> Result<Arc<dyn LiveSource>> {
    let connection = connection(url, &options.connection.etcd, AdapterError::source)?;
    Ok(Arc::new(EtcdLiveSource::new(connection, options.parallel)))
}

fn live_sink(url: &str, options: &SinkOptions) -> Result<Arc<dyn LiveSink>> {
    let connection = connection(url, &options.connection.etcd, AdapterError::target)?;
    Ok(Arc::new(EtcdLiveSink::new(
        connection,
        sink_options(options),
    )))
}

fn in_place(url: &str, options: &SinkOptions) -> Result<Arc<dyn InPlaceTarget>> {
    let txn = &options.target.etcd;
    if txn.max_txn_ops < 4 {
        return Err(AdapterError::BadUrl {
            url: url.to_owned(),
            reason: format!(
                "a migration in place needs --max-txn-ops of at least 4 (its records and lock share each Txn), not {}",
                txn.max_txn_ops
            ),
        }
        .into());
    }
    let connection = connection(url, &options.connection.etcd, AdapterError::target)?;
    Ok(Arc::new(EtcdInPlace::new(
        connection,
        InPlaceOptions {
            max_txn_ops: txn.max_txn_ops as usize,
            max_request_bytes: txn.max_request_bytes,
            ..InPlaceOptions::default()
        },
    )))
}

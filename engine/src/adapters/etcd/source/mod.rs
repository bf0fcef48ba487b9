//! Extracting etcd: one snapshot at one revision.

mod describe;
mod follow;
mod lease;
mod snapshot;

pub use describe::{EtcdDescription, describe_cluster};
pub(crate) use lease::parse_lease_key;
pub(crate) use snapshot::kv_op;
pub(super) use snapshot::{count_keys, read_range};

use ferry_proto::etcd::etcdserverpb::{StatusRequest, StatusResponse};

use super::client::EtcdClient;
use super::{EtcdConnection, EtcdError, prefix_end};
use crate::Result;
use crate::adapters::AdapterError;
use crate::manifest::SourceInfo;

/// What to extract.
#[derive(Debug, Clone)]
pub struct EtcdSourceOptions {
    /// Only keys starting with this; empty for the whole keyspace.
    pub prefix: Vec<u8>,
    /// Key ranges read at once, all at the same revision.
    pub parallel: usize,
}

impl Default for EtcdSourceOptions {
    fn default() -> Self {
        Self {
            prefix: Vec::new(),
            parallel: 1,
        }
    }
}

/// One consistent snapshot of an etcd cluster (or a prefix of it).
#[derive(Debug)]
pub struct EtcdSource {
    connection: EtcdConnection,
    options: EtcdSourceOptions,
}

impl EtcdSource {
    /// A source reading `connection`'s cluster.
    pub fn new(connection: EtcdConnection, options: EtcdSourceOptions) -> Self {
        Self {
            connection,
            options,
        }
    }
}

fn source_error(error: EtcdError) -> crate::Error {
    AdapterError::source(error).into()
}

/// The key range to read: `[start, end)`, etcd style.
fn key_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        (vec![0], vec![0])
    } else {
        (prefix.to_vec(), prefix_end(prefix))
    }
}

/// Connects to `connection`'s cluster and reads its status (version, id).
async fn connect_with_status(connection: &EtcdConnection) -> Result<(EtcdClient, StatusResponse)> {
    let client = EtcdClient::connect(connection)
        .await
        .map_err(source_error)?;
    let status = client
        .call("read the status of", |mut services| async move {
            services.maintenance.status(StatusRequest {}).await
        })
        .await
        .map_err(source_error)?;
    Ok((client, status))
}

/// What an etcd snapshot was taken from, for the manifest or a stream start.
fn source_info(prefix: &[u8], version: String, cluster_id: u64, revision: i64) -> SourceInfo {
    let key_prefix = match std::str::from_utf8(prefix) {
        Ok("") => None,
        Ok(prefix) => Some(prefix.to_owned()),
        // A binary prefix is not recorded: a restore then checks the
        // whole target keyspace for emptiness, which is stricter.
        Err(_) => None,
    };
    SourceInfo {
        platform: "etcd".to_owned(),
        platform_version: Some(version),
        identity: Some(format!("{cluster_id:016x}")),
        snapshot_position: Some(revision as u64),
        key_prefix,
        description: None,
    }
}

//! What a cluster is, for an agent's Describe.

use super::connect_with_status;
use crate::Result;
use crate::adapters::etcd::EtcdConnection;

/// What an etcd cluster is, for an agent's Describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdDescription {
    /// etcd's version, e.g. `3.4.23`.
    pub version: String,
    /// The cluster id, as 16 hex digits: stable across members and restarts.
    pub identity: String,
    /// The cluster's current revision.
    pub revision: i64,
}

/// Reads what `connection`'s cluster is.
pub async fn describe_cluster(connection: &EtcdConnection) -> Result<EtcdDescription> {
    let (_, status) = connect_with_status(connection).await?;
    let header = status.header.unwrap_or_default();
    Ok(EtcdDescription {
        version: status.version,
        identity: format!("{:016x}", header.cluster_id),
        revision: header.revision,
    })
}

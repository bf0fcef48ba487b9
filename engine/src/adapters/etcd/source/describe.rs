//! What a cluster is, for an agent's Describe.

use ferry_proto::etcd::etcdserverpb::StatusRequest;

use super::source_error;
use crate::Result;
use crate::adapters::etcd::EtcdConnection;
use crate::adapters::etcd::client::EtcdClient;

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
    let client = EtcdClient::connect(connection)
        .await
        .map_err(source_error)?;
    let status = client
        .call("read the status of", |mut services| async move {
            services.maintenance.status(StatusRequest {}).await
        })
        .await
        .map_err(source_error)?;
    let header = status.header.unwrap_or_default();
    Ok(EtcdDescription {
        version: status.version,
        identity: format!("{:016x}", header.cluster_id),
        revision: header.revision,
    })
}

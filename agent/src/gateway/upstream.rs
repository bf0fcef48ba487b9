//! The etcd cluster the gateway forwards to: one HTTP/2 channel to its
//! members, shared by every call, and a client of each service on it.

use std::time::Duration;

use ferry_engine::adapters::etcd::EtcdConnection;
use ferry_proto::etcd::etcdserverpb::StatusRequest;
use ferry_proto::etcd::etcdserverpb::auth_client::AuthClient;
use ferry_proto::etcd::etcdserverpb::cluster_client::ClusterClient;
use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use ferry_proto::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use ferry_proto::etcd::etcdserverpb::watch_client::WatchClient;
use tonic::transport::{Channel, Endpoint};

use super::GatewayError;

/// The largest message the gateway passes on, either way: etcd's own
/// default for what it sends (`math.MaxInt32`); what it accepts is limited
/// by the upstream's `--max-request-bytes`, which then answers for itself.
pub(crate) const MAX_MESSAGE_BYTES: usize = i32::MAX as usize;

/// One upstream cluster. Cloning a client is cheap (it shares the channel).
#[derive(Debug)]
pub(crate) struct Upstream {
    /// `etcd://HOST:PORT[,...]`, for Status and messages.
    pub url: String,
    pub kv: KvClient<Channel>,
    pub watch: WatchClient<Channel>,
    pub lease: LeaseClient<Channel>,
    pub maintenance: MaintenanceClient<Channel>,
    pub cluster: ClusterClient<Channel>,
    pub auth: AuthClient<Channel>,
}

impl Upstream {
    /// Connects to `url` (`etcd://HOST:PORT[,HOST:PORT...]`) and checks
    /// that a member answers etcd's Status within `connect_timeout`.
    pub async fn connect(url: &str, connect_timeout: Duration) -> Result<Self, GatewayError> {
        if !url.starts_with("etcd://") {
            return Err(GatewayError::BadUpstream {
                url: url.to_owned(),
                reason: "the gateway forwards to etcd://HOST:PORT[,HOST:PORT...] (plain HTTP/2; TLS to the upstream is not supported yet)".to_owned(),
            });
        }
        let connection =
            EtcdConnection::from_url(url, None).map_err(|error| GatewayError::BadUpstream {
                url: url.to_owned(),
                reason: error.to_string(),
            })?;
        let display = connection.display();
        let endpoints = connection
            .endpoints
            .iter()
            .map(|address| {
                Endpoint::from_shared(format!("http://{address}"))
                    .map(|endpoint| {
                        endpoint
                            .connect_timeout(connect_timeout)
                            .tcp_nodelay(true)
                            .tcp_keepalive(Some(Duration::from_secs(30)))
                            .http2_keep_alive_interval(Duration::from_secs(30))
                            .keep_alive_while_idle(true)
                    })
                    .map_err(|error| GatewayError::BadUpstream {
                        url: display.clone(),
                        reason: format!("{address}: {error}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = match endpoints.as_slice() {
            [single] => single
                .connect()
                .await
                .map_err(|error| GatewayError::Unreachable {
                    url: display.clone(),
                    reason: error_chain(&error),
                })?,
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        let upstream = Self {
            url: display,
            kv: KvClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            watch: WatchClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            lease: LeaseClient::new(channel.clone()),
            maintenance: MaintenanceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            cluster: ClusterClient::new(channel.clone()),
            auth: AuthClient::new(channel),
        };
        upstream.check(connect_timeout).await?;
        Ok(upstream)
    }

    /// Asks a member for its Status: proof that an etcd answers there.
    async fn check(&self, timeout: Duration) -> Result<(), GatewayError> {
        let unreachable = |reason: String| GatewayError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        match tokio::time::timeout(timeout, self.maintenance.clone().status(StatusRequest {})).await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(unreachable(format!(
                "Status failed: {}",
                error_chain(&status)
            ))),
            Err(_) => Err(unreachable(format!(
                "no answer to Status within {timeout:?}"
            ))),
        }
    }
}

/// An error and its sources, for a message (the transport's own words are
/// deep in the chain).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        let more = source.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = source.source();
    }
    text
}

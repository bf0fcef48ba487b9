//! A small etcd v3 client on ferry's own generated stubs (`ferry-proto`,
//! compiled by protox: no system `protoc`), with what the adapter needs:
//! authentication with token refresh, and errors sorted for the user.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_proto::etcd::etcdserverpb::AuthenticateRequest;
use ferry_proto::etcd::etcdserverpb::auth_client::AuthClient;
use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use ferry_proto::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::{EtcdConnection, EtcdError, EtcdTls};

/// The largest response ferry accepts: one value may be as large as the
/// server's `--max-request-bytes`, and a page holds at least one.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Adds the auth token, when there is one, to every request.
#[derive(Clone, Default)]
pub(crate) struct TokenInterceptor {
    token: Arc<RwLock<Option<MetadataValue<tonic::metadata::Ascii>>>>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Ok(token) = self.token.read()
            && let Some(token) = token.as_ref()
        {
            request.metadata_mut().insert("token", token.clone());
        }
        Ok(request)
    }
}

type Intercepted = InterceptedService<Channel, TokenInterceptor>;

/// The service clients, cheap to clone: each call takes its own.
#[derive(Clone)]
pub(crate) struct Services {
    pub kv: KvClient<Intercepted>,
    pub lease: LeaseClient<Intercepted>,
    pub maintenance: MaintenanceClient<Intercepted>,
}

/// A connection to one etcd cluster.
#[derive(Clone)]
pub(crate) struct EtcdClient {
    connection: EtcdConnection,
    channel: Channel,
    interceptor: TokenInterceptor,
    services: Services,
}

/// The longest one unary call to etcd may take: a member that hangs
/// (SIGSTOP, a stuck disk) fails the call instead of stalling it forever.
/// Generous, as a Range of 10,000 large values or a Txn on a slow disk takes
/// seconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How often an idle HTTP/2 connection to etcd is pinged, and how long a
/// ping may go unanswered.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

impl EtcdClient {
    /// Connects (lazily) and authenticates when credentials are set.
    pub async fn connect(connection: &EtcdConnection) -> Result<Self, EtcdError> {
        let timeout = connection.connect_timeout.unwrap_or(Duration::from_secs(5));
        let tls = match &connection.tls {
            Some(files) => Some(tls_config(files).await?),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoints = connection
            .endpoints
            .iter()
            .map(|address| {
                let endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
                    .map(|endpoint| {
                        endpoint
                            .connect_timeout(timeout)
                            .tcp_keepalive(Some(Duration::from_secs(30)))
                            // A member that stops answering (a hung host, a
                            // cut link) is found within seconds, streams
                            // too, not at the TCP keepalive's pace.
                            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                            .keep_alive_timeout(KEEPALIVE_INTERVAL)
                            .keep_alive_while_idle(true)
                    })
                    .map_err(|error| EtcdError::BadUrl {
                        url: connection.display(),
                        reason: error.to_string(),
                    })?;
                match &tls {
                    Some(tls) => {
                        endpoint
                            .tls_config(tls.clone())
                            .map_err(|error| EtcdError::TlsFiles {
                                reason: format!("{error} (for {address})"),
                            })
                    }
                    None => Ok(endpoint),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if tls.is_some() {
            probe_tls(connection, &endpoints, timeout).await?;
        }
        let channel = Channel::balance_list(endpoints.into_iter());
        let interceptor = TokenInterceptor::default();
        let services = Services {
            kv: KvClient::with_interceptor(channel.clone(), interceptor.clone())
                .max_decoding_message_size(MAX_RESPONSE_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
            lease: LeaseClient::with_interceptor(channel.clone(), interceptor.clone()),
            maintenance: MaintenanceClient::with_interceptor(channel.clone(), interceptor.clone()),
        };
        let client = Self {
            connection: connection.clone(),
            channel,
            interceptor,
            services,
        };
        client.authenticate().await?;
        Ok(client)
    }

    async fn authenticate(&self) -> Result<(), EtcdError> {
        let Some((name, password)) = &self.connection.credentials else {
            return Ok(());
        };
        let response = tokio::time::timeout(
            Duration::from_secs(30),
            AuthClient::new(self.channel.clone()).authenticate(AuthenticateRequest {
                name: name.clone(),
                password: password.clone(),
            }),
        )
        .await
        .map_err(|_| EtcdError::Unreachable {
            endpoints: self.connection.display(),
            reason: "no answer within 30 s".to_owned(),
        })?
        .map_err(|status| self.connection.failed("authenticate with", &status))?;
        let token = MetadataValue::try_from(response.into_inner().token).map_err(|error| {
            EtcdError::Credentials {
                reason: format!("the auth token is not a valid header value: {error}"),
            }
        })?;
        if let Ok(mut slot) = self.interceptor.token.write() {
            *slot = Some(token);
        }
        Ok(())
    }

    /// Runs one call, within [`REQUEST_TIMEOUT`]; an expired auth token is
    /// renewed and the call made once more.
    pub async fn call<T, F, Fut>(&self, action: &str, call: F) -> Result<T, EtcdError>
    where
        F: Fn(Services) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let within = |future: Fut| async move {
            tokio::time::timeout(REQUEST_TIMEOUT, future)
                .await
                .unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(format!(
                        "no answer within {REQUEST_TIMEOUT:?}"
                    )))
                })
        };
        let call = |services: Services| within(call(services));
        match call(self.services.clone()).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status)
                if status.message().contains("invalid auth token")
                    && self.connection.credentials.is_some() =>
            {
                self.authenticate().await?;
                call(self.services.clone())
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|status| self.connection.failed(action, &status))
            }
            Err(status) => Err(self.connection.failed(action, &status)),
        }
    }

    /// The cluster, as shown in messages.
    pub fn connection(&self) -> &EtcdConnection {
        &self.connection
    }

    /// A Watch client on the same channel and credentials (the live follow
    /// of the source opens its watch streams with it).
    pub fn watch(&self) -> ferry_proto::etcd::etcdserverpb::watch_client::WatchClient<Intercepted> {
        ferry_proto::etcd::etcdserverpb::watch_client::WatchClient::with_interceptor(
            self.channel.clone(),
            self.interceptor.clone(),
        )
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// A Lease client on the same channel and credentials (for the
    /// keep-alive stream of a target's leases).
    pub fn lease(&self) -> LeaseClient<Intercepted> {
        LeaseClient::with_interceptor(self.channel.clone(), self.interceptor.clone())
    }

    /// Renews the auth token (a watch stream broke and is opened again: its
    /// token may have expired meanwhile).
    pub async fn reauthenticate(&self) -> Result<(), EtcdError> {
        self.authenticate().await
    }
}

/// Makes one small request on a connection of its own to the members, so a
/// failed TLS handshake is reported as what it is: the balanced channel's
/// errors only say a connection was lost. Other failures (a member down,
/// auth) are left to the first real call to report, as without TLS.
async fn probe_tls(
    connection: &EtcdConnection,
    endpoints: &[Endpoint],
    timeout: Duration,
) -> Result<(), EtcdError> {
    let mut failure = None;
    for endpoint in endpoints {
        let attempt = tokio::time::timeout(timeout * 2, async {
            let channel = endpoint
                .connect()
                .await
                .map_err(|error| connection.tls_failure(&error))?;
            let request = ferry_proto::etcd::etcdserverpb::RangeRequest {
                key: vec![0],
                count_only: true,
                limit: 1,
                ..Default::default()
            };
            match KvClient::new(channel).range(request).await {
                Ok(_) => Ok(()),
                Err(status) => Err(connection.tls_failure(&status)),
            }
        })
        .await;
        match attempt {
            Ok(Ok(())) | Err(_) | Ok(Err(None)) => return Ok(()),
            Ok(Err(Some(reason))) => failure = Some(reason),
        }
    }
    match failure {
        Some(reason) => Err(EtcdError::Tls {
            endpoints: connection.display(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The client side of TLS: the CA to trust (else the system's roots) and
/// ferry's own certificate, read from their files (also the gateway's,
/// towards its upstreams).
pub async fn tls_config(files: &EtcdTls) -> Result<ClientTlsConfig, EtcdError> {
    async fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, EtcdError> {
        let content = tokio::fs::read(path)
            .await
            .map_err(|error| EtcdError::TlsFiles {
                reason: format!("cannot read the {what} {}: {error}", path.display()),
            })?;
        if !content.windows(11).any(|window| window == b"-----BEGIN ") {
            return Err(EtcdError::TlsFiles {
                reason: format!("the {what} {} is not in PEM form", path.display()),
            });
        }
        Ok(content)
    }
    let mut config = ClientTlsConfig::new();
    config = match &files.ca_file {
        Some(path) => config.ca_certificate(Certificate::from_pem(read(path, "CA file").await?)),
        None => config.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&files.cert_file, &files.key_file) {
        config = config.identity(Identity::from_pem(
            read(cert, "client certificate file").await?,
            read(key, "client key file").await?,
        ));
    }
    Ok(config)
}

//! The etcd kind of upstream: the gateway serves etcd's v3 API (KV, Watch,
//! Lease, Maintenance, Cluster, Auth) and forwards every call to the
//! current upstream etcd over one shared HTTP/2 channel, a client of each
//! service on it, with the gateway's own credentials and TLS towards it.
//!
//! - `proxy`: the services, reads straight through, writes through the
//!   gate; `router`: the one match on the call's path, and etcd's request
//!   size cap; `revisions`: the revision offset, both ways.
//! - [`EtcdUpstream`]: one upstream cluster, and the kind's
//!   [`UpstreamPlane`] implementation; its fence record is the engine's
//!   (`ferry_engine::adapters::etcd`'s fence module), moved over the
//!   gateway's own channel.
//!
//! What tells a write from a read is the method (see the `proxy` module):
//! Put, DeleteRange, a Txn with any put or delete, Compact, LeaseGrant,
//! LeaseRevoke and the Auth service's changes are writes; Range, a Txn of
//! ranges, Watch, LeaseKeepAlive, LeaseTimeToLive, LeaseLeases and status
//! calls are reads. A Switch connects only to an etcd that answers etcd's
//! Status.
//!
//! Streams across a switch: a Watch or LeaseKeepAlive stream is bound to
//! the upstream it was opened on. Switch ends those streams with
//! `UNAVAILABLE`, and etcd clients (clientv3, `etcdctl watch`, Rust's
//! `etcd-client` users who re-watch) open them again on the new upstream.
//! A re-opened watch asks for revisions after the last one it saw, and
//! those are the old etcd's revisions: the new etcd numbers its own, so a
//! client that resumes a watch by revision must tolerate a compacted-
//! revision error or a replay of events (Kubernetes' reflectors relist).
//!
//! Auth: a client's `token` (or `authorization`) metadata is passed on to
//! the upstream. A simple token is only valid on the etcd that issued it;
//! after a switch such clients authenticate again (JWT tokens signed with
//! the same key work on both). The gateway's own credentials
//! ([`UpstreamAccess`]: `ETCD_USERNAME` and a password from the environment
//! or a file) are used for calls whose client sent no token, and its TLS
//! files for every upstream, the first and each Switch's.

mod proxy;
mod revisions;
mod router;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_engine::adapters::etcd::{
    EtcdConnection, EtcdTls, FenceFailure, FencePlane, REVISION_OFFSET_KEY, RevisionOffset,
    fence_state, move_fence_with, raised_fence_alarms, read_fence_with, tls_config,
};
use ferry_engine::adapters::live::{FenceAnswer, FenceMove, FenceState};
use ferry_proto::etcd::etcdserverpb::auth_client::AuthClient;
use ferry_proto::etcd::etcdserverpb::cluster_client::ClusterClient;
use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use ferry_proto::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use ferry_proto::etcd::etcdserverpb::watch_client::WatchClient;
use ferry_proto::etcd::etcdserverpb::{
    AlarmRequest, AlarmResponse, AuthenticateRequest, RangeRequest, StatusRequest, TxnRequest,
    TxnResponse,
};
use tokio::net::TcpListener;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::{GatewayError, Shared, UpstreamPlane, listen_address};
use crate::serve::server_builder;
use proxy::EtcdProxy;
use router::EtcdRouter;

/// The kind's name in messages.
const KIND: &str = "etcd";

/// The largest message the gateway exchanges with an upstream, either way:
/// etcd's own default for what it sends (`math.MaxInt32`). What clients may
/// send the gateway is capped where they arrive (`ferry gateway
/// --max-request-bytes`, see the router).
pub(crate) const MAX_MESSAGE_BYTES: usize = i32::MAX as usize;

/// The metadata key of etcd's auth token (gRPC clients).
pub(crate) const TOKEN_KEY: &str = "token";

/// How the gateway reaches any upstream etcd: its own credentials and TLS,
/// the same for the first upstream and every Switch.
#[derive(Debug, Clone, Default)]
pub struct UpstreamAccess {
    /// A file whose first line is the password of `ETCD_USERNAME`; without
    /// it, `ETCD_USERNAME` and `ETCD_PASSWORD` when set.
    pub password_file: Option<PathBuf>,
    /// TLS files; any of them turns TLS on (`etcds://` does too).
    pub tls: EtcdTls,
}

/// What the gateway bounds in what etcd's clients send.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// The upstream's `--max-request-bytes` (etcd's default: 1,572,864): a
    /// client's request message over it plus etcd's 512 KiB allowance for
    /// gRPC is refused `RESOURCE_EXHAUSTED` as it arrives, as etcd refuses
    /// it, neither held nor forwarded. Responses are not capped.
    pub max_request_bytes: usize,
}

/// One upstream etcd cluster. Cloning a client is cheap (it shares the
/// channel).
pub struct EtcdUpstream {
    /// `etcd://HOST:PORT[,...]` (`etcds://` with TLS), for Status and messages.
    url: String,
    /// What the gateway adds to this upstream's revisions in what clients
    /// see, and takes off what they send: 0 for the first upstream, the
    /// fence record's `successor_revision_offset` after a switch.
    revision_offset: i64,
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    lease: LeaseClient<Channel>,
    maintenance: MaintenanceClient<Channel>,
    cluster: ClusterClient<Channel>,
    auth: AuthClient<Channel>,
    /// The gateway's own user, when the upstream has auth on.
    credentials: Option<(String, String)>,
    /// The gateway's token, sent on calls whose client sent none.
    token: RwLock<Option<MetadataValue<Ascii>>>,
    /// One re-authentication at a time.
    authenticating: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for EtcdUpstream {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password or the token.
        formatter
            .debug_struct("EtcdUpstream")
            .field("url", &self.url)
            .field("revision_offset", &self.revision_offset)
            .field(
                "user",
                &self.credentials.as_ref().map(|(name, _)| name.as_str()),
            )
            .finish_non_exhaustive()
    }
}

impl EtcdUpstream {
    /// Asks a member for its Status: proof that an etcd answers there.
    async fn check(&self, timeout: Duration) -> Result<(), GatewayError> {
        let unreachable = |reason: String| GatewayError::Unreachable {
            url: self.url.clone(),
            reason,
            kind: KIND,
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

    /// Gets a fresh token for the gateway's own user.
    async fn authenticate(&self) -> Result<(), Status> {
        let Some((name, password)) = &self.credentials else {
            return Ok(());
        };
        let response = tokio::time::timeout(
            Duration::from_secs(30),
            self.auth.clone().authenticate(AuthenticateRequest {
                name: name.clone(),
                password: password.clone(),
            }),
        )
        .await
        .map_err(|_| Status::unavailable(format!("{} did not answer Authenticate", self.url)))??;
        let token = MetadataValue::try_from(response.into_inner().token)
            .map_err(|_| Status::internal("etcd's auth token is not a valid header value"))?;
        if let Ok(mut slot) = self.token.write() {
            *slot = Some(token);
        }
        Ok(())
    }

    /// The gateway's token, for a call whose client sent none; `None` when
    /// the gateway has no credentials or the client brought its own.
    fn token_for<T>(&self, request: &Request<T>) -> Option<MetadataValue<Ascii>> {
        if self.credentials.is_none()
            || request.metadata().contains_key(TOKEN_KEY)
            || request.metadata().contains_key("authorization")
        {
            return None;
        }
        self.token.read().ok().and_then(|token| token.clone())
    }

    /// Adds the gateway's token to a stream's request (see
    /// [`EtcdUpstream::token_for`]).
    fn authorize<T>(&self, request: &mut Request<T>) {
        if let Some(token) = self.token_for(request) {
            request.metadata_mut().insert(TOKEN_KEY, token);
        }
    }

    /// Makes a unary call. When it carries the gateway's token and etcd
    /// says the token is no longer valid (it expired, or etcd restarted),
    /// the gateway authenticates again and makes the call once more: etcd
    /// checked the token before doing anything, so nothing ran twice. Only
    /// then is the request cloned.
    async fn call<Req, Resp, Call, Fut>(
        &self,
        mut request: Request<Req>,
        call: Call,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        Call: Fn(Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let Some(token) = self.token_for(&request) else {
            return call(request).await;
        };
        let again = Request::new(request.get_ref().clone());
        request.metadata_mut().insert(TOKEN_KEY, token.clone());
        match call(request).await {
            Err(status) if status.message().contains("invalid auth token") => {
                let _one_at_a_time = self.authenticating.lock().await;
                let current = self.token.read().ok().and_then(|token| token.clone());
                if current.as_ref() == Some(&token) {
                    self.authenticate().await?;
                }
                let mut again = again;
                self.authorize(&mut again);
                call(again).await
            }
            answer => answer,
        }
    }
}

/// The upstream as the gateway's own client of its fence: its credentials,
/// and an answer within a timeout.
struct OwnCalls<'a> {
    upstream: &'a EtcdUpstream,
    timeout: Duration,
}

impl OwnCalls<'_> {
    async fn within<T>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(answer) => answer.map(Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{} did not answer within {:?}",
                self.upstream.url, self.timeout
            ))),
        }
    }
}

impl FencePlane for OwnCalls<'_> {
    type Error = Status;

    async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, Status> {
        let client = self.upstream.kv.clone();
        self.within(self.upstream.call(Request::new(request), |request| {
            let mut client = client.clone();
            async move { client.txn(request).await }
        }))
        .await
    }

    async fn alarm(&self, request: AlarmRequest) -> Result<AlarmResponse, Status> {
        let client = self.upstream.maintenance.clone();
        self.within(self.upstream.call(Request::new(request), |request| {
            let mut client = client.clone();
            async move { client.alarm(request).await }
        }))
        .await
    }
}

impl EtcdUpstream {
    fn own(&self, timeout: Duration) -> OwnCalls<'_> {
        OwnCalls {
            upstream: self,
            timeout,
        }
    }

    /// The epochs of the write alarms ferry raised on the upstream.
    async fn fence_alarms(&self, timeout: Duration) -> Result<Vec<u64>, String> {
        raised_fence_alarms(&self.own(timeout))
            .await
            .map_err(|status| self.fence_failure(FenceFailure::Call(status)))
    }

    /// What a client is told when the upstream refused a write for lack of
    /// space and its fence record says it is not fenced: a migration that
    /// raised ferry's write alarm and has not fenced yet (or died between
    /// the two), or a database that is full.
    async fn no_space_refusal(&self, refusal: Status, timeout: Duration) -> Status {
        match self.fence_alarms(timeout).await {
            Ok(epochs) if !epochs.is_empty() => Status::unavailable(format!(
                "{} refuses writes: live migration epoch {} raised ferry's write alarm and has not fenced the plane yet; retry. If no migration is running, `ferry migrate abort` lowers it",
                self.url,
                epochs.iter().max().unwrap_or(&0)
            )),
            _ => refusal,
        }
    }

    fn fence_failure(&self, failure: FenceFailure<Status>) -> String {
        match failure {
            FenceFailure::Call(status) => format!(
                "cannot read or write the fence record of {}: {}",
                self.url,
                status.message()
            ),
            FenceFailure::Unreadable(reason) => format!("{}: {reason}", self.url),
        }
    }
}

impl UpstreamPlane for EtcdUpstream {
    const KIND: &'static str = KIND;
    const SCHEMES: &'static [&'static str] = &["etcd", "etcds"];
    type Access = UpstreamAccess;
    type ClientLimits = ClientLimits;

    /// Connects to `url` (`etcd://HOST:PORT[,HOST:PORT...]`, or `etcds://`)
    /// with `access`, authenticates when credentials are set, and checks
    /// that a member answers etcd's Status within `connect_timeout`.
    async fn connect(
        url: &str,
        access: &UpstreamAccess,
        connect_timeout: Duration,
    ) -> Result<Self, GatewayError> {
        let bad = |reason: String| GatewayError::BadUpstream {
            url: url.to_owned(),
            reason,
        };
        let connection = EtcdConnection::from_url(url, access.password_file.as_ref())
            .and_then(|connection| connection.with_tls_files(&access.tls))
            .map_err(|error| bad(error.to_string()))?;
        let display = connection.display();
        let tls = match &connection.tls {
            Some(files) => Some(
                tls_config(files)
                    .await
                    .map_err(|error| bad(error.to_string()))?,
            ),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoints = connection
            .endpoints
            .iter()
            .map(|address| {
                let endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
                    .map_err(|error| bad(format!("{address}: {error}")))?
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .tcp_keepalive(Some(Duration::from_secs(30)))
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_while_idle(true);
                match &tls {
                    Some(tls) => endpoint
                        .tls_config(tls.clone())
                        .map_err(|error| bad(format!("{address}: {error}"))),
                    None => Ok(endpoint),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = match endpoints.as_slice() {
            [single] => single
                .connect()
                .await
                .map_err(|error| GatewayError::Unreachable {
                    url: display.clone(),
                    reason: error_chain(&error),
                    kind: KIND,
                })?,
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        let upstream = Self {
            url: display,
            revision_offset: 0,
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
            credentials: connection.credentials,
            token: RwLock::new(None),
            authenticating: tokio::sync::Mutex::new(()),
        };
        upstream.check(connect_timeout).await?;
        if upstream.credentials.is_some() {
            upstream
                .authenticate()
                .await
                .map_err(|status| GatewayError::Unreachable {
                    url: upstream.url.clone(),
                    reason: format!(
                        "authenticating as ETCD_USERNAME failed: {}",
                        status.message()
                    ),
                    kind: KIND,
                })?;
        }
        Ok(upstream)
    }

    fn url(&self) -> &str {
        &self.url
    }

    fn position_offset(&self) -> i64 {
        self.revision_offset
    }

    fn set_position_offset(&mut self, offset: i64) {
        self.revision_offset = offset;
    }

    /// Reads `__ferry__/revision_offset`, which the target agent's adopt
    /// wrote before the switch to this plane was committed.
    async fn adopt_plane_offset(&mut self, timeout: Duration) -> Result<(), GatewayError> {
        let unreachable = |reason: String| GatewayError::Unreachable {
            url: self.url.clone(),
            reason,
            kind: KIND,
        };
        let client = self.kv.clone();
        let read = self.call(
            Request::new(RangeRequest {
                key: REVISION_OFFSET_KEY.to_vec(),
                ..RangeRequest::default()
            }),
            |request| {
                let mut client = client.clone();
                async move { client.range(request).await }
            },
        );
        let stored = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
            .map_err(|status| {
                unreachable(format!(
                    "cannot read its revision offset: {}",
                    status.message()
                ))
            })?
            .into_inner()
            .kvs
            .into_iter()
            .next();
        if let Some(kv) = stored {
            let offset: RevisionOffset = serde_json::from_slice(&kv.value).map_err(|error| {
                unreachable(format!(
                    "its {} does not parse ({error})",
                    String::from_utf8_lossy(REVISION_OFFSET_KEY)
                ))
            })?;
            self.revision_offset = offset.revision_offset;
        }
        Ok(())
    }

    /// The record alone: ferry's write alarms are read only to explain a
    /// refused write (see the proxy).
    async fn fence_record(&self, timeout: Duration) -> Result<FenceState, String> {
        let stored = read_fence_with(&self.own(timeout))
            .await
            .map_err(|failure| self.fence_failure(failure))?;
        Ok(fence_state(stored.as_ref(), Vec::new()))
    }

    async fn move_fence(
        &self,
        change: &FenceMove,
        timeout: Duration,
    ) -> Result<FenceAnswer, String> {
        move_fence_with(&self.own(timeout), change)
            .await
            .map(|outcome| outcome.into_answer(&self.url))
            .map_err(|failure| self.fence_failure(failure))
    }

    async fn serve_clients(
        shared: Arc<Shared<Self>>,
        listener: TcpListener,
        tls: Option<(PathBuf, PathBuf)>,
        limits: ClientLimits,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let address = listen_address(&listener);
        server_builder(tls.as_ref())
            .map_err(|error| GatewayError::Tls {
                reason: error.to_string(),
            })?
            .serve_with_incoming_shutdown(
                EtcdRouter::new(EtcdProxy::new(shared), limits.max_request_bytes),
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await
            .map_err(|error| GatewayError::Serve {
                service: "etcd API",
                address,
                reason: error.to_string(),
            })
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

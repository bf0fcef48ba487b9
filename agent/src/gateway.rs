//! The write-fencing gateway: the address the clients of a control plane
//! talk to, so that `ferry migrate` can move them to a new plane without
//! them noticing more than a short pause of their writes.
//!
//! It has two halves:
//!
//! - **The platform-free half** (this module, `gate`, `admin`, `settle`,
//!   `upstream`): the gate every write passes, the admin service
//!   (`ferry.v1.GatewayAdmin`, `proto/ferry/v1/gateway.proto`) that closes
//!   and opens it, and the settling of a hold from the old plane's fence
//!   record, read in the live contract's words
//!   (`ferry_engine::adapters::live::FenceState`).
//! - **The kinds** of upstream: each serves one platform's client protocol
//!   and forwards it to the upstream plane in force. [`etcd`] is the one
//!   built: etcd's v3 gRPC API (KV, Watch, Lease, Maintenance, Cluster,
//!   Auth) over one shared HTTP/2 channel. A kind implements
//!   [`UpstreamPlane`]: connect to a plane by URL with its own
//!   [`Access`](UpstreamPlane::Access) (credentials, TLS), read and move
//!   its fence record, keep the position offset its clients see, and serve
//!   its clients through the gate ([`UpstreamPlane::serve_clients`]), with
//!   its own [`ClientLimits`](UpstreamPlane::ClientLimits). The CLI picks
//!   the kind by the upstream URL's scheme ([`UpstreamPlane::SCHEMES`]). A
//!   PostgreSQL wire proxy, holding at transaction boundaries, is to be the
//!   next kind.
//!
//! Reads always pass; writes pass through the gate, which the admin
//! service can close:
//!
//! 1. **Hold**(epoch, max_pause): new writes wait; the call returns once
//!    every write that was in flight to the upstream has been answered.
//! 2. **Switch**(epoch, url): only while holding, and only to the successor
//!    the old plane's fence record says the migration committed to;
//!    connects to the new upstream first, and fails (leaving the old one in
//!    place) if it does not answer.
//! 3. **Release**(epoch): the held writes go to the (possibly new)
//!    upstream one at a time in the order they arrived, then new writes
//!    flow again.
//!
//! A held write waits at most `max_pause` from the Hold. After that, held
//! and new writes are answered `UNAVAILABLE` ("the control plane is being
//! switched ... retry") until the Release: the gateway never sends a
//! write on to an upstream that may have been fenced. A request with an
//! epoch lower than the gateway's is refused with `FAILED_PRECONDITION`.
//! A hold whose driver goes away, or whose pause runs out, is settled from
//! the fence record (`settle`).
//!
//! What tells a write from a read, what becomes of a stream across a
//! switch, and how clients' credentials are passed on are the kind's own
//! (for etcd, see [`etcd`]).

mod admin;
pub mod etcd;
mod gate;
pub mod postgres;
mod settle;
mod upstream;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use ferry_proto::v1::gateway_admin_server::GatewayAdminServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};

pub use ferry_proto::v1::gateway_admin_client::GatewayAdminClient;
pub use gate::{GateError, GateRefusal};
pub use upstream::UpstreamPlane;

use crate::auth::RequireToken;
use crate::serve::server_builder;
use admin::AdminService;
use gate::Gate;

/// How long open streams (watches) get to finish after a shutdown before
/// the gateway stops anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How a [`Gateway`] in front of planes of kind `U` starts.
pub struct GatewayOptions<U: UpstreamPlane> {
    /// The first upstream, e.g. `etcd://HOST:PORT[,HOST:PORT...]`.
    pub upstream_url: String,
    /// The pause a Hold allows when its request names none
    /// (`max_pause_ms` = 0).
    pub default_max_pause: Duration,
    /// How long an upstream (the first, or a Switch's) has to answer
    /// before it is called unreachable.
    pub connect_timeout: Duration,
    /// The gateway's own credentials and TLS towards every upstream.
    pub access: U::Access,
    /// The bearer token every call to the admin service must carry
    /// (`authorization: Bearer <token>`, as `ferry migrate` sends it); any
    /// caller may hold, switch and release when `None`.
    pub admin_token: Option<String>,
    /// PEM files of the certificate and key both listeners (the clients'
    /// API and the admin service) serve TLS with; no TLS when `None`.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl<U: UpstreamPlane> std::fmt::Debug for GatewayOptions<U> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        formatter
            .debug_struct("GatewayOptions")
            .field("upstream_url", &self.upstream_url)
            .field("default_max_pause", &self.default_max_pause)
            .field("connect_timeout", &self.connect_timeout)
            .field("access", &self.access)
            .field("admin_token_required", &self.admin_token.is_some())
            .field("tls", &self.tls)
            .finish()
    }
}

impl<U: UpstreamPlane> GatewayOptions<U> {
    /// Options for `upstream_url` with the defaults: a 2 s pause, 5 s to
    /// connect.
    pub fn new(upstream_url: impl Into<String>) -> Self {
        Self {
            upstream_url: upstream_url.into(),
            default_max_pause: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            access: U::Access::default(),
            admin_token: None,
            tls: None,
        }
    }
}

/// What went wrong starting or running the gateway, or reaching one.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The upstream URL cannot be used.
    #[error("cannot use upstream {url}: {reason}")]
    BadUpstream {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The upstream did not answer.
    #[error("cannot reach upstream {url}: {reason}; check the address and that {kind} is running")]
    Unreachable {
        /// The upstream's members.
        url: String,
        /// What the transport or the plane said.
        reason: String,
        /// The upstream's kind ([`UpstreamPlane::KIND`]): `etcd`.
        kind: &'static str,
    },
    /// The gateway's own certificate or key cannot be used.
    #[error("the gateway cannot serve TLS: {reason}")]
    Tls {
        /// What is wrong, naming the file.
        reason: String,
    },
    /// A server of the gateway failed.
    #[error("the gateway's {service} server on {address} failed: {reason}")]
    Serve {
        /// `admin`, or the clients' API (`etcd API`).
        service: &'static str,
        /// Where it listened.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The gateway's admin service did not answer ([`connect_admin`]).
    #[error("cannot reach the gateway's admin service at {address}: {reason}")]
    AdminUnreachable {
        /// The address tried.
        address: String,
        /// What the transport said.
        reason: String,
    },
}

impl From<GatewayError> for tonic::Status {
    fn from(error: GatewayError) -> Self {
        match error {
            GatewayError::BadUpstream { .. } => tonic::Status::invalid_argument(error.to_string()),
            _ => tonic::Status::unavailable(error.to_string()),
        }
    }
}

/// The state every service of one gateway shares: the gate, the upstream
/// in force and the counters Status shows. Opaque outside the gateway: a
/// kind's client server ([`UpstreamPlane::serve_clients`]) forwards through
/// it.
#[derive(Debug)]
pub struct Shared<U: UpstreamPlane> {
    gate: Arc<Gate>,
    /// The upstream in force; a switch replaces it, and streams opened on
    /// the old one see the change and end.
    upstream: watch::Sender<Arc<U>>,
    writes_forwarded: AtomicU64,
    reads_forwarded: AtomicU64,
    default_max_pause: Duration,
    connect_timeout: Duration,
    access: U::Access,
    /// One change of upstream at a time: Switch, a lapsed hold settling,
    /// and a write that met a fence and follows the record.
    switching: tokio::sync::Mutex<()>,
    /// Why a lapsed hold is not settled yet, for Status; empty otherwise.
    settling: std::sync::Mutex<String>,
}

/// How long a hold that lapsed may take to settle (read the old plane's
/// fence record, unfence it or connect to the new plane) before the writes
/// it holds are refused: the "small bound" past the pause.
pub const SETTLE_BOUND: Duration = Duration::from_secs(3);

/// A gateway connected to its first upstream of kind `U`, ready to serve.
pub struct Gateway<U: UpstreamPlane> {
    shared: Arc<Shared<U>>,
    admin_token: Option<String>,
    tls: Option<(PathBuf, PathBuf)>,
}

impl<U: UpstreamPlane> std::fmt::Debug for Gateway<U> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the admin token, nor the upstream's credentials.
        formatter
            .debug_struct("Gateway")
            .field("upstream_url", &self.upstream_url())
            .field("admin_token_required", &self.admin_token.is_some())
            .field("tls", &self.tls)
            .finish()
    }
}

impl<U: UpstreamPlane> Gateway<U> {
    /// Connects to the first upstream; fails if it does not answer.
    pub async fn connect(options: &GatewayOptions<U>) -> Result<Self, GatewayError> {
        // Bad TLS files fail here, before anyone is told the gateway serves.
        server_builder(options.tls.as_ref()).map_err(|error| GatewayError::Tls {
            reason: error.to_string(),
        })?;
        let first = U::connect(
            &options.upstream_url,
            &options.access,
            options.connect_timeout,
        )
        .await?;
        // The plane that serves may not be the one named: a migration may
        // have switched away from it (its fence record says where to), or
        // be switching now.
        let (upstream, in_doubt) =
            settle::serving_plane(first, &options.access, options.connect_timeout).await?;
        let shared = Arc::new(Shared {
            gate: Arc::new(Gate::default()),
            upstream: watch::Sender::new(Arc::new(upstream)),
            writes_forwarded: AtomicU64::new(0),
            reads_forwarded: AtomicU64::new(0),
            default_max_pause: options.default_max_pause,
            connect_timeout: options.connect_timeout,
            access: options.access.clone(),
            switching: tokio::sync::Mutex::new(()),
            settling: std::sync::Mutex::new(String::new()),
        });
        if let Some(epoch) = in_doubt {
            // As if that migration held this gateway: writes wait for its
            // decision, for the default pause, then the hold settles.
            shared
                .hold_until_decided(
                    epoch,
                    "the gateway started while the migration was undecided",
                )
                .await;
        }
        Ok(Self {
            shared,
            admin_token: options.admin_token.clone(),
            tls: options.tls.clone(),
        })
    }

    /// The upstream in force, as its URL (`etcd://HOST:PORT[,...]`).
    pub fn upstream_url(&self) -> String {
        self.shared.upstream.borrow().url().to_owned()
    }

    /// Serves the kind's client API on `client_listener` and the admin
    /// service on `admin_listener` until `shutdown` completes (then open
    /// streams get a moment to end) or a server fails. `limits` bound what
    /// clients may send, as the kind says (etcd: its `--max-request-bytes`).
    pub async fn serve(
        self,
        client_listener: TcpListener,
        admin_listener: TcpListener,
        limits: U::ClientLimits,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop.send(true);
        });
        let following = tokio::spawn(self.shared.clone().follow_committed_switches());
        let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let admin_address = listen_address(&admin_listener);
        let clients = U::serve_clients(
            self.shared.clone(),
            client_listener,
            self.tls.clone(),
            limits,
            until_stopped(stopped.clone()),
        );
        let admin = server_builder(self.tls.as_ref())
            .map_err(|error| GatewayError::Tls {
                reason: error.to_string(),
            })?
            .serve_with_incoming_shutdown(
                GatewayAdminServer::with_interceptor(
                    AdminService::new(self.shared.clone()),
                    RequireToken::new(self.admin_token),
                ),
                TcpIncoming::from(admin_listener).with_nodelay(Some(true)),
                until_stopped(stopped.clone()),
            );
        let servers = async {
            tokio::try_join!(clients, async {
                admin.await.map_err(|error| GatewayError::Serve {
                    service: "admin",
                    address: admin_address.clone(),
                    reason: error.to_string(),
                })
            },)
        };
        let served = tokio::select! {
            result = servers => result.map(|_| ()),
            () = async {
                until_stopped(stopped).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => Ok(()),
        };
        following.abort();
        served
    }
}

/// Where `listener` listens, for messages (`?` when it cannot say).
pub(crate) fn listen_address(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|address| address.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

/// A client of a gateway's admin service at `address` (`HOST:PORT` or
/// `http://HOST:PORT`), for `ferry migrate`. Connects at once, so a wrong
/// address fails here.
pub async fn connect_admin(address: &str) -> Result<GatewayAdminClient<Channel>, GatewayError> {
    let unreachable = |reason: String| GatewayError::AdminUnreachable {
        address: address.to_owned(),
        reason,
    };
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let channel = Endpoint::from_shared(uri)
        .map_err(|error| unreachable(error.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|error| {
            let mut reason = error.to_string();
            let mut next = std::error::Error::source(&error);
            while let Some(source) = next {
                reason = format!("{reason}: {source}");
                next = source.source();
            }
            unreachable(reason)
        })?;
    Ok(GatewayAdminClient::new(channel))
}

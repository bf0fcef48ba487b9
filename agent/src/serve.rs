//! Serving an agent: zstd both ways, TLS (rustls) when a certificate is
//! given, the bearer token when one is configured; and the one place that
//! maps engine errors to gRPC codes.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use ferry_engine::adapters::live::{Capabilities, PlaneDescription, PlaneDigest};
use ferry_engine::{Error, ErrorClass};
use ferry_proto::v1::source_agent_server::SourceAgentServer;
use ferry_proto::v1::target_agent_server::TargetAgentServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Status;
use tonic::codec::CompressionEncoding;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::info;

use crate::auth::RequireToken;
use crate::source::SourceAgentService;
use crate::target::TargetAgentService;

/// The largest message an agent takes or sends: a batch holds about a MiB of
/// ops, but one value may be as large as the target allows.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How an agent is served.
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// The bearer token every call must carry; none required when `None`.
    pub token: Option<String>,
    /// PEM files of the server's certificate and its key: TLS when set.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        formatter
            .debug_struct("ServeOptions")
            .field("token_required", &self.token.is_some())
            .field("tls", &self.tls)
            .finish()
    }
}

/// The agent could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A TLS file cannot be read or used.
    #[error("cannot use the TLS files: {reason}")]
    Tls {
        /// What is wrong, naming the file.
        reason: String,
    },
    /// The server failed.
    #[error("the agent's server failed: {reason}")]
    Transport {
        /// What tonic said.
        reason: String,
    },
}

fn builder(options: &ServeOptions) -> Result<Server, ServeError> {
    server_builder(options.tls.as_ref())
}

/// A server with ferry's transport settings, serving TLS with the PEM
/// certificate and key in `tls` when given (agents and the gateway).
pub(crate) fn server_builder(tls: Option<&(PathBuf, PathBuf)>) -> Result<Server, ServeError> {
    let mut server = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)));
    if let Some((cert_file, key_file)) = tls {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|error| ServeError::Tls {
                reason: format!("cannot read {}: {error}", path.display()),
            })
        };
        let identity = Identity::from_pem(read(cert_file)?, read(key_file)?);
        server = server
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|error| ServeError::Tls {
                reason: format!(
                    "{} and {}: {error}",
                    cert_file.display(),
                    key_file.display()
                ),
            })?;
    }
    Ok(server)
}

/// Serves a SourceAgent on `listener` until `shutdown` completes.
pub async fn serve_source_agent(
    agent: SourceAgentService,
    listener: TcpListener,
    options: &ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let service = SourceAgentServer::new(agent)
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    serve_agent(service, listener, options, shutdown).await
}

/// Serves a TargetAgent on `listener` until `shutdown` completes.
pub async fn serve_target_agent(
    agent: TargetAgentService,
    listener: TcpListener,
    options: &ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let service = TargetAgentServer::new(agent)
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    serve_agent(service, listener, options, shutdown).await
}

/// Serves one agent service behind the token check, with TLS when
/// configured, until `shutdown` completes (and the grace after it).
async fn serve_agent<S>(
    service: S,
    listener: TcpListener,
    options: &ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let stopping = Stopping::new(shutdown);
    let serve = builder(options)?
        .add_service(InterceptedService::new(
            service,
            RequireToken::new(options.token.clone()),
        ))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopping.signal(),
        );
    stopping.run(serve).await
}

/// How long streams still open (a live Extract never ends by itself) may
/// run after a shutdown signal before the agent exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A shutdown signal shared by the server (stop accepting, drain) and a
/// grace timer that ends the wait for streams that would never end.
struct Stopping<S> {
    shutdown: S,
    stopped: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
}

impl<S: Future<Output = ()>> Stopping<S> {
    fn new(shutdown: S) -> Self {
        let (stop, stopped) = watch::channel(false);
        Self {
            shutdown,
            stopped,
            stop,
        }
    }

    /// Completes once the shutdown signal came.
    fn signal(&self) -> impl Future<Output = ()> + use<S> {
        let mut stopped = self.stopped.clone();
        async move {
            let _ = stopped.wait_for(|stopped| *stopped).await;
        }
    }

    /// Runs `serve` until it drained after the signal, or the grace ran out.
    async fn run(
        self,
        serve: impl Future<Output = Result<(), tonic::transport::Error>>,
    ) -> Result<(), ServeError> {
        let Self { shutdown, stop, .. } = self;
        let grace = async move {
            shutdown.await;
            info!("shutting down: no new calls; open streams end within the grace");
            let _ = stop.send(true);
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            served = serve => served.map_err(|error| ServeError::Transport {
                reason: error.to_string(),
            }),
            () = grace => Ok(()),
        }
    }
}

/// The answer to a Describe RPC.
pub(crate) fn describe_response(
    description: PlaneDescription,
    capabilities: Capabilities,
) -> ferry_proto::v1::DescribeResponse {
    ferry_proto::v1::DescribeResponse {
        platform: description.platform,
        platform_version: description.version,
        identity: description.identity,
        control_plane_url: description.url,
        capabilities: Some(ferry_proto::v1::Capabilities {
            position_unit: capabilities.position_unit.to_owned(),
            transactions: capabilities.transactions,
            snapshot_reread: capabilities.snapshot_reread,
            store_fence: capabilities.store_fence,
            server_assigned_ids: capabilities.server_assigned_ids,
        }),
    }
}

/// The answer to a Digest RPC.
pub(crate) fn digest_response(digest: PlaneDigest) -> ferry_proto::v1::DigestResponse {
    ferry_proto::v1::DigestResponse {
        keys: digest.keys,
        bytes: digest.bytes,
        sha256: digest.sha256.to_vec().into(),
        position: digest.position.0,
        set_sha256: digest.set_sha256.to_vec().into(),
    }
}

/// The gRPC status an engine failure is answered with: its class (see
/// [`ErrorClass`], which the relay of `ferry migrate` reads back from the
/// code). The message is the error's own (it names what and where).
pub fn status_for(error: &Error) -> Status {
    let message = error.to_string();
    match error.class() {
        ErrorClass::Transient => Status::unavailable(message),
        ErrorClass::Precondition => Status::failed_precondition(message),
        ErrorClass::Invalid => Status::invalid_argument(message),
        ErrorClass::TooLarge => Status::resource_exhausted(message),
        ErrorClass::Damaged => Status::data_loss(message),
        ErrorClass::NotFound => Status::not_found(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token() {
        let options = ServeOptions {
            token: Some("s3cr3t-agent-token".to_owned()),
            tls: None,
        };
        let debug = format!("{options:?}");
        assert!(!debug.contains("s3cr3t"), "{debug}");
        assert!(debug.contains("token_required: true"), "{debug}");
    }
}

//! Connecting to ferry's agents and gateway: zstd on the wire, a bearer
//! token on every call when one is configured.

use std::path::PathBuf;
use std::time::Duration;

use ferry_proto::v1::gateway_admin_client::GatewayAdminClient;
use ferry_proto::v1::source_agent_client::SourceAgentClient;
use ferry_proto::v1::target_agent_client::TargetAgentClient;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The environment variable holding the agents' bearer token.
pub const TOKEN_ENV: &str = "FERRY_AGENT_TOKEN";

/// How a client reaches an agent or a gateway.
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<String>,
    /// How long to wait for the server before calling it unreachable.
    pub connect_timeout: Option<Duration>,
    /// Talk TLS, trusting the certificates this PEM file's CA signed (an
    /// agent started with `--tls-cert-file`).
    pub tls_ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        formatter
            .debug_struct("ClientOptions")
            .field("token_set", &self.token.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl ClientOptions {
    /// The token from `token_file` (its first line) or else from
    /// [`TOKEN_ENV`]; never from argv.
    pub fn with_token_from(token_file: Option<&PathBuf>) -> Result<Self, ClientError> {
        let token = match token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ClientError::Token {
                    reason: format!("cannot read {}: {error}", path.display()),
                })?;
                Some(text.lines().next().unwrap_or_default().trim().to_owned())
            }
            None => std::env::var(TOKEN_ENV).ok(),
        };
        Ok(Self {
            token: token.filter(|token| !token.is_empty()),
            connect_timeout: None,
            tls_ca_file: None,
        })
    }
}

/// Adds the bearer token to every call.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        formatter
            .debug_struct("BearerToken")
            .field("set", &self.0.is_some())
            .finish()
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A connection to a SourceAgent.
pub type SourceClient = SourceAgentClient<InterceptedService<Channel, BearerToken>>;
/// A connection to a TargetAgent.
pub type TargetClient = TargetAgentClient<InterceptedService<Channel, BearerToken>>;
/// A connection to a gateway's admin service.
pub type GatewayClient = GatewayAdminClient<InterceptedService<Channel, BearerToken>>;

/// A client could not be set up or could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address does not parse.
    #[error("bad address {address}: {reason}")]
    BadAddress {
        /// As given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Nothing answered at the address.
    #[error("cannot connect to {address}: {reason}")]
    Unreachable {
        /// As given.
        address: String,
        /// The transport's reason.
        reason: String,
    },
    /// TLS cannot be set up.
    #[error("TLS to the agent: {reason}")]
    Tls {
        /// Why.
        reason: String,
    },
    /// The token cannot be used.
    #[error("the agent token: {reason}")]
    Token {
        /// Why.
        reason: String,
    },
}

async fn channel(
    address: &str,
    options: &ClientOptions,
) -> Result<(Channel, BearerToken), ClientError> {
    let scheme = if options.tls_ca_file.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("{scheme}://{address}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|error| ClientError::BadAddress {
        address: address.to_owned(),
        reason: error.to_string(),
    })?;
    let endpoint = match &options.tls_ca_file {
        Some(ca_file) => {
            let pem = std::fs::read(ca_file).map_err(|error| ClientError::Tls {
                reason: format!("cannot read the CA file {}: {error}", ca_file.display()),
            })?;
            let host = endpoint.uri().host().unwrap_or_default().to_owned();
            endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(pem))
                        .domain_name(host),
                )
                .map_err(|error| ClientError::Tls {
                    reason: source_chain(&error),
                })?
        }
        None => endpoint,
    };
    let endpoint = endpoint
        .connect_timeout(options.connect_timeout.unwrap_or(Duration::from_secs(5)))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| ClientError::Unreachable {
            address: address.to_owned(),
            reason: source_chain(&error),
        })?;
    let token = match &options.token {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::Token {
                    reason: "it holds characters a header cannot carry".to_owned(),
                })?,
        ),
        None => None,
    };
    Ok((channel, BearerToken(token)))
}

/// Connects to a SourceAgent at `address` (`HOST:PORT` or a URL).
pub async fn connect_source(
    address: &str,
    options: &ClientOptions,
) -> Result<SourceClient, ClientError> {
    let (channel, token) = channel(address, options).await?;
    Ok(SourceAgentClient::with_interceptor(channel, token)
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(64 << 20))
}

/// Connects to a TargetAgent at `address` (`HOST:PORT` or a URL).
pub async fn connect_target(
    address: &str,
    options: &ClientOptions,
) -> Result<TargetClient, ClientError> {
    let (channel, token) = channel(address, options).await?;
    Ok(TargetAgentClient::with_interceptor(channel, token)
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(64 << 20))
}

/// Connects to a gateway's admin service at `address`.
pub async fn connect_gateway(
    address: &str,
    options: &ClientOptions,
) -> Result<GatewayClient, ClientError> {
    let (channel, token) = channel(address, options).await?;
    Ok(GatewayAdminClient::with_interceptor(channel, token))
}

/// An error and its causes on one line: tonic's transport errors say little
/// at the top.
pub(crate) fn source_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token() {
        let options = ClientOptions {
            token: Some("s3cr3t-agent-token".to_owned()),
            ..ClientOptions::default()
        };
        let bearer = BearerToken(Some(
            "Bearer s3cr3t-agent-token".parse().expect("a header value"),
        ));
        for debug in [format!("{options:?}"), format!("{bearer:?}")] {
            assert!(!debug.contains("s3cr3t"), "{debug}");
        }
    }
}

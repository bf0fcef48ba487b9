//! `ferry gateway`: serve a control plane's client API in front of it, with
//! the admin service `ferry migrate` holds, switches and releases writes
//! with. The upstream URL's scheme picks the kind: etcd's API in front of
//! an etcd cluster (`etcd://`, `etcds://`), or PostgreSQL's wire protocol
//! in front of a PostgreSQL server (`postgres://`, `postgresql://`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use ferry_agent::auth::server_token;
use ferry_agent::gateway::etcd::{ClientLimits, EtcdUpstream, UpstreamAccess};
use ferry_agent::gateway::postgres::{PgClientLimits, PgUpstream, PgUpstreamAccess};
use ferry_agent::gateway::{Gateway, GatewayError, GatewayOptions, UpstreamPlane};
use serde_json::json;
use tokio::net::TcpListener;

use crate::commands::UsageError;
use crate::exposure::{self, Exposure};
use crate::output::print_line;
use crate::{GlobalOptions, OutputFormat, exit};
use ferry_engine::adapters::etcd::EtcdArgs;
use ferry_engine::adapters::postgres::PgArgs;

/// `ferry gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Where the plane's clients connect (etcd's API, or PostgreSQL's wire protocol),
    /// e.g. 127.0.0.1:2379; port 0 picks a free one.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// The plane to forward to first: etcd://HOST:PORT[,HOST:PORT...], or
    /// postgres://[USER@]HOST:PORT/DB (the migrated database: its fence record
    /// is read there; clients may use any database of the server).
    #[arg(long, value_name = "URL")]
    upstream: String,
    /// Where the admin service (ferry.v1.GatewayAdmin, for `ferry migrate`) listens.
    /// Keep it off the clients' network. The address chosen is printed.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    admin_listen: String,
    /// How long a Hold may keep writes waiting when the orchestrator names no
    /// pause; after it they are answered UNAVAILABLE (e.g. 2s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    max_pause: Duration,
    /// How long an upstream (the first, or a Switch's) has to answer.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// The upstream's --max-request-bytes (etcd's default): a client's request
    /// larger than this plus 512 KiB is refused RESOURCE_EXHAUSTED, as etcd
    /// refuses it, before it is held or forwarded.
    #[arg(long, value_name = "BYTES", default_value_t = 1_572_864)]
    max_request_bytes: usize,
    /// A file whose first line is the token every admin call must carry as
    /// `authorization: Bearer <token>`; without it, FERRY_AGENT_TOKEN when set.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve TLS on both listeners (etcd's API and the admin service): PEM file of the
    /// gateway's certificate. Clients then use https / etcds:// and the CA that signed it
    /// (`ferry migrate --agent-ca-file`).
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// Serve TLS: PEM file of the certificate's private key.
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Serve the admin service on a non-loopback --admin-listen address
    /// without TLS or without a token (refused otherwise): anyone who
    /// reaches it can hold and switch every client's writes.
    #[arg(long)]
    insecure_listen: bool,
    /// The gateway's own credentials and TLS, for every upstream (the first
    /// and each Switch's); a client's own token is passed on as it is.
    /// Last: it opens a help heading of its own.
    #[command(flatten)]
    etcd: EtcdArgs,
    /// PostgreSQL: the password of the URL's role, and the CA of the servers'
    /// certificates. The roles whose sessions move to a new server after a
    /// switch log in there with PGPASSWORD or the password file (PGPASSFILE).
    #[command(flatten)]
    postgres: PgArgs,
}

/// Parses `500ms`, `2s`, `1m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|character: char| !character.is_ascii_digit() && character != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write e.g. 500ms, 2s or 1m"))?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use ms, s or m"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|error| format!("{text:?}: {error}"))
}

pub async fn gateway(args: GatewayArgs, global: GlobalOptions) -> Result<u8> {
    let bind = |address: &str, flag: &str| {
        let address = address.to_owned();
        let flag = flag.to_owned();
        async move {
            TcpListener::bind(&address)
                .await
                .with_context(|| format!("cannot listen on {address} ({flag})"))
        }
    };
    let client_listener = bind(&args.listen, "--listen").await?;
    let admin_listener = bind(&args.admin_listen, "--admin-listen").await?;
    let admin_token =
        server_token(args.token_file.as_deref()).map_err(|error| UsageError(error.to_string()))?;
    // Clients talk to --listen as they would to the plane itself; the admin
    // service is ferry's own, and is refused before the upstream is reached.
    exposure::check(
        &Exposure {
            service: "the gateway's admin service",
            risk: "hold, switch and release every client's writes",
            flag: "--admin-listen",
            requested: &args.admin_listen,
            bound: admin_listener.local_addr()?,
            tls: args.tls_cert_file.is_some() && args.tls_key_file.is_some(),
            token: admin_token.is_some(),
        },
        args.insecure_listen,
    )?;
    let listeners = Listeners {
        client: client_listener,
        admin: admin_listener,
    };
    match UpstreamKind::of(&args.upstream)? {
        UpstreamKind::Etcd => {
            let access = UpstreamAccess {
                password_file: args.etcd.etcd_password_file.clone(),
                tls: args.etcd.tls(),
            };
            let limits = ClientLimits {
                max_request_bytes: args.max_request_bytes,
            };
            let options = gateway_options::<EtcdUpstream>(&args, access, admin_token);
            serve(options, listeners, limits, "etcd's API", global.output).await
        }
        UpstreamKind::Postgres => {
            let access = PgUpstreamAccess {
                password_file: args.postgres.pg_password_file.clone(),
                ca_file: args.postgres.pg_ca_file.clone(),
            };
            let options = gateway_options::<PgUpstream>(&args, access, admin_token);
            let limits = PgClientLimits::default();
            serve(options, listeners, limits, "PostgreSQL", global.output).await
        }
    }
}

/// The kinds of upstream `ferry gateway` serves, picked by the scheme of
/// `--upstream`.
enum UpstreamKind {
    Etcd,
    Postgres,
}

impl UpstreamKind {
    /// The kind `url` names, or a usage error naming the URL and the kinds
    /// known.
    fn of(url: &str) -> Result<Self, UsageError> {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        if scheme.is_some_and(|scheme| EtcdUpstream::SCHEMES.contains(&scheme)) {
            return Ok(Self::Etcd);
        }
        if scheme.is_some_and(|scheme| PgUpstream::SCHEMES.contains(&scheme)) {
            return Ok(Self::Postgres);
        }
        let known = [
            (EtcdUpstream::KIND, EtcdUpstream::SCHEMES),
            (PgUpstream::KIND, PgUpstream::SCHEMES),
        ]
        .iter()
        .map(|(kind, schemes)| {
            let prefixes: Vec<String> = schemes
                .iter()
                .map(|scheme| format!("{scheme}://"))
                .collect();
            format!("{kind} ({})", prefixes.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ");
        Err(UsageError(
            GatewayError::BadUpstream {
                url: url.to_owned(),
                reason: format!(
                    "its scheme names no kind of upstream the gateway serves; the kinds it knows: {known}"
                ),
            }
            .to_string(),
        ))
    }
}

/// Where the gateway listens, bound before the upstream is reached.
struct Listeners {
    /// The clients' API (--listen).
    client: TcpListener,
    /// The admin service (--admin-listen).
    admin: TcpListener,
}

/// The options of a gateway of kind `U` from the command line.
fn gateway_options<U: UpstreamPlane>(
    args: &GatewayArgs,
    access: U::Access,
    admin_token: Option<String>,
) -> GatewayOptions<U> {
    GatewayOptions {
        upstream_url: args.upstream.clone(),
        default_max_pause: args.max_pause,
        connect_timeout: args.connect_timeout,
        access,
        admin_token,
        tls: args.tls_cert_file.clone().zip(args.tls_key_file.clone()),
    }
}

/// Connects a gateway of kind `U`, prints where it serves (`api`: the
/// clients' API, in the text output) and serves until Ctrl-C or SIGTERM.
async fn serve<U: UpstreamPlane>(
    options: GatewayOptions<U>,
    listeners: Listeners,
    limits: U::ClientLimits,
    api: &str,
    output: OutputFormat,
) -> Result<u8> {
    let token_required = options.admin_token.is_some();
    let tls = options.tls.is_some();
    let gateway = match Gateway::connect(&options).await {
        Ok(gateway) => gateway,
        Err(error @ GatewayError::BadUpstream { .. }) => {
            anyhow::bail!(UsageError(error.to_string()))
        }
        Err(error) => return Err(error.into()),
    };
    let listen = listeners.client.local_addr()?.to_string();
    let admin = listeners.admin.local_addr()?.to_string();
    let upstream = gateway.upstream_url();
    // Printed when both servers can accept: tests and scripts wait for it,
    // and may close the pipe once they have it.
    match output {
        OutputFormat::Json => print_line!(
            "{}",
            json!({"listen": listen, "admin": admin, "upstream": upstream, "token_required": token_required, "tls": tls})
        ),
        OutputFormat::Text => print_line!(
            "gateway serving {api} on {listen}{}, forwarding to {upstream}\nadmin service on {admin} (token: {})",
            if tls { " over TLS" } else { "" },
            if token_required { "required" } else { "none" }
        ),
    }
    gateway
        .serve(listeners.client, listeners.admin, limits, shutdown())
        .await?;
    Ok(exit::SUCCESS)
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_ms_s_and_m() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("fast").is_err());
    }
}

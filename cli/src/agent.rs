//! `ferry agent source|target`: serve a SourceAgent or a TargetAgent beside
//! a control plane (any adapter of the registry that is live), until
//! SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ferry_agent::auth::server_token;
use ferry_agent::serve::{ServeOptions, serve_source_agent, serve_target_agent};
use ferry_agent::source::SourceAgentService;
use ferry_agent::target::TargetAgentService;
use ferry_engine::adapters::{
    ConnectionArgs, SinkOptions, SourceOptions, TargetLimitArgs, live_sink_from_url,
    live_source_from_url,
};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::info;

use crate::commands::UsageError;
use crate::exposure::{self, Exposure};
use crate::output::print_line;
use crate::{GlobalOptions, OutputFormat, exit};

/// `ferry agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    role: AgentRole,
}

#[derive(Debug, Subcommand)]
enum AgentRole {
    /// Beside the old plane: stream its snapshot and live changes, fence its writes.
    Source(SourceArgs),
    /// Beside the new plane: apply streams exactly once, tell their checkpoints.
    Target(TargetArgs),
}

/// What both agents take.
#[derive(Debug, Args)]
struct CommonArgs {
    /// The control plane beside which the agent runs, by URL: etcd://HOST:PORT[,HOST:PORT...]
    /// (etcds:// for TLS).
    #[arg(long, value_name = "URL")]
    control_plane: String,
    /// Where to serve, HOST:PORT (port 0: any free port; the address is printed when ready).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// A file whose first line is the token every call must carry as
    /// `authorization: Bearer <token>`; without it, FERRY_AGENT_TOKEN when set.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve TLS: PEM file of the agent's certificate.
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// Serve TLS: PEM file of the certificate's private key.
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Serve on a non-loopback --listen address without TLS or without a
    /// token (refused otherwise): anyone who reaches it can use the agent.
    #[arg(long)]
    insecure_listen: bool,
}

/// `ferry agent source`.
#[derive(Debug, Args)]
struct SourceArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Only keys starting with this prefix are ever streamed.
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// Parts of a snapshot read at once (etcd: key ranges).
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
    // The adapters' own flags last: each opens a help heading of its own.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// `ferry agent target`.
#[derive(Debug, Args)]
struct TargetArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(flatten)]
    limits: TargetLimitArgs,
}

impl CommonArgs {
    fn serve_options(&self) -> Result<ServeOptions> {
        let token = server_token(self.token_file.as_deref())
            .map_err(|error| UsageError(error.to_string()))?;
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            _ => None,
        };
        Ok(ServeOptions { token, tls })
    }

    /// A failure to build the plane's adapter: a usage error when the URL
    /// or a flag is wrong.
    fn build_error(error: ferry_engine::Error) -> anyhow::Error {
        if error.kind() == ferry_engine::ErrorKind::Usage {
            UsageError(error.to_string()).into()
        } else {
            error.into()
        }
    }

    /// Binds `--listen`; refuses (exit 2) a non-loopback address without
    /// TLS and a token unless `--insecure-listen` is given.
    async fn bind(&self, service: &str, risk: &str, options: &ServeOptions) -> Result<TcpListener> {
        let listener = TcpListener::bind(&self.listen)
            .await
            .with_context(|| format!("cannot listen on {} (--listen)", self.listen))?;
        let exposure = Exposure {
            service,
            risk,
            flag: "--listen",
            requested: &self.listen,
            bound: listener.local_addr()?,
            tls: options.tls.is_some(),
            token: options.token.is_some(),
        };
        exposure::check(&exposure, self.insecure_listen)?;
        Ok(listener)
    }
}

/// Says where the agent serves, once it can accept: tests and scripts wait
/// for this line, and may close the pipe once they have it.
fn announce(
    role: &str,
    listener: &TcpListener,
    plane: &str,
    options: &ServeOptions,
    global: GlobalOptions,
) -> Result<()> {
    let listen = listener.local_addr()?.to_string();
    let tls = options.tls.is_some();
    let token = options.token.is_some();
    match global.output {
        OutputFormat::Json => print_line!(
            "{}",
            json!({"role": role, "listen": listen, "control_plane": plane, "tls": tls, "token_required": token})
        ),
        OutputFormat::Text => print_line!(
            "{role} agent listening on {listen} beside {plane} (tls: {}, token: {})",
            if tls { "on" } else { "off" },
            if token { "required" } else { "none" }
        ),
    }
    info!(role, %listen, plane, tls, token_required = token, "agent serving");
    Ok(())
}

/// Runs `ferry agent source|target`.
pub async fn agent(args: AgentArgs, global: GlobalOptions) -> Result<u8> {
    match args.role {
        AgentRole::Source(args) => {
            let prefix = args.prefix.unwrap_or_default().into_bytes();
            let source = live_source_from_url(
                &args.common.control_plane,
                &SourceOptions {
                    prefix: prefix.clone(),
                    parallel: usize::from(args.parallel),
                    connection: args.connection.clone(),
                    ..SourceOptions::default()
                },
            )
            .map_err(CommonArgs::build_error)?;
            let options = args.common.serve_options()?;
            let plane = source.display();
            let agent = SourceAgentService::new(source, prefix);
            let listener = args
                .common
                .bind(
                    "the source agent",
                    "read the whole control plane (a cluster's Secrets included) and fence its writes",
                    &options,
                )
                .await?;
            announce("source", &listener, &plane, &options, global)?;
            serve_source_agent(agent, listener, &options, shutdown()).await?;
        }
        AgentRole::Target(args) => {
            let sink = live_sink_from_url(
                &args.common.control_plane,
                &SinkOptions {
                    connection: args.connection.clone(),
                    target: args.limits.clone(),
                    ..SinkOptions::default()
                },
            )
            .map_err(CommonArgs::build_error)?;
            let options = args.common.serve_options()?;
            let plane = sink.display();
            let agent = TargetAgentService::new(sink);
            let listener = args
                .common
                .bind(
                    "the target agent",
                    "write anything into the new control plane",
                    &options,
                )
                .await?;
            announce("target", &listener, &plane, &options, global)?;
            serve_target_agent(agent, listener, &options, shutdown()).await?;
        }
    }
    info!("agent stopped");
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

//! `ferry`: the command-line front end. Parsing and printing live here; the
//! work is in ferry-engine.
//!
//! Exit codes (also in the README and `ferry --help`):
//! 0 success; 1 unexpected failure; 2 bad usage; 3 damaged backup (a check
//! failed); 4 backup not found or incomplete; 5 source failed or gave bad
//! input; 6 target failed; 7 object store failed.

mod agent;
mod commands;
mod exit;
mod exposure;
mod gateway;
mod migrate;
mod migrations;
mod output;
mod progress;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// mimalloc: restores decode millions of small ops, and glibc's malloc gave
/// its memory back to the kernel and faulted it in again on every segment
/// (measured in `benches/`, which uses the same allocator).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// ferry: extract, restore and migrate control-plane metadata as a stream of
/// replayable API requests, kept in object storage.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, after_help = exit::EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    global: GlobalOptions,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Copy, Args)]
pub struct GlobalOptions {
    /// No progress bar and no summary (extract still prints the backup id).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// How summaries are printed.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// The format of a command's summary on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Text,
    /// One JSON object, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Take a consistent backup of a source into a store.
    Extract(commands::ExtractArgs),
    /// Replay a backup onto a target.
    Restore(commands::RestoreArgs),
    /// List the backups in a store, or show one.
    Inspect(commands::InspectArgs),
    /// Read every segment of a backup and check it.
    Verify(commands::VerifyArgs),
    /// Version migrations: scaffold one, or run a profile's in place on a target.
    Migrations(migrations::MigrationsArgs),
    /// Serve etcd's API in front of an etcd cluster, with writes that `ferry migrate` can hold and switch.
    Gateway(gateway::GatewayArgs),
    /// Move a live control plane onto a new one through the gateway, and cut over.
    Migrate(migrate::MigrateArgs),
    /// Serve a source agent (beside the old plane) or a target agent (beside the new one).
    Agent(agent::AgentArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr closed) is dropped:
        // with internal errors logged, tracing-subscriber would report the
        // failure with eprintln!, which panics on that same closed stderr
        // in whichever task logged (a gateway's Hold, an agent's Digest).
        .log_internal_errors(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            output::eprint_line!("error: cannot start the async runtime: {error}");
            return ExitCode::from(exit::UNEXPECTED);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Extract(args) => commands::extract(args, cli.global).await,
            Command::Restore(args) => commands::restore(args, cli.global).await,
            Command::Inspect(args) => commands::inspect(args, cli.global).await,
            Command::Verify(args) => commands::verify(args, cli.global).await,
            Command::Migrations(args) => migrations::migrations(args, cli.global).await,
            Command::Gateway(args) => gateway::gateway(args, cli.global).await,
            Command::Migrate(args) => migrate::migrate(args, cli.global).await,
            Command::Agent(args) => agent::agent(args, cli.global).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            output::eprint_line!("error: {error:#}");
            ExitCode::from(exit::code_for(&error))
        }
    }
}

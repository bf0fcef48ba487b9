//! `ferry migrate --live`, and `ferry migrate status|resume|abort`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ferry_agent::client::ClientOptions;
use ferry_agent::migrate::{
    self, DecideOptions, Decided, LiveStatus, MigrateError, MigrateOptions, MigrationReport,
    MigrationStatus, Outcome, Tee, read_status,
};
use ferry_engine::adapters::Extraction;
use ferry_engine::backup::{ExtractOptions, write_backup};
use ferry_engine::manifest::SourceInfo;
use ferry_engine::progress::Progress;
use ferry_engine::store::BackupStore;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::commands::UsageError;
use crate::exit;
use crate::gateway::parse_duration;
use crate::migrations::LiveMigrationArgs;
use crate::output::{eprint_line, print_line};
use crate::{GlobalOptions, OutputFormat};

/// `ferry migrate`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MigrateArgs {
    #[command(subcommand)]
    command: Option<MigrateCommand>,
    #[command(flatten)]
    live: LiveArgs,
}

#[derive(Debug, Subcommand)]
enum MigrateCommand {
    /// Show the phase, lag and epoch of the running (or the last) migration;
    /// with --source-agent and --gateway, the live state: the old plane's
    /// fence record and every gateway.
    Status(StatusArgs),
    /// Finish an interrupted migration from the old plane's fence record: a
    /// committed switch is completed on every gateway; a cutover that did not
    /// commit is rolled back (run the migration again).
    Resume(DecideArgs),
    /// Roll back an interrupted migration that did not commit its switch:
    /// unfence the old plane and release every gateway's held writes to it.
    Abort(DecideArgs),
}

/// Where `resume`, `abort` and a live `status` read the migration's state.
#[derive(Debug, Args)]
struct DecideArgs {
    /// The SourceAgent beside the old plane (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    source_agent: String,
    /// Every gateway replica's admin address (HOST:PORT), comma-separated or repeated.
    #[arg(long, value_name = "ADDR", value_delimiter = ',', required = true)]
    gateway: Vec<String>,
    /// A file whose first line is the agents' bearer token (else FERRY_AGENT_TOKEN).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Talk TLS to the agents and the gateways' admin services, trusting this CA (PEM).
    #[arg(long, value_name = "FILE")]
    agent_ca_file: Option<PathBuf>,
}

impl DecideArgs {
    fn options(self) -> Result<DecideOptions> {
        Ok(DecideOptions {
            source_agent: self.source_agent,
            gateways: self.gateway,
            client: client_options(self.token_file.as_ref(), self.agent_ca_file)?,
        })
    }
}

fn client_options(token_file: Option<&PathBuf>, ca_file: Option<PathBuf>) -> Result<ClientOptions> {
    Ok(ClientOptions {
        tls_ca_file: ca_file,
        ..ClientOptions::with_token_from(token_file)
            .map_err(|error| UsageError(error.to_string()))?
    })
}

/// `ferry migrate --live ...`.
#[derive(Debug, Args)]
struct LiveArgs {
    /// Migrate a live control plane while its clients write through the gateway.
    #[arg(long)]
    live: bool,
    /// The SourceAgent beside the old plane (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    source_agent: Option<String>,
    /// The TargetAgent beside the new plane (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    target_agent: Option<String>,
    /// Every gateway replica's admin address (HOST:PORT), comma-separated or
    /// repeated: all are held before the fence, and switched together.
    #[arg(long, value_name = "ADDR", value_delimiter = ',')]
    gateway: Vec<String>,
    /// The longest clients' writes may be held at cutover, e.g. 2s or 500ms.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    max_pause: Duration,
    /// Cut over once the target is at most this many positions behind, in the source's unit
    /// (etcd: revisions; the plan and the report name it).
    #[arg(long, value_name = "POSITIONS", default_value_t = 100)]
    max_lag: u64,
    /// Only keys starting with this prefix.
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// Give up (before holding anything) when the target has not caught up by then.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = parse_duration)]
    catch_up_timeout: Duration,
    /// Retry a broken agent stream this long without progress before giving up.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    reconnect_timeout: Duration,
    /// Follow the live changes at least this long before cutting over (a soak period).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    follow_at_least: Duration,
    /// Before switching, compare a digest of the old plane at the fence with the new plane's
    /// (cutover step 7); a difference rolls back. Both are read while writes are held, so
    /// --max-pause must cover it.
    #[arg(long)]
    verify: bool,
    /// Also write the stream to this store, sealed as a backup when the migration ends.
    #[arg(long, value_name = "STORE_URL")]
    tee: Option<String>,
    /// Print the steps the migration would take, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Where the running migration keeps its status for `ferry migrate status`.
    #[arg(long, value_name = "FILE")]
    status_file: Option<PathBuf>,
    /// A file whose first line is the agents' bearer token (else FERRY_AGENT_TOKEN).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Talk TLS to the agents and the gateway's admin service, trusting this CA (PEM).
    #[arg(long, value_name = "FILE")]
    agent_ca_file: Option<PathBuf>,
    #[command(flatten)]
    migrations: LiveMigrationArgs,
}

/// `ferry migrate status`.
#[derive(Debug, Args)]
struct StatusArgs {
    /// The status file the migration writes.
    #[arg(long, value_name = "FILE")]
    status_file: Option<PathBuf>,
    /// Read the live state instead: the old plane's fence record through this SourceAgent.
    #[arg(long, value_name = "ADDR", requires = "gateway")]
    source_agent: Option<String>,
    /// ... and every gateway replica's admin address (comma-separated or repeated).
    #[arg(
        long,
        value_name = "ADDR",
        value_delimiter = ',',
        requires = "source_agent"
    )]
    gateway: Vec<String>,
    /// A file whose first line is the agents' bearer token (else FERRY_AGENT_TOKEN).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Talk TLS to the agents and the gateways' admin services, trusting this CA (PEM).
    #[arg(long, value_name = "FILE")]
    agent_ca_file: Option<PathBuf>,
}

/// The status file when none is named: one per machine, in the temp folder.
fn default_status_file() -> PathBuf {
    std::env::temp_dir().join("ferry-migrate-status.json")
}

pub async fn migrate(args: MigrateArgs, global: GlobalOptions) -> Result<u8> {
    match args.command {
        Some(MigrateCommand::Status(status)) => match status.source_agent {
            Some(source_agent) => {
                let options = DecideArgs {
                    source_agent,
                    gateway: status.gateway,
                    token_file: status.token_file,
                    agent_ca_file: status.agent_ca_file,
                }
                .options()?;
                show_live_status(&options, global).await
            }
            None => show_status(status, global),
        },
        Some(MigrateCommand::Resume(args)) => decide(true, args, global).await,
        Some(MigrateCommand::Abort(args)) => decide(false, args, global).await,
        None => live(args.live, global).await,
    }
}

fn show_status(args: StatusArgs, global: GlobalOptions) -> Result<u8> {
    let path = args.status_file.unwrap_or_else(default_status_file);
    let status = read_status(&path).with_context(|| {
        format!(
            "no migration status at {} (is a migration running, with this --status-file?)",
            path.display()
        )
    })?;
    match global.output {
        OutputFormat::Json => print_line!("{}", serde_json::to_string_pretty(&status)?),
        OutputFormat::Text => print_status(&status),
    }
    Ok(exit::SUCCESS)
}

async fn show_live_status(options: &DecideOptions, global: GlobalOptions) -> Result<u8> {
    let status = match migrate::live_status(options).await {
        Ok(status) => status,
        Err(error) => {
            eprint_line!("error: {error}");
            return Ok(exit::MIGRATION_FAILED);
        }
    };
    match global.output {
        OutputFormat::Json => print_line!("{}", serde_json::to_string_pretty(&status)?),
        OutputFormat::Text => print_live_status(&status),
    }
    Ok(exit::SUCCESS)
}

fn print_live_status(status: &LiveStatus) {
    print_line!("old plane   {}", status.record);
    for gateway in &status.gateways {
        match (&gateway.upstream_url, &gateway.unreachable) {
            (Some(upstream), _) => print_line!(
                "gateway     {} -> {upstream} (epoch {}{}{})",
                gateway.address,
                gateway.epoch,
                if gateway.holding {
                    format!(", holding {} writes", gateway.queued_writes)
                } else {
                    String::new()
                },
                if gateway.settling.is_empty() {
                    String::new()
                } else {
                    format!("; {}", gateway.settling)
                }
            ),
            (None, reason) => print_line!(
                "gateway     {}: {}",
                gateway.address,
                reason.as_deref().unwrap_or("no answer")
            ),
        }
    }
}

/// `resume` or `abort`: exit 0 when the plane is settled (switched, or
/// rolled back, or nothing was under way), 8 when it could not be.
async fn decide(resume: bool, args: DecideArgs, global: GlobalOptions) -> Result<u8> {
    let options = args.options()?;
    let decided = if resume {
        migrate::resume(&options).await
    } else {
        migrate::abort(&options).await
    };
    let decided: Decided = match decided {
        Ok(decided) => decided,
        Err(error) => {
            eprint_line!("error: {error}");
            return Ok(exit::MIGRATION_FAILED);
        }
    };
    match global.output {
        OutputFormat::Json => print_line!("{}", serde_json::to_string_pretty(&decided)?),
        OutputFormat::Text => {
            print_line!("{} (epoch {})", decided.outcome, decided.epoch);
            for step in &decided.steps {
                print_line!("  {step}");
            }
            print_live_status(&decided.status);
        }
    }
    Ok(exit::SUCCESS)
}

fn print_status(status: &MigrationStatus) {
    print_line!(
        "phase       {}\nepoch       {}\nstream      {}\nsnapshot    at position {}\napplied     {} of {} ops received\nlag         {} positions, {} ops\nhead        position {}\nreconnects  {}{}\nupdated     {}",
        serde_json::to_value(status.phase)
            .ok()
            .and_then(|value| value.as_str().map(str::to_owned))
            .unwrap_or_default(),
        status.epoch,
        status.stream_id,
        status.snapshot_position,
        status.applied_through_seq,
        status.sent_through_seq,
        status.lag_positions,
        status.lag_ops,
        status.head_position,
        status.reconnects,
        status
            .broken
            .as_ref()
            .map(|broken| format!(" (now: {broken})"))
            .unwrap_or_default(),
        status.updated_at,
    );
}

async fn live(args: LiveArgs, global: GlobalOptions) -> Result<u8> {
    if !args.live {
        return Err(UsageError(
            "ferry migrate needs --live (a live migration through the gateway) or `status`"
                .to_owned(),
        )
        .into());
    }
    let missing = |flag: &str| UsageError(format!("ferry migrate --live needs {flag}"));
    // The profile and the versions are checked before any agent is asked.
    let migrations = args.migrations.load()?;
    let options = MigrateOptions {
        source_agent: args
            .source_agent
            .ok_or_else(|| missing("--source-agent ADDR"))?,
        target_agent: args
            .target_agent
            .ok_or_else(|| missing("--target-agent ADDR"))?,
        gateways: if args.gateway.is_empty() {
            return Err(missing("--gateway ADDR[,ADDR...]").into());
        } else {
            args.gateway
        },
        client: client_options(args.token_file.as_ref(), args.agent_ca_file)?,
        max_pause: args.max_pause,
        max_lag: args.max_lag,
        key_prefix: args.prefix.unwrap_or_default().into_bytes(),
        catch_up_timeout: args.catch_up_timeout,
        reconnect_timeout: args.reconnect_timeout,
        follow_at_least: args.follow_at_least,
        status_file: Some(args.status_file.unwrap_or_else(default_status_file)),
        verify: args.verify,
        migrations,
    };
    if args.dry_run {
        let plan = match migrate::plan(&options).await {
            Ok(plan) => plan,
            Err(MigrateError::Chain(error)) => return Err(ferry_engine::Error::from(error).into()),
            Err(error) => {
                eprint_line!("error: {error}");
                return Ok(exit::MIGRATION_FAILED);
            }
        };
        match global.output {
            OutputFormat::Json => print_line!("{}", serde_json::to_string_pretty(&plan)?),
            OutputFormat::Text => {
                print_line!(
                    "dry run: nothing changes\n  source   {}\n  target   {}\n  gateway  sends clients to {}\n  epoch    {}",
                    plan.source,
                    plan.target,
                    plan.gateway_upstream,
                    plan.epoch
                );
                for (number, step) in plan.steps.iter().enumerate() {
                    print_line!("  {}. {step}", number + 1);
                }
                if let Some(chain) = &plan.version_chain {
                    print_line!("  version chain:");
                    for line in chain {
                        print_line!("    {line}");
                    }
                }
            }
        }
        return Ok(exit::SUCCESS);
    }

    let (tee, tee_task) = match &args.tee {
        Some(url) => {
            let store = BackupStore::open(url, true).map_err(ferry_engine::Error::from)?;
            let (ops, receiver) = mpsc::channel(16);
            let (started, start_receiver) = oneshot::channel();
            let task = tokio::spawn(tee_backup(store, receiver, start_receiver));
            (Some((Tee { ops }, started)), Some(task))
        }
        None => (None, None),
    };
    let (tee, started) = match tee {
        Some((tee, started)) => (Some(tee), Some(started)),
        None => (None, None),
    };
    let result = migrate::migrate(options, tee, started).await;
    let tee_backup = match tee_task {
        Some(task) => Some(task.await.context("the --tee writer stopped")?),
        None => None,
    };
    let report = match result {
        Ok(report) => report,
        // Refused before anything was held, fenced or written: a usage error.
        Err(MigrateError::Chain(error)) => return Err(ferry_engine::Error::from(error).into()),
        Err(error) => {
            eprint_line!("error: {error}");
            return Ok(exit::MIGRATION_FAILED);
        }
    };
    let tee_line = match &tee_backup {
        Some(Ok(Some(id))) => Some(format!("backup {id} sealed beside the migration")),
        Some(Ok(None)) => Some("no backup: the stream never started".to_owned()),
        Some(Err(error)) => Some(format!("the --tee backup failed: {error:#}")),
        None => None,
    };
    if !global.quiet {
        match global.output {
            OutputFormat::Json => {
                let mut value = serde_json::to_value(&report)?;
                if let (Some(line), Some(object)) = (&tee_line, value.as_object_mut()) {
                    object.insert("tee".to_owned(), serde_json::Value::from(line.clone()));
                }
                print_line!("{}", serde_json::to_string_pretty(&value)?);
            }
            OutputFormat::Text => print_report(&report, tee_line.as_deref()),
        }
    }
    Ok(match report.outcome {
        Outcome::Switched => exit::SUCCESS,
        Outcome::RolledBack { .. } | Outcome::Undecided { .. } => exit::MIGRATION_FAILED,
    })
}

fn print_report(report: &MigrationReport, tee: Option<&str>) {
    let ms = |value: Option<f64>| value.map_or("-".to_owned(), |value| format!("{value:.1} ms"));
    match &report.outcome {
        Outcome::Switched => print_line!(
            "switched: clients now write to {} (epoch {})",
            report.upstream_url,
            report.epoch
        ),
        Outcome::RolledBack { reason } => print_line!(
            "rolled back: clients write to {} as before (epoch {})\n  why         {reason}",
            report.upstream_url,
            report.epoch
        ),
        Outcome::Undecided { reason } => {
            print_line!("undecided (epoch {}): {reason}", report.epoch)
        }
    }
    print_line!(
        "  pause       {} (hold {}, fence {}, drain {}, switch {})\n  writes      {} drained at hold, {} held and released, {} refused UNAVAILABLE\n  ops moved   {} ({} in the snapshot at position {}, fenced at {})\n  stream      {} ({} reconnects)\n  time        {:.2} s",
        ms(report.pause_window_ms),
        ms(report.hold_ms),
        ms(report.fence_ms),
        ms(report.drain_ms),
        ms(report.switch_ms),
        report.drained_writes,
        report.released_writes,
        report.rejected_writes,
        report.ops_moved,
        report.snapshot_ops,
        report.snapshot_position,
        report
            .fenced_position
            .map_or("-".to_owned(), |position| position.to_string()),
        report.stream_id,
        report.reconnects,
        report.elapsed_ms / 1000.0,
    );
    let peak = report.lag.iter().map(|sample| sample.positions).max();
    if let (Some(peak), Some(last)) = (peak, report.lag.last()) {
        let unit = if report.position_unit.is_empty() {
            "position"
        } else {
            report.position_unit.as_str()
        };
        print_line!(
            "  lag         peak {peak} positions ({unit}s), {} at the end ({} samples; --output json lists them)",
            last.positions,
            report.lag.len()
        );
    }
    if let Some(chain) = &report.version_chain {
        print_line!("  versions    {chain} (ops moved count the chain's outputs)");
        if let Some(ops) = report.chain_checked_ops {
            print_line!(
                "  checked     {ops} ops of a snapshot through the chain before writing: no filter error, no two keys on one"
            );
        }
    }
    if let Some(keys) = report.verified_keys {
        print_line!(
            "  verified    {keys} keys, the same in both planes at the fence ({} of the pause)",
            ms(report.verify_ms)
        );
    }
    if let Some(tee) = tee {
        print_line!("  tee         {tee}");
    }
}

/// Writes the migration's stream into `store` as a backup, sealed when the
/// stream ends; `Ok(None)` when it never started.
async fn tee_backup(
    store: BackupStore,
    ops: mpsc::Receiver<Vec<ferry_engine::Op>>,
    started: oneshot::Receiver<(
        ferry_proto::v1::StreamStart,
        ferry_proto::v1::DescribeResponse,
    )>,
) -> Result<Option<String>> {
    let Ok((start, source)) = started.await else {
        return Ok(None);
    };
    let info = SourceInfo {
        platform: source.platform.clone(),
        platform_version: Some(source.platform_version.clone()).filter(|text| !text.is_empty()),
        identity: Some(source.identity.clone()).filter(|text| !text.is_empty()),
        snapshot_position: Some(start.snapshot_position),
        key_prefix: None,
        description: Some(format!(
            "live migration stream {}: the snapshot and the changes relayed until the migration ended",
            start.stream_id
        )),
    };
    let extraction = Extraction {
        info,
        ops: ReceiverStream::new(ops).map(Ok).boxed(),
    };
    let manifest = write_backup(
        &store,
        extraction,
        ExtractOptions::default(),
        Arc::new(Progress::default()),
    )
    .await?;
    Ok(Some(manifest.backup_id))
}

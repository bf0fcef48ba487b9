//! `ferry migrations new|status|up|down`, and the `--migrations` flags of
//! `ferry restore`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use ferry_agent::migrate::VersionMigrations;
use ferry_engine::adapters::{ConnectionArgs, SinkOptions, TargetLimitArgs, in_place_from_url};
use ferry_engine::migrations::chain::plan;
use ferry_engine::migrations::in_place::{InPlaceTarget, TargetStatus};
use ferry_engine::migrations::profile::{Profile, new_migration};
use ferry_engine::pipeline::MigrateOnRestore;

use crate::commands::UsageError;
use crate::exit;
use crate::{GlobalOptions, OutputFormat};

/// `ferry migrations status`: the target is not in the version asked for
/// (or a step is half done).
pub const NOT_UP_TO_DATE: u8 = 10;

/// Shown at the end of `ferry migrations --help`.
const STATUS_EXIT_HELP: &str = "\
Exit codes: as `ferry --help` says, and for `status`:
  0   the target is up to date (is_up_to_date: true)
  10  the target is not in the version asked for, or a step is half done";

/// The migration flags of `ferry restore`.
#[derive(Debug, Args)]
pub struct RestoreMigrationArgs {
    /// A platform profile (a folder with profile.toml): the ops are taken
    /// through its migration chain on the way. Needs --to-version.
    #[arg(long, value_name = "DIR", requires = "to_version")]
    migrations: Option<PathBuf>,
    /// The platform version the ops are written in on the target.
    #[arg(long, value_name = "VERSION", requires = "migrations")]
    to_version: Option<String>,
    /// The version the backup's ops are in, when neither its manifest nor
    /// its ops name one of the profile's versions.
    #[arg(long, value_name = "VERSION", requires = "migrations")]
    from_version: Option<String>,
}

impl RestoreMigrationArgs {
    /// The chain to run, when `--migrations` is given.
    pub fn load(&self) -> Result<Option<MigrateOnRestore>> {
        let (Some(dir), Some(to_version)) = (&self.migrations, &self.to_version) else {
            return Ok(None);
        };
        let profile = Profile::load(dir).map_err(ferry_engine::Error::from)?;
        profile
            .version_index(to_version)
            .map_err(ferry_engine::Error::from)?;
        Ok(Some(MigrateOnRestore {
            profile,
            to_version: to_version.clone(),
            from_version: self.from_version.clone(),
        }))
    }
}

/// The migration flags of `ferry migrate --live`.
#[derive(Debug, Args)]
pub struct LiveMigrationArgs {
    /// A platform profile (a folder with profile.toml): every op is taken
    /// through its migration chain on its way to the target. Needs --to-version.
    #[arg(long, value_name = "DIR", requires = "to_version")]
    migrations: Option<PathBuf>,
    /// The platform version the ops are written in on the target.
    #[arg(long, value_name = "VERSION", requires = "migrations")]
    to_version: Option<String>,
    /// The version the source's ops are in (needed unless the source agent
    /// stands beside the profile's platform itself: an etcd agent names etcd).
    #[arg(long, value_name = "VERSION", requires = "migrations")]
    from_version: Option<String>,
}

impl LiveMigrationArgs {
    /// The chain to run, when `--migrations` is given. The profile and the
    /// versions named are checked here, and the whole chain when
    /// --from-version is given, before any agent is asked anything.
    pub fn load(&self) -> Result<Option<VersionMigrations>> {
        let (Some(dir), Some(to_version)) = (&self.migrations, &self.to_version) else {
            return Ok(None);
        };
        let profile = Profile::load(dir).map_err(ferry_engine::Error::from)?;
        profile
            .version_index(to_version)
            .map_err(ferry_engine::Error::from)?;
        if let Some(from_version) = &self.from_version {
            plan(&profile, from_version, to_version).map_err(ferry_engine::Error::from)?;
        }
        Ok(Some(VersionMigrations {
            profile,
            to_version: to_version.clone(),
            from_version: self.from_version.clone(),
        }))
    }
}

/// `ferry migrations`.
#[derive(Debug, Args)]
#[command(after_help = STATUS_EXIT_HELP)]
pub struct MigrationsArgs {
    #[command(subcommand)]
    command: MigrationsCommand,
}

#[derive(Debug, Subcommand)]
enum MigrationsCommand {
    /// Write a new, timestamped migration file from the template and add it to the profile.
    New(NewArgs),
    /// Show a target's version, applied and pending migrations, and whether it is up to date.
    Status(TargetArgs),
    /// Migrate a target in place up to a version (the profile's newest by default).
    Up(TargetArgs),
    /// Migrate a target in place down to a version (required).
    Down(TargetArgs),
}

/// `ferry migrations new`.
#[derive(Debug, Args)]
struct NewArgs {
    /// The migration's name: letters, digits, `_` and `-`.
    name: String,
    /// The profile's folder.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Its older version (default: the profile's second newest).
    #[arg(long, value_name = "VERSION")]
    from: Option<String>,
    /// Its newer version (default: the one after --from).
    #[arg(long, value_name = "VERSION")]
    to: Option<String>,
}

/// A target and a profile.
#[derive(Debug, Args)]
struct TargetArgs {
    /// The target, by URL: etcd://HOST:PORT[,HOST:PORT...] (the adapters that migrate in place).
    #[arg(long, value_name = "URL")]
    target: String,
    /// The profile's folder.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The version wanted (status, up: the profile's newest by default; down: required).
    #[arg(long, value_name = "VERSION")]
    to: Option<String>,
    /// The version the target's data is in when the target records none
    /// (default: the profile's oldest).
    #[arg(long, value_name = "VERSION")]
    from_version: Option<String>,
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(flatten)]
    limits: TargetLimitArgs,
}

impl TargetArgs {
    fn in_place(&self) -> Result<std::sync::Arc<dyn InPlaceTarget>> {
        let options = SinkOptions {
            connection: self.connection.clone(),
            target: self.limits.clone(),
            ..SinkOptions::default()
        };
        in_place_from_url(&self.target, &options).map_err(|error| {
            if error.kind() == ferry_engine::ErrorKind::Usage {
                UsageError(error.to_string()).into()
            } else {
                error.into()
            }
        })
    }

    fn profile(&self) -> Result<Profile> {
        Ok(Profile::load(&self.dir).map_err(ferry_engine::Error::from)?)
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    );
}

/// Runs `ferry migrations ...`.
pub async fn migrations(args: MigrationsArgs, global: GlobalOptions) -> Result<u8> {
    match args.command {
        MigrationsCommand::New(args) => new(args, global),
        MigrationsCommand::Status(args) => status(args, global).await,
        MigrationsCommand::Up(args) => run(args, global, false).await,
        MigrationsCommand::Down(args) => run(args, global, true).await,
    }
}

fn new(args: NewArgs, global: GlobalOptions) -> Result<u8> {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis())
        .unwrap_or_default();
    let made = new_migration(
        &args.dir,
        &args.name,
        args.from.as_deref(),
        args.to.as_deref(),
        millis,
    )
    .map_err(ferry_engine::Error::from)?;
    if global.quiet {
        println!("{}", made.path.display());
        return Ok(exit::SUCCESS);
    }
    match global.output {
        OutputFormat::Json => print_json(&json!({
            "id": made.id,
            "path": made.path.display().to_string(),
            "from": made.from,
            "to": made.to,
        })),
        OutputFormat::Text => println!(
            "created {} ({} -> {}) and added it to {}",
            made.path.display(),
            made.from,
            made.to,
            args.dir.join("profile.toml").display()
        ),
    }
    Ok(exit::SUCCESS)
}

fn status_text(status: &TargetStatus) -> String {
    let mut text = format!(
        "platform        {}\nversion         {}{}\nwanted          {}\nis_up_to_date   {}\n",
        status.platform,
        status.version,
        if status.version_recorded {
            ""
        } else {
            " (not recorded in the target: assumed)"
        },
        status.wanted_version,
        status.is_up_to_date
    );
    text += &format!(
        "applied         {}\n",
        if status.applied.is_empty() {
            "(none)".to_owned()
        } else {
            status.applied.join(", ")
        }
    );
    text += &format!(
        "pending         {}\n",
        if status.pending.is_empty() {
            "(none)".to_owned()
        } else {
            status.pending.join(", ")
        }
    );
    if let Some(problem) = &status.problem {
        text += &format!("problem         {problem}\n");
    }
    if let Some(progress) = &status.in_progress {
        text += &format!(
            "HALF DONE       {} ({}) from {} to {}: {} keys written, {} deleted in {} Txns; run `ferry migrations {}` again to finish it\n",
            progress.id,
            progress.direction,
            progress.from,
            progress.to,
            progress.keys_written,
            progress.keys_deleted,
            progress.txns,
            progress.direction
        );
    }
    if !status.history.is_empty() {
        text += "history\n";
        for entry in &status.history {
            text += &format!(
                "  {:>4}  {}  {} {} ({} -> {}): {} written, {} deleted, {} Txn(s)\n",
                entry.number,
                entry.finished_at,
                entry.id,
                entry.direction,
                entry.from,
                entry.to,
                entry.keys_written,
                entry.keys_deleted,
                entry.txns
            );
        }
    }
    text
}

async fn status(args: TargetArgs, global: GlobalOptions) -> Result<u8> {
    let profile = args.profile()?;
    let target = args.in_place()?;
    let status = target
        .status(&profile, args.to.as_deref(), args.from_version.as_deref())
        .await?;
    let code = if status.is_up_to_date {
        exit::SUCCESS
    } else {
        NOT_UP_TO_DATE
    };
    if global.quiet {
        return Ok(code);
    }
    match global.output {
        OutputFormat::Json => print_json(&serde_json::to_value(&status)?),
        OutputFormat::Text => print!("{}", status_text(&status)),
    }
    Ok(code)
}

async fn run(args: TargetArgs, global: GlobalOptions, down: bool) -> Result<u8> {
    let profile = args.profile()?;
    let target = args.in_place()?;
    if down && args.to.is_none() {
        anyhow::bail!(UsageError(
            "`ferry migrations down` needs --to VERSION: the version to go back to".to_owned()
        ));
    }
    let wanted = args.to.clone();
    if let Some(wanted) = &wanted {
        let wanted_index = profile
            .version_index(wanted)
            .map_err(ferry_engine::Error::from)?;
        let current = target
            .status(&profile, None, args.from_version.as_deref())
            .await?
            .version;
        let current_index = profile
            .version_index(&current)
            .map_err(ferry_engine::Error::from)?;
        if down && wanted_index > current_index {
            anyhow::bail!(UsageError(format!(
                "the target is in version {current}; {wanted} is newer: use `ferry migrations up`"
            )));
        }
        if !down && wanted_index < current_index {
            anyhow::bail!(UsageError(format!(
                "the target is in version {current}; {wanted} is older: use `ferry migrations down`"
            )));
        }
    }
    let report = target
        .run(&profile, wanted.as_deref(), args.from_version.as_deref())
        .await?;
    if global.quiet {
        return Ok(exit::SUCCESS);
    }
    match global.output {
        OutputFormat::Json => print_json(&serde_json::to_value(&report)?),
        OutputFormat::Text => {
            if report.steps.is_empty() {
                println!(
                    "{} is already in version {}: nothing to do",
                    target.display(),
                    report.to
                );
            } else {
                println!(
                    "migrated {} from version {} to {}:",
                    target.display(),
                    report.from,
                    report.to
                );
                for step in &report.steps {
                    let entry = &step.entry;
                    println!(
                        "  {} {} ({} -> {}): {} keys written, {} deleted, {}{}",
                        entry.id,
                        entry.direction,
                        entry.from,
                        entry.to,
                        entry.keys_written,
                        entry.keys_deleted,
                        if entry.txns == 1 {
                            "in one Txn".to_owned()
                        } else {
                            format!("in {} Txns", entry.txns)
                        },
                        if step.resumed {
                            " (finished a step left half done)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
    }
    Ok(exit::SUCCESS)
}

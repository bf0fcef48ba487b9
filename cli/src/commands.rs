//! The commands: parse arguments into engine calls, print what came back.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use ferry_engine::adapters::registry::RestoreTuningArgs;
use ferry_engine::adapters::{
    ConnectionArgs, SinkOptions, SourceArgs, SourceOptions, TargetLimitArgs, sink_from_url,
    source_from_url,
};
use ferry_engine::backup::{
    ExtractOptions, FollowOptions, RestoreOptions, find_backup, verify_backup,
};
use ferry_engine::pipeline;
use ferry_engine::progress::Progress;
use ferry_engine::segment::{SegmentLimits, SegmentOptions};
use ferry_engine::store::BackupStore;
use serde_json::json;

use crate::exit;
use crate::output::{self, human_bytes};
use crate::progress::{Measure, ProgressDisplay};
use crate::{GlobalOptions, OutputFormat};

/// `ferry extract`.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// What to back up: etcd://HOST:PORT[,HOST:PORT...], postgres://[USER@]HOST[:PORT]/DB,
    /// agent://HOST:PORT (a source agent; FERRY_AGENT_TOKEN), jsonl:///PATH or jsonl://- (stdin).
    #[arg(long, value_name = "URL")]
    source: String,
    /// Only keys starting with this prefix (sources that hold keys: etcd).
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// Parts of the snapshot read at once, all at the same position (etcd: key ranges; PostgreSQL:
    /// connections copying tables and page ranges of large ones). More helps only when the source
    /// has cores to spare: on 2 cores shared with etcd, 1 reads fastest.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
    /// Where backups go: file:///DIR (or a path), s3://BUCKET/PREFIX.
    #[arg(long, value_name = "STORE_URL")]
    to: String,
    /// Bytes of encoded ops per segment, before compression.
    #[arg(long, value_name = "BYTES", default_value_t = SegmentOptions::default().target_uncompressed_bytes)]
    segment_bytes: usize,
    /// Seal a segment that has held ops this long even short of its size, so a restore following
    /// the backup (`restore --follow`) gets a slow source's ops soon; 0 seals by size only.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = crate::gateway::parse_duration)]
    seal_after: Duration,
    /// zstd level: 1 is fastest, 19 smallest.
    #[arg(long, value_name = "LEVEL", default_value_t = SegmentOptions::default().compression_level,
          value_parser = clap::value_parser!(i32).range(1..=19))]
    compression_level: i32,
    // The adapters' own flags last: each opens a help heading of its own.
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(flatten)]
    selection: SourceArgs,
}

/// `ferry restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The store holding the backup.
    #[arg(long, value_name = "STORE_URL")]
    from: String,
    /// The backup to restore; the latest complete one when left out.
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// Where to replay it: etcd://HOST:PORT[,HOST:PORT...], postgres://[USER@]HOST[:PORT]/DB,
    /// agent://HOST:PORT (a target agent; FERRY_AGENT_TOKEN), jsonl:///PATH or jsonl://- (stdout).
    #[arg(long, value_name = "URL")]
    target: String,
    /// Write keys starting with OLD as starting with NEW (targets that hold keys: etcd).
    #[arg(long, value_name = "OLD=NEW")]
    rewrite_prefix: Option<String>,
    /// Write even when the target range already holds keys.
    #[arg(long)]
    allow_nonempty: bool,
    /// Restore a backup while its extract is still writing it: each segment as it is
    /// sealed, all of them checked against the manifest when it lands. Without --backup,
    /// the backup being written in the store (waiting for one to start).
    #[arg(long)]
    follow: bool,
    /// With --follow: how long to wait for the backup to start, and then for each next
    /// segment, before stopping (a killed extract writes nothing more).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 300,
        requires = "follow"
    )]
    follow_timeout: u64,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    migrations: crate::migrations::RestoreMigrationArgs,
    // The adapters' own flags last: each opens a help heading of its own.
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(flatten)]
    target_limits: TargetLimitArgs,
    #[command(flatten)]
    tuning: RestoreTuningArgs,
}

/// `ferry inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The store: file:///DIR (or a path), s3://BUCKET/PREFIX.
    store: String,
    /// Show this backup's manifest and segments instead of the list.
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
}

/// `ferry verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The store: file:///DIR (or a path), s3://BUCKET/PREFIX.
    store: String,
    /// The backup to check; the latest complete one when left out.
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Limits on what a reader accepts.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// The most bytes one segment may decompress to (guards against crafted segments).
    #[arg(long, value_name = "BYTES", default_value_t = SegmentLimits::default().max_uncompressed_bytes)]
    max_segment_bytes: u64,
}

impl LimitArgs {
    fn limits(&self) -> SegmentLimits {
        SegmentLimits {
            max_uncompressed_bytes: self.max_segment_bytes,
        }
    }
}

/// How `agent://` sources and targets are reached: the token from
/// FERRY_AGENT_TOKEN when set.
fn agent_client_options() -> Result<ferry_agent::client::ClientOptions> {
    ferry_agent::client::ClientOptions::with_token_from(None)
        .map_err(|error| UsageError(error.to_string()).into())
}

/// A usage error found after parsing (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    );
}

pub async fn extract(args: ExtractArgs, global: GlobalOptions) -> Result<u8> {
    let source_options = SourceOptions {
        prefix: args.prefix.clone().unwrap_or_default().into_bytes(),
        parallel: usize::from(args.parallel),
        connection: args.connection.clone(),
        source: args.selection.clone(),
    };
    let source = match ferry_agent::remote::agent_address(&args.source) {
        Some(address) => Box::new(ferry_agent::remote::AgentSource::new(
            address,
            agent_client_options()?,
            args.prefix.clone().unwrap_or_default().into_bytes(),
        )),
        None => source_from_url(&args.source, &source_options)?,
    };
    let store = BackupStore::open(&args.to, true).map_err(ferry_engine::Error::from)?;
    let options = ExtractOptions {
        segment: SegmentOptions {
            target_uncompressed_bytes: args.segment_bytes.max(1),
            compression_level: args.compression_level,
        },
        seal_after: Some(args.seal_after).filter(|after| !after.is_zero()),
        ..ExtractOptions::default()
    };
    let progress = Arc::new(Progress::default());
    let display = ProgressDisplay::start(
        progress.clone(),
        Measure::BytesRead,
        global.quiet,
        "extract",
    );
    let summary = pipeline::extract(source, &store, options, progress).await?;
    drop(display);
    let manifest = &summary.manifest;
    let totals = manifest.totals;
    let seconds = summary.elapsed.as_secs_f64();
    if global.quiet {
        println!("{}", manifest.backup_id);
        return Ok(exit::SUCCESS);
    }
    match global.output {
        OutputFormat::Json => print_json(&json!({
            "backup_id": manifest.backup_id,
            "store": store.display(),
            "ops": totals.ops,
            "segments": totals.segments,
            "uncompressed_bytes": totals.uncompressed_bytes,
            "compressed_bytes": totals.compressed_bytes,
            "compression_ratio": totals.compression_ratio(),
            "seconds": seconds,
        })),
        OutputFormat::Text => println!(
            "backup {} sealed in {}\n  ops       {}\n  bytes     {} before compression, {} after (ratio {:.2})\n  segments  {}\n  time      {:.2} s ({}/s before compression)",
            manifest.backup_id,
            store.display(),
            totals.ops,
            human_bytes(totals.uncompressed_bytes),
            human_bytes(totals.compressed_bytes),
            totals.compression_ratio(),
            totals.segments,
            seconds,
            human_bytes((totals.uncompressed_bytes as f64 / seconds.max(1e-9)) as u64),
        ),
    }
    Ok(exit::SUCCESS)
}

pub async fn restore(args: RestoreArgs, global: GlobalOptions) -> Result<u8> {
    // A follower may start before the extract makes the store's folder.
    let store = BackupStore::open(&args.from, args.follow).map_err(ferry_engine::Error::from)?;
    let rewrite_prefix = match &args.rewrite_prefix {
        Some(rewrite) => match rewrite.split_once('=') {
            Some((from, to)) if !from.is_empty() => {
                Some((from.as_bytes().to_vec(), to.as_bytes().to_vec()))
            }
            _ => anyhow::bail!(UsageError(format!(
                "--rewrite-prefix takes OLD=NEW, not {rewrite:?}"
            ))),
        },
        None => None,
    };
    let sink_options = SinkOptions {
        rewrite_prefix,
        allow_nonempty: args.allow_nonempty,
        connection: args.connection.clone(),
        target: args.target_limits.clone(),
        restore: args.tuning.clone(),
    };
    let sink = match ferry_agent::remote::agent_address(&args.target) {
        Some(address) => Box::new(ferry_agent::remote::AgentSink::new(
            address,
            agent_client_options()?,
        )),
        None => sink_from_url(&args.target, &sink_options)?,
    };
    let options = RestoreOptions {
        limits: args.limits.limits(),
        ..RestoreOptions::default()
    };
    let progress = Arc::new(Progress::default());
    let display = ProgressDisplay::start(progress.clone(), Measure::Ops, global.quiet, "restore");
    let migrations = args.migrations.load()?;
    let summary = if args.follow {
        if migrations.is_some() {
            anyhow::bail!(UsageError(
                "--follow cannot take --migrations: a restore through a version chain checks every op of the sealed backup before it writes one; restore the sealed backup instead".to_owned()
            ));
        }
        let follow = FollowOptions {
            stall_timeout: Duration::from_secs(args.follow_timeout),
            ..FollowOptions::default()
        };
        pipeline::restore_following(
            &store,
            args.backup.as_deref(),
            sink,
            options,
            follow,
            progress,
        )
        .await?
    } else {
        pipeline::restore_migrated(
            &store,
            args.backup.as_deref(),
            sink,
            options,
            progress,
            migrations,
        )
        .await?
    };
    drop(display);
    let seconds = summary.elapsed.as_secs_f64();
    if global.quiet {
        return Ok(exit::SUCCESS);
    }
    match global.output {
        OutputFormat::Json if args.target == "jsonl://-" => eprintln!(
            "{}",
            json!({"backup_id": summary.manifest.backup_id, "target": args.target, "ops": summary.ops, "seconds": seconds})
        ),
        OutputFormat::Json => print_json(&json!({
            "backup_id": summary.manifest.backup_id,
            "target": args.target,
            "ops": summary.ops,
            "seconds": seconds,
        })),
        OutputFormat::Text => {
            let line = format!(
                "restored backup {} onto {}: {} ops in {:.2} s",
                summary.manifest.backup_id, args.target, summary.ops, seconds
            );
            // A restore to stdout keeps stdout for the ops.
            if args.target == "jsonl://-" {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
    }
    Ok(exit::SUCCESS)
}

pub async fn inspect(args: InspectArgs, global: GlobalOptions) -> Result<u8> {
    let store = BackupStore::open(&args.store, false).map_err(ferry_engine::Error::from)?;
    match args.backup {
        None => {
            let listings = store.list_backups().await?;
            if global.quiet {
                return Ok(exit::SUCCESS);
            }
            match global.output {
                OutputFormat::Json => print_json(&json!({
                    "store": store.display(),
                    "backups": listings.iter().map(output::listing_json).collect::<Vec<_>>(),
                })),
                OutputFormat::Text if listings.is_empty() => {
                    println!("no backups in {}", store.display())
                }
                OutputFormat::Text => print!("{}", output::listing_table(&listings)),
            }
        }
        Some(backup_id) => {
            let listing = store.describe(&backup_id).await?;
            let manifest = match listing.manifest {
                Some(manifest) => manifest,
                // Not complete: find_backup says why (not found or incomplete).
                None => find_backup(&store, Some(&backup_id)).await?,
            };
            if global.quiet {
                return Ok(exit::SUCCESS);
            }
            match global.output {
                OutputFormat::Json => print_json(&serde_json::to_value(&manifest)?),
                OutputFormat::Text => print!("{}", output::manifest_text(&manifest)),
            }
        }
    }
    Ok(exit::SUCCESS)
}

pub async fn verify(args: VerifyArgs, global: GlobalOptions) -> Result<u8> {
    let store = BackupStore::open(&args.store, false).map_err(ferry_engine::Error::from)?;
    let progress = Arc::new(Progress::default());
    let display = ProgressDisplay::start(progress.clone(), Measure::Ops, global.quiet, "verify");
    let report = verify_backup(
        &store,
        args.backup.as_deref(),
        args.limits.limits(),
        progress,
    )
    .await?;
    drop(display);
    let code = if report.is_ok() {
        exit::SUCCESS
    } else {
        exit::DAMAGED
    };
    for problem in &report.problems {
        eprintln!("damaged: {}", problem.error);
    }
    if global.quiet {
        return Ok(code);
    }
    match global.output {
        OutputFormat::Json => print_json(&json!({
            "backup_id": report.backup_id,
            "ok": report.is_ok(),
            "segments_listed": report.segments_listed,
            "segments_ok": report.segments_ok,
            "ops_listed": report.ops_listed,
            "ops_ok": report.ops_ok,
            "problems": report.problems.iter().map(|problem| json!({
                "segment": problem.segment,
                "error": problem.error.to_string(),
            })).collect::<Vec<_>>(),
            "unlisted_segments": report.unlisted_segments,
        })),
        OutputFormat::Text => {
            if report.is_ok() {
                println!(
                    "backup {} is sound: {} segments, {} ops, every checksum, SHA-256, seq and count checked",
                    report.backup_id, report.segments_ok, report.ops_ok
                );
            } else {
                println!(
                    "backup {} is DAMAGED: {} of {} segments failed; restore from another backup",
                    report.backup_id,
                    report.problems.len(),
                    report.segments_listed
                );
            }
            for name in &report.unlisted_segments {
                println!(
                    "note: segment object {name} is in the store but not in the manifest (ignored by restore)"
                );
            }
        }
    }
    Ok(code)
}

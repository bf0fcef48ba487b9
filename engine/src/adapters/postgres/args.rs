//! PostgreSQL's own flags and its entry in the adapter registry: parsed
//! first (paths only), built second (the password from the environment or a
//! file when the adapter is built).

use std::path::PathBuf;
use std::sync::Arc;

use super::connection::PasswordSources;
use super::{
    PgConnection, PgError, PgLiveOptions, PgLiveSink, PgLiveSource, PgSink, PgSinkOptions,
    PgSource, PgSourceOptions, RowFormat,
};
use crate::Result;
use crate::adapters::live::{LiveSink, LiveSource};
use crate::adapters::registry::Adapter;
use crate::adapters::{AdapterError, Sink, SinkOptions, Source, SourceOptions};

/// PostgreSQL in the registry.
pub const ADAPTER: Adapter = Adapter {
    name: "postgres",
    schemes: &["postgres", "postgresql"],
    urls: "postgres://[USER@]HOST[:PORT]/DB[?sslmode=MODE]",
    source: Some(source),
    sink: Some(sink),
    live_source: Some(live_source),
    live_sink: Some(live_sink),
    in_place: None,
    digest_entry: Some(super::digest::digest_entry),
};

/// Credentials and TLS for PostgreSQL: from the environment or files, never
/// from argv or the URL.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "PostgreSQL")]
pub struct PgArgs {
    /// A file whose first line is the PostgreSQL password; without it, PGPASSWORD, then the
    /// password file (PGPASSFILE, or ~/.pgpass) are used, as libpq does.
    #[arg(long, value_name = "FILE")]
    pub pg_password_file: Option<PathBuf>,
    /// PostgreSQL over TLS: PEM file of the CA that signed the server's certificate (the URL's
    /// sslrootcert= says the same; sslmode=verify-ca or verify-full need one).
    #[arg(long, value_name = "FILE")]
    pub pg_ca_file: Option<PathBuf>,
}

impl PgArgs {
    /// The database `url` names, with the password from these flags or the
    /// environment (read now).
    pub fn connection(&self, url: &str) -> Result<PgConnection, PgError> {
        let mut connection = PgConnection::from_url(
            url,
            &PasswordSources::from_env(self.pg_password_file.clone()),
        )?;
        if let Some(ca_file) = &self.pg_ca_file {
            connection.tls.ca_file = Some(ca_file.clone());
        }
        Ok(connection)
    }
}

/// What an extract reads from PostgreSQL.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "PostgreSQL")]
pub struct PgSourceArgs {
    /// PostgreSQL: extract only this schema (repeat for more); all but the system's and
    /// ferry's own when none is named.
    #[arg(long = "schema", value_name = "SCHEMA")]
    pub schemas: Vec<String>,
    /// PostgreSQL: extract only this table, SCHEMA.TABLE or TABLE in any extracted schema
    /// (repeat for more).
    #[arg(long = "table", value_name = "TABLE")]
    pub tables: Vec<String>,
    /// PostgreSQL: keep the extract's logical replication slot under this name, so a live
    /// migration can follow from the backup's position; without it the slot is temporary and
    /// goes away with the extract, also when it fails or is killed.
    #[arg(long, value_name = "NAME")]
    pub keep_slot: Option<String>,
    /// PostgreSQL: how rows are carried: `json`, an op a row (what a version chain and the
    /// live path read), or `copy`, COPY text as the server printed it (a backup restored as
    /// fast as pg_restore restores a dump; it cannot go through a version chain).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = RowFormat::Json)]
    pub row_format: RowFormat,
}

/// Rows a restore commits at once when not told.
const DEFAULT_ROWS_PER_COMMIT: u64 = 20_000;

/// How a PostgreSQL restore writes.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "PostgreSQL")]
pub struct PgRestoreArgs {
    /// PostgreSQL: ops per target transaction (each commits ferry's checkpoint with it); a
    /// killed restore redoes at most this many.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_ROWS_PER_COMMIT, value_parser = clap::value_parser!(u64).range(1..))]
    pub pg_ops_per_commit: u64,
    /// PostgreSQL: connections loading at once, tables spread over them (each with its own
    /// checkpoint row); a resumed restore keeps the number it began with.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LANES, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub pg_lanes: u16,
}

/// Lanes of a restore when not told.
const DEFAULT_LANES: u16 = 2;

impl Default for PgRestoreArgs {
    fn default() -> Self {
        Self {
            pg_ops_per_commit: DEFAULT_ROWS_PER_COMMIT,
            pg_lanes: DEFAULT_LANES,
        }
    }
}

fn connection(
    url: &str,
    args: &PgArgs,
    error: fn(PgError) -> AdapterError,
) -> Result<PgConnection> {
    Ok(args.connection(url).map_err(error)?)
}

fn source(url: &str, options: &SourceOptions) -> Result<Box<dyn Source>> {
    let connection = connection(url, &options.connection.postgres, AdapterError::source)?;
    if !options.prefix.is_empty() {
        return Err(AdapterError::BadUrl {
            url: url.to_owned(),
            reason: "PostgreSQL takes --schema and --table, not --prefix".to_owned(),
        }
        .into());
    }
    let selection = &options.source.postgres;
    Ok(Box::new(PgSource::new(
        connection,
        PgSourceOptions {
            schemas: selection.schemas.clone(),
            tables: selection.tables.clone(),
            keep_slot: selection.keep_slot.clone(),
            parallel: options.parallel.max(1),
            row_format: selection.row_format,
        },
    )))
}

fn sink(url: &str, options: &SinkOptions) -> Result<Box<dyn Sink>> {
    let connection = connection(url, &options.connection.postgres, AdapterError::target)?;
    if options.rewrite_prefix.is_some() {
        return Err(AdapterError::BadUrl {
            url: url.to_owned(),
            reason: "PostgreSQL keys are tables and rows: --rewrite-prefix does not apply"
                .to_owned(),
        }
        .into());
    }
    Ok(Box::new(PgSink::new(
        connection,
        PgSinkOptions {
            allow_nonempty: options.allow_nonempty,
            ops_per_commit: options.restore.postgres.pg_ops_per_commit as usize,
            epoch: 0,
            lanes: usize::from(options.restore.postgres.pg_lanes),
        },
    )))
}

/// The slot (and publication) a live stream of database `dbname` uses when
/// `--keep-slot` names none: `ferry_live_` and the database's name, lower
/// case, other characters as `_` (slot names are global to the server).
fn default_live_slot(dbname: &str) -> String {
    let mut name: String = format!("ferry_live_{dbname}")
        .chars()
        .map(|char| {
            if char.is_ascii_alphanumeric() {
                char.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(63);
    name
}

fn live_source(url: &str, options: &SourceOptions) -> Result<Arc<dyn LiveSource>> {
    let connection = connection(url, &options.connection.postgres, AdapterError::source)?;
    let selection = &options.source.postgres;
    if selection.row_format != RowFormat::Json {
        return Err(AdapterError::BadUrl {
            url: url.to_owned(),
            reason: "--row-format copy is for backups: a live migration carries rows as JSON (its changes are rows, and a version chain reads them)".to_owned(),
        }
        .into());
    }
    let slot = selection
        .keep_slot
        .clone()
        .unwrap_or_else(|| default_live_slot(&connection.dbname));
    Ok(Arc::new(PgLiveSource::new(
        connection,
        PgLiveOptions {
            source: PgSourceOptions {
                schemas: selection.schemas.clone(),
                tables: selection.tables.clone(),
                keep_slot: None,
                parallel: options.parallel.max(1),
                row_format: RowFormat::Json,
            },
            publication: slot.clone(),
            slot,
        },
    )))
}

fn live_sink(url: &str, options: &SinkOptions) -> Result<Arc<dyn LiveSink>> {
    let connection = connection(url, &options.connection.postgres, AdapterError::target)?;
    Ok(Arc::new(PgLiveSink::new(
        connection,
        options.restore.postgres.pg_ops_per_commit as usize,
    )))
}

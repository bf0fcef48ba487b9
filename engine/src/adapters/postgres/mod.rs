//! The `postgres` adapter: a PostgreSQL database, the store under
//! Metaflow's metadata service, Pachyderm 2.x and MLflow's tracking server
//! with a SQL backend.
//!
//! - [`PgSource`]: one consistent snapshot. A logical replication slot is
//!   created with an exported snapshot on a replication connection; its
//!   consistent point is the backup's position R (an LSN). Workers import
//!   that snapshot (`SET TRANSACTION SNAPSHOT`) in REPEATABLE READ READ ONLY
//!   transactions and stream every table with `COPY ... TO STDOUT`, large
//!   tables split into ranges of pages (ctid). The slot is temporary (gone
//!   with its connection, also when ferry is killed) unless `--keep-slot`
//!   names one for a live migration to follow from R.
//! - [`PgSink`]: the shared [`SinkDriver`](super::driver::SinkDriver) over a
//!   target that loads rows with `COPY ... FROM STDIN` inside transactions
//!   that also write the stream's checkpoint row in the target's `ferry`
//!   schema, with the epoch (G4, G5): a killed restore resumes with no row
//!   missing and none twice.
//!
//! The ops, in the order a backup holds them (as `pg_restore` replays a
//! dump: what rows need first, what slows a load last):
//!
//! | kind | key | method | body |
//! | --- | --- | --- | --- |
//! | `pg.extension` | `extension/<name>` | `CREATE` | `{"name","schema"}`: `CREATE EXTENSION IF NOT EXISTS` |
//! | `pg.type` | `type/<schema>.<name>` | `CREATE` | an enum type: `{"schema","name","labels":[..]}` |
//! | `pg.sequence` | `sequence/<schema>.<name>` | `CREATE` | `{"schema","name","type","start","increment","min","max","cache","cycle"}` |
//! | `pg.table` | `table/<schema>.<name>` | `CREATE` | `{"schema","name","columns":[{"name","type","not_null","default","identity","generated","collation"}]}` |
//! | `pg.row` | `<schema>.<table>/<primary key>` | `INSERT` | the row as a JSON object (see [`value`]) |
//! | `pg.rows` | `<schema>.<table>/#<first page>.<n>` | `COPY` | rows as COPY text, the server's own (`--row-format copy`, below) |
//! | `pg.index` | `index/<schema>.<name>` | `CREATE` | `{"schema","table","name","definition"}` (`pg_get_indexdef`) |
//! | `pg.constraint` | `constraint/<schema>.<table>.<name>` | `ADD` | `{"schema","table","name","type","definition"}` (`pg_get_constraintdef`) |
//! | `pg.sequence` | `sequence/<schema>.<name>` | `SETVAL` | `{"schema","name","last_value","is_called"}` |
//!
//! A row's key is its table, `schema.table` (each name with `%`, `.` and
//! `/` percent-encoded), then its primary key's values in key-column order,
//! each in its text form with `%` and `/` percent-encoded, joined by `/`:
//! `public.runs_v3/HelloFlow/42`. A table without a primary key is carried
//! with keys made of its rows' places when read (`public.log/@(0,1)`), which
//! identify nothing on the target; the extract names such tables in a
//! warning.
//!
//! `ferry extract --row-format copy` carries rows as the server printed
//! them, for backups: a `pg.rows` op holds up to [`ROWS_OP_BYTES`] of one
//! table's rows in COPY's text format, its first line the columns' names
//! (COPY text fields, tab-separated), and a restore forwards them into its
//! `COPY ... FROM STDIN` untouched. Nothing is converted on either side, so
//! every type the server can print is carried exactly, and a restore costs
//! what `pg_restore` costs. What it gives up: a row has no key of its own
//! (verify and `inspect` count ops, not rows; `migrate --verify` cannot
//! sum such a stream), and a version chain's filters, which read rows as
//! JSON objects, refuse `pg.rows` ops by their seq. `pg.row` (the default)
//! is what the live path and the version chain need.
//!
//! Identifiers in SQL are always quoted (`quote_ident`), values always
//! bound or sent through COPY: nothing from a backup is spliced into SQL
//! unquoted, except the definitions PostgreSQL itself printed
//! (`pg_get_indexdef`, `pg_get_constraintdef`, `format_type`, column
//! defaults), which a restore replays as `pg_restore` replays a dump's.

mod args;
mod catalog;
mod connection;
mod digest;
mod fence;
pub mod follow;
mod lanes;
mod live;
pub mod pgoutput;
pub mod plane;
pub mod replication;
mod sink;
mod source;
mod tls;
pub mod value;

pub use args::{ADAPTER, PgArgs, PgRestoreArgs, PgSourceArgs};
pub use connection::{PasswordSources, PgConnection};
pub use digest::digest_entry;
pub use lanes::PgSink;
pub use live::{CAPABILITIES as LIVE_CAPABILITIES, PgLiveOptions, PgLiveSink, PgLiveSource};
pub use replication::{PgTls, SslMode};
pub use sink::PgSinkOptions;
pub use source::{PgSource, PgSourceOptions, RowFormat};

use crate::adapters::PlatformError;
use crate::error::ErrorClass;

/// The schema ferry keeps its own tables in, on a target.
pub const FERRY_SCHEMA: &str = "ferry";

/// The op kind of an extension.
pub const KIND_EXTENSION: &str = "pg.extension";
/// The op kind of an enum type.
pub const KIND_TYPE: &str = "pg.type";
/// The op kind of a sequence.
pub const KIND_SEQUENCE: &str = "pg.sequence";
/// The op kind of a table.
pub const KIND_TABLE: &str = "pg.table";
/// The op kind of a row.
pub const KIND_ROW: &str = "pg.row";
/// The op kind of a run of rows carried as COPY text (`--row-format copy`).
pub const KIND_ROWS: &str = "pg.rows";
/// The content type of a [`KIND_ROWS`] op's body.
pub const COPY_TEXT: &str = "text/x-postgresql-copy";
/// Bytes of COPY text in one [`KIND_ROWS`] op, about (a row is never split:
/// a longer row makes an op of its own).
pub const ROWS_OP_BYTES: usize = 256 * 1024;
/// The op kind of an index that backs no constraint.
pub const KIND_INDEX: &str = "pg.index";
/// The op kind of a constraint: primary key, unique, foreign key, check,
/// exclusion.
pub const KIND_CONSTRAINT: &str = "pg.constraint";

/// What went wrong with a PostgreSQL server, in its words: every message
/// names the server (`host:port/db`, never a password) and, when the server
/// said why, its SQLSTATE.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The URL cannot be used.
    #[error("cannot use {url}: {reason}")]
    BadUrl {
        /// The URL, as given (a password in it is never echoed).
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A file named by a flag or the environment cannot be read.
    #[error("cannot read {what} {path}: {reason}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// The path.
        path: String,
        /// What the system said.
        reason: String,
    },
    /// The server refused the credentials.
    #[error("{server} refused ferry's credentials for user {user}: {reason}")]
    Credentials {
        /// The server.
        server: String,
        /// The user.
        user: String,
        /// What the server said.
        reason: String,
    },
    /// The server does not answer, or the connection broke.
    #[error(
        "cannot reach PostgreSQL at {server}: {reason}; check the address and that the server runs"
    )]
    Unreachable {
        /// The server.
        server: String,
        /// What the transport said.
        reason: String,
    },
    /// TLS could not be set up.
    #[error("cannot talk TLS to {server}: {reason}")]
    Tls {
        /// The server.
        server: String,
        /// What is wrong.
        reason: String,
    },
    /// The server lacks a setting or a right the extract or restore needs.
    #[error("{server}: {reason}")]
    Precondition {
        /// The server.
        server: String,
        /// What is missing, and what to do.
        reason: String,
    },
    /// The target holds tables already.
    #[error(
        "{server} is not empty: it holds {tables}; restore into an empty database, or pass --allow-nonempty to add to it (a table of the backup that exists there is still an error)"
    )]
    NotEmpty {
        /// The server.
        server: String,
        /// Some of the tables it holds.
        tables: String,
    },
    /// A table of the source has a type ferry cannot carry exactly.
    #[error("{server}: cannot carry {table}.{column} exactly: {reason}")]
    Unsupported {
        /// The server.
        server: String,
        /// The table, `schema.name`.
        table: String,
        /// The column.
        column: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A statement failed.
    #[error("{server}: {what} failed: {reason}")]
    Statement {
        /// The server.
        server: String,
        /// What ferry was doing, naming the table or op.
        what: String,
        /// What the server said, with its SQLSTATE.
        reason: String,
        /// The SQLSTATE, when the server sent one.
        code: Option<String>,
    },
    /// An op of the stream cannot be applied as it is.
    #[error("{server}: op seq {seq} ({key}) cannot be applied: {reason}")]
    BadOp {
        /// The server.
        server: String,
        /// The op's seq.
        seq: u64,
        /// The op's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The replication connection failed.
    #[error("{what}: {error}")]
    Replication {
        /// What ferry was doing.
        what: String,
        /// What went wrong.
        #[source]
        error: Box<replication::ReplicationError>,
    },
    /// A row of the source could not be turned into an op.
    #[error("{server}: a row of {table} (read at {place}) cannot be carried: {reason}")]
    BadRow {
        /// The server.
        server: String,
        /// The table.
        table: String,
        /// Where the row was read (its primary key, or its place).
        place: String,
        /// What is wrong.
        reason: String,
    },
    /// The source's change stream holds what ferry cannot follow.
    #[error("{server}: the change stream cannot be followed at LSN {lsn}: {reason}")]
    Follow {
        /// The server.
        server: String,
        /// Where in the stream (the transaction's commit LSN, or the
        /// message's).
        lsn: String,
        /// What, naming the table, and what to do.
        reason: String,
    },
}

impl PgError {
    /// A statement's failure, with the server's SQLSTATE and message.
    pub(crate) fn statement(
        server: &str,
        what: impl Into<String>,
        error: &tokio_postgres::Error,
    ) -> Self {
        PgError::Statement {
            server: server.to_owned(),
            what: what.into(),
            reason: describe_error(error),
            code: error.code().map(|code| code.code().to_owned()),
        }
    }

    /// A failure of the replication connection while doing `what`.
    pub(crate) fn replication(
        what: impl Into<String>,
        error: replication::ReplicationError,
    ) -> Self {
        PgError::Replication {
            what: what.into(),
            error: Box::new(error),
        }
    }

    /// The SQLSTATE of a failed statement.
    pub fn code(&self) -> Option<&str> {
        match self {
            PgError::Statement { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

/// What the server or the transport said, with the SQLSTATE and the
/// server's detail and hint when there are.
pub(crate) fn describe_error(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            text.push_str(&format!("; {detail}"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    let mut text = error.to_string();
    let mut next = std::error::Error::source(error);
    while let Some(source) = next {
        text = format!("{text}: {source}");
        next = source.source();
    }
    text
}

impl PlatformError for PgError {
    fn class(&self) -> ErrorClass {
        match self {
            PgError::Credentials { .. }
            | PgError::Tls { .. }
            | PgError::File { .. }
            | PgError::Precondition { .. }
            | PgError::NotEmpty { .. }
            | PgError::Unsupported { .. }
            | PgError::Follow { .. } => ErrorClass::Precondition,
            PgError::BadUrl { .. } | PgError::BadOp { .. } | PgError::BadRow { .. } => {
                ErrorClass::Invalid
            }
            PgError::Statement { code, .. } => match code.as_deref().map(|code| &code[..2]) {
                // Insufficient resources (disk full, out of memory),
                // privileges, a conflicting table: change course first.
                Some("53" | "42" | "3D" | "28") => ErrorClass::Precondition,
                // Data exceptions, integrity violations: the op is wrong.
                Some("22" | "23") => ErrorClass::Invalid,
                _ => ErrorClass::Transient,
            },
            PgError::Unreachable { .. } => ErrorClass::Transient,
            PgError::Replication { error, .. } => error.class(),
        }
    }

    fn is_usage(&self) -> bool {
        matches!(self, PgError::BadUrl { .. } | PgError::File { .. })
    }
}

/// An identifier quoted for SQL, as `quote_ident` does: always, so case
/// and reserved words survive.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.name`, both quoted.
pub(crate) fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// A string literal for SQL (standard_conforming_strings on).
pub(crate) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted_whatever_they_hold() {
        assert_eq!(quote_ident("runs_v3"), "\"runs_v3\"");
        assert_eq!(quote_ident("Odd \"name\""), "\"Odd \"\"name\"\"\"");
        assert_eq!(qualified("public", "User"), "\"public\".\"User\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}

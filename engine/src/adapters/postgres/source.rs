//! Extract: one consistent snapshot of a PostgreSQL database as ops.
//!
//! 1. Preflight on a SQL connection: `wal_level = logical`, a role that may
//!    replicate, a free replication slot; each missing one is an error that
//!    says the setting and what changing it takes.
//! 2. On a replication connection, `CREATE_REPLICATION_SLOT ... (SNAPSHOT
//!    'export')`: its consistent point is the backup's position R. The slot
//!    is TEMPORARY (the server drops it with the connection, also when ferry
//!    is killed) unless `--keep-slot NAME` keeps it for a live migration.
//! 3. Every worker connection imports the snapshot in a REPEATABLE READ
//!    READ ONLY transaction; the first reads the catalog in it. Then the
//!    replication connection lets the snapshot go.
//! 4. Ops in the order a restore needs them: extensions, enum types,
//!    sequences, tables; every table's rows, streamed with `COPY ... TO
//!    STDOUT` by the workers, tables of more than [`CHUNK_PAGES`] pages split
//!    into page ranges (`ctid`); indexes, constraints, sequence values last.
//!
//! Memory stays flat: rows go from COPY to ops to a bounded channel, a
//! batch at a time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tracing::{info, warn};

use super::catalog::{self, Catalog, Selection, SequenceValue, Table};
use super::replication::{
    ExportedSnapshot, PGOUTPUT, ReplicationConnection, SlotPersistence, WhenActive,
};
use super::value::{Column as ValueColumn, CopyField, RowDecoder, names_line, split_line};
use super::{
    COPY_TEXT, KIND_CONSTRAINT, KIND_EXTENSION, KIND_INDEX, KIND_ROW, KIND_ROWS, KIND_SEQUENCE,
    KIND_TABLE, KIND_TYPE, PgConnection, PgError, ROWS_OP_BYTES, qualified,
};
use crate::adapters::{AdapterError, Extraction, Source};
use crate::manifest::SourceInfo;
use crate::progress::Progress;
use crate::{Op, Result};

/// Pages (8 KiB each by default) of one part of a table's copy: a table
/// larger than this is copied by several workers at once.
pub const CHUNK_PAGES: u64 = 4_096;

/// Ops in one batch at most.
const BATCH_OPS: usize = 1_000;
/// Bytes of op bodies in one batch at most (a TOASTed row over it makes a
/// batch of its own).
const BATCH_BYTES: usize = 1 << 20;

/// What an extract reads.
#[derive(Debug, Clone, Default)]
pub struct PgSourceOptions {
    /// Only these schemas (all but the system's and ferry's when empty).
    pub schemas: Vec<String>,
    /// Only these tables.
    pub tables: Vec<String>,
    /// Keep the replication slot under this name.
    pub keep_slot: Option<String>,
    /// Worker connections copying at once.
    pub parallel: usize,
    /// How rows are carried.
    pub row_format: RowFormat,
}

/// How an extract carries rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RowFormat {
    /// A `pg.row` op a row, the row a JSON object: what the live path and
    /// a version chain read.
    #[default]
    Json,
    /// `pg.rows` ops of COPY text, as the server printed it: for backups,
    /// restored by forwarding it (no version chain).
    Copy,
}

/// A PostgreSQL database as a [`Source`].
#[derive(Debug)]
pub struct PgSource {
    connection: PgConnection,
    options: PgSourceOptions,
}

impl PgSource {
    /// An extract of the database `connection` reaches.
    pub fn new(connection: PgConnection, options: PgSourceOptions) -> Self {
        Self {
            connection,
            options,
        }
    }
}

/// What the preflight learned of the server.
#[derive(Debug, Clone)]
pub(crate) struct ServerFacts {
    /// `server_version`, e.g. `15.18`.
    pub version: String,
    /// `pg_control_system()`'s system identifier.
    pub system_id: u64,
    /// The timeline of the latest checkpoint.
    pub timeline: u32,
}

fn source_error(error: PgError) -> crate::Error {
    AdapterError::source(error).into()
}

/// Checks that `client`'s server and role can take a logical slot.
pub(crate) async fn preflight(
    client: &Client,
    connection: &PgConnection,
) -> Result<ServerFacts, PgError> {
    let server = connection.server();
    let row = client
        .query_one(
            "SELECT pg_catalog.current_setting('server_version'), \
                    pg_catalog.current_setting('wal_level'), \
                    pg_catalog.current_setting('max_replication_slots')::int, \
                    (SELECT count(*) FROM pg_catalog.pg_replication_slots)::int, \
                    (SELECT rolreplication OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user), \
                    (SELECT system_identifier FROM pg_catalog.pg_control_system())::text, \
                    (SELECT timeline_id FROM pg_catalog.pg_control_checkpoint())",
            &[],
        )
        .await
        .map_err(|error| PgError::statement(&server, "reading the server's settings", &error))?;
    let version: String = row.get(0);
    let wal_level: String = row.get(1);
    let max_slots: i32 = row.get(2);
    let slots: i32 = row.get(3);
    let may_replicate: Option<bool> = row.get(4);
    let system_id: String = row.get(5);
    let timeline: i32 = row.get(6);
    let precondition = |reason: String| PgError::Precondition {
        server: server.clone(),
        reason,
    };
    if wal_level != "logical" {
        return Err(precondition(format!(
            "wal_level is {wal_level}, and a consistent extract needs a logical replication slot: set wal_level = logical (ALTER SYSTEM SET wal_level = logical, or postgresql.conf) and restart the server; the setting takes effect only at a restart"
        )));
    }
    if may_replicate != Some(true) {
        return Err(precondition(format!(
            "role {} may not replicate, and a consistent extract needs a logical replication slot: ALTER ROLE {} REPLICATION (as a superuser), or extract as a role that has it",
            connection.user,
            super::quote_ident(&connection.user)
        )));
    }
    if slots >= max_slots {
        return Err(precondition(format!(
            "all {max_slots} replication slots are taken (max_replication_slots = {max_slots}); drop an unused one (SELECT slot_name, active FROM pg_replication_slots) or raise max_replication_slots, which takes a restart"
        )));
    }
    Ok(ServerFacts {
        version,
        system_id: system_id.parse().unwrap_or_default(),
        timeline: timeline.max(0) as u32,
    })
}

/// Begins a REPEATABLE READ READ ONLY transaction on `client` that sees
/// the exported snapshot `name`.
pub(crate) async fn import_snapshot(
    client: &Client,
    server: &str,
    name: &str,
) -> Result<(), PgError> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            super::quote_literal(name)
        ))
        .await
        .map_err(|error| PgError::statement(server, "importing the extract's snapshot", &error))
}

/// One part of a table's copy.
#[derive(Debug, Clone)]
struct Chunk {
    table: Arc<TablePlan>,
    /// Pages `[from, to)`; `None` for the whole table, `to` `None` for the
    /// rest of it.
    pages: Option<(u64, Option<u64>)>,
}

/// How one table is copied and turned into ops.
#[derive(Debug)]
pub(super) struct TablePlan {
    pub(super) table: Table,
    /// The codec's view of the copied columns.
    pub(super) columns: Vec<ValueColumn>,
    /// The primary key's columns, as indexes into `columns`.
    pub(super) key_columns: Vec<usize>,
    /// `schema.name/`, every row key's start.
    pub(super) key_prefix: String,
}

impl TablePlan {
    /// The COPY that reads the table's rows (those of `pages` only, when
    /// given); for [`RowFormat::Json`], a keyless table's rows end with
    /// their ctid, which keys them.
    pub(super) fn copy_statement(
        &self,
        pages: Option<(u64, Option<u64>)>,
        format: RowFormat,
    ) -> String {
        let table = qualified(&self.table.schema, &self.table.name);
        let mut columns: Vec<String> = self
            .columns
            .iter()
            .map(|column| super::quote_ident(&column.name))
            .collect();
        let keyless = self.key_columns.is_empty() && format == RowFormat::Json;
        if pages.is_none() && !keyless {
            return format!("COPY {table} ({}) TO STDOUT", columns.join(", "));
        }
        if keyless {
            columns.push("ctid".to_owned());
        }
        let filter = match pages {
            None => String::new(),
            Some((from, None)) => format!(" WHERE ctid >= '({from},0)'::tid"),
            Some((from, Some(to))) => {
                format!(" WHERE ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid")
            }
        };
        format!(
            "COPY (SELECT {} FROM ONLY {table}{filter}) TO STDOUT",
            columns.join(", ")
        )
    }
}

/// Classifies every column of every table, refusing a type ferry cannot
/// carry by its table and column; warns of tables without a primary key.
pub(super) fn plan_tables(catalog: &Catalog, server: &str) -> Result<Vec<Arc<TablePlan>>, PgError> {
    let mut plans = Vec::with_capacity(catalog.tables.len());
    let mut keyless = Vec::new();
    for table in &catalog.tables {
        let mut columns = Vec::new();
        for column in table.copied_columns() {
            let pg_type = catalog.types.classify(column.type_oid).map_err(|refused| {
                PgError::Unsupported {
                    server: server.to_owned(),
                    table: table.display_name(),
                    column: column.name.clone(),
                    reason: refused.to_string(),
                }
            })?;
            columns.push(ValueColumn {
                name: column.name.clone(),
                pg_type,
            });
        }
        let key_columns: Vec<usize> = table
            .primary_key
            .iter()
            .filter_map(|name| columns.iter().position(|column| &column.name == name))
            .collect();
        if key_columns.is_empty() {
            keyless.push(table.display_name());
        }
        plans.push(Arc::new(TablePlan {
            key_prefix: row_key_prefix(&table.schema, &table.name),
            table: table.clone(),
            columns,
            key_columns,
        }));
    }
    if !keyless.is_empty() {
        warn!(
            tables = %keyless.join(", "),
            "tables without a primary key are carried, their rows keyed by where they were read; a live migration will refuse them (give each a primary key or REPLICA IDENTITY FULL)"
        );
    }
    Ok(plans)
}

fn chunks(plans: &[Arc<TablePlan>]) -> VecDeque<Chunk> {
    let mut chunks = VecDeque::new();
    // Largest tables first, so the last chunk to finish is a small one.
    let mut ordered: Vec<&Arc<TablePlan>> = plans.iter().collect();
    ordered.sort_by_key(|plan| std::cmp::Reverse(plan.table.pages));
    for plan in ordered {
        if plan.table.pages <= CHUNK_PAGES {
            chunks.push_back(Chunk {
                table: plan.clone(),
                pages: None,
            });
            continue;
        }
        let mut from = 0;
        while from + CHUNK_PAGES < plan.table.pages {
            chunks.push_back(Chunk {
                table: plan.clone(),
                pages: Some((from, Some(from + CHUNK_PAGES))),
            });
            from += CHUNK_PAGES;
        }
        // The last part is open-ended: the size was read outside the
        // snapshot, and the table may have grown since.
        chunks.push_back(Chunk {
            table: plan.clone(),
            pages: Some((from, None)),
        });
    }
    chunks
}

/// An op of the extract, numbered later.
pub(super) fn op(
    kind: &'static str,
    key: String,
    method: &'static str,
    body: Vec<u8>,
    position: u64,
    version: &Bytes,
) -> Op {
    Op {
        seq: 0,
        position,
        txn: 0,
        txn_last: true,
        kind: Bytes::from_static(kind.as_bytes()),
        key: Bytes::from(key.into_bytes()),
        method: Bytes::from_static(method.as_bytes()),
        body: Bytes::from(body),
        content_type: Bytes::from_static(b"application/json"),
        platform_version: version.clone(),
        deps: Vec::new(),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Ops of the snapshot at `position`, made one by one.
struct SnapshotOps<'a> {
    ops: Vec<Op>,
    position: u64,
    version: &'a Bytes,
}

impl SnapshotOps<'_> {
    fn push<T: serde::Serialize>(
        &mut self,
        kind: &'static str,
        key: String,
        method: &'static str,
        body: &T,
    ) {
        self.ops.push(op(
            kind,
            key,
            method,
            json(body),
            self.position,
            self.version,
        ));
    }
}

/// The ops that come before any row.
fn schema_ops(catalog: &Catalog, position: u64, version: &Bytes) -> Vec<Op> {
    let mut ops = SnapshotOps {
        ops: Vec::new(),
        position,
        version,
    };
    for extension in &catalog.extensions {
        ops.push(
            KIND_EXTENSION,
            format!("extension/{}", extension.name),
            "CREATE",
            extension,
        );
    }
    for enum_type in &catalog.enums {
        let key = format!("type/{}.{}", enum_type.schema, enum_type.name);
        ops.push(KIND_TYPE, key, "CREATE", enum_type);
    }
    for sequence in catalog
        .sequences
        .iter()
        .filter(|sequence| !sequence.identity)
    {
        let key = format!("sequence/{}.{}", sequence.schema, sequence.name);
        ops.push(KIND_SEQUENCE, key, "CREATE", sequence);
    }
    for table in &catalog.tables {
        ops.push(
            KIND_TABLE,
            format!("table/{}", table.display_name()),
            "CREATE",
            table,
        );
    }
    ops.ops
}

/// The ops that come after every row.
fn closing_ops(
    catalog: &Catalog,
    values: &[SequenceValue],
    position: u64,
    version: &Bytes,
) -> Vec<Op> {
    let mut ops = SnapshotOps {
        ops: Vec::new(),
        position,
        version,
    };
    for index in &catalog.indexes {
        ops.push(
            KIND_INDEX,
            format!("index/{}.{}", index.schema, index.name),
            "CREATE",
            index,
        );
    }
    for constraint in &catalog.constraints {
        let key = format!(
            "constraint/{}.{}.{}",
            constraint.schema, constraint.table, constraint.name
        );
        ops.push(KIND_CONSTRAINT, key, "ADD", constraint);
    }
    for value in values {
        ops.ops.push(setval_op(value, position, version));
    }
    ops.ops
}

/// The op that sets a sequence where `value` says: the extract's closing
/// ops and the live fence's copy (see `follow.rs`) are this one format.
pub(super) fn setval_op(value: &SequenceValue, position: u64, version: &Bytes) -> Op {
    op(
        KIND_SEQUENCE,
        format!("sequence/{}.{}", value.schema, value.name),
        "SETVAL",
        json(value),
        position,
        version,
    )
}

/// Percent-encodes `%` and `/` so a key's parts stay apart.
pub(super) fn push_key_part(key: &mut String, text: &[u8]) {
    for char in String::from_utf8_lossy(text).chars() {
        match char {
            '%' => key.push_str("%25"),
            '/' => key.push_str("%2F"),
            _ => key.push(char),
        }
    }
}

/// `schema.table/`, each name with `%`, `.` and `/` percent-encoded, so
/// [`super::sink::row_table`] reads the names back whatever they hold.
pub(crate) fn row_key_prefix(schema: &str, table: &str) -> String {
    let mut prefix = String::new();
    for (index, name) in [schema, table].into_iter().enumerate() {
        if index > 0 {
            prefix.push('.');
        }
        for char in name.chars() {
            match char {
                '%' => prefix.push_str("%25"),
                '.' => prefix.push_str("%2E"),
                '/' => prefix.push_str("%2F"),
                _ => prefix.push(char),
            }
        }
    }
    prefix.push('/');
    prefix
}

/// An empty vector as one of another lifetime, its allocation kept (an
/// in-place collect).
fn recycle<'a, 'b>(empty: Vec<CopyField<'a>>) -> Vec<CopyField<'b>> {
    debug_assert!(empty.is_empty());
    empty
        .into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
}

/// Turns one table's COPY lines into row ops.
pub(super) struct RowOps {
    decoder: RowDecoder,
    plan: Arc<TablePlan>,
    fields: Vec<CopyField<'static>>,
    scratch: Vec<u8>,
    position: u64,
    version: Bytes,
    server: String,
}

impl RowOps {
    pub(super) fn new(plan: Arc<TablePlan>, position: u64, version: Bytes, server: String) -> Self {
        Self {
            decoder: RowDecoder::new(plan.columns.iter().cloned()),
            plan,
            fields: Vec::new(),
            scratch: Vec::new(),
            position,
            version,
            server,
        }
    }

    pub(super) fn op(&mut self, line: &[u8]) -> Result<Op, PgError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let mut key = self.plan.key_prefix.clone();
        let row = if self.plan.key_columns.is_empty() {
            // The ctid, selected last, keys the row and is no column.
            let split = line.iter().rposition(|byte| *byte == b'\t').unwrap_or(0);
            key.push('@');
            key.push_str(&String::from_utf8_lossy(&line[split + 1..]));
            &line[..split]
        } else {
            // The fields up to the last key column, in a vector kept from
            // row to row (empty between rows: it holds no old line).
            let last = self.plan.key_columns.iter().max().copied().unwrap_or(0);
            let mut fields: Vec<CopyField<'_>> = recycle(std::mem::take(&mut self.fields));
            fields.extend(split_line(line).take(last + 1));
            let mut broken = false;
            for (index, column) in self.plan.key_columns.iter().enumerate() {
                if index > 0 {
                    key.push('/');
                }
                match fields
                    .get(*column)
                    .map(|field| field.unescape(&mut self.scratch))
                {
                    Some(Ok(text)) => push_key_part(&mut key, text),
                    Some(Err(_)) => broken = true,
                    None => {}
                }
            }
            fields.clear();
            self.fields = recycle(fields);
            if broken {
                return Err(self.bad_row(&key, "a field ends in a lone backslash".to_owned()));
            }
            line
        };
        let mut body = Vec::with_capacity(row.len() + row.len() / 2);
        self.decoder
            .decode_line(row, &mut body)
            .map_err(|error| self.bad_row(&key, error.to_string()))?;
        Ok(op(
            KIND_ROW,
            key,
            "INSERT",
            body,
            self.position,
            &self.version,
        ))
    }

    fn bad_row(&self, key: &str, reason: String) -> PgError {
        PgError::BadRow {
            server: self.server.clone(),
            table: self.plan.table.display_name(),
            place: key.to_owned(),
            reason,
        }
    }
}

/// What every copy worker shares.
#[derive(Clone)]
struct CopyWork {
    queue: Arc<Mutex<VecDeque<Chunk>>>,
    sender: mpsc::Sender<Result<Vec<Op>>>,
    position: u64,
    version: Bytes,
    server: String,
    progress: Arc<Progress>,
    row_format: RowFormat,
}

/// The ops of one chunk's COPY lines, in the extract's row format.
enum ChunkOps {
    Json(RowOps),
    Copy(RowRuns),
}

impl ChunkOps {
    fn new(chunk: &Chunk, work: &CopyWork) -> Self {
        let (position, version) = (work.position, work.version.clone());
        match work.row_format {
            RowFormat::Json => Self::Json(RowOps::new(
                chunk.table.clone(),
                position,
                version,
                work.server.clone(),
            )),
            RowFormat::Copy => Self::Copy(RowRuns::new(chunk, position, version)),
        }
    }

    /// The op `line` makes or completes, if any.
    fn push(&mut self, line: &[u8]) -> Result<Option<Op>, PgError> {
        match self {
            Self::Json(rows) => rows.op(line).map(Some),
            Self::Copy(runs) => Ok(runs.push(line)),
        }
    }

    /// The op of the lines not yet in one, if any.
    fn finish(&mut self) -> Option<Op> {
        match self {
            Self::Json(_) => None,
            Self::Copy(runs) => runs.take(),
        }
    }
}

/// Turns one chunk's COPY lines into `pg.rows` ops of about
/// [`ROWS_OP_BYTES`] each, the lines untouched.
struct RowRuns {
    /// The columns' names as a COPY text line: every op's first line.
    header: Vec<u8>,
    /// `schema.table/#<first page>.`: the ops' keys, numbered after it.
    key_base: String,
    next: u64,
    body: Vec<u8>,
    position: u64,
    version: Bytes,
}

impl RowRuns {
    fn new(chunk: &Chunk, position: u64, version: Bytes) -> Self {
        let plan = &chunk.table;
        let header = names_line(plan.columns.iter().map(|column| column.name.as_str()));
        let first_page = chunk.pages.map_or(0, |(from, _)| from);
        Self {
            header,
            key_base: format!("{}#{first_page}.", plan.key_prefix),
            next: 0,
            body: Vec::new(),
            position,
            version,
        }
    }

    fn push(&mut self, line: &[u8]) -> Option<Op> {
        if self.body.is_empty() {
            self.body.reserve(ROWS_OP_BYTES + ROWS_OP_BYTES / 4);
            self.body.extend_from_slice(&self.header);
        }
        self.body.extend_from_slice(line);
        if !line.ends_with(b"\n") {
            self.body.push(b'\n');
        }
        (self.body.len() >= ROWS_OP_BYTES)
            .then(|| self.take())
            .flatten()
    }

    fn take(&mut self) -> Option<Op> {
        if self.body.is_empty() {
            return None;
        }
        self.next += 1;
        let mut op = op(
            KIND_ROWS,
            format!("{}{}", self.key_base, self.next),
            "COPY",
            std::mem::take(&mut self.body),
            self.position,
            &self.version,
        );
        op.content_type = Bytes::from_static(COPY_TEXT.as_bytes());
        Some(op)
    }
}

/// Copies chunks from the queue until it is empty, sending batches of row
/// ops, or the error that stopped it.
async fn copy_worker(client: Client, work: CopyWork) {
    if let Err(error) = copy_chunks(client, &work).await {
        let _ = work.sender.send(Err(source_error(error))).await;
    }
}

async fn copy_chunks(client: Client, work: &CopyWork) -> Result<(), PgError> {
    let CopyWork {
        queue,
        sender,
        server,
        progress,
        row_format,
        ..
    } = work;
    while let Some(chunk) = next_chunk(queue) {
        let statement = chunk.table.copy_statement(chunk.pages, *row_format);
        let what = || format!("copying {}", chunk.table.table.display_name());
        let stream = client
            .copy_out(statement.as_str())
            .await
            .map_err(|error| PgError::statement(server, what(), &error))?;
        let mut stream = std::pin::pin!(stream);
        let mut rows = ChunkOps::new(&chunk, work);
        let mut batch = Vec::with_capacity(BATCH_OPS);
        let mut batch_bytes = 0;
        while let Some(line) = stream.next().await {
            let line = line.map_err(|error| PgError::statement(server, what(), &error))?;
            Progress::add(&progress.bytes_read, line.len() as u64);
            let Some(op) = rows.push(&line)? else {
                continue;
            };
            batch_bytes += op.body.len();
            batch.push(op);
            if batch.len() >= BATCH_OPS || batch_bytes >= BATCH_BYTES {
                batch_bytes = 0;
                // The next batch made at its size, not grown by doubling
                // (each growth a fresh allocation the kernel zeroes).
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_OPS));
                if sender.send(Ok(full)).await.is_err() {
                    // The reader went away: the extract stops.
                    return Ok(());
                }
            }
        }
        batch.extend(rows.finish());
        if !batch.is_empty() && sender.send(Ok(batch)).await.is_err() {
            return Ok(());
        }
    }
    // Read only: nothing to keep.
    let _ = client.batch_execute("COMMIT").await;
    Ok(())
}

fn next_chunk(queue: &Mutex<VecDeque<Chunk>>) -> Option<Chunk> {
    queue.lock().ok()?.pop_front()
}

/// Everything the stream of a started extract needs.
struct Started {
    /// The slot `--keep-slot` keeps, dropped again if the extract fails.
    kept_slot: Option<(PgConnection, String)>,
    catalog: Catalog,
    plans: Vec<Arc<TablePlan>>,
    sequence_values: Vec<SequenceValue>,
    workers: Vec<Client>,
    position: u64,
    version: Bytes,
    server: String,
    row_format: RowFormat,
}

impl PgSource {
    /// Steps 1 to 3 of the module's list.
    async fn start(&self) -> Result<(Started, ServerFacts), PgError> {
        let server = self.connection.server();
        let leader = self.connection.connect().await?;
        let facts = preflight(&leader, &self.connection).await?;
        let replication = ReplicationConnection::connect(&self.connection.replication_config())
            .await
            .map_err(|error| PgError::replication("connecting for replication", error))?;
        let (slot, persistence) = match &self.options.keep_slot {
            Some(name) => {
                let replication =
                    drop_leftover_slot(&leader, replication, name, &self.connection).await?;
                ((name.clone(), replication), SlotPersistence::Persistent)
            }
            None => (
                (format!("ferry_{:016x}", rand::random::<u64>()), replication),
                SlotPersistence::Temporary,
            ),
        };
        let (slot_name, replication) = slot;
        let exported: ExportedSnapshot = replication
            .create_slot_exporting_snapshot(&slot_name, PGOUTPUT, persistence)
            .await
            .map_err(|error| {
                PgError::replication("creating the extract's replication slot", error)
            })?;
        let position = exported.slot().consistent_point.0;
        let snapshot = exported.snapshot_name().to_owned();
        let read = async {
            import_snapshot(&leader, &server, &snapshot).await?;
            let selection = Selection {
                schemas: self.options.schemas.clone(),
                tables: self.options.tables.clone(),
            };
            let catalog = catalog::read(&leader, &server, &selection).await?;
            let plans = plan_tables(&catalog, &server)?;
            let sequence_values =
                catalog::sequence_values(&leader, &server, &catalog.sequences).await?;
            Ok::<_, PgError>((catalog, plans, sequence_values))
        };
        let (catalog, plans, sequence_values) = match read.await {
            Ok(read) => read,
            Err(error) => {
                // A kept slot must not outlive an extract that failed.
                drop(exported);
                if persistence == SlotPersistence::Persistent {
                    drop_kept_slot(&self.connection, &slot_name).await;
                }
                return Err(error);
            }
        };
        let mut workers = vec![leader];
        let wanted = self
            .options
            .parallel
            .max(1)
            .min(chunks(&plans).len().max(1));
        while workers.len() < wanted {
            let joined = async {
                let worker = self.connection.connect().await?;
                import_snapshot(&worker, &server, &snapshot).await?;
                Ok::<_, PgError>(worker)
            };
            match joined.await {
                Ok(worker) => workers.push(worker),
                Err(error) => {
                    drop(exported);
                    if persistence == SlotPersistence::Persistent {
                        drop_kept_slot(&self.connection, &slot_name).await;
                    }
                    return Err(error);
                }
            }
        }
        // Every worker holds the snapshot now: the replication connection
        // may let it go. A temporary slot goes with the connection.
        let replication = exported.into_connection();
        match persistence {
            SlotPersistence::Persistent => {
                let _ = replication.close().await;
                info!(slot = %slot_name, position = %super::replication::Lsn(position), "the replication slot is kept for a live migration from the backup's position");
            }
            SlotPersistence::Temporary => drop(replication),
        }
        let version = Bytes::from(facts.version.clone().into_bytes());
        Ok((
            Started {
                kept_slot: (persistence == SlotPersistence::Persistent)
                    .then(|| (self.connection.clone(), slot_name.clone())),
                catalog,
                plans,
                sequence_values,
                workers,
                position,
                version,
                server,
                row_format: self.options.row_format,
            },
            facts,
        ))
    }
}

/// Drops the slot `--keep-slot` made for an extract that failed, waiting
/// for the connection that made it to let it go. A failure here is logged:
/// the extract's own error is what the user must see.
pub(crate) async fn drop_kept_slot(connection: &PgConnection, name: &str) {
    let dropped = async {
        let mut replication =
            ReplicationConnection::connect(&connection.replication_config()).await?;
        replication.drop_slot(name, WhenActive::Wait).await?;
        replication.close().await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(30), dropped).await {
        Ok(Ok(())) => info!(
            slot = name,
            "the extract failed: its kept replication slot is dropped"
        ),
        Ok(Err(error)) => {
            warn!(slot = name, %error, "the extract failed, and its kept replication slot could not be dropped: drop it with SELECT pg_drop_replication_slot(...)")
        }
        Err(_) => warn!(
            slot = name,
            "the extract failed, and its kept replication slot was still in use after 30 s: drop it with SELECT pg_drop_replication_slot(...)"
        ),
    }
}

/// A slot named for `--keep-slot` that is there already and not in use is
/// what a killed extract left: it is dropped (it holds WAL back for
/// nothing). One in use is an error.
async fn drop_leftover_slot(
    client: &Client,
    mut replication: ReplicationConnection,
    name: &str,
    connection: &PgConnection,
) -> Result<ReplicationConnection, PgError> {
    let server = connection.server();
    let row = client
        .query_opt(
            "SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .map_err(|error| PgError::statement(&server, "looking for the slot to keep", &error))?;
    match row.map(|row| row.get::<_, bool>(0)) {
        None => Ok(replication),
        Some(true) => Err(PgError::Precondition {
            server,
            reason: format!(
                "replication slot {name} exists and is in use; --keep-slot must name a slot of ferry's own (a new name, or stop what uses it)"
            ),
        }),
        Some(false) => {
            warn!(
                slot = name,
                "dropping the unused replication slot left by an earlier extract, to take it again"
            );
            replication
                .drop_slot(name, WhenActive::Fail)
                .await
                .map_err(|error| {
                    PgError::replication("dropping the slot an earlier extract left", error)
                })?;
            Ok(replication)
        }
    }
}

#[async_trait]
impl Source for PgSource {
    async fn open(self: Box<Self>, progress: Arc<Progress>) -> Result<Extraction> {
        let (extraction, _) = self.open_extraction(progress).await?;
        Ok(extraction)
    }
}

/// What a follower of an extract's slot needs of it: the tables read, as
/// the snapshot saw them, and the server's version (the ops' platform
/// version).
pub(super) struct Snapshotted {
    pub(super) plans: Vec<Arc<TablePlan>>,
    pub(super) version: Bytes,
}

impl PgSource {
    /// The extract, and what following its slot afterwards needs.
    pub(super) async fn open_extraction(
        &self,
        progress: Arc<Progress>,
    ) -> Result<(Extraction, Snapshotted)> {
        let (started, facts) = self.start().await.map_err(source_error)?;
        let info = SourceInfo {
            platform: "postgres".to_owned(),
            platform_version: Some(facts.version.clone()),
            identity: Some(format!("{}/{}", facts.system_id, self.connection.dbname)),
            snapshot_position: Some(started.position),
            key_prefix: None,
            description: Some(format!(
                "PostgreSQL {} database {} at LSN {} (timeline {})",
                facts.version,
                self.connection.dbname,
                super::replication::Lsn(started.position),
                facts.timeline
            )),
        };
        let snapshotted = Snapshotted {
            plans: started.plans.clone(),
            version: started.version.clone(),
        };
        let total_pages: u64 = started.plans.iter().map(|plan| plan.table.pages).sum();
        Progress::set(&progress.bytes_read_total, total_pages * 8192);
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(produce(started, sender, progress));
        let ops = tokio_stream::wrappers::ReceiverStream::new(receiver).boxed();
        Ok((Extraction { info, ops }, snapshotted))
    }
}

/// Numbers ops from 1 as they go out.
struct Numbering {
    next: u64,
}

impl Numbering {
    fn number(&mut self, mut ops: Vec<Op>) -> Vec<Op> {
        for op in &mut ops {
            op.seq = self.next;
            self.next += 1;
        }
        ops
    }
}

/// Step 4: sends every op, numbered, then ends the stream (or sends the
/// first error and ends it).
async fn produce(
    mut started: Started,
    sender: mpsc::Sender<Result<Vec<Op>>>,
    progress: Arc<Progress>,
) {
    let kept_slot = started.kept_slot.take();
    if !produce_ops(started, sender, progress).await
        && let Some((connection, name)) = kept_slot
    {
        drop_kept_slot(&connection, &name).await;
    }
}

/// Sends every op; false when the stream ended early (an error, or the
/// reader went away).
async fn produce_ops(
    started: Started,
    sender: mpsc::Sender<Result<Vec<Op>>>,
    progress: Arc<Progress>,
) -> bool {
    let Started {
        kept_slot: _,
        catalog,
        plans,
        sequence_values,
        workers,
        position,
        version,
        server,
        row_format,
    } = started;
    let mut numbering = Numbering { next: 1 };
    let send_all = |ops: Vec<Op>| {
        ops.chunks(BATCH_OPS)
            .map(<[Op]>::to_vec)
            .collect::<Vec<_>>()
    };
    for batch in send_all(schema_ops(&catalog, position, &version)) {
        if sender.send(Ok(numbering.number(batch))).await.is_err() {
            return false;
        }
    }
    let queue = Arc::new(Mutex::new(chunks(&plans)));
    let (rows, mut row_batches) = mpsc::channel(2 * workers.len().max(1));
    let mut tasks = tokio::task::JoinSet::new();
    let work = CopyWork {
        queue,
        sender: rows,
        position,
        version: version.clone(),
        server: server.clone(),
        progress,
        row_format,
    };
    for worker in workers {
        tasks.spawn(copy_worker(worker, work.clone()));
    }
    drop(work);
    while let Some(batch) = row_batches.recv().await {
        let failed = batch.is_err();
        if sender
            .send(batch.map(|ops| numbering.number(ops)))
            .await
            .is_err()
            || failed
        {
            // The first error ends the stream; the other workers stop.
            tasks.abort_all();
            return false;
        }
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = joined {
            let died = PgError::Unreachable {
                server: server.clone(),
                reason: format!("a copy worker died: {error}"),
            };
            let _ = sender.send(Err(source_error(died))).await;
            return false;
        }
    }
    for batch in send_all(closing_ops(&catalog, &sequence_values, position, &version)) {
        if sender.send(Ok(numbering.number(batch))).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parts_keep_their_slashes_apart() {
        let mut key = "public.runs/".to_owned();
        push_key_part(&mut key, b"Hello/Flow");
        key.push('/');
        push_key_part(&mut key, b"100%");
        assert_eq!(key, "public.runs/Hello%2FFlow/100%25");
        let prefix = row_key_prefix("my.schema", "odd/name%");
        assert_eq!(prefix, "my%2Eschema.odd%2Fname%25/");
        assert_eq!(
            super::super::sink::row_table(format!("{prefix}1").as_bytes()),
            Some(("my.schema".to_owned(), "odd/name%".to_owned()))
        );
    }
}

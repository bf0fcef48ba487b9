//! Restore: ops into a PostgreSQL database, each exactly once.
//!
//! [`PgTarget`] is a [`TransactionalTarget`] under the shared
//! [`SinkDriver`]: the driver owns seq order, transaction grouping, resume
//! and the epoch (G1, G3-G5); the target runs one transaction at a time on
//! one connection. Rows of one table that follow each other go into one
//! `COPY ... FROM STDIN`, fed as they arrive; any other op (a table, an
//! index) or the commit ends it. A commit writes the stream's checkpoint
//! row in `ferry.streams` in the same transaction, after checking, under a
//! lock, that no later migration attempt took the target (`ferry.target`),
//! so a kill at any moment leaves every op in or out with its checkpoint.
//!
//! Schemas are created as the ops need them. Triggers do not fire: the
//! backup carries none, and constraints (foreign keys included) come after
//! the rows, as `pg_restore` adds them.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::SinkExt;
use tokio_postgres::{Client, CopyInSink};

use super::catalog::{Column, EnumType, Extension, Sequence, SequenceValue, Table};
use super::value::{Column as ValueColumn, RowEncoder, TypeCatalog, TypeRow, names_line};
use super::{
    FERRY_SCHEMA, KIND_CONSTRAINT, KIND_EXTENSION, KIND_INDEX, KIND_ROW, KIND_ROWS, KIND_SEQUENCE,
    KIND_TABLE, KIND_TYPE, PgConnection, PgError, qualified, quote_ident, quote_literal,
};
use crate::adapters::driver::TransactionalTarget;
use crate::adapters::live::{Applied, Position, StoredStream};
use crate::adapters::{AdapterError, StreamInfo};
use crate::{Op, Result};

/// Bytes of COPY data sent to the server at once.
const COPY_CHUNK: usize = 256 * 1024;

/// A table's parked rows that make a copy of their own: a backup holds the
/// tables' rows interleaved (the extract's workers write side by side), and
/// a copy ended and another started is a stop for both sides, so a table's
/// rows wait (encoded) until there are this many bytes of them.
const PARK_SWITCH: usize = 4 * 1024 * 1024;

/// Bytes of parked rows, all tables together, at most: past it the table
/// with the most waiting gets the copy.
const PARK_LIMIT: usize = 16 * 1024 * 1024;

/// How a restore writes.
#[derive(Debug, Clone)]
pub struct PgSinkOptions {
    /// Write even when the target holds tables.
    pub allow_nonempty: bool,
    /// Ops per target transaction.
    pub ops_per_commit: usize,
    /// The migration attempt (G5); 0 for a restore.
    pub epoch: u64,
    /// Connections loading at once, each on its own tables with its own
    /// checkpoint row (a lane).
    pub lanes: usize,
}

/// The rows of one table being copied in.
struct OpenCopy {
    table: (String, String),
    /// The row keys' start that names the table (`schema.table/`): a row
    /// with the same start goes into this copy without parsing its key.
    key_prefix: Vec<u8>,
    /// The table's codec, out of [`PgTarget::codecs`] while the copy runs.
    codec: TableCodec,
    sink: Pin<Box<CopyInSink<Bytes>>>,
    buffer: Vec<u8>,
    seqs: LineSeqs,
}

/// The seqs of a copy's lines, as runs `(first seq, ops, lines each op)`:
/// a lane's rows of one table need not have consecutive seqs, and a
/// `pg.rows` op is many lines.
#[derive(Debug, Default)]
struct LineSeqs(Vec<(u64, u64, u64)>);

impl LineSeqs {
    /// Counts `lines` lines of op `seq`.
    fn push(&mut self, seq: u64, lines: u64) {
        if lines == 0 {
            return;
        }
        match self.0.last_mut() {
            Some((first, ops, 1)) if lines == 1 && *first + *ops == seq => *ops += 1,
            _ => self.0.push((seq, 1, lines)),
        }
    }

    /// The seq of the op of line `line` (from 1, as COPY counts).
    fn of_line(&self, line: u64) -> Option<u64> {
        let mut before = 0;
        for (first, ops, each) in &self.0 {
            let span = ops * each;
            if line > before && line <= before + span {
                return Some(first + (line - before - 1) / each);
            }
            before += span;
        }
        None
    }
}

/// The rows an insert op brings, as a copy takes them.
enum RowData<'a> {
    /// A `pg.row`: one row, a JSON object, encoded on the way in.
    Json(&'a [u8]),
    /// A `pg.rows`: COPY text lines, forwarded, with the line naming their
    /// columns that came first in the op.
    Copy { header: &'a [u8], lines: &'a [u8] },
}

impl<'a> RowData<'a> {
    fn of(op: &'a Op) -> std::result::Result<Self, String> {
        if op.kind.as_ref() != KIND_ROWS.as_bytes() {
            return Ok(Self::Json(&op.body));
        }
        let body = op.body.as_ref();
        let split = memchr::memchr(b'\n', body)
            .ok_or_else(|| "a pg.rows op starts with a line naming its columns".to_owned())?;
        let (header, lines) = body.split_at(split + 1);
        if !lines.is_empty() && !lines.ends_with(b"\n") {
            return Err("its last row does not end its line: the op was cut".to_owned());
        }
        // COPY's end-of-data line would end the copy there, the rows after
        // it dropped without a word: the server never prints it as a row.
        if lines.starts_with(b"\\.\n") || memchr::memmem::find(lines, b"\n\\.\n").is_some() {
            return Err(
                "it holds COPY's end-of-data line (\\.), which no server prints as a row"
                    .to_owned(),
            );
        }
        Ok(Self::Copy { header, lines })
    }

    /// Writes the rows into `buffer` as `codec`'s copy takes them; the
    /// number of lines written.
    fn write(
        &self,
        codec: &mut TableCodec,
        buffer: &mut Vec<u8>,
    ) -> std::result::Result<u64, String> {
        match self {
            Self::Json(body) => {
                codec
                    .encoder
                    .encode_row(body, buffer)
                    .map_err(|error| error.to_string())?;
                Ok(1)
            }
            Self::Copy { header, lines } => {
                if *header != codec.header.as_slice() {
                    return Err(format!(
                        "its rows are the columns {} and the target table's are {}: restore into a table of the source's columns, in its order",
                        show_header(header),
                        show_header(&codec.header)
                    ));
                }
                buffer.extend_from_slice(lines);
                Ok(memchr::memchr_iter(b'\n', lines).count() as u64)
            }
        }
    }
}

/// A header line, for a message: `(a, b, c)`.
fn show_header(header: &[u8]) -> String {
    let text = String::from_utf8_lossy(header.strip_suffix(b"\n").unwrap_or(header));
    format!("({})", text.replace('\t', ", "))
}

/// The rows in a `pg.rows` op: its lines but the first.
pub(super) fn rows_in(op: &Op) -> usize {
    memchr::memchr_iter(b'\n', &op.body)
        .count()
        .saturating_sub(1)
}

/// Rows of a table other than the open copy's, encoded, waiting for a copy
/// of their own (a connection has one copy open at a time). Only rows of
/// no source transaction wait: they go in together at the next commit
/// anyway, while a transaction's rows keep their order.
struct Parked {
    table: (String, String),
    buffer: Vec<u8>,
    seqs: LineSeqs,
}

impl OpenCopy {
    /// The buffered lines, to send.
    fn take_chunk(&mut self) -> Bytes {
        Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(COPY_CHUNK * 2),
        ))
    }
}

/// How the rows of one target table are written.
struct TableCodec {
    encoder: RowEncoder,
    statement: String,
    /// The copied columns' names as a COPY text line, as a `pg.rows` op of
    /// this table starts.
    header: Vec<u8>,
    /// What an UPDATE or DELETE needs, read at the first.
    change: Option<ChangeShape>,
}

/// What an UPDATE or DELETE of a target table needs: its columns, in the
/// encoder's order, with their types as SQL, and its primary key.
#[derive(Debug, Clone)]
struct ChangeShape {
    /// `"schema"."table"`.
    table: String,
    /// Each column's name (quoted) and type (`format_type`).
    columns: Vec<(String, String)>,
    /// The primary key's columns in key order, as indexes into `columns`.
    key: Vec<usize>,
}

/// One PostgreSQL database under the [`SinkDriver`].
pub struct PgTarget {
    connection: PgConnection,
    options: PgSinkOptions,
    server: String,
    client: Option<Client>,
    stream_id: String,
    copy: Option<OpenCopy>,
    /// Parked rows by their keys' table prefix (`schema.table/`).
    parked: HashMap<Vec<u8>, Parked>,
    /// Bytes in `parked`.
    parked_bytes: usize,
    codecs: HashMap<(String, String), TableCodec>,
    types: Option<TypeCatalog>,
    schemas: HashSet<String>,
    /// Prepared UPDATE and DELETE statements, by their SQL.
    statements: HashMap<String, tokio_postgres::Statement>,
}

impl PgTarget {
    pub(crate) fn new(connection: PgConnection, options: PgSinkOptions) -> Self {
        Self {
            server: connection.server(),
            connection,
            options,
            client: None,
            stream_id: String::new(),
            copy: None,
            parked: HashMap::new(),
            parked_bytes: 0,
            codecs: HashMap::new(),
            types: None,
            schemas: HashSet::new(),
            statements: HashMap::new(),
        }
    }

    fn error(&self, error: PgError) -> crate::Error {
        AdapterError::target(error).into()
    }

    fn client(&self) -> Result<&Client> {
        self.client.as_ref().ok_or_else(|| {
            self.error(PgError::Unreachable {
                server: self.server.clone(),
                reason: "the restore's connection is not open".to_owned(),
            })
        })
    }

    async fn execute(&self, sql: &str, what: impl Into<String>) -> Result<()> {
        self.client()?
            .batch_execute(sql)
            .await
            .map_err(|error| self.error(PgError::statement(&self.server, what, &error)))
    }

    fn bad_op(&self, op: &Op, reason: String) -> crate::Error {
        self.error(PgError::BadOp {
            server: self.server.clone(),
            seq: op.seq,
            key: String::from_utf8_lossy(&op.key).into_owned(),
            reason,
        })
    }

    /// The table row `op`'s key names.
    fn table_of(&self, op: &Op) -> Result<(String, String)> {
        row_table(&op.key)
            .ok_or_else(|| self.bad_op(op, "a row's key must be SCHEMA.TABLE/KEY".to_owned()))
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, op: &Op) -> Result<T> {
        serde_json::from_slice(&op.body).map_err(|error| {
            self.bad_op(
                op,
                format!(
                    "its body is not a {} {}: {error}",
                    String::from_utf8_lossy(&op.kind),
                    String::from_utf8_lossy(&op.method)
                ),
            )
        })
    }

    /// Runs `sql` for `op`, its failure naming the op.
    async fn run_for(&self, op: &Op, sql: &str) -> Result<()> {
        self.execute(sql, op_label(op)).await
    }

    async fn ensure_schema(&mut self, op: &Op, schema: &str) -> Result<()> {
        if self.schemas.contains(schema) {
            return Ok(());
        }
        self.run_for(
            op,
            &format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema)),
        )
        .await?;
        self.schemas.insert(schema.to_owned());
        Ok(())
    }

    /// Ends the open COPY, if any; its failure names the op of the line the
    /// server complained about.
    async fn end_copy(&mut self) -> Result<()> {
        let Some(mut copy) = self.copy.take() else {
            return Ok(());
        };
        let sent = async {
            if !copy.buffer.is_empty() {
                let chunk = copy.take_chunk();
                copy.sink.send(chunk).await?;
            }
            copy.sink.as_mut().finish().await
        }
        .await;
        let failed_seq = sent
            .as_ref()
            .err()
            .and_then(copy_line)
            .and_then(|line| copy.seqs.of_line(line));
        self.codecs.insert(copy.table.clone(), copy.codec);
        match sent {
            Ok(_) => Ok(()),
            Err(error) => {
                let mut reason = super::describe_error(&error);
                if let Some(seq) = failed_seq {
                    reason = format!("op seq {seq}: {reason}");
                }
                Err(self.error(PgError::Statement {
                    server: self.server.clone(),
                    what: format!("copying rows into {}.{}", copy.table.0, copy.table.1),
                    code: error.code().map(|code| code.code().to_owned()),
                    reason,
                }))
            }
        }
    }

    /// The target's `pg_type`, read once.
    async fn types(&mut self) -> Result<&TypeCatalog> {
        if self.types.is_none() {
            let rows = self
                .client()?
                .query(
                    "SELECT oid, typname, typtype, typcategory, typelem, typbasetype, typdelim FROM pg_catalog.pg_type",
                    &[],
                )
                .await
                .map_err(|error| self.error(PgError::statement(&self.server, "reading pg_type", &error)))?;
            let mut types = TypeCatalog::new();
            for row in rows {
                types.insert(TypeRow {
                    oid: row.get(0),
                    name: row.get(1),
                    kind: row.get::<_, i8>(2) as u8,
                    category: row.get::<_, i8>(3) as u8,
                    element_oid: row.get(4),
                    base_oid: row.get(5),
                    delimiter: row.get::<_, i8>(6) as u8,
                });
            }
            self.types = Some(types);
        }
        Ok(self.types.as_ref().expect("read above"))
    }

    /// How rows of `table` are written, from the target's own catalog (so a
    /// resumed restore, or one through a version chain, writes what the
    /// target table has).
    async fn codec(&mut self, op: &Op, table: &(String, String)) -> Result<&mut TableCodec> {
        if !self.codecs.contains_key(table) {
            let rows = self
                .client()?
                .query(
                    "SELECT a.attname, a.atttypid FROM pg_catalog.pg_attribute a \
                     WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                     ORDER BY a.attnum",
                    &[&qualified(&table.0, &table.1)],
                )
                .await
                .map_err(|error| {
                    self.error(PgError::statement(
                        &self.server,
                        format!("op seq {}: reading the columns of {}.{}", op.seq, table.0, table.1),
                        &error,
                    ))
                })?;
            let mut columns = Vec::with_capacity(rows.len());
            for row in rows {
                let name: String = row.get(0);
                let oid: u32 = row.get(1);
                let pg_type = self.types().await?.classify(oid).map_err(|refused| {
                    self.bad_op(
                        op,
                        format!("column {name} of {}.{}: {refused}", table.0, table.1),
                    )
                })?;
                columns.push(ValueColumn { name, pg_type });
            }
            let statement = format!(
                "COPY {} ({}) FROM STDIN",
                qualified(&table.0, &table.1),
                columns
                    .iter()
                    .map(|column| quote_ident(&column.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let header = names_line(columns.iter().map(|column| column.name.as_str()));
            self.codecs.insert(
                table.clone(),
                TableCodec {
                    encoder: RowEncoder::new(columns),
                    statement,
                    header,
                    change: None,
                },
            );
        }
        Ok(self.codecs.get_mut(table).expect("inserted above"))
    }

    async fn apply_row(&mut self, op: &Op) -> Result<()> {
        let data = RowData::of(op).map_err(|reason| self.bad_op(op, reason))?;
        let key_prefix = op
            .key
            .iter()
            .position(|byte| *byte == b'/')
            .map(|slash| &op.key[..=slash])
            .ok_or_else(|| self.bad_op(op, "a row's key must be SCHEMA.TABLE/KEY".to_owned()))?;
        let open_here = self
            .copy
            .as_ref()
            .is_some_and(|copy| copy.key_prefix == key_prefix);
        if !open_here {
            if op.txn == 0 && self.parked.contains_key(key_prefix) {
                return self.park(op, &data, key_prefix).await;
            }
            let table = self.table_of(op)?;
            // A table's columns are read on the connection, which an open
            // copy holds: the first row of a table starts its copy.
            if op.txn == 0
                && self.codecs.contains_key(&table)
                && (self.copy.is_some() || !self.parked.is_empty())
            {
                self.parked.insert(
                    key_prefix.to_vec(),
                    Parked {
                        table,
                        buffer: Vec::new(),
                        seqs: LineSeqs::default(),
                    },
                );
                return self.park(op, &data, key_prefix).await;
            }
            self.end_copies().await?;
            self.codec(op, &table).await?;
            self.start_copy(table, key_prefix, op.seq).await?;
        }
        let copy = self.copy.as_mut().expect("started above");
        match data.write(&mut copy.codec, &mut copy.buffer) {
            Ok(lines) => copy.seqs.push(op.seq, lines),
            Err(error) => {
                let (schema, table) = copy.table.clone();
                return Err(self.bad_op(op, format!("{schema}.{table}: {error}")));
            }
        }
        self.send_chunk().await
    }

    /// Sends the open copy's buffered lines once they make a chunk.
    async fn send_chunk(&mut self) -> Result<()> {
        let Some(copy) = self.copy.as_mut() else {
            return Ok(());
        };
        if copy.buffer.len() >= COPY_CHUNK {
            let chunk = copy.take_chunk();
            if let Err(error) = copy.sink.send(chunk).await {
                // The server refused the copy: its reason comes with the
                // end of it.
                tracing::debug!(error = %super::describe_error(&error), "the copy broke");
                return self.end_copy().await;
            }
        }
        Ok(())
    }

    /// Encodes row `op` into the parked rows under `key_prefix` (a table
    /// whose copy is not open); once they are many, they get the copy.
    async fn park(&mut self, op: &Op, data: &RowData<'_>, key_prefix: &[u8]) -> Result<()> {
        let parked = self
            .parked
            .get_mut(key_prefix)
            .expect("parked by the caller");
        let codec = self
            .codecs
            .get_mut(&parked.table)
            .expect("a table is parked only once its codec is made, and it is not the open copy's");
        let before = parked.buffer.len();
        match data.write(codec, &mut parked.buffer) {
            Ok(lines) => parked.seqs.push(op.seq, lines),
            Err(error) => {
                let (schema, table) = parked.table.clone();
                return Err(self.bad_op(op, format!("{schema}.{table}: {error}")));
            }
        }
        self.parked_bytes += parked.buffer.len() - before;
        if parked.buffer.len() >= PARK_SWITCH || self.parked_bytes >= PARK_LIMIT {
            let fullest = self
                .parked
                .iter()
                .max_by_key(|(_, parked)| parked.buffer.len())
                .map(|(prefix, _)| prefix.clone())
                .expect("a table is parked");
            self.end_copy().await?;
            self.open_parked(&fullest).await?;
        }
        Ok(())
    }

    /// Opens the copy of the parked rows under `key_prefix`, with them.
    async fn open_parked(&mut self, key_prefix: &[u8]) -> Result<()> {
        let parked = self.parked.remove(key_prefix).expect("a parked table");
        self.parked_bytes -= parked.buffer.len();
        let first_seq = parked.seqs.0.first().map_or(0, |(seq, _, _)| *seq);
        self.start_copy(parked.table, key_prefix, first_seq).await?;
        let copy = self.copy.as_mut().expect("started above");
        copy.buffer = parked.buffer;
        copy.seqs = parked.seqs;
        self.send_chunk().await
    }

    /// Ends the open copy, then copies every table's parked rows: all rows
    /// given so far are in.
    async fn end_copies(&mut self) -> Result<()> {
        self.end_copy().await?;
        while let Some(key_prefix) = self.parked.keys().next().cloned() {
            self.open_parked(&key_prefix).await?;
            self.end_copy().await?;
        }
        Ok(())
    }

    /// An UPDATE (the row `op`'s key names, set to what its body gives)
    /// or a DELETE: exactly one row must match, or the target is not what
    /// the stream left it as, and the op is refused.
    async fn apply_change(&mut self, op: &Op) -> Result<()> {
        self.end_copies().await?;
        let table = self.table_of(op)?;
        let key_values = row_key_values(&op.key)
            .ok_or_else(|| self.bad_op(op, "a row's key must be SCHEMA.TABLE/KEY".to_owned()))?;
        self.codec(op, &table).await?;
        if self
            .codecs
            .get(&table)
            .is_some_and(|codec| codec.change.is_none())
        {
            let shape = self.change_shape(op, &table).await?;
            if let Some(codec) = self.codecs.get_mut(&table) {
                codec.change = Some(shape);
            }
        }
        let Some(TableCodec {
            encoder,
            change: Some(shape),
            ..
        }) = self.codecs.get_mut(&table)
        else {
            return Err(self.bad_op(op, "its table's columns were not read".to_owned()));
        };
        let shape = shape.clone();
        if shape.key.is_empty() || key_values.len() != shape.key.len() {
            return Err(self.bad_op(
                op,
                format!(
                    "its key has {} part(s) and {} has a primary key of {} column(s)",
                    key_values.len(),
                    shape.table,
                    shape.key.len()
                ),
            ));
        }
        let update = op.method.as_ref() == b"UPDATE";
        let set = if update {
            encoder
                .text_values(&op.body)
                .map_err(|error| self.bad_op(op, format!("{}: {error}", shape.table)))?
        } else {
            Vec::new()
        };
        let mut sql = if update {
            if set.is_empty() {
                return Ok(());
            }
            let assignments: Vec<String> = set
                .iter()
                .enumerate()
                .map(|(place, (index, _))| {
                    let (name, type_sql) = &shape.columns[*index];
                    format!("{name} = ${}::text::{type_sql}", place + 1)
                })
                .collect();
            format!("UPDATE {} SET {}", shape.table, assignments.join(", "))
        } else {
            format!("DELETE FROM {}", shape.table)
        };
        let conditions: Vec<String> = shape
            .key
            .iter()
            .enumerate()
            .map(|(place, index)| {
                let (name, type_sql) = &shape.columns[*index];
                format!("{name} = ${}::text::{type_sql}", set.len() + place + 1)
            })
            .collect();
        sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
        let mut params: Vec<Option<&str>> = set.iter().map(|(_, text)| text.as_deref()).collect();
        params.extend(key_values.iter().map(|text| Some(text.as_str())));
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|param| param as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let what = || op_label(op);
        let statement = match self.statements.get(&sql) {
            Some(statement) => statement.clone(),
            None => {
                let statement = self.client()?.prepare(&sql).await.map_err(|error| {
                    self.error(PgError::statement(&self.server, what(), &error))
                })?;
                self.statements.insert(sql, statement.clone());
                statement
            }
        };
        let changed = self
            .client()?
            .execute(&statement, &params)
            .await
            .map_err(|error| self.error(PgError::statement(&self.server, what(), &error)))?;
        if changed != 1 {
            return Err(self.bad_op(
                op,
                format!(
                    "{changed} rows of {} match its key, where the source changed one: the target was changed outside this stream",
                    shape.table
                ),
            ));
        }
        Ok(())
    }

    /// Reads what an UPDATE or DELETE of `table` needs from the target's
    /// catalog (the columns in the order [`Self::codec`] reads them).
    async fn change_shape(&self, op: &Op, table: &(String, String)) -> Result<ChangeShape> {
        let qualified_name = qualified(&table.0, &table.1);
        let rows = self
            .client()?
            .query(
                "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                        coalesce((SELECT k.n FROM pg_catalog.unnest(i.indkey) WITH ORDINALITY k(attnum, n) \
                                  WHERE k.attnum = a.attnum), 0)::int \
                 FROM pg_catalog.pg_attribute a \
                 LEFT JOIN pg_catalog.pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                 ORDER BY a.attnum",
                &[&qualified_name],
            )
            .await
            .map_err(|error| {
                self.error(PgError::statement(
                    &self.server,
                    format!("op seq {}: reading the key of {}.{}", op.seq, table.0, table.1),
                    &error,
                ))
            })?;
        let mut columns = Vec::with_capacity(rows.len());
        let mut key: Vec<(i32, usize)> = Vec::new();
        for (index, row) in rows.iter().enumerate() {
            let name: String = row.get(0);
            columns.push((quote_ident(&name), row.get::<_, String>(1)));
            let place: i32 = row.get(2);
            if place > 0 {
                key.push((place, index));
            }
        }
        key.sort_unstable();
        Ok(ChangeShape {
            table: qualified_name,
            columns,
            key: key.into_iter().map(|(_, index)| index).collect(),
        })
    }

    /// `TRUNCATE` of the tables a `pg.table TRUNCATE` op names, together.
    fn truncate_sql(&self, op: &Op) -> Result<String> {
        #[derive(serde::Deserialize)]
        struct Truncated {
            schema: String,
            name: String,
        }
        #[derive(serde::Deserialize)]
        struct Truncate {
            tables: Vec<Truncated>,
            #[serde(default)]
            restart_identity: bool,
        }
        let truncate: Truncate = self.parse(op)?;
        if truncate.tables.is_empty() {
            return Err(self.bad_op(op, "it names no table".to_owned()));
        }
        let tables: Vec<String> = truncate
            .tables
            .iter()
            .map(|table| qualified(&table.schema, &table.name))
            .collect();
        Ok(format!(
            "TRUNCATE ONLY {}{}",
            tables.join(", "),
            if truncate.restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            }
        ))
    }

    /// Starts `COPY ... FROM STDIN` into `table`, whose rows' keys start
    /// with `key_prefix`, for op `seq` (named if it fails).
    async fn start_copy(
        &mut self,
        table: (String, String),
        key_prefix: &[u8],
        seq: u64,
    ) -> Result<()> {
        let codec = self
            .codecs
            .remove(&table)
            .expect("a table's codec is made before its copy starts");
        let sink = match self.client()?.copy_in(codec.statement.as_str()).await {
            Ok(sink) => sink,
            Err(error) => {
                let what = format!(
                    "op seq {seq}: starting the copy into {}.{}",
                    table.0, table.1
                );
                self.codecs.insert(table, codec);
                return Err(self.error(PgError::statement(&self.server, what, &error)));
            }
        };
        self.copy = Some(OpenCopy {
            table,
            key_prefix: key_prefix.to_vec(),
            codec,
            sink: Box::pin(sink),
            buffer: Vec::with_capacity(COPY_CHUNK * 2),
            seqs: LineSeqs::default(),
        });
        Ok(())
    }

    async fn apply_other(&mut self, op: &Op) -> Result<()> {
        self.end_copies().await?;
        let kind = op.kind.as_ref();
        let method = op.method.as_ref();
        let sql = if kind == KIND_EXTENSION.as_bytes() && method == b"CREATE" {
            let extension: Extension = self.parse(op)?;
            self.ensure_schema(op, &extension.schema).await?;
            format!(
                "CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}",
                quote_ident(&extension.name),
                quote_ident(&extension.schema)
            )
        } else if kind == KIND_TYPE.as_bytes() && method == b"CREATE" {
            let enum_type: EnumType = self.parse(op)?;
            self.ensure_schema(op, &enum_type.schema).await?;
            format!(
                "CREATE TYPE {} AS ENUM ({})",
                qualified(&enum_type.schema, &enum_type.name),
                enum_type
                    .labels
                    .iter()
                    .map(|label| quote_literal(label))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else if kind == KIND_SEQUENCE.as_bytes() && method == b"CREATE" {
            let sequence: Sequence = self.parse(op)?;
            self.ensure_schema(op, &sequence.schema).await?;
            create_sequence(&sequence)
        } else if kind == KIND_TABLE.as_bytes() && method == b"CREATE" {
            let table: Table = self.parse(op)?;
            self.ensure_schema(op, &table.schema).await?;
            self.codecs
                .remove(&(table.schema.clone(), table.name.clone()));
            create_table(&table)
        } else if kind == KIND_INDEX.as_bytes() && method == b"CREATE" {
            let index: super::catalog::Index = self.parse(op)?;
            let holds = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index \
                         WHERE indexrelid = pg_catalog.to_regclass($1) AND indrelid = pg_catalog.to_regclass($2))";
            let names = [
                qualified(&index.schema, &index.name),
                qualified(&index.schema, &index.table),
            ];
            if self.holds(op, holds, &names).await? {
                return Ok(());
            }
            index.definition
        } else if kind == KIND_CONSTRAINT.as_bytes() && method == b"ADD" {
            let constraint: super::catalog::Constraint = self.parse(op)?;
            let holds = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint \
                         WHERE conrelid = pg_catalog.to_regclass($1) AND conname = $2)";
            let names = [
                qualified(&constraint.schema, &constraint.table),
                constraint.name.clone(),
            ];
            if self.holds(op, holds, &names).await? {
                return Ok(());
            }
            format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {}",
                qualified(&constraint.schema, &constraint.table),
                quote_ident(&constraint.name),
                constraint.definition
            )
        } else if kind == KIND_SEQUENCE.as_bytes() && method == b"SETVAL" {
            let value: SequenceValue = self.parse(op)?;
            return self.set_sequence(op, &value).await;
        } else if kind == KIND_TABLE.as_bytes() && method == b"TRUNCATE" {
            self.truncate_sql(op)?
        } else {
            return Err(self.bad_op(
                op,
                format!(
                    "a PostgreSQL target takes pg.* ops, not {} {}",
                    String::from_utf8_lossy(kind),
                    String::from_utf8_lossy(method)
                ),
            ));
        };
        self.run_for(op, &sql).await
    }

    /// True when the target holds `op`'s index or key already (`query`
    /// on `names` says so): a lane built it on its own (see
    /// [`Self::build_alone`]) before the op reached the lane in the stream.
    /// The catalog, not the checkpoint, makes a build exactly once.
    async fn holds(&self, op: &Op, query: &str, names: &[String; 2]) -> Result<bool> {
        let what = format!("{}: looking for it on the target", op_label(op));
        Ok(self
            .client()?
            .query_one(query, &[&names[0], &names[1]])
            .await
            .map_err(|error| self.error(PgError::statement(&self.server, what, &error)))?
            .get(0))
    }

    /// Builds `op`, an index or a key, in a transaction of its own, outside
    /// the stream's checkpoint: the lanes of a restore build a phase's
    /// indexes and keys side by side, each taking the next table when it is
    /// free (see `lanes.rs`), and the ops then pass through their lanes as
    /// usual, finding them built. Refused, as a commit is, once a later
    /// restore took the target. Only between two of the stream's
    /// transactions.
    pub(super) async fn build_alone(&mut self, op: &Op) -> Result<()> {
        self.execute("BEGIN", "beginning a build").await?;
        // The epoch last, as a commit checks it: a later restore's open
        // waits for the epoch row only as long as a commit takes, not for
        // a build.
        let built = match self.apply_other(op).await {
            Ok(()) => self.check_epoch().await,
            Err(error) => Err(error),
        };
        match built {
            Ok(()) => {
                self.execute(
                    "COMMIT",
                    format!("committing the build of op seq {}", op.seq),
                )
                .await
            }
            Err(error) => {
                let _ = self.execute("ROLLBACK", "rolling back").await;
                Err(error)
            }
        }
    }

    /// Refuses, rolling back, once a later restore raised the target's
    /// epoch (G5); holds the epoch row until the transaction ends, so a
    /// later restore's open waits for this transaction.
    async fn check_epoch(&self) -> Result<()> {
        let ferry = quote_ident(FERRY_SCHEMA);
        let stored: i64 = self
            .client()?
            .query_one(
                &format!("SELECT epoch FROM {ferry}.target WHERE id = 1 FOR SHARE"),
                &[],
            )
            .await
            .map_err(|error| {
                self.error(PgError::statement(
                    &self.server,
                    "reading the target's epoch",
                    &error,
                ))
            })?
            .get(0);
        if stored as u64 != self.options.epoch {
            let _ = self.execute("ROLLBACK", "rolling back").await;
            return Err(AdapterError::StaleEpoch {
                target_name: self.name(),
                stored: stored as u64,
                offered: self.options.epoch,
            }
            .into());
        }
        Ok(())
    }

    async fn set_sequence(&mut self, op: &Op, value: &SequenceValue) -> Result<()> {
        let client = self.client()?;
        let what = || format!("op seq {} (SETVAL {}.{})", op.seq, value.schema, value.name);
        let sequence = match (&value.owned_by, value.identity) {
            // An identity column's sequence is the table's, named by it.
            (Some([schema, table, column]), true) => {
                let row = client
                    .query_one(
                        "SELECT pg_catalog.pg_get_serial_sequence($1, $2)",
                        &[&qualified(schema, table), &column],
                    )
                    .await
                    .map_err(|error| {
                        self.error(PgError::statement(&self.server, what(), &error))
                    })?;
                row.get::<_, Option<String>>(0).ok_or_else(|| {
                    self.bad_op(
                        op,
                        format!("{schema}.{table}.{column} has no identity sequence on the target"),
                    )
                })?
            }
            _ => qualified(&value.schema, &value.name),
        };
        client
            .query_one(
                "SELECT pg_catalog.setval($1::text::regclass, $2, $3)",
                &[&sequence, &value.last_value, &value.is_called],
            )
            .await
            .map_err(|error| self.error(PgError::statement(&self.server, what(), &error)))?;
        if let (Some([schema, table, column]), false) = (&value.owned_by, value.identity) {
            let sql = format!(
                "ALTER SEQUENCE {sequence} OWNED BY {}.{}",
                qualified(schema, table),
                quote_ident(column)
            );
            self.run_for(op, &sql).await?;
        }
        Ok(())
    }

    /// Refuses a target that holds tables, naming a few.
    async fn refuse_if_not_empty(&self) -> Result<()> {
        let tables = self.some_tables().await?;
        if tables.is_empty() {
            return Ok(());
        }
        let mut shown = tables[..tables.len().min(5)].join(", ");
        if tables.len() > 5 {
            shown.push_str(", ...");
        }
        Err(self.error(PgError::NotEmpty {
            server: self.server.clone(),
            tables: shown,
        }))
    }

    /// The user tables the target holds outside ferry's schema, a few.
    async fn some_tables(&self) -> Result<Vec<String>> {
        let rows = self
            .client()?
            .query(
                "SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', $1) \
                   AND n.nspname NOT LIKE 'pg\\_%' \
                 ORDER BY 1 LIMIT 6",
                &[&FERRY_SCHEMA],
            )
            .await
            .map_err(|error| self.error(PgError::statement(&self.server, "listing the target's tables", &error)))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

/// The `(schema, table)` a row key names: `SCHEMA.TABLE/KEY`, each name
/// with `%`, `.` and `/` percent-encoded.
pub(crate) fn row_table(key: &[u8]) -> Option<(String, String)> {
    let key = std::str::from_utf8(key).ok()?;
    let (table, _) = key.split_once('/')?;
    let (schema, name) = table.split_once('.')?;
    Some((percent_decode(schema)?, percent_decode(name)?))
}

/// The primary key values a row key holds, in key order: the parts after
/// the table, each with `%` and `/` percent-decoded.
fn row_key_values(key: &[u8]) -> Option<Vec<String>> {
    let key = std::str::from_utf8(key).ok()?;
    let (_, values) = key.split_once('/')?;
    values.split('/').map(percent_decode).collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The line of a COPY the server's error context names (`COPY t, line 42`).
fn copy_line(error: &tokio_postgres::Error) -> Option<u64> {
    let context = error.as_db_error()?.where_()?;
    let (_, after) = context.split_once(", line ")?;
    after
        .split(|char: char| !char.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn create_sequence(sequence: &Sequence) -> String {
    format!(
        "CREATE SEQUENCE {} AS {} {}",
        qualified(&sequence.schema, &sequence.name),
        sequence.data_type,
        sequence_options(sequence)
    )
}

/// How `sequence` counts, as CREATE SEQUENCE and an identity column's
/// options write it.
fn sequence_options(sequence: &Sequence) -> String {
    format!(
        "INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} CACHE {} {}",
        sequence.increment,
        sequence.min,
        sequence.max,
        sequence.start,
        sequence.cache,
        if sequence.cycle { "CYCLE" } else { "NO CYCLE" }
    )
}

fn column_sql(column: &Column) -> String {
    let mut sql = format!("{} {}", quote_ident(&column.name), column.type_name);
    if let Some(collation) = &column.collation {
        sql.push_str(&format!(" COLLATE {collation}"));
    }
    if let Some(expression) = &column.generated {
        sql.push_str(&format!(" GENERATED ALWAYS AS ({expression}) STORED"));
    } else if let Some(identity) = &column.identity {
        let identity = if identity == "always" {
            "ALWAYS"
        } else {
            "BY DEFAULT"
        };
        sql.push_str(&format!(" GENERATED {identity} AS IDENTITY"));
        if let Some(sequence) = &column.identity_sequence {
            sql.push_str(&format!(
                " (SEQUENCE NAME {} {})",
                qualified(&sequence.schema, &sequence.name),
                sequence_options(sequence)
            ));
        }
    } else if let Some(default) = &column.default {
        sql.push_str(&format!(" DEFAULT {default}"));
    }
    if column.not_null {
        sql.push_str(" NOT NULL");
    }
    sql
}

fn create_table(table: &Table) -> String {
    format!(
        "CREATE {}TABLE {} ({})",
        if table.unlogged { "UNLOGGED " } else { "" },
        qualified(&table.schema, &table.name),
        table
            .columns
            .iter()
            .map(column_sql)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `op seq N (METHOD key)`: how a failure names its op.
fn op_label(op: &Op) -> String {
    format!(
        "op seq {} ({} {})",
        op.seq,
        String::from_utf8_lossy(&op.method),
        String::from_utf8_lossy(&op.key)
    )
}

#[async_trait]
impl TransactionalTarget for PgTarget {
    fn name(&self) -> String {
        format!("PostgreSQL {}", self.server)
    }

    async fn open(&mut self, stream: &StreamInfo, epoch: u64) -> Result<StoredStream> {
        let client = self
            .connection
            .connect()
            .await
            .map_err(|error| self.error(error))?;
        self.client = Some(client);
        self.stream_id = stream.stream_id.clone();
        let ferry = quote_ident(FERRY_SCHEMA);
        // A target ferry never wrote to, and holding tables: refused before
        // ferry's own tables are made, so nothing is left behind.
        let fresh: bool = self
            .client()?
            .query_one(
                "SELECT pg_catalog.to_regclass($1) IS NULL",
                &[&format!("{ferry}.streams")],
            )
            .await
            .map_err(|error| {
                self.error(PgError::statement(
                    &self.server,
                    "looking for ferry's checkpoints",
                    &error,
                ))
            })?
            .get(0);
        if fresh && !self.options.allow_nonempty {
            self.refuse_if_not_empty().await?;
        }
        self.execute(
            &format!(
                "SET search_path = ''; \
                 CREATE SCHEMA IF NOT EXISTS {ferry}; \
                 CREATE TABLE IF NOT EXISTS {ferry}.target (id int PRIMARY KEY CHECK (id = 1), epoch bigint NOT NULL); \
                 CREATE TABLE IF NOT EXISTS {ferry}.streams (stream_id text PRIMARY KEY, source_identity text, \
                     through_seq bigint NOT NULL DEFAULT 0, through_position numeric NOT NULL DEFAULT 0, \
                     complete boolean NOT NULL DEFAULT false, updated_at timestamptz NOT NULL DEFAULT now()); \
                 INSERT INTO {ferry}.target (id, epoch) VALUES (1, 0) ON CONFLICT DO NOTHING"
            ),
            "creating ferry's checkpoint tables (the role needs CREATE on the database)",
        )
        .await?;
        self.execute("BEGIN", "beginning").await?;
        let client = self.client()?;
        let failed = |what: &str, error: tokio_postgres::Error| {
            self.error(PgError::statement(&self.server, what, &error))
        };
        let stored: i64 = client
            .query_one(
                &format!("SELECT epoch FROM {ferry}.target WHERE id = 1 FOR UPDATE"),
                &[],
            )
            .await
            .map_err(|error| failed("reading the target's epoch", error))?
            .get(0);
        let stored = stored.max(0) as u64;
        if stored > epoch {
            self.execute("ROLLBACK", "rolling back").await?;
            return Ok(StoredStream {
                applied: None,
                epoch: stored,
            });
        }
        client
            .execute(
                &format!("UPDATE {ferry}.target SET epoch = $1 WHERE id = 1"),
                &[&(epoch as i64)],
            )
            .await
            .map_err(|error| failed("raising the target's epoch", error))?;
        let row = client
            .query_opt(
                &format!("SELECT through_seq, through_position::text, source_identity FROM {ferry}.streams WHERE stream_id = $1"),
                &[&stream.stream_id],
            )
            .await
            .map_err(|error| failed("reading the stream's checkpoint", error))?;
        let mut applied = None;
        match row {
            Some(row) => {
                let through_seq: i64 = row.get(0);
                let position: String = row.get(1);
                let identity: Option<String> = row.get(2);
                if let (Some(stored), Some(offered)) = (&identity, &stream.source_identity)
                    && stored != offered
                {
                    let _ = self.execute("ROLLBACK", "rolling back").await;
                    return Err(self.error(PgError::Precondition {
                        server: self.server.clone(),
                        reason: format!(
                            "stream {} was restored here from source {stored}, and this one comes from {offered}",
                            stream.stream_id
                        ),
                    }));
                }
                applied = (through_seq > 0).then(|| Applied {
                    through_seq: through_seq as u64,
                    through_position: Position(position.parse().unwrap_or(0)),
                });
            }
            None => {
                self.client()?
                    .execute(
                        &format!("INSERT INTO {ferry}.streams (stream_id, source_identity) VALUES ($1, $2)"),
                        &[&stream.stream_id, &stream.source_identity],
                    )
                    .await
                    .map_err(|error| self.error(PgError::statement(&self.server, "recording the stream", &error)))?;
            }
        }
        // Nothing of this stream is in yet (also when an earlier attempt
        // failed before its first commit): the target must be empty.
        if applied.is_none()
            && !self.options.allow_nonempty
            && let Err(error) = self.refuse_if_not_empty().await
        {
            let _ = self.execute("ROLLBACK", "rolling back").await;
            return Err(error);
        }
        self.execute("COMMIT", "committing the stream's start")
            .await?;
        Ok(StoredStream {
            applied,
            epoch: stored,
        })
    }

    async fn begin(&mut self) -> Result<()> {
        // Rows parked in a transaction that never committed are not in.
        self.parked.clear();
        self.parked_bytes = 0;
        self.execute("BEGIN", "beginning a transaction").await
    }

    async fn apply(&mut self, op: &Op) -> Result<()> {
        let row = op.kind.as_ref() == KIND_ROW.as_bytes();
        if (row && op.method.as_ref() == b"INSERT")
            || (op.kind.as_ref() == KIND_ROWS.as_bytes() && op.method.as_ref() == b"COPY")
        {
            self.apply_row(op).await
        } else if row && matches!(op.method.as_ref(), b"UPDATE" | b"DELETE") {
            self.apply_change(op).await
        } else {
            self.apply_other(op).await
        }
    }

    async fn commit(&mut self, applied: Applied, complete: bool) -> Result<()> {
        self.end_copies().await?;
        let ferry = quote_ident(FERRY_SCHEMA);
        let client = self.client()?;
        let failed = |error: tokio_postgres::Error| {
            self.error(PgError::statement(
                &self.server,
                "writing the checkpoint",
                &error,
            ))
        };
        // Under a lock a later attempt's open must wait for: either it
        // took the target before (and this commits nothing), or it reads
        // this checkpoint after.
        self.check_epoch().await?;
        client
            .execute(
                &format!(
                    "UPDATE {ferry}.streams SET through_seq = $2, through_position = $3::text::numeric, complete = $4, updated_at = now() WHERE stream_id = $1"
                ),
                &[
                    &self.stream_id,
                    &(applied.through_seq as i64),
                    &applied.through_position.0.to_string(),
                    &complete,
                ],
            )
            .await
            .map_err(failed)?;
        self.execute("COMMIT", "committing").await
    }

    fn weight(&self, op: &Op) -> usize {
        if op.kind.as_ref() == KIND_ROWS.as_bytes() {
            rows_in(op).max(1)
        } else {
            1
        }
    }

    async fn exists(&mut self, key: &[u8]) -> Result<bool> {
        Err(self.error(PgError::Precondition {
            server: self.server.clone(),
            reason: format!(
                "an op names {} as a dependency, and PostgreSQL ops carry none: the stream is not one ferry's PostgreSQL adapter made",
                String::from_utf8_lossy(key)
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_line_names_the_seq_of_its_op_across_gaps() {
        let mut seqs = LineSeqs::default();
        for seq in [7, 8, 9, 20, 31, 32] {
            seqs.push(seq, 1);
        }
        let found: Vec<Option<u64>> = (0..=7).map(|line| seqs.of_line(line)).collect();
        assert_eq!(
            found,
            [
                None,
                Some(7),
                Some(8),
                Some(9),
                Some(20),
                Some(31),
                Some(32),
                None
            ]
        );
    }

    #[test]
    fn a_copy_line_of_a_run_of_rows_names_the_seq_of_its_op() {
        let mut seqs = LineSeqs::default();
        // seq 4: one row; 5: three; 6: none (only its header); 7, 8: one
        // each; 9: two.
        for (seq, lines) in [(4, 1), (5, 3), (6, 0), (7, 1), (8, 1), (9, 2)] {
            seqs.push(seq, lines);
        }
        let found: Vec<Option<u64>> = (0..=9).map(|line| seqs.of_line(line)).collect();
        assert_eq!(
            found,
            [
                None,
                Some(4),
                Some(5),
                Some(5),
                Some(5),
                Some(7),
                Some(8),
                Some(9),
                Some(9),
                None
            ]
        );
    }

    fn rows_op(body: &[u8]) -> Op {
        Op {
            kind: Bytes::from_static(KIND_ROWS.as_bytes()),
            method: Bytes::from_static(b"COPY"),
            key: Bytes::from_static(b"public.t/#0.1"),
            body: Bytes::copy_from_slice(body),
            ..Op::default()
        }
    }

    #[test]
    fn a_run_of_rows_is_refused_when_cut_or_ended_early() {
        let whole = rows_op(b"id\tname\n1\ta\n2\tb\n");
        match RowData::of(&whole) {
            Ok(RowData::Copy { header, lines }) => {
                assert_eq!(header, b"id\tname\n");
                assert_eq!(lines, b"1\ta\n2\tb\n");
            }
            _ => panic!("a whole run is taken"),
        }
        assert_eq!(rows_in(&whole), 2);
        let refused = |body: &[u8]| match RowData::of(&rows_op(body)) {
            Err(reason) => reason,
            Ok(_) => panic!("{:?} was taken", String::from_utf8_lossy(body)),
        };
        assert!(refused(b"id\tname").contains("naming its columns"));
        assert!(refused(b"id\n1\n2").contains("cut"));
        assert!(refused(b"id\n1\n\\.\n2\n").contains("end-of-data"));
        assert!(refused(b"id\n\\.\n").contains("end-of-data"));
        // An escaped backslash before a dot is a value, not the end.
        assert!(RowData::of(&rows_op(b"id\n\\\\.\n")).is_ok());
    }

    #[test]
    fn a_row_key_names_its_table_whatever_the_names_hold() {
        assert_eq!(
            row_table(b"public.runs_v3/HelloFlow/42"),
            Some(("public".to_owned(), "runs_v3".to_owned()))
        );
        assert_eq!(
            row_table(b"my%2Eschema.odd%2Fname/1"),
            Some(("my.schema".to_owned(), "odd/name".to_owned()))
        );
        assert_eq!(row_table(b"no-slash"), None);
    }

    #[test]
    fn a_table_is_created_with_its_columns_as_the_source_printed_them() {
        let table = Table {
            schema: "public".to_owned(),
            name: "runs".to_owned(),
            columns: vec![
                Column {
                    name: "id".to_owned(),
                    type_name: "bigint".to_owned(),
                    type_oid: 20,
                    not_null: true,
                    default: None,
                    identity: Some("by default".to_owned()),
                    identity_sequence: None,
                    generated: None,
                    collation: None,
                },
                Column {
                    name: "Name".to_owned(),
                    type_name: "character varying(255)".to_owned(),
                    type_oid: 1043,
                    not_null: false,
                    default: Some("'x'::character varying".to_owned()),
                    identity: None,
                    identity_sequence: None,
                    generated: None,
                    collation: None,
                },
            ],
            primary_key: vec!["id".to_owned()],
            unlogged: false,
            oid: 0,
            pages: 0,
            replica_identity: 'd',
        };
        assert_eq!(
            create_table(&table),
            "CREATE TABLE \"public\".\"runs\" (\"id\" bigint GENERATED BY DEFAULT AS IDENTITY NOT NULL, \"Name\" character varying(255) DEFAULT 'x'::character varying)"
        );
    }
}

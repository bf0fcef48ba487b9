//! Following a source after its snapshot: the messages of `pgoutput` (see
//! [`super::pgoutput`]) turned into ops, one group per source transaction,
//! in commit order.
//!
//! | change | kind | key | method | body |
//! | --- | --- | --- | --- | --- |
//! | INSERT | `pg.row` | the new row's key | `INSERT` | the row, as a snapshot's rows |
//! | UPDATE | `pg.row` | the row's key before the update | `UPDATE` | the new row; a TOASTed value the update did not change (and the server did not send) is left out, never written as NULL |
//! | DELETE | `pg.row` | the row's key | `DELETE` | empty |
//! | TRUNCATE | `pg.table` | `table/<schema>.<name>` of the first table | `TRUNCATE` | `{"tables":[{"schema","name"}..],"cascade","restart_identity"}`: the tables truncated together |
//! | the fence's [`SEQUENCES_PREFIX`] message | `pg.sequence` | `sequence/<schema>.<name>` | `SETVAL` | `{"schema","name","last_value","is_called"}`: the extract's closing op, one per sequence |
//!
//! Every op of a transaction has as `position` and as `txn` the LSN just
//! past the start of its commit record (its commit LSN + 1): where a stream
//! resumed after it starts, since the server skips a transaction whose
//! commit record begins before the start. So positions of changes are
//! always above the snapshot's consistent point R, even for a transaction
//! whose commit record begins at R (which the snapshot does not hold), and
//! a resume or a confirmed position needs no arithmetic. The last op of a
//! transaction has `txn_last`. A transaction is never held whole: each op
//! goes out once the next one (or the commit) came, so a transaction of
//! millions of rows passes through in constant memory.
//!
//! Logical replication carries no `nextval`: the fence copies the
//! sequences (`fence.rs`) with a non-transactional
//! `pg_logical_emit_message` under [`SEQUENCES_PREFIX`], which the server
//! sends as it reads it, outside any transaction. Its ops are one group of
//! their own whose `position` and `txn` are the message's LSN (the end of
//! its record, as `pg_logical_emit_message` answers it): a stream resumed
//! from there skips it (the server skips a non-transactional message whose
//! record begins before the start), every transaction committed after it
//! has a higher position, and it lies below the fence's marker F, so a
//! target that applied through F holds it. (A transactional message would
//! go out with the fence's transaction, at its commit, above F: the
//! server's keepalives can report its WAL end past F before that commit
//! (another database's commit flushes the WAL past F), and a target would
//! count as drained through F without the sequences.)
//!
//! The tables are the snapshot's, as its catalog read them: a `Relation`
//! message that describes a table otherwise (a column added, dropped,
//! renamed or retyped), or a table the snapshot did not hold, stops the
//! stream with an error naming the table and the difference.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::catalog::SequenceValue;
use super::pgoutput::{
    Begin, LogicalMessage, OldTuple, PgOutputMessage, Relation, Tuple, TupleValue,
};
use super::replication::Lsn;
use super::source::{TablePlan, op, push_key_part, setval_op};
use super::value::{RowDecoder, TextValue};
use super::{KIND_ROW, KIND_TABLE, PgError};
use crate::Op;

/// The prefix of the `pg_logical_emit_message` markers ferry writes (the
/// fence's): the follower reports them.
pub(super) const MARKER_PREFIX: &str = "ferry";

/// The prefix of the non-transactional `pg_logical_emit_message` in which
/// the fence copies the sequences (a [`SequencesMessage`]), before its
/// marker: the follower turns it into `pg.sequence` `SETVAL` ops (see the
/// module's documentation).
pub(super) const SEQUENCES_PREFIX: &str = "ferry.sequences";

/// What a [`SEQUENCES_PREFIX`] message says, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct SequencesMessage {
    /// The epoch of the fence that read them.
    pub(super) fence: u64,
    /// Every sequence the stream carries, where it stood once the fence's
    /// triggers held every writer back.
    pub(super) sequences: Vec<SequenceValue>,
}

/// What one message of the stream gave.
// Ops are nearly every item: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Decoded {
    /// An op, complete (the last of its transaction marked).
    Op(Op),
    /// A transaction committed (or the fence's copy of the sequences
    /// ended); every op of it went out before this.
    Committed {
        /// The position of its ops (its commit LSN + 1).
        position: Lsn,
    },
    /// A marker ferry wrote with `pg_logical_emit_message`.
    Marker(LogicalMessage),
}

/// Turns `pgoutput` messages into ops (see the module's documentation).
pub(super) struct ChangeDecoder {
    server: String,
    version: Bytes,
    /// The snapshot's tables, by schema and name.
    tables: HashMap<(String, String), Arc<TablePlan>>,
    /// The tables the stream described, by OID.
    relations: HashMap<u32, FollowedTable>,
    /// The transaction being read.
    transaction: Option<Begin>,
    /// Its last op, out once it is known whether another follows.
    pending: Option<Op>,
}

struct FollowedTable {
    plan: Arc<TablePlan>,
    decoder: RowDecoder,
}

impl ChangeDecoder {
    /// A decoder for a stream of the tables `plans` describe, written as
    /// ops of `version`.
    pub(super) fn new(server: &str, version: Bytes, plans: &[Arc<TablePlan>]) -> Self {
        let tables = plans
            .iter()
            .map(|plan| {
                (
                    (plan.table.schema.clone(), plan.table.name.clone()),
                    plan.clone(),
                )
            })
            .collect();
        Self {
            server: server.to_owned(),
            version,
            tables,
            relations: HashMap::new(),
            transaction: None,
            pending: None,
        }
    }

    /// True between a transaction's `Begin` and its `Commit`.
    pub(super) fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }

    fn error(&self, lsn: Lsn, reason: String) -> PgError {
        // The server leaves the position of some messages (a Relation)
        // unset: the transaction's commit LSN says where instead.
        let lsn = match (lsn, self.transaction) {
            (Lsn(0), Some(open)) => open.final_lsn,
            _ => lsn,
        };
        PgError::Follow {
            server: self.server.clone(),
            lsn: lsn.to_string(),
            reason,
        }
    }

    /// Reads one message, appending what it gave to `out`. `lsn` is where
    /// the message came from (its `XLogData`'s start), for errors.
    pub(super) fn decode(
        &mut self,
        message: PgOutputMessage,
        lsn: Lsn,
        out: &mut Vec<Decoded>,
    ) -> Result<(), PgError> {
        match message {
            PgOutputMessage::Begin(begin) => {
                if let Some(open) = self.transaction {
                    return Err(self.error(
                        begin.final_lsn,
                        format!(
                            "a transaction began before the one committing at {} ended",
                            open.final_lsn
                        ),
                    ));
                }
                self.transaction = Some(begin);
            }
            PgOutputMessage::Commit(commit) => {
                let Some(begin) = self.transaction.take() else {
                    return Err(
                        self.error(commit.commit_lsn, "a commit with no transaction".to_owned())
                    );
                };
                if begin.final_lsn != commit.commit_lsn {
                    return Err(self.error(
                        commit.commit_lsn,
                        format!(
                            "the transaction announced its commit at {}",
                            begin.final_lsn
                        ),
                    ));
                }
                if let Some(mut last) = self.pending.take() {
                    last.txn_last = true;
                    out.push(Decoded::Op(last));
                }
                out.push(Decoded::Committed {
                    position: position_of(begin),
                });
            }
            PgOutputMessage::Origin { .. } | PgOutputMessage::Type { .. } => {}
            PgOutputMessage::Relation(relation) => {
                let followed = self
                    .follow(&relation)
                    .map_err(|reason| self.error(lsn, reason))?;
                self.relations.insert(relation.oid, followed);
            }
            PgOutputMessage::Insert { relation, new } => {
                let begin = self.begun(lsn)?;
                let key = self.row_key(relation, &new, begin)?;
                let body = self.row_body(relation, &new, begin, &key)?;
                self.push(
                    out,
                    op(KIND_ROW, key, "INSERT", body, 0, &self.version),
                    begin,
                );
            }
            PgOutputMessage::Update { relation, old, new } => {
                let begin = self.begun(lsn)?;
                let identity = old.as_ref().map_or(&new, OldTuple::tuple);
                let key = self.row_key(relation, identity, begin)?;
                let body = self.row_body(relation, &new, begin, &key)?;
                self.push(
                    out,
                    op(KIND_ROW, key, "UPDATE", body, 0, &self.version),
                    begin,
                );
            }
            PgOutputMessage::Delete { relation, old } => {
                let begin = self.begun(lsn)?;
                let key = self.row_key(relation, old.tuple(), begin)?;
                let mut delete = op(KIND_ROW, key, "DELETE", Vec::new(), 0, &self.version);
                delete.content_type = Bytes::new();
                self.push(out, delete, begin);
            }
            PgOutputMessage::Truncate {
                cascade,
                restart_identity,
                relations,
            } => {
                let begin = self.begun(lsn)?;
                let mut tables = Vec::with_capacity(relations.len());
                for oid in &relations {
                    let followed = self.followed(*oid, begin)?;
                    tables.push(serde_json::json!({
                        "schema": followed.plan.table.schema,
                        "name": followed.plan.table.name,
                    }));
                }
                let Some(first) = relations.first() else {
                    return Ok(());
                };
                let key = format!(
                    "table/{}",
                    self.followed(*first, begin)?.plan.table.display_name()
                );
                let body = serde_json::json!({
                    "tables": tables,
                    "cascade": cascade,
                    "restart_identity": restart_identity,
                });
                let body = serde_json::to_vec(&body).unwrap_or_default();
                self.push(
                    out,
                    op(KIND_TABLE, key, "TRUNCATE", body, 0, &self.version),
                    begin,
                );
            }
            PgOutputMessage::Message(message) => {
                if message.prefix == MARKER_PREFIX {
                    out.push(Decoded::Marker(message));
                } else if message.prefix == SEQUENCES_PREFIX {
                    self.sequences(&message, out)?;
                }
            }
        }
        Ok(())
    }

    /// The fence's copy of the sequences, as one group of `SETVAL` ops at
    /// the message's LSN (see the module's documentation).
    fn sequences(&self, message: &LogicalMessage, out: &mut Vec<Decoded>) -> Result<(), PgError> {
        if message.transactional || self.transaction.is_some() {
            return Err(self.error(
                message.lsn,
                format!(
                    "a {SEQUENCES_PREFIX} message inside a transaction: ferry's fence writes it outside any, so another program wrote it; leave the prefix to ferry"
                ),
            ));
        }
        let copy: SequencesMessage = serde_json::from_slice(&message.content).map_err(|error| {
            self.error(
                message.lsn,
                format!(
                    "the {SEQUENCES_PREFIX} message is not ferry's copy of the sequences: {error}"
                ),
            )
        })?;
        let position = message.lsn;
        let count = copy.sequences.len();
        for (index, value) in copy.sequences.iter().enumerate() {
            let mut setval = setval_op(value, position.0, &self.version);
            setval.txn = position.0;
            setval.txn_last = index + 1 == count;
            out.push(Decoded::Op(setval));
        }
        if count > 0 {
            out.push(Decoded::Committed { position });
        }
        Ok(())
    }

    /// The transaction a change belongs to.
    fn begun(&self, lsn: Lsn) -> Result<Begin, PgError> {
        self.transaction
            .ok_or_else(|| self.error(lsn, "a change outside a transaction".to_owned()))
    }

    fn push(&mut self, out: &mut Vec<Decoded>, mut next: Op, begin: Begin) {
        next.position = position_of(begin).0;
        next.txn = position_of(begin).0;
        next.txn_last = false;
        if let Some(previous) = self.pending.replace(next) {
            out.push(Decoded::Op(previous));
        }
    }

    fn followed(&self, oid: u32, begin: Begin) -> Result<&FollowedTable, PgError> {
        self.relations.get(&oid).ok_or_else(|| {
            self.error(
                begin.final_lsn,
                format!("a change to the table of OID {oid}, which no Relation message described"),
            )
        })
    }

    /// The key of the row `tuple` (a new row, or an old row's key or
    /// whole).
    fn row_key(&self, oid: u32, tuple: &Tuple, begin: Begin) -> Result<String, PgError> {
        let followed = self.followed(oid, begin)?;
        let plan = &followed.plan;
        let mut key = plan.key_prefix.clone();
        for (index, column) in plan.key_columns.iter().enumerate() {
            if index > 0 {
                key.push('/');
            }
            match tuple.0.get(*column) {
                Some(TupleValue::Text(text)) => push_key_part(&mut key, text),
                other => {
                    let what = match other {
                        Some(TupleValue::Null) => "NULL",
                        Some(TupleValue::UnchangedToast) => "not sent",
                        Some(TupleValue::Binary(_)) => "in binary",
                        _ => "missing",
                    };
                    return Err(self.error(
                        begin.final_lsn,
                        format!(
                            "a change to {} whose key column {} is {what}",
                            plan.table.display_name(),
                            plan.columns[*column].name
                        ),
                    ));
                }
            }
        }
        Ok(key)
    }

    fn row_body(
        &mut self,
        oid: u32,
        tuple: &Tuple,
        begin: Begin,
        key: &str,
    ) -> Result<Vec<u8>, PgError> {
        let values = tuple.0.iter().map(|value| match value {
            TupleValue::Null => TextValue::Null,
            TupleValue::UnchangedToast => TextValue::Absent,
            TupleValue::Text(text) | TupleValue::Binary(text) => TextValue::Text(text),
        });
        let binary = tuple
            .0
            .iter()
            .any(|value| matches!(value, TupleValue::Binary(_)));
        let decoded = match self.relations.get_mut(&oid) {
            _ if binary => Err("a value came in binary".to_owned()),
            Some(followed) => {
                let mut body = Vec::new();
                followed
                    .decoder
                    .decode_values(values, &mut body)
                    .map(|()| body)
                    .map_err(|error| error.to_string())
            }
            None => Err("no Relation message described its table".to_owned()),
        };
        decoded.map_err(|reason| {
            self.error(
                begin.final_lsn,
                format!("the change to row {key} cannot be carried: {reason}"),
            )
        })
    }

    /// The snapshot's plan of the table `relation` describes, when the two
    /// agree; what differs otherwise.
    fn follow(&self, relation: &Relation) -> Result<FollowedTable, String> {
        let name = format!("{}.{}", relation.schema, relation.name);
        let Some(plan) = self
            .tables
            .get(&(relation.schema.clone(), relation.name.clone()))
        else {
            return Err(format!(
                "{name} changed, and the snapshot does not hold it (was it created after the snapshot?); a table the migration should carry must exist when it starts"
            ));
        };
        let snapshot: Vec<(&str, u32)> = plan
            .table
            .copied_columns()
            .map(|column| (column.name.as_str(), column.type_oid))
            .collect();
        let now: Vec<(&str, u32)> = relation
            .columns
            .iter()
            .map(|column| (column.name.as_str(), column.type_oid))
            .collect();
        if snapshot != now {
            return Err(format!(
                "the definition of {name} changed since the snapshot: {}; a schema change on the source needs a profile migration that carries it, or a new migration started after it",
                difference(&snapshot, &now)
            ));
        }
        let identity: Vec<usize> = relation
            .columns
            .iter()
            .enumerate()
            .filter(|(_, column)| column.key)
            .map(|(index, _)| index)
            .collect();
        let mut key_columns = plan.key_columns.clone();
        key_columns.sort_unstable();
        if plan.key_columns.is_empty()
            || (relation.replica_identity != b'f' && identity != key_columns)
        {
            return Err(format!(
                "{name} has no primary key that its replica identity sends; give it a primary key with REPLICA IDENTITY DEFAULT, or ALTER TABLE {name} REPLICA IDENTITY FULL"
            ));
        }
        Ok(FollowedTable {
            plan: plan.clone(),
            decoder: RowDecoder::new(plan.columns.iter().cloned()),
        })
    }
}

/// Ends the session that reads `slot` and waits, at most 10 s, until the
/// server lets the slot go.
async fn take_over_slot(
    connection: &super::PgConnection,
    server: &str,
    slot: &str,
) -> Result<(), PgError> {
    let client = connection.connect().await?;
    let failed = |error: tokio_postgres::Error| {
        PgError::statement(
            server,
            format!("taking over replication slot {slot}"),
            &error,
        )
    };
    let pid: Option<i32> = client
        .query_opt(
            "SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .map_err(failed)?
        .map(|row| row.get(0));
    let Some(pid) = pid else {
        return Ok(());
    };
    tracing::warn!(
        slot,
        pid,
        "another session reads the slot (a stream this one resumes): ending it"
    );
    client
        .execute("SELECT pg_catalog.pg_terminate_backend($1)", &[&pid])
        .await
        .map_err(failed)?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let active: bool = client
            .query_one(
                "SELECT coalesce(bool_or(active), false) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(failed)?
            .get(0);
        if !active {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(PgError::Precondition {
                server: server.to_owned(),
                reason: format!(
                    "replication slot {slot} is still read by process {pid} after 10 s: end it (SELECT pg_terminate_backend({pid})) and resume"
                ),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Refuses a slot that is gone, or that PostgreSQL invalidated: the WAL
/// the stream needs is lost, and only a new snapshot can go on.
async fn check_slot(
    client: &tokio_postgres::Client,
    server: &str,
    slot: &str,
) -> Result<(), PgError> {
    let row = client
        .query_opt(
            "SELECT plugin, wal_status, database, database = pg_catalog.current_database() \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|error| PgError::statement(server, "reading the replication slot", &error))?;
    let precondition = |reason: String| PgError::Precondition {
        server: server.to_owned(),
        reason,
    };
    let Some(row) = row else {
        // A committed switch drops the slot (`live.rs`): say so.
        if let Ok(Some(stored)) = super::fence::read_fence(client, server).await
            && stored.switched()
        {
            return Err(precondition(format!(
                "replication slot {slot} was dropped when migration epoch {} switched this database's clients to {}: there is nothing left to follow",
                stored.fence.epoch,
                stored.fence.successor.as_deref().unwrap_or("its successor")
            )));
        }
        return Err(precondition(format!(
            "replication slot {slot} does not exist (dropped, or made on another server): the changes since the snapshot are gone; start the migration over with a new snapshot"
        )));
    };
    let plugin: Option<String> = row.get(0);
    let wal_status: Option<String> = row.get(1);
    let database: Option<String> = row.get(2);
    if row.get::<_, Option<bool>>(3) != Some(true) {
        return Err(precondition(format!(
            "replication slot {slot} belongs to {}, not this database: name another slot (--keep-slot)",
            database.map_or_else(
                || "no database (a physical slot)".to_owned(),
                |name| format!("database {name}")
            )
        )));
    }
    if wal_status.as_deref() == Some("lost") {
        return Err(precondition(format!(
            "replication slot {slot} was invalidated by PostgreSQL (wal_status = lost: it fell further behind than max_slot_wal_keep_size allows), and the WAL the migration needs is gone; start the migration over with a new snapshot, and raise max_slot_wal_keep_size or keep the target closer behind"
        )));
    }
    if plugin.as_deref() != Some(super::replication::PGOUTPUT) {
        return Err(precondition(format!(
            "replication slot {slot} decodes with {}, not pgoutput: it is not ferry's; drop it or name another slot",
            plugin.as_deref().unwrap_or("no plugin (a physical slot)")
        )));
    }
    Ok(())
}

/// The position of a transaction's ops: see the module's documentation.
fn position_of(begin: Begin) -> Lsn {
    Lsn(begin.final_lsn.0 + 1)
}

/// What differs between two lists of (column, type OID), for people.
fn difference(before: &[(&str, u32)], after: &[(&str, u32)]) -> String {
    let mut parts = Vec::new();
    for (name, oid) in after {
        match before.iter().find(|(old, _)| old == name) {
            None => parts.push(format!("column {name} added")),
            Some((_, old)) if old != oid => {
                parts.push(format!("column {name} changed type (OID {old} -> {oid})"));
            }
            Some(_) => {}
        }
    }
    for (name, _) in before {
        if !after.iter().any(|(new, _)| new == name) {
            parts.push(format!("column {name} dropped or renamed"));
        }
    }
    if parts.is_empty() {
        parts.push("its columns are in another order".to_owned());
    }
    parts.join(", ")
}

/// Where a [`ChangeFeed`] reads from.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// The logical slot (made with the `pgoutput` plugin).
    pub slot: String,
    /// The publication naming the tables.
    pub publication: String,
    /// Transactions of positions above this (whose commit records start
    /// here or later), and above the slot's confirmed position, are read.
    pub start: Lsn,
    /// The tables, as an extract selects them.
    pub schemas: Vec<String>,
    /// Only these tables (`schema.table` or `table`).
    pub tables: Vec<String>,
}

/// What a [`ChangeFeed`] read.
// Ops are nearly every event: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum FeedEvent {
    /// An op of a transaction (the last of it has `txn_last`).
    Op(Op),
    /// A transaction committed (or the fence's copy of the sequences
    /// ended); all its ops came before this.
    Committed {
        /// The position of its ops: its commit LSN + 1 (the message's LSN
        /// for the sequences).
        position: Lsn,
    },
    /// A marker ferry wrote with `pg_logical_emit_message` (prefix
    /// `ferry`).
    Marker {
        /// Where it was written.
        lsn: Lsn,
        /// What it says.
        content: Bytes,
    },
    /// Nothing new: the server's WAL reaches `head` (sent at each of its
    /// keepalives).
    Idle {
        /// The server's WAL end.
        head: Lsn,
    },
}

/// How often a feed tells the server how far it got, at least: this, or a
/// quarter of the server's `wal_sender_timeout` (60 s by default) when
/// that is shorter.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a feed waits for the server before it looks whether a status
/// update is due (a newly confirmed position goes out within this), at
/// most.
const STATUS_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The changes of a logical slot as ops: [`ChangeDecoder`] over a
/// replication stream, telling the server at least every
/// [`STATUS_INTERVAL`] how far the target holds the changes (see
/// [`ChangeFeed::confirm`]), so that the slot's WAL is released and a slow
/// reader is never dropped for `wal_sender_timeout`.
pub struct ChangeFeed {
    stream: super::replication::LogicalReplicationStream,
    decoder: ChangeDecoder,
    decoded: std::collections::VecDeque<Decoded>,
    /// Durable on the target through here (the slot's confirmed position).
    confirmed: Lsn,
    /// The position of the last transaction read.
    received: Lsn,
    status_sent: tokio::time::Instant,
    /// `confirmed` as the server was last told it.
    confirmed_sent: Lsn,
    /// A status update at least this often.
    status_interval: std::time::Duration,
    /// Where confirmed positions come from, besides [`ChangeFeed::confirm`].
    confirmations: Option<tokio::sync::watch::Receiver<u64>>,
    /// Asks the feed to have the server report its end now.
    report: Option<Arc<tokio::sync::Notify>>,
    server: String,
}

impl ChangeFeed {
    /// Starts reading `options.slot` of the database `connection` reaches;
    /// the tables are read from the catalog as it is now.
    pub async fn start(
        connection: &super::PgConnection,
        options: &FeedOptions,
    ) -> crate::Result<Self> {
        Self::begin(connection, options)
            .await
            .map_err(|error| crate::adapters::AdapterError::source(error).into())
    }

    async fn begin(
        connection: &super::PgConnection,
        options: &FeedOptions,
    ) -> Result<Self, PgError> {
        let server = connection.server();
        let client = connection.connect().await?;
        let selection = super::catalog::Selection {
            schemas: options.schemas.clone(),
            tables: options.tables.clone(),
        };
        let catalog = super::catalog::read_now(&client, &server, &selection).await?;
        let plans = super::source::plan_tables(&catalog, &server)?;
        let version: String = client
            .query_one("SELECT pg_catalog.current_setting('server_version')", &[])
            .await
            .map_err(|error| PgError::statement(&server, "reading the server's version", &error))?
            .get(0);
        Self::open(
            connection,
            options,
            &plans,
            Bytes::from(version.into_bytes()),
        )
        .await
    }

    /// Starts reading with the tables of `plans` (a snapshot's).
    pub(super) async fn open(
        connection: &super::PgConnection,
        options: &FeedOptions,
        plans: &[Arc<TablePlan>],
        version: Bytes,
    ) -> Result<Self, PgError> {
        let server = connection.server();
        // The server ends a stream that says nothing for this long.
        let client = connection.connect().await?;
        let timeout_ms: i32 = client
            .query_one(
                "SELECT setting::int FROM pg_catalog.pg_settings WHERE name = 'wal_sender_timeout'",
                &[],
            )
            .await
            .map_err(|error| PgError::statement(&server, "reading wal_sender_timeout", &error))?
            .get(0);
        check_slot(&client, &server, &options.slot).await?;
        drop(client);
        let status_interval = match u64::try_from(timeout_ms) {
            Ok(timeout_ms) if timeout_ms > 0 => STATUS_INTERVAL
                .min(std::time::Duration::from_millis(timeout_ms / 4))
                .max(std::time::Duration::from_millis(50)),
            _ => STATUS_INTERVAL,
        };
        let mut taken_over = false;
        let stream = loop {
            let replication = super::replication::ReplicationConnection::connect(
                &connection.replication_config(),
            )
            .await
            .map_err(|error| PgError::replication("connecting for replication", error))?;
            let started = replication
                .start_logical_replication(
                    &options.slot,
                    options.start,
                    &[
                        ("proto_version", "1"),
                        ("publication_names", &options.publication),
                        ("messages", "true"),
                    ],
                )
                .await;
            match started {
                Ok(stream) => break stream,
                // Another reader holds the slot: the stream this one
                // resumes, broken on our side but not yet on the server's.
                // A resume takes the slot over, once.
                Err(error) if error.sqlstate() == Some("55006") && !taken_over => {
                    taken_over = true;
                    take_over_slot(connection, &server, &options.slot).await?;
                }
                Err(error) => {
                    return Err(PgError::replication(
                        format!("starting to read replication slot {}", options.slot),
                        error,
                    ));
                }
            }
        };
        Ok(Self {
            stream,
            decoder: ChangeDecoder::new(&server, version, plans),
            decoded: std::collections::VecDeque::new(),
            confirmed: Lsn(0),
            received: options.start,
            status_sent: tokio::time::Instant::now(),
            confirmed_sent: Lsn(0),
            status_interval,
            confirmations: None,
            report: None,
            server,
        })
    }

    /// Takes confirmed positions from `confirmations` too (another task's
    /// [`ChangeFeed::confirm`]).
    pub fn confirm_from(&mut self, confirmations: tokio::sync::watch::Receiver<u64>) {
        self.confirmations = Some(confirmations);
    }

    /// A notification on `report` asks the server for a keepalive at once:
    /// the next [`FeedEvent::Idle`] says where it stands.
    pub fn report_on(&mut self, report: Arc<tokio::sync::Notify>) {
        self.report = Some(report);
    }

    /// The target holds every transaction of a position at or below
    /// `position` durably: the slot may release the WAL before it, and a
    /// stream started again begins after it. Told to the server with the
    /// next status update.
    pub fn confirm(&mut self, position: Lsn) {
        self.confirmed = self.confirmed.max(position);
    }

    /// The next event. Cancel-safe.
    pub async fn next(&mut self) -> crate::Result<FeedEvent> {
        self.read()
            .await
            .map_err(|error| crate::adapters::AdapterError::source(error).into())
    }

    async fn read(&mut self) -> Result<FeedEvent, PgError> {
        use super::replication::ReplicationMessage;
        loop {
            if let Some(decoded) = self.decoded.pop_front() {
                return Ok(match decoded {
                    Decoded::Op(op) => FeedEvent::Op(op),
                    Decoded::Committed { position } => {
                        self.received = self.received.max(position);
                        FeedEvent::Committed { position }
                    }
                    Decoded::Marker(marker) => FeedEvent::Marker {
                        lsn: marker.lsn,
                        content: marker.content,
                    },
                });
            }
            self.tend_status().await?;
            let report = self.report.clone();
            let asked = async {
                match &report {
                    Some(report) => report.notified().await,
                    None => std::future::pending().await,
                }
            };
            let message = tokio::select! {
                message = tokio::time::timeout(self.check_interval(), self.stream.next_message()) => message,
                () = asked => {
                    self.send_status(true).await?;
                    continue;
                }
            };
            let Ok(message) = message else {
                continue;
            };
            let message = message
                .map_err(|error| PgError::replication("reading the change stream", error))?;
            match message {
                None => {
                    return Err(PgError::Unreachable {
                        server: self.server.clone(),
                        reason: "the server ended the change stream".to_owned(),
                    });
                }
                Some(ReplicationMessage::Keepalive(keepalive)) => {
                    if keepalive.reply_requested {
                        self.send_status(false).await?;
                    }
                    if !self.decoder.in_transaction() {
                        // The target holds all that came: nothing of ours
                        // lies before the server's end, and the slot may
                        // let the WAL of other changes go.
                        if self.confirmed >= self.received {
                            self.confirmed = self.confirmed.max(keepalive.wal_end);
                        }
                        return Ok(FeedEvent::Idle {
                            head: keepalive.wal_end,
                        });
                    }
                }
                Some(ReplicationMessage::XLogData(data)) => {
                    let lsn = data.wal_start;
                    let message =
                        PgOutputMessage::parse(data.data).map_err(|error| PgError::Follow {
                            server: self.server.clone(),
                            lsn: lsn.to_string(),
                            reason: error.to_string(),
                        })?;
                    let mut out = Vec::new();
                    self.decoder.decode(message, lsn, &mut out)?;
                    self.decoded.extend(out);
                }
            }
        }
    }

    /// How often [`ChangeFeed::keep_alive`] must be called while the
    /// reader does not read.
    pub fn check_interval(&self) -> std::time::Duration {
        STATUS_CHECK.min(self.status_interval)
    }

    /// Tells the server how far the target holds the stream, when a newly
    /// confirmed position or the status interval says so. A reader that
    /// stops reading events for a while (its consumer is slow) calls this
    /// every [`ChangeFeed::check_interval`] meanwhile, so that the server
    /// never ends the stream for `wal_sender_timeout`.
    pub async fn keep_alive(&mut self) -> crate::Result<()> {
        self.tend_status()
            .await
            .map_err(|error| crate::adapters::AdapterError::source(error).into())
    }

    async fn tend_status(&mut self) -> Result<(), PgError> {
        if let Some(confirmations) = &self.confirmations {
            let confirmed = Lsn(*confirmations.borrow());
            self.confirm(confirmed);
        }
        if self.status_sent.elapsed() >= self.status_interval
            || self.confirmed != self.confirmed_sent
        {
            self.send_status(false).await?;
        }
        Ok(())
    }

    async fn send_status(&mut self, reply_requested: bool) -> Result<(), PgError> {
        let status = super::replication::StandbyStatus {
            written: self.received,
            flushed: self.confirmed,
            applied: self.confirmed,
            reply_requested,
        };
        self.stream
            .send_standby_status(status)
            .await
            .map_err(|error| PgError::replication("telling the server how far ferry got", error))?;
        self.status_sent = tokio::time::Instant::now();
        self.confirmed_sent = self.confirmed;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequences_message(transactional: bool, content: &str) -> PgOutputMessage {
        PgOutputMessage::Message(LogicalMessage {
            transactional,
            lsn: Lsn(0x1000),
            prefix: SEQUENCES_PREFIX.to_owned(),
            content: Bytes::from(content.to_owned()),
        })
    }

    #[test]
    fn the_fences_sequences_become_the_extracts_setval_ops_in_one_group_at_the_messages_lsn()
    -> Result<(), PgError> {
        let mut decoder = ChangeDecoder::new("test", Bytes::from_static(b"15.0"), &[]);
        let values = vec![
            SequenceValue {
                schema: "public".to_owned(),
                name: "items_id_seq".to_owned(),
                last_value: 42,
                is_called: true,
                owned_by: Some(["public".to_owned(), "items".to_owned(), "id".to_owned()]),
                identity: false,
            },
            SequenceValue {
                schema: "app".to_owned(),
                name: "free".to_owned(),
                last_value: 1,
                is_called: false,
                owned_by: None,
                identity: false,
            },
        ];
        let content = serde_json::to_string(&SequencesMessage {
            fence: 3,
            sequences: values.clone(),
        })
        .expect("JSON");
        let mut out = Vec::new();
        decoder.decode(sequences_message(false, &content), Lsn(0xf00), &mut out)?;
        let version = Bytes::from_static(b"15.0");
        let mut want: Vec<Decoded> = values
            .iter()
            .map(|value| {
                let mut setval = setval_op(value, 0x1000, &version);
                setval.txn = 0x1000;
                setval.txn_last = false;
                Decoded::Op(setval)
            })
            .collect();
        if let Some(Decoded::Op(last)) = want.last_mut() {
            last.txn_last = true;
        }
        want.push(Decoded::Committed {
            position: Lsn(0x1000),
        });
        assert_eq!(out, want);
        if let Some(Decoded::Op(first)) = out.first() {
            assert_eq!(first.kind, "pg.sequence".as_bytes());
            assert_eq!(first.key, "sequence/public.items_id_seq".as_bytes());
            assert_eq!(first.method, "SETVAL".as_bytes());
        }

        // No sequence: nothing at all.
        let mut out = Vec::new();
        decoder.decode(
            sequences_message(false, r#"{"fence":3,"sequences":[]}"#),
            Lsn(0xf00),
            &mut out,
        )?;
        assert!(out.is_empty(), "{out:?}");

        // Inside a transaction, or not ferry's JSON: refused, naming why.
        let error = decoder
            .decode(sequences_message(true, &content), Lsn(0xf00), &mut out)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(error.contains("inside a transaction"), "{error}");
        let error = decoder
            .decode(sequences_message(false, "[1, 2]"), Lsn(0xf00), &mut out)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("not ferry's copy of the sequences"),
            "{error}"
        );
        Ok(())
    }
}

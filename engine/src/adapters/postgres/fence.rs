//! The fence of a PostgreSQL old plane: ferry's fence record in
//! `ferry.fence`, moved by the shared state machine
//! ([`crate::adapters::fence_record::decide`]), and the writes refused by
//! the database itself.
//!
//! A fence is one transaction: it locks the record, creates a statement
//! trigger `ferry_fence` on every table of the migration's publication
//! (`BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ... FOR EACH
//! STATEMENT`, `ENABLE ALWAYS`: it fires for superusers and under
//! `session_replication_role = replica` too) that raises SQLSTATE 25006
//! (read-only transaction) naming the migration, writes a
//! `pg_logical_emit_message` marker whose LSN is F, and writes the record.
//! `CREATE TRIGGER` waits for the writes in flight on each table and holds
//! back new ones until the fence commits, after which they fail: so every
//! write acknowledged before the fence committed before the marker, and F
//! is above its position (commit LSN + 1), while the fence's own
//! transaction, which the stream carries with the marker, reports a
//! position above F. `ALTER DATABASE ... default_transaction_read_only` is
//! no fence: any session can turn it off.
//!
//! Sequences: logical replication carries no `nextval`, so the fence,
//! once its triggers are created (every writer that could still commit a
//! row with a later value did so, and none will until the fence ends),
//! reads where every sequence the stream carries stands (the extract's
//! selection: those of the selected schemas, less those owned by a table
//! left out) and writes them, before the marker, in a non-transactional
//! `pg_logical_emit_message` under `ferry.sequences`
//! ([`super::follow::SEQUENCES_PREFIX`]), which the stream turns into the
//! extract's `pg.sequence` `SETVAL` ops below F (why not a transactional
//! one: `follow.rs`). A fence that fails after it leaves the values copied:
//! harmless, they are values the source had, and the next fence copies
//! them again.
//!
//! An unfence drops the triggers (found by name in the catalog) in the
//! transaction that writes the record; a commit keeps them for good (and
//! `live.rs` then drops the slot and the publication).
//! Movers take an advisory lock first, so two never interleave.

use tokio_postgres::Client;

use super::catalog::{self, Selection};
use super::follow::{SEQUENCES_PREFIX, SequencesMessage};
use super::{FERRY_SCHEMA, PgConnection, PgError, qualified, quote_ident, quote_literal};
use crate::adapters::fence_record::{Decision, Fence, Move, StoredFence, decide};
use crate::adapters::live::{FenceAnswer, Position};

/// The trigger that refuses writes on a fenced table.
pub(super) const FENCE_TRIGGER: &str = "ferry_fence";

/// The advisory lock every move of the record takes (in its transaction).
const FENCE_LOCK: i64 = 0x6665_7272_7966_656e; // "ferryfen"

/// The record as stored: `None` when no migration ever fenced the plane.
pub(super) async fn read_fence(
    client: &Client,
    server: &str,
) -> Result<Option<StoredFence>, PgError> {
    let exists: bool = client
        .query_one(
            "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
            &[&format!("{}.fence", quote_ident(FERRY_SCHEMA))],
        )
        .await
        .map_err(|error| PgError::statement(server, "looking for the fence record", &error))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt(
            &format!(
                "SELECT record::text, moved_at::text, fenced_at::text FROM {}.fence WHERE id = 1",
                quote_ident(FERRY_SCHEMA)
            ),
            &[],
        )
        .await
        .map_err(|error| PgError::statement(server, "reading the fence record", &error))?;
    let Some(row) = row else {
        return Ok(None);
    };
    stored_fence(server, row.get(0), row.get(1), row.get(2)).map(Some)
}

fn stored_fence(
    server: &str,
    record: String,
    moved_at: Option<String>,
    fenced_at: Option<String>,
) -> Result<StoredFence, PgError> {
    let unreadable = |reason: String| PgError::Precondition {
        server: server.to_owned(),
        reason: format!(
            "the fence record in {FERRY_SCHEMA}.fence is not ferry's ({reason}): leave the table to ferry"
        ),
    };
    let fence: Fence =
        serde_json::from_str(&record).map_err(|error| unreadable(error.to_string()))?;
    let lsn = |text: Option<String>| -> Result<Option<i64>, PgError> {
        text.map(|text| {
            text.parse::<super::replication::Lsn>()
                .map(|lsn| lsn.0 as i64)
                .map_err(|error| unreadable(error.to_string()))
        })
        .transpose()
    };
    Ok(StoredFence {
        fence,
        mod_revision: lsn(moved_at)?.unwrap_or(0),
        fenced_revision: lsn(fenced_at)?,
    })
}

/// Whether any table holds ferry's fence trigger.
pub(super) async fn triggers_raised(client: &Client, server: &str) -> Result<bool, PgError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgname = $1)",
            &[&FENCE_TRIGGER],
        )
        .await
        .map_err(|error| PgError::statement(server, "looking for fence triggers", &error))?
        .get(0))
}

/// Moves the record of the database `connection` reaches as `wanted` says,
/// fencing the tables of `publication` and copying the sequences
/// `selection` picks.
pub(super) async fn move_fence(
    connection: &PgConnection,
    publication: &str,
    selection: &Selection,
    wanted: &Move,
) -> Result<FenceAnswer, PgError> {
    let server = connection.server();
    let mut client = connection.connect().await?;
    let failed =
        |what: &str, error: tokio_postgres::Error| PgError::statement(&server, what, &error);
    let transaction = client
        .transaction()
        .await
        .map_err(|error| failed("beginning the fence's transaction", error))?;
    let ferry = quote_ident(FERRY_SCHEMA);
    transaction
        .execute(
            "SELECT pg_catalog.pg_advisory_xact_lock($1)",
            &[&FENCE_LOCK],
        )
        .await
        .map_err(|error| failed("taking the fence's lock", error))?;
    transaction
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {ferry}; \
             CREATE TABLE IF NOT EXISTS {ferry}.fence (\
                 id int PRIMARY KEY CHECK (id = 1), record jsonb NOT NULL, \
                 moved_at pg_lsn, fenced_at pg_lsn)"
        ))
        .await
        .map_err(|error| failed("creating the fence record's table", error))?;
    let row = transaction
        .query_opt(
            &format!(
                "SELECT record::text, moved_at::text, fenced_at::text FROM {ferry}.fence WHERE id = 1 FOR UPDATE"
            ),
            &[],
        )
        .await
        .map_err(|error| failed("reading the fence record", error))?;
    let stored = match row {
        Some(row) => Some(stored_fence(&server, row.get(0), row.get(1), row.get(2))?),
        None => None,
    };
    let next = match decide(stored.as_ref(), wanted) {
        Decision::Refuse(reason) => return Ok(FenceAnswer::Refused(format!("{server}: {reason}"))),
        Decision::AlreadyDone(position) => {
            return Ok(FenceAnswer::Done(Position(position.max(0) as u64)));
        }
        Decision::Write(next) => next,
    };
    let was_fenced = stored
        .as_ref()
        .is_some_and(|stored| stored.fenced_revision.is_some());
    let mut fenced_at: Option<String> = stored
        .as_ref()
        .and_then(|stored| stored.fenced_revision)
        .map(|position| super::replication::Lsn(position as u64).to_string());
    if next.fenced && !was_fenced {
        let published: Vec<(String, String)> = transaction
            .query(
                "SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
                &[&publication],
            )
            .await
            .map_err(|error| failed("reading the migration's tables", error))?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let tables: Vec<String> = published
            .iter()
            .map(|(schema, name)| qualified(schema, name))
            .collect();
        if tables.is_empty() {
            return Ok(FenceAnswer::Refused(format!(
                "{server}: publication {publication} names no table: no live stream of this database was opened, so there is nothing to fence"
            )));
        }
        let message = format!(
            "%s is fenced: ferry migration epoch {} moves this database to {}; retry against it",
            next.epoch,
            next.successor.as_deref().unwrap_or("its successor")
        );
        let mut sql = format!(
            "CREATE OR REPLACE FUNCTION {ferry}.refuse_writes() RETURNS trigger LANGUAGE plpgsql AS $ferry$ \
             BEGIN RAISE EXCEPTION USING ERRCODE = '25006', MESSAGE = format({}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME); END $ferry$;",
            quote_literal(&message)
        );
        for table in &tables {
            let trigger = quote_ident(FENCE_TRIGGER);
            sql.push_str(&format!(
                " DROP TRIGGER IF EXISTS {trigger} ON {table}; \
                 CREATE TRIGGER {trigger} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} \
                 FOR EACH STATEMENT EXECUTE FUNCTION {ferry}.refuse_writes(); \
                 ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger};"
            ));
        }
        transaction
            .batch_execute(&sql)
            .await
            .map_err(|error| failed("creating the fence's triggers", error))?;
        copy_sequences(&transaction, &server, selection, &published, next.epoch).await?;
        let marker = serde_json::json!({ "fence": next.epoch }).to_string();
        let position: String = transaction
            .query_one(
                "SELECT pg_catalog.pg_logical_emit_message(true, $1::text, $2::text)::text",
                &[&super::follow::MARKER_PREFIX, &marker],
            )
            .await
            .map_err(|error| failed("writing the fence's marker", error))?
            .get(0);
        fenced_at = Some(position);
    } else if !next.fenced && was_fenced {
        drop_triggers(&transaction, &server).await?;
        fenced_at = None;
    }
    let record = serde_json::to_string(&next).unwrap_or_default();
    let moved_at: String = transaction
        .query_one(
            &format!(
                "INSERT INTO {ferry}.fence (id, record, moved_at, fenced_at) \
                 VALUES (1, $1::text::jsonb, pg_catalog.pg_current_wal_insert_lsn(), $2::text::pg_lsn) \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record, moved_at = EXCLUDED.moved_at, fenced_at = EXCLUDED.fenced_at \
                 RETURNING moved_at::text"
            ),
            &[&record, &fenced_at],
        )
        .await
        .map_err(|error| failed("writing the fence record", error))?
        .get(0);
    transaction
        .commit()
        .await
        .map_err(|error| failed("committing the fence record", error))?;
    // F for a fence or a commit, the record's own write for an unfence.
    let answer = match (wanted, fenced_at) {
        (Move::Unfence { .. }, _) | (_, None) => moved_at,
        (_, Some(fenced_at)) => fenced_at,
    }
    .parse::<super::replication::Lsn>()
    .map_or(0, |lsn| lsn.0);
    tracing::info!(?wanted, position = %super::replication::Lsn(answer), "fence record moved");
    Ok(FenceAnswer::Done(Position(answer)))
}

/// Writes where the sequences stand in a non-transactional
/// [`SEQUENCES_PREFIX`] message (see the module's documentation); nothing
/// when there is none.
async fn copy_sequences(
    transaction: &tokio_postgres::Transaction<'_>,
    server: &str,
    selection: &Selection,
    published: &[(String, String)],
    epoch: u64,
) -> Result<(), PgError> {
    let client = transaction.client();
    let sequences = catalog::read_sequences(client, server, selection, published).await?;
    if sequences.is_empty() {
        return Ok(());
    }
    let message = SequencesMessage {
        fence: epoch,
        sequences: catalog::sequence_values(client, server, &sequences).await?,
    };
    let content = serde_json::to_string(&message).unwrap_or_default();
    let position: String = client
        .query_one(
            "SELECT pg_catalog.pg_logical_emit_message(false, $1::text, $2::text)::text",
            &[&SEQUENCES_PREFIX, &content],
        )
        .await
        .map_err(|error| PgError::statement(server, "copying the sequences", &error))?
        .get(0);
    tracing::info!(
        sequences = message.sequences.len(),
        %position,
        "the fence copied the sequences"
    );
    Ok(())
}

/// Drops ferry's fence trigger from every table that has it.
async fn drop_triggers(
    transaction: &tokio_postgres::Transaction<'_>,
    server: &str,
) -> Result<(), PgError> {
    let tables: Vec<String> = transaction
        .query(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_trigger t \
             JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE t.tgname = $1",
            &[&FENCE_TRIGGER],
        )
        .await
        .map_err(|error| PgError::statement(server, "finding the fence's triggers", &error))?
        .iter()
        .map(|row| qualified(row.get(0), row.get(1)))
        .collect();
    let sql: String = tables
        .iter()
        .map(|table| {
            format!(
                "DROP TRIGGER IF EXISTS {} ON {table};",
                quote_ident(FENCE_TRIGGER)
            )
        })
        .collect();
    if sql.is_empty() {
        return Ok(());
    }
    transaction
        .batch_execute(&sql)
        .await
        .map_err(|error| PgError::statement(server, "dropping the fence's triggers", &error))
}

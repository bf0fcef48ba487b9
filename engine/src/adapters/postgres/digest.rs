//! A PostgreSQL plane summed up, for `ferry migrate --verify` and the
//! conformance suite: every row of the selected tables, as the extract
//! would carry it (its key and its JSON body), read in one REPEATABLE READ
//! transaction with `COPY`, a row at a time (memory stays flat).
//!
//! - `set_sha256`: the order-independent [`SetDigest`] of every row, the
//!   same sum a version chain's image of a stream gives
//!   ([`digest_entry`]).
//! - `sha256`: SHA-256 over each table's name and its own set digest, in
//!   table order. Rows have no order a digest could rely on across servers
//!   (a primary key's text sorts by the column's collation, which may differ
//!   between versions), so within a table the sum is the order.
//!
//! The plane is read as it is: on an old plane at F (fenced), that is the
//! plane at F.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest as _, Sha256};

use super::catalog::{self, Selection};
use super::source::{RowFormat, RowOps, TablePlan, plan_tables};
use super::{KIND_ROW, KIND_ROWS, PgConnection, PgError};
use crate::Op;
use crate::adapters::digest::{SetDigest, hash_entry};
use crate::adapters::live::{DigestEntry, PlaneDigest, Position};

/// What a PostgreSQL op counts as in [`digest`]: an inserted row its key
/// and body; the schema, indexes, keys and sequences nothing; an update or
/// delete, or a run of rows as COPY text (whose rows have no keys), cannot
/// be compared.
pub fn digest_entry(op: &Op) -> DigestEntry<'_> {
    if op.kind.as_ref() == KIND_ROWS.as_bytes() {
        DigestEntry::Unverifiable
    } else if op.kind.as_ref() != KIND_ROW.as_bytes() {
        DigestEntry::Uncounted
    } else if op.method.as_ref() == b"INSERT" {
        DigestEntry::Entry {
            key: &op.key,
            value: &op.body,
        }
    } else {
        DigestEntry::Unverifiable
    }
}

/// The digest of the tables `selection` picks in the database `connection`
/// reaches.
pub(super) async fn digest(
    connection: &PgConnection,
    selection: &Selection,
) -> Result<PlaneDigest, PgError> {
    let server = connection.server();
    let client = connection.connect().await?;
    let failed =
        |what: &str, error: tokio_postgres::Error| PgError::statement(&server, what, &error);
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|error| failed("beginning the digest's transaction", error))?;
    let position: String = client
        .query_one("SELECT pg_catalog.pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|error| failed("reading the WAL position", error))?
        .get(0);
    let position = position
        .parse::<super::replication::Lsn>()
        .map_or(0, |lsn| lsn.0);
    let catalog = catalog::read(&client, &server, selection).await?;
    let plans: Vec<Arc<TablePlan>> = plan_tables(&catalog, &server)?;
    let mut tables = Sha256::new();
    let mut all = SetDigest::default();
    for plan in plans {
        let name = plan.table.display_name();
        let what = format!("reading {name} for the digest");
        let stream = client
            .copy_out(plan.copy_statement(None, RowFormat::Json).as_str())
            .await
            .map_err(|error| failed(&what, error))?;
        let mut stream = std::pin::pin!(stream);
        let mut rows = RowOps::new(plan.clone(), 0, Bytes::new(), server.clone());
        let mut table = SetDigest::default();
        while let Some(line) = stream.next().await {
            let line = line.map_err(|error| failed(&what, error))?;
            let op = rows.op(&line)?;
            table.add(&op.key, &op.body);
            all.add(&op.key, &op.body);
        }
        hash_entry(&mut tables, name.as_bytes(), &table.sum());
    }
    let _ = client.batch_execute("COMMIT").await;
    Ok(PlaneDigest {
        keys: all.keys,
        bytes: all.bytes,
        sha256: tables.finalize().into(),
        set_sha256: all.sum(),
        position: Position(position),
    })
}

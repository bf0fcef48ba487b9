//! What a database holds besides rows, read from its catalog inside the
//! extract's snapshot: the extensions, enum types, sequences, tables with
//! their columns and keys, indexes and constraints, and the `pg_type` rows
//! the value codec classifies columns with.
//!
//! Every definition PostgreSQL prints for us (`format_type`, column
//! defaults, `pg_get_indexdef`, `pg_get_constraintdef`) is read with an
//! empty `search_path`, so every name in it is schema-qualified and means
//! the same on the target, whose restore runs with an empty `search_path`
//! too.

use std::collections::BTreeSet;

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::PgError;
use super::value::{TypeCatalog, TypeRow};

/// Schemas that are never extracted.
const SYSTEM_SCHEMAS: &[&str] = &[
    "pg_catalog",
    "information_schema",
    "pg_toast",
    super::FERRY_SCHEMA,
];

/// An extension the database has, which its tables' types may come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    /// Its name (`citext`).
    pub name: String,
    /// The schema its objects live in.
    pub schema: String,
}

/// An enum type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnumType {
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// Its labels, in sort order.
    pub labels: Vec<String>,
}

/// A sequence and how it counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequence {
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// `smallint`, `integer` or `bigint`.
    #[serde(rename = "type")]
    pub data_type: String,
    /// START WITH.
    pub start: i64,
    /// INCREMENT BY.
    pub increment: i64,
    /// MINVALUE.
    pub min: i64,
    /// MAXVALUE.
    pub max: i64,
    /// CACHE.
    pub cache: i64,
    /// CYCLE.
    pub cycle: bool,
    /// The column it belongs to (a `serial`'s OWNED BY), `table.column` in
    /// the sequence's schema... as `[schema, table, column]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned_by: Option<[String; 3]>,
    /// True for an identity column's sequence, which the table creates.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub identity: bool,
}

/// Where a sequence stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceValue {
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// `last_value`.
    pub last_value: i64,
    /// `is_called`: whether `nextval` returns the next value or this one.
    pub is_called: bool,
    /// See [`Sequence::owned_by`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned_by: Option<[String; 3]>,
    /// See [`Sequence::identity`]: the target finds the sequence through
    /// the identity column (`owned_by`) rather than by this name.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub identity: bool,
}

/// A column of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// Its type as `format_type` prints it (`character varying(255)`).
    #[serde(rename = "type")]
    pub type_name: String,
    /// The type's oid on the source (not carried: oids differ).
    #[serde(skip)]
    pub type_oid: u32,
    /// NOT NULL.
    #[serde(default)]
    pub not_null: bool,
    /// DEFAULT, as PostgreSQL prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// `always` or `by default` for an identity column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// An identity column's sequence: its name and how it counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_sequence: Option<Box<Sequence>>,
    /// The expression of a stored generated column (never copied: the
    /// target computes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated: Option<String>,
    /// COLLATE, when not the type's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collation: Option<String>,
}

/// A table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// Its columns, in order.
    pub columns: Vec<Column>,
    /// The primary key's columns, in key order; empty when it has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub primary_key: Vec<String>,
    /// `UNLOGGED`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unlogged: bool,
    /// The table's oid on the source.
    #[serde(skip)]
    pub oid: u32,
    /// Pages on disk when read (for splitting the copy).
    #[serde(skip)]
    pub pages: u64,
    /// `d`efault, `n`othing, `f`ull, `i`ndex: what its replica identity is.
    #[serde(skip)]
    pub replica_identity: char,
}

impl Table {
    /// `schema.name`, for keys and messages.
    pub fn display_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The columns a copy reads and writes: all but stored generated ones.
    pub fn copied_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns
            .iter()
            .filter(|column| column.generated.is_none())
    }
}

/// An index that backs no constraint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Its schema.
    pub schema: String,
    /// Its table.
    pub table: String,
    /// Its name.
    pub name: String,
    /// `CREATE INDEX ...` as `pg_get_indexdef` prints it.
    pub definition: String,
}

/// A constraint: primary key, unique, exclusion, check, foreign key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    /// Its table's schema.
    pub schema: String,
    /// Its table.
    pub table: String,
    /// Its name.
    pub name: String,
    /// `p`, `u`, `x`, `c` or `f`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What follows `ADD CONSTRAINT name`, as `pg_get_constraintdef`
    /// prints it.
    pub definition: String,
}

/// What the extract reads of a database's catalog.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Extensions (plpgsql left out).
    pub extensions: Vec<Extension>,
    /// Enum types the tables may use.
    pub enums: Vec<EnumType>,
    /// Sequences of the extracted schemas.
    pub sequences: Vec<Sequence>,
    /// Tables, in schema and name order.
    pub tables: Vec<Table>,
    /// Indexes backing no constraint.
    pub indexes: Vec<Index>,
    /// Constraints, primary and unique keys first, foreign keys last.
    pub constraints: Vec<Constraint>,
    /// Every `pg_type` row, for the value codec.
    pub types: TypeCatalog,
}

/// Which tables to read.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these schemas; all but the system's and ferry's when empty.
    pub schemas: Vec<String>,
    /// Only these tables (`schema.table` or `table`); all when empty.
    pub tables: Vec<String>,
}

impl Selection {
    fn wants_schema(&self, schema: &str) -> bool {
        if self.schemas.is_empty() {
            !SYSTEM_SCHEMAS.contains(&schema) && !schema.starts_with("pg_")
        } else {
            self.schemas.iter().any(|wanted| wanted == schema)
        }
    }

    fn wants_table(&self, schema: &str, name: &str) -> bool {
        self.wants_schema(schema)
            && (self.tables.is_empty()
                || self
                    .tables
                    .iter()
                    .any(|wanted| wanted == name || *wanted == format!("{schema}.{name}")))
    }
}

/// Reads the catalog as it is now, in a read-only transaction of its own
/// (a live stream's tables, outside any snapshot).
pub async fn read_now(
    client: &Client,
    server: &str,
    selection: &Selection,
) -> Result<Catalog, PgError> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|error| PgError::statement(server, "reading the catalog", &error))?;
    let catalog = read(client, server, selection).await;
    let _ = client.batch_execute("COMMIT").await;
    catalog
}

/// Reads the catalog in the client's open transaction (the snapshot).
pub async fn read(
    client: &Client,
    server: &str,
    selection: &Selection,
) -> Result<Catalog, PgError> {
    let failed =
        |what: &str, error: tokio_postgres::Error| PgError::statement(server, what, &error);
    client
        .batch_execute("SET LOCAL search_path = ''")
        .await
        .map_err(|error| failed("emptying the search path", error))?;
    let mut catalog = Catalog::default();

    for row in client
        .query(
            "SELECT oid, typname, typtype, typcategory, typelem, typbasetype, typdelim FROM pg_catalog.pg_type",
            &[],
        )
        .await
        .map_err(|error| failed("reading pg_type", error))?
    {
        catalog.types.insert(TypeRow {
            oid: row.get(0),
            name: row.get(1),
            kind: row.get::<_, i8>(2) as u8,
            category: row.get::<_, i8>(3) as u8,
            element_oid: row.get(4),
            base_oid: row.get(5),
            delimiter: row.get::<_, i8>(6) as u8,
        });
    }

    for row in client
        .query(
            "SELECT e.extname, n.nspname FROM pg_catalog.pg_extension e \
             JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace \
             WHERE e.extname <> 'plpgsql' ORDER BY e.extname",
            &[],
        )
        .await
        .map_err(|error| failed("reading pg_extension", error))?
    {
        catalog.extensions.push(Extension {
            name: row.get(0),
            schema: row.get(1),
        });
    }

    // Tables and their columns.
    let rows = client
        .query(
            "SELECT c.oid, n.nspname, c.relname, c.relkind::text, c.relpersistence::text, c.relreplident::text, \
                    pg_catalog.pg_relation_size(c.oid) / pg_catalog.current_setting('block_size')::bigint, \
                    a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypid, a.attnotnull, \
                    pg_catalog.pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text, \
                    CASE WHEN a.attcollation <> t.typcollation THEN (SELECT pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname) \
                        FROM pg_catalog.pg_collation co JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace WHERE co.oid = a.attcollation) END \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum \
             WHERE c.relkind IN ('r', 'p') \
             ORDER BY n.nspname, c.relname, a.attnum",
            &[],
        )
        .await
        .map_err(|error| failed("reading the tables' columns", error))?;
    let mut partitioned = Vec::new();
    for row in rows {
        let schema: String = row.get(1);
        let name: String = row.get(2);
        if !selection.wants_table(&schema, &name) {
            continue;
        }
        let kind: String = row.get(3);
        if kind == "p" {
            partitioned.push(format!("{schema}.{name}"));
            continue;
        }
        let oid: u32 = row.get(0);
        if catalog.tables.last().is_none_or(|table| table.oid != oid) {
            catalog.tables.push(Table {
                schema: schema.clone(),
                name: name.clone(),
                columns: Vec::new(),
                primary_key: Vec::new(),
                unlogged: row.get::<_, String>(4) == "u",
                oid,
                pages: row.get::<_, Option<i64>>(6).unwrap_or(0).max(0) as u64,
                replica_identity: row.get::<_, String>(5).chars().next().unwrap_or('d'),
            });
        }
        let identity = match row.get::<_, String>(12).as_str() {
            "a" => Some("always".to_owned()),
            "d" => Some("by default".to_owned()),
            _ => None,
        };
        let expression: Option<String> = row.get(11);
        let generated = row.get::<_, String>(13) == "s";
        let column = Column {
            name: row.get(7),
            type_name: row.get(8),
            type_oid: row.get(9),
            not_null: row.get(10),
            default: if generated { None } else { expression.clone() },
            identity,
            identity_sequence: None,
            generated: if generated { expression } else { None },
            collation: row.get(14),
        };
        if let Some(table) = catalog.tables.last_mut() {
            table.columns.push(column);
        }
    }
    if !partitioned.is_empty() {
        return Err(PgError::Precondition {
            server: server.to_owned(),
            reason: format!(
                "partitioned tables are not carried yet: {}; leave them out with --schema/--table",
                partitioned.join(", ")
            ),
        });
    }
    for wanted in &selection.tables {
        let found = catalog
            .tables
            .iter()
            .any(|table| *wanted == table.name || *wanted == table.display_name());
        if !found {
            return Err(PgError::Precondition {
                server: server.to_owned(),
                reason: format!("--table {wanted}: no such table in the schemas extracted"),
            });
        }
    }
    let table_oids: Vec<u32> = catalog.tables.iter().map(|table| table.oid).collect();

    // Constraints, then the primary keys' columns from them.
    for row in client
        .query(
            "SELECT n.nspname, c.relname, k.conname, k.contype::text, pg_catalog.pg_get_constraintdef(k.oid), \
                    CASE WHEN k.contype = 'p' THEN (SELECT pg_catalog.array_agg(a.attname ORDER BY u.ord) \
                        FROM pg_catalog.unnest(k.conkey) WITH ORDINALITY u(attnum, ord) \
                        JOIN pg_catalog.pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.attnum) END \
             FROM pg_catalog.pg_constraint k \
             JOIN pg_catalog.pg_class c ON c.oid = k.conrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE k.conrelid = ANY($1) AND k.contype IN ('p', 'u', 'x', 'c', 'f') AND k.conislocal \
             ORDER BY CASE k.contype WHEN 'p' THEN 0 WHEN 'u' THEN 1 WHEN 'x' THEN 2 WHEN 'c' THEN 3 ELSE 4 END, n.nspname, c.relname, k.conname",
            &[&table_oids],
        )
        .await
        .map_err(|error| failed("reading the constraints", error))?
    {
        let constraint = Constraint {
            schema: row.get(0),
            table: row.get(1),
            name: row.get(2),
            kind: row.get(3),
            definition: row.get(4),
        };
        if constraint.kind == "p" {
            let columns: Vec<String> = row.get::<_, Option<Vec<String>>>(5).unwrap_or_default();
            if let Some(table) = catalog
                .tables
                .iter_mut()
                .find(|table| table.schema == constraint.schema && table.name == constraint.table)
            {
                table.primary_key = columns;
            }
        }
        catalog.constraints.push(constraint);
    }

    for row in client
        .query(
            "SELECT n.nspname, c.relname, i.relname, pg_catalog.pg_get_indexdef(x.indexrelid) \
             FROM pg_catalog.pg_index x \
             JOIN pg_catalog.pg_class c ON c.oid = x.indrelid \
             JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = i.relnamespace \
             WHERE x.indrelid = ANY($1) \
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k WHERE k.conindid = x.indexrelid AND k.conrelid = x.indrelid) \
             ORDER BY n.nspname, c.relname, i.relname",
            &[&table_oids],
        )
        .await
        .map_err(|error| failed("reading the indexes", error))?
    {
        catalog.indexes.push(Index {
            schema: row.get(0),
            table: row.get(1),
            name: row.get(2),
            definition: row.get(3),
        });
    }

    let tables: Vec<(String, String)> = catalog
        .tables
        .iter()
        .map(|table| (table.schema.clone(), table.name.clone()))
        .collect();
    catalog.sequences = read_sequences(client, server, selection, &tables).await?;

    // An identity column carries its sequence's name and options: the
    // table creates that sequence.
    for sequence in catalog
        .sequences
        .iter()
        .filter(|sequence| sequence.identity)
    {
        let Some([schema, table, column]) = &sequence.owned_by else {
            continue;
        };
        let column = catalog
            .tables
            .iter_mut()
            .filter(|candidate| &candidate.schema == schema && &candidate.name == table)
            .flat_map(|table| table.columns.iter_mut())
            .find(|candidate| &candidate.name == column);
        if let Some(column) = column {
            column.identity_sequence = Some(Box::new(sequence.clone()));
        }
    }

    // Enum types: those of the schemas extracted and those a column uses
    // (itself, or as an array's element).
    let used: BTreeSet<u32> = catalog
        .tables
        .iter()
        .flat_map(|table| table.columns.iter().map(|column| column.type_oid))
        .flat_map(|oid| [oid, catalog.types.element_of(oid)])
        .collect();
    for row in client
        .query(
            "SELECT t.oid, n.nspname, t.typname, pg_catalog.array_agg(e.enumlabel::text ORDER BY e.enumsortorder) \
             FROM pg_catalog.pg_type t \
             JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace \
             JOIN pg_catalog.pg_enum e ON e.enumtypid = t.oid \
             GROUP BY t.oid, n.nspname, t.typname ORDER BY n.nspname, t.typname",
            &[],
        )
        .await
        .map_err(|error| failed("reading the enum types", error))?
    {
        let oid: u32 = row.get(0);
        let schema: String = row.get(1);
        if used.contains(&oid) || selection.wants_schema(&schema) {
            catalog.enums.push(EnumType {
                schema,
                name: row.get(2),
                labels: row.get(3),
            });
        }
    }
    Ok(catalog)
}

/// The sequences of the schemas `selection` picks, with the identity and
/// serial columns they belong to; a sequence owned by a table that is not
/// one of `tables` (`schema`, `name`) is left out with it. The extract's
/// catalog and the live fence (which copies their values) choose alike.
pub(super) async fn read_sequences(
    client: &Client,
    server: &str,
    selection: &Selection,
    tables: &[(String, String)],
) -> Result<Vec<Sequence>, PgError> {
    let mut sequences = Vec::new();
    for row in client
        .query(
            "SELECT n.nspname, c.relname, pg_catalog.format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, \
                    s.seqmin, s.seqmax, s.seqcache, s.seqcycle, \
                    tn.nspname, t.relname, a.attname, d.deptype::text \
             FROM pg_catalog.pg_sequence s \
             JOIN pg_catalog.pg_class c ON c.oid = s.seqrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid \
                  AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.deptype IN ('a', 'i') \
             LEFT JOIN pg_catalog.pg_class t ON t.oid = d.refobjid \
             LEFT JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace \
             LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
             ORDER BY n.nspname, c.relname",
            &[],
        )
        .await
        .map_err(|error| PgError::statement(server, "reading the sequences", &error))?
    {
        let schema: String = row.get(0);
        if !selection.wants_schema(&schema) {
            continue;
        }
        let owner: Option<(String, String, String)> = match (
            row.get::<_, Option<String>>(9),
            row.get::<_, Option<String>>(10),
            row.get::<_, Option<String>>(11),
        ) {
            (Some(schema), Some(table), Some(column)) => Some((schema, table, column)),
            _ => None,
        };
        let identity = row.get::<_, Option<String>>(12).as_deref() == Some("i");
        // A sequence owned by a table left out goes with it.
        if let Some((owner_schema, owner_table, _)) = &owner
            && !tables
                .iter()
                .any(|(schema, name)| schema == owner_schema && name == owner_table)
        {
            continue;
        }
        sequences.push(Sequence {
            schema,
            name: row.get(1),
            data_type: row.get(2),
            start: row.get(3),
            increment: row.get(4),
            min: row.get(5),
            max: row.get(6),
            cache: row.get(7),
            cycle: row.get(8),
            owned_by: owner.map(|(schema, table, column)| [schema, table, column]),
            identity,
        });
    }
    Ok(sequences)
}

/// Where each of `sequences` stands now, in their order. Sequences are not
/// transactional: read inside a snapshot, a value is at least what it was
/// at the snapshot, so the target never hands out an id the source had.
/// The reads go out together (pipelined on the one connection): the live
/// fence reads them while writes wait.
pub async fn sequence_values(
    client: &Client,
    server: &str,
    sequences: &[Sequence],
) -> Result<Vec<SequenceValue>, PgError> {
    // Futures of an `async fn` in a vector, not a closure's: a closure
    // returning a future makes callers' futures not `Send`.
    let mut reads = Vec::with_capacity(sequences.len());
    for sequence in sequences {
        reads.push(sequence_value(client, server, sequence));
    }
    futures::stream::iter(reads)
        .buffered(SEQUENCE_READS_IN_FLIGHT)
        .try_collect()
        .await
}

async fn sequence_value(
    client: &Client,
    server: &str,
    sequence: &Sequence,
) -> Result<SequenceValue, PgError> {
    let name = super::qualified(&sequence.schema, &sequence.name);
    let row = client
        .query_one(&format!("SELECT last_value, is_called FROM {name}"), &[])
        .await
        .map_err(|error| PgError::statement(server, format!("reading sequence {name}"), &error))?;
    Ok(SequenceValue {
        schema: sequence.schema.clone(),
        name: sequence.name.clone(),
        last_value: row.get(0),
        is_called: row.get(1),
        owned_by: sequence.owned_by.clone(),
        identity: sequence.identity,
    })
}

/// Sequence reads in flight on one connection at most.
const SEQUENCE_READS_IN_FLIGHT: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selection_leaves_system_schemas_and_ferrys_out() {
        let all = Selection::default();
        assert!(all.wants_schema("public"));
        for schema in [
            "pg_catalog",
            "information_schema",
            "pg_toast",
            "pg_temp_3",
            "ferry",
        ] {
            assert!(!all.wants_schema(schema), "{schema}");
        }
        let some = Selection {
            schemas: vec!["app".to_owned()],
            tables: vec!["runs".to_owned(), "app.flows".to_owned()],
        };
        assert!(some.wants_table("app", "runs"));
        assert!(some.wants_table("app", "flows"));
        assert!(!some.wants_table("app", "steps"));
        assert!(!some.wants_table("public", "runs"));
    }
}

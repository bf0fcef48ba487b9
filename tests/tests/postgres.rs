//! The PostgreSQL adapter end to end, against real PostgreSQL 15 servers the
//! tests start, with `ferry` run as a command: `ferry extract` of a source
//! database, `ferry verify`, `ferry restore` into an empty database of
//! another server, and the two compared through SQL alone (row counts, an
//! order-independent digest of every table's rows, every sequence's
//! position, `pg_dump --schema-only`).
//!
//! What is proved: every supported type and table shape comes back exactly;
//! a million rows split into page ranges copied at once; an extract under
//! writers is the database at one instant; a restore killed twice resumes
//! to an equal copy with no row twice; the errors a user meets say what and
//! where and leave nothing behind (no slot on a source, no table on a
//! target); `--keep-slot` leaves a slot at the backup's position, a killed
//! extract leaves no temporary slot, and a kept slot left by a killed
//! extract is taken again; a restore through Metaflow's version chain adds
//! a column on the rows, and back. The same with rows as COPY text
//! (`--row-format copy`): every type round-trips, a restore killed twice
//! resumes to an equal copy, a version chain refuses it, and a run of rows
//! for other columns than the target table's is refused by name.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ferry_tests::pg::{PgOptions, PgServer};
use ferry_tests::pg_data::{
    RunningFerry, Store, assert_same_database, extract, ferry_ok, ferry_with_env, manifest, number,
    replication_slots, rows_digest, scalar, sequence_positions, table_digests, total_rows,
    user_tables, wait_until,
};

/// The adapter's `CHUNK_PAGES` (engine/src/adapters/postgres/source.rs): a
/// table of more pages than this is copied as several page ranges.
const CHUNK_PAGES: i64 = 4_096;

/// How long any bounded wait of these tests may take before it is a
/// failure: far more than any of them needs.
const PATIENCE: Duration = Duration::from_secs(120);

/// A PostgreSQL 15 server with one database, `db`, made by `sql`.
fn server_with(db: &str, sql: &str) -> PgServer {
    server_with_options(&PgOptions::default(), db, sql)
}

fn server_with_options(options: &PgOptions, db: &str, sql: &str) -> PgServer {
    let server = PgServer::start_with(options).expect("PostgreSQL 15 starts");
    server.create_database(db).expect("CREATE DATABASE");
    if !sql.is_empty() {
        server
            .psql(db, sql)
            .unwrap_or_else(|error| panic!("the test's data loads: {error}"));
    }
    server
}

/// A server with an empty database `db`, for a restore.
fn empty_target(db: &str) -> PgServer {
    server_with(db, "")
}

/// `restore --quiet --from STORE --backup ID --target TARGET EXTRA...`.
fn restore_args(store: &str, id: &str, target: &str, extra: &[&str]) -> Vec<String> {
    [
        "restore", "--quiet", "--from", store, "--backup", id, "--target", target,
    ]
    .iter()
    .chain(extra)
    .map(|arg| (*arg).to_owned())
    .collect()
}

/// The stderr of a failed `ferry` run, after checking it failed with
/// `code`.
fn failure(output: &std::process::Output, code: i32, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: ferry exits {code}; it said:\n{stderr}"
    );
    stderr
}

/// The backups of a store as `ferry inspect` lists them, `id complete` each.
fn backups(store: &Store) -> Vec<String> {
    let printed = ferry_ok(&["inspect", "--output", "json", &store.url()]);
    let listed: serde_json::Value = serde_json::from_str(&printed).expect("inspect prints JSON");
    listed["backups"]
        .as_array()
        .map(|backups| {
            backups
                .iter()
                .map(|backup| format!("{} complete={}", backup["backup_id"], backup["complete"]))
                .collect()
        })
        .unwrap_or_default()
}

/// Every type the adapter carries, in every corner a value has, and every
/// shape of table: composite keys, foreign keys, serial, identity (with its
/// own START and INCREMENT), a standalone sequence, a stored generated
/// column, no primary key, indexes, unique and check constraints, names that
/// need quoting.
const EVERY_SHAPE: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE every_type (
    id int PRIMARY KEY,
    b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
    num numeric, num_scaled numeric(40, 20),
    t text, vc varchar(20), ch char(5), by bytea,
    js json, jb jsonb,
    tstz timestamptz, ts timestamp, d date, tm time, tmtz timetz, iv interval,
    u uuid, ip inet, m mood,
    ints int[], texts text[], grid int[][], shifted int[], moods mood[]
);
INSERT INTO every_type VALUES
 (1, true, 32767, 2147483647, 9223372036854775807, 3.4028235e38, 1.7976931348623157e308,
  123456789012345678901234567890.123456789012345678901234567890123456789012345678901234567890,
  12345678901234567890.12345678901234567890,
  E'tab\there\nnewline\\backslash \u00e9\u4e2d\U0001F600 ''quote'' "dq"', 'varchar', 'ab',
  '\x00ff10deadbeef', '{"a": [1, 2.50, {"b": null}], "u": "\u00e9\u0000x", "k": "v", "k": "dup"}',
  '{"nested": {"deep": [true, false, null]}, "u": "\u00e9", "n": 1.0e3}',
  '2024-02-29 23:59:59.999999+05:30', '2024-02-29 23:59:59.123456', '2024-02-29', '23:59:59.999999',
  '12:34:56+05:30', '1 year 2 months 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '192.168.1.0/24', 'happy',
  '{1,NULL,3}', '{"a b","NULL",NULL,"c\"d","e\\f",""}', '{{1,2},{3,4}}', '[0:2]={7,8,9}', '{sad,NULL,happy}'),
 (2, false, -32768, -2147483648, -9223372036854775808, 'NaN', 'Infinity', 'NaN', -0.00000000000000000001,
  '', '', '', '\x', 'null', 'null',
  'infinity', '-infinity', 'infinity', '00:00:00', '00:00:00-12', '-178000000 years',
  '00000000-0000-0000-0000-000000000000', '::1', 'sad',
  '{}', '{}', '{{NULL,NULL},{NULL,5}}', '[-3:-2]={1,2}', '{}'),
 (3, false, 0, 0, 0, '-Infinity', '-0', '-0.000', 1e-30,
  E'\r\b\f', ' spaces ', 'x', E'\\x0a0d09005c', '[]', '{}',
  '-infinity', 'infinity', '-infinity', '24:00:00', '24:00:00+14', '-1 days +02:03',
  'ffffffff-ffff-ffff-ffff-ffffffffffff', '2001:db8::1/128', 'ok',
  '{NULL}', '{NULL}', '{{{1}}}', '[5:5]={NULL}', '{NULL}'),
 (4, true, 1, 1, 1, '-0', 'NaN', ('-' || repeat('9', 1000) || '.' || repeat('0', 999) || '1')::numeric, 1e-20,
  'x', 'y', 'z', '\x01', '"string"', '"\ud83d\ude00 \u00e9 \"quoted\" \\ \n"',
  '0044-03-15 12:00:00+00 BC', '4713-01-01 00:00:00 BC', '0001-01-01 BC', '12:00', '12:00-00:30',
  '1 mon -1 days', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', '10.0.0.1', 'happy',
  ARRAY[2147483647, -2147483648], ARRAY['café', E'tab\t', E'nl\n', 'comma,', '{brace}', E'back\\slash'],
  '{{1},{2}}', '[2:3][1:2]={{1,2},{3,4}}', '[3:4]={ok,ok}'),
 (5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

-- TOASTed: a text and a bytea of more than 1 MiB each.
CREATE TABLE big_values (id int PRIMARY KEY, t text, b bytea);
INSERT INTO big_values VALUES
 (1, repeat(E'big\ttext \u00e9\\ ', 120000), decode(repeat('00ff5c0a0d09', 200000), 'hex')),
 (2, (SELECT string_agg(md5(g::text), E'\n') FROM generate_series(1, 40000) g),
     (SELECT string_agg(decode(md5(g::text), 'hex'), ''::bytea) FROM generate_series(1, 80000) g));

CREATE TABLE parents (region text, obsolete int, code int, name text NOT NULL, PRIMARY KEY (region, code));
CREATE TABLE children (
    id serial PRIMARY KEY, region text, code int, label text UNIQUE,
    FOREIGN KEY (region, code) REFERENCES parents (region, code) ON DELETE CASCADE,
    CHECK (length(label) > 2)
);
INSERT INTO parents SELECT 'r' || (g % 3), g, g, 'parent ' || g FROM generate_series(1, 50) g;
-- A dropped column leaves a hole in the table's attributes.
ALTER TABLE parents DROP COLUMN obsolete;
INSERT INTO children (region, code, label) SELECT 'r' || (g % 3), g, 'child ' || g FROM generate_series(1, 50) g;
CREATE INDEX children_lower_label ON children (lower(label));

CREATE TABLE identities (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    by_default int GENERATED BY DEFAULT AS IDENTITY (START WITH 100 INCREMENT BY 5),
    note text,
    note_length int GENERATED ALWAYS AS (length(note)) STORED
);
INSERT INTO identities (note) SELECT 'note ' || g FROM generate_series(1, 7) g;

CREATE SEQUENCE standalone START 10 INCREMENT 3;
SELECT nextval('standalone'), nextval('standalone');
CREATE SEQUENCE untouched;

-- No primary key, and rows that are each other's duplicates.
CREATE TABLE keyless (a int, b text);
INSERT INTO keyless VALUES (1, 'dup'), (1, 'dup'), (1, 'dup'), (2, NULL), (2, NULL);
CREATE INDEX keyless_b ON keyless (b) WHERE b IS NOT NULL;

CREATE SCHEMA "Odd Schema.v1";
CREATE TABLE "Odd Schema.v1"."Mixed Case.Table" ("Id" int PRIMARY KEY, "Some Column" text, "select" int);
INSERT INTO "Odd Schema.v1"."Mixed Case.Table" VALUES (1, 'one', 1), (2, 'two', 2);
CREATE TABLE "Odd Schema.v1"."Other/Table%" (
    "key/part" text PRIMARY KEY,
    "Mixed Id" int REFERENCES "Odd Schema.v1"."Mixed Case.Table" ("Id"),
    v int CHECK (v > 0)
);
INSERT INTO "Odd Schema.v1"."Other/Table%" VALUES ('a/b', 1, 1), ('100%', 2, 2), ('a.b', NULL, 3);
CREATE UNIQUE INDEX "Odd Index" ON "Odd Schema.v1"."Other/Table%" (v DESC);
"#;

/// `nextval` of every sequence of `db`, in name order: what the next row
/// of each would get (this moves them).
fn next_values(server: &PgServer, db: &str) -> Vec<String> {
    sequence_positions(server, db)
        .keys()
        .map(|sequence| {
            let value = scalar(
                server,
                db,
                &format!("SELECT nextval('{}');", sequence.replace('\'', "''")),
            );
            format!("{sequence} {value}")
        })
        .collect()
}

#[test]
fn every_type_and_table_shape_round_trips_exactly() {
    let source = server_with("shop", EVERY_SHAPE);
    // The large values really are large, and every column of row 5 NULL.
    assert!(
        number(
            &source,
            "shop",
            "SELECT least(min(octet_length(t)), min(octet_length(b))) FROM big_values;"
        ) > 1 << 20,
        "each big value is over 1 MiB"
    );
    assert_eq!(
        number(
            &source,
            "shop",
            "SELECT count(*) FROM jsonb_each((SELECT to_jsonb(e) FROM every_type e WHERE id = 5)) \
             WHERE value = 'null'::jsonb;"
        ),
        28,
        "row 5 is NULL in every column but its key"
    );
    let target = empty_target("copy");
    let store = Store::new();

    let id = extract(&source.url("shop"), &store.url(), &[]);
    let verified = ferry_ok(&["verify", &store.url(), "--backup", &id]);
    assert!(verified.contains("is sound"), "verify: {verified}");
    ferry_ok(&restore_args(&store.url(), &id, &target.url("copy"), &[]));
    // The extract's temporary slot went with it.
    assert_no_slot_left(&source);

    assert_same_database(&source, "shop", &target, "copy");
    assert_eq!(
        scalar(
            &target,
            "copy",
            "SELECT stream_id, complete FROM ferry.streams ORDER BY 1;"
        ),
        format!("{id}|t\n{id}/lane-1|t"),
        "the target's checkpoint rows (one per lane) say the backup is in, whole"
    );
    assert_eq!(
        next_values(&target, "copy"),
        next_values(&source, "shop"),
        "each sequence hands out the same next value on both"
    );
}

/// The same data carried as COPY text (`--row-format copy`): the rows go
/// in runs, forwarded as the source printed them, and come back equal.
#[test]
fn every_type_round_trips_as_copy_text() {
    let source = server_with("shop", EVERY_SHAPE);
    let target = empty_target("rows");
    target.create_database("runs").expect("CREATE DATABASE");
    let store = Store::new();

    let as_rows = extract(&source.url("shop"), &store.url(), &[]);
    let as_runs = extract(&source.url("shop"), &store.url(), &["--row-format", "copy"]);
    let verified = ferry_ok(&["verify", &store.url(), "--backup", &as_runs]);
    assert!(verified.contains("is sound"), "verify: {verified}");
    ferry_ok(&restore_args(
        &store.url(),
        &as_rows,
        &target.url("rows"),
        &[],
    ));
    ferry_ok(&restore_args(
        &store.url(),
        &as_runs,
        &target.url("runs"),
        &[],
    ));
    assert_same_database(&source, "shop", &target, "runs");
    let ops = |db: &str| number(&target, db, "SELECT max(through_seq) FROM ferry.streams;");
    let rows = total_rows(&source, "shop") as i64;
    assert!(
        ops("rows") > rows && ops("runs") < ops("rows") - rows / 2,
        "the rows went in runs: {} ops carried the {rows} rows as COPY text, {} as JSON",
        ops("runs"),
        ops("rows")
    );
    assert_eq!(
        next_values(&target, "runs"),
        next_values(&source, "shop"),
        "each sequence hands out the same next value on both"
    );
}

#[test]
fn a_million_rows_round_trip() {
    // Every statement logged, to see the copy split into page ranges
    // read on two connections.
    let options = PgOptions {
        settings: vec![("log_statement".to_owned(), "all".to_owned())],
        ..PgOptions::default()
    };
    let source = server_with_options(
        &options,
        "events",
        "CREATE TABLE events (id bigint PRIMARY KEY, account int NOT NULL, kind text NOT NULL);
         INSERT INTO events SELECT g, g % 1000, md5(g::text) FROM generate_series(1, 1000000) g;",
    );
    let pages = number(
        &source,
        "events",
        "SELECT pg_relation_size('events') / current_setting('block_size')::bigint;",
    );
    assert!(
        pages > 2 * CHUNK_PAGES,
        "the table ({pages} pages) is more than two copy parts of {CHUNK_PAGES} pages"
    );
    let target = empty_target("events");
    let store = Store::new();

    let id = extract(&source.url("events"), &store.url(), &["--parallel", "2"]);
    let log = source.log();
    let range_copies: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("COPY (SELECT") && line.contains("ctid >="))
        .collect();
    assert!(
        range_copies.len() >= 3,
        "the table was copied as page ranges; the server logged these copies:\n{}",
        range_copies.join("\n")
    );
    // log_line_prefix is '%m [%p] ': the backend's pid follows the time.
    let connections: BTreeSet<&str> = range_copies
        .iter()
        .filter_map(|line| line.split(['[', ']']).nth(1))
        .collect();
    assert_eq!(
        connections.len(),
        2,
        "two connections copied the ranges: {}",
        range_copies.join("\n")
    );

    ferry_ok(&restore_args(&store.url(), &id, &target.url("events"), &[]));
    assert_eq!(
        number(&target, "events", "SELECT count(*) FROM events;"),
        1_000_000
    );
    assert_same_database(&source, "events", &target, "events");
}

/// Accounts, a ledger of transfers and a counter of them, kept in step by
/// every transaction: the balances sum to 100 * 1,000; the ledger holds a
/// debit and a credit for each transfer 1..=counter, summing to zero; each
/// balance is 1,000 plus its ledger amounts. The 35,000 transfers made here
/// carry a wide note so the ledger spans more than one copy part.
const LEDGER: &str = "
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE ledger (
    id bigserial PRIMARY KEY, txn bigint NOT NULL, side text NOT NULL,
    account int NOT NULL REFERENCES accounts (id), amount bigint NOT NULL, note text NOT NULL
);
CREATE TABLE counter (id int PRIMARY KEY, value bigint NOT NULL);
INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 100) g;
INSERT INTO ledger (txn, side, account, amount, note)
    SELECT g, s.side,
           CASE s.side WHEN 'debit' THEN g % 100 + 1 ELSE (g * 7 + 3) % 100 + 1 END,
           CASE s.side WHEN 'debit' THEN -(g % 50 + 1) ELSE g % 50 + 1 END,
           repeat(md5(g::text), 16)
    FROM generate_series(1, 35000) g, (VALUES ('debit'), ('credit')) s(side)
    ORDER BY g, s.side DESC;
UPDATE accounts a SET balance = 1000 + coalesce((SELECT sum(amount) FROM ledger l WHERE l.account = a.id), 0);
INSERT INTO counter VALUES (1, 35000);
";

/// One writer: transfers between random accounts until `stop`, each in one
/// transaction that takes the next transfer number from the counter, moves
/// the amount, and writes its two ledger rows. Counts its commits.
async fn transfer_until(
    url: String,
    seed: u64,
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
) -> Result<(), tokio_postgres::Error> {
    let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let mut state = seed;
    let mut next_random = move |below: u64| {
        // xorshift: any spread will do.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    };
    while !stop.load(Ordering::Relaxed) {
        let from = next_random(100) as i32 + 1;
        let to = (from + next_random(99) as i32) % 100 + 1;
        let amount = next_random(100) as i64 + 1;
        let transaction = client.transaction().await?;
        let txn: i64 = transaction
            .query_one(
                "UPDATE counter SET value = value + 1 WHERE id = 1 RETURNING value",
                &[],
            )
            .await?
            .get(0);
        transaction
            .execute(
                "UPDATE accounts SET balance = balance - $2 WHERE id = $1",
                &[&from, &amount],
            )
            .await?;
        transaction
            .execute(
                "UPDATE accounts SET balance = balance + $2 WHERE id = $1",
                &[&to, &amount],
            )
            .await?;
        transaction
            .execute(
                "INSERT INTO ledger (txn, side, account, amount, note) \
                 VALUES ($1, 'debit', $2, -$4::bigint, 'live'), ($1, 'credit', $3, $4::bigint, 'live')",
                &[&txn, &from, &to, &amount],
            )
            .await?;
        transaction.commit().await?;
        commits.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn counter(server: &PgServer, db: &str) -> i64 {
    number(server, db, "SELECT value FROM counter WHERE id = 1;")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extract_while_writers_run_is_the_database_at_one_instant() {
    let source = server_with("bank", LEDGER);
    let ledger_pages = number(
        &source,
        "bank",
        "SELECT pg_relation_size('ledger') / current_setting('block_size')::bigint;",
    );
    assert!(
        ledger_pages > CHUNK_PAGES,
        "the ledger ({ledger_pages} pages) is copied in more than one part"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..3u64)
        .map(|writer| {
            tokio::spawn(transfer_until(
                source.url("bank"),
                0x9E37_79B9_7F4A_7C15 ^ (writer + 1),
                stop.clone(),
                commits.clone(),
            ))
        })
        .collect();
    // The writers are writing before the extract starts.
    tokio::task::block_in_place(|| {
        wait_until(PATIENCE, "the writers commit", || {
            commits.load(Ordering::Relaxed) >= 20
        })
    });

    // psql and ferry block: they run where the writers' tasks are not.
    let before = tokio::task::block_in_place(|| counter(&source, "bank"));
    let commits_before = commits.load(Ordering::Relaxed);
    let store = Store::new();
    let id = tokio::task::block_in_place(|| {
        extract(&source.url("bank"), &store.url(), &["--parallel", "2"])
    });
    let after = tokio::task::block_in_place(|| counter(&source, "bank"));
    let commits_during = commits.load(Ordering::Relaxed) - commits_before;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer
            .await
            .expect("a writer ends")
            .expect("a writer's transactions all commit");
    }
    assert!(
        commits_during > 0 && after > before,
        "writers committed during the extract ({commits_during} commits; counter {before} -> {after})"
    );

    // Everything from here on is the test's alone: no task runs beside it.
    let target = empty_target("bank");
    ferry_ok(&restore_args(&store.url(), &id, &target.url("bank"), &[]));
    let restored = counter(&target, "bank");
    println!(
        "counter {before} before the extract, {after} after it ({commits_during} commits during it); restored {restored}"
    );
    assert!(
        (before..=after).contains(&restored),
        "the restored counter {restored} lies between {before}, before the extract, and {after}, after it"
    );
    assert_eq!(
        number(&target, "bank", "SELECT sum(balance) FROM accounts;"),
        100 * 1000,
        "the balances still sum to what they always sum to"
    );
    assert_eq!(
        number(&target, "bank", "SELECT count(*) FROM ledger;"),
        2 * restored,
        "two ledger rows per transfer the counter counts"
    );
    assert_eq!(
        number(
            &target,
            "bank",
            "SELECT count(*) FROM (SELECT txn FROM ledger GROUP BY txn \
             HAVING count(*) <> 2 OR sum(amount) <> 0 OR count(*) FILTER (WHERE side = 'debit') <> 1) broken;"
        ),
        0,
        "every transfer's pair is there whole: a debit and a credit that sum to zero"
    );
    assert_eq!(
        scalar(
            &target,
            "bank",
            "SELECT count(DISTINCT txn) = max(txn) AND min(txn) = 1 FROM ledger;"
        ),
        "t",
        "the transfers are 1..={restored}, none missing"
    );
    assert_eq!(
        number(
            &target,
            "bank",
            "SELECT count(*) FROM accounts a \
             WHERE a.balance <> 1000 + coalesce((SELECT sum(amount) FROM ledger l WHERE l.account = a.id), 0);"
        ),
        0,
        "each balance is what its ledger rows make it"
    );
    // Transfers commit in counter order (each waits on the counter row), so
    // the ledger at the snapshot is the source's rows of transfers up to
    // the restored counter: exactly those, each once.
    assert_eq!(
        rows_digest(&target, "bank", "SELECT * FROM ledger"),
        rows_digest(
            &source,
            "bank",
            &format!("SELECT * FROM ledger WHERE txn <= {restored}")
        ),
        "the restored ledger is the source's as of transfer {restored}"
    );
}

/// The target's checkpoint: ops of the backup in it (0 before the first
/// commit, or before ferry's schema exists).
fn through_seq(target: &PgServer, db: &str) -> i64 {
    target
        .psql(
            db,
            "SELECT coalesce(max(through_seq), 0) FROM ferry.streams;",
        )
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether every lane of the target's stream is marked complete: `t` or
/// `f`.
fn stream_complete(target: &PgServer, db: &str) -> String {
    scalar(target, db, "SELECT bool_and(complete) FROM ferry.streams;")
}

/// One lane: the rows in after each kill are exactly those its checkpoint
/// counts.
#[test]
fn a_restore_killed_twice_resumes_to_an_equal_copy() {
    restore_killed_twice(1, "json");
}

/// Two lanes (the default), the two tables in different lanes or the same
/// one: the copy still ends equal, no row twice (the table without a key
/// would show one).
#[test]
fn a_restore_in_lanes_killed_twice_resumes_to_an_equal_copy() {
    restore_killed_twice(2, "json");
}

/// Rows carried as COPY text, many an op: a commit still holds whole ops,
/// and the resumed copy is equal, no row twice.
#[test]
fn a_restore_of_copy_text_killed_twice_resumes_to_an_equal_copy() {
    restore_killed_twice(2, "copy");
}

fn restore_killed_twice(lanes: u16, row_format: &str) {
    let lanes_flag = lanes.to_string();
    let source = server_with(
        "store",
        "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, payload text);
         INSERT INTO items (name, payload) SELECT 'item ' || g, repeat(md5(g::text), 4) FROM generate_series(1, 200000) g;
         CREATE TABLE log (at int, what text);
         INSERT INTO log SELECT g % 1000, 'event ' || (g % 7) FROM generate_series(1, 50000) g;",
    );
    let total = total_rows(&source, "store");
    let target = empty_target("store");
    let store = Store::new();
    let id = extract(
        &source.url("store"),
        &store.url(),
        &["--row-format", row_format],
    );
    let target_url = target.url("store");
    let store_url = store.url();
    let args = restore_args(
        &store_url,
        &id,
        &target_url,
        &["--pg-ops-per-commit", "2000", "--pg-lanes", &lanes_flag],
    );
    // A sequence and two tables come before the rows.
    let schema_ops = 3;

    let mut checkpoint_at_last_kill = 0;
    for kill in 1..=2 {
        let mut restore = RunningFerry::start(&args);
        // Past the last kill's checkpoint, and past the schema: rows are in.
        let past = checkpoint_at_last_kill.max(schema_ops);
        wait_until(
            PATIENCE,
            &format!("restore {kill} commits past op {past}"),
            || through_seq(&target, "store") > past,
        );
        restore.kill();
        let checkpoint = through_seq(&target, "store");
        let rows = total_rows(&target, "store") as i64;
        assert!(
            rows > 0 && (rows as u64) < total,
            "kill {kill} landed mid-restore: {rows} of {total} rows were in"
        );
        if lanes == 1 && row_format == "json" {
            assert_eq!(
                rows,
                checkpoint - schema_ops,
                "kill {kill}: the rows in are exactly those the checkpoint (seq {checkpoint}) counts"
            );
        }
        assert_eq!(
            stream_complete(&target, "store"),
            "f",
            "kill {kill}: the stream is not complete"
        );
        println!("kill {kill}: checkpoint at op {checkpoint}, {rows} of {total} rows in");
        checkpoint_at_last_kill = checkpoint;
    }

    let mut last = RunningFerry::start(&args);
    let status = last.wait();
    assert!(
        status.success(),
        "the third restore ends well: {status}\n{}",
        last.stderr()
    );
    assert_eq!(stream_complete(&target, "store"), "t");
    assert_same_database(&source, "store", &target, "store");
}

/// A restore killed while its lanes build indexes side by side, with a
/// build committed and another running, resumes and builds each once: no
/// checkpoint counts a build (whichever lane is free builds it), the
/// catalog does. Without that, the resumed restore would fail on an index
/// that exists already, or end without one (the schema comparison).
#[test]
fn a_restore_killed_among_its_index_builds_builds_each_once() {
    let source = server_with(
        "store",
        "CREATE TABLE items (id serial PRIMARY KEY, code text NOT NULL, name text NOT NULL, payload text);
         INSERT INTO items (code, name, payload)
           SELECT md5(g::text), 'item ' || g, repeat(md5((g * 3)::text), 2) FROM generate_series(1, 300000) g;
         CREATE UNIQUE INDEX items_code ON items (code);
         CREATE INDEX items_name ON items (name);
         CREATE INDEX items_payload ON items (payload);
         CREATE TABLE tags (item int NOT NULL REFERENCES items, tag text NOT NULL, UNIQUE (item, tag));
         INSERT INTO tags SELECT g, md5((g * 7)::text) FROM generate_series(1, 300000) g;
         CREATE INDEX tags_tag ON tags (tag);",
    );
    let indexes = "SELECT count(*) FROM pg_catalog.pg_indexes WHERE schemaname = 'public';";
    let total: u32 = scalar(&source, "store", indexes).parse().expect("a count");
    let target = empty_target("store");
    let store = Store::new();
    let id = extract(&source.url("store"), &store.url(), &[]);
    let args = restore_args(
        &store.url(),
        &id,
        &target.url("store"),
        &["--pg-lanes", "2"],
    );

    let mut restore = RunningFerry::start(&args);
    let building = format!(
        "SELECT ({}) || '|' || (SELECT count(*) FROM pg_catalog.pg_stat_activity \
           WHERE state = 'active' AND (query LIKE 'CREATE %INDEX%' OR query LIKE 'ALTER TABLE%'));",
        indexes.trim_end_matches(';')
    );
    wait_until(
        PATIENCE,
        "the restore has a build committed and another running",
        || {
            let state = target.psql("store", &building).unwrap_or_default();
            let (built, running) = state.trim().split_once('|').unwrap_or(("0", "0"));
            built.parse::<u32>().unwrap_or(0) >= 1 && running.parse::<u32>().unwrap_or(0) >= 1
        },
    );
    restore.kill();
    let built: u32 = scalar(&target, "store", indexes).parse().expect("a count");
    assert_eq!(
        stream_complete(&target, "store"),
        "f",
        "the killed restore is not complete"
    );
    println!("killed with {built} of {total} indexes built");

    let mut last = RunningFerry::start(&args);
    let status = last.wait();
    assert!(
        status.success(),
        "the resumed restore ends well: {status}\n{}",
        last.stderr()
    );
    assert_same_database(&source, "store", &target, "store");
}

/// A build the server refuses (its temporary files over
/// `temp_file_limit`, as a full disk would refuse them) stops the restore,
/// naming the op and the server's reason; the same command, once the
/// limit is lifted, builds what is missing and ends equal.
#[test]
fn a_build_the_server_refuses_stops_the_restore_by_op_and_a_rerun_finishes_it() {
    let source = server_with(
        "store",
        "CREATE TABLE items (id serial PRIMARY KEY, code text NOT NULL, payload text);
         INSERT INTO items (code, payload) SELECT md5(g::text), repeat(md5((g * 3)::text), 2) FROM generate_series(1, 200000) g;
         CREATE INDEX items_code ON items (code);
         CREATE TABLE small (id int PRIMARY KEY, name text);
         INSERT INTO small SELECT g, 'small ' || g FROM generate_series(1, 100) g;",
    );
    let target = empty_target("store");
    let store = Store::new();
    let id = extract(&source.url("store"), &store.url(), &[]);
    // Sorts spill to temporary files at once, and may not write more
    // than 1 MiB of them: a build of `items` cannot finish.
    target
        .psql(
            "postgres",
            "ALTER DATABASE store SET maintenance_work_mem = '1MB'; \
             ALTER DATABASE store SET temp_file_limit = '1MB';",
        )
        .expect("limits set");
    let args = restore_args(
        &store.url(),
        &id,
        &target.url("store"),
        &["--pg-lanes", "2"],
    );

    let output = ferry_with_env(&args, &[]);
    let stderr = failure(&output, 6, "a restore whose index build the server refuses");
    assert!(
        stderr.contains("op seq") && stderr.contains("items") && stderr.contains("temp_file_limit"),
        "the failure names the op and the server's reason: {stderr}"
    );
    assert_eq!(
        stream_complete(&target, "store"),
        "f",
        "the failed restore is not complete"
    );

    target
        .psql(
            "postgres",
            "ALTER DATABASE store RESET maintenance_work_mem; ALTER DATABASE store RESET temp_file_limit;",
        )
        .expect("limits lifted");
    let output = ferry_with_env(&args, &[]);
    assert!(
        output.status.success(),
        "the same restore, run again, ends well:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_same_database(&source, "store", &target, "store");
}

#[test]
fn a_wrong_password_names_the_user_and_the_server() {
    let options = PgOptions {
        password: Some("the-right-password".to_owned()),
        ..PgOptions::default()
    };
    let server = server_with_options(
        &options,
        "app",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);",
    );
    server.create_database("copy").expect("a target database");
    let address = format!("127.0.0.1:{}", server.port());
    let store = Store::new();
    let right = [("PGPASSWORD", "the-right-password")];
    let wrong = [("PGPASSWORD", "a-wrong-password")];

    let extract_args = [
        "extract",
        "--quiet",
        "--source",
        &server.url("app"),
        "--to",
        &store.url(),
    ];
    let output = ferry_with_env(&extract_args, &right);
    assert!(
        output.status.success(),
        "the right password gets in: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();

    let output = ferry_with_env(&extract_args, &wrong);
    let stderr = failure(&output, 5, "an extract with a wrong password");
    assert!(
        stderr.contains(&address) && stderr.contains("user postgres"),
        "the error names the server ({address}) and the user: {stderr}"
    );
    assert!(
        !stderr.contains("a-wrong-password"),
        "the password is not echoed: {stderr}"
    );
    assert_eq!(
        backups(&store),
        vec![format!("\"{id}\" complete=true")],
        "the failed extract left nothing in the store"
    );

    let output = ferry_with_env(
        &restore_args(&store.url(), &id, &server.url("copy"), &[]),
        &wrong,
    );
    let stderr = failure(&output, 6, "a restore with a wrong password");
    assert!(
        stderr.contains(&format!("{address}/copy")) && stderr.contains("user postgres"),
        "the error names the target ({address}/copy) and the user: {stderr}"
    );
    assert!(
        !stderr.contains("a-wrong-password"),
        "the password is not echoed: {stderr}"
    );
    assert_eq!(user_tables(&server, "copy"), Vec::<String>::new());
}

#[test]
fn a_password_in_the_url_is_refused_and_not_echoed() {
    let options = PgOptions {
        password: Some("s3cret-in-url".to_owned()),
        ..PgOptions::default()
    };
    let server = server_with_options(&options, "app", "CREATE TABLE t (id int PRIMARY KEY);");
    let store = Store::new();
    for url in [
        format!(
            "postgres://postgres:s3cret-in-url@127.0.0.1:{}/app",
            server.port()
        ),
        format!(
            "postgres://postgres@127.0.0.1:{}/app?password=s3cret-in-url",
            server.port()
        ),
    ] {
        let output = ferry_with_env(&["extract", "--source", &url, "--to", &store.url()], &[]);
        let stderr = failure(&output, 2, "a password in the URL");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stderr.contains("PGPASSWORD") && stderr.contains("password"),
            "the error says where a password goes: {stderr}"
        );
        assert!(
            !stderr.contains("s3cret-in-url") && !stdout.contains("s3cret-in-url"),
            "the password is not echoed: {stderr}{stdout}"
        );
    }
    assert!(backups(&store).is_empty(), "nothing was extracted");
    assert_eq!(replication_slots(&server), Vec::<String>::new());
}

#[test]
fn a_missing_database_is_named() {
    let server = empty_target("present");
    let store = Store::new();
    let address = format!("127.0.0.1:{}", server.port());
    let output = ferry_with_env(
        &[
            "extract",
            "--source",
            &server.url("absent_db"),
            "--to",
            &store.url(),
        ],
        &[],
    );
    let stderr = failure(&output, 5, "an extract of a missing database");
    assert!(
        stderr.contains("absent_db")
            && stderr.contains(&address)
            && stderr.contains("does not exist"),
        "the error names the database and the server: {stderr}"
    );

    // A restore into a missing database says the same of the target.
    let source = server_with(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);",
    );
    let id = extract(&source.url("app"), &store.url(), &[]);
    let output = ferry_with_env(
        &restore_args(&store.url(), &id, &server.url("absent_db"), &[]),
        &[],
    );
    let stderr = failure(&output, 6, "a restore into a missing database");
    assert!(
        stderr.contains("absent_db")
            && stderr.contains(&address)
            && stderr.contains("does not exist"),
        "the error names the database and the server: {stderr}"
    );
}

#[test]
fn wal_level_replica_is_refused_saying_a_restart_is_needed() {
    let options = PgOptions {
        settings: vec![("wal_level".to_owned(), "replica".to_owned())],
        ..PgOptions::default()
    };
    let server = server_with_options(&options, "app", "CREATE TABLE t (id int PRIMARY KEY);");
    let store = Store::new();
    let output = ferry_with_env(
        &[
            "extract",
            "--source",
            &server.url("app"),
            "--to",
            &store.url(),
        ],
        &[],
    );
    let stderr = failure(&output, 5, "an extract from wal_level = replica");
    assert!(
        stderr.contains("wal_level") && stderr.contains("logical") && stderr.contains("restart"),
        "the error names wal_level and says a restart is needed: {stderr}"
    );
    assert!(backups(&store).is_empty(), "nothing was extracted");
}

#[test]
fn a_role_without_replication_is_told_to_alter_role() {
    let server = server_with(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE ROLE reader LOGIN;
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader;",
    );
    let store = Store::new();
    let url = format!("postgres://reader@127.0.0.1:{}/app", server.port());
    let output = ferry_with_env(&["extract", "--source", &url, "--to", &store.url()], &[]);
    let stderr = failure(&output, 5, "an extract as a role without REPLICATION");
    assert!(
        stderr.contains("ALTER ROLE")
            && stderr.contains("reader")
            && stderr.contains("REPLICATION"),
        "the error says ALTER ROLE reader REPLICATION: {stderr}"
    );
    assert_eq!(replication_slots(&server), Vec::<String>::new());
}

#[test]
fn exhausted_replication_slots_are_named() {
    let options = PgOptions {
        settings: vec![("max_replication_slots".to_owned(), "1".to_owned())],
        ..PgOptions::default()
    };
    let server = server_with_options(
        &options,
        "app",
        "CREATE TABLE t (id int PRIMARY KEY);
         SELECT 1 FROM pg_create_logical_replication_slot('x', 'pgoutput');",
    );
    let store = Store::new();
    let output = ferry_with_env(
        &[
            "extract",
            "--source",
            &server.url("app"),
            "--to",
            &store.url(),
        ],
        &[],
    );
    let stderr = failure(&output, 5, "an extract with every slot taken");
    assert!(
        stderr.contains("max_replication_slots"),
        "the error names max_replication_slots: {stderr}"
    );
    assert_eq!(
        replication_slots(&server),
        vec!["x|logical|f|f".to_owned()],
        "the slot that was there is all there is"
    );
}

#[test]
fn a_nonempty_target_is_refused_and_a_conflicting_table_leaves_nothing_half_done() {
    let source = server_with("shop", EVERY_SHAPE);
    let store = Store::new();
    let id = extract(&source.url("shop"), &store.url(), &[]);
    let target = server_with(
        "shop",
        "CREATE TABLE already_here (id int PRIMARY KEY); INSERT INTO already_here VALUES (1);",
    );

    let output = ferry_with_env(
        &restore_args(&store.url(), &id, &target.url("shop"), &[]),
        &[],
    );
    let stderr = failure(&output, 6, "a restore onto a database that holds a table");
    assert!(
        stderr.contains("public.already_here") && stderr.contains("--allow-nonempty"),
        "the refusal names the table there and the way past it: {stderr}"
    );
    assert_eq!(
        user_tables(&target, "shop"),
        vec!["public.already_here".to_owned()],
        "nothing of the backup was written"
    );

    // With --allow-nonempty, a table of the backup that is there already
    // is an error naming it, and the tables made before it go too.
    target
        .psql("shop", "CREATE TABLE parents (other_shape text);")
        .expect("a conflicting table");
    let args = restore_args(
        &store.url(),
        &id,
        &target.url("shop"),
        &["--allow-nonempty"],
    );
    let output = ferry_with_env(&args, &[]);
    let stderr = failure(&output, 6, "a restore onto a conflicting table");
    assert!(
        stderr.contains("parents") && stderr.contains("already exists"),
        "the error names the conflicting table: {stderr}"
    );
    assert_eq!(
        user_tables(&target, "shop"),
        vec![
            "public.already_here".to_owned(),
            "public.parents".to_owned()
        ],
        "no table of the backup is left behind"
    );
    assert_eq!(
        scalar(
            &target,
            "shop",
            "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'Odd Schema.v1'), \
                    (SELECT count(*) FROM pg_type WHERE typname = 'mood'), \
                    (SELECT count(*) FROM pg_class WHERE relkind = 'S');"
        ),
        "0|0|0",
        "nor a schema, a type or a sequence of it"
    );
    assert_eq!(
        scalar(&target, "shop", "SELECT count(*) FROM parents;"),
        "0",
        "and the conflicting table is untouched"
    );
}

#[test]
fn a_money_column_is_refused_naming_table_and_column_and_leaves_no_slot() {
    let server = server_with("app", MONEY);
    let store = Store::new();
    let output = ferry_with_env(
        &[
            "extract",
            "--source",
            &server.url("app"),
            "--to",
            &store.url(),
        ],
        &[],
    );
    let stderr = failure(&output, 5, "an extract of a money column");
    assert!(
        stderr.contains("acct.wallets") && stderr.contains("balance") && stderr.contains("money"),
        "the refusal names the table, the column and the type: {stderr}"
    );
    assert_no_slot_left(&server);
    assert!(backups(&store).is_empty(), "nothing was sealed");
}

/// A source with a column ferry refuses, found after the slot is made.
const MONEY: &str = "CREATE TABLE fine (id int PRIMARY KEY);
     CREATE SCHEMA acct;
     CREATE TABLE acct.wallets (id int PRIMARY KEY, balance money);
     INSERT INTO acct.wallets VALUES (1, 12.34);";

/// Waits (bounded) for the server to hold no replication slot: a slot
/// whose connection ended goes within moments; a kept one never does.
fn assert_no_slot_left(server: &PgServer) {
    let mut slots = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        slots = replication_slots(server);
        if slots.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no replication slot is left on the source; these are: {slots:?}");
}

#[test]
fn a_refused_extract_with_keep_slot_leaves_no_slot() {
    // The refusal comes after the kept slot is made: a slot kept for a
    // backup that was never sealed would only hold WAL back.
    let server = server_with("app", MONEY);
    let store = Store::new();
    let output = ferry_with_env(
        &[
            "extract",
            "--source",
            &server.url("app"),
            "--to",
            &store.url(),
            "--keep-slot",
            "ferry_follow",
        ],
        &[],
    );
    let stderr = failure(&output, 5, "an extract of a money column, keeping its slot");
    assert!(
        stderr.contains("acct.wallets") && stderr.contains("balance"),
        "the refusal names the table and the column: {stderr}"
    );
    assert!(backups(&store).is_empty(), "nothing was sealed");
    assert_no_slot_left(&server);
}

/// `confirmed_flush_lsn` of slot `name` as a number (the LSN's byte
/// position), with the slot's kind.
fn slot_position(server: &PgServer, name: &str) -> (String, i64) {
    let row = scalar(
        server,
        "postgres",
        &format!(
            "SELECT slot_type, plugin, database, temporary, (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = '{name}';"
        ),
    );
    let (kind, position) = row
        .rsplit_once('|')
        .unwrap_or_else(|| panic!("slot {name} is there: {row:?}"));
    (
        kind.to_owned(),
        position.parse().expect("an LSN as a number"),
    )
}

fn snapshot_position(store: &Store, id: &str) -> i64 {
    manifest(&store.url(), id)["source"]["snapshot_position"]
        .as_i64()
        .expect("the manifest has the snapshot's position")
}

#[test]
fn keep_slot_leaves_a_slot_at_the_backups_position() {
    let server = server_with(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100);",
    );
    let store = Store::new();
    let id = extract(
        &server.url("app"),
        &store.url(),
        &["--keep-slot", "ferry_follow"],
    );
    // Written after the extract: the slot's position does not move.
    server
        .psql("app", "INSERT INTO t VALUES (101);")
        .expect("a write after the extract");
    let (kind, position) = slot_position(&server, "ferry_follow");
    assert_eq!(kind, "logical|pgoutput|app|f", "a lasting logical slot");
    assert_eq!(
        position,
        snapshot_position(&store, &id),
        "the slot's confirmed position is the backup's snapshot position"
    );
    wait_until(
        PATIENCE,
        "the kept slot is let go, and is the only one",
        || replication_slots(&server) == ["ferry_follow|logical|f|f"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extract_killed_with_its_slot_leaves_no_slot() {
    let server = server_with(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000);",
    );
    // A transaction that holds an xid keeps the slot's creation waiting
    // (a logical slot's snapshot waits for every transaction running), so
    // the extract is surely killed while its slot is there.
    let (holder, connection) = tokio_postgres::connect(&server.url("app"), tokio_postgres::NoTls)
        .await
        .expect("a connection");
    tokio::spawn(connection);
    holder
        .batch_execute("BEGIN; INSERT INTO t VALUES (0);")
        .await
        .expect("an open transaction with an xid");

    let store = Store::new();
    let mut extract = RunningFerry::start(&[
        "extract",
        "--source",
        &server.url("app"),
        "--to",
        &store.url(),
    ]);
    let mut seen = Vec::new();
    tokio::task::block_in_place(|| {
        wait_until(PATIENCE, "the extract makes its slot", || {
            seen = replication_slots(&server);
            !seen.is_empty()
        })
    });
    assert!(
        seen.len() == 1 && seen[0].starts_with("ferry_") && seen[0].ends_with("|logical|t|t"),
        "the extract's temporary slot, in use: {seen:?}"
    );
    extract.kill();
    holder
        .batch_execute("ROLLBACK")
        .await
        .expect("the holder lets go");
    tokio::task::block_in_place(|| {
        wait_until(PATIENCE, "the killed extract's slot goes", || {
            replication_slots(&server).is_empty()
        })
    });
    assert!(
        !backups(&store)
            .iter()
            .any(|backup| backup.ends_with("complete=true")),
        "the killed extract sealed nothing"
    );
}

#[test]
fn keep_slot_takes_over_the_slot_a_killed_extract_left() {
    let server = server_with(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, payload text);
         INSERT INTO t SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 200000) g;",
    );
    let store = Store::new();
    let source_url = server.url("app");
    let store_url = store.url();
    let mut first = RunningFerry::start(&[
        "extract",
        "--source",
        &source_url,
        "--to",
        &store_url,
        "--keep-slot",
        "ferry_follow",
    ]);
    // Made, and let go by its replication connection: the copy runs.
    wait_until(
        PATIENCE,
        "the extract makes and lets go its kept slot",
        || replication_slots(&server) == vec!["ferry_follow|logical|f|f".to_owned()],
    );
    first.kill();
    let (_, left_at) = slot_position(&server, "ferry_follow");
    assert_eq!(
        replication_slots(&server),
        vec!["ferry_follow|logical|f|f".to_owned()],
        "the killed extract left its kept slot, unused"
    );
    assert!(
        !backups(&store)
            .iter()
            .any(|backup| backup.ends_with("complete=true")),
        "the killed extract sealed nothing"
    );

    server
        .psql(
            "app",
            "INSERT INTO t VALUES (0, 'after the first extract');",
        )
        .expect("a write between the extracts");
    let id = extract(&source_url, &store.url(), &["--keep-slot", "ferry_follow"]);
    let (kind, position) = slot_position(&server, "ferry_follow");
    assert_eq!(kind, "logical|pgoutput|app|f");
    assert_eq!(
        position,
        snapshot_position(&store, &id),
        "the slot was taken again at the new backup's position"
    );
    assert!(position > left_at, "past the leftover's {left_at}");
    wait_until(
        PATIENCE,
        "the kept slot is let go, and is the only one",
        || replication_slots(&server) == ["ferry_follow|logical|f|f"],
    );
}

/// Metaflow's metadata service at 2.0 (examples/profiles/metaflow): flows,
/// and their runs, numbered by a serial, keyed by flow and number.
const METAFLOW_2_0: &str = r#"
CREATE TABLE flows_v3 (
    flow_id varchar(255) PRIMARY KEY, user_name varchar(255), ts_epoch bigint NOT NULL,
    tags jsonb, system_tags jsonb
);
CREATE TABLE runs_v3 (
    flow_id varchar(255) NOT NULL REFERENCES flows_v3 (flow_id),
    run_number serial NOT NULL, run_id varchar(255), user_name varchar(255),
    ts_epoch bigint NOT NULL, tags jsonb, system_tags jsonb,
    PRIMARY KEY (flow_id, run_number), UNIQUE (flow_id, run_id)
);
INSERT INTO flows_v3
    SELECT 'Flow' || g, 'user' || g, 1700000000000 + g, '["team:ml"]', '["user:someone", "runtime:dev"]'
    FROM generate_series(1, 20) g;
INSERT INTO runs_v3 (flow_id, run_id, user_name, ts_epoch, tags, system_tags)
    SELECT 'Flow' || (g % 20 + 1), CASE WHEN g % 3 = 0 THEN 'argo-' || g END, 'user' || (g % 5),
           1700000000000 + g * 1000, '[]', jsonb_build_object('attempt', g % 4)
    FROM generate_series(1, 300) g;
"#;

/// `--migrations` through Metaflow's example profile, `from` to `to`.
fn metaflow_chain<'a>(from: &'a str, to: &'a str) -> [&'a str; 6] {
    const PROFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/profiles/metaflow");
    [
        "--migrations",
        PROFILE,
        "--from-version",
        from,
        "--to-version",
        to,
    ]
}

/// The runs' columns at 2.0.
const RUN_COLUMNS_2_0: &str = "flow_id, run_number, run_id, user_name, ts_epoch, tags, system_tags";

#[test]
fn a_version_chain_adds_a_column_on_rows() {
    let source = server_with("metaflow", METAFLOW_2_0);
    source
        .create_database("back_at_2_0")
        .expect("a database for the way back");
    let newer = empty_target("metaflow");
    let store = Store::new();

    let id = extract(&source.url("metaflow"), &store.url(), &[]);
    ferry_ok(&restore_args(
        &store.url(),
        &id,
        &newer.url("metaflow"),
        &metaflow_chain("2.0", "2.1"),
    ));
    assert_eq!(
        scalar(
            &newer,
            "metaflow",
            "SELECT format_type(atttypid, atttypmod), attnotnull FROM pg_attribute \
             WHERE attrelid = 'public.runs_v3'::regclass AND attname = 'last_heartbeat_ts' AND NOT attisdropped;"
        ),
        "bigint|f",
        "runs_v3 has last_heartbeat_ts at 2.1"
    );
    assert_eq!(
        scalar(
            &newer,
            "metaflow",
            "SELECT count(*), count(last_heartbeat_ts) FROM runs_v3;"
        ),
        "300|0",
        "every run is there, its last_heartbeat_ts NULL"
    );
    let runs_at_2_0 = format!("SELECT {RUN_COLUMNS_2_0} FROM runs_v3");
    assert_eq!(
        rows_digest(&newer, "metaflow", &runs_at_2_0),
        rows_digest(&source, "metaflow", &runs_at_2_0),
        "the runs' other columns are the source's"
    );
    assert_eq!(
        rows_digest(&newer, "metaflow", "SELECT * FROM flows_v3"),
        rows_digest(&source, "metaflow", "SELECT * FROM flows_v3"),
        "the flows are untouched"
    );
    assert_eq!(
        sequence_positions(&newer, "metaflow"),
        sequence_positions(&source, "metaflow")
    );

    // And back: the 2.1 copy, extracted and restored down to 2.0, is the
    // original.
    let id_at_2_1 = extract(&newer.url("metaflow"), &store.url(), &[]);
    ferry_ok(&restore_args(
        &store.url(),
        &id_at_2_1,
        &source.url("back_at_2_0"),
        &metaflow_chain("2.1", "2.0"),
    ));
    assert_same_database(&source, "metaflow", &source, "back_at_2_0");
    assert_eq!(
        table_digests(&source, "back_at_2_0").len(),
        2,
        "flows_v3 and runs_v3, nothing else"
    );
}

/// A backup of COPY text cannot go through a version chain (its rows are
/// out of the filters' sight): the restore stops at the first run of rows,
/// naming it and what to do, before a row is written.
#[test]
fn a_version_chain_refuses_rows_carried_as_copy_text() {
    let source = server_with("metaflow", METAFLOW_2_0);
    let newer = empty_target("metaflow");
    let store = Store::new();
    let id = extract(
        &source.url("metaflow"),
        &store.url(),
        &["--row-format", "copy"],
    );
    let output = ferry_with_env(
        &restore_args(
            &store.url(),
            &id,
            &newer.url("metaflow"),
            &metaflow_chain("2.0", "2.1"),
        ),
        &[],
    );
    let stderr = failure(&output, 5, "a restore of COPY text through a chain");
    assert!(
        stderr.contains("COPY text")
            && stderr.contains("--row-format json")
            && stderr.contains("op seq"),
        "the refusal names the op and what to do: {stderr}"
    );
    assert_eq!(total_rows(&newer, "metaflow"), 0, "no row was written");
}

/// A run of rows names its columns, and a target table whose columns are
/// other ones (here: the same in another order, which COPY text would fill
/// wrongly) refuses it by op and by both lists, and no row is written. The
/// stream is made by hand (ferry's own extract always agrees with the
/// table it creates), through the jsonl adapter.
#[test]
fn a_run_of_rows_for_other_columns_is_refused_by_name() {
    use base64::Engine;
    let target = empty_target("shop");
    let store = Store::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let stream = dir.path().join("ops.jsonl");
    let rows = base64::engine::general_purpose::STANDARD.encode("id\tname\tprice\n1\tone\t10\n");
    std::fs::write(
        &stream,
        format!(
            concat!(
                r#"{{"kind": "pg.table", "key": "table/public.items", "method": "CREATE", "body": "#,
                r#"{{"schema": "public", "name": "items", "columns": [{{"name": "id", "type": "integer", "not_null": true}}, "#,
                r#"{{"name": "price", "type": "integer"}}, {{"name": "name", "type": "text"}}]}}}}"#,
                "\n",
                r#"{{"kind": "pg.rows", "key": "public.items/#0.1", "method": "COPY", "body_b64": "{rows}", "#,
                r#""content_type": "text/x-postgresql-copy"}}"#,
                "\n"
            ),
            rows = rows
        ),
    )
    .expect("the stream is written");
    let id = extract(&format!("jsonl://{}", stream.display()), &store.url(), &[]);
    let output = ferry_with_env(
        &restore_args(&store.url(), &id, &target.url("shop"), &[]),
        &[],
    );
    let stderr = failure(&output, 6, "a run of rows for other columns");
    assert!(
        stderr.contains("op seq 2")
            && stderr.contains("(id, name, price)")
            && stderr.contains("(id, price, name)"),
        "the refusal names the op and both column lists: {stderr}"
    );
    assert_eq!(number(&target, "shop", "SELECT count(*) FROM items;"), 0);
}

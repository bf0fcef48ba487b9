//! Following a PostgreSQL 15 source (`engine/src/adapters/postgres/follow.rs`):
//! changes made with the real `psql` after a logical slot was created come
//! out of the slot as ops, one group per transaction in commit order:
//! inserts, updates (a TOASTed value the update did not touch left out,
//! never NULL; a changed key named by the row's old key), deletes,
//! truncates, keys that hold `/` and `%`, composite keys in key order, and
//! ferry's marker. A confirmed position moves the slot, and a feed started
//! again resumes after it. A column added on the source stops the feed
//! with an error naming the table and the column. A slot that does not
//! exist, belongs to another database, or that PostgreSQL invalidated
//! (`wal_status = lost`, past `max_slot_wal_keep_size`), is refused saying
//! what to do.

use std::time::{Duration, Instant};

use ferry_engine::Op;
use ferry_engine::adapters::postgres::follow::{ChangeFeed, FeedEvent, FeedOptions};
use ferry_engine::adapters::postgres::replication::Lsn;
use ferry_engine::adapters::postgres::{PasswordSources, PgConnection};
use ferry_tests::pg::{PgServer, replay};

const DB: &str = "app";

const TABLES: &str = "CREATE TABLE runs (id bigint PRIMARY KEY, name text, big text); \
                      CREATE TABLE pair (a int, b text, v int, PRIMARY KEY (b, a));";

fn connection(server: &PgServer) -> PgConnection {
    PgConnection::from_url(&server.url(DB), &PasswordSources::default())
        .expect("the test server's URL")
}

/// The tables, the publication and the slot, made with psql; the slot's
/// consistent point.
fn tables_and_slot(server: &PgServer) -> Lsn {
    server
        .psql(
            DB,
            &format!(
                "{TABLES} CREATE PUBLICATION ferry_follow FOR TABLE runs, pair; \
                 SELECT lsn FROM pg_create_logical_replication_slot('ferry_follow', 'pgoutput');"
            ),
        )
        .expect("the tables, the publication and the slot")
        .parse()
        .expect("an LSN")
}

fn options(start: Lsn) -> FeedOptions {
    FeedOptions {
        slot: "ferry_follow".to_owned(),
        publication: "ferry_follow".to_owned(),
        start,
        schemas: Vec::new(),
        tables: Vec::new(),
    }
}

/// One transaction as the feed gave it.
#[derive(Debug)]
struct Transaction {
    ops: Vec<Op>,
    position: Lsn,
    markers: Vec<String>,
}

/// The next `count` transactions of `feed` (skipping idle reports).
async fn transactions(feed: &mut ChangeFeed, count: usize) -> Vec<Transaction> {
    let mut read = Vec::new();
    let mut ops = Vec::new();
    let mut markers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while read.len() < count {
        assert!(
            Instant::now() < deadline,
            "{count} transactions within 60 s; read {read:#?}"
        );
        match feed.next().await.expect("the feed reads") {
            FeedEvent::Op(op) => ops.push(op),
            FeedEvent::Marker { content, .. } => {
                markers.push(String::from_utf8_lossy(&content).into_owned());
            }
            FeedEvent::Committed { position } => read.push(Transaction {
                ops: std::mem::take(&mut ops),
                position,
                markers: std::mem::take(&mut markers),
            }),
            FeedEvent::Idle { .. } => {}
        }
    }
    read
}

/// Each transaction's ops as `method key body`, for comparing, with
/// `big` shown as `<big>`.
fn shown(transactions: &[Transaction], big: &str) -> Vec<Vec<String>> {
    transactions
        .iter()
        .map(|transaction| {
            transaction
                .ops
                .iter()
                .map(|op| {
                    format!(
                        "{} {} {}",
                        String::from_utf8_lossy(&op.method),
                        String::from_utf8_lossy(&op.key),
                        String::from_utf8_lossy(&op.body)
                    )
                    .replace(big, "<big>")
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn changes_after_the_slot_come_out_as_ops_in_commit_order() {
    let server = PgServer::start().expect("PostgreSQL 15");
    server.create_database(DB).expect("a database");
    // A value stored out of line: over 2 kB after compression.
    let toasted = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i)";
    let start = tables_and_slot(&server);
    let big: String = server
        .psql(DB, &format!("SELECT {toasted};"))
        .expect("the big value");
    server
        .psql(
            DB,
            &format!(
                "BEGIN; INSERT INTO runs VALUES (1, 'a', {toasted}); INSERT INTO runs VALUES (2, 'b', NULL); COMMIT; \
                 UPDATE runs SET name = 'a2' WHERE id = 1; \
                 UPDATE runs SET id = 10 WHERE id = 2; \
                 INSERT INTO pair VALUES (1, 'x/y%', 5); \
                 UPDATE pair SET v = 6 WHERE a = 1; \
                 DELETE FROM pair WHERE a = 1; \
                 SELECT pg_logical_emit_message(true, 'ferry', 'fence 7'); \
                 SELECT pg_logical_emit_message(true, 'someone-else', 'not ours'); \
                 TRUNCATE pair;"
            ),
        )
        .expect("the changes");

    let connection = connection(&server);
    let mut feed = ChangeFeed::start(&connection, &options(start))
        .await
        .expect("the feed starts");
    let read = transactions(&mut feed, 9).await;
    let shown_ops = shown(&read, &big);
    assert_eq!(
        shown_ops,
        vec![
            vec![
                r#"INSERT public.runs/1 {"id":1,"name":"a","big":"<big>"}"#.to_owned(),
                r#"INSERT public.runs/2 {"id":2,"name":"b","big":null}"#.to_owned(),
            ],
            vec![r#"UPDATE public.runs/1 {"id":1,"name":"a2"}"#.to_owned()],
            vec![r#"UPDATE public.runs/2 {"id":10,"name":"b","big":null}"#.to_owned()],
            vec![r#"INSERT public.pair/x%2Fy%25/1 {"a":1,"b":"x/y%","v":5}"#.to_owned()],
            vec![r#"UPDATE public.pair/x%2Fy%25/1 {"a":1,"b":"x/y%","v":6}"#.to_owned()],
            vec!["DELETE public.pair/x%2Fy%25/1 ".to_owned()],
            vec![],
            vec![],
            vec![
                r#"TRUNCATE table/public.pair {"cascade":false,"restart_identity":false,"tables":[{"name":"pair","schema":"public"}]}"#
                    .to_owned()
            ],
        ]
    );
    // A transaction with a message and no change still commits; ferry's
    // marker is reported, another prefix is not.
    assert_eq!(read[6].markers, vec!["fence 7".to_owned()]);
    assert!(read[7].markers.is_empty(), "{:?}", read[7].markers);
    let mut last_position = start;
    for transaction in &read {
        assert!(
            transaction.position > last_position,
            "commit order: {read:#?}"
        );
        last_position = transaction.position;
        let count = transaction.ops.len();
        for (index, op) in transaction.ops.iter().enumerate() {
            assert_eq!(op.position, transaction.position.0);
            assert_eq!(op.txn, transaction.position.0);
            assert_eq!(op.txn_last, index + 1 == count, "{op:?}");
        }
    }

    // The ops replayed by ferry's PostgreSQL sink onto a copy of the
    // tables: the same rows, the TOASTed value the update left out kept.
    server.create_database("copy").expect("a second database");
    server.psql("copy", TABLES).expect("the tables on the copy");
    let mut ops: Vec<Op> = read
        .iter()
        .flat_map(|transaction| transaction.ops.clone())
        .collect();
    for (index, op) in ops.iter_mut().enumerate() {
        op.seq = index as u64 + 1;
    }
    replay(&server, "copy", "followed", &ops, 100, true)
        .await
        .expect("the sink applies every change");
    let rows = "SELECT id, name, md5(big) FROM runs ORDER BY id; SELECT count(*) FROM pair;";
    let on_source = server.psql(DB, rows).expect("the source's rows");
    let big_md5 = server
        .psql(DB, &format!("SELECT md5({toasted});"))
        .expect("the big value's md5");
    assert_eq!(on_source, format!("1|a2|{big_md5}\n10|b|\n0"));
    assert_eq!(
        server.psql("copy", rows).expect("the copy's rows"),
        on_source
    );

    // The target holds the first three transactions: the slot moves past
    // the third's commit, and a feed started again begins with the fourth.
    feed.confirm(read[2].position);
    let confirmed = format!("{}", read[2].position);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(2), feed.next()).await;
        let now = server
            .psql(
                DB,
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'ferry_follow';",
            )
            .expect("the slot");
        if now == confirmed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot confirmed {confirmed} within 30 s (it says {now})"
        );
    }
    drop(feed);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut feed = loop {
        // The server lets the slot go a moment after the connection.
        match ChangeFeed::start(&connection, &options(Lsn(0))).await {
            Ok(feed) => break feed,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "the feed starts again within 30 s: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let again = transactions(&mut feed, 6).await;
    assert_eq!(
        shown(&again, &big),
        shown_ops[3..].to_vec(),
        "resumed after the confirmed transaction"
    );

    // A column added on the source: the feed stops, naming it.
    server
        .psql(
            DB,
            "ALTER TABLE runs ADD COLUMN extra int; INSERT INTO runs VALUES (3, 'c', NULL, 1);",
        )
        .expect("a schema change");
    let deadline = Instant::now() + Duration::from_secs(60);
    let error = loop {
        assert!(Instant::now() < deadline, "the feed stops within 60 s");
        match feed.next().await {
            Ok(_) => continue,
            Err(error) => break error.to_string(),
        }
    };
    assert!(
        error.contains("public.runs") && error.contains("column extra added"),
        "{error}"
    );
}

#[tokio::test]
async fn a_missing_or_invalidated_slot_is_refused_saying_what_to_do() {
    let server = ferry_tests::pg::PgServer::start_with(&ferry_tests::pg::PgOptions {
        settings: vec![("max_slot_wal_keep_size".to_owned(), "1MB".to_owned())],
        ..ferry_tests::pg::PgOptions::default()
    })
    .expect("PostgreSQL 15");
    server.create_database(DB).expect("a database");
    let start = tables_and_slot(&server);
    let connection = connection(&server);
    let missing = FeedOptions {
        slot: "ferry_nope".to_owned(),
        ..options(start)
    };
    let error = ChangeFeed::start(&connection, &missing)
        .await
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(
        error.contains("ferry_nope does not exist") && error.contains("start the migration over"),
        "{error}"
    );
    // The slot of another database: named as such.
    server.create_database("other").expect("another database");
    let elsewhere = PgConnection::from_url(&server.url("other"), &PasswordSources::default())
        .expect("the other database's URL");
    let error = ChangeFeed::start(&elsewhere, &options(start))
        .await
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(
        error.contains("ferry_follow belongs to database app"),
        "{error}"
    );
    // The slot falls more than max_slot_wal_keep_size behind: PostgreSQL
    // invalidates it at a checkpoint.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        server
            .psql(
                DB,
                "INSERT INTO runs SELECT g, 'x', repeat('y', 500) FROM generate_series(1, 20000) g \
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name || 'z'; \
                 SELECT pg_switch_wal(); CHECKPOINT;",
            )
            .expect("WAL written");
        let status = server
            .psql(
                DB,
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'ferry_follow';",
            )
            .expect("the slot");
        if status == "lost" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot lost within 60 s (it is {status})"
        );
    }
    let error = ChangeFeed::start(&connection, &options(start))
        .await
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(
        error.contains("was invalidated by PostgreSQL") && error.contains("max_slot_wal_keep_size"),
        "{error}"
    );
}

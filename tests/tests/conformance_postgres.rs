//! The conformance suite (`ferry_engine::conformance`) on the postgres
//! adapter, against a real PostgreSQL 15 server the test starts on
//! 127.0.0.1: each plane is a fresh database on it. Every check passes, the
//! five batch ones and the five live ones (a stream from a slot, a resume,
//! the epoch, the fence by triggers, the digests). A write answers the
//! position its ops get, its commit LSN + 1, found with `pg_walinspect`.
//! And the suite's end-to-end variant: `ferry restore` killed with SIGKILL
//! resumes to the same data.
//!
//! A plane's own clients keep key/value pairs in a table `public.kv (key
//! text PRIMARY KEY, value text)`, which the first write creates: a put is
//! an upsert, a delete a delete, each write one SQL transaction. A restore
//! brings the table back as the adapter's ops make it (`pg.table` CREATE,
//! its rows as `pg.row` INSERTs keyed `public.kv/<key>`, the primary key
//! after), so a target's `public.kv` is what the suite compares.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::Op;
use ferry_engine::adapters::live::Position;
use ferry_engine::adapters::postgres::KIND_ROW;
use ferry_engine::adapters::postgres::replication::Lsn;
use ferry_engine::adapters::{
    SinkOptions, SourceOptions, StreamInfo, sink_from_url, source_from_url,
};
use ferry_engine::conformance::{self, CHECKS, Change, Contents, Plane, Planes, Verdict};
use ferry_engine::progress::Progress;
use ferry_tests::pg::PgServer;
use futures::StreamExt;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

/// The plane's table, as its own clients make it.
const CREATE_KV: &str = "CREATE TABLE IF NOT EXISTS public.kv (key text PRIMARY KEY, value text)";

/// The first key of a row op of `public.kv`: the table, each name
/// percent-encoded (none needs it).
const KV_ROW_KEY_PREFIX: &str = "public.kv/";

/// A key part of a row op's key, its `%` and `/` decoded.
fn percent_decoded(part: &str) -> Vec<u8> {
    part.replace("%2F", "/").replace("%25", "%").into_bytes()
}

/// One database on the test's server as a plane.
struct PgDatabase {
    url: String,
    /// A connection of the plane's own clients, one write at a time.
    client: Mutex<Client>,
}

/// What PostgreSQL said, with its SQLSTATE when it sent one.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// A key or value of the suite as `text` (the suite's are UTF-8).
fn text(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|_| {
        format!(
            "{:?} is not UTF-8: public.kv holds text",
            String::from_utf8_lossy(bytes)
        )
    })
}

#[async_trait]
impl Plane for PgDatabase {
    fn url(&self) -> String {
        self.url.clone()
    }

    async fn write(&self, changes: &[Change]) -> Result<Position, String> {
        let mut client = self.client.lock().await;
        let refused = |error: tokio_postgres::Error| describe(&error);
        let transaction = client.transaction().await.map_err(refused)?;
        transaction
            .batch_execute(CREATE_KV)
            .await
            .map_err(refused)?;
        // The transaction's id and a WAL position before its commit: the
        // commit record is then found with pg_walinspect.
        let row = transaction
            .query_one(
                "SELECT pg_current_xact_id()::xid::text, pg_current_wal_insert_lsn()::text",
                &[],
            )
            .await
            .map_err(refused)?;
        let (xid, before): (String, String) = (row.get(0), row.get(1));
        for change in changes {
            match change {
                Change::Put { key, value } => transaction
                    .execute(
                        "INSERT INTO public.kv (key, value) VALUES ($1, $2) \
                         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        &[&text(key)?, &text(value)?],
                    )
                    .await
                    .map_err(refused)?,
                Change::Delete { key } => transaction
                    .execute("DELETE FROM public.kv WHERE key = $1", &[&text(key)?])
                    .await
                    .map_err(refused)?,
            };
        }
        transaction.commit().await.map_err(refused)?;
        // The position of a transaction's ops: its commit LSN + 1.
        let commit: String = client
            .query_one(
                "SELECT start_lsn::text FROM pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn()) \
                 WHERE xid::text = $2 AND resource_manager = 'Transaction' AND record_type = 'COMMIT'",
                &[&before, &xid],
            )
            .await
            .map_err(refused)?
            .get(0);
        let commit: Lsn = commit
            .parse()
            .map_err(|error| format!("pg_walinspect gave {commit}: {error}"))?;
        Ok(Position(commit.0 + 1))
    }

    async fn read_all(&self) -> Contents {
        let client = self.client.lock().await;
        let exists: bool = client
            .query_one("SELECT to_regclass('public.kv') IS NOT NULL", &[])
            .await
            .unwrap_or_else(|error| {
                panic!("{}: looking for public.kv: {}", self.url, describe(&error))
            })
            .get(0);
        let mut contents = Contents::new();
        if !exists {
            return contents;
        }
        let rows = client
            .query("SELECT key, value FROM public.kv", &[])
            .await
            .unwrap_or_else(|error| {
                panic!("{}: reading public.kv: {}", self.url, describe(&error))
            });
        for row in rows {
            let key: String = row.get(0);
            let value: Option<String> = row.get(1);
            let value = value.unwrap_or_else(|| {
                panic!(
                    "{}: public.kv holds {key:?} with a NULL value, which no write makes",
                    self.url
                )
            });
            // A restored table has no primary key until its constraint op:
            // a row applied twice would show here, not in a map.
            if contents
                .insert(key.clone().into_bytes(), value.into_bytes())
                .is_some()
            {
                panic!("{}: public.kv holds {key:?} twice", self.url);
            }
        }
        contents
    }
}

/// The test's server, and the databases it made on it.
struct PgDatabases {
    server: PgServer,
    /// A connection to the `postgres` database, which creates the others.
    admin: Client,
    started: AtomicU64,
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|error| panic!("{url}: cannot connect: {}", describe(&error)));
    tokio::spawn(connection);
    client
}

impl PgDatabases {
    async fn start() -> Self {
        let server = PgServer::start().expect("PostgreSQL 15 starts");
        let admin = connect(&server.url("postgres")).await;
        Self {
            server,
            admin,
            started: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl Planes for PgDatabases {
    async fn start(&self) -> Box<dyn Plane> {
        let name = format!("plane_{}", self.started.fetch_add(1, Ordering::SeqCst));
        self.admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|error| panic!("CREATE DATABASE {name}: {}", describe(&error)));
        let url = self.server.url(&name);
        let client = connect(&url).await;
        client
            .batch_execute("CREATE EXTENSION pg_walinspect")
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "{url}: CREATE EXTENSION pg_walinspect: {}",
                    describe(&error)
                )
            });
        let client = Mutex::new(client);
        Box::new(PgDatabase { url, client })
    }

    /// A plane with its table, empty: a live stream follows the tables
    /// that exist when it opens.
    async fn start_source(&self) -> Box<dyn Plane> {
        let plane = self.start().await;
        plane
            .write(&[])
            .await
            .unwrap_or_else(|error| panic!("{}: creating public.kv: {error}", plane.url()));
        plane
    }

    /// A commit at every end of a source transaction: a kill then lands
    /// between checkpoints, not before the first.
    fn sink_options(&self) -> SinkOptions {
        let mut options = SinkOptions::default();
        options.restore.postgres.pg_ops_per_commit = 1;
        options
    }

    /// A row of `public.kv` puts its key; the table, its primary key and
    /// any other op change no key. A row op's key must name the row: the
    /// table, then the key percent-encoded.
    fn change_made_by(&self, op: &Op) -> Option<Change> {
        if op.kind.as_ref() != KIND_ROW.as_bytes() {
            return None;
        }
        let op_key = String::from_utf8_lossy(&op.key);
        assert!(
            op_key.starts_with(KV_ROW_KEY_PREFIX),
            "op seq {} ({} {op_key}) is no row of public.kv, the only table the test makes",
            op.seq,
            String::from_utf8_lossy(&op.method)
        );
        if op.method.as_ref() == b"DELETE" {
            let key = percent_decoded(&op_key[KV_ROW_KEY_PREFIX.len()..]);
            return Some(Change::Delete { key });
        }
        assert!(
            matches!(op.method.as_ref(), b"INSERT" | b"UPDATE"),
            "op seq {} ({op_key}): a row op is an INSERT, an UPDATE or a DELETE",
            op.seq
        );
        let row: serde_json::Value = serde_json::from_slice(&op.body).unwrap_or_else(|error| {
            panic!(
                "op seq {} ({op_key}): its body is no JSON row: {error}",
                op.seq
            )
        });
        let column = |name: &str| -> Vec<u8> {
            row[name]
                .as_str()
                .unwrap_or_else(|| {
                    panic!(
                        "op seq {} ({op_key}): column {name} is no string in {row}",
                        op.seq
                    )
                })
                .as_bytes()
                .to_vec()
        };
        let (key, value) = (column("key"), column("value"));
        let named = format!(
            "{KV_ROW_KEY_PREFIX}{}",
            String::from_utf8_lossy(&key)
                .replace('%', "%25")
                .replace('/', "%2F")
        );
        assert_eq!(
            op_key, named,
            "op seq {}: a row's key is its table, then its primary key percent-encoded",
            op.seq
        );
        Some(Change::Put { key, value })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_every_check_of_the_conformance_suite() {
    let planes = PgDatabases::start().await;
    let verdicts = conformance::run(&planes).await;
    let names: Vec<&str> = verdicts.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, CHECKS);
    let with = |wanted: bool| -> Vec<&str> {
        verdicts
            .iter()
            .filter(|(_, verdict)| (*verdict == Verdict::Passed) == wanted)
            .map(|(name, _)| *name)
            .collect()
    };
    assert_eq!(with(true), CHECKS, "{verdicts:#?}");
    assert!(with(false).is_empty(), "{verdicts:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restore_killed_with_sigkill_resumes_to_the_same_data() {
    let planes = PgDatabases::start().await;
    ferry_tests::conformance::restore_survives_kill_9(
        &planes,
        6_000,
        &["--pg-ops-per-commit", "16"],
    )
    .await;
}

/// A restore that fails (or a test's in-process kill) drops its sink:
/// from then on nothing of it may commit, and no lane may mark the stream
/// complete, or a new attempt reading the checkpoints races with it (G4).
/// Every op is handed to the lanes, the sink is dropped with them still
/// queued, and once its connections left the server no lane says the
/// stream is complete and the rows match the checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sink_commits_nothing_more_and_marks_nothing_complete() {
    let planes = PgDatabases::start().await;
    let source = planes.start().await;
    let rows = 20_000;
    let changes: Vec<Change> = (0..rows)
        .map(|index| Change::Put {
            key: format!("key-{index:06}").into_bytes(),
            value: format!("value-{index}").into_bytes(),
        })
        .collect();
    source
        .write(&changes)
        .await
        .unwrap_or_else(|error| panic!("{}: writing {rows} rows: {error}", source.url()));
    let extraction = source_from_url(&source.url(), &SourceOptions::default())
        .unwrap_or_else(|error| panic!("{}: no source: {error}", source.url()))
        .open(Arc::new(Progress::default()))
        .await
        .unwrap_or_else(|error| panic!("{}: the source does not open: {error}", source.url()));
    let mut ops: Vec<Op> = Vec::new();
    let mut batches = extraction.ops;
    while let Some(batch) = batches.next().await {
        ops.extend(
            batch.unwrap_or_else(|error| panic!("{}: extract failed: {error}", source.url())),
        );
    }

    let target = planes.start().await;
    let target_db = target
        .url()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut options = SinkOptions::default();
    options.restore.postgres.pg_lanes = 2;
    options.restore.postgres.pg_ops_per_commit = 500;
    let stream = StreamInfo {
        stream_id: "dropped".to_owned(),
        source_identity: Some("conformance".to_owned()),
        ..StreamInfo::default()
    };
    let mut sink = sink_from_url(&target.url(), &options)
        .unwrap_or_else(|error| panic!("{}: no sink: {error}", target.url()));
    sink.begin(&stream)
        .await
        .unwrap_or_else(|error| panic!("{}: begin failed: {error}", target.url()));
    let total = ops.len();
    sink.apply(ops)
        .await
        .unwrap_or_else(|error| panic!("{}: apply failed: {error}", target.url()));
    drop(sink);

    // Once the sink's connections are gone, nothing of it commits again.
    let admin = connect(&planes.server.url("postgres")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'ferry'",
                &[&target_db],
            )
            .await
            .unwrap_or_else(|error| panic!("reading pg_stat_activity: {}", describe(&error)))
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {left} connections of a dropped sink still open after 60 s",
            target.url()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = connect(&target.url()).await;
    let lanes = client
        .query(
            "SELECT stream_id, through_seq, complete FROM ferry.streams ORDER BY stream_id",
            &[],
        )
        .await
        .unwrap_or_else(|error| {
            panic!(
                "{}: reading ferry.streams: {}",
                target.url(),
                describe(&error)
            )
        });
    let lanes: Vec<(String, i64, bool)> = lanes
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        lanes.len(),
        2,
        "{}: one checkpoint per lane: {lanes:?}",
        target.url()
    );
    assert!(
        lanes.iter().all(|(_, _, complete)| !complete),
        "{}: a lane of a sink dropped before finish marked the stream of {total} ops complete: {lanes:?}",
        target.url()
    );
}

//! The live major upgrade, PostgreSQL 15 -> 17, on real servers: `pgbench`
//! (a client nobody here wrote) runs its TPC-B load through `ferry
//! gateway` with a new connection per transaction (`-C`, as a reconnecting
//! pool does), beside a writer of the test's own that keeps one connection
//! open and records every commit acknowledged to it, while `ferry migrate
//! --live` moves the database from PostgreSQL 15 (Debian's) to PostgreSQL
//! 17 (the npm registry's) through a source and a target agent, and
//! switches the gateway. Afterwards:
//! - no pgbench client aborted, and none of its transactions failed;
//! - every commit acknowledged to the writer is on 17, and none that
//!   failed is;
//! - the TPC-B invariant holds on both servers (the accounts' balances sum
//!   to the deltas of the history), and 17 holds every history row 15
//!   holds: no transaction lost or applied twice;
//! - the sequences went on from where 15's stood at the fence (no
//!   duplicate key on 17), and once switched, 15 takes no more writes.
//!
//! Then again with faults: the target agent killed with -9 while it
//! follows and while the cutover drains (restarted, the migration goes
//! on, and `--verify` finds both servers equal at F); the link to the source agent cut for seconds; PostgreSQL 17
//! stopped during the cutover (rolled back: 15 unfenced, every
//! acknowledged commit on 15, pgbench going on there); a DDL statement on
//! 15 mid-migration (the migration stops, naming the table, before
//! anything is fenced; the load goes on on 15). One migration runs at a
//! time: each is the whole machine's load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_tests::live::{migrate_output, spawn_ferry, wait_for_phase, with_options};
use ferry_tests::pg::{PgServer, client_at};
use ferry_tests::pg_live::{DB, Upgrade};
use ferry_tests::process::{FerryProcess, TcpProxy, signal};

/// One migration at a time in this test binary.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fault to inject while the migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// kill -9 the target agent while it follows; start it again.
    KillTargetAgent,
    /// Stop the target agent while it follows, kill it -9 once the cutover
    /// drains, start it again.
    KillTargetAgentWhileDraining,
    /// Cut the link to the source agent for 4 s while it follows.
    CutSourceLink,
    /// Stop PostgreSQL 17 (every process of it) a little before the
    /// cutover, until the migration ends.
    NewServerFailsAtCutover,
    /// `ALTER TABLE ... ADD COLUMN` on 15 while the migration follows.
    DdlOnSource,
    /// A session through the gateway begins a transaction, inserts, and
    /// leaves it open through the cutover.
    TransactionLeftOpen,
}

/// What a run saw.
struct Outcome {
    report: serde_json::Value,
    exit_code: Option<i32>,
    stderr: String,
    acks: Acks,
    runs: Vec<std::process::Output>,
    /// 15's history rows when the migration ended.
    old_history_at_end: u64,
    /// The session of [`Fault::TransactionLeftOpen`]: how its connection
    /// ended.
    #[allow(clippy::type_complexity)]
    left_open: Option<(
        tokio_postgres::Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    )>,
}

/// What the writer saw: the `n` of every commit acknowledged, and of every
/// one that failed.
#[derive(Debug, Default)]
struct Acks {
    acknowledged: Vec<i32>,
    failed: Vec<i32>,
    reconnects: usize,
}

/// Inserts rows one transaction each through the gateway on one
/// connection, reconnecting when the gateway ends the session (as a pool
/// does), until `stop`.
async fn writer(address: String, stop: Arc<AtomicBool>) -> Acks {
    let config = client_config(&address);
    let mut acks = Acks::default();
    let mut client = None;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        if client
            .as_ref()
            .is_none_or(|client: &tokio_postgres::Client| client.is_closed())
        {
            match config.connect(tokio_postgres::NoTls).await {
                Ok((connected, connection)) => {
                    tokio::spawn(connection);
                    client = Some(connected);
                    acks.reconnects += 1;
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(connected) = &client else { continue };
        n += 1;
        // The simple protocol: the session holds no prepared statement, so
        // the gateway moves it to the new server without a reconnect.
        match connected
            .simple_query(&format!("INSERT INTO acks (writer, n) VALUES (1, {n})"))
            .await
        {
            Ok(messages) => {
                let rows = messages.iter().find_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::CommandComplete(rows) => Some(*rows),
                    _ => None,
                });
                assert_eq!(rows, Some(1), "an insert wrote {rows:?} rows");
                acks.acknowledged.push(n);
            }
            Err(_) => acks.failed.push(n),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    acks
}

/// tokio-postgres' configuration for the superuser at `address`.
fn client_config(address: &str) -> tokio_postgres::Config {
    let (host, port) = address.rsplit_once(':').expect("HOST:PORT");
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port.parse().expect("a port"))
        .user("postgres")
        .dbname(DB)
        .connect_timeout(Duration::from_secs(10));
    config
}

/// Runs pgbench and the writer through the gateway, the migration with
/// `fault`, and the load on for a few seconds after it ends.
async fn migrate_under_load(upgrade: &mut Upgrade, fault: Fault, extra_args: &[&str]) -> Outcome {
    let address = upgrade.gateway.field("listen");
    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(writer(address.clone(), stop.clone()));
    // pgbench's TPC-B through the gateway, a connection per transaction,
    // for the whole migration and a while after it: runs of 3 s back to
    // back, each reporting its own failures (-n: the history is kept).
    let benching = {
        let address = address.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                runs.push(
                    client_at("pgbench", &address, DB)
                        .args(["-n", "-C", "-c", "4", "-j", "2", "-T", "3"])
                        .output()
                        .expect("pgbench runs"),
                );
            }
            runs
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    let source_link = TcpProxy::start(&upgrade.source_agent.field("listen"))
        .await
        .expect("proxy");
    let status_dir = tempfile::tempdir().expect("temp dir");
    let status_file = status_dir.path().join("status.json");
    let link = source_link.address();
    let args = with_options(
        upgrade.migrate_args(&status_file),
        &[&["--source-agent", link.as_str()], extra_args].concat(),
    );
    let migrate = spawn_ferry(&args);
    let mut left_open = None;
    let restart_target = |upgrade: &mut Upgrade, listen: &str| {
        upgrade.target_agent = FerryProcess::start(
            &[
                "agent",
                "target",
                "--control-plane",
                &upgrade.new.url(DB),
                "--listen",
                listen,
            ],
            &[],
        )
        .expect("target agent again");
    };
    match fault {
        Fault::None => {}
        Fault::KillTargetAgent => {
            wait_for_phase(&status_file, "following").await;
            let listen = upgrade.target_agent.field("listen");
            upgrade.target_agent.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            restart_target(upgrade, &listen);
        }
        Fault::KillTargetAgentWhileDraining => {
            wait_for_phase(&status_file, "following").await;
            signal(upgrade.target_agent.pid(), "-STOP");
            wait_for_phase(&status_file, "draining").await;
            let listen = upgrade.target_agent.field("listen");
            upgrade.target_agent.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            restart_target(upgrade, &listen);
        }
        Fault::CutSourceLink => {
            wait_for_phase(&status_file, "following").await;
            source_link.cut();
            tokio::time::sleep(Duration::from_secs(4)).await;
            source_link.restore();
        }
        Fault::NewServerFailsAtCutover => {
            // The cutover starts after 3 s of following, whatever the lag
            // (see the test's options); the new server stops before.
            wait_for_phase(&status_file, "following").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            upgrade.new.pause();
        }
        Fault::TransactionLeftOpen => {
            wait_for_phase(&status_file, "following").await;
            let (client, connection) = client_config(&address)
                .connect(tokio_postgres::NoTls)
                .await
                .expect("connects through the gateway");
            let connection = tokio::spawn(connection);
            client
                .batch_execute("BEGIN; INSERT INTO acks (writer, n) VALUES (2, -1);")
                .await
                .expect("a transaction begins");
            // The client keeps it open and says nothing more.
            left_open = Some((client, connection));
        }
        Fault::DdlOnSource => {
            wait_for_phase(&status_file, "following").await;
            query(
                &upgrade.old,
                "ALTER TABLE pgbench_tellers ADD COLUMN note text;",
            );
        }
    }
    let (report, exit_code, stderr) = migrate_output(migrate).await;
    if fault == Fault::NewServerFailsAtCutover {
        upgrade.new.resume();
    }
    // A migration that stopped before it could report says why on stderr.
    let report = report.unwrap_or_default();
    let old_history_at_end = count(&upgrade.old, "pgbench_history");
    // The load goes on after the switch (or the rollback).
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let acks = writing.await.expect("the writer ends");
    let runs = tokio::task::spawn_blocking(move || benching.join().expect("pgbench's thread"))
        .await
        .expect("joins");
    eprintln!(
        "{fault:?}: {} after {} ms, pause {} ms; {} pgbench runs; writer: {} acknowledged, {} failed, {} connections",
        report["outcome"],
        report["elapsed_ms"],
        report["pause_window_ms"],
        runs.len(),
        acks.acknowledged.len(),
        acks.failed.len(),
        acks.reconnects
    );
    Outcome {
        report,
        exit_code,
        stderr,
        acks,
        runs,
        old_history_at_end,
        left_open,
    }
}

fn query(server: &PgServer, sql: &str) -> String {
    server.psql(DB, sql).expect("psql")
}

fn count(server: &PgServer, table: &str) -> u64 {
    query(server, &format!("SELECT count(*) FROM {table};"))
        .parse()
        .expect("a count")
}

/// No pgbench client aborted, no transaction of it failed.
fn assert_pgbench_never_failed(upgrade: &Upgrade, outcome: &Outcome) {
    assert!(!outcome.runs.is_empty());
    for run in &outcome.runs {
        let out = String::from_utf8_lossy(&run.stdout);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            run.status.success() && !err.contains("aborted"),
            "a pgbench client aborted: {}\n{out}\n{err}\n{}",
            run.status,
            upgrade.logs()
        );
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
}

/// Every commit acknowledged to the writer is on `server`, none that
/// failed is.
fn assert_acks_on(server: &PgServer, acks: &Acks) {
    let held: std::collections::BTreeSet<i32> = query(server, "SELECT n FROM acks;")
        .lines()
        .map(|line| line.parse().expect("a number"))
        .collect();
    for n in &acks.acknowledged {
        assert!(held.contains(n), "acknowledged commit {n} is missing");
    }
    for n in &acks.failed {
        assert!(!held.contains(n), "commit {n} failed and is there");
    }
    assert!(acks.acknowledged.len() > 50, "{acks:?}");
}

/// TPC-B's invariant: the accounts' balances sum to the history's deltas.
fn assert_balanced(server: &PgServer) {
    let invariant = "SELECT (SELECT sum(abalance) FROM pgbench_accounts) \
                     = (SELECT coalesce(sum(delta), 0) FROM pgbench_history);";
    assert_eq!(query(server, invariant), "t");
}

/// The checks after a migration that switched.
fn assert_switched_without_loss(upgrade: &Upgrade, outcome: &Outcome) {
    assert_eq!(
        outcome.report["outcome"],
        "switched",
        "{}\n{}\n{}",
        outcome.report,
        outcome.stderr,
        upgrade.logs()
    );
    assert_eq!(outcome.exit_code, Some(0));
    assert_pgbench_never_failed(upgrade, outcome);
    assert_acks_on(&upgrade.new, &outcome.acks);
    assert_balanced(&upgrade.old);
    assert_balanced(&upgrade.new);
    // 17 holds 15's history as it was at the fence.
    let last_on_old = query(
        &upgrade.old,
        "SELECT coalesce(max(id), 0) FROM pgbench_history;",
    );
    assert_eq!(
        query(
            &upgrade.old,
            "SELECT id, tid, bid, aid, delta FROM pgbench_history ORDER BY id;"
        ),
        query(
            &upgrade.new,
            &format!(
                "SELECT id, tid, bid, aid, delta FROM pgbench_history WHERE id <= {last_on_old} ORDER BY id;"
            ),
        ),
    );
    // Once switched, 15 took no more writes; 17 did, with ids after 15's.
    assert_eq!(
        count(&upgrade.old, "pgbench_history"),
        outcome.old_history_at_end
    );
    assert!(
        count(&upgrade.new, "pgbench_history") > outcome.old_history_at_end,
        "no transaction ran on 17 after the switch"
    );
    assert_eq!(
        count(&upgrade.old, "acks"),
        query(
            &upgrade.new,
            &format!(
                "SELECT count(*) FROM acks WHERE id <= {};",
                query(&upgrade.old, "SELECT coalesce(max(id), 0) FROM acks;")
            )
        )
        .parse::<u64>()
        .expect("a count"),
    );
}

/// The checks after a migration that rolled back, or stopped before the
/// cutover: 15 unfenced and serving, every acknowledged commit on it.
fn assert_stayed_on_the_old_server(upgrade: &Upgrade, outcome: &Outcome) {
    assert_ne!(outcome.report["outcome"], "switched", "{}", outcome.report);
    assert_pgbench_never_failed(upgrade, outcome);
    assert_acks_on(&upgrade.old, &outcome.acks);
    assert_balanced(&upgrade.old);
    assert_eq!(
        query(
            &upgrade.old,
            "SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgname = 'ferry_fence';"
        ),
        "0",
        "15 is unfenced"
    );
    assert!(
        count(&upgrade.old, "pgbench_history") > outcome.old_history_at_end,
        "the load went on on 15"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_15_moves_to_17_under_pgbench_without_a_lost_transaction() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut upgrade = Upgrade::start(1);
    // Two sessions opened through the gateway before the migration and
    // idle through it: one that prepared a named statement (ended with
    // 57P01 at the switch: its statement stays on 15), one that did not
    // (moved: the same connection now reaches 17).
    let config = client_config(&upgrade.gateway.field("listen"));
    let (prepared, prepared_connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connects through the gateway");
    let prepared_connection = tokio::spawn(prepared_connection);
    prepared
        .prepare("SELECT count(*) FROM acks")
        .await
        .expect("prepares");
    let (plain, plain_connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connects through the gateway");
    tokio::spawn(plain_connection);
    let version = |messages: Vec<tokio_postgres::SimpleQueryMessage>| {
        messages.into_iter().find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
    };
    let before = version(
        plain
            .simple_query("SHOW server_version_num")
            .await
            .expect("asks"),
    );
    assert!(before.is_some_and(|version| version.starts_with("15")));

    let outcome = migrate_under_load(&mut upgrade, Fault::None, &[]).await;
    assert_switched_without_loss(&upgrade, &outcome);
    assert_eq!(
        outcome.acks.reconnects, 1,
        "the writer's session moved to 17 without a reconnect"
    );
    let after = version(
        plain
            .simple_query("SHOW server_version_num")
            .await
            .expect("the idle session goes on"),
    );
    assert!(
        after
            .as_deref()
            .is_some_and(|version| version.starts_with("17")),
        "{after:?}"
    );
    let ended = prepared_connection
        .await
        .expect("joins")
        .expect_err("the session with a prepared statement is ended");
    assert_eq!(
        ended.code().map(|code| code.code()),
        Some("57P01"),
        "{ended}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_agent_killed_while_following_resumes() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut upgrade = Upgrade::start(1);
    let outcome = migrate_under_load(
        &mut upgrade,
        Fault::KillTargetAgent,
        &["--follow-at-least", "4s"],
    )
    .await;
    assert_switched_without_loss(&upgrade, &outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_agent_killed_while_draining_resumes() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut upgrade = Upgrade::start(1);
    let outcome = migrate_under_load(
        &mut upgrade,
        Fault::KillTargetAgentWhileDraining,
        // The cutover starts while the stopped agent lags; the long pause
        // leaves room for --verify's digests of both servers at F (every
        // row of every table, read in a debug build).
        &[
            "--follow-at-least",
            "2s",
            "--max-lag",
            "1000000000000",
            "--max-pause",
            "30s",
            "--verify",
        ],
    )
    .await;
    assert_switched_without_loss(&upgrade, &outcome);
    // 100,000 accounts, 10 tellers, 1 branch, and the history and acks.
    let verified = outcome.report["verified_keys"].as_u64().unwrap_or(0);
    assert!(verified > 100_011, "{}", outcome.report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_to_the_source_agent_is_bridged() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut upgrade = Upgrade::start(1);
    let outcome = migrate_under_load(
        &mut upgrade,
        Fault::CutSourceLink,
        &["--follow-at-least", "6s"],
    )
    .await;
    assert_switched_without_loss(&upgrade, &outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_server_that_fails_at_the_cutover_rolls_back() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut upgrade = Upgrade::start(1);
    let outcome = migrate_under_load(
        &mut upgrade,
        Fault::NewServerFailsAtCutover,
        &["--follow-at-least", "3s", "--max-lag", "1000000000000"],
    )
    .await;
    assert_eq!(
        outcome.report["outcome"], "rolled_back",
        "{}",
        outcome.report
    );
    assert_stayed_on_the_old_server(&upgrade, &outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_left_open_through_the_cutover_is_rolled_back() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut upgrade = Upgrade::start(1);
    let mut outcome = migrate_under_load(&mut upgrade, Fault::TransactionLeftOpen, &[]).await;
    assert_switched_without_loss(&upgrade, &outcome);
    let (_client, connection) = outcome.left_open.take().expect("the session");
    let ended = connection
        .await
        .expect("joins")
        .expect_err("the session was ended");
    assert_eq!(
        ended.code().map(|code| code.code()),
        Some("57P01"),
        "{ended}"
    );
    for server in [&upgrade.old, &upgrade.new] {
        assert_eq!(
            query(server, "SELECT count(*) FROM acks WHERE writer = 2;"),
            "0",
            "the open transaction was rolled back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ddl_statement_on_the_source_stops_the_migration_by_name() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut upgrade = Upgrade::start(1);
    let outcome = migrate_under_load(&mut upgrade, Fault::DdlOnSource, &[]).await;
    assert_ne!(outcome.exit_code, Some(0));
    let said = format!("{}\n{}", outcome.report, outcome.stderr);
    assert!(said.contains("pgbench_tellers"), "{said}");
    assert_stayed_on_the_old_server(&upgrade, &outcome);
}

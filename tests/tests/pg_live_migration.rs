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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_tests::live::{migrate_output, spawn_ferry};
use ferry_tests::pg::{PgServer, client_at};
use ferry_tests::pg_live::{DB, Upgrade};

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
    let (host, port) = address.rsplit_once(':').expect("HOST:PORT");
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port.parse().expect("a port"))
        .user("postgres")
        .dbname(DB)
        .connect_timeout(Duration::from_secs(10));
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
        match connected
            .execute("INSERT INTO acks (writer, n) VALUES (1, $1)", &[&n])
            .await
        {
            Ok(1) => acks.acknowledged.push(n),
            Ok(rows) => panic!("an insert wrote {rows} rows"),
            Err(_) => acks.failed.push(n),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    acks
}

fn query(server: &PgServer, sql: &str) -> String {
    server.psql(DB, sql).expect("psql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_15_moves_to_17_under_pgbench_without_a_lost_transaction() {
    let upgrade = Upgrade::start(1);
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
    tokio::time::sleep(Duration::from_secs(3)).await;

    let status = tempfile::NamedTempFile::new().expect("status file");
    let migrate = spawn_ferry(&upgrade.migrate_args(status.path()));
    let (report, code, stderr) = migrate_output(migrate).await;
    let report =
        report.unwrap_or_else(|stdout| panic!("no report: {stdout}\n{stderr}\n{}", upgrade.logs()));
    assert_eq!(
        report["outcome"],
        "switched",
        "{report}\n{stderr}\n{}",
        upgrade.logs()
    );
    assert_eq!(code, Some(0));
    let old_history_at_switch = query(&upgrade.old, "SELECT count(*) FROM pgbench_history;");

    // Load on 17 for a few more seconds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let acks = writing.await.expect("the writer ends");
    let runs = tokio::task::spawn_blocking(move || benching.join().expect("pgbench's thread"))
        .await
        .expect("joins");
    for run in &runs {
        let out = String::from_utf8_lossy(&run.stdout);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            run.status.success() && !err.contains("aborted"),
            "a pgbench client aborted across the cutover: {}\n{out}\n{err}\n{}",
            run.status,
            upgrade.logs()
        );
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }

    // Every acknowledged commit is on 17, none that failed is.
    let on_new: std::collections::BTreeSet<i32> = query(&upgrade.new, "SELECT n FROM acks;")
        .lines()
        .map(|line| line.parse().expect("a number"))
        .collect();
    for n in &acks.acknowledged {
        assert!(
            on_new.contains(n),
            "acknowledged commit {n} is missing on 17"
        );
    }
    for n in &acks.failed {
        assert!(!on_new.contains(n), "commit {n} failed and is on 17");
    }
    assert!(acks.acknowledged.len() > 100, "{acks:?}");

    // TPC-B's invariant on both, and 17 holds every history row of 15.
    let invariant = "SELECT (SELECT sum(abalance) FROM pgbench_accounts) \
                     = (SELECT coalesce(sum(delta), 0) FROM pgbench_history);";
    assert_eq!(query(&upgrade.old, invariant), "t");
    assert_eq!(query(&upgrade.new, invariant), "t");
    let old_rows = query(
        &upgrade.old,
        "SELECT id, tid, bid, aid, delta FROM pgbench_history ORDER BY id;",
    );
    let new_rows = query(
        &upgrade.new,
        &format!(
            "SELECT id, tid, bid, aid, delta FROM pgbench_history WHERE id <= {} ORDER BY id;",
            query(
                &upgrade.old,
                "SELECT coalesce(max(id), 0) FROM pgbench_history;"
            )
        ),
    );
    assert_eq!(
        old_rows, new_rows,
        "17 holds 15's history as it was at the fence"
    );
    // Once switched, 15 took no more writes; 17 did.
    assert_eq!(
        query(&upgrade.old, "SELECT count(*) FROM pgbench_history;"),
        old_history_at_switch
    );
    let new_count: u64 = query(&upgrade.new, "SELECT count(*) FROM pgbench_history;")
        .parse()
        .expect("a count");
    let old_count: u64 = old_history_at_switch.parse().expect("a count");
    assert!(
        new_count > old_count,
        "no transaction ran on 17 after the switch"
    );
    eprintln!(
        "pause {} ms, {} pgbench runs, {} history rows on 15 and {new_count} on 17, writer: {} acknowledged, {} failed, {} connections",
        report["pause_window_ms"],
        runs.len(),
        old_count,
        acks.acknowledged.len(),
        acks.failed.len(),
        acks.reconnects
    );
}

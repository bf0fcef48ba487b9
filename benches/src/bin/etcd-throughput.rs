//! Extract + restore of N keys (default 100,000, 200-byte values) between
//! real etcd servers, against `etcdctl make-mirror`'s initial copy of the
//! same keys and against the ceiling: the fastest a plain batched-Txn writer
//! gets the same puts into an empty etcd on this machine, in this run.
//!
//! `cargo run --release -p ferry-benches --bin etcd-throughput [-- KEYS]`
//! (needs `etcd` and `etcdctl`: `apt-get install -y etcd-server etcd-client`).
//! It prints keys per second for each and the two ratios; it asserts nothing.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_benches::run::{self, TXN_OPS, count_under, print_rates, put_in_txns};
use ferry_tests::etcd::EtcdServer;

const VALUE_BYTES: usize = 200;

fn key(index: usize) -> Vec<u8> {
    format!("/pachyderm/pfs/commits/repo-{}/{index:040x}", index % 40).into_bytes()
}

fn value(index: usize) -> Vec<u8> {
    let mut value = format!(
        r#"{{"commit":{index},"origin":"USER","description":"nightly ingest of sensor batch","size_bytes":{}}}"#,
        index * 7919
    );
    value.extend(std::iter::repeat_n(
        ' ',
        VALUE_BYTES.saturating_sub(value.len()),
    ));
    value.truncate(VALUE_BYTES);
    value.into_bytes()
}

/// The ceiling: the keys in Txns of [`TXN_OPS`], `in_flight` at a time.
async fn batched_writer(server: &EtcdServer, keys: usize, in_flight: usize) -> Duration {
    put_in_txns(server, keys, in_flight, |index| (key(index), value(index))).await
}

async fn count(server: &EtcdServer) -> i64 {
    count_under(server, b"/pachyderm/").await
}

#[tokio::main]
async fn main() {
    let keys: usize = std::env::args()
        .nth(1)
        .map_or(100_000, |keys| keys.parse().expect("KEYS is a number"));

    // The ceiling, on empty servers: one Txn at a time, and four at once
    // (ferry's default --lanes).
    let one = EtcdServer::start().expect("etcd");
    let ceiling_serial = batched_writer(&one, keys, 1).await;
    let four = EtcdServer::start().expect("etcd");
    let ceiling_parallel = batched_writer(&four, keys, 4).await;
    drop(four);
    let source = one; // now holds the keys
    assert_eq!(count(&source).await as usize, keys);

    // ferry: extract to a file:// store, restore into an empty etcd.
    let store = tempfile::tempdir().expect("temp dir");
    let store_url = format!("file://{}", store.path().display());
    let target = EtcdServer::start().expect("etcd");
    let extract = run::extract(&source, &store_url);
    let restore = run::restore(&store_url, &target, &["--lanes", "4"]);
    assert_eq!(count(&target).await as usize, keys);
    drop(target);
    // The same restore on one checkpoint chain, one Txn at a time.
    let target = EtcdServer::start().expect("etcd");
    let restore_serial = run::restore(&store_url, &target, &["--lanes", "1"]);
    assert_eq!(count(&target).await as usize, keys);
    drop(target);

    // etcdctl make-mirror: its initial copy, until the target holds every key.
    let mirror_target = EtcdServer::start().expect("etcd");
    let started = Instant::now();
    let mut mirror = Command::new("etcdctl")
        .args([
            "make-mirror",
            "--endpoints",
            &source.endpoint(),
            &format!("http://{}", mirror_target.endpoint()),
        ])
        .env("ETCDCTL_API", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl runs (apt-get install -y etcd-client)");
    while (count(&mirror_target).await as usize) < keys {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(900) {
            break;
        }
    }
    let make_mirror = started.elapsed();
    let _ = mirror.kill();
    let _ = mirror.wait();

    // End to end with ferry's defaults (4 lanes).
    let end_to_end = extract + restore;
    let best_ceiling = ceiling_serial.min(ceiling_parallel);
    println!("keys: {keys}, {VALUE_BYTES}-byte values, Txns of {TXN_OPS} puts");
    let rows = [
        ("ceiling, batched Txn writer, 1 in flight", ceiling_serial),
        ("ceiling, batched Txn writer, 4 in flight", ceiling_parallel),
        ("ferry extract", extract),
        ("ferry restore, 4 lanes (the default)", restore),
        ("ferry restore, 1 lane", restore_serial),
        ("ferry extract + restore (4 lanes)", end_to_end),
        ("etcdctl make-mirror initial copy", make_mirror),
    ];
    print_rates(keys, &rows);
    println!(
        "ratio ferry extract+restore / make-mirror = {:.1} (target >= 20)",
        make_mirror.as_secs_f64() / end_to_end.as_secs_f64()
    );
    println!(
        "ratio ferry restore (4 lanes, the default) / best ceiling = {:.2} (target >= 0.80)",
        best_ceiling.as_secs_f64() / restore.as_secs_f64()
    );
    println!(
        "ratio ferry restore (1 lane) / ceiling (1 in flight) = {:.2}",
        ceiling_serial.as_secs_f64() / restore_serial.as_secs_f64()
    );
    println!(
        "ratio ferry restore (4 lanes) / ceiling (4 in flight) = {:.2}",
        ceiling_parallel.as_secs_f64() / restore.as_secs_f64()
    );
}

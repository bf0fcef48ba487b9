//! What the etcd benches do alike: the `ferry` binary built beside them,
//! batched writes into a real etcd, key counts and rates.

use std::process::Command;
use std::time::{Duration, Instant};

use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::request_op::Request;
use ferry_proto::etcd::etcdserverpb::{PutRequest, RequestOp, TxnRequest};
use ferry_tests::etcd::EtcdServer;
use tonic::transport::Channel;

/// Puts in one Txn: etcd's default `--max-txn-ops`.
pub const TXN_OPS: usize = 128;

/// A KV client of `server`.
pub async fn client(server: &EtcdServer) -> KvClient<Channel> {
    KvClient::connect(format!("http://{}", server.endpoint()))
        .await
        .expect("etcd answers")
}

/// Writes keys `0..keys` (each key and value made by `pair`) in Txns of
/// [`TXN_OPS`] puts, `in_flight` Txns at a time, over one connection
/// (HTTP/2 carries the Txns in flight side by side, as ferry's own
/// connection does), opened before the clock starts. Returns how long the
/// writes took.
pub async fn put_in_txns(
    server: &EtcdServer,
    keys: usize,
    in_flight: usize,
    pair: fn(usize) -> (Vec<u8>, Vec<u8>),
) -> Duration {
    let kv = client(server).await;
    let started = Instant::now();
    let mut batches = (0..keys)
        .step_by(TXN_OPS)
        .map(|first| first..(first + TXN_OPS).min(keys));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.len() < in_flight {
            let Some(batch) = batches.next() else { break };
            let mut kv = kv.clone();
            tasks.spawn(async move {
                let success = batch
                    .map(|index| {
                        let (key, value) = pair(index);
                        RequestOp {
                            request: Some(Request::RequestPut(PutRequest {
                                key,
                                value,
                                ..PutRequest::default()
                            })),
                        }
                    })
                    .collect();
                kv.txn(TxnRequest {
                    compare: Vec::new(),
                    success,
                    failure: Vec::new(),
                })
                .await
                .expect("txn");
            });
        }
        if tasks.join_next().await.is_none() {
            break;
        }
    }
    started.elapsed()
}

/// The keys `server` holds under `prefix`.
pub async fn count_under(server: &EtcdServer, prefix: &[u8]) -> i64 {
    ferry_tests::live::count_under(&server.endpoint(), prefix).await
}

/// Runs the `ferry` built beside this bench (`cargo build --release -p
/// ferry-cli`) with `args`; returns how long it took. A failure stops the
/// bench with ferry's stderr.
pub fn ferry(args: &[&str]) -> Duration {
    let binary = std::env::current_exe()
        .expect("this binary")
        .with_file_name("ferry");
    let started = Instant::now();
    let output = Command::new(&binary)
        .args(args)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "{} runs ({error}); build it with cargo build --release -p ferry-cli",
                binary.display()
            )
        });
    assert!(
        output.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    started.elapsed()
}

/// CPU time (user and system) the process `pid` (or `self`) has used so
/// far, from `/proc/PID/stat`; zero where there is no such file (the
/// process is gone, or this is not Linux).
pub fn cpu_time(pid: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // After the command name (which may hold spaces), utime and stime are
    // the 12th and 13th fields, in clock ticks (100 a second on Linux).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&index| fields.get(index)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// `items` per second over `time`.
pub fn per_second(items: usize, time: Duration) -> f64 {
    items as f64 / time.as_secs_f64()
}

/// `ferry extract --source SOURCE --to STORE_URL --quiet`; returns how long
/// it took.
pub fn extract(source: &EtcdServer, store_url: &str) -> Duration {
    ferry(&[
        "extract",
        "--source",
        &source.url(),
        "--to",
        store_url,
        "--quiet",
    ])
}

/// `ferry restore --from STORE_URL --target TARGET --quiet EXTRA`; returns
/// how long it took.
pub fn restore(store_url: &str, target: &EtcdServer, extra: &[&str]) -> Duration {
    let target = target.url();
    let mut args = vec![
        "restore", "--from", store_url, "--target", &target, "--quiet",
    ];
    args.extend_from_slice(extra);
    ferry(&args)
}

/// Prints one line per row: its name, `keys` per second over its time, and
/// the time.
pub fn print_rates(keys: usize, rows: &[(&str, Duration)]) {
    for (name, time) in rows {
        println!(
            "{name:<42} {:>9.0} keys/s ({:.2} s)",
            per_second(keys, *time),
            time.as_secs_f64()
        );
    }
}

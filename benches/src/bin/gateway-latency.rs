//! What `ferry gateway` adds to a call: the latency of one Put and one
//! Range at a time (200-byte values) and the throughput of 32 concurrent
//! writers, against one real etcd, directly and through the gateway, in
//! the same run and interleaved in rounds so both see the same machine.
//!
//! `cargo build --release -p ferry-cli && cargo run --release -p ferry-benches --bin gateway-latency [-- CALLS]`
//! (needs `etcd`: `apt-get install -y etcd-server`). It prints median,
//! 90th and 99th percentile per call kind and path, and the ratios; it
//! asserts nothing.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::{PutRequest, RangeRequest};
use ferry_tests::etcd::EtcdServer;
use tonic::transport::Channel;

const VALUE_BYTES: usize = 200;
const ROUNDS: usize = 10;
const WRITERS: usize = 32;

/// The gateway process, killed on drop.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_gateway(upstream: &str) -> (Gateway, String) {
    let binary = std::env::current_exe()
        .expect("this binary")
        .with_file_name("ferry");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(&binary)
        .args(["gateway", "--listen", &listen, "--upstream", upstream])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "{} runs ({error}); build it with cargo build --release -p ferry-cli",
                binary.display()
            )
        });
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the gateway says it is ready");
    assert!(line.contains(&listen), "the gateway printed {line:?}");
    (Gateway(child), listen)
}

async fn client(address: &str) -> KvClient<Channel> {
    KvClient::connect(format!("http://{address}"))
        .await
        .expect("connects")
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

async fn one_put(client: &mut KvClient<Channel>, index: usize, value: &[u8]) -> Duration {
    let started = Instant::now();
    client
        .put(PutRequest {
            key: format!("/bench/{}", index % 1000).into_bytes(),
            value: value.to_vec(),
            ..PutRequest::default()
        })
        .await
        .expect("put");
    started.elapsed()
}

async fn one_range(client: &mut KvClient<Channel>, index: usize) -> Duration {
    let started = Instant::now();
    client
        .range(RangeRequest {
            key: format!("/bench/{}", index % 1000).into_bytes(),
            ..RangeRequest::default()
        })
        .await
        .expect("range");
    started.elapsed()
}

/// Puts per second with `WRITERS` writers sharing one connection.
async fn throughput(client: &KvClient<Channel>, puts: usize, value: &[u8]) -> f64 {
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let mut client = client.clone();
        let value = value.to_vec();
        writers.spawn(async move {
            for index in (writer..puts).step_by(WRITERS) {
                one_put(&mut client, index, &value).await;
            }
        });
    }
    while writers.join_next().await.is_some() {}
    puts as f64 / started.elapsed().as_secs_f64()
}

fn report(name: &str, direct: &mut [Duration], gateway: &mut [Duration]) {
    direct.sort();
    gateway.sort();
    for (path, samples) in [("direct", &*direct), ("gateway", &*gateway)] {
        println!(
            "{name:<6} {path:<8} median {:>7.0} µs   p90 {:>7.0} µs   p99 {:>7.0} µs   ({} calls)",
            micros(percentile(samples, 0.5)),
            micros(percentile(samples, 0.9)),
            micros(percentile(samples, 0.99)),
            samples.len()
        );
    }
    println!(
        "{name:<6} gateway adds {:.0} µs at the median (x{:.2}), {:.0} µs at p99",
        micros(percentile(gateway, 0.5)) - micros(percentile(direct, 0.5)),
        percentile(gateway, 0.5).as_secs_f64() / percentile(direct, 0.5).as_secs_f64(),
        micros(percentile(gateway, 0.99)) - micros(percentile(direct, 0.99)),
    );
}

#[tokio::main]
async fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .map(|calls| calls.parse().expect("CALLS is a number"))
        .unwrap_or(2000);
    let per_round = (calls / ROUNDS).max(1);
    let etcd = EtcdServer::start().expect("etcd starts");
    let (_gateway, listen) = start_gateway(&etcd.url());
    let mut direct = client(&etcd.endpoint()).await;
    let mut through = client(&listen).await;
    let value = vec![b'v'; VALUE_BYTES];
    // Warm both paths up (connections, etcd's caches).
    for index in 0..200 {
        one_put(&mut direct, index, &value).await;
        one_put(&mut through, index, &value).await;
    }
    let (mut put_direct, mut put_gateway) = (Vec::new(), Vec::new());
    let (mut range_direct, mut range_gateway) = (Vec::new(), Vec::new());
    let (mut throughput_direct, mut throughput_gateway) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for index in 0..per_round {
            put_direct.push(one_put(&mut direct, index, &value).await);
        }
        for index in 0..per_round {
            put_gateway.push(one_put(&mut through, index, &value).await);
        }
        for index in 0..per_round {
            range_direct.push(one_range(&mut direct, index).await);
        }
        for index in 0..per_round {
            range_gateway.push(one_range(&mut through, index).await);
        }
        throughput_direct.push(throughput(&direct, per_round * 4, &value).await);
        throughput_gateway.push(throughput(&through, per_round * 4, &value).await);
    }
    println!("one call at a time, {VALUE_BYTES}-byte values, etcd on 127.0.0.1:");
    report("Put", &mut put_direct, &mut put_gateway);
    report("Range", &mut range_direct, &mut range_gateway);
    throughput_direct.sort_by(f64::total_cmp);
    throughput_gateway.sort_by(f64::total_cmp);
    let median = |values: &[f64]| values[values.len() / 2];
    println!(
        "{WRITERS} concurrent writers: direct {:.0} puts/s, gateway {:.0} puts/s (x{:.2}; medians of {ROUNDS} rounds)",
        median(&throughput_direct),
        median(&throughput_gateway),
        median(&throughput_gateway) / median(&throughput_direct),
    );
}

//! What `ferry gateway` adds to a call: the latency of one Put and one
//! Range at a time (200-byte values) and the throughput of 32 concurrent
//! writers, against one real etcd, directly and through the gateway, in
//! the same run and interleaved in rounds so both see the same machine.
//!
//! The gateway sends a Put to etcd as it is (a fenced etcd refuses it
//! under ferry's write alarm), and a DeleteRange or a Txn with no Put at
//! its top level as a Txn guarded by the fence (`__ferry__/fenced` absent).
//! What that guard costs etcd itself is measured apart: a guarded Txn sent
//! directly, one at a time and by 32 writers. And since etcd, the gateway and this client share the
//! machine's cores, it prints the CPU time each process spent per Put, in
//! the 32-writer rounds and one at a time through the gateway.
//!
//! The peer is etcd's own gRPC proxy (`etcd grpc-proxy start`, in the same
//! etcd binary), measured the same way in the same rounds: what a hop
//! through a Go gRPC proxy costs on this machine.
//!
//! `cargo build --release -p ferry-cli && cargo run --release -p ferry-benches --bin gateway-latency [-- CALLS]`
//! (needs `etcd`: `apt-get install -y etcd-server`). It prints median,
//! 90th and 99th percentile per call kind and path, and the ratios; it
//! asserts nothing.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_benches::run::cpu_time;
use ferry_engine::adapters::etcd::guard_compare;
use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::request_op::Request;
use ferry_proto::etcd::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest};
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

fn start_gateway(upstream: &str) -> (Gateway, String, u32) {
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
    let pid = child.id();
    (Gateway(child), listen, pid)
}

/// `etcd grpc-proxy start` in front of `endpoint`: its pid and address.
fn start_grpc_proxy(endpoint: &str) -> (Gateway, String, u32) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new("etcd")
        .args([
            "grpc-proxy",
            "start",
            "--endpoints",
            endpoint,
            "--listen-addr",
            &listen,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd grpc-proxy runs");
    let pid = child.id();
    // Killed and waited for on drop, whatever happens next.
    let proxy = Gateway(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(&listen).is_ok() {
            return (proxy, listen, pid);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("etcd grpc-proxy did not listen on {listen}");
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

/// How a Put is sent: as a Put, or as the gateway sends it on (a Txn
/// guarded by the fence).
#[derive(Debug, Clone, Copy)]
enum PutAs {
    Put,
    GuardedTxn,
}

async fn one_put(client: &mut KvClient<Channel>, index: usize, value: &[u8]) -> Duration {
    one_put_as(client, index, value, PutAs::Put).await
}

async fn one_put_as(
    client: &mut KvClient<Channel>,
    index: usize,
    value: &[u8],
    how: PutAs,
) -> Duration {
    let put = PutRequest {
        key: format!("/bench/{}", index % 1000).into_bytes(),
        value: value.to_vec(),
        ..PutRequest::default()
    };
    let started = Instant::now();
    match how {
        PutAs::Put => {
            client.put(put).await.expect("put");
        }
        PutAs::GuardedTxn => {
            let answer = client
                .txn(TxnRequest {
                    compare: vec![guard_compare()],
                    success: vec![RequestOp {
                        request: Some(Request::RequestPut(put)),
                    }],
                    failure: Vec::new(),
                })
                .await
                .expect("guarded txn");
            assert!(answer.into_inner().succeeded, "etcd here is not fenced");
        }
    }
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

/// CPU time used by this client, etcd, the gateway and etcd's proxy.
#[derive(Debug, Default, Clone, Copy)]
struct CpuUse {
    client: Duration,
    etcd: Duration,
    gateway: Duration,
    proxy: Duration,
    puts: usize,
}

impl CpuUse {
    /// Adds what each process used between `before` and `after` (as
    /// [`Processes::now`] gives them) for `puts` Puts.
    fn add(&mut self, before: [Duration; 4], after: [Duration; 4], puts: usize) {
        self.client += after[0].saturating_sub(before[0]);
        self.etcd += after[1].saturating_sub(before[1]);
        self.gateway += after[2].saturating_sub(before[2]);
        self.proxy += after[3].saturating_sub(before[3]);
        self.puts += puts;
    }
}

/// The processes whose CPU time is counted.
struct Processes {
    etcd: String,
    gateway: String,
    proxy: String,
}

impl Processes {
    fn now(&self) -> [Duration; 4] {
        [
            cpu_time("self"),
            cpu_time(&self.etcd),
            cpu_time(&self.gateway),
            cpu_time(&self.proxy),
        ]
    }
}

/// Puts per second with `WRITERS` writers sharing one connection; adds
/// the CPU time each process spent to `cpu`.
async fn throughput(
    client: &KvClient<Channel>,
    puts: usize,
    value: &[u8],
    how: PutAs,
    processes: &Processes,
    cpu: &mut CpuUse,
) -> f64 {
    let before = processes.now();
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let mut client = client.clone();
        let value = value.to_vec();
        writers.spawn(async move {
            for index in (writer..puts).step_by(WRITERS) {
                one_put_as(&mut client, index, &value, how).await;
            }
        });
    }
    while writers.join_next().await.is_some() {}
    let rate = puts as f64 / started.elapsed().as_secs_f64();
    cpu.add(before, processes.now(), puts);
    rate
}

fn report_cpu(path: &str, cpu: &CpuUse) {
    let per_put = |time: Duration| micros(time) / cpu.puts.max(1) as f64;
    println!(
        "  CPU per put, {path:<28} client {:>4.0} µs, etcd {:>4.0} µs, gateway {:>4.0} µs, etcd grpc-proxy {:>4.0} µs",
        per_put(cpu.client),
        per_put(cpu.etcd),
        per_put(cpu.gateway),
        per_put(cpu.proxy),
    );
}

fn report(name: &str, direct: &mut [Duration], gateway: &mut [Duration], proxy: &mut [Duration]) {
    direct.sort();
    gateway.sort();
    proxy.sort();
    for (path, samples) in [
        ("direct", &*direct),
        ("gateway", &*gateway),
        ("etcd grpc-proxy", &*proxy),
    ] {
        println!(
            "{name:<6} {path:<15} median {:>7.0} µs   p90 {:>7.0} µs   p99 {:>7.0} µs   ({} calls)",
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
    let added = |path: &[Duration]| micros(percentile(path, 0.5)) - micros(percentile(direct, 0.5));
    println!(
        "{name:<6} etcd grpc-proxy adds {:.0} µs at the median: the gateway adds x{:.2} of what etcd's own proxy adds",
        added(proxy),
        added(gateway) / added(proxy),
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
    let (_gateway, listen, gateway_pid) = start_gateway(&etcd.url());
    let (_proxy, proxy_listen, proxy_pid) = start_grpc_proxy(&etcd.endpoint());
    let processes = Processes {
        etcd: etcd.pid().to_string(),
        gateway: gateway_pid.to_string(),
        proxy: proxy_pid.to_string(),
    };
    let mut direct = client(&etcd.endpoint()).await;
    let mut through = client(&listen).await;
    let mut proxied = client(&proxy_listen).await;
    let value = vec![b'v'; VALUE_BYTES];
    // Warm both paths up (connections, etcd's caches).
    for index in 0..200 {
        one_put(&mut direct, index, &value).await;
        one_put(&mut through, index, &value).await;
        one_put(&mut proxied, index, &value).await;
    }
    let (mut put_direct, mut put_gateway) = (Vec::new(), Vec::new());
    let (mut put_guarded, mut put_plain) = (Vec::new(), Vec::new());
    let (mut range_direct, mut range_gateway) = (Vec::new(), Vec::new());
    let (mut put_proxy, mut range_proxy, mut throughput_proxy) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_proxy, mut cpu_proxy_one) = (CpuUse::default(), CpuUse::default());
    let (mut throughput_direct, mut throughput_gateway) = (Vec::new(), Vec::new());
    let mut throughput_guarded = Vec::new();
    let (mut cpu_direct, mut cpu_gateway, mut cpu_guarded) =
        (CpuUse::default(), CpuUse::default(), CpuUse::default());
    let mut cpu_one_at_a_time = CpuUse::default();
    for _ in 0..ROUNDS {
        for index in 0..per_round {
            put_direct.push(one_put(&mut direct, index, &value).await);
        }
        let before = processes.now();
        for index in 0..per_round {
            put_gateway.push(one_put(&mut through, index, &value).await);
        }
        cpu_one_at_a_time.add(before, processes.now(), per_round);
        let before = processes.now();
        for index in 0..per_round {
            put_proxy.push(one_put(&mut proxied, index, &value).await);
        }
        cpu_proxy_one.add(before, processes.now(), per_round);
        for index in 0..per_round {
            range_direct.push(one_range(&mut direct, index).await);
        }
        for index in 0..per_round {
            range_gateway.push(one_range(&mut through, index).await);
        }
        for index in 0..per_round {
            range_proxy.push(one_range(&mut proxied, index).await);
        }
        // etcd's own cost of the guard: a Put and the guarded Txn, both direct.
        for index in 0..per_round / 2 {
            put_plain.push(one_put_as(&mut direct, index, &value, PutAs::Put).await);
            put_guarded.push(one_put_as(&mut direct, index, &value, PutAs::GuardedTxn).await);
        }
        let puts = per_round * 4;
        throughput_direct.push(
            throughput(
                &direct,
                puts,
                &value,
                PutAs::Put,
                &processes,
                &mut cpu_direct,
            )
            .await,
        );
        throughput_gateway.push(
            throughput(
                &through,
                puts,
                &value,
                PutAs::Put,
                &processes,
                &mut cpu_gateway,
            )
            .await,
        );
        throughput_proxy.push(
            throughput(
                &proxied,
                puts,
                &value,
                PutAs::Put,
                &processes,
                &mut cpu_proxy,
            )
            .await,
        );
        throughput_guarded.push(
            throughput(
                &direct,
                puts,
                &value,
                PutAs::GuardedTxn,
                &processes,
                &mut cpu_guarded,
            )
            .await,
        );
    }
    println!("one call at a time, {VALUE_BYTES}-byte values, etcd on 127.0.0.1:");
    report("Put", &mut put_direct, &mut put_gateway, &mut put_proxy);
    report(
        "Range",
        &mut range_direct,
        &mut range_gateway,
        &mut range_proxy,
    );
    put_plain.sort();
    put_guarded.sort();
    println!(
        "etcd's own cost of the guard, direct: Put median {:.0} µs, guarded Txn median {:.0} µs (+{:.0} µs)",
        micros(percentile(&put_plain, 0.5)),
        micros(percentile(&put_guarded, 0.5)),
        micros(percentile(&put_guarded, 0.5)) - micros(percentile(&put_plain, 0.5)),
    );
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (direct_rate, gateway_rate, guarded_rate, proxy_rate) = (
        median(&mut throughput_direct),
        median(&mut throughput_gateway),
        median(&mut throughput_guarded),
        median(&mut throughput_proxy),
    );
    println!(
        "{WRITERS} concurrent writers: direct {direct_rate:.0} puts/s, gateway {gateway_rate:.0} puts/s (x{:.2}; medians of {ROUNDS} rounds)",
        gateway_rate / direct_rate,
    );
    println!(
        "{WRITERS} concurrent writers through etcd grpc-proxy: {proxy_rate:.0} puts/s (x{:.2} of direct); the gateway reaches x{:.2} of etcd's own proxy",
        proxy_rate / direct_rate,
        gateway_rate / proxy_rate,
    );
    println!(
        "{WRITERS} concurrent writers sending the guarded Txn directly: {guarded_rate:.0} puts/s (x{:.2} of direct Puts: etcd's own cost of the guard)",
        guarded_rate / direct_rate,
    );
    report_cpu("32 writers, direct Put", &cpu_direct);
    report_cpu("32 writers, gateway", &cpu_gateway);
    report_cpu("32 writers, guarded Txn", &cpu_guarded);
    report_cpu("32 writers, etcd grpc-proxy", &cpu_proxy);
    report_cpu("one at a time, gateway", &cpu_one_at_a_time);
    report_cpu("one at a time, etcd grpc-proxy", &cpu_proxy_one);
}

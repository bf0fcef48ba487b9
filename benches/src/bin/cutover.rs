//! The cutover's pause window under a heavy write load: N live migrations
//! (default 20), each of a fresh pair of etcds, while W writer clients
//! (default 128) write as fast as they are answered, through two `ferry
//! gateway` replicas (the writers take turns between them, and `ferry
//! migrate --gateway` is given both); the median and 99th percentile of the
//! pause window (from the gateways' hold to their release), the write rate
//! the gateways answered, and the follow lag under that load. Since every
//! process shares the machine's cores, it also prints how many cores each
//! kind of process kept busy over the rounds: what limits the load.
//!
//! `cargo run --release -p ferry-benches --bin cutover [-- CUTOVERS [WRITERS]]`
//! (needs `etcd`: `apt-get install -y etcd-server`). It asserts nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_benches::run::cpu_time;
use ferry_tests::ferry_binary;
use ferry_tests::live::{Cluster, with_options, writer};

/// Writer clients when the command line names no number.
const DEFAULT_WRITERS: usize = 128;

/// The processes of one round whose CPU time is counted, by kind.
const KINDS: [&str; 5] = [
    "old etcd",
    "new etcd",
    "2 gateways",
    "2 agents",
    "this bench (writers, the proxy to the source agent)",
];

/// CPU time used so far by each kind of process of `cluster`.
fn cpu_by_kind(cluster: &Cluster) -> [Duration; 5] {
    let of = |pid: u32| cpu_time(&pid.to_string());
    [
        of(cluster.old.pid()),
        of(cluster.new.pid()),
        of(cluster.gateway.pid()) + of(cluster.second_gateway.pid()),
        of(cluster.source_agent.pid()) + of(cluster.target_agent.pid()),
        cpu_time("self"),
    ]
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (fraction * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let cutovers: usize = std::env::args()
        .nth(1)
        .map(|text| text.parse().expect("CUTOVERS is a number"))
        .unwrap_or(20);
    let writers_count: usize = std::env::args()
        .nth(2)
        .map(|text| text.parse().expect("WRITERS is a number"))
        .unwrap_or(DEFAULT_WRITERS);
    let binary = ferry_binary();
    println!("ferry: {}", binary.display());
    let mut pauses = Vec::new();
    let mut lag_positions = Vec::new();
    let mut lag_ops = Vec::new();
    let mut writes_per_second = Vec::new();
    let mut cpu_used = [Duration::ZERO; 5];
    let mut measured = Duration::ZERO;
    for round in 1..=cutovers {
        let cluster = Cluster::start().await;
        let stop = Arc::new(AtomicBool::new(false));
        let cpu_before = cpu_by_kind(&cluster);
        let started = std::time::Instant::now();
        let writers: Vec<_> = (0..writers_count)
            .map(|index| {
                tokio::spawn(writer(
                    index,
                    cluster.gateway_for(index),
                    stop.clone(),
                    Duration::ZERO,
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = tempfile::tempdir().expect("temp dir");
        let args = with_options(
            cluster.migrate_args(&status.path().join("status.json")),
            &["--follow-at-least", "2s"],
        );
        let output = tokio::process::Command::new(&binary)
            .args(&args)
            .output()
            .await
            .expect("ferry migrate runs");
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
        // Writes the gateways answered OK (a write refused during the pause
        // is not counted).
        let mut writes = 0usize;
        let mut refused = 0usize;
        for task in writers {
            for write in task.await.expect("writer") {
                if write.answer.is_ok() {
                    writes += 1;
                } else {
                    refused += 1;
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        for (used, (after, before)) in cpu_used
            .iter_mut()
            .zip(cpu_by_kind(&cluster).into_iter().zip(cpu_before))
        {
            *used += after.saturating_sub(before);
        }
        measured += started.elapsed();
        let report: serde_json::Value = match serde_json::from_slice(&output.stdout) {
            Ok(report) => report,
            Err(error) => {
                println!(
                    "round {round}: no report ({error}): {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                continue;
            }
        };
        if report["outcome"] != "switched" {
            println!("round {round}: {report}");
            continue;
        }
        let pause = report["pause_window_ms"].as_f64().unwrap_or(f64::NAN);
        // The lag while following, before the hold.
        for sample in report["lag"].as_array().into_iter().flatten() {
            lag_positions.push(sample["positions"].as_f64().unwrap_or(0.0));
            lag_ops.push(sample["ops"].as_f64().unwrap_or(0.0));
        }
        writes_per_second.push(writes as f64 / elapsed);
        println!(
            "round {round}: pause {pause:.1} ms (hold {:.1}, fence {:.1}, drain {:.1}, switch {:.1}), {} ops moved, {writes} writes ({:.0}/s), {refused} refused",
            report["hold_ms"].as_f64().unwrap_or(f64::NAN),
            report["fence_ms"].as_f64().unwrap_or(f64::NAN),
            report["drain_ms"].as_f64().unwrap_or(f64::NAN),
            report["switch_ms"].as_f64().unwrap_or(f64::NAN),
            report["ops_moved"],
            writes as f64 / elapsed,
        );
        pauses.push(pause);
    }
    let sort = |values: &mut Vec<f64>| values.sort_by(f64::total_cmp);
    sort(&mut pauses);
    sort(&mut lag_positions);
    sort(&mut lag_ops);
    sort(&mut writes_per_second);
    println!(
        "\n{} cutovers switched of {cutovers}\npause window: median {:.1} ms, p99 {:.1} ms, max {:.1} ms (target: p99 <= 50 ms at 5,000 writes/s)",
        pauses.len(),
        percentile(&pauses, 0.5),
        percentile(&pauses, 0.99),
        pauses.last().copied().unwrap_or(f64::NAN),
    );
    println!(
        "follow lag under a load of {:.0} writes/s (median of the rounds; {writers_count} writers through two gateways): median {:.0} revisions / {:.0} ops, p99 {:.0} revisions / {:.0} ops (sampled 4 times a second)",
        percentile(&writes_per_second, 0.5),
        percentile(&lag_positions, 0.5),
        percentile(&lag_ops, 0.5),
        percentile(&lag_positions, 0.99),
        percentile(&lag_ops, 0.99),
    );
    let cores = |time: Duration| time.as_secs_f64() / measured.as_secs_f64().max(1e-9);
    let parts: Vec<String> = KINDS
        .iter()
        .zip(cpu_used)
        .map(|(kind, time)| format!("{kind} {:.2}", cores(time)))
        .collect();
    println!(
        "cores kept busy over the rounds (of {} here): {}; together {:.2}",
        std::thread::available_parallelism().map_or(0, |cores| cores.get()),
        parts.join(", "),
        cores(cpu_used.iter().sum()),
    );
}

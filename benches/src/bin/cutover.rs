//! The cutover's pause window under a steady write load: N live migrations
//! (default 20), each of a fresh pair of etcds, while writer clients keep
//! writing through `ferry gateway`; the median and 99th percentile of the
//! pause window (from the gateway's hold to its release), and the follow lag
//! under that load.
//!
//! `cargo run --release -p ferry-benches --bin cutover [-- CUTOVERS]`
//! (needs `etcd`: `apt-get install -y etcd-server`). It asserts nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_tests::ferry_binary;
use ferry_tests::live::{Cluster, WRITERS, writer};

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
    let binary = ferry_binary();
    println!("ferry: {}", binary.display());
    let mut pauses = Vec::new();
    let mut lag_positions = Vec::new();
    let mut lag_ops = Vec::new();
    let mut writes_per_second = Vec::new();
    for round in 1..=cutovers {
        let cluster = Cluster::start().await;
        let stop = Arc::new(AtomicBool::new(false));
        let started = std::time::Instant::now();
        let writers: Vec<_> = (0..WRITERS)
            .map(|index| {
                tokio::spawn(writer(
                    index,
                    cluster.gateway.field("listen"),
                    stop.clone(),
                    Duration::from_millis(5),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = tempfile::tempdir().expect("temp dir");
        let mut args = cluster.migrate_args(&status.path().join("status.json"));
        args.extend(["--follow-at-least".to_owned(), "2s".to_owned()]);
        let output = tokio::process::Command::new(&binary)
            .args(&args)
            .output()
            .await
            .expect("ferry migrate runs");
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
        let mut writes = 0usize;
        for task in writers {
            writes += task.await.expect("writer").len();
        }
        let elapsed = started.elapsed().as_secs_f64();
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
            "round {round}: pause {pause:.1} ms (hold {:.1}, fence {:.1}, drain {:.1}, switch {:.1}), {} ops moved, {writes} writes",
            report["hold_ms"].as_f64().unwrap_or(f64::NAN),
            report["fence_ms"].as_f64().unwrap_or(f64::NAN),
            report["drain_ms"].as_f64().unwrap_or(f64::NAN),
            report["switch_ms"].as_f64().unwrap_or(f64::NAN),
            report["ops_moved"],
        );
        pauses.push(pause);
    }
    let sort = |values: &mut Vec<f64>| values.sort_by(f64::total_cmp);
    sort(&mut pauses);
    sort(&mut lag_positions);
    sort(&mut lag_ops);
    sort(&mut writes_per_second);
    println!(
        "\n{} cutovers switched of {cutovers}\npause window: median {:.1} ms, p99 {:.1} ms, max {:.1} ms (target: p99 <= 100 ms)",
        pauses.len(),
        percentile(&pauses, 0.5),
        percentile(&pauses, 0.99),
        pauses.last().copied().unwrap_or(f64::NAN),
    );
    println!(
        "follow lag under a load of {:.0} writes/s ({WRITERS} writers through the gateway): median {:.0} revisions / {:.0} ops, p99 {:.0} revisions / {:.0} ops (sampled 4 times a second)",
        percentile(&writes_per_second, 0.5),
        percentile(&lag_positions, 0.5),
        percentile(&lag_ops, 0.5),
        percentile(&lag_positions, 0.99),
        percentile(&lag_ops, 0.99),
    );
}

//! MLflow: `ferry extract` + `ferry restore` against `mlflow-export-import`
//! 1.2.0 (`export-experiments` + `import-experiments`, the tool MLflow's
//! users pick), and against the target server's own write path (a plain
//! writer sending full 1,000-metric `log-batch`es at ferry's concurrency)
//! and the source's own read path (a plain reader asking the bulk history
//! endpoint for every key of every run, 80 runs a call), on the same servers, the same machine, in the same run.
//!
//! ```text
//! cargo build --release -p ferry-cli
//! cargo run --release -p ferry-benches --bin mlflow-throughput [-- EXPERIMENTS RUNS]
//! ```
//!
//! The data set (`benches/mlflow/make_bench_data.py`, seeded): EXPERIMENTS
//! (default 20) x RUNS (default 50) runs, each with 20 metrics x 100 steps,
//! 10 params and 5 tags, on an MLflow 2.22.5 server (SQLite, one worker, as
//! every server here). Each tool copies it to an empty 2.22.5 server of its
//! own. Measured: wall time and peak RSS (GNU time), requests (the servers'
//! access logs), and `tests/mlflow/check.py`'s fidelity for each copy (times
//! kept, ids kept, differences), then each tool once more onto its copy
//! (duplicates made by a second run). ferry runs twice: extract then restore,
//! and as a migration runs, the restore following the extract (`restore
//! --follow`, each segment restored as it is sealed), onto a fifth server;
//! the end-to-end target is measured on the second.
//!
//! mlflow-export-import runs from its own virtual environment,
//! `$FERRY_MLFLOW_EXPORT_IMPORT_VENV` or `/opt/ferry/mlflow-export-import-1.2.0`
//! (`python3 -m venv DIR && DIR/bin/pip install mlflow-export-import==1.2.0
//! mlflow==2.22.5 'sqlalchemy<2.1' tabulate`); the bench says so if it is
//! missing. It writes `./mlruns` in its working folder: it runs in a
//! temporary one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferry_engine::adapters::mlflow::{Credentials, MlflowClient, RetryPolicy};
use ferry_tests::mlflow::{CheckReport, MlflowServer, MlflowVersion, check};
use serde_json::json;

const GNU_TIME: &str = "/usr/bin/time";
const METRICS: usize = 20;
const STEPS: usize = 100;
/// Runs ferry restores side by side (its default), and the ceiling's
/// writer's requests in flight.
const CONCURRENCY: usize = 8;
/// The read ceiling's requests in flight (ferry's extract keeps 4 bulk
/// history calls in flight).
const READ_CONCURRENCY: usize = 4;
/// Runs a bulk history call asks for: gunicorn refuses a request line over
/// 4,094 bytes, and 100 run ids make 4,096 (ferry's extract takes 80 too).
const RUN_IDS_PER_CALL: usize = 80;

/// How long the following restore runs before its extract starts.
const FOLLOWER_HEAD_START: Duration = Duration::from_millis(200);

/// What one command cost.
#[derive(Debug, Clone, Default)]
struct Cost {
    wall: Duration,
    peak_rss_kib: u64,
    /// User and system CPU time of the command.
    cpu: Duration,
    requests: u64,
    /// What the servers spent answering them, by request.
    served: Served,
}

/// Requests a server answered, and the time it took, by method and path
/// (from its access log: gunicorn's request time).
#[derive(Debug, Clone, Default)]
struct Served(std::collections::BTreeMap<String, (u64, f64)>);

impl Served {
    /// What `servers` answered after their first `before` requests each.
    fn since(servers: &[&MlflowServer], before: &[usize]) -> Served {
        let mut served = Served::default();
        for (server, before) in servers.iter().zip(before) {
            for request in server.requests().into_iter().skip(*before) {
                let path = request.path.trim_start_matches("/api/2.0/mlflow/");
                let entry = served
                    .0
                    .entry(format!("{} {path}", request.method))
                    .or_default();
                entry.0 += 1;
                entry.1 += request.seconds.unwrap_or(0.0);
            }
        }
        served
    }

    /// Seconds the servers spent answering.
    fn busy(&self) -> f64 {
        self.0.values().map(|(_, seconds)| seconds).sum()
    }

    /// `POST runs/log-batch 3000 x 81 ms = 243.0 s; ...`, the costliest first.
    fn summary(&self) -> String {
        let mut rows: Vec<_> = self.0.iter().collect();
        rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
        rows.iter()
            .map(|(request, (count, seconds))| {
                format!(
                    "{request} {count} x {:.0} ms = {seconds:.1} s",
                    seconds * 1000.0 / *count as f64
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// How many requests each server has answered so far.
fn answered(servers: &[&MlflowServer]) -> Vec<usize> {
    servers
        .iter()
        .map(|server| server.requests().len())
        .collect()
}

fn export_import_venv() -> PathBuf {
    std::env::var_os("FERRY_MLFLOW_EXPORT_IMPORT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/ferry/mlflow-export-import-1.2.0"))
}

/// Runs `program ARGS` under GNU time in `folder` with `environment`; the
/// requests it made are what `servers` logged meanwhile. Panics with its
/// output when it fails.
fn timed(
    program: &Path,
    args: &[&str],
    folder: &Path,
    environment: &[(&str, &str)],
    servers: &[&MlflowServer],
) -> Cost {
    // Two commands may run at once (a restore following an extract).
    static REPORTS: AtomicUsize = AtomicUsize::new(0);
    let report = folder.join(format!(
        "time-{}.txt",
        REPORTS.fetch_add(1, Ordering::Relaxed)
    ));
    let before = answered(servers);
    let started = Instant::now();
    let output = Command::new(GNU_TIME)
        .arg("-f")
        .arg("%M %U %S")
        .arg("-o")
        .arg(&report)
        .arg(program)
        .args(args)
        .current_dir(folder)
        .envs(environment.iter().copied())
        .output()
        .unwrap_or_else(|error| panic!("{GNU_TIME} {} runs: {error}", program.display()));
    let wall = started.elapsed();
    // Each step as it ends, so a long run shows its numbers before the table.
    eprintln!(
        "{} {}: {:.1} s",
        program.file_name().unwrap_or_default().to_string_lossy(),
        args.first().copied().unwrap_or_default(),
        wall.as_secs_f64()
    );
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}):\n{}\n{}",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // `%M %U %S`: peak RSS in KiB, user and system seconds.
    let measured: Vec<f64> = std::fs::read_to_string(&report)
        .unwrap_or_default()
        .lines()
        .last()
        .map(|line| {
            line.split_whitespace()
                .filter_map(|field| field.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let peak_rss_kib = measured.first().copied().unwrap_or(0.0) as u64;
    let cpu = Duration::from_secs_f64(measured.iter().skip(1).sum());
    // The last requests reach the log a moment after the answer.
    std::thread::sleep(Duration::from_millis(300));
    let served = Served::since(servers, &before);
    Cost {
        wall,
        peak_rss_kib,
        cpu,
        requests: served.0.values().map(|(count, _)| count).sum(),
        served,
    }
}

fn start(version: MlflowVersion) -> MlflowServer {
    MlflowServer::start(version)
        .expect("an MLflow server starts (bash scripts/test.sh installs it)")
}

/// The plain writer: `runs` runs made, then `points` metric points sent in
/// full 1,000-metric `log-batch`es over them, `CONCURRENCY` requests in
/// flight. The target's own write rate for what ferry sends most of.
async fn ceiling(server: &MlflowServer, runs: usize, points: usize) -> Duration {
    let client = Arc::new(
        MlflowClient::new(&server.url(), Credentials::None, RetryPolicy::default())
            .expect("a client"),
    );
    let experiment = client
        .post(
            "/api/2.0/mlflow/experiments/create",
            &json!({ "name": "ceiling" }),
        )
        .await
        .expect("experiment");
    let experiment_id = experiment["experiment_id"]
        .as_str()
        .unwrap_or("1")
        .to_owned();
    let started = Instant::now();
    let batches = points.div_ceil(1_000);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..CONCURRENCY {
        let client = client.clone();
        let experiment_id = experiment_id.clone();
        workers.spawn(async move {
            let my_runs: Vec<usize> = (worker..runs).step_by(CONCURRENCY).collect();
            let mut run_ids = Vec::new();
            for run in &my_runs {
                let created = client
                    .post(
                        "/api/2.0/mlflow/runs/create",
                        &json!({ "experiment_id": experiment_id, "start_time": 1, "run_name": format!("r{run}") }),
                    )
                    .await
                    .expect("runs/create");
                run_ids.push(
                    created["run"]["info"]["run_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
            for batch in (worker..batches).step_by(CONCURRENCY) {
                let run_id = &run_ids[batch % run_ids.len().max(1)];
                let metrics: Vec<_> = (0..1_000)
                    .map(|index| {
                        json!({
                            "key": format!("m{}", (batch * 1_000 + index) % METRICS),
                            "value": index as f64 * 0.5,
                            "timestamp": batch * 1_000 + index,
                            "step": index,
                        })
                    })
                    .collect();
                client
                    .post(
                        "/api/2.0/mlflow/runs/log-batch",
                        &json!({ "run_id": run_id, "metrics": metrics }),
                    )
                    .await
                    .expect("log-batch");
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.expect("a ceiling worker");
    }
    started.elapsed()
}

/// The plain reader: every run listed (`runs/search`, one page per
/// experiment), then every metric history read with the bulk endpoint, one
/// call per key per `RUN_IDS_PER_CALL` runs, `READ_CONCURRENCY` in flight, the answers
/// parsed and dropped. The source's own read rate for what ferry's extract
/// asks most of (its calls take every run of the page reader's gathering).
/// The id of every run `client`'s server holds, deleted ones too, paged
/// (`experiments/search` and `runs/search`).
async fn run_ids(client: &MlflowClient) -> Vec<String> {
    let mut experiment_ids = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut request = json!({ "max_results": 1000, "view_type": "ALL" });
        if let Some(token) = &token {
            request["page_token"] = json!(token);
        }
        let page = client
            .post("/api/2.0/mlflow/experiments/search", &request)
            .await
            .expect("experiments/search");
        for experiment in page["experiments"].as_array().into_iter().flatten() {
            experiment_ids.push(experiment["experiment_id"].clone());
        }
        token = page["next_page_token"].as_str().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    let mut run_ids = Vec::new();
    for experiment_id in experiment_ids {
        let mut token: Option<String> = None;
        loop {
            let mut request = json!({ "experiment_ids": [experiment_id], "max_results": 1000, "run_view_type": "ALL" });
            if let Some(token) = &token {
                request["page_token"] = json!(token);
            }
            let page = client
                .post("/api/2.0/mlflow/runs/search", &request)
                .await
                .expect("runs/search");
            for run in page["runs"].as_array().into_iter().flatten() {
                run_ids.push(
                    run["info"]["run_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
            token = page["next_page_token"].as_str().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
    }
    run_ids
}

/// How many runs `server` holds, deleted ones too: after a second run of a
/// tool, a count above the source's is its duplicates.
fn count_runs(runtime: &tokio::runtime::Runtime, server: &MlflowServer) -> usize {
    let client = MlflowClient::new(&server.url(), Credentials::None, RetryPolicy::default())
        .expect("a client");
    runtime.block_on(run_ids(&client)).len()
}

async fn read_ceiling(server: &MlflowServer) -> Duration {
    use futures::StreamExt;
    let client = Arc::new(
        MlflowClient::new(&server.url(), Credentials::None, RetryPolicy::default())
            .expect("a client"),
    );
    let started = Instant::now();
    let run_ids = run_ids(&client).await;
    let calls: Vec<(usize, Vec<String>)> = (0..METRICS)
        .flat_map(|metric| {
            run_ids
                .chunks(RUN_IDS_PER_CALL)
                .map(move |chunk| (metric, chunk.to_vec()))
        })
        .collect();
    futures::stream::iter(calls)
        .map(|(metric, chunk)| {
            let client = client.clone();
            async move {
                let key = format!("metric{metric:02}");
                let mut query: Vec<(&str, &str)> =
                    chunk.iter().map(|id| ("run_id", id.as_str())).collect();
                query.push(("metric_key", &key));
                query.push(("max_results", "25000"));
                client
                    .get("/ajax-api/2.0/mlflow/metrics/get-history-bulk", &query)
                    .await
                    .expect("get-history-bulk");
            }
        })
        .buffer_unordered(READ_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    started.elapsed()
}

fn fidelity(report: &CheckReport, name: &str) -> String {
    let entry = &report.report["fidelity"][name];
    match (entry["kept"].as_u64(), entry["of"].as_u64()) {
        (Some(kept), Some(of)) => format!("{kept}/{of}"),
        _ => "-".to_owned(),
    }
}

fn main() {
    let arguments: Vec<usize> = std::env::args()
        .skip(1)
        .map(|argument| argument.parse().expect("EXPERIMENTS RUNS are numbers"))
        .collect();
    let experiments = arguments.first().copied().unwrap_or(20);
    let runs_per_experiment = arguments.get(1).copied().unwrap_or(50);
    let runs = experiments * runs_per_experiment;
    let points = runs * METRICS * STEPS;
    assert!(
        Path::new(GNU_TIME).exists(),
        "{GNU_TIME} is missing: apt-get install -y time"
    );
    let ferry = ferry_tests::ferry_binary();
    assert!(
        ferry
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|profile| profile == "release"),
        "{} is not a release build: cargo build --release -p ferry-cli",
        ferry.display()
    );
    let venv = export_import_venv();
    let export_experiments = venv.join("bin/export-experiments");
    let import_experiments = venv.join("bin/import-experiments");
    assert!(
        export_experiments.exists(),
        "{} is missing: python3 -m venv {dir} && {dir}/bin/pip install mlflow-export-import==1.2.0 mlflow==2.22.5 'sqlalchemy<2.1' tabulate",
        export_experiments.display(),
        dir = venv.display()
    );

    let starts: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(|| start(MlflowVersion::V2)))
        .collect();
    let mut started: Vec<MlflowServer> = starts
        .into_iter()
        .map(|start| start.join().expect("a server start"))
        .collect();
    let follow_target = started.pop().expect("5 servers");
    let ceiling_target = started.pop().expect("5 servers");
    let import_target = started.pop().expect("5 servers");
    let ferry_target = started.pop().expect("5 servers");
    let source = started.pop().expect("5 servers");
    let work = tempfile::Builder::new()
        .prefix("ferry-mlflow-bench-")
        .tempdir()
        .expect("a temporary folder");

    println!(
        "MLflow 2.22.5 (SQLite, one worker) x5; {experiments} experiments x {runs_per_experiment} runs, {METRICS} metrics x {STEPS} steps, 10 params, 5 tags each"
    );
    let made_started = Instant::now();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("mlflow/make_bench_data.py");
    let made = Command::new(MlflowVersion::V2.python())
        .arg(&script)
        .args([
            "--experiments",
            &experiments.to_string(),
            "--runs",
            &runs_per_experiment.to_string(),
        ])
        .env("MLFLOW_TRACKING_URI", source.url())
        .output()
        .expect("make_bench_data.py runs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    println!(
        "data: {} ({:.0} s)",
        String::from_utf8_lossy(&made.stdout).trim(),
        made_started.elapsed().as_secs_f64()
    );

    // ferry: extract into a file store, restore into its own empty server.
    let store = work.path().join("store");
    let store_url = format!("file://{}", store.display());
    let extract = timed(
        &ferry,
        &[
            "extract",
            "--quiet",
            "--source",
            &source.ferry_url(),
            "--to",
            &store_url,
        ],
        work.path(),
        &[],
        &[&source],
    );
    let backup = std::fs::read_dir(store.join("backups"))
        .expect("the store has backups")
        .next()
        .expect("one backup")
        .expect("an entry")
        .file_name()
        .to_string_lossy()
        .into_owned();
    let restore_args = [
        "restore",
        "--quiet",
        "--from",
        &store_url,
        "--backup",
        &backup,
        "--target",
        &ferry_target.ferry_url(),
    ];
    let restore = timed(&ferry, &restore_args, work.path(), &[], &[&ferry_target]);

    // ferry again, as a migration runs: the restore follows the extract
    // (`restore --follow`, started first), each segment restored as it is
    // sealed, so the two servers work at once.
    let follow_store = work.path().join("store-follow");
    let follow_store_url = format!("file://{}", follow_store.display());
    let mut follow_extract_started = std::time::SystemTime::now();
    let (follow_extract, follow_restore) = std::thread::scope(|scope| {
        let restore = scope.spawn(|| {
            timed(
                &ferry,
                &[
                    "restore",
                    "--quiet",
                    "--follow",
                    "--from",
                    &follow_store_url,
                    "--target",
                    &follow_target.ferry_url(),
                ],
                work.path(),
                &[],
                &[&follow_target],
            )
        });
        std::thread::sleep(FOLLOWER_HEAD_START);
        follow_extract_started = std::time::SystemTime::now();
        let extract = timed(
            &ferry,
            &[
                "extract",
                "--quiet",
                "--source",
                &source.ferry_url(),
                "--to",
                &follow_store_url,
            ],
            work.path(),
            &[],
            &[&source],
        );
        (extract, restore.join().expect("the following restore"))
    });
    // From the restore's start (it began first) to the last of the two.
    let follow_total = follow_restore
        .wall
        .max(FOLLOWER_HEAD_START + follow_extract.wall)
        .as_secs_f64();
    // What the follower waited for before its first op.
    let first_segment = first_segment_stored(&follow_store)
        .duration_since(follow_extract_started)
        .unwrap_or_default();

    // mlflow-export-import: export-experiments, import-experiments.
    let exported = work.path().join("exported");
    let export = timed(
        &export_experiments,
        &[
            "--experiments",
            "all",
            "--output-dir",
            &exported.to_string_lossy(),
        ],
        work.path(),
        &[("MLFLOW_TRACKING_URI", &source.url())],
        &[&source],
    );
    let import = timed(
        &import_experiments,
        &["--input-dir", &exported.to_string_lossy()],
        work.path(),
        &[("MLFLOW_TRACKING_URI", &import_target.url())],
        &[&import_target],
    );

    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let ceiling_before = answered(&[&ceiling_target]);
    let ceiling_time = runtime.block_on(ceiling(&ceiling_target, runs, points));
    std::thread::sleep(Duration::from_millis(300));
    let ceiling_served = Served::since(&[&ceiling_target], &ceiling_before);
    eprintln!("log-batch ceiling: {:.1} s", ceiling_time.as_secs_f64());
    let read_ceiling_time = runtime.block_on(read_ceiling(&source));
    eprintln!("read ceiling: {:.1} s", read_ceiling_time.as_secs_f64());

    let ferry_check = check(MlflowVersion::V2, &source.url(), &ferry_target.url(), &[])
        .expect("check.py reads the ferry copy");
    let follow_check = check(MlflowVersion::V2, &source.url(), &follow_target.url(), &[])
        .expect("check.py reads the copy restored while its backup was written");
    let import_check = check(
        MlflowVersion::V2,
        &source.url(),
        &import_target.url(),
        &["--experiment-ids-may-differ"],
    )
    .expect("check.py reads the export-import copy");

    // Each tool once more onto its copy.
    timed(&ferry, &restore_args, work.path(), &[], &[&ferry_target]);
    timed(
        &import_experiments,
        &["--input-dir", &exported.to_string_lossy()],
        work.path(),
        &[("MLFLOW_TRACKING_URI", &import_target.url())],
        &[&import_target],
    );
    // Counted with runs/search, not a whole check.py pass (minutes at
    // 2,000,000 points): duplicates are runs.
    let ferry_again = count_runs(&runtime, &ferry_target);
    let import_again = count_runs(&runtime, &import_target);

    let seconds = |cost: &Cost| cost.wall.as_secs_f64();
    let mib = |cost: &Cost| cost.peak_rss_kib as f64 / 1024.0;
    println!();
    println!(
        "| step | tool | wall s | server busy s | CPU s | peak RSS MiB | requests | requests/run |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (step, tool, cost) in [
        ("extract", "ferry extract", &extract),
        ("extract", "export-experiments", &export),
        ("restore", "ferry restore", &restore),
        ("restore", "import-experiments", &import),
        ("both at once", "ferry extract", &follow_extract),
        ("both at once", "ferry restore --follow", &follow_restore),
    ] {
        println!(
            "| {step} | {tool} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {:.1} |",
            seconds(cost),
            cost.served.busy(),
            cost.cpu.as_secs_f64(),
            mib(cost),
            cost.requests,
            cost.requests as f64 / runs as f64
        );
    }
    let ferry_total = seconds(&extract) + seconds(&restore);
    let import_total = seconds(&export) + seconds(&import);
    let restore_rate = points as f64 / seconds(&restore);
    let ceiling_rate = points as f64 / ceiling_time.as_secs_f64();
    println!();
    println!(
        "end to end, the restore following the extract: ferry {follow_total:.1} s, export-import {import_total:.1} s: ferry {:.2}x faster (target >= 3); its first segment stored {:.1} s after the extract started",
        import_total / follow_total,
        first_segment.as_secs_f64()
    );
    println!(
        "end to end, extract then restore: ferry {ferry_total:.1} s, export-import {import_total:.1} s: ferry {:.2}x faster",
        import_total / ferry_total
    );
    println!(
        "extract: {:.2}x faster than export-experiments (target >= 10), {:.2} of its requests (target <= 0.25)",
        seconds(&export) / seconds(&extract),
        extract.requests as f64 / export.requests.max(1) as f64
    );
    println!(
        "extract: {:.0} metric points/s; the source's bulk-history read ceiling {:.0} points/s ({:.1} s, {READ_CONCURRENCY} in flight): {:.2} of it",
        points as f64 / seconds(&extract),
        points as f64 / read_ceiling_time.as_secs_f64(),
        read_ceiling_time.as_secs_f64(),
        read_ceiling_time.as_secs_f64() / seconds(&extract)
    );
    println!(
        "restore: {restore_rate:.0} metric points/s; the server's log-batch ceiling {ceiling_rate:.0} points/s ({:.1} s for {points} points and {runs} runs at {CONCURRENCY} in flight): {:.2} of it (target >= 0.8)",
        ceiling_time.as_secs_f64(),
        restore_rate / ceiling_rate
    );
    // Where the one-worker servers' time went: a tool that keeps its
    // server busy all along is bound by what it asks of it.
    println!();
    for (name, wall, served) in [
        ("ferry restore", seconds(&restore), &restore.served),
        ("import-experiments", seconds(&import), &import.served),
        (
            "log-batch ceiling",
            ceiling_time.as_secs_f64(),
            &ceiling_served,
        ),
        ("ferry extract", seconds(&extract), &extract.served),
        ("export-experiments", seconds(&export), &export.served),
    ] {
        println!(
            "{name}: its server busy {:.1} s of {wall:.1} s ({:.0}%): {}",
            served.busy(),
            100.0 * served.busy() / wall,
            served.summary()
        );
    }
    println!();
    println!("| fidelity (check.py) | ferry | ferry, restore following | export-import |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| equal to the source | {} ({} differences) | {} ({} differences) | {} ({} differences) |",
        ferry_check.equal,
        ferry_check.report["difference_count"],
        follow_check.equal,
        follow_check.report["difference_count"],
        import_check.equal,
        import_check.report["difference_count"]
    );
    for name in [
        "experiment_ids_kept",
        "run_start_times_kept",
        "run_end_times_kept",
    ] {
        println!(
            "| {name} | {} | {} | {} |",
            fidelity(&ferry_check, name),
            fidelity(&follow_check, name),
            fidelity(&import_check, name)
        );
    }
    println!(
        "| run ids kept | {} | {} | {} |",
        ferry_check.report["fidelity"]["run_ids_kept"]["kept"],
        follow_check.report["fidelity"]["run_ids_kept"]["kept"],
        import_check.report["fidelity"]["run_ids_kept"]["kept"]
    );
    println!(
        "| runs after a second run (source {runs}) | {ferry_again} | not run | {import_again} |"
    );
    if !import_check.equal {
        println!();
        println!("export-import's first differences:");
        for difference in import_check.differences().iter().take(5) {
            println!("  {difference}");
        }
    }
}

/// When the first segment of the one backup in `store` was stored.
fn first_segment_stored(store: &Path) -> std::time::SystemTime {
    let backups = std::fs::read_dir(store.join("backups")).expect("the store has a backup");
    backups
        .flat_map(|backup| {
            let segments = backup.expect("an entry").path().join("segments");
            std::fs::read_dir(segments).expect("the backup has segments")
        })
        .map(|segment| {
            segment
                .expect("an entry")
                .metadata()
                .and_then(|metadata| metadata.modified())
                .expect("a stored segment's time")
        })
        .min()
        .expect("a segment")
}

//! The MLflow adapter against real servers: data made on MLflow 2.22.5 by
//! MLflow's own Python client (`tests/mlflow/make_data.py`: nested runs,
//! every metric edge, a 25,001-point history, 6,000-character params,
//! deleted runs and experiments, models with a deleted version, aliases,
//! stages, prompts) is extracted, restored onto an empty 3.17.2 and an empty
//! 2.22.5, and compared field by field by `tests/mlflow/check.py`, a checker
//! over the REST API that shares nothing with ferry's adapter. A second
//! restore makes nothing; a restore killed twice resumes to the same copy.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use ferry_engine::adapters::mlflow::{Credentials, MlflowClient, RetryPolicy};
use ferry_tests::mlflow::{CheckReport, MlflowServer, MlflowVersion, check};
use ferry_tests::pg_data::{RunningFerry, Store, extract, ferry_ok, ferry_with_env, wait_until};

/// Starts servers of these versions side by side (each spends most of its
/// start in Python imports).
fn servers<const N: usize>(versions: [MlflowVersion; N]) -> [MlflowServer; N] {
    let starts: Vec<_> = versions
        .into_iter()
        .map(|version| std::thread::spawn(move || MlflowServer::start(version)))
        .collect();
    // Every start joined before any is unwrapped: a server left in a
    // thread's result would outlive a failed test.
    let started: Vec<_> = starts
        .into_iter()
        .map(|start| start.join().expect("the start thread does not panic"))
        .collect();
    let started: Vec<MlflowServer> = started
        .into_iter()
        .map(|server| server.expect("an MLflow server starts"))
        .collect();
    started.try_into().unwrap_or_else(|_| panic!("{N} servers"))
}

fn restore_args<'a>(store_url: &'a str, id: &'a str, target: &'a str) -> Vec<&'a str> {
    vec![
        "restore", "--output", "json", "--from", store_url, "--backup", id, "--target", target,
    ]
}

/// The checker's verdict, which must be "equal".
fn assert_equal(source: &MlflowServer, target: &MlflowServer) -> CheckReport {
    let report = check(MlflowVersion::V3, &source.url(), &target.url(), &[])
        .expect("check.py reads both servers");
    assert!(
        report.equal,
        "MLflow {} differs from its source: {:#}",
        target.version().version(),
        report.report
    );
    report
}

/// Every one of the `traces` traces made is on the target, with as many
/// spans as the source's (the checker compared them one by one).
fn assert_traces_carried(report: &CheckReport, traces: u64) {
    assert_eq!(
        report.count("target", "traces"),
        traces,
        "{:#}",
        report.report
    );
    assert_eq!(
        report.count("target", "spans"),
        report.count("source", "spans"),
        "{:#}",
        report.report
    );
}

#[test]
fn a_2x_server_restores_onto_3x_and_2x_field_for_field_and_a_second_restore_makes_nothing() {
    let [source, v3, v2] = servers([MlflowVersion::V2, MlflowVersion::V3, MlflowVersion::V2]);
    let made = source.make_data(1, &[]).expect("make_data.py fills 2.x");
    let store = Store::new();
    let id = extract(&source.ferry_url(), &store.url(), &[]);
    ferry_ok(&["verify", &store.url(), "--backup", &id]);

    for target in [&v3, &v2] {
        let printed = ferry_ok(&restore_args(&store.url(), &id, &target.ferry_url()));
        let summary: serde_json::Value = serde_json::from_str(&printed).expect("JSON summary");
        assert!(summary["ops"].as_u64() > Some(50), "{summary}");
        let report = assert_equal(&source, target);
        // What made the data set was all carried, the long history whole.
        assert_eq!(
            report.count("target", "runs"),
            made["runs"].as_u64().expect("runs made"),
            "{:#}",
            report.report
        );
        assert!(report.count("target", "metric_points") > 25_001);
        assert!(
            report.count("target", "prompts") >= 1,
            "{:#}",
            report.report
        );
        // Into an empty target, experiment ids are the source's.
        let ids = &report.report["fidelity"]["experiment_ids_kept"];
        assert_eq!(ids["kept"], ids["of"], "{:#}", report.report["fidelity"]);
    }

    // The same restore again finds its checkpoint complete: nothing is sent
    // twice, no run is made twice.
    let printed = ferry_ok(&restore_args(&store.url(), &id, &v3.ferry_url()));
    let summary: serde_json::Value = serde_json::from_str(&printed).expect("JSON summary");
    assert_eq!(summary["ops"], 0, "{summary}");
    assert_equal(&source, &v3);

    // Another backup onto the filled target is refused, naming what is there.
    let second = extract(&source.ferry_url(), &store.url(), &[]);
    let refused = ferry_with_env(&restore_args(&store.url(), &second, &v3.ferry_url()), &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not empty") && stderr.contains("--allow-nonempty"),
        "{stderr}"
    );
}

/// Runs `work` with a REST client of `target`.
fn with_client<F: std::future::Future>(
    target: &MlflowServer,
    work: impl FnOnce(MlflowClient) -> F,
) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let client = MlflowClient::new(&target.url(), Credentials::None, RetryPolicy::default())
        .expect("a client");
    runtime.block_on(work(client))
}

/// The restore checkpoints on the target: the tags of experiment 0 named
/// `ferry.checkpoint.<stream>`, with their values.
async fn checkpoints(client: &MlflowClient) -> Vec<(String, serde_json::Value)> {
    let experiment = client
        .get("/api/2.0/mlflow/experiments/get", &[("experiment_id", "0")])
        .await
        .expect("experiment 0");
    experiment["experiment"]["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|tag| {
            let key = tag["key"].as_str()?;
            key.starts_with("ferry.checkpoint.").then(|| {
                let value = serde_json::from_str(tag["value"].as_str().unwrap_or_default())
                    .expect("a JSON checkpoint");
                (key.to_owned(), value)
            })
        })
        .collect()
}

/// The seq through which the restore's checkpoint on `target` counts.
fn checkpoint(target: &MlflowServer) -> u64 {
    with_client(target, |client| async move {
        checkpoints(&client)
            .await
            .iter()
            .filter_map(|(_, value)| value["seq"].as_u64())
            .max()
            .unwrap_or(0)
    })
}

#[test]
fn a_restore_killed_twice_resumes_to_exactly_the_copy_one_unbroken_run_makes() {
    let [source, target] = servers([MlflowVersion::V2, MlflowVersion::V3]);
    source.make_data(1, &[]).expect("make_data.py fills 2.x");
    let store = Store::new();
    let id = extract(&source.ferry_url(), &store.url(), &[]);
    let (store_url, target_url) = (store.url(), target.ferry_url());
    let mut args = restore_args(&store_url, &id, &target_url);
    // Checkpoints often, and runs side by side: a kill lands between a
    // checkpoint and requests answered after it, on several lanes.
    args.extend([
        "--mlflow-ops-per-checkpoint",
        "3",
        "--mlflow-concurrency",
        "2",
    ]);

    let mut last = 0;
    for kill in 1..=2 {
        let mut restore = RunningFerry::start(&args);
        wait_until(
            Duration::from_secs(120),
            &format!("restore {kill} checkpoints past op {}", last + 3),
            || checkpoint(&target) > last + 3,
        );
        restore.kill();
        last = checkpoint(&target);
        println!("kill {kill}: checkpoint at op {last}");
    }
    let mut restore = RunningFerry::start(&args);
    let status = restore.wait();
    assert!(
        status.success(),
        "the resumed restore: {}",
        restore.stderr()
    );
    let report = assert_equal(&source, &target);
    println!(
        "after two kills: {} runs, {} metric points, equal",
        report.count("target", "runs"),
        report.count("target", "metric_points")
    );
}

/// Sets the restore's checkpoint on `target` back to `seq` (not complete),
/// as if no op after it had been answered: a restore run again replays
/// them.
fn rewind_checkpoint(target: &MlflowServer, seq: u64) {
    with_client(target, |client| async move {
        for (key, mut value) in checkpoints(&client).await {
            value["seq"] = seq.into();
            value["complete"] = false.into();
            client
                .post(
                    "/api/2.0/mlflow/experiments/set-experiment-tag",
                    &serde_json::json!({ "experiment_id": "0", "key": key, "value": value.to_string() }),
                )
                .await
                .expect("the checkpoint set back");
        }
    });
}

/// Rewinds every restore checkpoint on `target` to its begin (seq 0, not
/// complete): the next restore sends every request again, as one killed
/// right after its first checkpoint would.
fn rewind_checkpoints(target: &MlflowServer) {
    with_client(target, |client| async move {
        let found = checkpoints(&client).await;
        assert_eq!(found.len(), 1, "one restore's checkpoint on the target");
        for (key, mut value) in found {
            value["seq"] = 0.into();
            value["complete"] = false.into();
            client
                .post(
                    "/api/2.0/mlflow/experiments/set-experiment-tag",
                    &serde_json::json!({ "experiment_id": "0", "key": key, "value": value.to_string() }),
                )
                .await
                .expect("the checkpoint rewound");
        }
    });
}

#[test]
fn into_a_target_that_was_not_empty_a_replay_from_the_first_op_makes_nothing_twice() {
    let [source, target] = servers([MlflowVersion::V2, MlflowVersion::V3]);
    source.make_data(1, &[]).expect("make_data.py fills 2.x");
    // The target holds an experiment of its own: the source's experiment
    // ids and version numbers (a deleted version left a gap) are mapped.
    with_client(&target, |client| async move {
        client
            .post(
                "/api/2.0/mlflow/experiments/create",
                &serde_json::json!({ "name": "the target's own" }),
            )
            .await
            .expect("an experiment of the target's own");
    });
    let store = Store::new();
    let id = extract(&source.ferry_url(), &store.url(), &[]);
    let (store_url, target_url) = (store.url(), target.ferry_url());
    let mut args = restore_args(&store_url, &id, &target_url);
    args.push("--allow-nonempty");
    ferry_ok(&args);
    let compare = || {
        check(
            MlflowVersion::V3,
            &source.url(),
            &target.url(),
            &["--experiment-ids-may-differ"],
        )
        .expect("check.py reads both servers")
    };
    let first = compare();
    assert_eq!(
        first.count("target", "runs"),
        first.count("source", "runs"),
        "{:#}",
        first.report
    );

    // Every request again, after the checkpoint: each finds its own work
    // (runs and experiments by their tags, versions by
    // `ferry.source_version`), and the stages and aliases name the same
    // versions.
    rewind_checkpoints(&target);
    let printed = ferry_ok(&args);
    let summary: serde_json::Value = serde_json::from_str(&printed).expect("JSON summary");
    assert!(summary["ops"].as_u64() > Some(50), "{summary}");
    let second = compare();
    let counts = |report: &CheckReport| {
        let mut counts = report.report["counts"]["target"].clone();
        counts.as_object_mut().expect("counts").remove("requests");
        counts
    };
    assert_eq!(
        counts(&second),
        counts(&first),
        "what the target holds after the replay"
    );
    assert_eq!(
        second.differences(),
        first.differences(),
        "the replay changed what differs from the source"
    );
}

#[test]
fn traces_made_on_2x_restore_onto_3x_and_2x_span_for_span_and_a_replay_makes_none_twice() {
    let [source, v3, v2, chained] = servers([
        MlflowVersion::V2,
        MlflowVersion::V3,
        MlflowVersion::V2,
        MlflowVersion::V3,
    ]);
    let made = source
        .make_data(1, &["--no-long-history", "--traces"])
        .expect("make_data.py fills 2.x, traces too");
    let traces = made["traces"].as_u64().expect("traces made");
    assert!(traces >= 4, "{made}");
    let store = Store::new();
    let id = extract(&source.ferry_url(), &store.url(), &[]);

    for target in [&v3, &v2] {
        ferry_ok(&restore_args(&store.url(), &id, &target.ferry_url()));
        let report = assert_equal(&source, target);
        // Every trace is there with every span: the checker read 2.x's
        // traces.json and the target's spans (3.x: from its database).
        assert_eq!(
            report.count("source", "traces"),
            traces,
            "{:#}",
            report.report
        );
        assert!(report.count("source", "spans") > traces);
        assert_traces_carried(&report, traces);
        // Neither version lets a writer keep a 2.x request id: 2.x assigns
        // one, 3.x names a trace after its spans' trace id.
        let ids = &report.report["fidelity"]["trace_ids_kept"];
        assert_eq!(ids["of"], traces, "{:#}", report.report["fidelity"]);
        assert_eq!(ids["kept"], 0, "{:#}", report.report["fidelity"]);
    }

    // The whole stream replayed onto 3.x (its checkpoint set back to the
    // start): every trace is found by the id it got, none made twice.
    rewind_checkpoint(&v3, 0);
    let printed = ferry_ok(&restore_args(&store.url(), &id, &v3.ferry_url()));
    let summary: serde_json::Value = serde_json::from_str(&printed).expect("JSON summary");
    assert!(summary["ops"].as_u64() > Some(50), "{summary}");
    let report = assert_equal(&source, &v3);
    assert_traces_carried(&report, traces);

    // The whole stream replayed onto 2.x too: its runs' metric batches
    // with NaN points already there (2.22.5 refuses such a batch as a
    // whole: NOTES.md), every trace looked up and none started twice.
    let lookups = |server: &MlflowServer| {
        server
            .log()
            .lines()
            .filter(|line| line.contains("/api/2.0/mlflow/traces?") && line.contains("filter="))
            .count() as u64
    };
    let starts = |server: &MlflowServer| {
        server
            .log()
            .lines()
            .filter(|line| line.contains("\"POST /api/2.0/mlflow/traces HTTP"))
            .count() as u64
    };
    let (lookups_before, starts_before) = (lookups(&v2), starts(&v2));
    assert_eq!(starts_before, traces, "one start per trace");
    rewind_checkpoint(&v2, 0);
    ferry_ok(&restore_args(&store.url(), &id, &v2.ferry_url()));
    // Each trace was looked up by its ferry.source_trace_id again, found,
    // and not started a second time.
    assert_eq!(lookups(&v2) - lookups_before, traces);
    assert_eq!(starts(&v2), starts_before);
    let report = assert_equal(&source, &v2);
    assert_traces_carried(&report, traces);

    // Through the profile chain (examples/profiles/mlflow, 2 -> 3): its jq
    // makes each trace a 3.x one (the sink's own mapping is not needed),
    // and a version in Staging or Production also gets the alias staging
    // or production. The checker finds exactly that: every trace equal,
    // and the one model with versions in those stages has two aliases more.
    let profile = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/profiles/mlflow");
    let (store_url, chained_url) = (store.url(), chained.ferry_url());
    let mut args = restore_args(&store_url, &id, &chained_url);
    args.extend([
        "--migrations",
        profile,
        "--from-version",
        "2",
        "--to-version",
        "3",
    ]);
    ferry_ok(&args);
    let report = check(MlflowVersion::V3, &source.url(), &chained.url(), &[])
        .expect("check.py reads both servers");
    assert_traces_carried(&report, traces);
    let differences = report.differences();
    assert_eq!(differences.len(), 1, "{:#}", report.report);
    let aliases = &differences[0];
    assert_eq!(
        aliases["where"], "registered model 'ferry-model-a'",
        "{aliases}"
    );
    assert_eq!(aliases["field"], "aliases", "{aliases}");
    let (before, after) = (
        aliases["source"].as_object().expect("the source's aliases"),
        aliases["target"].as_object().expect("the target's aliases"),
    );
    let added: BTreeMap<&str, &str> = after
        .iter()
        .filter(|(alias, _)| !before.contains_key(*alias))
        .map(|(alias, version)| (alias.as_str(), version.as_str().unwrap_or_default()))
        .collect();
    assert!(
        before
            .iter()
            .all(|(alias, version)| after.get(alias) == Some(version)),
        "{aliases}"
    );
    assert_eq!(
        added.keys().copied().collect::<Vec<_>>(),
        ["production", "staging"],
        "{aliases}"
    );
    for (alias, stage) in [("production", "Production"), ("staging", "Staging")] {
        let version = added[alias].to_owned();
        let answer = with_client(&chained, |client| async move {
            client
                .get(
                    "/api/2.0/mlflow/model-versions/get",
                    &[("name", "ferry-model-a"), ("version", version.as_str())],
                )
                .await
        })
        .expect("the aliased version");
        assert_eq!(answer["model_version"]["current_stage"], stage, "{answer}");
    }
}

#[test]
fn logged_models_and_traces_made_on_3x_restore_onto_3x_and_2x_refuses_them_by_name_first() {
    let [source, target, v2] = servers([MlflowVersion::V3, MlflowVersion::V3, MlflowVersion::V2]);
    let made = source
        .make_data(1, &["--no-long-history", "--v3-extras", "--assessments"])
        .expect("make_data.py fills 3.x, a logged model, traces and assessments too");
    assert_eq!(made["assessments"], 2, "{made}");
    let traces = made["traces"].as_u64().expect("traces made");
    let store = Store::new();
    let id = extract(&source.ferry_url(), &store.url(), &[]);
    ferry_ok(&restore_args(&store.url(), &id, &target.ferry_url()));
    // The checker compares each trace's assessments, every field.
    let report = assert_equal(&source, &target);
    assert_traces_carried(&report, traces);
    // 3.x lets a writer keep a 3.x trace's id.
    let ids = &report.report["fidelity"]["trace_ids_kept"];
    assert_eq!(ids["kept"], traces, "{:#}", report.report["fidelity"]);
    // The logged model is there once, with its params, tags, metric,
    // status and source run (checked by the checker, matched by
    // ferry.source_model_id: the target gave it a new id).
    assert_eq!(report.count("source", "logged_models"), 1);
    assert_eq!(report.count("target", "logged_models"), 1);
    let model_ids = &report.report["fidelity"]["logged_model_ids_kept"];
    assert_eq!(model_ids["of"], 1, "{:#}", report.report["fidelity"]);

    // The whole stream again, its checkpoint set back to the start: the
    // model and the traces are found, none is made twice.
    rewind_checkpoint(&target, 0);
    ferry_ok(&restore_args(&store.url(), &id, &target.ferry_url()));
    let report = assert_equal(&source, &target);
    assert_traces_carried(&report, traces);
    assert_eq!(report.count("target", "logged_models"), 1);

    // MLflow 2.x has no logged models: the restore stops at the stream's
    // first op, naming the model, before it makes any experiment or run.
    let refused = ferry_with_env(&restore_args(&store.url(), &id, &v2.ferry_url()), &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("logged model ferry-logged-model (m-")
            && stderr.contains("MLflow 2.x has no logged models")
            && stderr.contains("op seq 1 "),
        "{stderr}"
    );
    let report = check(MlflowVersion::V3, &source.url(), &v2.url(), &[])
        .expect("check.py reads both servers");
    assert_eq!(
        report.count("target", "experiments"),
        1,
        "only Default: {:#}",
        report.report
    );
    assert_eq!(report.count("target", "runs"), 0, "{:#}", report.report);
    assert_eq!(
        report.count("target", "registered_models"),
        0,
        "{:#}",
        report.report
    );
}

#[test]
fn traces_made_on_3x_restore_onto_2x_span_for_span() {
    let [source, target] = servers([MlflowVersion::V3, MlflowVersion::V2]);
    let made = source
        .make_data(1, &["--no-long-history", "--traces"])
        .expect("make_data.py fills 3.x, traces too");
    let traces = made["traces"].as_u64().expect("traces made");
    let store = Store::new();
    let id = extract(&source.ferry_url(), &store.url(), &[]);
    ferry_ok(&restore_args(&store.url(), &id, &target.ferry_url()));
    // 2.x keeps the spans as a traces.json in 2.x's encoding (hex ids,
    // attributes as JSON text): the checker reads both and finds every
    // span, attribute and event equal.
    let report = assert_equal(&source, &target);
    assert!(report.count("source", "spans") > traces);
    assert_traces_carried(&report, traces);
    // 2.x assigns trace ids.
    let ids = &report.report["fidelity"]["trace_ids_kept"];
    assert_eq!(ids["kept"], 0, "{:#}", report.report["fidelity"]);
}

#[test]
fn trace_assessments_made_on_3x_are_refused_by_name_onto_2x_before_anything_is_written() {
    let [source, v2] = servers([MlflowVersion::V3, MlflowVersion::V2]);
    let made = source
        .make_data(1, &["--no-long-history", "--assessments"])
        .expect("make_data.py fills 3.x, traces and assessments too");
    assert_eq!(made["assessments"], 2, "{made}");
    let store = Store::new();
    let id = extract(&source.ferry_url(), &store.url(), &[]);
    let refused = ferry_with_env(&restore_args(&store.url(), &id, &v2.ferry_url()), &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    for named in [
        "assessment relevance (",
        "assessment expected_answer (",
        ") of trace tr-",
        "MLflow 2.x has no trace assessments",
        "op seq 1 ",
    ] {
        assert!(stderr.contains(named), "{named:?} not in: {stderr}");
    }
    let report = check(MlflowVersion::V3, &source.url(), &v2.url(), &[])
        .expect("check.py reads both servers");
    assert_eq!(report.count("target", "runs"), 0, "{:#}", report.report);
    assert_eq!(report.count("target", "traces"), 0, "{:#}", report.report);
}

/// A TCP proxy in front of an MLflow server that SIGKILLs a ferry the
/// moment the server has answered the first request whose line starts with
/// `trigger`, before the answer reaches ferry: the server did the request's
/// work, ferry never learns it. One thread a direction a connection.
struct KillingProxy {
    port: u16,
    /// Set once the kill was sent.
    fired: Arc<AtomicBool>,
    /// The process to kill, set once it runs.
    victim: Arc<AtomicU32>,
}

impl KillingProxy {
    fn start(server_port: u16, trigger: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("its address").port();
        let fired = Arc::new(AtomicBool::new(false));
        let victim = Arc::new(AtomicU32::new(0));
        let (proxy_fired, proxy_victim) = (fired.clone(), victim.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)) else {
                    return;
                };
                let asked = Arc::new(AtomicBool::new(false));
                let (mut from_client, mut to_server) = (
                    client.try_clone().expect("a socket"),
                    server.try_clone().expect("a socket"),
                );
                let client_asked = asked.clone();
                std::thread::spawn(move || {
                    let mut buffer = vec![0; 64 * 1024];
                    while let Ok(read) = from_client.read(&mut buffer) {
                        if read == 0 {
                            break;
                        }
                        if buffer[..read].starts_with(trigger.as_bytes()) {
                            client_asked.store(true, Ordering::SeqCst);
                        }
                        if to_server.write_all(&buffer[..read]).is_err() {
                            break;
                        }
                    }
                    let _ = to_server.shutdown(Shutdown::Both);
                });
                let (fired, victim) = (proxy_fired.clone(), proxy_victim.clone());
                let (mut from_server, mut to_client) = (server, client);
                std::thread::spawn(move || {
                    let mut buffer = vec![0; 64 * 1024];
                    while let Ok(read) = from_server.read(&mut buffer) {
                        if read == 0 {
                            break;
                        }
                        if asked.load(Ordering::SeqCst) && !fired.swap(true, Ordering::SeqCst) {
                            // Never `kill 0` (the whole process group).
                            let mut pid = victim.load(Ordering::SeqCst);
                            while pid == 0 {
                                std::thread::sleep(Duration::from_millis(10));
                                pid = victim.load(Ordering::SeqCst);
                            }
                            let _ = Command::new("kill")
                                .args(["-KILL", &pid.to_string()])
                                .status();
                            break;
                        }
                        if to_client.write_all(&buffer[..read]).is_err() {
                            break;
                        }
                    }
                    let _ = to_client.shutdown(Shutdown::Both);
                });
            }
        });
        Self {
            port,
            fired,
            victim,
        }
    }

    fn ferry_url(&self) -> String {
        format!("mlflow+http://127.0.0.1:{}", self.port)
    }
}

#[test]
fn a_restore_killed_inside_a_trace_resumes_to_one_copy_of_it() {
    let [source, v3, v2] = servers([MlflowVersion::V2, MlflowVersion::V3, MlflowVersion::V2]);
    let made = source
        .make_data(1, &["--no-long-history", "--traces"])
        .expect("make_data.py fills 2.x, traces too");
    let traces = made["traces"].as_u64().expect("traces made");
    let store = Store::new();
    let id = extract(&source.ferry_url(), &store.url(), &[]);
    let store_url = store.url();
    // 3.x: the spans of a trace in (OTLP), its info not; 2.x: a trace
    // started (the server named it), its spans and its end not.
    for (target, trigger) in [
        (&v3, "POST /v1/traces "),
        (&v2, "POST /api/2.0/mlflow/traces "),
    ] {
        let proxy = KillingProxy::start(target.port(), trigger);
        let proxy_url = proxy.ferry_url();
        let mut killed = RunningFerry::start(&restore_args(&store_url, &id, &proxy_url));
        proxy.victim.store(killed.pid(), Ordering::SeqCst);
        let status = killed.wait();
        assert!(
            proxy.fired.load(Ordering::SeqCst) && !status.success(),
            "ferry was to be killed inside a trace ({trigger:?}): {status}, {}",
            killed.stderr()
        );
        let target_url = target.ferry_url();
        ferry_ok(&restore_args(&store_url, &id, &target_url));
        // Every trace once, every span once, every field equal.
        let report = assert_equal(&source, target);
        assert_traces_carried(&report, traces);
    }
}

//! The MLflow test infrastructure against real servers: MLflow 2.22.5 and
//! 3.17.2 start and stop, `make_data.py` fills a 2.x server through MLflow's
//! own client, and `check.py` finds a server equal to itself and an empty
//! server different from it (a checker that cannot fail proves nothing).

use ferry_tests::mlflow::{MlflowServer, MlflowVersion, check};

#[test]
fn the_checker_finds_a_server_equal_to_itself_and_not_to_an_empty_one() {
    // Both at once: each spends most of its start in Python imports.
    // Both joined before either is unwrapped: a server left in a detached
    // thread's result would outlive a failed test.
    let v3 = std::thread::spawn(|| MlflowServer::start(MlflowVersion::V3));
    let v2 = MlflowServer::start(MlflowVersion::V2);
    let v3 = v3.join().expect("the start thread does not panic");
    let v2 = v2.expect("an MLflow 2.22.5 server starts");
    let v3 = v3.expect("an MLflow 3.17.2 server starts");
    assert_eq!(v2.ferry_url(), format!("mlflow+{}", v2.url()));

    let summary = v2
        .make_data(1, &[])
        .expect("make_data.py fills the 2.x server");
    assert_eq!(summary["mlflow_client"], "2.22.5", "{summary}");
    assert!(summary["runs"].as_u64() >= Some(10), "{summary}");

    let itself = check(MlflowVersion::V3, &v2.ferry_url(), &v2.url(), &[])
        .expect("check.py reads the 2.x server twice");
    assert!(
        itself.equal,
        "a server differs from itself: {:#}",
        itself.report
    );
    // Everything make_data.py made was read, the long history whole.
    for (name, made) in [
        ("runs", "runs"),
        ("deleted_runs", "deleted_runs"),
        ("dataset_inputs", "dataset_inputs"),
        ("aliases", "aliases"),
        ("prompts", "prompts"),
        ("prompt_versions", "prompt_versions"),
    ] {
        assert!(
            itself.count("source", name) >= summary[made].as_u64().unwrap_or(u64::MAX),
            "check.py counted {} {name}, make_data.py made {}",
            itself.count("source", name),
            summary[made]
        );
    }
    assert!(itself.count("source", "metric_points") > 25_001);
    // Made minus the one deleted version; experiments with Default.
    assert_eq!(itself.count("source", "model_versions"), 4);
    assert_eq!(itself.count("source", "experiments"), 5);
    assert_eq!(
        itself.report["fidelity"]["run_ids_kept"]["kept"],
        itself.count("source", "runs"),
        "{:#}",
        itself.report["fidelity"]
    );

    let against_empty = check(MlflowVersion::V2, &v2.url(), &v3.ferry_url(), &[])
        .expect("check.py reads a 2.x and a 3.x server");
    assert!(
        !against_empty.equal,
        "an empty 3.x server is found equal to the filled 2.x: {:#}",
        against_empty.report
    );
    assert_eq!(against_empty.count("target", "runs"), 0);
    let missing: Vec<String> = against_empty
        .differences()
        .iter()
        .map(|difference| difference["where"].as_str().unwrap_or_default().to_owned())
        .collect();
    for expected in [
        "experiment 'ferry-experiment-0'",
        "experiment 'ferry-experiment-deleted'",
        "registered model 'ferry-model-a'",
    ] {
        assert!(
            missing.iter().any(|place| place == expected),
            "no difference at {expected}: {missing:#?}"
        );
    }
    assert!(
        missing
            .iter()
            .any(|place| place.starts_with("run 'run-0000'")),
        "no difference for run-0000: {missing:#?}"
    );
    assert!(
        against_empty.report["difference_count"].as_u64() > Some(20),
        "{:#}",
        against_empty.report
    );
}

//! Version migrations end to end on real etcd, through the `ferry` binary:
//! the example profiles (Mystic-like v3 -> v4 on restore, Exodus-like
//! ModelInfo up and down in place), and the refusals: names that collide,
//! a jq error, a hole in the chain, a missing `down`, a held lock.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_proto::etcd::etcdserverpb::{PutRequest, RangeRequest};
use ferry_tests::etcd::EtcdServer;
use ferry_tests::ferry_binary;
use ferry_tests::live::count_under;
use ferry_tests::plane::{FerryKeys, dump_text, ferry, ferry_command, grant, kv, put};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("profiles")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn succeeds(output: &Output) {
    assert!(
        output.status.success(),
        "ferry failed ({:?}): {}{}",
        output.status.code(),
        stdout(output),
        stderr(output)
    );
}

/// Extracts `/prefix/` of `server` into a new file store; returns it.
fn extract(server: &EtcdServer, prefix: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("file://{}", dir.path().display());
    succeeds(&ferry(&[
        "extract",
        "--source",
        &server.url(),
        "--prefix",
        prefix,
        "--to",
        &store,
        "--quiet",
    ]));
    (dir, store)
}

async fn seed_mystic(server: &EtcdServer) {
    put(
        server,
        "/mystic/users/Alice",
        r#"{"name":"Alice","email":"a@example.com"}"#,
        0,
    )
    .await;
    put(
        server,
        "/mystic/pipelines/ImageNet-Classifier",
        r#"{"name":"ImageNet-Classifier","environment":"py39-torch","gpu":true}"#,
        0,
    )
    .await;
    put(
        server,
        "/mystic/pipelines/stable-diffusion",
        r#"{"name":"stable-diffusion","environment":"py310","gpu":true}"#,
        0,
    )
    .await;
    put(
        server,
        "/mystic/environments/py39-torch",
        r#"{"python":"3.9"}"#,
        0,
    )
    .await;
    put(
        server,
        "/mystic/v3/runs/run-0001",
        r#"{"pipeline":"ImageNet-Classifier","state":"done"}"#,
        0,
    )
    .await;
    put(server, "/mystic/settings/banner", "plain text, not JSON", 0).await;
}

/// `ferry restore --from STORE --target TARGET_URL` through the example
/// Mystic profile, from version `from` to `to`, with `extra`, run to its end.
fn restore_mystic(store: &str, target_url: &str, from: &str, to: &str, extra: &[&str]) -> Output {
    mystic_restore_command(store, target_url, from, to, extra)
        .output()
        .expect("ferry runs")
}

/// The command [`restore_mystic`] runs.
fn mystic_restore_command(
    store: &str,
    target_url: &str,
    from: &str,
    to: &str,
    extra: &[&str],
) -> Command {
    let profile = examples().join("mystic");
    let mut command = ferry_command();
    command
        .args([
            "restore",
            "--from",
            store,
            "--target",
            target_url,
            "--migrations",
        ])
        .arg(profile)
        .args(["--to-version", to, "--from-version", from])
        .args(extra);
    command
}

/// A source etcd holding the Mystic seed, and an empty target etcd.
async fn mystic_source_and_empty_target() -> (EtcdServer, EtcdServer) {
    let source = EtcdServer::start().expect("source etcd");
    let target = EtcdServer::start().expect("target etcd");
    seed_mystic(&source).await;
    (source, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mystic_v3_backup_restores_as_v4() {
    let (source, target) = mystic_source_and_empty_target().await;
    let (_dir, store) = extract(&source, "/mystic/");
    let profile = examples().join("mystic");
    let profile = profile.to_str().expect("utf-8 path");

    // The backup comes from etcd, not from "mystic": its version must be named.
    let output = ferry(&[
        "restore",
        "--from",
        &store,
        "--target",
        &target.url(),
        "--migrations",
        profile,
        "--to-version",
        "v4",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--from-version"),
        "{}",
        stderr(&output)
    );
    assert!(
        dump_text(&target, "", FerryKeys::Included).await.is_empty(),
        "nothing was written"
    );

    succeeds(&restore_mystic(&store, &target.url(), "v3", "v4", &[]));
    let restored = dump_text(&target, "", FerryKeys::Excluded).await;
    let expected: Vec<(String, String)> = [
        (
            "/mystic/pipelines/imagenet-classifier",
            r#"{"name":"imagenet-classifier","gpu":true}"#,
        ),
        (
            "/mystic/pipelines/stable-diffusion",
            r#"{"name":"stable-diffusion","gpu":true}"#,
        ),
        ("/mystic/settings/banner", "plain text, not JSON"),
        (
            "/mystic/users/alice",
            r#"{"name":"alice","email":"a@example.com"}"#,
        ),
        (
            "/mystic/v4/runs/run-0001",
            r#"{"pipeline":"imagenet-classifier","state":"done"}"#,
        ),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect();
    assert_eq!(restored, expected);

    // The ops leave in v4, numbered without the gap of the dropped environment.
    let lines_dir = tempfile::tempdir().expect("temp dir");
    let lines = lines_dir.path().join("ops.jsonl");
    let lines_url = format!("jsonl://{}", lines.display());
    succeeds(&restore_mystic(
        &store,
        &lines_url,
        "v3",
        "v4",
        &["--quiet"],
    ));
    let text = std::fs::read_to_string(&lines).expect("the ops");
    let ops: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(ops.len(), 5);
    for (index, op) in ops.iter().enumerate() {
        assert_eq!(op["platform_version"], "v4", "{op}");
        assert_eq!(op["seq"], index as u64 + 1, "{op}");
    }

    // Back down to v3 is refused up front: lowercasing has no `down`.
    let back = EtcdServer::start().expect("another etcd");
    let output = restore_mystic(&store, &back.url(), "v4", "v3", &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("1700000000001_drop_environments")
            && stderr(&output).contains("no `down`"),
        "{}",
        stderr(&output)
    );
    assert!(dump_text(&back, "", FerryKeys::Included).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_lowercase_alike_are_refused_before_anything_is_written() {
    let (source, target) = mystic_source_and_empty_target().await;
    put(
        &source,
        "/mystic/pipelines/IMAGENET-classifier",
        r#"{"name":"IMAGENET-classifier"}"#,
        0,
    )
    .await;
    let (_dir, store) = extract(&source, "/mystic/");
    let output = restore_mystic(&store, &target.url(), "v3", "v4", &[]);
    assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
    let message = stderr(&output);
    for part in [
        "/mystic/pipelines/imagenet-classifier",
        "/mystic/pipelines/IMAGENET-classifier",
        "/mystic/pipelines/ImageNet-Classifier",
        "nothing was written",
    ] {
        assert!(message.contains(part), "{part} missing from: {message}");
    }
    assert!(
        dump_text(&target, "", FerryKeys::Included).await.is_empty(),
        "the target stays empty"
    );
}

/// The empty-target check looks where the chain lands the keys, not only
/// at the backup's prefix: a backup of `/mystic/v3/` restores under
/// `/mystic/v4/runs/`, and a key the target holds there is not overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_holding_keys_where_the_chain_lands_them_is_refused() {
    let (source, target) = mystic_source_and_empty_target().await;
    let (_dir, store) = extract(&source, "/mystic/v3/");
    let theirs = r#"{"pipeline":"someone else's","state":"running"}"#;
    put(&target, "/mystic/v4/runs/run-0001", theirs, 0).await;
    let before = dump_text(&target, "", FerryKeys::Included).await;
    let target_url = target.url();
    let restore = |extra: &[&str]| restore_mystic(&store, &target_url, "v3", "v4", extra);
    let output = restore(&[]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("/mystic/v4/runs/run-0001"),
        "the refusal names the key: {}",
        stderr(&output)
    );
    assert_eq!(
        dump_text(&target, "", FerryKeys::Included).await,
        before,
        "the target is unchanged"
    );

    // Told so, the restore writes over it.
    succeeds(&restore(&["--allow-nonempty"]));
    assert_eq!(
        dump_text(&target, "", FerryKeys::Excluded).await,
        vec![(
            "/mystic/v4/runs/run-0001".to_owned(),
            r#"{"pipeline":"imagenet-classifier","state":"done"}"#.to_owned()
        )]
    );
}

/// G4 through a chain, with the batches transformed ahead of the sink: a
/// restore through the Mystic chain killed with -9 at any moment and run
/// again ends with what one unbroken run gives, and every key was written
/// once (etcd `version` 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_through_the_chain_killed_at_any_moment_applies_each_op_once() {
    let source = EtcdServer::start().expect("source etcd");
    let mut client = kv(&source).await;
    for index in 0..1500 {
        let (key, value) = match index % 4 {
            0 => (
                format!("/mystic/environments/Env-{index}"),
                r#"{"python":"3.9"}"#.to_owned(),
            ),
            1 => (
                format!("/mystic/users/User-{index}"),
                format!(r#"{{"name":"User-{index}"}}"#),
            ),
            2 => (
                format!("/mystic/pipelines/Pipeline-{index}"),
                format!(r#"{{"name":"Pipeline-{index}","environment":"Env-{index}"}}"#),
            ),
            _ => (
                format!("/mystic/v3/runs/run-{index}"),
                format!(r#"{{"pipeline":"Pipeline-{}","state":"done"}}"#, index - 1),
            ),
        };
        client
            .put(PutRequest {
                key: key.into_bytes(),
                value: value.into_bytes(),
                ..PutRequest::default()
            })
            .await
            .expect("seed put");
    }
    let (_dir, store) = extract(&source, "/mystic/");

    // What one unbroken run gives.
    let unbroken = EtcdServer::start().expect("etcd");
    succeeds(&restore_mystic(
        &store,
        &unbroken.url(),
        "v3",
        "v4",
        &["--quiet"],
    ));
    let expected = dump_text(&unbroken, "", FerryKeys::Excluded).await;
    assert_eq!(expected.len(), 1500 - 375, "v4 drops the environments");

    let target = EtcdServer::start().expect("etcd");
    let target_url = target.url();
    let mut held_at_kills = Vec::new();
    for round in 0..12 {
        let mut child = mystic_restore_command(
            &store,
            &target_url,
            "v3",
            "v4",
            &["--max-txn-ops", "8", "--quiet"],
        )
        .spawn()
        .expect("restore starts");
        // The first pass writes nothing; kill while it writes, after a
        // varying while: before, during and after Txns.
        let before = mystic_keys(&target).await;
        let mut exited = None;
        while exited.is_none() && mystic_keys(&target).await == before {
            exited = child.try_wait().expect("poll");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if exited.is_none() {
            tokio::time::sleep(std::time::Duration::from_millis((round * 37 % 120) as u64)).await;
            exited = child.try_wait().expect("poll");
        }
        match exited {
            Some(status) => {
                assert!(
                    status.success(),
                    "restore failed on its own in round {round}"
                );
                break;
            }
            None => {
                child.kill().expect("kill -9");
                child.wait().expect("reaped");
                held_at_kills.push(mystic_keys(&target).await);
            }
        }
    }
    succeeds(&restore_mystic(
        &store,
        &target_url,
        "v3",
        "v4",
        &["--quiet"],
    ));
    assert!(
        held_at_kills
            .iter()
            .any(|&held| held > 0 && held < expected.len() as i64),
        "a restore was killed while it wrote (keys held at each kill: {held_at_kills:?}, of {})",
        expected.len()
    );
    assert_eq!(dump_text(&target, "", FerryKeys::Excluded).await, expected);
    let written_twice: Vec<String> = kv(&target)
        .await
        .range(RangeRequest {
            key: b"/mystic/".to_vec(),
            range_end: b"/mystic0".to_vec(),
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner()
        .kvs
        .into_iter()
        .filter(|kv| kv.version != 1)
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    assert!(
        written_twice.is_empty(),
        "written more than once: {written_twice:?}"
    );
}

/// The keys `server` holds under `/mystic/`.
async fn mystic_keys(server: &EtcdServer) -> i64 {
    count_under(&server.endpoint(), b"/mystic/").await
}

/// A profile in a temp dir with versions 1, 2, 3 and one migration 1 -> 2.
fn small_profile(up: &str, down: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("profile.toml"),
        "platform = \"small\"\nversions = [\"1\", \"2\", \"3\"]\nmigrations = [\"1700000000000_step.toml\"]\n",
    )
    .expect("profile");
    let mut migration = format!("from = \"1\"\nto = \"2\"\nup = '{up}'\n");
    if let Some(down) = down {
        migration += &format!("down = '{down}'\n");
    }
    std::fs::write(dir.path().join("1700000000000_step.toml"), migration).expect("migration");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jq_errors_holes_and_missing_downs_stop_before_anything_is_written() {
    let source = EtcdServer::start().expect("source etcd");
    let target = EtcdServer::start().expect("target etcd");
    put(&source, "/small/a", r#"{"x":{"y":1}}"#, 0).await;
    put(&source, "/small/b", r#"{"x":"a string"}"#, 0).await;
    let (_dir, store) = extract(&source, "/small/");

    // A jq error on the second op: the first is not written either.
    let profile = small_profile(".body.x.y += 1", None);
    let dir = profile.path().to_str().expect("utf-8");
    let output = ferry(&[
        "restore",
        "--from",
        &store,
        "--target",
        &target.url(),
        "--migrations",
        dir,
        "--to-version",
        "2",
        "--from-version",
        "1",
    ]);
    assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
    let message = stderr(&output);
    for part in [
        "1700000000000_step",
        "(up)",
        "seq 2",
        "/small/b",
        ".body.x.y += 1",
        "jq error",
    ] {
        assert!(message.contains(part), "{part} missing from: {message}");
    }
    assert!(dump_text(&target, "", FerryKeys::Included).await.is_empty());

    // An output that is not an op.
    let profile = small_profile("del(.key)", None);
    let output = ferry(&[
        "restore",
        "--from",
        &store,
        "--target",
        &target.url(),
        "--migrations",
        profile.path().to_str().expect("utf-8"),
        "--to-version",
        "2",
        "--from-version",
        "1",
    ]);
    assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("no string `key`"),
        "{}",
        stderr(&output)
    );
    assert!(dump_text(&target, "", FerryKeys::Included).await.is_empty());

    // No migration from 2 to 3: a hole, refused before reading anything.
    let profile = small_profile(".", Some("."));
    let output = ferry(&[
        "restore",
        "--from",
        &store,
        "--target",
        &target.url(),
        "--migrations",
        profile.path().to_str().expect("utf-8"),
        "--to-version",
        "3",
        "--from-version",
        "1",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("no migration from version 2 to version 3"),
        "{}",
        stderr(&output)
    );
    assert!(dump_text(&target, "", FerryKeys::Included).await.is_empty());

    // Down without a `down` filter.
    let profile = small_profile(".", None);
    let output = ferry(&[
        "restore",
        "--from",
        &store,
        "--target",
        &target.url(),
        "--migrations",
        profile.path().to_str().expect("utf-8"),
        "--to-version",
        "1",
        "--from-version",
        "2",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("has no `down` filter"),
        "{}",
        stderr(&output)
    );
    assert!(dump_text(&target, "", FerryKeys::Included).await.is_empty());
}

/// Exodus ModelInfo documents as an API writes them: compact, keys in the
/// model's order, numbers as written.
fn model(index: usize) -> String {
    format!(
        r#"{{"_id":"model-{index:02}","foo":"resnet-{index}","bar":{index},"accuracy":0.{index}50,"tags":["a","b"],"params":{{"lr":1e-3,"layers":[64,128]}}}}"#
    )
}

/// 20 ModelInfo documents under `/exodus/models/`, and one key beside them
/// that is not a model.
async fn seed_exodus(server: &EtcdServer) {
    for index in 0..20 {
        put(
            server,
            &format!("/exodus/models/{index:02}"),
            &model(index),
            0,
        )
        .await;
    }
    put(server, "/exodus/other", "not a model", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exodus_in_place_up_then_down_gives_back_the_bytes_with_status_and_history() {
    let server = EtcdServer::start().expect("etcd");
    seed_exodus(&server).await;
    let before = dump_text(&server, "", FerryKeys::Excluded).await;
    let profile = examples().join("exodus-modelinfo");
    let dir = profile.to_str().expect("utf-8");
    let url = server.url();

    let status = ferry(&["migrations", "status", "--target", &url, "--dir", dir]);
    assert_eq!(status.status.code(), Some(10), "{}", stderr(&status));
    assert!(
        stdout(&status).contains("is_up_to_date   false"),
        "{}",
        stdout(&status)
    );
    assert!(
        stdout(&status).contains("1646728080972_foo (up)"),
        "{}",
        stdout(&status)
    );

    // Up in Txns of at most 8 ops: several Txns, resumable by design.
    succeeds(&ferry(&[
        "migrations",
        "up",
        "--target",
        &url,
        "--dir",
        dir,
        "--max-txn-ops",
        "8",
    ]));
    let after_up = dump_text(&server, "", FerryKeys::Excluded).await;
    assert_eq!(after_up.len(), before.len());
    for (key, value) in &after_up {
        if let Some(index) = key.strip_prefix("/exodus/models/") {
            let index: usize = index.parse().expect("a number");
            let mut expected = model(index);
            expected.pop();
            expected += &format!(r#","baz":"resnet-{index}{index}"}}"#);
            assert_eq!(value, &expected);
        }
    }
    let status = ferry(&[
        "migrations",
        "status",
        "--target",
        &url,
        "--dir",
        dir,
        "--output",
        "json",
    ]);
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(report["version"], "2");
    assert_eq!(report["is_up_to_date"], true);
    assert_eq!(report["applied"][0], "1646728080972_foo");
    assert_eq!(report["history"][0]["keys_written"], 20);
    assert!(report["history"][0]["txns"].as_u64().expect("txns") > 1);

    // Up again: nothing to do.
    let again = ferry(&["migrations", "up", "--target", &url, "--dir", dir]);
    succeeds(&again);
    assert!(
        stdout(&again).contains("nothing to do"),
        "{}",
        stdout(&again)
    );

    // Down in one Txn gives back the original bytes.
    succeeds(&ferry(&[
        "migrations",
        "down",
        "--target",
        &url,
        "--dir",
        dir,
        "--to",
        "1",
    ]));
    assert_eq!(dump_text(&server, "", FerryKeys::Excluded).await, before);
    let status = ferry(&[
        "migrations",
        "status",
        "--target",
        &url,
        "--dir",
        dir,
        "--output",
        "json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(report["version"], "1");
    assert_eq!(report["history"][1]["direction"], "down");
    assert_eq!(report["history"][1]["txns"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_is_refused_while_another_holds_the_lock() {
    let server = EtcdServer::start().expect("etcd");
    put(&server, "/exodus/models/00", &model(0), 0).await;
    // Built first: the lease below must not run out while ferry builds.
    ferry_binary();
    let lease = grant(&server, 600).await;
    kv(&server)
        .await
        .put(PutRequest {
            key: b"__ferry__/migrations/lock".to_vec(),
            value: br#"{"holder":"another run","since":"now"}"#.to_vec(),
            lease,
            ..PutRequest::default()
        })
        .await
        .expect("put the lock");
    let profile = examples().join("exodus-modelinfo");
    let output = ferry(&[
        "migrations",
        "up",
        "--target",
        &server.url(),
        "--dir",
        profile.to_str().expect("utf-8"),
    ]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("locked by another migration run")
            && stderr(&output).contains("another run"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        dump_text(&server, "", FerryKeys::Excluded).await,
        vec![("/exodus/models/00".to_owned(), model(0))],
        "nothing changed"
    );
}

#[test]
fn migrations_new_writes_a_timestamped_file_and_lists_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    for name in ["profile.toml", "1646728080972_foo.toml"] {
        std::fs::copy(
            examples().join("exodus-modelinfo").join(name),
            dir.path().join(name),
        )
        .expect("copy");
    }
    let path = dir.path().to_str().expect("utf-8");
    let output = ferry(&[
        "migrations",
        "new",
        "add_qux",
        "--dir",
        path,
        "--output",
        "json",
    ]);
    succeeds(&output);
    let made: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let id = made["id"].as_str().expect("an id");
    assert!(
        id.ends_with("_add_qux") && id.len() > "_add_qux".len() + 12,
        "{id}"
    );
    assert_eq!(made["from"], "1");
    assert_eq!(made["to"], "2");
    let profile = std::fs::read_to_string(dir.path().join("profile.toml")).expect("profile");
    assert!(profile.contains(&format!("{id}.toml")), "{profile}");
    assert!(
        profile.contains("# Exodus-like"),
        "comments are kept: {profile}"
    );
    // The profile still loads, with the new migration in it.
    let loaded = ferry_engine::migrations::profile::Profile::load(dir.path()).expect("loads");
    assert_eq!(loaded.migrations().len(), 2);
}

/// `ferry restore` through the Exodus profile `--from-version FROM
/// --to-version TO`, from `store` onto `target`.
fn restore_exodus(store: &str, target: &EtcdServer, from: &str, to: &str) {
    let profile = examples().join("exodus-modelinfo");
    succeeds(&ferry(&[
        "restore",
        "--from",
        store,
        "--target",
        &target.url(),
        "--migrations",
        profile.to_str().expect("utf-8"),
        "--from-version",
        from,
        "--to-version",
        to,
        "--quiet",
    ]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_onto_an_older_version_runs_the_down_steps_and_gives_back_the_bytes() {
    let original = EtcdServer::start().expect("etcd at version 1");
    seed_exodus(&original).await;
    let (_dir, store_v1) = extract(&original, "/exodus/");

    // Up: every model gains baz.
    let upgraded = EtcdServer::start().expect("etcd at version 2");
    restore_exodus(&store_v1, &upgraded, "1", "2");
    let models_v2 = dump_text(&upgraded, "", FerryKeys::Excluded).await;
    assert_eq!(models_v2.len(), 21);
    for (key, value) in &models_v2 {
        if key == "/exodus/other" {
            assert_eq!(value, "not a model");
            continue;
        }
        let document: serde_json::Value = serde_json::from_str(value).expect("JSON");
        let expected = format!(
            "{}{}",
            document["foo"].as_str().expect("foo"),
            document["bar"]
        );
        assert_eq!(document["baz"], expected.as_str(), "{key}: {value}");
    }

    // Down: a backup of version 2 restored as version 1 runs `down`, and the
    // documents come back as the API wrote them, byte for byte.
    let (_dir, store_v2) = extract(&upgraded, "/exodus/");
    let downgraded = EtcdServer::start().expect("etcd at version 1 again");
    restore_exodus(&store_v2, &downgraded, "2", "1");
    assert_eq!(
        dump_text(&downgraded, "", FerryKeys::Excluded).await,
        dump_text(&original, "", FerryKeys::Excluded).await
    );
}

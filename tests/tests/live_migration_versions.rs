//! Live migration through a version migration chain (issue 5, item 3):
//! `ferry migrate --live --migrations examples/profiles/mystic
//! --from-version v3 --to-version v4` while writer clients keep writing
//! Mystic v3 resources through the gateway. Afterwards:
//! - right before the first write the new etcd took itself, it holds
//!   exactly the v4 image of the old etcd's final (fenced) state, computed
//!   here by hand from the example's rules: user and pipeline names
//!   lowercased in keys and `name` fields, a run's `pipeline` lowercased,
//!   environments and `environment` fields gone, `/v3/runs` moved to
//!   `/v4/runs`;
//! - no key was applied twice: a key the old etcd holds at version 1 is at
//!   version 1 in the new one, and no key is at a higher version there;
//! - the writes the new etcd took after the switch are on top, as sent.
//!
//! The same with the link to the source agent cut while following, so the
//! stream is resumed through the chain. And a chain that cannot be planned
//! (a hole, a missing `down`, no version to start from) is refused with a
//! usage error before anything is held, fenced or written; two source keys
//! the chain lands on one key are refused before anything is written when
//! the snapshot holds them, and stop the relay before the new etcd takes
//! the second when a live change makes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_proto::etcd::etcdserverpb::request_op::Request;
use ferry_proto::etcd::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest};
use ferry_tests::etcd::EtcdServer;
use ferry_tests::live::{
    Cluster, Effect, WRITERS, Write, WriterKeys, cluster_id_and_revision, count_under, kv,
    migrate_report, prefix_end, spawn_ferry, wait_for_phase, with_options, writer_with,
};
use ferry_tests::plane::{delete, ferry, put, value_at_revision};
use ferry_tests::process::FerryProcess;
use serde_json::{Value, json};

/// Every Mystic resource lives under this.
const MYSTIC: &str = "/mystic/";

fn mystic_profile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("profiles")
        .join("mystic")
}

/// A writer's `index`th key: a user, a pipeline, an environment or a run,
/// with upper-case letters in the name (v4 lowercases them).
fn mystic_key(writer: usize, index: usize) -> Vec<u8> {
    let name = format!("W{writer}K{index:02}");
    match index % 4 {
        0 => format!("/mystic/users/User-{name}"),
        1 => format!("/mystic/pipelines/Pipe-{name}"),
        2 => format!("/mystic/environments/Env-{name}"),
        _ => format!("/mystic/v3/runs/Run-{name}"),
    }
    .into_bytes()
}

/// The v3 body a writer's `number`th write puts in its `index`th key.
fn mystic_value(writer: usize, number: u64, index: usize) -> Vec<u8> {
    let name = format!("W{writer}K{index:02}");
    let body = match index % 4 {
        0 => json!({"name": format!("User-{name}"), "n": number}),
        1 => {
            json!({"name": format!("Pipe-{name}"), "environment": format!("Env-{name}"), "n": number})
        }
        2 => json!({"python": "3.11", "n": number}),
        _ => json!({"pipeline": format!("Pipe-W{writer}K{:02}", index - 2), "n": number}),
    };
    body.to_string().into_bytes()
}

const MYSTIC_WRITERS: WriterKeys = WriterKeys {
    key: mystic_key,
    value: mystic_value,
};

/// Fills the old etcd with Mystic v3 resources, in Txns of 50 puts:
/// `scale` times 60 users, 120 pipelines, 40 environments and 300 runs.
async fn seed_mystic(endpoint: &str, scale: usize) {
    let mut puts: Vec<(String, Value)> = Vec::new();
    for index in 0..60 * scale {
        let name = format!("User-{index:03}");
        puts.push((
            format!("/mystic/users/{name}"),
            json!({"name": name, "email": format!("u{index}@example.com")}),
        ));
    }
    for index in 0..120 * scale {
        let name = format!("Pipe-{index:03}");
        puts.push((
            format!("/mystic/pipelines/{name}"),
            json!({"name": name, "environment": format!("env-{:02}", index % 40), "gpu": index % 3 == 0}),
        ));
    }
    for index in 0..40 * scale {
        puts.push((
            format!("/mystic/environments/env-{index:02}"),
            json!({"python": format!("3.{}", index % 12)}),
        ));
    }
    for index in 0..300 * scale {
        let mut run = json!({"pipeline": format!("Pipe-{:03}", index % 120), "status": "done"});
        if index % 5 == 0 {
            run["environment"] = json!("env-00");
        }
        puts.push((format!("/mystic/v3/runs/run-{index:04}"), run));
    }
    for writer in 0..WRITERS {
        for index in 0..ferry_tests::live::KEYS_PER_WRITER {
            puts.push((
                String::from_utf8(mystic_key(writer, index)).expect("text"),
                serde_json::from_slice(&mystic_value(writer, 0, index)).expect("JSON"),
            ));
        }
    }
    let mut client = kv(endpoint).await;
    for chunk in puts.chunks(50) {
        let success = chunk
            .iter()
            .map(|(key, value)| RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: value.to_string().into_bytes(),
                    ..PutRequest::default()
                })),
            })
            .collect();
        client
            .txn(TxnRequest {
                compare: Vec::new(),
                success,
                failure: Vec::new(),
            })
            .await
            .expect("seed txn");
    }
}

/// A profile from v3 to v4 and what it makes of one v3 key and body,
/// worked out here by its rules, not by ferry's chain.
struct V4Profile {
    dir: PathBuf,
    image: fn(&str, &Value) -> Vec<(String, Value)>,
}

/// The example Mystic profile.
fn mystic() -> V4Profile {
    V4Profile {
        dir: mystic_profile(),
        image: |key, body| v4(key, body).into_iter().collect(),
    }
}

/// A profile that splits ops: each seeded pipeline also gets an index
/// entry, `/mystic/index/<name>` = `{"pipeline": <its key>}` (a delete of
/// the pipeline deletes it too). Written in `dir`.
fn indexing(dir: &Path) -> V4Profile {
    let profile = one_step_profile(
        &dir.join("mystic-index"),
        "1700000000000_index_pipelines",
        r#"description = "every seeded pipeline gets an index entry"
up = '., {key: ("/mystic/index/" + (.key | ltrimstr("/mystic/pipelines/"))), body: {pipeline: .key}}'

[match]
kind = "etcd.kv"
key_regex = "^/mystic/pipelines/Pipe-[0-9]+$"
"#,
    );
    V4Profile {
        dir: profile,
        image: |key, body| {
            let mut image = vec![(key.to_owned(), body.clone())];
            if let Some(name) = key.strip_prefix("/mystic/pipelines/Pipe-")
                && name.bytes().all(|byte| byte.is_ascii_digit())
            {
                image.push((
                    format!("/mystic/index/Pipe-{name}"),
                    json!({"pipeline": key}),
                ));
            }
            image
        },
    }
}

/// The v4 image of one v3 key and body, by the example profile's rules;
/// `None` when v4 drops it.
fn v4(key: &str, body: &Value) -> Option<(String, Value)> {
    if key.starts_with("/mystic/environments/") {
        return None;
    }
    let mut key = key.to_owned();
    let mut body = body.clone();
    let named = key.starts_with("/mystic/users/") || key.starts_with("/mystic/pipelines/");
    if let Some(object) = body.as_object_mut() {
        if named {
            if let Some(Value::String(name)) = object.get_mut("name") {
                *name = name.to_ascii_lowercase();
            }
        } else if key.starts_with("/mystic/v3/runs/")
            && let Some(Value::String(pipeline)) = object.get_mut("pipeline")
        {
            *pipeline = pipeline.to_ascii_lowercase();
        }
        object.remove("environment");
    }
    if named {
        key = key.to_ascii_lowercase();
    }
    if let Some(run) = key.strip_prefix("/mystic/v3/runs/") {
        key = format!("/mystic/v4/runs/{run}");
    }
    Some((key, body))
}

/// One key in an etcd: its body and its etcd `version`.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    body: Value,
    version: i64,
}

/// Every key under `/mystic/` at `revision` (0: the current one).
async fn mystic_state(endpoint: &str, revision: i64) -> BTreeMap<String, Stored> {
    let response = kv(endpoint)
        .await
        .range(RangeRequest {
            key: MYSTIC.as_bytes().to_vec(),
            range_end: prefix_end(MYSTIC.as_bytes()),
            revision,
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner();
    response
        .kvs
        .into_iter()
        .map(|kv| {
            let key = String::from_utf8(kv.key).expect("text keys");
            let body = serde_json::from_slice(&kv.value)
                .unwrap_or_else(|error| panic!("{key} holds no JSON ({error})"));
            (
                key,
                Stored {
                    body,
                    version: kv.version,
                },
            )
        })
        .collect()
}

/// What a run left behind.
struct Outcome {
    report: Value,
    exit_code: Option<i32>,
    writes: Vec<Write>,
    /// What `ferry migrate` logged.
    stderr: String,
}

/// A fault to inject while the migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Cut the link to the source agent for 4 s while following.
    CutSourceLinkWhileFollowing,
    /// Cut the link to the source agent for 2 s once the new etcd holds
    /// this many keys of the snapshot, not all of it.
    CutSourceLinkInTheSnapshot {
        after_keys: i64,
    },
    /// Something else writes a key into the new etcd while the migration
    /// follows: it is not in the chain's image of the old etcd.
    StrayWriteInNewEtcd,
    /// kill -9 the target agent once the new etcd holds this many keys of
    /// the snapshot (so its checkpoint stays inside the snapshot), and
    /// start it again on its address.
    KillTargetAgentInTheSnapshot {
        after_keys: i64,
    },
}

/// Writers on Mystic v3 keys through the gateway, a live migration through
/// `profile` from v3 to v4 under `fault` (with `extra` options), and more
/// writes after it.
async fn migrate_mystic(
    cluster: &mut Cluster,
    profile: &V4Profile,
    fault: Fault,
    extra: &[&str],
) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|index| {
            tokio::spawn(writer_with(
                index,
                cluster.gateway_for(index),
                stop.clone(),
                Duration::from_millis(5),
                MYSTIC_WRITERS,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let status_dir = tempfile::tempdir().expect("temp dir");
    let status_file = status_dir.path().join("status.json");
    let profile = profile.dir.display().to_string();
    let follow = if fault == Fault::CutSourceLinkWhileFollowing {
        "6s"
    } else {
        "2s"
    };
    let args = with_options(
        cluster.migrate_args(&status_file),
        &[
            "--migrations",
            &profile,
            "--from-version",
            "v3",
            "--to-version",
            "v4",
            "--follow-at-least",
            follow,
            // None of these tests is about the pause: a debug build on a
            // loaded 2-core machine may drain (and --verify through the
            // chain, which reads the old etcd again) for seconds.
            "--max-pause",
            "30s",
        ],
    );
    let migrate = spawn_ferry(&with_options(args, extra));
    match fault {
        Fault::None => {}
        Fault::StrayWriteInNewEtcd => {
            wait_for_phase(&status_file, "following").await;
            put(
                &cluster.new.endpoint(),
                "/mystic/users/stray",
                json!({"name": "stray"}).to_string(),
                0,
            )
            .await;
        }
        Fault::CutSourceLinkWhileFollowing => {
            wait_for_phase(&status_file, "following").await;
            cluster.source_link.cut();
            tokio::time::sleep(Duration::from_secs(4)).await;
            cluster.source_link.restore();
        }
        Fault::CutSourceLinkInTheSnapshot { after_keys } => {
            wait_inside_the_snapshot(&status_file, &cluster.new.endpoint(), after_keys).await;
            cluster.source_link.cut();
            tokio::time::sleep(Duration::from_secs(2)).await;
            cluster.source_link.restore();
        }
        Fault::KillTargetAgentInTheSnapshot { after_keys } => {
            wait_inside_the_snapshot(&status_file, &cluster.new.endpoint(), after_keys).await;
            let listen = cluster.target_agent.field("listen");
            cluster.target_agent.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            cluster.target_agent = start_slow_target_agent(&cluster.new, &listen);
        }
    }
    let (report, exit_code, stderr) = migrate_report(migrate, cluster).await;
    for line in stderr.lines().filter(|line| line.contains("mapped back")) {
        eprintln!("resumed: {line}");
    }
    // Writes go on after the switch.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::SeqCst);
    let mut writes = Vec::new();
    for task in writers {
        writes.extend(task.await.expect("writer"));
    }
    eprintln!("report: {report}");
    Outcome {
        report,
        exit_code,
        writes,
        stderr,
    }
}

/// Waits until the new etcd (at `new_endpoint`) holds `after_keys` keys of
/// the snapshot, while the migration still applies it.
async fn wait_inside_the_snapshot(status_file: &Path, new_endpoint: &str, after_keys: i64) {
    let mut client = kv(new_endpoint).await;
    loop {
        let phase = std::fs::read_to_string(status_file)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|status| status["phase"].as_str().map(str::to_owned));
        if let Some(phase) = phase.as_deref()
            && !matches!(phase, "starting" | "snapshot")
        {
            panic!(
                "the migration is {phase} already: the snapshot was applied before the test could break into it"
            );
        }
        let keys = client
            .range(RangeRequest {
                key: MYSTIC.as_bytes().to_vec(),
                range_end: prefix_end(MYSTIC.as_bytes()),
                count_only: true,
                ..RangeRequest::default()
            })
            .await
            .expect("range")
            .into_inner()
            .count;
        if keys >= after_keys {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A cluster whose old etcd holds the Mystic seed, migrated through the
/// example chain under `fault` (with `extra` options).
async fn seeded_migration(fault: Fault, extra: &[&str]) -> (Cluster, Outcome) {
    let mut cluster = Cluster::start_empty().await;
    seed_mystic(&cluster.old.endpoint(), 1).await;
    let outcome = migrate_mystic(&mut cluster, &mystic(), fault, extra).await;
    (cluster, outcome)
}

/// The checks after a migration through `profile` that switched.
async fn assert_switched_to_the_v4_image(
    cluster: &Cluster,
    profile: &V4Profile,
    outcome: &Outcome,
) {
    let report = &outcome.report;
    assert_eq!(
        report["outcome"], "switched",
        "{report}\nferry migrate logged:\n{}",
        outcome.stderr
    );
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(report["version_chain"], "mystic v3 -> v4", "{report}");
    let (old_cluster, old_revision) = cluster_id_and_revision(&cluster.old.endpoint()).await;
    let (new_cluster, _) = cluster_id_and_revision(&cluster.new.endpoint()).await;
    let fenced = report["fenced_position"].as_i64().expect("fenced position");
    // After F, the old etcd took one write: the commit of the switch in
    // its fence record.
    assert_eq!(
        old_revision,
        fenced + 1,
        "the old etcd took a write after it was fenced"
    );
    for write in &outcome.writes {
        match &write.answer {
            Err((code, message)) => assert_eq!(
                *code,
                tonic::Code::Unavailable,
                "write {}/{} failed with something other than UNAVAILABLE: {message}",
                write.writer,
                write.number
            ),
            Ok(answer) if answer.cluster_id == old_cluster => assert!(
                answer.revision <= fenced,
                "the old etcd acknowledged a write after the fence"
            ),
            Ok(answer) => assert_eq!(
                answer.cluster_id, new_cluster,
                "a write answered by neither plane"
            ),
        }
    }
    let mut after_switch: Vec<(i64, &Write)> = outcome
        .writes
        .iter()
        .filter_map(|write| match &write.answer {
            Ok(answer) if answer.cluster_id == new_cluster => Some((answer.revision, write)),
            _ => None,
        })
        .collect();
    after_switch.sort_by_key(|(revision, _)| *revision);
    // A delete of a missing key makes no revision: etcd answers it with
    // the revision it is at, which may be ferry's last Txn. Only writes
    // that made a revision mark where the clients' own writes begin.
    let made_a_revision = |write: &Write| {
        write
            .effects
            .iter()
            .any(|(_, effect)| matches!(effect, Effect::Put(_)))
            || write.answer.as_ref().is_ok_and(|answer| answer.deleted > 0)
    };
    let Some(first_new_write) = after_switch
        .iter()
        .find(|(_, write)| made_a_revision(write))
        .map(|(revision, _)| *revision)
    else {
        panic!("no write reached the new etcd after the switch");
    };

    // The new etcd right before its first client write: the v4 image of
    // the old etcd's final state, key for key.
    let old = mystic_state(&cluster.old.endpoint(), 0).await;
    let mut expected: BTreeMap<String, Value> = BTreeMap::new();
    let mut written_once = Vec::new();
    for (key, stored) in &old {
        for (new_key, body) in (profile.image)(key, &stored.body) {
            if stored.version == 1 {
                written_once.push(new_key.clone());
            }
            assert!(
                expected.insert(new_key.clone(), body).is_none(),
                "two v3 keys land on {new_key}: the test's data is wrong"
            );
        }
    }
    if let Some(verified) = report["verified_keys"].as_u64() {
        assert_eq!(
            verified,
            expected.len() as u64,
            "--verify digested another image of the old etcd than the test computes"
        );
    }
    // The gateway shows the new etcd's revisions raised by one above F
    // (the old etcd's fence, as its clients saw it): read the new etcd
    // itself in its own revisions.
    let revision_offset = fenced + 1;
    let migrated = mystic_state(
        &cluster.new.endpoint(),
        first_new_write - revision_offset - 1,
    )
    .await;
    let mut mismatches = Vec::new();
    for (key, want) in &expected {
        match migrated.get(key) {
            None => mismatches.push(format!("{key} is missing")),
            Some(got) if &got.body != want => {
                mismatches.push(format!("{key}: expected {want}, got {}", got.body))
            }
            Some(_) => {}
        }
    }
    for key in migrated.keys() {
        if !expected.contains_key(key) {
            mismatches.push(format!("{key} is in the new etcd but not in the v4 image"));
        }
    }
    // Applied once: a key the source wrote once is at version 1, and a
    // key is never at a higher version than its source key.
    for key in &written_once {
        if let Some(got) = migrated.get(key)
            && got.version != 1
        {
            mismatches.push(format!(
                "{key} was written once in the old etcd but is at version {} in the new one: applied twice",
                got.version
            ));
        }
    }
    for (key, stored) in &old {
        for (new_key, _) in (profile.image)(key, &stored.body) {
            if let Some(got) = migrated.get(&new_key)
                && got.version > stored.version
            {
                mismatches.push(format!(
                    "{new_key} is at version {} in the new etcd, {key} at {} in the old one: applied twice",
                    got.version, stored.version
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} differences between the new etcd and the v4 image of the old one ({} keys, {} written once):\n{}",
        mismatches.len(),
        expected.len(),
        written_once.len(),
        mismatches
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        written_once.len() > 400,
        "the seeded keys the writers never touch are written once: {}",
        written_once.len()
    );

    // The writes the new etcd took itself are on top, as the clients sent
    // them.
    for (_, write) in &after_switch {
        for (key, effect) in &write.effects {
            let key = String::from_utf8(key.clone()).expect("text keys");
            match effect {
                Effect::Put(value) => {
                    expected.insert(key, serde_json::from_slice(value).expect("JSON"));
                }
                Effect::Delete => {
                    expected.remove(&key);
                }
            }
        }
    }
    let now: BTreeMap<String, Value> = mystic_state(&cluster.new.endpoint(), 0)
        .await
        .into_iter()
        .map(|(key, stored)| (key, stored.body))
        .collect();
    assert_eq!(
        now.len(),
        expected.len(),
        "keys in the new etcd after the writes that followed the switch"
    );
    assert!(now == expected, "the new etcd's final state differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_migration_through_the_mystic_chain_leaves_the_v4_image_of_the_old_etcd() {
    let (cluster, outcome) = seeded_migration(Fault::None, &["--verify"]).await;
    assert_switched_to_the_v4_image(&cluster, &mystic(), &outcome).await;
    assert!(
        outcome.report["verified_keys"]
            .as_u64()
            .is_some_and(|keys| keys > 0),
        "--verify through the chain compared the planes: {}",
        outcome.report
    );
}

/// `--verify` through a chain compares the new etcd with the chain's image
/// of the old one: a key only the new etcd holds fails it, and the
/// migration rolls back with clients still on the old etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_etcd_that_differs_from_the_chains_image_fails_verify_and_rolls_back() {
    let (cluster, outcome) = seeded_migration(Fault::StrayWriteInNewEtcd, &["--verify"]).await;
    let report = &outcome.report;
    assert_eq!(report["outcome"], "rolled_back", "{report}");
    assert_eq!(outcome.exit_code, Some(8));
    let reason = report["reason"].as_str().unwrap_or_default();
    for says in [
        "the digest check failed",
        "the version chain's image of the old plane",
        "nothing was switched",
    ] {
        assert!(reason.contains(says), "{says:?} in {report}");
    }
    assert_the_gateway_writes_to_the_old_etcd(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_source_link_is_resumed_through_the_chain_without_a_key_missing_or_applied_twice() {
    let (cluster, outcome) = seeded_migration(Fault::CutSourceLinkWhileFollowing, &[]).await;
    assert_switched_to_the_v4_image(&cluster, &mystic(), &outcome).await;
    assert!(
        outcome.report["reconnects"].as_u64().unwrap_or(0) >= 1,
        "the stream was never resumed: {}",
        outcome.report
    );
}

/// The resume that needs the way back: the target stops inside the
/// snapshot, after the environments (which sort first and are all
/// dropped), so its checkpoint counts fewer ops than the source sent; a
/// source asked to resume after the target's seq would send pipelines and
/// users again (version 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_agent_killed_inside_the_snapshot_resumes_through_the_chain_without_applying_twice()
 {
    let mut cluster = slow_cluster().await;
    let outcome = migrate_mystic(
        &mut cluster,
        &mystic(),
        Fault::KillTargetAgentInTheSnapshot { after_keys: 1500 },
        SLOW_TARGET_OPTIONS,
    )
    .await;
    assert_resumed_to_the_v4_image(&cluster, &mystic(), &outcome).await;
}

/// The same with the source link cut: the target agent applies what it took
/// in, and the relay resumes from where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_link_cut_inside_the_snapshot_is_resumed_through_the_chain() {
    let mut cluster = slow_cluster().await;
    let outcome = migrate_mystic(
        &mut cluster,
        &mystic(),
        Fault::CutSourceLinkInTheSnapshot { after_keys: 1500 },
        SLOW_TARGET_OPTIONS,
    )
    .await;
    assert_resumed_to_the_v4_image(&cluster, &mystic(), &outcome).await;
}

/// A chain that splits snapshot ops in two (seeded pipelines get an index
/// entry): the target's Txns of 3 ops cut pairs of outputs apart, so its
/// checkpoint may fall between one op's two outputs; the target agent is
/// killed inside the pipelines. (Where it stops is not up to the test:
/// ferry's log line printed as `resumed:` says `inside_op=true` when it
/// stopped between two outputs of one op.) A source asked to resume after
/// the target's seq would skip pipelines and users.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_agent_killed_inside_a_snapshot_of_split_ops_resumes_without_a_gap_or_a_repeat() {
    let mut cluster = slow_cluster().await;
    let temp = tempfile::tempdir().expect("temp dir");
    let profile = indexing(temp.path());
    // Inside the pipelines and their index entries, after the 480 environments.
    let outcome = migrate_mystic(
        &mut cluster,
        &profile,
        Fault::KillTargetAgentInTheSnapshot { after_keys: 1200 },
        SLOW_TARGET_OPTIONS,
    )
    .await;
    assert_resumed_to_the_v4_image(&cluster, &profile, &outcome).await;
}

async fn assert_resumed_to_the_v4_image(cluster: &Cluster, profile: &V4Profile, outcome: &Outcome) {
    assert_switched_to_the_v4_image(cluster, profile, outcome).await;
    assert!(
        outcome.report["reconnects"].as_u64().unwrap_or(0) >= 1,
        "the stream was never resumed: {}",
        outcome.report
    );
}

/// With a slow target, a resumed stream catches up with a long backlog of
/// writes; while etcd replays it, the source reports a head close to what it
/// sent, so the lag looks small too early (the cutover then finds the target
/// behind and rolls back). Follow longer (the pause allowed is long for
/// every test here).
const SLOW_TARGET_OPTIONS: &[&str] = &["--follow-at-least", "8s"];

/// A cluster whose old etcd holds 12 times the Mystic seed and whose target
/// agent writes small Txns, so the snapshot takes long enough to break into.
async fn slow_cluster() -> Cluster {
    let mut cluster = Cluster::start_empty().await;
    seed_mystic(&cluster.old.endpoint(), 12).await;
    cluster.target_agent = start_slow_target_agent(&cluster.new, "127.0.0.1:0");
    cluster
}

/// A target agent beside `new` writing Txns of 3 ops beside its checkpoint.
fn start_slow_target_agent(new: &EtcdServer, listen: &str) -> FerryProcess {
    FerryProcess::start(
        &[
            "agent",
            "target",
            "--control-plane",
            &new.url(),
            "--listen",
            listen,
            "--max-txn-ops",
            "4",
        ],
        &[],
    )
    .expect("target agent")
}

/// The Mystic profile with a v5 and no migration to it: a hole.
fn profile_with_a_hole(dir: &Path) -> PathBuf {
    let profile = dir.join("mystic-v5");
    std::fs::create_dir_all(&profile).expect("profile dir");
    for entry in std::fs::read_dir(mystic_profile()).expect("the example profile") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, profile.join(path.file_name().expect("a file"))).expect("copy");
    }
    let manifest = profile.join("profile.toml");
    let text = std::fs::read_to_string(&manifest).expect("profile.toml");
    let text = text.replace(r#"["v3", "v4"]"#, r#"["v3", "v4", "v5"]"#);
    assert!(
        text.contains("v5"),
        "profile.toml lists its versions as expected"
    );
    std::fs::write(&manifest, text).expect("profile.toml");
    profile
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_with_a_hole_or_a_missing_down_is_refused_before_anything_is_written() {
    let cluster = Cluster::start_empty().await;
    seed_mystic(&cluster.old.endpoint(), 1).await;
    let (_, old_before) = cluster_id_and_revision(&cluster.old.endpoint()).await;
    let temp = tempfile::tempdir().expect("temp dir");
    let hole = profile_with_a_hole(temp.path()).display().to_string();
    let mystic = mystic_profile().display().to_string();
    let status_file = temp.path().join("status.json");

    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "--migrations",
                &hole,
                "--from-version",
                "v3",
                "--to-version",
                "v5",
            ],
            "has a hole",
        ),
        (
            &[
                "--migrations",
                &mystic,
                "--from-version",
                "v4",
                "--to-version",
                "v3",
            ],
            "has no `down` filter",
        ),
        // The source agent describes etcd, not a Mystic version.
        (
            &["--migrations", &mystic, "--to-version", "v4"],
            "--from-version",
        ),
        (
            &[
                "--migrations",
                &mystic,
                "--from-version",
                "v2",
                "--to-version",
                "v4",
            ],
            "is not one of profile mystic's versions",
        ),
    ];
    for (flags, says) in cases {
        for dry_run in [false, true] {
            let (code, stderr) = refused_migration(&cluster, &status_file, flags, dry_run);
            assert_eq!(
                code,
                Some(2),
                "{flags:?} (dry run: {dry_run}) is a usage error: {stderr}"
            );
            assert!(stderr.contains(says), "{flags:?}: {stderr}");
        }
    }

    // Nothing was written to either etcd: no epoch, no checkpoint, no fence,
    // and the gateway holds nothing.
    let (_, old_after) = cluster_id_and_revision(&cluster.old.endpoint()).await;
    assert_eq!(old_before, old_after, "the old etcd was written to");
    assert_eq!(
        count_under(&cluster.new.endpoint(), b"").await,
        0,
        "the new etcd is not empty"
    );
    let (_, new_revision) = cluster_id_and_revision(&cluster.new.endpoint()).await;
    assert_eq!(new_revision, 1, "the new etcd was written to");
    assert_the_gateway_writes_to_the_old_etcd(&cluster).await;

    // A dry run of a sound chain lists its steps.
    let args = with_options(
        cluster.migrate_args(&status_file),
        &[
            "--dry-run",
            "--migrations",
            &mystic,
            "--from-version",
            "v3",
            "--to-version",
            "v4",
        ],
    );
    let args: Vec<String> = args
        .into_iter()
        .filter(|argument| argument != "--output" && argument != "json")
        .collect();
    let output = ferry(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for step in [
        "1700000000000_lowercase_names up (v3 -> v4)",
        "1700000000001_drop_environments up (v3 -> v4)",
        "1700000000002_runs_v4_paths up (v3 -> v4)",
    ] {
        assert!(stdout.contains(step), "the dry run lists {step}: {stdout}");
    }
    assert_eq!(
        cluster_id_and_revision(&cluster.new.endpoint()).await.1,
        1,
        "a dry run wrote to the new etcd"
    );
}

/// A Mystic profile whose one step turns the Put of `/mystic/users/User-007`
/// into a Delete: an image `--verify` cannot compare. Written in `dir`.
fn deleting_profile(dir: &Path) -> PathBuf {
    one_step_profile(
        &dir.join("mystic-delete"),
        "1700000000000_delete_a_user",
        r#"description = "User-007 is deleted on the way"
up = '.method = "Delete"'

[match]
kind = "etcd.kv"
key_regex = "^/mystic/users/User-007$"
"#,
    )
}

/// Writes a Mystic v3 -> v4 profile at `profile` with one migration, `id`,
/// whose file is its id, versions and then `rest` (filters and match).
fn one_step_profile(profile: &Path, id: &str, rest: &str) -> PathBuf {
    std::fs::create_dir_all(profile).expect("profile dir");
    std::fs::write(
        profile.join("profile.toml"),
        format!(
            "format_version = 1\nplatform = \"mystic\"\nversions = [\"v3\", \"v4\"]\nmigrations = [\"{id}.toml\"]\n"
        ),
    )
    .expect("profile.toml");
    std::fs::write(
        profile.join(format!("{id}.toml")),
        format!("format_version = 1\nid = \"{id}\"\nfrom = \"v3\"\nto = \"v4\"\n{rest}"),
    )
    .expect("migration file");
    profile.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_whose_image_verify_cannot_compare_is_refused_before_anything_is_written() {
    let cluster = Cluster::start_empty().await;
    seed_mystic(&cluster.old.endpoint(), 1).await;
    let (_, old_before) = cluster_id_and_revision(&cluster.old.endpoint()).await;
    let temp = tempfile::tempdir().expect("temp dir");
    let mystic = mystic_profile().display().to_string();
    let deleting = deleting_profile(temp.path()).display().to_string();
    let status_file = temp.path().join("status.json");
    let chain = |profile: &str| -> Vec<String> {
        [
            "--verify",
            "--migrations",
            profile,
            "--from-version",
            "v3",
            "--to-version",
            "v4",
        ]
        .map(str::to_owned)
        .to_vec()
    };

    // The example chain moves runs from /mystic/v3/ to /mystic/v4/: a digest
    // of the new plane under /mystic/v3/ would miss them all.
    let mut moves_out = chain(&mystic);
    moves_out.extend(["--prefix".to_owned(), "/mystic/v3/".to_owned()]);
    let deletes = chain(&deleting);
    let cases: [(&[String], &[&str]); 2] = [
        (
            &moves_out,
            &[
                "under --prefix \"/mystic/v3/\"",
                "(key /mystic/v3/runs/",
                "comes out of it moved to /mystic/v4/runs/",
                "migrate without --verify",
            ],
        ),
        (
            &deletes,
            &[
                "(key /mystic/users/User-007) comes out of it as a etcd.kv Delete",
                "migrate without --verify",
            ],
        ),
    ];
    for (flags, says) in cases {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        for dry_run in [false, true] {
            let (code, stderr) = refused_migration(&cluster, &status_file, &flags, dry_run);
            assert_eq!(
                code,
                Some(2),
                "{flags:?} (dry run: {dry_run}) is refused as a usage error: {stderr}"
            );
            for said in says {
                assert!(stderr.contains(said), "{flags:?} says {said:?}: {stderr}");
            }
        }
        // Without --verify the same chain is no error: the dry run reads the
        // snapshot through it and passes.
        let unverified: Vec<&str> = flags
            .into_iter()
            .filter(|flag| *flag != "--verify")
            .collect();
        let (code, stderr) = refused_migration(&cluster, &status_file, &unverified, true);
        assert_eq!(code, Some(0), "{unverified:?} without --verify: {stderr}");
    }

    // Nothing was written to either etcd, and the gateway holds nothing.
    let (_, old_after) = cluster_id_and_revision(&cluster.old.endpoint()).await;
    assert_eq!(old_before, old_after, "the old etcd was written to");
    let (_, new_revision) = cluster_id_and_revision(&cluster.new.endpoint()).await;
    assert_eq!(new_revision, 1, "the new etcd was written to");
    assert_the_gateway_writes_to_the_old_etcd(&cluster).await;
}

/// A write through the gateway is answered by the old etcd.
async fn assert_the_gateway_writes_to_the_old_etcd(cluster: &Cluster) {
    let answer = kv(&cluster.gateway.field("listen"))
        .await
        .put(PutRequest {
            key: b"/mystic/users/After".to_vec(),
            value: br#"{"name":"After"}"#.to_vec(),
            ..PutRequest::default()
        })
        .await
        .expect("the gateway takes writes")
        .into_inner();
    let (old_cluster, _) = cluster_id_and_revision(&cluster.old.endpoint()).await;
    assert_eq!(
        answer.header.expect("a header").cluster_id,
        old_cluster,
        "the gateway still sends writes to the old etcd"
    );
}

/// Runs a `ferry migrate` with `extra` flags (and `--dry-run`) that is to
/// stop by itself with an error: its exit code and stderr.
fn refused_migration(
    cluster: &Cluster,
    status_file: &Path,
    extra: &[&str],
    dry_run: bool,
) -> (Option<i32>, String) {
    let mut extra = extra.to_vec();
    if dry_run {
        extra.push("--dry-run");
    }
    let output = ferry(&with_options(cluster.migrate_args(status_file), &extra));
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The value at `key` in the etcd at `endpoint`, as JSON, if it is there.
async fn json_at(endpoint: &str, key: &str) -> Option<Value> {
    value_at_revision(endpoint, key, 0)
        .await
        .map(|value| serde_json::from_slice(&value).expect("a JSON value"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_names_that_lowercase_to_one_stop_a_live_migration_before_the_target_takes_the_second()
{
    let cluster = Cluster::start_empty().await;
    let old = cluster.old.endpoint();
    let new = cluster.new.endpoint();
    seed_mystic(&old, 1).await;
    put(
        &old,
        "/mystic/users/Foo",
        json!({"name": "Foo", "n": 1}).to_string(),
        0,
    )
    .await;
    put(
        &old,
        "/mystic/users/FOO",
        json!({"name": "FOO", "n": 2}).to_string(),
        0,
    )
    .await;
    let (_, old_before) = cluster_id_and_revision(&old).await;
    let temp = tempfile::tempdir().expect("temp dir");
    let status_file = temp.path().join("status.json");
    let mystic = mystic_profile().display().to_string();
    let chain = [
        "--migrations",
        &mystic,
        "--from-version",
        "v3",
        "--to-version",
        "v4",
    ];

    // In the snapshot: found by reading it through the chain first, so the
    // migration (and its dry run) stops with nothing held, fenced or written.
    for dry_run in [true, false] {
        let (code, stderr) = refused_migration(&cluster, &status_file, &chain, dry_run);
        assert_eq!(
            code,
            Some(5),
            "a collision in the source's data (dry run: {dry_run}): {stderr}"
        );
        for says in [
            "maps two keys onto /mystic/users/foo",
            "/mystic/users/Foo",
            "/mystic/users/FOO",
            "nothing was written",
        ] {
            assert!(stderr.contains(says), "says {says:?}: {stderr}");
        }
    }
    assert_eq!(
        cluster_id_and_revision(&old).await.1,
        old_before,
        "the old etcd was written to (a fence, an epoch)"
    );
    assert_eq!(
        cluster_id_and_revision(&new).await.1,
        1,
        "the new etcd was written to"
    );

    // Renamed in the source: the migration runs, and follows.
    let gateway = cluster.gateway.field("listen");
    delete(&gateway, "/mystic/users/FOO").await;
    let mut extra = chain.to_vec();
    extra.extend(["--follow-at-least", "120s"]);
    let args = with_options(cluster.migrate_args(&status_file), &extra);
    let migrate = spawn_ferry(&args);
    wait_for_phase(&status_file, "following").await;

    // A key deleted frees its v4 name for another spelling...
    delete(&gateway, "/mystic/users/Foo").await;
    put(
        &gateway,
        "/mystic/users/FOO",
        json!({"name": "FOO", "n": 3}).to_string(),
        0,
    )
    .await;
    let moved = async {
        for _ in 0..200 {
            if json_at(&new, "/mystic/users/foo").await == Some(json!({"name": "foo", "n": 3})) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(
        moved.await,
        "FOO, created after Foo was deleted, reached the new etcd as foo"
    );

    // ...and the old spelling created again while FOO exists is a collision
    // the relay stops at: the new etcd never takes it.
    put(
        &gateway,
        "/mystic/users/Foo",
        json!({"name": "Foo", "n": 4}).to_string(),
        0,
    )
    .await;
    let output = tokio::time::timeout(Duration::from_secs(60), migrate.wait_with_output())
        .await
        .expect("the migration stops at the collision")
        .expect("ferry migrate runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(8),
        "stopped without a switch: {stderr}"
    );
    for says in [
        "two keys the version migration chain maps onto /mystic/users/foo: /mystic/users/FOO and /mystic/users/Foo",
        "the new plane did not take /mystic/users/Foo's change",
        "nothing was held or fenced",
    ] {
        assert!(stderr.contains(says), "says {says:?}: {stderr}");
    }
    assert_eq!(
        json_at(&new, "/mystic/users/foo").await,
        Some(json!({"name": "foo", "n": 3})),
        "the second key overwrote the first in the new etcd"
    );
    // Clients still write to the old etcd, which holds both.
    assert_the_gateway_writes_to_the_old_etcd(&cluster).await;
    assert_eq!(
        json_at(&old, "/mystic/users/Foo").await,
        Some(json!({"name": "Foo", "n": 4}))
    );
    assert_eq!(
        json_at(&old, "/mystic/users/FOO").await,
        Some(json!({"name": "FOO", "n": 3}))
    );

    // Renamed again, a second migration onto the new etcd, which holds what
    // the first applied, is refused rather than merged into it: nothing is
    // held or fenced, and the new etcd keeps what it had.
    delete(&gateway, "/mystic/users/Foo").await;
    let new_before = mystic_state(&new, 0).await;
    let (code, stderr) = refused_migration(&cluster, &status_file, &chain, false);
    assert_eq!(
        code,
        Some(8),
        "a second migration onto a used target: {stderr}"
    );
    for says in [
        "already holds keys, e.g. /mystic/",
        "A live migration starts on an empty new plane",
        "nothing was held or fenced",
    ] {
        assert!(stderr.contains(says), "says {says:?}: {stderr}");
    }
    // Refused at once: not retried as a broken stream until
    // --reconnect-timeout.
    assert!(
        !stderr.contains("could not be resumed"),
        "the refusal was retried as a break: {stderr}"
    );
    assert_eq!(
        mystic_state(&new, 0).await,
        new_before,
        "the refused migration changed a key in the new etcd (only ferry's own epoch record may move)"
    );
    assert_the_gateway_writes_to_the_old_etcd(&cluster).await;
}

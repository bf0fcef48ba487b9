//! The etcd adapter against real etcd servers: a consistent extract, an
//! exactly-once restore that survives kill -9, leases, binary and large
//! values, and the errors a user meets.

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::adapters::etcd::{EtcdConnection, EtcdSink, EtcdSinkOptions};
use ferry_engine::adapters::{SourceOptions, source_from_url};
use ferry_engine::backup::{ExtractOptions, RestoreOptions};
use ferry_engine::manifest::Manifest;
use ferry_engine::pipeline;
use ferry_engine::progress::Progress;
use ferry_engine::store::BackupStore;
use ferry_proto::etcd::etcdserverpb::RangeRequest;
use ferry_proto::etcd::mvccpb::KeyValue;
use ferry_tests::etcd::{EtcdOptions, EtcdServer};
use ferry_tests::plane::{
    FerryKeys, dump, etcdctl_ok, ferry, ferry_command, ferry_with_env, get, grant, kv, put,
    time_to_live, value_at_revision,
};

/// The value of `size` bytes for key number `index`: bytes of every value.
fn value(index: usize, size: usize) -> Vec<u8> {
    (0..size)
        .map(|offset| ((index * 31 + offset * 7) % 256) as u8)
        .collect()
}

/// Seeds `/app/` with `count` keys (one binary key, values up to etcd's limit), three
/// of them on a lease, and a few keys outside `/app/`. Returns the lease id.
async fn seed(server: &EtcdServer, count: usize) -> i64 {
    let client = kv(server).await;
    let lease = grant(server, 600).await;
    for index in 0..count {
        let key = format!("/app/items/{index:06}");
        // Key 7 holds 1 MiB; key 8 as much as etcd's default request
        // limit lets one Put hold, too large to share a Txn with ferry's checkpoint.
        let size = match index {
            7 => 1024 * 1024,
            8 => 1_572_864 - 200,
            _ => 200,
        };
        let on_lease = if index % 1000 == 3 { lease } else { 0 };
        put(&client, key.as_bytes(), &value(index, size), on_lease).await;
    }
    put(
        &client,
        b"/app/bin/\xff\x00\xfe",
        &[0, 159, 146, 150, 255],
        0,
    )
    .await;
    put(&client, b"/other/not-in-prefix", b"x", 0).await;
    put(&client, b"/apple", b"also not in /app/", 0).await;
    lease
}

fn store() -> (tempfile::TempDir, BackupStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        BackupStore::open(&format!("file://{}", dir.path().display()), true).expect("store");
    (dir, store)
}

async fn extract(
    server: &EtcdServer,
    store: &BackupStore,
    prefix: &str,
    parallel: usize,
) -> Manifest {
    let options = SourceOptions {
        prefix: prefix.as_bytes().to_vec(),
        parallel,
        ..SourceOptions::default()
    };
    let source = source_from_url(&server.url(), &options).expect("source");
    pipeline::extract(
        source,
        store,
        ExtractOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .expect("extract")
    .manifest
}

async fn restore(
    server: &EtcdServer,
    store: &BackupStore,
    options: EtcdSinkOptions,
) -> ferry_engine::Result<pipeline::RestoreSummary> {
    let sink: Box<dyn ferry_engine::adapters::Sink> = Box::new(EtcdSink::new(
        EtcdConnection::from_url(&server.url(), None).expect("url"),
        options,
    ));
    pipeline::restore(
        store,
        None,
        sink,
        RestoreOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
}

fn same_data(source: &[KeyValue], target: &[KeyValue]) {
    assert_eq!(source.len(), target.len(), "as many keys");
    for (expected, restored) in source.iter().zip(target) {
        assert_eq!(expected.key, restored.key);
        assert!(
            expected.value == restored.value,
            "value of {:?} differs",
            String::from_utf8_lossy(&expected.key)
        );
        assert_eq!(
            restored.version,
            1,
            "{:?} was written more than once",
            String::from_utf8_lossy(&restored.key)
        );
        assert_eq!(
            expected.lease != 0,
            restored.lease != 0,
            "lease of {:?}",
            String::from_utf8_lossy(&expected.key)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_round_trips_with_leases_binary_and_large_values() {
    let source = EtcdServer::start().expect("source etcd");
    let target = EtcdServer::start().expect("target etcd");
    let lease = seed(&source, 2_500).await;
    let (_dir, store) = store();

    let manifest = extract(&source, &store, "/app/", 3).await;
    assert_eq!(manifest.source.platform, "etcd");
    assert!(
        manifest
            .source
            .identity
            .as_deref()
            .is_some_and(|id| id.len() == 16)
    );
    assert!(manifest.source.snapshot_position.is_some());
    assert_eq!(manifest.source.key_prefix.as_deref(), Some("/app/"));
    // 2,500 items, the binary key, and the lease.
    assert_eq!(manifest.totals.ops, 2_502);

    // Pipelined: Txns that overtake their predecessor are sent again.
    let pipelined = EtcdSinkOptions {
        txns_in_flight: 4,
        ..EtcdSinkOptions::default()
    };
    let summary = restore(&target, &store, pipelined).await.expect("restore");
    assert_eq!(summary.ops, 2_502);
    let expected = dump(&source, b"/app/", FerryKeys::Included).await;
    let restored = dump(&target, b"/app/", FerryKeys::Included).await;
    same_data(&expected, &restored);
    assert!(
        dump(&target, b"/other/", FerryKeys::Included)
            .await
            .is_empty(),
        "keys outside the prefix stay behind"
    );
    assert!(
        dump(&target, b"/apple", FerryKeys::Included)
            .await
            .is_empty()
    );

    let on_lease = restored
        .iter()
        .find(|kv| kv.lease != 0)
        .expect("a key on a lease");
    assert_eq!(on_lease.lease, lease, "the lease keeps its id");
    let alive = time_to_live(&target, lease, true).await;
    assert!(
        alive.ttl > 500 && alive.ttl <= 600,
        "remaining TTL carried: {}",
        alive.ttl
    );
    assert_eq!(
        alive.keys.len(),
        3,
        "every key of the lease is attached to it"
    );

    // Running the same restore again is a no-op: the checkpoint says done.
    let again = restore(&target, &store, EtcdSinkOptions::default())
        .await
        .expect("restore again");
    assert_eq!(again.ops, 0);
    same_data(
        &expected,
        &dump(&target, b"/app/", FerryKeys::Included).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_reads_give_the_same_backup_as_one_reader() {
    let source = EtcdServer::start().expect("source etcd");
    seed(&source, 1_200).await;
    let (_dir, store) = store();
    let one = extract(&source, &store, "/app/", 1).await;
    let four = extract(&source, &store, "/app/", 4).await;
    assert_eq!(one.totals.ops, four.totals.ops);
    let read = |manifest: Manifest| {
        let store = store.clone();
        async move {
            use futures::TryStreamExt;
            let batches: Vec<Vec<ferry_engine::Op>> = ferry_engine::backup::read_backup(
                store,
                Arc::new(manifest),
                RestoreOptions::default(),
            )
            .try_collect()
            .await
            .expect("reads");
            batches.into_iter().flatten().collect::<Vec<_>>()
        }
    };
    let (one, four) = (read(one).await, read(four).await);
    assert_eq!(one.len(), four.len());
    for (a, b) in one.iter().zip(&four) {
        assert_eq!(
            (a.seq, String::from_utf8_lossy(&a.key), a.position),
            (b.seq, String::from_utf8_lossy(&b.key), b.position),
            "the same ops in the same seq order"
        );
    }
    // Byte for byte but for a lease's remaining TTL, which ticks between the two.
    let keys_and_values = |ops: &[ferry_engine::Op]| -> Vec<ferry_engine::Op> {
        ops.iter()
            .filter(|op| op.kind == "etcd.kv")
            .cloned()
            .collect()
    };
    assert!(
        keys_and_values(&one) == keys_and_values(&four),
        "the same key-value ops, byte for byte"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonempty_target_is_refused_with_examples_and_rewrite_moves_keys() {
    let source = EtcdServer::start().expect("source etcd");
    let target = EtcdServer::start().expect("target etcd");
    seed(&source, 50).await;
    let (_dir, store) = store();
    extract(&source, &store, "/app/", 1).await;

    let client = kv(&target).await;
    put(&client, b"/app/items/000001", b"already here", 0).await;
    let error = restore(&target, &store, EtcdSinkOptions::default())
        .await
        .expect_err("refused");
    let message = error.to_string();
    assert!(
        message.contains("already holds keys") && message.contains("/app/items/000001"),
        "{message}"
    );
    assert_eq!(error.kind(), ferry_engine::ErrorKind::Target);
    assert_eq!(
        dump(&target, b"/app/", FerryKeys::Included).await.len(),
        1,
        "nothing was written"
    );

    // Moved elsewhere, the same backup goes into an empty range.
    let moved = EtcdSinkOptions {
        rewrite_prefix: Some((b"/app/".to_vec(), b"/restored/app/".to_vec())),
        ..EtcdSinkOptions::default()
    };
    restore(&target, &store, moved)
        .await
        .expect("restore under a new prefix");
    let restored = dump(&target, b"/restored/app/", FerryKeys::Included).await;
    assert_eq!(restored.len(), 51);
    assert!(
        restored
            .iter()
            .all(|kv| kv.key.starts_with(b"/restored/app/"))
    );
}

/// A backup of 20 keys (one of 1 MiB) and a restore of it that stopped
/// part way: its target's request limit is 512 KiB.
struct StoppedRestore {
    _source: EtcdServer,
    target: EtcdServer,
    _dir: tempfile::TempDir,
    store_url: String,
    manifest: Manifest,
    error: ferry_engine::Error,
}

async fn stopped_restore() -> StoppedRestore {
    let source = EtcdServer::start().expect("source etcd");
    let target = EtcdServer::start_with(&EtcdOptions {
        max_request_bytes: 512 * 1024,
        ..EtcdOptions::default()
    })
    .expect("target etcd");
    seed(&source, 20).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store_url = format!("file://{}", dir.path().display());
    let store = BackupStore::open(&store_url, true).expect("store");
    let manifest = extract(&source, &store, "/app/", 1).await;
    // Small Txns, so some commit before the one holding the 1 MiB value.
    let options = EtcdSinkOptions {
        max_txn_ops: 4,
        ..EtcdSinkOptions::default()
    };
    let error = restore(&target, &store, options)
        .await
        .expect_err("the 1 MiB value is refused");
    StoppedRestore {
        _source: source,
        target,
        _dir: dir,
        store_url,
        manifest,
        error,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_target_refuses_stops_with_a_clear_error_and_an_honest_checkpoint() {
    let stopped = stopped_restore().await;
    let small = &stopped.target;
    let message = stopped.error.to_string();
    assert!(message.contains("too large"), "{message}");
    // Key 7 holds 1 MiB: the ops before its Txn are in, nothing after.
    let restored = dump(small, b"/app/", FerryKeys::Included).await;
    assert!(
        restored
            .iter()
            .all(|kv| kv.key.as_slice() < b"/app/items/000007".as_slice()),
        "nothing past the refused Txn"
    );
    let checkpoint = dump(small, b"__ferry__/checkpoints/", FerryKeys::Included).await;
    assert_eq!(checkpoint.len(), 1);
    let recorded: serde_json::Value =
        serde_json::from_slice(&checkpoint[0].value).expect("checkpoint JSON");
    let through = recorded["applied_through_seq"].as_u64().expect("seq");
    assert_eq!(
        through as usize,
        restored.len() + 1,
        "the checkpoint covers exactly what is in (the lease, then keys)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_from_another_source_is_refused_and_left_as_it_is() {
    // A restore that stopped part way leaves its checkpoint...
    let stopped = stopped_restore().await;
    let (small, store_url, manifest) = (&stopped.target, &stopped.store_url, &stopped.manifest);
    // ...which now says the backup of that id came from another etcd (a
    // store swapped under the same backup id, say).
    let checkpoint_key = format!("__ferry__/checkpoints/{}", manifest.backup_id);
    let checkpoints = dump(small, b"__ferry__/checkpoints/", FerryKeys::Included).await;
    assert_eq!(checkpoints.len(), 1);
    assert_eq!(checkpoints[0].key, checkpoint_key.as_bytes());
    let mut recorded: serde_json::Value =
        serde_json::from_slice(&checkpoints[0].value).expect("checkpoint JSON");
    let own_source = recorded["source_identity"]
        .as_str()
        .expect("the checkpoint names its source")
        .to_owned();
    recorded["source_identity"] = serde_json::Value::from("00000000000000ba");
    put(
        small,
        checkpoint_key.as_bytes(),
        recorded.to_string().as_bytes(),
        0,
    )
    .await;
    let everything = || async {
        let mut all = dump(small, b"/", FerryKeys::Included).await;
        all.extend(dump(small, b"__ferry__/", FerryKeys::Included).await);
        all
    };
    let before = everything().await;

    let refused = ferry(&[
        "restore",
        "--from",
        store_url,
        "--target",
        &small.url(),
        "--max-request-bytes",
        "524288",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(6), "{stderr}");
    for says in [
        manifest.backup_id.as_str(),
        "from source 00000000000000ba",
        &format!("this backup comes from source {own_source}"),
        "refusing to mix them",
    ] {
        assert!(stderr.contains(says), "says {says:?}: {stderr}");
    }
    let after = everything().await;
    assert_eq!(
        before
            .iter()
            .map(|kv| (&kv.key, &kv.value, kv.mod_revision))
            .collect::<Vec<_>>(),
        after
            .iter()
            .map(|kv| (&kv.key, &kv.value, kv.mod_revision))
            .collect::<Vec<_>>(),
        "nothing in the target changed, its checkpoint included"
    );
}

/// `ferry extract --prefix /app/` of `source` into a new `file://` store:
/// the store's directory (removed when dropped) and URL.
fn extract_app_with_ferry(source: &EtcdServer) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store_url = format!("file://{}", dir.path().display());
    let extracted = ferry(&[
        "extract",
        "--source",
        &source.url(),
        "--prefix",
        "/app/",
        "--to",
        &store_url,
        "--quiet",
    ]);
    assert!(
        extracted.status.success(),
        "{}",
        String::from_utf8_lossy(&extracted.stderr)
    );
    (dir, store_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_killed_at_any_moment_resumes_and_applies_each_op_once() {
    let source = EtcdServer::start().expect("source etcd");
    let target = EtcdServer::start().expect("target etcd");
    seed(&source, 6_000).await;
    let (_dir, store_url) = extract_app_with_ferry(&source);

    // Rounds alternate how they write, so a run resumes what another kind
    // of run left: 4 lanes, one pipelined chain, 2 lanes.
    let writers: [&[&str]; 3] = [
        &["--lanes", "4"],
        &["--lanes", "1", "--txns-in-flight", "4"],
        &["--lanes", "2"],
    ];
    let mut kills = 0;
    // How many of the 6,000 items each killed run left in the target.
    let mut left_by_kills = Vec::new();
    for round in 0..40 {
        let mut child = ferry_command()
            .args([
                "restore",
                "--from",
                &store_url,
                "--target",
                &target.url(),
                "--quiet",
                "--max-txn-ops",
                "16",
            ])
            .args(writers[round % writers.len()])
            .spawn()
            .expect("restore starts");
        // Kill it after a varying while: before, during and after Txns. On a
        // slow machine, where runs die before their first Txn, wait longer.
        let before_any = left_by_kills
            .iter()
            .take_while(|&&items| items == 0)
            .count();
        std::thread::sleep(Duration::from_millis(
            30 + (round * 37 % 300) as u64 + 100 * before_any as u64,
        ));
        match child.try_wait().expect("poll") {
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
                kills += 1;
                left_by_kills.push(dump(&target, b"/app/", FerryKeys::Included).await.len());
            }
        }
    }
    let finished = ferry(&[
        "restore",
        "--from",
        &store_url,
        "--target",
        &target.url(),
        "--output",
        "json",
    ]);
    assert!(
        finished.status.success(),
        "{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    assert!(kills > 0, "the test killed at least one restore");
    // Some kill landed mid-restore: part of the data was in, not all.
    assert!(
        left_by_kills
            .iter()
            .any(|&items| items > 0 && items < 6_000),
        "no kill landed between the first Txn and the last: {left_by_kills:?}"
    );
    let restored = dump(&target, b"/app/", FerryKeys::Included).await;
    same_data(
        &dump(&source, b"/app/", FerryKeys::Included).await,
        &restored,
    );
    // Each item was put once, across every killed run and the last one.
    let twice: Vec<_> = restored
        .iter()
        .filter(|kv| kv.version != 1)
        .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.version))
        .collect();
    assert!(twice.is_empty(), "items put more than once: {twice:?}");
    // A finished restore leaves one checkpoint key, marked complete.
    let checkpoints = dump(&target, b"__ferry__/checkpoints/", FerryKeys::Included).await;
    assert_eq!(
        checkpoints.len(),
        1,
        "the lanes' keys are gone: {:?}",
        checkpoints
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect::<Vec<_>>()
    );
    let checkpoint: serde_json::Value =
        serde_json::from_slice(&checkpoints[0].value).expect("a checkpoint");
    assert_eq!(checkpoint["complete"], true, "{checkpoint}");
    // 6,000 items, the binary key and the lease.
    assert_eq!(checkpoint["applied_through_seq"], 6_002, "{checkpoint}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_a_user_meets_have_their_exit_codes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store_url = format!("file://{}", dir.path().display());
    let unreachable = ferry(&[
        "extract",
        "--source",
        "etcd://127.0.0.1:9",
        "--to",
        &store_url,
    ]);
    assert_eq!(unreachable.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach etcd://127.0.0.1:9"),
        "{}",
        String::from_utf8_lossy(&unreachable.stderr)
    );

    let in_url = ferry(&[
        "extract",
        "--source",
        "etcd://root:secret@127.0.0.1:2379",
        "--to",
        &store_url,
    ]);
    assert_eq!(in_url.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&in_url.stderr).contains("credentials do not belong in a URL"));

    let source = EtcdServer::start().expect("etcd");
    let no_password = ferry_with_env(
        &["extract", "--source", &source.url(), "--to", &store_url],
        &[("ETCD_USERNAME", "root")],
    );
    assert_eq!(no_password.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&no_password.stderr).contains("no password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_the_environment_or_a_file_and_bad_ones_are_named() {
    use ferry_proto::etcd::etcdserverpb::auth_client::AuthClient;
    use ferry_proto::etcd::etcdserverpb::{
        AuthEnableRequest, AuthRoleAddRequest, AuthUserAddRequest, AuthUserGrantRoleRequest,
    };

    let server = EtcdServer::start().expect("etcd");
    seed(&server, 30).await;
    let mut auth = AuthClient::connect(format!("http://{}", server.endpoint()))
        .await
        .expect("auth client");
    auth.role_add(AuthRoleAddRequest {
        name: "root".to_owned(),
    })
    .await
    .expect("root role");
    auth.user_add(AuthUserAddRequest {
        name: "root".to_owned(),
        password: "s3cret-pass".to_owned(),
        ..AuthUserAddRequest::default()
    })
    .await
    .expect("root user");
    auth.user_grant_role(AuthUserGrantRoleRequest {
        user: "root".to_owned(),
        role: "root".to_owned(),
    })
    .await
    .expect("grant");
    auth.auth_enable(AuthEnableRequest {})
        .await
        .expect("auth on");

    let dir = tempfile::tempdir().expect("temp dir");
    let store_url = format!("file://{}", dir.path().display());
    let anonymous = ferry(&["extract", "--source", &server.url(), "--to", &store_url]);
    assert_eq!(
        anonymous.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&anonymous.stderr)
    );

    let wrong = ferry_with_env(
        &["extract", "--source", &server.url(), "--to", &store_url],
        &[("ETCD_USERNAME", "root"), ("ETCD_PASSWORD", "wrong")],
    );
    assert_eq!(wrong.status.code(), Some(5));
    let message = String::from_utf8_lossy(&wrong.stderr);
    assert!(message.contains("refused the credentials"), "{message}");
    assert!(
        !message.contains("wrong"),
        "the password is never printed: {message}"
    );

    let good = ferry_with_env(
        &[
            "extract",
            "--source",
            &server.url(),
            "--prefix",
            "/app/",
            "--to",
            &store_url,
            "--quiet",
        ],
        &[("ETCD_USERNAME", "root"), ("ETCD_PASSWORD", "s3cret-pass")],
    );
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );

    let password_file = dir.path().join("etcd-password");
    std::fs::write(&password_file, "s3cret-pass\n").expect("password file");
    let restored = ferry_with_env(
        &[
            "restore",
            "--from",
            &store_url,
            "--target",
            &server.url(),
            "--rewrite-prefix",
            "/app/=/copy/",
            "--etcd-password-file",
            password_file.to_str().expect("path"),
        ],
        &[("ETCD_USERNAME", "root")],
    );
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_compacted_during_the_extract_stops_it_and_seals_nothing() {
    use ferry_engine::backup::write_backup;
    use ferry_proto::etcd::etcdserverpb::CompactionRequest;

    let server = EtcdServer::start().expect("etcd");
    seed(&server, 6_000).await;
    let (_dir, store) = store();
    let options = SourceOptions {
        prefix: b"/app/".to_vec(),
        parallel: 1,
        ..SourceOptions::default()
    };
    let source = source_from_url(&server.url(), &options).expect("source");
    // The snapshot's revision is chosen and its first pages are read ahead...
    let extraction = source
        .open(Arc::new(Progress::default()))
        .await
        .expect("opens");
    // ...then the cluster moves on and compacts past it.
    let mut client = kv(&server).await;
    put(&client, b"/app/late", b"after the snapshot", 0).await;
    let current = dump(&server, b"/app/late", FerryKeys::Included).await[0].mod_revision;
    client
        .compact(CompactionRequest {
            revision: current,
            physical: true,
        })
        .await
        .expect("compact");
    let error = write_backup(
        &store,
        extraction,
        ExtractOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .expect_err("the compaction is caught");
    let message = error.to_string();
    assert!(
        message.contains("compacted") && message.contains("run the extract again"),
        "{message}"
    );
    assert_eq!(error.kind(), ferry_engine::ErrorKind::Source);
    assert!(
        ferry_engine::backup::find_backup(&store, None)
            .await
            .is_err(),
        "no backup was sealed"
    );
}

/// An `etcd.kv` op built by hand, as a live stream carries it.
fn kv_op(
    seq: u64,
    txn: u64,
    txn_last: bool,
    method: &str,
    key: &str,
    value: &str,
) -> ferry_engine::Op {
    ferry_engine::Op {
        seq,
        position: 1000 + seq,
        txn,
        txn_last,
        kind: bytes::Bytes::from_static(b"etcd.kv"),
        key: bytes::Bytes::copy_from_slice(key.as_bytes()),
        method: bytes::Bytes::copy_from_slice(method.as_bytes()),
        body: bytes::Bytes::copy_from_slice(value.as_bytes()),
        ..ferry_engine::Op::default()
    }
}

fn live_stream(stream_id: &str) -> ferry_engine::adapters::StreamInfo {
    ferry_engine::adapters::StreamInfo {
        stream_id: stream_id.to_owned(),
        source_identity: Some("0123456789abcdef".to_owned()),
        ..ferry_engine::adapters::StreamInfo::default()
    }
}

fn live_sink(
    server: &EtcdServer,
    options: EtcdSinkOptions,
) -> Box<dyn ferry_engine::adapters::Sink> {
    Box::new(EtcdSink::new(
        EtcdConnection::from_url(&server.url(), None).expect("url"),
        options,
    ))
}

/// The checkpoint of `stream_id` in `server`, as an agent reads it, and the
/// epoch stored there.
async fn stored_checkpoint(
    server: &EtcdServer,
    stream_id: &str,
) -> (Option<ferry_engine::adapters::etcd::Checkpoint>, u64) {
    ferry_engine::adapters::etcd::read_checkpoint(
        &ferry_engine::adapters::etcd::EtcdConnection::from_url(&server.url(), None).expect("url"),
        stream_id,
    )
    .await
    .expect("read checkpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_and_source_transactions_apply_whole_and_in_order() {
    let target = EtcdServer::start().expect("target etcd");
    // Txns of 3 ops beside the checkpoint, 2 in flight; each apply returns
    // once what it took in is in the target (as the live target agent's).
    let options = EtcdSinkOptions {
        max_txn_ops: 4,
        txns_in_flight: 2,
        durable_each_apply: true,
        ..EtcdSinkOptions::default()
    };
    let mut sink = live_sink(&target, options.clone());
    assert_eq!(
        sink.begin(&live_stream("live-1")).await.expect("begin"),
        None
    );
    sink.apply(vec![
        kv_op(1, 0, true, "Put", "/live/a", "a1"),
        kv_op(2, 0, true, "Put", "/live/x", "x1"),
        // A source transaction of 3: it does not fit beside the 2 pending
        // ops, so they go first and it goes whole into the next Txn.
        kv_op(3, 7, false, "Put", "/live/b", "b1"),
        kv_op(4, 7, false, "Put", "/live/c", "c1"),
    ])
    .await
    .expect("apply, a transaction left open");
    // At the batch boundary nothing of the open transaction is in the
    // target, so a kill here leaves none of it: the checkpoint is before it.
    assert_eq!(get(&target, "/live/a", 0).await.expect("a").value, b"a1");
    assert!(
        get(&target, "/live/b", 0).await.is_none(),
        "b committed early"
    );
    assert!(
        get(&target, "/live/c", 0).await.is_none(),
        "c committed early"
    );
    let (checkpoint, _) = stored_checkpoint(&target, "live-1").await;
    assert_eq!(
        checkpoint.expect("a checkpoint").applied_through_seq,
        2,
        "the checkpoint stops before the open transaction"
    );
    // Its last op comes in the next batch.
    sink.apply(vec![
        kv_op(5, 7, true, "Delete", "/live/a", ""),
        // /live/a again: a Txn cannot name it twice, so a new Txn begins.
        kv_op(6, 0, true, "Put", "/live/a", "a2"),
        kv_op(7, 9, false, "Put", "/live/d", "d1"),
        kv_op(8, 9, true, "Delete", "/live/x", ""),
    ])
    .await
    .expect("apply");

    let (b, c) = (
        get(&target, "/live/b", 0).await.expect("b"),
        get(&target, "/live/c", 0).await.expect("c"),
    );
    assert_eq!(
        b.mod_revision, c.mod_revision,
        "one source transaction, one etcd Txn"
    );
    // Its delete too: /live/a existed just before that revision, and not at it.
    assert_eq!(
        value_at_revision(&target, "/live/a", b.mod_revision - 1).await,
        Some(b"a1".to_vec())
    );
    assert_eq!(
        value_at_revision(&target, "/live/a", b.mod_revision).await,
        None,
        "the delete of seq 5 took effect in the same Txn as seq 3 and 4"
    );
    let a = get(&target, "/live/a", 0).await.expect("a");
    assert_eq!(a.value, b"a2");
    assert_eq!(a.version, 1, "deleted in seq 5, then put again");
    assert!(
        a.create_revision > b.mod_revision,
        "the put of seq 6 came after the transaction that deleted /live/a"
    );
    let d = get(&target, "/live/d", 0).await.expect("d");
    assert!(
        get(&target, "/live/x", 0).await.is_none(),
        "deleted in the same Txn as /live/d was put"
    );
    assert!(d.mod_revision >= a.mod_revision, "in order");

    // A source transaction larger than a Txn holds beside the checkpoint.
    let error = sink
        .apply(vec![
            kv_op(9, 11, false, "Put", "/live/e", "e"),
            kv_op(10, 11, false, "Put", "/live/f", "f"),
            kv_op(11, 11, false, "Put", "/live/g", "g"),
            kv_op(12, 11, true, "Put", "/live/h", "h"),
        ])
        .await
        .expect_err("too large");
    let message = error.to_string();
    assert!(
        message.contains("seq 9..=12") && message.contains("--max-txn-ops"),
        "{message}"
    );
    assert_eq!(error.kind(), ferry_engine::ErrorKind::Target);
    assert!(get(&target, "/live/e", 0).await.is_none(), "none of it");
    let (checkpoint, epoch) = stored_checkpoint(&target, "live-1").await;
    assert_eq!(epoch, 0);
    assert_eq!(
        checkpoint.expect("a checkpoint").applied_through_seq,
        8,
        "the checkpoint covers what is in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_keep_each_keys_ops_in_order_and_resume_without_reapplying() {
    let target = EtcdServer::start().expect("target etcd");
    // Txns of 2 ops beside the checkpoint on 3 lanes: a key written again
    // while its first Txn may be in flight.
    let options = EtcdSinkOptions {
        max_txn_ops: 3,
        lanes: 3,
        durable_each_apply: false,
        ..EtcdSinkOptions::default()
    };
    let mut ops = Vec::new();
    for round in 0..40u64 {
        let seq = ops.len() as u64 + 1;
        ops.push(kv_op(
            seq,
            0,
            true,
            "Put",
            "/lanes/hot",
            &format!("v{round}"),
        ));
        ops.push(kv_op(
            seq + 1,
            0,
            true,
            "Put",
            &format!("/lanes/k{round:02}"),
            "x",
        ));
        if round % 10 == 5 {
            ops.push(kv_op(seq + 2, 0, true, "Delete", "/lanes/gone", ""));
        } else {
            ops.push(kv_op(
                seq + 2,
                0,
                true,
                "Put",
                "/lanes/gone",
                &format!("g{round}"),
            ));
        }
    }
    let total = ops.len() as u64;
    // The first run stops after 70 ops without finishing (as a killed one
    // would), once its Txns are in: the lanes' keys remain.
    let mut first = live_sink(
        &target,
        EtcdSinkOptions {
            durable_each_apply: true,
            ..options.clone()
        },
    );
    assert_eq!(
        first.begin(&live_stream("lanes-1")).await.expect("begin"),
        None
    );
    for chunk in ops[..70].chunks(20) {
        first.apply(chunk.to_vec()).await.expect("apply");
    }
    drop(first);
    let lane_keys = dump(
        &target,
        b"__ferry__/checkpoints/lanes-1/lanes/",
        FerryKeys::Included,
    )
    .await;
    assert!(!lane_keys.is_empty(), "lanes 1 and 2 wrote their keys");
    let hot_before = get(&target, "/lanes/hot", 0).await.expect("hot");

    // The second run resumes with 2 lanes; the pipeline hands it the ops
    // after the contiguous point, the sink skips those a lane applied.
    let mut second = live_sink(
        &target,
        EtcdSinkOptions {
            lanes: 2,
            ..options.clone()
        },
    );
    let resume = second
        .begin(&live_stream("lanes-1"))
        .await
        .expect("begin")
        .expect("resumes");
    assert_eq!(resume, 70, "every op the first run sent is in");
    second
        .apply(ops[resume as usize..].to_vec())
        .await
        .expect("apply the rest");
    second.finish().await.expect("finish");

    let hot = get(&target, "/lanes/hot", 0).await.expect("hot");
    assert_eq!(hot.value, b"v39", "the last put of the key wins");
    assert_eq!(hot.version, 40, "each put of the key applied once");
    assert!(hot.version > hot_before.version);
    let gone = get(&target, "/lanes/gone", 0).await.expect("gone");
    assert_eq!(gone.value, b"g39");
    assert_eq!(gone.version, 4, "put 4 times since its last delete");
    for round in 0..40 {
        let key = get(&target, &format!("/lanes/k{round:02}"), 0)
            .await
            .expect("key");
        assert_eq!(key.version, 1, "/lanes/k{round:02} applied once");
    }
    let checkpoints = dump(
        &target,
        b"__ferry__/checkpoints/lanes-1",
        FerryKeys::Included,
    )
    .await;
    assert_eq!(
        checkpoints.len(),
        1,
        "the lanes' keys are deleted at the end"
    );
    let (checkpoint, _) = stored_checkpoint(&target, "lanes-1").await;
    let checkpoint = checkpoint.expect("a checkpoint");
    assert!(checkpoint.complete);
    assert_eq!(checkpoint.applied_through_seq, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_txn_applied_ahead_of_an_earlier_one_is_skipped_on_resume() {
    let target = EtcdServer::start().expect("target etcd");
    let ops: Vec<_> = (1..=6)
        .map(|seq| kv_op(seq, 0, true, "Put", &format!("/ahead/k{seq}"), "v"))
        .collect();
    // What a restore in 2 lanes of 2-op Txns leaves when killed after its
    // third Txn (seq 5..=6, lane 0, sent once everything through 2 was in)
    // took effect and its second (seq 3..=4, lane 1) never did.
    let client = kv(&target).await;
    for key in ["/ahead/k1", "/ahead/k2", "/ahead/k5", "/ahead/k6"] {
        put(&client, key.as_bytes(), b"v", 0).await;
    }
    let lane_0 = serde_json::json!({
        "stream_id": "ahead-1",
        "source_identity": "0123456789abcdef",
        "applied_through_seq": 2,
        "applied_through_position": 1002,
        "epoch": 0,
        "complete": false,
        "writer": "killed",
        "lane_txn": {"lane": 0, "first_seq": 5, "last_seq": 6, "last_position": 1006},
    });
    put(
        &client,
        b"__ferry__/checkpoints/ahead-1",
        lane_0.to_string().as_bytes(),
        0,
    )
    .await;

    let mut sink = live_sink(
        &target,
        EtcdSinkOptions {
            max_txn_ops: 3,
            lanes: 2,
            durable_each_apply: false,
            ..EtcdSinkOptions::default()
        },
    );
    let resume = sink
        .begin(&live_stream("ahead-1"))
        .await
        .expect("begin")
        .expect("resumes");
    assert_eq!(resume, 2, "everything through 2 is in, 3 and 4 are not");
    sink.apply(ops[2..].to_vec()).await.expect("apply");
    sink.finish().await.expect("finish");
    for seq in 1..=6 {
        let key = get(&target, &format!("/ahead/k{seq}"), 0)
            .await
            .unwrap_or_else(|| panic!("/ahead/k{seq} restored"));
        assert_eq!(key.version, 1, "/ahead/k{seq} applied once");
    }
    let (checkpoint, _) = stored_checkpoint(&target, "ahead-1").await;
    let checkpoint = checkpoint.expect("a checkpoint");
    assert!(checkpoint.complete);
    assert_eq!(checkpoint.applied_through_seq, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_with_an_older_epoch_is_refused_at_begin() {
    let target = EtcdServer::start().expect("target etcd");
    let newer = EtcdSinkOptions {
        epoch: 5,
        ..EtcdSinkOptions::default()
    };
    let mut sink = live_sink(&target, newer);
    sink.begin(&live_stream("live-2")).await.expect("begin");
    sink.apply(vec![kv_op(1, 0, true, "Put", "/live/a", "5")])
        .await
        .expect("apply");
    assert_eq!(
        get(&target, "__ferry__/epoch", 0)
            .await
            .expect("epoch key")
            .value,
        b"5"
    );

    for stream in ["live-2", "another-stream"] {
        let mut older = live_sink(
            &target,
            EtcdSinkOptions {
                epoch: 3,
                ..EtcdSinkOptions::default()
            },
        );
        let error = older
            .begin(&live_stream(stream))
            .await
            .expect_err("an older attempt is refused");
        let message = error.to_string();
        assert!(
            message.contains("epoch) 5") && message.contains("this one's 3"),
            "{message}"
        );
        assert_eq!(error.kind(), ferry_engine::ErrorKind::Target);
    }
    assert_eq!(
        get(&target, "__ferry__/epoch", 0)
            .await
            .expect("epoch key")
            .value,
        b"5",
        "the epoch only grows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_epoch_takes_the_stream_over_and_fences_the_older_sink() {
    let target = EtcdServer::start().expect("target etcd");
    let stream = live_stream("live-3");
    let mut first = live_sink(
        &target,
        EtcdSinkOptions {
            epoch: 1,
            ..EtcdSinkOptions::default()
        },
    );
    first.begin(&stream).await.expect("begin");
    first
        .apply(
            (1..=10)
                .map(|seq| kv_op(seq, 0, true, "Put", &format!("/live/{seq:02}"), "first"))
                .collect(),
        )
        .await
        .expect("apply");

    // A newer attempt takes over where the first one got to.
    let mut second = live_sink(
        &target,
        EtcdSinkOptions {
            epoch: 2,
            ..EtcdSinkOptions::default()
        },
    );
    assert_eq!(second.begin(&stream).await.expect("begin"), Some(10));
    second
        .apply(
            (11..=20)
                .map(|seq| kv_op(seq, 0, true, "Put", &format!("/live/{seq:02}"), "second"))
                .collect(),
        )
        .await
        .expect("apply");

    // The first one still holds its connection and goes on: refused whole.
    let error = first
        .apply(
            (11..=15)
                .map(|seq| kv_op(seq, 0, true, "Put", &format!("/live/{seq:02}"), "stale"))
                .chain([kv_op(16, 0, true, "Put", "/live/stale-only", "stale")])
                .collect(),
        )
        .await
        .expect_err("fenced");
    let message = error.to_string();
    assert!(
        message.contains("epoch) 2") && message.contains("this one's 1"),
        "{message}"
    );
    for seq in 11..=20 {
        let kv = get(&target, &format!("/live/{seq:02}"), 0)
            .await
            .expect("key");
        assert_eq!(kv.value, b"second", "key {seq} is the newer attempt's");
        assert_eq!(kv.version, 1, "key {seq} written once");
    }
    assert!(
        get(&target, "/live/stale-only", 0).await.is_none(),
        "nothing of the stale batch landed"
    );
    let (checkpoint, epoch) = stored_checkpoint(&target, "live-3").await;
    let checkpoint = checkpoint.expect("a checkpoint");
    assert_eq!(epoch, 2);
    assert_eq!((checkpoint.applied_through_seq, checkpoint.epoch), (20, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_out_of_space_stops_the_restore_and_the_same_command_resumes_once_freed() {
    // 8,000 keys of 1,000 bytes to restore into an etcd whose 16 MiB quota
    // already holds 12 MB of other data. etcd counts what it has committed
    // (every 100 ms), so writes of the interval slip past the quota: the
    // margin on both sides is megabytes.
    let source = EtcdServer::start().expect("source etcd");
    let client = kv(&source).await;
    for index in 0..8_000 {
        let key = format!("/app/items/{index:06}");
        put(&client, key.as_bytes(), &value(index, 1_000), 0).await;
    }
    let target = EtcdServer::start_with(&EtcdOptions {
        quota_backend_bytes: Some(16 * 1024 * 1024),
        ..EtcdOptions::default()
    })
    .expect("target etcd with a small quota");
    let mut target_client = kv(&target).await;
    for index in 0..120 {
        let key = format!("/ballast/{index:03}");
        put(&target_client, key.as_bytes(), &value(index, 100 * 1024), 0).await;
    }
    let (_dir, store_url) = extract_app_with_ferry(&source);

    let restore = [
        "restore",
        "--from",
        &store_url,
        "--target",
        &target.url(),
        "--quiet",
    ];
    let full = ferry(&restore);
    let stderr = String::from_utf8_lossy(&full.stderr);
    assert_eq!(full.status.code(), Some(6), "a target error: {stderr}");
    for says in [
        "is out of space",
        "database space exceeded",
        "--quota-backend-bytes",
        "etcdctl alarm disarm",
        "which took no effect",
        "run the same command again",
    ] {
        assert!(stderr.contains(says), "says {says:?}: {stderr}");
    }
    assert!(
        !stderr.contains("too large"),
        "NOSPACE is not a request too large: {stderr}"
    );
    let before_freeing = dump(&target, b"/app/", FerryKeys::Included).await.len();
    assert!(
        before_freeing > 0 && before_freeing < 8_000,
        "the quota stops the restore part way: {before_freeing} of 8,000 keys in"
    );

    // What the message says to do: free space, disarm, the same command.
    etcdctl_ok(&target, &["del", "--prefix", "/ballast/"], None);
    let revision = target_client
        .range(RangeRequest {
            key: b"/".to_vec(),
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner()
        .header
        .expect("a header")
        .revision;
    etcdctl_ok(
        &target,
        &["compact", &revision.to_string(), "--physical"],
        None,
    );
    etcdctl_ok(&target, &["defrag"], None);
    etcdctl_ok(&target, &["alarm", "disarm"], None);
    let resumed = ferry(&restore);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    // Every key once (etcd version 1), none missing: the checkpoint written
    // with each Txn told the resume exactly what was in.
    same_data(
        &dump(&source, b"/app/", FerryKeys::Included).await,
        &dump(&target, b"/app/", FerryKeys::Included).await,
    );
    eprintln!("the quota stopped the restore at {before_freeing} of 8,000 keys");
}

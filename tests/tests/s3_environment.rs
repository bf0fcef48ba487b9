//! `BackupStore::open("s3://BUCKET/PREFIX")` the way the `ferry` command
//! uses it: endpoint, credentials and region from the `AWS_*` environment.
//!
//! The environment of a process is shared by all its threads, and setting it
//! is `unsafe` (and forbidden here), so the test runs its body in a child
//! process: this same test binary, re-executed for this one test, with the
//! server's `AWS_*` variables set on the child alone. This file holds only
//! that test, so nothing else runs in the child.

use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use ferry_engine::Op;
use ferry_engine::adapters::Extraction;
use ferry_engine::backup::{
    ExtractOptions, RestoreOptions, find_backup, read_backup, verify_backup, write_backup,
};
use ferry_engine::manifest::SourceInfo;
use ferry_engine::progress::Progress;
use ferry_engine::segment::SegmentLimits;
use ferry_engine::store::BackupStore;
use ferry_tests::S3Server;
use futures::{StreamExt, TryStreamExt};

/// Set in the child only: the `s3://` URL it is to open.
const CHILD_STORE_URL: &str = "FERRY_TESTS_CHILD_S3_URL";
const TEST_NAME: &str = "store_opens_s3_url_from_aws_environment";
const OP_COUNT: u64 = 1_000;

fn generate_ops() -> Vec<Op> {
    (1..=OP_COUNT)
        .map(|seq| Op {
            seq,
            txn_last: true,
            kind: Bytes::from_static(b"test.item"),
            key: format!("/items/{seq:06}").into_bytes().into(),
            method: Bytes::from_static(b"Put"),
            body: format!("{{\"item\":{seq}}}").into_bytes().into(),
            content_type: Bytes::from_static(b"application/json"),
            ..Op::default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_opens_s3_url_from_aws_environment() {
    if let Ok(url) = std::env::var(CHILD_STORE_URL) {
        return child_writes_and_reads_backup(&url).await;
    }

    let server = S3Server::start().await.expect("s3s-fs starts");
    let url = server.url("from-env/backups");
    let mut child = tokio::process::Command::new(
        std::env::current_exe().expect("the test binary knows its path"),
    );
    child
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .stdin(Stdio::null());
    // Only the server's AWS settings: none of the machine's (a profile, a
    // session token) may leak in.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            child.env_remove(key);
        }
    }
    child
        .envs(server.aws_environment())
        .env(CHILD_STORE_URL, &url);
    // Awaited without blocking: the server runs on this test's runtime.
    let output = child.output().await.expect("the child test runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the child failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // A filter that matched nothing would pass having done nothing.
    assert!(
        stdout.contains("1 passed"),
        "the child did not run {TEST_NAME}:\n{stdout}\n{stderr}"
    );

    // What the child wrote through the environment is on this server, where
    // a store configured without the environment finds it.
    let store = server.backup_store("from-env/backups");
    let manifest = find_backup(&store, None)
        .await
        .expect("the child's backup is found");
    assert_eq!(manifest.totals.ops, OP_COUNT);
    assert!(
        stdout.contains(&format!("sealed backup {}", manifest.backup_id)),
        "{stdout}"
    );
    let report = verify_backup(
        &store,
        None,
        SegmentLimits::default(),
        Arc::new(Progress::default()),
    )
    .await
    .expect("verify runs");
    assert!(report.is_ok(), "{report:?}");
}

/// The child's body: everything through `BackupStore::open`.
async fn child_writes_and_reads_backup(url: &str) {
    let store = BackupStore::open(url, false).expect("the s3:// URL opens from the environment");
    assert_eq!(store.display(), url);
    let ops = generate_ops();
    let extraction = Extraction {
        info: SourceInfo {
            platform: "test".to_owned(),
            ..SourceInfo::default()
        },
        ops: futures::stream::iter(ops.chunks(100).map(<[Op]>::to_vec).collect::<Vec<_>>())
            .map(Ok)
            .boxed(),
    };
    let written = write_backup(
        &store,
        extraction,
        ExtractOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .expect("the backup is written through the environment's endpoint");
    println!("sealed backup {}", written.backup_id);

    let found = find_backup(&store, None)
        .await
        .expect("the backup is found");
    assert_eq!(found, written);
    let batches: Vec<Vec<Op>> =
        read_backup(store.clone(), Arc::new(found), RestoreOptions::default())
            .try_collect()
            .await
            .expect("the backup reads back");
    let read: Vec<Op> = batches.into_iter().flatten().collect();
    assert!(read == ops, "the ops read back differ from those written");
}

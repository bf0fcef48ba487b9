//! `ferry restore --follow` with the real binary on real etcd servers: a
//! restore started before its extract follows the backup as it is written
//! and ends equal to the source, each key put once; an extract that dies
//! stops the restore by name, and a new backup finishes the job.

use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::etcd::EtcdServer;
use ferry_tests::plane::{FerryKeys, dump, ferry_command, kv, put};
use ferry_tests::process::signal;

/// `count` keys of about 1 KiB under `/app/`, each value its own.
async fn seed(server: &EtcdServer, count: usize) {
    let client = kv(server).await;
    for index in 0..count {
        let value: Vec<u8> = (0..1_000)
            .map(|offset| ((index * 31 + offset * 7) % 251) as u8)
            .collect();
        put(
            &client,
            format!("/app/items/{index:06}").as_bytes(),
            &value,
            0,
        )
        .await;
    }
}

fn spawn(args: &[&str]) -> Child {
    ferry_command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferry starts")
}

fn finished(child: Child) -> Output {
    child.wait_with_output().expect("ferry ends")
}

fn said(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The only backup folder in the store, once it has a segment.
fn first_segment(root: &Path) -> (String, std::path::PathBuf) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "the extract stored no segment");
        if let Ok(backups) = std::fs::read_dir(root.join("backups")) {
            for backup in backups {
                let backup = backup.expect("entry").path();
                let segments = backup.join("segments");
                if let Ok(mut entries) = std::fs::read_dir(&segments)
                    && let Some(Ok(entry)) = entries.next()
                {
                    let id = backup
                        .file_name()
                        .expect("id")
                        .to_string_lossy()
                        .into_owned();
                    return (id, entry.path());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

async fn assert_same_keys_each_put_once(source: &EtcdServer, target: &EtcdServer) {
    let expected = dump(source, b"/app/", FerryKeys::Included).await;
    let restored = dump(target, b"/app/", FerryKeys::Included).await;
    assert_eq!(expected.len(), restored.len(), "as many keys");
    for (expected, restored) in expected.iter().zip(&restored) {
        assert_eq!(expected.key, restored.key);
        assert!(
            expected.value == restored.value,
            "value of {} differs",
            String::from_utf8_lossy(&expected.key)
        );
    }
    let twice: Vec<String> = restored
        .iter()
        .filter(|kv| kv.version != 1)
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    assert!(twice.is_empty(), "put more than once: {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_started_before_its_extract_follows_it_to_an_equal_target() {
    let source = EtcdServer::start().expect("source etcd");
    let target = EtcdServer::start().expect("target etcd");
    seed(&source, 30_000).await;
    let dir = tempfile::tempdir().expect("temp dir");
    // The restore comes first: the store's folder does not exist yet.
    let store_url = format!("file://{}/store", dir.path().display());
    let restore = spawn(&[
        "restore",
        "--from",
        &store_url,
        "--target",
        &target.url(),
        "--follow",
        "--output",
        "json",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let extract = spawn(&[
        "extract",
        "--source",
        &source.url(),
        "--prefix",
        "/app/",
        "--to",
        &store_url,
        "--output",
        "json",
    ]);
    let extracted = finished(extract);
    assert!(extracted.status.success(), "{}", said(&extracted));
    let restored = finished(restore);
    assert!(restored.status.success(), "{}", said(&restored));
    let extracted: serde_json::Value =
        serde_json::from_slice(&extracted.stdout).expect("extract's JSON");
    let restored: serde_json::Value =
        serde_json::from_slice(&restored.stdout).expect("restore's JSON");
    assert_eq!(restored["backup_id"], extracted["backup_id"]);
    assert_eq!(restored["ops"], 30_000);
    assert_same_keys_each_put_once(&source, &target).await;
    let checkpoints = dump(&target, b"__ferry__/checkpoints/", FerryKeys::Included).await;
    let checkpoint: serde_json::Value =
        serde_json::from_slice(&checkpoints[0].value).expect("a checkpoint");
    assert_eq!(checkpoint["complete"], true, "{checkpoint}");
    assert_eq!(checkpoint["applied_through_seq"], 30_000, "{checkpoint}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extract_that_dies_stops_a_following_restore_by_name_and_a_new_backup_finishes() {
    let source = EtcdServer::start().expect("source etcd");
    let target = EtcdServer::start().expect("target etcd");
    seed(&source, 30_000).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store_url = format!("file://{}", dir.path().display());
    let restore = spawn(&[
        "restore",
        "--from",
        &store_url,
        "--target",
        &target.url(),
        "--follow",
        // Only the extract's silent heartbeat can stop it this soon.
        "--follow-timeout",
        "600",
    ]);
    // Segments of 1 MiB: about thirty, so the extract is far from its end
    // when its first is stored.
    let extract = spawn(&[
        "extract",
        "--source",
        &source.url(),
        "--prefix",
        "/app/",
        "--to",
        &store_url,
        "--segment-bytes",
        "1048576",
        "--quiet",
    ]);
    // Frozen at its first segment, as an extract whose machine died; then
    // killed, so it never writes a manifest or a failure record.
    let (backup_id, segment) = first_segment(dir.path());
    signal(extract.id(), "-STOP");
    let stopped = finished(restore);
    signal(extract.id(), "-KILL");
    let killed = finished(extract);
    assert!(!killed.status.success(), "the extract was killed");
    let manifest = dir
        .path()
        .join("backups")
        .join(&backup_id)
        .join("manifest.json");
    assert!(
        !manifest.exists(),
        "the extract sealed its backup before it was stopped"
    );
    assert!(!stopped.status.success(), "{}", said(&stopped));
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        stderr.contains(&format!(
            "the extract writing backup {backup_id} stopped: its heartbeat has not changed"
        )),
        "{}",
        said(&stopped)
    );
    // The last segment it restored is named (the first, or a later one the
    // extract stored before it froze).
    let first_name = segment
        .file_stem()
        .and_then(|stem| stem.to_str())
        .expect("name");
    let first_name = first_name.trim_end_matches(".ops");
    assert!(stderr.contains(", after segment "), "{}", said(&stopped));
    assert!(
        stderr.contains(first_name) || !stderr.contains("after its start record"),
        "{}",
        said(&stopped)
    );
    let partial = dump(&target, b"/app/", FerryKeys::Included).await.len();
    assert!(
        partial > 0 && partial < 30_000,
        "the target holds a prefix: {partial} keys"
    );

    // Run again, it resumes the dead backup and stops the same way.
    let again = finished(spawn(&[
        "restore",
        "--from",
        &store_url,
        "--backup",
        &backup_id,
        "--target",
        &target.url(),
        "--follow",
        "--follow-timeout",
        "1",
    ]));
    assert!(!again.status.success(), "{}", said(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("got no new segment and no manifest"),
        "{}",
        said(&again)
    );
    // It may apply what the first run held unflushed when it stopped, no more
    // than the segments stored.
    let resumed = dump(&target, b"/app/", FerryKeys::Included).await.len();
    assert!(
        resumed >= partial && resumed < 30_000,
        "{partial} keys, then {resumed}"
    );
    // A new backup, followed (the dead one is passed over: the new one
    // started after the restore did) onto the target holding the prefix.
    let restore = spawn(&[
        "restore",
        "--from",
        &store_url,
        "--target",
        &target.url(),
        "--follow",
        "--follow-timeout",
        "60",
        "--allow-nonempty",
        "--quiet",
    ]);
    let extracted = finished(spawn(&[
        "extract",
        "--source",
        &source.url(),
        "--prefix",
        "/app/",
        "--to",
        &store_url,
        "--quiet",
    ]));
    assert!(extracted.status.success(), "{}", said(&extracted));
    let restored = finished(restore);
    assert!(restored.status.success(), "{}", said(&restored));
    let expected = dump(&source, b"/app/", FerryKeys::Included).await;
    let now = dump(&target, b"/app/", FerryKeys::Included).await;
    assert_eq!(expected.len(), now.len());
    for (expected, now) in expected.iter().zip(&now) {
        assert_eq!(expected.key, now.key);
        assert!(expected.value == now.value);
    }
}

//! Issue 10: a cutover safe when one process fails. The old plane's fence
//! record decides, and the store enforces the fence: a gateway restarted
//! with its old flags, or one the migration was never told of, cannot
//! write to the fenced plane; a driver killed while the old plane is fenced
//! leaves no write refused for long, with no command at all.

use std::time::{Duration, Instant};

use ferry_engine::adapters::etcd::{
    EtcdConnection, FenceMove, FenceOutcome, fence_alarm_member, move_fence,
};
use ferry_proto::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use ferry_proto::etcd::etcdserverpb::{AlarmRequest, AlarmType, RangeRequest, alarm_request};
use ferry_tests::etcd::EtcdServer;
use ferry_tests::live::{
    Cluster, kv, migrate_report, put_at, spawn_ferry, value_at, wait_for_phase, with_options,
};
use ferry_tests::plane::{etcdctl, etcdctl_binary, ferry_json};
use ferry_tests::process::{FerryProcess, signal};

fn gateway_in_front_of(upstream: &str) -> FerryProcess {
    FerryProcess::start(
        &["gateway", "--listen", "127.0.0.1:0", "--upstream", upstream],
        &[],
    )
    .expect("gateway")
}

/// Item 1: after a switch, a gateway started again with the flags it was
/// first started with (`--upstream OLD`) follows the fence record to the new
/// plane, for reads and writes; a gateway the migration was never told of
/// reads the record by itself and follows it (its reads come from the new
/// plane before it writes anything), and its writes land in the new plane.
/// Nothing reaches the old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_that_missed_the_switch_never_write_to_the_fenced_plane() {
    let cluster = Cluster::start().await;
    // A replica in front of the old plane that `ferry migrate` does not know.
    let unlisted = gateway_in_front_of(&cluster.old.url());
    put_at(&unlisted.field("listen"), "/app/before", "old")
        .await
        .expect("a write before the migration");

    let status_file = tempfile::NamedTempFile::new().expect("status file");
    let migrate = spawn_ferry(&cluster.migrate_args(status_file.path()));
    let (report, code, stderr) = migrate_report(migrate, &cluster).await;
    assert_eq!(code, Some(0), "{report}\n{stderr}");
    assert_eq!(report["outcome"], "switched", "{report}");

    // Restarted with its old flags.
    let restarted = gateway_in_front_of(&cluster.old.url());
    assert_eq!(
        restarted.field("upstream"),
        cluster.new.url(),
        "it forwards to the plane the record names"
    );
    put_at(&restarted.field("listen"), "/app/restarted", "1")
        .await
        .expect("a write through the restarted gateway");
    assert_eq!(
        value_at(&restarted.field("listen"), "/app/before").await,
        Some(b"old".to_vec()),
        "reads come from the new plane, which holds the copy"
    );
    // The replica nobody told reads the fence record by itself and
    // follows: it serves the new plane's data before any write of its own.
    let unlisted_reads_new = async {
        while value_at(&unlisted.field("listen"), "/app/restarted").await != Some(b"1".to_vec()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), unlisted_reads_new)
        .await
        .expect("the unlisted replica follows the switch by itself");
    // Its writes go there too.
    put_at(&unlisted.field("listen"), "/app/unlisted", "2")
        .await
        .expect("the write follows the record to the new plane");

    let old = cluster.old.endpoint();
    let new = cluster.new.endpoint();
    for (key, value) in [("/app/restarted", "1"), ("/app/unlisted", "2")] {
        assert_eq!(
            value_at(&old, key).await,
            None,
            "{key} reached the fenced plane"
        );
        assert_eq!(
            value_at(&new, key).await,
            Some(value.as_bytes().to_vec()),
            "{key}"
        );
    }
    assert!(value_at(&old, "__ferry__/fenced").await.is_some());
    // Nor does a client that goes straight to the old etcd: its write
    // alarm refuses Puts from anyone, and it still serves reads.
    let refused = etcdctl(&old, &["put", "/app/straight", "3"], None);
    assert!(!refused.status.success(), "a Put reached the fenced etcd");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("database space exceeded"),
        "{refused:?}"
    );
    let read = etcdctl(&old, &["get", "/app/before", "--print-value-only"], None);
    assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), "old");
    assert_eq!(value_at(&old, "/app/straight").await, None);
}

/// Item 1, the store's half: once fenced, the old etcd refuses a Put from a
/// client nobody here wrote (etcdctl); a fence whose write alarm an
/// operator lowered (`etcdctl alarm disarm`, after which a Put lands past
/// F) is never committed, nor answered again as fenced: the migration must
/// roll back, and the unfence leaves the plane writable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_whose_write_alarm_was_lowered_is_never_committed() {
    let etcd = EtcdServer::start().expect("etcd starts");
    let endpoint = etcd.endpoint();
    let connection = EtcdConnection::from_url(&etcd.url(), None).expect("url");
    let fence = FenceMove::Fence {
        epoch: 3,
        successor: "etcd://127.0.0.1:1".to_owned(),
    };
    let FenceOutcome::Done {
        revision: fenced_at,
    } = move_fence(&connection, &fence).await.expect("fence")
    else {
        panic!("an empty plane fences");
    };
    let refused = etcdctl(&endpoint, &["put", "/k", "after-the-fence"], None);
    assert!(!refused.status.success(), "the fenced etcd took a Put");
    let alarms = etcdctl(&endpoint, &["alarm", "list"], None);
    assert!(
        String::from_utf8_lossy(&alarms.stdout).contains("NOSPACE"),
        "{alarms:?}"
    );
    assert!(
        etcdctl(&endpoint, &["alarm", "disarm"], None)
            .status
            .success()
    );
    let landed = etcdctl(&endpoint, &["put", "/k", "after-the-fence"], None);
    assert!(landed.status.success(), "{landed:?}");

    let commit = FenceMove::Commit {
        epoch: 3,
        successor_position_offset: fenced_at + 1,
    };
    for wanted in [&commit, &fence] {
        match move_fence(&connection, wanted).await.expect("answers") {
            FenceOutcome::Refused { reason, .. } => {
                assert!(reason.contains("no longer raised"), "{reason}");
            }
            done => panic!("{wanted:?} went through without its alarm: {done:?}"),
        }
    }
    let record = value_at(&endpoint, "__ferry__/fence")
        .await
        .expect("record");
    assert!(
        !String::from_utf8_lossy(&record).contains("\"switched\":true"),
        "{}",
        String::from_utf8_lossy(&record)
    );
    assert!(matches!(
        move_fence(&connection, &FenceMove::Unfence { epoch: 3 }).await,
        Ok(FenceOutcome::Done { .. })
    ));
    assert_eq!(value_at(&endpoint, "__ferry__/fenced").await, None);
    assert!(
        etcdctl(&endpoint, &["put", "/k", "unfenced"], None)
            .status
            .success()
    );
}

/// A migration that raised its write alarm and died before it fenced (the
/// source agent killed between the two) leaves Puts refused and the record
/// unfenced. A gateway tells its clients so, and that `ferry migrate abort`
/// lowers it; `migrate status` shows it; the abort lowers it (and only it:
/// the alarm of a later attempt stays), and writes flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_alarm_left_by_a_dead_attempt_is_shown_and_lowered_by_abort() {
    let cluster = Cluster::start().await;
    let listen = cluster.gateway.field("listen");
    put_at(&listen, "/app/before", "1").await.expect("put");
    let old = cluster.old.endpoint();
    let mut maintenance = MaintenanceClient::connect(format!("http://{old}"))
        .await
        .expect("connect");
    maintenance
        .alarm(AlarmRequest {
            action: alarm_request::AlarmAction::Activate as i32,
            member_id: fence_alarm_member(6),
            alarm: AlarmType::Nospace as i32,
        })
        .await
        .expect("raise");

    let refused = put_at(&listen, "/app/during", "2")
        .await
        .expect_err("the alarm refuses Puts");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("epoch 6") && refused.message().contains("abort"),
        "{refused:?}"
    );

    let source_agent = cluster.source_agent.field("listen");
    let admin = cluster.gateway.field("admin");
    let decide = |command: &str| {
        ferry_json(&[
            "--output",
            "json",
            "migrate",
            command,
            "--source-agent",
            &source_agent,
            "--gateway",
            &admin,
        ])
    };
    let (status, code) = decide("status");
    assert_eq!(code, 0, "{status}");
    assert_eq!(status["write_alarms"], serde_json::json!([6]), "{status}");
    assert!(
        status["record"].as_str().unwrap_or("").contains("abort"),
        "{status}"
    );
    let (aborted, code) = decide("abort");
    assert_eq!(code, 0, "{aborted}");
    assert_eq!(aborted["outcome"], "rolled back", "{aborted}");
    assert!(aborted["status"].get("write_alarms").is_none(), "{aborted}");
    put_at(&listen, "/app/after", "3")
        .await
        .expect("writes flow once the alarm is lowered");
    assert_eq!(value_at(&old, "/app/after").await, Some(b"3".to_vec()));
    assert_eq!(value_at(&old, "/app/during").await, None);
}

/// Items 2 and 3: the driver is killed (-9) while the old plane is fenced
/// and the target drains (the target agent stopped, so the cutover waits
/// there). No command is run: the gateway's hold lapses with the driver's
/// stream, it unfences the old plane by the record's compare-and-swap, and
/// the held write goes on there. `migrate status` reads that from the
/// plane and the gateway, and `migrate abort` then has nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_killed_while_the_old_plane_is_fenced_leaves_no_plane_stuck() {
    let cluster = Cluster::start().await;
    let listen = cluster.gateway.field("listen");
    put_at(&listen, "/app/before", "1").await.expect("put");

    let status_file = tempfile::NamedTempFile::new().expect("status file");
    let args = with_options(
        cluster.migrate_args(status_file.path()),
        // Following lasts 3 s, long enough to stop the target agent; the
        // cutover starts then whatever the lag.
        &[
            "--max-pause",
            "60s",
            "--follow-at-least",
            "3s",
            "--max-lag",
            "1000000000",
        ],
    );
    // A writer goes on meanwhile, so F is past what the stopped target holds.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn(ferry_tests::live::writer(
        0,
        listen.clone(),
        stop.clone(),
        Duration::from_millis(5),
    ));
    let mut migrate = spawn_ferry(&args);
    wait_for_phase(status_file.path(), "following").await;
    signal(cluster.target_agent.pid(), "-STOP");
    wait_for_phase(status_file.path(), "draining").await;
    // Fenced now: a write through the gateway is held.
    let held = {
        let listen = listen.clone();
        tokio::spawn(async move { put_at(&listen, "/app/held", "2").await })
    };
    let record = value_at(&cluster.old.endpoint(), "__ferry__/fence")
        .await
        .expect("a fence record");
    assert!(
        String::from_utf8_lossy(&record).contains("\"fenced\":true"),
        "{}",
        String::from_utf8_lossy(&record)
    );
    let killed = Instant::now();
    migrate.start_kill().expect("kill -9 the driver");
    migrate.wait().await.expect("the driver is gone");
    held.await
        .expect("joins")
        .expect("the held write goes on once the gateway settles the lapsed hold");
    let settled = killed.elapsed();
    assert!(
        settled < Duration::from_secs(30),
        "settled after {settled:?}, well before the 60 s pause"
    );
    signal(cluster.target_agent.pid(), "-CONT");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.expect("the writer ends");
    assert!(
        writes.iter().any(|write| write.answer.is_ok()),
        "the writer wrote through the gateway"
    );
    put_at(&listen, "/app/after", "3")
        .await
        .expect("writes flow");
    let old = cluster.old.endpoint();
    assert_eq!(value_at(&old, "/app/held").await, Some(b"2".to_vec()));
    assert_eq!(value_at(&old, "/app/after").await, Some(b"3".to_vec()));
    assert_eq!(value_at(&old, "__ferry__/fenced").await, None, "unfenced");
    eprintln!("writes resumed {settled:?} after the driver was killed");

    let source_agent = cluster.source_agent.field("listen");
    let admin = cluster.gateway.field("admin");
    let (status, code) = ferry_json(&[
        "--output",
        "json",
        "migrate",
        "status",
        "--source-agent",
        &source_agent,
        "--gateway",
        &admin,
    ]);
    assert_eq!(code, 0, "{status}");
    assert_eq!(status["decision"], "unfenced", "{status}");
    assert_eq!(status["gateways"][0]["holding"], false, "{status}");
    assert_eq!(status["gateways"][0]["upstream_url"], cluster.old.url());
    for _ in 0..2 {
        let (aborted, code) = ferry_json(&[
            "--output",
            "json",
            "migrate",
            "abort",
            "--source-agent",
            &source_agent,
            "--gateway",
            &admin,
        ]);
        assert_eq!(code, 0, "{aborted}");
        assert_eq!(aborted["outcome"], "nothing to do", "{aborted}");
    }
}

/// Item 7: revisions never go backwards, and no watcher waits in silence.
/// The old etcd is far ahead in revisions (a thousand writes to one key
/// before the migration), the new one starts low after the copy. Through
/// the gateway, every revision after the switch is above every revision
/// before it, keys copied included; an `etcdctl watch` open across the
/// switch resumes from an old revision and is told "compacted" (clients
/// list again), never left waiting; a watch from a revision after the
/// switch sees the later writes; a Range at an old revision is compacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_only_grow_across_the_switch_and_watchers_are_told() {
    let cluster = Cluster::start().await;
    let listen = cluster.gateway.field("listen");
    for index in 0..1000 {
        put_at(&listen, "/app/busy", &index.to_string())
            .await
            .expect("put");
    }
    let mut watcher = std::process::Command::new(etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &listen, "watch", "--prefix", "/app/"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("etcdctl watch");
    // The watcher sees a write before the switch (put until it does: it
    // may not be watching yet).
    let stdout = watcher.stdout.take().expect("stdout");
    let (lines, mut seen) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    'seen: for attempt in 0.. {
        put_at(&listen, "/app/watched", &format!("before-{attempt}"))
            .await
            .expect("put");
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_millis(200), seen.recv()).await
        {
            if line.starts_with("before-") {
                break 'seen;
            }
        }
    }
    let before = kv(&listen)
        .await
        .range(RangeRequest {
            key: b"/app/watched".to_vec(),
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner();
    let seen_before = before.header.expect("header").revision;

    let status_file = tempfile::NamedTempFile::new().expect("status file");
    let migrate = spawn_ferry(&cluster.migrate_args(status_file.path()));
    let (report, code, stderr) = migrate_report(migrate, &cluster).await;
    assert_eq!(code, Some(0), "{report}\n{stderr}");
    let fenced = report["fenced_position"].as_i64().expect("F");
    assert!(fenced >= seen_before, "F {fenced} after {seen_before}");
    let (_, new_raw) = ferry_tests::live::cluster_id_and_revision(&cluster.new.endpoint()).await;
    assert!(
        new_raw < fenced,
        "the new etcd starts lower ({new_raw}) than the old one's F ({fenced}): the case to test"
    );

    put_at(&listen, "/app/after", "1")
        .await
        .expect("a write after the switch");
    let after = kv(&listen)
        .await
        .range(RangeRequest {
            key: b"/app/".to_vec(),
            range_end: b"/app0".to_vec(),
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner();
    let header = after.header.expect("header").revision;
    assert!(header > fenced, "header {header} after F {fenced}");
    for kv in &after.kvs {
        assert!(
            kv.mod_revision > fenced && kv.create_revision > fenced,
            "{} shows revisions {}/{} not above F {fenced}",
            String::from_utf8_lossy(&kv.key),
            kv.create_revision,
            kv.mod_revision
        );
    }
    // A gateway started in front of the new etcd itself (its operator
    // changed --upstream) shows the same revisions: the new etcd keeps
    // the offset.
    let in_front_of_new = gateway_in_front_of(&cluster.new.url());
    let through_new = kv(&in_front_of_new.field("listen"))
        .await
        .range(RangeRequest {
            key: b"/app/after".to_vec(),
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert!(
        through_new.header.expect("header").revision >= header,
        "a gateway in front of the new etcd shows revisions below the switched one's {header}"
    );
    assert_eq!(
        through_new.kvs[0].mod_revision,
        after
            .kvs
            .iter()
            .find(|kv| kv.key == b"/app/after")
            .expect("/app/after")
            .mod_revision
    );
    // A Range at a revision before the switch: etcd's compacted error.
    let old_read = kv(&listen)
        .await
        .range(RangeRequest {
            key: b"/app/watched".to_vec(),
            revision: seen_before,
            ..RangeRequest::default()
        })
        .await
        .expect_err("history before the switch");
    assert!(old_read.message().contains("compacted"), "{old_read:?}");

    // The watcher open across the switch was told, not left waiting.
    let exited = tokio::task::spawn_blocking(move || {
        for _ in 0..600 {
            if let Ok(Some(status)) = watcher.try_wait() {
                let mut stderr = String::new();
                use std::io::Read;
                let _ = watcher
                    .stderr
                    .take()
                    .expect("stderr")
                    .read_to_string(&mut stderr);
                return Some((status, stderr));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = watcher.kill();
        None
    })
    .await
    .expect("joins");
    let (status, stderr) = exited.expect("etcdctl watch ended: it was told its history is gone");
    assert!(!status.success());
    assert!(
        stderr.contains("compacted"),
        "etcdctl watch said {stderr:?}"
    );

    // A watch from a revision after the switch sees the later writes.
    let from = header + 1;
    let mut watch = ferry_proto::etcd::etcdserverpb::watch_client::WatchClient::connect(format!(
        "http://{listen}"
    ))
    .await
    .expect("connect");
    let (requests, receiver) = tokio::sync::mpsc::channel(1);
    requests
        .send(ferry_proto::etcd::etcdserverpb::WatchRequest {
            request_union: Some(
                ferry_proto::etcd::etcdserverpb::watch_request::RequestUnion::CreateRequest(
                    ferry_proto::etcd::etcdserverpb::WatchCreateRequest {
                        key: b"/app/".to_vec(),
                        range_end: b"/app0".to_vec(),
                        start_revision: from,
                        ..Default::default()
                    },
                ),
            ),
        })
        .await
        .expect("send");
    let mut events = watch
        .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .expect("watch")
        .into_inner();
    put_at(&listen, "/app/later", "2").await.expect("put");
    let mut got = Vec::new();
    while got.is_empty() {
        let message = events.message().await.expect("events").expect("one");
        assert!(!message.canceled, "{message:?}");
        got.extend(message.events);
    }
    let kv = got[0].kv.as_ref().expect("kv");
    assert_eq!(kv.key, b"/app/later");
    assert!(kv.mod_revision >= from, "{} from {from}", kv.mod_revision);
}

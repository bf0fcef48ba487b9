//! `ferry gateway` against real etcd servers: etcdctl and a Rust client
//! use it as if it were etcd; the admin service holds writes, switches the
//! upstream and releases them, and refuses what it must.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_agent::gateway::{GatewayAdminClient, connect_admin};
use ferry_engine::adapters::etcd::fence_alarm_member;
use ferry_proto::etcd::etcdserverpb::auth_client::AuthClient;
use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use ferry_proto::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use ferry_proto::etcd::etcdserverpb::watch_client::WatchClient;
use ferry_proto::etcd::etcdserverpb::{
    AlarmRequest, AlarmType, AuthEnableRequest, AuthRoleAddRequest, AuthUserAddRequest,
    AuthUserGrantRoleRequest, AuthenticateRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
    alarm_request, request_op, watch_request,
};
use ferry_proto::v1::{GatewayStatusRequest, HoldRequest, ReleaseRequest, SwitchRequest};
use ferry_tests::etcd::{EtcdOptions, EtcdServer, EtcdServerTls};
use ferry_tests::plane::{
    etcdctl_binary, etcdctl_ok, ferry, ferry_command, ferry_with_env, kv, try_put, value_text,
};
use futures::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

/// A `ferry gateway` process, killed on drop.
struct GatewayProcess {
    child: Child,
    /// Where etcd clients connect.
    listen: String,
    /// Where the admin service listens.
    admin: String,
    stderr: tempfile::NamedTempFile,
}

impl GatewayProcess {
    fn start(upstream: &str, extra: &[&str]) -> Self {
        Self::start_with_env(upstream, extra, &[])
    }

    fn start_with_env(upstream: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let stderr = tempfile::NamedTempFile::new().expect("a temp file");
        let mut child = ferry_command()
            .args(["--output", "json", "gateway", "--listen", "127.0.0.1:0"])
            .args(["--upstream", upstream])
            .args(extra)
            .env_remove("FERRY_AGENT_TOKEN")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr.reopen().expect("reopen")))
            .spawn()
            .expect("ferry gateway starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the gateway's first line");
        let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|error| {
            panic!(
                "the gateway printed {line:?} ({error}); stderr: {}",
                std::fs::read_to_string(stderr.path()).unwrap_or_default()
            )
        });
        let field = |name: &str| {
            ready[name]
                .as_str()
                .unwrap_or_else(|| panic!("{name} in {ready}"))
                .to_owned()
        };
        Self {
            listen: field("listen"),
            admin: field("admin"),
            child,
            stderr,
        }
    }

    async fn kv(&self) -> KvClient<Channel> {
        kv(&self.listen).await
    }

    async fn admin(&self) -> GatewayAdminClient<Channel> {
        connect_admin(&self.admin)
            .await
            .expect("the admin client connects")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hold taken through the admin service: it lasts while `lease` is kept
/// (the gateway lets a hold lapse when its caller's stream ends).
struct Held {
    drained: u64,
    #[allow(dead_code)]
    lease: tonic::Streaming<ferry_proto::v1::HoldResponse>,
}

/// Waits until the gateway counts `queued` writes waiting in line.
async fn wait_for_queued(admin: &mut GatewayAdminClient<Channel>, queued: u64) {
    loop {
        let status = admin
            .status(GatewayStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if status.queued_writes == queued {
            return;
        }
        tokio::task::yield_now().await;
    }
}

async fn hold(admin: &mut GatewayAdminClient<Channel>, epoch: u64, max_pause_ms: u64) -> Held {
    let mut lease = admin
        .hold(HoldRequest {
            epoch,
            max_pause_ms,
        })
        .await
        .expect("hold")
        .into_inner();
    let drained = lease
        .message()
        .await
        .expect("the hold's first message")
        .expect("one")
        .drained_writes;
    Held { drained, lease }
}

/// Records in `old` what `ferry migrate` records at its point of no
/// return: the migration `epoch` fenced it and switched its clients to
/// `successor` (the gateway's Switch requires it). As root when `password`.
async fn commit_switch(old: &EtcdServer, password: Option<&str>, epoch: u64, successor: &str) {
    write_fence_record(old, password, epoch, successor, true).await;
}

/// Writes the fence record (and its guard key) a migration `epoch` to
/// `successor` leaves in `old`: committed (`switched`) or in doubt.
async fn write_fence_record(
    old: &EtcdServer,
    password: Option<&str>,
    epoch: u64,
    successor: &str,
    switched: bool,
) {
    let record = format!(
        r#"{{"epoch":{epoch},"fenced":true,"successor":"{successor}","switched":{switched}}}"#
    );
    let put = |key: &str, value: String| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.into_bytes(),
            ..PutRequest::default()
        })),
    };
    let mut request = tonic::Request::new(TxnRequest {
        success: vec![
            put("__ferry__/fence", record),
            put("__ferry__/fenced", epoch.to_string()),
        ],
        ..TxnRequest::default()
    });
    if let Some(password) = password {
        as_root(old, password, &mut request).await;
    }
    kv(old)
        .await
        .txn(request)
        .await
        .expect("the fence record is written");
    // And the write alarm of the epoch, as ferry's fence raises it (ferry
    // raises it first and nests the record's Puts).
    let mut alarm = tonic::Request::new(AlarmRequest {
        action: alarm_request::AlarmAction::Activate as i32,
        member_id: fence_alarm_member(epoch),
        alarm: AlarmType::Nospace as i32,
    });
    if let Some(password) = password {
        as_root(old, password, &mut alarm).await;
    }
    MaintenanceClient::connect(format!("http://{}", old.endpoint()))
        .await
        .expect("connect")
        .alarm(alarm)
        .await
        .expect("the write alarm is raised");
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_works_through_the_gateway() {
    let etcd = EtcdServer::start().expect("etcd starts");
    let gateway = GatewayProcess::start(&etcd.url(), &[]);
    let endpoint = gateway.listen.clone();

    assert_eq!(
        etcdctl_ok(&endpoint, &["put", "/app/a", "1"], None).trim(),
        "OK"
    );
    assert_eq!(value_text(&etcd, "/app/a").await.as_deref(), Some("1"));
    assert_eq!(
        etcdctl_ok(&endpoint, &["get", "/app/a", "--print-value-only"], None).trim(),
        "1"
    );
    // A Txn that writes: compare, then put on success.
    let txn = etcdctl_ok(
        &endpoint,
        &["txn"],
        Some("value(\"/app/a\") = \"1\"\n\nput /app/b 2\n\nput /app/b never\n\n"),
    );
    assert!(txn.starts_with("SUCCESS"), "txn said {txn:?}");
    assert_eq!(value_text(&etcd, "/app/b").await.as_deref(), Some("2"));
    assert_eq!(etcdctl_ok(&endpoint, &["del", "/app/a"], None).trim(), "1");
    assert_eq!(value_text(&etcd, "/app/a").await, None);
    // Leases: grant, keep alive once, time to live.
    let granted = etcdctl_ok(&endpoint, &["lease", "grant", "60"], None);
    let lease = granted
        .split_whitespace()
        .nth(1)
        .expect("lease <id> granted ...")
        .to_owned();
    let kept = etcdctl_ok(&endpoint, &["lease", "keep-alive", "--once", &lease], None);
    assert!(kept.contains("keepalived"), "keep-alive said {kept:?}");
    let ttl = etcdctl_ok(&endpoint, &["lease", "timetolive", &lease], None);
    assert!(ttl.contains("remaining"), "timetolive said {ttl:?}");
    // Status and members.
    let status = etcdctl_ok(&endpoint, &["endpoint", "status", "-w", "json"], None);
    assert!(
        status.contains("\"version\":\"3."),
        "status said {status:?}"
    );
    let members = etcdctl_ok(&endpoint, &["member", "list"], None);
    assert!(members.contains("started"), "member list said {members:?}");
    // Watch: a watcher through the gateway sees a put made through it.
    let mut watcher = Command::new(etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &endpoint, "watch", "/app/watched"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl watch");
    let mut lines = BufReader::new(watcher.stdout.take().expect("stdout")).lines();
    // Put until the watcher reports it: it may not be watching yet.
    let seen = tokio::task::spawn_blocking(move || lines.next());
    let client = gateway.kv().await;
    let mut attempt = 0;
    while !seen.is_finished() {
        attempt += 1;
        try_put(&client, "/app/watched", &format!("v{attempt}"), 0)
            .await
            .expect("put");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(attempt < 100, "etcdctl watch never reported a put");
    }
    let first = seen.await.expect("joins");
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert_eq!(
        first.and_then(Result::ok).as_deref(),
        Some("PUT"),
        "gateway log: {}",
        gateway.log()
    );
    let status = gateway
        .admin()
        .await
        .status(GatewayStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.upstream_url, etcd.url());
    assert!(!status.holding);
    assert!(status.writes_forwarded >= 5, "{status:?}");
    assert!(status.reads_forwarded >= 3, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_held_during_a_switch_land_in_the_new_etcd_only_in_arrival_order() {
    let old = EtcdServer::start().expect("old etcd starts");
    let new = EtcdServer::start().expect("new etcd starts");
    let gateway = GatewayProcess::start(&old.url(), &[]);
    let mut admin = gateway.admin().await;
    let mut client = gateway.kv().await;
    try_put(&client, "/before", "old", 0).await.expect("put");

    let held_writes = hold(&mut admin, 1, 30_000).await;
    assert_eq!(held_writes.drained, 0);
    // Held: one put per value, each sent once the gateway counts the one
    // before it in line, so their arrival order is 0, 1, 2, ...
    let mut held = Vec::new();
    for index in 0..5 {
        let client = client.clone();
        held.push(tokio::spawn(async move {
            try_put(&client, "/held", &index.to_string(), 0).await
        }));
        wait_for_queued(&mut admin, index + 1).await;
    }
    // Reads pass while writes are held.
    let read = client
        .range(RangeRequest {
            key: b"/before".to_vec(),
            ..RangeRequest::default()
        })
        .await
        .expect("a read during the hold")
        .into_inner();
    assert_eq!(read.kvs[0].value, b"old");
    assert!(
        held.iter().all(|write| !write.is_finished()),
        "every write waits during the hold"
    );

    commit_switch(&old, None, 1, &new.url()).await;
    admin
        .switch(SwitchRequest {
            epoch: 1,
            upstream_url: new.url(),
        })
        .await
        .expect("switch");
    let released = admin
        .release(ReleaseRequest { epoch: 1 })
        .await
        .expect("release")
        .into_inner();
    assert_eq!(released.released_writes, 5);
    assert_eq!(released.rejected_writes, 0);
    for write in held {
        write.await.expect("joins").expect("a held write succeeds");
    }
    try_put(&client, "/after", "new", 0).await.expect("put");

    assert_eq!(value_text(&old, "/held").await, None);
    assert_eq!(value_text(&old, "/after").await, None);
    assert_eq!(value_text(&new, "/after").await.as_deref(), Some("new"));
    assert_eq!(value_text(&new, "/before").await, None);
    // The key's history in the new etcd follows the arrival order.
    let mut direct = kv(&new).await;
    let latest = direct
        .range(RangeRequest {
            key: b"/held".to_vec(),
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner()
        .kvs[0]
        .clone();
    assert_eq!(latest.version, 5);
    let mut history = Vec::new();
    for revision in latest.create_revision..=latest.mod_revision {
        let at = direct
            .range(RangeRequest {
                key: b"/held".to_vec(),
                revision,
                ..RangeRequest::default()
            })
            .await
            .expect("range at a revision")
            .into_inner();
        history.push(String::from_utf8_lossy(&at.kvs[0].value).into_owned());
    }
    assert_eq!(history, ["0", "1", "2", "3", "4"]);
    let status = admin
        .status(GatewayStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.upstream_url, new.url());
    assert_eq!(status.epoch, 1);
    assert!(!status.holding);
}

/// Issue 10, item 2: a hold is a lease. Its pause running out (the driver
/// stopped), or its caller going away (the driver killed), lapses it, and
/// the gateway settles it by itself: with no fence on the old plane, the
/// held writes go on there, and new writes flow; no Release ever comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_that_lapses_settles_by_itself_and_the_held_writes_go_on() {
    let etcd = EtcdServer::start().expect("etcd starts");
    let gateway = GatewayProcess::start(&etcd.url(), &["--max-pause", "300ms"]);
    let mut admin = gateway.admin().await;
    let client = gateway.kv().await;

    // The pause runs out (max_pause_ms 0: the gateway's --max-pause) while
    // the lease is kept, as by a driver that hangs.
    let held = hold(&mut admin, 7, 0).await;
    try_put(&client, "/late", "x", 0)
        .await
        .expect("the held write goes on once the hold settles");
    assert_eq!(value_text(&etcd, "/late").await.as_deref(), Some("x"));
    let status = admin
        .status(GatewayStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(!status.holding, "settled: {status:?}");
    assert_eq!(status.upstream_url, etcd.url());
    drop(held);

    // The caller goes away long before the pause: the hold lapses at once.
    let held = hold(&mut admin, 8, 60_000).await;
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { try_put(&client, "/dropped", "y", 0).await })
    };
    // The write waits in line: the gateway counts it.
    wait_for_queued(&mut admin, 1).await;
    assert!(!waiting.is_finished());
    drop(held);
    waiting
        .await
        .expect("joins")
        .expect("the held write goes on once the lease is dropped");
    assert_eq!(value_text(&etcd, "/dropped").await.as_deref(), Some("y"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_keep_alives_pass_during_a_hold_and_lease_grants_wait() {
    let etcd = EtcdServer::start().expect("etcd starts");
    let gateway = GatewayProcess::start(&etcd.url(), &[]);
    let mut admin = gateway.admin().await;
    let mut client = gateway.kv().await;
    try_put(&client, "/r", "1", 0).await.expect("put");
    let channel = Channel::from_shared(format!("http://{}", gateway.listen))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut leases = LeaseClient::new(channel);
    let lease = leases
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .expect("grant")
        .into_inner()
        .id;

    let _held = hold(&mut admin, 1, 30_000).await;
    // A Txn of ranges is a read.
    let range = || RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: b"/r".to_vec(),
            ..RangeRequest::default()
        })),
    };
    let txn = client
        .txn(TxnRequest {
            success: vec![range()],
            failure: vec![range()],
            ..TxnRequest::default()
        })
        .await
        .expect("a read-only txn during the hold")
        .into_inner();
    assert!(txn.succeeded);
    let mut keep_alive = leases
        .lease_keep_alive(futures::stream::iter([LeaseKeepAliveRequest { id: lease }]))
        .await
        .expect("keep-alive during the hold")
        .into_inner();
    let kept = keep_alive
        .message()
        .await
        .expect("keep-alive answer")
        .expect("one");
    assert_eq!(kept.id, lease);
    assert!(kept.ttl > 0);
    // A lease grant is a write: it waits.
    let grant = {
        let mut leases = leases.clone();
        tokio::spawn(async move {
            leases
                .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
                .await
        })
    };
    // A Txn with a put in its failure branch is a write: it waits.
    let writing_txn = {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .txn(TxnRequest {
                    success: vec![range()],
                    failure: vec![RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: b"/t".to_vec(),
                            value: b"1".to_vec(),
                            ..PutRequest::default()
                        })),
                    }],
                    ..TxnRequest::default()
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!grant.is_finished(), "a lease grant waits during the hold");
    assert!(
        !writing_txn.is_finished(),
        "a writing txn waits during the hold"
    );
    let released = admin
        .release(ReleaseRequest { epoch: 1 })
        .await
        .expect("release")
        .into_inner();
    assert_eq!(released.released_writes, 2);
    grant.await.expect("joins").expect("the grant goes through");
    writing_txn
        .await
        .expect("joins")
        .expect("the txn goes through");
}

/// A gateway that nothing holds meets the fence of a migration that never
/// decided (its driver fenced the plane without holding this replica, and
/// died): the write is answered UNAVAILABLE, the gateway holds writes for
/// its --max-pause, then settles as a lapsed hold does, by unfencing the
/// plane; the client's retry goes through. (Before: the gateway waited for
/// the refused write to drain while that write waited for the gateway.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_meeting_an_undecided_fence_unfences_it_after_the_pause() {
    let etcd = EtcdServer::start().expect("etcd starts");
    let gateway = GatewayProcess::start(&etcd.url(), &["--max-pause", "500ms"]);
    let client = gateway.kv().await;
    try_put(&client, "/k", "before", 0).await.expect("put");
    write_fence_record(&etcd, None, 4, "etcd://127.0.0.1:1", false).await;
    let refused = try_put(&client, "/k", "fenced", 0)
        .await
        .expect_err("the plane is fenced and undecided");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(value_text(&etcd, "/k").await.as_deref(), Some("before"));
    // A retry waits in the gateway's hold, then goes on once it settled.
    try_put(&client, "/k", "after", 0)
        .await
        .expect("the retry goes on after the gateway settles the fence");
    assert_eq!(value_text(&etcd, "/k").await.as_deref(), Some("after"));
    assert_eq!(value_text(&etcd, "__ferry__/fenced").await, None);
    let record = value_text(&etcd, "__ferry__/fence")
        .await
        .expect("the record");
    assert!(record.contains(r#""fenced":false"#), "{record}");
}

/// A Switch the old plane's fence record does not say was committed is
/// refused, and one to a successor that does not answer fails: either way
/// the gateway stays where it is, and never writes to a fenced plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_needs_a_committed_record_and_a_reachable_successor() {
    let etcd = EtcdServer::start().expect("etcd starts");
    let other = EtcdServer::start().expect("other etcd starts");
    let gateway = GatewayProcess::start(&etcd.url(), &["--connect-timeout", "1s"]);
    let mut admin = gateway.admin().await;
    let client = gateway.kv().await;

    let held_writes = hold(&mut admin, 2, 30_000).await;
    let uncommitted = admin
        .switch(SwitchRequest {
            epoch: 2,
            upstream_url: other.url(),
        })
        .await
        .expect_err("nothing committed the switch");
    assert_eq!(
        uncommitted.code(),
        Code::FailedPrecondition,
        "{uncommitted:?}"
    );
    assert!(
        uncommitted.message().contains("commit the switch"),
        "{uncommitted:?}"
    );
    // Rollback: release to the old upstream.
    admin
        .release(ReleaseRequest { epoch: 2 })
        .await
        .expect("release");
    drop(held_writes);
    try_put(&client, "/k", "after", 0).await.expect("put");
    assert_eq!(value_text(&etcd, "/k").await.as_deref(), Some("after"));

    let _held = hold(&mut admin, 3, 30_000).await;
    let held = {
        let client = client.clone();
        tokio::spawn(async move { try_put(&client, "/k", "held", 0).await })
    };
    let nowhere = format!("etcd://127.0.0.1:{}", closed_port());
    commit_switch(&etcd, None, 3, &nowhere).await;
    let failed = admin
        .switch(SwitchRequest {
            epoch: 3,
            upstream_url: nowhere.clone(),
        })
        .await
        .expect_err("nothing listens there");
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    assert!(failed.message().contains(&nowhere), "{failed:?}");
    let status = admin
        .status(GatewayStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.upstream_url, etcd.url());
    assert!(status.holding);
    // Released to the old plane, which is fenced for good: the store
    // refuses the write, and the gateway cannot reach the successor.
    admin
        .release(ReleaseRequest { epoch: 3 })
        .await
        .expect("release");
    let refused = held
        .await
        .expect("joins")
        .expect_err("the old plane is fenced");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(value_text(&etcd, "/k").await.as_deref(), Some("after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_epoch_is_refused() {
    let etcd = EtcdServer::start().expect("etcd starts");
    let other = EtcdServer::start().expect("other etcd starts");
    let gateway = GatewayProcess::start(&etcd.url(), &[]);
    let mut admin = gateway.admin().await;

    let not_holding = admin
        .switch(SwitchRequest {
            epoch: 1,
            upstream_url: other.url(),
        })
        .await
        .expect_err("a switch needs a hold");
    assert_eq!(not_holding.code(), Code::FailedPrecondition);

    let _held = hold(&mut admin, 5, 30_000).await;
    let stale_hold = admin
        .hold(HoldRequest {
            epoch: 4,
            max_pause_ms: 1000,
        })
        .await
        .expect_err("epoch 4 < 5");
    assert_eq!(stale_hold.code(), Code::FailedPrecondition);
    assert!(stale_hold.message().contains("epoch 4"), "{stale_hold:?}");
    let stale_switch = admin
        .switch(SwitchRequest {
            epoch: 4,
            upstream_url: other.url(),
        })
        .await
        .expect_err("epoch 4 < 5");
    assert_eq!(stale_switch.code(), Code::FailedPrecondition);
    let stale_release = admin
        .release(ReleaseRequest { epoch: 4 })
        .await
        .expect_err("epoch 4 < 5");
    assert_eq!(stale_release.code(), Code::FailedPrecondition);
    let status = admin
        .status(GatewayStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(status.holding, "the stale release did not release");
    assert_eq!(status.epoch, 5);
    assert_eq!(status.upstream_url, etcd.url());
    admin
        .release(ReleaseRequest { epoch: 5 })
        .await
        .expect("release");
    let after = admin
        .hold(HoldRequest {
            epoch: 3,
            max_pause_ms: 1000,
        })
        .await
        .expect_err("still lower than 5 after the release");
    assert_eq!(after.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_end_unavailable_on_a_switch_and_reopen_on_the_new_etcd() {
    let old = EtcdServer::start().expect("old etcd starts");
    let new = EtcdServer::start().expect("new etcd starts");
    let gateway = GatewayProcess::start(&old.url(), &[]);
    let mut admin = gateway.admin().await;
    let client = gateway.kv().await;
    let watch = |start_revision: i64| WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b"/w".to_vec(),
                start_revision,
                ..WatchCreateRequest::default()
            },
        )),
    };
    let mut watcher = WatchClient::connect(format!("http://{}", gateway.listen))
        .await
        .expect("connect");
    let mut events = watcher
        .watch(futures::stream::iter([watch(0)]).chain(futures::stream::pending()))
        .await
        .expect("watch")
        .into_inner();
    let created = events.message().await.expect("created").expect("one");
    assert!(created.created);
    try_put(&client, "/w", "on-old", 0).await.expect("put");
    let event = events.message().await.expect("event").expect("one");
    assert_eq!(event.events[0].kv.as_ref().expect("kv").value, b"on-old");

    let _held = hold(&mut admin, 1, 30_000).await;
    commit_switch(&old, None, 1, &new.url()).await;
    admin
        .switch(SwitchRequest {
            epoch: 1,
            upstream_url: new.url(),
        })
        .await
        .expect("switch");
    let ended = loop {
        match events.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the watch ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    admin
        .release(ReleaseRequest { epoch: 1 })
        .await
        .expect("release");

    // Opened again, the watch is on the new etcd.
    let mut events = watcher
        .watch(futures::stream::iter([watch(0)]).chain(futures::stream::pending()))
        .await
        .expect("watch again")
        .into_inner();
    assert!(
        events
            .message()
            .await
            .expect("created")
            .expect("one")
            .created
    );
    try_put(&client, "/w", "on-new", 0).await.expect("put");
    let event = events.message().await.expect("event").expect("one");
    assert_eq!(event.events[0].kv.as_ref().expect("kv").value, b"on-new");
    assert_eq!(value_text(&new, "/w").await.as_deref(), Some("on-new"));
    assert_eq!(value_text(&old, "/w").await.as_deref(), Some("on-old"));
}

/// Turns auth on in `server` with user `root` (role root) and `password`.
async fn enable_auth(server: &EtcdServer, password: &str) {
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
        password: password.to_owned(),
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
}

/// Makes `request` a call of `server`'s root user (auth on, `password`).
async fn as_root<T>(server: &EtcdServer, password: &str, request: &mut tonic::Request<T>) {
    let token = AuthClient::connect(format!("http://{}", server.endpoint()))
        .await
        .expect("auth client")
        .authenticate(AuthenticateRequest {
            name: "root".to_owned(),
            password: password.to_owned(),
        })
        .await
        .expect("authenticate")
        .into_inner()
        .token;
    request
        .metadata_mut()
        .insert("token", token.parse().expect("a header value"));
}

/// The value of `key` in `server` with auth on, read as root.
async fn value_as_root(server: &EtcdServer, password: &str, key: &str) -> Option<String> {
    let mut request = tonic::Request::new(RangeRequest {
        key: key.as_bytes().to_vec(),
        ..RangeRequest::default()
    });
    as_root(server, password, &mut request).await;
    let mut client = kv(server).await;
    client
        .range(request)
        .await
        .expect("range as root")
        .into_inner()
        .kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_authenticates_with_its_own_credentials_and_passes_client_tokens_on() {
    const PASSWORD: &str = "gateway-s3cret";
    let old = EtcdServer::start().expect("old etcd starts");
    let new = EtcdServer::start().expect("new etcd starts");
    enable_auth(&old, PASSWORD).await;
    enable_auth(&new, PASSWORD).await;

    // A wrong password: the gateway does not start, and says why without it.
    let refused = ferry_with_env(
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &old.url(),
        ],
        &[
            ("ETCD_USERNAME", "root"),
            ("ETCD_PASSWORD", "not-the-password"),
        ],
    );
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("authenticating"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");

    let password_file = tempfile::NamedTempFile::new().expect("a temp file");
    std::fs::write(password_file.path(), format!("{PASSWORD}\n")).expect("write");
    let password_path = password_file.path().display().to_string();
    let gateway = GatewayProcess::start_with_env(
        &old.url(),
        &["--etcd-password-file", &password_path],
        &[("ETCD_USERNAME", "root")],
    );
    // A client without a token writes as the gateway's user.
    let mut client = gateway.kv().await;
    try_put(&client, "/anonymous", "1", 0)
        .await
        .expect("a put with the gateway's token");
    assert_eq!(
        value_as_root(&old, PASSWORD, "/anonymous").await.as_deref(),
        Some("1")
    );
    // A client's own token is passed on, not replaced: a bad one is refused.
    let mut bogus = tonic::Request::new(PutRequest {
        key: b"/bogus".to_vec(),
        value: b"x".to_vec(),
        ..PutRequest::default()
    });
    bogus
        .metadata_mut()
        .insert("token", "not-a-token".parse().expect("a header value"));
    let refused = client
        .put(bogus)
        .await
        .expect_err("etcd refuses the client's bad token");
    assert!(
        refused.message().contains("invalid auth token"),
        "{refused:?}"
    );
    // etcdctl with its own user: Authenticate goes through the gateway.
    let user = format!("root:{PASSWORD}");
    assert_eq!(
        etcdctl_ok(
            &gateway.listen,
            &["--user", &user, "put", "/etcdctl", "2"],
            None
        )
        .trim(),
        "OK"
    );
    assert_eq!(
        value_as_root(&old, PASSWORD, "/etcdctl").await.as_deref(),
        Some("2")
    );

    // The same credentials on the upstream a Switch names.
    let mut admin = gateway.admin().await;
    let _held = hold(&mut admin, 1, 30_000).await;
    commit_switch(&old, Some(PASSWORD), 1, &new.url()).await;
    admin
        .switch(SwitchRequest {
            epoch: 1,
            upstream_url: new.url(),
        })
        .await
        .expect("switch to the new etcd, authenticating there");
    admin
        .release(ReleaseRequest { epoch: 1 })
        .await
        .expect("release");
    try_put(&client, "/anonymous", "on-new", 0)
        .await
        .expect("a put with the gateway's token on the new etcd");
    assert_eq!(
        value_as_root(&new, PASSWORD, "/anonymous").await.as_deref(),
        Some("on-new")
    );
    assert_eq!(
        value_as_root(&old, PASSWORD, "/anonymous").await.as_deref(),
        Some("1")
    );
}

/// A CA, a member certificate for 127.0.0.1 and a client certificate, as
/// PEM files in a temporary directory.
fn make_pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    ferry_tests::tls::write_test_pki(dir.path());
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reaches_a_tls_upstream_with_its_own_certificate() {
    let pki = make_pki();
    let file = |name: &str| pki.path().join(name).display().to_string();
    let etcd = EtcdServer::start_with(&EtcdOptions {
        tls: Some(EtcdServerTls {
            cert_file: pki.path().join("server.pem"),
            key_file: pki.path().join("server-key.pem"),
            trusted_ca_file: Some(pki.path().join("ca.pem")),
            client_cert_auth: true,
        }),
        ..EtcdOptions::default()
    })
    .expect("etcd serving TLS");
    let tls_url = format!("etcds://{}", etcd.endpoint());

    // Without its certificate the gateway does not start, and says why.
    let refused = ferry(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &tls_url,
        "--etcd-ca-file",
        &file("ca.pem"),
        "--connect-timeout",
        "3s",
    ]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains(&tls_url), "{message}");

    let gateway = GatewayProcess::start(
        &tls_url,
        &[
            "--etcd-ca-file",
            &file("ca.pem"),
            "--etcd-cert-file",
            &file("client.pem"),
            "--etcd-key-file",
            &file("client-key.pem"),
        ],
    );
    // Clients speak plain HTTP/2 to the gateway; the gateway TLS upstream.
    let mut client = gateway.kv().await;
    try_put(&client, "/over-tls", "yes", 0).await.expect("put");
    let read = client
        .range(RangeRequest {
            key: b"/over-tls".to_vec(),
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert_eq!(read.kvs[0].value, b"yes");
    let status = gateway
        .admin()
        .await
        .status(GatewayStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.upstream_url, tls_url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_reopens_on_the_new_etcd_after_a_switch() {
    let old = EtcdServer::start().expect("old etcd starts");
    let new = EtcdServer::start().expect("new etcd starts");
    // etcdctl resumes its watch from the last revision it saw plus one, and
    // that is the old etcd's revision: give the new etcd a higher one, as a
    // migration's target usually has (see the gateway's documentation).
    let seed = kv(&new).await;
    for index in 0..20 {
        try_put(&seed, "/seed", &index.to_string(), 0)
            .await
            .expect("seed");
    }
    let gateway = GatewayProcess::start(&old.url(), &[]);
    let mut admin = gateway.admin().await;
    let mut client = gateway.kv().await;
    let mut watcher = Command::new(etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &gateway.listen, "watch", "/w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl watch");
    let (lines_sender, mut lines) = tokio::sync::mpsc::channel(16);
    let stdout = watcher.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_sender.blocking_send(line).is_err() {
                break;
            }
        }
    });
    // Waits (putting again and again, as the watcher may not watch yet) for
    // etcdctl to print `value`.
    async fn until_seen(
        client: &mut KvClient<Channel>,
        lines: &mut tokio::sync::mpsc::Receiver<String>,
        value: &str,
    ) {
        for _ in 0..100 {
            try_put(client, "/w", value, 0).await.expect("put");
            let deadline = tokio::time::sleep(Duration::from_millis(300));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    line = lines.recv() => match line {
                        Some(line) if line == value => return,
                        Some(_) => continue,
                        None => panic!("etcdctl watch ended"),
                    },
                    () = &mut deadline => break,
                }
            }
        }
        panic!("etcdctl watch never printed {value}");
    }
    until_seen(&mut client, &mut lines, "on-old").await;

    let _held = hold(&mut admin, 1, 30_000).await;
    commit_switch(&old, None, 1, &new.url()).await;
    admin
        .switch(SwitchRequest {
            epoch: 1,
            upstream_url: new.url(),
        })
        .await
        .expect("switch");
    admin
        .release(ReleaseRequest { epoch: 1 })
        .await
        .expect("release");
    until_seen(&mut client, &mut lines, "on-new").await;
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert_eq!(value_text(&new, "/w").await.as_deref(), Some("on-new"));
    assert_eq!(value_text(&old, "/w").await.as_deref(), Some("on-old"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_service_requires_its_token_when_one_is_set() {
    let etcd = EtcdServer::start().expect("etcd starts");
    let gateway =
        GatewayProcess::start_with_env(&etcd.url(), &[], &[("FERRY_AGENT_TOKEN", "admin-t0ken")]);
    let mut admin = gateway.admin().await;
    let refused = admin
        .hold(HoldRequest {
            epoch: 1,
            max_pause_ms: 1000,
        })
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let mut wrong = tonic::Request::new(GatewayStatusRequest {});
    wrong.metadata_mut().insert(
        "authorization",
        "Bearer not-it".parse().expect("a header value"),
    );
    assert_eq!(
        admin.status(wrong).await.expect_err("wrong token").code(),
        Code::Unauthenticated
    );
    let mut right = tonic::Request::new(GatewayStatusRequest {});
    right.metadata_mut().insert(
        "authorization",
        "Bearer admin-t0ken".parse().expect("a header value"),
    );
    let status = admin
        .status(right)
        .await
        .expect("the right token")
        .into_inner();
    assert!(!status.holding, "the refused hold did nothing");
    // etcd's API needs no admin token.
    let client = gateway.kv().await;
    try_put(&client, "/k", "v", 0).await.expect("put");
    assert!(!gateway.log().contains("admin-t0ken"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_tls_to_its_clients_and_to_ferry_migrate() {
    let pki = make_pki();
    let file = |name: &str| pki.path().join(name).display().to_string();
    let etcd = EtcdServer::start().expect("etcd");

    // A key file that is not a key: the gateway does not start, and says so.
    let refused = ferry(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &etcd.url(),
        "--tls-cert-file",
        &file("server.pem"),
        "--tls-key-file",
        &file("ca.pem"),
    ]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("TLS"), "{message}");

    let gateway = GatewayProcess::start(
        &etcd.url(),
        &[
            "--tls-cert-file",
            &file("server.pem"),
            "--tls-key-file",
            &file("server-key.pem"),
        ],
    );
    // An etcd client that trusts the CA writes and reads through it.
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read(file("ca.pem")).expect("CA")),
    );
    let channel = Channel::from_shared(format!("https://{}", gateway.listen))
        .expect("endpoint")
        .tls_config(tls)
        .expect("TLS config")
        .connect()
        .await
        .expect("a TLS client connects to the gateway");
    let client = KvClient::new(channel);
    try_put(&client, "/gateway-tls", "yes", 0)
        .await
        .expect("put");
    assert_eq!(
        value_text(&etcd, "/gateway-tls").await.as_deref(),
        Some("yes")
    );

    // A plain-text client gets no answer from a TLS listener.
    let plain = KvClient::connect(format!("http://{}", gateway.listen)).await;
    let plain_put = match plain {
        Ok(plain) => try_put(&plain, "/plain", "no", 0).await.is_err(),
        Err(_) => true,
    };
    assert!(plain_put, "plain text is refused");
    assert_eq!(value_text(&etcd, "/plain").await, None);

    // The admin service as `ferry migrate --agent-ca-file` reaches it.
    let mut admin = ferry_agent::client::connect_gateway(
        &gateway.admin,
        &ferry_agent::client::ClientOptions {
            tls_ca_file: Some(pki.path().join("ca.pem")),
            ..ferry_agent::client::ClientOptions::default()
        },
    )
    .await
    .expect("the admin service over TLS");
    let status = admin
        .status(GatewayStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.upstream_url, etcd.url());
}

/// Limits a client cannot blow past (issue 10, item 6): the gateway decoded
/// requests of up to 2 GiB (`i32::MAX`) from any client, held them in
/// memory while writes were held, then forwarded them. It now refuses what
/// etcd refuses: a request over `--max-request-bytes` (etcd's default,
/// 1.5 MiB) plus etcd's 512 KiB for gRPC is answered `RESOURCE_EXHAUSTED`
/// as it arrives, neither held nor forwarded. Responses stay uncapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_size_cap_is_refused_as_it_arrives_neither_held_nor_forwarded() {
    // An etcd that takes 3 MiB requests: what reaches it is stored, so a
    // key missing there was never forwarded.
    let etcd = EtcdServer::start_with(&EtcdOptions {
        max_request_bytes: 3 << 20,
        ..EtcdOptions::default()
    })
    .expect("etcd with --max-request-bytes 3 MiB starts");
    let gateway = GatewayProcess::start(&etcd.url(), &[]);
    let mut admin = gateway.admin().await;
    let mut client = gateway.kv().await;
    let two_mib = "x".repeat(2 << 20);

    // Writes are held for a minute: a write under the cap would wait in
    // line; this one is refused while the hold still stands.
    let held = hold(&mut admin, 1, 60_000).await;
    let refused = try_put(&client, "/big/two-mib", &two_mib, 0)
        .await
        .expect_err("2 MiB and its key are over 1.5 MiB + 512 KiB");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("grpc: received message larger than max")
            && refused.message().contains("ferry gateway"),
        "etcd's words, from the gateway: {}",
        refused.message()
    );
    let status = admin
        .status(GatewayStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(status.holding, "refused within the hold: {status:?}");
    assert_eq!(status.queued_writes, 0, "never held: {status:?}");
    drop(held);
    assert_eq!(
        value_text(&etcd, "/big/two-mib").await,
        None,
        "never forwarded"
    );

    // Under the cap, through to etcd; and a Range whose answer is larger
    // than the cap comes back whole.
    for index in 0..3 {
        try_put(
            &client,
            &format!("/big/one-mib-{index}"),
            &"y".repeat(1 << 20),
            0,
        )
        .await
        .expect("1 MiB is under the gateway's cap and etcd's");
    }
    let all = client
        .range(RangeRequest {
            key: b"/big/".to_vec(),
            range_end: b"/big0".to_vec(),
            ..RangeRequest::default()
        })
        .await
        .expect("a 3 MiB answer")
        .into_inner();
    assert_eq!(all.kvs.len(), 3);
    assert!(all.kvs.iter().all(|kv| kv.value.len() == 1 << 20));

    // --max-request-bytes follows an etcd that takes larger requests.
    let large_gateway = GatewayProcess::start(
        &etcd.url(),
        &["--max-request-bytes", &(3 << 20).to_string()],
    );
    try_put(&large_gateway.kv().await, "/big/two-mib", &two_mib, 0)
        .await
        .expect("2 MiB is under a 3 MiB cap");
    assert_eq!(
        value_text(&etcd, "/big/two-mib")
            .await
            .map(|value| value.len()),
        Some(2 << 20)
    );
}

//! The etcd source's live follow against a real etcd: the snapshot, then
//! every change as one group of ops per revision; a resumed stream gives
//! the same ops as one that never broke; a compacted revision ends the
//! stream with the compaction error.

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::adapters::etcd::{EtcdConnection, EtcdError, EtcdSource, EtcdSourceOptions};
use ferry_engine::adapters::live::{LiveEvent, LiveFrom, LiveStream, Position};
use ferry_engine::progress::Progress;
use ferry_engine::{Error, Op};
use ferry_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::request_op::Request as TxnRequestOp;
use ferry_proto::etcd::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest,
};
use ferry_tests::etcd::EtcdServer;
use ferry_tests::plane::{delete, grant, kv, put};
use futures::StreamExt;
use tonic::transport::Channel;

/// How long a test waits for an event before calling the stream stuck (a
/// guard against hanging, not a measurement).
const STUCK: Duration = Duration::from_secs(30);

/// One Txn of several puts and a delete, guarded by a compare that holds.
async fn txn(client: &mut KvClient<Channel>, puts: &[(&str, &str)], delete: &str) -> i64 {
    let mut success: Vec<RequestOp> = puts
        .iter()
        .map(|(key, value)| RequestOp {
            request: Some(TxnRequestOp::RequestPut(PutRequest {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                ..PutRequest::default()
            })),
        })
        .collect();
    success.push(RequestOp {
        request: Some(TxnRequestOp::RequestDeleteRange(DeleteRangeRequest {
            key: delete.as_bytes().to_vec(),
            ..DeleteRangeRequest::default()
        })),
    });
    let response = client
        .txn(TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Greater as i32,
                target: CompareTarget::Version as i32,
                key: delete.as_bytes().to_vec(),
                range_end: Vec::new(),
                target_union: Some(TargetUnion::Version(0)),
            }],
            success,
            failure: Vec::new(),
        })
        .await
        .expect("txn")
        .into_inner();
    assert!(response.succeeded, "the txn's compare holds");
    response.header.expect("a header").revision
}

fn connection(server: &EtcdServer) -> EtcdConnection {
    EtcdConnection::from_url(&server.url(), None).expect("a valid URL")
}

async fn open(server: &EtcdServer, prefix: &str, from: LiveFrom) -> LiveStream {
    EtcdSource::new(
        connection(server),
        EtcdSourceOptions {
            prefix: prefix.as_bytes().to_vec(),
            parallel: 2,
        },
    )
    .open_live(from, Arc::new(Progress::default()))
    .await
    .expect("the live stream opens")
}

/// What a stream gave until a progress report reached `revision`.
#[derive(Debug, Default)]
struct Received {
    ops: Vec<Op>,
    snapshot_complete: Option<(u64, u64)>,
    last_progress: Option<(u64, u64, u64)>,
}

async fn read_until(live: &mut LiveStream, revision: i64, into: &mut Received) {
    loop {
        let event = tokio::time::timeout(STUCK, live.events.next())
            .await
            .unwrap_or_else(|_| {
                panic!("no event within {STUCK:?}, waiting for revision {revision}")
            })
            .expect("the stream does not end")
            .expect("no error");
        match event {
            LiveEvent::Batch(ops) => into.ops.extend(ops),
            LiveEvent::SnapshotComplete {
                through_seq,
                position,
            } => into.snapshot_complete = Some((through_seq, position)),
            LiveEvent::Progress {
                position,
                head_position,
                through_seq,
            } => {
                assert!(head_position >= position, "the head is never behind");
                assert_eq!(
                    Some(through_seq),
                    into.ops.last().map(|op| op.seq).or(Some(through_seq)),
                    "a progress report names the last seq sent"
                );
                into.last_progress = Some((position, head_position, through_seq));
                if position >= revision as u64 {
                    return;
                }
            }
        }
    }
}

fn assert_contiguous(ops: &[Op], first: u64) {
    for (offset, op) in ops.iter().enumerate() {
        assert_eq!(op.seq, first + offset as u64, "seqs are contiguous: {op:?}");
    }
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("text")
}

/// Two ops are the same, a lease grant's remaining TTL aside (it is read
/// when the op is made).
fn assert_same_ops(actual: &[Op], expected: &[Op]) {
    assert_eq!(actual.len(), expected.len(), "as many ops");
    for (actual, expected) in actual.iter().zip(expected) {
        if &actual.kind[..] == b"etcd.lease" {
            let mut actual = actual.clone();
            actual.body = expected.body.clone();
            assert_eq!(&actual, expected);
        } else {
            assert_eq!(actual, expected);
        }
    }
}

/// A stream resumed past its snapshot does not know the leases announced
/// before the resume point: the last op of `expected`, a put on `lease`
/// announced in the snapshot, comes after a grant of that lease again (a
/// grant of an existing lease changes nothing on a target). Apart from that,
/// the same ops, numbered on from the resume point.
fn assert_same_but_regranted(received: &[Op], expected: &[Op], lease: i64) {
    let first = expected.first().expect("ops expected").seq;
    assert_contiguous(received, first);
    assert_eq!(received.len(), expected.len() + 1, "one grant more");
    let (late, before) = received.split_last().expect("the late put");
    let (granted, before) = before.split_last().expect("a grant before the late put");
    assert_eq!(text(&granted.method), "LeaseGrant");
    assert_eq!(text(&granted.key), format!("{lease:016x}"));
    assert_eq!(granted.position, late.position, "in the put's group");
    assert_eq!(granted.txn, late.txn);
    assert!(!granted.txn_last);
    assert_same_ops(before, &expected[..expected.len() - 1]);
    let mut late = late.clone();
    late.seq -= 1;
    assert_eq!(&late, expected.last().expect("the late put"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_then_every_change_one_group_per_revision() {
    let server = EtcdServer::start().expect("etcd");
    let mut client = kv(&server).await;
    let lease = grant(&server, 600).await;
    for index in 0..20 {
        let on_lease = if index == 5 { lease } else { 0 };
        put(
            &client,
            &format!("/app/items/{index:03}"),
            &format!("v{index}"),
            on_lease,
        )
        .await;
    }
    put(&client, "/other/outside", "x", 0).await;

    let mut live = open(&server, "/app/", LiveFrom::default()).await;
    let snapshot_revision = live.snapshot_position.0 as i64;
    assert_eq!(
        live.info.snapshot_position,
        Some(snapshot_revision as u64),
        "the stream says its R"
    );
    let mut received = Received::default();
    read_until(&mut live, snapshot_revision, &mut received).await;
    // 20 keys and their one lease, the lease right before its key.
    assert_eq!(
        received.snapshot_complete,
        Some((21, snapshot_revision as u64))
    );
    assert_eq!(received.ops.len(), 21);
    assert_contiguous(&received.ops, 1);
    let lease_index = received
        .ops
        .iter()
        .position(|op| &op.kind[..] == b"etcd.lease")
        .expect("the lease is announced");
    assert_eq!(text(&received.ops[lease_index + 1].key), "/app/items/005");
    assert_eq!(
        received.ops[lease_index + 1].deps,
        vec![bytes::Bytes::from(format!("{lease:016x}"))]
    );
    assert!(
        received
            .ops
            .iter()
            .all(|op| op.position == snapshot_revision as u64)
    );

    // Live changes: a put, a delete, a txn of three puts and a delete, a
    // key outside the prefix, a key on a new lease, ferry's fence key.
    let new_lease = grant(&server, 300).await;
    let put_revision = put(&client, "/app/new", "n1", 0).await;
    let delete_revision = delete(&client, "/app/items/000").await;
    let txn_revision = txn(
        &mut client,
        &[("/app/t/a", "1"), ("/app/t/b", "2"), ("/app/t/c", "3")],
        "/app/items/001",
    )
    .await;
    put(&client, "/other/outside", "y", 0).await;
    let leased_revision = put(&client, "/app/leased", "l", new_lease).await;
    let again_revision = put(&client, "/app/leased-too", "l2", new_lease).await;
    let fence_revision = put(&client, "__ferry__/fence", "{}", 0).await;

    let mut changes = Received::default();
    read_until(&mut live, fence_revision, &mut changes).await;
    let (position, head, through_seq) = changes.last_progress.expect("progress");
    assert_eq!(
        position, fence_revision as u64,
        "the fence's revision is reached"
    );
    assert_eq!(head, fence_revision as u64);
    let ops = &changes.ops;
    assert_contiguous(ops, 22);
    assert_eq!(through_seq, ops.last().expect("ops").seq);
    let summary: Vec<(i64, &str, &str, bool)> = ops
        .iter()
        .map(|op| {
            assert_eq!(op.txn, op.position, "a change's txn is its revision");
            (
                op.position as i64,
                text(&op.method),
                text(&op.key),
                op.txn_last,
            )
        })
        .collect();
    let lease_key = format!("{new_lease:016x}");
    assert_eq!(
        summary,
        vec![
            (put_revision, "Put", "/app/new", true),
            (delete_revision, "Delete", "/app/items/000", true),
            (txn_revision, "Put", "/app/t/a", false),
            (txn_revision, "Put", "/app/t/b", false),
            (txn_revision, "Put", "/app/t/c", false),
            (txn_revision, "Delete", "/app/items/001", true),
            (leased_revision, "LeaseGrant", lease_key.as_str(), false),
            (leased_revision, "Put", "/app/leased", true),
            (again_revision, "Put", "/app/leased-too", true),
        ]
    );
    assert!(ops[1].body.is_empty(), "a delete has no body");
    assert_eq!(&ops[0].body[..], b"n1");
    let grant_body: serde_json::Value =
        serde_json::from_slice(&ops[6].body).expect("a lease body is JSON");
    assert_eq!(grant_body["id"], new_lease);
    assert!(
        grant_body["ttl"]
            .as_i64()
            .is_some_and(|ttl| ttl > 0 && ttl <= 300)
    );
    assert_eq!(ops[7].deps, vec![bytes::Bytes::from(lease_key.clone())]);
    assert_eq!(ops[8].deps, vec![bytes::Bytes::from(lease_key)]);

    // Idle: the stream still reports, at the same position.
    let mut idle = Received::default();
    read_until(&mut live, fence_revision, &mut idle).await;
    assert!(idle.ops.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_stream_gives_the_ops_of_one_that_never_broke() {
    let server = EtcdServer::start().expect("etcd");
    let mut client = kv(&server).await;
    let leases = [grant(&server, 600).await, grant(&server, 600).await];
    for index in 0..300 {
        let lease = match index % 50 {
            7 => leases[0],
            9 => leases[1],
            _ => 0,
        };
        put(
            &client,
            &format!("/app/{index:04}"),
            &format!("value {index}"),
            lease,
        )
        .await;
    }
    // A key ferry keeps for itself is never part of the stream.
    put(&client, "__ferry__/checkpoints/x", "{}", 0).await;

    let mut live = open(&server, "", LiveFrom::default()).await;
    let snapshot_revision = live.snapshot_position.0 as i64;
    let mut reference = Received::default();
    read_until(&mut live, snapshot_revision, &mut reference).await;
    let (snapshot_end, _) = reference.snapshot_complete.expect("the snapshot completes");
    assert_eq!(snapshot_end, 302, "300 keys and two leases");

    let mut last_revision = 0;
    for round in 0..5 {
        put(&client, &format!("/app/{round:04}"), "changed", 0).await;
        delete(&client, &format!("/app/{:04}", 100 + round)).await;
        last_revision = txn(
            &mut client,
            &[
                (&format!("/app/txn/{round}/a"), "a"),
                (&format!("/app/txn/{round}/b"), "b"),
            ],
            &format!("/app/{:04}", 200 + round),
        )
        .await;
    }
    // A lease the snapshot announced, used again live.
    last_revision = last_revision.max(put(&client, "/app/late", "late", leases[1]).await);
    read_until(&mut live, last_revision, &mut reference).await;
    drop(live);
    let all = reference.ops;
    assert_contiguous(&all, 1);
    assert_eq!(all.len(), 302 + 5 * 5 + 1);

    // Resumed in the middle of the snapshot: read again at R, the seqs the
    // target holds skipped, with or without the snapshot's end known.
    for snapshot_through_seq in [None, Some(snapshot_end)] {
        let from = LiveFrom {
            snapshot: Some(Position(snapshot_revision as u64)),
            from_seq_exclusive: 150,
            from_position_exclusive: Position(snapshot_revision as u64),
            snapshot_through_seq,
        };
        let mut resumed = open(&server, "", from).await;
        assert_eq!(resumed.snapshot_position.0 as i64, snapshot_revision);
        let mut received = Received::default();
        read_until(&mut resumed, last_revision, &mut received).await;
        assert_eq!(
            received.snapshot_complete,
            Some((snapshot_end, snapshot_revision as u64))
        );
        assert_same_ops(&received.ops, &all[150..]);
    }

    // Resumed right at the end of the snapshot: no snapshot read.
    let from = LiveFrom {
        snapshot: Some(Position(snapshot_revision as u64)),
        from_seq_exclusive: snapshot_end,
        from_position_exclusive: Position(snapshot_revision as u64),
        snapshot_through_seq: Some(snapshot_end),
    };
    let mut resumed = open(&server, "", from).await;
    let mut received = Received::default();
    read_until(&mut resumed, last_revision, &mut received).await;
    assert_eq!(received.snapshot_complete, None, "the snapshot is skipped");
    assert_same_but_regranted(&received.ops, &all[snapshot_end as usize..], leases[1]);

    // Resumed in the live changes, after the last op of a revision.
    let middle = all
        .iter()
        .position(|op| op.position > snapshot_revision as u64 + 4 && op.txn_last)
        .expect("a live revision");
    let from = LiveFrom {
        snapshot: Some(Position(snapshot_revision as u64)),
        from_seq_exclusive: all[middle].seq,
        from_position_exclusive: Position(all[middle].position),
        snapshot_through_seq: None,
    };
    let mut resumed = open(&server, "", from).await;
    let mut received = Received::default();
    read_until(&mut resumed, last_revision, &mut received).await;
    assert_contiguous(&received.ops, all[middle].seq + 1);
    assert_same_but_regranted(&received.ops, &all[middle + 1..], leases[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_revision_ends_the_stream_with_the_compaction_error() {
    let server = EtcdServer::start().expect("etcd");
    let mut client = kv(&server).await;
    for index in 0..10 {
        put(&client, &format!("/app/{index}"), "v", 0).await;
    }
    let mut live = open(&server, "/app/", LiveFrom::default()).await;
    let snapshot_revision = live.snapshot_position.0 as i64;
    let mut received = Received::default();
    read_until(&mut live, snapshot_revision, &mut received).await;
    drop(live);
    let (snapshot_end, _) = received.snapshot_complete.expect("complete");
    let mut last = 0;
    for index in 0..5 {
        last = put(&client, &format!("/app/{index}"), "changed", 0).await;
    }
    client
        .compact(CompactionRequest {
            revision: last,
            physical: true,
        })
        .await
        .expect("compact");

    let is_compacted = |error: &Error| {
        matches!(
            error,
            Error::Adapter(failure)
                if matches!(failure.platform_error::<EtcdError>(), Some(EtcdError::Compacted { .. }))
        )
    };
    // Following on from the snapshot needs revisions compacted away.
    let from = LiveFrom {
        snapshot: Some(Position(snapshot_revision as u64)),
        from_seq_exclusive: snapshot_end,
        from_position_exclusive: Position(snapshot_revision as u64),
        snapshot_through_seq: Some(snapshot_end),
    };
    let mut resumed = open(&server, "/app/", from).await;
    let error = loop {
        match tokio::time::timeout(STUCK, resumed.events.next())
            .await
            .expect("an event in time")
            .expect("the stream ends with an error, not silence")
        {
            Ok(LiveEvent::Batch(ops)) => panic!("no op can be read past a compaction: {ops:?}"),
            Ok(_) => continue,
            Err(error) => break error,
        }
    };
    assert!(is_compacted(&error), "the compaction error: {error}");
    assert!(
        error.to_string().contains("new snapshot"),
        "it says what to do: {error}"
    );

    // Re-reading the snapshot itself at R fails the same way.
    let from = LiveFrom {
        snapshot: Some(Position(snapshot_revision as u64)),
        from_seq_exclusive: 3,
        from_position_exclusive: Position(snapshot_revision as u64),
        snapshot_through_seq: None,
    };
    let failure = EtcdSource::new(
        connection(&server),
        EtcdSourceOptions {
            prefix: b"/app/".to_vec(),
            parallel: 1,
        },
    )
    .open_live(from, Arc::new(Progress::default()))
    .await;
    let error = match failure {
        Err(error) => error,
        Ok(mut live) => loop {
            match tokio::time::timeout(STUCK, live.events.next())
                .await
                .expect("an event in time")
                .expect("an error, not silence")
            {
                Ok(LiveEvent::Batch(ops)) => panic!("a compacted snapshot gives no op: {ops:?}"),
                Ok(_) => continue,
                Err(error) => break error,
            }
        },
    };
    assert!(is_compacted(&error), "the compaction error: {error}");
}

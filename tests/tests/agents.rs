//! The source and target agents as `ferry agent` processes beside two real
//! etcd servers, driven by hand with the client helpers the orchestrator
//! uses: a live stream relayed from one to the other while the source takes
//! writes, a target agent killed with -9 and resumed from its checkpoint
//! with nothing applied twice, an older epoch refused, and the token.

use std::time::{Duration, Instant};

use ferry_agent::client::{
    ClientOptions, SourceClient, TargetClient, connect_source, connect_target,
};
use ferry_proto::etcd::etcdserverpb::request_op::Request as TxnRequestOp;
use ferry_proto::etcd::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use ferry_proto::etcd::mvccpb::KeyValue;
use ferry_proto::v1::extract_response::Event;
use ferry_proto::v1::{
    ApplyAck, ApplyRequest, CheckpointRequest, DescribeRequest, DigestRequest, ExtractRequest,
    ExtractResponse, FenceRequest, OpBatch, StreamStart, UnfenceRequest,
};
use ferry_tests::etcd::EtcdServer;
use ferry_tests::plane::{FerryKeys, dump, ferry_with_env, grant, kv, put, time_to_live};
use ferry_tests::process::{FerryProcess, signal};
use tokio::sync::mpsc;
use tonic::{Code, Streaming};

const TOKEN: &str = "test-agent-token-4f1c";
/// How long a test waits for a stream before calling it stuck (a guard
/// against hanging, not a measurement).
const STUCK: Duration = Duration::from_secs(60);

/// A `ferry agent` process, killed with -9 when dropped.
struct Agent {
    process: FerryProcess,
    address: String,
}

impl Agent {
    fn start(role: &str, server: &EtcdServer) -> Agent {
        Self::start_with(role, server, &[])
    }

    fn start_with(role: &str, server: &EtcdServer, extra: &[String]) -> Agent {
        let url = server.url();
        let mut args = vec![
            "agent",
            role,
            "--control-plane",
            &url,
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend(extra.iter().map(String::as_str));
        let process = FerryProcess::start(&args, &[("FERRY_AGENT_TOKEN", TOKEN)])
            .expect("ferry agent starts");
        assert_eq!(process.ready()["role"], role);
        assert_eq!(process.ready()["token_required"], true);
        Agent {
            address: process.field("listen"),
            process,
        }
    }

    fn kill(mut self) {
        // SIGKILL: no chance to finish anything.
        self.process.kill();
    }
}

/// An mpsc receiver as the request stream of an Apply call.
fn requests_of(
    receiver: mpsc::Receiver<ApplyRequest>,
) -> impl futures::Stream<Item = ApplyRequest> + Send + 'static {
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|request| (request, receiver))
    })
}

fn options() -> ClientOptions {
    ClientOptions {
        token: Some(TOKEN.to_owned()),
        ..ClientOptions::default()
    }
}

async fn source_client(agent: &Agent) -> SourceClient {
    connect_source(&agent.address, &options())
        .await
        .expect("the source agent answers")
}

async fn target_client(agent: &Agent) -> TargetClient {
    connect_target(&agent.address, &options())
        .await
        .expect("the target agent answers")
}

/// Writes `count` changes to the source: puts (new keys and overwrites),
/// deletes and Txns, each with a unique value.
async fn write_changes(endpoint: String, count: usize, lease: i64) {
    let mut client = kv(&endpoint).await;
    for index in 0..count {
        match index % 5 {
            0 | 1 => {
                put(
                    &client,
                    &format!("/app/live/{index:05}"),
                    &format!("w{index}"),
                    0,
                )
                .await;
            }
            2 => {
                put(
                    &client,
                    &format!("/app/seed/{:04}", index % 200),
                    &format!("w{index}"),
                    0,
                )
                .await;
            }
            3 => {
                client
                    .delete_range(DeleteRangeRequest {
                        key: format!("/app/live/{:05}", index - 3).into_bytes(),
                        ..DeleteRangeRequest::default()
                    })
                    .await
                    .expect("delete");
            }
            _ => {
                let puts = (0..3).map(|part| RequestOp {
                    request: Some(TxnRequestOp::RequestPut(PutRequest {
                        key: format!("/app/txn/{index:05}/{part}").into_bytes(),
                        value: format!("w{index}.{part}").into_bytes(),
                        lease: if part == 0 { lease } else { 0 },
                        ..PutRequest::default()
                    })),
                });
                client
                    .txn(TxnRequest {
                        compare: Vec::new(),
                        success: puts.collect(),
                        failure: Vec::new(),
                    })
                    .await
                    .expect("txn");
            }
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// A stream relayed by hand from a source agent to a target agent.
struct Relay {
    extract: Streaming<ExtractResponse>,
    requests: mpsc::Sender<ApplyRequest>,
    acks: Streaming<ApplyAck>,
    start: StreamStart,
    applied_through_seq: u64,
    snapshot_through_seq: Option<u64>,
    sent_position: u64,
    sent_through_seq: u64,
}

impl Relay {
    async fn open(
        source: &mut SourceClient,
        target: &mut TargetClient,
        request: ExtractRequest,
    ) -> Relay {
        let mut extract = source.extract(request).await.expect("extract").into_inner();
        let start = match extract.message().await.expect("a first message") {
            Some(ExtractResponse {
                event: Some(Event::Start(start)),
            }) => start,
            other => panic!("a stream starts with its StreamStart, not {other:?}"),
        };
        let (requests, receiver) = mpsc::channel(8);
        requests
            .send(ApplyRequest {
                batch: None,
                start: Some(start.clone()),
            })
            .await
            .expect("the start is sent");
        let acks = target
            .apply(requests_of(receiver))
            .await
            .expect("apply")
            .into_inner();
        Relay {
            extract,
            requests,
            acks,
            start,
            applied_through_seq: 0,
            snapshot_through_seq: None,
            sent_position: 0,
            sent_through_seq: 0,
        }
    }

    /// Relays until `done` holds.
    async fn until(&mut self, done: impl Fn(&Relay) -> bool) {
        while !done(self) {
            let step = tokio::time::timeout(STUCK, async {
                tokio::select! {
                    message = self.extract.message() => {
                        match message.expect("the extract stream holds").expect("it does not end").event {
                            Some(Event::Batch(batch)) => self
                                .requests
                                .send(ApplyRequest { batch: Some(batch), start: None })
                                .await
                                .expect("the apply stream takes it"),
                            Some(Event::SnapshotComplete(complete)) => {
                                self.snapshot_through_seq = Some(complete.through_seq);
                            }
                            Some(Event::Progress(progress)) => {
                                assert!(progress.head_position >= progress.position);
                                self.sent_position = progress.position;
                                self.sent_through_seq = progress.through_seq;
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                    ack = self.acks.message() => {
                        let ack = ack.expect("the apply stream holds").expect("it does not end");
                        assert!(ack.applied_through_seq >= self.applied_through_seq, "acks only move forward");
                        self.applied_through_seq = ack.applied_through_seq;
                    }
                }
            })
            .await;
            assert!(step.is_ok(), "the relay is stuck");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_stream_through_the_agents_survives_a_killed_target_agent() {
    let source_etcd = EtcdServer::start().expect("source etcd");
    let target_etcd = EtcdServer::start().expect("target etcd");
    let lease = grant(&source_etcd, 600).await;
    let client = kv(&source_etcd).await;
    for index in 0..200 {
        let on_lease = if index % 40 == 1 { lease } else { 0 };
        put(
            &client,
            &format!("/app/seed/{index:04}"),
            &format!("s{index}"),
            on_lease,
        )
        .await;
    }

    let source_agent = Agent::start("source", &source_etcd);
    let target_agent = Agent::start("target", &target_etcd);
    let mut source = source_client(&source_agent).await;
    let mut target = target_client(&target_agent).await;
    let description = target
        .describe(DescribeRequest {})
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(description.control_plane_url, target_etcd.url());

    let epoch = 7;
    let mut relay = Relay::open(
        &mut source,
        &mut target,
        ExtractRequest {
            follow: true,
            epoch,
            ..ExtractRequest::default()
        },
    )
    .await;
    assert!(
        relay.start.stream_id.starts_with("etcd-"),
        "{}",
        relay.start.stream_id
    );
    assert_eq!(relay.start.platform, "etcd");
    relay
        .until(|relay| relay.snapshot_through_seq.is_some())
        .await;
    let snapshot_end = relay.snapshot_through_seq.expect("complete");
    assert_eq!(snapshot_end, 201, "200 keys and their lease");

    // Writes while the stream runs; the target agent dies in the middle.
    let writer = tokio::spawn(write_changes(source_etcd.endpoint(), 600, lease));
    relay
        .until(|relay| relay.applied_through_seq > snapshot_end + 100)
        .await;
    let start = relay.start.clone();
    drop(relay);
    target_agent.kill();
    let target_agent = Agent::start("target", &target_etcd);
    let mut target = target_client(&target_agent).await;
    let checkpoint = target
        .checkpoint(CheckpointRequest {
            stream_id: start.stream_id.clone(),
        })
        .await
        .expect("checkpoint")
        .into_inner();
    assert!(checkpoint.applied_through_seq > snapshot_end + 100);
    assert_eq!(checkpoint.epoch, epoch);
    let mut relay = Relay::open(
        &mut source,
        &mut target,
        ExtractRequest {
            from_position_exclusive: checkpoint.applied_through_position,
            follow: true,
            epoch,
            stream_id: start.stream_id.clone(),
            snapshot_position: start.snapshot_position,
            from_seq_exclusive: checkpoint.applied_through_seq,
            snapshot_through_seq: snapshot_end,
            key_prefix: Vec::new().into(),
        },
    )
    .await;
    assert_eq!(relay.start.stream_id, start.stream_id, "the same stream");
    assert_eq!(relay.start.snapshot_position, start.snapshot_position);
    writer.await.expect("the writer finishes");

    // The cutover's end: fence, then apply through the fenced position.
    let fenced = source
        .fence(FenceRequest {
            epoch,
            successor_url: "etcd://127.0.0.1:1".to_owned(),
        })
        .await
        .expect("fence")
        .into_inner()
        .fenced_position;
    relay.until(|relay| relay.sent_position >= fenced).await;
    let through = relay.sent_through_seq;
    relay
        .until(|relay| relay.applied_through_seq >= through)
        .await;

    let expected = dump(&source_etcd, "", FerryKeys::Excluded).await;
    let restored = dump(&target_etcd, "", FerryKeys::Excluded).await;
    assert!(
        expected.len() > 300,
        "the writes happened: {}",
        expected.len()
    );
    let keys = |kvs: &[KeyValue]| kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&restored), keys(&expected), "the same keys");
    for (source_kv, target_kv) in expected.iter().zip(&restored) {
        let key = String::from_utf8_lossy(&source_kv.key);
        assert_eq!(target_kv.value, source_kv.value, "value of {key}");
        // Every key was put once before the snapshot or created after it,
        // so its version counts its puts on both sides: one applied twice
        // shows.
        assert_eq!(target_kv.version, source_kv.version, "version of {key}");
        assert_eq!(target_kv.lease, source_kv.lease, "lease of {key}");
    }
    source
        .unfence(UnfenceRequest { epoch })
        .await
        .expect("unfence");
}

/// A batch of one op putting `key`, seq `seq`, at `position`.
fn one_put(stream_id: &str, epoch: u64, seq: u64, key: &str) -> OpBatch {
    OpBatch {
        stream_id: stream_id.to_owned(),
        epoch,
        ops: vec![ferry_engine::Op {
            seq,
            position: 10 + seq,
            txn: 10 + seq,
            txn_last: true,
            kind: "etcd.kv".into(),
            key: key.as_bytes().to_vec().into(),
            method: "Put".into(),
            body: format!("value {seq}").into_bytes().into(),
            ..ferry_engine::Op::default()
        }],
        end_of_stream: false,
    }
}

/// Opens an Apply stream with `start` and `batch`; the first answer.
async fn apply_one(
    target: &mut TargetClient,
    start: &StreamStart,
    batch: OpBatch,
) -> Result<ApplyAck, tonic::Status> {
    let (requests, receiver) = mpsc::channel(2);
    requests
        .send(ApplyRequest {
            batch: Some(batch),
            start: Some(start.clone()),
        })
        .await
        .expect("sent");
    let mut acks = target.apply(requests_of(receiver)).await?.into_inner();
    let ack = acks.message().await?;
    drop(requests);
    Ok(ack.expect("an ack or an error, not the end"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_epoch_is_refused_by_both_agents() {
    let source_etcd = EtcdServer::start().expect("source etcd");
    let target_etcd = EtcdServer::start().expect("target etcd");
    let source_agent = Agent::start("source", &source_etcd);
    let target_agent = Agent::start("target", &target_etcd);
    let mut source = source_client(&source_agent).await;
    let mut target = target_client(&target_agent).await;

    let start = StreamStart {
        stream_id: "etcd-test-epochs".to_owned(),
        platform: "etcd".to_owned(),
        platform_version: "3.4".to_owned(),
        snapshot_position: 10,
        source_identity: "00000000000000aa".to_owned(),
    };
    let ack = apply_one(&mut target, &start, one_put(&start.stream_id, 5, 1, "/a"))
        .await
        .expect("epoch 5 applies");
    assert_eq!((ack.applied_through_seq, ack.epoch), (1, 5));
    let stored = target
        .checkpoint(CheckpointRequest::default())
        .await
        .expect("checkpoint without a stream")
        .into_inner();
    assert_eq!(stored.epoch, 5, "the target keeps the highest epoch");

    // A stale migration attempt, with the next seq: refused, not applied.
    let refused = apply_one(&mut target, &start, one_put(&start.stream_id, 4, 2, "/b"))
        .await
        .expect_err("epoch 4 is refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains('4') && refused.message().contains('5'),
        "names both epochs: {}",
        refused.message()
    );
    let checkpoint = target
        .checkpoint(CheckpointRequest {
            stream_id: start.stream_id.clone(),
        })
        .await
        .expect("checkpoint")
        .into_inner();
    assert_eq!(
        checkpoint.applied_through_seq, 1,
        "nothing of epoch 4 applied"
    );
    assert!(
        dump(&target_etcd, "", FerryKeys::Excluded)
            .await
            .iter()
            .all(|kv| kv.key != b"/b")
    );

    // The same batch of the current epoch applies; one already held is acked
    // without being applied again.
    let ack = apply_one(&mut target, &start, one_put(&start.stream_id, 5, 1, "/a"))
        .await
        .expect("a replay");
    assert_eq!(ack.applied_through_seq, 1);
    let ack = apply_one(&mut target, &start, one_put(&start.stream_id, 6, 2, "/b"))
        .await
        .expect("a later epoch applies");
    assert_eq!((ack.applied_through_seq, ack.epoch), (2, 6));
    let target_kvs = dump(&target_etcd, "", FerryKeys::Excluded).await;
    assert_eq!(target_kvs.len(), 2);
    assert!(
        target_kvs.iter().all(|kv| kv.version == 1),
        "each put applied once"
    );

    // The source's fence keeps its epoch too.
    let fenced = source
        .fence(FenceRequest {
            epoch: 3,
            successor_url: "etcd://127.0.0.1:1".to_owned(),
        })
        .await
        .expect("fence")
        .into_inner();
    assert!(fenced.fenced_position > 0);
    let refused = source
        .fence(FenceRequest {
            epoch: 2,
            successor_url: "etcd://127.0.0.1:1".to_owned(),
        })
        .await
        .expect_err("an older fence");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let refused = source
        .unfence(UnfenceRequest { epoch: 2 })
        .await
        .expect_err("an older unfence");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    source
        .unfence(UnfenceRequest { epoch: 3 })
        .await
        .expect("unfence by the fencing epoch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_agents_token_are_unauthenticated() {
    let source_etcd = EtcdServer::start().expect("source etcd");
    let source_agent = Agent::start("source", &source_etcd);
    for token in [
        None,
        Some("wrong-token".to_owned()),
        Some(format!("{TOKEN}x")),
    ] {
        let options = ClientOptions {
            token,
            ..ClientOptions::default()
        };
        let mut client = connect_source(&source_agent.address, &options)
            .await
            .expect("connects");
        let refused = client
            .describe(DescribeRequest {})
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Code::Unauthenticated);
        let refused = client
            .extract(ExtractRequest {
                follow: true,
                ..ExtractRequest::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    let description = source_client(&source_agent)
        .await
        .describe(DescribeRequest {})
        .await
        .expect("with the token")
        .into_inner();
    assert_eq!(description.platform, "etcd");
    assert_eq!(description.identity.len(), 16, "{}", description.identity);
    assert!(!description.platform_version.is_empty());
    assert_eq!(description.control_plane_url, source_etcd.url());
}

/// A CA and a certificate for 127.0.0.1 signed by it, as PEM files.
fn certificates(dir: &std::path::Path) -> (String, String, String) {
    ferry_tests::tls::write_test_pki(dir);
    let file = |name: &str| dir.join(name).display().to_string();
    (file("ca.pem"), file("server.pem"), file("server-key.pem"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serves_tls_with_its_certificate() {
    let source_etcd = EtcdServer::start().expect("source etcd");
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = certificates(dir.path());
    let agent = Agent::start_with(
        "source",
        &source_etcd,
        &[
            "--tls-cert-file".to_owned(),
            cert,
            "--tls-key-file".to_owned(),
            key,
        ],
    );
    let tls_options = ClientOptions {
        tls_ca_file: Some(ca.into()),
        ..options()
    };
    let description = connect_source(&agent.address, &tls_options)
        .await
        .expect("a TLS connection with the agent's CA")
        .describe(DescribeRequest {})
        .await
        .expect("describe over TLS")
        .into_inner();
    assert_eq!(description.platform, "etcd");

    // Plain HTTP/2 to the TLS port gets no answer.
    let plain = match connect_source(&agent.address, &options()).await {
        Ok(mut client) => client.describe(DescribeRequest {}).await.map(|_| ()),
        Err(error) => Err(tonic::Status::unavailable(error.to_string())),
    };
    assert!(plain.is_err(), "plain text is refused by a TLS agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extract_and_restore_through_agent_urls() {
    let source_etcd = EtcdServer::start().expect("source etcd");
    let target_etcd = EtcdServer::start().expect("target etcd");
    let lease = grant(&source_etcd, 600).await;
    let client = kv(&source_etcd).await;
    for index in 0..500 {
        let on_lease = if index % 100 == 0 { lease } else { 0 };
        put(
            &client,
            &format!("/app/{index:04}"),
            &format!("v{index}"),
            on_lease,
        )
        .await;
    }
    put(&client, "/elsewhere/x", "not in the prefix", 0).await;
    let source_agent = Agent::start("source", &source_etcd);
    let target_agent = Agent::start("target", &target_etcd);
    let store = tempfile::tempdir().expect("store dir");
    let store_url = format!("file://{}", store.path().display());

    let run = |args: &[&str]| {
        let output = ferry_with_env(args, &[("FERRY_AGENT_TOKEN", TOKEN)]);
        assert!(
            output.status.success(),
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("a JSON summary")
    };
    let source_url = format!("agent://{}", source_agent.address);
    let extracted = run(&[
        "--output",
        "json",
        "extract",
        "--source",
        &source_url,
        "--prefix",
        "/app/",
        "--to",
        &store_url,
    ]);
    assert_eq!(extracted["ops"], 501, "500 keys and their lease");
    let target_url = format!("agent://{}", target_agent.address);
    let restored = run(&[
        "--output",
        "json",
        "restore",
        "--from",
        &store_url,
        "--target",
        &target_url,
    ]);
    assert_eq!(restored["ops"], 501);

    let expected: Vec<KeyValue> = dump(&source_etcd, "", FerryKeys::Excluded)
        .await
        .into_iter()
        .filter(|kv| kv.key.starts_with(b"/app/"))
        .collect();
    let target_kvs = dump(&target_etcd, "", FerryKeys::Excluded).await;
    assert_eq!(target_kvs.len(), expected.len());
    for (source_kv, target_kv) in expected.iter().zip(&target_kvs) {
        assert_eq!(target_kv.key, source_kv.key);
        assert_eq!(target_kv.value, source_kv.value);
        assert_eq!(target_kv.version, 1, "applied once");
        assert_eq!(target_kv.lease, source_kv.lease, "the lease keeps its id");
    }

    // The target agent's checkpoint says the stream is complete: again, nothing.
    let again = run(&[
        "--output",
        "json",
        "restore",
        "--from",
        &store_url,
        "--target",
        &target_url,
    ]);
    assert_eq!(again["ops"], 0);
    assert!(
        dump(&target_etcd, "", FerryKeys::Excluded)
            .await
            .iter()
            .all(|kv| kv.version == 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_granted_by_a_stream_are_kept_alive_while_it_runs() {
    let target_etcd = EtcdServer::start().expect("target etcd");
    let target_agent = Agent::start("target", &target_etcd);
    let mut target = target_client(&target_agent).await;
    let lease_id: i64 = 0x5eed;
    let lease_key = format!("{lease_id:016x}");
    let start = StreamStart {
        stream_id: "etcd-test-leases".to_owned(),
        platform: "etcd".to_owned(),
        ..StreamStart::default()
    };
    let batch = OpBatch {
        stream_id: start.stream_id.clone(),
        epoch: 1,
        ops: vec![
            ferry_engine::Op {
                seq: 1,
                position: 5,
                txn_last: true,
                kind: "etcd.lease".into(),
                key: lease_key.clone().into_bytes().into(),
                method: "LeaseGrant".into(),
                body: format!(r#"{{"id":{lease_id},"ttl":3,"granted_ttl":3}}"#)
                    .into_bytes()
                    .into(),
                ..ferry_engine::Op::default()
            },
            ferry_engine::Op {
                seq: 2,
                position: 5,
                txn_last: true,
                kind: "etcd.kv".into(),
                key: "/leased".into(),
                method: "Put".into(),
                body: "v".into(),
                deps: vec![lease_key.into_bytes().into()],
                ..ferry_engine::Op::default()
            },
        ],
        end_of_stream: false,
    };
    let (requests, receiver) = mpsc::channel(2);
    requests
        .send(ApplyRequest {
            batch: Some(batch),
            start: Some(start),
        })
        .await
        .expect("sent");
    let mut acks = target
        .apply(requests_of(receiver))
        .await
        .expect("apply")
        .into_inner();
    let ack = acks.message().await.expect("an ack").expect("an ack");
    assert_eq!(ack.applied_through_seq, 2);

    // The agent granted the lease before it acked the put on it: left
    // alone, the lease has no more than its granted TTL from here.
    let acked = Instant::now();
    let remaining = || async { time_to_live(&target_etcd, lease_id, false).await.ttl };
    // With the stream open, the agent keeps the lease alive: it outlives
    // its granted TTL by a clear margin. The TTL left is read until a
    // reading asked for twice the granted TTL after the ack still has a
    // second or more left, which only a renewal after the grant gives. etcd
    // rounds the TTL left down, so a reading of 0 (under a second left,
    // the renewal late on a loaded machine) is no failure by itself; the
    // lease gone (-1) is, at any reading.
    let mut readings = Vec::new();
    loop {
        let asked = Instant::now();
        let answer = time_to_live(&target_etcd, lease_id, false).await;
        readings.push(answer.ttl);
        let since_ack = asked.duration_since(acked);
        assert!(
            answer.ttl >= 0,
            "the lease expired while the stream ran ({since_ack:?} after the ack; TTLs read: {readings:?})"
        );
        let granted = Duration::from_secs(answer.granted_ttl.max(1) as u64);
        if since_ack > 2 * granted && answer.ttl >= 1 {
            break;
        }
        assert!(
            since_ack < STUCK,
            "the lease (granted {granted:?}) showed no renewal in {since_ack:?} (TTLs read: {readings:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        dump(&target_etcd, "", FerryKeys::Excluded).await.len(),
        1,
        "its key too"
    );

    // The stream ends: nobody keeps it alive any more, and etcd expires it
    // (waited for, not assumed after a fixed time: etcd's own clock decides).
    drop(requests);
    while acks.message().await.ok().flatten().is_some() {}
    // An expired lease reads TTL 0 until etcd revokes it, with its key.
    let expired = async {
        while remaining().await > 0 || !dump(&target_etcd, "", FerryKeys::Excluded).await.is_empty()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), expired)
        .await
        .expect("the lease expired once the stream ended, and took its key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stops_on_sigterm_even_with_a_live_stream_open() {
    let source_etcd = EtcdServer::start().expect("source etcd");
    let mut agent = Agent::start("source", &source_etcd);
    let mut source = source_client(&agent).await;
    let mut stream = source
        .extract(ExtractRequest {
            follow: true,
            epoch: 1,
            ..ExtractRequest::default()
        })
        .await
        .expect("extract")
        .into_inner();
    // The stream is live: its start, the snapshot's end, then progress.
    loop {
        match stream
            .message()
            .await
            .expect("a message")
            .and_then(|m| m.event)
        {
            Some(Event::Progress(_)) => break,
            Some(_) => continue,
            None => panic!("the stream ended"),
        }
    }
    signal(agent.process.pid(), "-TERM");
    let exited = tokio::time::timeout(
        STUCK,
        tokio::task::spawn_blocking(move || agent.process.wait().expect("wait")),
    )
    .await
    .expect("the agent exits after SIGTERM although a stream is open")
    .expect("joined");
    assert!(exited.success(), "a clean exit: {exited}");
    // The open stream ends (the agent is gone), rather than hanging.
    while let Ok(Some(_)) = stream.message().await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_match_when_the_planes_hold_the_same_keys_and_name_a_difference() {
    let source_etcd = EtcdServer::start().expect("source etcd");
    let target_etcd = EtcdServer::start().expect("target etcd");
    let (source_kv, target_kv) = (kv(&source_etcd).await, kv(&target_etcd).await);
    // The same keys, written in another order, and ferry's own key on the
    // target only.
    for index in 0..300 {
        put(
            &source_kv,
            &format!("/d/{index:03}"),
            &format!("v{index}"),
            0,
        )
        .await;
    }
    for index in (0..300).rev() {
        put(
            &target_kv,
            &format!("/d/{index:03}"),
            &format!("v{index}"),
            0,
        )
        .await;
    }
    put(&target_kv, "__ferry__/checkpoints/x", "{}", 0).await;
    let source_agent = Agent::start("source", &source_etcd);
    let target_agent = Agent::start("target", &target_etcd);
    let mut source = source_client(&source_agent).await;
    let mut target = target_client(&target_agent).await;
    let digest = |position: u64| DigestRequest {
        key_prefix: b"/d/".to_vec().into(),
        position,
    };

    let before = source.digest(digest(0)).await.expect("digest").into_inner();
    let same = target.digest(digest(0)).await.expect("digest").into_inner();
    assert_eq!(before.keys, 300);
    assert_eq!(before.sha256.len(), 32);
    assert_eq!(
        (before.keys, before.bytes, &before.sha256),
        (same.keys, same.bytes, &same.sha256),
        "the same keys and values, whatever the revisions"
    );

    // One value changes on the source: the digest now differs, and the
    // digest at the earlier position is still the old one.
    put(&source_kv, "/d/150", "changed", 0).await;
    let after = source.digest(digest(0)).await.expect("digest").into_inner();
    assert_eq!(after.keys, 300);
    assert_ne!(after.sha256, same.sha256, "one value differs");
    assert!(after.position > before.position);
    let then = source
        .digest(digest(before.position))
        .await
        .expect("digest at a position")
        .into_inner();
    assert_eq!(then.sha256, before.sha256, "read at the earlier revision");

    // A key moved to the value's place is a difference too.
    put(&target_kv, "/d/150", "changed", 0).await;
    put(&target_kv, "/d/299x", "", 0).await;
    let moved = target.digest(digest(0)).await.expect("digest").into_inner();
    assert_eq!(moved.keys, 301);
    assert_ne!(moved.sha256, after.sha256);

    // A position etcd compacted is refused with what to do.
    let mut maintenance = ferry_proto::etcd::etcdserverpb::kv_client::KvClient::connect(format!(
        "http://{}",
        source_etcd.endpoint()
    ))
    .await
    .expect("kv");
    maintenance
        .compact(ferry_proto::etcd::etcdserverpb::CompactionRequest {
            revision: after.position as i64,
            physical: true,
        })
        .await
        .expect("compact");
    let compacted = source
        .digest(digest(before.position))
        .await
        .expect_err("compacted");
    assert_eq!(compacted.code(), Code::FailedPrecondition, "{compacted:?}");
    assert!(compacted.message().contains("compacted"), "{compacted:?}");
}

/// G1 beyond the unit tests: one stream with a gap (seq 1, 2, then 4) is
/// refused, naming the missing seq, by each of its consumers: the backup
/// writer (and no backup is sealed), the etcd sink (and nothing after the
/// gap is in the target), and the target agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_a_gap_is_refused_naming_the_seq_by_each_consumer() {
    let with_gap = || {
        [1, 2, 4]
            .map(|seq| one_put("etcd-test-gap", 1, seq, &format!("/gap/{seq}")).ops[0].clone())
            .to_vec()
    };

    // The backup writer.
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        ferry_engine::store::BackupStore::open(&format!("file://{}", dir.path().display()), true)
            .expect("store");
    let ops = with_gap();
    let extraction = ferry_engine::adapters::Extraction {
        info: ferry_engine::manifest::SourceInfo {
            platform: "etcd".to_owned(),
            ..Default::default()
        },
        ops: Box::pin(futures::stream::iter([
            Ok(ops[..2].to_vec()),
            Ok(ops[2..].to_vec()),
        ])),
    };
    let error = ferry_engine::backup::write_backup(
        &store,
        extraction,
        ferry_engine::backup::ExtractOptions::default(),
        std::sync::Arc::new(ferry_engine::progress::Progress::default()),
    )
    .await
    .expect_err("a gap is refused");
    assert!(error.to_string().contains("seq 3 is missing"), "{error}");
    // Its start record is there, with the extract's failure beside it.
    let listings = store.list_backups().await.expect("list");
    assert!(
        listings.iter().all(|listing| !listing.is_complete()),
        "no backup was sealed"
    );
    let failure = store
        .get_failure(&listings[0].backup_id)
        .await
        .expect("read")
        .expect("the failure is recorded");
    assert!(failure.reason.contains("seq 3 is missing"), "{failure:?}");

    // The etcd sink.
    let sink_etcd = EtcdServer::start().expect("etcd");
    let mut sink = ferry_engine::adapters::sink_from_url(
        &sink_etcd.url(),
        &ferry_engine::adapters::SinkOptions::default(),
    )
    .expect("sink");
    sink.begin(&ferry_engine::adapters::StreamInfo {
        stream_id: "etcd-test-gap".to_owned(),
        ..Default::default()
    })
    .await
    .expect("begin");
    let error = sink.apply(with_gap()).await.expect_err("a gap is refused");
    assert!(error.to_string().contains("seq 3 is missing"), "{error}");
    let mut client = kv(&sink_etcd).await;
    let after_the_gap = client
        .range(RangeRequest {
            key: b"/gap/4".to_vec(),
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert!(
        after_the_gap.kvs.is_empty(),
        "an op after the gap was applied"
    );

    // The target agent.
    let target_etcd = EtcdServer::start().expect("etcd");
    let target_agent = Agent::start("target", &target_etcd);
    let mut target = target_client(&target_agent).await;
    let start = StreamStart {
        stream_id: "etcd-test-gap".to_owned(),
        platform: "etcd".to_owned(),
        ..StreamStart::default()
    };
    let batch = OpBatch {
        ops: with_gap(),
        ..one_put("etcd-test-gap", 1, 1, "/gap/1")
    };
    let refused = apply_one(&mut target, &start, batch)
        .await
        .expect_err("a gap is refused");
    assert!(
        refused.message().contains("seq 3 is missing"),
        "{refused:?}"
    );
    assert!(
        dump(&target_etcd, "", FerryKeys::Excluded)
            .await
            .iter()
            .all(|kv| kv.key != b"/gap/4")
    );
}

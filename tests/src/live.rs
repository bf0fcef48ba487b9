//! A live migration's moving parts for tests and benches: two etcds, the
//! two agents and the gateway as `ferry` processes, writer clients that
//! record how each write was answered, and the history each key must have
//! in the new etcd afterwards.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_proto::etcd::etcdserverpb::request_op::Request;
use ferry_proto::etcd::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::etcd::EtcdServer;
use crate::process::{FerryProcess, TcpProxy};

/// Every key the test writes starts with this.
pub const PREFIX: &str = "/live/";
/// Writer clients.
pub const WRITERS: usize = 4;
/// Keys each writer owns (one writer per key).
pub const KEYS_PER_WRITER: usize = 12;
/// Keys in the old etcd before anything starts.
pub const SEEDED_KEYS: usize = 500;

pub use crate::plane::Effect;

/// One write a client made, and how it was answered.
#[derive(Debug, Clone)]
pub struct Write {
    /// Which writer.
    pub writer: usize,
    /// Its number among the writer's writes, from 1.
    pub number: u64,
    /// What it does to which keys.
    pub effects: Vec<(Vec<u8>, Effect)>,
    /// How it was answered.
    pub answer: Result<Answer, (tonic::Code, String)>,
    /// When its answer came: the gaps between a writer's acknowledged
    /// writes say how long its writes were refused or waited.
    pub answered_at: Instant,
}

/// Which etcd answered, and at what revision.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// The answering etcd's cluster id.
    pub cluster_id: u64,
    /// The revision in its answer's header.
    pub revision: i64,
    /// For a delete: keys it deleted (a delete of a missing key changes nothing).
    pub deleted: i64,
}

pub use crate::plane::{cluster_id_and_revision, kv};

/// The value of `key` in the etcd (or gateway) at `endpoint`, if any.
pub async fn value_at(endpoint: &str, key: &str) -> Option<Vec<u8>> {
    crate::plane::value_at_revision(endpoint, key, 0).await
}

/// Puts `key` = `value` through the etcd (or gateway) at `endpoint`.
pub async fn put_at(endpoint: &str, key: &str, value: &str) -> Result<(), tonic::Status> {
    crate::plane::try_put(endpoint, key, value, 0)
        .await
        .map(|_| ())
}

/// The `index`th key of `writer`.
pub fn writer_key(writer: usize, index: usize) -> Vec<u8> {
    format!("{PREFIX}w{writer}/k{index:02}").into_bytes()
}

/// Fills the old etcd before the migration.
pub async fn seed(endpoint: &str) {
    let mut client = kv(endpoint).await;
    for index in 0..SEEDED_KEYS {
        client
            .put(PutRequest {
                key: format!("{PREFIX}seed/{index:05}").into_bytes(),
                value: format!("seeded value {index} {}", "x".repeat(150)).into_bytes(),
                ..PutRequest::default()
            })
            .await
            .expect("seed put");
    }
    for writer in 0..WRITERS {
        for index in 0..KEYS_PER_WRITER {
            client
                .put(PutRequest {
                    key: writer_key(writer, index),
                    value: format!("w{writer} initial {index}").into_bytes(),
                    ..PutRequest::default()
                })
                .await
                .expect("seed put");
        }
    }
}

/// One client: puts, deletes and Txns with unique values on its own keys,
/// one at a time, through the gateway, until told to stop.
pub async fn writer(
    writer: usize,
    gateway: String,
    stop: Arc<AtomicBool>,
    pace: Duration,
) -> Vec<Write> {
    let keys = WriterKeys {
        key: writer_key,
        value: |writer, number, key| format!("w{writer} n{number} k{key}").into_bytes(),
    };
    writer_with(writer, gateway, stop, pace, keys).await
}

/// The keys a writer owns and the values it writes.
#[derive(Debug, Clone, Copy)]
pub struct WriterKeys {
    /// The `index`th key (below [`KEYS_PER_WRITER`]) of a writer.
    pub key: fn(writer: usize, index: usize) -> Vec<u8>,
    /// The value a writer's `number`th write puts in its `index`th key:
    /// unique per write and key.
    pub value: fn(writer: usize, number: u64, index: usize) -> Vec<u8>,
}

/// [`writer`] over other keys and values.
pub async fn writer_with(
    writer: usize,
    gateway: String,
    stop: Arc<AtomicBool>,
    pace: Duration,
    keys: WriterKeys,
) -> Vec<Write> {
    let writer_key = keys.key;
    let mut rng = StdRng::seed_from_u64(writer as u64 * 7919 + 1);
    let mut client = kv(&gateway).await;
    let mut writes = Vec::new();
    let mut number = 0u64;
    while !stop.load(Ordering::SeqCst) {
        number += 1;
        let value = |key: usize| (keys.value)(writer, number, key);
        let roll = rng.random_range(0..10);
        let first = rng.random_range(0..KEYS_PER_WRITER);
        let (effects, answer) = if roll < 6 {
            let key = writer_key(writer, first);
            let result = client
                .put(PutRequest {
                    key: key.clone(),
                    value: value(first),
                    ..PutRequest::default()
                })
                .await;
            let answer = result.map(|answer| {
                let header = answer.into_inner().header.unwrap_or_default();
                Answer {
                    cluster_id: header.cluster_id,
                    revision: header.revision,
                    deleted: 0,
                }
            });
            (vec![(key, Effect::Put(value(first)))], answer)
        } else if roll < 8 {
            let key = writer_key(writer, first);
            let result = client
                .delete_range(DeleteRangeRequest {
                    key: key.clone(),
                    ..DeleteRangeRequest::default()
                })
                .await;
            let answer = result.map(|answer| {
                let answer = answer.into_inner();
                let header = answer.header.unwrap_or_default();
                Answer {
                    cluster_id: header.cluster_id,
                    revision: header.revision,
                    deleted: answer.deleted,
                }
            });
            (vec![(key, Effect::Delete)], answer)
        } else {
            let second = (first + 1 + rng.random_range(0..KEYS_PER_WRITER - 1)) % KEYS_PER_WRITER;
            let keys = [first, second];
            let success = keys
                .iter()
                .map(|&index| RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: writer_key(writer, index),
                        value: value(index),
                        ..PutRequest::default()
                    })),
                })
                .collect();
            let result = client
                .txn(TxnRequest {
                    compare: Vec::new(),
                    success,
                    failure: Vec::new(),
                })
                .await;
            let answer = result.map(|answer| {
                let header = answer.into_inner().header.unwrap_or_default();
                Answer {
                    cluster_id: header.cluster_id,
                    revision: header.revision,
                    deleted: 0,
                }
            });
            (
                keys.iter()
                    .map(|&index| (writer_key(writer, index), Effect::Put(value(index))))
                    .collect(),
                answer,
            )
        };
        writes.push(Write {
            writer,
            number,
            effects,
            answer: answer.map_err(|status| (status.code(), status.message().to_owned())),
            answered_at: Instant::now(),
        });
        tokio::time::sleep(pace).await;
    }
    writes
}

/// Every change under [`PREFIX`] in `endpoint`'s history, per key, in
/// order: [`crate::plane::history`].
pub async fn history(endpoint: &str) -> BTreeMap<Vec<u8>, Vec<Effect>> {
    crate::plane::history(endpoint, PREFIX).await
}

pub use ferry_engine::adapters::etcd::prefix_end;

/// How many keys the etcd at `endpoint` holds under `prefix` (all of them,
/// ferry's own included, when it is empty).
pub async fn count_under(endpoint: &str, prefix: &[u8]) -> i64 {
    let (key, range_end) = if prefix.is_empty() {
        (vec![0], vec![0])
    } else {
        (prefix.to_vec(), prefix_end(prefix))
    };
    kv(endpoint)
        .await
        .range(RangeRequest {
            key,
            range_end,
            count_only: true,
            ..RangeRequest::default()
        })
        .await
        .expect("count")
        .into_inner()
        .count
}

/// What each key's history in the new etcd must be: its value at the
/// snapshot's revision R (from the seed and the writes the old etcd took at
/// or before R), then every change after R in order: those the old etcd
/// took, then those the new one took.
pub fn expected_history(
    writes: &[Write],
    old_cluster: u64,
    new_cluster: u64,
    snapshot_position: i64,
) -> BTreeMap<Vec<u8>, Vec<Effect>> {
    let mut at_snapshot: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    for index in 0..SEEDED_KEYS {
        at_snapshot.insert(
            format!("{PREFIX}seed/{index:05}").into_bytes(),
            Some(format!("seeded value {index} {}", "x".repeat(150)).into_bytes()),
        );
    }
    for writer in 0..WRITERS {
        for index in 0..KEYS_PER_WRITER {
            at_snapshot.insert(
                writer_key(writer, index),
                Some(format!("w{writer} initial {index}").into_bytes()),
            );
        }
    }
    // Old-plane changes after R and new-plane changes, in revision order
    // per plane (each key has one writer, so this is its ack order too).
    let mut after_old: Vec<(i64, &Write)> = Vec::new();
    let mut after_new: Vec<(i64, &Write)> = Vec::new();
    let mut old_writes: Vec<(i64, &Write)> = Vec::new();
    for write in writes {
        let Ok(answer) = &write.answer else { continue };
        if answer.cluster_id == old_cluster {
            old_writes.push((answer.revision, write));
            if answer.revision > snapshot_position {
                after_old.push((answer.revision, write));
            }
        } else {
            assert_eq!(
                answer.cluster_id, new_cluster,
                "write {}/{} was answered by an etcd that is neither plane",
                write.writer, write.number
            );
            after_new.push((answer.revision, write));
        }
    }
    old_writes.sort_by_key(|(revision, _)| *revision);
    for (revision, write) in &old_writes {
        if *revision > snapshot_position {
            break;
        }
        for (key, effect) in &write.effects {
            let changed = matches!(effect, Effect::Put(_))
                || write.answer.as_ref().is_ok_and(|answer| answer.deleted > 0);
            if changed {
                at_snapshot.insert(
                    key.clone(),
                    match effect {
                        Effect::Put(value) => Some(value.clone()),
                        Effect::Delete => None,
                    },
                );
            }
        }
    }
    let mut expected: BTreeMap<Vec<u8>, Vec<Effect>> = BTreeMap::new();
    for (key, value) in at_snapshot {
        if let Some(value) = value {
            expected.entry(key).or_default().push(Effect::Put(value));
        }
    }
    after_old.sort_by_key(|(revision, _)| *revision);
    after_new.sort_by_key(|(revision, _)| *revision);
    for (_, write) in after_old.iter().chain(after_new.iter()) {
        let deleted = write.answer.as_ref().map_or(0, |answer| answer.deleted);
        for (key, effect) in &write.effects {
            if *effect == Effect::Delete && deleted == 0 {
                continue;
            }
            expected
                .entry(key.clone())
                .or_default()
                .push(effect.clone());
        }
    }
    expected
}

/// The servers of one migration: two etcds, two agents, two gateway
/// replicas.
pub struct Cluster {
    /// The plane migrated from.
    pub old: EtcdServer,
    /// The plane migrated to.
    pub new: EtcdServer,
    /// `ferry agent source` beside the old etcd.
    pub source_agent: FerryProcess,
    /// `ferry agent target` beside the new etcd.
    pub target_agent: FerryProcess,
    /// `ferry gateway`, in front of the old etcd at first.
    pub gateway: FerryProcess,
    /// A second replica beside it: `ferry migrate` is given both.
    pub second_gateway: FerryProcess,
    /// The migration reaches the source agent through this, so a test can cut it.
    pub source_link: TcpProxy,
}

impl Cluster {
    /// Starts both etcds (the old one seeded), both agents and the gateway.
    pub async fn start() -> Self {
        let cluster = Self::start_empty().await;
        seed(&cluster.old.endpoint()).await;
        cluster
    }

    /// Starts both etcds (both empty), both agents and the gateway.
    pub async fn start_empty() -> Self {
        let old = EtcdServer::start().expect("old etcd");
        let new = EtcdServer::start().expect("new etcd");
        let source_agent = FerryProcess::start(
            &[
                "agent",
                "source",
                "--control-plane",
                &old.url(),
                "--listen",
                "127.0.0.1:0",
            ],
            &[],
        )
        .expect("source agent");
        let target_agent = start_target_agent(&new, "127.0.0.1:0");
        let gateway_in_front_of_old = || {
            FerryProcess::start(
                &[
                    "gateway",
                    "--listen",
                    "127.0.0.1:0",
                    "--upstream",
                    &old.url(),
                ],
                &[],
            )
            .expect("gateway")
        };
        let gateway = gateway_in_front_of_old();
        let second_gateway = gateway_in_front_of_old();
        let source_link = TcpProxy::start(&source_agent.field("listen"))
            .await
            .expect("proxy");
        Self {
            old,
            new,
            source_agent,
            target_agent,
            gateway,
            second_gateway,
            source_link,
        }
    }

    /// `ferry migrate --live` arguments for this cluster, reporting in JSON.
    pub fn migrate_args(&self, status_file: &std::path::Path) -> Vec<String> {
        [
            "--output",
            "json",
            "migrate",
            "--live",
            "--source-agent",
            &self.source_link.address(),
            "--target-agent",
            &self.target_agent.field("listen"),
            "--gateway",
            &format!(
                "{},{}",
                self.gateway.field("admin"),
                self.second_gateway.field("admin")
            ),
            "--max-pause",
            "2s",
            "--max-lag",
            "20",
            "--reconnect-timeout",
            "30s",
            "--status-file",
            &status_file.display().to_string(),
        ]
        .iter()
        .map(|argument| argument.to_string())
        .collect()
    }

    /// Where writer `index` writes: the replicas take turns.
    pub fn gateway_for(&self, index: usize) -> String {
        if index.is_multiple_of(2) {
            self.gateway.field("listen")
        } else {
            self.second_gateway.field("listen")
        }
    }
}

/// `args` with `extra` added; an option in `extra` (with its value) replaces
/// the same option in `args`.
pub fn with_options(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    for option in extra.iter().filter(|argument| argument.starts_with("--")) {
        if let Some(at) = args.iter().position(|argument| argument == option) {
            args.drain(at..at + 2);
        }
    }
    args.extend(extra.iter().map(|argument| argument.to_string()));
    args
}

/// Starts `ferry ARGS` (a migration) with `RUST_LOG=info`, its output piped.
pub fn spawn_ferry(args: &[String]) -> tokio::process::Child {
    tokio::process::Command::new(crate::ferry_binary())
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ferry starts")
}

/// Waits (at most 4 minutes) for a `ferry --output json migrate` started by
/// [`spawn_ferry`]: its JSON report, exit code and stderr. Without a
/// report, panics with what ferry and the cluster's processes logged.
pub async fn migrate_report(
    migrate: tokio::process::Child,
    cluster: &Cluster,
) -> (serde_json::Value, Option<i32>, String) {
    let (report, code, stderr) = migrate_output(migrate).await;
    let report = report.unwrap_or_else(|stdout| {
        panic!(
            "ferry migrate printed no JSON report: stdout {stdout}\nstderr {stderr}\nsource agent: {}\ntarget agent: {}\ngateway: {}",
            cluster.source_agent.stderr(),
            cluster.target_agent.stderr(),
            cluster.gateway.stderr()
        )
    });
    (report, code, stderr)
}

/// Waits (at most 4 minutes) for a `ferry --output json migrate` started by
/// [`spawn_ferry`]: its JSON report (or, when it printed none, its stdout),
/// exit code and stderr.
pub async fn migrate_output(
    migrate: tokio::process::Child,
) -> (Result<serde_json::Value, String>, Option<i32>, String) {
    let output = tokio::time::timeout(Duration::from_secs(240), migrate.wait_with_output())
        .await
        .expect("the migration ends")
        .expect("ferry migrate runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    (
        serde_json::from_str(&stdout).map_err(|_| stdout.into_owned()),
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits until the migration writing `status_file` is in `phase`.
pub async fn wait_for_phase(status_file: &std::path::Path, phase: &str) {
    for _ in 0..600 {
        if let Ok(text) = std::fs::read_to_string(status_file)
            && let Ok(status) = serde_json::from_str::<serde_json::Value>(&text)
            && status["phase"] == phase
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the migration never reached phase {phase}");
}

/// Starts a target agent beside `new`, listening on `listen`.
pub fn start_target_agent(new: &EtcdServer, listen: &str) -> FerryProcess {
    FerryProcess::start(
        &[
            "agent",
            "target",
            "--control-plane",
            &new.url(),
            "--listen",
            listen,
        ],
        &[],
    )
    .expect("target agent")
}

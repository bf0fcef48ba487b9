//! One harness for "a plane", the etcd a test writes to and reads back:
//! the KV helpers every test file used to carry its own copy of, the
//! `ferry` binary run as a command, and `etcdctl`.
//!
//! - [`Plane`]: an etcd reached at a plain-HTTP endpoint (a started
//!   [`EtcdServer`], or `127.0.0.1:PORT` of one, or of a gateway in front
//!   of one): its endpoint and URL, a KV client ([`kv`]), leases
//!   ([`grant`], [`time_to_live`]) and its history ([`history`]).
//! - [`ToKv`]: what the KV helpers act on: a [`Plane`] (a client connected
//!   for the call) or a client the test holds (its connection kept, TLS
//!   included): [`put`], [`try_put`], [`delete`], [`get`],
//!   [`value_at_revision`], [`value_text`], [`dump`], [`dump_text`].
//! - [`ferry`], [`ferry_with_env`], [`ferry_json`], [`ferry_command`]: the
//!   `ferry` binary of this build, without the etcd credentials of the
//!   environment the tests run in.
//! - [`etcdctl`], [`etcdctl_ok`], [`etcdctl_binary`]: etcd's own client.
//!
//! Keys and values are anything that is bytes (`&str`, `String`, `&[u8]`,
//! `Vec<u8>`, `b"..."`).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ferry_engine::adapters::etcd::prefix_end;
use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use ferry_proto::etcd::etcdserverpb::watch_client::WatchClient;
use ferry_proto::etcd::etcdserverpb::watch_request::RequestUnion;
use ferry_proto::etcd::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
    PutRequest, RangeRequest, WatchCreateRequest, WatchRequest,
};
use ferry_proto::etcd::mvccpb::KeyValue;
use ferry_proto::etcd::mvccpb::event::EventType;
use tonic::transport::Channel;

use crate::etcd::EtcdServer;
use crate::ferry_binary;

/// The largest response a test's KV client decodes: a dump of keys with
/// values up to etcd's request limit is far past tonic's default 4 MiB.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Where ferry keeps its own keys in a plane (checkpoints, locks, the
/// fence record); [`dump`] leaves them out when asked to.
pub const FERRY_KEYS_PREFIX: &[u8] = b"__ferry__/";

/// An etcd (or a gateway in front of one) that serves plain HTTP at an
/// endpoint.
pub trait Plane {
    /// `127.0.0.1:PORT`, for etcd clients.
    fn endpoint(&self) -> String;

    /// `etcd://127.0.0.1:PORT`, for ferry.
    fn url(&self) -> String {
        format!("etcd://{}", self.endpoint())
    }
}

impl Plane for EtcdServer {
    fn endpoint(&self) -> String {
        EtcdServer::endpoint(self)
    }
}

impl Plane for str {
    fn endpoint(&self) -> String {
        self.to_owned()
    }
}

impl Plane for String {
    fn endpoint(&self) -> String {
        self.clone()
    }
}

/// What the KV helpers act on: a [`Plane`], reached by a client connected
/// for the call, or a client the test already holds (cloned: the clone
/// shares its connection, so a loop of puts uses one, and a TLS client
/// stays one).
pub trait ToKv {
    /// A KV client of the plane.
    fn to_kv(&self) -> impl Future<Output = KvClient<Channel>> + Send;
}

impl<P: Plane + ?Sized> ToKv for P {
    fn to_kv(&self) -> impl Future<Output = KvClient<Channel>> + Send {
        let endpoint = self.endpoint();
        async move { connect(&endpoint).await }
    }
}

impl ToKv for KvClient<Channel> {
    fn to_kv(&self) -> impl Future<Output = KvClient<Channel>> + Send {
        let client = self.clone();
        async move { client }
    }
}

async fn connect(endpoint: &str) -> KvClient<Channel> {
    KvClient::connect(format!("http://{endpoint}"))
        .await
        .expect("a kv client connects")
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// A new KV client of `plane`, decoding responses up to 256 MiB.
pub async fn kv(plane: &(impl Plane + ?Sized)) -> KvClient<Channel> {
    connect(&plane.endpoint()).await
}

/// Grants a lease of `ttl` seconds in `plane`; returns its id.
pub async fn grant(plane: &(impl Plane + ?Sized), ttl: i64) -> i64 {
    LeaseClient::connect(format!("http://{}", plane.endpoint()))
        .await
        .expect("lease client")
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await
        .expect("grant")
        .into_inner()
        .id
}

/// What `plane` says of lease `id`: its TTL left in whole seconds (-1 once
/// it is gone; etcd rounds down, so 0 is under a second left, or expired
/// and not yet revoked), its granted TTL, and with `keys` its keys.
pub async fn time_to_live(
    plane: &(impl Plane + ?Sized),
    id: i64,
    keys: bool,
) -> LeaseTimeToLiveResponse {
    LeaseClient::connect(format!("http://{}", plane.endpoint()))
        .await
        .expect("lease client")
        .lease_time_to_live(LeaseTimeToLiveRequest { id, keys })
        .await
        .expect("ttl")
        .into_inner()
}

/// Puts `key` = `value`, on `lease` (0: none, as etcd has it); returns the
/// revision of the write. Panics if etcd refuses it.
pub async fn put(
    at: &(impl ToKv + ?Sized),
    key: impl AsRef<[u8]>,
    value: impl AsRef<[u8]>,
    lease: i64,
) -> i64 {
    let key = key.as_ref();
    try_put(at, key, value, lease)
        .await
        .unwrap_or_else(|status| panic!("put {}: {status}", String::from_utf8_lossy(key)))
}

/// [`put`], with etcd's refusal returned.
pub async fn try_put(
    at: &(impl ToKv + ?Sized),
    key: impl AsRef<[u8]>,
    value: impl AsRef<[u8]>,
    lease: i64,
) -> Result<i64, tonic::Status> {
    let answer = at
        .to_kv()
        .await
        .put(PutRequest {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            lease,
            ..PutRequest::default()
        })
        .await?;
    Ok(answer.into_inner().header.expect("a header").revision)
}

/// Deletes `key` (one key, not a prefix); returns the revision etcd
/// answered at. Panics if etcd refuses it.
pub async fn delete(at: &(impl ToKv + ?Sized), key: impl AsRef<[u8]>) -> i64 {
    let key = key.as_ref();
    at.to_kv()
        .await
        .delete_range(DeleteRangeRequest {
            key: key.to_vec(),
            ..DeleteRangeRequest::default()
        })
        .await
        .unwrap_or_else(|status| panic!("delete {}: {status}", String::from_utf8_lossy(key)))
        .into_inner()
        .header
        .expect("a header")
        .revision
}

/// `key` as of `revision` (0: now), with its versions and lease, if it
/// was there.
pub async fn get(
    at: &(impl ToKv + ?Sized),
    key: impl AsRef<[u8]>,
    revision: i64,
) -> Option<KeyValue> {
    at.to_kv()
        .await
        .range(RangeRequest {
            key: key.as_ref().to_vec(),
            revision,
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner()
        .kvs
        .into_iter()
        .next()
}

/// The value of `key` as of `revision` (0: now), if it was there.
pub async fn value_at_revision(
    at: &(impl ToKv + ?Sized),
    key: impl AsRef<[u8]>,
    revision: i64,
) -> Option<Vec<u8>> {
    get(at, key, revision).await.map(|kv| kv.value)
}

/// The value of `key` now, as text (bytes that are not UTF-8 replaced),
/// if it is there.
pub async fn value_text(at: &(impl ToKv + ?Sized), key: impl AsRef<[u8]>) -> Option<String> {
    value_at_revision(at, key, 0)
        .await
        .map(|value| String::from_utf8_lossy(&value).into_owned())
}

/// Whether [`dump`] returns ferry's own keys ([`FERRY_KEYS_PREFIX`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FerryKeys {
    /// With them.
    Included,
    /// Without them: only what the test (or a restore) wrote.
    Excluded,
}

/// Every key under `prefix` (an empty prefix: the whole keyspace), in key
/// order, ferry's own keys as `ferry_keys` says.
pub async fn dump(
    at: &(impl ToKv + ?Sized),
    prefix: impl AsRef<[u8]>,
    ferry_keys: FerryKeys,
) -> Vec<KeyValue> {
    let prefix = prefix.as_ref();
    let (key, range_end) = if prefix.is_empty() {
        (vec![0], vec![0])
    } else {
        (prefix.to_vec(), prefix_end(prefix))
    };
    at.to_kv()
        .await
        .range(RangeRequest {
            key,
            range_end,
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner()
        .kvs
        .into_iter()
        .filter(|kv| ferry_keys == FerryKeys::Included || !kv.key.starts_with(FERRY_KEYS_PREFIX))
        .collect()
}

/// [`dump`] as text: each key and value, which must be UTF-8.
pub async fn dump_text(
    at: &(impl ToKv + ?Sized),
    prefix: impl AsRef<[u8]>,
    ferry_keys: FerryKeys,
) -> Vec<(String, String)> {
    dump(at, prefix, ferry_keys)
        .await
        .into_iter()
        .map(|kv| {
            (
                String::from_utf8(kv.key).expect("text keys"),
                String::from_utf8(kv.value).expect("text values"),
            )
        })
        .collect()
}

/// The cluster id and current revision of `plane`.
pub async fn cluster_id_and_revision(plane: &(impl ToKv + ?Sized)) -> (u64, i64) {
    let header = plane
        .to_kv()
        .await
        .range(RangeRequest {
            key: b"/".to_vec(),
            limit: 1,
            ..RangeRequest::default()
        })
        .await
        .expect("range")
        .into_inner()
        .header
        .expect("a header");
    (header.cluster_id, header.revision)
}

/// What a write did to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The key now holds this value.
    Put(Vec<u8>),
    /// The key is gone.
    Delete,
}

/// Every change under `prefix` in `plane`'s history, per key, in order (a
/// Watch from revision 1: the test's etcds are never compacted). The watch
/// covers the whole keyspace, where every revision after 1 has at least
/// one event, so it ends on seeing the revision the etcd was at when
/// asked, not after a quiet spell: a loaded machine never cuts a history
/// short. It panics if that takes two minutes.
pub async fn history(
    plane: &(impl Plane + ?Sized),
    prefix: impl AsRef<[u8]>,
) -> BTreeMap<Vec<u8>, Vec<Effect>> {
    let endpoint = plane.endpoint();
    let prefix = prefix.as_ref();
    let (_, head) = cluster_id_and_revision(plane).await;
    let mut changes: BTreeMap<Vec<u8>, Vec<Effect>> = BTreeMap::new();
    if head <= 1 {
        // A new etcd: revision 1 holds nothing.
        return changes;
    }
    let mut client = WatchClient::connect(format!("http://{endpoint}"))
        .await
        .expect("etcd answers");
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    sender
        .send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: vec![0],
                range_end: vec![0],
                start_revision: 1,
                ..WatchCreateRequest::default()
            })),
        })
        .await
        .expect("send");
    let mut stream = client
        .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .expect("watch")
        .into_inner();
    let watching = async {
        let mut seen = 0;
        while seen < head {
            let response = stream
                .message()
                .await
                .expect("watch stream")
                .expect("the watch stream stays open");
            for event in response.events {
                let kv = event.kv.expect("an event has its kv");
                seen = seen.max(kv.mod_revision);
                if !kv.key.starts_with(prefix) {
                    continue;
                }
                let effect = if event.r#type == EventType::Delete as i32 {
                    Effect::Delete
                } else {
                    Effect::Put(kv.value)
                };
                changes.entry(kv.key).or_default().push(effect);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), watching)
        .await
        .unwrap_or_else(|_| {
            panic!("the history watch on {endpoint} did not reach revision {head} in two minutes")
        });
    drop(sender);
    changes
}

/// `ferry` of this build, with no etcd credentials from this environment
/// (`ETCD_USERNAME`, `ETCD_PASSWORD` removed), for a test to add to.
pub fn ferry_command() -> Command {
    let mut command = Command::new(ferry_binary());
    command
        .env_remove("ETCD_USERNAME")
        .env_remove("ETCD_PASSWORD");
    command
}

/// Runs `ferry ARGS` ([`ferry_command`]) to its end.
pub fn ferry(args: &[impl AsRef<OsStr>]) -> Output {
    ferry_with_env(args, &[])
}

/// Runs `ferry ARGS` ([`ferry_command`]) with `environment` added.
pub fn ferry_with_env(args: &[impl AsRef<OsStr>], environment: &[(&str, &str)]) -> Output {
    ferry_command()
        .args(args)
        .envs(environment.iter().copied())
        .output()
        .expect("ferry runs")
}

/// Runs `ferry ARGS` (which must print JSON: `--output json`): what it
/// printed and its exit code (-1 if a signal ended it). Panics with its
/// output if stdout is not JSON.
pub fn ferry_json(args: &[impl AsRef<OsStr>]) -> (serde_json::Value, i32) {
    let output = ferry(args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value = serde_json::from_str(&stdout).unwrap_or_else(|_| {
        let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
        panic!(
            "ferry {args:?} printed no JSON: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (value, output.status.code().unwrap_or(-1))
}

/// The `etcdctl` binary: `$FERRY_TEST_ETCDCTL`, else `etcdctl` on the PATH
/// (Debian's `etcd-client`).
pub fn etcdctl_binary() -> PathBuf {
    std::env::var_os("FERRY_TEST_ETCDCTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcdctl"))
}

/// Runs `etcdctl --endpoints ENDPOINT --command-timeout=20s ARGS...` (API
/// v3) against `plane`, with `stdin` as its input (none: an empty one).
pub fn etcdctl(plane: &(impl Plane + ?Sized), args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &plane.endpoint(), "--command-timeout=20s"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("etcdctl runs (install Debian's etcd-client, or set FERRY_TEST_ETCDCTL)");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write etcdctl's input");
    }
    child.wait_with_output().expect("etcdctl finishes")
}

/// [`etcdctl`] that must succeed: its stdout. Panics with its output if it
/// fails.
pub fn etcdctl_ok(plane: &(impl Plane + ?Sized), args: &[&str], stdin: Option<&str>) -> String {
    let output = etcdctl(plane, args, stdin);
    assert!(
        output.status.success(),
        "etcdctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

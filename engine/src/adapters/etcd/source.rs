//! Extracting etcd: one snapshot at one revision.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use ferry_proto::etcd::etcdserverpb::range_request::{SortOrder, SortTarget};
use ferry_proto::etcd::etcdserverpb::{
    LeaseLeasesRequest, LeaseTimeToLiveRequest, RangeRequest, StatusRequest,
};
use ferry_proto::etcd::mvccpb::KeyValue;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info};

use super::client::EtcdClient;
use super::{EtcdConnection, EtcdError, KIND_KV, KIND_LEASE, RESERVED_PREFIX, prefix_end};
use crate::adapters::{AdapterError, Extraction, Source};
use crate::manifest::SourceInfo;
use crate::progress::Progress;
use crate::{Op, Result};

/// Bytes of keys and values one Range page aims at: pages shrink for large
/// values, so memory stays bounded whatever the values' size.
const PAGE_TARGET_BYTES: usize = 4 * 1024 * 1024;
/// Keys one Range page holds at most.
const PAGE_MAX_KEYS: i64 = 1000;
/// Pages each parallel reader fetches ahead of the merge.
const PAGES_AHEAD: usize = 2;

/// What to extract.
#[derive(Debug, Clone)]
pub struct EtcdSourceOptions {
    /// Only keys starting with this; empty for the whole keyspace.
    pub prefix: Vec<u8>,
    /// Key ranges read at once, all at the same revision.
    pub parallel: usize,
}

impl Default for EtcdSourceOptions {
    fn default() -> Self {
        Self {
            prefix: Vec::new(),
            parallel: 1,
        }
    }
}

/// One consistent snapshot of an etcd cluster (or a prefix of it).
#[derive(Debug)]
pub struct EtcdSource {
    connection: EtcdConnection,
    options: EtcdSourceOptions,
}

impl EtcdSource {
    /// A source reading `connection`'s cluster.
    pub fn new(connection: EtcdConnection, options: EtcdSourceOptions) -> Self {
        Self {
            connection,
            options,
        }
    }
}

fn source_error(error: EtcdError) -> crate::Error {
    AdapterError::EtcdSource(error).into()
}

/// The key range to read: `[start, end)`, etcd style.
fn key_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        (vec![0], vec![0])
    } else {
        (prefix.to_vec(), prefix_end(prefix))
    }
}

#[async_trait]
impl Source for EtcdSource {
    async fn open(self: Box<Self>, progress: Arc<Progress>) -> Result<Extraction> {
        let client = EtcdClient::connect(&self.connection)
            .await
            .map_err(source_error)?;
        let status = client
            .call("read the status of", |mut services| async move {
                services.maintenance.status(StatusRequest {}).await
            })
            .await
            .map_err(source_error)?;
        let (start, end) = key_range(&self.options.prefix);

        // R: the revision every read of this snapshot is made at.
        let count_request = RangeRequest {
            key: start.clone(),
            range_end: end.clone(),
            count_only: true,
            ..RangeRequest::default()
        };
        let counted = client
            .call("count the keys of", |mut services| {
                let request = count_request.clone();
                async move { services.kv.range(request).await }
            })
            .await
            .map_err(source_error)?;
        let header = counted.header.ok_or_else(|| {
            source_error(EtcdError::Request {
                endpoints: client.connection().display(),
                action: "count the keys".to_owned(),
                reason: "the response has no header".to_owned(),
            })
        })?;
        let revision = header.revision;
        let cluster_id = header.cluster_id;
        Progress::set(&progress.ops_total, counted.count as u64);
        info!(
            revision,
            keys = counted.count,
            "etcd snapshot revision chosen"
        );

        let leases = attached_leases(&client, &start, &end).await?;
        let ranges = split_range(
            &client,
            &start,
            &end,
            revision,
            self.options.parallel.max(1),
        )
        .await?;
        debug!(
            ranges = ranges.len(),
            leases = leases.len(),
            "etcd snapshot planned"
        );

        let (sender, receiver) = mpsc::channel::<Result<Vec<Op>>>(PAGES_AHEAD);
        tokio::spawn(produce(client, revision, leases, ranges, sender));
        let key_prefix = match std::str::from_utf8(&self.options.prefix) {
            Ok("") => None,
            Ok(prefix) => Some(prefix.to_owned()),
            // A binary prefix is not recorded: a restore then checks the
            // whole target keyspace for emptiness, which is stricter.
            Err(_) => None,
        };
        Ok(Extraction {
            info: SourceInfo {
                platform: "etcd".to_owned(),
                platform_version: Some(status.version),
                identity: Some(format!("{cluster_id:016x}")),
                snapshot_position: Some(revision as u64),
                key_prefix,
                description: None,
            },
            ops: Box::pin(ReceiverStream::new(receiver)),
        })
    }
}

/// A lease to carry: its id and remaining TTL.
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    ttl: i64,
    granted_ttl: i64,
}

/// The leases that hold at least one key of the range, by id.
async fn attached_leases(client: &EtcdClient, start: &[u8], end: &[u8]) -> Result<Vec<Lease>> {
    let listed = client
        .call("list the leases of", |mut services| async move {
            services.lease.lease_leases(LeaseLeasesRequest {}).await
        })
        .await
        .map_err(source_error)?;
    let mut leases = Vec::new();
    for status in listed.leases {
        let alive = client
            .call("read a lease of", |mut services| async move {
                services
                    .lease
                    .lease_time_to_live(LeaseTimeToLiveRequest {
                        id: status.id,
                        keys: true,
                    })
                    .await
            })
            .await
            .map_err(source_error)?;
        if alive.keys.iter().any(|key| in_key_range(key, start, end)) {
            leases.push(Lease {
                id: status.id,
                // An expired lease still holds its keys until etcd revokes
                // them: they get the shortest lease a target grants.
                ttl: alive.ttl.max(1),
                granted_ttl: alive.granted_ttl,
            });
        }
    }
    leases.sort_by_key(|lease| lease.id);
    Ok(leases)
}

fn in_key_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    let after_start = key >= start;
    let before_end = end == [0] || key < end;
    after_start && before_end && !key.starts_with(RESERVED_PREFIX)
}

/// Splits `[start, end)` into up to `parts` ranges of keys that exist at
/// `revision`, cut evenly between the first and the last key (by their
/// bytes, not by count). The ranges are in key order, so reading them one
/// after the other gives the keys in order.
async fn split_range(
    client: &EtcdClient,
    start: &[u8],
    end: &[u8],
    revision: i64,
    parts: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    if parts == 1 {
        return Ok(vec![(start.to_vec(), end.to_vec())]);
    }
    let mut edges = Vec::new();
    for order in [SortOrder::Ascend, SortOrder::Descend] {
        let request = RangeRequest {
            key: start.to_vec(),
            range_end: end.to_vec(),
            revision,
            keys_only: true,
            limit: 1,
            sort_order: order as i32,
            sort_target: SortTarget::Key as i32,
            ..RangeRequest::default()
        };
        let response = client
            .call("read the range edges of", |mut services| {
                let request = request.clone();
                async move { services.kv.range(request).await }
            })
            .await
            .map_err(source_error)?;
        match response.kvs.into_iter().next() {
            Some(kv) => edges.push(kv.key),
            None => return Ok(vec![(start.to_vec(), end.to_vec())]),
        }
    }
    let (first, last) = (&edges[0], &edges[1]);
    let common = first
        .iter()
        .zip(last.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let number = |key: &[u8]| {
        let mut bytes = [0u8; 8];
        for (slot, byte) in bytes.iter_mut().zip(key.iter().skip(common)) {
            *slot = *byte;
        }
        u64::from_be_bytes(bytes)
    };
    let (low, high) = (number(first), number(last));
    let mut cuts: Vec<Vec<u8>> = (1..parts as u64)
        .map(|part| {
            let point = low + ((u128::from(high - low) * u128::from(part)) / parts as u128) as u64;
            let mut key = first[..common].to_vec();
            key.extend_from_slice(&point.to_be_bytes());
            while key.len() > common + 1 && key.last() == Some(&0) {
                key.pop();
            }
            key
        })
        .filter(|cut| cut.as_slice() > first.as_slice() && cut.as_slice() <= last.as_slice())
        .collect();
    cuts.dedup();
    let mut ranges = Vec::new();
    let mut from = start.to_vec();
    for cut in cuts {
        ranges.push((from, cut.clone()));
        from = cut;
    }
    ranges.push((from, end.to_vec()));
    Ok(ranges)
}

/// Streams the leases, then every key, numbering ops from 1. Ranges are
/// read by their own tasks, a few pages ahead; their pages are merged in
/// range order.
async fn produce(
    client: EtcdClient,
    revision: i64,
    leases: Vec<Lease>,
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
    sender: mpsc::Sender<Result<Vec<Op>>>,
) {
    let position = revision as u64;
    let mut seq = 0u64;
    let lease_ops: Vec<Op> = leases
        .iter()
        .map(|lease| {
            seq += 1;
            Op {
                seq,
                position,
                txn: 0,
                txn_last: true,
                kind: Bytes::from_static(KIND_LEASE.as_bytes()),
                key: Bytes::from(lease_key(lease.id)),
                method: Bytes::from_static(b"LeaseGrant"),
                body: Bytes::from(format!(
                    r#"{{"id":{},"ttl":{},"granted_ttl":{}}}"#,
                    lease.id, lease.ttl, lease.granted_ttl
                )),
                content_type: Bytes::from_static(b"application/json"),
                platform_version: Bytes::new(),
                deps: Vec::new(),
            }
        })
        .collect();
    if !lease_ops.is_empty() && sender.send(Ok(lease_ops)).await.is_err() {
        return;
    }
    let readers: Vec<mpsc::Receiver<Result<Vec<KeyValue>>>> = ranges
        .into_iter()
        .map(|(start, end)| {
            let (pages, receiver) = mpsc::channel(PAGES_AHEAD);
            tokio::spawn(read_range(client.clone(), revision, start, end, pages));
            receiver
        })
        .collect();
    for mut reader in readers {
        while let Some(page) = reader.recv().await {
            let batch = page.map(|kvs| {
                kvs.into_iter()
                    .filter(|kv| !kv.key.starts_with(RESERVED_PREFIX))
                    .map(|kv| {
                        seq += 1;
                        kv_op(seq, position, kv)
                    })
                    .collect::<Vec<Op>>()
            });
            let failed = batch.is_err();
            if sender.send(batch).await.is_err() || failed {
                return;
            }
        }
    }
}

/// The key of a lease's op.
pub(crate) fn lease_key(id: i64) -> String {
    format!("{id:016x}")
}

fn kv_op(seq: u64, position: u64, kv: KeyValue) -> Op {
    let KeyValue {
        key, value, lease, ..
    } = kv;
    Op {
        seq,
        position,
        txn: 0,
        txn_last: true,
        kind: Bytes::from_static(KIND_KV.as_bytes()),
        key: Bytes::from(key),
        method: Bytes::from_static(b"Put"),
        body: Bytes::from(value),
        content_type: Bytes::new(),
        platform_version: Bytes::new(),
        deps: if lease == 0 {
            Vec::new()
        } else {
            vec![Bytes::from(lease_key(lease))]
        },
    }
}

/// Reads `[start, end)` at `revision` page by page, pages sized to about
/// [`PAGE_TARGET_BYTES`].
async fn read_range(
    client: EtcdClient,
    revision: i64,
    start: Vec<u8>,
    end: Vec<u8>,
    pages: mpsc::Sender<Result<Vec<KeyValue>>>,
) {
    let mut cursor = start;
    let mut limit = 100i64;
    loop {
        let request = RangeRequest {
            key: cursor.clone(),
            range_end: end.clone(),
            revision,
            limit,
            ..RangeRequest::default()
        };
        let response = client
            .call("read a page of", |mut services| {
                let request = request.clone();
                async move { services.kv.range(request).await }
            })
            .await;
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                let _ = pages.send(Err(source_error(error))).await;
                return;
            }
        };
        let more = response.more;
        let kvs = response.kvs;
        let Some(last) = kvs.last() else {
            return;
        };
        let mut next = last.key.clone();
        next.push(0);
        let bytes: usize = kvs.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
        let average = (bytes / kvs.len()).max(1);
        limit = ((PAGE_TARGET_BYTES / average) as i64).clamp(1, PAGE_MAX_KEYS);
        if pages.send(Ok(kvs)).await.is_err() || !more {
            return;
        }
        cursor = next;
    }
}

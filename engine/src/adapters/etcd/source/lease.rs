//! Leases: those attached to the snapshot's keys, a lease's status, and
//! the ops and keys that carry them.

use bytes::Bytes;
use ferry_proto::etcd::etcdserverpb::{LeaseLeasesRequest, LeaseTimeToLiveRequest};

use super::source_error;
use crate::adapters::etcd::client::EtcdClient;
use crate::adapters::etcd::{EtcdError, KIND_LEASE, RESERVED_PREFIX};
use crate::{Op, Result};

/// A lease to carry: its id and remaining TTL.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lease {
    id: i64,
    ttl: i64,
    granted_ttl: i64,
}

/// The leases that hold at least one key of the range, by id.
pub(super) async fn attached_leases(
    client: &EtcdClient,
    start: &[u8],
    end: &[u8],
) -> Result<Vec<Lease>> {
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

/// A lease's remaining TTL, as etcd tells it now. A lease gone already
/// (expired or revoked) gets the shortest TTL a target grants: its keys are
/// deleted by the source's next changes anyway.
pub(super) async fn lease_status(client: &EtcdClient, id: i64) -> Result<Lease, EtcdError> {
    let alive = client
        .call("read a lease of", |mut services| async move {
            services
                .lease
                .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false })
                .await
        })
        .await?;
    Ok(Lease {
        id,
        ttl: alive.ttl.max(1),
        granted_ttl: alive.granted_ttl.max(0),
    })
}

/// The op that grants `lease` on a target. `txn` 0 makes it a transaction
/// of its own; otherwise it opens the group of that revision.
pub(super) fn lease_op(seq: u64, position: u64, txn: u64, lease: &Lease) -> Op {
    Op {
        seq,
        position,
        txn,
        txn_last: txn == 0,
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
}

/// The key of a lease's op.
pub(crate) fn lease_key(id: i64) -> String {
    format!("{id:016x}")
}

/// The lease id a lease op's key names ([`lease_key`]).
pub(crate) fn parse_lease_key(key: &[u8]) -> Option<i64> {
    i64::from_str_radix(std::str::from_utf8(key).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_keys_parse_as_hex() {
        assert_eq!(parse_lease_key(lease_key(0x5eed).as_bytes()), Some(0x5eed));
    }
}

//! A digest of what an etcd range holds at one revision: the check a live
//! migration can make before it switches (DESIGN.md, cutover step 7), the
//! old plane at its fence against the new plane once it has applied
//! through it.
//!
//! SHA-256 over every key and value in key order, each preceded by its
//! length (8 bytes, big-endian), so no two different ranges hash alike by
//! running one key into the next. ferry's own keys (`__ferry__/`) never
//! count, nor do leases, revisions or versions: two planes holding the same
//! keys with the same values have the same digest.
//!
//! Beside it, a [`SetDigest`] of the same keys and values that does not
//! depend on their order (see [`crate::adapters::digest`]).

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::client::EtcdClient;
use super::source::{count_keys, read_range};
use super::{EtcdConnection, EtcdError, RESERVED_PREFIX, prefix_end};
use crate::adapters::digest::{SetDigest, hash_entry};

/// What a range holds at a revision, summed up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeDigest {
    /// Keys counted.
    pub keys: u64,
    /// Bytes of their keys and values.
    pub bytes: u64,
    /// SHA-256 over them, in key order.
    pub sha256: [u8; 32],
    /// The [`SetDigest`] of them.
    pub set_sha256: [u8; 32],
    /// The revision read.
    pub revision: i64,
}

/// The digest of the keys under `prefix` (all keys when empty) at
/// `revision`, or at the current revision when it is 0. A compacted
/// revision is [`EtcdError::Compacted`].
pub async fn digest_range(
    connection: &EtcdConnection,
    prefix: &[u8],
    revision: i64,
) -> Result<RangeDigest, EtcdError> {
    let client = EtcdClient::connect(connection).await?;
    let (start, end) = if prefix.is_empty() {
        (vec![0], vec![0])
    } else {
        (prefix.to_vec(), prefix_end(prefix))
    };
    let revision = if revision > 0 {
        revision
    } else {
        count_keys(&client, &start, &end, 0)
            .await?
            .header
            .map_or(0, |header| header.revision)
    };
    let (pages, mut receiver) = mpsc::channel(2);
    tokio::spawn(read_range(client, revision, start, end, pages));
    let mut hasher = Sha256::new();
    let mut set = SetDigest::default();
    while let Some(page) = receiver.recv().await {
        for kv in page? {
            if kv.key.starts_with(RESERVED_PREFIX) {
                continue;
            }
            hash_entry(&mut hasher, &kv.key, &kv.value);
            set.add(&kv.key, &kv.value);
        }
    }
    Ok(RangeDigest {
        keys: set.keys,
        bytes: set.bytes,
        sha256: hasher.finalize().into(),
        set_sha256: set.sum(),
        revision,
    })
}

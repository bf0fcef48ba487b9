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
//! depend on their order. A version migration chain moves keys (Mystic's v4
//! lowercases names), so its image of the old plane comes out in another
//! order than the new plane lists it; this digest compares the two without
//! sorting, in memory that does not grow with the keys.

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::client::EtcdClient;
use super::source::{count_keys, read_range};
use super::{EtcdConnection, EtcdError, RESERVED_PREFIX, prefix_end};

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

/// A key and its value, each preceded by its length.
fn hash_entry(hasher: &mut Sha256, key: &[u8], value: &[u8]) {
    hasher.update((key.len() as u64).to_be_bytes());
    hasher.update(key);
    hasher.update((value.len() as u64).to_be_bytes());
    hasher.update(value);
}

/// Keys and values summed up whatever order they come in: the sum, modulo
/// 2^256, of each entry's SHA-256 (its key and value, each preceded by its
/// length as [`RangeDigest::sha256`] hashes them). Adding the same entries
/// in any order gives the same digest; it is meant for sets, where each key
/// comes once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetDigest {
    /// Entries added.
    pub keys: u64,
    /// Bytes of their keys and values.
    pub bytes: u64,
    /// The sum, as 32 bytes big-endian.
    sum: [u8; 32],
}

impl SetDigest {
    /// Adds `key` and its `value`.
    pub fn add(&mut self, key: &[u8], value: &[u8]) {
        let mut hasher = Sha256::new();
        hash_entry(&mut hasher, key, value);
        let entry: [u8; 32] = hasher.finalize().into();
        let mut carry = 0u16;
        for (sum, byte) in self.sum.iter_mut().zip(entry).rev() {
            let total = u16::from(*sum) + u16::from(byte) + carry;
            *sum = total as u8;
            carry = total >> 8;
        }
        self.keys += 1;
        self.bytes += (key.len() + value.len()) as u64;
    }

    /// The sum so far, 32 bytes big-endian (not itself a SHA-256: a sum of
    /// them).
    pub fn sum(&self) -> [u8; 32] {
        self.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_digest_is_the_same_in_any_order_and_differs_on_any_change() {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..50)
            .map(|index| (format!("/k/{index}").into_bytes(), vec![index as u8; index]))
            .collect();
        let digest = |entries: &[(Vec<u8>, Vec<u8>)]| {
            let mut set = SetDigest::default();
            for (key, value) in entries {
                set.add(key, value);
            }
            set
        };
        let forward = digest(&entries);
        let mut backward = entries.clone();
        backward.reverse();
        assert_eq!(digest(&backward), forward);
        let mut shuffled = entries.clone();
        shuffled.rotate_left(17);
        shuffled.swap(3, 40);
        assert_eq!(digest(&shuffled), forward);
        assert_eq!(forward.keys, 50);

        let mut changed = entries.clone();
        changed[7].1.push(0);
        assert_ne!(digest(&changed).sum(), forward.sum());
        // A key's bytes moved into its value hash otherwise.
        let mut moved = entries.clone();
        moved[7] = (
            b"/k/".to_vec(),
            [b"7".to_vec(), entries[7].1.clone()].concat(),
        );
        assert_ne!(digest(&moved).sum(), forward.sum());
        assert_ne!(digest(&entries[1..]).sum(), forward.sum());
    }

    #[test]
    fn a_set_digest_sums_modulo_two_to_the_256() {
        // 2^256 - 1 plus an entry E is E - 1: every byte carries.
        let mut set = SetDigest {
            sum: [0xff; 32],
            ..SetDigest::default()
        };
        set.add(b"k", b"v");
        let mut hasher = Sha256::new();
        hash_entry(&mut hasher, b"k", b"v");
        let mut expected: [u8; 32] = hasher.finalize().into();
        for byte in expected.iter_mut().rev() {
            let (less, borrow) = byte.overflowing_sub(1);
            *byte = less;
            if !borrow {
                break;
            }
        }
        assert_eq!(set.sum(), expected);
    }
}

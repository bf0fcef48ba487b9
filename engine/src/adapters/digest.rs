//! Digests every adapter sums its plane up with, so `ferry migrate --verify`
//! compares two planes without moving them.
//!
//! A [`SetDigest`] does not depend on the order of what it sums. A version
//! migration chain moves keys (Mystic's v4 lowercases names), so its image
//! of the old plane comes out in another order than the new plane lists it;
//! this digest compares the two without sorting, in memory that does not
//! grow with the keys.

use sha2::{Digest, Sha256};

/// Hashes a key and its value, each preceded by its length (8 bytes,
/// big-endian), so no two different entries hash alike by running one key
/// into the next value.
pub fn hash_entry(hasher: &mut Sha256, key: &[u8], value: &[u8]) {
    hasher.update((key.len() as u64).to_be_bytes());
    hasher.update(key);
    hasher.update((value.len() as u64).to_be_bytes());
    hasher.update(value);
}

/// Keys and values summed up whatever order they come in: the sum, modulo
/// 2^256, of each entry's SHA-256 (its key and value, each preceded by its
/// length as [`hash_entry`] hashes them). Adding the same entries
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

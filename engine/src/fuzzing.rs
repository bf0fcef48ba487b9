//! What the fuzz targets in `fuzz/` check, one function per target, so the
//! same checks also run on every test run (`tests/fuzz_checks.rs` feeds them
//! random and mutated inputs) and a crash the fuzzer finds can be kept as a
//! plain test.
//!
//! Each function takes arbitrary bytes and panics only when ferry is wrong:
//! a decoder that panics, accepts what it should refuse, or reads an op
//! differently from prost.

use bytes::Bytes;
use prost::Message;

use crate::manifest::Manifest;
use crate::segment::op_decode::{TextCache, decode_op};
use crate::segment::{Codec, FORMAT_VERSION, MAGIC, SegmentHeader, SegmentLimits, decode_segment};

/// Limits small enough that a fuzzer's crafted header cannot make a run
/// allocate much.
fn limits() -> SegmentLimits {
    SegmentLimits {
        max_uncompressed_bytes: 1 << 20,
    }
}

/// Ops decoded from `data` as a segment's payload, one after another: each
/// op ferry's decoder accepts must be the op prost reads from the same
/// bytes. Returns how many ops it read before the end or an error.
pub fn op_decoder_agrees_with_prost(data: &[u8]) -> usize {
    let payload = Bytes::copy_from_slice(data);
    let mut offset = 0;
    let mut cache = TextCache::default();
    let mut read = 0;
    while offset < payload.len() {
        let start = offset;
        match decode_op(&payload, &mut offset, &mut cache) {
            Ok(ours) => {
                assert!(offset > start, "the decoder accepted an op of no bytes");
                let theirs = crate::Op::decode_length_delimited(payload.slice(start..offset))
                    .unwrap_or_else(|error| {
                        panic!(
                            "ferry decoded {ours:?} at offset {start}, prost refuses it: {error}"
                        )
                    });
                assert_eq!(
                    ours, theirs,
                    "ferry and prost read the op at offset {start} differently"
                );
                read += 1;
            }
            Err(_) => break,
        }
    }
    read
}

/// `data` as a whole segment object: refused with an error, or decoded
/// into ops that agree with its header. Returns whether it was read whole.
pub fn any_segment_object(data: &[u8]) -> bool {
    check_segment(Bytes::copy_from_slice(data))
}

/// `data` as the uncompressed payload of a segment whose header, checksums
/// and zstd frame are all sound, so the checks past them (the ops
/// themselves, their seqs against the header) are what is exercised.
/// `first_seq` and `op_count` come from the input's first bytes. Returns
/// whether it was read whole.
pub fn segment_around_payload(data: &[u8]) -> bool {
    let (counts, payload) = data.split_at(data.len().min(2));
    let first_seq = u64::from(counts.first().copied().unwrap_or(1));
    let op_count = u64::from(counts.get(1).copied().unwrap_or(1));
    check_segment(sealed(payload, first_seq, op_count))
}

/// A manifest parsed from `data`: refused with an error, or one that
/// validates and comes back the same through its own JSON. Returns
/// whether it was accepted.
pub fn any_manifest(data: &[u8]) -> bool {
    let Ok(manifest) = Manifest::from_json("fuzz", data) else {
        return false;
    };
    let again = Manifest::from_json("fuzz", &manifest.to_json())
        .expect("a manifest ferry accepted and wrote again parses");
    assert_eq!(manifest, again, "a manifest changed through its own JSON");
    true
}

fn check_segment(object: Bytes) -> bool {
    let Ok(decoded) = decode_segment("fuzz", object, limits()) else {
        return false;
    };
    let header = decoded.header.clone();
    let mut expected_seq = header.first_seq;
    for op in decoded.ops() {
        let Ok(op) = op else { return false };
        assert_eq!(
            op.seq, expected_seq,
            "a segment yielded an op out of its run"
        );
        expected_seq += 1;
    }
    // Every op came: exactly the header's run (G1), nothing after it.
    assert_eq!(
        expected_seq - header.first_seq,
        header.op_count,
        "a segment yielded another count of ops than its header declares"
    );
    assert_eq!(
        expected_seq - 1,
        header.last_seq,
        "a segment ended elsewhere than its header's last seq"
    );
    true
}

/// A segment object around `payload` (uncompressed), sound in every check
/// before the ops.
fn sealed(payload: &[u8], first_seq: u64, op_count: u64) -> Bytes {
    let compressed = zstd::bulk::compress(payload, 1).expect("zstd compresses");
    let header = SegmentHeader {
        codec: Codec::Zstd as i32,
        stream_id: "fuzz".to_owned(),
        first_seq,
        last_seq: (first_seq + op_count).saturating_sub(1),
        op_count,
        uncompressed_bytes: payload.len() as u64,
        compressed_bytes: compressed.len() as u64,
        payload_crc32c: crc32c::crc32c(&compressed),
        compression_level: 1,
    };
    let header_bytes = header.encode_to_vec();
    let mut object = Vec::new();
    object.extend_from_slice(MAGIC);
    object.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    object.extend_from_slice(&(header_bytes.len() as u32).to_le_bytes());
    object.extend_from_slice(&header_bytes);
    object.extend_from_slice(&crc32c::crc32c(&header_bytes).to_le_bytes());
    object.extend_from_slice(&compressed);
    Bytes::from(object)
}

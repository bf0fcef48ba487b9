//! A fast decoder for the ops in a segment's payload.
//!
//! Decoding ops is the hot path of every restore. prost's generic decoder
//! goes through `Buf` for every field; this one reads the payload as a
//! slice and cuts the bytes fields out of the shared buffer directly. It
//! decodes exactly what `Op::decode_length_delimited` decodes (a property
//! test holds the two together), and is measured in `benches/`.

use std::collections::HashSet;
use std::sync::{LazyLock, RwLock};

use bytes::Bytes;

use crate::Op;

/// Values longer than this are never interned.
const MAX_INTERNED_BYTES: usize = 64;
/// Distinct values interned for the life of the process, at most: with
/// [`MAX_INTERNED_BYTES`], a bound of 256 KiB however many backups are read.
const MAX_INTERNED_VALUES: usize = 4096;

/// The text fields' values (`kind`, `method`, `content_type`,
/// `platform_version`), each kept once for the life of the process.
///
/// Across a backup these fields take a handful of values (`etcd.kv`, `Put`).
/// An op's copy of an interned value is a static slice, which costs nothing
/// to clone or drop, where a slice of the segment buffer costs two atomic
/// operations: on the restore hot path that is a fifth of the decoding time.
static INTERNED: LazyLock<RwLock<HashSet<&'static [u8]>>> = LazyLock::new(RwLock::default);

/// The interned copy of `value`, interning it if there is room.
fn intern(value: &[u8]) -> Option<Bytes> {
    if value.len() > MAX_INTERNED_BYTES {
        return None;
    }
    if let Some(found) = INTERNED.read().ok()?.get(value) {
        return Some(Bytes::from_static(found));
    }
    let mut table = INTERNED.write().ok()?;
    if let Some(found) = table.get(value) {
        return Some(Bytes::from_static(found));
    }
    if table.len() >= MAX_INTERNED_VALUES {
        return None;
    }
    let leaked: &'static [u8] = Box::leak(value.to_vec().into_boxed_slice());
    table.insert(leaked);
    Some(Bytes::from_static(leaked))
}

/// The last value of each text field a decoder saw: consecutive ops nearly
/// always repeat them, and a hit skips even the interning table's lock.
#[derive(Debug, Default)]
pub(crate) struct TextCache {
    kind: Bytes,
    method: Bytes,
    content_type: Bytes,
    platform_version: Bytes,
}

/// A text field's value: interned where it can be, else a slice of `payload`.
#[inline]
fn text(payload: &Bytes, range: std::ops::Range<usize>, last: &mut Bytes) -> Bytes {
    let value = &payload[range.clone()];
    if last[..] == *value {
        return last.clone();
    }
    match intern(value) {
        Some(interned) => {
            *last = interned.clone();
            interned
        }
        None => payload.slice(range),
    }
}

/// Why an op does not decode.
pub(crate) type DecodeError = &'static str;

/// Reads a varint at `*position`, stopping at `end`.
#[inline]
fn varint(data: &[u8], position: &mut usize) -> Result<u64, DecodeError> {
    let first = *data.get(*position).ok_or("a varint runs past the end")?;
    *position += 1;
    if first < 0x80 {
        return Ok(u64::from(first));
    }
    let mut value = u64::from(first & 0x7f);
    for shift in (7..64).step_by(7) {
        let byte = *data.get(*position).ok_or("a varint runs past the end")?;
        *position += 1;
        if shift == 63 && byte > 1 {
            return Err("a varint overflows 64 bits");
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err("a varint is longer than 10 bytes")
}

/// Reads a length-delimited field's extent at `*position`.
#[inline]
fn extent(data: &[u8], position: &mut usize) -> Result<std::ops::Range<usize>, DecodeError> {
    let length = varint(data, position)?;
    let start = *position;
    let end = usize::try_from(length)
        .ok()
        .and_then(|length| start.checked_add(length))
        .filter(|&end| end <= data.len())
        .ok_or("a field runs past the end of its op")?;
    *position = end;
    Ok(start..end)
}

/// Decodes the length-delimited op that starts at `*offset` in `payload`,
/// and moves `*offset` past it. Bytes fields are slices of `payload`, text
/// fields interned (see [`INTERNED`]).
pub(crate) fn decode_op(
    payload: &Bytes,
    offset: &mut usize,
    cache: &mut TextCache,
) -> Result<Op, DecodeError> {
    let mut position = *offset;
    let op_extent = extent(payload, &mut position)?;
    let data = &payload[..op_extent.end];
    let mut position = op_extent.start;
    let mut op = Op::default();
    while position < data.len() {
        let tag = varint(data, &mut position)?;
        let wire_type = tag & 7;
        let field = tag >> 3;
        if field == 0 || field > u64::from(u32::MAX >> 3) {
            return Err("an invalid field number");
        }
        match (field, wire_type) {
            (1, 0) => op.seq = varint(data, &mut position)?,
            (2, 0) => op.position = varint(data, &mut position)?,
            (3, 0) => op.txn = varint(data, &mut position)?,
            (4, 0) => op.txn_last = varint(data, &mut position)? != 0,
            (5, 2) => op.kind = text(payload, extent(data, &mut position)?, &mut cache.kind),
            (6, 2) => op.key = payload.slice(extent(data, &mut position)?),
            (7, 2) => op.method = text(payload, extent(data, &mut position)?, &mut cache.method),
            (8, 2) => op.body = payload.slice(extent(data, &mut position)?),
            (9, 2) => {
                op.content_type = text(
                    payload,
                    extent(data, &mut position)?,
                    &mut cache.content_type,
                )
            }
            (10, 2) => {
                op.platform_version = text(
                    payload,
                    extent(data, &mut position)?,
                    &mut cache.platform_version,
                )
            }
            (11, 2) => op.deps.push(payload.slice(extent(data, &mut position)?)),
            (1..=11, _) => return Err("a known field has the wrong wire type"),
            // Fields of a newer format: skipped, as protobuf does.
            (_, 0) => {
                varint(data, &mut position)?;
            }
            (_, 1) => {
                position = position
                    .checked_add(8)
                    .filter(|&end| end <= data.len())
                    .ok_or("a field runs past the end of its op")?
            }
            (_, 2) => {
                extent(data, &mut position)?;
            }
            (_, 5) => {
                position = position
                    .checked_add(4)
                    .filter(|&end| end <= data.len())
                    .ok_or("a field runs past the end of its op")?
            }
            _ => return Err("an unsupported wire type"),
        }
    }
    *offset = op_extent.end;
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::testing::arbitrary_op;
    use prost::Message;

    proptest! {
        #[test]
        fn decodes_what_prost_encodes(ops in proptest::collection::vec(arbitrary_op(300), 1..20)) {
            let mut payload = Vec::new();
            for op in &ops {
                op.encode_length_delimited(&mut payload).expect("a Vec grows");
            }
            let payload = Bytes::from(payload);
            let mut offset = 0;
            // One cache for the run, as a segment's decoder keeps one.
            let mut cache = TextCache::default();
            for op in &ops {
                prop_assert_eq!(&decode_op(&payload, &mut offset, &mut cache).expect("decodes"), op);
            }
            prop_assert_eq!(offset, payload.len());
        }

        #[test]
        fn never_accepts_what_prost_would_read_differently(
            op in arbitrary_op(300),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut encoded = op.encode_length_delimited_to_vec();
            for (index, byte) in flips {
                let at = index.index(encoded.len());
                encoded[at] = byte;
            }
            encoded.truncate(1 + cut.index(encoded.len()));
            let payload = Bytes::from(encoded);
            let mut offset = 0;
            if let Ok(ours) = decode_op(&payload, &mut offset, &mut TextCache::default()) {
                let theirs = Op::decode_length_delimited(payload.slice(..offset));
                prop_assert_eq!(theirs.ok(), Some(ours));
            }
        }
    }

    #[test]
    fn skips_fields_of_a_newer_format() {
        let mut encoded = Op {
            seq: 7,
            key: Bytes::from_static(b"k"),
            ..Op::default()
        }
        .encode_to_vec();
        // field 12, varint; field 13, 8 bytes; field 14, bytes; field 15, 4 bytes
        encoded.extend_from_slice(&[
            12 << 3,
            0x96,
            0x01,
            (13 << 3) | 1,
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            8,
            (14 << 3) | 2,
            2,
            b'x',
            b'y',
            (15 << 3) | 5,
            1,
            2,
            3,
            4,
        ]);
        let mut payload = Vec::new();
        prost::encoding::encode_varint(encoded.len() as u64, &mut payload);
        payload.extend_from_slice(&encoded);
        let mut offset = 0;
        let op = decode_op(
            &Bytes::from(payload),
            &mut offset,
            &mut TextCache::default(),
        )
        .expect("decodes");
        assert_eq!((op.seq, &op.key[..]), (7, &b"k"[..]));
    }
}

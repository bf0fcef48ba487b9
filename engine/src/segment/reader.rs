//! Reading a segment: every check before the bytes are trusted.

use bytes::Bytes;
use prost::Message;

use super::op_decode::{TextCache, decode_op};
use super::{Codec, FORMAT_VERSION, MAGIC, PREFIX_LEN, SegmentError, SegmentHeader};
use crate::Op;
use crate::order::SeqTracker;

/// How much a reader is willing to inflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentLimits {
    /// The most bytes one segment may decompress to. A header that declares
    /// more is refused before anything is allocated.
    pub max_uncompressed_bytes: u64,
}

impl Default for SegmentLimits {
    fn default() -> Self {
        Self {
            // 32 times the default segment size: room for larger segments,
            // not for a crafted header to exhaust memory.
            max_uncompressed_bytes: 256 * 1024 * 1024,
        }
    }
}

/// A segment whose header, checksums and length have been checked, and whose
/// payload has been inflated; its ops decode from one shared buffer.
#[derive(Debug, Clone)]
pub struct DecodedSegment {
    /// The segment's name as the caller gave it (for errors).
    pub segment: String,
    /// Its header.
    pub header: SegmentHeader,
    payload: Bytes,
}

/// Checks and inflates one segment object. `segment` names it in errors.
///
/// The checks, in order: layout and magic, format version, header checksum,
/// header sanity, length (truncation), payload CRC-32C, the decompression
/// limit, zstd's own content checksum and the declared length.
pub fn decode_segment(
    segment: &str,
    object: Bytes,
    limits: SegmentLimits,
) -> Result<DecodedSegment, SegmentError> {
    let segment = segment.to_owned();
    let actual_bytes = object.len() as u64;
    if object.len() < PREFIX_LEN {
        return Err(SegmentError::Truncated {
            segment,
            expected_bytes: PREFIX_LEN as u64,
            actual_bytes,
        });
    }
    if &object[..8] != MAGIC {
        return Err(SegmentError::BadMagic { segment });
    }
    let version = u32::from_le_bytes(object[8..12].try_into().expect("4 bytes"));
    if version == 0 || version > FORMAT_VERSION {
        return Err(SegmentError::UnsupportedVersion { segment, version });
    }
    let header_len = u32::from_le_bytes(object[12..16].try_into().expect("4 bytes")) as usize;
    let header_end = PREFIX_LEN + header_len;
    if object.len() < header_end + 4 {
        return Err(SegmentError::Truncated {
            segment,
            expected_bytes: (header_end + 4) as u64,
            actual_bytes,
        });
    }
    let header_bytes = &object[PREFIX_LEN..header_end];
    let stored_crc = u32::from_le_bytes(
        object[header_end..header_end + 4]
            .try_into()
            .expect("4 bytes"),
    );
    if crc32c::crc32c(header_bytes) != stored_crc {
        return Err(SegmentError::HeaderChecksum { segment });
    }
    let header =
        SegmentHeader::decode(header_bytes).map_err(|error| SegmentError::InvalidHeader {
            segment: segment.clone(),
            reason: error.to_string(),
        })?;
    check_header(&segment, &header)?;

    let payload_start = header_end + 4;
    let expected_bytes = payload_start as u64 + header.compressed_bytes;
    if actual_bytes != expected_bytes {
        return Err(SegmentError::Truncated {
            segment,
            expected_bytes,
            actual_bytes,
        });
    }
    let compressed = object.slice(payload_start..);
    let actual_crc = crc32c::crc32c(&compressed);
    if actual_crc != header.payload_crc32c {
        return Err(SegmentError::PayloadChecksum {
            segment,
            first_seq: header.first_seq,
            last_seq: header.last_seq,
            expected: header.payload_crc32c,
            actual: actual_crc,
        });
    }
    if header.uncompressed_bytes > limits.max_uncompressed_bytes {
        return Err(SegmentError::TooLarge {
            segment,
            uncompressed_bytes: header.uncompressed_bytes,
            limit: limits.max_uncompressed_bytes,
        });
    }
    let payload = inflate(&segment, &header, &compressed)?;
    Ok(DecodedSegment {
        segment,
        header,
        payload,
    })
}

fn check_header(segment: &str, header: &SegmentHeader) -> Result<(), SegmentError> {
    let invalid = |reason: String| SegmentError::InvalidHeader {
        segment: segment.to_owned(),
        reason,
    };
    if header.codec != Codec::Zstd as i32 {
        return Err(invalid(format!("unknown codec {}", header.codec)));
    }
    if header.op_count == 0 || header.first_seq == 0 || header.last_seq < header.first_seq {
        return Err(invalid(format!(
            "seq range {}..={} with {} ops",
            header.first_seq, header.last_seq, header.op_count
        )));
    }
    if header.last_seq - header.first_seq + 1 != header.op_count {
        return Err(invalid(format!(
            "seq range {}..={} cannot hold {} ops",
            header.first_seq, header.last_seq, header.op_count
        )));
    }
    Ok(())
}

fn inflate(
    segment: &str,
    header: &SegmentHeader,
    compressed: &[u8],
) -> Result<Bytes, SegmentError> {
    let decompress_error = |reason: String| SegmentError::Decompress {
        segment: segment.to_owned(),
        first_seq: header.first_seq,
        last_seq: header.last_seq,
        reason,
    };
    let declared = header.uncompressed_bytes as usize;
    // One shot into a buffer of exactly the declared size: zstd cannot write
    // past it, and needs no window of its own beside it.
    let mut payload = payload_pool::take(declared);
    let mut decompressor =
        zstd::bulk::Decompressor::new().map_err(|error| decompress_error(error.to_string()))?;
    let written = decompressor
        .decompress_to_buffer(compressed, &mut payload)
        .map_err(|error| decompress_error(error.to_string()))?;
    if written != declared {
        return Err(decompress_error(format!(
            "inflated to {written} bytes, the header declares {declared}"
        )));
    }
    Ok(payload_pool::share(payload))
}

/// Inflated payloads are a segment's worth of memory each, and a restore
/// inflates one after another. A payload's buffer goes back to a small pool
/// when the last op that slices it is dropped, so the next segment inflates
/// into memory that is already mapped instead of faulting in fresh pages
/// (a seventh of the decode time in `benches/`, with the allocator handing
/// freed pages back to the kernel between segments).
mod payload_pool {
    use std::sync::Mutex;

    use bytes::Bytes;

    /// Buffers kept for reuse, at most.
    const POOLED_BUFFERS: usize = 4;
    /// Larger buffers (from unusually large segments) are not kept.
    const MAX_POOLED_CAPACITY: usize = 64 * 1024 * 1024;

    static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    /// An empty buffer with room for `capacity` bytes, reused if one is free.
    pub(super) fn take(capacity: usize) -> Vec<u8> {
        let mut buffer = POOL
            .lock()
            .ok()
            .and_then(|mut pool| pool.pop())
            .unwrap_or_default();
        buffer.clear();
        buffer.reserve_exact(capacity);
        buffer
    }

    /// The buffer as shared bytes that return it to the pool when dropped.
    pub(super) fn share(buffer: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled(buffer))
    }

    struct Pooled(Vec<u8>);

    impl AsRef<[u8]> for Pooled {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for Pooled {
        fn drop(&mut self) {
            let buffer = std::mem::take(&mut self.0);
            if buffer.capacity() > MAX_POOLED_CAPACITY {
                return;
            }
            if let Ok(mut pool) = POOL.lock()
                && pool.len() < POOLED_BUFFERS
            {
                pool.push(buffer);
            }
        }
    }
}

impl DecodedSegment {
    /// Decodes every op into one `Vec` (see [`DecodedSegment::ops`]).
    pub fn into_ops(self) -> Result<Vec<Op>, SegmentError> {
        self.ops().collect()
    }

    /// The ops, decoded one at a time from the shared buffer and checked
    /// against the header as they come: a contiguous run (G1) from
    /// `first_seq` to `last_seq`, exactly `op_count` of them, nothing after
    /// the last. A broken segment yields its error and then ends.
    pub fn ops(self) -> SegmentOps {
        SegmentOps {
            tracker: SeqTracker::starting_at(self.header.first_seq),
            offset: 0,
            text_cache: TextCache::default(),
            segment: self,
            finished: false,
        }
    }

    fn mismatch(&self, found: String) -> SegmentError {
        SegmentError::HeaderMismatch {
            segment: self.segment.clone(),
            declared: format!(
                "{} ops, seq {}..={}",
                self.header.op_count, self.header.first_seq, self.header.last_seq
            ),
            found,
        }
    }
}

/// The ops of a [`DecodedSegment`], in order; see [`DecodedSegment::ops`].
#[derive(Debug)]
pub struct SegmentOps {
    segment: DecodedSegment,
    offset: usize,
    text_cache: TextCache,
    tracker: SeqTracker,
    finished: bool,
}

impl SegmentOps {
    fn next_op(&mut self) -> Result<Option<Op>, SegmentError> {
        let header = &self.segment.header;
        if self.offset == self.segment.payload.len() {
            if self.tracker.last_seq() != header.last_seq {
                return Err(self.segment.mismatch(format!(
                    "{} ops, through seq {}",
                    self.tracker.last_seq() + 1 - header.first_seq,
                    self.tracker.last_seq()
                )));
            }
            return Ok(None);
        }
        let offset = self.offset;
        let op = decode_op(
            &self.segment.payload,
            &mut self.offset,
            &mut self.text_cache,
        )
        .map_err(|reason| SegmentError::OpDecode {
            segment: self.segment.segment.clone(),
            after_seq: self.tracker.last_seq(),
            offset,
            reason: reason.to_owned(),
        })?;
        self.tracker
            .try_advance(op.seq)
            .map_err(|source| SegmentError::OutOfOrder {
                segment: self.segment.segment.clone(),
                source,
            })?;
        if op.seq > header.last_seq {
            return Err(self.segment.mismatch(format!("ops through seq {}", op.seq)));
        }
        Ok(Some(op))
    }
}

impl Iterator for SegmentOps {
    type Item = Result<Op, SegmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        match self.next_op() {
            Ok(Some(op)) => Some(Ok(op)),
            Ok(None) => {
                self.finished = true;
                None
            }
            Err(error) => {
                self.finished = true;
                Some(Err(error))
            }
        }
    }
}

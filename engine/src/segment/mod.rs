//! Segments: the objects that hold ops in object storage.
//!
//! A segment is self-describing (the layout is in
//! `proto/ferry/v1/segment.proto`): a magic and format version, a
//! [`SegmentHeader`] with its own CRC-32C, then one zstd frame of
//! length-delimited ops. [`SegmentEncoder`] writes one, [`decode_segment`]
//! reads one back, checking everything it can before trusting a byte, and
//! never inflating more than the header declares or the reader allows.

pub(crate) mod op_decode;
mod reader;
mod writer;

pub use ferry_proto::v1::{Codec, SegmentHeader};
pub use reader::{DecodedSegment, SegmentLimits, SegmentOps, decode_segment};
pub use writer::{SealedSegment, SegmentEncoder, SegmentOptions};

use std::fmt;

/// The first eight bytes of every segment.
pub const MAGIC: &[u8; 8] = b"FERRYSEG";

/// The segment format this build writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes before the header: magic, format version, header length.
pub(crate) const PREFIX_LEN: usize = 16;

/// A segment's name: its seq range, `<first-seq:020>-<last-seq:020>`, which
/// sorts in seq order and is the stem of its object's file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    /// The seq of the segment's first op.
    pub first_seq: u64,
    /// The seq of the segment's last op.
    pub last_seq: u64,
}

impl SegmentName {
    /// The object's file name in `backups/<id>/segments/`.
    pub fn file_name(&self) -> String {
        format!("{self}.ops.zst")
    }

    /// Parses a file name written by [`SegmentName::file_name`].
    pub fn parse_file_name(file_name: &str) -> Option<Self> {
        let stem = file_name.strip_suffix(".ops.zst")?;
        let (first, last) = stem.split_once('-')?;
        if first.len() != 20 || last.len() != 20 {
            return None;
        }
        Some(Self {
            first_seq: first.parse().ok()?,
            last_seq: last.parse().ok()?,
        })
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:020}-{:020}", self.first_seq, self.last_seq)
    }
}

/// A segment failed one of its checks. Every case names the segment (its
/// seq range) and, where one is known, the seq.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The object does not start with [`MAGIC`]: it is not a segment.
    #[error(
        "segment {segment} is not a ferry segment (bad magic); the backup is damaged, restore from another one"
    )]
    BadMagic {
        /// The segment, by name.
        segment: String,
    },
    /// Written by a newer ferry.
    #[error(
        "segment {segment} has format version {version}, this ferry reads up to {FORMAT_VERSION}; use a newer ferry"
    )]
    UnsupportedVersion {
        /// The segment, by name.
        segment: String,
        /// The version it declares.
        version: u32,
    },
    /// The object is shorter (or longer) than its header says.
    #[error(
        "segment {segment} is truncated: {actual_bytes} bytes where {expected_bytes} were written; the backup is damaged, restore from another one"
    )]
    Truncated {
        /// The segment, by name.
        segment: String,
        /// The length the header (or the minimal layout) requires.
        expected_bytes: u64,
        /// The length of the object read.
        actual_bytes: u64,
    },
    /// The header's CRC-32C does not match: the header bytes are damaged.
    #[error(
        "segment {segment} failed its header checksum; the backup is damaged, restore from another one"
    )]
    HeaderChecksum {
        /// The segment, by name.
        segment: String,
    },
    /// The header decodes but says something impossible.
    #[error("segment {segment} has an invalid header: {reason}")]
    InvalidHeader {
        /// The segment, by name.
        segment: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The compressed payload's CRC-32C does not match.
    #[error(
        "segment {segment} (seq {first_seq}..={last_seq}) failed its checksum: CRC-32C {actual:08x}, header says {expected:08x}; the backup is damaged, restore from another one"
    )]
    PayloadChecksum {
        /// The segment, by name.
        segment: String,
        /// The first seq the header declares.
        first_seq: u64,
        /// The last seq the header declares.
        last_seq: u64,
        /// The checksum in the header.
        expected: u32,
        /// The checksum of the bytes read.
        actual: u32,
    },
    /// The header declares more than this reader may inflate.
    #[error(
        "segment {segment} would decompress to {uncompressed_bytes} bytes, over the limit of {limit}; raise --max-segment-bytes if the backup was written with larger segments"
    )]
    TooLarge {
        /// The segment, by name.
        segment: String,
        /// What the header declares.
        uncompressed_bytes: u64,
        /// The reader's limit.
        limit: u64,
    },
    /// zstd refused the payload, or it inflated to another length than declared.
    #[error(
        "segment {segment} (seq {first_seq}..={last_seq}) does not decompress: {reason}; the backup is damaged, restore from another one"
    )]
    Decompress {
        /// The segment, by name.
        segment: String,
        /// The first seq the header declares.
        first_seq: u64,
        /// The last seq the header declares.
        last_seq: u64,
        /// What zstd or the length check said.
        reason: String,
    },
    /// An op in the payload does not decode.
    #[error(
        "segment {segment}: the op after seq {after_seq} does not decode at payload offset {offset}: {reason}"
    )]
    OpDecode {
        /// The segment, by name.
        segment: String,
        /// The seq of the last op that decoded (the segment's first seq - 1 if none).
        after_seq: u64,
        /// Where in the uncompressed payload it starts.
        offset: usize,
        /// What prost said.
        reason: String,
    },
    /// The ops inside the segment are not the contiguous run its header names (G1).
    #[error("segment {segment}: {source}")]
    OutOfOrder {
        /// The segment, by name.
        segment: String,
        /// The gap or repeat.
        source: crate::order::OrderError,
    },
    /// The header's op count or seq range disagrees with the ops inside.
    #[error("segment {segment}: the header declares {declared} but the payload holds {found}")]
    HeaderMismatch {
        /// The segment, by name.
        segment: String,
        /// What the header says.
        declared: String,
        /// What the payload holds.
        found: String,
    },
    /// Compressing a segment failed (only the writer raises this).
    #[error("cannot compress segment {segment}: {source}")]
    Compress {
        /// The segment, by name.
        segment: String,
        /// The zstd error.
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_seq_order_and_parse_back() {
        let name = SegmentName {
            first_seq: 4097,
            last_seq: 8192,
        };
        assert_eq!(
            name.file_name(),
            "00000000000000004097-00000000000000008192.ops.zst"
        );
        assert_eq!(SegmentName::parse_file_name(&name.file_name()), Some(name));
        assert_eq!(SegmentName::parse_file_name("4097-8192.ops.zst"), None);
        assert_eq!(SegmentName::parse_file_name("manifest.json"), None);
    }
}

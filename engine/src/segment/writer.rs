//! Writing a segment: ops in, one sealed object out.

use std::io::Write;

use bytes::Bytes;
use prost::Message;
use sha2::{Digest, Sha256};

use super::{Codec, FORMAT_VERSION, MAGIC, PREFIX_LEN, SegmentError, SegmentHeader, SegmentName};
use crate::Op;

/// Encoded ops are handed to zstd in runs of about this size (zstd's own
/// block size), so the encoder never holds a whole segment uncompressed.
const STAGE_BYTES: usize = 128 * 1024;

/// How segments are cut and compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentOptions {
    /// A segment is sealed once this many bytes of encoded ops went in.
    pub target_uncompressed_bytes: usize,
    /// The zstd level, 1 (fast) to 19 (small).
    pub compression_level: i32,
}

/// The default zstd level. 1, not zstd's own 3: on the ops ferry carries
/// (COPY text of a Metaflow database, Pachyderm-like JSON records) level 1
/// compressed as small or smaller (a 4x PostgreSQL backup: 56 MiB against
/// 60 MiB) at about twice the speed, and an extract runs on the cores of
/// the server it reads (level 3 was 0.6 of 2.3 CPU-seconds of that
/// extract's client).
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;

impl Default for SegmentOptions {
    fn default() -> Self {
        Self {
            target_uncompressed_bytes: 8 * 1024 * 1024,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
        }
    }
}

/// Builds one segment, streaming ops through zstd as they come. CPU-bound:
/// run it on a blocking thread, not inside async code.
pub struct SegmentEncoder {
    stream_id: String,
    options: SegmentOptions,
    encoder: zstd::stream::write::Encoder<'static, Vec<u8>>,
    stage: Vec<u8>,
    first_seq: u64,
    last_seq: u64,
    op_count: u64,
    uncompressed_bytes: u64,
}

impl SegmentEncoder {
    /// Starts an empty segment of stream `stream_id`.
    pub fn new(stream_id: &str, options: SegmentOptions) -> Result<Self, SegmentError> {
        let compress_error = |source| SegmentError::Compress {
            segment: "(new)".to_owned(),
            source,
        };
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), options.compression_level)
            .map_err(compress_error)?;
        // zstd's own XXH64 of the content, checked again when it inflates.
        encoder.include_checksum(true).map_err(compress_error)?;
        Ok(Self {
            stream_id: stream_id.to_owned(),
            options,
            encoder,
            stage: Vec::with_capacity(STAGE_BYTES + 4096),
            first_seq: 0,
            last_seq: 0,
            op_count: 0,
            uncompressed_bytes: 0,
        })
    }

    /// Appends an op. The caller keeps seqs contiguous (it owns the
    /// [`SeqTracker`](crate::order::SeqTracker)); the reader checks again.
    pub fn push(&mut self, op: &Op) -> Result<(), SegmentError> {
        if self.op_count == 0 {
            self.first_seq = op.seq;
        }
        self.last_seq = op.seq;
        self.op_count += 1;
        let before = self.stage.len();
        op.encode_length_delimited(&mut self.stage)
            .expect("a Vec grows to fit any op");
        self.uncompressed_bytes += (self.stage.len() - before) as u64;
        if self.stage.len() >= STAGE_BYTES {
            self.flush_stage()?;
        }
        Ok(())
    }

    /// True once the segment holds its target size of ops.
    pub fn is_full(&self) -> bool {
        self.uncompressed_bytes >= self.options.target_uncompressed_bytes as u64
    }

    /// True before the first op.
    pub fn is_empty(&self) -> bool {
        self.op_count == 0
    }

    /// Finishes the zstd frame and builds the object.
    pub fn seal(mut self) -> Result<SealedSegment, SegmentError> {
        self.flush_stage()?;
        let name = self.name();
        let payload = self
            .encoder
            .finish()
            .map_err(|source| SegmentError::Compress {
                segment: name.to_string(),
                source,
            })?;
        let header = SegmentHeader {
            codec: Codec::Zstd as i32,
            stream_id: self.stream_id,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            op_count: self.op_count,
            uncompressed_bytes: self.uncompressed_bytes,
            compressed_bytes: payload.len() as u64,
            payload_crc32c: crc32c::crc32c(&payload),
            compression_level: self.options.compression_level,
        };
        let header_bytes = header.encode_to_vec();
        let mut prefix = Vec::with_capacity(PREFIX_LEN + header_bytes.len() + 4);
        prefix.extend_from_slice(MAGIC);
        prefix.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        prefix.extend_from_slice(&(header_bytes.len() as u32).to_le_bytes());
        prefix.extend_from_slice(&header_bytes);
        prefix.extend_from_slice(&crc32c::crc32c(&header_bytes).to_le_bytes());

        let mut sha256 = Sha256::new();
        sha256.update(&prefix);
        sha256.update(&payload);
        Ok(SealedSegment {
            name,
            header,
            prefix: Bytes::from(prefix),
            payload: Bytes::from(payload),
            sha256: sha256.finalize().into(),
        })
    }

    fn name(&self) -> SegmentName {
        SegmentName {
            first_seq: self.first_seq,
            last_seq: self.last_seq,
        }
    }

    fn flush_stage(&mut self) -> Result<(), SegmentError> {
        if self.stage.is_empty() {
            return Ok(());
        }
        let result = self.encoder.write_all(&self.stage);
        self.stage.clear();
        result.map_err(|source| SegmentError::Compress {
            segment: self.name().to_string(),
            source,
        })
    }
}

/// A finished segment, ready to upload: the object is `prefix` followed by
/// `payload`, kept as two buffers so neither is copied.
#[derive(Debug, Clone)]
pub struct SealedSegment {
    /// Its seq range.
    pub name: SegmentName,
    /// The header written into it.
    pub header: SegmentHeader,
    /// Magic, version, header and header checksum.
    pub prefix: Bytes,
    /// The zstd frame.
    pub payload: Bytes,
    /// SHA-256 of the whole object, recorded in the manifest.
    pub sha256: [u8; 32],
}

impl SealedSegment {
    /// Length of the whole object.
    pub fn len(&self) -> u64 {
        (self.prefix.len() + self.payload.len()) as u64
    }

    /// Never true: a sealed segment has at least its prefix.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The whole object in one buffer (copies; for tests and small tools).
    pub fn to_bytes(&self) -> Bytes {
        let mut object = Vec::with_capacity(self.len() as usize);
        object.extend_from_slice(&self.prefix);
        object.extend_from_slice(&self.payload);
        Bytes::from(object)
    }
}

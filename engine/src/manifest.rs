//! The manifest: the JSON document that seals a backup.
//!
//! It lists every segment with its seq range, sizes and SHA-256, and is
//! written last, with a create-only put: a backup without one is incomplete
//! and is never restored. People read it, so it is pretty-printed JSON. It
//! never holds an endpoint or a credential.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::segment::SegmentName;

/// The manifest format this build writes, and the newest it reads.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// A sealed backup's table of contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The manifest format version; a newer one is refused, not misread.
    pub format_version: u32,
    /// The backup's id, also its folder name.
    pub backup_id: String,
    /// When the extract started.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the manifest was sealed.
    #[serde(with = "time::serde::rfc3339")]
    pub completed_at: OffsetDateTime,
    /// The ferry that wrote it.
    pub tool: ToolInfo,
    /// What was extracted.
    pub source: SourceInfo,
    /// The segment format of every segment.
    pub segment_format_version: u32,
    /// `zstd`.
    pub codec: String,
    /// The zstd level the segments were written with.
    pub compression_level: i32,
    /// Sums over the segments.
    pub totals: Totals,
    /// Every segment, in seq order, contiguous from seq 1.
    pub segments: Vec<SegmentEntry>,
}

/// The program that wrote a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolInfo {
    /// `ferry`.
    pub name: String,
    /// Its version.
    pub version: String,
}

impl ToolInfo {
    /// This build of ferry.
    pub fn current() -> Self {
        Self {
            name: "ferry".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// What a backup was taken from. Never an endpoint or a credential.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The adapter: `jsonl`, `etcd`, ...
    pub platform: String,
    /// The platform's version, when the source reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_version: Option<String>,
    /// A stable identity of the source (e.g. etcd's cluster id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The source position the snapshot was taken at (e.g. an etcd revision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_position: Option<u64>,
    /// The key prefix the backup was limited to, when it was (and is text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// A short description for people (e.g. a file name), never an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Sums over a backup's segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Ops in the backup.
    pub ops: u64,
    /// Segments in the backup.
    pub segments: u64,
    /// Bytes of encoded ops before compression.
    pub uncompressed_bytes: u64,
    /// Bytes stored (whole segment objects).
    pub compressed_bytes: u64,
}

impl Totals {
    /// Uncompressed over compressed; 0 for an empty backup.
    pub fn compression_ratio(&self) -> f64 {
        if self.compressed_bytes == 0 {
            0.0
        } else {
            self.uncompressed_bytes as f64 / self.compressed_bytes as f64
        }
    }
}

/// One segment as the manifest knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// `<first-seq:020>-<last-seq:020>`.
    pub name: String,
    /// The object's path, relative to the backup's folder.
    pub path: String,
    /// The seq of its first op.
    pub first_seq: u64,
    /// The seq of its last op.
    pub last_seq: u64,
    /// Ops in it.
    pub ops: u64,
    /// Bytes of encoded ops before compression.
    pub uncompressed_bytes: u64,
    /// Bytes of the whole object.
    pub compressed_bytes: u64,
    /// SHA-256 of the whole object, lowercase hex.
    pub sha256: String,
}

/// A manifest that cannot be read or does not add up.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON, or not a manifest.
    #[error("the manifest of backup {backup_id} does not parse: {source}; the backup is damaged")]
    Parse {
        /// The backup.
        backup_id: String,
        /// What serde_json said, with line and column.
        source: serde_json::Error,
    },
    /// Written by a newer ferry.
    #[error(
        "the manifest of backup {backup_id} has format version {version}, this ferry reads up to {MANIFEST_FORMAT_VERSION}; use a newer ferry"
    )]
    UnsupportedVersion {
        /// The backup.
        backup_id: String,
        /// The version it declares.
        version: u32,
    },
    /// The manifest contradicts itself: a hole or overlap between segments,
    /// a name that is not its range, totals that are not the sums.
    #[error(
        "the manifest of backup {backup_id} is inconsistent at segment {segment}: {reason}; the backup is damaged"
    )]
    Inconsistent {
        /// The backup.
        backup_id: String,
        /// The segment where it stops adding up (or `totals`).
        segment: String,
        /// What does not add up.
        reason: String,
    },
}

impl Manifest {
    /// Parses and checks a manifest read from `backups/<backup_id>/`.
    pub fn from_json(backup_id: &str, json: &[u8]) -> Result<Self, ManifestError> {
        let manifest: Manifest =
            serde_json::from_slice(json).map_err(|source| ManifestError::Parse {
                backup_id: backup_id.to_owned(),
                source,
            })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The manifest as people read it.
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        json.push(b'\n');
        json
    }

    /// Checks that the manifest adds up: a supported version, segments
    /// contiguous from seq 1 (G1), names that are their ranges, totals that
    /// are the sums.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let backup_id = &self.backup_id;
        if self.format_version == 0 || self.format_version > MANIFEST_FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion {
                backup_id: backup_id.clone(),
                version: self.format_version,
            });
        }
        let inconsistent = |segment: &str, reason: String| ManifestError::Inconsistent {
            backup_id: backup_id.clone(),
            segment: segment.to_owned(),
            reason,
        };
        let mut next_seq = 1;
        let mut sums = Totals::default();
        for entry in &self.segments {
            if entry.first_seq != next_seq {
                return Err(inconsistent(
                    &entry.name,
                    format!(
                        "it starts at seq {} where seq {next_seq} was expected",
                        entry.first_seq
                    ),
                ));
            }
            if entry.last_seq < entry.first_seq || entry.last_seq - entry.first_seq + 1 != entry.ops
            {
                return Err(inconsistent(
                    &entry.name,
                    format!(
                        "seq {}..={} does not hold {} ops",
                        entry.first_seq, entry.last_seq, entry.ops
                    ),
                ));
            }
            let name = SegmentName {
                first_seq: entry.first_seq,
                last_seq: entry.last_seq,
            };
            if entry.name != name.to_string()
                || entry.path != format!("segments/{}", name.file_name())
            {
                return Err(inconsistent(
                    &entry.name,
                    format!("its name or path is not its seq range {name}"),
                ));
            }
            if entry.sha256.len() != 64 || !entry.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(inconsistent(
                    &entry.name,
                    "its sha256 is not 64 hex digits".to_owned(),
                ));
            }
            next_seq = entry.last_seq + 1;
            sums.ops += entry.ops;
            sums.segments += 1;
            sums.uncompressed_bytes += entry.uncompressed_bytes;
            sums.compressed_bytes += entry.compressed_bytes;
        }
        if sums != self.totals {
            return Err(inconsistent(
                "totals",
                format!(
                    "totals {:?} are not the sums of the segments {:?}",
                    self.totals, sums
                ),
            ));
        }
        Ok(())
    }

    /// The seq of the last op; 0 for an empty backup.
    pub fn last_seq(&self) -> u64 {
        self.segments.last().map_or(0, |entry| entry.last_seq)
    }
}

/// What an extract writes before its first segment (`started.json`), so a
/// restore can follow the backup while it is being written (`ferry restore
/// --follow`): the stream's id and source, everything a sink's `begin`
/// needs. It seals nothing: the manifest, written last, still does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRecord {
    /// The manifest format the extract will seal with.
    pub format_version: u32,
    /// The backup's id.
    pub backup_id: String,
    /// When the extract started.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The ferry writing it.
    pub tool: ToolInfo,
    /// What is being extracted.
    pub source: SourceInfo,
    /// The segment format of every segment.
    pub segment_format_version: u32,
}

impl StartRecord {
    /// Parses a start record read from `backups/<backup_id>/`.
    pub fn from_json(backup_id: &str, json: &[u8]) -> Result<Self, ManifestError> {
        let record: StartRecord =
            serde_json::from_slice(json).map_err(|source| ManifestError::Parse {
                backup_id: backup_id.to_owned(),
                source,
            })?;
        if record.format_version == 0 || record.format_version > MANIFEST_FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion {
                backup_id: backup_id.to_owned(),
                version: record.format_version,
            });
        }
        if record.backup_id != backup_id {
            return Err(ManifestError::Inconsistent {
                backup_id: backup_id.to_owned(),
                segment: "started.json".to_owned(),
                reason: format!("it names backup {}", record.backup_id),
            });
        }
        Ok(record)
    }

    /// The record as people read it.
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("a start record always serializes");
        json.push(b'\n');
        json
    }
}

/// What an extract rewrites every few seconds while it runs (`alive.json`),
/// so a restore following the backup tells a dead extract (killed, or its
/// machine gone: the beat stops) from a slow one (the beat goes on) without
/// waiting out its whole timeout. Followers compare beats, never clocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The backup's id.
    pub backup_id: String,
    /// Counts up from 1, once a beat.
    pub beat: u64,
    /// The extract's clock at this beat, for people.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Milliseconds between beats.
    pub every_ms: u64,
}

/// What an extract that stopped on an error writes (`failed.json`), so a
/// restore following the backup stops at once with the extract's reason
/// instead of waiting for segments that will never come. An extract that
/// is killed writes nothing; a follower finds that by the time it waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// The backup's id.
    pub backup_id: String,
    /// When the extract stopped.
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: OffsetDateTime,
    /// The extract's error, as it reported it.
    pub reason: String,
}

//! Shared data for ferry's benches.
//!
//! Every bench measures ferry against a peer tool or the physical limit in
//! the same run, on the same data, and reports a ratio (DESIGN.md,
//! "Testing"). This crate holds the data generators they share:
//!
//! - [`pachyderm_commit_ops`]: etcd `Put`s of Pachyderm commit records, the
//!   shape of a real control-plane snapshot.
//! - [`encode_length_delimited`]: the ops as a segment's payload holds them,
//!   the input of the raw-zstd baseline.
//! - [`run`]: what the etcd benches do alike (the `ferry` binary, batched
//!   Txn writes, counts).

pub mod run;

use bytes::Bytes;
use ferry_engine::Op;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The length of every generated value: a small JSON document, as etcd holds
/// for each Pachyderm commit.
pub const VALUE_BYTES: usize = 200;

/// The seed of every bench's data, so runs compare like with like.
pub const SEED: u64 = 0x00fe_7272_7900_0001;

/// Repositories the generated commits belong to: a few dozen, as a real
/// deployment has.
const REPOS: &[&str] = &[
    "images",
    "edges",
    "montage",
    "training-data",
    "labels",
    "features",
    "model-weights",
    "eval-reports",
    "raw-logs",
    "clean-logs",
    "sessions",
    "clickstream",
    "user-events",
    "geo-tiles",
    "lidar-scans",
    "audio-clips",
    "transcripts",
    "embeddings",
    "vocab",
    "tokenized",
    "checkpoints",
    "metrics",
    "alerts",
    "invoices",
    "ledger",
    "fraud-scores",
    "catalog",
    "thumbnails",
    "video-frames",
    "annotations",
    "splits",
    "benchmarks",
    "census",
    "weather",
];

/// Words the `description` field is cut from, so values read like text.
const DESCRIPTION: &str = "nightly ingest of new images from the upload bucket, retrained edge \
    detector with the updated label set and recomputed the montage for review by the data team";

/// Ops whose length-delimited encodings add up to at least
/// `target_encoded_bytes`, as an etcd snapshot of Pachyderm's commit records
/// would produce them: see [`PachydermCommits`].
///
/// The same `seed` gives the same ops on every machine.
pub fn pachyderm_commit_ops(target_encoded_bytes: usize, seed: u64) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut encoded_bytes = 0;
    for op in PachydermCommits::new(seed) {
        if encoded_bytes >= target_encoded_bytes {
            break;
        }
        encoded_bytes += op.encoded_len() + prost::length_delimiter_len(op.encoded_len());
        ops.push(op);
    }
    ops
}

/// An endless, deterministic stream of ops as an etcd snapshot of
/// Pachyderm's commit records would produce them: key
/// `/pachyderm/pfs/commits/<repo>/<40-hex hash>`, a [`VALUE_BYTES`]-byte JSON
/// value, method `Put`, kind `etcd.kv`, positions (etcd revisions)
/// increasing, seqs contiguous from 1.
pub struct PachydermCommits {
    rng: StdRng,
    /// The newest commit of each repo, the parent of its next one.
    heads: Vec<Option<String>>,
    seq: u64,
    position: u64,
    started: u64,
}

impl PachydermCommits {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            heads: vec![None; REPOS.len()],
            seq: 0,
            position: 18_204,
            started: 1_712_000_000,
        }
    }
}

impl Iterator for PachydermCommits {
    type Item = Op;

    fn next(&mut self) -> Option<Op> {
        let repo_index = self.rng.random_range(0..REPOS.len());
        let repo = REPOS[repo_index];
        let hash = hex_hash(&mut self.rng);
        self.seq += 1;
        self.position += self.rng.random_range(1..=3);
        self.started += self.rng.random_range(0..=90);
        let value = commit_value(
            &mut self.rng,
            repo,
            &hash,
            self.heads[repo_index].as_deref(),
            self.started,
        );
        self.heads[repo_index] = Some(hash.clone());
        Some(Op {
            seq: self.seq,
            position: self.position,
            txn: 0,
            txn_last: true,
            kind: Bytes::from_static(b"etcd.kv"),
            key: Bytes::from(format!("/pachyderm/pfs/commits/{repo}/{hash}")),
            method: Bytes::from_static(b"Put"),
            body: Bytes::from(value),
            content_type: Bytes::from_static(b"application/json"),
            platform_version: Bytes::from_static(b"1.13"),
            deps: Vec::new(),
        })
    }
}

/// The ops one after the other, each prefixed with its length: exactly the
/// bytes a segment's zstd frame holds.
pub fn encode_length_delimited(ops: &[Op]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for op in ops {
        op.encode_length_delimited(&mut bytes)
            .expect("a Vec grows to fit any op");
    }
    bytes
}

fn hex_hash(rng: &mut StdRng) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    (0..40)
        .map(|_| char::from(HEX[rng.random_range(0..16)]))
        .collect()
}

/// A commit record as JSON, padded with a description to exactly
/// [`VALUE_BYTES`] bytes.
fn commit_value(
    rng: &mut StdRng,
    repo: &str,
    hash: &str,
    parent: Option<&str>,
    started: u64,
) -> String {
    let origin = if rng.random_ratio(1, 5) {
        "AUTO"
    } else {
        "USER"
    };
    let size_bytes: u32 = rng.random_range(1_000..200_000_000);
    let mut value = format!(
        r#"{{"repo":"{repo}","id":"{hash}","parent":"{parent}","origin":"{origin}","started":{started},"size_bytes":{size_bytes}"#,
        parent = parent.unwrap_or(""),
    );
    const FIELD_OPEN: &str = r#","description":""#;
    // Room left before the closing `}`.
    let room = VALUE_BYTES - 1 - value.len();
    if room > FIELD_OPEN.len() + 1 {
        let text_len = room - FIELD_OPEN.len() - 1;
        let start = rng.random_range(0..DESCRIPTION.len() - text_len);
        value.push_str(FIELD_OPEN);
        value.push_str(&DESCRIPTION[start..start + text_len]);
        value.push('"');
    } else {
        value.extend(std::iter::repeat_n(' ', room));
    }
    value.push('}');
    debug_assert_eq!(value.len(), VALUE_BYTES);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_are_deterministic_contiguous_and_about_the_size_asked() {
        let ops = pachyderm_commit_ops(256 * 1024, SEED);
        assert_eq!(ops, pachyderm_commit_ops(256 * 1024, SEED));
        let encoded = encode_length_delimited(&ops);
        assert!(encoded.len() >= 256 * 1024 && encoded.len() < 256 * 1024 + 1024);
        for (index, op) in ops.iter().enumerate() {
            assert_eq!(op.seq, index as u64 + 1);
            assert_eq!(op.body.len(), VALUE_BYTES);
            assert!(op.key.starts_with(b"/pachyderm/pfs/commits/"));
            let body = std::str::from_utf8(&op.body).expect("values are text");
            assert!(body.starts_with(r#"{"repo":""#) && body.ends_with('}'));
        }
        assert!(
            ops.windows(2)
                .all(|pair| pair[0].position < pair[1].position)
        );
    }
}

//! Checkpoints in the target: the stored value, its keys (one per lane),
//! reading them back and the point a restore resumes from.

use ferry_proto::etcd::etcdserverpb::RangeRequest;
use serde::{Deserialize, Serialize};

use super::target_error;
use crate::Result;
use crate::adapters::etcd::client::EtcdClient;
use crate::adapters::etcd::{
    CHECKPOINT_PREFIX, EPOCH_KEY, EtcdConnection, EtcdError, prefix_end, printable,
};

/// What a restore records in the target, under
/// `__ferry__/checkpoints/<stream id>`, in the same Txn as the ops it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The stream (backup id).
    pub stream_id: String,
    /// The source the stream came from (e.g. etcd's cluster id).
    pub source_identity: Option<String>,
    /// Every op up to and including this seq has taken effect.
    pub applied_through_seq: u64,
    /// The source position of that op.
    pub applied_through_position: u64,
    /// The migration attempt that wrote it (G5); 0 for a restore.
    pub epoch: u64,
    /// True once the whole stream is applied.
    pub complete: bool,
    /// A random id of the sink that wrote it: two sinks of one stream never
    /// write the same value, so neither mistakes the other's Txn for its own.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub writer: String,
    /// Written by a restore in lanes: the lane and the Txn that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane_txn: Option<LaneTxn>,
}

/// The Txn that wrote a lane's checkpoint: every op of seqs
/// `first_seq..=last_seq` took effect with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneTxn {
    /// The lane (0 writes `__ferry__/checkpoints/<stream>`).
    pub lane: usize,
    /// The first seq it covers.
    pub first_seq: u64,
    /// The last seq it covers.
    pub last_seq: u64,
    /// The source position of that last op.
    pub last_position: u64,
}

/// Where a stream stands in the target: the contiguous checkpoint and the
/// ranges above it that a lane's Txn applied already, in seq order.
pub(super) struct Resume {
    pub(super) checkpoint: Checkpoint,
    pub(super) applied_above: Vec<(u64, u64)>,
    /// True when any lane checkpoint was written by lanes.
    pub(super) laned: bool,
}

/// Reads the stored checkpoints of a stream: lane 0 first, then the other
/// lanes with their lane numbers.
pub(super) fn resume_point(
    connection: &EtcdConnection,
    stream_id: &str,
    stored: &[(usize, Vec<u8>)],
) -> Result<Option<Resume>> {
    let mut checkpoints = Vec::with_capacity(stored.len());
    for (lane, value) in stored {
        checkpoints.push(parse_checkpoint(
            connection,
            &lane_key(stream_id, *lane),
            value,
        )?);
    }
    let laned = stored.iter().any(|(lane, _)| *lane > 0)
        || checkpoints
            .iter()
            .any(|checkpoint| checkpoint.lane_txn.is_some());
    let Some(mut resume) = checkpoints
        .iter()
        .max_by_key(|checkpoint| checkpoint.applied_through_seq)
        .cloned()
    else {
        return Ok(None);
    };
    resume.complete = checkpoints.first().is_some_and(|first| first.complete);
    resume.epoch = checkpoints.iter().map(|c| c.epoch).max().unwrap_or(0);
    resume.lane_txn = None;
    let mut spans: Vec<LaneTxn> = checkpoints.iter().filter_map(|c| c.lane_txn).collect();
    spans.sort_by_key(|span| span.first_seq);
    let mut applied_above = Vec::new();
    for span in spans {
        if !applied_above.is_empty() || span.first_seq > resume.applied_through_seq + 1 {
            applied_above.push((span.first_seq, span.last_seq));
        } else if span.last_seq > resume.applied_through_seq {
            resume.applied_through_seq = span.last_seq;
            resume.applied_through_position = span.last_position;
        }
    }
    Ok(Some(Resume {
        checkpoint: resume,
        applied_above,
        laned,
    }))
}

pub(super) fn checkpoint_key(stream_id: &str) -> Vec<u8> {
    let mut key = CHECKPOINT_PREFIX.to_vec();
    key.extend_from_slice(stream_id.as_bytes());
    key
}

pub(super) fn parse_epoch(connection: &EtcdConnection, value: &[u8]) -> Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| {
            target_error(EtcdError::Request {
                endpoints: connection.display(),
                action: "read the epoch".to_owned(),
                reason: format!(
                    "{} holds {:?}, not a decimal number",
                    printable(EPOCH_KEY),
                    String::from_utf8_lossy(value)
                ),
            })
        })
}

fn parse_checkpoint(connection: &EtcdConnection, key: &[u8], value: &[u8]) -> Result<Checkpoint> {
    serde_json::from_slice(value).map_err(|error| {
        target_error(EtcdError::Request {
            endpoints: connection.display(),
            action: "read the checkpoint".to_owned(),
            reason: format!("{} does not parse: {error}", printable(key)),
        })
    })
}

/// The key of a lane's checkpoint.
pub(super) fn lane_key(stream_id: &str, lane: usize) -> Vec<u8> {
    let mut key = checkpoint_key(stream_id);
    if lane > 0 {
        key.extend_from_slice(format!("/lanes/{lane}").as_bytes());
    }
    key
}

/// The raw values of a stream's checkpoint keys (lane 0 first, then the
/// other lanes with their numbers; none when no key exists) and of the epoch
/// key.
pub(super) async fn read_raw(
    client: &EtcdClient,
    connection: &EtcdConnection,
    stream_id: &str,
) -> Result<(Vec<(usize, Vec<u8>)>, Option<Vec<u8>>)> {
    let lanes_prefix = lane_key(stream_id, 0)
        .into_iter()
        .chain(b"/lanes/".iter().copied())
        .collect::<Vec<u8>>();
    let mut found = Vec::with_capacity(3);
    for (key, range_end) in [
        (lane_key(stream_id, 0), Vec::new()),
        (lanes_prefix.clone(), prefix_end(&lanes_prefix)),
        (EPOCH_KEY.to_vec(), Vec::new()),
    ] {
        let request = RangeRequest {
            key,
            range_end,
            ..RangeRequest::default()
        };
        let response = client
            .call("read the checkpoint from", |mut services| {
                let request = request.clone();
                async move { services.kv.range(request).await }
            })
            .await
            .map_err(target_error)?;
        found.push(response.kvs);
    }
    let epoch = found
        .pop()
        .and_then(|kvs| kvs.into_iter().next())
        .map(|kv| kv.value);
    let mut stored = Vec::new();
    for kv in found.into_iter().flatten() {
        let lane = if kv.key.len() > lanes_prefix.len() && kv.key.starts_with(&lanes_prefix) {
            std::str::from_utf8(&kv.key[lanes_prefix.len()..])
                .ok()
                .and_then(|lane| lane.parse().ok())
                .filter(|lane| *lane > 0)
                .ok_or_else(|| {
                    target_error(EtcdError::Request {
                        endpoints: connection.display(),
                        action: "read the checkpoint".to_owned(),
                        reason: format!("{} is not a lane's checkpoint key", printable(&kv.key)),
                    })
                })?
        } else {
            0
        };
        stored.push((lane, kv.value));
    }
    Ok((stored, epoch))
}

/// What the target holds for `stream_id`: its checkpoint (for a restore in
/// lanes, the highest seq every op through which took effect), if any, and
/// the highest epoch any sink raised it to (0 when none did). An agent
/// answers a Checkpoint RPC with it.
pub async fn read_checkpoint(
    connection: &EtcdConnection,
    stream_id: &str,
) -> Result<(Option<Checkpoint>, u64)> {
    let client = EtcdClient::connect(connection)
        .await
        .map_err(target_error)?;
    let (stored, epoch) = read_raw(&client, connection, stream_id).await?;
    let checkpoint = resume_point(connection, stream_id, &stored)?.map(|resume| resume.checkpoint);
    let epoch = match epoch {
        Some(value) => parse_epoch(connection, &value)?,
        None => 0,
    };
    Ok((checkpoint, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lane's stored value: contiguous through `contiguous`, its own Txn
    /// `first..=last`.
    fn lane(lane: usize, contiguous: u64, first: u64, last: u64) -> (usize, Vec<u8>) {
        let checkpoint = Checkpoint {
            stream_id: "s".to_owned(),
            source_identity: None,
            applied_through_seq: contiguous,
            applied_through_position: contiguous,
            epoch: 0,
            complete: false,
            writer: "w".to_owned(),
            lane_txn: Some(LaneTxn {
                lane,
                first_seq: first,
                last_seq: last,
                last_position: last,
            }),
        };
        (lane, serde_json::to_vec(&checkpoint).expect("serializes"))
    }

    fn resume(stored: &[(usize, Vec<u8>)]) -> (u64, Vec<(u64, u64)>) {
        let connection = EtcdConnection::from_url("etcd://127.0.0.1:1", None).expect("url");
        let resume = resume_point(&connection, "s", stored)
            .expect("parses")
            .expect("a checkpoint");
        assert!(resume.laned);
        (resume.checkpoint.applied_through_seq, resume.applied_above)
    }

    #[test]
    fn later_lanes_applied_before_an_earlier_one_are_skipped_not_resumed_from() {
        // 3 lanes, Txns of 10 ops: t3 (31..=40, lane 0) never applied; t4
        // and t5 did, sent when everything through 20 and 30 was in.
        let stored = [lane(0, 0, 1, 10), lane(1, 20, 41, 50), lane(2, 30, 51, 60)];
        assert_eq!(resume(&stored), (30, vec![(41, 50), (51, 60)]));
    }

    #[test]
    fn lanes_with_no_gap_resume_after_the_last_txn() {
        let stored = [lane(0, 10, 31, 40), lane(1, 20, 41, 50), lane(2, 0, 21, 30)];
        assert_eq!(resume(&stored), (50, vec![]));
    }

    #[test]
    fn a_single_chain_checkpoint_resumes_where_it_says() {
        let connection = EtcdConnection::from_url("etcd://127.0.0.1:1", None).expect("url");
        let checkpoint = Checkpoint {
            stream_id: "s".to_owned(),
            source_identity: None,
            applied_through_seq: 77,
            applied_through_position: 900,
            epoch: 0,
            complete: true,
            writer: String::new(),
            lane_txn: None,
        };
        let stored = [(0, serde_json::to_vec(&checkpoint).expect("serializes"))];
        let resume = resume_point(&connection, "s", &stored)
            .expect("parses")
            .expect("a checkpoint");
        assert!(!resume.laned);
        assert!(resume.applied_above.is_empty());
        assert_eq!(resume.checkpoint, checkpoint);
    }
}

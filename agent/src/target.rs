//! The TargetAgent beside the new control plane: applies a stream's batches
//! exactly once through whatever [`LiveSink`] the adapter registry built for
//! the plane's URL (its checkpoint and epoch live in the target itself, G4
//! and G5), acks each one, and tells where a stream stands.

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::Op;
use ferry_engine::adapters::StreamInfo;
use ferry_engine::adapters::live::{LiveApply, LiveSink, Position};
use ferry_proto::v1::target_agent_server::TargetAgent;
use ferry_proto::v1::{
    AdoptRequest, AdoptResponse, ApplyAck, ApplyRequest, CheckpointRequest, CheckpointResponse,
    DescribeRequest, DescribeResponse, DigestRequest, DigestResponse, OpBatch, StreamStart,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::serve::{describe_response, digest_response, status_for};

/// Acks an Apply stream holds ahead of a slow caller.
const ACKS_AHEAD: usize = 16;
/// Ops of batches already received that one apply takes at most.
const COALESCED_MAX_OPS: usize = 20_000;
/// Bytes of keys and values of batches already received that one apply
/// takes at most.
const COALESCED_MAX_BYTES: usize = 8 * 1024 * 1024;

fn op_bytes(op: &Op) -> usize {
    op.key.len() + op.body.len()
}

fn no_batch() -> Status {
    Status::invalid_argument("every ApplyRequest after the first carries a batch")
}

/// The TargetAgent over one control plane.
#[derive(Clone)]
pub struct TargetAgentService {
    sink: Arc<dyn LiveSink>,
}

impl std::fmt::Debug for TargetAgentService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TargetAgentService")
            .field("sink", &self.sink.display())
            .finish()
    }
}

impl TargetAgentService {
    /// An agent applying onto `sink` (its epoch is each stream's own).
    pub fn new(sink: Arc<dyn LiveSink>) -> Self {
        Self { sink }
    }
}

/// One Apply stream, from its StreamStart to its end.
struct ApplyStream {
    target: Arc<dyn LiveSink>,
    start: StreamStart,
    acks: mpsc::Sender<Result<ApplyAck, Status>>,
    /// Opened at the first batch (it carries the epoch).
    open: Option<OpenStream>,
}

struct OpenStream {
    apply: Box<dyn LiveApply>,
    epoch: u64,
    /// The target holds the stream through this seq.
    held_through_seq: u64,
}

impl ApplyStream {
    async fn open(&mut self, epoch: u64) -> Result<&mut OpenStream, Status> {
        if self.open.is_none() {
            let stream_id = &self.start.stream_id;
            let stream = StreamInfo {
                stream_id: stream_id.clone(),
                source_identity: Some(self.start.source_identity.clone())
                    .filter(|identity| !identity.is_empty()),
                ops_total: None,
                key_prefix: None,
            };
            let apply = self
                .target
                .open(&stream, epoch)
                .await
                .map_err(|error| status_for(&error))?;
            let held_through_seq = apply.held_through_seq();
            info!(%stream_id, epoch, held_through_seq, "apply stream opened");
            self.open = Some(OpenStream {
                apply,
                epoch,
                held_through_seq,
            });
        }
        let open = self.open.as_mut().expect("opened above");
        if epoch != open.epoch {
            return Err(if epoch < open.epoch {
                Status::failed_precondition(format!(
                    "a batch of epoch {epoch} is refused: {} has seen epoch {} (a later migration attempt owns it)",
                    self.target.display(),
                    open.epoch
                ))
            } else {
                Status::invalid_argument(format!(
                    "an Apply stream carries one epoch ({}); a batch of epoch {epoch} needs a stream of its own",
                    open.epoch
                ))
            });
        }
        Ok(open)
    }

    /// Applies one batch and acks it. True when the stream ended.
    async fn apply(&mut self, batch: OpBatch) -> Result<bool, Status> {
        if !batch.stream_id.is_empty() && batch.stream_id != self.start.stream_id {
            return Err(Status::invalid_argument(format!(
                "a batch of stream {} on the Apply stream of {}",
                batch.stream_id, self.start.stream_id
            )));
        }
        let epoch = batch.epoch;
        let open = self.open(epoch).await?;
        let last = batch.ops.last().map(|op| (op.seq, op.position));
        let fresh: Vec<Op> = batch
            .ops
            .into_iter()
            .filter(|op| op.seq > open.held_through_seq)
            .collect();
        if !fresh.is_empty() {
            open.apply
                .apply(fresh)
                .await
                .map_err(|error| status_for(&error))?;
        }
        if let Some((seq, position)) = last {
            // What the target confirmed; a batch held already (a replay after
            // a resume) is acked as the batch itself.
            let (seq, position) = match open.apply.applied() {
                Some(applied) if applied.through_seq >= seq => {
                    (applied.through_seq, applied.through_position.0)
                }
                _ if seq <= open.held_through_seq => (seq, position),
                Some(applied) => (applied.through_seq, applied.through_position.0),
                None => (open.held_through_seq, 0),
            };
            open.held_through_seq = open.held_through_seq.max(seq);
            let ack = ApplyAck {
                applied_through_seq: seq,
                applied_through_position: position,
                epoch,
            };
            debug!(applied_through_seq = seq, "batch applied");
            if self.acks.send(Ok(ack)).await.is_err() {
                return Ok(true);
            }
        }
        if batch.end_of_stream {
            if let Some(open) = self.open.take() {
                open.apply
                    .finish()
                    .await
                    .map_err(|error| status_for(&error))?;
            }
            info!(stream_id = %self.start.stream_id, "apply stream complete");
            return Ok(true);
        }
        Ok(false)
    }
}

#[tonic::async_trait]
impl TargetAgent for TargetAgentService {
    type ApplyStream = ReceiverStream<Result<ApplyAck, Status>>;

    async fn apply(
        &self,
        request: Request<Streaming<ApplyRequest>>,
    ) -> Result<Response<Self::ApplyStream>, Status> {
        let mut requests = request.into_inner();
        let first = requests.message().await?.ok_or_else(|| {
            Status::invalid_argument("an Apply stream starts with its StreamStart")
        })?;
        let start = first
            .start
            .ok_or_else(|| Status::invalid_argument("the first ApplyRequest carries `start`"))?;
        if start.stream_id.is_empty() {
            return Err(Status::invalid_argument(
                "the StreamStart names no stream_id",
            ));
        }
        let (acks, receiver) = mpsc::channel(ACKS_AHEAD);
        let mut stream = ApplyStream {
            target: self.sink.clone(),
            start,
            acks: acks.clone(),
            open: None,
        };
        tokio::spawn(async move {
            let mut next = first.batch;
            let mut caller_done = false;
            while !caller_done {
                let mut batch = match next.take() {
                    Some(batch) => batch,
                    None => match requests.message().await {
                        Ok(Some(request)) => match request.batch {
                            Some(batch) => batch,
                            None => {
                                let _ = acks.send(Err(no_batch())).await;
                                return;
                            }
                        },
                        Ok(None) => break,
                        Err(status) => {
                            debug!(%status, "the caller's side of the Apply stream broke");
                            break;
                        }
                    },
                };
                // Batches already received join this one (a caller catching
                // up): one apply, pipelined Txns, one ack.
                let mut bytes: usize = batch.ops.iter().map(op_bytes).sum();
                while !batch.end_of_stream
                    && batch.ops.len() < COALESCED_MAX_OPS
                    && bytes < COALESCED_MAX_BYTES
                {
                    let Ok(message) =
                        tokio::time::timeout(Duration::ZERO, requests.message()).await
                    else {
                        break;
                    };
                    match message {
                        Ok(Some(ApplyRequest {
                            batch: Some(more), ..
                        })) if more.epoch == batch.epoch && more.stream_id == batch.stream_id => {
                            bytes += more.ops.iter().map(op_bytes).sum::<usize>();
                            batch.ops.extend(more.ops);
                            batch.end_of_stream = more.end_of_stream;
                        }
                        Ok(Some(ApplyRequest {
                            batch: Some(other), ..
                        })) => {
                            next = Some(other);
                            break;
                        }
                        Ok(Some(_)) => {
                            let _ = acks.send(Err(no_batch())).await;
                            return;
                        }
                        Ok(None) | Err(_) => {
                            caller_done = true;
                            break;
                        }
                    }
                }
                match stream.apply(batch).await {
                    Ok(false) => {}
                    Ok(true) => break,
                    Err(status) => {
                        warn!(stream_id = %stream.start.stream_id, %status, "apply stream refused");
                        let _ = acks.send(Err(status)).await;
                        return;
                    }
                }
            }
            info!(stream_id = %stream.start.stream_id, "apply stream ends");
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn checkpoint(
        &self,
        request: Request<CheckpointRequest>,
    ) -> Result<Response<CheckpointResponse>, Status> {
        let stream_id = request.into_inner().stream_id;
        let stored = self
            .sink
            .stored(&stream_id)
            .await
            .map_err(|error| status_for(&error))?;
        let applied = stored.applied.unwrap_or_default();
        Ok(Response::new(CheckpointResponse {
            applied_through_seq: applied.through_seq,
            applied_through_position: applied.through_position.0,
            stream_id,
            epoch: stored.epoch,
        }))
    }

    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let description = self
            .sink
            .describe()
            .await
            .map_err(|error| status_for(&error))?;
        Ok(Response::new(describe_response(
            description,
            self.sink.capabilities(),
        )))
    }

    async fn adopt(
        &self,
        request: Request<AdoptRequest>,
    ) -> Result<Response<AdoptResponse>, Status> {
        let AdoptRequest {
            epoch,
            revision_offset,
        } = request.into_inner();
        let adopted = self
            .sink
            .adopt(epoch, revision_offset)
            .await
            .map_err(|error| status_for(&error))?;
        match adopted {
            Ok(()) => Ok(Response::new(AdoptResponse {})),
            Err(later) => Err(Status::failed_precondition(format!(
                "epoch {epoch} is older than epoch {later}, which recorded its position offset in {}: a later migration attempt owns the plane",
                self.sink.display()
            ))),
        }
    }

    async fn digest(
        &self,
        request: Request<DigestRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        let request = request.into_inner();
        let digest = self
            .sink
            .digest(&request.key_prefix, Position(request.position))
            .await
            .map_err(|error| status_for(&error))?;
        info!(
            keys = digest.keys,
            position = digest.position.0,
            "digest of the target"
        );
        Ok(Response::new(digest_response(digest)))
    }
}

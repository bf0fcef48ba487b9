//! The TargetAgent beside an etcd control plane: applies a stream's batches
//! exactly once through the engine's etcd sink (its checkpoint and epoch
//! live in the target itself, G4 and G5), acks each one, and tells where a
//! stream stands.

use std::time::Duration;

use ferry_engine::Op;
use ferry_engine::adapters::etcd::{
    EtcdConnection, EtcdError, EtcdSink, EtcdSinkOptions, KIND_LEASE, LeaseKeeper, RevisionOffset,
    adopt_revision_offset, describe_cluster, read_checkpoint,
};
use ferry_engine::adapters::{AdapterError, Sink, StreamInfo};
use ferry_proto::v1::target_agent_server::TargetAgent;
use ferry_proto::v1::{
    AdoptRequest, AdoptResponse, ApplyAck, ApplyRequest, CheckpointRequest, CheckpointResponse,
    DescribeRequest, DescribeResponse, DigestRequest, DigestResponse, OpBatch, StreamStart,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::serve::{digest_plane, status_for};

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

/// A TargetAgent over one etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdTargetAgent {
    connection: EtcdConnection,
    /// Txn limits of the target (`--max-txn-ops`, `--max-request-bytes`).
    sink_options: EtcdSinkOptions,
}

impl EtcdTargetAgent {
    /// An agent applying onto `connection`'s cluster with Txns as
    /// `sink_options` say (its epoch is each stream's own).
    pub fn new(connection: EtcdConnection, sink_options: EtcdSinkOptions) -> Self {
        Self {
            connection,
            sink_options,
        }
    }
}

/// One Apply stream, from its StreamStart to its end.
struct ApplyStream {
    connection: EtcdConnection,
    sink_options: EtcdSinkOptions,
    start: StreamStart,
    acks: mpsc::Sender<Result<ApplyAck, Status>>,
    /// Opened at the first batch (it carries the epoch).
    sink: Option<OpenSink>,
}

struct OpenSink {
    sink: EtcdSink,
    epoch: u64,
    /// The target holds the stream through this seq.
    held_through_seq: u64,
    leases: Option<LeaseKeeper>,
}

impl ApplyStream {
    async fn open(&mut self, epoch: u64) -> Result<&mut OpenSink, Status> {
        if self.sink.is_none() {
            let stream_id = &self.start.stream_id;
            let (_, stored_epoch) = read_checkpoint(&self.connection, stream_id)
                .await
                .map_err(|error| status_for(&error))?;
            if epoch < stored_epoch {
                return Err(stale(epoch, stored_epoch, &self.connection));
            }
            let mut sink = EtcdSink::new(
                self.connection.clone(),
                EtcdSinkOptions {
                    epoch,
                    allow_nonempty: false,
                    // Every ack says what is in the target.
                    durable_each_apply: true,
                    // A live stream's Txns land in seq order (G2).
                    lanes: 1,
                    ..self.sink_options.clone()
                },
            );
            let stream = StreamInfo {
                stream_id: stream_id.clone(),
                source_identity: Some(self.start.source_identity.clone())
                    .filter(|identity| !identity.is_empty()),
                ops_total: None,
                key_prefix: None,
            };
            let held_through_seq = sink
                .begin(&stream)
                .await
                .map_err(|error| begin_status(&error))?
                .unwrap_or(0);
            let leases = match LeaseKeeper::start(&self.connection).await {
                Ok(keeper) => Some(keeper),
                Err(error) => {
                    warn!(%error, "cannot keep the stream's leases alive on the target");
                    None
                }
            };
            info!(%stream_id, epoch, held_through_seq, "apply stream opened");
            self.sink = Some(OpenSink {
                sink,
                epoch,
                held_through_seq,
                leases,
            });
        }
        let open = self.sink.as_mut().expect("opened above");
        if epoch != open.epoch {
            return Err(if epoch < open.epoch {
                stale(epoch, open.epoch, &self.connection)
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
            let granted: Vec<Op> = fresh
                .iter()
                .filter(|op| &op.kind[..] == KIND_LEASE.as_bytes())
                .cloned()
                .collect();
            open.sink
                .apply(fresh)
                .await
                .map_err(|error| status_for(&error))?;
            if let Some(leases) = &open.leases {
                leases.keep_granted(&granted).await;
            }
        }
        if let Some((seq, position)) = last {
            // What the target confirmed; a batch held already (a replay after
            // a resume) is acked as the batch itself.
            let (seq, position) = match open.sink.checkpoint() {
                Some(checkpoint) if checkpoint.applied_through_seq >= seq => (
                    checkpoint.applied_through_seq,
                    checkpoint.applied_through_position,
                ),
                _ if seq <= open.held_through_seq => (seq, position),
                Some(checkpoint) => (
                    checkpoint.applied_through_seq,
                    checkpoint.applied_through_position,
                ),
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
            if let Some(open) = self.sink.take() {
                Box::new(open.sink)
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

/// The answer to a stream the target cannot begin. A target that already
/// holds keys is told in a live migration's words (the restore's advice,
/// `--allow-nonempty`, is no option of `ferry migrate`): its keys may be
/// what an earlier migration applied before it stopped without a switch,
/// and merging a new snapshot into them would keep keys since deleted.
fn begin_status(error: &ferry_engine::Error) -> Status {
    match error {
        ferry_engine::Error::Adapter(AdapterError::EtcdTarget(EtcdError::NotEmpty {
            endpoints,
            examples,
        })) => Status::failed_precondition(format!(
            "the new plane {endpoints} already holds keys, e.g. {examples}. A live migration starts on an empty new plane: these may be what an earlier migration applied before it stopped without a switch. Delete them and run the migration again"
        )),
        other => status_for(other),
    }
}

fn stale(epoch: u64, stored: u64, connection: &EtcdConnection) -> Status {
    Status::failed_precondition(format!(
        "a batch of epoch {epoch} is refused: {} has seen epoch {stored} (a later migration attempt owns it)",
        connection.display()
    ))
}

#[tonic::async_trait]
impl TargetAgent for EtcdTargetAgent {
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
            connection: self.connection.clone(),
            sink_options: self.sink_options.clone(),
            start,
            acks: acks.clone(),
            sink: None,
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
        let (checkpoint, epoch) = read_checkpoint(&self.connection, &stream_id)
            .await
            .map_err(|error| status_for(&error))?;
        Ok(Response::new(CheckpointResponse {
            applied_through_seq: checkpoint
                .as_ref()
                .map_or(0, |checkpoint| checkpoint.applied_through_seq),
            applied_through_position: checkpoint
                .as_ref()
                .map_or(0, |checkpoint| checkpoint.applied_through_position),
            stream_id,
            epoch,
        }))
    }

    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let description = describe_cluster(&self.connection)
            .await
            .map_err(|error| status_for(&error))?;
        Ok(Response::new(DescribeResponse {
            platform: "etcd".to_owned(),
            platform_version: description.version,
            identity: description.identity,
            control_plane_url: self.connection.display(),
        }))
    }

    async fn adopt(
        &self,
        request: Request<AdoptRequest>,
    ) -> Result<Response<AdoptResponse>, Status> {
        let AdoptRequest {
            epoch,
            revision_offset,
        } = request.into_inner();
        let adopted = adopt_revision_offset(
            &self.connection,
            RevisionOffset {
                epoch,
                revision_offset,
            },
        )
        .await
        .map_err(|error| status_for(&AdapterError::EtcdTarget(error).into()))?;
        match adopted {
            Ok(()) => Ok(Response::new(AdoptResponse {})),
            Err(later) => Err(Status::failed_precondition(format!(
                "epoch {epoch} is older than epoch {later}, which recorded its revision offset in {}: a later migration attempt owns the plane",
                self.connection.display()
            ))),
        }
    }

    async fn digest(
        &self,
        request: Request<DigestRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        let request = request.into_inner();
        let digest = digest_plane(
            &self.connection,
            &request.key_prefix,
            request.position,
            true,
        )
        .await?;
        info!(
            keys = digest.keys,
            position = digest.position,
            "digest of the target"
        );
        Ok(Response::new(digest))
    }
}

//! The SourceAgent beside the old control plane: streams a snapshot and the
//! live changes after it (a new stream, or a broken one resumed statelessly
//! from what the target holds), fences and unfences the plane's writes,
//! through whatever [`LiveSource`] the adapter registry built for the
//! plane's URL.

use std::sync::{Arc, Mutex};

use ferry_engine::adapters::live::{
    Applied, Capabilities, FenceAnswer, FenceMove, LiveEvent, LiveFrom, LiveSource, Position,
    ProgressRequester,
};
use ferry_proto::v1::extract_response::Event;
use ferry_proto::v1::source_agent_server::SourceAgent;
use ferry_proto::v1::{
    CommitRequest, CommitResponse, ConfirmRequest, ConfirmResponse, DescribeRequest,
    DescribeResponse, DigestRequest, DigestResponse, ExtractRequest, ExtractResponse, FenceRequest,
    FenceResponse, FenceStatusRequest, FenceStatusResponse, OpBatch, SnapshotComplete,
    SourceProgress, StreamStart, UnfenceRequest, UnfenceResponse,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::serve::{describe_response, digest_response, status_for};

/// Messages an Extract stream holds ahead of a slow caller.
const EXTRACT_AHEAD: usize = 8;

/// The SourceAgent over one control plane.
#[derive(Clone)]
pub struct SourceAgentService {
    source: Arc<dyn LiveSource>,
    /// Keys outside it are never streamed (a request may narrow it).
    prefix: Vec<u8>,
    /// The progress requesters of the streams running, poked after a fence
    /// so the fenced position is reported at once.
    streams: Arc<Mutex<Vec<ProgressRequester>>>,
}

impl std::fmt::Debug for SourceAgentService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SourceAgentService")
            .field("source", &self.source.display())
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .finish_non_exhaustive()
    }
}

impl SourceAgentService {
    /// An agent streaming `source`'s keys under `prefix` (all when empty).
    pub fn new(source: Arc<dyn LiveSource>, prefix: Vec<u8>) -> Self {
        Self {
            source,
            prefix,
            streams: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The prefix a request streams: its own, within the agent's.
    fn prefix_for(&self, requested: &[u8]) -> Result<Vec<u8>, Status> {
        if requested.is_empty() {
            return Ok(self.prefix.clone());
        }
        if !requested.starts_with(&self.prefix) {
            return Err(Status::permission_denied(format!(
                "this agent streams keys under {:?} only, not {:?}",
                String::from_utf8_lossy(&self.prefix),
                String::from_utf8_lossy(requested)
            )));
        }
        Ok(requested.to_vec())
    }

    fn poke_streams(&self) {
        if let Ok(streams) = self.streams.lock() {
            for stream in streams.iter() {
                stream.request();
            }
        }
    }

    /// Moves the plane's fence record; a move the record forbids is
    /// FAILED_PRECONDITION.
    async fn move_fence(&self, wanted: FenceMove) -> Result<u64, Status> {
        match self
            .source
            .move_fence(wanted)
            .await
            .map_err(|error| status_for(&error))?
        {
            FenceAnswer::Done(position) => Ok(position.0),
            FenceAnswer::Refused(reason) => Err(Status::failed_precondition(reason)),
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.source.capabilities()
    }
}

/// A new stream's id: `<platform>-<UTC time>-<random>`, e.g.
/// `etcd-20261124T061500Z-3f9a2c1b` (a backup id's shape, after the platform).
pub fn new_stream_id(platform: &str) -> String {
    format!(
        "{platform}-{}",
        ferry_engine::backup::new_backup_id(time::OffsetDateTime::now_utc())
    )
}

#[tonic::async_trait]
impl SourceAgent for SourceAgentService {
    type ExtractStream = ReceiverStream<Result<ExtractResponse, Status>>;

    async fn extract(
        &self,
        request: Request<ExtractRequest>,
    ) -> Result<Response<Self::ExtractStream>, Status> {
        let request = request.into_inner();
        let resume = !request.stream_id.is_empty();
        if !resume && (request.from_position_exclusive != 0 || request.from_seq_exclusive != 0) {
            return Err(Status::invalid_argument(
                "a resume names its stream_id; a new stream starts from nothing",
            ));
        }
        if resume && request.snapshot_position == 0 {
            return Err(Status::invalid_argument(format!(
                "resuming stream {} needs its snapshot_position (from its StreamStart)",
                request.stream_id
            )));
        }
        let prefix = self.prefix_for(&request.key_prefix)?;
        let from = if resume {
            LiveFrom {
                snapshot: Some(Position(request.snapshot_position)),
                from_seq_exclusive: request.from_seq_exclusive,
                from_position_exclusive: Position(request.from_position_exclusive),
                snapshot_through_seq: (request.snapshot_through_seq > 0)
                    .then_some(request.snapshot_through_seq),
            }
        } else {
            LiveFrom::default()
        };
        if resume
            && !self.capabilities().snapshot_reread
            && !from.past_snapshot(Position(request.snapshot_position))
        {
            return Err(Status::failed_precondition(format!(
                "stream {} broke inside its snapshot, and {} cannot read a snapshot again: start a new migration on an empty target",
                request.stream_id,
                self.source.display()
            )));
        }
        let live = self
            .source
            .open(&prefix, from)
            .await
            .map_err(|error| status_for(&error))?;
        let stream_id = if resume {
            request.stream_id.clone()
        } else {
            new_stream_id(&live.info.platform)
        };
        let start = StreamStart {
            stream_id: stream_id.clone(),
            platform: live.info.platform.clone(),
            platform_version: live.info.platform_version.clone().unwrap_or_default(),
            snapshot_position: live.snapshot_position.0,
            source_identity: live.info.identity.clone().unwrap_or_default(),
        };
        info!(%stream_id, resume, follow = request.follow, snapshot_position = start.snapshot_position, from_seq_exclusive = request.from_seq_exclusive, "extract stream starts");
        if let Ok(mut streams) = self.streams.lock() {
            streams.push(live.progress_requests.clone());
        }
        let (sender, receiver) = mpsc::channel(EXTRACT_AHEAD);
        let streams = self.streams.clone();
        let requester = live.progress_requests.clone();
        let epoch = request.epoch;
        let follow = request.follow;
        // A finite stream past its snapshot already has nothing to send.
        let finished_already = !follow
            && request.snapshot_through_seq > 0
            && request.from_seq_exclusive >= request.snapshot_through_seq;
        tokio::spawn(async move {
            let message = |event| Ok(ExtractResponse { event: Some(event) });
            let end = |stream_id: &str| {
                message(Event::Batch(OpBatch {
                    stream_id: stream_id.to_owned(),
                    epoch,
                    ops: Vec::new(),
                    end_of_stream: true,
                }))
            };
            let mut events = live.events;
            if sender.send(message(Event::Start(start))).await.is_err() {
                return;
            }
            if finished_already {
                let _ = sender.send(end(&stream_id)).await;
            } else {
                while let Some(event) = events.next().await {
                    let out = match event {
                        Ok(LiveEvent::Batch(ops)) => message(Event::Batch(OpBatch {
                            stream_id: stream_id.clone(),
                            epoch,
                            ops,
                            end_of_stream: false,
                        })),
                        Ok(LiveEvent::SnapshotComplete {
                            through_seq,
                            position,
                        }) => {
                            let complete = message(Event::SnapshotComplete(SnapshotComplete {
                                through_seq,
                                position,
                            }));
                            if !follow {
                                if sender.send(complete).await.is_ok() {
                                    let _ = sender.send(end(&stream_id)).await;
                                }
                                break;
                            }
                            complete
                        }
                        Ok(LiveEvent::Progress {
                            position,
                            head_position,
                            through_seq,
                        }) => {
                            if !follow {
                                // Past the snapshot already (a resume).
                                let _ = sender.send(end(&stream_id)).await;
                                break;
                            }
                            message(Event::Progress(SourceProgress {
                                position,
                                head_position,
                                through_seq,
                            }))
                        }
                        Err(error) => {
                            warn!(%stream_id, %error, "extract stream failed");
                            let _ = sender.send(Err(status_for(&error))).await;
                            break;
                        }
                    };
                    if sender.send(out).await.is_err() {
                        break;
                    }
                }
            }
            info!(%stream_id, "extract stream ends");
            if let Ok(mut streams) = streams.lock() {
                streams.retain(|stream| !stream.same_as(&requester));
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn fence(
        &self,
        request: Request<FenceRequest>,
    ) -> Result<Response<FenceResponse>, Status> {
        let FenceRequest {
            epoch,
            successor_url,
        } = request.into_inner();
        if successor_url.is_empty() {
            return Err(Status::invalid_argument(
                "a fence names the plane that takes over (successor_url)",
            ));
        }
        let fenced_position = self
            .move_fence(FenceMove::Fence {
                epoch,
                successor: successor_url,
            })
            .await?;
        info!(epoch, fenced_position, "fenced");
        self.poke_streams();
        Ok(Response::new(FenceResponse { fenced_position }))
    }

    async fn unfence(
        &self,
        request: Request<UnfenceRequest>,
    ) -> Result<Response<UnfenceResponse>, Status> {
        let epoch = request.into_inner().epoch;
        let position = self.move_fence(FenceMove::Unfence { epoch }).await?;
        info!(epoch, position, "unfenced");
        Ok(Response::new(UnfenceResponse {}))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        let CommitRequest {
            epoch,
            successor_revision_offset,
        } = request.into_inner();
        let fenced_position = self
            .move_fence(FenceMove::Commit {
                epoch,
                successor_position_offset: successor_revision_offset,
            })
            .await?;
        info!(epoch, fenced_position, "switch committed in the old plane");
        Ok(Response::new(CommitResponse { fenced_position }))
    }

    async fn fence_status(
        &self,
        _request: Request<FenceStatusRequest>,
    ) -> Result<Response<FenceStatusResponse>, Status> {
        let state = self
            .source
            .fence_state()
            .await
            .map_err(|error| status_for(&error))?;
        Ok(Response::new(FenceStatusResponse {
            recorded: state.recorded,
            epoch: state.epoch,
            fenced: state.fenced,
            switched: state.switched,
            successor_url: state.successor_url,
            fenced_position: state.fenced_position.0,
            successor_revision_offset: state.successor_position_offset,
            write_alarm_epochs: state.guard_epochs,
        }))
    }

    async fn confirm(
        &self,
        request: Request<ConfirmRequest>,
    ) -> Result<Response<ConfirmResponse>, Status> {
        let ConfirmRequest {
            stream_id,
            applied_through_seq,
            applied_through_position,
            epoch,
        } = request.into_inner();
        if stream_id.is_empty() {
            return Err(Status::invalid_argument("a Confirm names its stream_id"));
        }
        self.source
            .confirm(
                &stream_id,
                Applied {
                    through_seq: applied_through_seq,
                    through_position: Position(applied_through_position),
                },
            )
            .await
            .map_err(|error| status_for(&error))?;
        debug!(%stream_id, epoch, applied_through_seq, applied_through_position, "confirmed");
        Ok(Response::new(ConfirmResponse {}))
    }

    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let description = self
            .source
            .describe()
            .await
            .map_err(|error| status_for(&error))?;
        Ok(Response::new(describe_response(
            description,
            self.capabilities(),
        )))
    }

    async fn digest(
        &self,
        request: Request<DigestRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        let request = request.into_inner();
        let prefix = self.prefix_for(&request.key_prefix)?;
        let digest = self
            .source
            .digest(&prefix, Position(request.position))
            .await
            .map_err(|error| status_for(&error))?;
        info!(
            keys = digest.keys,
            position = digest.position.0,
            "digest of the source"
        );
        Ok(Response::new(digest_response(digest)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_name_platform_time_and_a_random_part() {
        let id = new_stream_id("etcd");
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.len(), 3, "{id}");
        assert_eq!(parts[0], "etcd");
        assert_eq!(parts[1].len(), 16, "{id}");
        assert!(parts[1].ends_with('Z'));
        assert_eq!(parts[2].len(), 8);
        assert_ne!(new_stream_id("etcd"), id);
    }
}

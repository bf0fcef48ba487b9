//! `agent://HOST:PORT` as a source and a sink: `ferry extract --source
//! agent://ADDR` streams a source agent's snapshot (its Extract without
//! follow) into a backup, and `ferry restore --target agent://ADDR` replays a
//! backup through a target agent's Apply, which acks every batch once the
//! target holds it.

use std::sync::Arc;

use ferry_engine::adapters::{AdapterError, Extraction, Sink, Source, StreamInfo};
use ferry_engine::manifest::SourceInfo;
use ferry_engine::progress::Progress;
use ferry_engine::{Op, Result};
use ferry_proto::v1::extract_response::Event;
use ferry_proto::v1::{
    ApplyAck, ApplyRequest, CheckpointRequest, ExtractRequest, OpBatch, StreamStart,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{ClientOptions, connect_source, connect_target};

/// Batches read ahead of the consumer.
const BATCHES_AHEAD: usize = 4;

/// The address of `agent://HOST:PORT`, or `None` for another URL.
pub fn agent_address(url: &str) -> Option<&str> {
    url.strip_prefix("agent://")
        .map(|address| address.trim_end_matches('/'))
}

fn read_error(address: &str, reason: String) -> ferry_engine::Error {
    AdapterError::Read {
        source_name: format!("the source agent at {address}"),
        error: std::io::Error::other(reason),
    }
    .into()
}

fn write_error(address: &str, reason: String) -> ferry_engine::Error {
    AdapterError::Write {
        target_name: format!("the target agent at {address}"),
        error: std::io::Error::other(reason),
    }
    .into()
}

/// An agent's error answer for messages: the code's name, then its words
/// (a code's `Display` is a long generic sentence).
pub(crate) fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// A source agent's snapshot, read over gRPC.
#[derive(Debug, Clone)]
pub struct AgentSource {
    address: String,
    options: ClientOptions,
    key_prefix: Vec<u8>,
}

impl AgentSource {
    /// Reads the snapshot of the agent at `address` (keys under
    /// `key_prefix` only, when not empty).
    pub fn new(address: &str, options: ClientOptions, key_prefix: Vec<u8>) -> Self {
        Self {
            address: address.to_owned(),
            options,
            key_prefix,
        }
    }
}

#[tonic::async_trait]
impl Source for AgentSource {
    async fn open(self: Box<Self>, progress: Arc<Progress>) -> Result<Extraction> {
        let address = self.address.clone();
        let mut client = connect_source(&address, &self.options)
            .await
            .map_err(|error| read_error(&address, error.to_string()))?;
        let mut stream = client
            .extract(ExtractRequest {
                follow: false,
                key_prefix: self.key_prefix.clone().into(),
                ..ExtractRequest::default()
            })
            .await
            .map_err(|status| read_error(&address, status_text(&status)))?
            .into_inner();
        let start = match stream.message().await {
            Ok(Some(message)) => match message.event {
                Some(Event::Start(start)) => start,
                other => {
                    return Err(read_error(
                        &address,
                        format!("its stream began with {other:?}, not a StreamStart"),
                    ));
                }
            },
            Ok(None) => return Err(read_error(&address, "its stream was empty".to_owned())),
            Err(status) => return Err(read_error(&address, status_text(&status))),
        };
        let info = SourceInfo {
            platform: start.platform.clone(),
            platform_version: Some(start.platform_version.clone())
                .filter(|version| !version.is_empty()),
            identity: Some(start.source_identity.clone()).filter(|identity| !identity.is_empty()),
            snapshot_position: Some(start.snapshot_position),
            key_prefix: String::from_utf8(self.key_prefix.clone())
                .ok()
                .filter(|prefix| !prefix.is_empty()),
            description: Some(format!(
                "through the source agent's stream {}",
                start.stream_id
            )),
        };
        let (sender, receiver) = mpsc::channel(BATCHES_AHEAD);
        tokio::spawn(async move {
            loop {
                let batch = match stream.message().await {
                    Ok(Some(message)) => match message.event {
                        Some(Event::Batch(batch)) => batch,
                        // Markers and progress say nothing a backup keeps.
                        Some(_) | None => continue,
                    },
                    Ok(None) => {
                        let _ = sender
                            .send(Err(read_error(
                                &address,
                                "its stream ended before its end marker; the snapshot is incomplete"
                                    .to_owned(),
                            )))
                            .await;
                        return;
                    }
                    Err(status) => {
                        let _ = sender
                            .send(Err(read_error(&address, status_text(&status))))
                            .await;
                        return;
                    }
                };
                let end = batch.end_of_stream;
                let bytes: usize = batch
                    .ops
                    .iter()
                    .map(|op| op.key.len() + op.body.len())
                    .sum();
                Progress::add(&progress.bytes_read, bytes as u64);
                if !batch.ops.is_empty() && sender.send(Ok(batch.ops)).await.is_err() {
                    return;
                }
                if end {
                    return;
                }
            }
        });
        Ok(Extraction {
            info,
            ops: Box::pin(ReceiverStream::new(receiver)),
        })
    }
}

/// A target agent, applied to over gRPC: each `apply` returns once the
/// target agent acked its last op.
#[derive(Debug)]
pub struct AgentSink {
    address: String,
    options: ClientOptions,
    open: Option<OpenApply>,
}

#[derive(Debug)]
struct OpenApply {
    stream_id: String,
    requests: mpsc::Sender<ApplyRequest>,
    acks: tonic::Streaming<ApplyAck>,
}

impl AgentSink {
    /// Applies onto the target agent at `address`.
    pub fn new(address: &str, options: ClientOptions) -> Self {
        Self {
            address: address.to_owned(),
            options,
            open: None,
        }
    }

    fn open(&mut self) -> Result<&mut OpenApply> {
        let address = self.address.clone();
        self.open
            .as_mut()
            .ok_or_else(|| write_error(&address, "apply before begin".to_owned()))
    }

    /// Waits for an ack through `seq`.
    async fn acked_through(&mut self, seq: u64) -> Result<()> {
        let address = self.address.clone();
        let open = self.open()?;
        loop {
            match open.acks.message().await {
                Ok(Some(ack)) if ack.applied_through_seq >= seq => return Ok(()),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(write_error(
                        &address,
                        format!("its Apply stream ended before seq {seq} was acked"),
                    ));
                }
                Err(status) => return Err(write_error(&address, status_text(&status))),
            }
        }
    }
}

#[tonic::async_trait]
impl Sink for AgentSink {
    async fn begin(&mut self, stream: &StreamInfo) -> Result<Option<u64>> {
        let address = self.address.clone();
        let mut client = connect_target(&address, &self.options)
            .await
            .map_err(|error| write_error(&address, error.to_string()))?;
        let held = client
            .checkpoint(CheckpointRequest {
                stream_id: stream.stream_id.clone(),
            })
            .await
            .map_err(|status| write_error(&address, status_text(&status)))?
            .into_inner()
            .applied_through_seq;
        let (requests, receiver) = mpsc::channel(2);
        let start = StreamStart {
            stream_id: stream.stream_id.clone(),
            platform: String::new(),
            platform_version: String::new(),
            snapshot_position: 0,
            source_identity: stream.source_identity.clone().unwrap_or_default(),
        };
        requests
            .send(ApplyRequest {
                batch: None,
                start: Some(start),
            })
            .await
            .map_err(|_| write_error(&address, "the Apply stream closed".to_owned()))?;
        let acks = client
            .apply(ReceiverStream::new(receiver))
            .await
            .map_err(|status| write_error(&address, status_text(&status)))?
            .into_inner();
        self.open = Some(OpenApply {
            stream_id: stream.stream_id.clone(),
            requests,
            acks,
        });
        Ok((held > 0).then_some(held))
    }

    async fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        let Some(last) = ops.last().map(|op| op.seq) else {
            return Ok(());
        };
        let address = self.address.clone();
        let open = self.open()?;
        let batch = OpBatch {
            stream_id: open.stream_id.clone(),
            epoch: 0,
            ops,
            end_of_stream: false,
        };
        open.requests
            .send(ApplyRequest {
                batch: Some(batch),
                start: None,
            })
            .await
            .map_err(|_| write_error(&address, "the Apply stream closed".to_owned()))?;
        self.acked_through(last).await
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        let address = self.address.clone();
        let Some(mut open) = self.open.take() else {
            return Ok(());
        };
        open.requests
            .send(ApplyRequest {
                batch: Some(OpBatch {
                    stream_id: open.stream_id.clone(),
                    epoch: 0,
                    ops: Vec::new(),
                    end_of_stream: true,
                }),
                start: None,
            })
            .await
            .map_err(|_| write_error(&address, "the Apply stream closed".to_owned()))?;
        drop(open.requests);
        // The agent ends the stream once the target marked it complete.
        loop {
            match open.acks.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(status) => return Err(write_error(&address, status_text(&status))),
            }
        }
    }
}

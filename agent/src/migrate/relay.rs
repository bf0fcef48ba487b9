//! The relay of a live migration (`ferry migrate --live`): moves ops from
//! the source agent to the target agent until the cutover stops it,
//! resuming a broken stream from the target's checkpoint, and tells the
//! source how far the target holds the stream. With a version migration
//! chain, every batch goes through it on the way
//! ([`versions`](super::versions)).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::Op;
use ferry_engine::migrations::{MigrationError, off_the_runtime};
use ferry_proto::v1::extract_response::Event;
use ferry_proto::v1::{
    ApplyRequest, CheckpointRequest, ConfirmRequest, ExtractRequest, StreamStart,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use super::options::MigrateOptions;
use super::versions::{MAX_BOUNDARIES, RelayChain};
use crate::client::{SourceClient, connect_source, connect_target};
use crate::remote::status_text;

/// The relay's view of the two streams.
#[derive(Debug, Clone, Default)]
pub(super) struct RelayState {
    pub(super) start: Option<StreamStart>,
    pub(super) snapshot_through_seq: Option<u64>,
    pub(super) sent_seq: u64,
    pub(super) applied_seq: u64,
    applied_position: u64,
    /// Every source change through this position has been received…
    pub(super) source_position: u64,
    /// …and these are the seqs it took.
    pub(super) source_position_seq: u64,
    pub(super) head_position: u64,
    pub(super) reconnects: u64,
    pub(super) broken: Option<String>,
    pub(super) failed: Option<String>,
    /// The relay stopped for good: the version migration chain failed on an
    /// op, or an agent refused the stream in a way no resume changes.
    pub(super) refused: Option<String>,
}

impl RelayState {
    /// Source positions the target is behind.
    pub(super) fn lag_positions(&self) -> u64 {
        let applied = if self.applied_seq >= self.source_position_seq {
            self.source_position.max(self.applied_position)
        } else {
            self.applied_position
        };
        self.head_position.saturating_sub(applied)
    }

    /// True once every change through `position` is applied.
    pub(super) fn applied_through(&self, position: u64) -> bool {
        self.source_position >= position && self.applied_seq >= self.source_position_seq
    }
}

/// Moves ops from the source agent to the target agent, resuming after
/// breaks, until told to stop.
pub(super) struct Relay {
    pub(super) options: MigrateOptions,
    pub(super) epoch: u64,
    pub(super) state: Arc<watch::Sender<RelayState>>,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) tee: Option<mpsc::Sender<Vec<Op>>>,
    pub(super) teed_through: u64,
    /// The version migration chain, when there is one.
    pub(super) chain: Option<RelayChain>,
}

/// How long a broken session waits for the target agent to finish the
/// batches it took in, without an ack, before the stream is resumed anyway.
const APPLY_END_QUIET: Duration = Duration::from_secs(10);

/// How often the relay tells the source agent at most how far the target
/// holds the stream.
const CONFIRM_EVERY: Duration = Duration::from_millis(500);

/// Tells the source agent, as the target acks (at most every
/// [`CONFIRM_EVERY`]), how far the target durably holds the stream, so a
/// source that keeps resources for it (a replication slot's WAL) releases
/// them. A failed confirm is only logged: the next one says more, and a
/// resume starts from the target's checkpoint whatever the source was told.
async fn confirm_applied(
    mut source: SourceClient,
    stream_id: String,
    epoch: u64,
    mut state: watch::Receiver<RelayState>,
) {
    let mut confirmed = 0;
    loop {
        if state.changed().await.is_err() {
            return;
        }
        let (applied_through_seq, applied_through_position) = {
            let state = state.borrow_and_update();
            (state.applied_seq, state.applied_position)
        };
        if applied_through_position <= confirmed {
            continue;
        }
        let request = ConfirmRequest {
            stream_id: stream_id.clone(),
            epoch,
            applied_through_seq,
            applied_through_position,
        };
        match source.confirm(request).await {
            Ok(_) => confirmed = applied_through_position,
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                debug!("the source agent takes no Confirm (an older ferry)");
                return;
            }
            Err(status) => debug!(%status, "the source agent did not take a Confirm"),
        }
        tokio::time::sleep(CONFIRM_EVERY).await;
    }
}

/// Aborts a task when dropped: a session's helpers end with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How one relay session ended.
enum SessionEnd {
    Stopped,
    Broken {
        reason: String,
        progressed: bool,
    },
    /// No resume helps: the chain failed on an op (the same op fails again),
    /// or an agent gave an answer that a resume would get again (see
    /// [`answered`]).
    Failed(String),
}

/// How a session ends on an agent's error answer to `what`. A code that a
/// resume cannot change stops the relay at once: a target that already
/// holds keys, a stale epoch, a compacted revision, bad credentials, an op
/// the target refuses. Retrying those until `--reconnect-timeout` would
/// only send the same request again. Any other code (unavailable, a broken
/// connection) is a break, resumed from the target's checkpoint.
fn answered(what: &str, status: &tonic::Status, progressed: bool) -> SessionEnd {
    use tonic::Code;
    let reason = format!("{what}: {}", status_text(status));
    match status.code() {
        Code::FailedPrecondition
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::ResourceExhausted
        | Code::NotFound
        | Code::DataLoss
        | Code::OutOfRange
        | Code::Unimplemented => SessionEnd::Failed(reason),
        _ => SessionEnd::Broken { reason, progressed },
    }
}

impl Relay {
    pub(super) async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        let mut give_up_at = Instant::now() + self.options.reconnect_timeout;
        loop {
            match self.session().await {
                SessionEnd::Stopped => return,
                SessionEnd::Failed(reason) => {
                    warn!(%reason, "no resume can help; the relay stops");
                    self.state.send_modify(|state| state.refused = Some(reason));
                    return;
                }
                SessionEnd::Broken { reason, progressed } => {
                    if *self.stop.borrow() {
                        return;
                    }
                    if progressed {
                        backoff = Duration::from_millis(100);
                        give_up_at = Instant::now() + self.options.reconnect_timeout;
                    }
                    warn!(%reason, "the agent stream broke; resuming from the target's checkpoint");
                    if Instant::now() >= give_up_at {
                        self.state.send_modify(|state| state.failed = Some(reason));
                        return;
                    }
                    self.state.send_modify(|state| {
                        state.broken = Some(reason);
                        state.reconnects += 1;
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn session(&mut self) -> SessionEnd {
        let broken = |reason: String| SessionEnd::Broken {
            reason,
            progressed: false,
        };
        let mut target =
            match connect_target(&self.options.target_agent, &self.options.client).await {
                Ok(client) => client,
                Err(error) => return broken(format!("the target agent: {error}")),
            };
        let mut source =
            match connect_source(&self.options.source_agent, &self.options.client).await {
                Ok(client) => client,
                Err(error) => return broken(format!("the source agent: {error}")),
            };
        let known = self.state.borrow().clone();
        let request = match &known.start {
            None => {
                // A new stream: its seqs start at 1 again.
                if let Some(chain) = self.chain.as_mut() {
                    chain.restart();
                }
                ExtractRequest {
                    follow: true,
                    epoch: self.epoch,
                    key_prefix: self.options.key_prefix.clone().into(),
                    ..ExtractRequest::default()
                }
            }
            Some(start) => {
                let checkpoint = match target
                    .checkpoint(CheckpointRequest {
                        stream_id: start.stream_id.clone(),
                    })
                    .await
                {
                    Ok(answer) => answer.into_inner(),
                    Err(status) => {
                        return answered("the target agent's checkpoint", &status, false);
                    }
                };
                info!(
                    stream_id = %start.stream_id,
                    applied_through_seq = checkpoint.applied_through_seq,
                    "resuming the stream where the target stands"
                );
                // Without a chain the target's seqs are the source's; with
                // one, the chain maps them back (see `versions`).
                let (from_seq_exclusive, from_position_exclusive, snapshot_through_seq) =
                    match self.chain.as_mut() {
                        None => (
                            checkpoint.applied_through_seq,
                            checkpoint.applied_through_position,
                            known.snapshot_through_seq,
                        ),
                        Some(chain) => match chain.resume(checkpoint.applied_through_seq) {
                            Ok(point) => {
                                info!(
                                    target_seq = checkpoint.applied_through_seq,
                                    from_seq_exclusive = point.from_seq_exclusive,
                                    from_position_exclusive = point.from_position_exclusive,
                                    inside_op = point.inside_op,
                                    "the target's checkpoint mapped back through the version chain"
                                );
                                (
                                    point.from_seq_exclusive,
                                    point.from_position_exclusive,
                                    chain.source_snapshot_through_seq(),
                                )
                            }
                            Err(reason) => return SessionEnd::Failed(reason),
                        },
                    };
                ExtractRequest {
                    from_position_exclusive,
                    follow: true,
                    epoch: self.epoch,
                    stream_id: start.stream_id.clone(),
                    snapshot_position: start.snapshot_position,
                    from_seq_exclusive,
                    snapshot_through_seq: snapshot_through_seq.unwrap_or(0),
                    key_prefix: self.options.key_prefix.clone().into(),
                }
            }
        };
        let mut extract = match source.extract(request).await {
            Ok(answer) => answer.into_inner(),
            Err(status) => return answered("the source agent's Extract", &status, false),
        };
        let start = match extract.message().await {
            Ok(Some(message)) => match message.event {
                Some(Event::Start(start)) => start,
                other => {
                    return broken(format!(
                        "the source agent's stream began with {other:?}, not its StreamStart"
                    ));
                }
            },
            Ok(None) => return broken("the source agent's stream ended at once".to_owned()),
            Err(status) => return answered("the source agent's Extract", &status, false),
        };
        if let Some(known_start) = &known.start
            && known_start.stream_id != start.stream_id
        {
            return broken(format!(
                "the source agent resumed stream {} as {}",
                known_start.stream_id, start.stream_id
            ));
        }
        self.state.send_modify(|state| {
            state.start.get_or_insert_with(|| start.clone());
            state.broken = None;
        });

        let mut applied = self.state.subscribe();
        let (requests, receiver) = mpsc::channel::<ApplyRequest>(8);
        let first = ApplyRequest {
            batch: None,
            start: Some(start.clone()),
        };
        if requests.send(first).await.is_err() {
            return broken("the Apply stream closed before it began".to_owned());
        }
        let mut acks = match target.apply(ReceiverStream::new(receiver)).await {
            Ok(answer) => answer.into_inner(),
            Err(status) => return answered("the target agent's Apply", &status, false),
        };
        let confirm_task = tokio::spawn(confirm_applied(
            source.clone(),
            start.stream_id.clone(),
            self.epoch,
            self.state.subscribe(),
        ));
        let _confirming = AbortOnDrop(confirm_task);
        // Acks are read on their own task, so a full request channel never
        // keeps them waiting.
        let ack_state = self.state.clone();
        let mut ack_task = tokio::spawn(async move {
            let mut progressed = false;
            loop {
                match acks.message().await {
                    Ok(Some(ack)) => {
                        progressed = true;
                        ack_state.send_modify(|state| {
                            state.applied_seq = state.applied_seq.max(ack.applied_through_seq);
                            state.applied_position =
                                state.applied_position.max(ack.applied_through_position);
                        });
                    }
                    Ok(None) => {
                        return SessionEnd::Broken {
                            reason: "the target agent ended the Apply stream".to_owned(),
                            progressed,
                        };
                    }
                    Err(status) => {
                        return answered("the target agent's Apply", &status, progressed);
                    }
                }
            }
        });

        let end = loop {
            tokio::select! {
                biased;
                changed = self.stop.changed() => {
                    if changed.is_err() || *self.stop.borrow() {
                        break SessionEnd::Stopped;
                    }
                }
                ended = &mut ack_task => {
                    return ended.unwrap_or_else(|error| broken(format!("the ack reader failed: {error}")));
                }
                // With a chain, too many source transactions in flight: wait
                // for acks before reading more (bounds the way back).
                _ = applied.changed(), if self.chain.as_ref().is_some_and(|chain| chain.in_flight() >= MAX_BOUNDARIES) => {
                    let applied_seq = applied.borrow_and_update().applied_seq;
                    if let Some(chain) = self.chain.as_mut() {
                        chain.acked(applied_seq);
                    }
                }
                message = extract.message(), if self.chain.as_ref().is_none_or(|chain| chain.in_flight() < MAX_BOUNDARIES) => {
                    let event = match message {
                        Ok(Some(message)) => message.event,
                        Ok(None) => break SessionEnd::Broken { reason: "the source agent ended its stream".to_owned(), progressed: false },
                        Err(status) => break answered("the source agent's Extract", &status, false),
                    };
                    match event {
                        Some(Event::Batch(mut batch)) => {
                            if batch.ops.is_empty() {
                                continue;
                            }
                            // The tee keeps the source's ops as they are.
                            self.tee(&batch.ops).await;
                            if let Some(mut chain) = self.chain.take() {
                                chain.acked(applied.borrow_and_update().applied_seq);
                                let ops = std::mem::take(&mut batch.ops);
                                let (chain, transformed) = off_the_runtime(chain, move |chain| chain.transform(ops)).await;
                                self.chain = Some(chain);
                                match transformed {
                                    Ok(ops) => batch.ops = ops,
                                    Err(MigrationError::Collision { target_key, first_key, second_key, second_seq, .. }) => break SessionEnd::Failed(format!(
                                        "the source now holds two keys the version migration chain maps onto {target_key}: {first_key} and {second_key} (source op seq {second_seq}); the new plane did not take {second_key}'s change and keeps {first_key}'s. Rename one of them in the source, then migrate again"
                                    )),
                                    Err(error) => break SessionEnd::Failed(format!(
                                        "the version migration chain failed on the stream: {error}"
                                    )),
                                }
                            }
                            let Some(last) = batch.ops.last().map(|op| op.seq) else { continue };
                            if requests.send(ApplyRequest { batch: Some(batch), start: None }).await.is_err() {
                                // The ack task says why.
                                continue;
                            }
                            self.state.send_modify(|state| state.sent_seq = state.sent_seq.max(last));
                        }
                        Some(Event::SnapshotComplete(complete)) => {
                            let through = match self.chain.as_mut() {
                                Some(chain) => chain.snapshot_complete(complete.through_seq),
                                None => complete.through_seq,
                            };
                            self.state.send_modify(|state| state.snapshot_through_seq = Some(through));
                        }
                        Some(Event::Progress(progress)) => {
                            // The target's seqs are the chain's outputs.
                            let through = match self.chain.as_ref() {
                                Some(chain) => chain.output_seq_through(progress.through_seq),
                                None => progress.through_seq,
                            };
                            self.state.send_modify(|state| {
                                if progress.position >= state.source_position {
                                    state.source_position = progress.position;
                                    state.source_position_seq = through;
                                }
                                state.head_position = state.head_position.max(progress.head_position);
                            });
                        }
                        Some(Event::Start(_)) | None => {}
                    }
                }
            }
        };
        // Closing the request stream ends the Apply call; its acks are read
        // to the end so the target's last answer is seen. After a break on
        // the source's side the target may still be applying batches it
        // took in: its ack stream ends only once it is done with them, and
        // a resume reads its checkpoint after that, so the checkpoint does
        // not move on under the resume (with a version chain, a resume
        // maps a checkpoint that moved past it wrongly, or not at all).
        drop(requests);
        if let SessionEnd::Broken { reason, .. } = &end {
            // Known as broken while the target finishes: no cutover starts
            // on a stream that is down.
            self.state
                .send_modify(|state| state.broken = Some(reason.clone()));
        }
        let mut end = end;
        let mut refused = None;
        match &mut end {
            SessionEnd::Stopped => {
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut ack_task).await;
            }
            SessionEnd::Failed(_) => {}
            SessionEnd::Broken { progressed, .. } => {
                // As long as the target acks, it is making progress.
                let quiet = self.options.reconnect_timeout.min(APPLY_END_QUIET);
                loop {
                    tokio::select! {
                        finished = &mut ack_task => {
                            match finished {
                                Ok(SessionEnd::Broken { progressed: true, .. }) => *progressed = true,
                                // The target's last answer: no resume helps.
                                Ok(SessionEnd::Failed(reason)) => refused = Some(reason),
                                _ => {}
                            }
                            break;
                        }
                        changed = tokio::time::timeout(quiet, applied.changed()) => {
                            if matches!(changed, Ok(Ok(()))) {
                                *progressed = true;
                                continue;
                            }
                            warn!(?quiet, "the target agent neither acked nor ended the Apply stream; resuming anyway");
                            break;
                        }
                    }
                }
            }
        }
        ack_task.abort();
        refused.map_or(end, SessionEnd::Failed)
    }

    /// Hands ops to the tee (the backup written beside the migration),
    /// each seq once however often the stream was resumed.
    async fn tee(&mut self, ops: &[Op]) {
        let Some(tee) = &self.tee else { return };
        let fresh: Vec<Op> = ops
            .iter()
            .filter(|op| op.seq > self.teed_through)
            .cloned()
            .collect();
        let Some(last) = fresh.last().map(|op| op.seq) else {
            return;
        };
        if tee.send(fresh).await.is_ok() {
            self.teed_through = last;
        }
    }
}

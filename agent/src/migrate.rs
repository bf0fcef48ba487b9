//! `ferry migrate --live`: moves a live control plane onto a new one while
//! its clients keep writing through the gateway, then switches them over.
//!
//! The steps (`docs/DESIGN.md`, "Live migration: agents, gateway, cutover"):
//! 1. epoch = the highest epoch the target, the old plane's fence record or
//!    a gateway has seen, plus one;
//! 2. the source agent streams a snapshot at position R, relayed here to the
//!    target agent, which applies it exactly once;
//! 3. live changes follow from R+1 until the lag is under `max_lag`;
//! 4. every gateway replica holds new writes and waits for the writes in
//!    flight that a fence does not refuse; each hold is a lease on its Hold
//!    stream ([`gateways`]);
//! 5. the source agent fences the old plane, naming the new one, and reads
//!    its position F; from then on the old plane itself refuses every
//!    gateway's writes (ferry's write alarm and the fence guard);
//! 6. the target applies through F, and records the revision offset;
//! 7. with `verify`, the digests of both planes agree;
//! 8. the switch is committed in the old plane's fence record (the point of
//!    no return), then every gateway switches to the new plane and releases
//!    the held writes;
//! 9. a report: the pause window, ops moved, the lag over time.
//!
//! Any failure before the commit rolls back: the old plane is unfenced and
//! the gateways release the held writes to it. A driver that dies leaves no
//! plane stuck: its holds lapse, and each gateway settles from the fence
//! record (`ferry migrate abort|resume` do the same from any machine,
//! [`decide`]). A broken agent stream is resumed
//! from the target's own checkpoint (G4), without a new snapshot once the
//! first one is through.
//!
//! With a version migration chain ([`MigrateOptions::migrations`]), the
//! relay takes every batch through it on the way to the target; the chain
//! is planned before anything starts, and [`versions`] says how a resume
//! finds its way back from the target's seqs to the source's.

mod decide;
mod gateways;
mod versions;

pub use decide::{DecideOptions, Decided, LiveStatus, abort, live_status, resume};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::Op;
use ferry_engine::migrations::chain::Chain;
use ferry_engine::migrations::profile::Profile;
use ferry_engine::migrations::{MigrationError, off_the_runtime};
use ferry_proto::v1::extract_response::Event;
use ferry_proto::v1::{
    AdoptRequest, ApplyRequest, CheckpointRequest, CommitRequest, ConfirmRequest, DescribeRequest,
    DescribeResponse, DigestRequest, DigestResponse, ExtractRequest, FenceRequest,
    FenceStatusRequest, StreamStart, UnfenceRequest,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use self::gateways::Gateways;
use self::versions::{MAX_BOUNDARIES, RelayChain};
use crate::client::{
    ClientError, ClientOptions, SourceClient, TargetClient, connect_source, connect_target,
};
use crate::remote::status_text;

/// What a live migration needs.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The SourceAgent beside the old plane.
    pub source_agent: String,
    /// The TargetAgent beside the new plane.
    pub target_agent: String,
    /// The admin addresses of every gateway replica in front of the old
    /// plane: all are held, fenced behind and switched together.
    pub gateways: Vec<String>,
    /// Token for the agents and the gateway.
    pub client: ClientOptions,
    /// The longest clients' writes may be held at cutover.
    pub max_pause: Duration,
    /// The cutover starts once the target is at most this many source
    /// positions behind, in the source's unit (its agent's Describe names
    /// it: etcd revisions).
    pub max_lag: u64,
    /// Only keys starting with this (empty: everything).
    pub key_prefix: Vec<u8>,
    /// How long the target may take to catch up before the migration gives
    /// up (nothing is held or fenced while it catches up).
    pub catch_up_timeout: Duration,
    /// How long a broken agent stream is retried without any progress.
    pub reconnect_timeout: Duration,
    /// Follow the live changes at least this long before cutting over (a
    /// soak period, to watch the lag under real load first).
    pub follow_at_least: Duration,
    /// Where the running migration writes its status, for `ferry migrate status`.
    pub status_file: Option<PathBuf>,
    /// A version migration chain every op is taken through on the way.
    pub migrations: Option<VersionMigrations>,
    /// Cutover step 7: before switching, compare a digest of the old plane
    /// at the fenced position with one of the new plane; a difference rolls
    /// back. It reads both planes whole while writes are held, within
    /// `max_pause`. Not with `migrations` (the new plane holds the
    /// transformed keys).
    pub verify: bool,
}

/// `--migrations DIR --to-version V [--from-version V0]` of a live migration.
#[derive(Debug, Clone)]
pub struct VersionMigrations {
    /// The platform profile.
    pub profile: Profile,
    /// The version the ops are written in on the target.
    pub to_version: String,
    /// The version the source's ops are in; else the source agent's
    /// platform version when its platform is the profile's.
    pub from_version: Option<String>,
}

impl VersionMigrations {
    /// The version the source's ops start in: `from_version`, else what the
    /// source agent describes when it stands beside the profile's platform.
    /// (An etcd source agent describes etcd and its server version, which
    /// name no version of a platform kept in etcd.)
    pub fn from_version_of(&self, source: &DescribeResponse) -> Result<String, MigrationError> {
        if let Some(version) = &self.from_version {
            return Ok(version.clone());
        }
        if source.platform == self.profile.platform && !source.platform_version.is_empty() {
            return Ok(source.platform_version.clone());
        }
        Err(MigrationError::NoFromVersion {
            platform: self.profile.platform.clone(),
            reason: format!(
                "the source agent stands beside {} {} and its ops name no version of profile {:?}",
                if source.platform.is_empty() {
                    "a plane"
                } else {
                    &source.platform
                },
                if source.platform_version.is_empty() {
                    "(version unknown)"
                } else {
                    &source.platform_version
                },
                self.profile.platform
            ),
        })
    }

    /// Plans the chain from the source's version to `to_version`: unknown
    /// versions, holes and missing `down` filters are refused here, before
    /// anything is held, fenced or written.
    pub fn plan(&self, source: &DescribeResponse) -> Result<Chain, MigrationError> {
        let from = self.from_version_of(source)?;
        Chain::new(self.profile.clone(), &from, &self.to_version)
    }
}

/// One line per step of a planned chain, for the dry run and the report.
fn describe_chain(chain: &Chain) -> Vec<String> {
    let plan = chain.plan();
    let mut lines = vec![format!(
        "take every op through profile {}'s chain from version {} to {} ({} steps), before the target sees it",
        plan.platform,
        plan.from,
        plan.to,
        plan.steps.len()
    )];
    lines.extend(plan.steps.iter().map(|step| {
        format!(
            "   {} {} ({} -> {})",
            step.migration.id(),
            step.direction,
            step.from,
            step.to
        )
    }));
    lines
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Connecting to the agents and the gateway.
    #[default]
    Starting,
    /// The snapshot is being applied to the target.
    Snapshot,
    /// Live changes are being applied; waiting for the lag to fall.
    Following,
    /// The gateway is holding writes; writes in flight drain.
    Holding,
    /// The old plane is being fenced.
    Fencing,
    /// The target applies through the fenced position.
    Draining,
    /// The two planes' digests are compared (`--verify`).
    Verifying,
    /// The gateway switches to the new plane and releases writes.
    Switching,
    /// Done: clients write to the new plane.
    Switched,
    /// A step failed before the switch: unfencing, releasing.
    RollingBack,
    /// Rolled back: clients write to the old plane, as before.
    RolledBack,
    /// Stopped before any write was held (the target could not keep up, or
    /// an agent was lost); nothing to roll back.
    Failed,
}

/// What `ferry migrate status` shows, written by a running migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Where it is.
    pub phase: Phase,
    /// This attempt's fencing token.
    pub epoch: u64,
    /// The stream's id (the target's checkpoint key names it).
    pub stream_id: String,
    /// The snapshot's source position R.
    pub snapshot_position: u64,
    /// Ops received from the source.
    pub sent_through_seq: u64,
    /// Ops the target has applied.
    pub applied_through_seq: u64,
    /// The source's latest position.
    pub head_position: u64,
    /// Source positions the target is behind.
    pub lag_positions: u64,
    /// Ops received but not applied yet.
    pub lag_ops: u64,
    /// Agent streams resumed after a break.
    pub reconnects: u64,
    /// The last break, while resuming.
    pub broken: Option<String>,
    /// When this status was written (RFC 3339).
    pub updated_at: String,
}

/// One sample of the lag.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LagSample {
    /// Milliseconds since the migration started.
    pub at_ms: u64,
    /// Source positions the target was behind.
    pub positions: u64,
    /// Ops received but not yet applied.
    pub ops: u64,
}

/// How a migration ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Clients write to the new plane.
    Switched,
    /// Clients write to the old plane again; `reason` says why.
    RolledBack {
        /// The step that failed, and how.
        reason: String,
    },
    /// The cutover failed and this driver could not learn whether its
    /// commit took effect, nor undo it (the source agent or the old plane
    /// did not answer): the old plane's fence record decides, the gateways
    /// settle from it by themselves, and `ferry migrate status|resume|abort`
    /// read it.
    Undecided {
        /// The step that failed, and why the rollback could not be made.
        reason: String,
    },
}

/// The end of a migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Switched or rolled back.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// This attempt's fencing token.
    pub epoch: u64,
    /// The stream's id.
    pub stream_id: String,
    /// The snapshot's source position R.
    pub snapshot_position: u64,
    /// Ops in the snapshot.
    pub snapshot_ops: u64,
    /// The old plane's position when fenced (F), when it was.
    pub fenced_position: Option<u64>,
    /// Ops applied to the target: snapshot and live changes.
    pub ops_moved: u64,
    /// From holding writes to releasing them, in milliseconds.
    pub pause_window_ms: Option<f64>,
    /// Holding and waiting for writes in flight.
    pub hold_ms: Option<f64>,
    /// Fencing the old plane.
    pub fence_ms: Option<f64>,
    /// The target applying through F.
    pub drain_ms: Option<f64>,
    /// Switching and releasing.
    pub switch_ms: Option<f64>,
    /// Writes in flight when the hold began.
    pub drained_writes: u64,
    /// Writes held, then sent on.
    pub released_writes: u64,
    /// Writes answered UNAVAILABLE because the hold ran out.
    pub rejected_writes: u64,
    /// Agent streams resumed after a break.
    pub reconnects: u64,
    /// The whole migration, in milliseconds.
    pub elapsed_ms: f64,
    /// The lag over time.
    pub lag: Vec<LagSample>,
    /// What the positions of the report and of `--max-lag` count (the
    /// source's unit: `etcd revision`).
    #[serde(default)]
    pub position_unit: String,
    /// The control plane clients now write to.
    pub upstream_url: String,
    /// The version migration chain the ops went through
    /// (`platform from -> to`), when there was one. `ops_moved` and
    /// `snapshot_ops` then count the chain's outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_chain: Option<String>,
    /// With a version chain: the source ops of the snapshot read through it
    /// first, before anything was written (see [`versions::precheck`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_checked_ops: Option<u64>,
    /// With `--verify`: the keys both planes hold, found the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_keys: Option<u64>,
    /// With `--verify`: how long the comparison took (within the pause).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_ms: Option<f64>,
}

/// A migration could not run.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// An agent or the gateway cannot be reached.
    #[error("{role}: {source}")]
    Connect {
        /// Which one ("the source agent at ...").
        role: String,
        /// Why.
        source: ClientError,
    },
    /// A call was answered with an error.
    #[error("{role} refused to {action}: {status}")]
    Call {
        /// Which one.
        role: String,
        /// What was asked.
        action: String,
        /// Its answer.
        status: String,
    },
    /// The agents or the gateway disagree with the migration.
    #[error("{0}")]
    Invalid(String),
    /// The target did not catch up in time; nothing was held or fenced.
    #[error(
        "the target did not catch up within {timeout:?}: {lag} positions ({unit}s) behind (--max-lag is {max_lag}); nothing was held or fenced"
    )]
    CatchUp {
        /// The limit.
        timeout: Duration,
        /// What a position counts.
        unit: String,
        /// Where the lag stood.
        lag: u64,
        /// The threshold.
        max_lag: u64,
    },
    /// The version migration chain cannot be planned: nothing was held,
    /// fenced or written.
    #[error("{0}")]
    Chain(#[source] MigrationError),
    /// The relay stopped before the cutover, and no resume helps: the
    /// version migration chain failed on an op of the stream (a filter
    /// error, an output that is not an op, a collision), or an agent refused
    /// the stream for good (a target that already holds keys).
    #[error("{0}; nothing was held or fenced")]
    Refused(String),
    /// The agent streams broke and could not be resumed.
    #[error("the agent stream broke and could not be resumed within {timeout:?}: {reason}")]
    Relay {
        /// The limit.
        timeout: Duration,
        /// The last break.
        reason: String,
    },
}

fn call_error(role: &str, action: &str, status: tonic::Status) -> MigrateError {
    MigrateError::Call {
        role: role.to_owned(),
        action: action.to_owned(),
        status: status_text(&status),
    }
}

/// The relay's view of the two streams.
#[derive(Debug, Clone, Default)]
struct RelayState {
    start: Option<StreamStart>,
    snapshot_through_seq: Option<u64>,
    sent_seq: u64,
    applied_seq: u64,
    applied_position: u64,
    /// Every source change through this position has been received…
    source_position: u64,
    /// …and these are the seqs it took.
    source_position_seq: u64,
    head_position: u64,
    reconnects: u64,
    broken: Option<String>,
    failed: Option<String>,
    /// The relay stopped for good: the version migration chain failed on an
    /// op, or an agent refused the stream in a way no resume changes.
    refused: Option<String>,
}

impl RelayState {
    /// Source positions the target is behind.
    fn lag_positions(&self) -> u64 {
        let applied = if self.applied_seq >= self.source_position_seq {
            self.source_position.max(self.applied_position)
        } else {
            self.applied_position
        };
        self.head_position.saturating_sub(applied)
    }

    /// True once every change through `position` is applied.
    fn applied_through(&self, position: u64) -> bool {
        self.source_position >= position && self.applied_seq >= self.source_position_seq
    }
}

/// Moves ops from the source agent to the target agent, resuming after
/// breaks, until told to stop.
struct Relay {
    options: MigrateOptions,
    epoch: u64,
    state: Arc<watch::Sender<RelayState>>,
    stop: watch::Receiver<bool>,
    tee: Option<mpsc::Sender<Vec<Op>>>,
    teed_through: u64,
    /// The version migration chain, when there is one.
    chain: Option<RelayChain>,
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
    async fn run(mut self) {
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

/// A running migration's handles.
struct Running {
    source: SourceClient,
    target: TargetClient,
    gateways: Gateways,
    target_description: DescribeResponse,
    source_description: DescribeResponse,
    /// See [`Connected::revision_offset`].
    revision_offset: i64,
    epoch: u64,
    state: watch::Receiver<RelayState>,
    stop: watch::Sender<bool>,
    relay: tokio::task::JoinHandle<()>,
    started: Instant,
    lag: Arc<std::sync::Mutex<Vec<LagSample>>>,
    phase: watch::Sender<Phase>,
    /// The chain `--verify` takes the old plane through, when ops go
    /// through one.
    verify_chain: Option<Chain>,
}

/// The plan `--dry-run` prints, and the facts it rests on.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationPlan {
    /// The epoch the migration would use.
    pub epoch: u64,
    /// The old plane, as its agent describes it.
    pub source: String,
    /// The new plane, as its agent describes it.
    pub target: String,
    /// Where the gateway sends clients now.
    pub gateway_upstream: String,
    /// The steps, in order.
    pub steps: Vec<String>,
    /// The version migration chain, one line per step, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_chain: Option<Vec<String>>,
}

/// What a position of the plane counts ("position" when its agent does
/// not say).
fn position_unit(description: &DescribeResponse) -> &str {
    description
        .capabilities
        .as_ref()
        .map(|capabilities| capabilities.position_unit.as_str())
        .filter(|unit| !unit.is_empty())
        .unwrap_or("position")
}

/// Refuses a migration the adapters cannot carry out, before anything
/// changes: the caller's side of the capabilities the agents declare.
fn check_capabilities(
    options: &MigrateOptions,
    source: &DescribeResponse,
    target: &DescribeResponse,
) -> Result<(), MigrateError> {
    let source_can = source.capabilities.clone().unwrap_or_default();
    let target_can = target.capabilities.clone().unwrap_or_default();
    if !source_can.store_fence && options.gateways.is_empty() {
        return Err(MigrateError::Invalid(format!(
            "{} cannot refuse writes by itself (its adapter has no store-level fence): only gateways hold writes back at the cutover. Put clients behind `ferry gateway` and name every replica with --gateway",
            source.control_plane_url
        )));
    }
    if target_can.server_assigned_ids && options.verify {
        return Err(MigrateError::Invalid(format!(
            "--verify compares the two planes key by key, but {} assigns ids of its own (its keys differ from the old plane's by design); migrate without --verify",
            target.control_plane_url
        )));
    }
    Ok(())
}

fn describe_plane(description: &DescribeResponse) -> String {
    format!(
        "{} {} (identity {}) at {}",
        description.platform,
        description.platform_version,
        description.identity,
        description.control_plane_url
    )
}

struct Connected {
    source: SourceClient,
    target: TargetClient,
    gateways: Gateways,
    source_description: DescribeResponse,
    target_description: DescribeResponse,
    gateway_upstream: String,
    /// What the gateways add to the old plane's revisions (after earlier
    /// migrations): the new plane's offset builds on it.
    revision_offset: i64,
    epoch: u64,
}

async fn connect_all(options: &MigrateOptions) -> Result<Connected, MigrateError> {
    let role = |what: &str, address: &str| format!("the {what} at {address}");
    let mut source = connect_source(&options.source_agent, &options.client)
        .await
        .map_err(|source| MigrateError::Connect {
            role: role("source agent", &options.source_agent),
            source,
        })?;
    let mut target = connect_target(&options.target_agent, &options.client)
        .await
        .map_err(|source| MigrateError::Connect {
            role: role("target agent", &options.target_agent),
            source,
        })?;
    let gateways = Gateways::connect(&options.gateways, &options.client)
        .await
        .map_err(|(address, source)| MigrateError::Connect {
            role: role("gateway", &address),
            source,
        })?;
    let source_description = source
        .describe(DescribeRequest {})
        .await
        .map_err(|status| call_error("the source agent", "describe its plane", status))?
        .into_inner();
    let target_description = target
        .describe(DescribeRequest {})
        .await
        .map_err(|status| call_error("the target agent", "describe its plane", status))?
        .into_inner();
    check_capabilities(options, &source_description, &target_description)?;
    if !source_description.identity.is_empty()
        && source_description.identity == target_description.identity
    {
        return Err(MigrateError::Invalid(format!(
            "the source and the target agent stand beside the same control plane (identity {}): a plane cannot be migrated onto itself",
            source_description.identity
        )));
    }
    let target_epoch = target
        .checkpoint(CheckpointRequest {
            stream_id: String::new(),
        })
        .await
        .map_err(|status| call_error("the target agent", "tell its epoch", status))?
        .into_inner()
        .epoch;
    let record = source
        .fence_status(FenceStatusRequest {})
        .await
        .map_err(|status| {
            call_error(
                "the source agent",
                "read the old plane's fence record",
                status,
            )
        })?
        .into_inner();
    if record.switched {
        return Err(MigrateError::Invalid(format!(
            "migration epoch {} already switched the old plane's clients to {}: the old plane is fenced for good; migrate from the plane that serves",
            record.epoch, record.successor_url
        )));
    }
    if record.fenced {
        return Err(MigrateError::Invalid(format!(
            "migration epoch {} fenced the old plane and has not decided (switching to {}): run `ferry migrate resume` or `ferry migrate abort` first",
            record.epoch, record.successor_url
        )));
    }
    let mut epoch = target_epoch.max(record.epoch);
    let mut upstreams = Vec::new();
    let mut offsets = Vec::new();
    for (address, status) in gateways.status().await {
        let status = status.map_err(MigrateError::Invalid)?;
        if status.holding {
            return Err(MigrateError::Invalid(format!(
                "the gateway at {address} is holding writes for epoch {} already: another migration is cutting over",
                status.epoch
            )));
        }
        epoch = epoch.max(status.epoch);
        if !offsets.contains(&status.revision_offset) {
            offsets.push(status.revision_offset);
        }
        if !upstreams.contains(&status.upstream_url) {
            upstreams.push(status.upstream_url);
        }
    }
    if offsets.len() > 1 {
        return Err(MigrateError::Invalid(format!(
            "the gateways translate revisions differently (offsets {offsets:?}): they do not stand in front of the same plane"
        )));
    }
    if upstreams.len() > 1 {
        return Err(MigrateError::Invalid(format!(
            "the gateways forward to different planes ({}): every replica must stand in front of the old plane",
            upstreams.join(", ")
        )));
    }
    Ok(Connected {
        source,
        target,
        gateways,
        source_description,
        target_description,
        gateway_upstream: upstreams.pop().unwrap_or_default(),
        revision_offset: offsets.pop().unwrap_or_default(),
        epoch: epoch + 1,
    })
}

/// What a migration would do, from the agents' and the gateway's answers;
/// changes nothing.
pub async fn plan(options: &MigrateOptions) -> Result<MigrationPlan, MigrateError> {
    let connected = connect_all(options).await?;
    let mut chain = plan_chain(options, &connected.source_description)?;
    let source = describe_plane(&connected.source_description);
    let target = describe_plane(&connected.target_description);
    let epoch = connected.epoch;
    let through_chain = chain.as_ref().map_or(String::new(), |chain| {
        format!(
            ", through the version chain {} -> {}",
            chain.plan().from,
            chain.plan().to
        )
    });
    let mut steps = vec![format!(
        "take epoch {epoch} (the highest the target, the old plane's fence record or a gateway has seen, plus one)"
    )];
    if let Some(ops) = precheck_chain(options, &connected, &mut chain).await? {
        steps.push(format!(
            "read a snapshot of {source} through the version chain and write nothing: a filter error or two keys landing on one stops here (done now: {ops} ops, no error)"
        ));
    }
    steps.extend([
        format!(
            "snapshot {source} at its current position R and apply it to {target}{through_chain}, exactly once"
        ),
        format!(
            "follow the source's changes from R+1 until the target is at most {} positions ({}s) behind (at most {:?})",
            options.max_lag,
            position_unit(&connected.source_description),
            options.catch_up_timeout
        ),
        format!(
            "hold writes at every gateway ({}; at most {:?}) and wait for the writes in flight",
            connected.gateways.addresses(),
            options.max_pause
        ),
        format!(
            "fence the old plane (it refuses every gateway's writes from then on), naming {} as its successor, and read its position F",
            connected.target_description.control_plane_url
        ),
        "wait until the target has applied every change through F".to_owned(),
    ]);
    if options.verify {
        steps.push(if chain.is_some() {
            "read the old plane at F through the version chain again and compare a digest of every key and value it makes with the new plane's".to_owned()
        } else {
            "compare a digest of every key and value of the old plane at F with the new plane's"
                .to_owned()
        });
    }
    steps.extend([
        format!(
            "commit the switch in the old plane's fence record, then switch every gateway from {} to {} and release the held writes",
            connected.gateway_upstream, connected.target_description.control_plane_url
        ),
        "on any failure before the commit: unfence the old plane and release the held writes to it; if this process dies, the gateways settle by themselves within --max-pause"
            .to_owned(),
    ]);
    Ok(MigrationPlan {
        epoch,
        source,
        target,
        gateway_upstream: connected.gateway_upstream,
        steps,
        version_chain: chain.as_ref().map(describe_chain),
    })
}

/// Reads a snapshot of the source through `chain`, when there is one, and
/// writes nothing (see [`versions::precheck`]); returns the source ops read.
/// The chain numbers from 1 again afterwards, ready for the stream.
async fn precheck_chain(
    options: &MigrateOptions,
    connected: &Connected,
    chain: &mut Option<Chain>,
) -> Result<Option<u64>, MigrateError> {
    let Some(planned) = chain.take() else {
        return Ok(None);
    };
    let started = Instant::now();
    info!("reading the source's snapshot through the version chain first, writing nothing");
    let (planned, read) = versions::precheck(
        &mut connected.source.clone(),
        planned,
        &options.key_prefix,
        options.verify,
        connected.epoch,
    )
    .await?;
    *chain = Some(planned);
    info!(
        position = read.position,
        source_ops = read.source_ops,
        outputs = read.outputs,
        ms = ms(started.elapsed()),
        "every op of the snapshot goes through the chain, and no two keys land on one"
    );
    Ok(Some(read.source_ops))
}

/// The version migration chain of `options`, planned against what the
/// source agent describes; an error here comes before anything changes.
fn plan_chain(
    options: &MigrateOptions,
    source: &DescribeResponse,
) -> Result<Option<Chain>, MigrateError> {
    options
        .migrations
        .as_ref()
        .map(|migrations| migrations.plan(source))
        .transpose()
        .map_err(MigrateError::Chain)
}

/// Where the backup written beside a migration goes (`--tee`).
pub struct Tee {
    /// The ops as they are relayed, in seq order; closed at the end.
    pub ops: mpsc::Sender<Vec<Op>>,
}

/// Runs a live migration to its end: switched, or rolled back.
///
/// `tee`, when given, receives every op of the stream once, in seq order;
/// it is dropped (closed) when the migration ends. The start of the stream
/// (what it is) is sent on `stream_started` when known.
pub async fn migrate(
    options: MigrateOptions,
    tee: Option<Tee>,
    stream_started: Option<tokio::sync::oneshot::Sender<(StreamStart, DescribeResponse)>>,
) -> Result<MigrationReport, MigrateError> {
    let started = Instant::now();
    let connected = connect_all(&options).await?;
    // Planned before anything is held, fenced or written.
    let mut chain = plan_chain(&options, &connected.source_description)?;
    // `--verify` reads the old plane through a chain of its own while the
    // relay's is busy.
    let verify_chain = if options.verify {
        plan_chain(&options, &connected.source_description)?
    } else {
        None
    };
    let epoch = connected.epoch;
    info!(epoch, source = %describe_plane(&connected.source_description), target = %describe_plane(&connected.target_description), "live migration starts");
    if let Some(chain) = &chain {
        let plan = chain.plan();
        info!(platform = %plan.platform, from = %plan.from, to = %plan.to, steps = plan.steps.len(), "ops go through the version migration chain");
    }
    let version_chain = chain.as_ref().map(|chain| {
        let plan = chain.plan();
        format!("{} {} -> {}", plan.platform, plan.from, plan.to)
    });
    let chain_checked_ops = precheck_chain(&options, &connected, &mut chain).await?;

    let (state_sender, state) = watch::channel(RelayState::default());
    let state_sender = Arc::new(state_sender);
    let (stop, stop_receiver) = watch::channel(false);
    let relay = Relay {
        options: options.clone(),
        epoch,
        state: state_sender,
        stop: stop_receiver,
        tee: tee.map(|tee| tee.ops),
        teed_through: 0,
        chain: chain.map(RelayChain::new),
    };
    let relay = tokio::spawn(relay.run());
    let (phase, phase_receiver) = watch::channel(Phase::Snapshot);
    let lag = Arc::new(std::sync::Mutex::new(Vec::new()));
    let monitor = tokio::spawn(monitor(
        state.clone(),
        phase_receiver,
        epoch,
        started,
        lag.clone(),
        options.status_file.clone(),
    ));
    let mut running = Running {
        source: connected.source,
        target: connected.target,
        gateways: connected.gateways,
        revision_offset: connected.revision_offset,
        target_description: connected.target_description.clone(),
        source_description: connected.source_description.clone(),
        epoch,
        state,
        stop,
        relay,
        started,
        lag,
        phase,
        verify_chain,
    };

    let result = run(
        &mut running,
        &options,
        stream_started,
        &connected.source_description,
    )
    .await
    .map(|mut report| {
        report.version_chain = version_chain;
        report.chain_checked_ops = chain_checked_ops;
        report
    });
    let _ = running.stop.send(true);
    let _ = (&mut running.relay).await;
    // The monitor writes the final phase, then ends.
    let _ = tokio::time::timeout(Duration::from_secs(2), monitor).await;
    result
}

async fn run(
    running: &mut Running,
    options: &MigrateOptions,
    stream_started: Option<tokio::sync::oneshot::Sender<(StreamStart, DescribeResponse)>>,
    source_description: &DescribeResponse,
) -> Result<MigrationReport, MigrateError> {
    // Steps 2 and 3: the snapshot, then following until the lag is small.
    let catch_up_deadline = Instant::now() + options.catch_up_timeout;
    let mut stream_started = stream_started;
    let mut following_since: Option<Instant> = None;
    loop {
        let state = running.state.borrow_and_update().clone();
        if let Some(reason) = state.refused {
            running.phase.send_replace(Phase::Failed);
            return Err(MigrateError::Refused(reason));
        }
        if let Some(reason) = state.failed {
            running.phase.send_replace(Phase::Failed);
            return Err(MigrateError::Relay {
                timeout: options.reconnect_timeout,
                reason,
            });
        }
        if let Some(start) = &state.start
            && let Some(sender) = stream_started.take()
        {
            let _ = sender.send((start.clone(), source_description.clone()));
        }
        // Following once the target holds the whole snapshot.
        if state
            .snapshot_through_seq
            .is_some_and(|through| state.applied_seq >= through)
        {
            let following_since = *following_since.get_or_insert_with(Instant::now);
            if running.phase.send_if_modified(|phase| {
                let changed = *phase == Phase::Snapshot;
                *phase = Phase::Following;
                changed
            }) {
                test_pause_point("following").await;
            }
            if state.broken.is_none()
                && following_since.elapsed() >= options.follow_at_least
                && state.applied_seq >= state.snapshot_through_seq.unwrap_or(u64::MAX)
                && state.lag_positions() <= options.max_lag
            {
                break;
            }
        }
        if Instant::now() >= catch_up_deadline + options.follow_at_least {
            running.phase.send_replace(Phase::Failed);
            return Err(MigrateError::CatchUp {
                timeout: options.catch_up_timeout,
                lag: state.lag_positions(),
                unit: position_unit(source_description).to_owned(),
                max_lag: options.max_lag,
            });
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), running.state.changed()).await;
    }
    cutover(running, options).await
}

/// Steps 4 to 9. Any failure before the switch rolls back.
async fn cutover(
    running: &mut Running,
    options: &MigrateOptions,
) -> Result<MigrationReport, MigrateError> {
    let epoch = running.epoch;
    let held_at = Instant::now();
    let mut report = MigrationReport {
        outcome: Outcome::Switched,
        epoch,
        stream_id: String::new(),
        snapshot_position: 0,
        snapshot_ops: 0,
        fenced_position: None,
        ops_moved: 0,
        pause_window_ms: None,
        hold_ms: None,
        fence_ms: None,
        drain_ms: None,
        switch_ms: None,
        drained_writes: 0,
        released_writes: 0,
        rejected_writes: 0,
        reconnects: 0,
        elapsed_ms: 0.0,
        lag: Vec::new(),
        position_unit: position_unit(&running.source_description).to_owned(),
        upstream_url: String::new(),
        version_chain: None,
        chain_checked_ops: None,
        verified_keys: None,
        verify_ms: None,
    };
    let mut fenced = false;
    let mut committed = false;
    // Until the commit is sent, the migration cannot have switched: only
    // this driver commits this epoch.
    let mut commit_sent = false;
    let result: Result<(), String> = async {
        // Step 4: hold writes; the writes in flight drain.
        running.phase.send_replace(Phase::Holding);
        test_pause_point("holding").await;
        report.drained_writes = running
            .gateways
            .hold(epoch, options.max_pause)
            .await?;
        report.hold_ms = Some(ms(held_at.elapsed()));

        // Step 5: fence the old plane; F is after every write it acknowledged.
        running.phase.send_replace(Phase::Fencing);
        test_pause_point("fencing").await;
        let fence_started = Instant::now();
        // From here the old plane may be fenced: a rollback unfences it
        // (a no-op when the fence never took effect).
        fenced = true;
        let fence = tokio::time::timeout(
            options.max_pause.saturating_sub(held_at.elapsed()).max(AGENT_CALL_FLOOR),
            running.source.fence(FenceRequest {
                epoch,
                successor_url: running.target_description.control_plane_url.clone(),
            }),
        )
        .await
        .map_err(|_| "the source agent did not fence the old plane within --max-pause".to_owned())?
            .map_err(|status| format!("the source agent could not fence the old plane: {}", status_text(&status)))?
            .into_inner();
        report.fenced_position = Some(fence.fenced_position);
        report.fence_ms = Some(ms(fence_started.elapsed()));
        // The new plane records the offset its gateways will add to its
        // revisions (for gateways started in front of it) while the target
        // drains: it is known from F, and needed before the commit. An
        // attempt that rolls back leaves it unused; the next overwrites it.
        let revision_offset = running.revision_offset + fence.fenced_position as i64 + 1;
        let adopting = {
            let mut target = running.target.clone();
            let budget = options.max_pause.saturating_sub(held_at.elapsed()).max(AGENT_CALL_FLOOR);
            tokio::spawn(async move {
                tokio::time::timeout(budget, target.adopt(AdoptRequest { epoch, revision_offset })).await
            })
        };

        // Step 6: the target applies through F, within the pause budget.
        running.phase.send_replace(Phase::Draining);
        test_pause_point("draining").await;
        let drain_started = Instant::now();
        let budget = options.max_pause.saturating_sub(held_at.elapsed());
        let deadline = tokio::time::Instant::now() + budget;
        // A stream that breaks now is resumed by the relay as at any other
        // time: the old plane is fenced, so the resume has F to reach, and
        // the pause budget still bounds the wait. Only a relay that gave up
        // ends the cutover early.
        let mut broke: Option<String> = None;
        loop {
            let state = running.state.borrow_and_update().clone();
            if state.applied_through(fence.fenced_position) {
                break;
            }
            if let Some(reason) = &state.refused {
                return Err(reason.clone());
            }
            if let Some(reason) = &state.failed {
                return Err(format!("the agent stream broke during the cutover: {reason}"));
            }
            if let Some(reason) = &state.broken
                && broke.as_ref() != Some(reason)
            {
                warn!(%reason, "the agent stream broke while draining; resuming within the pause budget");
                broke = Some(reason.clone());
            }
            if tokio::time::timeout_at(deadline, running.state.changed()).await.is_err() {
                let broken = state.broken.as_ref().or(broke.as_ref()).map_or(String::new(), |reason| {
                    format!("; the agent stream broke while draining: {reason}")
                });
                return Err(format!(
                    "the target did not apply through the fenced position {} within --max-pause {:?} (it holds seq {} of {}, source position {}){broken}",
                    fence.fenced_position,
                    options.max_pause,
                    state.applied_seq,
                    state.source_position_seq,
                    state.source_position
                ));
            }
        }
        report.drain_ms = Some(ms(drain_started.elapsed()));

        // Step 7 (--verify): the new plane holds what the old one held at F.
        if options.verify {
            running.phase.send_replace(Phase::Verifying);
            test_pause_point("verifying").await;
            let verify_started = Instant::now();
            let budget = options.max_pause.saturating_sub(held_at.elapsed());
            let keys = match running.verify_chain.take() {
                None => verify(running, &options.key_prefix, fence.fenced_position, budget).await?,
                Some(chain) => {
                    verify_through_chain(running, chain, &options.key_prefix, fence.fenced_position, budget).await?
                }
            };
            report.verified_keys = Some(keys);
            report.verify_ms = Some(ms(verify_started.elapsed()));
        }

        // Step 8: the point of no return, in the old plane itself; then
        // every gateway switches (each checks the record).
        running.phase.send_replace(Phase::Switching);
        test_pause_point("switching").await;
        if !matches!(adopting.await, Ok(Ok(Ok(_)))) {
            // Sent while the target agent was away (its stream resumed
            // meanwhile): once more, now that it drained through F.
            tokio::time::timeout(
                options.max_pause.saturating_sub(held_at.elapsed()).max(AGENT_CALL_FLOOR),
                running.target.adopt(AdoptRequest {
                    epoch,
                    revision_offset,
                }),
            )
            .await
            .map_err(|_| "the target agent did not record the revision offset within --max-pause".to_owned())?
            .map_err(|status| format!("the target agent could not record the revision offset: {}", status_text(&status)))?;
        }
        commit_sent = true;
        let commit = tokio::time::timeout(
            options.max_pause.saturating_sub(held_at.elapsed()).max(AGENT_CALL_FLOOR),
            running.source.commit(CommitRequest {
                epoch,
                // One above F as the clients saw it: every revision of the
                // new plane shows above every one of the old.
                successor_revision_offset: revision_offset,
            }),
        )
        .await;
        match commit {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                return Err(format!(
                    "the source agent could not commit the switch in the old plane: {}",
                    status_text(&status)
                ))
            }
            Err(_) => {
                // Whether the commit took effect is for the record to say
                // (and if it cannot say, the rollback's unfence will).
                let record = tokio::time::timeout(
                    gateways::GATEWAY_CALL_TIMEOUT,
                    running.source.fence_status(FenceStatusRequest {}),
                )
                .await;
                if !record.is_ok_and(|record| {
                    record.is_ok_and(|record| {
                        let record = record.into_inner();
                        record.switched && record.epoch == epoch
                    })
                }) {
                    return Err("the source agent did not commit the switch within --max-pause".to_owned());
                }
            }
        }
        committed = true;
        test_pause_point("committed").await;
        let not_switched = running
            .gateways
            .switch(epoch, &running.target_description.control_plane_url)
            .await;
        for reason in not_switched {
            warn!(%reason, "a gateway did not switch; it follows the fence record once its hold lapses");
        }
        Ok(())
    }
    .await;

    // A failure after the commit is no rollback: the migration switched.
    let result = match result {
        Err(reason) if committed => {
            warn!(%reason, "the switch is committed; carrying on");
            Ok(())
        }
        result => result,
    };
    match result {
        Ok(()) => {
            test_pause_point("releasing").await;
            let (released, failures) = running.gateways.release(epoch).await;
            let pause = held_at.elapsed();
            report.pause_window_ms = Some(ms(pause));
            report.switch_ms = Some(
                ms(pause)
                    - report.hold_ms.unwrap_or(0.0)
                    - report.fence_ms.unwrap_or(0.0)
                    - report.drain_ms.unwrap_or(0.0)
                    - report.verify_ms.unwrap_or(0.0),
            );
            report.released_writes = released.released_writes;
            report.rejected_writes = released.rejected_writes;
            for reason in failures {
                warn!(%reason, "a gateway switched but did not confirm the release");
            }
            report.upstream_url = running.target_description.control_plane_url.clone();
            running.phase.send_replace(Phase::Switched);
            info!(
                epoch,
                pause_ms = report.pause_window_ms,
                "switched to the new plane"
            );
        }
        Err(reason) => {
            warn!(%reason, "cutover failed: rolling back");
            running.phase.send_replace(Phase::RollingBack);
            // The unfence is the same compare-and-swap as the commit: it
            // says whether a commit whose answer was lost took effect.
            let mut undone = Ok(());
            if fenced {
                let unfence = tokio::time::timeout(
                    gateways::GATEWAY_CALL_TIMEOUT,
                    running.source.unfence(UnfenceRequest { epoch }),
                )
                .await;
                undone = match unfence {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status))
                        if status.code() == tonic::Code::FailedPrecondition
                            && status.message().contains("cannot be rolled back") =>
                    {
                        Err(None)
                    }
                    Ok(Err(status)) => Err(Some(format!(
                        "the source agent could not unfence the old plane: {}",
                        status_text(&status)
                    ))),
                    Err(_) => Err(Some(format!(
                        "the source agent did not answer the unfence within {:?}",
                        gateways::GATEWAY_CALL_TIMEOUT
                    ))),
                };
            }
            if undone == Err(None) {
                // The commit took effect: finish the switch.
                warn!(%reason, "the commit took effect although its answer was lost: switching");
                let not_switched = running
                    .gateways
                    .switch(epoch, &running.target_description.control_plane_url)
                    .await;
                for reason in not_switched {
                    warn!(%reason, "a gateway did not switch; it follows the fence record once its hold lapses");
                }
            }
            let (released, failures) = running.gateways.release(epoch).await;
            report.released_writes = released.released_writes;
            report.rejected_writes = released.rejected_writes;
            for error in failures {
                warn!(%error, "a gateway did not release the held writes");
            }
            report.pause_window_ms = Some(ms(held_at.elapsed()));
            report.upstream_url = running
                .gateways
                .status()
                .await
                .into_iter()
                .find_map(|(_, status)| status.ok())
                .map(|status| status.upstream_url)
                .unwrap_or_default();
            match undone {
                Ok(()) => {
                    running.phase.send_replace(Phase::RolledBack);
                    report.outcome = Outcome::RolledBack { reason };
                }
                Err(Some(why)) if !commit_sent => {
                    // Not switched, for certain; the gateways' lapsed holds
                    // unfence the old plane once it answers.
                    running.phase.send_replace(Phase::RolledBack);
                    report.outcome = Outcome::RolledBack {
                        reason: format!(
                            "{reason}; the old plane could not be unfenced yet ({why}): the gateways unfence it when it answers, as their holds lapse"
                        ),
                    };
                }
                Err(None) => {
                    running.phase.send_replace(Phase::Switched);
                    report.upstream_url = running.target_description.control_plane_url.clone();
                }
                Err(Some(why)) => {
                    running.phase.send_replace(Phase::Failed);
                    report.outcome = Outcome::Undecided {
                        reason: format!(
                            "{reason}; and the rollback could not be made: {why}. The old plane's fence record decides: the gateways settle from it by themselves (within --max-pause of their holds), and `ferry migrate status --source-agent ... --gateway ...` shows it"
                        ),
                    };
                }
            }
        }
    }
    let state = running.state.borrow().clone();
    if let Some(start) = &state.start {
        report.stream_id = start.stream_id.clone();
        report.snapshot_position = start.snapshot_position;
    }
    report.snapshot_ops = state.snapshot_through_seq.unwrap_or(0);
    report.ops_moved = state.applied_seq;
    report.reconnects = state.reconnects;
    report.elapsed_ms = ms(running.started.elapsed());
    report.lag = running
        .lag
        .lock()
        .map(|samples| samples.clone())
        .unwrap_or_default();
    Ok(report)
}

/// Cutover step 7: the digest of the old plane at the fenced position and
/// the new plane's now (writes are held, the target has applied through the
/// fence) must agree, within `budget`. Returns the keys compared.
async fn verify(
    running: &mut Running,
    key_prefix: &[u8],
    fenced_position: u64,
    budget: Duration,
) -> Result<u64, String> {
    let mut source = running.source.clone();
    let old = source.digest(DigestRequest {
        key_prefix: key_prefix.to_vec().into(),
        position: fenced_position,
    });
    let (old, new) = beside_the_new_plane_digest(running, key_prefix, budget, old).await?;
    let old = old
        .map_err(|status| {
            format!(
                "the source agent could not digest the old plane at {fenced_position}: {}",
                status_text(&status)
            )
        })?
        .into_inner();
    if (old.keys, old.bytes, &old.sha256) != (new.keys, new.bytes, &new.sha256) {
        return Err(format!(
            "the digest check failed: the old plane at position {fenced_position} holds {} keys ({} bytes, sha256 {}), the new plane {} keys ({} bytes, sha256 {}); nothing was switched",
            old.keys,
            old.bytes,
            hex::encode(&old.sha256),
            new.keys,
            new.bytes,
            hex::encode(&new.sha256)
        ));
    }
    info!(keys = old.keys, sha256 = %hex::encode(&old.sha256), "the planes' digests agree");
    Ok(old.keys)
}

/// Runs `old` (the old plane's side of the check) beside the target agent's
/// digest of the new plane, both within `budget`.
async fn beside_the_new_plane_digest<T>(
    running: &mut Running,
    key_prefix: &[u8],
    budget: Duration,
    old: impl std::future::Future<Output = T>,
) -> Result<(T, DigestResponse), String> {
    let new = running.target.digest(DigestRequest {
        key_prefix: key_prefix.to_vec().into(),
        position: 0,
    });
    let (old, new) = tokio::time::timeout(budget, async { tokio::join!(old, new) })
        .await
        .map_err(|_| {
            format!(
                "the digest check did not finish within what --max-pause left ({budget:?}): raise --max-pause or migrate without --verify"
            )
        })?;
    let new = new
        .map_err(|status| {
            format!(
                "the target agent could not digest the new plane: {}",
                status_text(&status)
            )
        })?
        .into_inner();
    Ok((old, new))
}

/// Step 7 through a version chain: the new plane holds the chain's image of
/// the old plane at F. The old plane is read again through the chain and
/// summed up whatever order its image comes in; the new plane's digest is
/// its order-independent one.
async fn verify_through_chain(
    running: &mut Running,
    chain: Chain,
    key_prefix: &[u8],
    fenced_position: u64,
    budget: Duration,
) -> Result<u64, String> {
    let mut source = running.source.clone();
    let image = versions::image_digest(&mut source, chain, key_prefix, running.epoch);
    let (image, new) = beside_the_new_plane_digest(running, key_prefix, budget, image).await?;
    let (position, image) = image.map_err(|error| {
        format!("the version chain's image of the old plane could not be digested: {error}; nothing was switched")
    })?;
    if position != fenced_position {
        return Err(format!(
            "the old plane moved past its fence: it was read at position {position}, fenced at {fenced_position}; nothing was switched"
        ));
    }
    if new.set_sha256.is_empty() {
        return Err("the target agent gives no order-independent digest (it is older than this ferry), which --verify through --migrations compares: upgrade it, or migrate without --verify; nothing was switched".to_owned());
    }
    let image_sum = image.sum();
    if (image.keys, image.bytes, &image_sum[..]) != (new.keys, new.bytes, &new.set_sha256[..]) {
        return Err(format!(
            "the digest check failed: the version chain's image of the old plane at position {fenced_position} holds {} keys ({} bytes, set sha256 {}), the new plane {} keys ({} bytes, set sha256 {}); nothing was switched",
            image.keys,
            image.bytes,
            hex::encode(image_sum),
            new.keys,
            new.bytes,
            hex::encode(&new.set_sha256)
        ));
    }
    info!(keys = image.keys, set_sha256 = %hex::encode(image_sum), "the new plane holds the chain's image of the old one");
    Ok(image.keys)
}

/// Test hook of the fault tests (`tests/tests/cutover_faults.rs`), off
/// unless `FERRY_TEST_PAUSE_AT_PHASE` names `point`: stops the migration
/// there, so that a test can kill or stop a process in a phase that lasts
/// milliseconds. The points are `following`, `holding`, `fencing`,
/// `draining`, `verifying` and `switching`, each right after the migration
/// enters that phase, then `committed` (the switch committed in the old
/// plane, no gateway switched yet) and `releasing` (the gateways switched,
/// none released yet). There it writes the point's name to the file
/// `FERRY_TEST_PAUSE_FILE` names and waits while that file exists, or
/// forever without one. Both variables are read once. Never set them in
/// production: a held gateway's pause runs on while the migration waits.
async fn test_pause_point(point: &str) {
    static PAUSE_AT: std::sync::OnceLock<Option<(String, Option<PathBuf>)>> =
        std::sync::OnceLock::new();
    let pause_at = PAUSE_AT.get_or_init(|| {
        let point = std::env::var("FERRY_TEST_PAUSE_AT_PHASE").ok()?;
        let file = std::env::var_os("FERRY_TEST_PAUSE_FILE").map(PathBuf::from);
        Some((point, file))
    });
    let Some((pause_at, file)) = pause_at else {
        return;
    };
    if pause_at != point {
        return;
    }
    warn!(
        point,
        "test hook FERRY_TEST_PAUSE_AT_PHASE: the migration waits here"
    );
    let Some(file) = file else {
        return std::future::pending().await;
    };
    if let Err(error) = tokio::fs::write(file, point).await {
        warn!(%error, file = %file.display(), "test hook: cannot write the pause file; going on");
        return;
    }
    while tokio::fs::try_exists(file).await.unwrap_or(false) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    info!(point, "test hook: the migration goes on");
}

/// The least time an agent call of the cutover gets, even when the pause
/// budget is spent.
const AGENT_CALL_FLOOR: Duration = Duration::from_millis(500);

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Samples the lag and writes the status file until the migration ends.
async fn monitor(
    mut state: watch::Receiver<RelayState>,
    mut phase: watch::Receiver<Phase>,
    epoch: u64,
    started: Instant,
    samples: Arc<std::sync::Mutex<Vec<LagSample>>>,
    status_file: Option<PathBuf>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let ended = tokio::select! {
            _ = tick.tick() => false,
            changed = phase.changed() => changed.is_err(),
        };
        let now = state.borrow_and_update().clone();
        let current = *phase.borrow();
        let sample = LagSample {
            at_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            positions: now.lag_positions(),
            ops: now.sent_seq.saturating_sub(now.applied_seq),
        };
        if let Ok(mut samples) = samples.lock() {
            // One sample a second is plenty for a long migration; keep the
            // list bounded.
            let keep = samples.last().is_none_or(|last| {
                sample.at_ms >= last.at_ms + 1000
                    || matches!(current, Phase::Holding | Phase::Fencing | Phase::Draining)
            });
            if keep && samples.len() < 100_000 {
                samples.push(sample);
            }
        }
        if let Some(path) = &status_file {
            let status = MigrationStatus {
                phase: current,
                epoch,
                stream_id: now
                    .start
                    .as_ref()
                    .map(|start| start.stream_id.clone())
                    .unwrap_or_default(),
                snapshot_position: now
                    .start
                    .as_ref()
                    .map_or(0, |start| start.snapshot_position),
                sent_through_seq: now.sent_seq,
                applied_through_seq: now.applied_seq,
                head_position: now.head_position,
                lag_positions: sample.positions,
                lag_ops: sample.ops,
                reconnects: now.reconnects,
                broken: now.broken.clone(),
                updated_at: time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            };
            if let Err(error) = write_status(path, &status) {
                warn!(path = %path.display(), %error, "cannot write the migration status");
            }
        }
        if ended || matches!(current, Phase::Switched | Phase::RolledBack | Phase::Failed) {
            return;
        }
    }
}

/// Writes the status atomically: a reader never sees half of it.
fn write_status(path: &std::path::Path, status: &MigrationStatus) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let text = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

/// Reads what a running (or the last) migration wrote.
pub fn read_status(path: &std::path::Path) -> std::io::Result<MigrationStatus> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text).map_err(std::io::Error::other)
}

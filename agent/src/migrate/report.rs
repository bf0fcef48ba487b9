//! What a live migration (`ferry migrate --live`) tells: the phase it is
//! in, the status file `ferry migrate status` reads, the lag over time, and
//! the report of how the cutover ended.

use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    /// first, before anything was written (see
    /// [`versions::precheck`](super::versions::precheck)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_checked_ops: Option<u64>,
    /// With `--verify`: the keys both planes hold, found the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_keys: Option<u64>,
    /// With `--verify`: how long the comparison took (within the pause).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_ms: Option<f64>,
}

pub(super) fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

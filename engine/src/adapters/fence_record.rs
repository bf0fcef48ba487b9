//! ferry's fence record in the old plane of a live migration, whatever the
//! platform: the record, and the one state machine that moves it
//! ([`decide`]), shared by every adapter and the gateways, so that no
//! process can decide a cutover differently. Where the record lives and how
//! the plane refuses writes is each adapter's (etcd: `etcd/fence.rs`;
//! PostgreSQL: `postgres/fence.rs`).
//!
//! ```text
//! (none) / unfenced(e) --fence(E >= e)--> fenced(E, successor)
//! fenced(E)            --commit(E)------> switched(E, successor)   (final)
//! fenced(E)            --unfence(E)-----> unfenced(E)
//! ```
//!
//! Positions are the plane's own (an etcd revision, a PostgreSQL LSN); the
//! field names say revision for the records etcd already holds.

pub use crate::adapters::live::FenceMove as Move;
use crate::adapters::live::{FenceState, Position};

/// ferry's fence record in an old plane (etcd keeps it as JSON under
/// `__ferry__/fence`, PostgreSQL as JSON in `ferry.fence`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fence {
    /// The migration attempt that wrote it.
    pub epoch: u64,
    /// True from the fence on, until an unfence (never after a switch).
    pub fenced: bool,
    /// The plane that takes over (`etcd://HOST:PORT`), named by the fence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successor: Option<String>,
    /// The migration committed: the successor serves, this plane never
    /// takes a write again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub switched: bool,
    /// What a gateway adds to the successor's revisions so that its clients
    /// never see a revision go backwards (set by the commit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub successor_revision_offset: i64,
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

/// The record as stored, with where it stands in its plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFence {
    /// The record.
    pub fence: Fence,
    /// Its mod revision: the compare of the next move.
    pub mod_revision: i64,
    /// The fenced position F (the guard key's create revision) while the
    /// plane is fenced: every write the plane acknowledged before the fence
    /// is at a lower revision.
    pub fenced_revision: Option<i64>,
}

impl StoredFence {
    /// Whether the migration switched away from this plane.
    pub fn switched(&self) -> bool {
        self.fence.switched
    }

    /// Whether a migration fenced this plane and has not decided yet.
    pub fn in_doubt(&self) -> bool {
        self.fence.fenced && !self.fence.switched
    }
}

/// The record as stored (`None`: no migration ever fenced the plane), and
/// the epochs of ferry's write alarms raised on the plane, in the live
/// contract's words: what a live source's `fence_state` answers, and what a
/// gateway reads (with no alarms: it reads the record alone).
pub fn fence_state(stored: Option<&StoredFence>, guard_epochs: Vec<u64>) -> FenceState {
    let Some(stored) = stored else {
        return FenceState {
            guard_epochs,
            ..FenceState::default()
        };
    };
    FenceState {
        recorded: true,
        epoch: stored.fence.epoch,
        fenced: stored.fence.fenced,
        switched: stored.fence.switched,
        successor_url: stored.fence.successor.clone().unwrap_or_default(),
        fenced_position: Position(stored.fenced_revision.unwrap_or(0).max(0) as u64),
        successor_position_offset: stored.fence.successor_revision_offset,
        guard_epochs,
    }
}

/// What to do with the record: write `next`, answer at once (the move was
/// done already), or refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write this record.
    Write(Fence),
    /// Nothing to write: the move is done, with this revision.
    AlreadyDone(i64),
    /// The record forbids the move.
    Refuse(String),
}

/// Decides a move against the record as stored: the state machine of the
/// module's documentation, in one place.
pub fn decide(stored: Option<&StoredFence>, wanted: &Move) -> Decision {
    let record = stored.map(|stored| &stored.fence);
    let stored_epoch = record.map_or(0, |fence| fence.epoch);
    let switched_away = |fence: &Fence| {
        format!(
            "migration epoch {} switched this plane's clients to {} already; this plane is fenced for good",
            fence.epoch,
            fence.successor.as_deref().unwrap_or("its successor")
        )
    };
    match wanted {
        Move::Fence { epoch, successor } => match record {
            Some(fence) if fence.switched => Decision::Refuse(switched_away(fence)),
            Some(fence) if fence.epoch > *epoch => Decision::Refuse(format!(
                "epoch {epoch} is lower than epoch {} of the fence stored here: a later migration attempt owns the plane",
                fence.epoch
            )),
            Some(fence) if fence.epoch == *epoch && fence.fenced => {
                match stored.and_then(|stored| stored.fenced_revision) {
                    Some(revision) => Decision::AlreadyDone(revision),
                    None => Decision::Write(fence.clone()),
                }
            }
            _ => Decision::Write(Fence {
                epoch: *epoch,
                fenced: true,
                successor: Some(successor.clone()),
                switched: false,
                successor_revision_offset: 0,
            }),
        },
        Move::Commit {
            epoch,
            successor_position_offset: successor_revision_offset,
        } => match record {
            Some(fence) if fence.switched && fence.epoch == *epoch => {
                Decision::AlreadyDone(stored.and_then(|s| s.fenced_revision).unwrap_or(0))
            }
            Some(fence) if fence.switched => Decision::Refuse(switched_away(fence)),
            Some(fence) if fence.epoch == *epoch && fence.fenced => Decision::Write(Fence {
                switched: true,
                successor_revision_offset: *successor_revision_offset,
                ..fence.clone()
            }),
            _ => Decision::Refuse(format!(
                "the plane is not fenced by epoch {epoch} (the fence record says {}): the cutover was rolled back, by a gateway whose hold lapsed or by `ferry migrate abort`",
                describe(record)
            )),
        },
        Move::Unfence { epoch } => match record {
            Some(fence) if fence.switched => Decision::Refuse(format!(
                "{}; it cannot be rolled back",
                switched_away(fence)
            )),
            Some(fence) if fence.epoch > *epoch => Decision::Refuse(format!(
                "epoch {epoch} is lower than epoch {} of the fence stored here: a later migration attempt owns the plane",
                fence.epoch
            )),
            Some(fence) if !fence.fenced => {
                Decision::AlreadyDone(stored.map_or(0, |s| s.mod_revision))
            }
            None => Decision::AlreadyDone(0),
            Some(_) => Decision::Write(Fence {
                epoch: (*epoch).max(stored_epoch),
                fenced: false,
                successor: None,
                switched: false,
                successor_revision_offset: 0,
            }),
        },
    }
}

/// The record in a few words, for messages.
pub fn describe(record: Option<&Fence>) -> String {
    match record {
        None => "no fence".to_owned(),
        Some(fence) if fence.switched => format!(
            "switched to {} by epoch {}",
            fence.successor.as_deref().unwrap_or("?"),
            fence.epoch
        ),
        Some(fence) if fence.fenced => format!(
            "fenced by epoch {}, switching to {}, not switched",
            fence.epoch,
            fence.successor.as_deref().unwrap_or("?")
        ),
        Some(fence) => format!("not fenced (last epoch {})", fence.epoch),
    }
}

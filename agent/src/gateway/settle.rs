//! How a gateway finds the plane that serves, from the fence records the
//! planes keep (read through [`UpstreamPlane::fence_record`], in the live
//! contract's words), without a driver to tell it: at start, when a hold
//! lapses, and when the old plane refuses a write because it is fenced.
//!
//! - A record that says **switched** is followed to its successor (and on,
//!   through as many migrations as were made), with the successor's
//!   position offset.
//! - A record **in doubt** (fenced, not switched) met by a hold that lapsed
//!   is settled by unfencing: the same compare-and-swap as the driver's
//!   commit, so exactly one of them wins, and the loser sees the outcome.
//! - At start, a record in doubt makes the gateway hold writes as a Hold
//!   would, for the default pause; then it settles the same way.

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::adapters::live::{FenceAnswer, FenceMove, FenceState};
use tracing::{info, warn};

use super::gate::HoldId;
use super::upstream::{UpstreamPlane, describe_record, in_doubt, successor};
use super::{GatewayError, SETTLE_BOUND, Shared};

/// The most migrations a gateway follows from the plane it was started
/// with: more means records that point in a circle.
const MAX_FOLLOWED: usize = 64;

/// How long a settle attempt waits before trying again when the old plane
/// does not answer.
const SETTLE_RETRY: Duration = Duration::from_millis(500);

/// How often a gateway reads its upstream's fence record by itself, to
/// follow a switch that no driver told it of (a replica the migration did
/// not know): its reads come from the plane that serves within about this.
const RECORD_LOOK_EVERY: Duration = Duration::from_secs(2);

/// What a gateway found after the upstream refused a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFence {
    /// The migration switched: the gateway now forwards to the successor.
    Followed,
    /// Fenced by a migration that has not decided.
    Undecided,
    /// The record says the plane is not fenced.
    NotFenced,
}

/// Connects to the plane `record` says took over from `from`.
async fn connect_successor<U: UpstreamPlane>(
    from: &U,
    record: &FenceState,
    access: &U::Access,
    connect_timeout: Duration,
) -> Result<U, GatewayError> {
    let Some(url) = successor(record) else {
        return Err(GatewayError::Unreachable {
            url: from.url().to_owned(),
            reason: format!(
                "its fence record says {} but names no successor; point --upstream at the plane that serves now",
                describe_record(record)
            ),
            kind: U::KIND,
        });
    };
    let mut next = U::connect(url, access, connect_timeout).await?;
    next.set_position_offset(record.successor_position_offset);
    next.adopt_plane_offset(connect_timeout).await?;
    info!(from = %from.url(), to = %next.url(), epoch = record.epoch, position_offset = next.position_offset(), "following the fence record to the plane that took over");
    Ok(next)
}

/// Where a gateway started with `first` must send its clients: `first`, or
/// the plane its fence records lead to; and the epoch of a migration that
/// has fenced that plane and not decided yet.
pub(crate) async fn serving_plane<U: UpstreamPlane>(
    first: U,
    access: &U::Access,
    connect_timeout: Duration,
) -> Result<(U, Option<u64>), GatewayError> {
    let mut upstream = first;
    upstream.adopt_plane_offset(connect_timeout).await?;
    for _ in 0..MAX_FOLLOWED {
        let record = upstream
            .fence_record(connect_timeout)
            .await
            .map_err(|reason| GatewayError::Unreachable {
                url: upstream.url().to_owned(),
                reason,
                kind: U::KIND,
            })?;
        if record.switched {
            upstream = connect_successor(&upstream, &record, access, connect_timeout).await?;
        } else if in_doubt(&record) {
            warn!(upstream = %upstream.url(), record = %describe_record(&record), "the upstream is fenced by a migration that has not switched: writes are held until it decides");
            return Ok((upstream, Some(record.epoch)));
        } else {
            return Ok((upstream, None));
        }
    }
    Err(GatewayError::Unreachable {
        url: upstream.url().to_owned(),
        reason: format!("its fence records lead through more than {MAX_FOLLOWED} migrations"),
        kind: U::KIND,
    })
}

impl<U: UpstreamPlane> Shared<U> {
    /// Settles the hold `id`, which lapsed (its driver went away, or its
    /// pause ran out) before Release: from the current upstream's fence
    /// record, the held writes go on to the plane that serves. Tries until
    /// it settles or someone else lifts the hold; while it cannot (the old
    /// plane unreachable), writes stay held, then refused once the pause
    /// and the settle bound have passed.
    pub(crate) async fn settle_lapsed_hold(self: Arc<Self>, id: HoldId, why: &str) {
        loop {
            {
                let _one_at_a_time = self.switching.lock().await;
                if !self.gate.is_held_by(id) {
                    self.set_settling(String::new());
                    return;
                }
                warn!(
                    epoch = id.epoch,
                    why, "the hold lapsed before Release: settling it from the fence record"
                );
                match self.settle_once(id.epoch).await {
                    Ok(outcome) => {
                        let released = self.gate.release(id.epoch);
                        info!(epoch = id.epoch, %outcome, released = ?released, "lapsed hold settled");
                        self.set_settling(String::new());
                        return;
                    }
                    Err(reason) => {
                        warn!(epoch = id.epoch, %reason, "cannot settle the lapsed hold yet; writes stay held");
                        self.set_settling(format!(
                            "the hold of epoch {} lapsed ({why}) and cannot be settled yet: {reason}",
                            id.epoch
                        ));
                    }
                }
            }
            tokio::time::sleep(SETTLE_RETRY).await;
        }
    }

    /// One look at the record: follow a switch, or unfence a migration in
    /// doubt. Says what it did.
    async fn settle_once(&self, held_for: u64) -> Result<String, String> {
        for _ in 0..MAX_FOLLOWED {
            let upstream = self.upstream.borrow().clone();
            let record = upstream.fence_record(self.connect_timeout).await?;
            if record.switched {
                self.follow(&upstream, &record).await?;
            } else if in_doubt(&record) {
                let unfence = FenceMove::Unfence {
                    epoch: record.epoch,
                };
                match upstream.move_fence(&unfence, self.connect_timeout).await? {
                    FenceAnswer::Done(_) => {
                        return Ok(format!(
                            "unfenced {} (epoch {} never switched); writes go on there",
                            upstream.url(),
                            record.epoch
                        ));
                    }
                    // Switched meanwhile: the next look follows it.
                    FenceAnswer::Refused(_) => {}
                }
            } else {
                // Not fenced: the migration of the hold may still have
                // raised its store-level guard before it died (its own
                // fence then finds the guard gone and refuses); the
                // unfence lowers it.
                upstream
                    .move_fence(
                        &FenceMove::Unfence { epoch: held_for },
                        self.connect_timeout,
                    )
                    .await?;
                return Ok(format!("{} serves", upstream.url()));
            }
        }
        Err(format!(
            "the fence records lead through more than {MAX_FOLLOWED} migrations"
        ))
    }

    /// Follows, by itself, a switch committed in the upstream's fence record
    /// that no driver told this gateway of (a replica the migration did not
    /// know, whose writes would meet the fence but whose reads would go on
    /// coming from the retired plane). Runs until the gateway stops; looks
    /// every [`RECORD_LOOK_EVERY`], never while a hold is in force (the
    /// driver, or the lapse, decides then).
    pub(crate) async fn follow_committed_switches(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RECORD_LOOK_EVERY).await;
            if self.gate.snapshot().holding {
                continue;
            }
            let upstream = self.upstream.borrow().clone();
            let record = match upstream.fence_record(self.connect_timeout).await {
                Ok(record) if record.switched => record,
                Ok(_) => continue,
                Err(reason) => {
                    tracing::debug!(%reason, "cannot read the upstream's fence record now");
                    continue;
                }
            };
            let _one_at_a_time = self.switching.lock().await;
            match self.follow(&upstream, &record).await {
                Ok(()) => info!(
                    from = %upstream.url(),
                    record = %describe_record(&record),
                    "the upstream's fence record says a migration switched away from it: following"
                ),
                Err(reason) => {
                    warn!(%reason, "cannot follow the switch the upstream's record names yet")
                }
            }
        }
    }

    /// Points the gateway at the successor `record` names, if `from` is
    /// still the upstream. Streams opened on `from` end (the kind's client
    /// server ends them).
    async fn follow(&self, from: &Arc<U>, record: &FenceState) -> Result<(), String> {
        let next = connect_successor(from.as_ref(), record, &self.access, self.connect_timeout)
            .await
            .map_err(|error| error.to_string())?;
        self.upstream.send_if_modified(|current| {
            if Arc::ptr_eq(current, from) {
                *current = Arc::new(next);
                true
            } else {
                false
            }
        });
        Ok(())
    }

    /// The old plane refused a write because it is fenced: if the record
    /// says the migration switched, follow it (once) and say so; otherwise
    /// the cutover is undecided and the write must wait for it.
    pub(crate) async fn follow_after_fenced_write(
        self: &Arc<Self>,
        refused_by: &Arc<U>,
    ) -> Result<AfterFence, String> {
        let in_doubt = {
            let _one_at_a_time = self.switching.lock().await;
            if !Arc::ptr_eq(&self.upstream.borrow(), refused_by) {
                // Someone moved the gateway on meanwhile.
                return Ok(AfterFence::Followed);
            }
            let record = refused_by.fence_record(self.connect_timeout).await?;
            if record.switched {
                self.follow(refused_by, &record).await?;
                return Ok(AfterFence::Followed);
            }
            if !in_doubt(&record) {
                return Ok(AfterFence::NotFenced);
            }
            record.epoch
        };
        warn!(upstream = %refused_by.url(), epoch = in_doubt, "a write met the fence of a migration that is undecided and does not hold this gateway: holding writes until it decides");
        self.hold_until_decided(
            in_doubt,
            "a write met the fence of an undecided migration that did not hold this gateway",
        )
        .await;
        Ok(AfterFence::Undecided)
    }

    /// A migration fenced the upstream and has not decided, and nothing
    /// holds this gateway for it (it started then, or its driver did not
    /// know it, or held and released it while the old plane hung): hold
    /// writes as a Hold of that epoch would, for the default pause, then
    /// settle as a lapsed hold does. Does nothing while writes are held.
    pub(crate) async fn hold_until_decided(self: &Arc<Self>, epoch: u64, why: &'static str) {
        if self.gate.snapshot().holding {
            return;
        }
        let pause = self.default_max_pause;
        // Not waiting for the writes in flight: the one that met the fence
        // may be among them.
        let Ok((_, id)) = self.gate.begin_hold(epoch, pause + SETTLE_BOUND) else {
            // A newer epoch owns the gateway: its driver decides.
            return;
        };
        let settling = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            settling.settle_lapsed_hold(id, why).await;
        });
    }

    fn set_settling(&self, note: String) {
        if let Ok(mut slot) = self.settling.lock() {
            *slot = note;
        }
    }
}

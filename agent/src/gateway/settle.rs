//! How a gateway finds the plane that serves, from the fence records the
//! planes keep (`ferry_engine::adapters::etcd`'s fence module), without a
//! driver to tell it: at start, when a hold lapses, and when the old plane
//! refuses a write because it is fenced.
//!
//! - A record that says **switched** is followed to its successor (and on,
//!   through as many migrations as were made), with the successor's
//!   revision offset.
//! - A record **in doubt** (fenced, not switched) met by a hold that lapsed
//!   is settled by unfencing: the same compare-and-swap as the driver's
//!   commit, so exactly one of them wins, and the loser sees the outcome.
//! - At start, a record in doubt makes the gateway hold writes as a Hold
//!   would, for the default pause; then it settles the same way.

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::adapters::etcd::{
    FenceMove, FenceOutcome, REVISION_OFFSET_KEY, RevisionOffset, StoredFence, describe_fence,
};
use ferry_proto::etcd::etcdserverpb::RangeRequest;
use tonic::Status;
use tracing::{info, warn};

use super::gate::HoldId;
use super::upstream::{Upstream, UpstreamAccess};
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

/// Reads the revision offset `upstream`'s plane keeps for itself (written
/// there just before the switch to it was committed) into `upstream`: a
/// gateway started in front of a plane that took over shows its clients
/// the same revisions as the gateways that followed the switch.
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

pub(crate) async fn adopt_plane_offset(
    upstream: &mut Upstream,
    timeout: Duration,
) -> Result<(), GatewayError> {
    let unreachable = |reason: String| GatewayError::Unreachable {
        url: upstream.url.clone(),
        reason,
    };
    let client = upstream.kv.clone();
    let read = upstream.call(
        tonic::Request::new(RangeRequest {
            key: REVISION_OFFSET_KEY.to_vec(),
            ..RangeRequest::default()
        }),
        |request| {
            let mut client = client.clone();
            async move { client.range(request).await }
        },
    );
    let stored = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
        .map_err(|status| {
            unreachable(format!(
                "cannot read its revision offset: {}",
                status.message()
            ))
        })?
        .into_inner()
        .kvs
        .into_iter()
        .next();
    if let Some(kv) = stored {
        let offset: RevisionOffset = serde_json::from_slice(&kv.value).map_err(|error| {
            unreachable(format!(
                "its {} does not parse ({error})",
                String::from_utf8_lossy(REVISION_OFFSET_KEY)
            ))
        })?;
        upstream.revision_offset = offset.revision_offset;
    }
    Ok(())
}

/// Connects to the plane `stored` says took over from `from`.
async fn successor(
    from: &Upstream,
    stored: &StoredFence,
    access: &UpstreamAccess,
    connect_timeout: Duration,
) -> Result<Upstream, GatewayError> {
    let Some(url) = stored.fence.successor.as_deref() else {
        return Err(GatewayError::Unreachable {
            url: from.url.clone(),
            reason: format!(
                "its fence record says {} but names no successor; point --upstream at the plane that serves now",
                describe_fence(Some(&stored.fence))
            ),
        });
    };
    let mut next = Upstream::connect(url, access, connect_timeout).await?;
    next.revision_offset = stored.fence.successor_revision_offset;
    adopt_plane_offset(&mut next, connect_timeout).await?;
    info!(from = %from.url, to = %next.url, epoch = stored.fence.epoch, revision_offset = next.revision_offset, "following the fence record to the plane that took over");
    Ok(next)
}

/// Where a gateway started with `first` must send its clients: `first`, or
/// the plane its fence records lead to; and the epoch of a migration that
/// has fenced that plane and not decided yet.
pub(crate) async fn serving_plane(
    first: Upstream,
    access: &UpstreamAccess,
    connect_timeout: Duration,
) -> Result<(Upstream, Option<u64>), GatewayError> {
    let mut upstream = first;
    adopt_plane_offset(&mut upstream, connect_timeout).await?;
    for _ in 0..MAX_FOLLOWED {
        let stored = upstream
            .read_fence(connect_timeout)
            .await
            .map_err(|reason| GatewayError::Unreachable {
                url: upstream.url.clone(),
                reason,
            })?;
        match stored {
            Some(stored) if stored.switched() => {
                upstream = successor(&upstream, &stored, access, connect_timeout).await?;
            }
            Some(stored) if stored.in_doubt() => {
                warn!(upstream = %upstream.url, record = %describe_fence(Some(&stored.fence)), "the upstream is fenced by a migration that has not switched: writes are held until it decides");
                return Ok((upstream, Some(stored.fence.epoch)));
            }
            _ => return Ok((upstream, None)),
        }
    }
    Err(GatewayError::Unreachable {
        url: upstream.url.clone(),
        reason: format!("its fence records lead through more than {MAX_FOLLOWED} migrations"),
    })
}

impl Shared {
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
            let stored = upstream.read_fence(self.connect_timeout).await?;
            match stored {
                Some(stored) if stored.switched() => {
                    self.follow(&upstream, &stored).await?;
                }
                Some(stored) if stored.in_doubt() => {
                    match upstream
                        .move_fence(
                            &FenceMove::Unfence {
                                epoch: stored.fence.epoch,
                            },
                            self.connect_timeout,
                        )
                        .await?
                    {
                        FenceOutcome::Done { .. } => {
                            return Ok(format!(
                                "unfenced {} (epoch {} never switched); writes go on there",
                                upstream.url, stored.fence.epoch
                            ));
                        }
                        // Switched meanwhile: the next look follows it.
                        FenceOutcome::Refused { .. } => {}
                    }
                }
                _ => {
                    // Not fenced: the migration of the hold may still have
                    // raised its write alarm before it died (its own fence
                    // finds the alarm gone and refuses, see the engine's
                    // fence module).
                    upstream
                        .move_fence(
                            &FenceMove::Unfence { epoch: held_for },
                            self.connect_timeout,
                        )
                        .await?;
                    return Ok(format!("{} serves", upstream.url));
                }
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
            let stored = match upstream.read_fence(self.connect_timeout).await {
                Ok(Some(stored)) if stored.switched() => stored,
                Ok(_) => continue,
                Err(reason) => {
                    tracing::debug!(%reason, "cannot read the upstream's fence record now");
                    continue;
                }
            };
            let _one_at_a_time = self.switching.lock().await;
            match self.follow(&upstream, &stored).await {
                Ok(()) => info!(
                    from = %upstream.url,
                    record = %describe_fence(Some(&stored.fence)),
                    "the upstream's fence record says a migration switched away from it: following"
                ),
                Err(reason) => {
                    warn!(%reason, "cannot follow the switch the upstream's record names yet")
                }
            }
        }
    }

    /// Points the gateway at the successor `stored` names, if `from` is
    /// still the upstream. Streams opened on `from` end (see the proxy).
    async fn follow(&self, from: &Arc<Upstream>, stored: &StoredFence) -> Result<(), String> {
        let next = successor(from, stored, &self.access, self.connect_timeout)
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
        refused_by: &Arc<Upstream>,
    ) -> Result<AfterFence, String> {
        let in_doubt = {
            let _one_at_a_time = self.switching.lock().await;
            if !Arc::ptr_eq(&self.upstream.borrow(), refused_by) {
                // Someone moved the gateway on meanwhile.
                return Ok(AfterFence::Followed);
            }
            match refused_by.read_fence(self.connect_timeout).await? {
                Some(stored) if stored.switched() => {
                    self.follow(refused_by, &stored).await?;
                    return Ok(AfterFence::Followed);
                }
                Some(stored) if stored.in_doubt() => stored.fence.epoch,
                _ => return Ok(AfterFence::NotFenced),
            }
        };
        warn!(upstream = %refused_by.url, epoch = in_doubt, "a write met the fence of a migration that is undecided and does not hold this gateway: holding writes until it decides");
        self.hold_until_decided(
            in_doubt,
            "a write met the fence of an undecided migration that did not hold this gateway",
        )
        .await;
        Ok(AfterFence::Undecided)
    }

    /// What a client is told when the upstream refused a write for lack of
    /// space and its fence record says it is not fenced: a migration that
    /// raised ferry's write alarm and has not fenced yet (or died between
    /// the two), or a database that is full.
    pub(crate) async fn no_space_refusal(&self, upstream: &Upstream, refusal: Status) -> Status {
        match upstream.fence_alarms(self.connect_timeout).await {
            Ok(epochs) if !epochs.is_empty() => Status::unavailable(format!(
                "{} refuses writes: live migration epoch {} raised ferry's write alarm and has not fenced the plane yet; retry. If no migration is running, `ferry migrate abort` lowers it",
                upstream.url,
                epochs.iter().max().unwrap_or(&0)
            )),
            _ => refusal,
        }
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

//! The write gate: which writes go to the upstream now, which wait, and in
//! what order the waiting ones go when the hold is lifted.
//!
//! - Open (no hold, nobody queued): a write takes a [`WritePermit`] at once
//!   and counts as in flight until the upstream answers it.
//! - Holding: a write gets a ticket (a place in line) and waits as a
//!   [`HeldWrite`]. [`Gate::hold`] returns once every write in flight that
//!   a fence does not refuse (lease grants and revokes, compactions: see
//!   [`Gate::admit_write`]) has been answered. A fenced write in flight
//!   (a Put, DeleteRange or Txn: [`Gate::admit_fenced_write`]) need not be
//!   waited for: the old plane either applied it before the fence, or
//!   refuses it, and then the gateway queues it again to go on after the
//!   release.
//! - Released: the queued writes go one at a time, in ticket order, each
//!   after the one before it was answered, so they take effect in the order
//!   they arrived; new writes queue behind them until the line is empty.
//! - A hold that outlives its `max_pause` (counted from the hold) answers
//!   its waiting writes, and every new one, with a [`GateRefusal`] until it
//!   is released: the gateway never lets a write through to an upstream
//!   that may be fenced.
//!
//! All of it is one state behind a [`watch`] channel: a change that a
//! waiter may care about wakes the waiters, who look again.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Which hold: its epoch and when it began (a repeated Hold by the same
/// epoch keeps the first one's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldId {
    /// The migration attempt holding.
    pub epoch: u64,
    /// When the hold began.
    pub started: Instant,
}

/// The hold in force.
#[derive(Debug, Clone, Copy)]
struct Hold {
    /// The migration attempt that holds.
    epoch: u64,
    started: Instant,
    /// After this, held and new writes are refused until the release.
    deadline: Instant,
}

#[derive(Debug, Default)]
struct GateState {
    /// The highest epoch seen by Hold, Switch or Release.
    epoch: u64,
    hold: Option<Hold>,
    /// Writes sent to the upstream and not answered yet.
    in_flight: u64,
    /// Of those, the ones a fenced plane does not refuse.
    in_flight_unfenced: u64,
    /// The ticket the next queued write gets.
    next_ticket: u64,
    /// The queued write whose turn it is (or will be, once released).
    next_to_send: u64,
    /// Tickets above `next_to_send` whose writes gave up (refused at the
    /// deadline, or their client went away) before their turn.
    abandoned: BTreeSet<u64>,
    /// Writes refused since the current hold began.
    refused_in_hold: u64,
    /// Bytes of the requests waiting in line.
    queued_bytes: u64,
}

impl GateState {
    /// Whether no write waits in line. `next_to_send` is never an
    /// abandoned ticket (see [`GateState::advance`]).
    fn line_is_empty(&self) -> bool {
        self.next_to_send == self.next_ticket
    }

    /// Writes waiting in line.
    fn queued(&self) -> u64 {
        self.next_ticket - self.next_to_send - self.abandoned.len() as u64
    }

    /// The write whose turn it was is done: the next one in line goes.
    fn advance(&mut self) {
        self.next_to_send += 1;
        while self.abandoned.remove(&self.next_to_send) {
            self.next_to_send += 1;
        }
    }

    /// The write holding `ticket` leaves the line before its turn.
    fn abandon(&mut self, ticket: u64) {
        if ticket == self.next_to_send {
            self.advance();
        } else if ticket > self.next_to_send {
            self.abandoned.insert(ticket);
        }
    }
}

/// Why the admin service's request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// A newer migration attempt has already used the gateway (G5).
    #[error(
        "epoch {given} is older than the gateway's epoch {current}: a newer migration attempt owns the gateway"
    )]
    StaleEpoch {
        /// The epoch in the request.
        given: u64,
        /// The gateway's epoch.
        current: u64,
    },
    /// Switch needs a hold first.
    #[error("writes are not held: hold them (epoch {epoch}) before switching the upstream")]
    NotHolding {
        /// The epoch in the request.
        epoch: u64,
    },
    /// Switch by an epoch other than the one holding.
    #[error(
        "epoch {given} does not hold the gateway's writes (epoch {holding} does); hold with epoch {given} first"
    )]
    HeldByOtherEpoch {
        /// The epoch in the request.
        given: u64,
        /// The epoch of the hold in force.
        holding: u64,
    },
    /// Switch while writes are still on their way to the old upstream.
    #[error(
        "{in_flight} writes are still in flight to the current upstream; wait for Hold to return before switching"
    )]
    WritesInFlight {
        /// Writes sent and not answered yet.
        in_flight: u64,
    },
    /// Hold could not drain the writes in flight within the pause allowed.
    #[error(
        "{in_flight} writes were still in flight to the upstream after the allowed pause of {max_pause:?}; writes stay held (and are refused) until Release"
    )]
    DrainTimedOut {
        /// Writes still unanswered.
        in_flight: u64,
        /// The pause allowed.
        max_pause: Duration,
    },
    /// A Release or a newer Hold ended this hold before the drain finished.
    #[error("the hold by epoch {epoch} was lifted or replaced while writes in flight drained")]
    HoldLifted {
        /// The epoch whose hold ended.
        epoch: u64,
    },
}

impl From<GateError> for tonic::Status {
    fn from(error: GateError) -> Self {
        match error {
            GateError::StaleEpoch { .. }
            | GateError::NotHolding { .. }
            | GateError::HeldByOtherEpoch { .. }
            | GateError::WritesInFlight { .. } => {
                tonic::Status::failed_precondition(error.to_string())
            }
            GateError::DrainTimedOut { .. } => tonic::Status::deadline_exceeded(error.to_string()),
            GateError::HoldLifted { .. } => tonic::Status::aborted(error.to_string()),
        }
    }
}

/// The most writes that wait in line at once; more are refused at once.
/// Each waiting write keeps its request in memory, so a hold under a heavy
/// write load must not grow without bound.
pub const MAX_QUEUED_WRITES: u64 = 100_000;

/// The most bytes of requests that wait in line at once: a write that would
/// pass it is refused at once (`UNAVAILABLE`, clients retry), not held, so
/// a hold under large writes keeps the gateway's memory bounded too.
pub const MAX_QUEUED_BYTES: u64 = 256 * 1024 * 1024;

/// A write answered `UNAVAILABLE`: the hold lasted longer than the pause
/// allowed, or too many writes wait already.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GateRefusal {
    /// The hold outlived its pause.
    #[error(
        "the control plane is being switched (migration epoch {epoch}) and writes have been held {held_ms} ms, longer than the pause allowed; retry"
    )]
    HoldRanOut {
        /// The epoch holding.
        epoch: u64,
        /// How long the hold has lasted.
        held_ms: u128,
    },
    /// The line of held writes is full.
    #[error("the control plane is being switched and {queued} writes already wait for it; retry")]
    LineFull {
        /// Writes waiting.
        queued: u64,
    },
    /// The held writes' bytes would pass [`MAX_QUEUED_BYTES`].
    #[error(
        "the control plane is being switched and {queued_bytes} bytes of writes already wait for it, so this one of {bytes} bytes is not held; retry"
    )]
    LineFullOfBytes {
        /// Bytes of the writes waiting.
        queued_bytes: u64,
        /// This write's.
        bytes: u64,
    },
}

impl From<GateRefusal> for tonic::Status {
    fn from(refusal: GateRefusal) -> Self {
        tonic::Status::unavailable(refusal.to_string())
    }
}

/// What became of a write asking to go through.
#[derive(Debug)]
pub enum Admission {
    /// Send it now.
    Pass(WritePermit),
    /// Wait for the release: [`HeldWrite::wait`].
    Held(HeldWrite),
    /// The hold ran out: answer the client `UNAVAILABLE`.
    Refused(GateRefusal),
}

/// What Release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Writes that were waiting and now go on, in order.
    pub released: u64,
    /// Writes refused during the hold because it ran out.
    pub refused: u64,
}

/// Where the gate stands, for Status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateSnapshot {
    /// The highest epoch seen.
    pub epoch: u64,
    /// Whether writes are held.
    pub holding: bool,
    /// Writes sent and not answered yet.
    pub in_flight: u64,
    /// Writes waiting in line.
    pub queued: u64,
}

/// See the module's documentation.
#[derive(Debug)]
pub struct Gate {
    state: watch::Sender<GateState>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            state: watch::Sender::new(GateState::default()),
        }
    }
}

impl Gate {
    /// Asks for a write of `bytes` (its request's encoded size) that a
    /// fenced plane does not refuse to go through (see [`Admission`]): a
    /// Hold waits until it is answered.
    pub fn admit_write(self: &Arc<Self>, bytes: u64) -> Admission {
        self.admit(bytes, false)
    }

    /// Asks for a write of `bytes` that a fenced plane refuses (Put,
    /// DeleteRange, Txn) to go through: a Hold does not wait for it.
    pub fn admit_fenced_write(self: &Arc<Self>, bytes: u64) -> Admission {
        self.admit(bytes, true)
    }

    fn admit(self: &Arc<Self>, bytes: u64, fenced: bool) -> Admission {
        let now = Instant::now();
        let mut admission = None;
        self.state.send_if_modified(|state| match state.hold {
            None if state.line_is_empty() => {
                state.in_flight += 1;
                state.in_flight_unfenced += u64::from(!fenced);
                admission = Some(Admission::Pass(WritePermit {
                    gate: self.clone(),
                    ticket: None,
                    fenced,
                }));
                false
            }
            Some(hold) if now >= hold.deadline => {
                state.refused_in_hold += 1;
                admission = Some(Admission::Refused(GateRefusal::HoldRanOut {
                    epoch: hold.epoch,
                    held_ms: now.duration_since(hold.started).as_millis(),
                }));
                false
            }
            _ if state.next_ticket - state.next_to_send >= MAX_QUEUED_WRITES => {
                state.refused_in_hold += 1;
                admission = Some(Admission::Refused(GateRefusal::LineFull {
                    queued: state.queued(),
                }));
                false
            }
            _ if state.queued_bytes + bytes > MAX_QUEUED_BYTES => {
                state.refused_in_hold += 1;
                admission = Some(Admission::Refused(GateRefusal::LineFullOfBytes {
                    queued_bytes: state.queued_bytes,
                    bytes,
                }));
                false
            }
            _ => {
                let ticket = state.next_ticket;
                state.next_ticket += 1;
                state.queued_bytes += bytes;
                admission = Some(Admission::Held(HeldWrite {
                    gate: self.clone(),
                    ticket,
                    bytes,
                    fenced,
                    settled: false,
                }));
                false
            }
        });
        admission.expect("the closure always decides")
    }

    /// Holds new writes for `epoch`, for at most `max_pause` from now (then
    /// held and new writes are refused until the release), and waits until
    /// the writes in flight have been answered. Returns how many were in
    /// flight, and which hold it is. A repeated Hold by the epoch already
    /// holding keeps the first one's deadline.
    #[cfg(test)]
    pub async fn hold(&self, epoch: u64, max_pause: Duration) -> Result<(u64, HoldId), GateError> {
        let (drained, id) = self.begin_hold(epoch, max_pause)?;
        self.drain(id).await?;
        Ok((drained, id))
    }

    /// The first half of [`Gate::hold`]: holds new writes at once and
    /// returns how many writes a fence does not refuse were in flight then,
    /// without waiting for them.
    pub fn begin_hold(&self, epoch: u64, max_pause: Duration) -> Result<(u64, HoldId), GateError> {
        let now = Instant::now();
        let mut decided = None;
        self.state.send_if_modified(|state| {
            if epoch < state.epoch {
                decided = Some(Err(GateError::StaleEpoch {
                    given: epoch,
                    current: state.epoch,
                }));
                return false;
            }
            state.epoch = epoch;
            let hold = match state.hold {
                Some(hold) if hold.epoch == epoch => hold,
                _ => {
                    let hold = Hold {
                        epoch,
                        started: now,
                        deadline: now + max_pause,
                    };
                    state.hold = Some(hold);
                    state.refused_in_hold = 0;
                    hold
                }
            };
            decided = Some(Ok((
                state.in_flight_unfenced,
                HoldId {
                    epoch,
                    started: hold.started,
                },
            )));
            true
        });
        decided.expect("the closure always decides")
    }

    /// The second half of [`Gate::hold`]: waits until no write that a fence
    /// does not refuse is in flight, while the hold `id` stands and its
    /// pause lasts.
    pub async fn drain(&self, id: HoldId) -> Result<(), GateError> {
        let mut changes = self.state.subscribe();
        loop {
            changes.mark_unchanged();
            let deadline = {
                let state = self.state.borrow();
                let Some(hold) = state.hold.filter(|_| Self::holds(&state, id)) else {
                    return Err(GateError::HoldLifted { epoch: id.epoch });
                };
                if state.in_flight_unfenced == 0 {
                    return Ok(());
                }
                hold.deadline
            };
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(GateError::DrainTimedOut {
                    in_flight: self.state.borrow().in_flight_unfenced,
                    max_pause: deadline.duration_since(id.started),
                });
            }
        }
    }

    /// Whether the hold `id` is still in force.
    pub fn is_held_by(&self, id: HoldId) -> bool {
        Self::holds(&self.state.borrow(), id)
    }

    fn holds(state: &GateState, id: HoldId) -> bool {
        state
            .hold
            .is_some_and(|hold| hold.epoch == id.epoch && hold.started == id.started)
    }

    /// Waits until a hold is in force and returns it, with the time its
    /// pause runs out.
    pub async fn until_held(&self) -> (HoldId, Instant) {
        let mut changes = self.state.subscribe();
        loop {
            if let Some(hold) = changes.borrow_and_update().hold {
                return (
                    HoldId {
                        epoch: hold.epoch,
                        started: hold.started,
                    },
                    hold.deadline,
                );
            }
            if changes.changed().await.is_err() {
                // The gate is gone: nothing will ever hold.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Returns once no hold is in force (at once when none is).
    pub async fn until_open(&self) {
        let mut changes = self.state.subscribe();
        let _ = changes.wait_for(|state| state.hold.is_none()).await;
    }

    /// Returns once the hold `id` is no longer in force (released, or
    /// replaced by a newer epoch's).
    pub async fn until_released(&self, id: HoldId) {
        let mut changes = self.state.subscribe();
        let _ = changes.wait_for(|state| !Self::holds(state, id)).await;
    }

    /// Runs `switch` (which points the gateway at a new upstream) if
    /// `epoch` holds the writes and none is in flight, atomically with
    /// respect to Release: no write can be let through between the check
    /// and the switch.
    pub fn switch_if_holding(&self, epoch: u64, switch: impl FnOnce()) -> Result<(), GateError> {
        let mut outcome = Ok(());
        self.state.send_if_modified(|state| {
            outcome = Self::check_switch(state, epoch);
            if outcome.is_ok() {
                switch();
            }
            false
        });
        outcome
    }

    /// Whether `epoch` could switch now (see [`Gate::switch_if_holding`]).
    pub fn may_switch(&self, epoch: u64) -> Result<(), GateError> {
        Self::check_switch(&self.state.borrow(), epoch)
    }

    fn check_switch(state: &GateState, epoch: u64) -> Result<(), GateError> {
        if epoch < state.epoch {
            return Err(GateError::StaleEpoch {
                given: epoch,
                current: state.epoch,
            });
        }
        let Some(hold) = state.hold else {
            return Err(GateError::NotHolding { epoch });
        };
        if hold.epoch != epoch {
            return Err(GateError::HeldByOtherEpoch {
                given: epoch,
                holding: hold.epoch,
            });
        }
        if state.in_flight_unfenced > 0 {
            return Err(GateError::WritesInFlight {
                in_flight: state.in_flight_unfenced,
            });
        }
        Ok(())
    }

    /// Lifts the hold: the queued writes go on in order, then new ones.
    /// Without a hold it changes nothing and reports zeros.
    pub fn release(&self, epoch: u64) -> Result<Released, GateError> {
        let mut outcome = Ok(Released {
            released: 0,
            refused: 0,
        });
        self.state.send_if_modified(|state| {
            if epoch < state.epoch {
                outcome = Err(GateError::StaleEpoch {
                    given: epoch,
                    current: state.epoch,
                });
                return false;
            }
            state.epoch = epoch;
            if state.hold.take().is_none() {
                return false;
            }
            outcome = Ok(Released {
                released: state.queued(),
                refused: state.refused_in_hold,
            });
            true
        });
        outcome
    }

    /// Where the gate stands.
    pub fn snapshot(&self) -> GateSnapshot {
        let state = self.state.borrow();
        GateSnapshot {
            epoch: state.epoch,
            holding: state.hold.is_some(),
            in_flight: state.in_flight,
            queued: state.queued(),
        }
    }
}

/// A write on its way to the upstream: counted in flight until dropped.
/// Keep it until the upstream has answered (or failed), not until the
/// client went away, so Hold never returns while the upstream may still
/// apply a write.
#[derive(Debug)]
pub struct WritePermit {
    gate: Arc<Gate>,
    /// Set for a write that waited in line: its drop lets the next go.
    ticket: Option<u64>,
    /// Whether a fenced plane refuses it (a Hold does not wait for it).
    fenced: bool,
}

impl WritePermit {
    /// Gives up this write's place in line while it stays in flight: the
    /// next write in line may go now. For a unit of work that lasts a
    /// whole transaction (a PostgreSQL session's), so that the sessions a
    /// hold released start in the order they arrived without waiting for
    /// one another's transactions to end.
    pub fn leave_line(&mut self) {
        if self.ticket.take().is_some() {
            self.gate.state.send_if_modified(|state| {
                state.advance();
                true
            });
        }
    }
}

impl Drop for WritePermit {
    fn drop(&mut self) {
        let ticket = self.ticket;
        let fenced = self.fenced;
        self.gate.state.send_if_modified(|state| {
            state.in_flight -= 1;
            state.in_flight_unfenced -= u64::from(!fenced);
            if ticket.is_some() {
                state.advance();
                return true;
            }
            !fenced && state.in_flight_unfenced == 0 && state.hold.is_some()
        });
    }
}

/// A write waiting in line for the release.
#[derive(Debug)]
pub struct HeldWrite {
    gate: Arc<Gate>,
    ticket: u64,
    /// Its request's bytes, counted in the line's until it leaves it.
    bytes: u64,
    /// Whether a fenced plane refuses it.
    fenced: bool,
    /// Turned into a permit or refused: its place in line is accounted for.
    settled: bool,
}

impl HeldWrite {
    /// Waits for this write's turn after the release, or for the hold's
    /// deadline (then the write is refused).
    pub async fn wait(mut self) -> Result<WritePermit, GateRefusal> {
        let mut changes = self.gate.state.subscribe();
        loop {
            changes.mark_unchanged();
            let now = Instant::now();
            let ticket = self.ticket;
            let bytes = self.bytes;
            let mut decided = None;
            self.gate.state.send_if_modified(|state| match state.hold {
                None if state.next_to_send == ticket => {
                    state.in_flight += 1;
                    state.in_flight_unfenced += u64::from(!self.fenced);
                    state.queued_bytes -= bytes;
                    decided = Some(Ok(()));
                    false
                }
                Some(hold) if now >= hold.deadline => {
                    state.abandon(ticket);
                    state.queued_bytes -= bytes;
                    state.refused_in_hold += 1;
                    decided = Some(Err(GateRefusal::HoldRanOut {
                        epoch: hold.epoch,
                        held_ms: now.duration_since(hold.started).as_millis(),
                    }));
                    true
                }
                _ => false,
            });
            match decided {
                Some(Ok(())) => {
                    self.settled = true;
                    return Ok(WritePermit {
                        gate: self.gate.clone(),
                        ticket: Some(self.ticket),
                        fenced: self.fenced,
                    });
                }
                Some(Err(refusal)) => {
                    self.settled = true;
                    return Err(refusal);
                }
                None => {}
            }
            let deadline = self.gate.state.borrow().hold.map(|hold| hold.deadline);
            match deadline {
                Some(deadline) => {
                    let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
                }
                None => {
                    let _ = changes.changed().await;
                }
            }
        }
    }
}

impl Drop for HeldWrite {
    fn drop(&mut self) {
        if !self.settled {
            let ticket = self.ticket;
            let bytes = self.bytes;
            self.gate.state.send_if_modified(|state| {
                state.abandon(ticket);
                state.queued_bytes -= bytes;
                true
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permit(admission: Admission) -> WritePermit {
        match admission {
            Admission::Pass(permit) => permit,
            other => panic!("expected a pass, got {other:?}"),
        }
    }

    fn held(admission: Admission) -> HeldWrite {
        match admission {
            Admission::Held(held) => held,
            other => panic!("expected a hold, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn writes_pass_while_open_and_wait_while_held() {
        let gate = Arc::new(Gate::default());
        drop(permit(gate.admit_write(1)));
        assert_eq!(
            gate.hold(1, Duration::from_secs(60))
                .await
                .map(|(drained, _)| drained),
            Ok(0)
        );
        let waiting = held(gate.admit_write(1));
        assert_eq!(gate.snapshot().queued, 1);
        let released = gate.release(1).expect("release");
        assert_eq!(released.released, 1);
        let permit = waiting.wait().await.expect("its turn");
        assert_eq!(gate.snapshot().in_flight, 1);
        drop(permit);
        assert_eq!(gate.snapshot().in_flight, 0);
        let _open_again = self::permit(gate.admit_write(1));
    }

    #[tokio::test]
    async fn hold_waits_for_the_writes_in_flight() {
        let gate = Arc::new(Gate::default());
        let in_flight = permit(gate.admit_write(1));
        let holding = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.hold(1, Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        assert!(!holding.is_finished());
        drop(in_flight);
        assert_eq!(
            holding.await.expect("joins").map(|(drained, _)| drained),
            Ok(1)
        );
    }

    #[tokio::test]
    async fn released_writes_go_one_at_a_time_in_arrival_order() {
        let gate = Arc::new(Gate::default());
        gate.hold(1, Duration::from_secs(60)).await.expect("hold");
        let first = held(gate.admit_write(1));
        let second = held(gate.admit_write(1));
        let third = held(gate.admit_write(1));
        // The second gives up (its client went away) before its turn.
        drop(second);
        gate.release(1).expect("release");
        // A new write queues behind the released ones.
        let late = held(gate.admit_write(1));
        let third = tokio::spawn(third.wait());
        let late = tokio::spawn(late.wait());
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "the third waits for the first");
        let first = first.wait().await.expect("first");
        drop(first);
        let third = third.await.expect("joins").expect("third");
        tokio::task::yield_now().await;
        assert!(!late.is_finished(), "the late one waits for the third");
        drop(third);
        drop(late.await.expect("joins").expect("late"));
        let _open = permit(gate.admit_write(1));
    }

    #[tokio::test]
    async fn a_write_that_leaves_the_line_lets_the_next_go_and_stays_in_flight() {
        let gate = Arc::new(Gate::default());
        gate.hold(1, Duration::from_secs(60)).await.expect("hold");
        let first = held(gate.admit_write(1));
        let second = held(gate.admit_write(1));
        gate.release(1).expect("release");
        let second = tokio::spawn(second.wait());
        let mut first = first.wait().await.expect("first");
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the second waits for the first");
        first.leave_line();
        let second = second.await.expect("joins").expect("second");
        assert_eq!(gate.snapshot().in_flight, 2);
        // A hold now waits for both.
        let (in_flight, _) = gate.begin_hold(2, Duration::from_secs(60)).expect("holds");
        assert_eq!(in_flight, 2);
        drop(first);
        drop(second);
        assert_eq!(gate.snapshot().in_flight, 0);
        assert_eq!(gate.snapshot().queued, 0);
    }

    #[tokio::test]
    async fn a_hold_that_runs_out_refuses_held_and_new_writes_until_released() {
        let gate = Arc::new(Gate::default());
        gate.hold(3, Duration::from_millis(100))
            .await
            .expect("hold");
        let waiting = held(gate.admit_write(1));
        let refusal = waiting.wait().await.expect_err("refused at the deadline");
        assert!(matches!(refusal, GateRefusal::HoldRanOut { epoch: 3, .. }));
        assert!(matches!(gate.admit_write(1), Admission::Refused(_)));
        let released = gate.release(3).expect("release");
        assert_eq!(
            released,
            Released {
                released: 0,
                refused: 2
            }
        );
        let _open = permit(gate.admit_write(1));
    }

    #[tokio::test]
    async fn held_writes_are_capped_in_bytes_and_leave_the_count_when_they_go() {
        let gate = Arc::new(Gate::default());
        gate.hold(1, Duration::from_secs(60)).await.expect("hold");
        let big = held(gate.admit_write(MAX_QUEUED_BYTES - 10));
        assert!(matches!(
            gate.admit_write(11),
            Admission::Refused(GateRefusal::LineFullOfBytes { bytes: 11, .. })
        ));
        let small = held(gate.admit_write(10));
        // The big one's client goes away: its bytes leave the line.
        drop(big);
        let again = held(gate.admit_write(MAX_QUEUED_BYTES - 10));
        gate.release(1).expect("release");
        drop(small.wait().await.expect("its turn"));
        drop(again.wait().await.expect("its turn"));
        assert_eq!(gate.state.borrow().queued_bytes, 0);
    }

    #[tokio::test]
    async fn lower_epochs_are_refused() {
        let gate = Arc::new(Gate::default());
        gate.hold(5, Duration::from_secs(60)).await.expect("hold");
        assert_eq!(
            gate.hold(4, Duration::from_secs(60))
                .await
                .map(|(drained, _)| drained),
            Err(GateError::StaleEpoch {
                given: 4,
                current: 5
            })
        );
        assert!(matches!(
            gate.may_switch(4),
            Err(GateError::StaleEpoch { .. })
        ));
        assert!(matches!(gate.release(4), Err(GateError::StaleEpoch { .. })));
        assert!(gate.snapshot().holding);
        assert!(matches!(
            gate.may_switch(6),
            Err(GateError::HeldByOtherEpoch { .. })
        ));
        gate.may_switch(5).expect("the holder may switch");
        gate.release(5).expect("release");
        assert!(matches!(
            gate.may_switch(5),
            Err(GateError::NotHolding { .. })
        ));
    }

    /// A Put, DeleteRange or Txn in flight is applied before the fence or
    /// refused by the fenced plane: neither Hold nor Switch waits for it,
    /// and it leaves the in-flight count when answered.
    #[tokio::test]
    async fn hold_and_switch_do_not_wait_for_fenced_writes_in_flight() {
        let gate = Arc::new(Gate::default());
        let fenced = permit(gate.admit_fenced_write(1));
        let unfenced = permit(gate.admit_write(1));
        drop(unfenced);
        assert_eq!(
            gate.hold(1, Duration::from_secs(60))
                .await
                .map(|(drained, _)| drained),
            Ok(0)
        );
        gate.may_switch(1).expect("no unfenced write in flight");
        assert_eq!(gate.snapshot().in_flight, 1);
        // Refused by the fence, it queues again like any held write.
        drop(fenced);
        let again = held(gate.admit_fenced_write(1));
        assert_eq!(gate.snapshot().in_flight, 0);
        gate.release(1).expect("release");
        drop(again.wait().await.expect("its turn"));
        let _open_again = permit(gate.admit_fenced_write(1));
    }

    #[tokio::test]
    async fn switch_is_refused_while_a_write_is_in_flight() {
        let gate = Arc::new(Gate::default());
        let in_flight = permit(gate.admit_write(1));
        let holding = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.hold(1, Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        let mut switched = false;
        assert!(matches!(
            gate.switch_if_holding(1, || switched = true),
            Err(GateError::WritesInFlight { in_flight: 1 })
        ));
        assert!(!switched);
        drop(in_flight);
        holding.await.expect("joins").expect("drained");
        gate.switch_if_holding(1, || switched = true)
            .expect("switch");
        assert!(switched);
    }
}

//! ferry's fence record in an etcd that a live migration moves away from:
//! the one place that decides whether a cutover switched, so that no
//! process (a killed driver, a restarted gateway, a second replica) can
//! decide it differently.
//!
//! Two keys, always written together in one Txn, and an alarm:
//! - [`FENCE_KEY`], `{"epoch":..,"fenced":..,"successor":..,"switched":..}`:
//!   the migration attempt that set it (G5), whether writes are fenced,
//!   the plane that takes over, and whether the migration switched to it.
//! - [`FENCE_GUARD_KEY`], present exactly while the plane is fenced. A ferry
//!   gateway sends a DeleteRange, and a Txn with no Put of its own at its
//!   top level, as a Txn whose compare requires this key to be absent
//!   ([`guard_compare`]).
//! - **ferry's write alarm**: etcd's own `NOSPACE` alarm, raised under a
//!   member id of ferry's ([`fence_alarm_member`], one per epoch) just before
//!   the record is fenced. While any `NOSPACE` alarm is raised, etcd refuses
//!   every Put, every Txn with a Put at its top level, and every lease grant
//!   ("database space exceeded"), from any client, and keeps serving reads,
//!   watches and deletes; the alarm is stored in etcd's backend and survives
//!   a restart. So a gateway sends Puts, and Txns that put, as they are, at
//!   no cost to etcd: the plane itself refuses them once fenced. (A guarded
//!   Txn costs etcd 3.4 about twice a Put: it copies its read buffer for
//!   every Txn.)
//!
//! Together they make the store refuse every write from any gateway once
//! the plane is fenced: a restarted one, a second replica, or one started
//! later with the flags it had before; and Puts from any other client too.
//! The record's own moves under the alarm are a Txn whose Puts sit inside a
//! nested Txn, which etcd's quota does not count (3.4 to 3.6).
//!
//! The alarm is raised before the guard is written, so no Put lands after
//! the fenced position F (the guard's create revision). The commit, and a
//! fence repeated by the same epoch, check that it is still raised; one that
//! finds it gone (an operator's `etcdctl alarm disarm`, or a lapsed gateway
//! that settled the attempt between its alarm and its record) is refused, so
//! the migration rolls back instead of losing the Puts that may have landed
//! after F. An unfence lowers the alarms of its epoch
//! and every earlier one. Per-epoch ids make that safe: a late unfence of an
//! earlier attempt never lowers a later attempt's alarm.
//!
//! The record moves through these states, each move a compare-and-swap on
//! the record's mod revision:
//!
//! ```text
//! (none) / unfenced(e) --fence(E >= e)--> fenced(E, successor)
//! fenced(E)            --commit(E)------> switched(E, successor)   (final)
//! fenced(E)            --unfence(E)-----> unfenced(E)
//! ```
//!
//! `commit` is the cutover's point of no return: the driver writes it once
//! the new plane holds everything through the fence. A gateway whose hold
//! lapsed reads the record: switched, it goes to the successor; fenced but
//! not switched, it unfences (the same compare-and-swap, so it and a late
//! commit cannot both win) and writes go on to the old plane.

use ferry_proto::etcd::etcdserverpb::alarm_request::AlarmAction;
use ferry_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use ferry_proto::etcd::etcdserverpb::request_op::Request as TxnRequestOp;
use ferry_proto::etcd::etcdserverpb::response_op::Response as TxnResponseOp;
use ferry_proto::etcd::etcdserverpb::{
    AlarmRequest, AlarmResponse, AlarmType, Compare, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, TxnResponse,
};
use tracing::info;

use super::client::EtcdClient;
use super::{EtcdConnection, EtcdError, printable};
pub use crate::adapters::fence_record::{
    Decision, Fence, Move, StoredFence, decide, describe, fence_state,
};
use crate::adapters::live::{FenceAnswer, Position};

/// Where the fence record lives.
pub const FENCE_KEY: &[u8] = b"__ferry__/fence";

/// Present exactly while the plane is fenced; its create revision is the
/// fenced position F. A gateway's writes require it absent.
pub const FENCE_GUARD_KEY: &[u8] = b"__ferry__/fenced";

/// The member ids of ferry's write alarms carry this tag in their top 16
/// bits (`etcdctl alarm list` shows `memberID:18336...` for them).
const FENCE_ALARM_TAG: u64 = 0xfe77;

/// The member id under which migration `epoch` raises its write alarm.
pub fn fence_alarm_member(epoch: u64) -> u64 {
    (FENCE_ALARM_TAG << 48) | (epoch & 0xffff_ffff_ffff)
}

/// The epoch of a write alarm raised by ferry, or `None` for etcd's own.
pub fn fence_alarm_epoch(member_id: u64) -> Option<u64> {
    (member_id >> 48 == FENCE_ALARM_TAG).then_some(member_id & 0xffff_ffff_ffff)
}

/// A plane whose fence can be read and moved: an agent's client, or a
/// gateway's own channel.
pub trait FencePlane: Sync {
    /// Why a call failed.
    type Error: Send;
    /// Sends a Txn.
    fn txn(
        &self,
        request: TxnRequest,
    ) -> impl std::future::Future<Output = Result<TxnResponse, Self::Error>> + Send;
    /// Raises, lowers or lists alarms.
    fn alarm(
        &self,
        request: AlarmRequest,
    ) -> impl std::future::Future<Output = Result<AlarmResponse, Self::Error>> + Send;
}

/// What became of a move of the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceOutcome {
    /// Done (or found done already): the fenced position F for a fence or
    /// a commit, the revision of the write for an unfence.
    Done {
        /// See above.
        revision: i64,
    },
    /// Refused: the record says otherwise (a later attempt owns the plane,
    /// the migration switched already, or it is not fenced by this epoch).
    Refused {
        /// The record as stored.
        stored: StoredFence,
        /// Why, in words a user can act on.
        reason: String,
    },
}

impl FenceOutcome {
    /// The outcome in the live contract's words; a refusal names `plane`
    /// (the plane's URL, for people).
    pub fn into_answer(self, plane: &str) -> FenceAnswer {
        match self {
            FenceOutcome::Done { revision } => FenceAnswer::Done(Position(revision.max(0) as u64)),
            FenceOutcome::Refused { reason, .. } => {
                FenceAnswer::Refused(format!("{plane}: {reason}"))
            }
        }
    }
}

/// The compare every write of a gateway carries: the plane is not fenced.
pub fn guard_compare() -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Version as i32,
        key: FENCE_GUARD_KEY.to_vec(),
        range_end: Vec::new(),
        target_union: Some(TargetUnion::Version(0)),
    }
}

/// A Txn that reads the record and the guard key at one revision.
pub fn read_request() -> TxnRequest {
    let range = |key: &[u8]| RequestOp {
        request: Some(TxnRequestOp::RequestRange(RangeRequest {
            key: key.to_vec(),
            ..RangeRequest::default()
        })),
    };
    TxnRequest {
        compare: Vec::new(),
        success: vec![range(FENCE_KEY), range(FENCE_GUARD_KEY)],
        failure: Vec::new(),
    }
}

/// The record in the answer to [`read_request`], if any.
pub fn parse_read(response: &TxnResponse) -> Result<Option<StoredFence>, String> {
    let mut ranges = response.responses.iter().map(|op| match &op.response {
        Some(TxnResponseOp::ResponseRange(range)) => range.kvs.first(),
        _ => None,
    });
    let (Some(record), guard) = (ranges.next().flatten(), ranges.next().flatten()) else {
        return Ok(None);
    };
    let fence: Fence = serde_json::from_slice(&record.value).map_err(|error| {
        format!(
            "{} does not parse ({error}); delete it if no migration is running",
            printable(FENCE_KEY)
        )
    })?;
    Ok(Some(StoredFence {
        fence,
        mod_revision: record.mod_revision,
        fenced_revision: guard.map(|guard| guard.create_revision),
    }))
}

/// The Txn that moves the record from `stored` to `next`, guarded by the
/// record's mod revision (or its absence); the guard key follows
/// `next.fenced`.
pub fn move_request(stored: Option<&StoredFence>, next: &Fence) -> TxnRequest {
    let compare = match stored {
        Some(stored) => Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: FENCE_KEY.to_vec(),
            range_end: Vec::new(),
            target_union: Some(TargetUnion::ModRevision(stored.mod_revision)),
        },
        None => Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Version as i32,
            key: FENCE_KEY.to_vec(),
            range_end: Vec::new(),
            target_union: Some(TargetUnion::Version(0)),
        },
    };
    let put = |key: &[u8], value: Vec<u8>| RequestOp {
        request: Some(TxnRequestOp::RequestPut(PutRequest {
            key: key.to_vec(),
            value,
            ..PutRequest::default()
        })),
    };
    let was_fenced = stored.is_some_and(|stored| stored.fenced_revision.is_some());
    let mut success = vec![put(
        FENCE_KEY,
        serde_json::to_vec(next).expect("a fence serializes"),
    )];
    if next.fenced && !was_fenced {
        success.push(put(FENCE_GUARD_KEY, next.epoch.to_string().into_bytes()));
    } else if !next.fenced && was_fenced {
        success.push(RequestOp {
            request: Some(TxnRequestOp::RequestDeleteRange(DeleteRangeRequest {
                key: FENCE_GUARD_KEY.to_vec(),
                ..DeleteRangeRequest::default()
            })),
        });
    }
    // Nested, so that etcd's quota lets it through ferry's own write alarm.
    TxnRequest {
        compare: vec![compare],
        success: vec![RequestOp {
            request: Some(TxnRequestOp::RequestTxn(TxnRequest {
                compare: Vec::new(),
                success,
                failure: Vec::new(),
            })),
        }],
        failure: Vec::new(),
    }
}

/// Reads the record of `connection`'s cluster.
pub async fn read_fence(connection: &EtcdConnection) -> Result<Option<StoredFence>, EtcdError> {
    let client = EtcdClient::connect(connection).await?;
    read_with(&ClientPlane(&client))
        .await
        .map_err(|failure| failure.into_error(&client))
}

/// The epochs of ferry's write alarms raised on `connection`'s cluster.
pub async fn read_fence_alarms(connection: &EtcdConnection) -> Result<Vec<u64>, EtcdError> {
    let client = EtcdClient::connect(connection).await?;
    raised_alarms(&ClientPlane(&client)).await
}

/// Moves the record of `connection`'s cluster as `wanted` says.
pub async fn move_fence(
    connection: &EtcdConnection,
    wanted: &Move,
) -> Result<FenceOutcome, EtcdError> {
    let client = EtcdClient::connect(connection).await?;
    move_with(&ClientPlane(&client), wanted)
        .await
        .map_err(|failure| failure.into_error(&client))
}

/// Why a read or move of the record failed: a call, or a record that does
/// not parse.
#[derive(Debug)]
pub enum FenceFailure<E> {
    /// A call failed.
    Call(E),
    /// The record is not ferry's.
    Unreadable(String),
}

impl FenceFailure<EtcdError> {
    fn into_error(self, client: &EtcdClient) -> EtcdError {
        match self {
            FenceFailure::Call(error) => error,
            FenceFailure::Unreadable(reason) => EtcdError::Request {
                endpoints: client.connection().display(),
                action: "read the fence".to_owned(),
                reason,
            },
        }
    }
}

/// An agent's client as a [`FencePlane`].
struct ClientPlane<'a>(&'a EtcdClient);

impl FencePlane for ClientPlane<'_> {
    type Error = EtcdError;

    async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, EtcdError> {
        self.0
            .call("read or write the fence of", |mut services| {
                let request = request.clone();
                async move { services.kv.txn(request).await }
            })
            .await
    }

    async fn alarm(&self, request: AlarmRequest) -> Result<AlarmResponse, EtcdError> {
        self.0
            .call(
                "raise, lower or list ferry's write alarm on",
                |mut services| async move { services.maintenance.alarm(request).await },
            )
            .await
    }
}

/// Reads the record of `plane`.
pub async fn read_with<P: FencePlane>(
    plane: &P,
) -> Result<Option<StoredFence>, FenceFailure<P::Error>> {
    let response = plane
        .txn(read_request())
        .await
        .map_err(FenceFailure::Call)?;
    parse_read(&response).map_err(FenceFailure::Unreadable)
}

fn alarm_request(action: AlarmAction, epoch: u64) -> AlarmRequest {
    AlarmRequest {
        action: action as i32,
        member_id: fence_alarm_member(epoch),
        alarm: AlarmType::Nospace as i32,
    }
}

/// The epochs whose write alarms `plane` has raised.
pub async fn raised_alarms<P: FencePlane>(plane: &P) -> Result<Vec<u64>, P::Error> {
    let listed = plane
        .alarm(AlarmRequest {
            action: AlarmAction::Get as i32,
            member_id: 0,
            alarm: AlarmType::None as i32,
        })
        .await?;
    Ok(listed
        .alarms
        .iter()
        .filter(|member| member.alarm == AlarmType::Nospace as i32)
        .filter_map(|member| fence_alarm_epoch(member.member_id))
        .collect())
}

/// Lowers ferry's write alarms of `epoch` and every earlier one.
async fn lower_alarms<P: FencePlane>(plane: &P, epoch: u64) -> Result<(), P::Error> {
    for raised in raised_alarms(plane).await? {
        if raised <= epoch {
            plane
                .alarm(alarm_request(AlarmAction::Deactivate, raised))
                .await?;
            info!(epoch = raised, "write alarm lowered");
        }
    }
    Ok(())
}

/// Why a fence or commit of `epoch` is refused when its alarm is gone.
fn alarm_gone(epoch: u64) -> String {
    format!(
        "ferry's write alarm of epoch {epoch} is no longer raised on the fenced plane (cleared by `etcdctl alarm disarm`, or by a gateway that settled the attempt before its fence landed): Puts may have landed after the fence, so the migration must roll back and start again"
    )
}

/// Moves the record of `plane` as `wanted` says, retrying the
/// compare-and-swap while another writer moves it in between, and raises,
/// checks or lowers ferry's write alarm with it (see the module's
/// documentation): the state machine's one driver, for agents and gateways
/// alike.
pub async fn move_with<P: FencePlane>(
    plane: &P,
    wanted: &Move,
) -> Result<FenceOutcome, FenceFailure<P::Error>> {
    let epoch = wanted.epoch();
    let mut raised = false;
    loop {
        // A fence and a commit need to know whether the epoch's alarm is in
        // force: asked alongside the record, not after it.
        let (stored, in_force) = match wanted {
            Move::Unfence { .. } => (read_with(plane).await?, false),
            Move::Fence { .. } | Move::Commit { .. } => {
                let (stored, alarms) = tokio::join!(read_with(plane), raised_alarms(plane));
                let in_force = alarms.map_err(FenceFailure::Call)?.contains(&epoch);
                (stored?, in_force)
            }
        };
        let decision = decide(stored.as_ref(), wanted);
        if let Decision::Refuse(reason) = decision {
            let stored = stored.expect("a refusal names a record");
            if raised && stored.fence.epoch != epoch {
                // Another attempt moved the record first: this one's alarm
                // fences nothing.
                lower_alarms(plane, epoch)
                    .await
                    .map_err(FenceFailure::Call)?;
            }
            return Ok(FenceOutcome::Refused { stored, reason });
        }
        let alarm_gone = |stored: Option<StoredFence>| {
            Ok(FenceOutcome::Refused {
                stored: stored.expect("a fenced plane has a record"),
                reason: alarm_gone(epoch),
            })
        };
        let next = match (decision, wanted) {
            (Decision::AlreadyDone(revision), Move::Unfence { .. }) => {
                lower_alarms(plane, epoch)
                    .await
                    .map_err(FenceFailure::Call)?;
                return Ok(FenceOutcome::Done { revision });
            }
            // Fenced already (a retry, a resume): only while the alarm
            // stayed up since, else a Put may have landed after F.
            (Decision::AlreadyDone(_), Move::Fence { .. }) if !in_force => {
                return alarm_gone(stored);
            }
            (Decision::AlreadyDone(revision), _) => {
                return Ok(FenceOutcome::Done { revision });
            }
            // The point of no return, only while the alarm stayed up since
            // the fence: lowered meanwhile (an operator's disarm, or a
            // lapsed gateway that settled the attempt between the alarm and
            // the record), a Put may have landed after F.
            (Decision::Write(_), Move::Commit { .. }) if !in_force => return alarm_gone(stored),
            (Decision::Write(next), _) => next,
            (Decision::Refuse(_), _) => unreachable!("answered above"),
        };
        if matches!(wanted, Move::Fence { .. }) && !raised {
            // Before the guard: no Put lands after F.
            plane
                .alarm(alarm_request(AlarmAction::Activate, epoch))
                .await
                .map_err(FenceFailure::Call)?;
            raised = true;
        }
        let response = plane
            .txn(move_request(stored.as_ref(), &next))
            .await
            .map_err(FenceFailure::Call)?;
        if !response.succeeded {
            // Moved by someone else meanwhile: decide again on what is there.
            continue;
        }
        let written = response.header.map_or(0, |header| header.revision);
        let revision = match wanted {
            // F is the guard's create revision: this write's, or the
            // earlier fence's when the record is rewritten.
            Move::Fence { .. } | Move::Commit { .. } => stored
                .as_ref()
                .and_then(|stored| stored.fenced_revision)
                .unwrap_or(written),
            Move::Unfence { .. } => written,
        };
        info!(record = %describe(Some(&next)), revision, "fence record written");
        if matches!(wanted, Move::Unfence { .. }) {
            lower_alarms(plane, epoch)
                .await
                .map_err(FenceFailure::Call)?;
        }
        return Ok(FenceOutcome::Done { revision });
    }
}

/// Where a plane that took over from another keeps the offset its gateways
/// add to its revisions (`{"epoch":..,"revision_offset":..}`), so a gateway
/// started in front of it (not in front of the old plane, whose record says
/// the same) shows its clients revisions that only grow.
pub const REVISION_OFFSET_KEY: &[u8] = b"__ferry__/revision_offset";

/// The record of [`REVISION_OFFSET_KEY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevisionOffset {
    /// The migration attempt that wrote it.
    pub epoch: u64,
    /// What gateways add to this plane's revisions.
    pub revision_offset: i64,
}

/// Records in the new plane of `connection` the offset gateways add to its
/// revisions, for migration `epoch`: written unless a later attempt wrote
/// it (then refused, with its epoch).
pub async fn adopt_revision_offset(
    connection: &EtcdConnection,
    offset: RevisionOffset,
) -> Result<Result<(), u64>, EtcdError> {
    let client = EtcdClient::connect(connection).await?;
    loop {
        let request = RangeRequest {
            key: REVISION_OFFSET_KEY.to_vec(),
            ..RangeRequest::default()
        };
        let stored = client
            .call("read the revision offset of", |mut services| {
                let request = request.clone();
                async move { services.kv.range(request).await }
            })
            .await?
            .kvs
            .into_iter()
            .next();
        let compare = match &stored {
            Some(kv) => {
                if let Ok(stored) = serde_json::from_slice::<RevisionOffset>(&kv.value)
                    && stored.epoch > offset.epoch
                {
                    return Ok(Err(stored.epoch));
                }
                Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Mod as i32,
                    key: REVISION_OFFSET_KEY.to_vec(),
                    range_end: Vec::new(),
                    target_union: Some(TargetUnion::ModRevision(kv.mod_revision)),
                }
            }
            None => Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Version as i32,
                key: REVISION_OFFSET_KEY.to_vec(),
                range_end: Vec::new(),
                target_union: Some(TargetUnion::Version(0)),
            },
        };
        let request = TxnRequest {
            compare: vec![compare],
            success: vec![RequestOp {
                request: Some(TxnRequestOp::RequestPut(PutRequest {
                    key: REVISION_OFFSET_KEY.to_vec(),
                    value: serde_json::to_vec(&offset).expect("an offset serializes"),
                    ..PutRequest::default()
                })),
            }],
            failure: Vec::new(),
        };
        let response = client
            .call("write the revision offset to", |mut services| {
                let request = request.clone();
                async move { services.kv.txn(request).await }
            })
            .await?;
        if response.succeeded {
            info!(
                epoch = offset.epoch,
                revision_offset = offset.revision_offset,
                "revision offset recorded in the new plane"
            );
            return Ok(Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(fence: Fence, fenced_revision: Option<i64>) -> StoredFence {
        StoredFence {
            fence,
            mod_revision: 10,
            fenced_revision,
        }
    }

    fn fenced(epoch: u64) -> Fence {
        Fence {
            epoch,
            fenced: true,
            successor: Some("etcd://new".to_owned()),
            switched: false,
            successor_revision_offset: 0,
        }
    }

    #[test]
    fn records_of_older_ferry_versions_still_read() {
        let fence: Fence = serde_json::from_slice(br#"{"epoch":7,"fenced":true}"#).expect("JSON");
        assert_eq!(fence.epoch, 7);
        assert!(fence.fenced && !fence.switched && fence.successor.is_none());
    }

    #[test]
    fn a_fence_a_commit_and_an_unfence_follow_the_state_machine() {
        let fence = Move::Fence {
            epoch: 2,
            successor: "etcd://new".to_owned(),
        };
        assert_eq!(decide(None, &fence), Decision::Write(fenced(2)));
        // Fencing again by the same epoch answers the same F.
        assert_eq!(
            decide(Some(&stored(fenced(2), Some(40))), &fence),
            Decision::AlreadyDone(40)
        );
        // A later attempt owns the plane.
        assert!(matches!(
            decide(Some(&stored(fenced(3), Some(40))), &fence),
            Decision::Refuse(_)
        ));
        let commit = Move::Commit {
            epoch: 2,
            successor_position_offset: 40,
        };
        let Decision::Write(switched) = decide(Some(&stored(fenced(2), Some(40))), &commit) else {
            panic!("a fenced plane commits");
        };
        assert!(switched.switched && switched.fenced);
        assert_eq!(switched.successor_revision_offset, 40);
        // Once switched: the commit is done, an unfence and a new fence are refused.
        let after = stored(switched, Some(40));
        assert_eq!(decide(Some(&after), &commit), Decision::AlreadyDone(40));
        assert!(matches!(
            decide(Some(&after), &Move::Unfence { epoch: 2 }),
            Decision::Refuse(reason) if reason.contains("cannot be rolled back")
        ));
        assert!(matches!(
            decide(
                Some(&after),
                &Move::Fence {
                    epoch: 5,
                    successor: "etcd://x".to_owned()
                }
            ),
            Decision::Refuse(_)
        ));
        // A rolled-back attempt cannot commit.
        let unfenced = Fence {
            fenced: false,
            successor: None,
            ..fenced(2)
        };
        assert!(matches!(
            decide(Some(&stored(unfenced.clone(), None)), &commit),
            Decision::Refuse(reason) if reason.contains("rolled back")
        ));
        assert_eq!(
            decide(Some(&stored(unfenced, None)), &Move::Unfence { epoch: 2 }),
            Decision::AlreadyDone(10)
        );
    }

    /// The writes of a move, inside the nested Txn that passes ferry's alarm.
    fn writes(request: &TxnRequest) -> &[RequestOp] {
        assert_eq!(request.success.len(), 1, "one nested Txn");
        match &request.success[0].request {
            Some(TxnRequestOp::RequestTxn(nested)) => {
                assert!(nested.compare.is_empty());
                &nested.success
            }
            other => panic!("a move is a nested Txn, not {other:?}"),
        }
    }

    #[test]
    fn the_guard_key_follows_the_fence() {
        let fencing = move_request(None, &fenced(1));
        assert_eq!(writes(&fencing).len(), 2, "record and guard");
        let committing = move_request(
            Some(&stored(fenced(1), Some(4))),
            &Fence {
                switched: true,
                ..fenced(1)
            },
        );
        assert_eq!(writes(&committing).len(), 1, "the guard stays");
        let unfencing = move_request(
            Some(&stored(fenced(1), Some(4))),
            &Fence {
                fenced: false,
                ..fenced(1)
            },
        );
        assert!(matches!(
            writes(&unfencing)[1].request,
            Some(TxnRequestOp::RequestDeleteRange(_))
        ));
    }

    #[test]
    fn alarm_member_ids_carry_the_epoch_and_are_told_from_etcds() {
        assert_eq!(fence_alarm_epoch(fence_alarm_member(7)), Some(7));
        assert_eq!(
            fence_alarm_epoch(fence_alarm_member(1 << 40)),
            Some(1 << 40)
        );
        // etcd's own member ids (random u64s) are not ferry's.
        assert_eq!(fence_alarm_epoch(0x8e9e_05c5_2164_694d), None);
        assert_ne!(fence_alarm_member(1), fence_alarm_member(2));
    }
}

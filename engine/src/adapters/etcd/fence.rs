//! ferry's fence record in an etcd that a live migration moves away from:
//! the one place that decides whether a cutover switched, so that no
//! process (a killed driver, a restarted gateway, a second replica) can
//! decide it differently.
//!
//! Two keys, always written together in one Txn:
//! - [`FENCE_KEY`], `{"epoch":..,"fenced":..,"successor":..,"switched":..}`:
//!   the migration attempt that set it (G5), whether writes are fenced,
//!   the plane that takes over, and whether the migration switched to it.
//! - [`FENCE_GUARD_KEY`], present exactly while the plane is fenced. Every
//!   write a ferry gateway sends is a Txn whose compare requires this key to
//!   be absent ([`guard_compare`]), so the store itself refuses writes from
//!   any gateway once the plane is fenced: a restarted one, a second
//!   replica, or one started later with the flags it had before.
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

use ferry_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use ferry_proto::etcd::etcdserverpb::request_op::Request as TxnRequestOp;
use ferry_proto::etcd::etcdserverpb::response_op::Response as TxnResponseOp;
use ferry_proto::etcd::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
};
use tracing::info;

use super::client::EtcdClient;
use super::{EtcdConnection, EtcdError, printable};

/// Where the fence record lives.
pub const FENCE_KEY: &[u8] = b"__ferry__/fence";

/// Present exactly while the plane is fenced; its create revision is the
/// fenced position F. A gateway's writes require it absent.
pub const FENCE_GUARD_KEY: &[u8] = b"__ferry__/fenced";

/// ferry's fence record in a source etcd.
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

/// The record as stored, with where it stands in etcd.
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
    TxnRequest {
        compare: vec![compare],
        success,
        failure: Vec::new(),
    }
}

/// What a move wants, given the record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Move {
    /// Fence for `epoch`, naming `successor`.
    Fence {
        /// The migration attempt.
        epoch: u64,
        /// The plane that takes over.
        successor: String,
    },
    /// Commit `epoch`'s switch, with the offset gateways add to the
    /// successor's revisions.
    Commit {
        /// The migration attempt.
        epoch: u64,
        /// See [`Fence::successor_revision_offset`].
        successor_revision_offset: i64,
    },
    /// Unfence for `epoch` (a rollback, or an abort of an attempt that
    /// will never switch).
    Unfence {
        /// The migration attempt.
        epoch: u64,
    },
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
            successor_revision_offset,
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

/// Reads the record of `connection`'s cluster.
pub async fn read_fence(connection: &EtcdConnection) -> Result<Option<StoredFence>, EtcdError> {
    let client = EtcdClient::connect(connection).await?;
    let txn = client_txn(&client);
    read_with(&txn)
        .await
        .map_err(|failure| failure.into_error(&client))
}

/// Moves the record of `connection`'s cluster as `wanted` says.
pub async fn move_fence(
    connection: &EtcdConnection,
    wanted: &Move,
) -> Result<FenceOutcome, EtcdError> {
    let client = EtcdClient::connect(connection).await?;
    let txn = client_txn(&client);
    move_with(&txn, wanted)
        .await
        .map_err(|failure| failure.into_error(&client))
}

/// Why a read or move of the record failed: the Txn itself, or a record
/// that does not parse.
#[derive(Debug)]
pub enum FenceFailure<E> {
    /// The Txn failed.
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

fn client_txn<'a>(
    client: &'a EtcdClient,
) -> impl Fn(TxnRequest) -> futures::future::BoxFuture<'a, Result<TxnResponse, EtcdError>> {
    move |request: TxnRequest| {
        Box::pin(async move {
            client
                .call("read or write the fence of", |mut services| {
                    let request = request.clone();
                    async move { services.kv.txn(request).await }
                })
                .await
        })
    }
}

/// Reads the record with `txn`, a way to send a Txn to the plane (an agent's
/// client, or a gateway's own channel).
pub async fn read_with<E, F, Fut>(txn: &F) -> Result<Option<StoredFence>, FenceFailure<E>>
where
    F: Fn(TxnRequest) -> Fut,
    Fut: std::future::Future<Output = Result<TxnResponse, E>>,
{
    let response = txn(read_request()).await.map_err(FenceFailure::Call)?;
    parse_read(&response).map_err(FenceFailure::Unreadable)
}

/// Moves the record with `txn` as `wanted` says, retrying the
/// compare-and-swap while another writer moves it in between: the state
/// machine's one driver, for agents and gateways alike.
pub async fn move_with<E, F, Fut>(txn: &F, wanted: &Move) -> Result<FenceOutcome, FenceFailure<E>>
where
    F: Fn(TxnRequest) -> Fut,
    Fut: std::future::Future<Output = Result<TxnResponse, E>>,
{
    loop {
        let stored = read_with(txn).await?;
        let next = match decide(stored.as_ref(), wanted) {
            Decision::AlreadyDone(revision) => return Ok(FenceOutcome::Done { revision }),
            Decision::Refuse(reason) => {
                return Ok(FenceOutcome::Refused {
                    stored: stored.expect("a refusal names a record"),
                    reason,
                });
            }
            Decision::Write(next) => next,
        };
        let response = txn(move_request(stored.as_ref(), &next))
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
            successor_revision_offset: 40,
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

    #[test]
    fn the_guard_key_follows_the_fence() {
        let fencing = move_request(None, &fenced(1));
        assert_eq!(fencing.success.len(), 2, "record and guard");
        let committing = move_request(
            Some(&stored(fenced(1), Some(4))),
            &Fence {
                switched: true,
                ..fenced(1)
            },
        );
        assert_eq!(committing.success.len(), 1, "the guard stays");
        let unfencing = move_request(
            Some(&stored(fenced(1), Some(4))),
            &Fence {
                fenced: false,
                ..fenced(1)
            },
        );
        assert!(matches!(
            unfencing.success[1].request,
            Some(TxnRequestOp::RequestDeleteRange(_))
        ));
    }
}

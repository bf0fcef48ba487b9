//! Revisions that never go backwards across a switch.
//!
//! The new etcd numbers its own revisions, far below the old one's after a
//! copy. So that clients of the gateway see every revision after the switch
//! above every revision they saw before it, the gateway adds the upstream's
//! offset to every revision it answers (headers, `create_revision` and
//! `mod_revision` of keys, a watch's compact revision) and takes it off every
//! revision a client sends (a Range at a revision, its min and max filters,
//! a Txn's compares, a Watch's start, a Compact). The offset is one above
//! the old plane's fenced revision F as its clients saw it, so even the keys
//! copied to the new plane show revisions above F: a client comparing a
//! `mod_revision` it read before the switch finds it changed (and reads
//! again), never equal by chance.
//!
//! A client revision at or below the offset names history the new plane
//! does not have: a Range or Watch from it is answered with etcd's own
//! "compacted" error, which clients handle by listing again; a compare on
//! it is evaluated as against a key last changed before the switch.

use ferry_proto::etcd::etcdserverpb::compare::{CompareTarget, TargetUnion};
use ferry_proto::etcd::etcdserverpb::watch_request::RequestUnion;
use ferry_proto::etcd::etcdserverpb::*;
use ferry_proto::etcd::mvccpb::KeyValue;
use tonic::Status;

/// etcd's words for a revision that was compacted, which clients match.
pub(crate) const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

/// A client's request, as the upstream must see it.
pub(crate) trait FromClient {
    /// Takes `offset` off every revision in the request; a revision the
    /// upstream cannot have is an error for the client.
    fn lower_revisions(&mut self, _offset: i64) -> Result<(), Status> {
        Ok(())
    }
}

/// An upstream's answer, as the client must see it.
pub(crate) trait ToClient {
    /// Adds `offset` to every revision in the answer.
    fn raise_revisions(&mut self, offset: i64);
}

/// `response` with `offset` added, as a closure for `map`.
pub(crate) fn shifted<T: ToClient>(
    offset: i64,
) -> impl Fn(tonic::Response<T>) -> tonic::Response<T> {
    move |mut response| {
        if offset != 0 {
            response.get_mut().raise_revisions(offset);
        }
        response
    }
}

fn raise(revision: &mut i64, offset: i64) {
    if *revision > 0 {
        *revision += offset;
    }
}

/// A revision a client sent, in the upstream's numbers; `None` when it is
/// at or below the offset (before the switch).
fn lower(revision: i64, offset: i64) -> Option<i64> {
    match revision {
        0 => Some(0),
        revision if revision > offset => Some(revision - offset),
        _ => None,
    }
}

fn compacted() -> Status {
    Status::out_of_range(COMPACTED)
}

impl ToClient for ResponseHeader {
    fn raise_revisions(&mut self, offset: i64) {
        raise(&mut self.revision, offset);
    }
}

impl ToClient for KeyValue {
    fn raise_revisions(&mut self, offset: i64) {
        raise(&mut self.create_revision, offset);
        raise(&mut self.mod_revision, offset);
    }
}

impl<T: ToClient> ToClient for Option<T> {
    fn raise_revisions(&mut self, offset: i64) {
        if let Some(inner) = self {
            inner.raise_revisions(offset);
        }
    }
}

impl<T: ToClient> ToClient for Vec<T> {
    fn raise_revisions(&mut self, offset: i64) {
        for item in self {
            item.raise_revisions(offset);
        }
    }
}

/// Answers whose only revision is their header's.
macro_rules! header_only {
    ($($response:ty),* $(,)?) => {
        $(impl ToClient for $response {
            fn raise_revisions(&mut self, offset: i64) {
                self.header.raise_revisions(offset);
            }
        })*
    };
}

header_only!(
    CompactionResponse,
    LeaseGrantResponse,
    LeaseRevokeResponse,
    LeaseKeepAliveResponse,
    LeaseTimeToLiveResponse,
    LeaseLeasesResponse,
    AlarmResponse,
    StatusResponse,
    DefragmentResponse,
    HashResponse,
    SnapshotResponse,
    MoveLeaderResponse,
    DowngradeResponse,
    MemberAddResponse,
    MemberRemoveResponse,
    MemberUpdateResponse,
    MemberListResponse,
    MemberPromoteResponse,
    AuthEnableResponse,
    AuthDisableResponse,
    AuthStatusResponse,
    AuthenticateResponse,
    AuthUserAddResponse,
    AuthUserGetResponse,
    AuthUserListResponse,
    AuthUserDeleteResponse,
    AuthUserChangePasswordResponse,
    AuthUserGrantRoleResponse,
    AuthUserRevokeRoleResponse,
    AuthRoleAddResponse,
    AuthRoleGetResponse,
    AuthRoleListResponse,
    AuthRoleDeleteResponse,
    AuthRoleGrantPermissionResponse,
    AuthRoleRevokePermissionResponse,
);

impl ToClient for RangeResponse {
    fn raise_revisions(&mut self, offset: i64) {
        self.header.raise_revisions(offset);
        self.kvs.raise_revisions(offset);
    }
}

impl ToClient for RangeStreamResponse {
    fn raise_revisions(&mut self, offset: i64) {
        self.range_response.raise_revisions(offset);
    }
}

impl ToClient for PutResponse {
    fn raise_revisions(&mut self, offset: i64) {
        self.header.raise_revisions(offset);
        self.prev_kv.raise_revisions(offset);
    }
}

impl ToClient for DeleteRangeResponse {
    fn raise_revisions(&mut self, offset: i64) {
        self.header.raise_revisions(offset);
        self.prev_kvs.raise_revisions(offset);
    }
}

impl ToClient for TxnResponse {
    fn raise_revisions(&mut self, offset: i64) {
        use response_op::Response;
        self.header.raise_revisions(offset);
        for op in &mut self.responses {
            match &mut op.response {
                Some(Response::ResponseRange(range)) => range.raise_revisions(offset),
                Some(Response::ResponsePut(put)) => put.raise_revisions(offset),
                Some(Response::ResponseDeleteRange(delete)) => delete.raise_revisions(offset),
                Some(Response::ResponseTxn(txn)) => txn.raise_revisions(offset),
                None => {}
            }
        }
    }
}

impl ToClient for HashKvResponse {
    fn raise_revisions(&mut self, offset: i64) {
        self.header.raise_revisions(offset);
        raise(&mut self.compact_revision, offset);
    }
}

impl ToClient for WatchResponse {
    fn raise_revisions(&mut self, offset: i64) {
        self.header.raise_revisions(offset);
        raise(&mut self.compact_revision, offset);
        for event in &mut self.events {
            event.kv.raise_revisions(offset);
            event.prev_kv.raise_revisions(offset);
        }
    }
}

impl FromClient for RangeRequest {
    fn lower_revisions(&mut self, offset: i64) -> Result<(), Status> {
        self.revision = lower(self.revision, offset).ok_or_else(compacted)?;
        // A lower bound before the switch keeps every key; an upper bound
        // before it keeps none (revision 1 is etcd's empty start).
        self.min_mod_revision = lower(self.min_mod_revision, offset).unwrap_or(0);
        self.min_create_revision = lower(self.min_create_revision, offset).unwrap_or(0);
        self.max_mod_revision = lower(self.max_mod_revision, offset).unwrap_or(1);
        self.max_create_revision = lower(self.max_create_revision, offset).unwrap_or(1);
        Ok(())
    }
}

impl FromClient for TxnRequest {
    fn lower_revisions(&mut self, offset: i64) -> Result<(), Status> {
        use request_op::Request;
        for compare in &mut self.compare {
            let revision = match compare.target_union.as_mut() {
                Some(TargetUnion::CreateRevision(revision))
                    if compare.target == CompareTarget::Create as i32 =>
                {
                    revision
                }
                Some(TargetUnion::ModRevision(revision))
                    if compare.target == CompareTarget::Mod as i32 =>
                {
                    revision
                }
                _ => continue,
            };
            // A revision before the switch: every key of the new plane
            // changed after it (all show revisions above the offset), and
            // revision 1 orders that way against them and against a key
            // that does not exist (0).
            *revision = lower(*revision, offset).unwrap_or(1);
        }
        for op in self.success.iter_mut().chain(self.failure.iter_mut()) {
            match &mut op.request {
                Some(Request::RequestRange(range)) => range.lower_revisions(offset)?,
                Some(Request::RequestTxn(txn)) => txn.lower_revisions(offset)?,
                _ => {}
            }
        }
        Ok(())
    }
}

impl FromClient for CompactionRequest {
    fn lower_revisions(&mut self, offset: i64) -> Result<(), Status> {
        // Compacting history the new plane never had compacts nothing.
        self.revision = lower(self.revision, offset).unwrap_or(1);
        Ok(())
    }
}

impl FromClient for HashKvRequest {
    fn lower_revisions(&mut self, offset: i64) -> Result<(), Status> {
        self.revision = lower(self.revision, offset).ok_or_else(compacted)?;
        Ok(())
    }
}

/// Requests that name no revision.
macro_rules! no_revisions {
    ($($request:ty),* $(,)?) => {
        $(impl FromClient for $request {})*
    };
}

no_revisions!(
    PutRequest,
    DeleteRangeRequest,
    LeaseGrantRequest,
    LeaseRevokeRequest,
    LeaseTimeToLiveRequest,
    LeaseLeasesRequest,
    AlarmRequest,
    StatusRequest,
    DefragmentRequest,
    HashRequest,
    MoveLeaderRequest,
    DowngradeRequest,
    MemberAddRequest,
    MemberRemoveRequest,
    MemberUpdateRequest,
    MemberListRequest,
    MemberPromoteRequest,
    AuthEnableRequest,
    AuthDisableRequest,
    AuthStatusRequest,
    AuthenticateRequest,
    AuthUserAddRequest,
    AuthUserGetRequest,
    AuthUserListRequest,
    AuthUserDeleteRequest,
    AuthUserChangePasswordRequest,
    AuthUserGrantRoleRequest,
    AuthUserRevokeRoleRequest,
    AuthRoleAddRequest,
    AuthRoleGetRequest,
    AuthRoleListRequest,
    AuthRoleDeleteRequest,
    AuthRoleGrantPermissionRequest,
    AuthRoleRevokePermissionRequest,
);

/// What became of a client's watch request on its way up.
pub(crate) enum WatchUp {
    /// Send it on.
    Forward(WatchRequest),
    /// A create from a revision the upstream cannot replay: sent on from
    /// now, and once created, answered compacted and cancelled.
    CompactedCreate(WatchRequest),
}

/// A client's watch request in the upstream's revisions.
pub(crate) fn watch_from_client(mut request: WatchRequest, offset: i64) -> WatchUp {
    if offset == 0 {
        return WatchUp::Forward(request);
    }
    if let Some(RequestUnion::CreateRequest(create)) = &mut request.request_union {
        match lower(create.start_revision, offset) {
            Some(start) => create.start_revision = start,
            None => {
                create.start_revision = 0;
                return WatchUp::CompactedCreate(request);
            }
        }
    }
    WatchUp::Forward(request)
}

/// The answer to a watch created from a revision before the switch, after
/// its `created` answer: etcd's own compaction cancel.
pub(crate) fn compacted_watch(created: &WatchResponse, offset: i64) -> WatchResponse {
    WatchResponse {
        header: created.header,
        watch_id: created.watch_id,
        created: false,
        canceled: true,
        compact_revision: offset + 1,
        cancel_reason: COMPACTED.to_owned(),
        fragment: false,
        events: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::etcd::etcdserverpb::compare::CompareResult;

    #[test]
    fn revisions_before_the_switch_are_compacted_or_compare_as_old() {
        let offset = 100;
        let mut range = RangeRequest {
            revision: 150,
            max_mod_revision: 50,
            min_mod_revision: 50,
            ..RangeRequest::default()
        };
        range.lower_revisions(offset).expect("after the switch");
        assert_eq!(
            (
                range.revision,
                range.min_mod_revision,
                range.max_mod_revision
            ),
            (50, 0, 1)
        );
        let mut old = RangeRequest {
            revision: 100,
            ..RangeRequest::default()
        };
        assert_eq!(
            old.lower_revisions(offset)
                .expect_err("compacted")
                .message(),
            COMPACTED
        );
        let compare = |target: CompareTarget, revision: i64| Compare {
            result: CompareResult::Equal as i32,
            target: target as i32,
            key: b"k".to_vec(),
            range_end: Vec::new(),
            target_union: Some(if target == CompareTarget::Mod {
                TargetUnion::ModRevision(revision)
            } else {
                TargetUnion::Version(revision)
            }),
        };
        let mut txn = TxnRequest {
            compare: vec![
                compare(CompareTarget::Mod, 40),
                compare(CompareTarget::Mod, 0),
                compare(CompareTarget::Mod, 140),
                compare(CompareTarget::Version, 40),
            ],
            ..TxnRequest::default()
        };
        txn.lower_revisions(offset).expect("compares never fail");
        let values: Vec<_> = txn
            .compare
            .iter()
            .map(|compare| match compare.target_union {
                Some(TargetUnion::ModRevision(value) | TargetUnion::Version(value)) => value,
                _ => -1,
            })
            .collect();
        assert_eq!(values, [1, 0, 40, 40]);
        let mut response = RangeResponse {
            header: Some(ResponseHeader {
                revision: 7,
                ..ResponseHeader::default()
            }),
            kvs: vec![KeyValue {
                create_revision: 2,
                mod_revision: 5,
                ..KeyValue::default()
            }],
            ..RangeResponse::default()
        };
        response.raise_revisions(offset);
        assert_eq!(response.header.expect("header").revision, 107);
        assert_eq!(
            (
                response.kvs[0].create_revision,
                response.kvs[0].mod_revision
            ),
            (102, 105)
        );
    }
}

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
    fn from_client(&mut self, _offset: i64) -> Result<(), Status> {
        Ok(())
    }
}

/// An upstream's answer, as the client must see it.
pub(crate) trait ToClient {
    /// Adds `offset` to every revision in the answer.
    fn to_client(&mut self, offset: i64);
}

/// `response` with `offset` added, as a closure for `map`.
pub(crate) fn shifted<T: ToClient>(
    offset: i64,
) -> impl Fn(tonic::Response<T>) -> tonic::Response<T> {
    move |mut response| {
        if offset != 0 {
            response.get_mut().to_client(offset);
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
    fn to_client(&mut self, offset: i64) {
        raise(&mut self.revision, offset);
    }
}

impl ToClient for KeyValue {
    fn to_client(&mut self, offset: i64) {
        raise(&mut self.create_revision, offset);
        raise(&mut self.mod_revision, offset);
    }
}

impl<T: ToClient> ToClient for Option<T> {
    fn to_client(&mut self, offset: i64) {
        if let Some(inner) = self {
            inner.to_client(offset);
        }
    }
}

impl<T: ToClient> ToClient for Vec<T> {
    fn to_client(&mut self, offset: i64) {
        for item in self {
            item.to_client(offset);
        }
    }
}

/// Answers whose only revision is their header's.
macro_rules! header_only {
    ($($response:ty),* $(,)?) => {
        $(impl ToClient for $response {
            fn to_client(&mut self, offset: i64) {
                self.header.to_client(offset);
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
    fn to_client(&mut self, offset: i64) {
        self.header.to_client(offset);
        self.kvs.to_client(offset);
    }
}

impl ToClient for RangeStreamResponse {
    fn to_client(&mut self, offset: i64) {
        self.range_response.to_client(offset);
    }
}

impl ToClient for PutResponse {
    fn to_client(&mut self, offset: i64) {
        self.header.to_client(offset);
        self.prev_kv.to_client(offset);
    }
}

impl ToClient for DeleteRangeResponse {
    fn to_client(&mut self, offset: i64) {
        self.header.to_client(offset);
        self.prev_kvs.to_client(offset);
    }
}

impl ToClient for TxnResponse {
    fn to_client(&mut self, offset: i64) {
        use response_op::Response;
        self.header.to_client(offset);
        for op in &mut self.responses {
            match &mut op.response {
                Some(Response::ResponseRange(range)) => range.to_client(offset),
                Some(Response::ResponsePut(put)) => put.to_client(offset),
                Some(Response::ResponseDeleteRange(delete)) => delete.to_client(offset),
                Some(Response::ResponseTxn(txn)) => txn.to_client(offset),
                None => {}
            }
        }
    }
}

impl ToClient for HashKvResponse {
    fn to_client(&mut self, offset: i64) {
        self.header.to_client(offset);
        raise(&mut self.compact_revision, offset);
    }
}

impl ToClient for WatchResponse {
    fn to_client(&mut self, offset: i64) {
        self.header.to_client(offset);
        raise(&mut self.compact_revision, offset);
        for event in &mut self.events {
            event.kv.to_client(offset);
            event.prev_kv.to_client(offset);
        }
    }
}

impl FromClient for RangeRequest {
    fn from_client(&mut self, offset: i64) -> Result<(), Status> {
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
    fn from_client(&mut self, offset: i64) -> Result<(), Status> {
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
                Some(Request::RequestRange(range)) => range.from_client(offset)?,
                Some(Request::RequestTxn(txn)) => txn.from_client(offset)?,
                _ => {}
            }
        }
        Ok(())
    }
}

impl FromClient for CompactionRequest {
    fn from_client(&mut self, offset: i64) -> Result<(), Status> {
        // Compacting history the new plane never had compacts nothing.
        self.revision = lower(self.revision, offset).unwrap_or(1);
        Ok(())
    }
}

impl FromClient for HashKvRequest {
    fn from_client(&mut self, offset: i64) -> Result<(), Status> {
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
        header: created.header.clone(),
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
        range.from_client(offset).expect("after the switch");
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
            old.from_client(offset).expect_err("compacted").message(),
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
        txn.from_client(offset).expect("compares never fail");
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
        response.to_client(offset);
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

//! etcd's v3 API, served by forwarding every call to the current upstream:
//! reads straight through, writes through the
//! [gate](crate::gateway::gate).
//!
//! Writes, by method: Put, DeleteRange, a Txn with any put or delete in
//! either branch, Compact, LeaseGrant, LeaseRevoke, and the Auth service's
//! changes (users, roles, enable, disable). Everything else is a read:
//! Range, a Txn of ranges only, Watch, LeaseKeepAlive (a keep-alive renews
//! a lease, it writes no data, and must not stall during a hold),
//! LeaseTimeToLive, LeaseLeases, Authenticate and the Maintenance and
//! Cluster services.
//!
//! A stream (Watch, LeaseKeepAlive, Snapshot) is bound to the upstream it
//! was opened on. When the gateway switches upstream, it ends those
//! streams with `UNAVAILABLE`, and etcd clients open them again, now on
//! the new upstream.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ferry_proto::etcd::etcdserverpb::auth_server::Auth;
use ferry_proto::etcd::etcdserverpb::cluster_server::Cluster;
use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::kv_server::Kv;
use ferry_proto::etcd::etcdserverpb::lease_server::Lease;
use ferry_proto::etcd::etcdserverpb::maintenance_server::Maintenance;
use ferry_proto::etcd::etcdserverpb::watch_server::Watch;
use ferry_proto::etcd::etcdserverpb::*;
use ferry_proto::etcd::etcdserverpb::{request_op, response_op};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use ferry_engine::adapters::etcd::guard_compare;

use super::revisions::{
    FromClient, ToClient, WatchUp, compacted_watch, shifted, watch_from_client,
};
use super::{EtcdUpstream, TOKEN_KEY};
use crate::gateway::Shared;
use crate::gateway::gate::{Admission, WritePermit};
use crate::gateway::settle::AfterFence;

/// Messages buffered each way on a stream the gateway relays.
pub(crate) const STREAM_BUFFER: usize = 64;

/// The metadata a client's call carries on to the upstream: etcd's auth
/// token (gRPC clients send `token`, the HTTP gateway `authorization`), and
/// the client's deadline, so a call the client gave up on is not left
/// running upstream.
const FORWARDED_METADATA: [&str; 3] = [TOKEN_KEY, "authorization", "grpc-timeout"];

/// The stream type of every relayed stream.
pub(crate) type Relayed<T> = ReceiverStream<Result<T, Status>>;

/// The etcd services. Cheap to clone: the state is shared.
#[derive(Clone)]
pub(crate) struct EtcdProxy {
    shared: Arc<Shared<EtcdUpstream>>,
}

impl EtcdProxy {
    pub(crate) fn new(shared: Arc<Shared<EtcdUpstream>>) -> Self {
        Self { shared }
    }

    /// The upstream for a read, counted.
    fn read_upstream(&self) -> Arc<EtcdUpstream> {
        self.shared.reads_forwarded.fetch_add(1, Ordering::Relaxed);
        self.shared.upstream.borrow().clone()
    }

    /// Sends a write through the gate. The upstream call runs in its own
    /// task holding the gate's permit, so a client that goes away does not
    /// cancel a write the upstream may still apply: Hold waits for it.
    async fn write<Req, Resp, Call, Fut>(
        &self,
        request: Request<Req>,
        call: Call,
    ) -> Result<Response<Resp>, Status>
    where
        Req: prost::Message + Send + 'static,
        Resp: Send + 'static,
        Call: FnOnce(Arc<EtcdUpstream>, Request<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<Resp>, Status>> + Send + 'static,
    {
        let request = to_upstream(request);
        let permit = self.admit(request.get_ref().encoded_len()).await?;
        // Read after the permit: a held write goes to the upstream in
        // force at its release.
        let upstream = self.shared.upstream.borrow().clone();
        self.shared.writes_forwarded.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let answer = call(upstream, request).await;
            drop(permit);
            answer
        })
        .await
        .map_err(|error| {
            Status::internal(format!("the gateway's forwarding task failed: {error}"))
        })?
        .map(plain)
    }

    /// A permit to send a write that a fence does not refuse: at once,
    /// after the release, or refused.
    async fn admit(&self, bytes: usize) -> Result<WritePermit, Status> {
        admitted(self.shared.gate.admit_write(bytes as u64)).await
    }

    /// Sends a write that changes keys (Put, DeleteRange, a Txn that
    /// writes) through the gate, so that a fenced plane refuses it itself,
    /// whatever gateway sent it: a Put, or a Txn with a Put at its top level,
    /// as it is (etcd refuses those under ferry's write alarm, see
    /// `ferry_engine::adapters::etcd::fence`); any other write as a Txn
    /// guarded by the fence ([`guard_compare`]). When the plane refuses it,
    /// the gateway reads the fence record: a migration that switched is
    /// followed, and the write is sent once more to the new plane; one that
    /// has not decided yet is answered `UNAVAILABLE`, which clients retry.
    async fn guarded_write<W: GuardedWrite>(
        &self,
        request: Request<W>,
    ) -> Result<Response<W::Response>, Status> {
        let request = to_upstream(request);
        let bytes = request.get_ref().encoded_len() as u64;
        let mut permit = admitted(self.shared.gate.admit_fenced_write(bytes)).await?;
        self.shared.writes_forwarded.fetch_add(1, Ordering::Relaxed);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let (metadata, _, message) = request.into_parts();
            let as_it_is = message.stopped_by_alarm();
            let mut followed = false;
            loop {
                let upstream = shared.upstream.borrow().clone();
                let offset = upstream.revision_offset;
                let mut message = message.clone();
                if offset != 0 {
                    message.lower_revisions(offset)?;
                }
                let client = upstream.kv.clone();
                let refusal = if as_it_is {
                    let mut plain = Request::new(message);
                    *plain.metadata_mut() = metadata.clone();
                    match upstream
                        .call(plain, |request| W::send(client.clone(), request))
                        .await
                    {
                        Ok(response) => {
                            drop(permit);
                            return Ok(shifted(offset)(self::plain(response)));
                        }
                        Err(status) if is_no_space(&status) => Some(status),
                        Err(status) => return Err(status),
                    }
                } else {
                    let mut guarded = Request::new(message.guarded());
                    *guarded.metadata_mut() = metadata.clone();
                    let response = upstream
                        .call(guarded, |request| {
                            let mut client = client.clone();
                            async move { client.txn(request).await }
                        })
                        .await?
                        .into_inner();
                    if response.succeeded {
                        drop(permit);
                        return W::unguarded(response)
                            .map(Response::new)
                            .map(shifted(offset));
                    }
                    None
                };
                // The plane refused it: nothing of this write took effect.
                if shared.gate.snapshot().holding {
                    // A migration holds this gateway (it did not wait for
                    // this write, which was in flight): the write waits in
                    // line with the held ones and goes on after the
                    // release, to the plane that serves then.
                    drop(permit);
                    permit = admitted(shared.gate.admit_fenced_write(bytes)).await?;
                    continue;
                }
                let fenced = |why: String| {
                    Status::unavailable(format!(
                        "the control plane is being switched: {} is fenced by a live migration ({why}); retry",
                        upstream.url
                    ))
                };
                if followed {
                    return Err(fenced("the plane it switched to is fenced too".to_owned()));
                }
                match shared.follow_after_fenced_write(&upstream).await {
                    Ok(AfterFence::Followed) => followed = true,
                    Ok(AfterFence::Undecided) => {
                        return Err(fenced("the migration has not switched yet".to_owned()));
                    }
                    Ok(AfterFence::NotFenced) => {
                        let Some(no_space) = refusal else {
                            return Err(fenced("the fence was lifted meanwhile".to_owned()));
                        };
                        return Err(upstream
                            .no_space_refusal(no_space, shared.connect_timeout)
                            .await);
                    }
                    Err(reason) => return Err(fenced(reason)),
                }
            }
        })
        .await
        .map_err(|error| {
            Status::internal(format!("the gateway's forwarding task failed: {error}"))
        })?
    }

    /// The upstream in force for a new stream, and a receiver that sees
    /// the next switch (subscribed first, so no switch is missed).
    fn stream_upstream(&self) -> (Arc<EtcdUpstream>, watch::Receiver<Arc<EtcdUpstream>>) {
        let mut switched = self.shared.upstream.subscribe();
        let upstream = switched.borrow_and_update().clone();
        self.shared.reads_forwarded.fetch_add(1, Ordering::Relaxed);
        (upstream, switched)
    }

    /// Relays a bidirectional stream (LeaseKeepAlive; Watch has its own,
    /// [`EtcdProxy::relay_watch`]).
    fn relay_bidi<Req, Resp, Open, Fut>(
        &self,
        request: Request<Streaming<Req>>,
        open: Open,
    ) -> Relayed<Resp>
    where
        Req: Send + 'static,
        Resp: ToClient + Send + 'static,
        Open: FnOnce(Arc<EtcdUpstream>, Request<ReceiverStream<Req>>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<Streaming<Resp>>, Status>> + Send,
    {
        let (upstream, switched) = self.stream_upstream();
        let offset = upstream.revision_offset;
        let (metadata, _, mut from_client) = request.into_parts();
        let (to_upstream, upstream_requests) = mpsc::channel(STREAM_BUFFER);
        let mut upstream_request = Request::new(ReceiverStream::new(upstream_requests));
        copy_forwarded(&metadata, upstream_request.metadata_mut());
        let pump = tokio::spawn(async move {
            while let Ok(Some(message)) = from_client.message().await {
                if to_upstream.send(message).await.is_err() {
                    break;
                }
            }
        });
        self.relay_responses(
            (upstream, switched),
            upstream_request,
            open,
            Some(pump),
            move |mut message: Resp| {
                message.raise_revisions(offset);
                vec![message]
            },
        )
    }

    /// Relays a Watch stream. Revisions are translated both ways (see the
    /// `revisions` module); a watch created from a revision before the
    /// switch is created upstream from now, then answered with etcd's
    /// compaction cancel and cancelled upstream, its events never passed on.
    fn relay_watch(&self, request: Request<Streaming<WatchRequest>>) -> Relayed<WatchResponse> {
        let (upstream, switched) = self.stream_upstream();
        let offset = upstream.revision_offset;
        let (metadata, _, mut from_client) = request.into_parts();
        let (to_upstream, upstream_requests) = mpsc::channel(STREAM_BUFFER);
        let mut upstream_request = Request::new(ReceiverStream::new(upstream_requests));
        copy_forwarded(&metadata, upstream_request.metadata_mut());
        // Creates are answered in the order they were sent: whether each
        // must be answered compacted, and the watches cancelled that way.
        let book = Arc::new(std::sync::Mutex::new(WatchBook::default()));
        let pump = {
            let book = book.clone();
            let to_upstream = to_upstream.clone();
            tokio::spawn(async move {
                while let Ok(Some(message)) = from_client.message().await {
                    let is_create = matches!(
                        message.request_union,
                        Some(watch_request::RequestUnion::CreateRequest(_))
                    );
                    let (message, compacted) = match watch_from_client(message, offset) {
                        WatchUp::Forward(message) => (message, false),
                        WatchUp::CompactedCreate(message) => (message, true),
                    };
                    if is_create && let Ok(mut book) = book.lock() {
                        book.creates.push_back(compacted);
                    }
                    if to_upstream.send(message).await.is_err() {
                        break;
                    }
                }
            })
        };
        self.relay_responses(
            (upstream, switched),
            upstream_request,
            |upstream, request| async move { upstream.watch.clone().watch(request).await },
            Some(pump),
            move |mut message: WatchResponse| {
                let Ok(mut book) = book.lock() else {
                    return vec![message];
                };
                if book.cancelled.contains(&message.watch_id) {
                    if message.canceled {
                        book.cancelled.remove(&message.watch_id);
                    }
                    return Vec::new();
                }
                message.raise_revisions(offset);
                if message.created && book.creates.pop_front() == Some(true) {
                    let cancel = compacted_watch(&message, offset);
                    book.cancelled.insert(message.watch_id);
                    let _ = to_upstream.try_send(WatchRequest {
                        request_union: Some(watch_request::RequestUnion::CancelRequest(
                            WatchCancelRequest {
                                watch_id: message.watch_id,
                            },
                        )),
                    });
                    return vec![message, cancel];
                }
                vec![message]
            },
        )
    }

    /// Relays the responses of a stream opened on `upstream`, each through
    /// `down`, until either end closes it or the gateway switches upstream
    /// (then the client gets `UNAVAILABLE`).
    fn relay_responses<UpstreamRequest, Resp, Open, Fut, Down>(
        &self,
        (upstream, mut switched): (Arc<EtcdUpstream>, watch::Receiver<Arc<EtcdUpstream>>),
        request: Request<UpstreamRequest>,
        open: Open,
        request_pump: Option<JoinHandle<()>>,
        mut down: Down,
    ) -> Relayed<Resp>
    where
        UpstreamRequest: Send + 'static,
        Resp: Send + 'static,
        Open: FnOnce(Arc<EtcdUpstream>, Request<UpstreamRequest>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<Streaming<Resp>>, Status>> + Send,
        Down: FnMut(Resp) -> Vec<Resp> + Send + 'static,
    {
        let (to_client, from_relay) = mpsc::channel(STREAM_BUFFER);
        let mut request = request;
        upstream.authorize(&mut request);
        tokio::spawn(async move {
            let _request_pump = AbortOnDrop(request_pump);
            let url = upstream.url.clone();
            let ended = async {
                let mut responses = tokio::select! {
                    biased;
                    _ = switched.changed() => return Ended::Switched,
                    opened = open(upstream, request) => match opened {
                        Ok(response) => response.into_inner(),
                        Err(status) => return Ended::Failed(status),
                    },
                };
                loop {
                    let next = tokio::select! {
                        biased;
                        _ = switched.changed() => return Ended::Switched,
                        next = responses.message() => next,
                    };
                    match next {
                        Ok(Some(message)) => {
                            for message in down(message) {
                                tokio::select! {
                                    biased;
                                    _ = switched.changed() => return Ended::Switched,
                                    sent = to_client.send(Ok(message)) => if sent.is_err() {
                                        return Ended::Quietly;
                                    },
                                }
                            }
                        }
                        Ok(None) => return Ended::Quietly,
                        Err(status) => return Ended::Failed(status),
                    }
                }
            }
            .await;
            // The upstream stream is closed by now; tell the client why.
            let status = match ended {
                Ended::Quietly => return,
                Ended::Failed(status) => status,
                Ended::Switched => Status::unavailable(format!(
                    "the control plane was switched away from {url}; open the stream again"
                )),
            };
            let _ = to_client.send(Err(status)).await;
        });
        ReceiverStream::new(from_relay)
    }

    /// Relays a server stream (RangeStream, Snapshot) opened on the current
    /// upstream, its revisions translated.
    fn relay_server_stream<Req, Resp, Open, Fut>(
        &self,
        request: Request<Req>,
        open: Open,
    ) -> Relayed<Resp>
    where
        Req: Send + 'static,
        Resp: ToClient + Send + 'static,
        Open: FnOnce(Arc<EtcdUpstream>, Request<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<Streaming<Resp>>, Status>> + Send,
    {
        let (upstream, switched) = self.stream_upstream();
        let offset = upstream.revision_offset;
        self.relay_responses(
            (upstream, switched),
            to_upstream(request),
            open,
            None,
            move |mut message: Resp| {
                message.raise_revisions(offset);
                vec![message]
            },
        )
    }
}

/// What a relayed Watch stream remembers to translate compaction.
#[derive(Default)]
struct WatchBook {
    /// For each create sent upstream and not answered yet, in order:
    /// whether it must be answered compacted.
    creates: std::collections::VecDeque<bool>,
    /// Watches cancelled for the client: their upstream answers are dropped.
    cancelled: std::collections::HashSet<i64>,
}

/// How a relayed stream ended.
enum Ended {
    /// A side closed it: nothing more to say.
    Quietly,
    /// The upstream failed it.
    Failed(Status),
    /// The gateway switched upstream.
    Switched,
}

/// Aborts the task when dropped.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// The client's request as the upstream gets it: the message and the auth
/// metadata, nothing else of the client's connection.
fn to_upstream<T>(request: Request<T>) -> Request<T> {
    let (metadata, _, message) = request.into_parts();
    let mut forwarded = Request::new(message);
    copy_forwarded(&metadata, forwarded.metadata_mut());
    forwarded
}

fn copy_forwarded(from: &MetadataMap, to: &mut MetadataMap) {
    for key in FORWARDED_METADATA {
        if let Some(value) = from.get(key) {
            to.insert(key, value.clone());
        }
    }
}

/// The upstream's answer without the upstream's response headers.
fn plain<T>(response: Response<T>) -> Response<T> {
    Response::new(response.into_inner())
}

/// A permit from an admission: at once, after the release, or refused.
async fn admitted(admission: Admission) -> Result<WritePermit, Status> {
    match admission {
        Admission::Pass(permit) => Ok(permit),
        Admission::Held(held) => Ok(held.wait().await?),
        Admission::Refused(refusal) => Err(refusal.into()),
    }
}

/// Whether etcd refused a write for lack of space, or under an alarm
/// raised as if it lacked space (ferry's write alarm is one).
fn is_no_space(status: &Status) -> bool {
    status.code() == tonic::Code::ResourceExhausted
        && status.message().contains("database space exceeded")
}

/// A write that changes keys: sent as it is when etcd refuses it under
/// ferry's write alarm, else as the one op of a Txn guarded by the fence
/// ([`guard_compare`]).
trait GuardedWrite: prost::Message + FromClient + Clone + Send + 'static {
    /// What the client expects back.
    type Response: ToClient + Send + 'static;
    /// Whether etcd refuses this write while an alarm of ferry's is raised
    /// (a Put; a Txn with a Put at its top level, which etcd's quota counts).
    fn stopped_by_alarm(&self) -> bool;
    /// Sends it as it is.
    fn send(
        client: KvClient<Channel>,
        request: Request<Self>,
    ) -> impl Future<Output = Result<Response<Self::Response>, Status>> + Send;
    /// The op, inside a Txn that requires the plane unfenced.
    fn guarded(self) -> TxnRequest;
    /// The client's answer, from the answer to a guarded Txn that passed.
    fn unguarded(response: TxnResponse) -> Result<Self::Response, Status>;
}

fn guarded_txn(op: request_op::Request) -> TxnRequest {
    TxnRequest {
        compare: vec![guard_compare()],
        success: vec![RequestOp { request: Some(op) }],
        failure: Vec::new(),
    }
}

/// The one response of a guarded Txn that passed, and its header (a
/// nested op's own header is not always filled in: the Txn's is).
fn only_response(
    response: TxnResponse,
) -> Result<(response_op::Response, Option<ResponseHeader>), Status> {
    let header = response.header;
    response
        .responses
        .into_iter()
        .next()
        .and_then(|op| op.response)
        .map(|op| (op, header))
        .ok_or_else(|| Status::internal("etcd answered a guarded write with no response"))
}

fn unexpected() -> Status {
    Status::internal("etcd answered a guarded write with another kind of response")
}

impl GuardedWrite for PutRequest {
    type Response = PutResponse;

    fn stopped_by_alarm(&self) -> bool {
        true
    }

    async fn send(
        mut client: KvClient<Channel>,
        request: Request<Self>,
    ) -> Result<Response<PutResponse>, Status> {
        client.put(request).await
    }

    fn guarded(self) -> TxnRequest {
        guarded_txn(request_op::Request::RequestPut(self))
    }

    fn unguarded(response: TxnResponse) -> Result<PutResponse, Status> {
        match only_response(response)? {
            (response_op::Response::ResponsePut(put), header) => Ok(PutResponse { header, ..put }),
            _ => Err(unexpected()),
        }
    }
}

impl GuardedWrite for DeleteRangeRequest {
    type Response = DeleteRangeResponse;

    fn stopped_by_alarm(&self) -> bool {
        false
    }

    async fn send(
        mut client: KvClient<Channel>,
        request: Request<Self>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        client.delete_range(request).await
    }

    fn guarded(self) -> TxnRequest {
        guarded_txn(request_op::Request::RequestDeleteRange(self))
    }

    fn unguarded(response: TxnResponse) -> Result<DeleteRangeResponse, Status> {
        match only_response(response)? {
            (response_op::Response::ResponseDeleteRange(delete), header) => {
                Ok(DeleteRangeResponse { header, ..delete })
            }
            _ => Err(unexpected()),
        }
    }
}

impl GuardedWrite for TxnRequest {
    type Response = TxnResponse;

    fn stopped_by_alarm(&self) -> bool {
        self.success
            .iter()
            .chain(&self.failure)
            .any(|op| matches!(op.request, Some(request_op::Request::RequestPut(_))))
    }

    async fn send(
        mut client: KvClient<Channel>,
        request: Request<Self>,
    ) -> Result<Response<TxnResponse>, Status> {
        client.txn(request).await
    }

    fn guarded(self) -> TxnRequest {
        guarded_txn(request_op::Request::RequestTxn(self))
    }

    fn unguarded(response: TxnResponse) -> Result<TxnResponse, Status> {
        match only_response(response)? {
            (response_op::Response::ResponseTxn(txn), header) => Ok(TxnResponse { header, ..txn }),
            _ => Err(unexpected()),
        }
    }
}

/// Whether a Txn only reads: every op in both branches is a Range (or a
/// nested Txn that only reads). An empty op counts as a write, to be safe.
pub(crate) fn txn_is_read_only(txn: &TxnRequest) -> bool {
    txn.success
        .iter()
        .chain(&txn.failure)
        .all(|op| match &op.request {
            Some(request_op::Request::RequestRange(_)) => true,
            Some(request_op::Request::RequestTxn(nested)) => txn_is_read_only(nested),
            _ => false,
        })
}

/// Forwards a read: `read!(self, request, client.method)`.
macro_rules! read {
    ($self:ident, $request:ident, $client:ident . $method:ident) => {{
        let upstream = $self.read_upstream();
        let offset = upstream.revision_offset;
        let mut request = to_upstream($request);
        if offset != 0 {
            request.get_mut().lower_revisions(offset)?;
        }
        let client = upstream.$client.clone();
        upstream
            .call(request, |request| {
                let mut client = client.clone();
                async move { client.$method(request).await }
            })
            .await
            .map(plain)
            .map(shifted(offset))
    }};
}

/// Forwards a write through the gate: `write!(self, request, client.method)`.
macro_rules! write {
    ($self:ident, $request:ident, $client:ident . $method:ident) => {
        $self
            .write($request, |upstream, mut request| async move {
                let offset = upstream.revision_offset;
                if offset != 0 {
                    request.get_mut().lower_revisions(offset)?;
                }
                let client = upstream.$client.clone();
                upstream
                    .call(request, |request| {
                        let mut client = client.clone();
                        async move { client.$method(request).await }
                    })
                    .await
                    .map(shifted(offset))
            })
            .await
    };
}

#[tonic::async_trait]
impl Kv for EtcdProxy {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        read!(self, request, kv.range)
    }

    type RangeStreamStream = Relayed<RangeStreamResponse>;

    async fn range_stream(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Ok(Response::new(self.relay_server_stream(
            request,
            |upstream, request| async move { upstream.kv.clone().range_stream(request).await },
        )))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.guarded_write(request).await
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        self.guarded_write(request).await
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        if txn_is_read_only(request.get_ref()) {
            read!(self, request, kv.txn)
        } else {
            self.guarded_write(request).await
        }
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        write!(self, request, kv.compact)
    }
}

#[tonic::async_trait]
impl Watch for EtcdProxy {
    type WatchStream = Relayed<WatchResponse>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(self.relay_watch(request)))
    }
}

#[tonic::async_trait]
impl Lease for EtcdProxy {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        write!(self, request, lease.lease_grant)
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        write!(self, request, lease.lease_revoke)
    }

    type LeaseKeepAliveStream = Relayed<LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        Ok(Response::new(
            self.relay_bidi(request, |upstream, request| async move {
                upstream.lease.clone().lease_keep_alive(request).await
            }),
        ))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        read!(self, request, lease.lease_time_to_live)
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        read!(self, request, lease.lease_leases)
    }
}

#[tonic::async_trait]
impl Maintenance for EtcdProxy {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        read!(self, request, maintenance.alarm)
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        read!(self, request, maintenance.status)
    }

    async fn defragment(
        &self,
        request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        read!(self, request, maintenance.defragment)
    }

    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        read!(self, request, maintenance.hash)
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        read!(self, request, maintenance.hash_kv)
    }

    type SnapshotStream = Relayed<SnapshotResponse>;

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Ok(Response::new(self.relay_server_stream(
            request,
            |upstream, request| async move { upstream.maintenance.clone().snapshot(request).await },
        )))
    }

    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        read!(self, request, maintenance.move_leader)
    }

    async fn downgrade(
        &self,
        request: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        read!(self, request, maintenance.downgrade)
    }
}

#[tonic::async_trait]
impl Cluster for EtcdProxy {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        read!(self, request, cluster.member_add)
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        read!(self, request, cluster.member_remove)
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        read!(self, request, cluster.member_update)
    }

    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        read!(self, request, cluster.member_list)
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        read!(self, request, cluster.member_promote)
    }
}

#[tonic::async_trait]
impl Auth for EtcdProxy {
    async fn auth_enable(
        &self,
        request: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        write!(self, request, auth.auth_enable)
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        write!(self, request, auth.auth_disable)
    }

    async fn auth_status(
        &self,
        request: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        read!(self, request, auth.auth_status)
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        read!(self, request, auth.authenticate)
    }

    async fn user_add(
        &self,
        request: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        write!(self, request, auth.user_add)
    }

    async fn user_get(
        &self,
        request: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        read!(self, request, auth.user_get)
    }

    async fn user_list(
        &self,
        request: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        read!(self, request, auth.user_list)
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        write!(self, request, auth.user_delete)
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        write!(self, request, auth.user_change_password)
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        write!(self, request, auth.user_grant_role)
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        write!(self, request, auth.user_revoke_role)
    }

    async fn role_add(
        &self,
        request: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        write!(self, request, auth.role_add)
    }

    async fn role_get(
        &self,
        request: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        read!(self, request, auth.role_get)
    }

    async fn role_list(
        &self,
        request: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        read!(self, request, auth.role_list)
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        write!(self, request, auth.role_delete)
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        write!(self, request, auth.role_grant_permission)
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        write!(self, request, auth.role_revoke_permission)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(request: request_op::Request) -> RequestOp {
        RequestOp {
            request: Some(request),
        }
    }

    #[test]
    fn a_txn_of_ranges_reads_and_any_put_or_delete_writes() {
        let range = || op(request_op::Request::RequestRange(RangeRequest::default()));
        let put = || op(request_op::Request::RequestPut(PutRequest::default()));
        let delete = || {
            op(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest::default(),
            ))
        };
        let reads = TxnRequest {
            success: vec![range(), range()],
            failure: vec![range()],
            ..TxnRequest::default()
        };
        assert!(txn_is_read_only(&reads));
        assert!(txn_is_read_only(&TxnRequest::default()));
        let put_on_failure = TxnRequest {
            success: vec![range()],
            failure: vec![put()],
            ..TxnRequest::default()
        };
        assert!(!txn_is_read_only(&put_on_failure));
        let delete_on_success = TxnRequest {
            success: vec![delete()],
            ..TxnRequest::default()
        };
        assert!(!txn_is_read_only(&delete_on_success));
        let nested_put = TxnRequest {
            success: vec![op(request_op::Request::RequestTxn(put_on_failure))],
            ..TxnRequest::default()
        };
        assert!(!txn_is_read_only(&nested_put));
        let nested_reads = TxnRequest {
            success: vec![op(request_op::Request::RequestTxn(reads))],
            ..TxnRequest::default()
        };
        assert!(txn_is_read_only(&nested_reads));
        assert!(!txn_is_read_only(&TxnRequest {
            success: vec![RequestOp { request: None }],
            ..TxnRequest::default()
        }));
    }
}

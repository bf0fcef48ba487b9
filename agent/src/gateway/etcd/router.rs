//! Routes a call to the etcd service it names (`/etcdserverpb.KV/Put` goes
//! to KV): one match on the path, without a web framework in the way. It
//! also caps what a client may send, as etcd does.

use std::convert::Infallible;
use std::task::{Context, Poll};

use ferry_proto::etcd::etcdserverpb::auth_server::{self, AuthServer};
use ferry_proto::etcd::etcdserverpb::cluster_server::{self, ClusterServer};
use ferry_proto::etcd::etcdserverpb::kv_server::{self, KvServer};
use ferry_proto::etcd::etcdserverpb::lease_server::{self, LeaseServer};
use ferry_proto::etcd::etcdserverpb::maintenance_server::{self, MaintenanceServer};
use ferry_proto::etcd::etcdserverpb::watch_server::{self, WatchServer};
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};

use super::MAX_MESSAGE_BYTES;
use super::proxy::EtcdProxy;

/// What etcd's server takes past `--max-request-bytes` for gRPC's own
/// framing (etcd's `grpcOverheadBytes`): its `MaxRecvMsgSize` is the sum.
pub(crate) const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// How tonic words a request over the decoding limit (`OUT_OF_RANGE`).
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// etcd's services, all served by one [`EtcdProxy`].
#[derive(Clone)]
pub(crate) struct EtcdRouter {
    kv: KvServer<EtcdProxy>,
    watch: WatchServer<EtcdProxy>,
    lease: LeaseServer<EtcdProxy>,
    maintenance: MaintenanceServer<EtcdProxy>,
    cluster: ClusterServer<EtcdProxy>,
    auth: AuthServer<EtcdProxy>,
}

impl EtcdRouter {
    /// A client's request message may be as large as etcd would take with
    /// `--max-request-bytes` = `max_request_bytes`: that plus
    /// [`GRPC_OVERHEAD_BYTES`]. A larger one is refused as its length
    /// arrives, before the proxy holds or forwards it (the gateway took up
    /// to 2 GiB before, and kept held writes in memory). Responses stay
    /// uncapped, as etcd's are (`math.MaxInt32`): a Range may be large.
    pub(crate) fn new(proxy: EtcdProxy, max_request_bytes: usize) -> Self {
        let max_request_message_bytes = max_request_bytes.saturating_add(GRPC_OVERHEAD_BYTES);
        Self {
            kv: KvServer::new(proxy.clone())
                .max_decoding_message_size(max_request_message_bytes)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            watch: WatchServer::new(proxy.clone())
                .max_decoding_message_size(max_request_message_bytes)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            lease: LeaseServer::new(proxy.clone())
                .max_decoding_message_size(max_request_message_bytes),
            maintenance: MaintenanceServer::new(proxy.clone())
                .max_decoding_message_size(max_request_message_bytes)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            cluster: ClusterServer::new(proxy.clone())
                .max_decoding_message_size(max_request_message_bytes),
            auth: AuthServer::new(proxy).max_decoding_message_size(max_request_message_bytes),
        }
    }
}

/// tonic refuses a request over its decoding limit with `OUT_OF_RANGE`;
/// etcd (grpc-go) answers `RESOURCE_EXHAUSTED`, "grpc: received message
/// larger than max", which is what etcd's clients know. (etcd's own
/// `OUT_OF_RANGE`, a future revision, passes unchanged.) Such a refusal is
/// a trailers-only response: its status is in the headers.
fn refused_as_etcd_refuses(response: Response<Body>) -> Response<Body> {
    if response
        .headers()
        .get("grpc-status")
        .is_none_or(|code| code.as_bytes() != b"11")
    {
        return response;
    }
    let Some(status) = tonic::Status::from_header_map(response.headers()) else {
        return response;
    };
    let Some(rest) = status.message().strip_prefix(TONIC_TOO_LARGE) else {
        return response;
    };
    // "2097165 bytes, the limit is: 2097152 bytes"
    let numbers: Vec<&str> = rest
        .split(|character: char| !character.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .collect();
    let (found, limit) = match numbers.as_slice() {
        [found, limit] => (*found, *limit),
        _ => ("?", "?"),
    };
    tonic::Status::resource_exhausted(format!(
        "grpc: received message larger than max ({found} vs. {limit}): the ferry gateway takes requests of up to its --max-request-bytes plus 512 KiB, as etcd does"
    ))
    .into_http()
}

impl Service<Request<Body>> for EtcdRouter {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Every service is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let service = request.uri().path().split('/').nth(1).unwrap_or_default();
        let response = match service {
            kv_server::SERVICE_NAME => self.kv.call(request),
            watch_server::SERVICE_NAME => self.watch.call(request),
            lease_server::SERVICE_NAME => self.lease.call(request),
            maintenance_server::SERVICE_NAME => self.maintenance.call(request),
            cluster_server::SERVICE_NAME => self.cluster.call(request),
            auth_server::SERVICE_NAME => self.auth.call(request),
            _ => {
                let status = tonic::Status::unimplemented(format!(
                    "the ferry gateway does not serve {}",
                    request.uri().path()
                ));
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        Box::pin(async move { response.await.map(refused_as_etcd_refuses) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailers_only(status: tonic::Status) -> Response<Body> {
        status.into_http()
    }

    fn status_of(response: &Response<Body>) -> tonic::Status {
        tonic::Status::from_header_map(response.headers()).expect("a trailers-only status")
    }

    #[test]
    fn tonics_too_large_is_etcds_resource_exhausted() {
        let response = refused_as_etcd_refuses(trailers_only(tonic::Status::out_of_range(
            "Error, decoded message length too large: found 2097165 bytes, the limit is: 2097152 bytes",
        )));
        let status = status_of(&response);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status
                .message()
                .starts_with("grpc: received message larger than max (2097165 vs. 2097152)"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn etcds_own_out_of_range_and_other_answers_pass_unchanged() {
        let future_revision =
            tonic::Status::out_of_range("etcdserver: mvcc: required revision is a future revision");
        let response = refused_as_etcd_refuses(trailers_only(future_revision));
        assert_eq!(status_of(&response).code(), tonic::Code::OutOfRange);
        let unavailable = refused_as_etcd_refuses(trailers_only(tonic::Status::unavailable("x")));
        assert_eq!(status_of(&unavailable).code(), tonic::Code::Unavailable);
        let ok = refused_as_etcd_refuses(Response::new(Body::default()));
        assert!(ok.headers().get("grpc-status").is_none());
    }
}

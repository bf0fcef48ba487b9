//! Routes a call to the etcd service it names (`/etcdserverpb.KV/Put` goes
//! to KV): one match on the path, without a web framework in the way.

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

use super::proxy::EtcdProxy;
use super::upstream::MAX_MESSAGE_BYTES;

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
    pub(crate) fn new(proxy: EtcdProxy) -> Self {
        Self {
            kv: KvServer::new(proxy.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            watch: WatchServer::new(proxy.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            lease: LeaseServer::new(proxy.clone()),
            maintenance: MaintenanceServer::new(proxy.clone())
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            cluster: ClusterServer::new(proxy.clone()),
            auth: AuthServer::new(proxy),
        }
    }
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
        match service {
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
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

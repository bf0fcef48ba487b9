//! `ferry.v1.GatewayAdmin`: what `ferry migrate` drives the cutover with
//! (`proto/ferry/v1/gateway.proto`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_proto::v1::gateway_admin_server::GatewayAdmin;
use ferry_proto::v1::{
    GatewayStatusRequest, GatewayStatusResponse, HoldRequest, HoldResponse, ReleaseRequest,
    ReleaseResponse, SwitchRequest, SwitchResponse,
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::Shared;
use super::upstream::Upstream;

/// The admin service. Cheap to clone: the state is shared.
#[derive(Clone)]
pub(crate) struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl GatewayAdmin for AdminService {
    async fn hold(&self, request: Request<HoldRequest>) -> Result<Response<HoldResponse>, Status> {
        let HoldRequest {
            epoch,
            max_pause_ms,
        } = request.into_inner();
        let max_pause = match max_pause_ms {
            0 => self.shared.default_max_pause,
            millis => Duration::from_millis(millis),
        };
        let drained = self
            .shared
            .gate
            .hold(epoch, max_pause)
            .await
            .inspect_err(|error| warn!(epoch, %error, "hold failed"))?;
        info!(epoch, ?max_pause, drained, "writes held");
        Ok(Response::new(HoldResponse {
            drained_writes: drained,
        }))
    }

    async fn switch(
        &self,
        request: Request<SwitchRequest>,
    ) -> Result<Response<SwitchResponse>, Status> {
        let SwitchRequest {
            epoch,
            upstream_url,
        } = request.into_inner();
        self.shared.gate.may_switch(epoch)?;
        // Connect before anything changes: an unreachable upstream leaves
        // the old one in place.
        let upstream = Upstream::connect(
            &upstream_url,
            &self.shared.access,
            self.shared.connect_timeout,
        )
        .await
        .inspect_err(|error| warn!(epoch, %error, "switch failed"))?;
        let to = upstream.url.clone();
        let mut from = String::new();
        self.shared.gate.switch_if_holding(epoch, || {
            from = self
                .shared
                .upstream
                .send_replace(Arc::new(upstream))
                .url
                .clone();
        })?;
        info!(epoch, %from, %to, "upstream switched");
        Ok(Response::new(SwitchResponse {}))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let ReleaseRequest { epoch } = request.into_inner();
        let released = self.shared.gate.release(epoch)?;
        info!(
            epoch,
            released = released.released,
            refused = released.refused,
            "writes released"
        );
        Ok(Response::new(ReleaseResponse {
            released_writes: released.released,
            rejected_writes: released.refused,
        }))
    }

    async fn status(
        &self,
        _request: Request<GatewayStatusRequest>,
    ) -> Result<Response<GatewayStatusResponse>, Status> {
        let gate = self.shared.gate.snapshot();
        Ok(Response::new(GatewayStatusResponse {
            upstream_url: self.shared.upstream.borrow().url.clone(),
            holding: gate.holding,
            epoch: gate.epoch,
            writes_forwarded: self.shared.writes_forwarded.load(Ordering::Relaxed),
            reads_forwarded: self.shared.reads_forwarded.load(Ordering::Relaxed),
        }))
    }
}

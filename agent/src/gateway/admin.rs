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
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::upstream::{UpstreamPlane, describe_record, successor};
use super::{SETTLE_BOUND, Shared};

/// The admin service of a gateway in front of planes of kind `U`.
pub(crate) struct AdminService<U: UpstreamPlane> {
    shared: Arc<Shared<U>>,
}

impl<U: UpstreamPlane> AdminService<U> {
    pub(crate) fn new(shared: Arc<Shared<U>>) -> Self {
        Self { shared }
    }
}

/// The stream a Hold answers on: its first message says the writes in
/// flight drained; it ends when the hold is lifted.
type HoldStream = ReceiverStream<Result<HoldResponse, Status>>;

#[tonic::async_trait]
impl<U: UpstreamPlane> GatewayAdmin for AdminService<U> {
    type HoldStream = HoldStream;

    async fn hold(&self, request: Request<HoldRequest>) -> Result<Response<HoldStream>, Status> {
        let HoldRequest {
            epoch,
            max_pause_ms,
        } = request.into_inner();
        let max_pause = match max_pause_ms {
            0 => self.shared.default_max_pause,
            millis => Duration::from_millis(millis),
        };
        let (drained, id) = self
            .shared
            .gate
            .begin_hold(epoch, max_pause + SETTLE_BOUND)
            .inspect_err(|error| warn!(epoch, %error, "hold refused"))?;
        // The hold is a lease on this stream from now on: the caller going
        // away before Release, or the pause running out, lapses it (also
        // when the drain below fails), and the gateway settles it from the
        // fence record by itself.
        let (answer, answers) = mpsc::channel(1);
        let lease = answer.clone();
        let shared = self.shared.clone();
        let lapse_at = id.started + max_pause;
        tokio::spawn(async move {
            let why = tokio::select! {
                () = shared.gate.until_released(id) => return,
                () = lease.closed() => "the driver went away",
                () = tokio::time::sleep_until(lapse_at) => "the pause ran out",
            };
            shared.settle_lapsed_hold(id, why).await;
        });
        self.shared
            .gate
            .drain(id)
            .await
            .inspect_err(|error| warn!(epoch, %error, "hold failed"))?;
        info!(epoch, ?max_pause, drained, "writes held");
        let _ = answer
            .send(Ok(HoldResponse {
                drained_writes: drained,
            }))
            .await;
        Ok(Response::new(ReceiverStream::new(answers)))
    }

    async fn switch(
        &self,
        request: Request<SwitchRequest>,
    ) -> Result<Response<SwitchResponse>, Status> {
        let SwitchRequest {
            epoch,
            upstream_url,
        } = request.into_inner();
        let _one_at_a_time = self.shared.switching.lock().await;
        let current = self.shared.upstream.borrow().clone();
        if current.url() == upstream_url && self.shared.gate.snapshot().epoch == epoch {
            // Done already (a lapsed hold followed the record there).
            return Ok(Response::new(SwitchResponse {}));
        }
        self.shared.gate.may_switch(epoch)?;
        // The old plane's record decides, not this call: only a switch the
        // migration committed there is made.
        let record = current
            .fence_record(self.shared.connect_timeout)
            .await
            .map_err(Status::unavailable)?;
        let committed = record.switched
            && record.epoch == epoch
            && successor(&record) == Some(upstream_url.as_str());
        if !committed {
            return Err(Status::failed_precondition(format!(
                "the fence record of {} says {}, not that epoch {epoch} switched to {upstream_url}: commit the switch in the old plane first",
                current.url(),
                describe_record(&record)
            )));
        }
        // Connect before anything changes: an unreachable upstream leaves
        // the old one in place.
        let mut upstream = U::connect(
            &upstream_url,
            &self.shared.access,
            self.shared.connect_timeout,
        )
        .await
        .inspect_err(|error| warn!(epoch, %error, "switch failed"))?;
        upstream.set_position_offset(record.successor_position_offset);
        upstream
            .adopt_plane_offset(self.shared.connect_timeout)
            .await
            .inspect_err(|error| warn!(epoch, %error, "switch failed"))?;
        let to = upstream.url().to_owned();
        let offset = upstream.position_offset();
        let mut from = String::new();
        self.shared.gate.switch_if_holding(epoch, || {
            from = self
                .shared
                .upstream
                .send_replace(Arc::new(upstream))
                .url()
                .to_owned();
        })?;
        info!(epoch, %from, %to, position_offset = offset, "upstream switched");
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
            upstream_url: self.shared.upstream.borrow().url().to_owned(),
            holding: gate.holding,
            epoch: gate.epoch,
            writes_forwarded: self.shared.writes_forwarded.load(Ordering::Relaxed),
            reads_forwarded: self.shared.reads_forwarded.load(Ordering::Relaxed),
            revision_offset: self.shared.upstream.borrow().position_offset(),
            queued_writes: gate.queued,
            settling: self
                .shared
                .settling
                .lock()
                .map(|note| note.clone())
                .unwrap_or_default(),
        }))
    }
}

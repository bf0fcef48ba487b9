//! What the gateway needs of one kind of upstream plane: to connect to one,
//! to read and move its fence record in the live contract's words
//! ([`FenceState`], [`FenceMove`], [`FenceAnswer`]), the position offset
//! its clients see, and to serve the platform's client protocol. The gate,
//! the admin service and the settling of a lapsed hold are written against
//! this trait alone; etcd's v3 gRPC proxy is one kind (`super::etcd`), and a
//! PostgreSQL wire proxy or an HTTP proxy would be others.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::adapters::live::{FenceAnswer, FenceMove, FenceState};
use tokio::net::TcpListener;

use super::{GatewayError, Shared};

/// One upstream plane of a kind, connected: what the gateway forwards its
/// clients to, and whose fence record decides where it forwards them.
///
/// # Contract
/// - `connect` fails, naming the URL, when the plane does not answer
///   within the timeout; nothing is changed in the plane.
/// - `fence_record` reads the record that `ferry migrate`'s source agent
///   moves (the same one its `LiveSource::fence_state` reads), with the
///   gateway's own credentials; `guard_epochs` is not read and stays empty
///   (the gateway looks at the record every 2 s, and settling never needs
///   the store-level guards; a kind that must explain a refusal by them
///   reads them itself).
/// - `move_fence` moves that record by the same compare-and-swap as the
///   source agent's moves, so that a gateway's unfence and a driver's
///   commit cannot both win; the gateway only ever unfences.
/// - The position offset is added to every position the plane's clients
///   are answered with and taken off every one they send (0 for a plane
///   nothing switched to); `adopt_plane_offset` replaces it with the one the
///   plane keeps for itself, when it keeps one.
/// - `serve_clients` admits every write through `shared`'s gate and sends
///   it to the upstream in force when its permit is given, never to one a
///   switch replaced; it ends streams bound to a replaced upstream; and it
///   returns once `shutdown` completes (open streams may outlive it; the
///   gateway gives them a moment).
pub trait UpstreamPlane: Sized + Send + Sync + std::fmt::Debug + 'static {
    /// The kind, for messages: `etcd`.
    const KIND: &'static str;
    /// The URL schemes that name a plane of this kind (`etcd`, `etcds`).
    const SCHEMES: &'static [&'static str];
    /// The gateway's own credentials and TLS towards every upstream of this
    /// kind: the first, and each one a switch moves to.
    type Access: Clone + Default + std::fmt::Debug + Send + Sync + 'static;
    /// What this kind bounds in what its clients send (etcd: the request
    /// size the plane itself would take).
    type ClientLimits: Send + 'static;

    /// Connects to the plane at `url` with `access`; fails if it does not
    /// answer within `timeout`.
    fn connect(
        url: &str,
        access: &Self::Access,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self, GatewayError>> + Send;

    /// The plane's URL as its clients and `ferry migrate` name it, never
    /// with credentials: for Status, Switch and messages.
    fn url(&self) -> &str;

    /// What the gateway adds to this plane's positions in what its clients
    /// see: 0 for the first upstream, the fence record's
    /// `successor_position_offset` after a switch.
    fn position_offset(&self) -> i64;

    /// Sets [`UpstreamPlane::position_offset`] (before the plane serves).
    fn set_position_offset(&mut self, offset: i64);

    /// Reads the position offset the plane keeps for itself (written there
    /// just before the switch to it was committed) into the offset: a
    /// gateway started in front of a plane that took over shows its clients
    /// the same positions as the gateways that followed the switch.
    fn adopt_plane_offset(
        &mut self,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// The plane's fence record (see the contract: without `guard_epochs`);
    /// the error says what failed, naming the plane.
    fn fence_record(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<FenceState, String>> + Send;

    /// Moves the plane's fence record as `change` says.
    fn move_fence(
        &self,
        change: &FenceMove,
        timeout: Duration,
    ) -> impl Future<Output = Result<FenceAnswer, String>> + Send;

    /// Serves the platform's client protocol on `listener` (with TLS from
    /// the certificate and key in `tls`, when given), forwarding through
    /// `shared`, until `shutdown` completes or the server fails.
    fn serve_clients(
        shared: Arc<Shared<Self>>,
        listener: TcpListener,
        tls: Option<(PathBuf, PathBuf)>,
        limits: Self::ClientLimits,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = Result<(), GatewayError>> + Send;
}

/// A fence record for messages, in a few words.
pub(crate) fn describe_record(state: &FenceState) -> String {
    let successor = successor(state).unwrap_or("?");
    if !state.recorded {
        "no fence".to_owned()
    } else if state.switched {
        format!("switched to {successor} by epoch {}", state.epoch)
    } else if state.fenced {
        format!(
            "fenced by epoch {}, switching to {successor}, not switched",
            state.epoch
        )
    } else {
        format!("not fenced (last epoch {})", state.epoch)
    }
}

/// The plane a fence record names to take over, if it names one.
pub(crate) fn successor(state: &FenceState) -> Option<&str> {
    Some(state.successor_url.as_str()).filter(|url| !url.is_empty())
}

/// Whether a migration fenced the plane and has not decided yet.
pub(crate) fn in_doubt(state: &FenceState) -> bool {
    state.fenced && !state.switched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_described_as_it_stands() {
        let fenced = FenceState {
            recorded: true,
            epoch: 3,
            fenced: true,
            successor_url: "new://b".to_owned(),
            ..FenceState::default()
        };
        assert_eq!(describe_record(&FenceState::default()), "no fence");
        assert_eq!(
            describe_record(&fenced),
            "fenced by epoch 3, switching to new://b, not switched"
        );
        assert!(in_doubt(&fenced));
        let switched = FenceState {
            switched: true,
            ..fenced.clone()
        };
        assert_eq!(describe_record(&switched), "switched to new://b by epoch 3");
        assert!(!in_doubt(&switched));
        let unfenced = FenceState {
            recorded: true,
            epoch: 4,
            ..FenceState::default()
        };
        assert_eq!(describe_record(&unfenced), "not fenced (last epoch 4)");
        assert_eq!(successor(&unfenced), None);
        assert_eq!(
            describe_record(&FenceState {
                successor_url: String::new(),
                ..switched
            }),
            "switched to ? by epoch 3"
        );
    }
}

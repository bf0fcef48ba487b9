//! Every gateway replica in front of the old plane, driven as one: a
//! cutover holds them all before it fences, and switches and releases them
//! all. Each call has a deadline, so a replica that hangs fails its step
//! instead of stalling the cutover.
//!
//! A hold is a lease on its Hold stream (`proto/ferry/v1/gateway.proto`):
//! [`Gateways::hold`] keeps the streams open until [`Gateways::release`]
//! answered, so a driver that dies lets every replica's hold lapse at once,
//! and each settles from the old plane's fence record by itself.

use std::time::Duration;

use ferry_proto::v1::{
    GatewayStatusRequest, GatewayStatusResponse, HoldRequest, HoldResponse, ReleaseRequest,
    ReleaseResponse, SwitchRequest,
};
use futures::future::join_all;
use tonic::Streaming;

use crate::client::{ClientError, ClientOptions, GatewayClient, connect_gateway};
use crate::remote::status_text;

/// How long a gateway has to answer a call that does not wait for
/// anything (Status, Switch, Release).
pub(crate) const GATEWAY_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One replica.
struct Replica {
    address: String,
    client: GatewayClient,
    /// The Hold stream while this driver holds the replica.
    lease: Option<Streaming<HoldResponse>>,
}

/// The gateway replicas of a migration.
pub(crate) struct Gateways {
    replicas: Vec<Replica>,
}

/// What a call to every replica gave: each replica's answer, or why not.
pub(crate) type EachAnswer<T> = Vec<(String, Result<T, String>)>;

async fn within<T>(
    address: &str,
    what: &str,
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        Ok(Err(status)) => Err(format!(
            "the gateway at {address} could not {what}: {}",
            status_text(&status)
        )),
        Err(_) => Err(format!(
            "the gateway at {address} did not {what} within {timeout:?}"
        )),
    }
}

impl Gateways {
    /// Connects to every replica's admin service.
    pub(crate) async fn connect(
        addresses: &[String],
        options: &ClientOptions,
    ) -> Result<Self, (String, ClientError)> {
        let mut replicas = Vec::with_capacity(addresses.len());
        for address in addresses {
            let client = connect_gateway(address, options)
                .await
                .map_err(|error| (address.clone(), error))?;
            replicas.push(Replica {
                address: address.clone(),
                client,
                lease: None,
            });
        }
        Ok(Self { replicas })
    }

    /// The replicas' addresses, comma-separated, for messages.
    pub(crate) fn addresses(&self) -> String {
        self.replicas
            .iter()
            .map(|replica| replica.address.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every replica's status.
    pub(crate) async fn status(&self) -> EachAnswer<GatewayStatusResponse> {
        join_all(self.replicas.iter().map(|replica| {
            let mut client = replica.client.clone();
            let address = replica.address.clone();
            async move {
                let answer = within(
                    &address,
                    "tell its status",
                    GATEWAY_CALL_TIMEOUT,
                    client.status(GatewayStatusRequest {}),
                )
                .await;
                (address, answer)
            }
        }))
        .await
    }

    /// Holds every replica for `epoch`, at once, and waits until each has
    /// drained its writes in flight, within `max_pause`. Returns the writes
    /// drained in all; the first failure otherwise (the holds taken stay
    /// leased to this driver until [`Gateways::release`]).
    pub(crate) async fn hold(&mut self, epoch: u64, max_pause: Duration) -> Result<u64, String> {
        let max_pause_ms = u64::try_from(max_pause.as_millis()).unwrap_or(u64::MAX);
        let holds = join_all(self.replicas.iter().map(|replica| {
            let mut client = replica.client.clone();
            let address = replica.address.clone();
            async move {
                async {
                    let mut lease = within(
                        &address,
                        "hold writes",
                        max_pause,
                        client.hold(HoldRequest {
                            epoch,
                            max_pause_ms,
                        }),
                    )
                    .await?;
                    let drained = match tokio::time::timeout(max_pause, lease.message()).await {
                        Ok(Ok(Some(answer))) => answer.drained_writes,
                        Ok(Ok(None)) => {
                            return Err(format!(
                                "the gateway at {address} ended its hold before it drained"
                            ));
                        }
                        Ok(Err(status)) => {
                            return Err(format!(
                                "the gateway at {address} could not hold writes: {}",
                                status_text(&status)
                            ));
                        }
                        Err(_) => {
                            return Err(format!(
                                "the gateway at {address} did not drain its writes in flight within {max_pause:?}"
                            ));
                        }
                    };
                    Ok((lease, drained))
                }
                .await
            }
        }))
        .await;
        let mut drained = 0;
        let mut failure = None;
        for (replica, held) in self.replicas.iter_mut().zip(holds) {
            match held {
                Ok((lease, writes)) => {
                    replica.lease = Some(lease);
                    drained += writes;
                }
                Err(reason) => {
                    failure.get_or_insert(reason);
                }
            }
        }
        match failure {
            Some(reason) => Err(reason),
            None => Ok(drained),
        }
    }

    /// Switches every replica to `upstream_url` (each checks the old
    /// plane's fence record says the migration committed it). Returns the
    /// replicas that did not, with why: after the commit they settle by
    /// themselves once their hold lapses.
    pub(crate) async fn switch(&self, epoch: u64, upstream_url: &str) -> Vec<String> {
        let answers = join_all(self.replicas.iter().map(|replica| {
            let mut client = replica.client.clone();
            let address = replica.address.clone();
            let upstream_url = upstream_url.to_owned();
            async move {
                within(
                    &address,
                    "switch to the new plane",
                    GATEWAY_CALL_TIMEOUT,
                    client.switch(SwitchRequest {
                        epoch,
                        upstream_url,
                    }),
                )
                .await
            }
        }))
        .await;
        answers.into_iter().filter_map(Result::err).collect()
    }

    /// Releases every replica (a few tries each), then lets go of the
    /// holds' leases. Returns the released and rejected writes in all, and
    /// the replicas that did not confirm.
    pub(crate) async fn release(&mut self, epoch: u64) -> (ReleaseResponse, Vec<String>) {
        let answers = join_all(self.replicas.iter().map(|replica| {
            let client = replica.client.clone();
            let address = replica.address.clone();
            async move { release_one(client, &address, epoch).await }
        }))
        .await;
        let mut total = ReleaseResponse::default();
        let mut failures = Vec::new();
        for answer in answers {
            match answer {
                Ok(released) => {
                    total.released_writes += released.released_writes;
                    total.rejected_writes += released.rejected_writes;
                }
                Err(reason) => failures.push(reason),
            }
        }
        for replica in &mut self.replicas {
            replica.lease = None;
        }
        (total, failures)
    }
}

/// Releases one replica, trying again on quick failures, all within
/// [`GATEWAY_CALL_TIMEOUT`]: a replica that hangs is not waited for (its
/// hold lapses with this driver's lease and it settles by itself).
async fn release_one(
    mut client: GatewayClient,
    address: &str,
    epoch: u64,
) -> Result<ReleaseResponse, String> {
    let mut last = String::new();
    let tries = async {
        for attempt in 0..5 {
            match client.release(ReleaseRequest { epoch }).await {
                Ok(answer) => return Ok(answer.into_inner()),
                Err(status) => {
                    last = format!(
                        "the gateway at {address} could not release the held writes: {}",
                        status_text(&status)
                    );
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
            }
        }
        Err(())
    };
    match tokio::time::timeout(GATEWAY_CALL_TIMEOUT, tries).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(())) => Err(last),
        Err(_) => Err(format!(
            "the gateway at {address} did not release the held writes within {GATEWAY_CALL_TIMEOUT:?}{}",
            if last.is_empty() {
                String::new()
            } else {
                format!(" ({last})")
            }
        )),
    }
}

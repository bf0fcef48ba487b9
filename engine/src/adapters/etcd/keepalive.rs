//! Keeping a target's leases alive while a live stream applies to it: the
//! source's clients keep the leases alive on the source only, so a long
//! migration would otherwise let them expire on the target (and delete
//! their keys there) before the cutover.

use std::collections::HashMap;
use std::time::Duration;

use ferry_proto::etcd::etcdserverpb::LeaseKeepAliveRequest;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use super::client::EtcdClient;
use super::{EtcdConnection, KIND_LEASE};
use crate::adapters::AdapterError;
use crate::{Op, Result};

/// Leases announced to the keeper at once, waiting for it.
const LEASES_AHEAD: usize = 256;
/// How often the keeper looks for leases due.
const TICK: Duration = Duration::from_millis(500);

/// Keeps leases alive on a target, each every third of its TTL, until
/// dropped (or until etcd says the lease is gone).
#[derive(Debug)]
pub struct LeaseKeeper {
    leases: mpsc::Sender<(i64, i64)>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Connects to the target and starts keeping nothing alive yet.
    pub async fn start(connection: &EtcdConnection) -> Result<Self> {
        let client = EtcdClient::connect(connection)
            .await
            .map_err(AdapterError::target)?;
        let (leases, receiver) = mpsc::channel(LEASES_AHEAD);
        let task = tokio::spawn(keep_alive(client, receiver));
        Ok(Self { leases, task })
    }

    /// Keeps lease `id`, of `ttl` seconds, alive from now on.
    pub async fn keep(&self, id: i64, ttl: i64) {
        let _ = self.leases.send((id, ttl)).await;
    }

    /// Keeps alive every lease granted by the `etcd.lease` ops among `ops`.
    pub async fn keep_granted(&self, ops: &[Op]) {
        #[derive(serde::Deserialize)]
        struct LeaseBody {
            id: i64,
            ttl: i64,
        }
        for op in ops
            .iter()
            .filter(|op| &op.kind[..] == KIND_LEASE.as_bytes())
        {
            if let Ok(lease) = serde_json::from_slice::<LeaseBody>(&op.body) {
                self.keep(lease.id, lease.ttl).await;
            }
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The time to renew a lease of `ttl` seconds again.
fn next_due(ttl: i64) -> Instant {
    Instant::now() + Duration::from_millis((ttl.max(1) as u64) * 1000 / 3).max(TICK)
}

async fn keep_alive(client: EtcdClient, mut announced: mpsc::Receiver<(i64, i64)>) {
    // Lease id → when to renew it.
    let mut due: HashMap<i64, Instant> = HashMap::new();
    loop {
        // etcd answers the call only once it has a request to answer: the
        // stream opens with a keep-alive of every lease known.
        while due.is_empty() {
            match announced.recv().await {
                Some((id, ttl)) => {
                    due.insert(id, next_due(ttl));
                }
                None => return,
            }
        }
        let (requests, request_stream) = mpsc::channel::<LeaseKeepAliveRequest>(64);
        for id in due.keys().take(64) {
            let _ = requests.try_send(LeaseKeepAliveRequest { id: *id });
        }
        let mut responses = match client
            .lease()
            .lease_keep_alive(ReceiverStream::new(request_stream))
            .await
        {
            Ok(responses) => responses.into_inner(),
            Err(status) => {
                warn!(%status, "cannot open the lease keep-alive stream on the target; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = client.reauthenticate().await;
                continue;
            }
        };
        let mut tick = tokio::time::interval(TICK);
        let broken = loop {
            tokio::select! {
                lease = announced.recv() => match lease {
                    Some((id, ttl)) => {
                        due.insert(id, next_due(ttl));
                    }
                    None => return,
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    let ids: Vec<i64> = due
                        .iter()
                        .filter(|(_, when)| **when <= now)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in ids {
                        // Not renewed twice while the answer is on its way.
                        due.insert(id, next_due(3));
                        if requests.send(LeaseKeepAliveRequest { id }).await.is_err() {
                            break;
                        }
                    }
                }
                response = responses.message() => match response {
                    Ok(Some(response)) if response.ttl <= 0 => {
                        debug!(lease = response.id, "lease gone on the target; no longer kept alive");
                        due.remove(&response.id);
                    }
                    Ok(Some(response)) => {
                        due.insert(response.id, next_due(response.ttl));
                    }
                    Ok(None) => break "the stream ended".to_owned(),
                    Err(status) => break status.to_string(),
                },
            }
        };
        warn!(reason = %broken, "the lease keep-alive stream on the target broke; opening it again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

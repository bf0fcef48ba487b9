//! etcd under the live contract ([`crate::adapters::live`]): the source's
//! stream is [`EtcdSource::open_live`], its fence the record and write
//! alarm of the fence module, its digest [`digest_range`]; the sink is an
//! [`EtcdSink`] applying one Txn chain in seq order, with the stream's
//! leases kept alive on the target until the switch (the source's clients
//! keep them alive on the source only).

use std::sync::Arc;

use async_trait::async_trait;

use super::fence::{adopt_revision_offset, fence_state, move_fence, read_fence, read_fence_alarms};
use super::{
    EtcdConnection, EtcdError, EtcdSink, EtcdSinkOptions, EtcdSource, EtcdSourceOptions, KIND_KV,
    KIND_LEASE, LeaseKeeper, RevisionOffset, describe_cluster, digest_range, read_checkpoint,
};
use crate::adapters::live::{
    Applied, Capabilities, DigestEntry, FenceAnswer, FenceMove, FenceState, LiveApply, LiveFrom,
    LiveSink, LiveSource, LiveStream, PlaneDescription, PlaneDigest, Position, StoredStream,
};
use crate::adapters::{AdapterError, Sink, StreamInfo};
use crate::progress::Progress;
use crate::{Op, Result};

/// What etcd can do, as a source and as a sink.
pub const CAPABILITIES: Capabilities = Capabilities {
    position_unit: "etcd revision",
    transactions: true,
    snapshot_reread: true,
    store_fence: true,
    server_assigned_ids: false,
};

/// What an etcd op counts as in [`digest_range`]'s set digest: a Put its
/// key and value, a lease nothing (digests leave leases out); a delete or
/// any other method cannot be compared.
pub fn digest_entry(op: &Op) -> DigestEntry<'_> {
    if op.kind == KIND_LEASE.as_bytes() {
        DigestEntry::Uncounted
    } else if op.kind == KIND_KV.as_bytes() && op.method == "Put".as_bytes() {
        DigestEntry::Entry {
            key: &op.key,
            value: &op.body,
        }
    } else {
        DigestEntry::Unverifiable
    }
}

/// An etcd cluster as a live source.
#[derive(Debug, Clone)]
pub struct EtcdLiveSource {
    connection: EtcdConnection,
    /// Key ranges a snapshot reads at once.
    parallel: usize,
}

impl EtcdLiveSource {
    /// The cluster of `connection`, its snapshots read `parallel` ranges at
    /// once.
    pub fn new(connection: EtcdConnection, parallel: usize) -> Self {
        Self {
            connection,
            parallel: parallel.max(1),
        }
    }
}

/// An etcd cluster as a live sink.
#[derive(Debug, Clone)]
pub struct EtcdLiveSink {
    connection: EtcdConnection,
    /// The target's Txn limits; the rest is the live stream's own.
    options: EtcdSinkOptions,
}

impl EtcdLiveSink {
    /// The cluster of `connection`, written with Txns as `options` limit
    /// them (`max_txn_ops`, `max_request_bytes`; the others are set per
    /// stream).
    pub fn new(connection: EtcdConnection, options: EtcdSinkOptions) -> Self {
        Self {
            connection,
            options,
        }
    }
}

async fn describe(connection: &EtcdConnection) -> Result<PlaneDescription> {
    let description = describe_cluster(connection).await?;
    Ok(PlaneDescription {
        platform: "etcd".to_owned(),
        version: description.version,
        identity: description.identity,
        url: connection.display(),
    })
}

async fn digest(
    connection: &EtcdConnection,
    prefix: &[u8],
    position: Position,
    error: fn(EtcdError) -> AdapterError,
) -> Result<PlaneDigest> {
    let digest = digest_range(connection, prefix, position.0 as i64)
        .await
        .map_err(error)?;
    Ok(PlaneDigest {
        keys: digest.keys,
        bytes: digest.bytes,
        sha256: digest.sha256,
        set_sha256: digest.set_sha256,
        position: Position(digest.revision.max(0) as u64),
    })
}

#[async_trait]
impl LiveSource for EtcdLiveSource {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn display(&self) -> String {
        self.connection.display()
    }

    async fn describe(&self) -> Result<PlaneDescription> {
        describe(&self.connection).await
    }

    async fn open(&self, prefix: &[u8], from: LiveFrom) -> Result<LiveStream> {
        EtcdSource::new(
            self.connection.clone(),
            EtcdSourceOptions {
                prefix: prefix.to_vec(),
                parallel: self.parallel,
            },
        )
        .open_live(from, Arc::new(Progress::default()))
        .await
    }

    async fn move_fence(&self, wanted: FenceMove) -> Result<FenceAnswer> {
        Ok(move_fence(&self.connection, &wanted)
            .await
            .map_err(AdapterError::source)?
            .into_answer(&self.connection.display()))
    }

    async fn fence_state(&self) -> Result<FenceState> {
        let (stored, alarms) = tokio::join!(
            read_fence(&self.connection),
            read_fence_alarms(&self.connection)
        );
        let guard_epochs = alarms.map_err(AdapterError::source)?;
        let stored = stored.map_err(AdapterError::source)?;
        Ok(fence_state(stored.as_ref(), guard_epochs))
    }

    async fn digest(&self, prefix: &[u8], position: Position) -> Result<PlaneDigest> {
        digest(&self.connection, prefix, position, AdapterError::source).await
    }
}

#[async_trait]
impl LiveSink for EtcdLiveSink {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn display(&self) -> String {
        self.connection.display()
    }

    async fn describe(&self) -> Result<PlaneDescription> {
        describe(&self.connection).await
    }

    async fn stored(&self, stream_id: &str) -> Result<StoredStream> {
        let (checkpoint, epoch) = read_checkpoint(&self.connection, stream_id).await?;
        Ok(StoredStream {
            applied: checkpoint.map(|checkpoint| Applied {
                through_seq: checkpoint.applied_through_seq,
                through_position: Position(checkpoint.applied_through_position),
            }),
            epoch,
        })
    }

    async fn open(&self, stream: &StreamInfo, epoch: u64) -> Result<Box<dyn LiveApply>> {
        // The sink's begin claims the target for `epoch`, refusing it when
        // the target holds a higher one (G5).
        let mut sink = EtcdSink::new(
            self.connection.clone(),
            EtcdSinkOptions {
                epoch,
                allow_nonempty: false,
                // Every apply's end says what is in the target.
                durable_each_apply: true,
                // A live stream's Txns land in seq order (G2).
                lanes: 1,
                ..self.options.clone()
            },
        );
        let held_through_seq = sink
            .begin(stream)
            .await
            .map_err(in_migration_words)?
            .unwrap_or(0);
        let leases = match LeaseKeeper::start(&self.connection).await {
            Ok(keeper) => Some(keeper),
            Err(error) => {
                tracing::warn!(%error, "cannot keep the stream's leases alive on the target");
                None
            }
        };
        Ok(Box::new(EtcdLiveApply {
            sink,
            held_through_seq,
            leases,
        }))
    }

    async fn adopt(&self, epoch: u64, position_offset: i64) -> Result<Result<(), u64>> {
        Ok(adopt_revision_offset(
            &self.connection,
            RevisionOffset {
                epoch,
                revision_offset: position_offset,
            },
        )
        .await
        .map_err(AdapterError::target)?)
    }

    async fn digest(&self, prefix: &[u8], position: Position) -> Result<PlaneDigest> {
        digest(&self.connection, prefix, position, AdapterError::target).await
    }
}

/// A target that already holds keys, told in a live migration's words (the
/// restore's advice, `--allow-nonempty`, is no option of `ferry migrate`):
/// its keys may be what an earlier migration applied before it stopped
/// without a switch, and merging a new snapshot into them would keep keys
/// since deleted.
fn in_migration_words(error: crate::Error) -> crate::Error {
    match &error {
        crate::Error::Adapter(failure) => match failure.platform_error::<EtcdError>() {
            Some(EtcdError::NotEmpty {
                endpoints,
                examples,
            }) => AdapterError::target(EtcdError::NewPlaneNotEmpty {
                endpoints: endpoints.clone(),
                examples: examples.clone(),
            })
            .into(),
            _ => error,
        },
        _ => error,
    }
}

/// One stream applied to etcd.
struct EtcdLiveApply {
    sink: EtcdSink,
    held_through_seq: u64,
    leases: Option<LeaseKeeper>,
}

#[async_trait]
impl LiveApply for EtcdLiveApply {
    fn held_through_seq(&self) -> u64 {
        self.held_through_seq
    }

    async fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        let granted: Vec<Op> = ops
            .iter()
            .filter(|op| &op.kind[..] == KIND_LEASE.as_bytes())
            .cloned()
            .collect();
        self.sink.apply(ops).await?;
        if let Some(leases) = &self.leases {
            leases.keep_granted(&granted).await;
        }
        Ok(())
    }

    fn applied(&self) -> Option<Applied> {
        self.sink.checkpoint().map(|checkpoint| Applied {
            through_seq: checkpoint.applied_through_seq,
            through_position: Position(checkpoint.applied_through_position),
        })
    }

    async fn finish(self: Box<Self>) -> Result<()> {
        Box::new(self.sink).finish().await
    }
}

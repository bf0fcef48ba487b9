//! The live contract: a [`LiveSource`] beside the old control plane streams
//! a snapshot and every change after it, and can fence the plane's writes;
//! a [`LiveSink`] beside the new plane applies that stream exactly once.
//! The agents serve these traits over gRPC and `ferry migrate --live`
//! drives the cutover through them; neither knows which platform is behind
//! them. `docs/DESIGN.md` ("The live contract") has the whole picture.

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::sync::Notify;

use super::StreamInfo;
use crate::manifest::SourceInfo;
use crate::{Op, Result};

/// A point in a source's history, in the adapter's own unit
/// ([`Capabilities::position_unit`]): an etcd revision, a PostgreSQL LSN.
/// Positions of one source only grow; 0 means "none" or "now" where a
/// method says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position(pub u64);

impl std::fmt::Display for Position {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}", self.0)
    }
}

/// What a live source or sink can do. The caller honours it: `ferry
/// migrate` refuses a plan the adapters cannot carry out, and a relay never
/// asks a source for what it lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// What a [`Position`] counts, for people: `etcd revision`, `LSN`.
    pub position_unit: &'static str,
    /// A source transaction is applied as one target transaction (G3 at
    /// the sink); without it, a sink applies op by op, idempotently.
    pub transactions: bool,
    /// A broken stream can be resumed inside its snapshot: the source can
    /// read the snapshot at R again (etcd can, at any revision it has not
    /// compacted; a PostgreSQL exported snapshot dies with its session).
    /// Without it, a stream broken before its snapshot completed starts
    /// over on an empty target.
    pub snapshot_reread: bool,
    /// The plane itself refuses writes once fenced, from any client (etcd's
    /// alarm, PostgreSQL's triggers); without it only the gateways hold
    /// writes back, so a live migration needs at least one gateway.
    pub store_fence: bool,
    /// The target assigns ids of its own (MLflow run ids): the sink keeps
    /// an old-to-new map, durable with its checkpoint, and a digest of the
    /// two planes compares what ids do not change.
    pub server_assigned_ids: bool,
}

/// What a control plane is, for `Describe`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlaneDescription {
    /// The platform, as ops' kinds name it: `etcd`.
    pub platform: String,
    /// Its version, e.g. `3.4.23`.
    pub version: String,
    /// A stable identity (etcd's cluster id): two streams from different
    /// planes are never mixed in one target.
    pub identity: String,
    /// Its address for people and its clients, never with credentials.
    pub url: String,
}

/// Where a live stream starts, or where a broken one resumes. A stream is
/// resumed statelessly from what the target holds (its checkpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveFrom {
    /// `None`: a new stream, with a new snapshot at the current position R.
    /// `Some(R)`: resume the stream whose snapshot was taken at R.
    pub snapshot: Option<Position>,
    /// Resume only: the target holds every op through this seq.
    pub from_seq_exclusive: u64,
    /// Resume only: the target holds every change through this position.
    pub from_position_exclusive: Position,
    /// Resume only: the seq the snapshot ended at, when the caller saw its
    /// [`LiveEvent::SnapshotComplete`].
    pub snapshot_through_seq: Option<u64>,
}

impl LiveFrom {
    /// True when the resume point lies past the snapshot taken at
    /// `snapshot`: the snapshot need not (and, without
    /// [`Capabilities::snapshot_reread`], cannot) be read again.
    pub fn past_snapshot(&self, snapshot: Position) -> bool {
        self.snapshot_through_seq
            .is_some_and(|through| self.from_seq_exclusive >= through)
            || self.from_position_exclusive > snapshot
    }
}

/// One event of a live stream.
#[derive(Debug, Clone, PartialEq)]
pub enum LiveEvent {
    /// Ops, seqs contiguous with the previous batch's. A batch ends inside
    /// a source transaction only when the transaction is larger than a
    /// batch may be; the sink holds its target transaction open until the
    /// op with `txn_last` (G3).
    Batch(Vec<Op>),
    /// The snapshot is complete through `through_seq`; its ops all have
    /// `position` R. Changes follow. Not repeated when a resume skips the
    /// snapshot.
    SnapshotComplete {
        /// The snapshot's last seq.
        through_seq: u64,
        /// R.
        position: u64,
    },
    /// Every change of the source at or below `position` has been sent, up
    /// to `through_seq`; the source itself is at `head_position`. Sent after
    /// changes and at least every second while following.
    Progress {
        /// The highest position whose changes have all been sent.
        position: u64,
        /// The source's current position, as it last said.
        head_position: u64,
        /// The last seq sent.
        through_seq: u64,
    },
}

/// A live stream: the snapshot, then the changes after it, without end.
pub struct LiveStream {
    /// What the ops are taken from.
    pub info: SourceInfo,
    /// R: the position the snapshot is read at (on a resume, the one asked
    /// for).
    pub snapshot_position: Position,
    /// The events. The stream ends only with an `Err` (e.g. the source
    /// lost history the stream had yet to read), or when dropped.
    pub events: BoxStream<'static, Result<LiveEvent>>,
    /// Asks the stream to report its progress now rather than at the next
    /// second (after a fence, say).
    pub progress_requests: ProgressRequester,
}

impl std::fmt::Debug for LiveStream {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LiveStream")
            .field("info", &self.info)
            .field("snapshot_position", &self.snapshot_position)
            .finish_non_exhaustive()
    }
}

/// Asks a live stream to learn where its source stands and report a
/// [`LiveEvent::Progress`] soon.
#[derive(Debug, Clone, Default)]
pub struct ProgressRequester(pub(crate) Arc<Notify>);

impl ProgressRequester {
    /// Requests a progress report (coalesced with any pending request).
    pub fn request(&self) {
        self.0.notify_one();
    }

    /// True when both ask the same stream.
    pub fn same_as(&self, other: &ProgressRequester) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A move of the old plane's fence record (see `docs/DESIGN.md`, "The
/// cutover").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceMove {
    /// Fence for `epoch`, naming the plane that takes over.
    Fence {
        /// The migration attempt.
        epoch: u64,
        /// The successor's URL, as its clients reach it.
        successor: String,
    },
    /// Commit `epoch`'s switch: the old plane never takes a write again.
    Commit {
        /// The migration attempt.
        epoch: u64,
        /// What gateways add to the successor's positions so that clients
        /// never see one go backwards (etcd revisions); 0 when nothing.
        successor_position_offset: i64,
    },
    /// Unfence for `epoch`: a rollback, or an abort of an attempt that will
    /// never switch.
    Unfence {
        /// The migration attempt.
        epoch: u64,
    },
}

impl FenceMove {
    /// The migration attempt the move is for.
    pub fn epoch(&self) -> u64 {
        match self {
            FenceMove::Fence { epoch, .. }
            | FenceMove::Commit { epoch, .. }
            | FenceMove::Unfence { epoch } => *epoch,
        }
    }
}

/// What became of a [`FenceMove`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceAnswer {
    /// Done, or found done already: the fenced position F for a fence or a
    /// commit (every write the plane acknowledged before the fence lies at
    /// or below it), the position of the write for an unfence.
    Done(Position),
    /// The record forbids it: a later attempt owns the plane, the
    /// migration switched already, the plane is not fenced by this epoch.
    Refused(String),
}

/// The old plane's fence record, as `ferry migrate status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceState {
    /// False when no migration ever fenced this plane.
    pub recorded: bool,
    /// The attempt that last moved the record.
    pub epoch: u64,
    /// Fenced and not unfenced since.
    pub fenced: bool,
    /// The migration committed its switch away from this plane.
    pub switched: bool,
    /// The plane that takes over, named by the fence.
    pub successor_url: String,
    /// F, while fenced.
    pub fenced_position: Position,
    /// See [`FenceMove::Commit`].
    pub successor_position_offset: i64,
    /// Epochs whose store-level write guard is raised (etcd: ferry's
    /// `NOSPACE` alarms): a guard raised with the record unfenced is an
    /// attempt that died between the two, and `abort` lowers it.
    pub guard_epochs: Vec<u64>,
}

/// What one op counts as in its sink's [`PlaneDigest`], applied to a plane
/// that lacks its key: `ferry migrate --verify` through a version chain
/// sums the chain's image of the old plane with it, in a
/// [`SetDigest`](super::digest::SetDigest), to compare with the new plane's
/// `set_sha256`. Each adapter says it for its own ops
/// ([`Adapter::digest_entry`](super::registry::Adapter::digest_entry)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestEntry<'a> {
    /// Nothing: the plane's digest leaves such ops out (etcd's leases).
    Uncounted,
    /// This key with this value.
    Entry {
        /// The key as the plane's digest hashes it.
        key: &'a [u8],
        /// The value as the plane's digest hashes it.
        value: &'a [u8],
    },
    /// The op leaves no entry to compare (a delete, an unknown method): an
    /// image holding it cannot be verified.
    Unverifiable,
}

/// What a plane holds under a key prefix at a position, summed up: two
/// planes holding the same keys with the same bodies agree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlaneDigest {
    /// Keys counted.
    pub keys: u64,
    /// Bytes of their keys and bodies.
    pub bytes: u64,
    /// SHA-256 over them in key order.
    pub sha256: [u8; 32],
    /// A digest of the same entries that does not depend on their order.
    pub set_sha256: [u8; 32],
    /// The position read.
    pub position: Position,
}

/// Where a stream stands in a target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Every op through this seq has taken effect (0: none).
    pub through_seq: u64,
    /// The source position of that op.
    pub through_position: Position,
}

/// What a target holds of a stream: how far it got, and the highest epoch
/// any migration attempt raised it to (G5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredStream {
    /// `None` when the target holds nothing of the stream.
    pub applied: Option<Applied>,
    /// 0 when no attempt wrote into the target.
    pub epoch: u64,
}

/// The old control plane, live.
///
/// # Contract
/// - `open` streams a snapshot at one position R, then every change after
///   R, in commit order, one group of adjacent ops per source transaction
///   (`txn` shared, `txn_last` on its last op), seqs contiguous from 1
///   (G1-G3). Ops under a key prefix only, when one is given.
/// - A resume ([`LiveFrom::snapshot`] set) gives exactly the ops an
///   unbroken stream would have given after `from_seq_exclusive`, with the
///   same seqs, but for re-announcements the adapter documents (etcd
///   grants a lease again). Past the snapshot it never needs the snapshot;
///   inside it, only a source with [`Capabilities::snapshot_reread`] is
///   asked.
/// - `fence` returns F: every write the plane acknowledged before it lies
///   at or below F, and none is acknowledged after it until `unfence`.
///   Every move is idempotent for its epoch and refused for an older one.
/// - `confirm` says the target holds the stream durably through a
///   position; a source may release what it kept for it (a replication
///   slot's WAL), and never needs anything at or below it again.
/// - Errors are the adapter's own, classed
///   ([`ErrorClass`](crate::ErrorClass)), naming what and where.
#[async_trait]
pub trait LiveSource: Send + Sync + 'static {
    /// What it can do.
    fn capabilities(&self) -> Capabilities;
    /// The plane, for messages (never credentials).
    fn display(&self) -> String;
    /// What the plane is now.
    async fn describe(&self) -> Result<PlaneDescription>;
    /// Opens a stream of the keys under `prefix` (all when empty).
    async fn open(&self, prefix: &[u8], from: LiveFrom) -> Result<LiveStream>;
    /// Moves the fence record as `wanted` says.
    async fn move_fence(&self, wanted: FenceMove) -> Result<FenceAnswer>;
    /// Reads the fence record.
    async fn fence_state(&self) -> Result<FenceState>;
    /// The digest of the keys under `prefix` at `position` (0: now).
    async fn digest(&self, prefix: &[u8], position: Position) -> Result<PlaneDigest>;
    /// The target holds stream `stream_id` durably through `applied`.
    async fn confirm(&self, stream_id: &str, applied: Applied) -> Result<()> {
        let _ = (stream_id, applied);
        Ok(())
    }
}

/// The new control plane, live.
///
/// # Contract
/// - `stored` reads, from the target itself, how far a stream got and the
///   highest epoch that wrote: the checkpoint is written atomically with
///   the ops it covers (G4), so a sink killed at any point resumes from it
///   with nothing applied twice.
/// - `open` refuses an epoch lower than the stored one (G5) and a stream
///   from another source than the one the target holds; once opened, a
///   later epoch opening the same target makes every further apply of this
///   one fail.
/// - `adopt` records in the target that it succeeds the old plane for
///   `epoch` (etcd: the revision offset its gateways add); refused, with
///   the later epoch, when a later attempt adopted it.
#[async_trait]
pub trait LiveSink: Send + Sync + 'static {
    /// What it can do.
    fn capabilities(&self) -> Capabilities;
    /// The plane, for messages (never credentials).
    fn display(&self) -> String;
    /// What the plane is now.
    async fn describe(&self) -> Result<PlaneDescription>;
    /// What the target holds of `stream_id`.
    async fn stored(&self, stream_id: &str) -> Result<StoredStream>;
    /// Starts applying `stream` for migration attempt `epoch`.
    async fn open(&self, stream: &StreamInfo, epoch: u64) -> Result<Box<dyn LiveApply>>;
    /// Records the successor's position offset for `epoch`: `Err(later)`
    /// when a later attempt recorded one.
    async fn adopt(&self, epoch: u64, position_offset: i64) -> Result<Result<(), u64>>;
    /// The digest of the keys under `prefix` at `position` (0: now).
    async fn digest(&self, prefix: &[u8], position: Position) -> Result<PlaneDigest>;
}

/// One stream being applied.
///
/// # Contract
/// - `held_through_seq` is what the target held when the stream opened;
///   `apply` receives batches in seq order and skips nothing itself (the
///   caller drops the ops at or below `held_through_seq`).
/// - When `apply` returns `Ok`, every op of it whose source transaction is
///   complete has taken effect and [`LiveApply::applied`] says through
///   where; an op of a transaction still open may wait for the rest.
#[async_trait]
pub trait LiveApply: Send {
    /// The seq through which the target held the stream when opened.
    fn held_through_seq(&self) -> u64;
    /// Applies a batch of ops, in order.
    async fn apply(&mut self, ops: Vec<Op>) -> Result<()>;
    /// How far the target holds the stream now, as it confirmed.
    fn applied(&self) -> Option<Applied>;
    /// The whole stream was applied: marks it complete and releases the
    /// target.
    async fn finish(self: Box<Self>) -> Result<()>;
}

//! PostgreSQL as a live source: a snapshot from a persistent logical slot,
//! then the slot's changes (see [`super::follow`]), one group per source
//! transaction in commit order.
//!
//! - A new stream makes (or refreshes) the publication naming the tables
//!   the selection picks, refusing tables without a primary key by name,
//!   then extracts with a kept slot (dropping a leftover of the same name
//!   first): the slot's consistent point is R. It checks that the
//!   publication names exactly the snapshot's tables (a table created or
//!   dropped meanwhile stops it: start again), sends the snapshot, then
//!   follows the slot from R.
//! - A resume past the snapshot follows the slot from the position the
//!   target holds; one inside the snapshot is refused (an exported
//!   snapshot dies with its session, so it cannot be read again).
//! - `confirm` moves the slot's confirmed position to what the target
//!   holds durably, so the server keeps no WAL the migration no longer
//!   needs and a crash loses nothing.
//! - The fence: statement triggers on every migrated table, the
//!   sequences' values (logical replication carries no `nextval`) and a
//!   marker whose LSN is F (see `fence.rs`); the digest: `digest.rs`.
//! - A committed switch (also one found committed already) drops the slot
//!   and the publication: the slot would hold the old server's WAL
//!   forever. A walsender still reading the slot is ended first. A drop
//!   that fails leaves the commit standing (the switch is decided) and
//!   logs a warning with the SQL that drops them by hand. An unfence keeps
//!   both: a later attempt resumes from the slot.
//!
//! [`PgLiveSink`] applies the stream on one connection through the shared
//! driver.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use super::follow::{ChangeFeed, FeedEvent, FeedOptions};
use super::replication::Lsn;
use super::source::{PgSource, PgSourceOptions, TablePlan, plan_tables};
use super::{PgConnection, PgError, qualified, quote_ident, quote_literal};
use crate::adapters::AdapterError;
use crate::adapters::driver::{DriverOptions, SinkDriver};
use crate::adapters::live::{
    Applied, Capabilities, FenceAnswer, FenceMove, FenceState, LiveApply, LiveEvent, LiveFrom,
    LiveSink, LiveSource, LiveStream, PlaneDescription, PlaneDigest, Position, ProgressRequester,
    StoredStream,
};
use crate::adapters::{Sink, StreamInfo};
use crate::manifest::SourceInfo;
use crate::progress::Progress;
use crate::{Op, Result};

/// Events a stream reads ahead of its consumer at most.
const EVENTS_AHEAD: usize = 8;
/// How long dropping the slot and the publication after a switch may take,
/// waiting for the walsender that read the slot to end included.
const RELEASE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);
/// Ops in one batch of changes at most.
const BATCH_OPS: usize = 1_000;
/// Bytes of keys and bodies in one batch of changes at most.
const BATCH_BYTES: usize = 1 << 20;

/// What a live stream of a PostgreSQL database reads.
#[derive(Debug, Clone)]
pub struct PgLiveOptions {
    /// The tables (schemas, tables, `--parallel`); `keep_slot` is ignored:
    /// the slot is `slot`.
    pub source: PgSourceOptions,
    /// The persistent logical slot the stream follows.
    pub slot: String,
    /// The publication naming the tables.
    pub publication: String,
}

/// A PostgreSQL database as the old plane of a live migration.
#[derive(Debug)]
pub struct PgLiveSource {
    connection: PgConnection,
    options: PgLiveOptions,
    /// The highest position the target confirmed (see
    /// [`PgLiveSource::confirm`]), read by every open stream.
    confirmed: watch::Sender<u64>,
}

/// Drops the slot and the publication once the switch is committed (in
/// the background, after the commit answered);
/// a failure is a warning naming the SQL that drops them by hand, never
/// an error (the switch is decided).
async fn release_after_switch(connection: PgConnection, slot: String, publication: String) {
    let (slot, publication) = (slot.as_str(), publication.as_str());
    let slot_by_hand = format!("SELECT pg_drop_replication_slot({});", quote_literal(slot));
    let publication_by_hand = format!("DROP PUBLICATION IF EXISTS {};", quote_ident(publication));
    let released = tokio::time::timeout(RELEASE_WITHIN, release(&connection, slot, publication))
        .await
        .unwrap_or_else(|_| {
            let late =
                format!("not done within {RELEASE_WITHIN:?} (is something else reading the slot?)");
            (Err(late.clone()), Err(late))
        });
    let server = connection.server();
    match released.0 {
        Ok(true) => {
            info!(%server, slot, "the migration switched: its replication slot is dropped")
        }
        Ok(false) => {
            info!(%server, slot, "the migration switched: its replication slot was dropped already")
        }
        Err(error) => warn!(
            %server,
            slot,
            %error,
            "the migration switched, but its replication slot could not be dropped, and it holds the old server's WAL until it is: drop it by hand with {slot_by_hand}"
        ),
    }
    if let Err(error) = released.1 {
        warn!(
            %server,
            publication,
            %error,
            "the migration switched, but its publication could not be dropped: drop it by hand with {publication_by_hand}"
        );
    }
}

fn source_error(error: PgError) -> crate::Error {
    AdapterError::source(error).into()
}

impl PgLiveSource {
    /// The database `connection` reaches.
    pub fn new(connection: PgConnection, options: PgLiveOptions) -> Self {
        Self {
            connection,
            options,
            confirmed: watch::Sender::new(0),
        }
    }

    /// The target holds every change through `position` durably.
    fn confirm_position(&self, position: Position) {
        self.confirmed.send_if_modified(|confirmed| {
            let moved = position.0 > *confirmed;
            *confirmed = (*confirmed).max(position.0);
            moved
        });
    }

    /// Opens a stream from `from` (see the module's documentation).
    async fn open_from(&self, from: LiveFrom) -> Result<LiveStream> {
        match from.snapshot {
            None => self.open_new().await,
            Some(snapshot) if from.past_snapshot(snapshot) => self.resume(snapshot, from).await,
            Some(snapshot) => Err(source_error(PgError::Precondition {
                server: self.connection.server(),
                reason: format!(
                    "the stream broke inside its snapshot (at LSN {}, after seq {}), and a PostgreSQL snapshot cannot be read again: start the migration over on an empty target",
                    Lsn(snapshot.0),
                    from.from_seq_exclusive
                ),
            })),
        }
    }

    /// The tables and sequences the stream carries.
    fn selection(&self) -> super::catalog::Selection {
        super::catalog::Selection {
            schemas: self.options.source.schemas.clone(),
            tables: self.options.source.tables.clone(),
        }
    }

    /// Moves the fence record as `wanted` says: a fence raises the
    /// triggers that refuse writes on every migrated table, copies the
    /// sequences and answers F, an unfence drops the triggers (see
    /// `fence.rs`); a commit done (now or before) releases the slot and
    /// the publication.
    async fn move_fence_record(&self, wanted: FenceMove) -> Result<FenceAnswer> {
        let answer = super::fence::move_fence(
            &self.connection,
            &self.options.publication,
            &self.selection(),
            &wanted,
        )
        .await
        .map_err(source_error)?;
        if matches!(wanted, FenceMove::Commit { .. }) && matches!(answer, FenceAnswer::Done(_)) {
            // After the answer, not inside the pause: the gateways are
            // switched sooner, and the slot's WAL is freed a moment later.
            tokio::spawn(release_after_switch(
                self.connection.clone(),
                self.options.slot.clone(),
                self.options.publication.clone(),
            ));
        }
        Ok(answer)
    }

    /// The fence record, and the epoch whose triggers are raised.
    async fn read_fence_state(&self) -> Result<FenceState> {
        super::plane::fence_state(&self.connection)
            .await
            .map_err(source_error)
    }

    fn feed_options(&self, start: Lsn) -> FeedOptions {
        FeedOptions {
            slot: self.options.slot.clone(),
            publication: self.options.publication.clone(),
            start,
            schemas: self.options.source.schemas.clone(),
            tables: self.options.source.tables.clone(),
        }
    }

    async fn open_new(&self) -> Result<LiveStream> {
        let server = self.connection.server();
        let client = self.connection.connect().await.map_err(source_error)?;
        let tables = self.publish(&client).await.map_err(source_error)?;
        let mut source_options = self.options.source.clone();
        source_options.keep_slot = Some(self.options.slot.clone());
        let source = PgSource::new(self.connection.clone(), source_options);
        let (extraction, snapshotted) = source
            .open_extraction(Arc::new(Progress::default()))
            .await?;
        let snapshot_tables: Vec<String> = snapshotted
            .plans
            .iter()
            .map(|plan| qualified(&plan.table.schema, &plan.table.name))
            .collect();
        if snapshot_tables != tables {
            return Err(source_error(PgError::Precondition {
                server,
                reason: format!(
                    "the tables changed while the migration started (published: {}; in the snapshot: {}): start it again",
                    tables.join(", "),
                    snapshot_tables.join(", ")
                ),
            }));
        }
        let position = extraction.info.snapshot_position.unwrap_or(0);
        info!(slot = %self.options.slot, position = %Lsn(position), "PostgreSQL live stream opened with a new snapshot");
        let (sender, receiver) = mpsc::channel(EVENTS_AHEAD);
        let requester = ProgressRequester::default();
        let follower = Follower {
            connection: self.connection.clone(),
            options: self.feed_options(Lsn(position)),
            plans: Some((snapshotted.plans, snapshotted.version)),
            confirmations: self.confirmed.subscribe(),
            report: requester.0.clone(),
            sender,
            seq: 0,
            position: Lsn(position),
        };
        let snapshot = extraction.ops;
        tokio::spawn(follower.run(Some(snapshot)));
        Ok(LiveStream {
            info: extraction.info,
            snapshot_position: Position(position),
            events: Box::pin(ReceiverStream::new(receiver)),
            progress_requests: requester,
        })
    }

    async fn resume(&self, snapshot: Position, from: LiveFrom) -> Result<LiveStream> {
        let plane = describe(&self.connection, AdapterError::source).await?;
        let info = SourceInfo {
            platform: plane.platform,
            platform_version: Some(plane.version.clone()),
            identity: Some(plane.identity),
            snapshot_position: Some(snapshot.0),
            key_prefix: None,
            description: Some(format!(
                "PostgreSQL {} database {} followed from slot {}",
                plane.version, self.connection.dbname, self.options.slot
            )),
        };
        let start = Lsn(from.from_position_exclusive.0.max(snapshot.0));
        info!(slot = %self.options.slot, from = %start, after_seq = from.from_seq_exclusive, "PostgreSQL live stream resumed");
        let (sender, receiver) = mpsc::channel(EVENTS_AHEAD);
        let requester = ProgressRequester::default();
        let follower = Follower {
            connection: self.connection.clone(),
            options: self.feed_options(start),
            plans: None,
            confirmations: self.confirmed.subscribe(),
            report: requester.0.clone(),
            sender,
            seq: from.from_seq_exclusive,
            position: start,
        };
        tokio::spawn(follower.run(None));
        Ok(LiveStream {
            info,
            snapshot_position: snapshot,
            events: Box::pin(ReceiverStream::new(receiver)),
            progress_requests: requester,
        })
    }

    /// Makes the publication name exactly the tables the selection picks
    /// now, refusing a table without a primary key; the tables, quoted, in
    /// the catalog's order.
    async fn publish(&self, client: &tokio_postgres::Client) -> Result<Vec<String>, PgError> {
        let server = self.connection.server();
        let failed =
            |what: &str, error: tokio_postgres::Error| PgError::statement(&server, what, &error);
        let selection = super::catalog::Selection {
            schemas: self.options.source.schemas.clone(),
            tables: self.options.source.tables.clone(),
        };
        let catalog = super::catalog::read_now(client, &server, &selection).await?;
        let plans: Vec<Arc<TablePlan>> = plan_tables(&catalog, &server)?;
        let keyless: Vec<String> = plans
            .iter()
            .filter(|plan| plan.key_columns.is_empty())
            .map(|plan| plan.table.display_name())
            .collect();
        if !keyless.is_empty() {
            return Err(PgError::Precondition {
                server,
                reason: format!(
                    "{} {} no primary key, and a live migration follows rows by their primary key: add one (ALTER TABLE ... ADD PRIMARY KEY (...)), or leave the table out with --schema/--table",
                    keyless.join(", "),
                    if keyless.len() == 1 { "has" } else { "have" }
                ),
            });
        }
        if plans.is_empty() {
            return Err(PgError::Precondition {
                server,
                reason: "the selection picks no table to migrate".to_owned(),
            });
        }
        let tables: Vec<String> = plans
            .iter()
            .map(|plan| qualified(&plan.table.schema, &plan.table.name))
            .collect();
        let publication = quote_ident(&self.options.publication);
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1)",
                &[&self.options.publication],
            )
            .await
            .map_err(|error| failed("looking for the publication", error))?
            .get(0);
        let statement = if exists {
            format!(
                "ALTER PUBLICATION {publication} SET TABLE {}",
                tables.join(", ")
            )
        } else {
            format!(
                "CREATE PUBLICATION {publication} FOR TABLE {}",
                tables.join(", ")
            )
        };
        client
            .batch_execute(&statement)
            .await
            .map_err(|error| failed(&format!("publishing the tables ({statement})"), error))?;
        Ok(tables)
    }
}

/// The task behind a live stream: the snapshot's batches, then the slot's
/// changes.
struct Follower {
    connection: PgConnection,
    options: FeedOptions,
    /// The snapshot's tables and version; `None` on a resume (the catalog
    /// is read as it is now).
    plans: Option<(Vec<Arc<TablePlan>>, Bytes)>,
    confirmations: watch::Receiver<u64>,
    report: Arc<Notify>,
    sender: mpsc::Sender<Result<LiveEvent>>,
    /// The last seq sent.
    seq: u64,
    /// Every change at or below this position was sent.
    position: Lsn,
}

impl Follower {
    async fn run(mut self, snapshot: Option<futures::stream::BoxStream<'static, Result<Vec<Op>>>>) {
        if let Err(error) = self.follow(snapshot).await {
            let _ = self.sender.send(Err(error)).await;
        }
    }

    /// Sends `event`; false when the consumer went away. While the
    /// consumer is slow, `feed` (once following) keeps telling the server
    /// how far the target got.
    async fn send(&self, feed: Option<&mut ChangeFeed>, event: LiveEvent) -> Result<bool> {
        let permit = match feed {
            None => self.sender.reserve().await,
            Some(feed) => loop {
                let check = feed.check_interval();
                tokio::select! {
                    permit = self.sender.reserve() => break permit,
                    () = tokio::time::sleep(check) => feed.keep_alive().await?,
                }
            },
        };
        match permit {
            Ok(permit) => {
                permit.send(Ok(event));
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    fn progress(&self, head: Lsn) -> LiveEvent {
        LiveEvent::Progress {
            position: self.position.0,
            head_position: head.0.max(self.position.0),
            through_seq: self.seq,
        }
    }

    async fn follow(
        &mut self,
        snapshot: Option<futures::stream::BoxStream<'static, Result<Vec<Op>>>>,
    ) -> Result<()> {
        if let Some(mut snapshot) = snapshot {
            while let Some(batch) = snapshot.next().await {
                let batch = batch?;
                if let Some(last) = batch.last() {
                    self.seq = last.seq;
                }
                if !self.send(None, LiveEvent::Batch(batch)).await? {
                    return Ok(());
                }
            }
            let complete = LiveEvent::SnapshotComplete {
                through_seq: self.seq,
                position: self.position.0,
            };
            if !self.send(None, complete).await?
                || !self.send(None, self.progress(self.position)).await?
            {
                return Ok(());
            }
        }
        let mut feed = match self.plans.take() {
            Some((plans, version)) => {
                ChangeFeed::open(&self.connection, &self.options, &plans, version)
                    .await
                    .map_err(source_error)?
            }
            None => ChangeFeed::start(&self.connection, &self.options).await?,
        };
        feed.confirm_from(self.confirmations.clone());
        feed.report_on(self.report.clone());
        let mut batch: Vec<Op> = Vec::new();
        let mut bytes = 0;
        loop {
            match feed.next().await? {
                FeedEvent::Op(mut op) => {
                    self.seq += 1;
                    op.seq = self.seq;
                    bytes += op.key.len() + op.body.len();
                    batch.push(op);
                    // A large transaction goes out in bounded batches; its
                    // sink holds its target transaction open across them.
                    if batch.len() >= BATCH_OPS || bytes >= BATCH_BYTES {
                        bytes = 0;
                        let full = LiveEvent::Batch(std::mem::take(&mut batch));
                        if !self.send(Some(&mut feed), full).await? {
                            return Ok(());
                        }
                    }
                }
                FeedEvent::Committed { position } => {
                    if !batch.is_empty() {
                        bytes = 0;
                        let ready = LiveEvent::Batch(std::mem::take(&mut batch));
                        if !self.send(Some(&mut feed), ready).await? {
                            return Ok(());
                        }
                    }
                    self.position = self.position.max(position);
                    if !self.send(Some(&mut feed), self.progress(position)).await? {
                        return Ok(());
                    }
                }
                FeedEvent::Marker { .. } => {}
                FeedEvent::Idle { head } => {
                    // Between transactions: every change before the
                    // server's end was sent.
                    if batch.is_empty() {
                        self.position = self.position.max(head);
                    }
                    if !self.send(Some(&mut feed), self.progress(head)).await? {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Drops replication slot `slot` of this database (ending the walsender
/// that reads it, if one does) and the publication `publication`: whether
/// the slot was there, and whether the publication is gone, each failure
/// as the reason for people.
async fn release(
    connection: &PgConnection,
    slot: &str,
    publication: &str,
) -> (
    std::result::Result<bool, String>,
    std::result::Result<(), String>,
) {
    let server = connection.server();
    let client = match connection.connect().await {
        Ok(client) => client,
        Err(error) => return (Err(error.to_string()), Err(error.to_string())),
    };
    let slot_dropped = drop_slot(&client, &server, slot)
        .await
        .map_err(|error| error.to_string());
    let publication_dropped = client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            quote_ident(publication)
        ))
        .await
        .map_err(|error| {
            PgError::statement(
                &server,
                format!("dropping publication {publication}"),
                &error,
            )
            .to_string()
        });
    (slot_dropped, publication_dropped)
}

/// Drops `slot`, if this database has it; a walsender that reads it (the
/// stream of the migration that switched) is ended, then the drop tried
/// again (until the caller's deadline).
async fn drop_slot(
    client: &tokio_postgres::Client,
    server: &str,
    slot: &str,
) -> std::result::Result<bool, PgError> {
    let failed = |error: tokio_postgres::Error| {
        PgError::statement(server, format!("dropping replication slot {slot}"), &error)
    };
    loop {
        let dropped = client
            .execute(
                "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots \
                 WHERE slot_name = $1 AND database = pg_catalog.current_database()",
                &[&slot],
            )
            .await;
        match dropped {
            Ok(count) => return Ok(count > 0),
            Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                let pid: Option<i32> = client
                    .query_opt(
                        "SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                        &[&slot],
                    )
                    .await
                    .map_err(failed)?
                    .map(|row| row.get(0));
                if let Some(pid) = pid {
                    info!(
                        slot,
                        pid,
                        "ending the walsender that still reads the slot of the switched migration"
                    );
                    client
                        .execute("SELECT pg_catalog.pg_terminate_backend($1)", &[&pid])
                        .await
                        .map_err(failed)?;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(error) => return Err(failed(error)),
        }
    }
}

/// What PostgreSQL can do, as a live source and as a live sink.
pub const CAPABILITIES: Capabilities = Capabilities {
    position_unit: "LSN",
    transactions: true,
    snapshot_reread: false,
    store_fence: true,
    server_assigned_ids: false,
};

/// The plane `connection` reaches, for `Describe`.
async fn describe(
    connection: &PgConnection,
    error: fn(PgError) -> AdapterError,
) -> Result<PlaneDescription> {
    let server = connection.server();
    let client = connection.connect().await.map_err(error)?;
    let row = client
        .query_one(
            "SELECT pg_catalog.current_setting('server_version'), \
                    (SELECT system_identifier FROM pg_catalog.pg_control_system())::text",
            &[],
        )
        .await
        .map_err(|failure| {
            error(PgError::statement(
                &server,
                "reading the server's identity",
                &failure,
            ))
        })?;
    let system_id: String = row.get(1);
    Ok(PlaneDescription {
        platform: "postgres".to_owned(),
        version: row.get(0),
        identity: format!("{system_id}/{}", connection.dbname),
        url: plane_url(connection),
    })
}

/// The plane's address for people and its clients: no user, no password.
fn plane_url(connection: &PgConnection) -> String {
    format!("postgres://{}", connection.server())
}

#[async_trait::async_trait]
impl LiveSource for PgLiveSource {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn display(&self) -> String {
        plane_url(&self.connection)
    }

    async fn describe(&self) -> Result<PlaneDescription> {
        describe(&self.connection, AdapterError::source).await
    }

    async fn open(&self, prefix: &[u8], from: LiveFrom) -> Result<LiveStream> {
        if !prefix.is_empty() {
            return Err(source_error(PgError::BadUrl {
                url: self.display(),
                reason: "a PostgreSQL stream takes no key prefix: choose tables with --schema and --table".to_owned(),
            }));
        }
        self.open_from(from).await
    }

    async fn move_fence(&self, wanted: FenceMove) -> Result<FenceAnswer> {
        self.move_fence_record(wanted).await
    }

    async fn fence_state(&self) -> Result<FenceState> {
        self.read_fence_state().await
    }

    async fn digest(&self, _prefix: &[u8], _position: Position) -> Result<PlaneDigest> {
        super::digest::digest(&self.connection, &self.selection())
            .await
            .map_err(source_error)
    }

    async fn confirm(&self, _stream_id: &str, applied: Applied) -> Result<()> {
        self.confirm_position(applied.through_position);
        Ok(())
    }
}

/// A PostgreSQL database as the new plane of a live migration: one
/// connection applying the stream in order, each source transaction in one
/// target transaction with the checkpoint (the restore's target, G3-G5).
#[derive(Debug, Clone)]
pub struct PgLiveSink {
    connection: PgConnection,
    /// Source transactions' ops per target transaction, at most (when
    /// they come faster than they are applied).
    ops_per_commit: usize,
}

impl PgLiveSink {
    /// The database `connection` reaches.
    pub fn new(connection: PgConnection, ops_per_commit: usize) -> Self {
        Self {
            connection,
            ops_per_commit: ops_per_commit.max(1),
        }
    }
}

fn target_error(error: PgError) -> crate::Error {
    AdapterError::target(error).into()
}

#[async_trait::async_trait]
impl LiveSink for PgLiveSink {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn display(&self) -> String {
        plane_url(&self.connection)
    }

    async fn describe(&self) -> Result<PlaneDescription> {
        describe(&self.connection, AdapterError::target).await
    }

    async fn stored(&self, stream_id: &str) -> Result<StoredStream> {
        let server = self.connection.server();
        let client = self.connection.connect().await.map_err(target_error)?;
        let failed = |error: tokio_postgres::Error| {
            target_error(PgError::statement(
                &server,
                "reading ferry's checkpoint",
                &error,
            ))
        };
        let ferry = quote_ident(super::FERRY_SCHEMA);
        let exists: bool = client
            .query_one(
                "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
                &[&format!("{ferry}.streams")],
            )
            .await
            .map_err(failed)?
            .get(0);
        if !exists {
            return Ok(StoredStream::default());
        }
        let epoch: Option<i64> = client
            .query_opt(
                &format!("SELECT epoch FROM {ferry}.target WHERE id = 1"),
                &[],
            )
            .await
            .map_err(failed)?
            .map(|row| row.get(0));
        let applied = client
            .query_opt(
                &format!(
                    "SELECT through_seq, through_position::text FROM {ferry}.streams WHERE stream_id = $1"
                ),
                &[&stream_id],
            )
            .await
            .map_err(failed)?
            .map(|row| Applied {
                through_seq: row.get::<_, i64>(0).max(0) as u64,
                through_position: Position(row.get::<_, String>(1).parse().unwrap_or(0)),
            });
        Ok(StoredStream {
            applied,
            epoch: epoch.unwrap_or(0).max(0) as u64,
        })
    }

    async fn open(&self, stream: &StreamInfo, epoch: u64) -> Result<Box<dyn LiveApply>> {
        let target = super::sink::PgTarget::new(
            self.connection.clone(),
            super::PgSinkOptions {
                allow_nonempty: false,
                ops_per_commit: self.ops_per_commit,
                epoch,
                lanes: 1,
            },
        );
        let mut driver = SinkDriver::new(
            target,
            DriverOptions {
                ops_per_commit: self.ops_per_commit,
                epoch,
                ..DriverOptions::default()
            },
        );
        let held_through_seq = Sink::begin(&mut driver, stream).await?.unwrap_or(0);
        Ok(Box::new(PgLiveApply {
            driver,
            held_through_seq,
        }))
    }

    async fn adopt(&self, epoch: u64, _position_offset: i64) -> Result<Result<(), u64>> {
        // LSNs are no positions PostgreSQL's clients see: nothing to
        // offset. The adoption is recorded, and a later one refuses an
        // earlier (G5).
        let server = self.connection.server();
        let mut client = self.connection.connect().await.map_err(target_error)?;
        let failed = |error: tokio_postgres::Error| {
            target_error(PgError::statement(
                &server,
                "recording the adoption",
                &error,
            ))
        };
        let ferry = quote_ident(super::FERRY_SCHEMA);
        let transaction = client.transaction().await.map_err(failed)?;
        transaction
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {ferry}; \
                 CREATE TABLE IF NOT EXISTS {ferry}.adoption (id int PRIMARY KEY CHECK (id = 1), epoch bigint NOT NULL); \
                 LOCK TABLE {ferry}.adoption IN EXCLUSIVE MODE"
            ))
            .await
            .map_err(failed)?;
        let adopted: Option<i64> = transaction
            .query_opt(
                &format!("SELECT epoch FROM {ferry}.adoption WHERE id = 1"),
                &[],
            )
            .await
            .map_err(failed)?
            .map(|row| row.get(0));
        if let Some(later) = adopted.filter(|adopted| *adopted as u64 > epoch) {
            return Ok(Err(later as u64));
        }
        transaction
            .execute(
                &format!(
                    "INSERT INTO {ferry}.adoption (id, epoch) VALUES (1, $1) \
                     ON CONFLICT (id) DO UPDATE SET epoch = EXCLUDED.epoch"
                ),
                &[&(epoch as i64)],
            )
            .await
            .map_err(failed)?;
        transaction.commit().await.map_err(failed)?;
        Ok(Ok(()))
    }

    async fn digest(&self, _prefix: &[u8], _position: Position) -> Result<PlaneDigest> {
        super::digest::digest(&self.connection, &super::catalog::Selection::default())
            .await
            .map_err(target_error)
    }
}

/// One stream applied to PostgreSQL.
struct PgLiveApply {
    driver: SinkDriver<super::sink::PgTarget>,
    held_through_seq: u64,
}

#[async_trait::async_trait]
impl LiveApply for PgLiveApply {
    fn held_through_seq(&self) -> u64 {
        self.held_through_seq
    }

    async fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        Sink::apply(&mut self.driver, ops).await?;
        // Durable at every apply's end, but inside a source transaction
        // still open (it waits for the rest).
        self.driver.commit_now().await
    }

    fn applied(&self) -> Option<Applied> {
        self.driver.applied()
    }

    async fn finish(self: Box<Self>) -> Result<()> {
        Box::new(self.driver).finish().await
    }
}

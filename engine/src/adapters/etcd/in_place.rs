//! Migrations run in place on an etcd target: `ferry migrations status`,
//! `up` and `down`.
//!
//! The target keeps, under `__ferry__/migrations/`:
//!
//! | key | value |
//! | --- | --- |
//! | `state` | `{"platform", "version", "updated_at"}`: the version the data is in |
//! | `history/<n, 8 digits>` | one [`HistoryEntry`] per step run, oldest first |
//! | `progress` | a [`ProgressRecord`] while a step that spans several Txns runs |
//! | `lock` | who runs now, on a lease: it goes away by itself when its holder dies |
//!
//! A step reads every key (ferry's own left out) at one revision R, twice:
//! a first pass runs the migration on every key and writes nothing, so a
//! filter error, an output that is not a Put of `etcd.kv`, two keys landing
//! on one, or a key moved onto a key that exists stops the run before
//! anything is written. The second pass writes: a changed key is put, a key
//! moved or dropped is deleted, and each Txn requires every key it touches
//! to be as it was at R and the lock to be this run's.
//!
//! Atomicity: a step whose writes fit in one Txn (the target's
//! `--max-txn-ops` and `--max-request-bytes`) is one Txn, together with its
//! history entry and the new version: all or nothing. A larger step is
//! written in several Txns, each recording in `progress` the last source key
//! it covered; a run that stops half way (killed, a key changed under it)
//! leaves the data half migrated and says so in `status`, and the next
//! `up` / `down` finishes that step first, reading at the same revision R
//! (so R must not be compacted meanwhile). Stop the platform's writers
//! and take a backup before migrating in place.

use std::time::Duration;

use ferry_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use ferry_proto::etcd::etcdserverpb::request_op::Request as TxnRequestOp;
use ferry_proto::etcd::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use ferry_proto::etcd::mvccpb::KeyValue;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::adapters::AdapterError;
use crate::adapters::etcd::client::EtcdClient;
use crate::adapters::etcd::{
    EtcdConnection, EtcdError, KIND_KV, RESERVED_PREFIX, kv_op, prefix_end,
};
use crate::migrations::chain::{KeyCheck, Step, plan, run_steps};
use crate::migrations::in_place::{
    HistoryEntry, InPlaceOptions, InPlaceTarget, ProgressRecord, RunReport, StateRecord,
    StepReport, TargetStatus,
};
use crate::migrations::profile::Profile;
use crate::migrations::{MigrationError, printable};
use crate::{Op, Result};

/// etcd as an in-place target: the cluster of a connection, written with
/// the options' Txn limits.
#[derive(Debug, Clone)]
pub struct EtcdInPlace {
    connection: EtcdConnection,
    options: InPlaceOptions,
}

impl EtcdInPlace {
    /// The cluster of `connection`.
    pub fn new(connection: EtcdConnection, options: InPlaceOptions) -> Self {
        Self {
            connection,
            options,
        }
    }
}

#[async_trait::async_trait]
impl InPlaceTarget for EtcdInPlace {
    fn display(&self) -> String {
        self.connection.display()
    }

    async fn status(
        &self,
        profile: &Profile,
        wanted: Option<&str>,
        assumed: Option<&str>,
    ) -> Result<TargetStatus> {
        status(&self.connection, profile, wanted, assumed).await
    }

    async fn run(
        &self,
        profile: &Profile,
        wanted: Option<&str>,
        assumed: Option<&str>,
    ) -> Result<RunReport> {
        run(&self.connection, profile, wanted, assumed, &self.options).await
    }
}

const STATE_KEY: &str = "__ferry__/migrations/state";
const PROGRESS_KEY: &str = "__ferry__/migrations/progress";
const LOCK_KEY: &str = "__ferry__/migrations/lock";
const HISTORY_PREFIX: &str = "__ferry__/migrations/history/";
/// Keys read per Range page.
const PAGE_KEYS: i64 = 500;
/// Bytes kept free in each Txn for the records and framing.
const REQUEST_MARGIN_BYTES: usize = 4096;

fn target_error(error: EtcdError) -> crate::Error {
    AdapterError::target(error).into()
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(TxnRequestOp::RequestPut(PutRequest {
            key,
            value,
            lease,
            ..PutRequest::default()
        })),
    }
}

fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(TxnRequestOp::RequestDeleteRange(DeleteRangeRequest {
            key,
            ..DeleteRangeRequest::default()
        })),
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("migration records serialize")
}

/// What one source key becomes: puts and maybe the delete of itself.
struct Change {
    source: KeyValue,
    puts: Vec<(Vec<u8>, Vec<u8>, i64)>,
    delete_source: bool,
}

impl Change {
    fn operations(&self) -> usize {
        self.puts.len() + usize::from(self.delete_source)
    }

    fn bytes(&self) -> usize {
        self.source.key.len()
            + 64
            + self
                .puts
                .iter()
                .map(|(key, value, _)| key.len() + value.len() + 32)
                .sum::<usize>()
    }
}

/// A connection to the target for one command.
struct Target {
    client: EtcdClient,
    name: String,
}

impl Target {
    async fn connect(connection: &EtcdConnection) -> Result<Self> {
        let client = EtcdClient::connect(connection)
            .await
            .map_err(target_error)?;
        Ok(Self {
            name: connection.display(),
            client,
        })
    }

    fn in_place(&self, reason: String) -> crate::Error {
        MigrationError::InPlace {
            target: self.name.clone(),
            reason,
        }
        .into()
    }

    async fn range(
        &self,
        request: RangeRequest,
        action: &str,
    ) -> Result<(Vec<KeyValue>, i64, bool)> {
        let response = self
            .client
            .call(action, |mut services| {
                let request = request.clone();
                async move { services.kv.range(request).await }
            })
            .await
            .map_err(target_error)?;
        let revision = response.header.map_or(0, |header| header.revision);
        Ok((response.kvs, revision, response.more))
    }

    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, i64)> {
        let (kvs, revision, _) = self
            .range(
                RangeRequest {
                    key: key.as_bytes().to_vec(),
                    ..RangeRequest::default()
                },
                "read migration state from",
            )
            .await?;
        Ok((kvs.into_iter().next(), revision))
    }

    async fn parse<T: for<'de> Deserialize<'de>>(&self, kv: &KeyValue) -> Result<T> {
        serde_json::from_slice(&kv.value).map_err(|error| {
            self.in_place(format!(
                "{} does not parse ({error}); it is ferry's own record, damaged or written by a newer ferry",
                printable(&kv.key)
            ))
        })
    }

    async fn state(&self) -> Result<Option<StateRecord>> {
        match self.get(STATE_KEY).await?.0 {
            Some(kv) => Ok(Some(self.parse(&kv).await?)),
            None => Ok(None),
        }
    }

    async fn progress(&self) -> Result<Option<ProgressRecord>> {
        match self.get(PROGRESS_KEY).await?.0 {
            Some(kv) => Ok(Some(self.parse(&kv).await?)),
            None => Ok(None),
        }
    }

    async fn history(&self) -> Result<Vec<HistoryEntry>> {
        let (kvs, _, _) = self
            .range(
                RangeRequest {
                    key: HISTORY_PREFIX.as_bytes().to_vec(),
                    range_end: prefix_end(HISTORY_PREFIX.as_bytes()),
                    ..RangeRequest::default()
                },
                "read the migration history from",
            )
            .await?;
        let mut entries = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            entries.push(self.parse(kv).await?);
        }
        Ok(entries)
    }

    /// One page of the data keys (ferry's own left out) after `after`, at
    /// `revision`.
    async fn page(&self, after: Option<&[u8]>, revision: i64) -> Result<(Vec<KeyValue>, bool)> {
        let start = match after {
            Some(key) => {
                let mut next = key.to_vec();
                next.push(0);
                next
            }
            None => vec![0],
        };
        let (kvs, _, more) = self
            .range(
                RangeRequest {
                    key: start,
                    range_end: vec![0],
                    revision,
                    limit: PAGE_KEYS,
                    ..RangeRequest::default()
                },
                "read the keys to migrate from",
            )
            .await
            .map_err(|error| match &error {
                crate::Error::Adapter(failure)
                    if matches!(
                        failure.platform_error::<EtcdError>(),
                        Some(EtcdError::Compacted { .. })
                    ) =>
                {
                    self.in_place(format!(
                        "revision {revision}, which this step reads at, was compacted; a step left half done cannot be finished. Restore from the backup taken before migrating"
                    ))
                }
                _ => error,
            })?;
        Ok((kvs, more))
    }
}

/// The lock, held on a lease kept alive in the background.
struct Lock {
    lease: i64,
    keeper: tokio::task::JoinHandle<()>,
}

impl Lock {
    async fn acquire(target: &Target, ttl_seconds: i64) -> Result<Self> {
        let lease = target
            .client
            .call("grant the lock's lease on", |mut services| async move {
                services
                    .lease
                    .lease_grant(LeaseGrantRequest {
                        ttl: ttl_seconds,
                        id: 0,
                    })
                    .await
            })
            .await
            .map_err(target_error)?
            .id;
        let holder = json(&serde_json::json!({
            "holder": format!("ferry {} pid {}", env!("CARGO_PKG_VERSION"), std::process::id()),
            "since": now(),
        }));
        let request = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Version as i32,
                key: LOCK_KEY.as_bytes().to_vec(),
                range_end: Vec::new(),
                target_union: Some(TargetUnion::Version(0)),
            }],
            success: vec![put(LOCK_KEY.as_bytes().to_vec(), holder, lease)],
            failure: vec![RequestOp {
                request: Some(TxnRequestOp::RequestRange(RangeRequest {
                    key: LOCK_KEY.as_bytes().to_vec(),
                    ..RangeRequest::default()
                })),
            }],
        };
        let response = target
            .client
            .call("take the migration lock on", |mut services| {
                let request = request.clone();
                async move { services.kv.txn(request).await }
            })
            .await
            .map_err(target_error)?;
        if !response.succeeded {
            revoke(target, lease).await;
            let holder = response
                .responses
                .into_iter()
                .find_map(|response| match response.response {
                    Some(
                        ferry_proto::etcd::etcdserverpb::response_op::Response::ResponseRange(
                            range,
                        ),
                    ) => range.kvs.into_iter().next(),
                    _ => None,
                })
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                .unwrap_or_else(|| "a holder that just left".to_owned());
            return Err(MigrationError::Locked {
                target: target.name.clone(),
                holder,
                ttl_seconds,
            }
            .into());
        }
        let client = target.client.clone();
        let period = Duration::from_secs((ttl_seconds as u64 / 3).max(1));
        let keeper = tokio::spawn(async move {
            let (sender, receiver) = tokio::sync::mpsc::channel(1);
            let receiver = std::sync::Mutex::new(Some(receiver));
            let responses = client
                .call("keep the migration lock on", |mut services| {
                    let stream = receiver.lock().ok().and_then(|mut slot| slot.take());
                    async move {
                        match stream {
                            Some(stream) => {
                                services
                                    .lease
                                    .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(
                                        stream,
                                    ))
                                    .await
                            }
                            None => {
                                Err(tonic::Status::unavailable("the keep-alive stream is gone"))
                            }
                        }
                    }
                })
                .await;
            let mut responses = match responses {
                Ok(responses) => responses,
                Err(error) => {
                    warn!(%error, "cannot keep the migration lock alive; it expires");
                    return;
                }
            };
            loop {
                if sender
                    .send(LeaseKeepAliveRequest { id: lease })
                    .await
                    .is_err()
                {
                    return;
                }
                match responses.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        warn!("the migration lock's keep-alive stream ended; the lock expires");
                        return;
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
        Ok(Self { lease, keeper })
    }

    /// Requires the lock to be this run's, in a Txn.
    fn guard(&self) -> Compare {
        Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Lease as i32,
            key: LOCK_KEY.as_bytes().to_vec(),
            range_end: Vec::new(),
            target_union: Some(TargetUnion::Lease(self.lease)),
        }
    }

    async fn release(self, target: &Target) {
        self.keeper.abort();
        revoke(target, self.lease).await;
    }
}

async fn revoke(target: &Target, lease: i64) {
    let result = target
        .client
        .call("release the migration lock on", |mut services| async move {
            services
                .lease
                .lease_revoke(LeaseRevokeRequest { id: lease })
                .await
        })
        .await;
    if let Err(error) = result {
        warn!(%error, "cannot release the migration lock; it expires by itself");
    }
}

/// The version the target is in: recorded, else `assumed`, else the
/// profile's oldest.
fn current_version(
    profile: &Profile,
    state: Option<&StateRecord>,
    assumed: Option<&str>,
    target: &Target,
) -> Result<(String, bool)> {
    match state {
        Some(state) => {
            if state.platform != profile.platform {
                return Err(target.in_place(format!(
                    "the target's data is recorded as platform {:?}, not the profile's {:?}",
                    state.platform, profile.platform
                )));
            }
            if let Some(assumed) = assumed
                && assumed != state.version
            {
                return Err(target.in_place(format!(
                    "the target records version {}; --from-version {assumed} contradicts it",
                    state.version
                )));
            }
            profile.version_index(&state.version)?;
            Ok((state.version.clone(), true))
        }
        None => {
            let version = assumed.unwrap_or(profile.first_version()).to_owned();
            profile.version_index(&version)?;
            Ok((version, false))
        }
    }
}

fn step_label(step: &Step) -> String {
    format!("{} ({})", step.migration.id(), step.direction)
}

/// The target's version, applied and pending migrations, and history.
pub async fn status(
    connection: &EtcdConnection,
    profile: &Profile,
    wanted: Option<&str>,
    assumed: Option<&str>,
) -> Result<TargetStatus> {
    let target = Target::connect(connection).await?;
    let state = target.state().await?;
    let (version, version_recorded) = current_version(profile, state.as_ref(), assumed, &target)?;
    let wanted_version = wanted.unwrap_or(profile.latest_version()).to_owned();
    profile.version_index(&wanted_version)?;
    let applied = plan(profile, profile.first_version(), &version)
        .map(|plan| {
            plan.steps
                .iter()
                .map(|step| step.migration.id().to_owned())
                .collect()
        })
        .unwrap_or_default();
    let (pending, problem) = match plan(profile, &version, &wanted_version) {
        Ok(plan) => (plan.steps.iter().map(step_label).collect(), None),
        Err(error) => (Vec::new(), Some(error.to_string())),
    };
    let in_progress = target.progress().await?;
    Ok(TargetStatus {
        platform: profile.platform.clone(),
        is_up_to_date: version == wanted_version && in_progress.is_none(),
        version,
        version_recorded,
        wanted_version,
        applied,
        pending,
        problem,
        history: target.history().await?,
        in_progress,
    })
}

/// Migrates the target in place to `wanted` (the profile's newest by
/// default), up or down, one step at a time, under the target's lock.
pub async fn run(
    connection: &EtcdConnection,
    profile: &Profile,
    wanted: Option<&str>,
    assumed: Option<&str>,
    options: &InPlaceOptions,
) -> Result<RunReport> {
    let target = Target::connect(connection).await?;
    let lock = Lock::acquire(&target, options.lock_ttl_seconds).await?;
    let result = run_locked(&target, &lock, profile, wanted, assumed, options).await;
    lock.release(&target).await;
    result
}

async fn run_locked(
    target: &Target,
    lock: &Lock,
    profile: &Profile,
    wanted: Option<&str>,
    assumed: Option<&str>,
    options: &InPlaceOptions,
) -> Result<RunReport> {
    let state = target.state().await?;
    let (version, _) = current_version(profile, state.as_ref(), assumed, target)?;
    let wanted = wanted.unwrap_or(profile.latest_version()).to_owned();
    let planned = plan(profile, &version, &wanted)?;
    let mut progress = target.progress().await?;
    if let Some(record) = &progress {
        let first = planned.steps.first();
        let same = first.is_some_and(|step| {
            step.migration.id() == record.id && step.direction.as_str() == record.direction
        });
        if !same {
            return Err(target.in_place(format!(
                "migration {} ({}) was left half done by an earlier run (through key {}); finish it first: run `ferry migrations {}` with --to {}",
                record.id,
                record.direction,
                String::from_utf8_lossy(&hex::decode(&record.done_through_key_hex).unwrap_or_default()),
                record.direction,
                record.to
            )));
        }
    }
    let mut history_number = target.history().await?.len() as u64;
    let mut steps = Vec::new();
    for step in &planned.steps {
        history_number += 1;
        let resume = progress.take();
        let resumed = resume.is_some();
        let entry = run_step(target, lock, profile, step, resume, history_number, options).await?;
        info!(id = %entry.id, direction = %entry.direction, keys_written = entry.keys_written, keys_deleted = entry.keys_deleted, txns = entry.txns, "migration step applied in place");
        steps.push(StepReport { entry, resumed });
    }
    Ok(RunReport {
        from: version,
        to: wanted,
        steps,
    })
}

/// What one source key becomes under `step`, checked for etcd.
fn change_for(
    step: &Step,
    kv: &KeyValue,
    seq: u64,
    target: &Target,
) -> Result<(Op, Vec<Op>, Option<Change>)> {
    let op = kv_op(seq, kv.mod_revision.max(0) as u64, kv.clone());
    let outputs = run_steps(std::slice::from_ref(step), op.clone())?;
    let mut puts = Vec::with_capacity(outputs.len());
    for output in &outputs {
        if output.kind.as_ref() != KIND_KV.as_bytes() || output.method.as_ref() != b"Put" {
            return Err(MigrationError::Transform {
                id: step.migration.id().to_owned(),
                direction: step.direction,
                seq,
                key: printable(&kv.key),
                reason: format!(
                    "in place on etcd an output must stay an etcd.kv Put, not {} {}",
                    String::from_utf8_lossy(&output.kind),
                    String::from_utf8_lossy(&output.method)
                ),
                filter: step.migration.describe(step.direction),
            }
            .into());
        }
        if output.key.starts_with(RESERVED_PREFIX) {
            return Err(target.in_place(format!(
                "migration {} moves {} into ferry's own keys ({})",
                step.migration.id(),
                printable(&kv.key),
                printable(&output.key)
            )));
        }
        let lease = match output.deps.first() {
            None => 0,
            Some(dep) => std::str::from_utf8(dep)
                .ok()
                .and_then(|text| i64::from_str_radix(text, 16).ok())
                .ok_or_else(|| {
                    target.in_place(format!(
                        "migration {} gives {} a dep that is not a lease id",
                        step.migration.id(),
                        printable(&output.key)
                    ))
                })?,
        };
        puts.push((output.key.to_vec(), output.body.to_vec(), lease));
    }
    let unchanged =
        puts.len() == 1 && puts[0].0 == kv.key && puts[0].1 == kv.value && puts[0].2 == kv.lease;
    let change = (!unchanged).then(|| Change {
        source: kv.clone(),
        delete_source: !puts.iter().any(|(key, _, _)| *key == kv.key),
        puts,
    });
    Ok((op, outputs, change))
}

#[allow(clippy::too_many_arguments)]
async fn run_step(
    target: &Target,
    lock: &Lock,
    profile: &Profile,
    step: &Step,
    resume: Option<ProgressRecord>,
    history_number: u64,
    options: &InPlaceOptions,
) -> Result<HistoryEntry> {
    let revision = match &resume {
        Some(record) => record.read_revision,
        None => target.get(STATE_KEY).await?.1,
    };
    let budget = options
        .max_request_bytes
        .saturating_sub(REQUEST_MARGIN_BYTES)
        .max(1);
    // Room for the lock guard, and for the progress, state and history
    // records.
    let max_operations = options.max_txn_ops.saturating_sub(3).max(1);
    // First pass: nothing is written.
    let mut check = KeyCheck::new();
    let (mut total_operations, mut total_bytes, mut total_changes) = (0usize, 0usize, 0usize);
    let mut after: Option<Vec<u8>> = None;
    let mut seq = 0u64;
    loop {
        let (kvs, more) = target.page(after.as_deref(), revision).await?;
        for kv in &kvs {
            if kv.key.starts_with(RESERVED_PREFIX) {
                continue;
            }
            seq += 1;
            let (op, outputs, change) = change_for(step, kv, seq, target)?;
            check.observe_in_place(&op, &outputs)?;
            if let Some(change) = change {
                if change.operations() > max_operations || change.bytes() > budget {
                    return Err(target.in_place(format!(
                        "migration {} turns {} into more than one Txn can hold; raise the target's --max-txn-ops / --max-request-bytes and pass them to ferry",
                        step.migration.id(),
                        printable(&kv.key)
                    )));
                }
                total_operations += change.operations();
                total_bytes += change.bytes();
                total_changes += 1;
            }
        }
        after = kvs.last().map(|kv| kv.key.clone());
        if !more || after.is_none() {
            break;
        }
    }
    check.finish_in_place(&target.name)?;
    seq = 0;
    let atomic = resume.is_none()
        && total_operations <= max_operations
        && total_changes < options.max_txn_ops.saturating_sub(1)
        && total_bytes <= budget;
    // Second pass: write.
    let mut record = resume.clone().unwrap_or(ProgressRecord {
        id: step.migration.id().to_owned(),
        direction: step.direction.as_str().to_owned(),
        from: step.from.clone(),
        to: step.to.clone(),
        read_revision: revision,
        done_through_key_hex: String::new(),
        keys_written: 0,
        keys_deleted: 0,
        txns: 0,
    });
    let mut after: Option<Vec<u8>> = match &resume {
        Some(record) if !record.done_through_key_hex.is_empty() => Some(
            hex::decode(&record.done_through_key_hex)
                .map_err(|_| target.in_place("the progress record's key is not hex".to_owned()))?,
        ),
        _ => None,
    };
    let mut pending: Vec<Change> = Vec::new();
    let mut pending_operations = 0usize;
    let mut pending_bytes = 0usize;
    let mut last_key: Option<Vec<u8>> = after.clone();
    let mut progress_exists = resume.is_some();
    loop {
        let (kvs, more) = target.page(after.as_deref(), revision).await?;
        for kv in &kvs {
            if kv.key.starts_with(RESERVED_PREFIX) {
                continue;
            }
            seq += 1;
            let (_, _, change) = change_for(step, kv, seq, target)?;
            if let Some(change) = change {
                let full = pending_operations + change.operations() > max_operations
                    || pending.len() + 1 >= options.max_txn_ops.saturating_sub(1)
                    || pending_bytes + change.bytes() > budget;
                if !atomic && full && !pending.is_empty() {
                    write_chunk(
                        target,
                        lock,
                        &mut record,
                        &mut pending,
                        last_key.as_deref(),
                        progress_exists,
                    )
                    .await?;
                    progress_exists = true;
                    pending_operations = 0;
                    pending_bytes = 0;
                }
                pending_operations += change.operations();
                pending_bytes += change.bytes();
                pending.push(change);
            }
            last_key = Some(kv.key.clone());
        }
        after = kvs.last().map(|kv| kv.key.clone());
        if !more || after.is_none() {
            break;
        }
    }
    if !atomic && !pending.is_empty() {
        write_chunk(
            target,
            lock,
            &mut record,
            &mut pending,
            last_key.as_deref(),
            progress_exists,
        )
        .await?;
        progress_exists = true;
    }
    // The last Txn: what is left (everything, when atomic), the history
    // entry and the new version.
    let (mut compare, mut success) = changes_to_txn(lock, &pending, &mut record);
    record.txns += 1;
    let entry = HistoryEntry {
        number: history_number,
        id: record.id.clone(),
        direction: record.direction.clone(),
        from: record.from.clone(),
        to: record.to.clone(),
        keys_written: record.keys_written,
        keys_deleted: record.keys_deleted,
        txns: record.txns,
        read_revision: revision,
        finished_at: now(),
        ferry_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let history_key = format!("{HISTORY_PREFIX}{history_number:08}");
    compare.push(Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Version as i32,
        key: history_key.as_bytes().to_vec(),
        range_end: Vec::new(),
        target_union: Some(TargetUnion::Version(0)),
    });
    success.push(put(history_key.into_bytes(), json(&entry), 0));
    success.push(put(
        STATE_KEY.as_bytes().to_vec(),
        json(&StateRecord {
            platform: profile.platform.clone(),
            version: step.to.clone(),
            updated_at: now(),
        }),
        0,
    ));
    if progress_exists {
        success.push(delete(PROGRESS_KEY.as_bytes().to_vec()));
    }
    commit(target, compare, success, &record).await?;
    Ok(entry)
}

/// The compares and writes of `changes`, with the lock guard; counts them
/// into `record`.
fn changes_to_txn(
    lock: &Lock,
    changes: &[Change],
    record: &mut ProgressRecord,
) -> (Vec<Compare>, Vec<RequestOp>) {
    let mut compare = vec![lock.guard()];
    let mut success = Vec::new();
    for change in changes {
        compare.push(Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: change.source.key.clone(),
            range_end: Vec::new(),
            target_union: Some(TargetUnion::ModRevision(change.source.mod_revision)),
        });
        if change.delete_source {
            success.push(delete(change.source.key.clone()));
            record.keys_deleted += 1;
        }
        for (key, value, lease) in &change.puts {
            success.push(put(key.clone(), value.clone(), *lease));
            record.keys_written += 1;
        }
    }
    (compare, success)
}

/// Writes one chunk of a step too large for one Txn, with the progress.
async fn write_chunk(
    target: &Target,
    lock: &Lock,
    record: &mut ProgressRecord,
    pending: &mut Vec<Change>,
    through_key: Option<&[u8]>,
    progress_exists: bool,
) -> Result<()> {
    let changes = std::mem::take(pending);
    let through = changes
        .last()
        .map(|change| change.source.key.clone())
        .or_else(|| through_key.map(<[u8]>::to_vec))
        .unwrap_or_default();
    let mut next = record.clone();
    let (mut compare, mut success) = changes_to_txn(lock, &changes, &mut next);
    next.txns += 1;
    next.done_through_key_hex = hex::encode(&through);
    if !progress_exists {
        compare.push(Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Version as i32,
            key: PROGRESS_KEY.as_bytes().to_vec(),
            range_end: Vec::new(),
            target_union: Some(TargetUnion::Version(0)),
        });
    }
    success.push(put(PROGRESS_KEY.as_bytes().to_vec(), json(&next), 0));
    commit(target, compare, success, &next).await?;
    *record = next;
    Ok(())
}

async fn commit(
    target: &Target,
    compare: Vec<Compare>,
    success: Vec<RequestOp>,
    record: &ProgressRecord,
) -> Result<()> {
    let request = TxnRequest {
        compare,
        success,
        failure: Vec::new(),
    };
    let response = target
        .client
        .call("apply a migration Txn to", |mut services| {
            let request = request.clone();
            async move { services.kv.txn(request).await }
        })
        .await
        .map_err(target_error)?;
    if !response.succeeded {
        return Err(target.in_place(format!(
            "a Txn of migration {} ({}) was refused: a key changed since revision {} (stop the platform's writers), or this run lost its lock; nothing of that Txn was written{}",
            record.id,
            record.direction,
            record.read_revision,
            if record.txns > 1 {
                "; the step is half done, see `ferry migrations status`"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

//! Version migrations run in place on a target (`ferry migrations status`,
//! `up`, `down`): the records every target keeps, and the trait each
//! adapter that can migrate in place implements (etcd:
//! [`super::etcd::EtcdInPlace`]). Not to be confused with a live migration
//! (`ferry migrate --live`, the cutover between two planes).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::profile::Profile;
use crate::Result;

/// A target whose data a profile's migrations can move between versions
/// where it lies.
///
/// # Contract
/// - `status` reads the version the data is in (recorded, or `assumed`
///   when the target records none), what is applied and pending to reach
///   `wanted` (the profile's newest by default), the history, and a step
///   left half done.
/// - `run` moves the data one step at a time, under a lock only one run
///   holds; each step checks every key first and writes nothing when one
///   fails; a step that fits in one target transaction is all or nothing,
///   a larger one records its progress and is finished by the next run.
#[async_trait]
pub trait InPlaceTarget: Send + Sync {
    /// The target, for messages (never credentials).
    fn display(&self) -> String;
    /// Where the target stands.
    async fn status(
        &self,
        profile: &Profile,
        wanted: Option<&str>,
        assumed: Option<&str>,
    ) -> Result<TargetStatus>;
    /// Migrates to `wanted`, up or down.
    async fn run(
        &self,
        profile: &Profile,
        wanted: Option<&str>,
        assumed: Option<&str>,
    ) -> Result<RunReport>;
}

/// How a migration in place writes.
#[derive(Debug, Clone)]
pub struct InPlaceOptions {
    /// The target's `--max-txn-ops` (etcd's default: 128).
    pub max_txn_ops: usize,
    /// The target's `--max-request-bytes` (etcd's default: 1.5 MiB).
    pub max_request_bytes: usize,
    /// How long the lock outlives a run that died, in seconds.
    pub lock_ttl_seconds: i64,
}

impl Default for InPlaceOptions {
    fn default() -> Self {
        Self {
            max_txn_ops: 128,
            max_request_bytes: 1_572_864,
            lock_ttl_seconds: 15,
        }
    }
}

/// The version the target's data is in, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    /// The profile's platform.
    pub platform: String,
    /// The version.
    pub version: String,
    /// When it was recorded (RFC 3339).
    pub updated_at: String,
}

/// One step run in place, as the history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Its place in the history, from 1.
    pub number: u64,
    /// The migration.
    pub id: String,
    /// `up` or `down`.
    pub direction: String,
    /// The version before.
    pub from: String,
    /// The version after.
    pub to: String,
    /// Keys put.
    pub keys_written: u64,
    /// Keys deleted (moved or dropped).
    pub keys_deleted: u64,
    /// Txns it took; 1 means it was atomic.
    pub txns: u64,
    /// The revision its keys were read at.
    pub read_revision: i64,
    /// When it finished (RFC 3339).
    pub finished_at: String,
    /// The ferry that ran it.
    pub ferry_version: String,
}

/// A step under way that spans several Txns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// The migration.
    pub id: String,
    /// `up` or `down`.
    pub direction: String,
    /// The version before.
    pub from: String,
    /// The version after.
    pub to: String,
    /// The revision every key of the step is read at.
    pub read_revision: i64,
    /// Every source key up to and including this one (hex) is migrated.
    pub done_through_key_hex: String,
    /// Keys put so far.
    pub keys_written: u64,
    /// Keys deleted so far.
    pub keys_deleted: u64,
    /// Txns so far.
    pub txns: u64,
}

/// What `ferry migrations status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct TargetStatus {
    /// The profile's platform.
    pub platform: String,
    /// The version the target's data is in.
    pub version: String,
    /// Whether that version is recorded in the target (else it is assumed).
    pub version_recorded: bool,
    /// The version asked for (the profile's newest by default).
    pub wanted_version: String,
    /// The migrations between the oldest version and `version`.
    pub applied: Vec<String>,
    /// The steps from `version` to `wanted_version`, `id (direction)`.
    pub pending: Vec<String>,
    /// True when the data is in `wanted_version` and no step is half done.
    pub is_up_to_date: bool,
    /// Why there is no way to `wanted_version`, if there is none.
    pub problem: Option<String>,
    /// Every step run in place, oldest first.
    pub history: Vec<HistoryEntry>,
    /// A step half done, if one is.
    pub in_progress: Option<ProgressRecord>,
}

/// What one step in place did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// The history entry it recorded.
    pub entry: HistoryEntry,
    /// Whether it finished a step an earlier run left half done.
    pub resumed: bool,
}

/// What `ferry migrations up|down` did.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The version before.
    pub from: String,
    /// The version now.
    pub to: String,
    /// The steps run.
    pub steps: Vec<StepReport>,
}

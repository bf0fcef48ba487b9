//! Version migrations: ops rewritten from one platform version to another,
//! one version at a time, as Pachyderm's `convert1_7` ... `convert1_12` did.
//!
//! - [`profile`]: a platform profile, a folder with `profile.toml` (the
//!   platform and its versions, oldest first, and its migrations in order)
//!   and one TOML file per migration.
//! - [`file`]: a migration file: an id `<unix-ms>_<name>`, `from` and `to`
//!   versions, a `[match]` and `up` / `down` jq filters.
//! - [`op_json`]: the JSON object a jq filter sees for one op, and back.
//! - [`jq`]: jq filters compiled and run by the jaq crates.
//! - [`chain`]: the path from one version to another, planned before
//!   anything runs, and applied to batches of ops in flight.
//! - [`etcd`]: migrations run in place on an etcd target, with their
//!   history, the target's version and a lock kept in the target.
//!
//! A migration that a jq filter cannot express implements [`Migration`] in
//! Rust and is added to a [`profile::Profile`] with
//! [`profile::Profile::add_migration`].

pub mod chain;
pub mod file;
pub mod in_place;
pub mod jq;
pub mod op_json;
pub mod profile;

use crate::Op;
use crate::error::ErrorKind;

/// Which way a migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the older version to the newer one.
    Up,
    /// From the newer version back to the older one.
    Down,
}

impl Direction {
    /// `up` or `down`, as in the migration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// One step between two adjacent versions of a platform.
///
/// # Contract
/// - `id` is `<unix-ms>_<name>`, unique in its profile; migrations between
///   the same two versions run in id order up, in reverse id order down.
/// - `matches` decides, from the op and the direction alone, whether
///   `apply` sees it; ops it does not match pass through the step
///   untouched. Down, ops are in the newer version's shape.
/// - `apply` is deterministic: the same op gives the same output, so a
///   restore that resumes numbers its ops as the first run did. It returns
///   no op (the op is dropped), one, or several.
/// - `apply` leaves `seq`, `position`, `txn` and `platform_version` to the
///   chain, which sets them.
/// - `apply(Direction::Down, ..)` is only called when `has_down` is true.
pub trait Migration: Send + Sync {
    /// `<unix-ms>_<name>`.
    fn id(&self) -> &str;
    /// The older version.
    fn older_version(&self) -> &str;
    /// The newer version.
    fn newer_version(&self) -> &str;
    /// Whether the migration can run down.
    fn has_down(&self) -> bool;
    /// Whether the step transforms `op` going `direction` (its match).
    fn matches(&self, direction: Direction, op: &Op) -> bool;
    /// Transforms one matched op.
    fn apply(&self, direction: Direction, op: Op) -> Result<Vec<Op>, MigrationError>;
    /// The filter of `direction`, for messages (a jq program, or a name).
    fn describe(&self, direction: Direction) -> String;
}

/// A migration, a profile or a chain failed, or refused.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A profile or migration file cannot be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// A profile or migration file is wrong.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// A version that the profile does not list.
    #[error(
        "version {version:?} is not one of profile {platform}'s versions ({known}); name one of them"
    )]
    UnknownVersion {
        /// The profile's platform.
        platform: String,
        /// The version asked for.
        version: String,
        /// The versions the profile lists.
        known: String,
    },
    /// No migration between two adjacent versions: the chain has a hole.
    #[error(
        "no migration from version {from} to version {to} in profile {platform}: the chain from {chain_from} to {chain_to} has a hole there; nothing was done. Add one with `ferry migrations new NAME --dir DIR --from {from} --to {to}`"
    )]
    Hole {
        /// The profile's platform.
        platform: String,
        /// The start of the missing step.
        from: String,
        /// The end of the missing step.
        to: String,
        /// Where the chain starts.
        chain_from: String,
        /// Where the chain ends.
        chain_to: String,
    },
    /// Going down needs a `down` filter that a migration does not have.
    #[error(
        "migration {id} ({from} -> {to}) has no `down` filter, so ops cannot be taken from {to} back to {from}; nothing was done"
    )]
    NoDown {
        /// The migration.
        id: String,
        /// Its older version.
        from: String,
        /// Its newer version.
        to: String,
    },
    /// No version to start from.
    #[error(
        "cannot tell which version of {platform} the ops are in: {reason}; pass --from-version"
    )]
    NoFromVersion {
        /// The profile's platform.
        platform: String,
        /// Why not.
        reason: String,
    },
    /// A filter failed on an op.
    #[error(
        "migration {id} ({direction}) failed on op seq {seq}, key {key}: {reason}; filter: {filter}"
    )]
    Transform {
        /// The migration.
        id: String,
        /// Which of its filters.
        direction: Direction,
        /// The op's seq in the stream read.
        seq: u64,
        /// The op's key, printable.
        key: String,
        /// What went wrong.
        reason: String,
        /// The filter's text.
        filter: String,
    },
    /// Two different source keys would end up at the same key.
    #[error(
        "the migration chain maps two keys onto {target_key}: {first_key} (op seq {first_seq}) and {second_key} (op seq {second_seq}); one would overwrite the other, so nothing was written. Rename one of them in the source first"
    )]
    Collision {
        /// The key both would get.
        target_key: String,
        /// The first source key.
        first_key: String,
        /// Its op's seq.
        first_seq: u64,
        /// The second source key.
        second_key: String,
        /// Its op's seq.
        second_seq: u64,
    },
    /// `--verify` through a chain compares the Puts the chain makes under
    /// the key prefix, and it makes something else of an op.
    #[error(
        "--verify compares the Puts the version chain makes under --prefix {key_prefix:?}, and op seq {seq} (key {key}) comes out of it {what}; verify a prefix that holds every key the chain makes, or migrate without --verify"
    )]
    Unverifiable {
        /// What the chain makes of the op ("as a etcd.kv Delete", "moved to
        /// KEY").
        what: String,
        /// The source op's seq.
        seq: u64,
        /// The source op's key, printable.
        key: String,
        /// The prefix digested, printable.
        key_prefix: String,
    },
    /// Another `ferry migrations` run holds the target's lock.
    #[error(
        "{target} is locked by another migration run ({holder}); nothing was done. Wait for it to finish; the lock expires by itself {ttl_seconds} s after its holder stops"
    )]
    Locked {
        /// The target.
        target: String,
        /// Who holds it (process, host, since when), as recorded.
        holder: String,
        /// How long the lock outlives a holder that died.
        ttl_seconds: i64,
    },
    /// An in-place migration cannot go on.
    #[error("{target}: {reason}")]
    InPlace {
        /// The target.
        target: String,
        /// What happened, and what to do.
        reason: String,
    },
}

impl MigrationError {
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            MigrationError::Read { .. }
            | MigrationError::Invalid { .. }
            | MigrationError::UnknownVersion { .. }
            | MigrationError::Hole { .. }
            | MigrationError::NoDown { .. }
            | MigrationError::NoFromVersion { .. }
            | MigrationError::Unverifiable { .. } => ErrorKind::Usage,
            MigrationError::Transform { .. } | MigrationError::Collision { .. } => {
                ErrorKind::Source
            }
            MigrationError::Locked { .. } | MigrationError::InPlace { .. } => ErrorKind::Target,
        }
    }
}

/// A key for messages: text when it is, escaped bytes when not.
pub fn printable(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => text.to_owned(),
        Err(_) => key.escape_ascii().to_string(),
    }
}

/// Runs `work` on `value` on tokio's blocking pool and hands both back.
///
/// A chain's jq filters are CPU work: a large batch run on a runtime worker
/// keeps it from timers, HTTP/2 keepalives and other streams for as long as
/// the batch takes, and a peer may take the silence for a dead link. A
/// panic in `work` is raised again here.
pub async fn off_the_runtime<T, R>(
    mut value: T,
    work: impl FnOnce(&mut T) -> R + Send + 'static,
) -> (T, R)
where
    T: Send + 'static,
    R: Send + 'static,
{
    let task = tokio::task::spawn_blocking(move || {
        let result = work(&mut value);
        (value, result)
    });
    match task.await {
        Ok(done) => done,
        Err(error) => match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(error) => panic!("the runtime shut down under a chain's work: {error}"),
        },
    }
}

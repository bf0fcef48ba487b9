//! Why a live migration (`ferry migrate --live`) could not run or stopped
//! before its cutover; shared with `ferry migrate status|resume|abort` and
//! the version migration chain of the relay.

use std::time::Duration;

use ferry_engine::migrations::MigrationError;

use crate::client::ClientError;
use crate::remote::status_text;

/// A migration could not run.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// An agent or the gateway cannot be reached.
    #[error("{role}: {source}")]
    Connect {
        /// Which one ("the source agent at ...").
        role: String,
        /// Why.
        source: ClientError,
    },
    /// A call was answered with an error.
    #[error("{role} refused to {action}: {status}")]
    Call {
        /// Which one.
        role: String,
        /// What was asked.
        action: String,
        /// Its answer.
        status: String,
    },
    /// The agents or the gateway disagree with the migration.
    #[error("{0}")]
    Invalid(String),
    /// The target did not catch up in time; nothing was held or fenced.
    #[error(
        "the target did not catch up within {timeout:?} (--catch-up-timeout, plus --follow-at-least): {lag} positions ({unit}s) behind (--max-lag is {max_lag}); nothing was held or fenced"
    )]
    CatchUp {
        /// How long it waited: the catch-up timeout plus the follow-at-least.
        timeout: Duration,
        /// What a position counts.
        unit: String,
        /// Where the lag stood.
        lag: u64,
        /// The threshold.
        max_lag: u64,
    },
    /// The version migration chain cannot be planned: nothing was held,
    /// fenced or written.
    #[error("{0}")]
    Chain(#[source] MigrationError),
    /// The relay stopped before the cutover, and no resume helps: the
    /// version migration chain failed on an op of the stream (a filter
    /// error, an output that is not an op, a collision), or an agent refused
    /// the stream for good (a target that already holds keys).
    #[error("{0}; nothing was held or fenced")]
    Refused(String),
    /// The agent streams broke and could not be resumed.
    #[error("the agent stream broke and could not be resumed within {timeout:?}: {reason}")]
    Relay {
        /// The limit.
        timeout: Duration,
        /// The last break.
        reason: String,
    },
}

pub(super) fn call_error(role: &str, action: &str, status: tonic::Status) -> MigrateError {
    MigrateError::Call {
        role: role.to_owned(),
        action: action.to_owned(),
        status: status_text(&status),
    }
}

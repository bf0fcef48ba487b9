//! What a gateway in front of a PostgreSQL plane needs of it, with the
//! gateway's own connection: the fence record in the live contract's words
//! (the same the source agent reads), and the unfence that settles a
//! migration that went away undecided.

use super::{PgConnection, PgError};
use crate::adapters::fence_record::fence_state as record_state;
use crate::adapters::live::{FenceAnswer, FenceMove, FenceState};

/// The fence record of the database `connection` reaches, with the epoch
/// whose triggers are raised as its guard.
pub async fn fence_state(connection: &PgConnection) -> Result<FenceState, PgError> {
    let server = connection.server();
    let client = connection.connect().await?;
    let stored = super::fence::read_fence(&client, &server).await?;
    let raised = super::fence::triggers_raised(&client, &server).await?;
    let guard_epochs = match (&stored, raised) {
        (Some(stored), true) => vec![stored.fence.epoch],
        _ => Vec::new(),
    };
    Ok(record_state(stored.as_ref(), guard_epochs))
}

/// Unfences the database `connection` reaches for `wanted`'s epoch, by the
/// same compare-and-swap as the source agent's moves. A gateway never
/// fences or commits: those are refused here.
pub async fn unfence(
    connection: &PgConnection,
    wanted: &FenceMove,
) -> Result<FenceAnswer, PgError> {
    match wanted {
        FenceMove::Unfence { .. } => {
            // An unfence drops the triggers it finds by name: it needs no
            // publication, and copies no sequences.
            super::fence::move_fence(
                connection,
                "",
                &super::catalog::Selection::default(),
                wanted,
            )
            .await
        }
        FenceMove::Fence { epoch, .. } | FenceMove::Commit { epoch, .. } => {
            Ok(FenceAnswer::Refused(format!(
                "a gateway only unfences; epoch {epoch}'s fence and commit are the source agent's"
            )))
        }
    }
}

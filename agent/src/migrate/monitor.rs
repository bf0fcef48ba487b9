//! The monitor of a live migration (`ferry migrate --live`): samples the
//! lag for the report and writes the status file `ferry migrate status`
//! reads ([`read_status`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::warn;

use super::relay::RelayState;
use super::report::{LagSample, MigrationStatus, Phase};

/// Samples the lag and writes the status file until the migration ends.
pub(super) async fn monitor(
    mut state: watch::Receiver<RelayState>,
    mut phase: watch::Receiver<Phase>,
    epoch: u64,
    started: Instant,
    samples: Arc<std::sync::Mutex<Vec<LagSample>>>,
    status_file: Option<PathBuf>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let ended = tokio::select! {
            _ = tick.tick() => false,
            changed = phase.changed() => changed.is_err(),
        };
        let now = state.borrow_and_update().clone();
        let current = *phase.borrow();
        let sample = LagSample {
            at_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            positions: now.lag_positions(),
            ops: now.sent_seq.saturating_sub(now.applied_seq),
        };
        if let Ok(mut samples) = samples.lock() {
            // One sample a second is plenty for a long migration; keep the
            // list bounded.
            let keep = samples.last().is_none_or(|last| {
                sample.at_ms >= last.at_ms + 1000
                    || matches!(current, Phase::Holding | Phase::Fencing | Phase::Draining)
            });
            if keep && samples.len() < 100_000 {
                samples.push(sample);
            }
        }
        if let Some(path) = &status_file {
            let status = MigrationStatus {
                phase: current,
                epoch,
                stream_id: now
                    .start
                    .as_ref()
                    .map(|start| start.stream_id.clone())
                    .unwrap_or_default(),
                snapshot_position: now
                    .start
                    .as_ref()
                    .map_or(0, |start| start.snapshot_position),
                sent_through_seq: now.sent_seq,
                applied_through_seq: now.applied_seq,
                head_position: now.head_position,
                lag_positions: sample.positions,
                lag_ops: sample.ops,
                reconnects: now.reconnects,
                broken: now.broken.clone(),
                updated_at: time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            };
            if let Err(error) = write_status(path, &status) {
                warn!(path = %path.display(), %error, "cannot write the migration status");
            }
        }
        if ended || matches!(current, Phase::Switched | Phase::RolledBack | Phase::Failed) {
            return;
        }
    }
}

/// Writes the status atomically: a reader never sees half of it.
fn write_status(path: &std::path::Path, status: &MigrationStatus) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let text = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

/// Reads what a running (or the last) migration wrote.
pub fn read_status(path: &std::path::Path) -> std::io::Result<MigrationStatus> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text).map_err(std::io::Error::other)
}

//! The driver of a live migration (`ferry migrate --live`): [`migrate`]
//! starts the relay and the monitor, [`run`] follows the live changes until
//! the lag is small, and [`cutover`] holds, fences, drains, verifies and
//! switches, or rolls back. The fault tests' pause hook is here too.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::migrations::chain::Chain;
use ferry_proto::v1::{
    AdoptRequest, CommitRequest, DescribeResponse, FenceRequest, FenceStatusRequest, StreamStart,
    UnfenceRequest,
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::error::MigrateError;
use super::gateways::{self, Gateways};
use super::monitor::monitor;
use super::options::{MigrateOptions, Tee};
use super::plan::{connect_all, describe_plane, plan_chain, position_unit, precheck_chain};
use super::relay::{Relay, RelayState};
use super::report::{LagSample, MigrationReport, Outcome, Phase, ms};
use super::verify::{verify, verify_through_chain};
use super::versions::RelayChain;
use crate::client::{SourceClient, TargetClient};
use crate::remote::status_text;

/// A running migration's handles.
pub(super) struct Running {
    pub(super) source: SourceClient,
    pub(super) target: TargetClient,
    gateways: Gateways,
    pub(super) target_description: DescribeResponse,
    source_description: DescribeResponse,
    /// See [`Connected::revision_offset`](super::plan::Connected::revision_offset).
    revision_offset: i64,
    pub(super) epoch: u64,
    state: watch::Receiver<RelayState>,
    stop: watch::Sender<bool>,
    relay: tokio::task::JoinHandle<()>,
    started: Instant,
    lag: Arc<std::sync::Mutex<Vec<LagSample>>>,
    phase: watch::Sender<Phase>,
    /// The chain `--verify` takes the old plane through, when ops go
    /// through one.
    verify_chain: Option<Chain>,
}

/// Runs a live migration to its end: switched, or rolled back.
///
/// `tee`, when given, receives every op of the stream once, in seq order;
/// it is dropped (closed) when the migration ends. The start of the stream
/// (what it is) is sent on `stream_started` when known.
pub async fn migrate(
    options: MigrateOptions,
    tee: Option<Tee>,
    stream_started: Option<tokio::sync::oneshot::Sender<(StreamStart, DescribeResponse)>>,
) -> Result<MigrationReport, MigrateError> {
    let started = Instant::now();
    let connected = connect_all(&options).await?;
    // Planned before anything is held, fenced or written.
    let mut chain = plan_chain(&options, &connected.source_description)?;
    // `--verify` reads the old plane through a chain of its own while the
    // relay's is busy.
    let verify_chain = if options.verify {
        plan_chain(&options, &connected.source_description)?
    } else {
        None
    };
    let epoch = connected.epoch;
    info!(epoch, source = %describe_plane(&connected.source_description), target = %describe_plane(&connected.target_description), "live migration starts");
    if let Some(chain) = &chain {
        let plan = chain.plan();
        info!(platform = %plan.platform, from = %plan.from, to = %plan.to, steps = plan.steps.len(), "ops go through the version migration chain");
    }
    let version_chain = chain.as_ref().map(|chain| {
        let plan = chain.plan();
        format!("{} {} -> {}", plan.platform, plan.from, plan.to)
    });
    let chain_checked_ops = precheck_chain(&options, &connected, &mut chain).await?;

    let (state_sender, state) = watch::channel(RelayState::default());
    let state_sender = Arc::new(state_sender);
    let (stop, stop_receiver) = watch::channel(false);
    let relay = Relay {
        options: options.clone(),
        epoch,
        state: state_sender,
        stop: stop_receiver,
        tee: tee.map(|tee| tee.ops),
        teed_through: 0,
        chain: chain.map(RelayChain::new),
    };
    let relay = tokio::spawn(relay.run());
    let (phase, phase_receiver) = watch::channel(Phase::Snapshot);
    let lag = Arc::new(std::sync::Mutex::new(Vec::new()));
    let monitor = tokio::spawn(monitor(
        state.clone(),
        phase_receiver,
        epoch,
        started,
        lag.clone(),
        options.status_file.clone(),
    ));
    let mut running = Running {
        source: connected.source,
        target: connected.target,
        gateways: connected.gateways,
        revision_offset: connected.revision_offset,
        target_description: connected.target_description.clone(),
        source_description: connected.source_description.clone(),
        epoch,
        state,
        stop,
        relay,
        started,
        lag,
        phase,
        verify_chain,
    };

    let result = run(
        &mut running,
        &options,
        stream_started,
        &connected.source_description,
    )
    .await
    .map(|mut report| {
        report.version_chain = version_chain;
        report.chain_checked_ops = chain_checked_ops;
        report
    });
    let _ = running.stop.send(true);
    let _ = (&mut running.relay).await;
    // The monitor writes the final phase, then ends.
    let _ = tokio::time::timeout(Duration::from_secs(2), monitor).await;
    result
}

async fn run(
    running: &mut Running,
    options: &MigrateOptions,
    stream_started: Option<tokio::sync::oneshot::Sender<(StreamStart, DescribeResponse)>>,
    source_description: &DescribeResponse,
) -> Result<MigrationReport, MigrateError> {
    // Steps 2 and 3: the snapshot, then following until the lag is small.
    let catch_up_deadline = Instant::now() + options.catch_up_timeout;
    let mut stream_started = stream_started;
    let mut following_since: Option<Instant> = None;
    loop {
        let state = running.state.borrow_and_update().clone();
        if let Some(reason) = state.refused {
            running.phase.send_replace(Phase::Failed);
            return Err(MigrateError::Refused(reason));
        }
        if let Some(reason) = state.failed {
            running.phase.send_replace(Phase::Failed);
            return Err(MigrateError::Relay {
                timeout: options.reconnect_timeout,
                reason,
            });
        }
        if let Some(start) = &state.start
            && let Some(sender) = stream_started.take()
        {
            let _ = sender.send((start.clone(), source_description.clone()));
        }
        // Following once the target holds the whole snapshot.
        if state
            .snapshot_through_seq
            .is_some_and(|through| state.applied_seq >= through)
        {
            let following_since = *following_since.get_or_insert_with(Instant::now);
            if running.phase.send_if_modified(|phase| {
                let changed = *phase == Phase::Snapshot;
                *phase = Phase::Following;
                changed
            }) {
                test_pause_point("following").await;
            }
            if state.broken.is_none()
                && following_since.elapsed() >= options.follow_at_least
                && state.applied_seq >= state.snapshot_through_seq.unwrap_or(u64::MAX)
                && state.lag_positions() <= options.max_lag
            {
                break;
            }
        }
        if Instant::now() >= catch_up_deadline + options.follow_at_least {
            running.phase.send_replace(Phase::Failed);
            return Err(MigrateError::CatchUp {
                // The wait it gave up after: --follow-at-least extends it.
                timeout: options.catch_up_timeout + options.follow_at_least,
                lag: state.lag_positions(),
                unit: position_unit(source_description).to_owned(),
                max_lag: options.max_lag,
            });
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), running.state.changed()).await;
    }
    cutover(running, options).await
}

/// Steps 4 to 9. Any failure before the switch rolls back.
async fn cutover(
    running: &mut Running,
    options: &MigrateOptions,
) -> Result<MigrationReport, MigrateError> {
    let epoch = running.epoch;
    let held_at = Instant::now();
    let mut report = MigrationReport {
        outcome: Outcome::Switched,
        epoch,
        stream_id: String::new(),
        snapshot_position: 0,
        snapshot_ops: 0,
        fenced_position: None,
        ops_moved: 0,
        pause_window_ms: None,
        hold_ms: None,
        fence_ms: None,
        drain_ms: None,
        switch_ms: None,
        drained_writes: 0,
        released_writes: 0,
        rejected_writes: 0,
        reconnects: 0,
        elapsed_ms: 0.0,
        lag: Vec::new(),
        position_unit: position_unit(&running.source_description).to_owned(),
        upstream_url: String::new(),
        version_chain: None,
        chain_checked_ops: None,
        verified_keys: None,
        verify_ms: None,
    };
    let mut fenced = false;
    let mut committed = false;
    // Until the commit is sent, the migration cannot have switched: only
    // this driver commits this epoch.
    let mut commit_sent = false;
    let result: Result<(), String> = async {
        // Step 4: hold writes; the writes in flight drain.
        running.phase.send_replace(Phase::Holding);
        test_pause_point("holding").await;
        report.drained_writes = running
            .gateways
            .hold(epoch, options.max_pause)
            .await?;
        report.hold_ms = Some(ms(held_at.elapsed()));

        // Step 5: fence the old plane; F is after every write it acknowledged.
        running.phase.send_replace(Phase::Fencing);
        test_pause_point("fencing").await;
        let fence_started = Instant::now();
        // From here the old plane may be fenced: a rollback unfences it
        // (a no-op when the fence never took effect).
        fenced = true;
        let fence = tokio::time::timeout(
            options.max_pause.saturating_sub(held_at.elapsed()).max(AGENT_CALL_FLOOR),
            running.source.fence(FenceRequest {
                epoch,
                successor_url: running.target_description.control_plane_url.clone(),
            }),
        )
        .await
        .map_err(|_| "the source agent did not fence the old plane within --max-pause".to_owned())?
            .map_err(|status| format!("the source agent could not fence the old plane: {}", status_text(&status)))?
            .into_inner();
        report.fenced_position = Some(fence.fenced_position);
        report.fence_ms = Some(ms(fence_started.elapsed()));
        // The new plane records the offset its gateways will add to its
        // revisions (for gateways started in front of it) while the target
        // drains: it is known from F, and needed before the commit. An
        // attempt that rolls back leaves it unused; the next overwrites it.
        let revision_offset = running.revision_offset + fence.fenced_position as i64 + 1;
        let adopting = {
            let mut target = running.target.clone();
            let budget = options.max_pause.saturating_sub(held_at.elapsed()).max(AGENT_CALL_FLOOR);
            tokio::spawn(async move {
                tokio::time::timeout(budget, target.adopt(AdoptRequest { epoch, revision_offset })).await
            })
        };

        // Step 6: the target applies through F, within the pause budget.
        running.phase.send_replace(Phase::Draining);
        test_pause_point("draining").await;
        let drain_started = Instant::now();
        let budget = options.max_pause.saturating_sub(held_at.elapsed());
        let deadline = tokio::time::Instant::now() + budget;
        // A stream that breaks now is resumed by the relay as at any other
        // time: the old plane is fenced, so the resume has F to reach, and
        // the pause budget still bounds the wait. Only a relay that gave up
        // ends the cutover early.
        let mut broke: Option<String> = None;
        loop {
            let state = running.state.borrow_and_update().clone();
            if state.applied_through(fence.fenced_position) {
                break;
            }
            if let Some(reason) = &state.refused {
                return Err(reason.clone());
            }
            if let Some(reason) = &state.failed {
                return Err(format!("the agent stream broke during the cutover: {reason}"));
            }
            if let Some(reason) = &state.broken
                && broke.as_ref() != Some(reason)
            {
                warn!(%reason, "the agent stream broke while draining; resuming within the pause budget");
                broke = Some(reason.clone());
            }
            if tokio::time::timeout_at(deadline, running.state.changed()).await.is_err() {
                let broken = state.broken.as_ref().or(broke.as_ref()).map_or(String::new(), |reason| {
                    format!("; the agent stream broke while draining: {reason}")
                });
                return Err(format!(
                    "the target did not apply through the fenced position {} within --max-pause {:?} (it holds seq {} of {}, source position {}){broken}",
                    fence.fenced_position,
                    options.max_pause,
                    state.applied_seq,
                    state.source_position_seq,
                    state.source_position
                ));
            }
        }
        report.drain_ms = Some(ms(drain_started.elapsed()));

        // Step 7 (--verify): the new plane holds what the old one held at F.
        if options.verify {
            running.phase.send_replace(Phase::Verifying);
            test_pause_point("verifying").await;
            let verify_started = Instant::now();
            let budget = options.max_pause.saturating_sub(held_at.elapsed());
            let keys = match running.verify_chain.take() {
                None => verify(running, &options.key_prefix, fence.fenced_position, budget).await?,
                Some(chain) => {
                    verify_through_chain(running, chain, &options.key_prefix, fence.fenced_position, budget).await?
                }
            };
            report.verified_keys = Some(keys);
            report.verify_ms = Some(ms(verify_started.elapsed()));
        }

        // Step 8: the point of no return, in the old plane itself; then
        // every gateway switches (each checks the record).
        running.phase.send_replace(Phase::Switching);
        test_pause_point("switching").await;
        if !matches!(adopting.await, Ok(Ok(Ok(_)))) {
            // Sent while the target agent was away (its stream resumed
            // meanwhile): once more, now that it drained through F.
            tokio::time::timeout(
                options.max_pause.saturating_sub(held_at.elapsed()).max(AGENT_CALL_FLOOR),
                running.target.adopt(AdoptRequest {
                    epoch,
                    revision_offset,
                }),
            )
            .await
            .map_err(|_| "the target agent did not record the revision offset within --max-pause".to_owned())?
            .map_err(|status| format!("the target agent could not record the revision offset: {}", status_text(&status)))?;
        }
        commit_sent = true;
        let commit = tokio::time::timeout(
            options.max_pause.saturating_sub(held_at.elapsed()).max(AGENT_CALL_FLOOR),
            running.source.commit(CommitRequest {
                epoch,
                // One above F as the clients saw it: every revision of the
                // new plane shows above every one of the old.
                successor_revision_offset: revision_offset,
            }),
        )
        .await;
        match commit {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                return Err(format!(
                    "the source agent could not commit the switch in the old plane: {}",
                    status_text(&status)
                ))
            }
            Err(_) => {
                // Whether the commit took effect is for the record to say
                // (and if it cannot say, the rollback's unfence will).
                let record = tokio::time::timeout(
                    gateways::GATEWAY_CALL_TIMEOUT,
                    running.source.fence_status(FenceStatusRequest {}),
                )
                .await;
                if !record.is_ok_and(|record| {
                    record.is_ok_and(|record| {
                        let record = record.into_inner();
                        record.switched && record.epoch == epoch
                    })
                }) {
                    return Err("the source agent did not commit the switch within --max-pause".to_owned());
                }
            }
        }
        committed = true;
        test_pause_point("committed").await;
        let not_switched = running
            .gateways
            .switch(epoch, &running.target_description.control_plane_url)
            .await;
        for reason in not_switched {
            warn!(%reason, "a gateway did not switch; it follows the fence record once its hold lapses");
        }
        Ok(())
    }
    .await;

    // A failure after the commit is no rollback: the migration switched.
    let result = match result {
        Err(reason) if committed => {
            warn!(%reason, "the switch is committed; carrying on");
            Ok(())
        }
        result => result,
    };
    match result {
        Ok(()) => {
            test_pause_point("releasing").await;
            let (released, failures) = running.gateways.release(epoch).await;
            let pause = held_at.elapsed();
            report.pause_window_ms = Some(ms(pause));
            report.switch_ms = Some(
                ms(pause)
                    - report.hold_ms.unwrap_or(0.0)
                    - report.fence_ms.unwrap_or(0.0)
                    - report.drain_ms.unwrap_or(0.0)
                    - report.verify_ms.unwrap_or(0.0),
            );
            report.released_writes = released.released_writes;
            report.rejected_writes = released.rejected_writes;
            for reason in failures {
                warn!(%reason, "a gateway switched but did not confirm the release");
            }
            report.upstream_url = running.target_description.control_plane_url.clone();
            running.phase.send_replace(Phase::Switched);
            info!(
                epoch,
                pause_ms = report.pause_window_ms,
                "switched to the new plane"
            );
        }
        Err(reason) => {
            warn!(%reason, "cutover failed: rolling back");
            running.phase.send_replace(Phase::RollingBack);
            // The unfence is the same compare-and-swap as the commit: it
            // says whether a commit whose answer was lost took effect.
            let mut undone = Ok(());
            if fenced {
                let unfence = tokio::time::timeout(
                    gateways::GATEWAY_CALL_TIMEOUT,
                    running.source.unfence(UnfenceRequest { epoch }),
                )
                .await;
                undone = match unfence {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status))
                        if status.code() == tonic::Code::FailedPrecondition
                            && status.message().contains("cannot be rolled back") =>
                    {
                        Err(None)
                    }
                    Ok(Err(status)) => Err(Some(format!(
                        "the source agent could not unfence the old plane: {}",
                        status_text(&status)
                    ))),
                    Err(_) => Err(Some(format!(
                        "the source agent did not answer the unfence within {:?}",
                        gateways::GATEWAY_CALL_TIMEOUT
                    ))),
                };
            }
            if undone == Err(None) {
                // The commit took effect: finish the switch.
                warn!(%reason, "the commit took effect although its answer was lost: switching");
                let not_switched = running
                    .gateways
                    .switch(epoch, &running.target_description.control_plane_url)
                    .await;
                for reason in not_switched {
                    warn!(%reason, "a gateway did not switch; it follows the fence record once its hold lapses");
                }
            }
            let (released, failures) = running.gateways.release(epoch).await;
            report.released_writes = released.released_writes;
            report.rejected_writes = released.rejected_writes;
            for error in failures {
                warn!(%error, "a gateway did not release the held writes");
            }
            report.pause_window_ms = Some(ms(held_at.elapsed()));
            report.upstream_url = running
                .gateways
                .status()
                .await
                .into_iter()
                .find_map(|(_, status)| status.ok())
                .map(|status| status.upstream_url)
                .unwrap_or_default();
            match undone {
                Ok(()) => {
                    running.phase.send_replace(Phase::RolledBack);
                    report.outcome = Outcome::RolledBack { reason };
                }
                Err(Some(why)) if !commit_sent => {
                    // Not switched, for certain; the gateways' lapsed holds
                    // unfence the old plane once it answers.
                    running.phase.send_replace(Phase::RolledBack);
                    report.outcome = Outcome::RolledBack {
                        reason: format!(
                            "{reason}; the old plane could not be unfenced yet ({why}): the gateways unfence it when it answers, as their holds lapse"
                        ),
                    };
                }
                Err(None) => {
                    running.phase.send_replace(Phase::Switched);
                    report.upstream_url = running.target_description.control_plane_url.clone();
                }
                Err(Some(why)) => {
                    running.phase.send_replace(Phase::Failed);
                    report.outcome = Outcome::Undecided {
                        reason: format!(
                            "{reason}; and the rollback could not be made: {why}. The old plane's fence record decides: the gateways settle from it by themselves (within --max-pause of their holds), and `ferry migrate status --source-agent ... --gateway ...` shows it"
                        ),
                    };
                }
            }
        }
    }
    let state = running.state.borrow().clone();
    if let Some(start) = &state.start {
        report.stream_id = start.stream_id.clone();
        report.snapshot_position = start.snapshot_position;
    }
    report.snapshot_ops = state.snapshot_through_seq.unwrap_or(0);
    report.ops_moved = state.applied_seq;
    report.reconnects = state.reconnects;
    report.elapsed_ms = ms(running.started.elapsed());
    report.lag = running
        .lag
        .lock()
        .map(|samples| samples.clone())
        .unwrap_or_default();
    Ok(report)
}

/// Test hook of the fault tests (`tests/tests/cutover_faults.rs`), off
/// unless `FERRY_TEST_PAUSE_AT_PHASE` names `point`: stops the migration
/// there, so that a test can kill or stop a process in a phase that lasts
/// milliseconds. The points are `following`, `holding`, `fencing`,
/// `draining`, `verifying` and `switching`, each right after the migration
/// enters that phase, then `committed` (the switch committed in the old
/// plane, no gateway switched yet) and `releasing` (the gateways switched,
/// none released yet). There it writes the point's name to the file
/// `FERRY_TEST_PAUSE_FILE` names and waits while that file exists, or
/// forever without one. Both variables are read once. Never set them in
/// production: a held gateway's pause runs on while the migration waits.
async fn test_pause_point(point: &str) {
    static PAUSE_AT: std::sync::OnceLock<Option<(String, Option<PathBuf>)>> =
        std::sync::OnceLock::new();
    let pause_at = PAUSE_AT.get_or_init(|| {
        let point = std::env::var("FERRY_TEST_PAUSE_AT_PHASE").ok()?;
        let file = std::env::var_os("FERRY_TEST_PAUSE_FILE").map(PathBuf::from);
        Some((point, file))
    });
    let Some((pause_at, file)) = pause_at else {
        return;
    };
    if pause_at != point {
        return;
    }
    warn!(
        point,
        "test hook FERRY_TEST_PAUSE_AT_PHASE: the migration waits here"
    );
    let Some(file) = file else {
        return std::future::pending().await;
    };
    if let Err(error) = tokio::fs::write(file, point).await {
        warn!(%error, file = %file.display(), "test hook: cannot write the pause file; going on");
        return;
    }
    while tokio::fs::try_exists(file).await.unwrap_or(false) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    info!(point, "test hook: the migration goes on");
}

/// The least time an agent call of the cutover gets, even when the pause
/// budget is spent.
const AGENT_CALL_FLOOR: Duration = Duration::from_millis(500);

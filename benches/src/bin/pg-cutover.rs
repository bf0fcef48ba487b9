//! The PostgreSQL live cutover under pgbench: live migrations of
//! PostgreSQL 15 to 17, ROUNDS (default 10) under each of two cutover loads,
//! each of a fresh pair of servers (`ferry_tests::pg_live::Upgrade`:
//! pgbench's tables at scale SCALE, default 1), with pgbench's TPC-B
//! (`-n -c 4 -j 2`) running through `ferry gateway` for the whole
//! migration, in runs of [`RUN_SECONDS`] back to back. Each round:
//!
//! - follows for [`RATE_WINDOW`] under pgbench's full load (connections
//!   kept open): the transactions per second pgbench committed (from its
//!   runs' reports, and from the ids of PostgreSQL 15's history, one row
//!   per transaction) against the ops per second ferry applied (the status
//!   file's applied ops, sampled 4 times a second: what the report's `lag`
//!   samples once a second) and the transactions per second that reached
//!   17 (the ids of its history); the lag over the window, and whether it
//!   stayed bounded (17's history falls no further behind 15's); once
//!   switched, whether 17 holds every history row 15 took;
//! - then lowers the load for the cutover: pgbench with a connection per
//!   transaction (`-C`, as a reconnecting pool does, and as
//!   `tests/pg_live_migration.rs` runs it) in one round of two, and with
//!   its connections kept open but held to [`CUTOVER_RATE`] transactions a
//!   second (`-R`) in the other (the gateway moves idle sessions to 17);
//!   ferry cuts over once it has caught up (`--max-lag` as the tests set
//!   it) and followed [`CUTOVER_LEAD`] more: the pause window (from the
//!   gateway's hold to its release) and its parts, whether it switched,
//!   and the lag at ferry's last status before the hold (written 4 times a
//!   second, so up to half a second before it);
//! - keeps pgbench going on 17 for [`AFTER_SWITCH`] and says whether its
//!   runs there failed.
//!
//! Then the median and 99th percentile of the pause window per cutover load
//! (target: p99 <= 1 s), the follow rates and lags (medians over the
//! rounds), and how many cores each kind of process kept busy (every
//! process shares the machine's cores).
//!
//! `cargo run --release -p ferry-benches --bin pg-cutover [-- ROUNDS
//! [SCALE]]` (needs Debian's PostgreSQL 15 and PostgreSQL 17 as
//! `scripts/test.sh` installs them). It asserts nothing.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use ferry_benches::run::cpu_time;
use ferry_tests::live::{migrate_output, spawn_ferry, with_options};
use ferry_tests::pg::{PgServer, client_at, psql_at};
use ferry_tests::pg_live::{DB, Upgrade};

/// Rounds of each cutover load when the command line names no number.
const DEFAULT_ROUNDS: usize = 10;

/// How long the follow rate is measured under pgbench's full load, from
/// the moment the migration follows.
const RATE_WINDOW: Duration = Duration::from_secs(8);

/// How long ferry follows at least under the cutover's load before it may
/// cut over (longer than a pgbench run, so the hold falls under that load).
const CUTOVER_LEAD: Duration = Duration::from_secs(4);

/// pgbench runs this many seconds at a time (each run reports its own
/// rate and failures; the load changes between runs).
const RUN_SECONDS: &str = "2";

/// Transactions a second pgbench is held to (`-R`) for the cutover with
/// its connections kept open: about what `-C` reaches on a small machine.
const CUTOVER_RATE: &str = "150";

/// pgbench goes on against 17 this long after the switch.
const AFTER_SWITCH: Duration = Duration::from_secs(3);

/// How long a round waits for ferry to catch up after the rate window
/// before the migration gives up (`--catch-up-timeout`).
const CATCH_UP_TIMEOUT: &str = "120s";

/// Row changes of one TPC-B transaction (three updates, one insert): the
/// ops ferry moves for it.
const ROW_CHANGES_PER_TRANSACTION: f64 = 4.0;

/// Full load: connections kept open, as fast as answered.
const LOAD_FULL: u8 = 0;
/// A connection per transaction (`-C`).
const LOAD_CONNECTION_PER_TRANSACTION: u8 = 1;
/// Connections kept open, [`CUTOVER_RATE`] transactions a second.
const LOAD_KEPT_OPEN_AT_RATE: u8 = 2;

/// The processes of one round whose CPU time is counted, by kind.
const KINDS: [&str; 7] = [
    "PostgreSQL 15",
    "PostgreSQL 17",
    "gateway",
    "2 agents",
    "ferry migrate",
    "pgbench and psql",
    "this bench",
];

/// One pgbench run: when (since the round's start), under which load, and
/// what it reported.
#[derive(Debug)]
struct Run {
    started: Duration,
    ended: Duration,
    load: u8,
    transactions: u64,
    failed: u64,
    tps: f64,
    succeeded: bool,
    /// The first line of pgbench's stderr that names an error, if any.
    error: Option<String>,
}

/// One sample of the migration's status file.
#[derive(Debug, Clone)]
struct Sample {
    at: Duration,
    phase: String,
    applied_ops: u64,
    lag_ops: u64,
    lag_bytes: u64,
}

/// The highest history id of each server at one moment: one transaction
/// each, so how many pgbench committed on 15 and how many reached 17.
#[derive(Debug, Clone, Copy)]
struct HistoryIds {
    at: Duration,
    old: u64,
    new: u64,
}

/// A number from the line of `output` that starts with `prefix`.
fn number_after(output: &str, prefix: &str) -> Option<f64> {
    output.lines().find_map(|line| {
        line.strip_prefix(prefix)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// pgbench through `address` in runs of [`RUN_SECONDS`] back to back until
/// `stop`, each under the `load` of the moment it starts.
fn pgbench_runs(
    address: String,
    round_started: Instant,
    load: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
) -> Vec<Run> {
    let mut runs = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let run_load = load.load(Ordering::Relaxed);
        let mut arguments = vec!["-n", "-c", "4", "-j", "2", "-T", RUN_SECONDS];
        match run_load {
            LOAD_CONNECTION_PER_TRANSACTION => arguments.push("-C"),
            LOAD_KEPT_OPEN_AT_RATE => arguments.extend(["-R", CUTOVER_RATE]),
            _ => {}
        }
        let started = round_started.elapsed();
        let output = client_at("pgbench", &address, DB)
            .args(&arguments)
            .output()
            .expect("pgbench runs");
        let ended = round_started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let error = stderr
            .lines()
            .find(|line| line.contains("ERROR") || line.contains("abort"))
            .map(str::to_owned);
        runs.push(Run {
            started,
            ended,
            load: run_load,
            transactions: number_after(&stdout, "number of transactions actually processed:")
                .unwrap_or(0.0) as u64,
            failed: number_after(&stdout, "number of failed transactions:").unwrap_or(0.0) as u64,
            tps: number_after(&stdout, "tps =").unwrap_or(f64::NAN),
            succeeded: output.status.success() && error.is_none(),
            error,
        });
    }
    runs
}

/// The highest history id of the servers at `old` and `new` (`HOST:PORT`)
/// every half second until `stop`; a server that cannot answer yet (17
/// before the snapshot made its tables) is skipped.
fn sample_history_ids(
    old: String,
    new: String,
    round_started: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<HistoryIds> {
    let highest = |address: &str| -> Option<u64> {
        psql_at(
            address,
            DB,
            "SELECT coalesce(max(id), 0) FROM pgbench_history;",
        )
        .ok()?
        .trim()
        .parse()
        .ok()
    };
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let at = round_started.elapsed();
        if let (Some(old), Some(new)) = (highest(&old), highest(&new)) {
            samples.push(HistoryIds { at, old, new });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    samples
}

/// Transactions per second pgbench reported committing between `from` and
/// `to` (since the round's start), taking from each run the share of its
/// transactions its overlap with the window makes (a run's rate is taken
/// as even over it); the gaps between runs count as no load.
fn committed_rate<'a>(
    runs: impl IntoIterator<Item = &'a Run>,
    from: Duration,
    to: Duration,
) -> f64 {
    let window = to.saturating_sub(from).as_secs_f64();
    if window <= 0.0 {
        return f64::NAN;
    }
    let transactions: f64 = runs
        .into_iter()
        .map(|run| {
            let overlap = run.ended.min(to).saturating_sub(run.started.max(from));
            let length = run.ended.saturating_sub(run.started).as_secs_f64();
            if length > 0.0 {
                run.transactions as f64 * overlap.as_secs_f64() / length
            } else {
                0.0
            }
        })
        .sum();
    transactions / window
}

/// Reads the migration's status file: its phase, applied ops and lag.
fn read_sample(status_file: &Path, at: Duration) -> Option<Sample> {
    let text = std::fs::read(status_file).ok()?;
    let status: serde_json::Value = serde_json::from_slice(&text).ok()?;
    Some(Sample {
        at,
        phase: status["phase"].as_str()?.to_owned(),
        applied_ops: status["applied_through_seq"].as_u64()?,
        lag_ops: status["lag_ops"].as_u64()?,
        lag_bytes: status["lag_positions"].as_u64()?,
    })
}

/// The fields of `/proc/PID/stat` (`PID` a number or `self`) after the
/// command name (which may hold spaces), the state first; none when there
/// is no such process.
fn stat_fields(pid: &str) -> Vec<String> {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Vec::new();
    };
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after_name.split_whitespace().map(str::to_owned).collect()
}

/// The sum of the fields at `indexes` (of [`stat_fields`]), read as clock
/// ticks (100 a second on Linux).
fn ticks(fields: &[String], indexes: &[usize]) -> Duration {
    let ticks: u64 = indexes
        .iter()
        .filter_map(|&index| fields.get(index)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// utime, stime, cutime and cstime: the CPU time a process used and that of
/// the children it reaped.
const OWN_AND_REAPED: [usize; 4] = [11, 12, 13, 14];

/// cutime and cstime: the CPU time of the children a process reaped.
const REAPED: [usize; 2] = [13, 14];

/// The CPU time of process `root` and of every process under it, living
/// or reaped (a PostgreSQL server's postmaster: its backends, its WAL
/// senders, the backends of `-C` connections that came and went).
fn tree_cpu(root: u32) -> Duration {
    if root == 0 {
        return Duration::ZERO;
    }
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
            {
                let parent = stat_fields(&pid.to_string())
                    .get(1)
                    .and_then(|field| field.parse().ok())
                    .unwrap_or(0);
                parents.push((pid, parent));
            }
        }
    }
    let mut tree = BTreeSet::from([root]);
    let mut grew = true;
    while grew {
        grew = false;
        for (pid, parent) in &parents {
            if tree.contains(parent) && tree.insert(*pid) {
                grew = true;
            }
        }
    }
    tree.into_iter()
        .map(|pid| ticks(&stat_fields(&pid.to_string()), &OWN_AND_REAPED))
        .sum()
}

/// The postmaster's process id, from its `postmaster.pid`.
fn postmaster(server: &PgServer) -> u32 {
    std::fs::read_to_string(server.data_dir().join("postmaster.pid"))
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time used so far by each kind of process of `upgrade`; ferry
/// migrate's is counted with the other children this bench reaped
/// (pgbench, psql) until the round moves it to its own kind.
fn cpu_by_kind(upgrade: &Upgrade) -> [Duration; 7] {
    let of = |pid: u32| cpu_time(&pid.to_string());
    [
        tree_cpu(postmaster(&upgrade.old)),
        tree_cpu(postmaster(&upgrade.new)),
        of(upgrade.gateway.pid()),
        of(upgrade.source_agent.pid()) + of(upgrade.target_agent.pid()),
        Duration::ZERO,
        ticks(&stat_fields("self"), &REAPED),
        cpu_time("self"),
    ]
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (fraction * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The median of `values`, NaN ones left out.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.filter(|value| !value.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 0.5)
}

/// History rows of 15 that 17 lacks, once switched: 15 takes no more
/// writes, and 17's own inserts since take ids above 15's (or, while the
/// sequences are not carried over, fail on a duplicate id).
fn missing_on_17(upgrade: &Upgrade) -> Option<i64> {
    let old = upgrade
        .old
        .psql(
            DB,
            "SELECT count(*), coalesce(max(id), 0) FROM pgbench_history;",
        )
        .ok()?;
    let (count, highest) = old.trim().split_once('|')?;
    let new = upgrade
        .new
        .psql(
            DB,
            &format!("SELECT count(*) FROM pgbench_history WHERE id <= {highest};"),
        )
        .ok()?;
    Some(count.parse::<i64>().ok()? - new.trim().parse::<i64>().ok()?)
}

/// Per second, between two samples `(at, count)`.
fn rate(from: (Duration, u64), to: (Duration, u64)) -> f64 {
    to.1.saturating_sub(from.1) as f64 / to.0.saturating_sub(from.0).as_secs_f64()
}

/// What one round measured.
#[derive(Debug)]
struct Round {
    /// The pause window, when it switched.
    pause_ms: Option<f64>,
    hold_ms: f64,
    fence_ms: f64,
    drain_ms: f64,
    switch_ms: f64,
    /// pgbench's rate over the follow window, by its runs' reports.
    pgbench_transactions_per_second: f64,
    /// 15's history ids over the window.
    committed_transactions_per_second: f64,
    /// The status file's applied ops over the window.
    ferry_ops_per_second: f64,
    /// 17's history ids over the window.
    applied_transactions_per_second: f64,
    /// Transactions 17 was behind 15 at the window's start and end.
    behind_at_start: f64,
    behind_at_end: f64,
    /// ferry's own lag (status file) at the window's end.
    lag_at_window_end_ops: f64,
    lag_at_window_end_bytes: f64,
    /// Transactions 17 was behind 15 at the last history sample before the
    /// hold.
    behind_at_hold: f64,
    /// History rows of 15 (frozen once switched) that 17 lacks.
    missing_on_17: Option<i64>,
    /// ferry's own lag at its last status before the hold.
    lag_at_hold_ops: f64,
    lag_at_hold_bytes: f64,
    /// From the end of the window to the hold (at least [`CUTOVER_LEAD`]).
    held_after_window_seconds: f64,
    /// pgbench's rate under the cutover's load, from its first run to the
    /// hold.
    cutover_load_transactions_per_second: f64,
}

impl Round {
    /// Bounded: 17's history fell behind 15's by no more than 5% of what
    /// 15 committed over the window (ferry applied at least 95% as fast as
    /// pgbench committed).
    fn lag_bounded(&self) -> bool {
        self.applied_transactions_per_second >= 0.95 * self.committed_transactions_per_second
    }
}

/// One migration under pgbench, the cutover under a connection per
/// transaction (`cutover_load` [`LOAD_CONNECTION_PER_TRANSACTION`]) or
/// connections kept open at a rate ([`LOAD_KEPT_OPEN_AT_RATE`]). None when
/// it could not be measured.
async fn round(
    number: usize,
    scale: u32,
    cutover_load: u8,
    cpu_used: &mut [Duration; 7],
    measured: &mut Duration,
) -> Option<Round> {
    let load_name = if cutover_load == LOAD_CONNECTION_PER_TRANSACTION {
        "-C".to_owned()
    } else {
        format!("-R {CUTOVER_RATE}")
    };
    let upgrade = tokio::task::spawn_blocking(move || Upgrade::start(scale))
        .await
        .expect("the servers start");
    let address = upgrade.gateway.field("listen");
    let cpu_before = cpu_by_kind(&upgrade);
    let round_started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(AtomicU8::new(LOAD_FULL));
    let benching = {
        let (address, stop, load) = (address.clone(), stop.clone(), load.clone());
        std::thread::spawn(move || pgbench_runs(address, round_started, load, stop))
    };
    let sampling = {
        let old = format!("127.0.0.1:{}", upgrade.old.port());
        let new = format!("127.0.0.1:{}", upgrade.new.port());
        let stop = stop.clone();
        std::thread::spawn(move || sample_history_ids(old, new, round_started, stop))
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    let status = tempfile::tempdir().expect("temp dir");
    let status_file = status.path().join("status.json");
    let follow_at_least = format!("{}s", (RATE_WINDOW + CUTOVER_LEAD).as_secs());
    let args = with_options(
        upgrade.migrate_args(&status_file),
        &[
            "--follow-at-least",
            &follow_at_least,
            "--catch-up-timeout",
            CATCH_UP_TIMEOUT,
        ],
    );
    let migrate = spawn_ferry(&args);
    let migrate_pid = migrate.id().unwrap_or(0).to_string();
    let mut migrating = tokio::spawn(migrate_output(migrate));
    let mut samples: Vec<Sample> = Vec::new();
    let mut follow_started: Option<Duration> = None;
    let mut migrate_cpu = Duration::ZERO;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let output = loop {
        tokio::select! {
            output = &mut migrating => break output.expect("the migration's task"),
            _ = tick.tick() => {
                let at = round_started.elapsed();
                migrate_cpu = migrate_cpu.max(cpu_time(&migrate_pid));
                let Some(sample) = read_sample(&status_file, at) else { continue };
                if sample.phase == "following" && follow_started.is_none() {
                    follow_started = Some(at);
                }
                if follow_started.is_some_and(|started| at >= started + RATE_WINDOW) {
                    load.store(cutover_load, Ordering::Relaxed);
                }
                samples.push(sample);
            }
        }
    };
    let ended_at = round_started.elapsed();
    tokio::time::sleep(AFTER_SWITCH).await;
    stop.store(true, Ordering::Relaxed);
    let (runs, history) = tokio::task::spawn_blocking(move || {
        (
            benching.join().expect("pgbench's thread"),
            sampling.join().expect("the sampler's thread"),
        )
    })
    .await
    .expect("joins");
    for (used, (after, before)) in cpu_used
        .iter_mut()
        .zip(cpu_by_kind(&upgrade).into_iter().zip(cpu_before))
    {
        *used += after.saturating_sub(before);
    }
    // ferry migrate was reaped beside pgbench's runs: its share moves from
    // theirs to its own.
    cpu_used[4] += migrate_cpu;
    cpu_used[5] = cpu_used[5].saturating_sub(migrate_cpu);
    *measured += round_started.elapsed();

    let (report, code, stderr) = output;
    let report = match report {
        Ok(report) => report,
        Err(stdout) => {
            println!(
                "round {number} (cutover under {load_name}): no report (exit {code:?}): {stdout}\n{stderr}\n{}",
                upgrade.logs()
            );
            return None;
        }
    };
    let float = |name: &str| report[name].as_f64().unwrap_or(f64::NAN);
    let switched = report["outcome"] == "switched";

    let Some(follow_started) = follow_started else {
        println!("round {number} (cutover under {load_name}): never followed: {report}\n{stderr}");
        return None;
    };
    let window_end = follow_started + RATE_WINDOW;
    let hold_at = samples
        .iter()
        .find(|sample| !matches!(sample.phase.as_str(), "starting" | "snapshot" | "following"))
        .map_or(ended_at, |sample| sample.at);
    let in_window: Vec<&Sample> = samples
        .iter()
        .filter(|sample| sample.phase == "following" && sample.at <= window_end)
        .collect();
    let ids_in_window: Vec<&HistoryIds> = history
        .iter()
        .filter(|ids| ids.at >= follow_started && ids.at <= window_end)
        .collect();
    let last_following = samples.iter().rfind(|sample| sample.phase == "following");
    let (Some(first), Some(last), Some(first_ids), Some(last_ids), Some(last_following)) = (
        in_window.first(),
        in_window.last(),
        ids_in_window.first(),
        ids_in_window.last(),
        last_following,
    ) else {
        println!(
            "round {number} (cutover under {load_name}): too few samples in the follow window: {report}"
        );
        return None;
    };
    let measured_round = Round {
        pause_ms: switched.then(|| float("pause_window_ms")),
        hold_ms: float("hold_ms"),
        fence_ms: float("fence_ms"),
        drain_ms: float("drain_ms"),
        switch_ms: float("switch_ms"),
        pgbench_transactions_per_second: committed_rate(&runs, first.at, last.at),
        committed_transactions_per_second: rate(
            (first_ids.at, first_ids.old),
            (last_ids.at, last_ids.old),
        ),
        ferry_ops_per_second: rate((first.at, first.applied_ops), (last.at, last.applied_ops)),
        applied_transactions_per_second: rate(
            (first_ids.at, first_ids.new),
            (last_ids.at, last_ids.new),
        ),
        behind_at_start: first_ids.old.saturating_sub(first_ids.new) as f64,
        behind_at_end: last_ids.old.saturating_sub(last_ids.new) as f64,
        lag_at_window_end_ops: last.lag_ops as f64,
        lag_at_window_end_bytes: last.lag_bytes as f64,
        behind_at_hold: history
            .iter()
            .rfind(|ids| ids.at <= hold_at)
            .map_or(f64::NAN, |ids| ids.old.saturating_sub(ids.new) as f64),
        missing_on_17: switched.then(|| missing_on_17(&upgrade)).flatten(),
        lag_at_hold_ops: last_following.lag_ops as f64,
        lag_at_hold_bytes: last_following.lag_bytes as f64,
        held_after_window_seconds: hold_at.saturating_sub(window_end).as_secs_f64(),
        cutover_load_transactions_per_second: {
            let under_cutover_load = runs.iter().filter(|run| run.load == cutover_load);
            match under_cutover_load.clone().next() {
                Some(first) => committed_rate(under_cutover_load, first.started, hold_at),
                None => f64::NAN,
            }
        },
    };
    // The runs before the hold, across the cutover (from the hold to the
    // migration's end), and after it.
    let before: Vec<&Run> = runs.iter().filter(|run| run.ended <= hold_at).collect();
    let across: Vec<&Run> = runs
        .iter()
        .filter(|run| run.ended > hold_at && run.started < ended_at)
        .collect();
    let after: Vec<&Run> = runs.iter().filter(|run| run.started >= ended_at).collect();
    let failures = |part: &[&Run]| {
        let failed: Vec<&&Run> = part
            .iter()
            .filter(|run| !run.succeeded || run.failed > 0)
            .collect();
        let first_error = failed
            .iter()
            .find_map(|run| run.error.as_deref())
            .map(|error| format!(" (first error: {error})"))
            .unwrap_or_default();
        format!("{} of {}{first_error}", failed.len(), part.len())
    };
    let tps_of = |load: u8| {
        let values: Vec<String> = runs
            .iter()
            .filter(|run| run.load == load && run.ended <= hold_at)
            .map(|run| format!("{:.0}", run.tps))
            .collect();
        values.join(" ")
    };
    println!(
        "round {number} (cutover under {load_name}): {} in {:.1} s, pause {:.1} ms (hold {:.1}, fence {:.1}, drain {:.1}, switch {:.1}); snapshot {} ops, {} live ops",
        report["outcome"].as_str().unwrap_or("?"),
        float("elapsed_ms") / 1000.0,
        float("pause_window_ms"),
        measured_round.hold_ms,
        measured_round.fence_ms,
        measured_round.drain_ms,
        measured_round.switch_ms,
        report["snapshot_ops"],
        report["ops_moved"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(report["snapshot_ops"].as_u64().unwrap_or(0)),
    );
    println!(
        "  follow window ({:.1} s): pgbench {:.0} tx/s by its reports, 15 committed {:.0} tx/s ({:.0} row changes/s); ferry applied {:.0} ops/s, 17 received {:.0} tx/s ({}); 17 behind 15 by {:.0} then {:.0} tx; ferry's lag at the window's end {:.0} ops / {:.0} bytes",
        last.at.saturating_sub(first.at).as_secs_f64(),
        measured_round.pgbench_transactions_per_second,
        measured_round.committed_transactions_per_second,
        measured_round.committed_transactions_per_second * ROW_CHANGES_PER_TRANSACTION,
        measured_round.ferry_ops_per_second,
        measured_round.applied_transactions_per_second,
        if measured_round.lag_bounded() {
            "bounded"
        } else {
            "falling behind"
        },
        measured_round.behind_at_start,
        measured_round.behind_at_end,
        measured_round.lag_at_window_end_ops,
        measured_round.lag_at_window_end_bytes,
    );
    println!(
        "  cutover: held {:.1} s after the window (at least {} s), under {:.0} tx/s from the cutover's load; lag at the last status before the hold {:.0} ops / {:.0} bytes (17 behind 15 by {:.0} tx at the last sample before it); 15's history rows missing on 17: {}; pgbench runs' tps: full [{}], -C [{}], -R [{}]; pgbench runs that failed: before the hold {}, across the cutover {}, after it {}",
        measured_round.held_after_window_seconds,
        CUTOVER_LEAD.as_secs(),
        measured_round.cutover_load_transactions_per_second,
        measured_round.lag_at_hold_ops,
        measured_round.lag_at_hold_bytes,
        measured_round.behind_at_hold,
        measured_round
            .missing_on_17
            .map_or("not checked".to_owned(), |missing| missing.to_string()),
        tps_of(LOAD_FULL),
        tps_of(LOAD_CONNECTION_PER_TRANSACTION),
        tps_of(LOAD_KEPT_OPEN_AT_RATE),
        failures(&before),
        failures(&across),
        failures(&after),
    );
    if !switched {
        let gateway = upgrade.gateway.stderr();
        let lines: Vec<&str> = gateway.lines().collect();
        println!(
            "  {}\n  the gateway's last lines:\n{}",
            report["reason"],
            lines[lines.len().saturating_sub(20)..].join("\n")
        );
    }
    Some(measured_round)
}

/// Prints the pause window of the `rounds` that switched, of `attempted`.
fn print_pauses(load: &str, rounds: &[Round], attempted: usize) {
    let mut pauses: Vec<f64> = rounds.iter().filter_map(|round| round.pause_ms).collect();
    pauses.sort_by(f64::total_cmp);
    let switched = || rounds.iter().filter(|round| round.pause_ms.is_some());
    println!(
        "pause window ({load}; {} switched of {attempted}): median {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 <= 1000 ms); medians of its parts: hold {:.1}, fence {:.1}, drain {:.1}, switch {:.1} ms",
        pauses.len(),
        percentile(&pauses, 0.5),
        percentile(&pauses, 0.99),
        pauses.last().copied().unwrap_or(f64::NAN),
        median(switched().map(|round| round.hold_ms)),
        median(switched().map(|round| round.fence_ms)),
        median(switched().map(|round| round.drain_ms)),
        median(switched().map(|round| round.switch_ms)),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|text| text.parse().expect("ROUNDS is a number"))
        .unwrap_or(DEFAULT_ROUNDS);
    let scale: u32 = std::env::args()
        .nth(2)
        .map(|text| text.parse().expect("SCALE is a number"))
        .unwrap_or(1);
    println!(
        "ferry: {}; {rounds} rounds of each cutover load at pgbench scale {scale}",
        ferry_tests::ferry_binary().display()
    );
    let mut per_transaction = Vec::new();
    let mut kept_open = Vec::new();
    let mut cpu_used = [Duration::ZERO; 7];
    let mut measured = Duration::ZERO;
    // The two loads take turns, so whatever else the machine does weighs on
    // both alike.
    for number in 1..=2 * rounds {
        let cutover_load = if number % 2 == 1 {
            LOAD_CONNECTION_PER_TRANSACTION
        } else {
            LOAD_KEPT_OPEN_AT_RATE
        };
        let Some(measured_round) =
            round(number, scale, cutover_load, &mut cpu_used, &mut measured).await
        else {
            continue;
        };
        if cutover_load == LOAD_CONNECTION_PER_TRANSACTION {
            per_transaction.push(measured_round);
        } else {
            kept_open.push(measured_round);
        }
    }
    println!();
    print_pauses(
        "pgbench -C, a connection per transaction",
        &per_transaction,
        rounds,
    );
    print_pauses(
        &format!("pgbench's connections kept open, -R {CUTOVER_RATE}"),
        &kept_open,
        rounds,
    );
    let all: Vec<&Round> = per_transaction.iter().chain(&kept_open).collect();
    let of = |value: fn(&Round) -> f64| median(all.iter().map(|round| value(round)));
    let committed = of(|round| round.committed_transactions_per_second);
    println!(
        "follow: pgbench committed {committed:.0} tx/s ({:.0} row changes/s; {:.0} tx/s by its own reports), ferry applied {:.0} ops/s ({:.0} tx/s reached 17), lag at the cutover {:.0} ops / {:.0} bytes (medians of {} rounds; the rates over the first {} s of following under pgbench -c 4 -j 2 with connections kept open; the lag at ferry's last status before the hold)",
        committed * ROW_CHANGES_PER_TRANSACTION,
        of(|round| round.pgbench_transactions_per_second),
        of(|round| round.ferry_ops_per_second),
        of(|round| round.applied_transactions_per_second),
        of(|round| round.lag_at_hold_ops),
        of(|round| round.lag_at_hold_bytes),
        all.len(),
        RATE_WINDOW.as_secs(),
    );
    let mut ratios: Vec<f64> = all
        .iter()
        .map(|round| {
            round.ferry_ops_per_second
                / (round.committed_transactions_per_second * ROW_CHANGES_PER_TRANSACTION)
        })
        .filter(|ratio| !ratio.is_nan())
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "follow lag: bounded (ferry applied >= 95% of the commit rate) in {} of {} rounds; 17 behind 15 by a median {:.0} tx at the window's start, {:.0} tx at its end, {:.0} tx at the hold; ferry's own lag at the window's end {:.0} ops / {:.0} bytes; ferry's ops over 15's row changes in the window: median {:.2}, from {:.2} to {:.2}; held a median {:.1} s after the window, the cutover's load {:.0} tx/s",
        all.iter().filter(|round| round.lag_bounded()).count(),
        all.len(),
        of(|round| round.behind_at_start),
        of(|round| round.behind_at_end),
        of(|round| round.behind_at_hold),
        of(|round| round.lag_at_window_end_ops),
        of(|round| round.lag_at_window_end_bytes),
        median(ratios.iter().copied()),
        ratios.first().copied().unwrap_or(f64::NAN),
        ratios.last().copied().unwrap_or(f64::NAN),
        of(|round| round.held_after_window_seconds),
        of(|round| round.cutover_load_transactions_per_second),
    );
    let missing: Vec<i64> = all.iter().filter_map(|round| round.missing_on_17).collect();
    println!(
        "15's history rows missing on 17 after the switch: {} in all, over {} rounds checked",
        missing.iter().sum::<i64>(),
        missing.len(),
    );
    let cores = |time: Duration| time.as_secs_f64() / measured.as_secs_f64().max(1e-9);
    let parts: Vec<String> = KINDS
        .iter()
        .zip(cpu_used)
        .map(|(kind, time)| format!("{kind} {:.2}", cores(time)))
        .collect();
    println!(
        "cores kept busy over the rounds (of {} here): {}; together {:.2}",
        std::thread::available_parallelism().map_or(0, |cores| cores.get()),
        parts.join(", "),
        cores(cpu_used.iter().sum()),
    );
}

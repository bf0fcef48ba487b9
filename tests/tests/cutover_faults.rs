//! Issue 10, item 8: the live cutover when one of its processes fails, at
//! each point of the cutover. The driver (`ferry migrate --live --verify`)
//! stops at the point through its test hook (`FERRY_TEST_PAUSE_AT_PHASE`:
//! most phases last milliseconds), the test checks the planes and gateways
//! are as that point says, the fault lands, and then:
//! - the plane takes writes again through both gateway replicas, within a
//!   generous 60 s (the time is printed, never asserted);
//! - the old plane's fence record says the outcome the point implies
//!   (switched once the commit is written, rolled back before it), and the
//!   driver, when it lives to report, says the same;
//! - `ferry migrate status` reads that decision, and sees both gateways on
//!   that plane, holding nothing;
//! - the correctness test's history check holds on the plane that serves:
//!   every acknowledged write is there, in order, and no refused one; after
//!   a switch, the old plane acknowledged nothing after its fence and took
//!   no write after it but the commit, and no writer went back to it.
//!
//! The faults: kill -9 of the driver at every point, then `ferry migrate
//! resume` or `abort` at once, or no command at all (the holds lapse with
//! the driver's streams); the driver stopped (SIGSTOP) and an operator's
//! `resume` or `abort` run while its holds still stand, then the kill;
//! kill -9 of a gateway replica at every point, started again at once on
//! its addresses with its first flags; SIGSTOP, for longer than
//! `--max-pause`, of the driver, each agent, and the old and the new etcd,
//! where each hurts most. Each test prints a `fault:` line with the longest
//! time a writer went without an acknowledged write (its writes refused,
//! or waiting), and when the plane took writes again.
//!
//! A write whose answer was lost (its gateway killed under it) may or may
//! not have taken effect: it is allowed in its place in its key's history,
//! never elsewhere. A write the gateway refused (`UNAVAILABLE`, "the
//! control plane is being switched ... retry") must not be there.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::{PutRequest, RangeRequest};
use ferry_tests::ferry_binary;
use ferry_tests::live::{
    Cluster, Effect, KEYS_PER_WRITER, PREFIX, SEEDED_KEYS, WRITERS, Write, cluster_id_and_revision,
    history, kv, with_options, writer, writer_key,
};
use ferry_tests::process::{FerryProcess, signal};

/// Where the driver stops for the fault (its test hook's points, in the
/// order the cutover passes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// Live changes follow; nothing held.
    Following,
    /// Entered the hold; no gateway held yet.
    Holding,
    /// Every gateway holds writes; the old plane is not fenced yet.
    Fencing,
    /// The old plane is fenced; the target applies through F.
    Draining,
    /// The target holds everything through F; the digests are compared.
    Verifying,
    /// Verified; the switch is not committed yet.
    Switching,
    /// The switch is committed in the old plane; no gateway switched.
    Committed,
    /// Every gateway switched; none released.
    Releasing,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::Following => "following",
            Point::Holding => "holding",
            Point::Fencing => "fencing",
            Point::Draining => "draining",
            Point::Verifying => "verifying",
            Point::Switching => "switching",
            Point::Committed => "committed",
            Point::Releasing => "releasing",
        }
    }
}

/// What an operator runs once the driver is gone or hangs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decide {
    Resume,
    Abort,
}

/// A process stopped with SIGSTOP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Process {
    Driver,
    SourceAgent,
    TargetAgent,
    OldEtcd,
    NewEtcd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// kill -9 of the driver, then this command at once (none: the
    /// gateways' holds lapse with the driver's streams and settle).
    KillDriver(Option<Decide>),
    /// The driver stopped (SIGSTOP: its holds stand until the pause runs
    /// out), this command run meanwhile, then the driver killed with -9.
    StopDriverThen(Decide),
    /// kill -9 of the first gateway replica, started again at once on its
    /// addresses with the flags it was first started with; the driver goes
    /// on.
    RestartGateway,
    /// SIGSTOP for longer than `--max-pause`, then SIGCONT; the driver goes
    /// on meanwhile (unless it is the one stopped).
    Stop(Process),
}

/// The outcome a fault must end in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ends {
    /// The old plane serves, unfenced (or never fenced).
    RolledBack,
    /// The new plane serves.
    Switched,
    /// Either, as the record says (a race the record's compare-and-swap
    /// decides), with the driver agreeing.
    AsRecorded,
}

/// How long a stopped process stays stopped: past `--max-pause` and the
/// driver's 5 s deadline on a rollback's Unfence and Release, so whether
/// the driver ends without the stopped process shows.
const STOPPED_FOR: Duration = Duration::from_secs(10);
/// `--max-pause` of every migration here but the gateway restarts'.
const MAX_PAUSE: &str = "3s";
/// The writers' pace between writes.
const PACE: Duration = Duration::from_millis(5);
/// The plane must take writes again within this after the fault.
const WRITABLE_WITHIN: Duration = Duration::from_secs(60);

/// `ferry migrate --live --verify` stopped at a point by its test hook,
/// its output in files (nobody reads a pipe while it waits).
struct Driver {
    child: tokio::process::Child,
    pause_file: PathBuf,
    status_file: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Driver {
    fn start(cluster: &Cluster, dir: &Path, point: Point, max_pause: &str) -> Self {
        let status_file = dir.join("status.json");
        let pause_file = dir.join("paused");
        let (stdout, stderr) = (dir.join("stdout"), dir.join("stderr"));
        let args = with_options(
            cluster.migrate_args(&status_file),
            &["--verify", "--max-pause", max_pause],
        );
        let file = |path: &Path| std::fs::File::create(path).expect("an output file");
        let child = tokio::process::Command::new(ferry_binary())
            .args(&args)
            .env("RUST_LOG", "info")
            .env("FERRY_TEST_PAUSE_AT_PHASE", point.name())
            .env("FERRY_TEST_PAUSE_FILE", &pause_file)
            .stdout(file(&stdout))
            .stderr(file(&stderr))
            .kill_on_drop(true)
            .spawn()
            .expect("ferry migrate starts");
        Self {
            child,
            pause_file,
            status_file,
            stdout,
            stderr,
        }
    }

    /// Waits until the driver waits at its point; returns the snapshot's
    /// position R from its status file.
    async fn paused(&mut self) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.pause_file.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "ferry migrate ended ({status}) before its pause point: {}",
                    self.stderr_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ferry migrate did not reach its pause point in 120 s: {}",
                self.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..200 {
            if let Ok(text) = std::fs::read_to_string(&self.status_file)
                && let Ok(status) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(position) = status["snapshot_position"].as_i64()
                && position > 0
            {
                return position;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the status file never named the snapshot's position");
    }

    /// Lets the driver go on from its point.
    fn go_on(&self) {
        std::fs::remove_file(&self.pause_file).expect("remove the pause file");
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("the driver runs")
    }

    async fn kill(&mut self) {
        self.child.start_kill().expect("kill -9 the driver");
        self.child.wait().await.expect("the driver is gone");
    }

    /// Waits (at most 2 minutes) for its end: the JSON report and the exit
    /// code.
    async fn report(&mut self) -> (serde_json::Value, Option<i32>) {
        let status = tokio::time::timeout(Duration::from_secs(120), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the driver did not end: {}", self.stderr_text()))
            .expect("the driver runs");
        let stdout = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let report = serde_json::from_str(&stdout).unwrap_or_else(|_| {
            panic!(
                "ferry migrate printed no report: {stdout}\n{}",
                self.stderr_text()
            )
        });
        (report, status.code())
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // A failed test shows what the driver logged: CI keeps nothing else.
        if std::thread::panicking() {
            eprintln!("--- ferry migrate logged ---\n{}---", self.stderr_text());
        }
    }
}

/// `ferry --output json migrate ARGS --source-agent .. --gateway G1,G2`:
/// its JSON answer and exit code.
async fn migrate_command(cluster: &Cluster, command: &str) -> (serde_json::Value, i32) {
    let output = tokio::process::Command::new(ferry_binary())
        .args([
            "--output",
            "json",
            "migrate",
            command,
            "--source-agent",
            &cluster.source_agent.field("listen"),
            "--gateway",
            &format!(
                "{},{}",
                cluster.gateway.field("admin"),
                cluster.second_gateway.field("admin")
            ),
        ])
        .output()
        .await
        .expect("ferry runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let answer = serde_json::from_str(&stdout).unwrap_or(serde_json::json!({
        "stdout": stdout,
        "stderr": stderr,
    }));
    (answer, output.status.code().unwrap_or(-1))
}

/// Kills the first gateway replica with -9 and starts it again at once, as
/// a supervisor would: on the addresses it had, in front of the old plane
/// (its first `--upstream`).
fn restart_gateway(cluster: &mut Cluster) {
    let listen = cluster.gateway.field("listen");
    let admin = cluster.gateway.field("admin");
    cluster.gateway.kill();
    cluster.gateway = FerryProcess::start(
        &[
            "gateway",
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--upstream",
            &cluster.old.url(),
        ],
        &[],
    )
    .expect("the gateway starts again");
}

/// Waits until a put through each of the gateways listening at `listens`
/// is acknowledged (a held one waits in line; a refused or failed one is
/// tried again); returns how long after `since` both were.
async fn writable_again(listens: [String; 2], since: Instant) -> Duration {
    let deadline = since + WRITABLE_WITHIN;
    let through = async |listen: String| {
        let mut last = String::new();
        loop {
            let attempt = async {
                let mut client = KvClient::connect(format!("http://{listen}"))
                    .await
                    .map_err(|error| error.to_string())?;
                client
                    .put(PutRequest {
                        key: format!("/probe/{listen}").into_bytes(),
                        value: b"writable".to_vec(),
                        ..PutRequest::default()
                    })
                    .await
                    .map_err(|status| status.message().to_owned())
            };
            match tokio::time::timeout_at(deadline.into(), attempt).await {
                Ok(Ok(_)) => return,
                Ok(Err(error)) => last = error,
                Err(_) => break,
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "no write went through the gateway at {listen} within {WRITABLE_WITHIN:?} of the fault (the last answer: {last})"
        );
    };
    let [first, second] = listens;
    futures::join!(through(first), through(second));
    since.elapsed()
}

/// The old plane's fence record, as etcd holds it (not through ferry), and
/// the fenced position F while its guard key is there.
async fn fence_record(cluster: &Cluster) -> (serde_json::Value, Option<i64>) {
    let mut client = kv(&cluster.old.endpoint()).await;
    let mut read = async |key: &[u8]| {
        client
            .range(RangeRequest {
                key: key.to_vec(),
                ..RangeRequest::default()
            })
            .await
            .expect("range")
            .into_inner()
            .kvs
            .into_iter()
            .next()
    };
    let record = read(b"__ferry__/fence")
        .await
        .map_or(serde_json::Value::Null, |kv| {
            serde_json::from_slice(&kv.value).expect("the record is JSON")
        });
    let fenced_at = read(b"__ferry__/fenced")
        .await
        .map(|guard| guard.create_revision);
    (record, fenced_at)
}

/// How a write was answered, for the history check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Acknowledged: it took effect.
    Acknowledged,
    /// Refused by the gateway (held past the pause, or met the fence): it
    /// took no effect.
    Refused,
    /// Its answer was lost (the gateway died under it): it may have.
    Unknown,
}

fn fate(write: &Write) -> Fate {
    match &write.answer {
        Ok(_) => Fate::Acknowledged,
        Err((tonic::Code::Unavailable, message))
            if message.contains("the control plane is being switched") =>
        {
            Fate::Refused
        }
        Err(_) => Fate::Unknown,
    }
}

/// What each key's history in the serving plane must be: the correctness
/// test's [`ferry_tests::live::expected_history`] (the key's value at the
/// snapshot R, or its seeded value when the old plane serves, then every
/// later change in order), each change marked optional when its write's
/// answer was lost. Each key has one writer, who writes one write at a
/// time, so a key's changes come in its writer's order.
fn expected_with_lost_answers(
    writes: &[Write],
    old_cluster: u64,
    snapshot_position: Option<i64>,
) -> BTreeMap<Vec<u8>, Vec<(Effect, bool)>> {
    let mut base: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    for index in 0..SEEDED_KEYS {
        base.insert(
            format!("{PREFIX}seed/{index:05}").into_bytes(),
            Some(format!("seeded value {index} {}", "x".repeat(150)).into_bytes()),
        );
    }
    for writer in 0..WRITERS {
        for index in 0..KEYS_PER_WRITER {
            base.insert(
                writer_key(writer, index),
                Some(format!("w{writer} initial {index}").into_bytes()),
            );
        }
    }
    let mut ordered: Vec<&Write> = writes.iter().collect();
    ordered.sort_by_key(|write| (write.writer, write.number));
    let mut later: Vec<&Write> = Vec::new();
    for write in ordered {
        let in_snapshot = snapshot_position.is_some_and(|position| {
            write
                .answer
                .as_ref()
                .is_ok_and(|answer| answer.cluster_id == old_cluster && answer.revision <= position)
        });
        if !in_snapshot {
            later.push(write);
            continue;
        }
        for (key, effect) in &write.effects {
            match effect {
                Effect::Put(value) => {
                    base.insert(key.clone(), Some(value.clone()));
                }
                Effect::Delete if write.answer.as_ref().is_ok_and(|answer| answer.deleted > 0) => {
                    base.insert(key.clone(), None);
                }
                Effect::Delete => {}
            }
        }
    }
    let mut expected: BTreeMap<Vec<u8>, Vec<(Effect, bool)>> = BTreeMap::new();
    for (key, value) in base {
        if let Some(value) = value {
            expected
                .entry(key)
                .or_default()
                .push((Effect::Put(value), false));
        }
    }
    for write in later {
        let optional = match fate(write) {
            Fate::Acknowledged => false,
            Fate::Refused => continue,
            Fate::Unknown => true,
        };
        let deleted = write.answer.as_ref().map_or(0, |answer| answer.deleted);
        for (key, effect) in &write.effects {
            if *effect == Effect::Delete && !optional && deleted == 0 {
                continue;
            }
            expected
                .entry(key.clone())
                .or_default()
                .push((effect.clone(), optional));
        }
    }
    expected
}

/// Whether `actual` is `expected` with some of its optional changes left
/// out.
fn matches(expected: &[(Effect, bool)], actual: &[Effect]) -> bool {
    let mut positions = BTreeSet::from([0]);
    for (effect, optional) in expected {
        let mut next = BTreeSet::new();
        for &at in &positions {
            if actual.get(at) == Some(effect) {
                next.insert(at + 1);
            }
            if *optional {
                next.insert(at);
            }
        }
        positions = next;
    }
    positions.contains(&actual.len())
}

fn show(effect: &Effect) -> String {
    match effect {
        Effect::Put(value) => String::from_utf8_lossy(value).chars().take(24).collect(),
        Effect::Delete => "<deleted>".to_owned(),
    }
}

/// The history check, on the plane the record says serves.
async fn assert_history(
    cluster: &Cluster,
    writes: &[Write],
    switched: bool,
    fenced_at: Option<i64>,
    snapshot_position: i64,
) {
    let (old_cluster, old_revision) = cluster_id_and_revision(&cluster.old.endpoint()).await;
    let (new_cluster, _) = cluster_id_and_revision(&cluster.new.endpoint()).await;
    let mut answered_by_new = 0;
    let mut first_new: BTreeMap<usize, u64> = BTreeMap::new();
    for write in writes {
        let Ok(answer) = &write.answer else { continue };
        if answer.cluster_id == new_cluster {
            answered_by_new += 1;
            let first = first_new.entry(write.writer).or_insert(write.number);
            *first = (*first).min(write.number);
        } else {
            assert_eq!(
                answer.cluster_id, old_cluster,
                "write {}/{} was answered by an etcd that is neither plane",
                write.writer, write.number
            );
        }
    }
    if switched {
        let fenced_at = fenced_at.expect("a switched plane keeps its fence guard");
        assert_eq!(
            old_revision,
            fenced_at + 1,
            "the old etcd took a write after the fence other than the commit"
        );
        assert!(answered_by_new > 0, "no write reached the new plane");
        for write in writes {
            if let Ok(answer) = &write.answer
                && answer.cluster_id == old_cluster
            {
                assert!(
                    answer.revision <= fenced_at,
                    "the old etcd acknowledged write {}/{} at {} after its fence at {fenced_at}",
                    write.writer,
                    write.number,
                    answer.revision
                );
                assert!(
                    first_new
                        .get(&write.writer)
                        .is_none_or(|first| write.number < *first),
                    "writer {} was answered by the old plane after the new one",
                    write.writer
                );
            }
        }
    } else {
        assert_eq!(
            answered_by_new, 0,
            "writes were answered by the new plane, which never took over"
        );
        assert_eq!(fenced_at, None, "the old plane is still fenced");
    }
    let serving = if switched { &cluster.new } else { &cluster.old };
    let expected =
        expected_with_lost_answers(writes, old_cluster, switched.then_some(snapshot_position));
    let actual = history(&serving.endpoint()).await;
    let mut mismatches = Vec::new();
    for (key, want) in &expected {
        let got = actual.get(key).map(Vec::as_slice).unwrap_or_default();
        if !matches(want, got) {
            mismatches.push(format!(
                "{}: expected {:?}\n  got {:?}",
                String::from_utf8_lossy(key),
                want.iter()
                    .map(|(effect, optional)| format!(
                        "{}{}",
                        show(effect),
                        if *optional { "?" } else { "" }
                    ))
                    .collect::<Vec<_>>(),
                got.iter().map(show).collect::<Vec<_>>()
            ));
        }
    }
    for key in actual.keys() {
        if !expected.contains_key(key) {
            mismatches.push(format!(
                "{} is in the serving plane but was never written",
                String::from_utf8_lossy(key)
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} keys differ from their acknowledged history ({} writes):\n{}",
        mismatches.len(),
        writes.len(),
        mismatches
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Waits (at most 30 s) until `ferry migrate status` reads the decision
/// `switched` says from the record, and sees every gateway on that plane,
/// holding nothing. (A gateway may still be releasing its line, or a
/// stopped agent's late fence still be settling.)
async fn assert_settled(cluster: &Cluster, switched: bool) {
    let serving = if switched {
        cluster.new.url()
    } else {
        cluster.old.url()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, code) = migrate_command(cluster, "status").await;
        assert_eq!(code, 0, "{status}");
        let decision = status["decision"].as_str().unwrap_or_default();
        let decided = if switched {
            decision == "switched"
        } else {
            matches!(decision, "none" | "unfenced")
        };
        let gateways_settled = status["gateways"].as_array().is_some_and(|gateways| {
            gateways
                .iter()
                .all(|gateway| gateway["holding"] == false && gateway["upstream_url"] == serving)
        });
        if decided && gateways_settled {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not settled on {serving} within 30 s: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The longest time one writer went without an acknowledged write (its
/// writes refused, or waiting), and the writes refused and lost.
fn longest_refusal(writes: &[Write]) -> (Duration, usize, usize) {
    let mut longest = Duration::ZERO;
    for writer in 0..WRITERS {
        let mut acknowledged: Vec<Instant> = writes
            .iter()
            .filter(|write| write.writer == writer && write.answer.is_ok())
            .map(|write| write.answered_at)
            .collect();
        acknowledged.sort();
        for pair in acknowledged.windows(2) {
            longest = longest.max(pair[1] - pair[0]);
        }
    }
    let count = |wanted| writes.iter().filter(|write| fate(write) == wanted).count();
    (longest, count(Fate::Refused), count(Fate::Unknown))
}

/// The planes and gateways as the driver, waiting at `point`, must have
/// left them: the fault lands where the test says.
async fn assert_paused_at(cluster: &Cluster, point: Point) {
    let (record, _) = fence_record(cluster).await;
    let (status, code) = migrate_command(cluster, "status").await;
    assert_eq!(code, 0, "{status}");
    let gateways = status["gateways"].as_array().expect("gateways");
    let all = |test: &dyn Fn(&serde_json::Value) -> bool| gateways.iter().all(test);
    let fenced = record["fenced"] == true;
    let switched = record["switched"] == true;
    let holding = all(&|gateway| gateway["holding"] == true);
    let not_holding = all(&|gateway| gateway["holding"] == false);
    let on = |plane: String| all(&|gateway| gateway["upstream_url"] == plane.as_str());
    let as_expected = match point {
        Point::Following | Point::Holding => !fenced && not_holding,
        Point::Fencing => !fenced && holding,
        Point::Draining | Point::Verifying | Point::Switching => fenced && !switched && holding,
        Point::Committed => switched && holding && on(cluster.old.url()),
        Point::Releasing => switched && holding && on(cluster.new.url()),
    };
    assert!(
        as_expected,
        "paused at {}, the record says {record} and the gateways {status}",
        point.name()
    );
}

/// What the run measured, for the `fault:` line.
struct Measured {
    /// The longest time one writer went without an acknowledged write.
    longest_refusal: Duration,
    refused: usize,
    lost: usize,
    writes: usize,
    /// From the fault until a write went through both gateways.
    writable_after: Duration,
    /// From the fault until the driver ended, when it ran on.
    driver_ended_after: Option<Duration>,
}

/// Migrates a seeded cluster under four writers (two per gateway replica),
/// with `fault` at `point`, and checks what the module says.
async fn cut_over_with(fault: Fault, point: Point, ends: Ends) {
    let started = Instant::now();
    let mut cluster = Cluster::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|index| {
            tokio::spawn(writer(
                index,
                cluster.gateway_for(index),
                stop.clone(),
                PACE,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let dir = tempfile::tempdir().expect("temp dir");
    // A restarted gateway comes back well within this, so the other
    // replica's hold does not lapse meanwhile.
    let max_pause = if fault == Fault::RestartGateway {
        "5s"
    } else {
        MAX_PAUSE
    };
    let mut driver = Driver::start(&cluster, dir.path(), point, max_pause);
    let snapshot_position = driver.paused().await;
    assert_paused_at(&cluster, point).await;

    let fault_at = Instant::now();
    let writable = tokio::spawn(writable_again(
        [
            cluster.gateway.field("listen"),
            cluster.second_gateway.field("listen"),
        ],
        fault_at,
    ));
    let mut report = None;
    let mut decided = Vec::new();
    let mut driver_ended_after = None;
    match fault {
        Fault::KillDriver(then) => {
            driver.kill().await;
            if let Some(then) = then {
                decided = decide(&cluster, then).await;
            }
        }
        Fault::StopDriverThen(then) => {
            signal(driver.pid(), "-STOP");
            decided = decide(&cluster, then).await;
            driver.kill().await;
        }
        Fault::RestartGateway => {
            restart_gateway(&mut cluster);
            driver.go_on();
            report = Some(driver.report().await);
            driver_ended_after = Some(fault_at.elapsed());
        }
        Fault::Stop(process) => {
            let pid = match process {
                Process::Driver => driver.pid(),
                Process::SourceAgent => cluster.source_agent.pid(),
                Process::TargetAgent => cluster.target_agent.pid(),
                Process::OldEtcd => cluster.old.pid(),
                Process::NewEtcd => cluster.new.pid(),
            };
            signal(pid, "-STOP");
            driver.go_on();
            // Stopped for the whole time, whether the driver ends meanwhile
            // or not.
            let continue_at = tokio::time::Instant::from_std(fault_at + STOPPED_FOR);
            if tokio::time::timeout_at(continue_at, driver.child.wait())
                .await
                .is_ok()
            {
                driver_ended_after = Some(fault_at.elapsed());
                tokio::time::sleep_until(continue_at).await;
            }
            signal(pid, "-CONT");
            report = Some(driver.report().await);
            driver_ended_after.get_or_insert(fault_at.elapsed());
        }
    }
    let writable_after = writable.await.expect("the probe runs");
    let switched = match ends {
        Ends::Switched => true,
        Ends::RolledBack => false,
        Ends::AsRecorded => fence_record(&cluster).await.0["switched"] == true,
    };
    assert_settled(&cluster, switched).await;
    // Writes go on after the plane settled, so the last change in its
    // history is a writer's.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut writes = Vec::new();
    for task in writers {
        writes.extend(task.await.expect("writer"));
    }

    let (record, fenced_at) = fence_record(&cluster).await;
    assert_eq!(
        record["switched"] == true,
        switched,
        "{fault:?} at {}: the record says {record}",
        point.name()
    );
    if let Some((report, code)) = &report {
        let (outcome, exit) = if switched {
            ("switched", 0)
        } else {
            ("rolled_back", 8)
        };
        // A driver that could neither learn nor undo its commit (the
        // source agent or the old etcd stopped at it) says so, exit 8,
        // and leaves the decision to the record.
        let undecided = report["outcome"] == "undecided" && ends == Ends::AsRecorded;
        if !undecided {
            assert_eq!(
                report["outcome"], outcome,
                "the driver's report disagrees with the record {record}: {report}"
            );
        }
        assert_eq!(*code, Some(if undecided { 8 } else { exit }), "{report}");
    }
    assert_history(&cluster, &writes, switched, fenced_at, snapshot_position).await;
    if matches!(fault, Fault::KillDriver(None)) {
        // Nothing is left for an operator: the command that fits says so,
        // as often as it is run.
        for _ in 0..2 {
            let command = if switched { "resume" } else { "abort" };
            let (answer, code) = migrate_command(&cluster, command).await;
            assert_eq!(code, 0, "{answer}");
            let outcome = answer["outcome"].as_str().unwrap_or_default();
            assert!(matches!(outcome, "switched" | "nothing to do"), "{answer}");
        }
    }
    let (longest_refusal, refused, lost) = longest_refusal(&writes);
    if fault != Fault::RestartGateway {
        // Only a gateway that dies under a write loses its answer.
        let lost: Vec<_> = writes
            .iter()
            .filter(|write| fate(write) == Fate::Unknown)
            .map(|write| &write.answer)
            .collect();
        assert!(lost.is_empty(), "writes failed unexpectedly: {lost:?}");
    }
    let measured = Measured {
        longest_refusal,
        refused,
        lost,
        writes: writes.len(),
        writable_after,
        driver_ended_after,
    };
    eprintln!(
        "fault: {fault:?} at {}: {}; writes refused or waited at most {:.0} ms ({} refused, {} answers lost, of {}); writable through both gateways {:.0} ms after the fault{}{}; {:.1} s in all",
        point.name(),
        if switched { "switched" } else { "rolled back" },
        ms(measured.longest_refusal),
        measured.refused,
        measured.lost,
        measured.writes,
        ms(measured.writable_after),
        measured
            .driver_ended_after
            .map_or(String::new(), |after| format!(
                "; the driver ended {:.0} ms after it",
                ms(after)
            )),
        if decided.is_empty() {
            String::new()
        } else {
            format!("; {}", decided.join("; "))
        },
        started.elapsed().as_secs_f64()
    );
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Runs `then` as an operator would, and checks it settled the plane
/// (exit 0); before a committed switch's resume, an abort must be refused.
/// Returns what it did, in its words.
async fn decide(cluster: &Cluster, then: Decide) -> Vec<String> {
    let command = match then {
        Decide::Resume => "resume",
        Decide::Abort => "abort",
    };
    let (record, _) = fence_record(cluster).await;
    let committed = record["switched"] == true;
    let mut said = Vec::new();
    if committed && then == Decide::Resume {
        let (refused, code) = migrate_command(cluster, "abort").await;
        assert_eq!(code, 8, "a committed switch cannot be aborted: {refused}");
        said.push("abort refused".to_owned());
    }
    let (answer, code) = migrate_command(cluster, command).await;
    assert_eq!(code, 0, "ferry migrate {command}: {answer}");
    let outcome = answer["outcome"].as_str().unwrap_or_default();
    if committed {
        assert_eq!(outcome, "switched", "{answer}");
    } else {
        assert!(
            matches!(outcome, "rolled back" | "nothing to do"),
            "{answer}"
        );
    }
    let steps = answer["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter_map(|step| step.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    said.push(format!("{command}: {outcome} ({steps})"));
    said
}

/// The history check's allowance for lost answers: a lost write's change
/// may be missing, never out of its place; a delete whose answer was lost
/// may have taken the place of an acknowledged one's.
#[test]
fn a_change_whose_answer_was_lost_may_only_be_in_its_place() {
    let put = |value: &str| Effect::Put(value.as_bytes().to_vec());
    let expected = [
        (put("a"), false),
        (put("b"), true),
        (Effect::Delete, true),
        (Effect::Delete, false),
        (put("c"), false),
    ];
    for actual in [
        vec![put("a"), Effect::Delete, put("c")],
        vec![put("a"), put("b"), Effect::Delete, put("c")],
    ] {
        assert!(matches(&expected, &actual), "{actual:?}");
    }
    for actual in [
        vec![put("a"), put("c")],
        vec![put("a"), put("c"), put("b")],
        vec![
            put("a"),
            Effect::Delete,
            Effect::Delete,
            Effect::Delete,
            put("c"),
        ],
        vec![put("a"), Effect::Delete, put("c"), put("d")],
    ] {
        assert!(!matches(&expected, &actual), "{actual:?}");
    }
}

macro_rules! fault_tests {
    ($($name:ident: $fault:expr, $point:ident, $ends:ident;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                cut_over_with($fault, Point::$point, Ends::$ends).await;
            }
        )*
    };
}

// The driver killed with -9 at every point, and nobody does anything: the
// gateways' holds lapse with its streams, and each settles from the record.
fault_tests! {
    driver_killed_while_following_leaves_nothing_held: Fault::KillDriver(None), Following, RolledBack;
    driver_killed_entering_the_hold_leaves_nothing_held: Fault::KillDriver(None), Holding, RolledBack;
    driver_killed_holding_before_the_fence_lapses_to_the_old_plane: Fault::KillDriver(None), Fencing, RolledBack;
    driver_killed_while_draining_lapses_and_unfences: Fault::KillDriver(None), Draining, RolledBack;
    driver_killed_while_verifying_lapses_and_unfences: Fault::KillDriver(None), Verifying, RolledBack;
    driver_killed_before_the_commit_lapses_and_unfences: Fault::KillDriver(None), Switching, RolledBack;
    driver_killed_after_the_commit_lapses_to_the_new_plane: Fault::KillDriver(None), Committed, Switched;
    driver_killed_before_the_release_lapses_to_the_new_plane: Fault::KillDriver(None), Releasing, Switched;
}

// The same kills, then an operator's `ferry migrate abort` or `resume` at
// once, racing the lapse (both decide by the same compare-and-swap).
fault_tests! {
    driver_killed_while_following_then_abort: Fault::KillDriver(Some(Decide::Abort)), Following, RolledBack;
    driver_killed_entering_the_hold_then_resume: Fault::KillDriver(Some(Decide::Resume)), Holding, RolledBack;
    driver_killed_holding_before_the_fence_then_resume: Fault::KillDriver(Some(Decide::Resume)), Fencing, RolledBack;
    driver_killed_while_draining_then_abort: Fault::KillDriver(Some(Decide::Abort)), Draining, RolledBack;
    driver_killed_while_verifying_then_resume: Fault::KillDriver(Some(Decide::Resume)), Verifying, RolledBack;
    driver_killed_before_the_commit_then_abort: Fault::KillDriver(Some(Decide::Abort)), Switching, RolledBack;
    driver_killed_after_the_commit_then_resume: Fault::KillDriver(Some(Decide::Resume)), Committed, Switched;
    driver_killed_before_the_release_then_resume: Fault::KillDriver(Some(Decide::Resume)), Releasing, Switched;
}

// The driver hangs with its holds standing; the operator's command does
// the work, then the driver is killed.
fault_tests! {
    driver_hung_while_held_then_abort_releases_to_the_old_plane: Fault::StopDriverThen(Decide::Abort), Fencing, RolledBack;
    driver_hung_while_draining_then_abort_unfences: Fault::StopDriverThen(Decide::Abort), Draining, RolledBack;
    driver_hung_before_the_commit_then_resume_rolls_back: Fault::StopDriverThen(Decide::Resume), Switching, RolledBack;
    driver_hung_after_the_commit_then_resume_switches: Fault::StopDriverThen(Decide::Resume), Committed, Switched;
    driver_hung_before_the_release_then_resume_releases: Fault::StopDriverThen(Decide::Resume), Releasing, Switched;
}

// A gateway replica killed with -9 at every point and started again at
// once with its first flags; the driver goes on and switches.
fault_tests! {
    gateway_restarted_while_following: Fault::RestartGateway, Following, Switched;
    gateway_restarted_entering_the_hold: Fault::RestartGateway, Holding, Switched;
    gateway_restarted_while_held_before_the_fence: Fault::RestartGateway, Fencing, Switched;
    gateway_restarted_while_draining: Fault::RestartGateway, Draining, Switched;
    gateway_restarted_while_verifying: Fault::RestartGateway, Verifying, Switched;
    gateway_restarted_before_the_commit: Fault::RestartGateway, Switching, Switched;
    gateway_restarted_after_the_commit: Fault::RestartGateway, Committed, Switched;
    gateway_restarted_before_the_release: Fault::RestartGateway, Releasing, Switched;
}

// Each process stopped (SIGSTOP) for longer than --max-pause where it
// hurts most, then continued.
fault_tests! {
    driver_stopped_while_draining_is_overtaken_by_the_lapse: Fault::Stop(Process::Driver), Draining, RolledBack;
    driver_stopped_after_the_commit_finds_the_gateways_switched: Fault::Stop(Process::Driver), Committed, Switched;
    source_agent_stopped_at_the_fence_rolls_back: Fault::Stop(Process::SourceAgent), Fencing, RolledBack;
    source_agent_stopped_at_the_commit_ends_as_recorded: Fault::Stop(Process::SourceAgent), Switching, AsRecorded;
    target_agent_stopped_while_draining_rolls_back: Fault::Stop(Process::TargetAgent), Draining, RolledBack;
    old_etcd_stopped_at_the_fence_rolls_back: Fault::Stop(Process::OldEtcd), Fencing, RolledBack;
    old_etcd_stopped_at_the_commit_ends_as_recorded: Fault::Stop(Process::OldEtcd), Switching, AsRecorded;
    new_etcd_stopped_after_the_commit_still_switches: Fault::Stop(Process::NewEtcd), Committed, Switched;
}

//! The conformance suite every adapter runs on a real server (feature
//! `testing`), as object_store's integration suite is run by every backend:
//! the guarantees G1-G5 checked through the [`Source`]/[`Sink`] and
//! [`LiveSource`]/[`LiveSink`] traits an adapter registers, against planes
//! its test starts.
//!
//! An adapter's test implements [`Planes`] (start an empty plane; write a
//! source transaction to it as its own clients would; read back what it
//! holds; say what one of its adapter's ops does to what a plane holds) and
//! calls [`run`]. Each check answers [`Verdict::Passed`], or
//! [`Verdict::NotSupported`] when the adapter lacks what it needs (a batch
//! adapter has no live stream; a plane without a store fence cannot refuse
//! a write): never a silent pass. A failed check panics naming what broke.
//! The caller asserts which checks its adapter supports, so one that stops
//! being supported is noticed.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use crate::adapters::live::{
    Capabilities, FenceAnswer, FenceMove, LiveEvent, LiveFrom, LiveSink, LiveSource, Position,
};
use crate::adapters::{
    SinkOptions, SourceOptions, StreamInfo, adapter_for, live_sink_from_url, live_source_from_url,
    sink_from_url, source_from_url,
};
use crate::backup::{ExtractOptions, FollowOptions, RestoreOptions};
use crate::pipeline;
use crate::progress::Progress;
use crate::segment::SegmentOptions;
use crate::store::BackupStore;
use crate::{ErrorClass, Op};

/// A change a plane's own clients make: a put or a delete of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Sets `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Removes `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

impl Change {
    fn put(key: &str, value: &str) -> Self {
        Change::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn delete(key: &str) -> Self {
        Change::Delete {
            key: key.as_bytes().to_vec(),
        }
    }

    /// The key it puts or deletes.
    pub fn key(&self) -> &[u8] {
        match self {
            Change::Put { key, .. } | Change::Delete { key } => key,
        }
    }
}

/// What a plane holds: key to value, ferry's own keys left out.
pub type Contents = BTreeMap<Vec<u8>, Vec<u8>>;

/// A plane a test started: a real server, or a file.
#[async_trait]
pub trait Plane: Send + Sync {
    /// The URL the registry opens it by.
    fn url(&self) -> String;
    /// Makes `changes` as one transaction of the plane, as its own clients
    /// would (not through ferry), and returns its position; `Err` when the
    /// plane refused it (fenced), with the plane's words.
    async fn write(&self, changes: &[Change]) -> Result<Position, String>;
    /// Everything the plane holds now.
    async fn read_all(&self) -> Contents;
}

/// Starts planes of one adapter.
#[async_trait]
pub trait Planes: Send + Sync {
    /// An empty plane, and the options its adapter is opened with.
    async fn start(&self) -> Box<dyn Plane>;
    /// A plane to read from: no data, but what its platform needs before
    /// a stream of it opens (PostgreSQL: its tables, since a table created
    /// after the snapshot is not followed). [`Planes::start`] unless the
    /// adapter says otherwise; targets are always [`Planes::start`]'s.
    async fn start_source(&self) -> Box<dyn Plane> {
        self.start().await
    }
    /// Options for opening a plane as a source (credentials, TLS).
    fn source_options(&self) -> SourceOptions {
        SourceOptions {
            parallel: 1,
            ..SourceOptions::default()
        }
    }
    /// Options for opening a plane as a sink.
    fn sink_options(&self) -> SinkOptions {
        SinkOptions::default()
    }
    /// What `op`, one of this adapter's ops, does to what [`Plane::read_all`]
    /// shows once a sink applied it: a put or a delete of one key, or
    /// nothing (an op that makes no key of [`Contents`], as a table's
    /// `CREATE`). The checks that look inside a target partway through a
    /// stream (what the ops through a checkpoint left, whether the first op
    /// of a transaction took effect alone) read ops through it.
    ///
    /// The default reads ops as the key-value adapters make them (etcd,
    /// jsonl): method `Put` sets the op's key to its body, any other method
    /// removes the key. An adapter whose ops say more (PostgreSQL: tables,
    /// rows as JSON objects) gives its own.
    fn change_made_by(&self, op: &Op) -> Option<Change> {
        Some(if op.method.as_ref() == b"Put" {
            Change::Put {
                key: op.key.to_vec(),
                value: op.body.to_vec(),
            }
        } else {
            Change::Delete {
                key: op.key.to_vec(),
            }
        })
    }
}

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Checked, and it held.
    Passed,
    /// The adapter lacks what the check needs, and says why.
    NotSupported(String),
}

/// Every check of the suite, by name.
pub const CHECKS: &[&str] = &[
    "batch_contiguity_and_order",
    "batch_round_trip",
    "batch_restore_follows_its_extract",
    "sink_refuses_a_gap",
    "sink_resumes_exactly_once_after_a_kill",
    "sink_applies_a_transaction_split_across_batches_whole",
    "live_contiguity_order_and_transactions",
    "live_resume_equals_the_unbroken_stream",
    "live_sink_refuses_a_stale_epoch",
    "fence_then_position",
    "digests_agree",
];

type CheckFuture<'a> = Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;

/// Runs every check against `planes`, one after the other, and returns the
/// verdicts in [`CHECKS`] order. A check that fails panics.
pub async fn run(planes: &dyn Planes) -> Vec<(&'static str, Verdict)> {
    let checks: Vec<(&'static str, CheckFuture<'_>)> = vec![
        (CHECKS[0], Box::pin(batch_contiguity_and_order(planes))),
        (CHECKS[1], Box::pin(batch_round_trip(planes))),
        (
            CHECKS[2],
            Box::pin(batch_restore_follows_its_extract(planes)),
        ),
        (CHECKS[3], Box::pin(sink_refuses_a_gap(planes))),
        (CHECKS[4], Box::pin(sink_resumes_exactly_once(planes))),
        (CHECKS[5], Box::pin(sink_split_transaction(planes))),
        (
            CHECKS[6],
            Box::pin(live_contiguity_order_and_transactions(planes)),
        ),
        (CHECKS[7], Box::pin(live_resume_equals_unbroken(planes))),
        (CHECKS[8], Box::pin(live_sink_refuses_a_stale_epoch(planes))),
        (CHECKS[9], Box::pin(fence_then_position(planes))),
        (CHECKS[10], Box::pin(digests_agree(planes))),
    ];
    let mut verdicts = Vec::new();
    for (name, check) in checks {
        let verdict = check.await;
        eprintln!("conformance: {name}: {verdict:?}");
        verdicts.push((name, verdict));
    }
    verdicts
}

/// The transactions the checks write: single puts, a transaction of
/// several puts and a delete, a key put again.
fn workload(tag: &str) -> Vec<Vec<Change>> {
    let key = |name: &str| format!("/conformance/{tag}/{name}");
    vec![
        vec![Change::put(&key("a"), "1")],
        vec![Change::put(&key("b"), "2")],
        vec![
            Change::put(&key("c"), "3"),
            Change::put(&key("d"), "4"),
            Change::put(&key("e"), "5"),
        ],
        vec![Change::put(&key("a"), "1 again")],
        vec![Change::delete(&key("b")), Change::put(&key("f"), "6")],
    ]
}

/// What `transactions` leave in an empty plane.
fn expected(transactions: &[Vec<Change>]) -> Contents {
    let mut contents = Contents::new();
    for change in transactions.iter().flatten() {
        match change {
            Change::Put { key, value } => {
                contents.insert(key.clone(), value.clone());
            }
            Change::Delete { key } => {
                contents.remove(key);
            }
        }
    }
    contents
}

async fn write_all(plane: &dyn Plane, transactions: &[Vec<Change>]) -> Vec<Position> {
    let mut positions = Vec::new();
    for changes in transactions {
        positions.push(
            plane
                .write(changes)
                .await
                .unwrap_or_else(|error| panic!("{}: a write was refused: {error}", plane.url())),
        );
    }
    positions
}

async fn extract(planes: &dyn Planes, plane: &dyn Plane) -> Vec<Op> {
    let source = source_from_url(&plane.url(), &planes.source_options())
        .unwrap_or_else(|error| panic!("{}: no source: {error}", plane.url()));
    let extraction = source
        .open(Arc::new(Progress::default()))
        .await
        .unwrap_or_else(|error| panic!("{}: the source does not open: {error}", plane.url()));
    let mut ops = Vec::new();
    let mut batches = extraction.ops;
    while let Some(batch) = batches.next().await {
        ops.extend(
            batch.unwrap_or_else(|error| panic!("{}: extract failed: {error}", plane.url())),
        );
    }
    ops
}

/// What `ops` leave in an empty plane, as its adapter's
/// [`Planes::change_made_by`] reads them.
fn contents_after(planes: &dyn Planes, ops: &[Op]) -> Contents {
    let changes: Vec<Change> = ops
        .iter()
        .filter_map(|op| planes.change_made_by(op))
        .collect();
    expected(&[changes])
}

/// G1, and G3 as a source: seqs run 1..=n, and the ops of one transaction
/// are adjacent, share `txn` and end with `txn_last`.
fn assert_contiguous_and_grouped(ops: &[Op], what: &str) {
    for (index, op) in ops.iter().enumerate() {
        assert_eq!(
            op.seq,
            index as u64 + 1,
            "{what}: seq {} at index {index}: seqs must run 1, 2, 3... (G1)",
            op.seq
        );
    }
    let mut open: Option<u64> = None;
    for op in ops {
        match open {
            Some(txn) => assert_eq!(
                op.txn, txn,
                "{what}: op seq {} interrupts transaction {txn}, which has not ended (G3)",
                op.seq
            ),
            None if op.txn != 0 => open = Some(op.txn),
            None => {}
        }
        if op.txn_last || op.txn == 0 {
            open = None;
        }
    }
    assert!(
        open.is_none(),
        "{what}: the last transaction has no op with txn_last (G3)"
    );
}

async fn batch_contiguity_and_order(planes: &dyn Planes) -> Verdict {
    let plane = planes.start_source().await;
    let transactions = workload("order");
    write_all(plane.as_ref(), &transactions).await;
    let ops = extract(planes, plane.as_ref()).await;
    assert_contiguous_and_grouped(&ops, "the batch source");
    // G2: positions never go back in seq order.
    for pair in ops.windows(2) {
        assert!(
            pair[1].position >= pair[0].position,
            "the batch source: op seq {} has position {} after position {} (G2)",
            pair[1].seq,
            pair[1].position,
            pair[0].position
        );
    }
    Verdict::Passed
}

async fn restore_into(planes: &dyn Planes, ops: Vec<Op>, stream_id: &str) -> Box<dyn Plane> {
    let target = planes.start().await;
    let mut sink = sink_from_url(&target.url(), &planes.sink_options())
        .unwrap_or_else(|error| panic!("{}: no sink: {error}", target.url()));
    let held = sink
        .begin(&stream(stream_id))
        .await
        .unwrap_or_else(|error| panic!("{}: begin failed: {error}", target.url()));
    assert_eq!(
        held,
        None,
        "{}: an empty target holds a stream",
        target.url()
    );
    for chunk in ops.chunks(2) {
        sink.apply(chunk.to_vec())
            .await
            .unwrap_or_else(|error| panic!("{}: apply failed: {error}", target.url()));
    }
    sink.finish()
        .await
        .unwrap_or_else(|error| panic!("{}: finish failed: {error}", target.url()));
    target
}

/// A sink of `target` begun for `stream`, and what it says it holds.
async fn begun_sink(
    planes: &dyn Planes,
    target: &dyn Plane,
    stream: &StreamInfo,
) -> (Box<dyn crate::adapters::Sink>, Option<u64>) {
    let mut sink = sink_from_url(&target.url(), &planes.sink_options())
        .unwrap_or_else(|error| panic!("{}: no sink: {error}", target.url()));
    let held = sink
        .begin(stream)
        .await
        .unwrap_or_else(|error| panic!("{}: begin failed: {error}", target.url()));
    (sink, held)
}

async fn apply_all(sink: &mut Box<dyn crate::adapters::Sink>, ops: &[Op], target: &dyn Plane) {
    sink.apply(ops.to_vec())
        .await
        .unwrap_or_else(|error| panic!("{}: apply failed: {error}", target.url()));
}

async fn finish(sink: Box<dyn crate::adapters::Sink>, target: &dyn Plane) {
    sink.finish()
        .await
        .unwrap_or_else(|error| panic!("{}: finish failed: {error}", target.url()));
}

fn stream(stream_id: &str) -> StreamInfo {
    StreamInfo {
        stream_id: stream_id.to_owned(),
        source_identity: Some("conformance".to_owned()),
        ..StreamInfo::default()
    }
}

async fn batch_round_trip(planes: &dyn Planes) -> Verdict {
    let plane = planes.start_source().await;
    let transactions = workload("round");
    write_all(plane.as_ref(), &transactions).await;
    let want = expected(&transactions);
    assert_eq!(
        plane.read_all().await,
        want,
        "{}: the plane's own contents",
        plane.url()
    );
    let ops = extract(planes, plane.as_ref()).await;
    let target = restore_into(planes, ops, "conformance-round").await;
    assert_eq!(
        target.read_all().await,
        want,
        "{}: a restore does not hold what the source held",
        target.url()
    );
    Verdict::Passed
}

/// `ferry restore --follow` through the adapter: a restore started before
/// its extract, through a store, takes the backup as it is written (a
/// segment per op, so it follows many) and ends holding what the source
/// held, sealed by the extract's manifest. Every sink must begin from the
/// extract's start record alone (no op count, no manifest).
async fn batch_restore_follows_its_extract(planes: &dyn Planes) -> Verdict {
    let plane = planes.start_source().await;
    let transactions = workload("follow");
    write_all(plane.as_ref(), &transactions).await;
    let want = expected(&transactions);
    let target = planes.start().await;
    let store = BackupStore::open("memory://", true).expect("an in-memory store opens");
    let sink = sink_from_url(&target.url(), &planes.sink_options())
        .unwrap_or_else(|error| panic!("{}: no sink: {error}", target.url()));
    let follow = FollowOptions {
        stall_timeout: Duration::from_secs(120),
        max_poll_interval: Duration::from_millis(20),
        ..FollowOptions::default()
    };
    let restoring = tokio::spawn({
        let store = store.clone();
        async move {
            pipeline::restore_following(
                &store,
                None,
                sink,
                RestoreOptions::default(),
                follow,
                Arc::new(Progress::default()),
            )
            .await
        }
    });
    let source = source_from_url(&plane.url(), &planes.source_options())
        .unwrap_or_else(|error| panic!("{}: no source: {error}", plane.url()));
    let one_op_a_segment = ExtractOptions {
        segment: SegmentOptions {
            target_uncompressed_bytes: 1,
            compression_level: 1,
        },
        ..ExtractOptions::default()
    };
    let extracted = pipeline::extract(
        source,
        &store,
        one_op_a_segment,
        Arc::new(Progress::default()),
    )
    .await
    .unwrap_or_else(|error| panic!("{}: extract failed: {error}", plane.url()));
    let restored = restoring
        .await
        .expect("the following restore does not panic")
        .unwrap_or_else(|error| {
            panic!(
                "{}: the restore following the extract failed: {error}",
                target.url()
            )
        });
    assert!(
        extracted.manifest.totals.segments > 1,
        "{}: the extract made one segment; the check needs several",
        plane.url()
    );
    assert_eq!(
        restored.manifest,
        extracted.manifest,
        "{}: the restore names another backup than the one extracted",
        target.url()
    );
    assert_eq!(
        target.read_all().await,
        want,
        "{}: a restore that followed its extract does not hold what the source held",
        target.url()
    );
    Verdict::Passed
}

/// A stream of ops that makes `workload(tag)`: a live stream's changes
/// when the adapter is live (they keep the source transactions whole, as a
/// snapshot need not), else a batch extract.
async fn source_ops(planes: &dyn Planes, tag: &str) -> (Vec<Op>, Contents) {
    let plane = planes.start_source().await;
    let transactions = workload(tag);
    let want = expected(&transactions);
    let Some(source) = live_source(planes, plane.as_ref()) else {
        write_all(plane.as_ref(), &transactions).await;
        return (extract(planes, plane.as_ref()).await, want);
    };
    let mut live = source
        .open(b"", LiveFrom::default())
        .await
        .unwrap_or_else(|error| panic!("{}: open failed: {error}", plane.url()));
    let positions = write_all(plane.as_ref(), &transactions).await;
    let mut ops = Vec::new();
    read_through(
        &mut live.events,
        *positions.last().expect("writes"),
        &mut ops,
    )
    .await;
    (ops, want)
}

async fn sink_refuses_a_gap(planes: &dyn Planes) -> Verdict {
    let (ops, _) = source_ops(planes, "gap").await;
    assert!(
        ops.len() >= 3,
        "the source gave {} ops for 7 changes",
        ops.len()
    );
    let missing = 2;
    let with_gap: Vec<Op> = ops.into_iter().filter(|op| op.seq != missing).collect();
    let target = planes.start().await;
    let (mut sink, _) = begun_sink(planes, target.as_ref(), &stream("conformance-gap")).await;
    let applied = sink.apply(with_gap).await;
    let finished = match applied {
        Ok(()) => sink.finish().await,
        Err(error) => Err(error),
    };
    let Err(error) = finished else {
        panic!(
            "{}: a stream without seq {missing} was taken whole (G1)",
            target.url()
        );
    };
    assert!(
        error.to_string().contains(&format!("seq {missing}")),
        "{}: the refusal of a gap names no seq {missing}: {error}",
        target.url()
    );
    Verdict::Passed
}

async fn sink_resumes_exactly_once(planes: &dyn Planes) -> Verdict {
    let (ops, want) = source_ops(planes, "resume").await;
    let target = planes.start().await;
    let stream = stream("conformance-resume");
    let half = ops.len() / 2;
    {
        let (mut sink, _) = begun_sink(planes, target.as_ref(), &stream).await;
        apply_all(&mut sink, &ops[..half], target.as_ref()).await;
        // Killed: dropped without finish.
    }
    let mut sink = sink_from_url(&target.url(), &planes.sink_options())
        .unwrap_or_else(|error| panic!("{}: no sink: {error}", target.url()));
    let held = sink.begin(&stream).await.unwrap_or_else(|error| {
        panic!(
            "{}: a restore killed after {half} ops does not begin again (G4): {error}",
            target.url()
        )
    });
    if let Some(held) = held {
        assert!(
            held <= half as u64,
            "{}: the target says it holds seq {held}, but only {half} ops were sent (G4)",
            target.url()
        );
        // Every op through `held` took effect: each key holds what the
        // ops through `held` left, or what a later op made of it (a sink
        // without transactions may hold more than its checkpoint says).
        let holds = target.read_all().await;
        let through = contents_after(planes, &ops[..held as usize]);
        let later_changes: Vec<Change> = ops[held as usize..]
            .iter()
            .filter_map(|op| planes.change_made_by(op))
            .collect();
        for (key, value) in &through {
            let later: Vec<Option<&[u8]>> = later_changes
                .iter()
                .filter(|change| change.key() == key.as_slice())
                .map(|change| match change {
                    Change::Put { value, .. } => Some(value.as_slice()),
                    Change::Delete { .. } => None,
                })
                .collect();
            let found = holds.get(key).map(Vec::as_slice);
            assert!(
                found == Some(value.as_slice()) || later.contains(&found),
                "{}: the checkpoint says seq {held} is in, but key {:?} holds {:?} (G4)",
                target.url(),
                String::from_utf8_lossy(key),
                found.map(String::from_utf8_lossy)
            );
        }
    }
    let from = held.unwrap_or(0) as usize;
    let resumed = match sink.apply(ops[from..].to_vec()).await {
        Ok(()) => sink.finish().await,
        Err(error) => Err(error),
    };
    resumed.unwrap_or_else(|error| {
        panic!(
            "{}: the restore resumed after seq {from} failed (G4: an op applied twice, or one missing?): {error}",
            target.url()
        )
    });
    assert_eq!(
        target.read_all().await,
        want,
        "{}: a resumed restore does not hold what the source held (G4)",
        target.url()
    );
    Verdict::Passed
}

/// Makes an op that changes what a plane shows and the ops right after it
/// that are transactions of their own (three ops at most) one
/// transaction, for a source that makes no transaction of several ops (a
/// batch snapshot): a sink applies whole every transaction a stream
/// carries, whoever made it. Returns the index of its first op; `None`
/// when no such op has another after it.
fn make_a_transaction(planes: &dyn Planes, ops: &mut [Op]) -> Option<usize> {
    let first = ops.windows(2).position(|pair| {
        pair[0].txn == 0 && planes.change_made_by(&pair[0]).is_some() && pair[1].txn == 0
    })?;
    let length = ops[first..]
        .iter()
        .take(3)
        .take_while(|op| op.txn == 0)
        .count();
    let txn = ops.iter().map(|op| op.txn).max().unwrap_or(0) + 1;
    for (index, op) in ops[first..first + length].iter_mut().enumerate() {
        op.txn = txn;
        op.txn_last = index + 1 == length;
    }
    Some(first)
}

async fn sink_split_transaction(planes: &dyn Planes) -> Verdict {
    let (mut ops, want) = source_ops(planes, "split").await;
    let first = match ops.iter().position(|op| op.txn != 0 && !op.txn_last) {
        Some(first) => first,
        None => match make_a_transaction(planes, &mut ops) {
            Some(first) => first,
            None => {
                return Verdict::NotSupported(
                    "the source makes no transaction of several ops, nor an op that changes what a plane shows with another after it".to_owned(),
                );
            }
        },
    };
    let txn = ops[first].txn;
    let opened = planes.change_made_by(&ops[first]).unwrap_or_else(|| {
        panic!(
            "the first op of transaction {txn} (seq {}) changes nothing a plane shows: the check cannot see whether it took effect alone",
            ops[first].seq
        )
    });
    let before = contents_after(planes, &ops[..first]);
    assert_ne!(
        contents_after(planes, &ops[..=first]).get(opened.key()),
        before.get(opened.key()),
        "the first op of transaction {txn} (seq {}) leaves its key as it was: the check cannot see whether it took effect alone",
        ops[first].seq
    );
    let last = first
        + ops[first..]
            .iter()
            .position(|op| op.txn_last)
            .expect("a transaction ends");
    let target = planes.start().await;
    let stream = stream("conformance-split");
    {
        let (mut sink, _) = begun_sink(planes, target.as_ref(), &stream).await;
        // Everything before the transaction and its first op, then killed.
        apply_all(&mut sink, &ops[..=first], target.as_ref()).await;
    }
    let holds = target.read_all().await;
    assert_eq!(
        holds.get(opened.key()),
        before.get(opened.key()),
        "{}: the first op of transaction {txn} (seq {}, key {:?}) took effect without the rest of it (G3)",
        target.url(),
        ops[first].seq,
        String::from_utf8_lossy(opened.key())
    );
    let (mut sink, held) = begun_sink(planes, target.as_ref(), &stream).await;
    let held = held.unwrap_or(0);
    assert!(
        held < ops[first].seq || held >= ops[last].seq,
        "{}: the checkpoint ({held}) lies inside transaction {txn} (G3)",
        target.url()
    );
    // The rest, the transaction split across two batches.
    let rest = &ops[held as usize..];
    let split = rest.iter().position(|op| op.seq == ops[first].seq + 1);
    let (one, two) = rest.split_at(split.unwrap_or(rest.len() / 2));
    for part in [one, two] {
        apply_all(&mut sink, part, target.as_ref()).await;
    }
    finish(sink, target.as_ref()).await;
    assert_eq!(
        target.read_all().await,
        want,
        "{}: after the split transaction",
        target.url()
    );
    Verdict::Passed
}

/// The plane as a live source; `None` only when its adapter has no live
/// source (a failure to build one is a failed check, not "not supported").
fn live_source(planes: &dyn Planes, plane: &dyn Plane) -> Option<Arc<dyn LiveSource>> {
    adapter_for(&plane.url())?.live_source?;
    Some(
        live_source_from_url(&plane.url(), &planes.source_options())
            .unwrap_or_else(|error| panic!("{}: no live source: {error}", plane.url())),
    )
}

/// The plane as a live sink; `None` only when its adapter has none.
fn live_sink(planes: &dyn Planes, plane: &dyn Plane) -> Option<Arc<dyn LiveSink>> {
    adapter_for(&plane.url())?.live_sink?;
    Some(
        live_sink_from_url(&plane.url(), &planes.sink_options())
            .unwrap_or_else(|error| panic!("{}: no live sink: {error}", plane.url())),
    )
}

fn no_live(plane: &dyn Plane) -> Verdict {
    Verdict::NotSupported(format!("{} is no live adapter", plane.url()))
}

/// How long a live stream may take to deliver what was written: a
/// deadline for a hung stream, never a measure of speed.
const LIVE_DEADLINE: Duration = Duration::from_secs(60);

/// Reads `events` until every change through `position` was sent.
async fn read_through(
    events: &mut futures::stream::BoxStream<'static, crate::Result<LiveEvent>>,
    position: Position,
    ops: &mut Vec<Op>,
) {
    let read = async {
        while let Some(event) = events.next().await {
            match event.expect("the live stream failed") {
                LiveEvent::Batch(batch) => ops.extend(batch),
                LiveEvent::Progress { position: at, .. } if at >= position.0 => return,
                _ => {}
            }
        }
        panic!("the live stream ended before position {position}");
    };
    tokio::time::timeout(LIVE_DEADLINE, read)
        .await
        .unwrap_or_else(|_| {
            panic!("the live stream did not reach position {position} within {LIVE_DEADLINE:?}")
        });
}

async fn live_contiguity_order_and_transactions(planes: &dyn Planes) -> Verdict {
    let plane = planes.start_source().await;
    let Some(source) = live_source(planes, plane.as_ref()) else {
        return no_live(plane.as_ref());
    };
    let before = workload("live-before");
    write_all(plane.as_ref(), &before).await;
    let mut live = source
        .open(b"", LiveFrom::default())
        .await
        .unwrap_or_else(|error| panic!("{}: open failed: {error}", plane.url()));
    let after = workload("live-after");
    let positions = write_all(plane.as_ref(), &after).await;
    let mut ops = Vec::new();
    read_through(
        &mut live.events,
        *positions.last().expect("writes"),
        &mut ops,
    )
    .await;
    assert_contiguous_and_grouped(&ops, "the live source");
    // The changes after R come one group per source transaction, in the
    // order they were made (G2, G3).
    let changes: Vec<&Op> = ops
        .iter()
        .filter(|op| op.position > live.snapshot_position.0)
        .collect();
    let mut groups: Vec<Vec<&Op>> = Vec::new();
    for op in changes {
        match groups.last_mut() {
            Some(group)
                if group
                    .last()
                    .is_some_and(|last| !last.txn_last && last.txn != 0) =>
            {
                group.push(op)
            }
            _ => groups.push(vec![op]),
        }
    }
    assert_eq!(
        groups.len(),
        after.len(),
        "{}: {} transactions were made after the snapshot, the stream gave {} groups",
        plane.url(),
        after.len(),
        groups.len()
    );
    for ((group, changes), position) in groups.iter().zip(&after).zip(&positions) {
        assert_eq!(
            group.len(),
            changes.len(),
            "{}: a transaction's group",
            plane.url()
        );
        for (op, change) in group.iter().zip(changes) {
            assert_eq!(
                planes.change_made_by(op).as_ref(),
                Some(change),
                "{}: op seq {} is not the change made",
                plane.url(),
                op.seq
            );
            assert_eq!(
                op.position,
                position.0,
                "{}: op seq {}",
                plane.url(),
                op.seq
            );
        }
    }
    Verdict::Passed
}

async fn live_resume_equals_unbroken(planes: &dyn Planes) -> Verdict {
    let plane = planes.start_source().await;
    let Some(source) = live_source(planes, plane.as_ref()) else {
        return no_live(plane.as_ref());
    };
    write_all(plane.as_ref(), &workload("resume-before")).await;
    let mut unbroken = source
        .open(b"", LiveFrom::default())
        .await
        .unwrap_or_else(|error| panic!("{}: open failed: {error}", plane.url()));
    let positions = write_all(plane.as_ref(), &workload("resume-after")).await;
    let through = *positions.last().expect("writes");
    let mut all = Vec::new();
    read_through(&mut unbroken.events, through, &mut all).await;
    let snapshot = unbroken.snapshot_position;
    let snapshot_end = all
        .iter()
        .take_while(|op| op.position <= snapshot.0)
        .count() as u64;
    // Resume points: inside the snapshot (when the source can read it
    // again), at its end, and after a change.
    let mut points = vec![(snapshot_end, snapshot)];
    if source.capabilities().snapshot_reread && snapshot_end > 1 {
        points.push((snapshot_end / 2, snapshot));
    }
    if let Some(op) = all
        .iter()
        .find(|op| op.position > snapshot.0 && op.txn_last)
    {
        points.push((op.seq, Position(op.position)));
    }
    for (held_seq, held_position) in points {
        let from = LiveFrom {
            snapshot: Some(snapshot),
            from_seq_exclusive: held_seq,
            from_position_exclusive: held_position,
            snapshot_through_seq: Some(snapshot_end),
        };
        let mut resumed = source.open(b"", from).await.unwrap_or_else(|error| {
            panic!(
                "{}: resume from seq {held_seq} failed: {error}",
                plane.url()
            )
        });
        let mut ops = Vec::new();
        read_through(&mut resumed.events, through, &mut ops).await;
        let want: Vec<&Op> = all.iter().filter(|op| op.seq > held_seq).collect();
        let got: Vec<&Op> = ops.iter().collect();
        assert_eq!(
            got,
            want,
            "{}: the stream resumed after seq {held_seq} differs from the unbroken one",
            plane.url()
        );
    }
    Verdict::Passed
}

async fn live_sink_refuses_a_stale_epoch(planes: &dyn Planes) -> Verdict {
    let target = planes.start().await;
    let Some(sink) = live_sink(planes, target.as_ref()) else {
        return no_live(target.as_ref());
    };
    let (ops, _) = source_ops(planes, "epoch").await;
    let stream = stream("conformance-epoch");
    let mut second = sink
        .open(&stream, 2)
        .await
        .unwrap_or_else(|error| panic!("{}: open at epoch 2 failed: {error}", target.url()));
    let split = ops
        .iter()
        .position(|op| op.txn_last || op.txn == 0)
        .expect("a transaction ends")
        + 1;
    second
        .apply(ops[..split].to_vec())
        .await
        .unwrap_or_else(|error| panic!("{}: apply at epoch 2 failed: {error}", target.url()));
    let stored = sink.stored(&stream.stream_id).await.expect("stored");
    assert_eq!(stored.epoch, 2, "{}: the stored epoch", target.url());
    let refused = sink.open(&stream, 1).await.err().unwrap_or_else(|| {
        panic!(
            "{}: a sink of epoch 1 opened after epoch 2 wrote (G5)",
            target.url()
        )
    });
    assert_eq!(refused.class(), ErrorClass::Precondition, "{refused}");
    let _third = sink
        .open(&stream, 3)
        .await
        .unwrap_or_else(|error| panic!("{}: open at epoch 3 failed: {error}", target.url()));
    let stale = second
        .apply(ops[split..].to_vec())
        .await
        .err()
        .unwrap_or_else(|| {
            panic!(
                "{}: epoch 2 went on writing after epoch 3 took the target (G5)",
                target.url()
            )
        });
    assert_eq!(stale.class(), ErrorClass::Precondition, "{stale}");
    Verdict::Passed
}

async fn fence_then_position(planes: &dyn Planes) -> Verdict {
    let plane = planes.start_source().await;
    let Some(source) = live_source(planes, plane.as_ref()) else {
        return no_live(plane.as_ref());
    };
    let capabilities: Capabilities = source.capabilities();
    let mut live = source
        .open(b"", LiveFrom::default())
        .await
        .unwrap_or_else(|error| panic!("{}: open failed: {error}", plane.url()));
    let positions = write_all(plane.as_ref(), &workload("fence")).await;
    let fenced = match source
        .move_fence(FenceMove::Fence {
            epoch: 1,
            successor: "conformance://successor".to_owned(),
        })
        .await
        .unwrap_or_else(|error| panic!("{}: fence failed: {error}", plane.url()))
    {
        FenceAnswer::Done(position) => position,
        FenceAnswer::Refused(reason) => panic!("{}: fence refused: {reason}", plane.url()),
    };
    let last = *positions.last().expect("writes");
    assert!(
        fenced >= last,
        "{}: F = {fenced}, below the acknowledged write at {last}",
        plane.url()
    );
    let mut ops = Vec::new();
    read_through(&mut live.events, fenced, &mut ops).await;
    assert!(
        ops.iter().any(|op| op.position == last.0),
        "{}: the stream reached F without the last write's ops",
        plane.url()
    );
    // Idempotent for its epoch, refused for an older one.
    let again = source
        .move_fence(FenceMove::Fence {
            epoch: 1,
            successor: "conformance://successor".to_owned(),
        })
        .await
        .expect("fence again");
    assert_eq!(
        again,
        FenceAnswer::Done(fenced),
        "{}: a repeated fence",
        plane.url()
    );
    let older = source
        .move_fence(FenceMove::Unfence { epoch: 0 })
        .await
        .expect("an older unfence answers");
    assert!(
        matches!(older, FenceAnswer::Refused(_)),
        "{}: an unfence of an older epoch was done: {older:?}",
        plane.url()
    );
    let state = source.fence_state().await.expect("fence state");
    assert!(
        state.fenced && state.epoch == 1 && state.fenced_position == fenced,
        "{state:?}"
    );
    let refused = plane
        .write(&[Change::put("/conformance/fence/late", "x")])
        .await;
    let verdict = if capabilities.store_fence {
        assert!(
            refused.is_err(),
            "{}: the fenced plane took a write (store-level fence)",
            plane.url()
        );
        Verdict::Passed
    } else {
        Verdict::NotSupported(format!(
            "{} has no store-level fence: only gateways hold writes back",
            plane.url()
        ))
    };
    match source
        .move_fence(FenceMove::Unfence { epoch: 1 })
        .await
        .expect("unfence")
    {
        FenceAnswer::Done(_) => {}
        FenceAnswer::Refused(reason) => panic!("{}: unfence refused: {reason}", plane.url()),
    }
    plane
        .write(&[Change::put("/conformance/fence/after", "y")])
        .await
        .unwrap_or_else(|error| panic!("{}: a write after the unfence: {error}", plane.url()));
    verdict
}

async fn digests_agree(planes: &dyn Planes) -> Verdict {
    let plane = planes.start_source().await;
    let Some(source) = live_source(planes, plane.as_ref()) else {
        return no_live(plane.as_ref());
    };
    let target = planes.start().await;
    let Some(sink) = live_sink(planes, target.as_ref()) else {
        return no_live(target.as_ref());
    };
    let positions = write_all(plane.as_ref(), &workload("digest")).await;
    let through = *positions.last().expect("writes");
    let mut live = source
        .open(b"", LiveFrom::default())
        .await
        .unwrap_or_else(|error| panic!("{}: open failed: {error}", plane.url()));
    let mut ops = Vec::new();
    read_through(&mut live.events, through, &mut ops).await;
    let mut apply = sink
        .open(&stream("conformance-digest"), 1)
        .await
        .unwrap_or_else(|error| panic!("{}: open failed: {error}", target.url()));
    apply
        .apply(ops.clone())
        .await
        .unwrap_or_else(|error| panic!("{}: apply failed: {error}", target.url()));
    let applied = apply.applied().expect("applied");
    assert_eq!(
        applied.through_seq,
        ops.last().map_or(0, |op| op.seq),
        "{}: applied-through after a whole stream",
        target.url()
    );
    source
        .confirm("conformance-digest", applied)
        .await
        .unwrap_or_else(|error| panic!("{}: confirm failed: {error}", plane.url()));
    let old = source
        .digest(b"", Position(through.0))
        .await
        .expect("source digest");
    let new = sink.digest(b"", Position(0)).await.expect("target digest");
    assert_eq!(
        (old.keys, old.sha256, old.set_sha256),
        (new.keys, new.sha256, new.set_sha256),
        "the digests of {} at {through} and {} differ",
        plane.url(),
        target.url()
    );
    // And a difference shows.
    target
        .write(&[Change::put("/conformance/digest/extra", "z")])
        .await
        .expect("write to the target");
    let changed = sink.digest(b"", Position(0)).await.expect("target digest");
    assert_ne!(old.sha256, changed.sha256, "a digest missed an extra key");
    Verdict::Passed
}

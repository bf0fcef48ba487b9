//! PostgreSQL as a live source (`engine/src/adapters/postgres/live.rs`) on
//! a real PostgreSQL 15: a snapshot from a kept slot, then every
//! transaction made with `psql` after it, one group each in commit order,
//! seqs contiguous across the snapshot and the changes (a transaction of
//! 5,000 rows split into bounded batches); all of it replayed by ferry's
//! sink into an empty database equals the source (compared with psql); a
//! confirmed position moves the slot; a stream resumed after a change gives
//! exactly the unbroken stream's ops with the same seqs; a resume inside
//! the snapshot and a table without a primary key are refused by name; a
//! stream nobody reads for three times `wal_sender_timeout` lives on. The
//! fence: every write refused by the database (superuser, replica role,
//! TRUNCATE) with SQLSTATE 25006, F above every acknowledged write and
//! reached by the stream, idempotent per epoch, undone by an unfence, for
//! good after a commit; an unfence keeps the slot and the publication, a
//! commit (while a walsender still reads the slot) drops both, and a
//! stream resumed after it says the migration switched. Sequences, which
//! logical replication does not carry: the fence copies them (serial,
//! identity and free-standing ones), the stream carries the copy below F
//! once, a resume past it does not carry it again, and on the target
//! `nextval` answers above every id the source handed out.

use std::time::{Duration, Instant};

use ferry_engine::ErrorClass;
use ferry_engine::Op;
use ferry_engine::adapters::StreamInfo;
use ferry_engine::adapters::live::{
    Applied, LiveEvent, LiveFrom, LiveSink, LiveSource, LiveStream, Position,
};
use ferry_engine::adapters::postgres::{
    PasswordSources, PgConnection, PgLiveOptions, PgLiveSink, PgLiveSource, PgSourceOptions,
};
use ferry_tests::pg::{PgOptions, PgServer, replay};

const DB: &str = "app";

fn live_source(server: &PgServer) -> PgLiveSource {
    PgLiveSource::new(
        PgConnection::from_url(&server.url(DB), &PasswordSources::default())
            .expect("the test server's URL"),
        PgLiveOptions {
            source: PgSourceOptions {
                parallel: 2,
                ..PgSourceOptions::default()
            },
            slot: "ferry_live_test".to_owned(),
            publication: "ferry_live_test".to_owned(),
        },
    )
}

/// Reads `stream` until a progress report at or past `position`.
async fn read_through(stream: &mut LiveStream, position: u64, ops: &mut Vec<Op>) -> Option<u64> {
    use futures::StreamExt;
    let mut snapshot_end = None;
    let read = async {
        while let Some(event) = stream.events.next().await {
            match event.expect("the live stream reads") {
                LiveEvent::Batch(batch) => ops.extend(batch),
                LiveEvent::SnapshotComplete { through_seq, .. } => snapshot_end = Some(through_seq),
                LiveEvent::Progress { position: at, .. } if at >= position => return,
                LiveEvent::Progress { .. } => {}
            }
        }
        panic!("the live stream ended");
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the stream reaches the position within 60 s");
    snapshot_end
}

/// The server's current WAL position, as a number.
fn wal_now(server: &PgServer) -> u64 {
    let lsn: ferry_engine::adapters::postgres::replication::Lsn = server
        .psql(DB, "SELECT pg_current_wal_lsn();")
        .expect("psql")
        .parse()
        .expect("an LSN");
    lsn.0
}

const COMPARE: &str = "SELECT id, name, md5(coalesce(note, '')) FROM runs ORDER BY id; \
                       SELECT * FROM tags ORDER BY run_id, tag;";

#[tokio::test]
async fn a_snapshot_then_every_transaction_replays_into_an_equal_database() {
    // A short wal_sender_timeout: a stream whose consumer stops reading
    // must keep telling the server it is alive.
    let server = PgServer::start_with(&PgOptions {
        settings: vec![("wal_sender_timeout".to_owned(), "2s".to_owned())],
        ..PgOptions::default()
    })
    .expect("PostgreSQL 15");
    server.create_database(DB).expect("a database");
    server
        .psql(
            DB,
            "CREATE TABLE runs (id bigint PRIMARY KEY, name text NOT NULL, note text); \
             CREATE TABLE tags (run_id bigint REFERENCES runs (id), tag text, PRIMARY KEY (run_id, tag)); \
             INSERT INTO runs SELECT g, 'run ' || g, NULL FROM generate_series(1, 50) g; \
             INSERT INTO tags SELECT g, 'a' FROM generate_series(1, 50) g;",
        )
        .expect("the source's tables and rows");
    let source = live_source(&server);
    let mut stream = source
        .open(b"", LiveFrom::default())
        .await
        .expect("the live stream opens");
    let snapshot = stream.snapshot_position;
    server
        .psql(
            DB,
            "BEGIN; INSERT INTO runs VALUES (51, 'late', repeat('n', 5000)); INSERT INTO tags VALUES (51, 'b'); COMMIT; \
             UPDATE runs SET name = 'renamed' WHERE id = 3; \
             BEGIN; DELETE FROM tags WHERE run_id = 4; DELETE FROM runs WHERE id = 4; COMMIT; \
             INSERT INTO runs SELECT g, 'bulk', NULL FROM generate_series(100, 5099) g; \
             UPDATE runs SET id = 1000000 WHERE id = 100;",
        )
        .expect("changes after the snapshot");
    let through = wal_now(&server);
    let mut all = Vec::new();
    let snapshot_end = read_through(&mut stream, through, &mut all)
        .await
        .expect("the snapshot completes");
    let snapshot_rows = all[..snapshot_end as usize]
        .iter()
        .filter(|op| op.kind == "pg.row".as_bytes())
        .count();
    assert_eq!(snapshot_rows, 100, "the snapshot's rows");
    for (index, op) in all.iter().enumerate() {
        assert_eq!(op.seq, index as u64 + 1, "seqs contiguous from 1");
    }
    // The changes: one group per transaction, in commit order.
    let changes = &all[snapshot_end as usize..];
    let mut groups: Vec<Vec<&Op>> = Vec::new();
    for op in changes {
        assert!(op.position > snapshot.0, "a change after R: {op:?}");
        match groups.last_mut() {
            Some(group) if group.last().is_some_and(|last| !last.txn_last) => group.push(op),
            _ => groups.push(vec![op]),
        }
    }
    let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![2, 1, 2, 5000, 1]);
    for pair in groups.windows(2) {
        assert!(pair[0][0].position < pair[1][0].position, "commit order");
    }
    for group in &groups {
        assert!(
            group
                .iter()
                .all(|op| op.txn == group[0].txn && op.position == group[0].position)
        );
    }

    // Replayed into an empty database by ferry's sink: equal.
    server.create_database("copy").expect("a second database");
    replay(&server, "copy", "live", &all, 700, false)
        .await
        .expect("the sink applies the stream");
    let on_source = server.psql(DB, COMPARE).expect("the source's rows");
    assert!(on_source.contains("1000000|bulk|"), "{on_source}");
    assert_eq!(
        server.psql("copy", COMPARE).expect("the copy's rows"),
        on_source
    );

    // Applied by the live sink, in batches that split the large
    // transaction, for epoch 2: equal too, and the epoch holds (G5).
    server.create_database("live").expect("a third database");
    let sink = PgLiveSink::new(
        PgConnection::from_url(&server.url("live"), &PasswordSources::default())
            .expect("the live target's URL"),
        1000,
    );
    let stream_info = StreamInfo {
        stream_id: "live".to_owned(),
        ..StreamInfo::default()
    };
    let mut apply = sink
        .open(&stream_info, 2)
        .await
        .expect("the live sink opens");
    assert_eq!(apply.held_through_seq(), 0);
    let last_group_start = all.len() - groups.last().map_or(0, Vec::len);
    let ends: Vec<u64> = all
        .iter()
        .filter(|op| op.txn == 0 || op.txn_last)
        .map(|op| op.seq)
        .collect();
    for part in all[..last_group_start].chunks(700) {
        apply
            .apply(part.to_vec())
            .await
            .expect("the live sink applies");
        // Durable through a transaction's end, never inside one; a batch
        // that ends inside a transaction leaves it (and what shares its
        // target transaction) for the next.
        if let Some(applied) = apply.applied() {
            assert!(ends.contains(&applied.through_seq), "{applied:?}");
            assert!(applied.through_seq <= part.last().map_or(0, |op| op.seq));
        }
    }
    assert_eq!(
        apply.applied().map(|applied| applied.through_seq),
        Some(all[last_group_start - 1].seq),
        "a batch that ends at a transaction's end is durable through it"
    );
    let stored = sink.stored("live").await.expect("stored");
    assert_eq!(stored.epoch, 2);
    assert_eq!(
        stored.applied.map(|applied| applied.through_seq),
        Some(all[last_group_start - 1].seq)
    );
    let refused = sink
        .open(&stream_info, 1)
        .await
        .err()
        .expect("epoch 1 after 2 is refused");
    assert_eq!(refused.class(), ErrorClass::Precondition, "{refused}");
    let taken = sink.open(&stream_info, 3).await.expect("epoch 3 opens");
    let stale = apply
        .apply(all[last_group_start..].to_vec())
        .await
        .expect_err("epoch 2 applies nothing once epoch 3 took the target");
    assert_eq!(stale.class(), ErrorClass::Precondition, "{stale}");
    drop(taken);
    let mut third = sink
        .open(&stream_info, 3)
        .await
        .expect("epoch 3 opens again");
    assert_eq!(third.held_through_seq(), all[last_group_start - 1].seq);
    third
        .apply(all[last_group_start..].to_vec())
        .await
        .expect("epoch 3 applies the rest");
    third.finish().await.expect("the live sink finishes");
    assert_eq!(
        server
            .psql("live", COMPARE)
            .expect("the live target's rows"),
        on_source
    );
    assert_eq!(sink.adopt(3, 0).await.expect("adopt"), Ok(()));
    assert_eq!(
        sink.adopt(2, 0).await.expect("an older adopt answers"),
        Err(3)
    );

    // The target holds the first two changes: the slot moves there.
    let held = groups[1].last().expect("a group");
    source
        .confirm(
            "live",
            Applied {
                through_seq: held.seq,
                through_position: Position(held.position),
            },
        )
        .await
        .expect("confirm");
    let wanted = format!(
        "{}",
        ferry_engine::adapters::postgres::replication::Lsn(held.position)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let slot = server
            .psql(
                DB,
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'ferry_live_test';",
            )
            .expect("the slot");
        if slot == wanted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot at {wanted} within 30 s (it is at {slot})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(stream);

    // Resumed after that change: the unbroken stream's ops, same seqs.
    let from = LiveFrom {
        snapshot: Some(snapshot),
        from_seq_exclusive: held.seq,
        from_position_exclusive: Position(held.position),
        snapshot_through_seq: Some(snapshot_end),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut resumed = loop {
        // The server lets the slot go a moment after the old stream.
        let mut stream = source.open(b"", from).await.expect("the stream resumes");
        let mut ops = Vec::new();
        match tokio::time::timeout(Duration::from_secs(5), async {
            use futures::StreamExt;
            stream.events.next().await
        })
        .await
        {
            Ok(Some(Err(error))) if error.to_string().contains("is active") => {
                assert!(
                    Instant::now() < deadline,
                    "the slot is free within 30 s: {error}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Some(Ok(LiveEvent::Batch(batch)))) => {
                ops.extend(batch);
                break (stream, ops);
            }
            other => {
                if let Ok(Some(Err(error))) = other {
                    panic!("the resumed stream failed: {error}");
                }
                break (stream, ops);
            }
        }
    };
    read_through(&mut resumed.0, through, &mut resumed.1).await;
    let want: Vec<&Op> = all.iter().filter(|op| op.seq > held.seq).collect();
    let got: Vec<&Op> = resumed.1.iter().collect();
    assert_eq!(got.len(), want.len(), "as many ops as the unbroken stream");
    assert!(
        got == want,
        "the resumed stream differs from the unbroken one"
    );

    // Nobody reads for three times wal_sender_timeout: the stream lives on.
    tokio::time::sleep(Duration::from_secs(6)).await;
    server
        .psql(DB, "UPDATE runs SET name = 'after a pause' WHERE id = 1;")
        .expect("a change after the pause");
    let mut after_pause = Vec::new();
    read_through(&mut resumed.0, wal_now(&server), &mut after_pause).await;
    assert!(
        after_pause
            .iter()
            .any(|op| op.key == "public.runs/1".as_bytes() && op.method == "UPDATE".as_bytes()),
        "the change after the pause came: {after_pause:?}"
    );

    // Inside the snapshot: refused, saying why.
    let inside = LiveFrom {
        snapshot: Some(snapshot),
        from_seq_exclusive: 10,
        from_position_exclusive: snapshot,
        snapshot_through_seq: Some(snapshot_end),
    };
    let error = source
        .open(b"", inside)
        .await
        .expect_err("a resume inside the snapshot is refused")
        .to_string();
    assert!(error.contains("cannot be read again"), "{error}");
    drop(resumed);

    // A table without a primary key: refused by name before any slot.
    server
        .psql(DB, "CREATE TABLE keyless (x int);")
        .expect("a table without a key");
    let error = source
        .open(b"", LiveFrom::default())
        .await
        .expect_err("a table without a primary key is refused")
        .to_string();
    assert!(
        error.contains("public.keyless has no primary key"),
        "{error}"
    );
}

/// A write made with psql as the superuser: `Err` with psql's message when
/// the server refuses it.
fn write(server: &PgServer, sql: &str) -> Result<String, String> {
    server.psql(DB, sql).map_err(|error| error.to_string())
}

#[tokio::test]
async fn the_fence_refuses_every_write_at_the_database_and_answers_a_position_the_stream_reaches() {
    use ferry_engine::adapters::live::{FenceAnswer, FenceMove};
    let server = PgServer::start().expect("PostgreSQL 15");
    server.create_database(DB).expect("a database");
    server
        .psql(
            DB,
            "CREATE TABLE runs (id bigint PRIMARY KEY, name text); \
             CREATE TABLE other (id int PRIMARY KEY); \
             INSERT INTO runs VALUES (1, 'one');",
        )
        .expect("the source's tables");
    let source = live_source(&server);
    let mut stream = source
        .open(b"", LiveFrom::default())
        .await
        .expect("the live stream opens");
    write(&server, "INSERT INTO runs VALUES (2, 'two');").expect("a write before the fence");
    let before = wal_now(&server);
    let fence = FenceMove::Fence {
        epoch: 1,
        successor: "postgres://new.example:5432/app".to_owned(),
    };
    let FenceAnswer::Done(fenced) = source.move_fence(fence.clone()).await.expect("fence") else {
        panic!("the fence was refused");
    };
    assert!(
        fenced.0 >= before,
        "F {fenced} is below the last write's end {before}"
    );
    // The stream reaches F, with the write before it.
    let mut ops = Vec::new();
    read_through(&mut stream, fenced.0, &mut ops).await;
    let last_write = ops
        .iter()
        .find(|op| op.key == "public.runs/2".as_bytes())
        .expect("the write before the fence is in the stream");
    assert!(last_write.position <= fenced.0);

    // Every kind of write, by the superuser, with triggers "off", is
    // refused with SQLSTATE 25006 naming the migration; reads go on.
    for sql in [
        "INSERT INTO runs VALUES (3, 'three');",
        "UPDATE runs SET name = 'x';",
        "DELETE FROM runs;",
        "TRUNCATE runs;",
        "SET session_replication_role = replica; INSERT INTO other VALUES (1);",
    ] {
        let error = write(&server, sql).expect_err("a write to a fenced table");
        assert!(
            error.contains("is fenced: ferry migration epoch 1") && error.contains("new.example"),
            "{sql}: {error}"
        );
    }
    let state = server
        .psql(
            DB,
            "\\set VERBOSITY verbose\nINSERT INTO runs VALUES (4, 'four');",
        )
        .expect_err("refused");
    assert!(state.to_string().contains("25006"), "{state}");
    assert_eq!(
        server
            .psql(DB, "SELECT count(*) FROM runs;")
            .expect("a read"),
        "2"
    );

    // Idempotent for its epoch, refused for an older one; the state says so.
    assert_eq!(
        source.move_fence(fence).await.expect("fence again"),
        FenceAnswer::Done(fenced)
    );
    let older = source
        .move_fence(FenceMove::Unfence { epoch: 0 })
        .await
        .expect("an older unfence answers");
    assert!(matches!(older, FenceAnswer::Refused(_)), "{older:?}");
    let state = source.fence_state().await.expect("fence state");
    assert!(
        state.fenced
            && state.epoch == 1
            && state.fenced_position == fenced
            && state.guard_epochs == vec![1],
        "{state:?}"
    );

    // Unfenced: writes go on, and nothing of the fence is left.
    let unfenced = source
        .move_fence(FenceMove::Unfence { epoch: 1 })
        .await
        .expect("unfence");
    assert!(matches!(unfenced, FenceAnswer::Done(_)), "{unfenced:?}");
    write(&server, "INSERT INTO runs VALUES (5, 'five');").expect("a write after the unfence");
    assert_eq!(
        server
            .psql(
                DB,
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'ferry_fence';"
            )
            .expect("psql"),
        "0"
    );

    // A later attempt fences and commits: the plane stays fenced for good.
    let FenceAnswer::Done(again) = source
        .move_fence(FenceMove::Fence {
            epoch: 2,
            successor: "postgres://new.example:5432/app".to_owned(),
        })
        .await
        .expect("fence 2")
    else {
        panic!("fence 2 refused");
    };
    assert!(again > fenced);
    assert_eq!(
        source
            .move_fence(FenceMove::Commit {
                epoch: 2,
                successor_position_offset: 0
            })
            .await
            .expect("commit"),
        FenceAnswer::Done(again)
    );
    let rollback = source
        .move_fence(FenceMove::Unfence { epoch: 2 })
        .await
        .expect("an unfence after the switch answers");
    assert!(
        matches!(&rollback, FenceAnswer::Refused(reason) if reason.contains("cannot be rolled back")),
        "{rollback:?}"
    );
    write(&server, "INSERT INTO runs VALUES (6, 'six');").expect_err("switched: refused for good");
}

/// Whether the source still has the live stream's slot and publication,
/// as psql sees them.
fn slot_and_publication(server: &PgServer) -> (bool, bool) {
    let held = server
        .psql(
            DB,
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'ferry_live_test'), \
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'ferry_live_test');",
        )
        .expect("psql");
    (held.starts_with("t|"), held.ends_with("|t"))
}

#[tokio::test]
async fn the_slot_and_publication_outlive_an_unfence_and_are_dropped_by_a_commit() {
    use ferry_engine::adapters::live::{FenceAnswer, FenceMove};
    let server = PgServer::start().expect("PostgreSQL 15");
    server.create_database(DB).expect("a database");
    server
        .psql(DB, "CREATE TABLE runs (id bigint PRIMARY KEY, name text);")
        .expect("the source's table");
    let source = live_source(&server);
    let mut stream = source
        .open(b"", LiveFrom::default())
        .await
        .expect("the live stream opens");
    let snapshot = stream.snapshot_position;
    let fence = |epoch| FenceMove::Fence {
        epoch,
        successor: "postgres://new.example:5432/app".to_owned(),
    };

    // A rolled back attempt keeps both: the next one resumes from the slot.
    let FenceAnswer::Done(fenced) = source.move_fence(fence(1)).await.expect("fence 1") else {
        panic!("fence 1 refused");
    };
    let mut ops = Vec::new();
    read_through(&mut stream, fenced.0, &mut ops).await;
    let unfenced = source
        .move_fence(FenceMove::Unfence { epoch: 1 })
        .await
        .expect("unfence");
    assert!(matches!(unfenced, FenceAnswer::Done(_)), "{unfenced:?}");
    assert_eq!(
        slot_and_publication(&server),
        (true, true),
        "after an unfence"
    );
    write(&server, "INSERT INTO runs VALUES (1, 'one');").expect("a write after the unfence");

    // A committed switch drops both, though the stream still reads the
    // slot (its walsender is ended).
    let FenceAnswer::Done(again) = source.move_fence(fence(2)).await.expect("fence 2") else {
        panic!("fence 2 refused");
    };
    read_through(&mut stream, again.0, &mut ops).await;
    let active = server
        .psql(
            DB,
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'ferry_live_test';",
        )
        .expect("psql");
    assert_eq!(active, "t", "the stream reads the slot at the commit");
    let commit = FenceMove::Commit {
        epoch: 2,
        successor_position_offset: 0,
    };
    assert_eq!(
        source.move_fence(commit.clone()).await.expect("commit"),
        FenceAnswer::Done(again)
    );
    // Dropped in the background, just after the commit answered.
    let mut released = slot_and_publication(&server);
    for _ in 0..200 {
        if released == (false, false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        released = slot_and_publication(&server);
    }
    assert_eq!(released, (false, false), "after the commit");
    // Found committed already: the same answer, nothing left to drop.
    assert_eq!(
        source.move_fence(commit).await.expect("commit again"),
        FenceAnswer::Done(again)
    );
    assert_eq!(slot_and_publication(&server), (false, false));
    drop(stream);

    // A stream resumed now is told why there is nothing to follow.
    let from = LiveFrom {
        snapshot: Some(snapshot),
        from_seq_exclusive: ops.last().map_or(0, |op| op.seq),
        from_position_exclusive: Position(again.0),
        snapshot_through_seq: Some(0),
    };
    let mut resumed = source.open(b"", from).await.expect("the stream opens");
    let error = tokio::time::timeout(Duration::from_secs(60), async {
        use futures::StreamExt;
        loop {
            match resumed.events.next().await {
                Some(Err(error)) => break error.to_string(),
                Some(Ok(_)) => {}
                None => panic!("the stream ended without an error"),
            }
        }
    })
    .await
    .expect("the resumed stream answers within 60 s");
    assert!(
        error.contains("was dropped when migration epoch 2 switched"),
        "{error}"
    );
}

/// `SELECT last_value, is_called` of `sequence`, as psql prints it.
fn sequence_state(server: &PgServer, db: &str, sequence: &str) -> String {
    server
        .psql(
            db,
            &format!("SELECT last_value, is_called FROM {sequence};"),
        )
        .expect("the sequence")
}

#[tokio::test]
async fn the_fence_copies_the_sequences_so_the_new_server_hands_out_no_id_the_old_one_had() {
    use ferry_engine::adapters::live::{FenceAnswer, FenceMove};
    let server = PgServer::start().expect("PostgreSQL 15");
    server.create_database(DB).expect("a database");
    server
        .psql(
            DB,
            "CREATE TABLE items (id serial PRIMARY KEY, name text); \
             CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, what text); \
             CREATE SEQUENCE tickets; \
             INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 3) g; \
             INSERT INTO events (what) VALUES ('a'), ('b'); \
             SELECT nextval('tickets');",
        )
        .expect("the source's tables and sequences");
    let source = live_source(&server);
    let mut stream = source
        .open(b"", LiveFrom::default())
        .await
        .expect("the live stream opens");
    // After the snapshot the sequences move on: rows, a rolled back insert
    // and bare nextval calls leave gaps only the sequences know about.
    server
        .psql(
            DB,
            "INSERT INTO items (name) SELECT 'later ' || g FROM generate_series(1, 20) g; \
             BEGIN; INSERT INTO items (name) VALUES ('rolled back'); ROLLBACK; \
             SELECT nextval('items_id_seq'); \
             INSERT INTO events (what) SELECT 'later' FROM generate_series(1, 5); \
             SELECT nextval('tickets') FROM generate_series(1, 7);",
        )
        .expect("changes after the snapshot");
    let before = wal_now(&server);
    let FenceAnswer::Done(fenced) = source
        .move_fence(FenceMove::Fence {
            epoch: 1,
            successor: "postgres://new.example:5432/app".to_owned(),
        })
        .await
        .expect("fence")
    else {
        panic!("the fence was refused");
    };
    let sequences = ["items_id_seq", "events_id_seq", "tickets"];
    let at_fence: Vec<String> = sequences
        .iter()
        .map(|sequence| sequence_state(&server, DB, sequence))
        .collect();
    assert_eq!(
        at_fence[0], "25|t",
        "3 + 20 rows, one rolled back, one nextval"
    );

    let mut all = Vec::new();
    let snapshot_end = read_through(&mut stream, fenced.0, &mut all)
        .await
        .expect("the snapshot completes") as usize;

    // One group of SETVAL ops, one per sequence, below F and above every
    // write before the fence.
    let changes = &all[snapshot_end..];
    let copied: Vec<&Op> = changes
        .iter()
        .filter(|op| op.kind == "pg.sequence".as_bytes())
        .collect();
    let keys: Vec<String> = copied
        .iter()
        .map(|op| String::from_utf8_lossy(&op.key).into_owned())
        .collect();
    assert_eq!(
        keys,
        [
            "sequence/public.events_id_seq",
            "sequence/public.items_id_seq",
            "sequence/public.tickets"
        ],
        "each sequence once"
    );
    let position = copied[0].position;
    assert!(
        position > before && position < fenced.0,
        "{position} between {before} and F {fenced}"
    );
    for (index, op) in copied.iter().enumerate() {
        assert_eq!(op.method, "SETVAL".as_bytes());
        assert_eq!((op.position, op.txn), (position, position));
        assert_eq!(op.txn_last, index == copied.len() - 1, "one group");
    }
    assert!(
        changes
            .iter()
            .filter(|op| op.kind == "pg.row".as_bytes())
            .all(|op| op.position < position),
        "every row change before the copy"
    );
    let body: serde_json::Value =
        serde_json::from_slice(&copied[1].body).expect("the body is JSON");
    assert_eq!(body["last_value"], 25, "{body}");
    assert_eq!(body["is_called"], true, "{body}");

    // Applied by the live sink on a target that has the sequences from the
    // snapshot already.
    server.create_database("new").expect("the target");
    let sink = PgLiveSink::new(
        PgConnection::from_url(&server.url("new"), &PasswordSources::default())
            .expect("the target's URL"),
        100,
    );
    let stream_info = StreamInfo {
        stream_id: "live".to_owned(),
        ..StreamInfo::default()
    };
    let mut apply = sink.open(&stream_info, 1).await.expect("the sink opens");
    for part in all.chunks(10) {
        apply.apply(part.to_vec()).await.expect("the sink applies");
    }
    let applied = apply.applied().expect("applied");
    assert_eq!(applied.through_position, Position(position));
    apply.finish().await.expect("the sink finishes");

    // On the target: each sequence where the source's stood at the fence,
    // and nextval above every id the source has.
    for (sequence, source_state) in sequences.iter().zip(&at_fence) {
        assert_eq!(
            &sequence_state(&server, "new", sequence),
            source_state,
            "{sequence}"
        );
    }
    let highest = |table: &str| -> i64 {
        server
            .psql(DB, &format!("SELECT max(id) FROM {table};"))
            .expect("the source's ids")
            .parse()
            .expect("a number")
    };
    let item: i64 = server
        .psql(
            "new",
            "INSERT INTO items (name) VALUES ('on the new server') RETURNING id;",
        )
        .expect("an insert on the target")
        .parse()
        .expect("an id");
    assert!(item > highest("items"), "item id {item}");
    let event: i64 = server
        .psql(
            "new",
            "INSERT INTO events (what) VALUES ('new') RETURNING id;",
        )
        .expect("an insert on the target")
        .parse()
        .expect("an id");
    assert!(event > highest("events"), "event id {event}");
    assert_eq!(
        server
            .psql("new", "SELECT nextval('tickets');")
            .expect("nextval"),
        "9"
    );

    // Resumed from where the target holds the stream (the copy's
    // position): the copy is not carried again.
    let snapshot = stream.snapshot_position;
    drop(stream);
    let from = LiveFrom {
        snapshot: Some(snapshot),
        from_seq_exclusive: applied.through_seq,
        from_position_exclusive: applied.through_position,
        snapshot_through_seq: Some(snapshot_end as u64),
    };
    let through = wal_now(&server);
    let deadline = Instant::now() + Duration::from_secs(30);
    let again = loop {
        let mut resumed = source.open(b"", from).await.expect("the stream resumes");
        let mut ops = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), async {
            use futures::StreamExt;
            while let Some(event) = resumed.events.next().await {
                match event {
                    Err(error) => return Err(error.to_string()),
                    Ok(LiveEvent::Batch(batch)) => ops.extend(batch),
                    Ok(LiveEvent::Progress { position, .. }) if position >= through => {
                        return Ok(());
                    }
                    Ok(_) => {}
                }
            }
            Err("the stream ended".to_owned())
        })
        .await
        .expect("the resumed stream reaches the WAL's end within 60 s");
        match read {
            Ok(()) => break ops,
            Err(error) if error.contains("is active") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("the resumed stream failed: {error}"),
        }
    };
    assert!(again.is_empty(), "nothing after the copy: {again:?}");
}

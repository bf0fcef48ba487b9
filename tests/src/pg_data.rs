//! What the PostgreSQL tests (`tests/postgres.rs`) compare and run: two
//! databases compared through SQL alone (every table's row count and an
//! order-independent digest of its rows, every sequence's position, and
//! `pg_dump --schema-only` of both), the replication slots a server holds,
//! and `ferry` run as a command with no PostgreSQL setting of the test's
//! own environment (`PGPASSWORD`, `PGUSER`, `~/.pgpass`...) reaching it.
//!
//! Every query goes through [`PgServer::psql`], so what is compared is what
//! the server itself prints, never what ferry reads back.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::ferry_binary;
use crate::pg::{PgServer, SUPERUSER};

/// A table's rows, as SQL sees them: how many, and the MD5 of the sorted
/// MD5s of their text forms (equal for the same rows in any order and any
/// physical layout; a row twice changes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowsDigest {
    /// `count(*)`.
    pub rows: u64,
    /// `md5(string_agg(md5(row::text), '' ORDER BY md5(row::text)))`, empty
    /// for no rows.
    pub digest: String,
}

/// One value `sql` selects (psql's unaligned, tuples-only output), panicking
/// with psql's words when it fails.
pub fn scalar(server: &PgServer, db: &str, sql: &str) -> String {
    server
        .psql(db, sql)
        .unwrap_or_else(|error| panic!("{sql}: {error}"))
}

/// [`scalar`] parsed as a number.
pub fn number(server: &PgServer, db: &str, sql: &str) -> i64 {
    let text = scalar(server, db, sql);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{sql} gave {text:?}, not a number"))
}

/// The [`RowsDigest`] of whatever `query` (a SELECT) returns.
pub fn rows_digest(server: &PgServer, db: &str, query: &str) -> RowsDigest {
    let answer = scalar(
        server,
        db,
        &format!(
            "SELECT count(*), coalesce(md5(string_agg(md5(r::text), '' ORDER BY md5(r::text))), '') \
             FROM ({query}) r;"
        ),
    );
    let (rows, digest) = answer
        .split_once('|')
        .unwrap_or_else(|| panic!("the digest of {query} is {answer:?}"));
    RowsDigest {
        rows: rows.parse().expect("a count"),
        digest: digest.to_owned(),
    }
}

/// Every user table of `db` (ferry's own schema left out), each as
/// `"schema"."name"`, quoted as SQL needs it.
pub fn user_tables(server: &PgServer, db: &str) -> Vec<String> {
    let listed = scalar(
        server,
        db,
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_catalog.pg_tables \
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'ferry') ORDER BY 1;",
    );
    listed.lines().map(str::to_owned).collect()
}

/// Every user table of `db` with its [`RowsDigest`].
pub fn table_digests(server: &PgServer, db: &str) -> BTreeMap<String, RowsDigest> {
    user_tables(server, db)
        .into_iter()
        .map(|table| {
            let digest = rows_digest(server, db, &format!("SELECT * FROM {table}"));
            (table, digest)
        })
        .collect()
}

/// Rows in all user tables of `db` (0 when it has none).
pub fn total_rows(server: &PgServer, db: &str) -> u64 {
    user_tables(server, db)
        .iter()
        .map(|table| number(server, db, &format!("SELECT count(*) FROM {table};")) as u64)
        .sum()
}

/// Every sequence of `db` (ferry's left out) and where it stands:
/// `last_value|is_called`, as psql prints them (`13|t`).
pub fn sequence_positions(server: &PgServer, db: &str) -> BTreeMap<String, String> {
    let listed = scalar(
        server,
        db,
        "SELECT format('%I.%I', schemaname, sequencename) FROM pg_catalog.pg_sequences \
         WHERE schemaname <> 'ferry' ORDER BY 1;",
    );
    listed
        .lines()
        .map(|sequence| {
            let position = scalar(
                server,
                db,
                &format!("SELECT last_value, is_called FROM {sequence};"),
            );
            (sequence.to_owned(), position)
        })
        .collect()
}

/// `pg_dump --schema-only --no-owner -N ferry` of `db`, without the
/// `\restrict KEY` / `\unrestrict KEY` lines whose key pg_dump draws at
/// random on every run.
pub fn schema_dump(server: &PgServer, db: &str) -> String {
    let output = Command::new(server.bin_dir().join("pg_dump"))
        .args(["--schema-only", "--no-owner", "-N", "ferry", "-h"])
        .arg(server.data_dir())
        .arg("-p")
        .arg(server.port().to_string())
        .args(["-U", SUPERUSER, "-d", db])
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .expect("pg_dump runs");
    assert!(
        output.status.success(),
        "pg_dump of {db} on port {} failed: {}",
        server.port(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("pg_dump prints UTF-8 for a UTF-8 database")
        .lines()
        .filter(|line| !line.starts_with("\\restrict ") && !line.starts_with("\\unrestrict "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where `left` and `right` first differ, with the lines around it on
/// each side, for a failed comparison to show.
pub fn first_difference(left: &str, right: &str) -> String {
    let left_lines: Vec<&str> = left.lines().collect();
    let right_lines: Vec<&str> = right.lines().collect();
    let at = left_lines
        .iter()
        .zip(&right_lines)
        .position(|(left, right)| left != right)
        .unwrap_or(left_lines.len().min(right_lines.len()));
    let around = |lines: &[&str]| {
        let from = at.saturating_sub(10);
        let to = (at + 10).min(lines.len());
        lines[from..to]
            .iter()
            .enumerate()
            .map(|(offset, line)| {
                let number = from + offset + 1;
                let mark = if number == at + 1 { ">" } else { " " };
                format!("{mark}{number:5} {line}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        "first difference at line {}\n--- source ---\n{}\n--- target ---\n{}",
        at + 1,
        around(&left_lines),
        around(&right_lines)
    )
}

/// Asserts that `target_db` on `target` holds what `source_db` on `source`
/// holds: the same tables with the same rows (counts and digests), every
/// sequence at the same place, and the same schema as `pg_dump` prints it.
pub fn assert_same_database(
    source: &PgServer,
    source_db: &str,
    target: &PgServer,
    target_db: &str,
) {
    let expected = table_digests(source, source_db);
    let restored = table_digests(target, target_db);
    assert!(!expected.is_empty(), "the source {source_db} has tables");
    assert_eq!(
        restored.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "the target {target_db} has the source's tables, and no other"
    );
    for (table, digest) in &expected {
        assert_eq!(
            &restored[table], digest,
            "{table}: the target's rows (count, digest) are the source's"
        );
    }
    assert_eq!(
        sequence_positions(target, target_db),
        sequence_positions(source, source_db),
        "every sequence stands where the source's does (last_value|is_called)"
    );
    let source_dump = schema_dump(source, source_db);
    let target_dump = schema_dump(target, target_db);
    assert!(
        source_dump == target_dump,
        "pg_dump --schema-only of the target equals the source's; {}",
        first_difference(&source_dump, &target_dump)
    );
}

/// The replication slots of `server`, one `name|type|temporary|active` each.
pub fn replication_slots(server: &PgServer) -> Vec<String> {
    scalar(
        server,
        "postgres",
        "SELECT slot_name, slot_type, temporary, active FROM pg_catalog.pg_replication_slots ORDER BY 1;",
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Asks `check` every 50 ms until it says yes; panics naming `what` when
/// `limit` passes first. A bound on a wait, never a measure of speed.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A store folder for one test: `file://DIR`, removed on drop.
#[derive(Debug)]
pub struct Store {
    dir: TempDir,
}

impl Store {
    /// A new empty folder.
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("ferry-pg-store-")
                .tempdir()
                .expect("a temporary folder"),
        }
    }

    /// `file:///...`, as ferry takes it.
    pub fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

/// `ferry` of this build with none of the test's PostgreSQL environment:
/// no `PGPASSWORD`, `PGUSER`, `PGHOST`..., and a `PGPASSFILE` that does not
/// exist (so `~/.pgpass` is not read either). A test adds what it means.
pub fn ferry_command() -> Command {
    let mut command = Command::new(ferry_binary());
    for name in [
        "PGPASSWORD",
        "PGPASSFILE",
        "PGUSER",
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGSSLMODE",
        "PGOPTIONS",
        "ETCD_USERNAME",
        "ETCD_PASSWORD",
    ] {
        command.env_remove(name);
    }
    command.env("PGPASSFILE", "/nonexistent/ferry-test-pgpass");
    command.stdin(Stdio::null());
    command
}

/// Runs `ferry ARGS` to its end with `environment` added.
pub fn ferry_with_env(args: &[impl AsRef<OsStr>], environment: &[(&str, &str)]) -> Output {
    ferry_command()
        .args(args)
        .envs(environment.iter().copied())
        .output()
        .expect("ferry runs")
}

/// Runs `ferry ARGS`, which must succeed: its stdout. Panics with its
/// stderr when it fails.
pub fn ferry_ok(args: &[impl AsRef<OsStr>]) -> String {
    let output = ferry_with_env(args, &[]);
    let shown: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    assert!(
        output.status.success(),
        "ferry {shown:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ferry extract --output json --source SOURCE --to STORE_URL EXTRA...`, which
/// must succeed: the new backup's id.
pub fn extract(source_url: &str, store_url: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "extract", "--output", "json", "--source", source_url, "--to", store_url,
    ];
    args.extend_from_slice(extra);
    let printed = ferry_ok(&args);
    let summary: serde_json::Value = serde_json::from_str(&printed)
        .unwrap_or_else(|_| panic!("extract --output json printed {printed:?}"));
    summary["backup_id"]
        .as_str()
        .unwrap_or_else(|| panic!("the extract's summary {summary} has a backup_id"))
        .to_owned()
}

/// The manifest of backup `id` in the store at `store_url`, as `ferry
/// inspect --output json` shows it.
pub fn manifest(store_url: &str, id: &str) -> serde_json::Value {
    let printed = ferry_ok(&["inspect", "--output", "json", store_url, "--backup", id]);
    serde_json::from_str(&printed)
        .unwrap_or_else(|_| panic!("inspect --output json printed {printed:?}"))
}

/// `ferry ARGS` running in the background, its stdout and stderr in files;
/// killed (SIGKILL) on drop if still running.
#[derive(Debug)]
pub struct RunningFerry {
    child: Child,
    logs: TempDir,
}

impl RunningFerry {
    /// Starts `ferry ARGS` ([`ferry_command`]).
    pub fn start(args: &[impl AsRef<OsStr>]) -> Self {
        let logs = tempfile::tempdir().expect("a temporary folder");
        let child = ferry_command()
            .args(args)
            .stdout(Stdio::from(
                File::create(logs.path().join("stdout")).expect("a log file"),
            ))
            .stderr(Stdio::from(
                File::create(logs.path().join("stderr")).expect("a log file"),
            ))
            .spawn()
            .expect("ferry starts");
        Self { child, logs }
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGKILL, then waits for it: ferry has no chance to clean anything up.
    /// Panics if it had already exited (the kill would prove nothing).
    pub fn kill(&mut self) {
        assert!(
            self.exited().is_none(),
            "ferry was still running when the test killed it; it had exited, saying:\n{}",
            self.stderr()
        );
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for it to end by itself.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("wait")
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log_path("stderr")).unwrap_or_default()
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.logs.path().join(name)
    }
}

impl Drop for RunningFerry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

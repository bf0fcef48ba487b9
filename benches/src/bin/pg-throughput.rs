//! PostgreSQL extract + restore: ferry against `pg_dump -Fd -j N` +
//! `pg_restore -j N` (what PostgreSQL users would pick) and against a COPY
//! ceiling, on the same database, in the same run, on one real PostgreSQL
//! server the bench starts.
//!
//! `cargo run --release -p ferry-benches --bin pg-throughput [-- --scale S
//! --growth G --repeat R --jobs N --ferry BINARY]` (needs Debian's
//! PostgreSQL 15, `apt-get install -y postgresql`, and GNU time, `apt-get
//! install -y time`). `--ferry` measures another build of ferry (another
//! commit's, say) against the same tools and data.
//!
//! - The data: a Metaflow-like metadata database (flows, runs with jsonb
//!   tags and text ids, steps, tasks, metadata rows with text values,
//!   artifacts; primary keys, unique keys, a GIN and two btree indexes,
//!   three foreign keys, three sequences), loaded with `INSERT ... SELECT
//!   generate_series`: scale 1 is 4,000 runs, 604,080 rows, about 300 MB on
//!   disk.
//! - ferry runs twice a repetition: rows as JSON (`pg.row`, the default),
//!   then as COPY text (`--row-format copy`, `pg.rows`); each is printed
//!   and compared on its own.
//! - Each tool restores into its own fresh, empty database, which is then
//!   checked against the source: every table's row count and a hash of its
//!   rows, and (ferry and pg_restore) every column, index, constraint and
//!   sequence value. A difference is printed and fails the run.
//! - The COPY ceiling: psql's `\copy public.T TO FILE` of each table (text
//!   format, uncompressed, local files), then `\copy public.T FROM FILE`
//!   into the same tables created empty (`pg_dump --section=pre-data`: no
//!   primary key, index, unique or foreign key), N tables at a time. It
//!   leaves out the schema, index and constraint builds, sequence values,
//!   compression and the consistent snapshot, which both tools do: the
//!   plain cost of moving the rows out and in. Then, on the loaded tables,
//!   `pg_restore --section=post-data -j N` of a schema-only archive builds
//!   the same indexes and keys: the ceiling with the builds, the least any
//!   restore of this database does, scheduled by PostgreSQL's own tool.
//! - Every step is timed around the client program, which runs under
//!   `/usr/bin/time` for its CPU time and peak RSS. With
//!   `log_min_duration_statement = 0`, the server's log says how long each
//!   statement took, summed per kind (COPY, index builds, keys, foreign
//!   keys).
//! - Then `--growth` times the data (default 4) once more, for ferry's peak
//!   memory: it must stay flat as the data grows.
//!
//! It prints each measurement, the ratios and a one-line summary; it
//! asserts no time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_tests::pg::{PgOptions, PgServer, SUPERUSER};

/// GNU time: a program's CPU time and peak RSS.
const GNU_TIME: &str = "/usr/bin/time";

/// Runs and flows at scale 1; every child table grows with the runs.
const RUNS_PER_SCALE: u32 = 4_000;
const FLOWS_PER_SCALE: u32 = 80;

/// The tables, largest first (the order the COPY ceiling hands them out).
const TABLES: [&str; 6] = [
    "artifact_v3",
    "metadata_v3",
    "tasks_v3",
    "steps_v3",
    "runs_v3",
    "flows_v3",
];

/// A peak RSS that grows by more than this from 1x to the grown data is
/// not flat. Memory that grew with the data would grow by the data's
/// factor (4 by default); ferry's peak RSS moves by about a fifth from run
/// to run at the same size (how far the readers get ahead, within bounded
/// queues).
const FLAT_GROWTH: f64 = 1.5;

/// Metaflow's metadata service schema (its `*_v3` tables), with the
/// indexes a deployment adds.
const SCHEMA: &str = r#"
CREATE TABLE flows_v3 (
    flow_id varchar(255) PRIMARY KEY,
    user_name varchar(255),
    ts_epoch bigint NOT NULL,
    tags jsonb,
    system_tags jsonb
);
CREATE TABLE runs_v3 (
    flow_id varchar(255) NOT NULL REFERENCES flows_v3 (flow_id),
    run_number serial NOT NULL,
    run_id varchar(255),
    user_name varchar(255),
    ts_epoch bigint NOT NULL,
    last_heartbeat_ts bigint,
    tags jsonb,
    system_tags jsonb,
    PRIMARY KEY (flow_id, run_number),
    UNIQUE (flow_id, run_id)
);
CREATE INDEX runs_v3_idx_ts_epoch ON runs_v3 (ts_epoch);
CREATE INDEX runs_v3_idx_system_tags ON runs_v3 USING gin (system_tags);
CREATE TABLE steps_v3 (
    flow_id varchar(255) NOT NULL,
    run_number bigint NOT NULL,
    run_id varchar(255),
    step_name varchar(255) NOT NULL,
    user_name varchar(255),
    ts_epoch bigint NOT NULL,
    tags jsonb,
    system_tags jsonb,
    PRIMARY KEY (flow_id, run_number, step_name),
    FOREIGN KEY (flow_id, run_number) REFERENCES runs_v3 (flow_id, run_number)
);
CREATE TABLE tasks_v3 (
    flow_id varchar(255) NOT NULL,
    run_number bigint NOT NULL,
    run_id varchar(255),
    step_name varchar(255) NOT NULL,
    task_id bigserial PRIMARY KEY,
    task_name varchar(255),
    user_name varchar(255),
    ts_epoch bigint NOT NULL,
    last_heartbeat_ts bigint,
    tags jsonb,
    system_tags jsonb,
    FOREIGN KEY (flow_id, run_number, step_name) REFERENCES steps_v3 (flow_id, run_number, step_name),
    UNIQUE (flow_id, run_number, step_name, task_name)
);
CREATE TABLE metadata_v3 (
    flow_id varchar(255),
    run_number bigint NOT NULL,
    run_id varchar(255),
    step_name varchar(255) NOT NULL,
    task_id bigint NOT NULL,
    task_name varchar(255),
    id bigserial NOT NULL,
    field_name varchar(255) NOT NULL,
    value text NOT NULL,
    type varchar(255) NOT NULL,
    user_name varchar(255),
    ts_epoch bigint NOT NULL,
    tags jsonb,
    system_tags jsonb,
    PRIMARY KEY (id, flow_id, run_number, step_name, task_id, field_name)
);
CREATE INDEX metadata_v3_akey ON metadata_v3 (flow_id, run_number, step_name, task_id, field_name);
CREATE TABLE artifact_v3 (
    flow_id varchar(255) NOT NULL,
    run_number bigint NOT NULL,
    run_id varchar(255),
    step_name varchar(255) NOT NULL,
    task_id bigint NOT NULL,
    task_name varchar(255),
    name varchar(255) NOT NULL,
    location varchar(255) NOT NULL,
    ds_type varchar(255) NOT NULL,
    sha varchar(255),
    type varchar(255),
    content_type varchar(255),
    user_name varchar(255),
    attempt_id smallint NOT NULL,
    ts_epoch bigint NOT NULL,
    tags jsonb,
    system_tags jsonb,
    PRIMARY KEY (flow_id, run_number, step_name, task_id, attempt_id, name)
);
"#;

/// The rows, made by the server: `{flows}` flows, `{runs}` runs, six steps
/// a run, two tasks a step, six metadata rows and five artifacts a task.
/// Deterministic: no `random()`, text from `md5` of the ids.
const LOAD: &str = r#"
INSERT INTO flows_v3
SELECT (ARRAY['Training','Ingest','Feature','Scoring','Eval','Backfill','Report','Embedding'])[1 + f % 8] || 'Flow' || f,
       (ARRAY['alice','bob','carol','dmitri','erin','farah'])[1 + f % 6],
       1700000000000 + f::bigint * 3600000,
       '[]'::jsonb,
       jsonb_build_array('user:' || (ARRAY['alice','bob','carol','dmitri','erin','farah'])[1 + f % 6],
                         'metaflow_version:2.12.' || (f % 30))
FROM generate_series(1, {flows}) AS f;

INSERT INTO runs_v3 (flow_id, run_number, run_id, user_name, ts_epoch, last_heartbeat_ts, tags, system_tags)
SELECT fl.flow_id, r, 'argo-' || lower(fl.flow_id) || '-' || lpad(to_hex(r::bigint * 2654435761 % 4294967296), 8, '0'),
       fl.user_name, 1700000000000 + r::bigint * 60000, 1700000000 + r::bigint * 60 + 3600,
       jsonb_build_array('team:' || (ARRAY['ml','data','search','ads'])[1 + r % 4],
                         'experiment:' || substr(md5('e' || r), 1, 8)),
       jsonb_build_array('user:' || fl.user_name, 'runtime:argo-workflows', 'python_version:3.11.' || (r % 9),
                         'date:' || to_char(to_timestamp(1700000000 + r * 60) AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                         'metaflow_version:2.12.' || (r % 30))
FROM generate_series(1, {runs}) AS r
JOIN flows_v3 AS fl
  ON fl.flow_id = (ARRAY['Training','Ingest','Feature','Scoring','Eval','Backfill','Report','Embedding'])[1 + (1 + r % {flows}) % 8]
                  || 'Flow' || (1 + r % {flows});
SELECT setval('runs_v3_run_number_seq', {runs});

INSERT INTO steps_v3
SELECT r.flow_id, r.run_number, r.run_id, s.name, r.user_name, r.ts_epoch + s.ord * 1000, r.tags, r.system_tags
FROM runs_v3 AS r
CROSS JOIN unnest(ARRAY['start','load_data','featurize','train','evaluate','end']) WITH ORDINALITY AS s(name, ord);

INSERT INTO tasks_v3 (flow_id, run_number, run_id, step_name, task_name, user_name, ts_epoch, last_heartbeat_ts, tags, system_tags)
SELECT s.flow_id, s.run_number, s.run_id, s.step_name, 't-' || substr(md5(s.run_number || s.step_name || k), 1, 8),
       s.user_name, s.ts_epoch + k * 10, s.ts_epoch / 1000 + 600, s.tags, s.system_tags
FROM steps_v3 AS s
CROSS JOIN generate_series(1, 2) AS k
ORDER BY s.run_number, s.step_name, k;

INSERT INTO metadata_v3 (flow_id, run_number, run_id, step_name, task_id, task_name, field_name, value, type,
                         user_name, ts_epoch, tags, system_tags)
SELECT t.flow_id, t.run_number, t.run_id, t.step_name, t.task_id, t.task_name, m.field_name,
       CASE m.field_name
         WHEN 'attempt' THEN '0'
         WHEN 'origin-run-id' THEN 'None'
         WHEN 'ds-type' THEN 's3'
         WHEN 'log_location_stdout' THEN
           '{"ds_type": "s3", "location": "s3://metaflow-prod/' || t.flow_id || '/' || t.run_number || '/'
           || t.step_name || '/' || t.task_id || '/0.stdout.log", "attempt": 0}'
         WHEN 'code-package' THEN
           '{"ds_type": "s3", "sha": "' || md5('c' || t.run_number) || '", "location": "s3://metaflow-prod/'
           || t.flow_id || '/data/' || substr(md5('c' || t.run_number), 1, 2) || '/' || md5('c' || t.run_number) || '"}'
         ELSE 'argo-workflows/' || t.run_id || '/' || t.task_name
       END,
       m.field_name, t.user_name, t.ts_epoch + 5, '[]'::jsonb, jsonb_build_array('attempt_id:0')
FROM tasks_v3 AS t
CROSS JOIN unnest(ARRAY['attempt','origin-run-id','ds-type','log_location_stdout','code-package','runtime-pod'])
     AS m(field_name)
ORDER BY t.task_id;

INSERT INTO artifact_v3
SELECT t.flow_id, t.run_number, t.run_id, t.step_name, t.task_id, t.task_name, a.name,
       's3://metaflow-prod/' || t.flow_id || '/data/' || substr(md5(t.task_id || a.name), 1, 2) || '/'
       || md5(t.task_id || a.name) || substr(md5(a.name || t.task_id), 1, 8),
       's3', md5(t.task_id || a.name) || substr(md5(a.name || t.task_id), 1, 8),
       '<class ''' || a.class || '''>', 'gzip+pickle-v4', t.user_name, 0, t.ts_epoch + 9, '[]'::jsonb, t.system_tags
FROM tasks_v3 AS t
CROSS JOIN (VALUES ('_foreach_stack', 'list'), ('_task_ok', 'bool'), ('_graph_info', 'dict'), ('name', 'str'),
                   ('model', 'sklearn.ensemble.RandomForestClassifier')) AS a(name, class);
"#;

/// What the bench was asked.
#[derive(Debug, Clone)]
struct Options {
    /// The data of the main comparison, in multiples of [`RUNS_PER_SCALE`].
    scale: u32,
    /// The data of the memory check, in multiples of `scale`; 0 or 1 skips it.
    growth: u32,
    /// Repetitions of the main comparison (medians are shown).
    repeat: usize,
    /// `--parallel`, `-j` and the COPY ceiling's tables at once.
    jobs: usize,
    /// Where to copy the server's log (every statement, with its duration)
    /// at the end.
    log: Option<PathBuf>,
    /// A `ferry` binary to measure instead of this build's (another
    /// commit's, to compare two).
    ferry: Option<PathBuf>,
}

impl Options {
    fn parse() -> Self {
        let mut options = Self {
            scale: 1,
            growth: 4,
            repeat: 3,
            jobs: std::thread::available_parallelism().map_or(2, usize::from),
            log: None,
            ferry: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .unwrap_or_else(|| panic!("{flag} takes a value"));
            let number = || -> u32 {
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("{flag} takes a number, not {value}"))
            };
            match flag.as_str() {
                "--scale" => options.scale = number().max(1),
                "--growth" => options.growth = number(),
                "--repeat" => options.repeat = number().max(1) as usize,
                "--jobs" => options.jobs = number().max(1) as usize,
                "--log" => options.log = Some(PathBuf::from(value)),
                "--ferry" => options.ferry = Some(PathBuf::from(value)),
                _ => panic!(
                    "unknown argument {flag}: pg-throughput [--scale S] [--growth G] [--repeat R] [--jobs N] [--log FILE] [--ferry BINARY]"
                ),
            }
        }
        options
    }
}

/// What one client program (or a pool of them) cost.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    wall: Duration,
    /// User and system CPU of the program and the children it waited for.
    cpu: Duration,
    peak_rss_kib: u64,
}

/// Server time spent in statements, summed over connections, by kind
/// (from `log_min_duration_statement = 0`).
#[derive(Debug, Clone, Copy, Default)]
struct ServerTime {
    copy: Duration,
    index: Duration,
    key: Duration,
    foreign_key: Duration,
    other: Duration,
}

impl ServerTime {
    /// The statements logged in `log` (the server's log from some point on).
    fn from_log(log: &str) -> Self {
        let mut time = Self::default();
        // An entry is a line and the tab-indented lines that continue it.
        let mut entries: Vec<String> = Vec::new();
        for line in log.lines() {
            match (line.strip_prefix('\t'), entries.last_mut()) {
                (Some(more), Some(entry)) => {
                    entry.push(' ');
                    entry.push_str(more);
                }
                _ => entries.push(line.to_owned()),
            }
        }
        for entry in entries {
            let Some((_, after)) = entry.split_once("duration: ") else {
                continue;
            };
            let Some((milliseconds, statement)) = after.split_once(" ms  ") else {
                continue;
            };
            let Ok(milliseconds) = milliseconds.parse::<f64>() else {
                continue;
            };
            // `statement: SQL`, or `parse|bind|execute NAME: SQL`.
            let sql = statement.split_once(": ").map_or("", |(_, sql)| sql);
            let sql = sql
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .to_uppercase();
            let slot = if sql.starts_with("COPY") {
                &mut time.copy
            } else if sql.starts_with("CREATE INDEX") || sql.starts_with("CREATE UNIQUE INDEX") {
                &mut time.index
            } else if sql.starts_with("ALTER TABLE") && sql.contains("FOREIGN KEY") {
                &mut time.foreign_key
            } else if sql.starts_with("ALTER TABLE")
                && (sql.contains("PRIMARY KEY") || sql.contains("UNIQUE"))
            {
                &mut time.key
            } else {
                &mut time.other
            };
            *slot += Duration::from_secs_f64(milliseconds / 1000.0);
        }
        time
    }

    fn add(&mut self, other: &Self) {
        self.copy += other.copy;
        self.index += other.index;
        self.key += other.key;
        self.foreign_key += other.foreign_key;
        self.other += other.other;
    }

    fn divided(&self, by: u32) -> Self {
        Self {
            copy: self.copy / by,
            index: self.index / by,
            key: self.key / by,
            foreign_key: self.foreign_key / by,
            other: self.other / by,
        }
    }

    fn total(&self) -> Duration {
        self.copy + self.index + self.key + self.foreign_key + self.other
    }
}

/// One timed step of one repetition.
#[derive(Debug, Clone, Copy, Default)]
struct Step {
    cost: Cost,
    server: ServerTime,
}

/// The steps, in the order a repetition runs them.
#[derive(Debug, Clone, Copy)]
enum StepName {
    FerryExtract,
    FerryRestore,
    FerryCopyExtract,
    FerryCopyRestore,
    PgDump,
    PgRestore,
    CopyOut,
    CopyIn,
    CopyBuilds,
}

const STEP_COUNT: usize = 9;

/// What one repetition measured.
#[derive(Debug, Clone, Default)]
struct Repetition {
    steps: [Step; STEP_COUNT],
    ferry_backup_bytes: u64,
    ferry_copy_backup_bytes: u64,
    dump_bytes: u64,
    copy_file_bytes: u64,
    /// Differences between a restored database and the source.
    problems: Vec<String>,
}

impl Repetition {
    fn step(&self, name: StepName) -> &Step {
        &self.steps[name as usize]
    }
}

/// The source database, as every restore must reproduce it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    /// `TABLE rows=N content=HASHSUM`, per table.
    rows: Vec<String>,
    /// Every column (type, not null, default), index, constraint and
    /// sequence value of `public`.
    schema: BTreeSet<String>,
}

/// One PostgreSQL server and the programs the bench runs against it.
struct Bench {
    server: PgServer,
    ferry: PathBuf,
    options: Options,
    work: tempfile::TempDir,
}

impl Bench {
    fn start(options: Options) -> Self {
        assert!(
            Path::new(GNU_TIME).exists(),
            "{GNU_TIME} is missing: apt-get install -y time"
        );
        let ferry = options
            .ferry
            .clone()
            .unwrap_or_else(ferry_tests::ferry_binary);
        assert!(
            ferry
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|profile| profile == "release"),
            "{} is not a release build: run cargo run --release -p ferry-benches --bin pg-throughput",
            ferry.display()
        );
        let settings = [
            // Every statement's duration, for where the time goes.
            ("log_min_duration_statement", "0"),
            // No vacuum or analyze of a restored table running into the
            // next step's time on 2 cores.
            ("autovacuum", "off"),
        ];
        let server = PgServer::start_with(&PgOptions {
            settings: settings
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            ..PgOptions::default()
        })
        .expect("PostgreSQL 15 starts (apt-get install -y postgresql)");
        let work = tempfile::Builder::new()
            .prefix("ferry-pg-bench-")
            .tempdir()
            .expect("temp dir");
        Self {
            server,
            ferry,
            options,
            work,
        }
    }

    fn sql(&self, db: &str, sql: &str) -> String {
        self.server
            .psql(db, sql)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.server.bin_dir().join(name)
    }

    /// `-h 127.0.0.1 -p PORT -U postgres`: every client connects over TCP,
    /// as ferry does.
    fn connection_args(&self) -> Vec<String> {
        vec![
            "-h".to_owned(),
            self.server.host().to_owned(),
            "-p".to_owned(),
            self.server.port().to_string(),
            "-U".to_owned(),
            SUPERUSER.to_owned(),
        ]
    }

    fn recreate_database(&self, db: &str) {
        self.drop_database(db);
        self.server
            .create_database(db)
            .unwrap_or_else(|error| panic!("{error}"));
    }

    fn drop_database(&self, db: &str) {
        self.sql("postgres", &format!("DROP DATABASE IF EXISTS {db};"));
    }

    /// Makes `db` at `scale` and returns how long the rows took.
    fn load(&self, db: &str, scale: u32) -> Duration {
        self.recreate_database(db);
        self.sql(db, SCHEMA);
        let load = LOAD
            .replace("{runs}", &(RUNS_PER_SCALE * scale).to_string())
            .replace("{flows}", &(FLOWS_PER_SCALE * scale).to_string());
        let started = Instant::now();
        self.sql(db, &load);
        let loaded = started.elapsed();
        // Hint bits and statistics set now, not by whichever tool reads
        // the rows first.
        self.sql(db, "VACUUM (FREEZE, ANALYZE);");
        loaded
    }

    /// `db`'s size on disk: the database, its tables (with TOAST) and
    /// their indexes, in bytes.
    fn sizes(&self, db: &str) -> (u64, u64, u64) {
        let line = self.sql(
            db,
            "SELECT pg_database_size(current_database()), sum(pg_table_size(oid)), sum(pg_indexes_size(oid)) \
             FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r';",
        );
        let numbers: Vec<u64> = line
            .split('|')
            .map(|number| number.parse().expect("sizes are numbers"))
            .collect();
        (numbers[0], numbers[1], numbers[2])
    }

    /// What a restore of `db` must reproduce: every table's rows (count and
    /// an order-free hash of their text), and with `schema` its columns,
    /// indexes, constraints and sequence values.
    fn fingerprint(&self, db: &str, schema: bool) -> Fingerprint {
        let rows = TABLES
            .iter()
            .map(|table| {
                self.sql(
                    db,
                    &format!(
                        "SELECT '{table} rows=' || count(*) || ' content=' \
                         || coalesce(sum(hashtextextended(t::text, 0)), 0) FROM public.{table} AS t;"
                    ),
                )
            })
            .collect();
        let schema = if schema {
            self.sql(
                db,
                "SELECT 'column ' || c.relname || '.' || a.attname || ' #' || a.attnum || ' ' \
                        || format_type(a.atttypid, a.atttypmod) \
                        || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END \
                        || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '') \
                   FROM pg_attribute AS a JOIN pg_class AS c ON c.oid = a.attrelid \
                   LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                  WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' \
                    AND a.attnum > 0 AND NOT a.attisdropped \
                 UNION ALL \
                 SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public' \
                 UNION ALL \
                 SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid) \
                   FROM pg_constraint WHERE connamespace = 'public'::regnamespace \
                 UNION ALL \
                 SELECT 'sequence ' || sequencename || ' last_value=' || coalesce(last_value::text, 'none') \
                   FROM pg_sequences WHERE schemaname = 'public';",
            )
            .lines()
            .map(str::to_owned)
            .collect()
        } else {
            BTreeSet::new()
        };
        Fingerprint { rows, schema }
    }

    /// How `db` differs from `source`, one line a difference, each naming
    /// `who` restored it.
    fn differences(&self, who: &str, db: &str, source: &Fingerprint) -> Vec<String> {
        let schema = !source.schema.is_empty();
        let restored = self.fingerprint(db, schema);
        let mut problems = Vec::new();
        for (want, got) in source.rows.iter().zip(&restored.rows) {
            if want != got {
                problems.push(format!("{who}: source {want}, restored {got}"));
            }
        }
        for missing in source.schema.difference(&restored.schema) {
            problems.push(format!("{who}: missing {missing}"));
        }
        for extra in restored.schema.difference(&source.schema) {
            problems.push(format!("{who}: not in the source: {extra}"));
        }
        problems
    }

    /// Runs `program` under GNU time; stops the bench with its stderr when
    /// it fails.
    fn timed(&self, program: &Path, args: &[String]) -> Cost {
        self.timed_to(&self.work.path().join("time.txt"), program, args)
    }

    /// Runs the `commands` (program and args), `jobs` at a time in the
    /// order given; CPU is summed, peak RSS is the largest.
    fn timed_pool(&self, commands: Vec<(PathBuf, Vec<String>)>) -> Cost {
        let queue = Mutex::new(commands.into_iter());
        let costs = Mutex::new(Vec::new());
        let started = Instant::now();
        std::thread::scope(|scope| {
            for worker in 0..self.options.jobs {
                let (queue, costs) = (&queue, &costs);
                scope.spawn(move || {
                    let report = self.work.path().join(format!("time-{worker}.txt"));
                    loop {
                        let next = queue.lock().expect("queue").next();
                        let Some((program, args)) = next else { break };
                        let cost = self.timed_to(&report, &program, &args);
                        costs.lock().expect("costs").push(cost);
                    }
                });
            }
        });
        let wall = started.elapsed();
        let costs = costs.into_inner().expect("costs");
        Cost {
            wall,
            cpu: costs.iter().map(|cost| cost.cpu).sum(),
            peak_rss_kib: costs
                .iter()
                .map(|cost| cost.peak_rss_kib)
                .max()
                .unwrap_or_default(),
        }
    }

    /// [`Bench::timed`], with GNU time's report in `report` (pool workers
    /// each have their own).
    fn timed_to(&self, report: &Path, program: &Path, args: &[String]) -> Cost {
        let started = Instant::now();
        let output = Command::new(GNU_TIME)
            .args(["-f", "%U %S %M", "-o"])
            .arg(report)
            .arg(program)
            .args(args)
            // Nothing of the caller's environment (PGPASSWORD, PGOPTIONS,
            // RUST_LOG...) changes what is measured.
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}", program.display()));
        let wall = started.elapsed();
        assert!(
            output.status.success(),
            "{} {args:?} failed ({}): {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
        // `USER_SECONDS SYSTEM_SECONDS PEAK_RSS_KIB` on its last line.
        let report = std::fs::read_to_string(report).expect("GNU time wrote its report");
        let fields: Vec<f64> = report
            .lines()
            .last()
            .unwrap_or_default()
            .split_whitespace()
            .map(|field| field.parse().unwrap_or_default())
            .collect();
        let field = |index: usize| fields.get(index).copied().unwrap_or_default();
        Cost {
            wall,
            cpu: Duration::from_secs_f64(field(0) + field(1)),
            peak_rss_kib: field(2) as u64,
        }
    }

    /// Runs `work` and returns its cost with the server time of the
    /// statements it made.
    fn step(&self, work: impl FnOnce() -> Cost) -> Step {
        let mark = self.server.log().len();
        let cost = work();
        let log = self.server.log();
        Step {
            cost,
            server: ServerTime::from_log(log.get(mark..).unwrap_or_default()),
        }
    }

    /// ferry extract (rows as `row_format`) to a file:// store, then
    /// restore into an empty database, checked: the backup's bytes.
    fn ferry_round(
        &self,
        source_db: &str,
        source: &Fingerprint,
        row_format: &str,
        extract: StepName,
        restore: StepName,
        repetition: &mut Repetition,
    ) -> u64 {
        let jobs = self.options.jobs.to_string();
        let store = self.work.path().join("ferry-store");
        let store_url = format!("file://{}", store.display());
        let target = "ferry_target";
        self.recreate_database(target);
        repetition.steps[extract as usize] = self.step(|| {
            self.timed(
                &self.ferry,
                &strings(&[
                    "extract",
                    "--source",
                    &self.server.url(source_db),
                    "--to",
                    &store_url,
                    "--parallel",
                    &jobs,
                    "--row-format",
                    row_format,
                    "--quiet",
                ]),
            )
        });
        let slots = self.sql(
            "postgres",
            "SELECT string_agg(slot_name, ', ') FROM pg_replication_slots;",
        );
        if !slots.is_empty() {
            repetition.problems.push(format!(
                "ferry extract: replication slots left on the source: {slots}"
            ));
        }
        let bytes = folder_bytes(&store);
        repetition.steps[restore as usize] = self.step(|| {
            self.timed(
                &self.ferry,
                &strings(&[
                    "restore",
                    "--from",
                    &store_url,
                    "--target",
                    &self.server.url(target),
                    "--quiet",
                ]),
            )
        });
        repetition.problems.extend(self.differences(
            &format!("ferry (--row-format {row_format})"),
            target,
            source,
        ));
        self.drop_database(target);
        std::fs::remove_dir_all(&store).expect("the store goes");
        bytes
    }

    /// One repetition of the four ways on `source_db`, each restoring into
    /// a fresh database that is checked and dropped.
    /// `schema`: the source's schema as a `pg_dump -Fc --schema-only`
    /// archive, for the ceiling's index and key builds.
    fn repetition(
        &self,
        source_db: &str,
        source: &Fingerprint,
        pre_data: &str,
        schema: &Path,
    ) -> Repetition {
        let jobs = self.options.jobs.to_string();
        let mut repetition = Repetition::default();

        // ferry, rows as JSON (the default) then as COPY text.
        for (format, extract, restore) in [
            ("json", StepName::FerryExtract, StepName::FerryRestore),
            (
                "copy",
                StepName::FerryCopyExtract,
                StepName::FerryCopyRestore,
            ),
        ] {
            let bytes =
                self.ferry_round(source_db, source, format, extract, restore, &mut repetition);
            match format {
                "json" => repetition.ferry_backup_bytes = bytes,
                _ => repetition.ferry_copy_backup_bytes = bytes,
            }
        }

        // pg_dump -Fd -j N, pg_restore -j N into an empty database.
        let dump = self.work.path().join("dump");
        let target = "pg_restore_target";
        self.recreate_database(target);
        repetition.steps[StepName::PgDump as usize] = self.step(|| {
            let mut args = self.connection_args();
            args.extend(strings(&["-Fd", "-j", &jobs, "-f"]));
            args.push(dump.display().to_string());
            args.push(source_db.to_owned());
            self.timed(&self.tool("pg_dump"), &args)
        });
        repetition.dump_bytes = folder_bytes(&dump);
        repetition.steps[StepName::PgRestore as usize] = self.step(|| {
            let mut args = self.connection_args();
            args.extend(strings(&["-d", target, "-j", &jobs, "--exit-on-error"]));
            args.push(dump.display().to_string());
            self.timed(&self.tool("pg_restore"), &args)
        });
        repetition
            .problems
            .extend(self.differences("pg_restore", target, source));
        self.drop_database(target);
        std::fs::remove_dir_all(&dump).expect("the dump goes");

        // The COPY ceiling: \copy out to files, \copy in to bare tables.
        let files = self.work.path().join("copy");
        std::fs::create_dir_all(&files).expect("copy folder");
        let target = "copy_target";
        self.recreate_database(target);
        self.sql(target, pre_data);
        let copy = |db: &str, direction: &str| -> Vec<(PathBuf, Vec<String>)> {
            TABLES
                .iter()
                .map(|table| {
                    let mut args = strings(&["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
                    args.extend(self.connection_args());
                    args.extend(strings(&["-d", db, "-c"]));
                    args.push(format!(
                        "\\copy public.{table} {direction} '{}'",
                        files.join(format!("{table}.copy")).display()
                    ));
                    (self.tool("psql"), args)
                })
                .collect()
        };
        repetition.steps[StepName::CopyOut as usize] =
            self.step(|| self.timed_pool(copy(source_db, "TO")));
        repetition.copy_file_bytes = folder_bytes(&files);
        repetition.steps[StepName::CopyIn as usize] =
            self.step(|| self.timed_pool(copy(target, "FROM")));
        // Then the same indexes and keys, built as PostgreSQL's own
        // parallel restore builds them: what every restore must do after
        // the rows, at the rate of the server's tool.
        repetition.steps[StepName::CopyBuilds as usize] = self.step(|| {
            let mut args = self.connection_args();
            args.extend(strings(&[
                "-d",
                target,
                "-j",
                &jobs,
                "--section=post-data",
                "--exit-on-error",
            ]));
            args.push(schema.display().to_string());
            self.timed(&self.tool("pg_restore"), &args)
        });
        let rows_only = Fingerprint {
            rows: source.rows.clone(),
            schema: BTreeSet::new(),
        };
        repetition
            .problems
            .extend(self.differences("COPY ceiling", target, &rows_only));
        self.drop_database(target);
        std::fs::remove_dir_all(&files).expect("the copy files go");
        repetition
    }

    /// Loads `scale` into a fresh source database and runs `repeat`
    /// repetitions on it.
    fn measure(&self, scale: u32, repeat: usize) -> Measurement {
        let source_db = "metaflow";
        let load = self.load(source_db, scale);
        let (database_bytes, table_bytes, index_bytes) = self.sizes(source_db);
        let source = self.fingerprint(source_db, true);
        let rows = source
            .rows
            .iter()
            .filter_map(|line| {
                line.split_once("rows=")?
                    .1
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        let pre_data_file = self.work.path().join("pre-data.sql");
        let mut args = self.connection_args();
        args.extend(strings(&["--schema-only", "--section=pre-data", "-f"]));
        args.push(pre_data_file.display().to_string());
        args.push(source_db.to_owned());
        self.timed(&self.tool("pg_dump"), &args);
        let pre_data = std::fs::read_to_string(&pre_data_file).expect("pre-data schema");
        let schema = self.work.path().join("schema.dump");
        let mut args = self.connection_args();
        args.extend(strings(&["--schema-only", "-Fc", "-f"]));
        args.push(schema.display().to_string());
        args.push(source_db.to_owned());
        self.timed(&self.tool("pg_dump"), &args);
        let repetitions = (0..repeat)
            .map(|index| {
                let repetition = self.repetition(source_db, &source, &pre_data, &schema);
                eprintln!(
                    "scale {scale}, repetition {}/{repeat}: ferry {:.2} s (COPY text {:.2} s), pg_dump+pg_restore {:.2} s, COPY {:.2} s",
                    index + 1,
                    (repetition.step(StepName::FerryExtract).cost.wall
                        + repetition.step(StepName::FerryRestore).cost.wall)
                        .as_secs_f64(),
                    (repetition.step(StepName::FerryCopyExtract).cost.wall
                        + repetition.step(StepName::FerryCopyRestore).cost.wall)
                        .as_secs_f64(),
                    (repetition.step(StepName::PgDump).cost.wall
                        + repetition.step(StepName::PgRestore).cost.wall)
                        .as_secs_f64(),
                    (repetition.step(StepName::CopyOut).cost.wall
                        + repetition.step(StepName::CopyIn).cost.wall)
                        .as_secs_f64(),
                );
                repetition
            })
            .collect();
        self.drop_database(source_db);
        Measurement {
            scale,
            load,
            rows,
            database_bytes,
            table_bytes,
            index_bytes,
            repetitions,
        }
    }
}

/// Everything measured at one size.
struct Measurement {
    scale: u32,
    load: Duration,
    rows: u64,
    database_bytes: u64,
    table_bytes: u64,
    index_bytes: u64,
    repetitions: Vec<Repetition>,
}

impl Measurement {
    fn walls(&self, steps: &[StepName]) -> Vec<Duration> {
        self.repetitions
            .iter()
            .map(|repetition| {
                steps
                    .iter()
                    .map(|&name| repetition.step(name).cost.wall)
                    .sum()
            })
            .collect()
    }

    /// The median wall time of `steps` run one after the other (each
    /// repetition's sum, then the median).
    fn median(&self, steps: &[StepName]) -> Duration {
        median(self.walls(steps))
    }

    fn median_cpu(&self, name: StepName) -> Duration {
        median(
            self.repetitions
                .iter()
                .map(|repetition| repetition.step(name).cost.cpu)
                .collect(),
        )
    }

    fn peak_rss_kib(&self, name: StepName) -> u64 {
        self.repetitions
            .iter()
            .map(|repetition| repetition.step(name).cost.peak_rss_kib)
            .max()
            .unwrap_or_default()
    }

    fn mean_server(&self, name: StepName) -> ServerTime {
        let mut total = ServerTime::default();
        for repetition in &self.repetitions {
            total.add(&repetition.step(name).server);
        }
        total.divided(self.repetitions.len() as u32)
    }

    fn problems(&self) -> Vec<&str> {
        let mut problems: Vec<&str> = self
            .repetitions
            .iter()
            .flat_map(|repetition| repetition.problems.iter().map(String::as_str))
            .collect();
        problems.dedup();
        problems
    }

    fn print(&self, jobs: usize) {
        let runs = RUNS_PER_SCALE * self.scale;
        println!();
        println!(
            "== scale {} ({runs} runs): {} rows in 6 tables, {} on disk (tables {}, indexes {}); loaded in {:.1} s; {} repetition(s), medians shown",
            self.scale,
            self.rows,
            mib(self.database_bytes),
            mib(self.table_bytes),
            mib(self.index_bytes),
            self.load.as_secs_f64(),
            self.repetitions.len(),
        );
        println!(
            "{:<44} {:>9} {:>9}  {:<22} {:>9} {:>10}",
            "step", "wall", "rows/s", "each repetition", "client CPU", "peak RSS"
        );
        let rows = [
            (
                format!("ferry extract --parallel {jobs}"),
                StepName::FerryExtract,
            ),
            ("ferry restore".to_owned(), StepName::FerryRestore),
            (
                format!("ferry extract --parallel {jobs} --row-format copy"),
                StepName::FerryCopyExtract,
            ),
            (
                "ferry restore (of COPY text)".to_owned(),
                StepName::FerryCopyRestore,
            ),
            (format!("pg_dump -Fd -j {jobs}"), StepName::PgDump),
            (format!("pg_restore -j {jobs}"), StepName::PgRestore),
            (
                format!("COPY ceiling: \\copy TO files, {jobs} at once"),
                StepName::CopyOut,
            ),
            (
                format!("COPY ceiling: \\copy FROM files, {jobs} at once"),
                StepName::CopyIn,
            ),
            (
                format!("then pg_restore --section=post-data -j {jobs}"),
                StepName::CopyBuilds,
            ),
        ];
        for (label, name) in &rows {
            let wall = self.median(&[*name]);
            println!(
                "{label:<44} {:>7.2} s {:>9.0}  {:<22} {:>8.2} s {:>6.1} MiB",
                wall.as_secs_f64(),
                self.rows as f64 / wall.as_secs_f64(),
                seconds_list(&self.walls(&[*name])),
                self.median_cpu(*name).as_secs_f64(),
                self.peak_rss_kib(*name) as f64 / 1024.0,
            );
        }
        for (label, steps) in [
            ("ferry extract + restore", FERRY),
            ("ferry extract + restore, COPY text", FERRY_COPY),
            ("pg_dump + pg_restore", PG_DUMP_RESTORE),
            ("COPY ceiling: out + in", COPY_CEILING),
            ("COPY ceiling with the builds", COPY_CEILING_BUILDS),
        ] {
            let wall = self.median(steps);
            println!(
                "{label:<44} {:>7.2} s {:>9.0}  {}",
                wall.as_secs_f64(),
                self.rows as f64 / wall.as_secs_f64(),
                seconds_list(&self.walls(steps)),
            );
        }
        let last = self.repetitions.last().expect("a repetition");
        println!(
            "written: ferry's backup {} (COPY text {}), pg_dump's directory {}, the COPY files {}",
            mib(last.ferry_backup_bytes),
            mib(last.ferry_copy_backup_bytes),
            mib(last.dump_bytes),
            mib(last.copy_file_bytes)
        );
        println!(
            "server time in statements, summed over connections (mean of the repetitions; a COPY's time includes waiting for its client):"
        );
        for (label, name) in &rows {
            let time = self.mean_server(*name);
            println!(
                "  {label:<42} COPY {:>6.2} s, CREATE INDEX {:>5.2} s, primary/unique keys {:>5.2} s, foreign keys {:>5.2} s, other {:>5.2} s (total {:.2} s)",
                time.copy.as_secs_f64(),
                time.index.as_secs_f64(),
                time.key.as_secs_f64(),
                time.foreign_key.as_secs_f64(),
                time.other.as_secs_f64(),
                time.total().as_secs_f64(),
            );
        }
        for (label, ferry) in [("rows as JSON", FERRY), ("rows as COPY text", FERRY_COPY)] {
            let (extract, restore) = (&ferry[..1], &ferry[1..]);
            println!(
                "{label}: ratio pg_dump+pg_restore / ferry extract+restore = {:.2} (target >= 1.0: ferry at least as fast); pg_dump / ferry extract = {:.2}, pg_restore / ferry restore = {:.2}",
                self.ratio(PG_DUMP_RESTORE, ferry),
                self.ratio(&[StepName::PgDump], extract),
                self.ratio(&[StepName::PgRestore], restore),
            );
            println!(
                "{label}: ferry extract+restore reaches {:.2} of the COPY ceiling (ceiling time / ferry time; out {:.2}, in {:.2}; target >= 0.6)",
                self.ratio(COPY_CEILING, ferry),
                self.ratio(&[StepName::CopyOut], extract),
                self.ratio(&[StepName::CopyIn], restore),
            );
            println!(
                "{label}: ferry extract+restore reaches {:.2} of the COPY ceiling with the index and key builds (out + in + post-data; in + post-data / ferry restore = {:.2})",
                self.ratio(COPY_CEILING_BUILDS, ferry),
                self.ratio(&COPY_CEILING_BUILDS[1..], restore),
            );
        }
        for problem in self.problems() {
            println!("RESTORE CHECK FAILED: {problem}");
        }
    }

    /// `numerator`'s median time over `denominator`'s.
    fn ratio(&self, numerator: &[StepName], denominator: &[StepName]) -> f64 {
        self.median(numerator).as_secs_f64() / self.median(denominator).as_secs_f64()
    }
}

const FERRY: &[StepName] = &[StepName::FerryExtract, StepName::FerryRestore];
const FERRY_COPY: &[StepName] = &[StepName::FerryCopyExtract, StepName::FerryCopyRestore];
const PG_DUMP_RESTORE: &[StepName] = &[StepName::PgDump, StepName::PgRestore];
const COPY_CEILING: &[StepName] = &[StepName::CopyOut, StepName::CopyIn];
/// The ceiling and the index and key builds every restore does after the
/// rows: what a restore could take at least, one tool's scheduling aside.
const COPY_CEILING_BUILDS: &[StepName] =
    &[StepName::CopyOut, StepName::CopyIn, StepName::CopyBuilds];

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2
    } else {
        values[middle]
    }
}

fn seconds_list(values: &[Duration]) -> String {
    values
        .iter()
        .map(|value| format!("{:.2}", value.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|value| (*value).to_owned()).collect()
}

/// The bytes of the files under `path`.
fn folder_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return std::fs::metadata(path).map_or(0, |metadata| metadata.len());
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => folder_bytes(&entry.path()),
            _ => entry.metadata().map_or(0, |metadata| metadata.len()),
        })
        .sum()
}

fn main() {
    let options = Options::parse();
    let bench = Bench::start(options.clone());
    let version = bench.sql("postgres", "SHOW server_version;");
    println!(
        "pg-throughput: PostgreSQL {version} on 127.0.0.1:{} (fsync off, full_page_writes off, autovacuum off, log_min_duration_statement 0), {} jobs, ferry {}",
        bench.server.port(),
        options.jobs,
        bench.ferry.display()
    );
    println!(
        "COPY ceiling = psql \\copy public.T TO a local file (text format, uncompressed) for each table, then \\copy public.T FROM it into the tables created empty (pg_dump --section=pre-data: no primary key, index, unique or foreign key), {} tables at once; not included: schema, index and constraint builds, sequence values, compression, the snapshot",
        options.jobs
    );
    println!(
        "COPY ceiling with the builds = the same, then the source's indexes and keys built on the loaded tables by pg_restore --section=post-data -j {} (from a pg_dump -Fc --schema-only archive): the work every restore does after the rows, scheduled by PostgreSQL's own tool",
        options.jobs
    );
    let main = bench.measure(options.scale, options.repeat);
    main.print(options.jobs);
    let grown = (options.growth > 1).then(|| {
        let grown = bench.measure(options.scale * options.growth, 1);
        grown.print(options.jobs);
        grown
    });

    println!();
    let mut summary = format!(
        "summary: scale {}: ferry extract+restore {:.2} s with rows as COPY text, {:.2} s as JSON, vs pg_dump+pg_restore {:.2} s (ratio {:.2} and {:.2}, target >= 1.0); {:.2} and {:.2} of the COPY ceiling ({:.2} s, target >= 0.6); {:.2} and {:.2} of it with the builds ({:.2} s)",
        main.scale,
        main.median(FERRY_COPY).as_secs_f64(),
        main.median(FERRY).as_secs_f64(),
        main.median(PG_DUMP_RESTORE).as_secs_f64(),
        main.ratio(PG_DUMP_RESTORE, FERRY_COPY),
        main.ratio(PG_DUMP_RESTORE, FERRY),
        main.ratio(COPY_CEILING, FERRY_COPY),
        main.ratio(COPY_CEILING, FERRY),
        main.median(COPY_CEILING).as_secs_f64(),
        main.ratio(COPY_CEILING_BUILDS, FERRY_COPY),
        main.ratio(COPY_CEILING_BUILDS, FERRY),
        main.median(COPY_CEILING_BUILDS).as_secs_f64(),
    );
    if let Some(grown) = &grown {
        let mut flat = true;
        for (label, name) in [
            ("extract", StepName::FerryExtract),
            ("restore", StepName::FerryRestore),
            ("extract --row-format copy", StepName::FerryCopyExtract),
            ("restore of COPY text", StepName::FerryCopyRestore),
        ] {
            let (small, large) = (main.peak_rss_kib(name), grown.peak_rss_kib(name));
            let growth = large as f64 / small.max(1) as f64;
            flat &= growth <= FLAT_GROWTH;
            println!(
                "peak RSS of ferry {label}: {:.1} MiB at scale {}, {:.1} MiB at scale {} (x{growth:.2})",
                small as f64 / 1024.0,
                main.scale,
                large as f64 / 1024.0,
                grown.scale,
            );
            summary.push_str(&format!(
                "; {label} peak RSS {:.0} -> {:.0} MiB",
                small as f64 / 1024.0,
                large as f64 / 1024.0
            ));
        }
        summary.push_str(if flat {
            " (flat)"
        } else {
            " (NOT flat: grows with the data)"
        });
    }
    let problems = main.problems().len() + grown.as_ref().map_or(0, |grown| grown.problems().len());
    if problems > 0 {
        summary.push_str(&format!(
            "; {problems} RESTORE CHECK FAILURE(S), see above: these times measure a broken restore"
        ));
    }
    println!("{summary}");
    if let Some(log) = &options.log {
        std::fs::write(log, bench.server.log())
            .unwrap_or_else(|error| panic!("cannot write {}: {error}", log.display()));
    }
    if problems > 0 {
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_times_are_summed_by_kind_across_continued_lines_and_protocols() {
        let log = "\
2026-12-02 15:57:55.541 UTC [5768] LOG:  duration: 26.000 ms  execute s7: COPY \"public\".\"artifact_v3\" (\"flow_id\") FROM STDIN
2026-12-02 15:57:55.600 UTC [5768] LOG:  duration: 0.500 ms  parse s8: SELECT 1
2026-12-02 15:57:59.735 UTC [5768] LOG:  duration: 1000.000 ms  statement: CREATE INDEX runs_v3_idx ON public.runs_v3 USING btree (ts_epoch)
2026-12-02 15:58:00.413 UTC [5769] LOG:  duration: 677.000 ms  statement: ALTER TABLE ONLY public.artifact_v3
\tADD CONSTRAINT artifact_v3_pkey PRIMARY KEY (flow_id, name);
2026-12-02 15:58:00.500 UTC [5769] LOG:  duration: 93.000 ms  statement: ALTER TABLE ONLY public.tasks_v3
\tADD CONSTRAINT tasks_v3_fkey FOREIGN KEY (flow_id) REFERENCES public.steps_v3(flow_id);
2026-12-02 15:58:00.600 UTC [5769] LOG:  duration: 12.000 ms  statement: CREATE UNIQUE INDEX u ON public.t (a)
2026-12-02 15:58:01.063 UTC [5768] DETAIL:  parameters: $1 = 'x'
2026-12-02 15:58:01.070 UTC [5768] LOG:  checkpoint starting: time
";
        let time = ServerTime::from_log(log);
        assert_eq!(time.copy, Duration::from_millis(26));
        assert_eq!(time.index, Duration::from_millis(1012));
        assert_eq!(time.key, Duration::from_millis(677));
        assert_eq!(time.foreign_key, Duration::from_millis(93));
        assert_eq!(time.other, Duration::from_micros(500));
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let seconds = |values: &[u64]| values.iter().map(|&s| Duration::from_secs(s)).collect();
        assert_eq!(median(seconds(&[3, 1, 2])), Duration::from_secs(2));
        assert_eq!(median(seconds(&[4, 1, 3, 2])), Duration::from_millis(2500));
    }
}

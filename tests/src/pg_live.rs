//! A live PostgreSQL 15 -> 17 upgrade's servers and ferry's processes, for
//! the tests and the benches: PostgreSQL 15 with pgbench's tables (its
//! history given a primary key) and a table of acknowledged writes,
//! PostgreSQL 17 empty, a source and a target agent, and a gateway in
//! front of 15.

use crate::pg::{PgOptions, PgServer, client_at};
use crate::process::FerryProcess;

/// The database migrated.
pub const DB: &str = "app";

/// The servers and ferry's processes of one migration.
pub struct Upgrade {
    /// PostgreSQL 15, migrated from.
    pub old: PgServer,
    /// PostgreSQL 17, migrated to.
    pub new: PgServer,
    /// `ferry agent source` beside 15.
    pub source_agent: FerryProcess,
    /// `ferry agent target` beside 17.
    pub target_agent: FerryProcess,
    /// `ferry gateway` in front of 15.
    pub gateway: FerryProcess,
}

impl Upgrade {
    /// Starts both servers (15 with pgbench's tables at `scale`), both
    /// agents and the gateway.
    pub fn start(scale: u32) -> Self {
        let old = PgServer::start().expect("PostgreSQL 15");
        let new = PgServer::start_with(&PgOptions::pg17()).expect("PostgreSQL 17");
        for server in [&old, &new] {
            server.create_database(DB).expect("database");
        }
        assert!(
            new.psql(DB, "SHOW server_version_num;")
                .expect("psql")
                .starts_with("17"),
            "the new server is PostgreSQL 17"
        );
        // pgbench's tables, made on 15 only; its history gets the primary
        // key a live migration needs (ferry refuses a table without one,
        // naming this fix), and with it a sequence.
        let init = client_at("pgbench", &format!("127.0.0.1:{}", old.port()), DB)
            .args(["-i", "-q", "-s", &scale.to_string()])
            .output()
            .expect("pgbench -i");
        assert!(init.status.success(), "{init:?}");
        old.psql(
            DB,
            "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY; \
             CREATE TABLE acks (id bigserial PRIMARY KEY, writer int NOT NULL, n int NOT NULL);",
        )
        .expect("the schema");
        let source_agent = FerryProcess::start(
            &[
                "agent",
                "source",
                "--control-plane",
                &old.url(DB),
                "--listen",
                "127.0.0.1:0",
            ],
            &[],
        )
        .expect("source agent");
        let target_agent = FerryProcess::start(
            &[
                "agent",
                "target",
                "--control-plane",
                &new.url(DB),
                "--listen",
                "127.0.0.1:0",
            ],
            &[],
        )
        .expect("target agent");
        let gateway = FerryProcess::start(
            &[
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                &old.url(DB),
            ],
            &[],
        )
        .expect("gateway");
        Self {
            old,
            new,
            source_agent,
            target_agent,
            gateway,
        }
    }

    /// `ferry migrate --live` arguments for these processes, reporting in
    /// JSON, the status written to `status_file`.
    pub fn migrate_args(&self, status_file: &std::path::Path) -> Vec<String> {
        [
            "--output",
            "json",
            "migrate",
            "--live",
            "--source-agent",
            &self.source_agent.field("listen"),
            "--target-agent",
            &self.target_agent.field("listen"),
            "--gateway",
            &self.gateway.field("admin"),
            "--max-pause",
            "5s",
            "--max-lag",
            "200",
            "--reconnect-timeout",
            "30s",
            "--status-file",
            &status_file.display().to_string(),
        ]
        .iter()
        .map(|argument| argument.to_string())
        .collect()
    }

    /// What every process logged, for a failed test's message.
    pub fn logs(&self) -> String {
        format!(
            "source agent: {}\ntarget agent: {}\ngateway: {}\nold: {}\nnew: {}",
            self.source_agent.stderr(),
            self.target_agent.stderr(),
            self.gateway.stderr(),
            self.old.log(),
            self.new.log()
        )
    }
}

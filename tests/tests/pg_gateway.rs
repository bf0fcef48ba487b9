//! `ferry gateway --upstream postgres://...` in front of a real PostgreSQL
//! 15, used by clients nobody here wrote: `psql` (simple protocol, COPY),
//! `pgbench` (its TPC-B load, a new connection per transaction with `-C`,
//! and the extended protocol with `-M extended`), and tokio-postgres
//! (extended protocol, a cancel request through the gateway). SCRAM and
//! MD5 authentication pass through to the server, which checks the
//! client's own password; a wrong one is refused by the server, and a
//! replication connection by the gateway.

use std::time::Duration;

use ferry_tests::pg::{PasswordAuth, PgOptions, PgServer, client_at, psql_at};
use ferry_tests::process::FerryProcess;

const DB: &str = "app";

fn gateway_in_front_of(server: &PgServer, environment: &[(&str, &str)]) -> FerryProcess {
    FerryProcess::start(
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &server.url(DB),
        ],
        environment,
    )
    .expect("the gateway starts in front of PostgreSQL")
}

fn pgbench(address: &str, args: &[&str], password: Option<&str>) -> std::process::Output {
    let mut command = client_at("pgbench", address, DB);
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    command.args(args).output().expect("pgbench runs")
}

fn ok(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}: {stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn psql_and_pgbench_work_through_the_gateway() {
    let server = PgServer::start().expect("PostgreSQL 15");
    server.create_database(DB).expect("database");
    let gateway = gateway_in_front_of(&server, &[]);
    let address = gateway.field("listen");

    psql_at(
        &address,
        DB,
        "CREATE TABLE notes (id int PRIMARY KEY, body text); \
         INSERT INTO notes SELECT n, repeat('x', n) FROM generate_series(1, 500) n;",
    )
    .expect("DDL and writes through the gateway");
    // COPY both ways through the gateway.
    let copied = client_at("psql", &address, DB)
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "\\copy notes TO '/dev/stdout'",
        ])
        .output()
        .expect("psql runs");
    assert_eq!(ok(&copied).lines().count(), 500);
    let mut copy_in = client_at("psql", &address, DB)
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "\\copy notes FROM STDIN",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql runs");
    {
        use std::io::Write;
        let mut stdin = copy_in.stdin.take().expect("stdin");
        for id in 501..=1500 {
            writeln!(stdin, "{id}\tcopied").expect("writes");
        }
    }
    ok(&copy_in.wait_with_output().expect("psql ends"));
    assert_eq!(
        server
            .psql(DB, "SELECT count(*), sum(id) FROM notes;")
            .expect("psql"),
        "1500|1125750",
        "the server holds what went through the gateway"
    );

    ok(&pgbench(&address, &["-i", "-q", "-s", "1"], None));
    // A new connection per transaction, simple and extended protocol.
    for mode in ["simple", "extended"] {
        let run = ok(&pgbench(
            &address,
            &["-C", "-c", "4", "-j", "2", "-t", "50", "-M", mode],
            None,
        ));
        assert!(
            run.contains("number of transactions actually processed: 200/200"),
            "{run}"
        );
        assert!(run.contains("number of failed transactions: 0"), "{run}");
    }
    // pgbench empties its history before each run: the second run's.
    assert_eq!(
        server
            .psql(DB, "SELECT count(*) FROM pgbench_history;")
            .expect("psql"),
        "200"
    );

    // A replication connection is refused by the gateway itself.
    let replication = client_at("psql", &address, DB)
        .args([
            "-X",
            "-d",
            "dbname=app replication=database",
            "-c",
            "IDENTIFY_SYSTEM",
        ])
        .output()
        .expect("psql runs");
    assert!(!replication.status.success());
    assert!(
        String::from_utf8_lossy(&replication.stderr).contains("does not relay replication"),
        "{}",
        String::from_utf8_lossy(&replication.stderr)
    );
}

#[tokio::test]
async fn a_cancel_request_reaches_the_query_it_names() {
    let server = PgServer::start().expect("PostgreSQL 15");
    server.create_database(DB).expect("database");
    let gateway = gateway_in_front_of(&server, &[]);
    let address = gateway.field("listen");
    let (host, port) = address.rsplit_once(':').expect("HOST:PORT");
    let (client, connection) = tokio_postgres::Config::new()
        .host(host)
        .port(port.parse().expect("a port"))
        .user("postgres")
        .dbname(DB)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connects through the gateway");
    tokio::spawn(connection);
    let cancel = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("the cancel request is sent");
    let cancelled = tokio::time::timeout(Duration::from_secs(20), sleeping)
        .await
        .expect("the query ends well before its 60 s")
        .expect("joins")
        .expect_err("cancelled");
    assert_eq!(
        cancelled.code().map(|code| code.code()),
        Some("57014"),
        "{cancelled}"
    );
}

#[test]
fn the_server_checks_the_clients_own_password() {
    for auth in [PasswordAuth::ScramSha256, PasswordAuth::Md5] {
        let server = PgServer::start_with(&PgOptions {
            password: Some("s3cret".to_owned()),
            password_auth: auth,
            ..PgOptions::default()
        })
        .expect("PostgreSQL 15 with a password");
        server.create_database(DB).expect("database");
        // The gateway's own role (the URL's) logs in with PGPASSWORD.
        let gateway = gateway_in_front_of(&server, &[("PGPASSWORD", "s3cret")]);
        let address = gateway.field("listen");
        let right = pgbench(&address, &["-i", "-q"], Some("s3cret"));
        ok(&right);
        let wrong = pgbench(&address, &["-i", "-q"], Some("wrong"));
        assert!(!wrong.status.success(), "{auth:?}: a wrong password passed");
        assert!(
            String::from_utf8_lossy(&wrong.stderr).contains("password authentication failed"),
            "{auth:?}: {}",
            String::from_utf8_lossy(&wrong.stderr)
        );
    }
}

//! The replication connection (`engine/src/adapters/postgres/replication.rs`)
//! against real PostgreSQL 15 servers the tests start: what it says of the
//! server agrees with what `psql` reads; a slot's exported snapshot shows
//! another connection (tokio-postgres) the rows as of the slot and none
//! committed after it; temporary slots end with their connection; slots
//! drop; passwords (SCRAM, MD5, cleartext) and TLS work, and a wrong
//! password, a role without REPLICATION, or TLS the server cannot give are
//! refused with errors that say what to fix (`verify-ca` checks the chain,
//! `verify-full` the name too); `START_REPLICATION` streams an insert made
//! after the slot, and a standby status update moves the slot's confirmed
//! position. And the harness: a server that cannot start says why.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_engine::ErrorClass;
use ferry_engine::adapters::PlatformError;
use ferry_engine::adapters::postgres::replication::{
    AuthenticationMethod, ConnectionConfig, Lsn, PGOUTPUT, PgTls, ReplicationConnection,
    ReplicationError, ReplicationMessage, SlotPersistence, SslMode, StandbyStatus, WhenActive,
    tls_client_config,
};
use ferry_tests::pg::{PasswordAuth, PgOptions, PgServer, PgServerTls};
use ferry_tests::tls::write_test_pki;

/// The superuser over TCP to `db`, as ferry would connect (sslmode
/// prefer, libpq's default: plain TCP to these servers).
fn config(server: &PgServer, db: &str) -> ConnectionConfig {
    ConnectionConfig::new(server.host(), server.port(), "postgres", db)
}

async fn connect(server: &PgServer, db: &str) -> ReplicationConnection {
    ReplicationConnection::connect(&config(server, db))
        .await
        .expect("a replication connection")
}

/// A regular SQL connection (tokio-postgres), its driver spawned.
async fn sql_client(server: &PgServer, db: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&server.url(db), tokio_postgres::NoTls)
        .await
        .expect("a tokio-postgres connection");
    tokio::spawn(connection);
    client
}

/// Asks `check` until it says yes, for at most `limit`.
fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn identify_system_names_the_cluster_psql_sees() {
    let server = PgServer::start().expect("PostgreSQL 15");
    let mut connection = connect(&server, "postgres").await;
    assert!(
        connection.server_version().starts_with("15."),
        "{}",
        connection.server_version()
    );
    let identity = connection.identify_system().await.expect("IDENTIFY_SYSTEM");

    let system_identifier = server
        .psql(
            "postgres",
            "SELECT system_identifier FROM pg_control_system();",
        )
        .expect("psql");
    assert_eq!(identity.system_id.to_string(), system_identifier);
    assert_eq!(identity.timeline, 1);
    assert_eq!(identity.dbname.as_deref(), Some("postgres"));
    let current: Lsn = server
        .psql("postgres", "SELECT pg_current_wal_flush_lsn();")
        .expect("psql")
        .parse()
        .expect("an LSN");
    assert!(
        identity.flushed_through <= current && identity.flushed_through > Lsn(0),
        "IDENTIFY_SYSTEM's {} is a flush position before psql's later {current}",
        identity.flushed_through
    );
    connection.close().await.expect("a polite goodbye");
}

#[tokio::test]
async fn an_exported_snapshot_shows_the_rows_as_of_the_slot() {
    let server = PgServer::start().expect("PostgreSQL 15");
    server.create_database("shop").expect("a database");
    server
        .psql(
            "shop",
            "CREATE TABLE orders (id int PRIMARY KEY, item text);
             INSERT INTO orders VALUES (1, 'tea'), (2, 'cups'), (3, 'pot');",
        )
        .expect("three orders");

    let exported = connect(&server, "shop")
        .await
        .create_slot_exporting_snapshot("ferry_snapshot", PGOUTPUT, SlotPersistence::Temporary)
        .await
        .expect("a slot with an exported snapshot");
    assert!(exported.slot().consistent_point > Lsn(0));
    assert_eq!(exported.slot().output_plugin, "pgoutput");

    // Committed after the slot: in its stream, not in its snapshot.
    server
        .psql(
            "shop",
            "INSERT INTO orders VALUES (4, 'sugar');
             UPDATE orders SET item = 'green tea' WHERE id = 1;
             DELETE FROM orders WHERE id = 2;",
        )
        .expect("changes after the slot");

    let reader = sql_client(&server, "shop").await;
    reader
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}';",
            exported.snapshot_name()
        ))
        .await
        .expect("the snapshot imports while the slot's connection holds it");
    let rows = reader
        .query("SELECT id, item FROM orders ORDER BY id", &[])
        .await
        .expect("a read in the snapshot");
    let seen: Vec<(i32, String)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(
        seen,
        vec![
            (1, "tea".to_owned()),
            (2, "cups".to_owned()),
            (3, "pot".to_owned())
        ],
        "the snapshot shows the rows as of the slot"
    );
    reader.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(
        server
            .psql(
                "shop",
                "SELECT string_agg(item, ',' ORDER BY id) FROM orders;"
            )
            .expect("psql"),
        "green tea,pot,sugar",
        "outside the snapshot the changes are there"
    );

    // The next command on the slot's connection ends the snapshot.
    let snapshot_name = exported.snapshot_name().to_owned();
    let mut connection = exported.into_connection();
    connection.identify_system().await.expect("IDENTIFY_SYSTEM");
    reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .expect("begin");
    let gone = reader
        .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot_name}'"))
        .await
        .expect_err("the snapshot ended with the next command");
    assert_eq!(
        gone.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE),
        "{gone}"
    );
}

#[tokio::test]
async fn a_temporary_slot_is_gone_once_its_connection_is_dropped() {
    let server = PgServer::start().expect("PostgreSQL 15");
    let mut connection = connect(&server, "postgres").await;
    let slot = connection
        .create_slot("ferry_temporary", PGOUTPUT, SlotPersistence::Temporary)
        .await
        .expect("a temporary slot");
    assert_eq!(slot.slot_name, "ferry_temporary");
    let slot_row = || {
        server
            .psql(
                "postgres",
                "SELECT temporary, active_pid FROM pg_replication_slots WHERE slot_name = 'ferry_temporary';",
            )
            .expect("psql")
    };
    assert_eq!(
        slot_row(),
        format!("t|{}", connection.backend_pid()),
        "held by this connection's walsender"
    );

    drop(connection);
    wait_until(
        Duration::from_secs(30),
        "the temporary slot is dropped with its connection",
        || slot_row().is_empty(),
    );
}

#[tokio::test]
async fn drop_replication_slot_removes_a_persistent_slot() {
    let server = PgServer::start().expect("PostgreSQL 15");
    let mut connection = connect(&server, "postgres").await;
    let slot = connection
        .create_slot("ferry_kept", PGOUTPUT, SlotPersistence::Persistent)
        .await
        .expect("a persistent slot");
    let slot_row = || {
        server
            .psql(
                "postgres",
                "SELECT temporary, confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'ferry_kept';",
            )
            .expect("psql")
    };
    assert_eq!(slot_row(), format!("f|{}", slot.consistent_point));

    let again = connection
        .create_slot("ferry_kept", PGOUTPUT, SlotPersistence::Persistent)
        .await
        .expect_err("the name is taken");
    assert_eq!(again.sqlstate(), Some("42710"), "{again}");
    assert_eq!(again.class(), ErrorClass::Precondition);

    // A refusal leaves the connection usable.
    connection
        .drop_slot("ferry_kept", WhenActive::Fail)
        .await
        .expect("DROP_REPLICATION_SLOT");
    assert_eq!(slot_row(), "", "the slot is gone");

    let missing = connection
        .drop_slot("ferry_kept", WhenActive::Wait)
        .await
        .expect_err("nothing to drop");
    let message = missing.to_string();
    assert_eq!(missing.sqlstate(), Some("42704"), "{message}");
    assert_eq!(missing.class(), ErrorClass::NotFound);
    for part in [
        format!("127.0.0.1:{}", server.port()),
        "DROP_REPLICATION_SLOT \"ferry_kept\" WAIT".to_owned(),
        "does not exist".to_owned(),
        "SQLSTATE 42704".to_owned(),
    ] {
        assert!(message.contains(&part), "{message:?} says {part:?}");
    }
}

#[tokio::test]
async fn a_wrong_password_is_refused_clearly() {
    let server = PgServer::start_with(&PgOptions {
        password: Some("the right one".to_owned()),
        ..PgOptions::default()
    })
    .expect("PostgreSQL 15 with a password");

    let mut right = config(&server, "postgres");
    right.password = Some("the right one".to_owned());
    let connection = ReplicationConnection::connect(&right)
        .await
        .expect("the right password logs in");
    assert_eq!(
        connection.authentication(),
        AuthenticationMethod::ScramSha256
    );

    let mut wrong = config(&server, "postgres");
    wrong.password = Some("not-the-password".to_owned());
    let refused = ReplicationConnection::connect(&wrong)
        .await
        .expect_err("a wrong password is refused");
    let message = refused.to_string();
    assert!(
        matches!(refused, ReplicationError::Authentication { .. }),
        "{refused:?}"
    );
    assert_eq!(refused.class(), ErrorClass::Precondition);
    for part in [
        format!("127.0.0.1:{}", server.port()),
        "password authentication failed for user \"postgres\"".to_owned(),
        "SQLSTATE 28P01".to_owned(),
    ] {
        assert!(message.contains(&part), "{message:?} says {part:?}");
    }
    assert!(!message.contains("not-the-password"), "{message}");
    assert!(!format!("{refused:?}").contains("not-the-password"));

    let none = ReplicationConnection::connect(&config(&server, "postgres"))
        .await
        .expect_err("no password is refused");
    assert!(
        none.to_string()
            .contains("the server asks for a password and none was given"),
        "{none}"
    );
}

#[tokio::test]
async fn md5_and_cleartext_passwords_log_in() {
    // Two servers at once, as any test may run beside another.
    let md5 = std::thread::spawn(|| {
        PgServer::start_with(&PgOptions {
            password: Some("md5 password".to_owned()),
            password_auth: PasswordAuth::Md5,
            ..PgOptions::default()
        })
    });
    let cleartext = PgServer::start_with(&PgOptions {
        password: Some("clear password".to_owned()),
        password_auth: PasswordAuth::Cleartext,
        ..PgOptions::default()
    })
    .expect("PostgreSQL 15 asking for the password in clear");
    let md5 = md5
        .join()
        .expect("no panic")
        .expect("PostgreSQL 15 asking for MD5");

    for (server, password, method) in [
        (&md5, "md5 password", AuthenticationMethod::Md5),
        (
            &cleartext,
            "clear password",
            AuthenticationMethod::Cleartext,
        ),
    ] {
        let mut with_password = config(server, "postgres");
        with_password.password = Some(password.to_owned());
        let mut connection = ReplicationConnection::connect(&with_password)
            .await
            .expect("the password logs in");
        assert_eq!(connection.authentication(), method);
        connection.identify_system().await.expect("IDENTIFY_SYSTEM");

        with_password.password = Some("wrong".to_owned());
        let refused = ReplicationConnection::connect(&with_password)
            .await
            .expect_err("a wrong password is refused");
        assert!(refused.to_string().contains("SQLSTATE 28P01"), "{refused}");
    }
}

#[tokio::test]
async fn a_role_without_replication_is_refused_clearly() {
    let server = PgServer::start().expect("PostgreSQL 15");
    server
        .psql("postgres", "CREATE ROLE app LOGIN;")
        .expect("a role without REPLICATION");
    let refused = ReplicationConnection::connect(&ConnectionConfig::new(
        server.host(),
        server.port(),
        "app",
        "postgres",
    ))
    .await
    .expect_err("app may not replicate");
    let message = refused.to_string();
    assert!(
        matches!(refused, ReplicationError::NotPermitted { .. }),
        "{refused:?}"
    );
    assert_eq!(refused.sqlstate(), Some("42501"));
    assert_eq!(refused.class(), ErrorClass::Precondition);
    for part in [
        format!("127.0.0.1:{}", server.port()),
        "replication".to_owned(),
        "ALTER ROLE app REPLICATION".to_owned(),
    ] {
        assert!(message.contains(&part), "{message:?} says {part:?}");
    }

    server
        .psql("postgres", "ALTER ROLE app REPLICATION;")
        .expect("REPLICATION granted");
    let mut connection = ReplicationConnection::connect(&ConnectionConfig::new(
        server.host(),
        server.port(),
        "app",
        "postgres",
    ))
    .await
    .expect("now app may");
    connection.identify_system().await.expect("IDENTIFY_SYSTEM");
}

#[tokio::test]
async fn tls_is_verified_and_scram_is_bound_to_it() {
    let pki = tempfile::tempdir().expect("temp dir");
    write_test_pki(pki.path());
    let file = |name: &str| -> PathBuf { pki.path().join(name) };
    let server = PgServer::start_with(&PgOptions {
        password: Some("over tls".to_owned()),
        tls: Some(PgServerTls {
            cert_file: file("server.pem"),
            key_file: file("server-key.pem"),
            ca_file: None,
        }),
        ..PgOptions::default()
    })
    .expect("PostgreSQL 15 serving TLS");
    let with_tls = |mode: SslMode, ca_file: Option<PathBuf>| {
        let mut config = config(&server, "postgres");
        config.password = Some("over tls".to_owned());
        config.tls = PgTls {
            mode,
            ca_file,
            ..PgTls::default()
        };
        config
    };

    for mode in [SslMode::VerifyFull, SslMode::VerifyCa, SslMode::Require] {
        let mut connection = ReplicationConnection::connect(&with_tls(mode, Some(file("ca.pem"))))
            .await
            .unwrap_or_else(|error| panic!("sslmode={mode}: {error}"));
        assert!(connection.uses_tls(), "sslmode={mode}");
        assert_eq!(
            connection.authentication(),
            AuthenticationMethod::ScramSha256Plus,
            "sslmode={mode}: SCRAM bound to the TLS channel"
        );
        connection.identify_system().await.expect("IDENTIFY_SYSTEM");
    }
    let unchecked = ReplicationConnection::connect(&with_tls(SslMode::Require, None))
        .await
        .expect("sslmode=require does not check the certificate");
    assert!(unchecked.uses_tls());

    let untrusted = ReplicationConnection::connect(&with_tls(SslMode::VerifyFull, None))
        .await
        .expect_err("the test CA is not among the system's roots");
    assert!(
        matches!(untrusted, ReplicationError::Tls { .. }),
        "{untrusted:?}"
    );
    assert!(
        untrusted
            .to_string()
            .contains("not signed by a CA ferry trusts"),
        "{untrusted}"
    );

    // tokio-postgres, through tokio-postgres-rustls, with the same TLS
    // configuration.
    let tls_config = tls_client_config(&PgTls {
        mode: SslMode::VerifyFull,
        ca_file: Some(file("ca.pem")),
        ..PgTls::default()
    })
    .await
    .expect("a TLS configuration")
    .expect("TLS is on");
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres password='over tls' sslmode=require",
            server.port()
        ),
        tokio_postgres_rustls::MakeRustlsConnect::new(tls_config),
    )
    .await
    .expect("tokio-postgres over TLS");
    tokio::spawn(connection);
    let encrypted: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(encrypted);

    // Against a server without TLS: require refuses, prefer goes plain.
    let plain = PgServer::start().expect("PostgreSQL 15 without TLS");
    let mut require = config(&plain, "postgres");
    require.tls.mode = SslMode::Require;
    let refused = ReplicationConnection::connect(&require)
        .await
        .expect_err("no TLS to be had");
    assert!(
        refused
            .to_string()
            .contains("does not accept TLS and sslmode is require"),
        "{refused}"
    );
    let preferred = connect(&plain, "postgres").await;
    assert!(!preferred.uses_tls());
    assert_eq!(preferred.authentication(), AuthenticationMethod::None);
}

/// A CA and a server certificate signed by it for `db.invalid` only (not
/// 127.0.0.1, where the server is), as PEM files in `dir`.
fn write_certificate_for_another_name(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ferry other-name CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["db.invalid".to_owned()]).expect("server params");
    let certificate = params.signed_by(&key, &issuer).expect("signed");
    std::fs::write(dir.join("other-ca.pem"), ca.pem()).expect("written");
    std::fs::write(dir.join("other-server.pem"), certificate.pem()).expect("written");
    std::fs::write(dir.join("other-server-key.pem"), key.serialize_pem()).expect("written");
}

#[tokio::test]
async fn verify_ca_checks_the_chain_and_verify_full_the_name_too() {
    let pki = tempfile::tempdir().expect("temp dir");
    write_test_pki(pki.path());
    write_certificate_for_another_name(pki.path());
    let file = |name: &str| -> PathBuf { pki.path().join(name) };
    let server = PgServer::start_with(&PgOptions {
        tls: Some(PgServerTls {
            cert_file: file("other-server.pem"),
            key_file: file("other-server-key.pem"),
            ca_file: None,
        }),
        ..PgOptions::default()
    })
    .expect("PostgreSQL 15 serving a certificate for db.invalid");
    let with_tls = |mode: SslMode, ca_file: &str| {
        let mut config = config(&server, "postgres");
        config.tls = PgTls {
            mode,
            ca_file: Some(file(ca_file)),
            ..PgTls::default()
        };
        config
    };

    let misnamed = ReplicationConnection::connect(&with_tls(SslMode::VerifyFull, "other-ca.pem"))
        .await
        .expect_err("the certificate does not name 127.0.0.1");
    assert!(
        misnamed
            .to_string()
            .contains("does not name the host ferry connected to"),
        "{misnamed}"
    );
    // verify-ca, and require given a CA file (as libpq does), check the
    // chain only.
    for mode in [SslMode::VerifyCa, SslMode::Require] {
        let connection = ReplicationConnection::connect(&with_tls(mode, "other-ca.pem"))
            .await
            .unwrap_or_else(|error| panic!("sslmode={mode}: {error}"));
        assert!(connection.uses_tls());
        let wrong_ca = ReplicationConnection::connect(&with_tls(mode, "ca.pem"))
            .await
            .expect_err("signed by another CA");
        assert!(
            wrong_ca
                .to_string()
                .contains("not signed by a CA ferry trusts"),
            "sslmode={mode}: {wrong_ca}"
        );
    }
}

#[tokio::test]
async fn a_server_that_cannot_start_shows_its_log() {
    let refused = PgServer::start_with(&PgOptions {
        settings: vec![("wal_level".to_owned(), "sideways".to_owned())],
        ..PgOptions::default()
    })
    .expect_err("no such wal_level");
    let message = refused.to_string();
    assert!(
        message.contains("invalid value for parameter \"wal_level\""),
        "{message}"
    );
}

#[tokio::test]
async fn nothing_listening_is_unreachable() {
    let address = ferry_tests::process::free_address().expect("a free port");
    let port = address
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("a port");
    let refused = ReplicationConnection::connect(&ConnectionConfig::new(
        "127.0.0.1",
        port,
        "postgres",
        "postgres",
    ))
    .await
    .expect_err("nothing listens");
    assert!(
        matches!(refused, ReplicationError::Unreachable { .. }),
        "{refused:?}"
    );
    assert_eq!(refused.class(), ErrorClass::Transient);
    assert!(refused.to_string().contains(&address), "{refused}");
}

#[tokio::test]
async fn start_replication_streams_an_insert_made_after_the_slot() {
    let server = PgServer::start().expect("PostgreSQL 15");
    server
        .psql(
            "postgres",
            "CREATE TABLE notes (id int PRIMARY KEY, body text);
             CREATE PUBLICATION ferry_notes FOR TABLE notes;",
        )
        .expect("a table and its publication");
    let mut connection = connect(&server, "postgres").await;
    let slot = connection
        .create_slot("ferry_stream", PGOUTPUT, SlotPersistence::Persistent)
        .await
        .expect("a slot");
    server
        .psql(
            "postgres",
            "INSERT INTO notes VALUES (1, 'written after the slot');",
        )
        .expect("an insert after the slot");

    let mut stream = connection
        .start_logical_replication(
            "ferry_stream",
            slot.consistent_point,
            &[("proto_version", "1"), ("publication_names", "ferry_notes")],
        )
        .await
        .expect("START_REPLICATION");

    // pgoutput: Begin, Relation, Insert, Commit. A Commit holds its flags,
    // the commit's LSN and the end of its record.
    let mut inserted = None;
    let mut commit_end = None;
    let reading = tokio::time::timeout(Duration::from_secs(30), async {
        while commit_end.is_none() {
            match stream.next_message().await.expect("a message") {
                Some(ReplicationMessage::XLogData(xlog)) => match xlog.data.first() {
                    Some(b'I') => inserted = Some(xlog.data.clone()),
                    Some(b'C') => {
                        let end =
                            u64::from_be_bytes(xlog.data[10..18].try_into().expect("eight bytes"));
                        commit_end = Some(Lsn(end));
                    }
                    _ => {}
                },
                Some(ReplicationMessage::Keepalive(keepalive)) => {
                    if keepalive.reply_requested {
                        stream
                            .send_standby_status(StandbyStatus::through(slot.consistent_point))
                            .await
                            .expect("a reply");
                    }
                }
                None => panic!("the server ended the stream"),
            }
        }
    })
    .await;
    assert!(
        reading.is_ok(),
        "the insert's transaction streamed within 30 s"
    );
    let inserted = inserted.expect("an Insert message before the Commit");
    assert!(
        inserted
            .windows(b"written after the slot".len())
            .any(|window| window == b"written after the slot"),
        "the Insert carries the new row: {inserted:?}"
    );
    let commit_end = commit_end.expect("a Commit");
    assert!(commit_end > slot.consistent_point);

    stream
        .send_standby_status(StandbyStatus {
            reply_requested: true,
            ..StandbyStatus::through(commit_end)
        })
        .await
        .expect("a standby status update");
    wait_until(
        Duration::from_secs(30),
        "the slot's confirmed position reaches the commit",
        || {
            let confirmed = server
                .psql(
                    "postgres",
                    "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'ferry_stream';",
                )
                .expect("psql");
            confirmed.parse::<Lsn>().expect("an LSN") >= commit_end
        },
    );

    // CopyDone ends the stream; the connection takes commands again.
    let mut connection = stream.finish().await.expect("the stream ends");
    connection
        .drop_slot("ferry_stream", WhenActive::Fail)
        .await
        .expect("the slot is free to drop");
}

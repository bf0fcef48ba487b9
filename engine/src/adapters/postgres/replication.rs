//! A connection in PostgreSQL's replication protocol (`replication=database`),
//! the commands the extract and the live stream need, and the TLS client
//! configuration every PostgreSQL connection of ferry's shares.
//!
//! - [`ReplicationConnection::connect`]: TCP, TLS as [`SslMode`] says,
//!   then trust, cleartext password, MD5 or SCRAM-SHA-256 authentication
//!   (SCRAM-SHA-256-PLUS, with `tls-server-end-point` channel binding, over
//!   TLS when the server offers it).
//! - [`ReplicationConnection::identify_system`]: the cluster's system id,
//!   timeline and current WAL position.
//! - [`ReplicationConnection::create_slot_exporting_snapshot`]: a logical
//!   slot and the snapshot it starts from, held as an [`ExportedSnapshot`]
//!   that owns the connection: the server keeps an exported snapshot only
//!   until the connection's next command or its end, so nothing else can
//!   be sent on it while the snapshot is held.
//! - [`ReplicationConnection::drop_slot`].
//! - [`ReplicationConnection::start_logical_replication`]: the CopyBoth
//!   stream of [`XLogData`] and [`Keepalive`] messages, answered with
//!   [`StandbyStatus`] updates.
//!
//! # Why a client of ferry's own
//!
//! The replication sub-protocol is small: simple queries, then one CopyBoth
//! stream of three message kinds. What is hard (the message codec, SCRAM,
//! MD5) is `postgres-protocol`, the crate tokio-postgres itself is built on,
//! and TLS is the rustls with aws-lc the workspace already builds for tonic.
//! The candidates that were weighed:
//!
//! - `pg_walstream` 0.10, with `libpq` (its rustls feature needs
//!   webpki-roots 1.0.11, newer than the registry ferry builds from has):
//!   links the C libpq, so every machine that builds ferry, CI's lint step
//!   included (it runs before any package is installed), needs
//!   `libpq-dev`; TLS would then be libpq's OpenSSL, a second stack with
//!   its own CA handling beside rustls; and it is 52,000 lines, most of
//!   them a pgoutput decoder and snapshot machinery ferry builds itself.
//! - `pgwire-replication` 0.5: pure Rust on tokio with SCRAM (MD5 behind a
//!   feature) and rustls, but it pins rustls to `ring` and installs ring as
//!   the process-wide default crypto provider on its first TLS connection
//!   (a global side effect on every other TLS user in ferry), its config
//!   derives `Debug` with the password in clear, and a connection is bound
//!   at connect time to one slot and publication, with slot creation left
//!   to a general query helper.
//!
//! # Deadlines
//!
//! Connecting is bounded by [`ConnectionConfig::connect_timeout`]. Commands
//! have no deadline of their own, since `CREATE_REPLICATION_SLOT` rightly
//! waits for every transaction running when it starts: callers bound them
//! (`tokio::time::timeout`). While streaming, the server sends a keepalive
//! at least every `wal_sender_timeout / 2` (30 s by default), so a longer
//! silence means a dead peer.
//!
//! # Session settings
//!
//! Every connection pins the settings that decide how values are written
//! as text ([`SESSION_SETTINGS`]): `pgoutput` writes column values in the
//! walsender's session settings, so the same row reads the same from any
//! server, whatever its `postgresql.conf` says.
//!
//! # Not supported
//!
//! GSSAPI, SSPI and Kerberos authentication; Unix-domain sockets; direct
//! TLS (`sslnegotiation=direct`, PostgreSQL 17): ferry sends `SSLRequest`
//! first, which every server 15 and newer accepts; physical replication.
//! `CREATE_REPLICATION_SLOT` uses the option list of PostgreSQL 15 and newer.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{self, ErrorFields, Message};
use postgres_protocol::message::frontend;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, instrument};

use crate::adapters::PlatformError;
use crate::adapters::live::Position;
use crate::error::ErrorClass;

/// The output plugin built into PostgreSQL that logical replication uses.
pub const PGOUTPUT: &str = "pgoutput";

/// Settings sent with every connection's startup message: the text forms
/// of dates, intervals, floats and byte strings, and the time zone, fixed so
/// that `pgoutput` writes a value the same way on every server.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

/// The largest message ferry accepts from a server: PostgreSQL's own limit
/// on one allocation (1 GiB) plus room for the message's header. A longer
/// length is refused before anything is buffered, so a damaged or hostile
/// peer cannot make ferry allocate without bound.
const MAX_MESSAGE_BYTES: usize = (1 << 30) + 1024;

/// How long [`ConnectionConfig::new`] lets a connection take to be ready.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const POSTGRES_EPOCH_UNIX_SECONDS: u64 = 946_684_800;

// ---------------------------------------------------------------------------
// Configuration

/// How to reach a server. The caller fills it: the password from
/// `PGPASSWORD`, a `PGPASSFILE` or a password file, never from a URL or
/// argv. `Debug` never shows the password.
#[derive(Clone)]
pub struct ConnectionConfig {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The role to log in as; a replication connection needs one with the
    /// `REPLICATION` attribute (or a superuser).
    pub user: String,
    /// The database: logical slots belong to one.
    pub dbname: String,
    /// The password, when the server asks for one.
    pub password: Option<String>,
    /// TLS.
    pub tls: PgTls,
    /// How long connecting (TCP, TLS, authentication, startup) may take.
    pub connect_timeout: Duration,
    /// Shown in `pg_stat_activity` and `pg_stat_replication`.
    pub application_name: String,
}

impl ConnectionConfig {
    /// A configuration with no password, [`SslMode::Prefer`] (libpq's
    /// default), a 10 s connect timeout and the application name `ferry`.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        user: impl Into<String>,
        dbname: impl Into<String>,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            user: user.into(),
            dbname: dbname.into(),
            password: None,
            tls: PgTls::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            application_name: "ferry".to_owned(),
        }
    }

    /// `host:port` (`[host]:port` for an IPv6 address), for messages.
    pub fn server(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for ConnectionConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ConnectionConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field(
                "password",
                &self.password.as_ref().map(|_password| "<hidden>"),
            )
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .field("application_name", &self.application_name)
            .finish()
    }
}

/// Whether and how TLS is used, as libpq's `sslmode` says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server accepts it, plain TCP when it does not (libpq's
    /// default). The certificate is checked as [`SslMode::VerifyCa`] does
    /// when a CA file is given, and not at all otherwise.
    #[default]
    Prefer,
    /// TLS or nothing. The certificate is checked as [`SslMode::VerifyCa`]
    /// does when a CA file is given, and not at all otherwise.
    Require,
    /// TLS, with a certificate signed by the CA file (the system's roots
    /// when there is none); any host name.
    VerifyCa,
    /// [`SslMode::VerifyCa`], and the certificate must name the host
    /// connected to.
    VerifyFull,
}

impl SslMode {
    /// libpq's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ReplicationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            // libpq's `allow` tries plain TCP first: ferry never prefers
            // plain TCP to TLS.
            other => Err(ReplicationError::InvalidRequest {
                reason: format!(
                    "{other:?} is not an sslmode ferry takes: use disable, prefer, require, verify-ca or verify-full"
                ),
            }),
        }
    }
}

/// TLS to the server. The files are read when ferry connects; only their
/// paths are passed around.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    /// Whether TLS is used, and what is checked.
    pub mode: SslMode,
    /// PEM file of the CA(s) the server's certificate is signed by
    /// (libpq's `sslrootcert`).
    pub ca_file: Option<PathBuf>,
    /// PEM file of ferry's client certificate (`sslcert`), for servers
    /// whose `pg_hba.conf` asks for one; goes with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (`sslkey`).
    pub key_file: Option<PathBuf>,
}

/// The rustls client configuration `tls` asks for, `None` for
/// [`SslMode::Disable`]. aws-lc is its crypto provider, named here rather
/// than taken from the process default. Regular SQL connections use the
/// same configuration through `tokio_postgres_rustls::MakeRustlsConnect`
/// (with tokio-postgres's `sslmode=require` for `verify-ca` and
/// `verify-full`, since the checking is this configuration's).
pub async fn tls_client_config(tls: &PgTls) -> Result<Option<ClientConfig>, ReplicationError> {
    if tls.mode == SslMode::Disable {
        return Ok(None);
    }
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err(ReplicationError::TlsFiles {
            reason:
                "a client certificate needs its key: give both the certificate and the key file"
                    .to_owned(),
        });
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| ReplicationError::TlsFiles {
            reason: format!("cannot set up TLS: {error}"),
        })?;
    let verify = match (tls.mode, &tls.ca_file) {
        (SslMode::VerifyFull, _) => Verify::ChainAndName,
        (SslMode::VerifyCa, _) | (_, Some(_)) => Verify::Chain,
        _ => Verify::Nothing,
    };
    let builder = match verify {
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCertificateCheck {
                algorithms: provider.signature_verification_algorithms,
            })),
        Verify::Chain | Verify::ChainAndName => {
            let roots = match &tls.ca_file {
                Some(path) => roots_from_file(path).await?,
                None => system_roots().await?,
            };
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| ReplicationError::TlsFiles {
                    reason: format!("cannot check server certificates: {error}"),
                })?;
            if verify == Verify::ChainAndName {
                builder.with_webpki_verifier(webpki)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainCheckOnly { webpki }))
            }
        }
    };
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let certificates = CertificateDer::pem_slice_iter(
                &read_pem(cert_file, "client certificate file").await?,
            )
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| ReplicationError::TlsFiles {
                reason: format!(
                    "the client certificate file {} is not PEM certificates: {error}",
                    cert_file.display()
                ),
            })?;
            let key = PrivateKeyDer::from_pem_slice(&read_pem(key_file, "client key file").await?)
                .map_err(|error| ReplicationError::TlsFiles {
                    reason: format!(
                        "the client key file {} holds no PEM private key: {error}",
                        key_file.display()
                    ),
                })?;
            builder
                .with_client_auth_cert(certificates, key)
                .map_err(|error| ReplicationError::TlsFiles {
                    reason: format!(
                        "the client certificate {} does not go with the key {}: {error}",
                        cert_file.display(),
                        key_file.display()
                    ),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    // What libpq 17 sends, and what a server 17 requires of direct TLS;
    // older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(config))
}

/// What is checked of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

async fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, ReplicationError> {
    let content = tokio::fs::read(path)
        .await
        .map_err(|error| ReplicationError::TlsFiles {
            reason: format!("cannot read the {what} {}: {error}", path.display()),
        })?;
    if !content.windows(11).any(|window| window == b"-----BEGIN ") {
        return Err(ReplicationError::TlsFiles {
            reason: format!("the {what} {} is not in PEM form", path.display()),
        });
    }
    Ok(content)
}

async fn roots_from_file(path: &Path) -> Result<RootCertStore, ReplicationError> {
    let content = read_pem(path, "CA file").await?;
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&content) {
        let certificate = certificate.map_err(|error| ReplicationError::TlsFiles {
            reason: format!(
                "the CA file {} is not PEM certificates: {error}",
                path.display()
            ),
        })?;
        roots
            .add(certificate)
            .map_err(|error| ReplicationError::TlsFiles {
                reason: format!(
                    "the CA file {} holds a certificate ferry cannot use: {error}",
                    path.display()
                ),
            })?;
    }
    if roots.is_empty() {
        return Err(ReplicationError::TlsFiles {
            reason: format!("the CA file {} holds no certificate", path.display()),
        });
    }
    Ok(roots)
}

async fn system_roots() -> Result<RootCertStore, ReplicationError> {
    // Reads files: off the async threads.
    let loaded = tokio::task::spawn_blocking(rustls_native_certs::load_native_certs)
        .await
        .map_err(|error| ReplicationError::TlsFiles {
            reason: format!("cannot read the system's trusted roots: {error}"),
        })?;
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(loaded.certs);
    if roots.is_empty() {
        return Err(ReplicationError::TlsFiles {
            reason: "the system has no trusted root certificates: give the CA file that signed the server's certificate".to_owned(),
        });
    }
    Ok(roots)
}

/// `sslmode=require` or `prefer` without a CA file: the certificate is not
/// checked (libpq's behaviour), though the handshake's signatures are.
#[derive(Debug)]
struct NoCertificateCheck {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, certificate, signature, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, certificate, signature, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name
/// in the certificate is not compared with the host. webpki checks the
/// chain before the name, so a name mismatch means the chain passed.
#[derive(Debug)]
struct ChainCheckOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainCheckOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            checked => checked,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki
            .verify_tls12_signature(message, certificate, signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki
            .verify_tls13_signature(message, certificate, signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The `tls-server-end-point` channel binding (RFC 5929): the server
/// certificate hashed with its signature's hash (SHA-256 for SHA-1 and MD5).
/// `None` for signatures without a hash of their own (Ed25519), for which
/// the binding is undefined.
fn tls_server_end_point(certificate: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_cert::der::Decode;
    use x509_cert::der::oid::db::rfc5912::{
        ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512, ID_SHA_1, ID_SHA_256,
        ID_SHA_384, ID_SHA_512, MD_5_WITH_RSA_ENCRYPTION, SHA_1_WITH_RSA_ENCRYPTION,
        SHA_256_WITH_RSA_ENCRYPTION, SHA_384_WITH_RSA_ENCRYPTION, SHA_512_WITH_RSA_ENCRYPTION,
    };
    let parsed = x509_cert::Certificate::from_der(certificate).ok()?;
    match parsed.signature_algorithm.oid {
        ID_SHA_1
        | ID_SHA_256
        | MD_5_WITH_RSA_ENCRYPTION
        | SHA_1_WITH_RSA_ENCRYPTION
        | SHA_256_WITH_RSA_ENCRYPTION
        | ECDSA_WITH_SHA_256 => Some(sha2::Sha256::digest(certificate).to_vec()),
        ID_SHA_384 | SHA_384_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_384 => {
            Some(sha2::Sha384::digest(certificate).to_vec())
        }
        ID_SHA_512 | SHA_512_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_512 => {
            Some(sha2::Sha512::digest(certificate).to_vec())
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Positions and results

/// A WAL position (log sequence number), written as PostgreSQL writes it:
/// two hexadecimal numbers, `16/B374D848`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = ReplicationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ReplicationError::InvalidRequest {
            reason: format!("{text:?} is not an LSN (two hexadecimal numbers, as in 16/B374D848)"),
        };
        let (high, low) = text.split_once('/').ok_or_else(invalid)?;
        let high = u32::from_str_radix(high, 16).map_err(|_| invalid())?;
        let low = u32::from_str_radix(low, 16).map_err(|_| invalid())?;
        Ok(Lsn((u64::from(high) << 32) | u64::from(low)))
    }
}

impl From<Lsn> for Position {
    fn from(lsn: Lsn) -> Self {
        Position(lsn.0)
    }
}

impl From<Position> for Lsn {
    fn from(position: Position) -> Self {
        Lsn(position.0)
    }
}

/// What `IDENTIFY_SYSTEM` says of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique id, made by initdb: the same on a physical
    /// replica, different on any other cluster (`pg_control_system()`'s
    /// `system_identifier`).
    pub system_id: u64,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub flushed_through: Lsn,
    /// The database connected to.
    pub dbname: Option<String>,
}

/// Whether a slot outlives its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotPersistence {
    /// Dropped by the server when the connection ends, or on any error in
    /// it; never written to disk.
    Temporary,
    /// Kept, across restarts too, until dropped; it holds WAL back
    /// meanwhile.
    Persistent,
}

/// A replication slot just created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// Its name.
    pub slot_name: String,
    /// The position it is consistent at: every transaction that committed
    /// after it will be streamed from it; every one before is in its
    /// snapshot.
    pub consistent_point: Lsn,
    /// Its output plugin.
    pub output_plugin: String,
}

/// What to do when the slot to drop is in use by another connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenActive {
    /// Fail (SQLSTATE 55006, object in use).
    Fail,
    /// Wait until it is released.
    Wait,
}

/// How ferry logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthenticationMethod {
    /// The server asked for nothing (`trust`, `peer`, a certificate).
    None,
    /// The password, in clear (only as safe as the TLS under it).
    Cleartext,
    /// MD5 of the password with a salt.
    Md5,
    /// SCRAM-SHA-256.
    ScramSha256,
    /// SCRAM-SHA-256 bound to the TLS channel: a man in the middle cannot
    /// relay the exchange.
    ScramSha256Plus,
}

/// A column value as the server wrote it, in text; `None` for NULL.
type Row = Vec<Option<String>>;

/// The text result of a simple query: its columns' names and its rows.
#[derive(Debug, Default)]
struct QueryResult {
    columns: Vec<String>,
    rows: Vec<Row>,
}

// ---------------------------------------------------------------------------
// Errors

/// An error a server sent (`ErrorResponse`), in its own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL` or `PANIC`.
    pub severity: String,
    /// The SQLSTATE, e.g. `42710`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// The server's detail, when it gave one.
    pub detail: Option<String>,
    /// The server's hint, when it gave one.
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(detail) = &self.detail {
            write!(formatter, "; {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(formatter, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl ServerError {
    fn parse(mut fields: ErrorFields<'_>) -> io::Result<Self> {
        let mut error = ServerError {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        while let Some(field) = fields.next()? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                // `V` is never translated; `S` may be.
                b'V' => error.severity = value,
                b'S' if error.severity.is_empty() => error.severity = value,
                b'C' => error.code = value,
                b'M' => error.message = value,
                b'D' => error.detail = Some(value),
                b'H' => error.hint = Some(value),
                _ => {}
            }
        }
        Ok(error)
    }
}

/// Something went wrong on a replication connection. Every case names the
/// server (`host:port`); none ever holds the password.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// No connection: refused, unresolvable, or no answer in time.
    #[error(
        "cannot connect to PostgreSQL at {server}: {reason}; check the address and that the server is running"
    )]
    Unreachable {
        /// `host:port`.
        server: String,
        /// What the network said.
        reason: String,
    },
    /// TLS could not be set up with the server.
    #[error("TLS with PostgreSQL at {server} failed: {reason}")]
    Tls {
        /// `host:port`.
        server: String,
        /// What went wrong and what to do.
        reason: String,
    },
    /// The TLS files cannot be used.
    #[error("cannot use the PostgreSQL TLS files: {reason}")]
    TlsFiles {
        /// What is wrong, naming the file.
        reason: String,
    },
    /// The server did not accept the user or its password.
    #[error("PostgreSQL at {server} did not let user {user:?} log in: {reason}")]
    Authentication {
        /// `host:port`.
        server: String,
        /// The role.
        user: String,
        /// The server's words (with its SQLSTATE) and what to check.
        reason: String,
    },
    /// The user logged in, but may not open a replication connection.
    #[error(
        "PostgreSQL at {server} refused a replication connection to user {user:?}: {error}; give the role the REPLICATION attribute (ALTER ROLE {user} REPLICATION) or connect as one that has it"
    )]
    NotPermitted {
        /// `host:port`.
        server: String,
        /// The role.
        user: String,
        /// What the server said.
        error: Box<ServerError>,
    },
    /// The server refused a command.
    #[error("PostgreSQL at {server} refused {command}: {error}")]
    Server {
        /// `host:port`.
        server: String,
        /// The command, as sent (commands never hold a password).
        command: String,
        /// What the server said.
        error: Box<ServerError>,
    },
    /// The connection broke: closed by the server, reset, or already broken
    /// by an earlier failure.
    #[error("the connection to PostgreSQL at {server} broke during {command}: {reason}")]
    ConnectionLost {
        /// `host:port`.
        server: String,
        /// What was under way.
        command: String,
        /// What happened.
        reason: String,
    },
    /// The server answered in a way the protocol does not allow.
    #[error("PostgreSQL at {server} answered {command} with something ferry cannot read: {reason}")]
    Protocol {
        /// `host:port`.
        server: String,
        /// What was under way.
        command: String,
        /// What was wrong.
        reason: String,
    },
    /// The request cannot be sent as it is: a slot name PostgreSQL would
    /// refuse, a malformed LSN, text with a NUL byte.
    #[error("{reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
}

impl ReplicationError {
    /// The server's SQLSTATE, when the server refused something.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { error, .. }
            | ReplicationError::NotPermitted { error, .. } => Some(&error.code),
            _ => None,
        }
    }
}

impl PlatformError for ReplicationError {
    fn class(&self) -> ErrorClass {
        match self {
            ReplicationError::Unreachable { .. } | ReplicationError::ConnectionLost { .. } => {
                ErrorClass::Transient
            }
            ReplicationError::Tls { .. }
            | ReplicationError::TlsFiles { .. }
            | ReplicationError::Authentication { .. }
            | ReplicationError::NotPermitted { .. }
            // A server that speaks otherwise will do so again.
            | ReplicationError::Protocol { .. } => ErrorClass::Precondition,
            ReplicationError::InvalidRequest { .. } => ErrorClass::Invalid,
            ReplicationError::Server { error, .. } => class_of_sqlstate(&error.code),
        }
    }

    fn is_usage(&self) -> bool {
        matches!(
            self,
            ReplicationError::TlsFiles { .. } | ReplicationError::InvalidRequest { .. }
        )
    }
}

/// What to do about a server's refusal, by its SQLSTATE.
fn class_of_sqlstate(code: &str) -> ErrorClass {
    match code {
        // Connection exceptions, a server shutting down or crashed, too
        // many connections, a serialization failure or deadlock.
        _ if code.starts_with("08") || code.starts_with("57P") => ErrorClass::Transient,
        "53300" | "40001" | "40P01" => ErrorClass::Transient,
        // An undefined object (a slot that does not exist) or database.
        "42704" | "3D000" => ErrorClass::NotFound,
        // Program limits exceeded.
        _ if code.starts_with("54") => ErrorClass::TooLarge,
        // Syntax errors and the like: the command itself is wrong.
        "42601" | "42602" | "42622" | "22023" => ErrorClass::Invalid,
        // A slot that exists or is in use, wal_level too low, no free
        // slot, missing privileges: something to change first.
        _ => ErrorClass::Precondition,
    }
}

/// Words for a failed read or write, with what to do when it was TLS.
fn describe_io_error(error: &io::Error) -> String {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => describe_tls_error(tls),
        None => error.to_string(),
    }
}

fn describe_tls_error(error: &rustls::Error) -> String {
    use rustls::AlertDescription;
    match error {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "the server's certificate is not signed by a CA ferry trusts ({error}); give the CA file that signed it"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate does not name the host ferry connected to ({error}); connect by a name it lists, or use sslmode=verify-ca"
        ),
        rustls::Error::InvalidCertificate(_) => {
            format!("the server's certificate was refused ({error})")
        }
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            format!("the server requires a client certificate ({error}); give one with its key")
        }
        rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown,
        ) => format!(
            "the server refused ferry's client certificate ({error}); give one signed by a CA the server trusts (its ssl_ca_file)"
        ),
        other => format!("the TLS handshake failed ({other})"),
    }
}

/// A failure at startup, in the words the user needs.
fn refused_at_startup(server: &str, user: &str, error: ServerError) -> ReplicationError {
    let server = server.to_owned();
    let user = user.to_owned();
    match error.code.as_str() {
        // invalid_authorization_specification (no pg_hba.conf line, a
        // role that may not log in) and invalid_password.
        code if code.starts_with("28") => {
            let check = if error.message.contains("pg_hba.conf") {
                "the server's pg_hba.conf must have a line for replication connections of this user from this host"
            } else {
                "check the user and its password"
            };
            ReplicationError::Authentication {
                server,
                user,
                reason: format!("{error}; {check}"),
            }
        }
        // "must be superuser or replication role to start walsender"
        // (15), "permission denied to start WAL sender" (16 and newer).
        "42501" => ReplicationError::NotPermitted {
            server,
            user,
            error: Box::new(error),
        },
        _ => ReplicationError::Server {
            server,
            command: "the connection".to_owned(),
            error: Box::new(error),
        },
    }
}

// ---------------------------------------------------------------------------
// The wire

/// A byte stream to a server: TCP, or TLS over TCP.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// A backend message: postgres-protocol's, or the one it does not know.
enum Backend {
    Message(Message),
    /// `CopyBothResponse`: the server starts streaming (its body, the
    /// column formats, says nothing a replication client needs).
    CopyBothResponse,
}

const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// The byte stream to one server, and its buffers.
struct Wire {
    stream: Box<dyn Transport>,
    read_buffer: BytesMut,
    write_buffer: BytesMut,
    server: String,
}

impl Wire {
    fn new(stream: Box<dyn Transport>, server: String) -> Self {
        Self {
            stream,
            read_buffer: BytesMut::with_capacity(8192),
            write_buffer: BytesMut::with_capacity(1024),
            server,
        }
    }

    /// Writes out what the frontend functions put in the write buffer. A
    /// cancelled call leaves the unwritten rest in the buffer, sent first
    /// by the next call, so the stream never loses or repeats a byte.
    async fn send(&mut self, command: &str) -> Result<(), ReplicationError> {
        let written = async {
            self.stream.write_all_buf(&mut self.write_buffer).await?;
            self.stream.flush().await
        }
        .await;
        written.map_err(|error| self.lost(command, &error))
    }

    /// The next message. Cancel-safe: bytes read stay in the buffer.
    async fn receive(&mut self, command: &str) -> Result<Backend, ReplicationError> {
        loop {
            let header = backend::Header::parse(&self.read_buffer)
                .map_err(|error| self.malformed(command, error.to_string()))?;
            if let Some(header) = header {
                // The length counts itself, not the tag.
                let total = usize::try_from(header.len()).unwrap_or(usize::MAX) + 1;
                if total > MAX_MESSAGE_BYTES {
                    return Err(self.malformed(
                        command,
                        format!(
                            "a message of {total} bytes (tag {:?}), more than the {MAX_MESSAGE_BYTES} ferry accepts",
                            char::from(header.tag())
                        ),
                    ));
                }
                if self.read_buffer.len() >= total {
                    if header.tag() == COPY_BOTH_RESPONSE_TAG {
                        self.read_buffer.advance(total);
                        return Ok(Backend::CopyBothResponse);
                    }
                    return match Message::parse(&mut self.read_buffer) {
                        Ok(Some(message)) => Ok(Backend::Message(message)),
                        Ok(None) => Err(self.malformed(
                            command,
                            "a message shorter than its header says".to_owned(),
                        )),
                        Err(error) => Err(self.malformed(command, error.to_string())),
                    };
                }
                self.read_buffer.reserve(total - self.read_buffer.len());
            }
            let read = self
                .stream
                .read_buf(&mut self.read_buffer)
                .await
                .map_err(|error| self.lost(command, &error))?;
            if read == 0 {
                return Err(ReplicationError::ConnectionLost {
                    server: self.server.clone(),
                    command: command.to_owned(),
                    reason: "the server closed the connection".to_owned(),
                });
            }
        }
    }

    fn lost(&self, command: &str, error: &io::Error) -> ReplicationError {
        let reason = describe_io_error(error);
        if error
            .get_ref()
            .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return ReplicationError::Tls {
                server: self.server.clone(),
                reason,
            };
        }
        ReplicationError::ConnectionLost {
            server: self.server.clone(),
            command: command.to_owned(),
            reason,
        }
    }

    fn malformed(&self, command: &str, reason: String) -> ReplicationError {
        ReplicationError::Protocol {
            server: self.server.clone(),
            command: command.to_owned(),
            reason,
        }
    }
}

fn log_notice(server: &str, fields: ErrorFields<'_>) {
    if let Ok(notice) = ServerError::parse(fields) {
        debug!(
            server,
            severity = %notice.severity,
            sqlstate = %notice.code,
            message = %notice.message,
            "postgresql notice"
        );
    }
}

// ---------------------------------------------------------------------------
// The connection

/// A connection in the replication protocol (`replication=database`), idle
/// between commands. Commands run one at a time; one that fails on the
/// server leaves the connection usable, one that breaks it (a network
/// failure, a protocol error) leaves every later command failing with
/// [`ReplicationError::ConnectionLost`].
///
/// Dropping it closes the socket; the server then ends the session and
/// drops its temporary slots. [`ReplicationConnection::close`] says goodbye
/// first.
pub struct ReplicationConnection {
    wire: Wire,
    user: String,
    server_version: String,
    backend_pid: i32,
    authentication: AuthenticationMethod,
    tls: bool,
    /// Why the connection can no longer be used, once it cannot.
    broken: Option<String>,
}

impl fmt::Debug for ReplicationConnection {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ReplicationConnection")
            .field("server", &self.wire.server)
            .field("user", &self.user)
            .field("server_version", &self.server_version)
            .field("backend_pid", &self.backend_pid)
            .field("authentication", &self.authentication)
            .field("tls", &self.tls)
            .field("broken", &self.broken)
            .finish()
    }
}

impl ReplicationConnection {
    /// Connects and logs in, within `config.connect_timeout`.
    #[instrument(skip_all, fields(server = %config.server(), user = %config.user))]
    pub async fn connect(config: &ConnectionConfig) -> Result<Self, ReplicationError> {
        let server = config.server();
        match tokio::time::timeout(config.connect_timeout, Self::connect_unbounded(config)).await {
            Ok(connected) => connected,
            Err(_elapsed) => Err(ReplicationError::Unreachable {
                server,
                reason: format!(
                    "not connected and logged in within {:?}",
                    config.connect_timeout
                ),
            }),
        }
    }

    async fn connect_unbounded(config: &ConnectionConfig) -> Result<Self, ReplicationError> {
        let mut parameters: Vec<(&str, &str)> = vec![
            ("user", &config.user),
            ("database", &config.dbname),
            ("replication", "database"),
            ("application_name", &config.application_name),
        ];
        parameters.extend_from_slice(SESSION_SETTINGS);
        let (wire, started) = start_session(config, &parameters).await?;
        let server_version = started
            .parameters
            .iter()
            .find(|(name, _)| name == "server_version")
            .map(|(_, value)| value.clone())
            .unwrap_or_default();
        debug!(%server_version, backend_pid = started.backend_pid, authentication = ?started.authentication, tls = started.tls, "replication connection ready");
        Ok(Self {
            wire,
            user: config.user.clone(),
            server_version,
            backend_pid: started.backend_pid,
            authentication: started.authentication,
            tls: started.tls,
            broken: None,
        })
    }

    /// `host:port`.
    pub fn server(&self) -> &str {
        &self.wire.server
    }

    /// The server's `server_version`, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    /// The process id of the server's walsender for this connection (as in
    /// `pg_stat_replication.pid` and `pg_replication_slots.active_pid`).
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// How ferry logged in.
    pub fn authentication(&self) -> AuthenticationMethod {
        self.authentication
    }

    /// True when the connection is encrypted.
    pub fn uses_tls(&self) -> bool {
        self.tls
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let command = "IDENTIFY_SYSTEM";
        let result = self.simple_query(command).await?;
        let row = self.single_row(command, &result)?;
        let system_id = self.column(command, &result, row, "systemid")?;
        let timeline = self.column(command, &result, row, "timeline")?;
        let flushed_through = self.column(command, &result, row, "xlogpos")?;
        let dbname = column_index(&result, "dbname").and_then(|index| row[index].clone());
        Ok(SystemIdentity {
            system_id: system_id
                .parse()
                .map_err(|_| self.unreadable(command, "systemid", system_id))?,
            timeline: timeline
                .parse()
                .map_err(|_| self.unreadable(command, "timeline", timeline))?,
            flushed_through: flushed_through
                .parse()
                .map_err(|_| self.unreadable(command, "xlogpos", flushed_through))?,
            dbname,
        })
    }

    /// `CREATE_REPLICATION_SLOT slot [TEMPORARY] LOGICAL plugin (SNAPSHOT
    /// 'nothing')`: a slot whose stream starts at its consistent point, with
    /// no snapshot of what came before.
    pub async fn create_slot(
        &mut self,
        slot: &str,
        plugin: &str,
        persistence: SlotPersistence,
    ) -> Result<CreatedSlot, ReplicationError> {
        let command = create_slot_command(slot, plugin, persistence, "nothing")?;
        let result = self.simple_query(&command).await?;
        let row = self.single_row(&command, &result)?;
        self.created_slot(&command, &result, row)
    }

    /// `CREATE_REPLICATION_SLOT slot [TEMPORARY] LOGICAL plugin (SNAPSHOT
    /// 'export')`: a slot, and a snapshot of the database as of its
    /// consistent point, which other connections import with `SET
    /// TRANSACTION SNAPSHOT` in a `REPEATABLE READ` transaction.
    ///
    /// The server keeps the snapshot until this connection's next command
    /// or its end, so the returned [`ExportedSnapshot`] holds the connection
    /// and sends nothing until [`ExportedSnapshot::into_connection`]. On an
    /// error the connection is dropped (and a temporary slot with it).
    pub async fn create_slot_exporting_snapshot(
        mut self,
        slot: &str,
        plugin: &str,
        persistence: SlotPersistence,
    ) -> Result<ExportedSnapshot, ReplicationError> {
        let command = create_slot_command(slot, plugin, persistence, "export")?;
        let result = self.simple_query(&command).await?;
        let row = self.single_row(&command, &result)?;
        let created = self.created_slot(&command, &result, row)?;
        let snapshot_name = column_index(&result, "snapshot_name")
            .and_then(|index| row[index].clone())
            .ok_or_else(|| {
                self.wire
                    .malformed(&command, "no snapshot_name in the answer".to_owned())
            })?;
        debug!(slot = %created.slot_name, consistent_point = %created.consistent_point, %snapshot_name, "slot created with an exported snapshot");
        Ok(ExportedSnapshot {
            connection: self,
            slot: created,
            snapshot_name,
        })
    }

    /// `DROP_REPLICATION_SLOT slot [WAIT]`.
    pub async fn drop_slot(
        &mut self,
        slot: &str,
        when_active: WhenActive,
    ) -> Result<(), ReplicationError> {
        check_slot_name(slot)?;
        let command = match when_active {
            WhenActive::Fail => format!("DROP_REPLICATION_SLOT {}", quote_identifier(slot)),
            WhenActive::Wait => format!("DROP_REPLICATION_SLOT {} WAIT", quote_identifier(slot)),
        };
        self.simple_query(&command).await?;
        Ok(())
    }

    /// `START_REPLICATION SLOT slot LOGICAL start (options)`: the slot's
    /// changes, as a stream of messages. The server streams the
    /// transactions that commit after `start` or after the slot's confirmed
    /// position, whichever is later. `plugin_options` are the output
    /// plugin's, e.g. `[("proto_version", "1"), ("publication_names",
    /// "ferry")]` for `pgoutput`. The connection runs commands again after
    /// [`LogicalReplicationStream::finish`]; on an error it is dropped.
    pub async fn start_logical_replication(
        mut self,
        slot: &str,
        start: Lsn,
        plugin_options: &[(&str, &str)],
    ) -> Result<LogicalReplicationStream, ReplicationError> {
        check_slot_name(slot)?;
        let mut command = format!(
            "START_REPLICATION SLOT {} LOGICAL {start}",
            quote_identifier(slot)
        );
        if !plugin_options.is_empty() {
            let options: Vec<String> = plugin_options
                .iter()
                .map(|(name, value)| format!("{} {}", quote_identifier(name), quote_literal(value)))
                .collect();
            command.push_str(&format!(" ({})", options.join(", ")));
        }
        self.usable(&command)?;
        self.queue_query(&command)?;
        self.send(&command).await?;
        let mut failure = None;
        loop {
            match self.receive(&command).await? {
                Backend::CopyBothResponse => {
                    debug!(%slot, %start, "replication stream started");
                    return Ok(LogicalReplicationStream {
                        connection: self,
                        command,
                        server_finished: false,
                    });
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    failure = Some(self.server_error(&command, body.fields())?);
                }
                Backend::Message(Message::NoticeResponse(body)) => {
                    log_notice(self.server(), body.fields());
                }
                Backend::Message(Message::ParameterStatus(_)) => {}
                Backend::Message(Message::ReadyForQuery(_)) => {
                    return Err(failure.unwrap_or_else(|| {
                        self.wire.malformed(
                            &command,
                            "ReadyForQuery before the stream started".to_owned(),
                        )
                    }));
                }
                _ => {
                    return Err(
                        self.break_off(&command, "an unexpected message before the stream started")
                    );
                }
            }
        }
    }

    /// Ends the session politely (`Terminate`), then closes the socket.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        let command = "Terminate";
        self.usable(command)?;
        frontend::terminate(&mut self.wire.write_buffer);
        self.send(command).await?;
        let _ = self.wire.stream.shutdown().await;
        Ok(())
    }

    fn usable(&self, command: &str) -> Result<(), ReplicationError> {
        match &self.broken {
            None => Ok(()),
            Some(why) => Err(ReplicationError::ConnectionLost {
                server: self.wire.server.clone(),
                command: command.to_owned(),
                reason: format!("an earlier failure left the connection unusable ({why})"),
            }),
        }
    }

    fn queue_query(&mut self, command: &str) -> Result<(), ReplicationError> {
        frontend::query(command, &mut self.wire.write_buffer).map_err(|error| {
            ReplicationError::InvalidRequest {
                reason: format!("cannot send {command}: {error}"),
            }
        })
    }

    async fn send(&mut self, command: &str) -> Result<(), ReplicationError> {
        let sent = self.wire.send(command).await;
        if let Err(error) = &sent {
            self.broken = Some(error.to_string());
        }
        sent
    }

    async fn receive(&mut self, command: &str) -> Result<Backend, ReplicationError> {
        let received = self.wire.receive(command).await;
        if let Err(error) = &received {
            self.broken = Some(error.to_string());
        }
        received
    }

    /// Marks the connection broken by a protocol violation.
    fn break_off(&mut self, command: &str, reason: &str) -> ReplicationError {
        self.broken = Some(reason.to_owned());
        self.wire.malformed(command, reason.to_owned())
    }

    fn server_error(
        &mut self,
        command: &str,
        fields: ErrorFields<'_>,
    ) -> Result<ReplicationError, ReplicationError> {
        match ServerError::parse(fields) {
            Ok(error) => Ok(ReplicationError::Server {
                server: self.wire.server.clone(),
                command: command.to_owned(),
                error: Box::new(error),
            }),
            Err(error) => Err(self.break_off(command, &format!("an unreadable error: {error}"))),
        }
    }

    /// Runs one command in the simple query protocol; its rows in text.
    async fn simple_query(&mut self, command: &str) -> Result<QueryResult, ReplicationError> {
        self.usable(command)?;
        self.queue_query(command)?;
        self.send(command).await?;
        let mut result = QueryResult::default();
        let mut failure = None;
        loop {
            match self.receive(command).await? {
                Backend::Message(Message::RowDescription(body)) => {
                    result.columns = match body
                        .fields()
                        .map(|field| Ok(field.name().to_owned()))
                        .collect()
                    {
                        Ok(columns) => columns,
                        Err(error) => {
                            return Err(self.break_off(
                                command,
                                &format!("an unreadable row description: {error}"),
                            ));
                        }
                    };
                }
                Backend::Message(Message::DataRow(body)) => {
                    let buffer = body.buffer();
                    let row: Result<Row, io::Error> = body
                        .ranges()
                        .map(|range| {
                            Ok(range
                                .map(|range| String::from_utf8_lossy(&buffer[range]).into_owned()))
                        })
                        .collect();
                    match row {
                        Ok(row) => result.rows.push(row),
                        Err(error) => {
                            return Err(
                                self.break_off(command, &format!("an unreadable row: {error}"))
                            );
                        }
                    }
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    failure = Some(self.server_error(command, body.fields())?);
                }
                Backend::Message(Message::NoticeResponse(body)) => {
                    log_notice(self.server(), body.fields());
                }
                Backend::Message(
                    Message::CommandComplete(_)
                    | Message::EmptyQueryResponse
                    | Message::ParameterStatus(_),
                ) => {}
                Backend::Message(Message::ReadyForQuery(_)) => break,
                _ => {
                    return Err(self.break_off(command, "an unexpected message for a command"));
                }
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(result),
        }
    }

    fn single_row<'result>(
        &self,
        command: &str,
        result: &'result QueryResult,
    ) -> Result<&'result Row, ReplicationError> {
        match result.rows.as_slice() {
            [row] if row.len() == result.columns.len() => Ok(row),
            rows => Err(self.wire.malformed(
                command,
                format!(
                    "{} rows of {} columns where one row was expected",
                    rows.len(),
                    result.columns.len()
                ),
            )),
        }
    }

    fn column<'row>(
        &self,
        command: &str,
        result: &QueryResult,
        row: &'row Row,
        name: &str,
    ) -> Result<&'row str, ReplicationError> {
        column_index(result, name)
            .and_then(|index| row[index].as_deref())
            .ok_or_else(|| {
                self.wire
                    .malformed(command, format!("no {name} in the answer"))
            })
    }

    fn unreadable(&self, command: &str, name: &str, value: &str) -> ReplicationError {
        self.wire
            .malformed(command, format!("{name} {value:?} cannot be read"))
    }

    fn created_slot(
        &self,
        command: &str,
        result: &QueryResult,
        row: &Row,
    ) -> Result<CreatedSlot, ReplicationError> {
        let consistent_point = self.column(command, result, row, "consistent_point")?;
        Ok(CreatedSlot {
            slot_name: self.column(command, result, row, "slot_name")?.to_owned(),
            consistent_point: consistent_point
                .parse()
                .map_err(|_| self.unreadable(command, "consistent_point", consistent_point))?,
            output_plugin: self
                .column(command, result, row, "output_plugin")?
                .to_owned(),
        })
    }
}

fn column_index(result: &QueryResult, name: &str) -> Option<usize> {
    result.columns.iter().position(|column| column == name)
}

/// Sends `SSLRequest` and sets up TLS when the mode asks for it. Returns
/// the stream, and for a TLS one the channel binding its certificate gives
/// (`Some(None)` when it gives none).
async fn negotiate_tls(
    mut tcp: TcpStream,
    config: &ConnectionConfig,
    tls_config: Option<ClientConfig>,
    server: &str,
) -> Result<(Box<dyn Transport>, Option<Option<Vec<u8>>>), ReplicationError> {
    let Some(tls_config) = tls_config else {
        return Ok((Box::new(tcp), None));
    };
    let lost = |error: io::Error| ReplicationError::ConnectionLost {
        server: server.to_owned(),
        command: "the TLS request".to_owned(),
        reason: error.to_string(),
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(lost)?;
    // One byte, read unbuffered: nothing the server sends before the
    // handshake may be taken as sent under TLS (CVE-2021-23222).
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(lost)?;
    match answer[0] {
        b'S' => {}
        b'N' if config.tls.mode == SslMode::Prefer => return Ok((Box::new(tcp), None)),
        b'N' => {
            return Err(ReplicationError::Tls {
                server: server.to_owned(),
                reason: format!(
                    "the server does not accept TLS and sslmode is {}; turn ssl on in its postgresql.conf, or lower sslmode (prefer or disable)",
                    config.tls.mode
                ),
            });
        }
        other => {
            return Err(ReplicationError::Protocol {
                server: server.to_owned(),
                command: "the TLS request".to_owned(),
                reason: format!("it answered {:?}, neither S nor N", char::from(other)),
            });
        }
    }
    let server_name = match ServerName::try_from(config.host.clone()) {
        Ok(name) => name,
        Err(error) if config.tls.mode == SslMode::VerifyFull => {
            return Err(ReplicationError::InvalidRequest {
                reason: format!(
                    "sslmode=verify-full checks the host name, and {:?} is none: {error}",
                    config.host
                ),
            });
        }
        // Not compared with the certificate in the other modes.
        Err(_) => ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()),
    };
    let stream = TlsConnector::from(Arc::new(tls_config))
        .connect(server_name, tcp)
        .await
        .map_err(|error| ReplicationError::Tls {
            server: server.to_owned(),
            reason: describe_io_error(&error),
        })?;
    let channel_binding = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certificates| certificates.first())
        .and_then(|certificate| tls_server_end_point(certificate));
    Ok((Box::new(stream), Some(channel_binding)))
}

/// What a server said while a session started: its parameters, its key
/// for cancel requests, and how the session authenticated.
#[derive(Debug, Clone)]
pub struct SessionStart {
    /// Every `ParameterStatus` the server sent, in order.
    pub parameters: Vec<(String, String)>,
    /// The session's process id (`BackendKeyData`).
    pub backend_pid: i32,
    /// The secret key of its cancel requests (`BackendKeyData`).
    pub secret_key: i32,
    /// How it authenticated.
    pub authentication: AuthenticationMethod,
    /// Whether it runs over TLS.
    pub tls: bool,
}

/// A session logged in and ready for queries ([`log_in`]): its byte
/// stream, and what the server sent that was read past `ReadyForQuery`
/// (nothing, unless the server sent something unasked at once).
pub struct LoggedIn {
    /// The stream, TLS or not, after the server's `ReadyForQuery`.
    pub stream: Box<dyn Transport>,
    /// Bytes read from the stream past `ReadyForQuery`: they come first.
    pub buffered: BytesMut,
    /// What the server said while the session started.
    pub start: SessionStart,
}

impl fmt::Debug for LoggedIn {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("LoggedIn")
            .field("start", &self.start)
            .field("buffered", &self.buffered.len())
            .finish_non_exhaustive()
    }
}

/// Connects to `config`'s server over TCP, with TLS as its `sslmode` says,
/// within its connect timeout, and sends nothing more: for a proxy that
/// passes a client's own startup and authentication through.
pub async fn connect_transport(
    config: &ConnectionConfig,
) -> Result<Box<dyn Transport>, ReplicationError> {
    let server = config.server();
    match tokio::time::timeout(config.connect_timeout, open_stream(config, &server)).await {
        Ok(connected) => connected.map(|(stream, _channel_binding)| stream),
        Err(_elapsed) => Err(ReplicationError::Unreachable {
            server: server.clone(),
            reason: format!("not connected within {:?}", config.connect_timeout),
        }),
    }
}

/// Starts an ordinary session (not a replication one) with the startup
/// `parameters` given (`user` and `database` among them, else `config`'s),
/// authenticating with `config`'s password, within its connect timeout:
/// for a proxy that moves a client's session to another server.
pub async fn log_in(
    config: &ConnectionConfig,
    parameters: &[(String, String)],
) -> Result<LoggedIn, ReplicationError> {
    let mut startup: Vec<(&str, &str)> = parameters
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    for (name, value) in [("user", &config.user), ("database", &config.dbname)] {
        if !startup.iter().any(|(given, _)| *given == name) {
            startup.push((name, value));
        }
    }
    let server = config.server();
    match tokio::time::timeout(config.connect_timeout, start_session(config, &startup)).await {
        Ok(started) => started.map(|(wire, start)| LoggedIn {
            stream: wire.stream,
            buffered: wire.read_buffer,
            start,
        }),
        Err(_elapsed) => Err(ReplicationError::Unreachable {
            server,
            reason: format!(
                "not connected and logged in within {:?}",
                config.connect_timeout
            ),
        }),
    }
}

/// Connects over TCP (no Nagle: status updates and a proxy's small
/// messages must not wait) and negotiates TLS as `config` says: the stream,
/// and the server certificate's hash for channel binding when over TLS.
async fn open_stream(
    config: &ConnectionConfig,
    server: &str,
) -> Result<(Box<dyn Transport>, Option<Option<Vec<u8>>>), ReplicationError> {
    let unreachable = |error: io::Error| ReplicationError::Unreachable {
        server: server.to_owned(),
        reason: error.to_string(),
    };
    let tls_config = tls_client_config(&config.tls).await?;
    let tcp = TcpStream::connect((config.host.as_str(), config.port))
        .await
        .map_err(unreachable)?;
    tcp.set_nodelay(true).map_err(unreachable)?;
    negotiate_tls(tcp, config, tls_config, server).await
}

/// Connects, sends the startup message with `parameters`, authenticates
/// and reads up to the first `ReadyForQuery`.
async fn start_session(
    config: &ConnectionConfig,
    parameters: &[(&str, &str)],
) -> Result<(Wire, SessionStart), ReplicationError> {
    let server = config.server();
    let (stream, channel_binding) = open_stream(config, &server).await?;
    let tls = channel_binding.is_some();
    let mut wire = Wire::new(stream, server.clone());
    let startup = "the connection's startup";
    frontend::startup_message(parameters.iter().copied(), &mut wire.write_buffer).map_err(
        |error| ReplicationError::InvalidRequest {
            reason: format!("cannot send the user, database or application name: {error}"),
        },
    )?;
    wire.send(startup).await?;
    let authentication =
        authenticate(&mut wire, config, channel_binding.flatten(), startup).await?;
    let mut start = SessionStart {
        parameters: Vec::new(),
        backend_pid: 0,
        secret_key: 0,
        authentication,
        tls,
    };
    loop {
        match wire.receive(startup).await? {
            Backend::Message(Message::ParameterStatus(body)) => {
                let name = body.name().unwrap_or_default().to_owned();
                let value = body.value().unwrap_or_default().to_owned();
                start.parameters.push((name, value));
            }
            Backend::Message(Message::BackendKeyData(body)) => {
                start.backend_pid = body.process_id();
                start.secret_key = body.secret_key();
            }
            Backend::Message(Message::NoticeResponse(body)) => {
                log_notice(&server, body.fields());
            }
            Backend::Message(Message::ReadyForQuery(_)) => return Ok((wire, start)),
            Backend::Message(Message::ErrorResponse(body)) => {
                let error = ServerError::parse(body.fields())
                    .map_err(|error| wire.malformed(startup, error.to_string()))?;
                return Err(refused_at_startup(&server, &config.user, error));
            }
            _ => {
                return Err(wire.malformed(
                    startup,
                    "an unexpected message before ReadyForQuery".to_owned(),
                ));
            }
        }
    }
}

/// Answers the server's authentication requests until it says OK.
async fn authenticate(
    wire: &mut Wire,
    config: &ConnectionConfig,
    mut channel_binding: Option<Vec<u8>>,
    startup: &str,
) -> Result<AuthenticationMethod, ReplicationError> {
    let mut method = AuthenticationMethod::None;
    let mut scram: Option<ScramSha256> = None;
    let server = wire.server.clone();
    let refused = |reason: String| ReplicationError::Authentication {
        server: server.clone(),
        user: config.user.clone(),
        reason,
    };
    let password = || {
        config.password.as_deref().ok_or_else(|| {
            refused(
                "the server asks for a password and none was given (PGPASSWORD, PGPASSFILE or a password file)"
                    .to_owned(),
            )
        })
    };
    let cannot_send = |error: io::Error| ReplicationError::InvalidRequest {
        reason: format!("cannot send the password: {error}"),
    };
    loop {
        match wire.receive(startup).await? {
            Backend::Message(Message::AuthenticationOk) => return Ok(method),
            Backend::Message(Message::AuthenticationCleartextPassword) => {
                method = AuthenticationMethod::Cleartext;
                frontend::password_message(password()?.as_bytes(), &mut wire.write_buffer)
                    .map_err(cannot_send)?;
            }
            Backend::Message(Message::AuthenticationMd5Password(body)) => {
                method = AuthenticationMethod::Md5;
                let hash = postgres_protocol::authentication::md5_hash(
                    config.user.as_bytes(),
                    password()?.as_bytes(),
                    body.salt(),
                );
                frontend::password_message(hash.as_bytes(), &mut wire.write_buffer)
                    .map_err(cannot_send)?;
            }
            Backend::Message(Message::AuthenticationSasl(body)) => {
                let mut offered = Vec::new();
                let mut mechanisms = body.mechanisms();
                while let Some(mechanism) = mechanisms
                    .next()
                    .map_err(|error| wire.malformed(startup, error.to_string()))?
                {
                    offered.push(mechanism.to_owned());
                }
                let offers = |name: &str| offered.iter().any(|mechanism| mechanism == name);
                // As libpq's channel_binding=prefer: bound when both can.
                let (mechanism, binding, chosen) = match channel_binding.take() {
                    Some(digest) if offers(sasl::SCRAM_SHA_256_PLUS) => (
                        sasl::SCRAM_SHA_256_PLUS,
                        ChannelBinding::tls_server_end_point(digest),
                        AuthenticationMethod::ScramSha256Plus,
                    ),
                    // Could bind, but the server did not offer it: saying so
                    // lets the server detect a downgrade by a middleman.
                    Some(_) if offers(sasl::SCRAM_SHA_256) => (
                        sasl::SCRAM_SHA_256,
                        ChannelBinding::unrequested(),
                        AuthenticationMethod::ScramSha256,
                    ),
                    None if offers(sasl::SCRAM_SHA_256) => (
                        sasl::SCRAM_SHA_256,
                        ChannelBinding::unsupported(),
                        AuthenticationMethod::ScramSha256,
                    ),
                    _ => {
                        return Err(refused(format!(
                            "the server offers SASL mechanisms {offered:?}, and ferry speaks SCRAM-SHA-256 only"
                        )));
                    }
                };
                method = chosen;
                let exchange = ScramSha256::new(password()?.as_bytes(), binding);
                frontend::sasl_initial_response(
                    mechanism,
                    exchange.message(),
                    &mut wire.write_buffer,
                )
                .map_err(cannot_send)?;
                scram = Some(exchange);
            }
            Backend::Message(Message::AuthenticationSaslContinue(body)) => {
                let Some(exchange) = scram.as_mut() else {
                    return Err(wire.malformed(
                        startup,
                        "a SCRAM continuation before the exchange began".to_owned(),
                    ));
                };
                exchange.update(body.data()).map_err(|error| {
                    wire.malformed(startup, format!("an unreadable SCRAM message: {error}"))
                })?;
                frontend::sasl_response(exchange.message(), &mut wire.write_buffer)
                    .map_err(cannot_send)?;
            }
            Backend::Message(Message::AuthenticationSaslFinal(body)) => {
                let Some(exchange) = scram.as_mut() else {
                    return Err(wire.malformed(
                        startup,
                        "a SCRAM final message before the exchange began".to_owned(),
                    ));
                };
                exchange.finish(body.data()).map_err(|error| {
                    refused(format!(
                        "the server could not prove it knows the password ({error}); it may not be the server it claims to be"
                    ))
                })?;
                // AuthenticationOk follows; nothing to send.
                continue;
            }
            Backend::Message(
                Message::AuthenticationKerberosV5
                | Message::AuthenticationGss
                | Message::AuthenticationGssContinue(_)
                | Message::AuthenticationSspi
                | Message::AuthenticationScmCredential,
            ) => {
                return Err(refused(
                    "the server asks for Kerberos, GSSAPI or SSPI authentication, which ferry does not speak; give the user a password (scram-sha-256) in pg_hba.conf"
                        .to_owned(),
                ));
            }
            Backend::Message(Message::ErrorResponse(body)) => {
                let error = ServerError::parse(body.fields())
                    .map_err(|error| wire.malformed(startup, error.to_string()))?;
                return Err(refused_at_startup(&wire.server, &config.user, error));
            }
            Backend::Message(Message::NoticeResponse(body)) => {
                log_notice(&wire.server, body.fields());
                continue;
            }
            _ => {
                return Err(wire.malformed(
                    startup,
                    "an unexpected message during authentication".to_owned(),
                ));
            }
        }
        wire.send(startup).await?;
    }
}

/// PostgreSQL's rule for slot names, checked before sending so the error
/// says what to change.
fn check_slot_name(slot: &str) -> Result<(), ReplicationError> {
    let valid = (1..=63).contains(&slot.len())
        && slot
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_');
    if valid {
        Ok(())
    } else {
        Err(ReplicationError::InvalidRequest {
            reason: format!(
                "{slot:?} cannot name a replication slot: use 1 to 63 lowercase letters, digits and underscores"
            ),
        })
    }
}

fn create_slot_command(
    slot: &str,
    plugin: &str,
    persistence: SlotPersistence,
    snapshot: &str,
) -> Result<String, ReplicationError> {
    check_slot_name(slot)?;
    let temporary = match persistence {
        SlotPersistence::Temporary => " TEMPORARY",
        SlotPersistence::Persistent => "",
    };
    Ok(format!(
        "CREATE_REPLICATION_SLOT {}{temporary} LOGICAL {} (SNAPSHOT '{snapshot}')",
        quote_identifier(slot),
        quote_identifier(plugin)
    ))
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

// ---------------------------------------------------------------------------
// The exported snapshot

/// A slot just created and the snapshot exported with it, alive while this
/// holds the connection: import it elsewhere with `BEGIN ISOLATION LEVEL
/// REPEATABLE READ; SET TRANSACTION SNAPSHOT '<name>'`. A transaction that
/// imported it keeps it after it is released.
#[derive(Debug)]
pub struct ExportedSnapshot {
    connection: ReplicationConnection,
    slot: CreatedSlot,
    snapshot_name: String,
}

impl ExportedSnapshot {
    /// The snapshot's name, for `SET TRANSACTION SNAPSHOT`.
    pub fn snapshot_name(&self) -> &str {
        &self.snapshot_name
    }

    /// The slot created with it.
    pub fn slot(&self) -> &CreatedSlot {
        &self.slot
    }

    /// The connection, to run the next command on: the snapshot ends with
    /// that command (or when the connection ends).
    pub fn into_connection(self) -> ReplicationConnection {
        self.connection
    }
}

// ---------------------------------------------------------------------------
// The stream

/// The slot's changes, as `START_REPLICATION` streams them. Read with
/// [`LogicalReplicationStream::next_message`]; tell the server how far the
/// changes are durable with [`LogicalReplicationStream::send_standby_status`],
/// at once when a [`Keepalive`] asks for a reply and at least every
/// `wal_sender_timeout / 2` (30 s by default) otherwise, or the server ends
/// the stream.
#[derive(Debug)]
pub struct LogicalReplicationStream {
    connection: ReplicationConnection,
    command: String,
    /// The server ended the stream (CopyDone).
    server_finished: bool,
}

/// One message of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: for a logical slot, one message of the output plugin.
    XLogData(XLogData),
    /// The server's heartbeat.
    Keepalive(Keepalive),
}

/// `XLogData`: one output plugin message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XLogData {
    /// Where in the WAL the data starts (for pgoutput: the LSN of the
    /// change, or of the commit for a commit message).
    pub wal_start: Lsn,
    /// The server's WAL end when it sent this.
    pub wal_end: Lsn,
    /// The server's clock when it sent this.
    pub server_time: SystemTime,
    /// The output plugin's message, as it wrote it.
    pub data: Bytes,
}

/// The server's keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// The server's WAL end.
    pub wal_end: Lsn,
    /// The server's clock when it sent this.
    pub server_time: SystemTime,
    /// The server asks for a [`StandbyStatus`] now, or it may end the
    /// stream for `wal_sender_timeout`.
    pub reply_requested: bool,
}

/// A standby status update: how far the client has the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatus {
    /// Received through here.
    pub written: Lsn,
    /// Durable through here: the slot's `confirmed_flush_lsn` moves here,
    /// and the server may recycle the WAL before it.
    pub flushed: Lsn,
    /// Applied through here.
    pub applied: Lsn,
    /// Ask the server to answer with a keepalive at once.
    pub reply_requested: bool,
}

impl StandbyStatus {
    /// Everything through `lsn` is received, durable and applied.
    pub fn through(lsn: Lsn) -> Self {
        Self {
            written: lsn,
            flushed: lsn,
            applied: lsn,
            reply_requested: false,
        }
    }
}

const XLOG_DATA_TAG: u8 = b'w';
const KEEPALIVE_TAG: u8 = b'k';
const STANDBY_STATUS_TAG: u8 = b'r';

impl LogicalReplicationStream {
    /// The next message, or `None` once the server ended the stream.
    /// Cancel-safe: a message half read when the future is dropped is read
    /// whole by the next call, so it can sit in a `select!` beside a timer.
    pub async fn next_message(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        if self.server_finished {
            return Ok(None);
        }
        let command = self.command.as_str();
        self.connection.usable(command)?;
        loop {
            match self.connection.receive(command).await? {
                Backend::Message(Message::CopyData(body)) => {
                    return match parse_replication_message(body.into_bytes()) {
                        Ok(message) => Ok(Some(message)),
                        Err(reason) => Err(self.connection.break_off(command, &reason)),
                    };
                }
                Backend::Message(Message::CopyDone) => {
                    self.server_finished = true;
                    return Ok(None);
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    let error = self.connection.server_error(command, body.fields())?;
                    // A walsender's error in the stream ends its session.
                    self.connection.broken = Some(error.to_string());
                    return Err(error);
                }
                Backend::Message(Message::NoticeResponse(body)) => {
                    log_notice(self.connection.server(), body.fields());
                }
                Backend::Message(Message::ParameterStatus(_)) => {}
                _ => {
                    return Err(self
                        .connection
                        .break_off(command, "an unexpected message in the stream"));
                }
            }
        }
    }

    /// Sends a standby status update.
    pub async fn send_standby_status(
        &mut self,
        status: StandbyStatus,
    ) -> Result<(), ReplicationError> {
        let command = self.command.as_str();
        self.connection.usable(command)?;
        let mut update = BytesMut::with_capacity(34);
        update.put_u8(STANDBY_STATUS_TAG);
        update.put_u64(status.written.0);
        update.put_u64(status.flushed.0);
        update.put_u64(status.applied.0);
        update.put_i64(postgres_time_now());
        update.put_u8(u8::from(status.reply_requested));
        frontend::CopyData::new(update.freeze())
            .map_err(|error| ReplicationError::InvalidRequest {
                reason: format!("cannot send a standby status update: {error}"),
            })?
            .write(&mut self.connection.wire.write_buffer);
        self.connection.send(command).await
    }

    /// Ends the stream (`CopyDone`), reads what the server still sends
    /// until it ends its side, and returns the connection for more
    /// commands.
    pub async fn finish(mut self) -> Result<ReplicationConnection, ReplicationError> {
        let command = self.command.as_str();
        self.connection.usable(command)?;
        frontend::copy_done(&mut self.connection.wire.write_buffer);
        self.connection.send(command).await?;
        let mut failure = None;
        loop {
            match self.connection.receive(command).await? {
                // Changes sent before the server read the CopyDone.
                Backend::Message(Message::CopyData(_)) => {}
                Backend::Message(Message::CopyDone) => self.server_finished = true,
                Backend::Message(
                    Message::CommandComplete(_)
                    | Message::ParameterStatus(_)
                    | Message::NoticeResponse(_),
                ) => {}
                Backend::Message(Message::ErrorResponse(body)) => {
                    failure = Some(self.connection.server_error(command, body.fields())?);
                }
                Backend::Message(Message::ReadyForQuery(_)) => break,
                _ => {
                    return Err(self
                        .connection
                        .break_off(command, "an unexpected message as the stream ended"));
                }
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(self.connection),
        }
    }
}

fn parse_replication_message(mut data: Bytes) -> Result<ReplicationMessage, String> {
    let Some(&tag) = data.first() else {
        return Err("an empty CopyData message".to_owned());
    };
    match tag {
        XLOG_DATA_TAG if data.len() >= 25 => {
            data.advance(1);
            let wal_start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let server_time = postgres_time(data.get_i64());
            Ok(ReplicationMessage::XLogData(XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            }))
        }
        KEEPALIVE_TAG if data.len() >= 18 => {
            data.advance(1);
            let wal_end = Lsn(data.get_u64());
            let server_time = postgres_time(data.get_i64());
            let reply_requested = data.get_u8() != 0;
            Ok(ReplicationMessage::Keepalive(Keepalive {
                wal_end,
                server_time,
                reply_requested,
            }))
        }
        XLOG_DATA_TAG | KEEPALIVE_TAG => Err(format!(
            "a {:?} message of {} bytes, too short",
            char::from(tag),
            data.len()
        )),
        other => Err(format!(
            "a replication message of unknown type {:?}",
            char::from(other)
        )),
    }
}

/// A PostgreSQL timestamp (microseconds since 2000-01-01 UTC) as a
/// `SystemTime`.
fn postgres_time(microseconds: i64) -> SystemTime {
    let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECONDS);
    let offset = Duration::from_micros(microseconds.unsigned_abs());
    if microseconds >= 0 {
        epoch + offset
    } else {
        epoch - offset
    }
}

/// Now, as a PostgreSQL timestamp.
fn postgres_time_now() -> i64 {
    let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECONDS);
    SystemTime::now()
        .duration_since(epoch)
        .map(|since| i64::try_from(since.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_lsn_reads_and_writes_as_postgresql_writes_it() {
        let lsn: Lsn = "16/B374D848".parse().expect("an LSN");
        assert_eq!(lsn, Lsn(0x16_B374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!("0/0000ABCD".parse::<Lsn>().expect("padded"), Lsn(0xABCD));
        for bad in ["", "16", "16/", "/1", "x/1", "1/2/3", "100000000/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} is refused");
        }
        assert_eq!(Position::from(lsn), Position(0x16_B374_D848));
    }

    #[test]
    fn sslmodes_read_as_libpq_names_them() {
        for mode in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(mode.as_str().parse::<SslMode>().expect("a mode"), mode);
        }
        let refused = "allow".parse::<SslMode>().expect_err("allow is refused");
        assert!(refused.to_string().contains("verify-full"), "{refused}");
        assert_eq!(SslMode::default(), SslMode::Prefer);
    }

    #[test]
    fn debug_never_shows_the_password() {
        let mut config = ConnectionConfig::new("db.example", 5432, "ferry", "app");
        config.password = Some("s3cret-pa55".to_owned());
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret-pa55"), "{shown}");
        assert!(shown.contains("<hidden>"), "{shown}");
        assert_eq!(config.server(), "db.example:5432");
        config.host = "::1".to_owned();
        assert_eq!(config.server(), "[::1]:5432");
    }

    #[test]
    fn commands_are_written_with_quoted_names() {
        assert_eq!(
            create_slot_command("ferry_1", PGOUTPUT, SlotPersistence::Temporary, "export")
                .expect("a valid name"),
            "CREATE_REPLICATION_SLOT \"ferry_1\" TEMPORARY LOGICAL \"pgoutput\" (SNAPSHOT 'export')"
        );
        assert_eq!(
            create_slot_command("s", "wal2json", SlotPersistence::Persistent, "nothing")
                .expect("a valid name"),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL \"wal2json\" (SNAPSHOT 'nothing')"
        );
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn slot_names_postgresql_would_refuse_are_refused_first() {
        for bad in [
            "",
            "Upper",
            "has-dash",
            "space d",
            "quote\"",
            &"a".repeat(64),
        ] {
            let error = check_slot_name(bad).expect_err("refused");
            assert!(error.to_string().contains("lowercase letters"), "{error}");
            assert_eq!(error.class(), ErrorClass::Invalid);
        }
        check_slot_name(&"a".repeat(63)).expect("63 characters are fine");
        check_slot_name("ferry_0").expect("fine");
    }

    #[test]
    fn xlogdata_and_keepalives_are_read_from_copydata() {
        let mut xlog = BytesMut::new();
        xlog.put_u8(b'w');
        xlog.put_u64(0x10);
        xlog.put_u64(0x20);
        xlog.put_i64(1_000_000);
        xlog.put_slice(b"B...");
        let message = parse_replication_message(xlog.freeze()).expect("XLogData");
        assert_eq!(
            message,
            ReplicationMessage::XLogData(XLogData {
                wal_start: Lsn(0x10),
                wal_end: Lsn(0x20),
                server_time: SystemTime::UNIX_EPOCH
                    + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECONDS + 1),
                data: Bytes::from_static(b"B..."),
            })
        );
        let mut keepalive = BytesMut::new();
        keepalive.put_u8(b'k');
        keepalive.put_u64(0x30);
        keepalive.put_i64(-1_000_000);
        keepalive.put_u8(1);
        let message = parse_replication_message(keepalive.freeze()).expect("keepalive");
        assert_eq!(
            message,
            ReplicationMessage::Keepalive(Keepalive {
                wal_end: Lsn(0x30),
                server_time: SystemTime::UNIX_EPOCH
                    + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECONDS - 1),
                reply_requested: true,
            })
        );
        assert!(parse_replication_message(Bytes::from_static(b"w123")).is_err());
        assert!(parse_replication_message(Bytes::from_static(b"")).is_err());
        let unknown = parse_replication_message(Bytes::from_static(b"z")).expect_err("unknown");
        assert!(unknown.contains("unknown type"), "{unknown}");
    }

    #[test]
    fn server_errors_name_the_server_the_command_and_the_sqlstate() {
        let error = ReplicationError::Server {
            server: "10.0.0.5:5432".to_owned(),
            command: "DROP_REPLICATION_SLOT \"gone\"".to_owned(),
            error: Box::new(ServerError {
                severity: "ERROR".to_owned(),
                code: "42704".to_owned(),
                message: "replication slot \"gone\" does not exist".to_owned(),
                detail: None,
                hint: Some("create it first".to_owned()),
            }),
        };
        assert_eq!(
            error.to_string(),
            "PostgreSQL at 10.0.0.5:5432 refused DROP_REPLICATION_SLOT \"gone\": replication slot \"gone\" does not exist (SQLSTATE 42704); hint: create it first"
        );
        assert_eq!(error.sqlstate(), Some("42704"));
        assert_eq!(error.class(), ErrorClass::NotFound);
    }

    #[test]
    fn sqlstates_are_classed_by_what_the_caller_should_do() {
        assert_eq!(class_of_sqlstate("57P01"), ErrorClass::Transient);
        assert_eq!(class_of_sqlstate("08006"), ErrorClass::Transient);
        assert_eq!(class_of_sqlstate("53300"), ErrorClass::Transient);
        assert_eq!(class_of_sqlstate("42710"), ErrorClass::Precondition);
        assert_eq!(class_of_sqlstate("55006"), ErrorClass::Precondition);
        assert_eq!(class_of_sqlstate("53400"), ErrorClass::Precondition);
        assert_eq!(class_of_sqlstate("42601"), ErrorClass::Invalid);
        assert_eq!(class_of_sqlstate("54000"), ErrorClass::TooLarge);
    }

    #[test]
    fn startup_refusals_say_what_to_fix() {
        let refusal = |code: &str, message: &str| ServerError {
            severity: "FATAL".to_owned(),
            code: code.to_owned(),
            message: message.to_owned(),
            detail: None,
            hint: None,
        };
        let password = refused_at_startup(
            "127.0.0.1:5432",
            "ferry",
            refusal("28P01", "password authentication failed for user \"ferry\""),
        );
        assert!(
            matches!(password, ReplicationError::Authentication { .. }),
            "{password:?}"
        );
        assert!(
            password.to_string().contains("SQLSTATE 28P01"),
            "{password}"
        );
        let not_replication = refused_at_startup(
            "127.0.0.1:5432",
            "app",
            refusal(
                "42501",
                "must be superuser or replication role to start walsender",
            ),
        );
        assert!(
            not_replication
                .to_string()
                .contains("ALTER ROLE app REPLICATION"),
            "{not_replication}"
        );
        assert_eq!(not_replication.class(), ErrorClass::Precondition);
    }

    #[test]
    fn postgresql_time_counts_from_2000() {
        assert_eq!(
            postgres_time(0),
            SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_800)
        );
        assert!(postgres_time_now() > 800_000_000_000_000, "after 2025");
    }
}

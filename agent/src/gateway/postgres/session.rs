//! One client session through the gateway: its startup (TLS, cancel
//! requests, authentication passed through), then the relay of its
//! messages both ways, its units of work through the gate, and its move to
//! the new server after a switch (see the kind's documentation).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use ferry_engine::adapters::postgres::replication::{Transport, connect_transport, log_in};
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::wire::{self, Frame, Frames};
use super::{CancelTarget, PgClientLimits, PgUpstream, Sessions};
use crate::gateway::Shared;
use crate::gateway::UpstreamPlane;
use crate::gateway::gate::{Admission, Gate, GateRefusal, HoldId, WritePermit};

type Stream = Box<dyn Transport>;
type Reader = Frames<ReadHalf<Stream>>;
type Writer = WriteHalf<Stream>;

/// SQLSTATE `admin_shutdown`: pools take it as "reconnect".
const ADMIN_SHUTDOWN: &str = "57P01";
/// SQLSTATE `cannot_connect_now`.
const CANNOT_CONNECT_NOW: &str = "57P03";
/// SQLSTATE `protocol_violation`.
const PROTOCOL_VIOLATION: &str = "08P01";
/// SQLSTATE `feature_not_supported`.
const NOT_SUPPORTED: &str = "0A000";
/// SQLSTATE `invalid_authorization_specification`.
const NO_USER: &str = "28000";

/// Why a session ended early, for the gateway's log (the client was told
/// already, when it could be).
type Ended = String;

/// Serves one client connection to its end.
pub(super) async fn serve(
    shared: Arc<Shared<PgUpstream>>,
    sessions: Arc<Sessions>,
    tcp: TcpStream,
    acceptor: Option<TlsAcceptor>,
    limits: PgClientLimits,
) {
    let peer = tcp
        .peer_addr()
        .map(|address| address.to_string())
        .unwrap_or_default();
    if let Err(reason) = run(shared, sessions, tcp, acceptor, limits).await {
        debug!(%peer, %reason, "a PostgreSQL session through the gateway ended");
    }
}

async fn run(
    shared: Arc<Shared<PgUpstream>>,
    sessions: Arc<Sessions>,
    tcp: TcpStream,
    acceptor: Option<TlsAcceptor>,
    limits: PgClientLimits,
) -> Result<(), Ended> {
    let Some((client, startup)) = negotiate(tcp, acceptor, &sessions).await? else {
        return Ok(());
    };
    let (client_read, mut to_client) = tokio::io::split(client);
    let mut from_client = Frames::new(client_read, BytesMut::new(), limits.max_message_bytes);
    let parameters = match startup_parameters(&startup) {
        Ok(parameters) => parameters,
        Err((code, message)) => {
            return refuse(&mut to_client, "FATAL", code, &message).await;
        }
    };
    // A startup writes nothing and passes a hold: it is the session's
    // first statement that waits. Holding startups would deadlock a client
    // that connects synchronously on a thread that also drives sessions in
    // the middle of a transaction (pgbench -C does): the drain would wait
    // for a transaction its client cannot finish. A session that started
    // on the old server before a switch moves before its first statement.
    let upstream = shared.upstream.borrow().clone();
    let server = match connect_transport(&upstream.transport_config()).await {
        Ok(server) => server,
        Err(error) => {
            let message = format!("ferry's gateway cannot reach {}: {error}", upstream.url());
            return refuse(&mut to_client, "FATAL", CANNOT_CONNECT_NOW, &message).await;
        }
    };
    let (server_read, mut to_server) = tokio::io::split(server);
    let mut from_server = Frames::new(server_read, BytesMut::new(), wire::MAX_MESSAGE_BYTES);
    send(&mut to_server, &startup).await?;
    let client_key = sessions.new_key();
    let start = relay_startup(
        &mut from_client,
        &mut to_client,
        &mut from_server,
        &mut to_server,
        client_key,
    )
    .await?;
    sessions.set(
        client_key,
        CancelTarget {
            server: upstream.transport_config(),
            pid: start.pid,
            key: start.key,
        },
    );
    let user = parameter(&parameters, "user").unwrap_or_default();
    let database = parameter(&parameters, "database").unwrap_or_else(|| user.clone());
    let mut session = Session {
        shared,
        sessions: sessions.clone(),
        client_key,
        to_client,
        to_server,
        upstream,
        parameters,
        server_parameters: start.parameters,
        user,
        database,
        permit: None,
        pending: 0,
        unsynced: false,
        named_statements: false,
        cut_for: None,
    };
    let ended = session.relay(from_client, from_server).await;
    sessions.remove(client_key);
    ended
}

/// Reads startup packets until the client's `StartupMessage`, answering
/// TLS and GSSAPI requests and passing a cancel request on: the client's
/// stream (TLS or not) and its startup packet, or `None` when the
/// connection had nothing more to do.
async fn negotiate(
    tcp: TcpStream,
    acceptor: Option<TlsAcceptor>,
    sessions: &Sessions,
) -> Result<Option<(Stream, Bytes)>, Ended> {
    let mut client: Stream = Box::new(tcp);
    let mut encrypted = false;
    loop {
        let Some(packet) = wire::read_startup_packet(&mut client)
            .await
            .map_err(|error| format!("reading the startup packet: {error}"))?
        else {
            return Ok(None);
        };
        match wire::startup_code(&packet) {
            wire::SSL_REQUEST if !encrypted => match &acceptor {
                Some(acceptor) => {
                    send(&mut client, b"S").await?;
                    client = Box::new(
                        acceptor
                            .accept(client)
                            .await
                            .map_err(|error| format!("the TLS handshake failed: {error}"))?,
                    );
                    encrypted = true;
                }
                None => send(&mut client, b"N").await?,
            },
            wire::GSSENC_REQUEST if !encrypted => send(&mut client, b"N").await?,
            wire::CANCEL_REQUEST => {
                cancel(sessions, &packet).await;
                return Ok(None);
            }
            code if code >> 16 == wire::PROTOCOL_3 >> 16 => return Ok(Some((client, packet))),
            code => {
                let message = format!(
                    "unsupported frontend protocol {}.{}: ferry's gateway speaks 3",
                    code >> 16,
                    code & 0xffff
                );
                refuse(&mut client, "FATAL", PROTOCOL_VIOLATION, &message).await?;
                return Ok(None);
            }
        }
    }
}

/// The startup message's parameters, or the SQLSTATE and message that
/// refuse it.
fn startup_parameters(startup: &[u8]) -> Result<Vec<(String, String)>, (&'static str, String)> {
    let parameters = wire::startup_parameters(startup).map_err(|error| {
        (
            PROTOCOL_VIOLATION,
            format!("invalid startup packet: {error}"),
        )
    })?;
    if parameter(&parameters, "user").is_none_or(|user| user.is_empty()) {
        return Err((
            NO_USER,
            "no PostgreSQL user name specified in startup packet".to_owned(),
        ));
    }
    if let Some(replication) = parameter(&parameters, "replication")
        && !matches!(
            replication.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    {
        return Err((
            NOT_SUPPORTED,
            "ferry's gateway does not relay replication connections: connect to the server itself"
                .to_owned(),
        ));
    }
    Ok(parameters)
}

fn parameter(parameters: &[(String, String)], name: &str) -> Option<String> {
    parameters
        .iter()
        .find(|(given, _)| given == name)
        .map(|(_, value)| value.clone())
}

/// Passes a cancel request on to the server the session runs on now.
async fn cancel(sessions: &Sessions, packet: &[u8]) {
    if let Some(target) = wire::cancel_key(packet).and_then(|key| sessions.target(key)) {
        cancel_on(target).await;
    }
}

/// Sends a cancel request for a session to the server it runs on.
async fn cancel_on(target: CancelTarget) {
    match connect_transport(&target.server).await {
        Ok(mut server) => {
            let _ = server
                .write_all(&wire::cancel_request(target.pid, target.key))
                .await;
            let _ = server.flush().await;
            // The server closes the connection when it has read it.
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_to_end(&mut server, &mut rest),
            )
            .await;
        }
        Err(error) => debug!(%error, "could not pass a cancel request on"),
    }
}

/// What the server said while the session started.
struct Started {
    pid: i32,
    key: i32,
    parameters: HashMap<String, String>,
}

/// Relays authentication and the rest of the startup until the server's
/// first `ReadyForQuery`, which the client gets too.
async fn relay_startup(
    from_client: &mut Reader,
    to_client: &mut Writer,
    from_server: &mut Reader,
    to_server: &mut Writer,
    client_key: (i32, i32),
) -> Result<Started, Ended> {
    let mut started = Started {
        pid: 0,
        key: 0,
        parameters: HashMap::new(),
    };
    loop {
        let frame = next_from_server(from_server).await?;
        match frame.tag {
            b'R' => {
                let kind = frame
                    .body()
                    .get(..4)
                    .map(|kind| i32::from_be_bytes([kind[0], kind[1], kind[2], kind[3]]))
                    .ok_or("an authentication request without its type")?;
                match kind {
                    // SASL: the mechanisms, without channel binding.
                    10 => send(to_client, &without_channel_binding(&frame)?).await?,
                    _ => send(to_client, &frame.raw).await?,
                }
                // Cleartext, MD5, SASL and its continuation, GSSAPI and
                // SSPI wait for the client's answer.
                if matches!(kind, 3 | 5 | 7 | 8 | 9 | 10 | 11) {
                    let answer = from_client
                        .next()
                        .await
                        .map_err(|error| format!("reading the client's password: {error}"))?
                        .ok_or("the client left during authentication")?;
                    send(to_server, &answer.raw).await?;
                }
            }
            b'K' => {
                let Ok(Message::BackendKeyData(body)) = frame.backend() else {
                    return Err("an unreadable BackendKeyData".to_owned());
                };
                started.pid = body.process_id();
                started.key = body.secret_key();
                send(
                    to_client,
                    &wire::backend_key_data(client_key.0, client_key.1),
                )
                .await?;
            }
            b'S' => {
                if let Ok(Message::ParameterStatus(body)) = frame.backend()
                    && let (Ok(name), Ok(value)) = (body.name(), body.value())
                {
                    started.parameters.insert(name.to_owned(), value.to_owned());
                }
                send(to_client, &frame.raw).await?;
            }
            b'Z' => {
                send(to_client, &frame.raw).await?;
                return Ok(started);
            }
            b'E' => {
                send(to_client, &frame.raw).await?;
                return Err("the server refused the session".to_owned());
            }
            _ => send(to_client, &frame.raw).await?,
        }
    }
}

/// An `AuthenticationSASL` offering what `frame` offers but the
/// mechanisms that bind to the TLS connection (`-PLUS`): the client's TLS
/// ends at the gateway, so a binding could never match the server's.
fn without_channel_binding(frame: &Frame) -> Result<Bytes, Ended> {
    let Ok(Message::AuthenticationSasl(body)) = frame.backend() else {
        return Err("an unreadable AuthenticationSASL".to_owned());
    };
    let mut mechanisms = Vec::new();
    let mut offered = body.mechanisms();
    while let Ok(Some(mechanism)) = fallible_iterator::FallibleIterator::next(&mut offered) {
        if !mechanism.ends_with("-PLUS") {
            mechanisms.push(mechanism.to_owned());
        }
    }
    Ok(wire::authentication_sasl(&mechanisms))
}

async fn next_from_server(from_server: &mut Reader) -> Result<Frame, Ended> {
    from_server
        .next()
        .await
        .map_err(|error| format!("reading from the server: {error}"))?
        .ok_or_else(|| "the server closed the connection".to_owned())
}

/// Writes `bytes` to one side.
async fn send<W: tokio::io::AsyncWrite + Unpin>(to: &mut W, bytes: &[u8]) -> Result<(), Ended> {
    to.write_all(bytes)
        .await
        .map_err(|error| format!("writing: {error}"))?;
    to.flush()
        .await
        .map_err(|error| format!("writing: {error}"))
}

/// Tells the client why the session ends (an `ErrorResponse`).
async fn refuse<W: tokio::io::AsyncWrite + Unpin>(
    to_client: &mut W,
    severity: &str,
    code: &str,
    message: &str,
) -> Result<(), Ended> {
    send(to_client, &wire::error_response(severity, code, message)).await?;
    let _ = to_client.shutdown().await;
    Err(message.to_owned())
}

/// Asks the gate to let a unit of work of `bytes` go. A unit held past
/// the hold's pause is not refused, as an etcd write is: it waits on until
/// the release (its client's own timeout bounds the wait), since a
/// PostgreSQL client that is refused its connection or its next statement
/// gives up (pgbench aborts the client) where an etcd client retries. It
/// still never goes to a server that may be fenced: the release comes after
/// the switch, or after the settle that unfenced the old server.
async fn admit(shared: &Shared<PgUpstream>, bytes: usize) -> Result<WritePermit, GateRefusal> {
    let permit = loop {
        let refusal = match shared.gate.admit_write(bytes as u64) {
            Admission::Pass(permit) => break permit,
            Admission::Held(held) => match held.wait().await {
                Ok(mut permit) => {
                    // Released sessions start in the order they arrived,
                    // and then run side by side.
                    permit.leave_line();
                    break permit;
                }
                Err(refusal) => refusal,
            },
            Admission::Refused(refusal) => refusal,
        };
        match refusal {
            GateRefusal::HoldRanOut { .. } => shared.gate.until_open().await,
            refusal => return Err(refusal),
        }
    };
    shared.writes_forwarded.fetch_add(1, Ordering::Relaxed);
    Ok(permit)
}

/// A session past its startup.
struct Session {
    shared: Arc<Shared<PgUpstream>>,
    sessions: Arc<Sessions>,
    client_key: (i32, i32),
    to_client: Writer,
    to_server: Writer,
    /// The server the session runs on.
    upstream: Arc<PgUpstream>,
    /// The client's startup parameters.
    parameters: Vec<(String, String)>,
    /// What the server reported last of each parameter.
    server_parameters: HashMap<String, String>,
    user: String,
    database: String,
    /// Held while the session is busy.
    permit: Option<WritePermit>,
    /// Queries and `Sync`s sent and not answered with `ReadyForQuery` yet.
    pending: u32,
    /// Extended-protocol messages sent since the last `Sync`.
    unsynced: bool,
    /// The client prepared a named statement: the session cannot move.
    named_statements: bool,
    /// The hold whose pause this session's open transaction outlasted
    /// half of, once its query was cancelled.
    cut_for: Option<HoldId>,
}

/// What woke the relay.
enum Event {
    Client(Option<Frame>),
    Server(Option<Frame>),
    Switched,
    /// A hold has lasted half its pause with this session's transaction
    /// still open.
    HoldOutlasted(HoldId),
}

/// Resolves when a hold (other than `skip`) has lasted half its pause.
async fn hold_half_gone(gate: &Gate, skip: Option<HoldId>) -> HoldId {
    loop {
        let (id, deadline) = gate.until_held().await;
        if Some(id) == skip {
            gate.until_released(id).await;
            continue;
        }
        tokio::time::sleep_until(id.started + (deadline - id.started) / 2).await;
        return id;
    }
}

impl Session {
    /// Relays both ways until either side ends the session.
    async fn relay(
        &mut self,
        mut from_client: Reader,
        mut from_server: Reader,
    ) -> Result<(), Ended> {
        let mut switches = self.shared.upstream.subscribe();
        loop {
            if self.permit.is_none() && !self.on_upstream_in_force() {
                from_server = self.move_to_upstream_in_force().await?;
            }
            let idle = self.permit.is_none();
            let event = tokio::select! {
                frame = from_client.next() => Event::Client(
                    frame.map_err(|error| format!("reading from the client: {error}"))?,
                ),
                frame = from_server.next() => Event::Server(
                    frame.map_err(|error| format!("reading from the server: {error}"))?,
                ),
                changed = switches.changed(), if idle => match changed {
                    Ok(()) => Event::Switched,
                    Err(_) => return Ok(()),
                },
                id = hold_half_gone(&self.shared.gate, self.cut_for), if !idle => {
                    Event::HoldOutlasted(id)
                }
            };
            match event {
                Event::Client(None) => {
                    let _ = send(&mut self.to_server, &wire::terminate()).await;
                    return Ok(());
                }
                Event::Client(Some(frame)) if frame.tag == b'X' => {
                    let _ = send(&mut self.to_server, &frame.raw).await;
                    return Ok(());
                }
                Event::Client(Some(frame)) => {
                    if self.permit.is_none() {
                        self.permit = Some(match admit(&self.shared, frame.raw.len()).await {
                            Ok(permit) => permit,
                            Err(refusal) => return Err(self.end(&refusal.to_string()).await),
                        });
                        if !self.on_upstream_in_force() {
                            from_server = self.move_to_upstream_in_force().await?;
                        }
                    }
                    self.note_from_client(&frame);
                    send(&mut self.to_server, &frame.raw).await?;
                }
                Event::Server(None) => {
                    let _ = self.to_client.shutdown().await;
                    return Ok(());
                }
                Event::Server(Some(frame)) => {
                    self.note_from_server(&frame);
                    send(&mut self.to_client, &frame.raw).await?;
                }
                // Checked at the top of the loop.
                Event::Switched => {}
                Event::HoldOutlasted(id) => {
                    if self.permit.is_some() && self.shared.gate.is_held_by(id) {
                        self.cut_transaction(id).await?;
                    }
                }
            }
        }
    }

    /// Cuts this session's open transaction, so that the hold `id` can
    /// drain within its pause: a statement still running is cancelled (the
    /// client gets SQLSTATE 57014 and rolls back, as after any error); a
    /// transaction left open between statements ends with the session
    /// (FATAL 57P01: the server rolls it back), since nothing can be put
    /// into the client's conversation.
    async fn cut_transaction(&mut self, id: HoldId) -> Result<(), Ended> {
        self.cut_for = Some(id);
        if self.pending > 0 {
            info!(user = %self.user, epoch = id.epoch, "cancelling a statement that kept a transaction open through half the hold's pause");
            if let Some(target) = self.sessions.target(self.client_key) {
                tokio::spawn(async move { cancel_on(target).await });
            }
            return Ok(());
        }
        info!(user = %self.user, epoch = id.epoch, "ending a session whose transaction stayed open through half the hold's pause");
        Err(self
            .end(&format!(
                "terminating connection: its transaction stayed open while the control plane was being switched (migration epoch {}), and was rolled back; retry it",
                id.epoch
            ))
            .await)
    }

    fn on_upstream_in_force(&self) -> bool {
        Arc::ptr_eq(&self.upstream, &self.shared.upstream.borrow())
    }

    /// Keeps count of the work the client sent.
    fn note_from_client(&mut self, frame: &Frame) {
        match frame.tag {
            // Query and FunctionCall: answered with ReadyForQuery.
            b'Q' | b'F' => self.pending += 1,
            b'S' => {
                self.pending += 1;
                self.unsynced = false;
            }
            b'P' => {
                self.unsynced = true;
                if wire::parsed_statement_name(frame).is_ok_and(|name| !name.is_empty()) {
                    self.named_statements = true;
                }
            }
            b'B' | b'E' | b'D' | b'C' | b'H' => self.unsynced = true,
            // COPY's data, done and fail belong to the query under way.
            _ => {}
        }
    }

    /// Follows the server's answers: the session is idle again at a
    /// `ReadyForQuery` that says so with nothing else outstanding.
    fn note_from_server(&mut self, frame: &Frame) {
        match frame.tag {
            b'Z' => {
                self.pending = self.pending.saturating_sub(1);
                let idle = frame.body().first() == Some(&b'I');
                if idle && self.pending == 0 && !self.unsynced {
                    self.permit = None;
                }
            }
            b'S' => {
                if let Ok(Message::ParameterStatus(body)) = frame.backend()
                    && let (Ok(name), Ok(value)) = (body.name(), body.value())
                {
                    self.server_parameters
                        .insert(name.to_owned(), value.to_owned());
                }
            }
            _ => {}
        }
    }

    /// Moves the idle session to the server in force: logs in there as the
    /// client's role with its startup parameters, or ends the session with
    /// 57P01 when it cannot move.
    async fn move_to_upstream_in_force(&mut self) -> Result<Reader, Ended> {
        let next = self.shared.upstream.borrow().clone();
        if self.named_statements {
            return Err(self
                .end(&format!(
                    "terminating connection: the server behind ferry's gateway is now {}, and this session's prepared statements stay on the old one; reconnect",
                    next.url()
                ))
                .await);
        }
        let config = match next.session_config(&self.user, &self.database) {
            Ok(config) => config,
            Err(reason) => {
                return Err(self
                    .end(&format!(
                        "terminating connection: the server behind ferry's gateway is now {}, and the gateway has no password for role {:?} there ({reason}); reconnect",
                        next.url(),
                        self.user
                    ))
                    .await);
            }
        };
        let parameters: Vec<(String, String)> = self
            .parameters
            .iter()
            .filter(|(name, _)| name != "user" && name != "database")
            .cloned()
            .collect();
        let logged_in = match log_in(&config, &parameters).await {
            Ok(logged_in) => logged_in,
            Err(error) => {
                return Err(self
                    .end(&format!(
                        "terminating connection: the server behind ferry's gateway is now {}, and the gateway could not log in there as {:?}: {error}; reconnect",
                        next.url(),
                        self.user
                    ))
                    .await);
            }
        };
        let _ = send(&mut self.to_server, &wire::terminate()).await;
        let _ = self.to_server.shutdown().await;
        let (server_read, to_server) = tokio::io::split(logged_in.stream);
        self.to_server = to_server;
        self.sessions.set(
            self.client_key,
            CancelTarget {
                server: next.transport_config(),
                pid: logged_in.start.backend_pid,
                key: logged_in.start.secret_key,
            },
        );
        for (name, value) in &logged_in.start.parameters {
            if self.server_parameters.get(name) != Some(value) {
                send(&mut self.to_client, &wire::parameter_status(name, value)).await?;
                self.server_parameters.insert(name.clone(), value.clone());
            }
        }
        info!(user = %self.user, database = %self.database, from = %self.upstream.url(), to = %next.url(), "moved an idle session to the new server");
        self.upstream = next;
        Ok(Frames::new(
            server_read,
            logged_in.buffered,
            wire::MAX_MESSAGE_BYTES,
        ))
    }

    /// Ends the session with `FATAL` 57P01 and `message`, which it
    /// returns.
    async fn end(&mut self, message: &str) -> Ended {
        self.permit = None;
        let _ = send(&mut self.to_server, &wire::terminate()).await;
        let _ = refuse(&mut self.to_client, "FATAL", ADMIN_SHUTDOWN, message).await;
        message.to_owned()
    }
}

//! The frames of PostgreSQL's wire protocol (version 3) as the gateway
//! relays them: read whole, kept as the bytes that arrived, and looked into
//! only where the gateway must (startup packets, authentication requests,
//! `BackendKeyData`, `ReadyForQuery`, `Parse`). Backend messages the
//! gateway reads are parsed with `postgres-protocol`'s codec; the few it
//! writes itself (errors, its own cancel key) are built here.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The startup packet's code for TLS (`SSLRequest`).
pub(super) const SSL_REQUEST: i32 = 80_877_103;
/// The startup packet's code for GSSAPI encryption.
pub(super) const GSSENC_REQUEST: i32 = 80_877_104;
/// The startup packet's code of a cancel request.
pub(super) const CANCEL_REQUEST: i32 = 80_877_102;
/// Protocol 3.0, the major version every server since 7.4 speaks.
pub(super) const PROTOCOL_3: i32 = 3 << 16;

/// The longest startup packet PostgreSQL takes (`MAX_STARTUP_PACKET_LENGTH`).
pub(super) const MAX_STARTUP_BYTES: usize = 10_000;

/// The longest message either side may send through the gateway:
/// PostgreSQL's own limit on one allocation (1 GiB) and the header.
pub(super) const MAX_MESSAGE_BYTES: usize = (1 << 30) + 5;

/// One tagged message, as the bytes that arrived (tag, length, body).
#[derive(Debug, Clone)]
pub(super) struct Frame {
    /// The message's type byte.
    pub(super) tag: u8,
    /// The whole message.
    pub(super) raw: Bytes,
}

impl Frame {
    /// The body after the tag and the length.
    pub(super) fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    /// The backend message it is, parsed by `postgres-protocol`.
    pub(super) fn backend(&self) -> io::Result<backend::Message> {
        let mut bytes = BytesMut::from(&self.raw[..]);
        backend::Message::parse(&mut bytes)?
            .ok_or_else(|| invalid("a message shorter than its header says".to_owned()))
    }
}

/// Reads whole frames from one side. Cancel-safe: what was read stays in
/// the buffer for the next call.
pub(super) struct Frames<S> {
    stream: S,
    buffer: BytesMut,
    /// The most bytes one message may have.
    max_message_bytes: usize,
}

impl<S: AsyncRead + Unpin> Frames<S> {
    /// Frames read from `stream`, with `buffered` read from it already.
    pub(super) fn new(stream: S, buffered: BytesMut, max_message_bytes: usize) -> Self {
        Self {
            stream,
            buffer: buffered,
            max_message_bytes,
        }
    }

    /// The next tagged message, or `None` when the peer closed the stream
    /// between messages.
    pub(super) async fn next(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if self.buffer.len() >= 5 {
                let tag = self.buffer[0];
                let length = i32::from_be_bytes([
                    self.buffer[1],
                    self.buffer[2],
                    self.buffer[3],
                    self.buffer[4],
                ]);
                let total = usize::try_from(length)
                    .ok()
                    .filter(|length| *length >= 4)
                    .map(|length| length + 1)
                    .ok_or_else(|| {
                        invalid(format!(
                            "a message (type {:?}) whose length {length} is less than 4",
                            char::from(tag)
                        ))
                    })?;
                if total > self.max_message_bytes {
                    return Err(invalid(format!(
                        "a message (type {:?}) of {total} bytes, more than the {} the gateway passes",
                        char::from(tag),
                        self.max_message_bytes
                    )));
                }
                if self.buffer.len() >= total {
                    let raw = self.buffer.split_to(total).freeze();
                    return Ok(Some(Frame { tag, raw }));
                }
                self.buffer.reserve(total - self.buffer.len());
            }
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed in the middle of a message",
                    ))
                };
            }
        }
    }
}

/// Reads one untagged startup packet (length, then code and body) without
/// reading past it: a TLS handshake may follow, and nothing sent before it
/// may be taken as sent under it.
pub(super) async fn read_startup_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<Option<Bytes>> {
    let mut length = [0u8; 4];
    match stream.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let length = i32::from_be_bytes(length);
    let total = usize::try_from(length)
        .ok()
        .filter(|total| (8..=MAX_STARTUP_BYTES).contains(total))
        .ok_or_else(|| invalid(format!("a startup packet of {length} bytes")))?;
    let mut packet = BytesMut::zeroed(total);
    packet[..4].copy_from_slice(&(total as i32).to_be_bytes());
    stream.read_exact(&mut packet[4..]).await?;
    Ok(Some(packet.freeze()))
}

/// The code of a startup packet (after its length).
pub(super) fn startup_code(packet: &[u8]) -> i32 {
    i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]])
}

/// The parameters of a `StartupMessage`, in order.
pub(super) fn startup_parameters(packet: &[u8]) -> io::Result<Vec<(String, String)>> {
    let mut body = &packet[8..];
    let mut parameters = Vec::new();
    loop {
        let name = c_string(&mut body)?;
        if name.is_empty() {
            return Ok(parameters);
        }
        let value = c_string(&mut body)?;
        parameters.push((name, value));
    }
}

/// The two numbers of a `CancelRequest`: process id and secret key.
pub(super) fn cancel_key(packet: &[u8]) -> Option<(i32, i32)> {
    let mut body = packet.get(8..16)?;
    Some((body.get_i32(), body.get_i32()))
}

/// A `CancelRequest` for a session's process id and key.
pub(super) fn cancel_request(pid: i32, key: i32) -> Bytes {
    let mut packet = BytesMut::with_capacity(16);
    packet.put_i32(16);
    packet.put_i32(CANCEL_REQUEST);
    packet.put_i32(pid);
    packet.put_i32(key);
    packet.freeze()
}

/// The name of the statement a `Parse` prepares (empty: the unnamed one).
pub(super) fn parsed_statement_name(frame: &Frame) -> io::Result<String> {
    let mut body = frame.body();
    c_string(&mut body)
}

/// An `ErrorResponse` with this severity (`ERROR`, `FATAL`), SQLSTATE and
/// message.
pub(super) fn error_response(severity: &str, code: &str, message: &str) -> Bytes {
    let mut body = BytesMut::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        body.put_u8(field);
        put_c_string(&mut body, value);
    }
    body.put_u8(0);
    tagged(b'E', &body)
}

/// `BackendKeyData` with the gateway's own process id and key.
pub(super) fn backend_key_data(pid: i32, key: i32) -> Bytes {
    let mut body = BytesMut::with_capacity(8);
    body.put_i32(pid);
    body.put_i32(key);
    tagged(b'K', &body)
}

/// A `ParameterStatus`.
pub(super) fn parameter_status(name: &str, value: &str) -> Bytes {
    let mut body = BytesMut::new();
    put_c_string(&mut body, name);
    put_c_string(&mut body, value);
    tagged(b'S', &body)
}

/// `AuthenticationSASL` offering `mechanisms`.
pub(super) fn authentication_sasl(mechanisms: &[String]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_i32(10);
    for mechanism in mechanisms {
        put_c_string(&mut body, mechanism);
    }
    body.put_u8(0);
    tagged(b'R', &body)
}

/// `Terminate`, the polite end of a session.
pub(super) fn terminate() -> Bytes {
    tagged(b'X', &[])
}

fn tagged(tag: u8, body: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + body.len());
    frame.put_u8(tag);
    frame.put_i32((body.len() + 4) as i32);
    frame.put_slice(body);
    frame.freeze()
}

fn put_c_string(buffer: &mut BytesMut, text: &str) {
    // A NUL inside would end the string early: none of the gateway's texts
    // holds one, and a client's never reaches here.
    buffer.put_slice(text.replace('\0', " ").as_bytes());
    buffer.put_u8(0);
}

fn c_string(body: &mut &[u8]) -> io::Result<String> {
    let end = body
        .iter()
        .position(|byte| *byte == 0)
        .ok_or_else(|| invalid("a string without its terminating NUL".to_owned()))?;
    let text = String::from_utf8_lossy(&body[..end]).into_owned();
    *body = &body[end + 1..];
    Ok(text)
}

fn invalid(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_come_whole_from_any_split_and_a_torn_one_is_an_error() {
        let mut stream = BytesMut::new();
        stream.put_slice(&error_response("ERROR", "25006", "no"));
        stream.put_slice(&terminate());
        let bytes = stream.freeze();
        for cut in 0..=bytes.len() {
            let reader = tokio_test_reader(&bytes[..cut], &bytes[cut..]);
            let mut frames = Frames::new(reader, BytesMut::new(), 1024);
            let first = frames.next().await.expect("reads").expect("a frame");
            assert_eq!(first.tag, b'E');
            let second = frames.next().await.expect("reads").expect("a frame");
            assert_eq!(second.tag, b'X');
            assert!(frames.next().await.expect("reads").is_none());
        }
        let mut frames = Frames::new(&bytes[..7], BytesMut::new(), 1024);
        assert!(frames.next().await.is_err());
        let mut frames = Frames::new(&bytes[..], BytesMut::new(), 8);
        let refused = frames.next().await.expect_err("too long");
        assert!(refused.to_string().contains("more than the 8"), "{refused}");
    }

    fn tokio_test_reader<'a>(first: &'a [u8], second: &'a [u8]) -> impl AsyncRead + Unpin + 'a {
        tokio::io::AsyncReadExt::chain(first, second)
    }

    #[test]
    fn errors_parse_back_as_postgresql_errors() {
        let frame = Frame {
            tag: b'E',
            raw: error_response("FATAL", "57P01", "moved"),
        };
        let backend::Message::ErrorResponse(body) = frame.backend().expect("parses") else {
            panic!("not an error");
        };
        use fallible_iterator::FallibleIterator;
        let fields: Vec<(u8, String)> = body
            .fields()
            .map(|field| {
                Ok((
                    field.type_(),
                    String::from_utf8_lossy(field.value_bytes()).into_owned(),
                ))
            })
            .collect()
            .expect("fields");
        assert!(fields.contains(&(b'C', "57P01".to_owned())));
        assert!(fields.contains(&(b'S', "FATAL".to_owned())));
    }

    #[test]
    fn startup_parameters_and_cancel_keys_read_back() {
        let mut packet = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "app"), ("database", "db")],
            &mut packet,
        )
        .expect("encodes");
        assert_eq!(startup_code(&packet), PROTOCOL_3);
        assert_eq!(
            startup_parameters(&packet).expect("parses"),
            vec![
                ("user".to_owned(), "app".to_owned()),
                ("database".to_owned(), "db".to_owned())
            ]
        );
        let cancel = cancel_request(7, -9);
        assert_eq!(startup_code(&cancel), CANCEL_REQUEST);
        assert_eq!(cancel_key(&cancel), Some((7, -9)));
    }
}

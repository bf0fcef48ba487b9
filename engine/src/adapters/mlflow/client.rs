//! MLflow's REST API as ferry calls it: JSON requests to one server, with
//! its credentials from the environment (as MLflow's own clients take them),
//! retried with backoff where a retry can help (429, 5xx, a broken
//! connection; `Retry-After` honoured), and every refusal turned into an
//! error that names the request and quotes the server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use super::MlflowError;

/// How a client authenticates: `MLFLOW_TRACKING_TOKEN` (a bearer token),
/// else `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD` (basic).
#[derive(Clone, Default)]
pub enum Credentials {
    /// No credentials: a server without authentication.
    #[default]
    None,
    /// `Authorization: Bearer TOKEN`.
    Token(String),
    /// `Authorization: Basic ...`.
    Basic {
        /// The user.
        username: String,
        /// The password.
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never a secret in a log line.
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Token(_) => "Token(..)",
            Credentials::Basic { .. } => "Basic(..)",
        })
    }
}

impl Credentials {
    /// What the environment holds, as MLflow's Python client reads it.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        if let Some(token) = var("MLFLOW_TRACKING_TOKEN") {
            return Credentials::Token(token);
        }
        match (
            var("MLFLOW_TRACKING_USERNAME"),
            var("MLFLOW_TRACKING_PASSWORD"),
        ) {
            (Some(username), Some(password)) => Credentials::Basic { username, password },
            _ => Credentials::None,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Credentials::None => {
                "no credentials (MLFLOW_TRACKING_TOKEN and MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD are unset)"
            }
            Credentials::Token(_) => "the token in MLFLOW_TRACKING_TOKEN",
            Credentials::Basic { .. } => {
                "the user and password in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
            }
        }
    }
}

/// How often and how long a request is tried again.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The wait after the first failure; doubled after each.
    pub first_backoff: Duration,
    /// The longest wait, also for a `Retry-After`.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 8,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// One MLflow tracking server.
#[derive(Debug)]
pub struct MlflowClient {
    http: reqwest::Client,
    /// `http://HOST:PORT[/PATH]`, no trailing slash.
    base: String,
    /// The server for people: `HOST:PORT[/PATH]`, never a credential.
    name: String,
    credentials: Credentials,
    retry: RetryPolicy,
    requests: AtomicU64,
}

impl MlflowClient {
    /// A client of the server at `base` (`http://HOST:PORT[/PATH]` or
    /// `https://...`).
    pub fn new(
        base: &str,
        credentials: Credentials,
        retry: RetryPolicy,
    ) -> Result<Self, MlflowError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|error| MlflowError::BadUrl {
                url: base.to_owned(),
                reason: format!("cannot make an HTTP client: {error}"),
            })?;
        let base = base.trim_end_matches('/').to_owned();
        let name = base
            .split_once("://")
            .map_or(base.as_str(), |(_, rest)| rest)
            .to_owned();
        Ok(Self {
            http,
            base,
            name,
            credentials,
            retry,
            requests: AtomicU64::new(0),
        })
    }

    /// The server, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests sent so far, retries included.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// `GET path?query`.
    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, MlflowError> {
        let bytes = self
            .call(reqwest::Method::GET, path, query, &[], None)
            .await?;
        self.parse(&format!("GET {path}"), &bytes)
    }

    /// `GET path`, answered in plain text (`/version`).
    pub async fn get_text(&self, path: &str) -> Result<String, MlflowError> {
        let bytes = self
            .call(reqwest::Method::GET, path, &[], &[], None)
            .await?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, MlflowError> {
        let body = serde_json::to_vec(body).map_err(|error| MlflowError::BadResponse {
            server: self.name.clone(),
            request: format!("POST {path}"),
            reason: format!("cannot encode the request: {error}"),
        })?;
        self.post_raw(path, body).await
    }

    /// `DELETE path` with a JSON body, as MLflow's registry takes deletions.
    pub async fn delete(&self, path: &str, body: &Value) -> Result<Value, MlflowError> {
        let encoded = serde_json::to_vec(body).map_err(|error| MlflowError::BadResponse {
            server: self.name.clone(),
            request: format!("DELETE {path}"),
            reason: format!("cannot encode the request: {error}"),
        })?;
        let bytes = self
            .call(reqwest::Method::DELETE, path, &[], &[], Some(encoded))
            .await?;
        self.parse(&format!("DELETE {path}"), &bytes)
    }

    /// `PATCH path` with a JSON body (a 2.x trace's end, a logged model's
    /// status), answered with bytes that need not be JSON.
    pub async fn patch(&self, path: &str, body: &Value) -> Result<bytes::Bytes, MlflowError> {
        let encoded = serde_json::to_vec(body).map_err(|error| MlflowError::BadResponse {
            server: self.name.clone(),
            request: format!("PATCH {path}"),
            reason: format!("cannot encode the request: {error}"),
        })?;
        self.call(reqwest::Method::PATCH, path, &[], &[], Some(encoded))
            .await
    }

    /// `POST path` with a body already encoded as JSON.
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> Result<Value, MlflowError> {
        let bytes = self
            .call(reqwest::Method::POST, path, &[], &[], Some(body))
            .await?;
        self.parse(&format!("POST {path}"), &bytes)
    }

    /// `METHOD path` with `headers` and a body already encoded, answered
    /// with bytes that need not be JSON (the artifact proxy's `PUT`, the
    /// OTLP span endpoint's `POST /v1/traces`).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<bytes::Bytes, MlflowError> {
        self.call(method, path, &[], headers, Some(body)).await
    }

    fn parse(&self, request: &str, bytes: &[u8]) -> Result<Value, MlflowError> {
        parse_json(bytes).map_err(|reason| MlflowError::BadResponse {
            server: self.name.clone(),
            request: request.to_owned(),
            reason,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, MlflowError> {
        let request_name = format!("{method} {path}");
        let url = format!("{}{path}", self.base);
        let mut backoff = self.retry.first_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self.http.request(method.clone(), &url).query(query);
            request = match &self.credentials {
                Credentials::None => request,
                Credentials::Token(token) => request.bearer_auth(token),
                Credentials::Basic { username, password } => {
                    request.basic_auth(username, Some(password))
                }
            };
            if let Some(body) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let failure = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let retry_after = retry_after(&response);
                    match response.bytes().await {
                        Ok(bytes) if status.is_success() => return Ok(bytes),
                        Ok(bytes) if retryable(status) || pool_timed_out(&bytes) => Failure {
                            what: format!("HTTP {status}: {}", server_message(&bytes)),
                            retry_after,
                        },
                        Ok(bytes) => return Err(self.refusal(&request_name, status, &bytes)),
                        Err(error) => Failure {
                            what: format!("the answer broke off: {error}"),
                            retry_after: None,
                        },
                    }
                }
                Err(error) => Failure {
                    what: describe_send_error(&error),
                    retry_after: None,
                },
            };
            if attempt >= self.retry.attempts {
                return Err(MlflowError::Unavailable {
                    server: self.name.clone(),
                    request: request_name,
                    attempts: attempt,
                    last: failure.what,
                });
            }
            let wait = failure
                .retry_after
                .unwrap_or(backoff)
                .min(self.retry.max_backoff);
            tracing::warn!(
                server = %self.name,
                request = %request_name,
                attempt,
                wait_ms = wait.as_millis() as u64,
                "{}; trying again",
                failure.what
            );
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(self.retry.max_backoff);
        }
    }

    fn refusal(&self, request: &str, status: StatusCode, body: &[u8]) -> MlflowError {
        let (error_code, message) = match parse_json(body) {
            Ok(value) => (
                value
                    .get("error_code")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                value
                    .get("message")
                    .and_then(Value::as_str)
                    .map_or_else(|| server_message(body), str::to_owned),
            ),
            Err(_) => (String::new(), server_message(body)),
        };
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return MlflowError::Credentials {
                server: self.name.clone(),
                request: request.to_owned(),
                status: status.as_u16(),
                used: self.credentials.describe(),
                message,
            };
        }
        MlflowError::Refused {
            server: self.name.clone(),
            request: request.to_owned(),
            status: status.as_u16(),
            error_code,
            message,
        }
    }
}

struct Failure {
    what: String,
    retry_after: Option<Duration>,
}

/// 429 and 5xx: the server may take the same request later. MLflow's own
/// client retries the same.
fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// What SQLAlchemy says when no database connection of the server's
/// pool came free in time (`sqlalchemy.exc.TimeoutError`).
const POOL_TIMEOUT: &str = "QueuePool limit of size";

/// A 400 that is a busy server, not a bad request: MLflow answers a
/// timeout waiting for a connection of its database pool (seen on 3.17.2
/// under load) as `BAD_REQUEST` with SQLAlchemy's message. Nothing was
/// written; the same request later may pass.
fn pool_timed_out(body: &[u8]) -> bool {
    parse_json(body).is_ok_and(|value| {
        value["error_code"] == "BAD_REQUEST"
            && value["message"]
                .as_str()
                .is_some_and(|message| message.contains(POOL_TIMEOUT))
    })
}

/// `Retry-After` in seconds (the HTTP-date form is taken as absent).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?;
    let seconds: f64 = value.to_str().ok()?.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

fn describe_send_error(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A server's error body for a message: its text, cut to a readable length.
fn server_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(500) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None if text.is_empty() => "(no body)".to_owned(),
        None => text.to_owned(),
    }
}

/// Parses a server's JSON. MLflow's bulk metric history writes NaN and the
/// infinities as bare `NaN`, `Infinity` and `-Infinity`, which JSON has no
/// words for: outside strings they become the strings protobuf's JSON
/// mapping uses (and MLflow's own client sends), `"NaN"`, `"Infinity"`,
/// `"-Infinity"`.
pub fn parse_json(bytes: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice(bytes) {
        Ok(value) => Ok(value),
        Err(first) => {
            let quoted = quote_non_finite(bytes);
            if quoted.len() == bytes.len() {
                return Err(format!("the answer is not JSON: {first}"));
            }
            serde_json::from_slice(&quoted)
                .map_err(|error| format!("the answer is not JSON: {error}"))
        }
    }
}

fn quote_non_finite(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 16);
    let mut in_string = false;
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if in_string {
            out.push(byte);
            match byte {
                b'\\' if index + 1 < bytes.len() => {
                    out.push(bytes[index + 1]);
                    index += 1;
                }
                b'"' => in_string = false,
                _ => {}
            }
            index += 1;
            continue;
        }
        let rest = &bytes[index..];
        let word = [&b"-Infinity"[..], b"Infinity", b"NaN"]
            .into_iter()
            .find(|word| rest.starts_with(word));
        match (byte, word) {
            (b'"', _) => {
                in_string = true;
                out.push(byte);
                index += 1;
            }
            (_, Some(word)) => {
                out.push(b'"');
                out.extend_from_slice(word);
                out.push(b'"');
                index += word.len();
            }
            _ => {
                out.push(byte);
                index += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_non_finite_numbers_become_protobuf_strings() {
        let body = br#"{"metrics":[{"key":"NaN Infinity","value":NaN},{"value":-Infinity},{"value":Infinity},{"value":"a\"NaN"}]}"#;
        let value = parse_json(body).expect("parses");
        assert_eq!(value["metrics"][0]["key"], "NaN Infinity");
        assert_eq!(value["metrics"][0]["value"], "NaN");
        assert_eq!(value["metrics"][1]["value"], "-Infinity");
        assert_eq!(value["metrics"][2]["value"], "Infinity");
        assert_eq!(value["metrics"][3]["value"], "a\"NaN");
    }

    /// A server on 127.0.0.1 that answers each request with the next of
    /// `answers` (status line, extra headers, body); returns its base URL.
    async fn scripted_server(answers: Vec<(&'static str, &'static str, &'static str)>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            while let Ok((mut socket, _)) = listener.accept().await {
                let Some((status, headers, body)) = answers.next() else {
                    return;
                };
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{address}")
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        }
    }

    #[tokio::test]
    async fn busy_and_failing_servers_are_tried_again() {
        let base = scripted_server(vec![
            ("429 Too Many Requests", "retry-after: 0\r\n", ""),
            ("503 Service Unavailable", "", "busy"),
            ("200 OK", "content-type: application/json\r\n", "{\"ok\":1}"),
        ])
        .await;
        let client = MlflowClient::new(&base, Credentials::None, quick()).expect("client");
        let answer = client
            .get("/x", &[])
            .await
            .expect("answered on the third try");
        assert_eq!(answer["ok"], 1);
        assert_eq!(client.requests(), 3);
    }

    #[tokio::test]
    async fn a_server_that_keeps_failing_is_named_with_its_last_answer() {
        let base = scripted_server(vec![("500 Internal Server Error", "", "boom"); 3]).await;
        let client = MlflowClient::new(&base, Credentials::None, quick()).expect("client");
        let error = client
            .post("/api/2.0/mlflow/runs/create", &serde_json::json!({}))
            .await
            .expect_err("fails");
        let text = error.to_string();
        assert!(
            matches!(error, MlflowError::Unavailable { attempts: 3, .. }),
            "{text}"
        );
        assert!(
            text.contains("POST /api/2.0/mlflow/runs/create") && text.contains("boom"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn refusals_stop_at_once_and_say_why() {
        let base = scripted_server(vec![
            (
                "400 Bad Request",
                "",
                "{\"error_code\":\"INVALID_PARAMETER_VALUE\",\"message\":\"Param value too long\"}",
            ),
            ("401 Unauthorized", "", "You are not authenticated"),
        ])
        .await;
        let client = MlflowClient::new(&base, Credentials::Token("s3cret".to_owned()), quick())
            .expect("client");
        let refused = client
            .post("/api/2.0/mlflow/runs/log-batch", &serde_json::json!({}))
            .await
            .expect_err("refused");
        assert_eq!(refused.error_code(), Some("INVALID_PARAMETER_VALUE"));
        assert!(
            refused.to_string().contains("Param value too long"),
            "{refused}"
        );
        assert_eq!(client.requests(), 1, "a 4xx is not tried again");
        let wrong_token = client
            .get("/api/2.0/mlflow/experiments/search", &[])
            .await
            .expect_err("refused");
        let text = wrong_token.to_string();
        assert!(
            matches!(wrong_token, MlflowError::Credentials { status: 401, .. }),
            "{text}"
        );
        assert!(
            text.contains("MLFLOW_TRACKING_TOKEN") && !text.contains("s3cret"),
            "{text}"
        );
    }

    /// Regression: the MLflow bench's copy differed in every metric
    /// history: serde_json read some of Python's shortest float spellings
    /// one unit in the last place off (without `float_roundtrip`).
    #[test]
    fn metric_values_read_back_bit_for_bit() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let value = f64::from_bits(state >> 2) * if state & 1 == 0 { 1.0 } else { -1.0 };
            if !value.is_finite() {
                continue;
            }
            // Rust's `{}` writes the shortest text that reads back exactly,
            // as Python's repr does.
            let body = format!("{{\"value\":{value}}}");
            let read = parse_json(body.as_bytes()).expect("parses")["value"]
                .as_f64()
                .expect("a number");
            assert_eq!(read.to_bits(), value.to_bits(), "{body} read as {read}");
        }
    }

    #[test]
    fn what_is_not_json_stays_an_error() {
        assert!(parse_json(b"<html>").is_err());
        assert!(parse_json(b"{\"a\": NaNx}").is_err());
    }
}

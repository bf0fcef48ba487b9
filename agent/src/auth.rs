//! The agents' side of access: an optional bearer token every call must
//! carry, read from the environment or a file (never argv), compared in
//! constant time.

use std::path::Path;
use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The environment variable holding the agents' bearer token (the same for
/// the agents and their callers).
pub const TOKEN_ENV: &str = "FERRY_AGENT_TOKEN";

/// The token could not be read.
#[derive(Debug, thiserror::Error)]
#[error("the agent token: {reason}")]
pub struct TokenError {
    /// What is wrong, naming the file.
    pub reason: String,
}

/// The token an agent requires: the first line of `token_file`, else
/// [`TOKEN_ENV`]; `None` (no token required) when neither is set.
pub fn server_token(token_file: Option<&Path>) -> Result<Option<String>, TokenError> {
    let token = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| TokenError {
                reason: format!("cannot read {}: {error}", path.display()),
            })?;
            let token = text.lines().next().unwrap_or_default().trim().to_owned();
            if token.is_empty() {
                return Err(TokenError {
                    reason: format!("{} is empty", path.display()),
                });
            }
            Some(token)
        }
        None => std::env::var(TOKEN_ENV)
            .ok()
            .map(|token| token.trim().to_owned())
            .filter(|token| !token.is_empty()),
    };
    Ok(token)
}

/// Refuses every call without `authorization: Bearer <token>` when a token
/// is configured (UNAUTHENTICATED); lets every call through when not.
#[derive(Clone, Default)]
pub struct RequireToken {
    expected: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for RequireToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        formatter
            .debug_struct("RequireToken")
            .field("required", &self.expected.is_some())
            .finish()
    }
}

impl RequireToken {
    /// Requires `token` when it is `Some`.
    pub fn new(token: Option<String>) -> Self {
        Self {
            expected: token.map(|token| Arc::from(token.into_bytes())),
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if constant_time_equal(given, expected) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "this agent requires `authorization: Bearer <token>` with its token (FERRY_AGENT_TOKEN or --token-file on the caller)",
            ))
        }
    }
}

/// True when `given` equals `expected`, in time that depends on their
/// lengths only, not on where they differ.
fn constant_time_equal(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = u8::from(given.len() != expected.len());
    for (index, byte) in expected.iter().enumerate() {
        difference |= byte ^ given.get(index).copied().unwrap_or(!byte);
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_equal(b"secret", b"secret"));
        assert!(!constant_time_equal(b"secreT", b"secret"));
        assert!(!constant_time_equal(b"secret-and-more", b"secret"));
        assert!(!constant_time_equal(b"sec", b"secret"));
        assert!(!constant_time_equal(b"", b"secret"));
    }

    #[test]
    fn calls_without_the_token_are_refused() {
        let mut check = RequireToken::new(Some("s3cret".to_owned()));
        assert_eq!(
            check.call(Request::new(())).expect_err("no token").code(),
            tonic::Code::Unauthenticated
        );
        let mut wrong = Request::new(());
        wrong.metadata_mut().insert(
            "authorization",
            "Bearer other".parse().expect("a header value"),
        );
        assert!(check.call(wrong).is_err());
        let mut right = Request::new(());
        right.metadata_mut().insert(
            "authorization",
            "Bearer s3cret".parse().expect("a header value"),
        );
        assert!(check.call(right).is_ok());
        assert!(RequireToken::new(None).call(Request::new(())).is_ok());
    }
}

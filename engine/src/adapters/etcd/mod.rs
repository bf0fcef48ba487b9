//! The `etcd` adapter: etcd v3, the store under Kubernetes and Pachyderm 1.x.
//!
//! - [`EtcdSource`]: one consistent snapshot at one revision R, paged Range
//!   reads at R (key ranges read in parallel, ops still in key order), the
//!   leases attached to the keys with their remaining TTL.
//! - [`EtcdSink`]: Txns of at most `max_txn_ops` ops under the target's
//!   request size limit, each carrying ferry's checkpoint key, so each op
//!   takes effect exactly once and a killed restore resumes where it stopped.
//!
//! The ops:
//!
//! | kind | key | method | body |
//! | --- | --- | --- | --- |
//! | `etcd.lease` | `<lease id, 16 hex digits>` | `LeaseGrant` | `{"id":..,"ttl":..,"granted_ttl":..}` |
//! | `etcd.kv` | the etcd key | `Put` | the value, as stored; `deps` names its lease |
//! | `etcd.kv` | the etcd key | `Delete` | empty |
//!
//! Leases come before the keys attached to them (G6). Keys under
//! [`RESERVED_PREFIX`] are ferry's own: never extracted, never counted as
//! the target's data.

mod args;
pub(crate) mod client;
mod digest;
mod fence;
mod in_place;
mod keepalive;
mod live;
mod sink;
mod source;
pub(crate) use source::kv_op;

pub use args::{ADAPTER, EtcdArgs, EtcdRestoreArgs, EtcdTxnArgs};
pub use client::tls_config;
pub use digest::{RangeDigest, digest_range};
pub use fence::{
    FENCE_GUARD_KEY, FENCE_KEY, Fence, FenceFailure, FenceOutcome, FencePlane, Move as FenceMove,
    REVISION_OFFSET_KEY, RevisionOffset, StoredFence, adopt_revision_offset,
    describe as describe_fence, fence_alarm_epoch, fence_alarm_member, fence_state, guard_compare,
    move_fence, move_with as move_fence_with, raised_alarms as raised_fence_alarms, read_fence,
    read_fence_alarms, read_with as read_fence_with,
};
pub use keepalive::LeaseKeeper;
pub use live::{CAPABILITIES, EtcdLiveSink, EtcdLiveSource};
pub use sink::{Checkpoint, EtcdSink, EtcdSinkOptions, read_checkpoint};
pub use source::{EtcdDescription, EtcdSource, EtcdSourceOptions, describe_cluster};

use std::path::PathBuf;
use std::time::Duration;

use crate::error::ErrorClass;

/// Keys ferry keeps in a target etcd for itself.
pub const RESERVED_PREFIX: &[u8] = b"__ferry__/";
/// Where a restore records how far it got, one key per stream (backup id).
pub const CHECKPOINT_PREFIX: &[u8] = b"__ferry__/checkpoints/";
/// The highest migration attempt (epoch, G5) that wrote into this target,
/// in ASCII decimal; every Txn of a sink with an epoch requires its own.
pub const EPOCH_KEY: &[u8] = b"__ferry__/epoch";

/// The op kind of a key-value pair.
pub const KIND_KV: &str = "etcd.kv";
/// The op kind of a lease.
pub const KIND_LEASE: &str = "etcd.lease";

/// How to reach an etcd cluster. Credentials come from the environment or a
/// file, never from a URL or argv; `Debug` shows the user, never the
/// password.
#[derive(Clone, Default)]
pub struct EtcdConnection {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// User and password, when the cluster has auth enabled.
    pub credentials: Option<(String, String)>,
    /// How long to wait for a member before calling it unreachable.
    pub connect_timeout: Option<Duration>,
    /// TLS (`https`) to the members when set; plain `http` when not.
    pub tls: Option<EtcdTls>,
}

impl std::fmt::Debug for EtcdConnection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EtcdConnection")
            .field("endpoints", &self.endpoints)
            .field(
                "user",
                &self.credentials.as_ref().map(|(user, _password)| user),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

/// TLS to etcd's members. The files are read when ferry connects, and only
/// their paths are ever passed around (never their content on argv).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM file of the CA(s) the members' certificates are signed by; the
    /// system's trusted roots when not set.
    pub ca_file: Option<PathBuf>,
    /// PEM file of ferry's client certificate, for members started with
    /// `--client-cert-auth`; goes with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
}

impl EtcdTls {
    /// True when any file is named: any of them turns TLS on.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

impl EtcdConnection {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...]`, or `etcds://...` for TLS
    /// with the system's trusted roots. Credentials are read from
    /// `ETCD_USERNAME` and `ETCD_PASSWORD`, or from `password_file` (whose
    /// first line is the password) with `ETCD_USERNAME`.
    pub fn from_url(url: &str, password_file: Option<&PathBuf>) -> Result<Self, EtcdError> {
        let bad_url = |reason: &str| EtcdError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (rest, tls) = match (url.strip_prefix("etcd://"), url.strip_prefix("etcds://")) {
            (Some(rest), _) => (rest, None),
            (None, Some(rest)) => (rest, Some(EtcdTls::default())),
            (None, None) => {
                return Err(bad_url(
                    "an etcd URL starts with etcd:// (or etcds:// for TLS)",
                ));
            }
        };
        if rest.contains('@') {
            return Err(bad_url(
                "credentials do not belong in a URL (it shows in process lists); set ETCD_USERNAME and ETCD_PASSWORD",
            ));
        }
        let endpoints: Vec<String> = rest
            .trim_end_matches('/')
            .split(',')
            .filter(|endpoint| !endpoint.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() || endpoints.iter().any(|endpoint| !endpoint.contains(':')) {
            return Err(bad_url(
                "name the members as etcd://HOST:PORT[,HOST:PORT...]",
            ));
        }
        let username = std::env::var("ETCD_USERNAME")
            .ok()
            .filter(|name| !name.is_empty());
        let password = match password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|error| EtcdError::Credentials {
                        reason: format!(
                            "cannot read the password file {}: {error}",
                            path.display()
                        ),
                    })?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            None => std::env::var("ETCD_PASSWORD").ok(),
        };
        let credentials = match (username, password) {
            (Some(username), Some(password)) => Some((username, password)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(EtcdError::Credentials {
                    reason:
                        "ETCD_USERNAME is set but no password (ETCD_PASSWORD or a password file)"
                            .to_owned(),
                });
            }
            (None, Some(_)) => {
                return Err(EtcdError::Credentials {
                    reason: "a password is given but ETCD_USERNAME is not set".to_owned(),
                });
            }
        };
        Ok(Self {
            endpoints,
            credentials,
            connect_timeout: Some(Duration::from_secs(5)),
            tls,
        })
    }

    /// Adds TLS files (from `--etcd-ca-file`, `--etcd-cert-file`,
    /// `--etcd-key-file`): any of them turns TLS on. A certificate needs
    /// its key and a key its certificate.
    pub fn with_tls_files(mut self, files: &EtcdTls) -> Result<Self, EtcdError> {
        if !files.is_set() {
            return Ok(self);
        }
        if files.cert_file.is_some() != files.key_file.is_some() {
            return Err(EtcdError::TlsFiles {
                reason: "a client certificate needs its key: pass both --etcd-cert-file and --etcd-key-file".to_owned(),
            });
        }
        self.tls = Some(files.clone());
        Ok(self)
    }

    /// The members, for messages (never credentials).
    pub fn display(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.endpoints.join(","))
    }

    /// Sorts a refusal of etcd's into what the user must do about it.
    pub(crate) fn failed(&self, action: &str, status: &tonic::Status) -> EtcdError {
        let endpoints = self.display();
        let message = status.message();
        let code = status.code();
        if let Some(reason) = self.tls_failure(status) {
            return EtcdError::Tls { endpoints, reason };
        }
        // A dropped connection says nothing of TLS: a member that serves TLS
        // only drops a plain one, and a member that demands a client
        // certificate may drop one without it before its TLS alert is read
        // (TLS 1.3 sends it after the client thinks the handshake is done).
        let dropped = code == tonic::Code::Cancelled
            || (code == tonic::Code::Unknown && message == "transport error");
        let hint = match &self.tls {
            None => Some("if the members serve TLS only, use etcds:// or pass --etcd-ca-file"),
            Some(tls) if tls.cert_file.is_none() => Some(
                "if the members require a client certificate (etcd --client-cert-auth), pass --etcd-cert-file and --etcd-key-file",
            ),
            Some(_) => None,
        };
        if dropped && let Some(hint) = hint {
            return EtcdError::Unreachable {
                endpoints,
                reason: format!("{action}: {message}; {hint}"),
            };
        }
        if message.contains("authentication failed")
            || message.contains("invalid auth token")
            || message.contains("user name is empty")
            || code == tonic::Code::Unauthenticated
        {
            return EtcdError::Credentials {
                reason: format!(
                    "{endpoints} refused the credentials ({message}); check ETCD_USERNAME and ETCD_PASSWORD or the password file"
                ),
            };
        }
        if message.contains("permission denied") || code == tonic::Code::PermissionDenied {
            return EtcdError::Credentials {
                reason: format!(
                    "{endpoints} denied {action} ({message}); the user needs read (extract) or read-write (restore) permission on the range"
                ),
            };
        }
        if message.contains("required revision has been compacted") {
            return EtcdError::Compacted {
                endpoints,
                reason: format!(
                    "the snapshot's revision, while ferry read it ({message}); nothing was sealed, run the extract again for a new snapshot"
                ),
            };
        }
        // etcd answers RESOURCE_EXHAUSTED here too, as it does for a request
        // too large: told apart by its words, or the user would be sent to
        // shrink Txns that were never the trouble.
        if message.contains("database space exceeded") {
            return EtcdError::NoSpace {
                endpoints,
                reason: message.to_owned(),
            };
        }
        if message.contains("request is too large")
            || message.contains("too many operations in txn request")
            || code == tonic::Code::ResourceExhausted
            || code == tonic::Code::OutOfRange
        {
            return EtcdError::TooLarge {
                endpoints,
                reason: message.to_owned(),
            };
        }
        if code == tonic::Code::Unavailable
            || code == tonic::Code::DeadlineExceeded
            || code == tonic::Code::Cancelled
        {
            return EtcdError::Unreachable {
                endpoints,
                reason: format!("{action}: {message}"),
            };
        }
        EtcdError::Request {
            endpoints,
            action: action.to_owned(),
            reason: message.to_owned(),
        }
    }

    /// What to do about a failed TLS handshake, when `error` is one. The
    /// transport's own words are deep in the error's sources.
    pub(crate) fn tls_failure(&self, error: &(dyn std::error::Error + 'static)) -> Option<String> {
        let tls = self.tls.as_ref()?;
        let mut chain: Vec<String> = Vec::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(error) = next {
            // A status prints its code and source too: take its message.
            let text = match error.downcast_ref::<tonic::Status>() {
                Some(status) => status.message().to_owned(),
                None => error.to_string(),
            };
            if !chain.iter().any(|seen| seen.contains(&text)) {
                chain.push(text);
            }
            next = error.source();
        }
        let detail = chain.join(": ");
        let lower = detail.to_lowercase();
        let refused_identity = lower.contains("certificate required")
            || lower.contains("certificaterequired")
            || lower.contains("badcertificate")
            || lower.contains("bad certificate");
        if refused_identity && tls.cert_file.is_none() {
            return Some(format!(
                "the members require a client certificate ({detail}); pass --etcd-cert-file and --etcd-key-file"
            ));
        }
        if lower.contains("unknownissuer")
            || lower.contains("unknown issuer")
            || lower.contains("invalid peer certificate")
            || lower.contains("notvalidforname")
        {
            return Some(format!(
                "the members' certificate is not trusted ({detail}); pass the CA that signed it with --etcd-ca-file"
            ));
        }
        if refused_identity || lower.contains("unknown ca") || lower.contains("unknownca") {
            return Some(format!(
                "the members refused ferry's client certificate ({detail}); pass one signed by the CA they trust with --etcd-cert-file and --etcd-key-file"
            ));
        }
        (lower.contains("tls") || lower.contains("handshake") || lower.contains("certificate"))
            .then(|| format!("the TLS handshake failed ({detail})"))
    }
}

/// Something went wrong talking to etcd.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The URL cannot be used.
    #[error("cannot use {url}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// No member answered.
    #[error("cannot reach {endpoints}: {reason}; check the address and that etcd is running")]
    Unreachable {
        /// The members tried.
        endpoints: String,
        /// What the transport said.
        reason: String,
    },
    /// Missing, wrong or insufficient credentials.
    #[error("{reason}")]
    Credentials {
        /// What is wrong with them.
        reason: String,
    },
    /// A revision ferry reads at (a snapshot's, a live stream's next) was
    /// compacted away.
    #[error("{endpoints} compacted a revision ferry needs: {reason}")]
    Compacted {
        /// The members.
        endpoints: String,
        /// What etcd said.
        reason: String,
    },
    /// The member's database reached its quota (`--quota-backend-bytes`):
    /// etcd raised its NOSPACE alarm and takes no more writes.
    #[error(
        "{endpoints} is out of space ({reason}): its database reached its quota (etcd --quota-backend-bytes) and it takes no more writes until its NOSPACE alarm is disarmed. Free space (delete what is not needed, `etcdctl compact` and `etcdctl defrag`, or restart it with a larger quota), run `etcdctl alarm disarm`, then run the same command again"
    )]
    NoSpace {
        /// The members.
        endpoints: String,
        /// What etcd said.
        reason: String,
    },
    /// The target refused a request as too large.
    #[error("{endpoints} refused a request as too large ({reason})")]
    TooLarge {
        /// The members.
        endpoints: String,
        /// What etcd said.
        reason: String,
    },
    /// Another refusal or failure.
    #[error("{endpoints}: {action} failed: {reason}")]
    Request {
        /// The members.
        endpoints: String,
        /// What ferry was doing.
        action: String,
        /// What etcd said.
        reason: String,
    },
    /// The target already holds keys in the range being restored.
    #[error(
        "{endpoints} already holds keys in the range being restored, e.g. {examples}; restore into an empty range, or pass --allow-nonempty to write over them"
    )]
    NotEmpty {
        /// The target.
        endpoints: String,
        /// A few of the keys found.
        examples: String,
    },
    /// The new plane of a live migration already holds keys.
    #[error(
        "the new plane {endpoints} already holds keys, e.g. {examples}. A live migration starts on an empty new plane: these may be what an earlier migration applied before it stopped without a switch. Delete them and run the migration again"
    )]
    NewPlaneNotEmpty {
        /// The target.
        endpoints: String,
        /// A few of the keys found.
        examples: String,
    },
    /// The target's checkpoint for this stream says it came from elsewhere.
    #[error(
        "{endpoints} holds a checkpoint for backup {stream_id} from source {checkpoint_source}, but this backup comes from source {backup_source}; refusing to mix them"
    )]
    OtherSource {
        /// The target.
        endpoints: String,
        /// The stream (backup id).
        stream_id: String,
        /// The source the checkpoint names.
        checkpoint_source: String,
        /// The source the backup names.
        backup_source: String,
    },
    /// The TLS files cannot be used: missing, unreadable, not PEM, or a
    /// certificate without its key.
    #[error("cannot use the etcd TLS files: {reason}")]
    TlsFiles {
        /// What is wrong, naming the file.
        reason: String,
    },
    /// TLS with the members failed: an untrusted certificate, a client
    /// certificate required or refused.
    #[error("TLS with {endpoints} failed: {reason}")]
    Tls {
        /// The members.
        endpoints: String,
        /// What went wrong and what to do.
        reason: String,
    },
    /// An op cannot be applied as etcd ops.
    #[error("cannot apply op seq {seq} (key {key}): {reason}")]
    BadOp {
        /// The op.
        seq: u64,
        /// Its key, printable.
        key: String,
        /// Why not.
        reason: String,
    },
}

impl crate::adapters::PlatformError for EtcdError {
    fn class(&self) -> ErrorClass {
        match self {
            // A new snapshot, an empty target, a higher epoch, other
            // credentials or TLS files, free space.
            EtcdError::Compacted { .. }
            | EtcdError::NotEmpty { .. }
            | EtcdError::NewPlaneNotEmpty { .. }
            | EtcdError::OtherSource { .. }
            | EtcdError::Credentials { .. }
            | EtcdError::Tls { .. }
            | EtcdError::TlsFiles { .. }
            | EtcdError::NoSpace { .. } => ErrorClass::Precondition,
            EtcdError::TooLarge { .. } => ErrorClass::TooLarge,
            EtcdError::BadOp { .. } | EtcdError::BadUrl { .. } => ErrorClass::Invalid,
            _ => ErrorClass::Transient,
        }
    }

    fn is_usage(&self) -> bool {
        matches!(self, EtcdError::BadUrl { .. } | EtcdError::TlsFiles { .. })
    }
}

/// A key for messages: text when it is, escaped bytes when not.
pub(crate) fn printable(key: &[u8]) -> String {
    String::from_utf8(key.to_vec()).unwrap_or_else(|_| key.escape_ascii().to_string())
}

/// The end of the range of keys starting with `prefix` (etcd's convention:
/// `\0` means to the end of the keyspace).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_the_user_never_the_password() {
        let connection = EtcdConnection {
            endpoints: vec!["10.0.0.1:2379".to_owned()],
            credentials: Some(("root".to_owned(), "hunter2-secret".to_owned())),
            ..EtcdConnection::default()
        };
        let debug = format!("{connection:?}");
        assert!(debug.contains("root"), "{debug}");
        assert!(!debug.contains("hunter2-secret"), "{debug}");
    }

    #[test]
    fn prefix_ends_follow_etcd() {
        assert_eq!(prefix_end(b"/a"), b"/b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b""), b"\0");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn urls_name_members_and_never_credentials() {
        let connection =
            EtcdConnection::from_url("etcd://10.0.0.1:2379,10.0.0.2:2379", None).expect("valid");
        assert_eq!(connection.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert!(EtcdConnection::from_url("etcd://root:secret@10.0.0.1:2379", None).is_err());
        assert!(EtcdConnection::from_url("etcd://", None).is_err());
        assert!(EtcdConnection::from_url("http://10.0.0.1:2379", None).is_err());
        assert!(connection.tls.is_none());
    }

    #[test]
    fn etcds_and_any_tls_file_turn_tls_on() {
        let system_roots = EtcdConnection::from_url("etcds://10.0.0.1:2379", None).expect("valid");
        assert_eq!(system_roots.tls, Some(EtcdTls::default()));
        assert_eq!(system_roots.display(), "etcds://10.0.0.1:2379");
        let with_ca = EtcdConnection::from_url("etcd://10.0.0.1:2379", None)
            .and_then(|connection| {
                connection.with_tls_files(&EtcdTls {
                    ca_file: Some(PathBuf::from("/etc/ca.pem")),
                    ..EtcdTls::default()
                })
            })
            .expect("valid");
        assert!(with_ca.tls.is_some_and(|tls| tls.ca_file.is_some()));
        let half_identity = EtcdConnection::from_url("etcd://10.0.0.1:2379", None)
            .and_then(|connection| {
                connection.with_tls_files(&EtcdTls {
                    cert_file: Some(PathBuf::from("/etc/client.pem")),
                    ..EtcdTls::default()
                })
            })
            .expect_err("a certificate without its key");
        assert!(matches!(half_identity, EtcdError::TlsFiles { .. }));
    }

    /// Regression (seen in CI): a member started with --client-cert-auth
    /// sometimes drops a client without a certificate before its TLS alert
    /// is read, and the call ends `Cancelled` with no TLS words in it.
    #[test]
    fn a_dropped_connection_names_the_tls_flag_that_may_be_missing() {
        let dropped = tonic::Status::cancelled("operation was canceled");
        let plain = EtcdConnection::from_url("etcd://10.0.0.1:2379", None).expect("valid");
        let message = plain.failed("read the status of", &dropped).to_string();
        assert!(message.contains("use etcds://"), "{message}");
        let ca_only = EtcdConnection::from_url("etcds://10.0.0.1:2379", None).expect("valid");
        let message = ca_only.failed("read the status of", &dropped).to_string();
        assert!(
            message.contains("client certificate") && message.contains("--etcd-cert-file"),
            "{message}"
        );
        let with_identity = EtcdConnection::from_url("etcd://10.0.0.1:2379", None)
            .and_then(|connection| {
                connection.with_tls_files(&EtcdTls {
                    cert_file: Some(PathBuf::from("/etc/client.pem")),
                    key_file: Some(PathBuf::from("/etc/client-key.pem")),
                    ..EtcdTls::default()
                })
            })
            .expect("valid");
        let message = with_identity
            .failed("read the status of", &dropped)
            .to_string();
        assert!(!message.contains("--etcd-cert-file"), "{message}");
    }
}

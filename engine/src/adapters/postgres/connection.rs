//! How ferry reaches a PostgreSQL server: the URL (never with a password),
//! the password from the environment or a file, TLS, and the session
//! settings every connection gets so that values read as text are in one
//! canonical form ([`super::value::SESSION_SETTINGS`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_postgres::Client;

use super::PgError;
use super::replication::{ConnectionConfig, PgTls, SslMode};

/// How to reach one database. `Debug` and [`PgConnection::server`] never
/// show the password.
#[derive(Clone)]
pub struct PgConnection {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The role ferry logs in as.
    pub user: String,
    /// The database.
    pub dbname: String,
    /// The password, from `--pg-password-file`, `PGPASSWORD` or the
    /// password file; `None` for trust or certificate authentication.
    pub password: Option<String>,
    /// TLS.
    pub tls: PgTls,
    /// How long to wait for the server before calling it unreachable.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for PgConnection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PgConnection")
            .field("server", &self.server())
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// Where a password comes from, in libpq's order after ferry's own flag.
#[derive(Debug, Clone, Default)]
pub struct PasswordSources {
    /// `--pg-password-file`: its first line.
    pub password_file: Option<PathBuf>,
    /// `PGPASSWORD`.
    pub env_password: Option<String>,
    /// `PGPASSFILE`, or `~/.pgpass` when unset.
    pub passfile: Option<PathBuf>,
    /// `PGUSER`, the role when the URL names none.
    pub env_user: Option<String>,
}

impl PasswordSources {
    /// Read from the process environment (done when an adapter is built,
    /// never while flags are parsed).
    pub fn from_env(password_file: Option<PathBuf>) -> Self {
        let passfile = std::env::var_os("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".pgpass")));
        Self {
            password_file,
            env_password: std::env::var("PGPASSWORD")
                .ok()
                .filter(|text| !text.is_empty()),
            passfile,
            env_user: std::env::var("PGUSER").ok().filter(|text| !text.is_empty()),
        }
    }
}

impl PgConnection {
    /// The database `url` names (`postgres://[USER@]HOST[:PORT]/DB
    /// [?sslmode=MODE&sslrootcert=FILE]`, or `postgresql://`), with its
    /// password from `sources`. A password in the URL is refused: it would
    /// sit in argv, shell history and logs.
    pub fn from_url(url: &str, sources: &PasswordSources) -> Result<Self, PgError> {
        let bad = |reason: String| PgError::BadUrl {
            url: redact(url),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|error| bad(error.to_string()))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(bad(
                "the scheme must be postgres:// or postgresql://".to_owned()
            ));
        }
        if parsed.password().is_some() {
            return Err(bad(
                "a password in the URL would show in argv, shell history and logs: give it in PGPASSWORD, a password file (PGPASSFILE, ~/.pgpass) or --pg-password-file FILE".to_owned(),
            ));
        }
        let host = parsed
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| bad("it names no host".to_owned()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = parsed.port().unwrap_or(5432);
        let dbname = parsed.path().trim_start_matches('/');
        if dbname.is_empty() || dbname.contains('/') {
            return Err(bad(
                "it must name one database: postgres://HOST:PORT/DB".to_owned()
            ));
        }
        let dbname = percent_decode(dbname);
        let user = match parsed.username() {
            "" => sources
                .env_user
                .clone()
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "postgres".to_owned()),
            user => percent_decode(user),
        };
        let mut tls = PgTls::default();
        for (name, value) in parsed.query_pairs() {
            match name.as_ref() {
                "sslmode" => {
                    tls.mode = value
                        .parse::<SslMode>()
                        .map_err(|error| bad(format!("sslmode={value}: {error}")))?;
                }
                "sslrootcert" => tls.ca_file = Some(PathBuf::from(value.as_ref())),
                "sslcert" => tls.cert_file = Some(PathBuf::from(value.as_ref())),
                "sslkey" => tls.key_file = Some(PathBuf::from(value.as_ref())),
                "password" => {
                    return Err(bad(
                        "a password in the URL would show in argv, shell history and logs: give it in PGPASSWORD, a password file or --pg-password-file FILE".to_owned(),
                    ));
                }
                other => {
                    return Err(bad(format!(
                        "ferry does not know the parameter {other:?} (it takes sslmode, sslrootcert, sslcert and sslkey)"
                    )));
                }
            }
        }
        let mut connection = Self {
            host,
            port,
            user,
            dbname,
            password: None,
            tls,
            connect_timeout: Duration::from_secs(10),
        };
        connection.password = connection.find_password(sources)?;
        Ok(connection)
    }

    /// `host:port/db`, for messages.
    pub fn server(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }

    /// The same server, another database.
    pub fn with_dbname(&self, dbname: &str) -> Self {
        Self {
            dbname: dbname.to_owned(),
            ..self.clone()
        }
    }

    /// The same server as `user` on `dbname`, with that role's password
    /// from `sources`: `--pg-password-file` only counts for the role this
    /// connection logs in as; `PGPASSWORD` and the password file as libpq
    /// reads them.
    pub fn as_user(
        &self,
        user: &str,
        dbname: &str,
        sources: &PasswordSources,
    ) -> Result<Self, PgError> {
        let mut sources = sources.clone();
        if user != self.user {
            sources.password_file = None;
        }
        let mut connection = Self {
            user: user.to_owned(),
            dbname: dbname.to_owned(),
            password: None,
            ..self.clone()
        };
        connection.password = connection.find_password(&sources)?;
        Ok(connection)
    }

    /// The same server for a plain (not replication) session that a proxy
    /// starts: no application name of ferry's.
    pub fn session_config(&self) -> ConnectionConfig {
        let mut config = self.replication_config();
        config.application_name = String::new();
        config
    }

    fn find_password(&self, sources: &PasswordSources) -> Result<Option<String>, PgError> {
        if let Some(path) = &sources.password_file {
            let text = std::fs::read_to_string(path).map_err(|error| PgError::File {
                what: "the password file",
                path: path.display().to_string(),
                reason: error.to_string(),
            })?;
            let first = text.lines().next().unwrap_or_default().to_owned();
            return Ok(Some(first));
        }
        if let Some(password) = &sources.env_password {
            return Ok(Some(password.clone()));
        }
        let Some(path) = &sources.passfile else {
            return Ok(None);
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(pgpass_lookup(
                &text,
                &self.host,
                self.port,
                &self.dbname,
                &self.user,
            )),
            // libpq reads the file only when it is there.
            Err(_) => Ok(None),
        }
    }

    /// tokio-postgres' configuration for this database.
    pub(crate) fn config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("ferry")
            .connect_timeout(self.connect_timeout);
        if let Some(password) = &self.password {
            config.password(password.as_bytes());
        }
        config
    }

    /// The same server for a replication connection.
    pub(crate) fn replication_config(&self) -> ConnectionConfig {
        let mut config = ConnectionConfig::new(&self.host, self.port, &self.user, &self.dbname);
        config.password = self.password.clone();
        config.tls = self.tls.clone();
        config.connect_timeout = self.connect_timeout;
        config
    }

    /// A connection for SQL and COPY, its session set for canonical text
    /// values; the connection's driver task runs on tokio until the client
    /// is dropped.
    pub async fn connect(&self) -> Result<Client, PgError> {
        let client = super::tls::connect(self).await?;
        client
            .batch_execute(&super::value::session_settings_sql())
            .await
            .map_err(|error| {
                PgError::statement(&self.server(), "setting the session up", &error)
            })?;
        Ok(client)
    }

    /// The failure of a connection attempt, in words that say what to do.
    pub(crate) fn connect_error(&self, error: &tokio_postgres::Error) -> PgError {
        let reason = super::describe_error(error);
        match error.code().map(|code| code.code()) {
            // invalid_password, invalid_authorization_specification
            Some("28P01" | "28000") => PgError::Credentials {
                server: self.server(),
                user: self.user.clone(),
                reason,
            },
            // invalid_catalog_name: no such database.
            Some("3D000") => PgError::Precondition {
                server: self.server(),
                reason: format!("the database does not exist: {reason}"),
            },
            Some(_) => PgError::Precondition {
                server: self.server(),
                reason,
            },
            None => PgError::Unreachable {
                server: self.server(),
                reason,
            },
        }
    }
}

/// The password `.pgpass` text holds for this server, database and user:
/// the first line whose fields match (`*` matches anything; `\:` and `\\`
/// escape).
pub(crate) fn pgpass_lookup(
    text: &str,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        let [f_host, f_port, f_db, f_user, password] = fields.as_slice() else {
            continue;
        };
        let matches = |field: &str, value: &str| field == "*" || field == value;
        let host_matches = matches(f_host, host)
            || (f_host == "localhost" && (host == "127.0.0.1" || host == "::1"));
        if host_matches && matches(f_port, &port) && matches(f_db, dbname) && matches(f_user, user)
        {
            return Some(password.clone());
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(char) = chars.next() {
        match char {
            '\\' => {
                if let (Some(next), Some(field)) = (chars.next(), fields.last_mut()) {
                    field.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            _ => {
                if let Some(field) = fields.last_mut() {
                    field.push(char);
                }
            }
        }
    }
    fields
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_else(|| text.to_owned())
}

/// The URL with any password replaced, for a message.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("REDACTED"));
            }
            let pairs: Vec<(String, String)> = parsed
                .query_pairs()
                .map(|(name, value)| {
                    let value = if name == "password" {
                        "REDACTED".into()
                    } else {
                        value
                    };
                    (name.into_owned(), value.into_owned())
                })
                .collect();
            if pairs.iter().any(|(name, _)| name == "password") {
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => "the URL given".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> PasswordSources {
        PasswordSources {
            env_user: Some("ferry".to_owned()),
            ..PasswordSources::default()
        }
    }

    #[test]
    fn a_url_names_host_port_database_user_and_tls() {
        let connection = PgConnection::from_url(
            "postgres://meta@db.example:6543/metaflow?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            &sources(),
        )
        .expect("it works");
        assert_eq!(connection.server(), "db.example:6543/metaflow");
        assert_eq!(connection.user, "meta");
        assert_eq!(connection.tls.mode, SslMode::VerifyFull);
        assert_eq!(connection.tls.ca_file, Some(PathBuf::from("/etc/ca.pem")));
        let defaults =
            PgConnection::from_url("postgresql://127.0.0.1/app", &sources()).expect("it works");
        assert_eq!((defaults.port, defaults.user.as_str()), (5432, "ferry"));
        assert_eq!(defaults.tls.mode, SslMode::Prefer);
    }

    #[test]
    fn a_password_in_the_url_is_refused_and_never_echoed() {
        for url in [
            "postgres://meta:hunter2@db:5432/app",
            "postgres://meta@db:5432/app?password=hunter2",
        ] {
            let error = PgConnection::from_url(url, &sources())
                .expect_err("an error")
                .to_string();
            assert!(error.contains("PGPASSWORD"), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
        let error = PgConnection::from_url("postgres://db:5432/app?sslmode=maybe", &sources())
            .expect_err("an error")
            .to_string();
        assert!(error.contains("sslmode=maybe"), "{error}");
        let error = PgConnection::from_url("postgres://db:5432/", &sources())
            .expect_err("an error")
            .to_string();
        assert!(error.contains("one database"), "{error}");
    }

    #[test]
    fn the_password_comes_from_the_flag_then_the_environment_then_pgpass() {
        let dir = tempfile::tempdir().expect("it works");
        let file = dir.path().join("password");
        std::fs::write(&file, "from-file\nignored\n").expect("it works");
        let passfile = dir.path().join("pgpass");
        std::fs::write(
            &passfile,
            "# comment\nother:*:*:*:no\n127.0.0.1:5433:app:meta:from\\:pgpass\n",
        )
        .expect("it works");
        let url = "postgres://meta@127.0.0.1:5433/app";
        let with = |sources: PasswordSources| {
            PgConnection::from_url(url, &sources)
                .expect("it works")
                .password
        };
        let all = PasswordSources {
            password_file: Some(file.clone()),
            env_password: Some("from-env".to_owned()),
            passfile: Some(passfile.clone()),
            env_user: None,
        };
        assert_eq!(with(all.clone()).as_deref(), Some("from-file"));
        let no_file = PasswordSources {
            password_file: None,
            ..all.clone()
        };
        assert_eq!(with(no_file.clone()).as_deref(), Some("from-env"));
        let only_pgpass = PasswordSources {
            env_password: None,
            ..no_file
        };
        assert_eq!(with(only_pgpass).as_deref(), Some("from:pgpass"));
        let connection = PgConnection::from_url(url, &all).expect("it works");
        assert!(!format!("{connection:?}").contains("from-file"));
    }

    #[test]
    fn pgpass_wildcards_and_localhost_match() {
        let text = "localhost:*:*:postgres:secret\n";
        assert_eq!(
            pgpass_lookup(text, "127.0.0.1", 5432, "any", "postgres").as_deref(),
            Some("secret")
        );
        assert_eq!(pgpass_lookup(text, "127.0.0.1", 5432, "any", "other"), None);
    }
}

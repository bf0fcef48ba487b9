//! SQL connections with TLS as the connection's `sslmode` says, through the
//! same rustls configuration the replication connection builds
//! ([`tls_client_config`]).

use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::PgError;
use super::connection::PgConnection;
use super::replication::{SslMode, tls_client_config};

/// Connects `connection` for SQL and runs the connection's driver task on
/// tokio until the client is dropped.
pub(crate) async fn connect(connection: &PgConnection) -> Result<Client, PgError> {
    let mut config = connection.config();
    let tls = tls_client_config(&connection.tls)
        .await
        .map_err(|error| PgError::replication("setting TLS up", error))?;
    let server = connection.server();
    let client = match tls {
        None => {
            config.ssl_mode(DriverSslMode::Disable);
            let (client, driver) = config
                .connect(NoTls)
                .await
                .map_err(|error| connection.connect_error(&error))?;
            spawn_driver(driver, server);
            client
        }
        Some(tls) => {
            // The checking is the rustls configuration's: tokio-postgres
            // only needs to know whether TLS is a must.
            config.ssl_mode(match connection.tls.mode {
                SslMode::Prefer => DriverSslMode::Prefer,
                _ => DriverSslMode::Require,
            });
            let (client, driver) = config
                .connect(MakeRustlsConnect::new(tls))
                .await
                .map_err(|error| connection.connect_error(&error))?;
            spawn_driver(driver, server);
            client
        }
    };
    Ok(client)
}

/// Runs a connection's driver until its client is dropped (or the
/// connection breaks: the client's next call says how).
fn spawn_driver<S, T>(driver: tokio_postgres::Connection<S, T>, server: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = driver.await {
            tracing::debug!(%server, error = %super::describe_error(&error), "a PostgreSQL connection ended");
        }
    });
}

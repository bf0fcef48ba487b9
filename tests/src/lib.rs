//! ferry-tests: the harness for ferry's end-to-end tests.
//!
//! Every server a test needs is started by the test itself, on `127.0.0.1`
//! with a free port and a temporary directory, and stopped when its handle
//! is dropped (DESIGN.md, "Testing"). The tests live in `tests/`, one binary
//! per file.
//!
//! - [`S3Server`]: an S3-compatible server (s3s-fs, in-process, plain HTTP)
//!   for the `s3://` store.
//! - [`etcd::EtcdServer`]: a real etcd member (Debian's `etcd-server`).
//! - [`plane`]: what a test does to an etcd (put, delete, read back, its
//!   history), and `ferry` and `etcdctl` run as commands.
//! - [`pg::PgServer`]: a real PostgreSQL server; [`pg_data`]: two
//!   databases compared through SQL, and `ferry` run against PostgreSQL.
//! - [`mlflow::MlflowServer`]: a real MLflow tracking server (2.x or 3.x);
//!   [`mlflow::check`]: two servers compared over MLflow's REST API.

pub mod conformance;
pub mod etcd;
pub mod live;
pub mod mlflow;
pub mod pg;
pub mod pg_data;
pub mod pg_live;
pub mod plane;
pub mod process;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use ferry_engine::store::BackupStore;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnectionBuilder;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The `ferry` binary of this build, built first (once per test process) so
/// a test never runs a stale one. Tests that run `ferry` as a process (to
/// kill it with -9, say) use it.
pub fn ferry_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let test_binary = std::env::current_exe().expect("the test binary has a path");
            // A test is target/<profile>/deps/<test>, a bench binary
            // target/<profile>/<bench>; ferry is target/<profile>/ferry.
            let mut profile_dir = test_binary
                .parent()
                .expect("the test binary is in a folder");
            if profile_dir.file_name().is_some_and(|name| name == "deps") {
                profile_dir = profile_dir.parent().expect("deps is in target/<profile>");
            }
            let release = profile_dir
                .file_name()
                .is_some_and(|name| name == "release");
            let mut build = std::process::Command::new(env!("CARGO"));
            build.args(["build", "--quiet", "-p", "ferry-cli"]);
            if release {
                build.arg("--release");
            }
            let status = build.status().expect("cargo runs");
            assert!(status.success(), "ferry builds");
            profile_dir.join("ferry")
        })
        .clone()
}

/// The access key every [`S3Server`] accepts (and the only one).
pub const S3_ACCESS_KEY: &str = "ferry-test-access-key";
/// The secret key that goes with [`S3_ACCESS_KEY`].
pub const S3_SECRET_KEY: &str = "ferry-test-secret-key";
/// The region clients sign for; s3s-fs has no regions, any would do.
pub const S3_REGION: &str = "us-east-1";
/// The bucket [`S3Server::start`] creates.
pub const S3_BUCKET: &str = "ferry-test";

/// An S3-compatible server (s3s-fs) running inside the test process, over
/// plain HTTP on `127.0.0.1`, storing objects under a temporary directory.
/// It requires SigV4 signatures with [`S3_ACCESS_KEY`] / [`S3_SECRET_KEY`],
/// so a client that forgets its credentials fails as it would against S3.
///
/// Dropping it aborts the accept loop and every open connection, then
/// deletes the directory. It must be started inside a Tokio runtime, and
/// serves only while that runtime runs (a `#[tokio::test]` does).
#[derive(Debug)]
pub struct S3Server {
    address: SocketAddr,
    bucket: String,
    accept_task: JoinHandle<()>,
    // Last: removed after the server stopped using it.
    root: TempDir,
}

impl S3Server {
    /// Starts a server with one empty bucket, [`S3_BUCKET`].
    pub async fn start() -> io::Result<Self> {
        Self::start_with_bucket(S3_BUCKET).await
    }

    /// Starts a server with one empty bucket of the given name.
    pub async fn start_with_bucket(bucket: &str) -> io::Result<Self> {
        let root = tempfile::Builder::new().prefix("ferry-s3-").tempdir()?;
        // s3s-fs keeps a bucket as a folder under its root.
        std::fs::create_dir(root.path().join(bucket))?;
        // s3s_fs::Error implements Debug only.
        let file_system = s3s_fs::FileSystem::new(root.path())
            .map_err(|error| io::Error::other(format!("cannot start s3s-fs: {error:?}")))?;
        let service = {
            let mut builder = S3ServiceBuilder::new(file_system);
            builder.set_auth(SimpleAuth::from_single(S3_ACCESS_KEY, S3_SECRET_KEY));
            builder.build()
        };
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let address = listener.local_addr()?;
        let accept_task = tokio::spawn(async move {
            let http = ConnectionBuilder::new(TokioExecutor::new());
            // Dropped with this task when it is aborted, which aborts
            // every connection still open.
            let mut connections = JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    // Out of file descriptors, say: let the connections
                    // that hold them run, then try again.
                    tokio::task::yield_now().await;
                    continue;
                };
                let connection = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                connections.spawn(async move {
                    // A client hanging up mid-request is not the server's
                    // failure; the client sees it.
                    let _ = connection.await;
                });
                // Reap finished connections so the set stays small.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            address,
            bucket: bucket.to_owned(),
            accept_task,
            root,
        })
    }

    /// The endpoint clients use: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The access key the server accepts.
    pub fn access_key(&self) -> &'static str {
        S3_ACCESS_KEY
    }

    /// The secret key the server accepts.
    pub fn secret_key(&self) -> &'static str {
        S3_SECRET_KEY
    }

    /// The bucket created at start.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The folder that holds the bucket's objects as files (for tests that
    /// damage or inspect objects behind the store's back).
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(&self.bucket)
    }

    /// The server's root folder.
    pub fn root_dir(&self) -> &FsPath {
        self.root.path()
    }

    /// The store URL ferry takes for `prefix` in the bucket:
    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The `AWS_*` environment a process needs so that
    /// `BackupStore::open(self.url(..))` reaches this server. For child
    /// processes (`Command::envs`): setting them in the test process would
    /// race with every other test in it.
    pub fn aws_environment(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_owned()),
            ("AWS_REGION", S3_REGION.to_owned()),
        ]
    }

    /// An object store client for the bucket, configured explicitly (no
    /// environment variable is read, so parallel tests cannot interfere).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        let store = AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_access_key_id(S3_ACCESS_KEY)
            .with_secret_access_key(S3_SECRET_KEY)
            .with_region(S3_REGION)
            .with_bucket_name(&self.bucket)
            .build()
            .expect("an S3 client with an endpoint, a bucket and static credentials builds");
        Arc::new(store)
    }

    /// The backup store at `s3://BUCKET/PREFIX` on this server, as
    /// `BackupStore::open` would make it from the `AWS_*` environment, but
    /// built without reading the environment.
    pub fn backup_store(&self, prefix: &str) -> BackupStore {
        let root = Path::parse(prefix).expect("a test prefix is a valid object path");
        BackupStore::from_object_store(self.object_store(), root, &self.url(prefix))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

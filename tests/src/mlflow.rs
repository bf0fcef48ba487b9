//! Real MLflow tracking servers for tests: `mlflow server` from one of the
//! two virtual environments `scripts/test.sh` installs (MLflow 2.22.5 and
//! 3.17.2), with a SQLite backend and served artifacts in a temporary
//! directory, one worker, on a free `127.0.0.1` port; stopped when the
//! handle is dropped. And the Python side of the MLflow tests, run with the
//! environment's own Python: `tests/mlflow/make_data.py` (a data set made
//! with MLflow's client) and `tests/mlflow/check.py` (two servers compared
//! over the REST API, independently of ferry).
//!
//! `mlflow server` forks (gunicorn on 2.x, uvicorn on 3.x, and on 3.x job
//! runners unless `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`), so the
//! server runs in its own process group and the whole group is killed.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to answer `GET /health` (2.x takes about
/// 13 s on this 2-core machine when two start at once: it creates its
/// tables first).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How much of a server's log an error or a failed test shows.
const LOG_LINES_SHOWN: usize = 40;

/// A major version of MLflow, each in its own virtual environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlflowVersion {
    /// MLflow 2.22.5 (`$FERRY_MLFLOW2_VENV`, else `/opt/ferry/mlflow-2.22.5`).
    V2,
    /// MLflow 3.17.2 (`$FERRY_MLFLOW3_VENV`, else `/opt/ferry/mlflow-3.17.2`).
    V3,
}

impl MlflowVersion {
    /// The exact version `scripts/test.sh` installs.
    pub fn version(self) -> &'static str {
        match self {
            Self::V2 => "2.22.5",
            Self::V3 => "3.17.2",
        }
    }

    /// The virtual environment it runs from.
    pub fn venv(self) -> PathBuf {
        let variable = match self {
            Self::V2 => "FERRY_MLFLOW2_VENV",
            Self::V3 => "FERRY_MLFLOW3_VENV",
        };
        std::env::var_os(variable)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(format!("/opt/ferry/mlflow-{}", self.version())))
    }

    /// The environment's Python, which has `mlflow`, `pandas` and `requests`.
    pub fn python(self) -> PathBuf {
        self.venv().join("bin").join("python")
    }

    fn mlflow(self) -> io::Result<PathBuf> {
        let mlflow = self.venv().join("bin").join("mlflow");
        if mlflow.exists() {
            Ok(mlflow)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} is missing: MLflow {} is not installed; `bash scripts/test.sh` installs it",
                    mlflow.display(),
                    self.version()
                ),
            ))
        }
    }
}

/// One `mlflow server` for one test.
#[derive(Debug)]
pub struct MlflowServer {
    child: Child,
    port: u16,
    version: MlflowVersion,
    // Last: removed after the server is gone.
    root: TempDir,
}

impl MlflowServer {
    /// Starts a server of `version` with an empty SQLite store and waits
    /// until `GET /health` answers. A port taken by another process between
    /// finding it free and the server binding it is tried again elsewhere.
    pub fn start(version: MlflowVersion) -> io::Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(version) {
                Err(error) if attempt < 5 && port_was_taken(&error.to_string()) => {}
                started => return started,
            }
        }
    }

    fn start_once(version: MlflowVersion) -> io::Result<Self> {
        let mlflow = version.mlflow()?;
        let root = tempfile::Builder::new().prefix("ferry-mlflow-").tempdir()?;
        let port = free_port()?;
        let log = std::fs::File::create(root.path().join("server.log"))?;
        let mut command = Command::new(&mlflow);
        command
            .arg("server")
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", root.path().join("m.db").display()))
            .arg("--artifacts-destination")
            .arg(root.path().join("art"))
            .arg("--serve-artifacts")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--workers", "1"])
            .args(access_log_args(version))
            .current_dir(root.path())
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false");
        without_mlflow_client_environment(&mut command);
        let child = command
            // Its own group, so dropping it reaches gunicorn's or uvicorn's
            // workers too.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("cannot start {}: {error}", mlflow.display()),
                )
            })?;
        let mut server = Self {
            child,
            port,
            version,
            root,
        };
        server.wait_healthy()?;
        Ok(server)
    }

    fn wait_healthy(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "mlflow server {} exited with {status} before it served; the last lines it logged:\n{}",
                    self.version.version(),
                    self.log_tail()
                )));
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(io::Error::other(format!(
                    "mlflow server {} did not answer GET /health on port {} within {START_TIMEOUT:?}; the last lines it logged:\n{}",
                    self.version.version(),
                    self.port,
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `GET /health` answers 200 `OK` once the server serves.
    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        if stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.starts_with("HTTP/1.") && response.contains(" 200 ")
    }

    /// `http://127.0.0.1:PORT`, for MLflow's clients and REST calls.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `mlflow+http://127.0.0.1:PORT`, for ferry.
    pub fn ferry_url(&self) -> String {
        format!("mlflow+{}", self.url())
    }

    /// The port it listens on, on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Which MLflow it runs.
    pub fn version(&self) -> MlflowVersion {
        self.version
    }

    /// The Python of its virtual environment.
    pub fn python(&self) -> PathBuf {
        self.version.python()
    }

    /// The folder the server's artifacts are stored in (`--artifacts-destination`).
    pub fn artifacts_dir(&self) -> PathBuf {
        self.root.path().join("art")
    }

    /// The process group's id (the `mlflow server` process's own id), to
    /// signal the whole server (`kill -STOP -- -PGID`).
    pub fn process_group(&self) -> u32 {
        self.child.id()
    }

    /// What the server logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("server.log")).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_LINES_SHOWN)..].join("\n")
    }

    /// Requests the server has answered so far (health checks left out),
    /// from its access log: a bench counts what a tool asked as the
    /// difference between two readings.
    pub fn requests_logged(&self) -> u64 {
        self.requests().len() as u64
    }

    /// The requests the server has answered so far (health checks left
    /// out), in the order of its access log.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        std::fs::read_to_string(self.root.path().join("server.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(LoggedRequest::parse)
            .collect()
    }

    /// Runs `tests/mlflow/SCRIPT ARGS` with this server's Python and
    /// `MLFLOW_TRACKING_URI` set to this server; see [`run_script`].
    pub fn run_script(&self, script: &str, args: &[&str]) -> io::Result<String> {
        run_script(
            self.version,
            script,
            args,
            &[("MLFLOW_TRACKING_URI", &self.url())],
        )
    }

    /// Fills the server with `tests/mlflow/make_data.py`'s data set at
    /// `scale` (1 is small) and returns the summary it prints (counts).
    pub fn make_data(&self, scale: u32, extra_args: &[&str]) -> io::Result<serde_json::Value> {
        let scale = scale.to_string();
        let mut args = vec!["--scale", scale.as_str()];
        args.extend_from_slice(extra_args);
        let printed = self.run_script("make_data.py", &args)?;
        let last = printed.lines().last().unwrap_or_default();
        serde_json::from_str(last).map_err(|error| {
            io::Error::other(format!(
                "make_data.py printed {last:?} last, not its JSON summary: {error}"
            ))
        })
    }

    fn stop(&mut self) {
        // The whole group: `mlflow server` and the workers it forked.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        self.stop();
        // A failed test shows what the server logged last: CI keeps
        // nothing else of it.
        if std::thread::panicking() {
            eprintln!(
                "--- the last lines mlflow server {} on port {} logged ---\n{}\n---",
                self.version.version(),
                self.port,
                self.log_tail()
            );
        }
    }
}

/// A 2.x server (gunicorn) logs no requests unless told, here with the
/// time each took (gunicorn's `%(L)s`, seconds); a 3.x server (uvicorn)
/// logs each one, without times. Both log them, so
/// [`MlflowServer::requests_logged`] can count what a client asked.
fn access_log_args(version: MlflowVersion) -> &'static [&'static str] {
    match version {
        MlflowVersion::V2 => &[
            "--gunicorn-opts",
            // MLflow splits these with shlex.
            r#"--access-logfile=- '--access-logformat=%(h)s "%(r)s" %(s)s %(L)s'"#,
        ],
        MlflowVersion::V3 => &[],
    }
}

/// A request a server's access log shows.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedRequest {
    /// `POST`, `GET`...
    pub method: String,
    /// The path, without its query.
    pub path: String,
    /// How long the server took to answer it (2.x servers only).
    pub seconds: Option<f64>,
}

impl LoggedRequest {
    /// A line of a server's log as the request it answered (gunicorn's
    /// `... "GET /path HTTP/1.1" 200 0.012345` or uvicorn's `... - "GET
    /// /path HTTP/1.1" 200 OK`), unless it is a health check or no request.
    fn parse(line: &str) -> Option<LoggedRequest> {
        let (_, rest) = line.split_once('"')?;
        let (request, after) = rest.split_once('"')?;
        let mut parts = request.split(' ');
        let (method, target, protocol) = (parts.next()?, parts.next()?, parts.next()?);
        if !["GET", "POST", "DELETE", "PATCH", "PUT"].contains(&method)
            || !protocol.starts_with("HTTP/1.")
        {
            return None;
        }
        let path = target.split_once('?').map_or(target, |(path, _)| path);
        if path == "/health" {
            return None;
        }
        let seconds = after
            .split_whitespace()
            .nth(1)
            .and_then(|time| time.parse().ok());
        Some(LoggedRequest {
            method: method.to_owned(),
            path: path.to_owned(),
            seconds,
        })
    }
}

/// The folder of the MLflow tests' Python scripts, `tests/mlflow/`.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mlflow")
}

/// Runs `tests/mlflow/SCRIPT ARGS` with the Python of `version`'s virtual
/// environment and `environment` (no `MLFLOW_*` variable of the test's own
/// environment reaches it). Returns its stdout when it exits 0; otherwise
/// an error with its exit status and stderr.
pub fn run_script(
    version: MlflowVersion,
    script: &str,
    args: &[&str],
    environment: &[(&str, &str)],
) -> io::Result<String> {
    let output = script_command(version, script, args, environment)?.output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{script} {} failed ({}):\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn script_command(
    version: MlflowVersion,
    script: &str,
    args: &[&str],
    environment: &[(&str, &str)],
) -> io::Result<Command> {
    let python = version.python();
    if !python.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is missing: MLflow {} is not installed; `bash scripts/test.sh` installs it",
                python.display(),
                version.version()
            ),
        ));
    }
    let mut command = Command::new(python);
    command
        .arg(scripts_dir().join(script))
        .args(args)
        .current_dir(scripts_dir())
        .stdin(Stdio::null());
    without_mlflow_client_environment(&mut command);
    for (name, value) in environment {
        command.env(name, value);
    }
    Ok(command)
}

/// What `tests/mlflow/check.py` found comparing two servers.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// True when every compared field is equal.
    pub equal: bool,
    /// The whole report: `differences` (the first 50), `difference_count`,
    /// `counts` (per server), `fidelity`.
    pub report: serde_json::Value,
}

impl CheckReport {
    /// The report's differences (at most the first 50).
    pub fn differences(&self) -> &[serde_json::Value] {
        self.report["differences"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// A count of one side: `source` or `target`, e.g. `runs`, `metric_points`.
    pub fn count(&self, side: &str, name: &str) -> u64 {
        self.report["counts"][side][name].as_u64().unwrap_or(0)
    }
}

/// Compares the servers at `source_url` and `target_url` with
/// `tests/mlflow/check.py`, run with `python_of`'s Python (any version
/// reads both). Both outcomes (equal or not) are an `Ok`; an error is a
/// checker that could not read a server or did not run.
pub fn check(
    python_of: MlflowVersion,
    source_url: &str,
    target_url: &str,
    extra_args: &[&str],
) -> io::Result<CheckReport> {
    let mut args = vec![source_url, target_url];
    args.extend_from_slice(extra_args);
    let output = script_command(python_of, "check.py", &args, &[])?.output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = match output.status.code() {
        Some(0 | 1) => serde_json::from_str(&stdout).map_err(|error| {
            io::Error::other(format!(
                "check.py printed no JSON report ({error}):\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            ))
        })?,
        _ => {
            return Err(io::Error::other(format!(
                "check.py {source_url} {target_url} failed ({}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            )));
        }
    };
    let equal = report["equal"].as_bool() == Some(true);
    if equal != (output.status.code() == Some(0)) {
        return Err(io::Error::other(format!(
            "check.py exited with {} but its report says equal={equal}",
            output.status
        )));
    }
    Ok(CheckReport { equal, report })
}

/// Removes the variables MLflow's Python client and server read from the
/// environment (tracking URI, credentials...), so nothing of the test
/// runner's own environment changes what a server or a script does.
fn without_mlflow_client_environment(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MLFLOW_") {
            command.env_remove(&name);
        }
    }
}

fn port_was_taken(message: &str) -> bool {
    // gunicorn (2.x) says "Connection in use", uvicorn (3.x) "address
    // already in use".
    let message = message.to_lowercase();
    message.contains("connection in use") || message.contains("address already in use")
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::LoggedRequest;

    #[test]
    fn access_log_lines_of_both_servers_are_read_as_requests() {
        let gunicorn = LoggedRequest::parse(
            r#"127.0.0.1 "POST /api/2.0/mlflow/runs/log-batch HTTP/1.1" 200 0.123456"#,
        );
        assert_eq!(
            gunicorn,
            Some(LoggedRequest {
                method: "POST".to_owned(),
                path: "/api/2.0/mlflow/runs/log-batch".to_owned(),
                seconds: Some(0.123456),
            })
        );
        let uvicorn = LoggedRequest::parse(
            r#"INFO:     127.0.0.1:40112 - "GET /api/2.0/mlflow/runs/get?run_id=abc HTTP/1.1" 200 OK"#,
        );
        assert_eq!(
            uvicorn,
            Some(LoggedRequest {
                method: "GET".to_owned(),
                path: "/api/2.0/mlflow/runs/get".to_owned(),
                seconds: None,
            })
        );
        for not_a_request in [
            r#"127.0.0.1 "GET /health HTTP/1.1" 200 0.000300"#,
            r#"[INFO] Booting worker with pid: 12 "quoted" text"#,
            "Listening at: http://127.0.0.1:5000",
        ] {
            assert_eq!(LoggedRequest::parse(not_a_request), None, "{not_a_request}");
        }
    }
}

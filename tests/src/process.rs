//! ferry's long-running commands (`ferry agent`, `ferry gateway`) as child
//! processes of a test (their output kept, or closed under them), and a TCP
//! proxy that can cut a link.

use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

use crate::ferry_binary;

/// Sends `signal` (`-STOP`, `-CONT`, `-TERM`...) to process `pid` with
/// `kill`; panics if it fails.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid}");
}

/// A `ferry` server process, started with `--output json`, killed on drop.
#[derive(Debug)]
pub struct FerryProcess {
    child: Child,
    ready: serde_json::Value,
    logs: TempDir,
    /// `ferry ARGS`, to name it in a failed test's output.
    command_line: String,
}

impl FerryProcess {
    /// Starts `ferry --output json ARGS` and waits (up to a minute) for the
    /// JSON line it prints when it serves.
    pub fn start(args: &[&str], environment: &[(&str, &str)]) -> io::Result<Self> {
        Self::start_with_output(args, environment, Output::Kept)
    }

    /// [`FerryProcess::start`], with the server's stdout and stderr as
    /// `output` says.
    pub fn start_with_output(
        args: &[&str],
        environment: &[(&str, &str)],
        output: Output,
    ) -> io::Result<Self> {
        let logs = tempfile::tempdir()?;
        let stderr_path = logs.path().join("stderr.log");
        // The read end of stderr's pipe when the test closes it: dropped
        // with the ready line, read whole when the server failed to start.
        let mut stderr_pipe = None;
        let mut child = {
            // Dropped before the server is used: the parent must hold no
            // copy of the pipes' write ends, or nothing is ever closed.
            let mut command = Command::new(ferry_binary());
            command
                .arg("--output")
                .arg("json")
                .args(args)
                .env_remove("ETCD_USERNAME")
                .env_remove("ETCD_PASSWORD")
                .env_remove("FERRY_AGENT_TOKEN")
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::piped());
            match output {
                Output::Kept => {
                    command.stderr(Stdio::from(std::fs::File::create(&stderr_path)?));
                }
                Output::ClosedAfterReadyLine => {
                    let (reader, writer) = io::pipe()?;
                    command.stderr(writer);
                    stderr_pipe = Some(reader);
                }
            }
            for (name, value) in environment {
                command.env(name, value);
            }
            command.spawn()?
        };
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            match output {
                Output::Kept => {
                    let _ = sender.send(first);
                    // Keep reading so the process never blocks on a full pipe.
                    for _ in lines {}
                }
                Output::ClosedAfterReadyLine => {
                    // Closed before the test has the line, as `head -1`
                    // exits once it has printed it.
                    drop(lines);
                    let _ = sender.send(first);
                }
            }
        });
        let fail = |child: &mut Child, stderr_pipe: Option<io::PipeReader>, why: String| {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = match stderr_pipe {
                Some(mut pipe) => {
                    let mut text = String::new();
                    let _ = io::Read::read_to_string(&mut pipe, &mut text);
                    text
                }
                None => std::fs::read_to_string(&stderr_path).unwrap_or_default(),
            };
            io::Error::other(format!(
                "ferry {} {why}; its stderr:\n{stderr}",
                args.join(" ")
            ))
        };
        let line = match receiver.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(Ok(line))) => line,
            Ok(_) => {
                return Err(fail(&mut child, stderr_pipe, "printed nothing".to_owned()));
            }
            Err(_) => {
                return Err(fail(
                    &mut child,
                    stderr_pipe,
                    "was not ready in 60 s".to_owned(),
                ));
            }
        };
        let ready = match serde_json::from_str(&line) {
            Ok(ready) => ready,
            Err(error) => {
                return Err(fail(
                    &mut child,
                    stderr_pipe,
                    format!("printed {line:?}, not JSON: {error}"),
                ));
            }
        };
        drop(stderr_pipe);
        let command_line = format!("ferry {}", args.join(" "));
        Ok(Self {
            child,
            ready,
            logs,
            command_line,
        })
    }

    /// Starts `ferry --output json ARGS` with a stdout whose reader is gone
    /// before the server prints anything, so its very first line meets a
    /// closed pipe; stderr goes to the log. As it can tell nothing on
    /// stdout, it is ready once every one of `serving_at` (addresses the
    /// test chose and passed in `args`, see [`free_address`]) accepts a
    /// connection, within a minute. It has no ready line.
    pub fn start_with_stdout_closed(
        args: &[&str],
        environment: &[(&str, &str)],
        serving_at: &[&str],
    ) -> io::Result<Self> {
        let logs = tempfile::tempdir()?;
        let stderr_path = logs.path().join("stderr.log");
        let mut child = {
            let (reader, writer) = io::pipe()?;
            drop(reader);
            let mut command = Command::new(ferry_binary());
            command
                .arg("--output")
                .arg("json")
                .args(args)
                .env_remove("ETCD_USERNAME")
                .env_remove("ETCD_PASSWORD")
                .env_remove("FERRY_AGENT_TOKEN")
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(writer)
                .stderr(Stdio::from(std::fs::File::create(&stderr_path)?));
            for (name, value) in environment {
                command.env(name, value);
            }
            command.spawn()?
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        for address in serving_at {
            loop {
                if std::net::TcpStream::connect(address).is_ok() {
                    break;
                }
                let why = match child.try_wait()? {
                    Some(status) => format!("exited with {status}"),
                    None if Instant::now() > deadline => {
                        format!("did not accept on {address} within 60 s")
                    }
                    None => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other(format!(
                    "ferry {} {why}; its stderr:\n{}",
                    args.join(" "),
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                )));
            }
        }
        Ok(Self {
            child,
            ready: serde_json::Value::Null,
            logs,
            command_line: format!("ferry {}", args.join(" ")),
        })
    }

    /// A field of the ready line, e.g. `listen` or `admin`.
    pub fn field(&self, name: &str) -> String {
        match &self.ready[name] {
            serde_json::Value::String(text) => text.clone(),
            other => panic!("the ready line {} has no {name} ({other})", self.ready),
        }
    }

    /// The whole ready line.
    pub fn ready(&self) -> &serde_json::Value {
        &self.ready
    }

    /// The process id, to signal it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited, without waiting.
    pub fn exited(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits for it to exit by itself (after a signal, say).
    pub fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// Kills it with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it logged on stderr so far (nothing when the test closed its
    /// stderr, [`Output::ClosedAfterReadyLine`]).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.logs.path().join("stderr.log")
    }
}

impl Drop for FerryProcess {
    fn drop(&mut self) {
        self.kill();
        // A failed test shows what its servers logged last: CI keeps
        // nothing else of them.
        if std::thread::panicking() {
            let log = self.stderr();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_LINES_ON_FAILURE)..];
            eprintln!(
                "--- the last {} lines {} logged ---\n{}\n---",
                tail.len(),
                self.command_line,
                tail.join("\n")
            );
        }
    }
}

/// What becomes of a started server's stdout and stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// stdout is read to its end (the server never blocks on a full pipe),
    /// stderr goes to a log file ([`FerryProcess::stderr`]).
    #[default]
    Kept,
    /// stdout and stderr are pipes the test closes as soon as it has the
    /// ready line, as `ferry ... 2>&1 | head -1` does: every line the server
    /// writes after it, a log line included, meets a closed pipe.
    ClosedAfterReadyLine,
}

/// `127.0.0.1:PORT` with a port free a moment ago, for a server that
/// cannot say which port it took (see
/// [`FerryProcess::start_with_stdout_closed`]).
pub fn free_address() -> io::Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string())
}

/// How much of a server's log a failed test prints.
const LOG_LINES_ON_FAILURE: usize = 40;

/// A TCP proxy in the test process that can cut its link: every open
/// connection dropped, new ones refused, until it is restored.
#[derive(Debug)]
pub struct TcpProxy {
    address: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free `127.0.0.1` port and forwards to `upstream`.
    pub async fn start(upstream: &str) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::<AbortHandle>::new()));
        let upstream = upstream.to_owned();
        let accept = tokio::spawn({
            let cut = cut.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&upstream).await {
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    let mut open = connections.lock().expect("not poisoned");
                    open.retain(|handle| !handle.is_finished());
                    open.push(task.abort_handle());
                }
            }
        });
        Ok(Self {
            address,
            cut,
            connections,
            accept,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for handle in self.connections.lock().expect("not poisoned").drain(..) {
            handle.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

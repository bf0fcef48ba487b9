//! ferry's long-running commands (`ferry agent`, `ferry gateway`) as child
//! processes of a test, and a TCP proxy that can cut a link.

use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

use crate::ferry_binary;

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
        let logs = tempfile::tempdir()?;
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
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(
                logs.path().join("stderr.log"),
            )?));
        for (name, value) in environment {
            command.env(name, value);
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = sender.send(first);
            // Keep reading so the process never blocks on a full pipe.
            for _ in lines {}
        });
        let stderr_path = logs.path().join("stderr.log");
        let fail = |child: &mut Child, why: String| {
            let _ = child.kill();
            let _ = child.wait();
            io::Error::other(format!(
                "ferry {} {why}; its stderr:\n{}",
                args.join(" "),
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            ))
        };
        let line = match receiver.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(Ok(line))) => line,
            Ok(_) => return Err(fail(&mut child, "printed nothing".to_owned())),
            Err(_) => return Err(fail(&mut child, "was not ready in 60 s".to_owned())),
        };
        let ready = match serde_json::from_str(&line) {
            Ok(ready) => ready,
            Err(error) => {
                return Err(fail(
                    &mut child,
                    format!("printed {line:?}, not JSON: {error}"),
                ));
            }
        };
        let command_line = format!("ferry {}", args.join(" "));
        Ok(Self {
            child,
            ready,
            logs,
            command_line,
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

    /// Waits for it to exit by itself (after a signal, say).
    pub fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// Kills it with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it logged on stderr so far.
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

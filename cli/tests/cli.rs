//! The `ferry` binary end to end on a `file://` store: what it prints, what
//! it writes, and its exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("ferry runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("stdout is JSON ({error}): {}", text(&output.stdout)))
}

/// Ops as ferry itself writes them (seq first, defaults left out), so a
/// restore must give back these exact bytes.
fn canonical_lines(count: u64) -> String {
    let mut lines = String::new();
    for seq in 1..=count {
        let body = format!(
            r#"{{"name":"pipeline-{seq}","spec":{{"parallelism":{}, "image":"etl:1.{}"}}}}"#,
            seq % 4,
            seq % 9
        );
        if seq % 50 == 0 {
            lines.push_str(&format!(
                "{{\"seq\":{seq},\"kind\":\"etcd.kv\",\"txn\":{seq},\"position\":{seq},\"key_b64\":\"/wD+\",\"method\":\"Put\",\"body_b64\":\"AAECAw==\"}}\n"
            ));
        } else {
            lines.push_str(&format!(
                "{{\"seq\":{seq},\"kind\":\"etcd.kv\",\"position\":{seq},\"key\":\"/pachyderm/pps/pipelines/p{seq}\",\"method\":\"Put\",\"body\":{body}}}\n"
            ));
        }
    }
    lines
}

struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn store(&self) -> String {
        format!("file://{}", self.path("store").display())
    }

    fn write(&self, name: &str, contents: &str) -> String {
        std::fs::write(self.path(name), contents).expect("write input");
        format!("jsonl://{}", self.path(name).display())
    }

    /// Extracts `input` with small segments; returns the backup id.
    fn extract(&self, input: &str) -> String {
        let output = ferry(&[
            "extract",
            "--source",
            input,
            "--to",
            &self.store(),
            "--segment-bytes",
            "4096",
            "--quiet",
        ]);
        assert!(
            output.status.success(),
            "extract failed: {}",
            text(&output.stderr)
        );
        text(&output.stdout).trim().to_owned()
    }
}

fn segment_files(store: &Path, backup_id: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(store.join("backups").join(backup_id).join("segments"))
            .expect("segments folder")
            .map(|entry| entry.expect("entry").path())
            .collect();
    files.sort();
    files
}

#[test]
fn extract_inspect_verify_restore_round_trip_byte_for_byte() {
    let work = Workspace::new();
    let lines = canonical_lines(500);
    let input = work.write("in.jsonl", &lines);

    let extract = ferry(&[
        "extract",
        "--source",
        &input,
        "--to",
        &work.store(),
        "--segment-bytes",
        "4096",
        "--output",
        "json",
    ]);
    assert!(extract.status.success(), "{}", text(&extract.stderr));
    let summary = json(&extract);
    let backup_id = summary["backup_id"].as_str().expect("backup_id").to_owned();
    assert_eq!(summary["ops"], 500);
    assert!(
        summary["segments"].as_u64().expect("segments") > 5,
        "{summary}"
    );
    assert!(summary["compressed_bytes"].as_u64() < summary["uncompressed_bytes"].as_u64());

    let inspect = ferry(&["inspect", &work.store(), "--output", "json"]);
    assert!(inspect.status.success());
    let listing = json(&inspect);
    assert_eq!(listing["backups"][0]["backup_id"], backup_id.as_str());
    assert_eq!(listing["backups"][0]["complete"], true);
    assert_eq!(listing["backups"][0]["ops"], 500);

    let manifest = ferry(&["inspect", &work.store(), "--backup", &backup_id]);
    assert!(manifest.status.success());
    let shown = text(&manifest.stdout);
    assert!(shown.contains("status      complete"), "{shown}");
    assert!(shown.contains("00000000000000000001-"), "{shown}");

    let verify = ferry(&["verify", &work.store()]);
    assert!(verify.status.success(), "{}", text(&verify.stdout));
    assert!(text(&verify.stdout).contains("is sound"));

    let out = work.path("out.jsonl");
    let restore = ferry(&[
        "restore",
        "--from",
        &work.store(),
        "--target",
        &format!("jsonl://{}", out.display()),
    ]);
    assert!(restore.status.success(), "{}", text(&restore.stderr));
    assert_eq!(std::fs::read_to_string(&out).expect("output"), lines);
}

#[test]
fn stdin_to_stdout_through_a_store() {
    let work = Workspace::new();
    let lines = canonical_lines(120);
    let mut extract = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "extract",
            "--source",
            "jsonl://-",
            "--to",
            &work.store(),
            "--quiet",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("ferry runs");
    extract
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("write stdin");
    let extracted = extract.wait_with_output().expect("extract ends");
    assert!(extracted.status.success());
    let restore = ferry(&["restore", "--from", &work.store(), "--target", "jsonl://-"]);
    assert!(restore.status.success(), "{}", text(&restore.stderr));
    assert_eq!(
        text(&restore.stdout),
        lines,
        "stdout holds the ops and nothing else"
    );
}

#[test]
fn restore_takes_the_latest_complete_backup_and_skips_an_incomplete_one() {
    let work = Workspace::new();
    let older = work.extract(&work.write("a.jsonl", &canonical_lines(10)));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let newer = work.extract(&work.write("b.jsonl", &canonical_lines(20)));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let newest = work.extract(&work.write("c.jsonl", &canonical_lines(30)));
    assert!(older < newer && newer < newest);
    std::fs::remove_file(
        work.path("store")
            .join("backups")
            .join(&newest)
            .join("manifest.json"),
    )
    .expect("unseal");

    let listing = ferry(&["inspect", &work.store()]);
    let table = text(&listing.stdout);
    assert!(table.contains(&format!("{newest}   INCOMPLETE")), "{table}");

    let out = work.path("out.jsonl");
    let restore = ferry(&[
        "restore",
        "--from",
        &work.store(),
        "--target",
        &format!("jsonl://{}", out.display()),
        "--output",
        "json",
    ]);
    assert!(restore.status.success(), "{}", text(&restore.stderr));
    assert_eq!(json(&restore)["backup_id"], newer.as_str());
    assert_eq!(
        std::fs::read_to_string(&out).expect("output"),
        canonical_lines(20)
    );

    let explicit = ferry(&[
        "restore",
        "--from",
        &work.store(),
        "--backup",
        &newest,
        "--target",
        &format!("jsonl://{}", out.display()),
    ]);
    assert_eq!(
        explicit.status.code(),
        Some(4),
        "an incomplete backup is never restored"
    );
    assert!(
        text(&explicit.stderr).contains("is incomplete"),
        "{}",
        text(&explicit.stderr)
    );
}

#[test]
fn verify_exits_3_and_names_the_damaged_segment() {
    let work = Workspace::new();
    let backup_id = work.extract(&work.write("in.jsonl", &canonical_lines(300)));
    let segments = segment_files(&work.path("store"), &backup_id);
    let damaged = &segments[1];
    let mut bytes = std::fs::read(damaged).expect("segment");
    let index = bytes.len() - 3;
    bytes[index] ^= 0x10;
    std::fs::write(damaged, bytes).expect("write");
    let name = damaged
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_suffix(".ops.zst"))
        .expect("name");

    let verify = ferry(&[
        "verify",
        &work.store(),
        "--backup",
        &backup_id,
        "--output",
        "json",
    ]);
    assert_eq!(verify.status.code(), Some(3));
    let report = json(&verify);
    assert_eq!(report["ok"], false);
    assert_eq!(report["problems"][0]["segment"], name);
    assert!(
        report["problems"][0]["error"]
            .as_str()
            .expect("error")
            .contains("failed its checksum")
    );
    assert!(text(&verify.stderr).contains(name));

    let out = work.path("out.jsonl");
    let restore = ferry(&[
        "restore",
        "--from",
        &work.store(),
        "--target",
        &format!("jsonl://{}", out.display()),
    ]);
    assert_eq!(restore.status.code(), Some(3));
    assert!(
        !out.exists(),
        "nothing is left at the target name after a failed restore"
    );
}

#[test]
fn bad_input_gets_its_own_exit_code_and_says_where() {
    let work = Workspace::new();
    let input = work.write(
        "bad.jsonl",
        "{\"key\":\"a\",\"method\":\"Put\",\"body\":1}\n{\"key\":\"b\",\"method\":\"Put\"}\n",
    );
    let extract = ferry(&["extract", "--source", &input, "--to", &work.store()]);
    assert_eq!(extract.status.code(), Some(5));
    let message = text(&extract.stderr);
    assert!(
        message.contains("bad.jsonl line 2: missing field `body`"),
        "{message}"
    );

    let missing = ferry(&[
        "extract",
        "--source",
        "jsonl:///nonexistent/in.jsonl",
        "--to",
        &work.store(),
    ]);
    assert_eq!(missing.status.code(), Some(5));
    assert!(text(&missing.stderr).contains("/nonexistent/in.jsonl"));

    let no_backup = ferry(&[
        "restore",
        "--from",
        &work.store(),
        "--backup",
        "20990101T000000Z-00000000",
        "--target",
        "jsonl://-",
    ]);
    assert_eq!(no_backup.status.code(), Some(4));
    assert!(text(&no_backup.stderr).contains("no backup 20990101T000000Z-00000000"));

    let bad_scheme = ferry(&["inspect", "ftp://somewhere/backups"]);
    assert_eq!(bad_scheme.status.code(), Some(2));
    let bad_source = ferry(&["extract", "--source", "mysql://db", "--to", &work.store()]);
    assert_eq!(bad_source.status.code(), Some(2));
    assert!(text(&bad_source.stderr).contains("no adapter"));
}

#[test]
fn help_documents_the_exit_codes() {
    let help = ferry(&["--help"]);
    assert!(help.status.success());
    assert!(text(&help.stdout).contains("3  damaged backup"));
}

/// `ferry ARGS` without the agents' token in its environment.
fn ferry_without_token(args: &[&str], token: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
    command.args(args).env_remove("FERRY_AGENT_TOKEN");
    if let Some(token) = token {
        command.env("FERRY_AGENT_TOKEN", token);
    }
    command.output().expect("ferry runs")
}

/// A `ferry` server, killed when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    /// Starts `ferry --output json ARGS` and returns it with its ready line.
    fn start(args: &[&str]) -> (Self, serde_json::Value) {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["--output", "json"])
            .args(args)
            .env_remove("FERRY_AGENT_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ferry starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the ready line");
        let server = Self(child);
        let ready = serde_json::from_str(&line).unwrap_or_else(|error| {
            panic!("ferry {args:?} printed {line:?}, not its ready line ({error})")
        });
        (server, ready)
    }
}

/// Asserts `output` is a usage error (exit 2) whose message has every one
/// of `parts`.
fn assert_refused(output: &Output, parts: &[&str]) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "exit 2 (usage): {stderr}");
    for part in parts {
        assert!(stderr.contains(part), "{part:?} in {stderr}");
    }
}

/// Secure by default (issue 10, item 11): `ferry agent source --listen
/// 0.0.0.0:7400` used to start with no TLS and no token, and stream the
/// whole control plane to anyone who connected. Off loopback, an agent now
/// needs both, or says it runs insecure on purpose.
#[test]
fn an_agent_off_loopback_needs_tls_and_a_token_or_insecure_listen() {
    // Nothing listens there: an agent reaches its etcd only when called.
    let plane = "etcd://127.0.0.1:1";
    for role in ["source", "target"] {
        let args = [
            "agent",
            role,
            "--control-plane",
            plane,
            "--listen",
            "0.0.0.0:0",
        ];
        assert_refused(
            &ferry_without_token(&args, None),
            &[
                &format!("the {role} agent would serve on 0.0.0.0:"),
                "(--listen 0.0.0.0:0)",
                "without TLS and without a token",
                "--tls-cert-file FILE --tls-key-file FILE",
                "--token-file FILE (or FERRY_AGENT_TOKEN)",
                "--insecure-listen",
            ],
        );
        // A token alone would cross the network in clear.
        let token_only = ferry_without_token(&args, Some("a-token"));
        assert_refused(&token_only, &["without TLS", "--tls-cert-file"]);
        assert!(!text(&token_only.stderr).contains("--token-file"));

        let (_agent, ready) = Server::start(&[&args[..], &["--insecure-listen"]].concat());
        assert_eq!(ready["role"], role);
        assert!(
            ready["listen"]
                .as_str()
                .expect("listen is a string")
                .starts_with("0.0.0.0:"),
            "{ready}"
        );
        assert_eq!(ready["tls"], false);
        assert_eq!(ready["token_required"], false);
    }
    // Loopback needs neither, by address or by name.
    for listen in ["127.0.0.1:0", "localhost:0"] {
        let (_agent, ready) = Server::start(&[
            "agent",
            "source",
            "--control-plane",
            plane,
            "--listen",
            listen,
        ]);
        assert_eq!(ready["role"], "source");
    }
}

/// The gateway's admin service (Hold, Switch, Release) follows the agents'
/// rule; its etcd API (`--listen`) serves clients plain etcd, as etcd does.
#[test]
fn a_gateway_admin_service_off_loopback_needs_tls_and_a_token_or_insecure_listen() {
    // Nothing listens at the upstream: the refusal comes before the gateway
    // tries it (an unreachable upstream exits 1).
    let gateway = |admin: &str, extra: &[&str]| {
        ferry_without_token(
            &[
                &[
                    "gateway",
                    "--listen",
                    "127.0.0.1:0",
                    "--upstream",
                    "etcd://127.0.0.1:1",
                    "--admin-listen",
                    admin,
                ],
                extra,
            ]
            .concat(),
            None,
        )
    };
    assert_refused(
        &gateway("0.0.0.0:0", &[]),
        &[
            "the gateway's admin service would serve on 0.0.0.0:",
            "(--admin-listen 0.0.0.0:0)",
            "without TLS and without a token",
            "--tls-cert-file FILE --tls-key-file FILE",
            "--token-file FILE (or FERRY_AGENT_TOKEN)",
            "--insecure-listen",
        ],
    );
    // Past the check, it goes on to its upstream (here: none, exit 1).
    for (admin, extra) in [
        ("0.0.0.0:0", &["--insecure-listen"][..]),
        ("127.0.0.1:0", &[][..]),
    ] {
        let output = gateway(admin, extra);
        assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
        assert!(
            text(&output.stderr).contains("cannot reach upstream"),
            "{}",
            text(&output.stderr)
        );
    }
    let clients_anywhere = ferry_without_token(
        &[
            "gateway",
            "--listen",
            "0.0.0.0:0",
            "--upstream",
            "etcd://127.0.0.1:1",
        ],
        None,
    );
    assert_eq!(clients_anywhere.status.code(), Some(1));
    assert!(text(&clients_anywhere.stderr).contains("cannot reach upstream"));
}

/// Each adapter's flags open a help heading of their own (the registry
/// flattens them in): the heading holds that adapter's flags and no
/// command's own, whatever the order of the fields.
#[test]
fn each_adapter_heading_holds_its_own_flags_only() {
    let etcd_flags = [
        "--etcd-password-file",
        "--etcd-ca-file",
        "--etcd-cert-file",
        "--etcd-key-file",
        "--max-txn-ops",
        "--max-request-bytes",
        "--lanes",
        "--txns-in-flight",
    ];
    let postgres_flags = [
        "--pg-password-file",
        "--pg-ca-file",
        "--schema",
        "--table",
        "--keep-slot",
        "--row-format",
        "--pg-ops-per-commit",
        "--pg-lanes",
    ];
    for (command, headings) in [
        (&["extract"][..], &["etcd", "PostgreSQL"][..]),
        (&["restore"], &["etcd", "PostgreSQL"]),
        (&["agent", "source"], &["etcd", "PostgreSQL"]),
        (&["agent", "target"], &["etcd", "PostgreSQL"]),
        (&["gateway"], &["etcd"]),
        (&["migrations", "up"], &["etcd"]),
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let help = text(&ferry(&args).stdout);
        for heading in headings {
            let own: &[&str] = if *heading == "etcd" {
                &etcd_flags
            } else {
                &postgres_flags
            };
            let (_, under) = help
                .split_once(&format!("\n{heading}:\n"))
                .unwrap_or_else(|| {
                    panic!("ferry {command:?} --help has no {heading} heading:\n{help}")
                });
            // The section ends at the next heading (a line that does not
            // start with a space).
            let flags: Vec<&str> = under
                .lines()
                .take_while(|line| line.is_empty() || line.starts_with(' '))
                .filter_map(|line| line.strip_prefix("      --"))
                .map(|line| line.split_whitespace().next().unwrap_or_default())
                .collect();
            assert!(flags.len() >= 2, "ferry {command:?} {heading}: {flags:?}");
            for flag in flags {
                let flag = format!("--{flag}");
                assert!(
                    own.contains(&flag.as_str()),
                    "ferry {command:?} --help lists {flag} under {heading}"
                );
            }
        }
    }
}

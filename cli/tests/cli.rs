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

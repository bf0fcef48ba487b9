//! The conformance suite on the `jsonl` adapter: real files in a temporary
//! folder. jsonl is a batch adapter: the live checks answer "not supported".

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ferry_engine::adapters::live::Position;
use ferry_engine::conformance::{self, Change, Contents, Plane, Planes, Verdict};

/// A JSON Lines file as a plane: each write appends its changes as lines
/// (one `txn` for a transaction of several), and what it holds is what its
/// lines leave, in order.
struct JsonlFile {
    path: PathBuf,
    written: AtomicU64,
}

#[async_trait]
impl Plane for JsonlFile {
    fn url(&self) -> String {
        format!("jsonl://{}", self.path.display())
    }

    async fn write(&self, changes: &[Change]) -> Result<Position, String> {
        use std::io::Write;
        let number = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|error| error.to_string())?;
        for change in changes {
            let (key, method, value) = match change {
                Change::Put { key, value } => (key, "Put", value.as_slice()),
                Change::Delete { key } => (key, "Delete", &[][..]),
            };
            let mut line = serde_json::json!({
                "key_b64": BASE64.encode(key),
                "method": method,
                "body_b64": BASE64.encode(value),
                "position": number,
            });
            if changes.len() > 1 {
                line["txn"] = number.into();
            }
            writeln!(file, "{line}").map_err(|error| error.to_string())?;
        }
        Ok(Position(number))
    }

    async fn read_all(&self) -> Contents {
        let mut contents = Contents::new();
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return contents;
        };
        let field = |line: &serde_json::Value, plain: &str, encoded: &str| -> Vec<u8> {
            match (&line[plain], &line[encoded]) {
                (serde_json::Value::String(text), _) => text.as_bytes().to_vec(),
                (_, serde_json::Value::String(text)) => BASE64.decode(text).expect("base64"),
                (serde_json::Value::Null, _) => Vec::new(),
                (value, _) => value.to_string().into_bytes(),
            }
        };
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let line: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let key = field(&line, "key", "key_b64");
            if line["method"] == "Put" {
                contents.insert(key, field(&line, "body", "body_b64"));
            } else {
                contents.remove(&key);
            }
        }
        contents
    }
}

struct JsonlFiles {
    dir: tempfile::TempDir,
    started: AtomicU64,
}

#[async_trait]
impl Planes for JsonlFiles {
    async fn start(&self) -> Box<dyn Plane> {
        let number = self.started.fetch_add(1, Ordering::SeqCst);
        Box::new(JsonlFile {
            path: self.dir.path().join(format!("plane-{number}.jsonl")),
            written: AtomicU64::new(0),
        })
    }
}

#[tokio::test]
async fn jsonl_passes_the_conformance_suite() {
    let planes = JsonlFiles {
        dir: tempfile::tempdir().expect("temp dir"),
        started: AtomicU64::new(0),
    };
    let verdicts = conformance::run(&planes).await;
    let supported: Vec<&str> = verdicts
        .iter()
        .filter(|(_, verdict)| *verdict == Verdict::Passed)
        .map(|(name, _)| *name)
        .collect();
    assert_eq!(
        supported,
        [
            "batch_contiguity_and_order",
            "batch_round_trip",
            "batch_restore_follows_its_extract",
            "sink_refuses_a_gap",
            "sink_resumes_exactly_once_after_a_kill",
            "sink_applies_a_transaction_split_across_batches_whole",
        ],
        "{verdicts:#?}"
    );
}

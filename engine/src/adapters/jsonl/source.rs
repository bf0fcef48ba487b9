//! Reading JSON Lines: a blocking thread reads and parses, batches go out
//! through a bounded channel.

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Location, parse_line};
use crate::adapters::{AdapterError, Extraction, Source};
use crate::manifest::SourceInfo;
use crate::progress::Progress;
use crate::{Op, Result};

/// A line longer than this is refused rather than buffered.
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;
/// A batch is sent once it holds this many ops...
const BATCH_OPS: usize = 1024;
/// ...or this many bytes of lines.
const BATCH_BYTES: usize = 1024 * 1024;
/// Batches parsed ahead of the consumer.
const BATCH_QUEUE: usize = 4;

/// Ops read from JSON Lines, numbered in line order.
#[derive(Debug)]
pub struct JsonlSource {
    location: Location,
}

impl JsonlSource {
    /// A source reading `location`.
    pub fn new(location: Location) -> Self {
        Self { location }
    }
}

#[async_trait]
impl Source for JsonlSource {
    async fn open(self: Box<Self>, progress: Arc<Progress>) -> Result<Extraction> {
        let source_name = self.location.display_name("stdin");
        let (reader, description): (Box<dyn Read + Send>, Option<String>) = match &self.location {
            Location::File(path) => {
                let file = std::fs::File::open(path).map_err(|error| AdapterError::Read {
                    source_name: source_name.clone(),
                    error,
                })?;
                if let Ok(metadata) = file.metadata() {
                    Progress::set(&progress.bytes_read_total, metadata.len());
                }
                let file_name = path
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned());
                (Box::new(file), file_name)
            }
            Location::Stdio => (Box::new(std::io::stdin()), Some("stdin".to_owned())),
        };
        let (sender, receiver) = mpsc::channel(BATCH_QUEUE);
        tokio::task::spawn_blocking(move || {
            let reader = BufReader::with_capacity(256 * 1024, reader);
            if let Err(error) = read_lines(reader, &source_name, &sender, &progress) {
                // The consumer may be gone already; then nobody needs the error.
                let _ = sender.blocking_send(Err(error.into()));
            }
        });
        Ok(Extraction {
            info: SourceInfo {
                platform: "jsonl".to_owned(),
                description,
                ..SourceInfo::default()
            },
            ops: Box::pin(ReceiverStream::new(receiver)),
        })
    }
}

/// Reads every line, numbering ops from 1 and marking the last op of each
/// transaction (which needs the next line to know).
fn read_lines(
    mut reader: impl BufRead,
    source_name: &str,
    sender: &mpsc::Sender<Result<Vec<Op>>>,
    progress: &Progress,
) -> Result<(), AdapterError> {
    let mut line = Vec::new();
    let mut line_number = 0u64;
    let mut seq = 0u64;
    let mut pending: Option<Op> = None;
    let mut batch = Vec::with_capacity(BATCH_OPS);
    let mut batch_bytes = 0usize;
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|error| AdapterError::Read {
                source_name: source_name.to_owned(),
                error,
            })?;
        if read == 0 {
            break;
        }
        line_number += 1;
        Progress::add(&progress.bytes_read, read as u64);
        let invalid = |reason: String| AdapterError::InvalidRecord {
            source_name: source_name.to_owned(),
            line: line_number,
            reason,
        };
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        } else if line.len() > MAX_LINE_BYTES {
            return Err(invalid(format!("longer than {MAX_LINE_BYTES} bytes")));
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        seq += 1;
        let op = parse_line(&line, seq).map_err(invalid)?;
        if let Some(mut previous) = pending.take() {
            previous.txn_last = previous.txn == 0 || previous.txn != op.txn;
            batch.push(previous);
        }
        batch_bytes += line.len();
        pending = Some(op);
        if batch.len() >= BATCH_OPS || batch_bytes >= BATCH_BYTES {
            batch_bytes = 0;
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_OPS));
            if sender.blocking_send(Ok(full)).is_err() {
                return Ok(());
            }
        }
    }
    batch.extend(pending);
    if !batch.is_empty() {
        let _ = sender.blocking_send(Ok(batch));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &str) -> Result<Vec<Op>, String> {
        let (sender, mut receiver) = mpsc::channel(1000);
        let result = read_lines(
            input.as_bytes(),
            "test.jsonl",
            &sender,
            &Progress::default(),
        );
        drop(sender);
        let mut ops = Vec::new();
        while let Ok(batch) = receiver.try_recv() {
            ops.extend(batch.map_err(|error| error.to_string())?);
        }
        result.map_err(|error| error.to_string())?;
        Ok(ops)
    }

    #[test]
    fn numbers_ops_in_line_order_and_marks_transaction_ends() {
        let input = concat!(
            r#"{"key":"a","method":"Put","body":1,"txn":5}"#,
            "\n",
            r#"{"key":"b","method":"Put","body":2,"txn":5}"#,
            "\r\n",
            "\n",
            r#"{"key":"c","method":"Put","body":3}"#,
            "\n",
            r#"{"key":"d","method":"Put","body":4,"txn":9}"#,
        );
        let ops = read_all(input).expect("valid input");
        let seen: Vec<(u64, &[u8], bool)> = ops
            .iter()
            .map(|op| (op.seq, &op.key[..], op.txn_last))
            .collect();
        assert_eq!(
            seen,
            vec![
                (1, &b"a"[..], false),
                (2, b"b", true),
                (3, b"c", true),
                (4, b"d", true)
            ]
        );
    }

    #[test]
    fn a_bad_line_is_named_by_its_number() {
        let input = "{\"key\":\"a\",\"method\":\"Put\",\"body\":1}\n\n{\"key\":\"b\",\"body\":1}\n";
        let error = read_all(input).expect_err("line 3 has no method");
        assert!(
            error.starts_with("test.jsonl line 3: missing field `method`"),
            "{error}"
        );
    }
}

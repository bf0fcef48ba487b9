//! Writing JSON Lines: a blocking thread formats and writes; a file is
//! written beside its final name and renamed into place only when complete.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Location, write_line};
use crate::adapters::{AdapterError, Sink};
use crate::order::SeqTracker;
use crate::{Op, Result};

/// Batches queued for the writer thread.
const BATCH_QUEUE: usize = 2;

/// Ops written as JSON Lines, one op a line.
pub struct JsonlSink {
    target_name: String,
    sender: Option<mpsc::Sender<Vec<Op>>>,
    writer: Option<tokio::task::JoinHandle<Result<(), AdapterError>>>,
    partial: Option<PartialFile>,
    /// G1: the ops written run 1, 2, 3... with no gap or repeat.
    tracker: SeqTracker,
}

/// A file being written under a temporary name; removed unless completed.
struct PartialFile {
    partial_path: PathBuf,
    final_path: PathBuf,
    completed: bool,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.completed {
            let _ = std::fs::remove_file(&self.partial_path);
        }
    }
}

impl JsonlSink {
    /// Creates the output: a file (written as `<name>.partial`, renamed into
    /// place by [`Sink::finish`]) or stdout.
    pub fn create(location: Location) -> Result<Self, AdapterError> {
        let target_name = location.display_name("stdout");
        let write_error = |error| AdapterError::Write {
            target_name: target_name.clone(),
            error,
        };
        let (output, partial): (Box<dyn Write + Send>, Option<PartialFile>) = match location {
            Location::File(final_path) => {
                let mut partial_name = final_path.file_name().unwrap_or_default().to_owned();
                partial_name.push(".partial");
                let partial_path = final_path.with_file_name(partial_name);
                let file = std::fs::File::create(&partial_path).map_err(write_error)?;
                (
                    Box::new(file),
                    Some(PartialFile {
                        partial_path,
                        final_path,
                        completed: false,
                    }),
                )
            }
            Location::Stdio => (Box::new(std::io::stdout()), None),
        };
        let (sender, mut receiver) = mpsc::channel::<Vec<Op>>(BATCH_QUEUE);
        let writer_name = target_name.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut output = BufWriter::with_capacity(256 * 1024, output);
            let mut line = Vec::with_capacity(4096);
            let write_error = |error| AdapterError::Write {
                target_name: writer_name.clone(),
                error,
            };
            while let Some(batch) = receiver.blocking_recv() {
                for op in &batch {
                    line.clear();
                    write_line(op, &mut line).map_err(|field| AdapterError::Unrepresentable {
                        target_name: writer_name.clone(),
                        seq: op.seq,
                        reason: format!("its `{field}` is not UTF-8 text"),
                    })?;
                    output.write_all(&line).map_err(write_error)?;
                }
            }
            output.flush().map_err(write_error)?;
            let output = output
                .into_inner()
                .map_err(|error| write_error(error.into_error()))?;
            drop(output);
            Ok(())
        });
        Ok(Self {
            target_name,
            sender: Some(sender),
            writer: Some(writer),
            partial,
            tracker: SeqTracker::new(),
        })
    }

    async fn writer_result(&mut self) -> Result<(), AdapterError> {
        self.sender.take();
        match self.writer.take() {
            Some(writer) => writer.await.expect("the jsonl writer does not panic"),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Sink for JsonlSink {
    async fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        self.tracker
            .try_advance_all(ops.iter().map(|op| op.seq))
            .map_err(|source| AdapterError::SourceOutOfOrder { source })?;
        let sender = self
            .sender
            .as_ref()
            .expect("apply is not called after finish");
        if sender.send(ops).await.is_err() {
            // The writer stopped on an error; report it.
            self.writer_result().await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        self.writer_result().await?;
        if let Some(mut partial) = self.partial.take() {
            let write_error = |error| AdapterError::Write {
                target_name: self.target_name.clone(),
                error,
            };
            std::fs::File::open(&partial.partial_path)
                .and_then(|file| file.sync_all())
                .map_err(write_error)?;
            std::fs::rename(&partial.partial_path, &partial.final_path).map_err(write_error)?;
            partial.completed = true;
        }
        Ok(())
    }
}

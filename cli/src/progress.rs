//! The progress bar: shown on a terminal, never in a pipe or with --quiet.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What the bar counts.
#[derive(Debug, Clone, Copy)]
pub enum Measure {
    /// Bytes read from the source, against its size when known.
    BytesRead,
    /// Ops, against the backup's total.
    Ops,
}

/// A bar that follows a [`Progress`] until dropped.
pub struct ProgressDisplay {
    bar: ProgressBar,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl ProgressDisplay {
    /// Starts following `progress`; hidden unless stderr is a terminal.
    pub fn start(
        progress: Arc<Progress>,
        measure: Measure,
        quiet: bool,
        verb: &'static str,
    ) -> Self {
        if quiet || !std::io::stderr().is_terminal() {
            return Self {
                bar: ProgressBar::hidden(),
                ticker: None,
            };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        let template = match measure {
            Measure::BytesRead => "{prefix} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            Measure::Ops => "{prefix} {bar:30} {human_pos}/{human_len} ops {per_sec} {msg}",
        };
        bar.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(verb);
        let follower = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                let (position, total) = match measure {
                    Measure::BytesRead => (
                        Progress::get(&progress.bytes_read),
                        Progress::get(&progress.bytes_read_total),
                    ),
                    Measure::Ops => (
                        Progress::get(&progress.ops),
                        Progress::get(&progress.ops_total),
                    ),
                };
                if total > 0 {
                    follower.set_length(total);
                }
                follower.set_position(position);
                follower.set_message(format!(
                    "{} ops, {} segments",
                    Progress::get(&progress.ops),
                    Progress::get(&progress.segments)
                ));
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        Self {
            bar,
            ticker: Some(ticker),
        }
    }
}

impl Drop for ProgressDisplay {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        self.bar.finish_and_clear();
    }
}

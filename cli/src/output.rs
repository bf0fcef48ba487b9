//! Printing summaries: text for people, one JSON object for scripts; and
//! the lines servers print ([`print_line!`], [`eprint_line!`]), which a
//! closed pipe cannot kill them with.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use ferry_engine::manifest::Manifest;
use ferry_engine::store::BackupListing;
use serde_json::{Value, json};
use time::macros::format_description;

/// Prints a line on stdout, as `println!` does, but a line that cannot be
/// written (`ferry gateway ... | head -1` closed the pipe) is dropped
/// instead of panicking ("failed printing to stdout: Broken pipe") and
/// taking the server, and every client's next call, with it.
macro_rules! print_line {
    () => {
        $crate::output::write_line($crate::output::Stream::Stdout, format_args!(""))
    };
    ($($argument:tt)+) => {
        $crate::output::write_line($crate::output::Stream::Stdout, format_args!($($argument)+))
    };
}

/// Prints a line on stderr, as `eprintln!` does, but never panics when
/// stderr is closed (see [`print_line!`]).
macro_rules! eprint_line {
    () => {
        $crate::output::write_line($crate::output::Stream::Stderr, format_args!(""))
    };
    ($($argument:tt)+) => {
        $crate::output::write_line($crate::output::Stream::Stderr, format_args!($($argument)+))
    };
}

pub(crate) use {eprint_line, print_line};

/// Where [`write_line`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// What a command prints for people and scripts.
    Stdout,
    /// Errors and warnings.
    Stderr,
}

/// Set once a line for stdout was lost, so that is logged only once.
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

/// Writes `line` and a newline to `stream` and flushes it; a failure drops
/// the line and is never fatal. The first lost stdout line is logged (on
/// stderr, through tracing); a lost stderr line is not, there being nowhere
/// left to say it.
pub fn write_line(stream: Stream, line: fmt::Arguments<'_>) {
    match stream {
        Stream::Stdout => {
            let mut stdout = io::stdout().lock();
            if let Err(error) = write_and_flush(&mut stdout, line)
                && first_failure(&STDOUT_FAILED)
            {
                tracing::warn!(
                    %error,
                    "cannot write to stdout (closed by its reader?); its lines are dropped and the command goes on"
                );
            }
        }
        Stream::Stderr => {
            let _ = write_and_flush(&mut io::stderr().lock(), line);
        }
    }
}

fn write_and_flush(writer: &mut impl Write, line: fmt::Arguments<'_>) -> io::Result<()> {
    writeln!(writer, "{line}")?;
    writer.flush()
}

/// True the first time it is called with `flag`.
fn first_failure(flag: &AtomicBool) -> bool {
    !flag.swap(true, Ordering::Relaxed)
}

/// `12.3 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// RFC 3339 in UTC to the second, or `-`.
pub fn timestamp(time: Option<time::OffsetDateTime>) -> String {
    let format = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time.and_then(|time| time.to_offset(time::UtcOffset::UTC).format(format).ok())
        .unwrap_or_else(|| "-".to_owned())
}

/// One backup of a listing as JSON.
pub fn listing_json(listing: &BackupListing) -> Value {
    match &listing.manifest {
        Some(manifest) => json!({
            "backup_id": listing.backup_id,
            "complete": true,
            "created_at": timestamp(Some(manifest.created_at)),
            "source": manifest.source,
            "ops": manifest.totals.ops,
            "segments": manifest.totals.segments,
            "uncompressed_bytes": manifest.totals.uncompressed_bytes,
            "compressed_bytes": manifest.totals.compressed_bytes,
        }),
        None => json!({
            "backup_id": listing.backup_id,
            "complete": false,
            "created_at": timestamp(listing.created_at),
            "segments": listing.segments_found,
            "compressed_bytes": listing.bytes_found,
        }),
    }
}

/// The backups of a store as a table.
pub fn listing_table(listings: &[BackupListing]) -> String {
    let mut table = format!(
        "{:<27} {:<10} {:<20} {:<8} {:>12} {:>10}\n",
        "BACKUP", "STATUS", "CREATED", "SOURCE", "OPS", "BYTES"
    );
    for listing in listings {
        let created = timestamp(listing.created_at);
        let line = match &listing.manifest {
            Some(manifest) => format!(
                "{:<27} {:<10} {:<20} {:<8} {:>12} {:>10}",
                listing.backup_id,
                "complete",
                created,
                manifest.source.platform,
                manifest.totals.ops,
                human_bytes(manifest.totals.compressed_bytes)
            ),
            None => format!(
                "{:<27} {:<10} {:<20} {:<8} {:>12} {:>10}  ({} segments, no manifest: never restored)",
                listing.backup_id,
                "INCOMPLETE",
                created,
                "-",
                "-",
                human_bytes(listing.bytes_found),
                listing.segments_found
            ),
        };
        table.push_str(&line);
        table.push('\n');
    }
    table
}

/// One manifest, for people.
pub fn manifest_text(manifest: &Manifest) -> String {
    let source = &manifest.source;
    let mut text = format!(
        "backup      {}\nstatus      complete (sealed by its manifest)\ncreated     {}\ncompleted   {}\nsource      {}{}{}{}\nops         {}\nbytes       {} before compression, {} stored (ratio {:.2})\nsegments    {} (format {}, {} level {})\nwritten by  {} {}\n",
        manifest.backup_id,
        timestamp(Some(manifest.created_at)),
        timestamp(Some(manifest.completed_at)),
        source.platform,
        source
            .platform_version
            .as_deref()
            .map(|v| format!(" {v}"))
            .unwrap_or_default(),
        source
            .description
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default(),
        source
            .snapshot_position
            .map(|p| format!(" at position {p}"))
            .unwrap_or_default(),
        manifest.totals.ops,
        human_bytes(manifest.totals.uncompressed_bytes),
        human_bytes(manifest.totals.compressed_bytes),
        manifest.totals.compression_ratio(),
        manifest.totals.segments,
        manifest.segment_format_version,
        manifest.codec,
        manifest.compression_level,
        manifest.tool.name,
        manifest.tool.version,
    );
    if !manifest.segments.is_empty() {
        text.push_str(&format!(
            "\n{:<41} {:>10} {:>10} {:>10}  {}\n",
            "SEGMENT", "OPS", "RAW", "STORED", "SHA-256"
        ));
        for entry in &manifest.segments {
            text.push_str(&format!(
                "{:<41} {:>10} {:>10} {:>10}  {}\n",
                entry.name,
                entry.ops,
                human_bytes(entry.uncompressed_bytes),
                human_bytes(entry.compressed_bytes),
                entry.sha256
            ));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe whose reader is gone.
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_closed_pipe_is_an_error_to_drop_and_reported_once() {
        let failed = AtomicBool::new(false);
        let error = write_and_flush(&mut ClosedPipe, format_args!("ready"))
            .expect_err("a closed pipe fails the write");
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        assert!(first_failure(&failed));
        assert!(!first_failure(&failed));
        let mut written = Vec::new();
        write_and_flush(&mut written, format_args!("{} {}", "a", 1)).expect("a Vec takes it");
        assert_eq!(written, b"a 1\n");
    }

    #[test]
    fn bytes_read_as_people_read_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(8 * 1024 * 1024), "8.0 MiB");
    }
}

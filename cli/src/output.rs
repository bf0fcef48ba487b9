//! Printing summaries: text for people, one JSON object for scripts.

use ferry_engine::manifest::Manifest;
use ferry_engine::store::BackupListing;
use serde_json::{Value, json};
use time::macros::format_description;

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

    #[test]
    fn bytes_read_as_people_read_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(8 * 1024 * 1024), "8.0 MiB");
    }
}

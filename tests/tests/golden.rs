//! Golden files: a backup, a migration profile and their restores, written
//! by ferry at a given format version and checked in under `tests/golden/`
//! (see its README). Today's ferry must still verify and restore them byte
//! for byte, and must say which format versions it writes, so a format
//! change that forgets to bump a version, or drops reading an old one,
//! fails here.
//!
//! The golden folders are never written: every test that runs `ferry`
//! works on a copy in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::Output;

use bytes::Bytes;
use ferry_engine::Op;
use ferry_engine::manifest::{MANIFEST_FORMAT_VERSION, Manifest};
use ferry_engine::migrations::file::{MIGRATION_FORMAT_VERSION, MigrationFile};
use ferry_engine::migrations::profile::{PROFILE_FORMAT_VERSION, Profile};
use ferry_engine::segment::{
    self, MAGIC, SegmentEncoder, SegmentHeader, SegmentLimits, SegmentOptions, decode_segment,
};
use ferry_tests::plane::ferry;

/// The folder of format version 1 (manifest 1, segment 1, migration file
/// and profile 1).
const FORMAT_1: &str = "format-1";
/// The backup in `format-1/store`.
const FORMAT_1_BACKUP_ID: &str = "20261124T073735Z-1afde0df";
/// The `--segment-bytes` `format-1` was extracted with (README).
const FORMAT_1_SEGMENT_BYTES: usize = 1024;
/// The version `format-1/migrated-to-3.jsonl` was restored to.
const FORMAT_1_MIGRATED_TO: &str = "3";

/// The golden folder of the formats this build writes. Bumping any format
/// version means adding a new folder and pointing this at it; the old
/// folders stay, and keep their own tests. The writer tests below use the
/// newest folder's constants (`FORMAT_1_*` today).
const NEWEST: &str = FORMAT_1;

fn golden(folder: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(folder)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// Copies a golden folder's tree (files and folders only) into `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a folder of the copy");
    for entry in std::fs::read_dir(from).expect("read a golden folder") {
        let entry = entry.expect("a folder entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("an entry's type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a golden file");
        }
    }
}

/// A copy of a golden folder in a temporary directory.
fn copy_of(folder: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_tree(&golden(folder), dir.path());
    dir
}

fn succeeds(output: &Output) {
    assert!(
        output.status.success(),
        "ferry failed ({:?}): {}{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Asserts two files' bytes are equal, showing the first line that differs.
fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let actual_text = String::from_utf8_lossy(actual);
    let expected_text = String::from_utf8_lossy(expected);
    let first_difference = actual_text
        .lines()
        .zip(expected_text.lines())
        .enumerate()
        .find(|(_, (actual, expected))| actual != expected);
    match first_difference {
        Some((index, (actual, expected))) => panic!(
            "{what} differs from the golden file at line {}:\n  got:      {actual}\n  expected: {expected}",
            index + 1
        ),
        None => panic!(
            "{what} differs from the golden file in length: {} lines, {} bytes against {} lines, {} bytes",
            actual_text.lines().count(),
            actual.len(),
            expected_text.lines().count(),
            expected.len()
        ),
    }
}

fn store_url(copy: &Path) -> String {
    format!("file://{}", copy.join("store").display())
}

fn backup_dir(folder: &str, backup_id: &str) -> PathBuf {
    golden(folder).join("store").join("backups").join(backup_id)
}

fn manifest(folder: &str, backup_id: &str) -> (Vec<u8>, Manifest) {
    let json = read(&backup_dir(folder, backup_id).join("manifest.json"));
    let manifest = Manifest::from_json(backup_id, &json)
        .unwrap_or_else(|error| panic!("today's ferry reads the {folder} manifest: {error}"));
    (json, manifest)
}

/// Restores the golden backup of a copy onto a jsonl file; returns its bytes.
fn restore_to_jsonl(copy: &Path, backup_id: &str, extra: &[&str]) -> Vec<u8> {
    let output_path = copy.join("restore-output.jsonl");
    let target = format!("jsonl://{}", output_path.display());
    let store = store_url(copy);
    let mut args = vec![
        "restore", "--from", &store, "--backup", backup_id, "--target", &target, "--quiet",
    ];
    args.extend_from_slice(extra);
    succeeds(&ferry(&args));
    read(&output_path)
}

/// The bytes of a segment object up to its payload, and the payload.
fn split_segment(object: &[u8]) -> (&[u8], &[u8]) {
    let header_len = u32::from_le_bytes(object[12..16].try_into().expect("4 bytes")) as usize;
    object.split_at(16 + header_len + 4)
}

fn inflate(payload: &[u8], header: &SegmentHeader) -> Vec<u8> {
    zstd::bulk::decompress(payload, header.uncompressed_bytes as usize)
        .expect("a golden payload inflates to its declared length")
}

/// The golden segments of a backup: name, object bytes, decoded ops.
fn segments(folder: &str, manifest: &Manifest) -> Vec<(String, Bytes, SegmentHeader, Vec<Op>)> {
    manifest
        .segments
        .iter()
        .map(|entry| {
            let object = Bytes::from(read(
                &backup_dir(folder, &manifest.backup_id).join(&entry.path),
            ));
            let decoded = decode_segment(&entry.name, object.clone(), SegmentLimits::default())
                .unwrap_or_else(|error| {
                    panic!(
                        "today's ferry decodes {folder} segment {}: {error}",
                        entry.name
                    )
                });
            let header = decoded.header.clone();
            let ops = decoded.into_ops().unwrap_or_else(|error| {
                panic!(
                    "today's ferry decodes the ops of {folder} segment {}: {error}",
                    entry.name
                )
            });
            (entry.name.clone(), object, header, ops)
        })
        .collect()
}

#[test]
fn format_1_backup_verifies() {
    let copy = copy_of(FORMAT_1);
    let output = ferry(&[
        "verify",
        &store_url(copy.path()),
        "--backup",
        FORMAT_1_BACKUP_ID,
    ]);
    succeeds(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("4 segments, 32 ops"),
        "verify names what it checked: {stdout}"
    );
}

#[test]
fn format_1_backup_restores_byte_for_byte() {
    let copy = copy_of(FORMAT_1);
    let restored = restore_to_jsonl(copy.path(), FORMAT_1_BACKUP_ID, &[]);
    assert_same_bytes(
        &restored,
        &read(&golden(FORMAT_1).join("restored.jsonl")),
        "the restore of the format-1 backup",
    );
}

#[test]
fn format_1_profile_loads_and_its_migrated_restore_matches() {
    let copy = copy_of(FORMAT_1);
    let profile_dir = copy.path().join("profile");
    let profile = Profile::load(&profile_dir).expect("today's ferry loads the format-1 profile");
    assert_eq!(profile.platform, "golden");
    assert_eq!(profile.versions, ["1", "2", "3"]);
    let ids: Vec<&str> = profile
        .migrations()
        .iter()
        .map(|migration| migration.id())
        .collect();
    assert_eq!(
        ids,
        [
            "1700000000000_user_display_name",
            "1700000000001_runs_v2_paths"
        ]
    );

    let profile_arg = profile_dir.display().to_string();
    let migrated = restore_to_jsonl(
        copy.path(),
        FORMAT_1_BACKUP_ID,
        &[
            "--migrations",
            &profile_arg,
            "--to-version",
            FORMAT_1_MIGRATED_TO,
        ],
    );
    assert_same_bytes(
        &migrated,
        &read(&golden(FORMAT_1).join("migrated-to-3.jsonl")),
        "the format-1 backup restored through the format-1 profile to version 3",
    );
}

#[test]
fn format_1_files_declare_format_version_1() {
    let (json, manifest) = manifest(FORMAT_1, FORMAT_1_BACKUP_ID);
    let raw: serde_json::Value = serde_json::from_slice(&json).expect("the manifest is JSON");
    assert_eq!(raw["format_version"], 1, "the manifest's format_version");
    assert_eq!(
        raw["segment_format_version"], 1,
        "the manifest's segment_format_version"
    );
    assert_eq!(manifest.format_version, 1);
    assert_eq!(manifest.segment_format_version, 1);
    assert_eq!(manifest.codec, "zstd");
    assert_eq!(manifest.totals.ops, 32);
    assert!(
        manifest.segments.len() >= 2,
        "the golden backup spans several segments"
    );

    for (name, object, header, ops) in segments(FORMAT_1, &manifest) {
        assert_eq!(&object[..8], MAGIC, "segment {name}'s magic");
        assert_eq!(
            u32::from_le_bytes(object[8..12].try_into().expect("4 bytes")),
            1,
            "segment {name}'s format version"
        );
        assert_eq!(header.stream_id, FORMAT_1_BACKUP_ID, "segment {name}");
        assert_eq!(header.op_count, ops.len() as u64, "segment {name}");
    }

    let profile_dir = golden(FORMAT_1).join("profile");
    let profile_text =
        String::from_utf8(read(&profile_dir.join("profile.toml"))).expect("profile.toml is text");
    assert!(
        profile_text
            .lines()
            .any(|line| line.trim() == "format_version = 1"),
        "the golden profile.toml says format_version = 1"
    );
    for file_name in [
        "1700000000000_user_display_name.toml",
        "1700000000001_runs_v2_paths.toml",
    ] {
        let path = profile_dir.join(file_name);
        let text = String::from_utf8(read(&path)).expect("a migration file is text");
        let file = MigrationFile::parse(&path, &text)
            .unwrap_or_else(|error| panic!("today's ferry parses {file_name}: {error}"));
        assert_eq!(file.format_version, 1, "{file_name}'s format_version");
    }
}

/// Bumping a format version without adding its golden folder fails here:
/// see `tests/golden/README.md`.
#[test]
fn the_newest_golden_folder_is_in_the_formats_this_build_writes() {
    let newest = golden(NEWEST);
    let backup_ids: Vec<String> = std::fs::read_dir(newest.join("store").join("backups"))
        .expect("the newest golden folder holds a store")
        .map(|entry| {
            entry
                .expect("a folder entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(backup_ids.len(), 1, "one backup in {}", newest.display());
    let (_, manifest) = manifest(NEWEST, &backup_ids[0]);
    let hint = "a format version changed: add a new tests/golden/format-N folder (tests/golden/README.md) and keep the old ones";
    assert_eq!(manifest.format_version, MANIFEST_FORMAT_VERSION, "{hint}");
    assert_eq!(
        manifest.segment_format_version,
        segment::FORMAT_VERSION,
        "{hint}"
    );
    assert_eq!(MIGRATION_FORMAT_VERSION, 1, "{hint}");
    assert_eq!(PROFILE_FORMAT_VERSION, 1, "{hint}");
}

/// Today's writer, given the golden ops and settings, writes what the
/// golden holds wherever the output does not depend on the clock, the
/// random part of the backup id or the zstd build: the manifest's JSON
/// (re-serialized), the segment cuts, each segment's header (but its
/// compressed length and CRC) and its uncompressed op bytes. A change to
/// any of them is a format change, and needs a new format version.
#[test]
fn todays_writer_writes_the_newest_golden_bytes() {
    let (json, manifest) = manifest(NEWEST, FORMAT_1_BACKUP_ID);
    assert_same_bytes(
        &manifest.to_json(),
        &json,
        "today's manifest JSON of the golden manifest",
    );

    let options = SegmentOptions {
        target_uncompressed_bytes: FORMAT_1_SEGMENT_BYTES,
        compression_level: manifest.compression_level,
    };
    let golden_segments = segments(NEWEST, &manifest);
    let all_ops: Vec<&Op> = golden_segments
        .iter()
        .flat_map(|(_, _, _, ops)| ops)
        .collect();

    // Cut the whole stream the way `write_backup` does: seal once full.
    let mut sealed = Vec::new();
    let mut encoder: Option<SegmentEncoder> = None;
    for op in all_ops {
        let current = encoder.get_or_insert_with(|| {
            SegmentEncoder::new(FORMAT_1_BACKUP_ID, options).expect("an encoder starts")
        });
        current.push(op).expect("an op encodes");
        if current.is_full() {
            sealed.push(
                encoder
                    .take()
                    .expect("just filled")
                    .seal()
                    .expect("a segment seals"),
            );
        }
    }
    if let Some(last) = encoder.filter(|encoder| !encoder.is_empty()) {
        sealed.push(last.seal().expect("a segment seals"));
    }

    let golden_names: Vec<&str> = golden_segments
        .iter()
        .map(|(name, ..)| name.as_str())
        .collect();
    let todays_names: Vec<String> = sealed
        .iter()
        .map(|segment| segment.name.to_string())
        .collect();
    assert_eq!(todays_names, golden_names, "the segment cuts");

    for ((name, object, golden_header, _), today) in golden_segments.iter().zip(&sealed) {
        let comparable = |header: &SegmentHeader| SegmentHeader {
            compressed_bytes: 0,
            payload_crc32c: 0,
            ..header.clone()
        };
        assert_eq!(
            comparable(&today.header),
            comparable(golden_header),
            "segment {name}'s header"
        );
        let (golden_prefix, golden_payload) = split_segment(object);
        assert_eq!(
            &today.prefix[..8],
            &golden_prefix[..8],
            "segment {name}'s magic and version"
        );
        assert_eq!(
            inflate(&today.payload, &today.header),
            inflate(golden_payload, golden_header),
            "segment {name}'s uncompressed op bytes"
        );
    }
}

/// The checked-in source, extracted by today's ferry, restores to the same
/// bytes as the golden backup does: the golden files are what their
/// README says they were made from.
#[test]
fn the_newest_golden_source_extracts_and_restores_the_same() {
    let copy = copy_of(NEWEST);
    let fresh_store = copy.path().join("fresh");
    let source = format!("jsonl://{}", copy.path().join("ops.jsonl").display());
    let store = format!("file://{}", fresh_store.display());
    let segment_bytes = FORMAT_1_SEGMENT_BYTES.to_string();
    let output = ferry(&[
        "extract",
        "--source",
        &source,
        "--to",
        &store,
        "--segment-bytes",
        &segment_bytes,
        "--quiet",
    ]);
    succeeds(&output);
    let output_path = copy.path().join("fresh-restore.jsonl");
    let target = format!("jsonl://{}", output_path.display());
    succeeds(&ferry(&[
        "restore", "--from", &store, "--target", &target, "--quiet",
    ]));
    assert_same_bytes(
        &read(&output_path),
        &read(&golden(NEWEST).join("restored.jsonl")),
        "today's extract and restore of the golden source",
    );
}

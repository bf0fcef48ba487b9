//! The fuzz targets' checks (`ferry_engine::fuzzing`, run by `fuzz/` under
//! libFuzzer) on every test run: random bytes, and the golden backup's
//! manifest and segments and encoded ops with bytes flipped, cut and
//! spliced. A decoder that panics, or that accepts what prost reads
//! differently, fails here.

use std::path::PathBuf;

use ferry_engine::fuzzing;
use ferry_engine::testing::{arbitrary_op, numbered};
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message;

/// The golden format-1 backup's directory.
fn golden_backup() -> PathBuf {
    let backups =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/format-1/store/backups");
    std::fs::read_dir(&backups)
        .expect("the golden backups")
        .next()
        .expect("one golden backup")
        .expect("a directory entry")
        .path()
}

fn golden_manifest() -> Vec<u8> {
    std::fs::read(golden_backup().join("manifest.json")).expect("the golden manifest")
}

fn golden_segments() -> Vec<Vec<u8>> {
    let mut segments: Vec<Vec<u8>> = std::fs::read_dir(golden_backup().join("segments"))
        .expect("the golden segments")
        .map(|entry| std::fs::read(entry.expect("an entry").path()).expect("a segment"))
        .collect();
    segments.sort();
    segments
}

/// Byte edits a fuzzer makes: overwrite, cut, or splice in a run of bytes.
#[derive(Debug, Clone)]
enum Edit {
    Set(Index, u8),
    Cut(Index),
    Insert(Index, Vec<u8>),
    Remove(Index, Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set(at, byte)),
        1 => any::<Index>().prop_map(Edit::Cut),
        1 => (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Edit::Insert(at, bytes)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(at, length)| Edit::Remove(at, length)),
    ]
}

fn edited(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let length = bytes.len();
        match edit {
            Edit::Set(at, byte) if length > 0 => bytes[at.index(length)] = *byte,
            Edit::Cut(at) if length > 0 => bytes.truncate(at.index(length)),
            Edit::Insert(at, run) => {
                let at = at.index(length + 1);
                bytes.splice(at..at, run.iter().copied());
            }
            Edit::Remove(at, run) if length > 0 => {
                let at = at.index(length);
                let end = at + run.index(length - at + 1);
                bytes.drain(at..end);
            }
            _ => {}
        }
    }
    bytes
}

/// Ops encoded as a segment's payload is: length-delimited, one after another.
fn encoded_ops() -> impl Strategy<Value = (u8, Vec<u8>)> {
    proptest::collection::vec(arbitrary_op(80), 1..12).prop_map(|ops| {
        let ops = numbered(ops);
        let mut payload = Vec::new();
        for op in &ops {
            op.encode_length_delimited(&mut payload)
                .expect("a Vec grows");
        }
        (ops.len() as u8, payload)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sound_ops_pass_the_checks_whole((count, payload) in encoded_ops()) {
        prop_assert_eq!(fuzzing::op_decoder_agrees_with_prost(&payload), usize::from(count));
        let mut input = vec![1, count];
        input.extend_from_slice(&payload);
        prop_assert!(fuzzing::segment_around_payload(&input), "a sound segment was refused");
    }

    #[test]
    fn random_bytes_are_refused_or_read_soundly(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::op_decoder_agrees_with_prost(&data);
        fuzzing::any_segment_object(&data);
        fuzzing::segment_around_payload(&data);
        fuzzing::any_manifest(&data);
    }

    #[test]
    fn an_edited_golden_manifest_is_refused_or_read_soundly(edits in proptest::collection::vec(edit(), 1..4)) {
        fuzzing::any_manifest(&edited(golden_manifest(), &edits));
    }

    #[test]
    fn an_edited_golden_segment_is_refused_or_read_soundly(
        which in any::<Index>(),
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        let segments = golden_segments();
        let segment = segments[which.index(segments.len())].clone();
        fuzzing::any_segment_object(&edited(segment, &edits));
    }

    #[test]
    fn edited_ops_in_a_sound_segment_are_refused_or_read_as_prost_reads_them(
        (count, payload) in encoded_ops(),
        edits in proptest::collection::vec(edit(), 0..4),
    ) {
        let payload = edited(payload, &edits);
        fuzzing::op_decoder_agrees_with_prost(&payload);
        // The counts the target takes from its input's first two bytes:
        // the run starts at seq 1 and holds `count` ops.
        let mut input = vec![1, count];
        input.extend_from_slice(&payload);
        fuzzing::segment_around_payload(&input);
    }
}

/// Unedited, the golden inputs read back whole: the checks above do not
/// refuse everything.
#[test]
fn the_golden_inputs_pass_the_checks_unedited() {
    assert!(
        fuzzing::any_manifest(&golden_manifest()),
        "the golden manifest"
    );
    let segments = golden_segments();
    assert_eq!(segments.len(), 4);
    for segment in segments {
        assert!(fuzzing::any_segment_object(&segment), "a golden segment");
    }
}

//! Property tests: arbitrary ops through segments and back, and through a
//! whole backup and back.

mod common;

use std::sync::Arc;

use ferry_engine::Op;
use ferry_engine::backup::{RestoreOptions, find_backup, read_backup, write_backup};
use ferry_engine::progress::Progress;
use ferry_engine::segment::{SegmentEncoder, SegmentLimits, SegmentOptions, decode_segment};
use ferry_engine::store::BackupStore;
use ferry_engine::testing::{arbitrary_op, numbered};
use futures::TryStreamExt;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn ops_come_back_from_segments_unchanged(
        ops in proptest::collection::vec(arbitrary_op(600), 1..300),
        target in 1usize..20_000,
        level in 1i32..6,
    ) {
        let ops = numbered(ops);
        let options = SegmentOptions { target_uncompressed_bytes: target, compression_level: level };
        let mut objects = Vec::new();
        let mut encoder = SegmentEncoder::new("stream", options).expect("encoder");
        for op in &ops {
            encoder.push(op).expect("push");
            if encoder.is_full() {
                let full = std::mem::replace(&mut encoder, SegmentEncoder::new("stream", options).expect("encoder"));
                objects.push(full.seal().expect("seal"));
            }
        }
        if !encoder.is_empty() {
            objects.push(encoder.seal().expect("seal"));
        }
        let mut back = Vec::new();
        for sealed in &objects {
            let decoded = decode_segment(&sealed.name.to_string(), sealed.to_bytes(), SegmentLimits::default())
                .expect("a sealed segment decodes");
            prop_assert_eq!(decoded.header.first_seq, sealed.name.first_seq);
            prop_assert_eq!(&decoded.header.stream_id, "stream");
            back.extend(decoded.into_ops().expect("its ops decode"));
        }
        prop_assert_eq!(back, ops);
    }

    #[test]
    fn ops_come_back_from_a_backup_unchanged(
        ops in proptest::collection::vec(arbitrary_op(600), 0..200),
        batch in 1usize..50,
    ) {
        let ops = numbered(ops);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let back: Vec<Op> = runtime.block_on(async {
            let store = BackupStore::open("memory://", true).expect("memory store");
            let manifest = write_backup(&store, common::extraction(ops.clone(), batch), common::small_segments(), Arc::new(Progress::default()))
                .await
                .expect("backup written");
            let found = find_backup(&store, None).await.expect("the backup is found");
            assert_eq!(found, manifest);
            let batches: Vec<Vec<Op>> = read_backup(store, Arc::new(found), RestoreOptions::default())
                .try_collect()
                .await
                .expect("the backup reads back");
            batches.into_iter().flatten().collect()
        });
        prop_assert_eq!(back, ops);
    }
}

//! Property tests: arbitrary ops through segments and back, and through a
//! whole backup and back.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use ferry_engine::Op;
use ferry_engine::backup::{RestoreOptions, find_backup, read_backup, write_backup};
use ferry_engine::progress::Progress;
use ferry_engine::segment::{SegmentEncoder, SegmentLimits, SegmentOptions, decode_segment};
use ferry_engine::store::BackupStore;
use futures::TryStreamExt;
use proptest::prelude::*;

fn bytes_up_to(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

/// Ops with arbitrary contents (seq is set by the caller).
fn arbitrary_op() -> impl Strategy<Value = Op> {
    (
        (any::<u64>(), any::<u64>(), any::<bool>(), bytes_up_to(12)),
        (
            bytes_up_to(64),
            bytes_up_to(12),
            bytes_up_to(600),
            bytes_up_to(20),
        ),
        (
            bytes_up_to(6),
            proptest::collection::vec(bytes_up_to(16), 0..3),
        ),
    )
        .prop_map(
            |(
                (position, txn, txn_last, kind),
                (key, method, body, content_type),
                (platform_version, deps),
            )| Op {
                seq: 0,
                position,
                txn,
                txn_last,
                kind,
                key,
                method,
                body,
                content_type,
                platform_version,
                deps,
            },
        )
}

fn numbered(mut ops: Vec<Op>) -> Vec<Op> {
    for (index, op) in ops.iter_mut().enumerate() {
        op.seq = index as u64 + 1;
    }
    ops
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn ops_come_back_from_segments_unchanged(
        ops in proptest::collection::vec(arbitrary_op(), 1..300),
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
        ops in proptest::collection::vec(arbitrary_op(), 0..200),
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

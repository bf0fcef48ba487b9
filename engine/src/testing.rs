//! Strategies for property tests of anything that handles ops, here and in
//! other crates' tests (feature `testing`).

use bytes::Bytes;
use proptest::prelude::*;

use crate::Op;

/// Arbitrary bytes, up to `max` of them.
pub fn bytes_up_to(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

/// An op with arbitrary contents in every field, bodies up to `max_body`
/// bytes. Its seq is arbitrary too: callers that need a stream number them.
pub fn arbitrary_op(max_body: usize) -> impl Strategy<Value = Op> {
    (
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()),
        (
            bytes_up_to(12),
            bytes_up_to(64),
            bytes_up_to(12),
            bytes_up_to(max_body),
        ),
        (
            bytes_up_to(20),
            bytes_up_to(6),
            proptest::collection::vec(bytes_up_to(16), 0..3),
        ),
    )
        .prop_map(
            |(
                (seq, position, txn, txn_last),
                (kind, key, method, body),
                (content_type, platform_version, deps),
            )| Op {
                seq,
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

/// `ops` numbered 1, 2, 3, ... as a stream's are.
pub fn numbered(mut ops: Vec<Op>) -> Vec<Op> {
    for (index, op) in ops.iter_mut().enumerate() {
        op.seq = index as u64 + 1;
    }
    ops
}

//! Arbitrary bytes as a segment object: refused, or ops that agree with the
//! header.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_engine::fuzzing::any_segment_object(data);
});

//! Arbitrary bytes as the payload of a segment sound in every check before
//! its ops: refused, or ops that agree with the header.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_engine::fuzzing::segment_around_payload(data);
});

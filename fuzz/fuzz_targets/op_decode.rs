//! Ops decoded from arbitrary bytes by ferry's segment decoder must be what
//! prost reads from the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_engine::fuzzing::op_decoder_agrees_with_prost(data);
});

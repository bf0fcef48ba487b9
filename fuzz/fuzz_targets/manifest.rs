//! Arbitrary bytes as a backup manifest: refused, or one that validates and
//! comes back the same through its own JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_engine::fuzzing::any_manifest(data);
});

//! Compiles `ferry/v1/*.proto` with protox (pure Rust), so a fresh machine
//! builds ferry from crates alone, without a system `protoc`.

use std::path::Path;

const PROTOS: &[&str] = &[
    "ferry/v1/op.proto",
    "ferry/v1/segment.proto",
    "ferry/v1/agent.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let file_descriptors = protox::compile(PROTOS, [root])?;
    tonic_prost_build::configure()
        // Keys and bodies decode as slices of the segment buffer, not copies.
        .bytes(".ferry.v1")
        .compile_fds(file_descriptors)?;
    Ok(())
}

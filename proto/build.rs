//! Compiles `ferry/v1/*.proto` with protox (pure Rust), so a fresh machine
//! builds ferry from crates alone, without a system `protoc`.

use std::path::Path;

const PROTOS: &[&str] = &[
    "ferry/v1/op.proto",
    "ferry/v1/segment.proto",
    "ferry/v1/agent.proto",
    "ferry/v1/gateway.proto",
];

/// etcd's v3 API, vendored in `vendor/` (see its README).
const ETCD_PROTOS: &[&str] = &[
    "etcd/api/etcdserverpb/rpc.proto",
    "etcd/api/mvccpb/kv.proto",
    "etcd/api/authpb/auth.proto",
    "etcd/api/versionpb/version.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: a target
    // folder shared by two checkouts would otherwise compile one's protos
    // from the other's (or from a checkout since removed).
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir);
    let vendor = root.join("vendor");
    println!("cargo:rerun-if-changed={}", root.join("ferry").display());
    println!("cargo:rerun-if-changed={}", vendor.display());
    let file_descriptors = protox::compile(PROTOS, [root])?;
    tonic_prost_build::configure()
        // Keys and bodies decode as slices of the segment buffer, not copies.
        .bytes(".ferry.v1")
        .compile_fds(file_descriptors)?;
    // The etcd client of the etcd adapter, and the server side for the
    // etcd-compatible gateway.
    let etcd_descriptors = protox::compile(ETCD_PROTOS, [&vendor])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(etcd_descriptors)?;
    Ok(())
}

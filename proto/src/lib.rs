//! ferry-proto: the protobuf messages and gRPC services of ferry, generated at
//! build time from `ferry/v1/*.proto` by protox and tonic-prost-build (no
//! system `protoc`).
//!
//! - [`v1::Op`], [`v1::OpBatch`]: the op envelope and a batch of them
//!   (`op.proto`).
//! - [`v1::SegmentHeader`], [`v1::Codec`]: the header of a segment in object
//!   storage (`segment.proto`).
//! - the SourceAgent and TargetAgent services and their messages
//!   (`agent.proto`).
//! - [`etcd`]: etcd's v3 API, vendored, for the etcd adapter and gateway.

/// etcd's v3 API (vendored in `vendor/etcd`), client and server.
#[allow(missing_docs, clippy::all)]
pub mod etcd {
    /// The KV, Watch, Lease, Cluster, Maintenance and Auth services.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    /// Keys, values and events.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// Users, roles and permissions.
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
}

/// Version 1 of ferry's wire and storage messages, package `ferry.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("ferry.v1");
}

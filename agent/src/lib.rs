//! ferry-agent: the gRPC services that run beside a control plane.
//!
//! The services and their messages are declared in `proto/ferry/v1/agent.proto`
//! and generated in `ferry-proto`; this crate will serve them:
//! - a SourceAgent beside the old plane (extract, fence, unfence),
//! - a TargetAgent beside the new plane (apply, checkpoint),
//! - the write-fencing gateway.
//!
//! Nothing is served yet: the foundation settles the op format first.

pub mod gateway;

pub use ferry_proto::v1::source_agent_server::SourceAgent;
pub use ferry_proto::v1::target_agent_server::TargetAgent;

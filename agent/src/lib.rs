//! ferry-agent: the gRPC services that run beside a control plane.
//!
//! The services and their messages are declared in `proto/ferry/v1/agent.proto`
//! and `gateway.proto`, and generated in `ferry-proto`; this crate serves them:
//! - a SourceAgent beside the old plane (extract, fence, commit, unfence, digest),
//! - a TargetAgent beside the new plane (apply, checkpoint, digest, adopt),
//! - the write-fencing gateway and its admin service,
//!
//! and drives a live migration across them (`migrate`). The design is in
//! `docs/DESIGN.md`.
//!
//! Modules:
//! - [`source`]: the SourceAgent over any live source of the adapter
//!   registry ([`source::SourceAgentService`]).
//! - [`target`]: the TargetAgent over any live sink
//!   ([`target::TargetAgentService`]).
//! - [`serve`]: serving them (zstd, TLS, token) and mapping errors to gRPC codes.
//! - [`auth`]: the bearer token the agents require when one is configured.
//! - [`remote`]: `agent://HOST:PORT` as a source (extract) and a sink (restore).
//! - [`gateway`]: the write-fencing gateway.

pub mod auth;
pub mod client;
pub mod gateway;
pub mod migrate;
pub mod remote;
pub mod serve;
pub mod source;
pub mod target;

pub use ferry_proto::v1::source_agent_server::SourceAgent;
pub use ferry_proto::v1::target_agent_server::TargetAgent;

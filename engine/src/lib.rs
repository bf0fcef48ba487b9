//! ferry-engine: the library behind the `ferry` command.
//!
//! Data flows one way: a [`Source`](adapters::Source) yields ops, they are
//! written as segments in object storage (or streamed), and a
//! [`Sink`](adapters::Sink) replays them. The modules:
//!
//! - [`order`]: seq contiguity (G1) as a checked operation.
//! - [`segment`]: the segment format, its writer and its checked reader.
//! - [`manifest`]: the JSON document that seals a backup.
//! - [`store`]: backups in object storage, addressed by URL.
//! - [`backup`]: writing, reading and verifying whole backups.
//! - [`adapters`]: sources and sinks, one module per control plane.
//! - [`migrations`]: version migrations: profiles, jq filters, the chain.
//! - [`pipeline`]: the extract and restore jobs end to end.
//! - [`progress`]: counters the CLI shows as progress.
//! - [`error`]: the crate error and its kinds.
//! - `testing` (feature `testing`): proptest strategies for ops.
//! - `conformance` (feature `testing`): the suite every adapter runs on a
//!   real server.
//! - `fuzzing` (feature `testing`): the checks the fuzz targets in `fuzz/` run.

pub mod adapters;
pub mod backup;
#[cfg(any(test, feature = "testing"))]
pub mod conformance;
pub mod error;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod manifest;
pub mod migrations;
pub mod order;
pub mod pipeline;
pub mod progress;
pub mod segment;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::{Error, ErrorClass, ErrorKind, Result};
pub use ferry_proto::v1::Op;

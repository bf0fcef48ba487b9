//! The `postgres` adapter (being built): PostgreSQL 15 and newer, batch and
//! live (DESIGN.md, "Adapters"). Its snapshot is a logical replication slot
//! created with an exported snapshot, read by `COPY` under `SET TRANSACTION
//! SNAPSHOT`; its live changes are the slot's `pgoutput` stream.
//!
//! - [`replication`]: a connection in PostgreSQL's replication protocol
//!   (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT` with an exported
//!   snapshot, `DROP_REPLICATION_SLOT`, `START_REPLICATION`), with its TLS
//!   and authentication, and the TLS client configuration that regular SQL
//!   connections (tokio-postgres, through tokio-postgres-rustls) share.

pub mod replication;

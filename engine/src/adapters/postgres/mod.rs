//! The `postgres` adapter: PostgreSQL, each table extracted with
//! `COPY (SELECT ...) TO STDOUT` and restored with `COPY ... FROM STDIN`, one
//! op per row whose body is the row as a JSON object.
//!
//! - [`value`]: the codec between a COPY text row and that JSON object, with
//!   no server: which column types are carried, and how.

pub mod value;

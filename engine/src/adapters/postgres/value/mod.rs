//! The codec between a row in `COPY`'s text format and the op body that
//! carries it: a JSON object with one key per column, in the table's column
//! order.
//!
//! The extract reads `COPY (SELECT ...) TO STDOUT` and gives each line to a
//! [`RowDecoder`]; the restore gives each op's body to a [`RowEncoder`] and
//! writes the lines to `COPY ... FROM STDIN`. Text that PostgreSQL printed
//! comes back as the same text, so PostgreSQL reads back the same value. The
//! column types come from [`TypeCatalog::classify`], which also refuses the
//! few types that cannot be carried exactly.
//!
//! Every connection, extract and restore, first sets [`SESSION_SETTINGS`],
//! which make the text forms below the canonical ones; a value in another
//! form (another DateStyle, a time zone other than UTC, bytea in escape
//! form) is an error, not a guess.
//!
//! # How values are carried
//!
//! The examples are fields as COPY sends them (a backslash in the value is
//! doubled) and the JSON they become.
//!
//! | type | JSON | COPY field -> JSON |
//! | --- | --- | --- |
//! | any type, NULL | `null` | `\N` -> `null` |
//! | `bool` | `true` / `false` | `t` -> `true` |
//! | `int2`, `int4`, `int8` | number | `-42` -> `-42` |
//! | `oid`, `lo` | number: the reference, not the large object | `16403` -> `16403` |
//! | `float4`, `float8` | number with the digits PostgreSQL printed; the strings `"NaN"`, `"Infinity"`, `"-Infinity"` | `1e-300` -> `1e-300`, `-0` -> `-0`, `NaN` -> `"NaN"` |
//! | `numeric` | string of its exact text | `1.50` -> `"1.50"`, `NaN` -> `"NaN"` |
//! | `text`, `varchar`, `bpchar`, `name`, `"char"`, `citext`, enums, `uuid` | string | `a\tb` -> `"a\tb"` |
//! | `bytea` | string, base64 (standard alphabet, padded) | `\\x00ff10` -> `"AP8Q"` |
//! | `json`, `jsonb` | the JSON value itself, as PostgreSQL spelled it | `{"a": [1, 2]}` -> `{"a": [1, 2]}` |
//! | `json`, `jsonb` holding `null`, `json` with whitespace around the value, an object whose only key is `$json` | `{"$json": "<its JSON text>"}` | `null` -> `{"$json":"null"}`, ` [1] ` -> `{"$json":" [1] "}` |
//! | `timestamptz` | string, `YYYY-MM-DDTHH:MM:SS[.ffffff]Z` | `2024-01-02 03:04:05.12+00` -> `"2024-01-02T03:04:05.12Z"` |
//! | `timestamp` | string, `YYYY-MM-DDTHH:MM:SS[.ffffff]` | `2024-01-02 03:04:05` -> `"2024-01-02T03:04:05"` |
//! | `date` | string, `YYYY-MM-DD` | `2024-01-02` -> `"2024-01-02"` |
//! | the three above, before 1 AD or after 9999 | ISO 8601 years: 1 BC is `0000`, 44 BC `-0043`, 10000 AD `+10000` | `0044-03-15 BC` -> `"-0043-03-15"` |
//! | the three above, infinite | `"infinity"` / `"-infinity"` | `infinity` -> `"infinity"` |
//! | `time`, `timetz`, `interval` | string of its text | `P1Y2M3DT4H5M6.5S` -> `"P1Y2M3DT4H5M6.5S"` |
//! | arrays | array of the element's JSON, nested per dimension; NULL elements `null` | `{{1,NULL},{3,4}}` -> `[[1,null],[3,4]]` |
//! | arrays of `json`, `jsonb` | array of strings holding each element's JSON text | `{"[1, 2]"}` -> `["[1, 2]"]` |
//! | arrays of a domain over an array | array of strings holding each element's array text | `{"{1,2}",NULL}` -> `["{1,2}",null]` |
//! | arrays whose lower bounds are not all 1 | `{"lower_bounds": [...], "values": [...]}` | `[0:1]={a,b}` -> `{"lower_bounds":[0],"values":["a","b"]}` |
//! | every other type: composite, range, multirange, `inet`, `xml`, `bit`, geometric, extension types (`hstore`...) | string of its text | `[1,5)` -> `"[1,5)"` |
//!
//! Why some rules are as they are:
//! - Floats keep PostgreSQL's digits rather than go through `f64`: with
//!   `extra_float_digits = 3` they are the shortest that read back as the
//!   same float (17 significant digits before PostgreSQL 12), and a reader
//!   parsing them as `f64` gets that float.
//! - `numeric` is a string because a JSON reader would round it to a float.
//! - `json` keeps its text as written (whitespace, key order, repeated
//!   keys are part of a `json` value). The JSON value `null` cannot be
//!   carried as itself: it would read back as SQL NULL; nor can whitespace
//!   before or after a `json` value, which the op body does not keep; so
//!   those, and an object that already looks like the wrapper, travel
//!   wrapped. Numbers inside json keep their digits, even past what an
//!   `f64` holds (`jsonb` prints `1e400` as 401 digits): a reader that parses
//!   them as `f64` must expect that.
//! - The elements of `json[]` (and of arrays of a domain over an array) are
//!   strings because a JSON array element cannot be told from a dimension
//!   of the array.
//! - The restore also takes a JSON number for `numeric` (its digits as
//!   written), for ops written by hand.
//!
//! Carried, but not as a value on their own: an `oid` or `lo` column is a
//! large-object reference, restored as the same number; the large object
//! itself is not copied. The text of the `reg*` types (`regclass`...) is a
//! name, read back against the target's catalog and `search_path`.
//!
//! # Refused
//!
//! - `money`: its text form follows the server's `lc_monetary`, so another
//!   server may read it as another amount; extract a view that casts it to
//!   `numeric`.
//! - Pseudo-types, which no table stores.
//! - Domains over and arrays of a refused type.
//!
//! A composite, range or multirange whose fields are `money` is carried as
//! its text, money and all: the catalog rows ferry reads do not show the
//! fields.

mod array_literal;
mod catalog;
mod copy_text;
mod datetime;
mod decode;
mod encode;
mod json_text;
#[cfg(test)]
mod round_trip_tests;

pub use catalog::{PgType, Refused, TypeCatalog, TypeRow};
pub use copy_text::{
    CopyField, CopyFields, NULL_FIELD, TrailingBackslash, escape_field, names_line, split_line,
};
pub use decode::{RowDecoder, TextValue};
pub use encode::RowEncoder;

/// The settings every connection makes before its first `COPY`, as `(name,
/// value)`: they make the text forms the ones the rules above read.
/// `extra_float_digits = 3` makes floats print the digits that read back
/// exactly; the others fix the form of dates and times, intervals and
/// bytea, and the encoding.
pub const SESSION_SETTINGS: [(&str, &str); 6] = [
    ("DateStyle", "ISO, MDY"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("client_encoding", "UTF8"),
];

/// [`SESSION_SETTINGS`] as SQL to send once on a new connection.
///
/// ```
/// use ferry_engine::adapters::postgres::value::session_settings_sql;
/// assert!(session_settings_sql().starts_with("SET DateStyle = 'ISO, MDY'; SET TimeZone = 'UTC';"));
/// ```
pub fn session_settings_sql() -> String {
    SESSION_SETTINGS
        .iter()
        .map(|(name, value)| format!("SET {name} = '{value}';"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A table column, as the codec needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The column's name, the key of its value in the JSON object.
    pub name: String,
    /// How its values are carried.
    pub pg_type: PgType,
}

/// A row that cannot be carried. The codec knows the column; the caller
/// adds the table and the row's key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// A COPY line with more or fewer fields than the table has columns.
    #[error("the row has {found} fields where the table has {expected} columns")]
    FieldCount {
        /// The table's columns.
        expected: usize,
        /// The line's fields.
        found: usize,
    },
    /// An op body without a key for a column.
    #[error("the row has no key for column {column}; every column needs one, null for NULL")]
    MissingColumn {
        /// The column.
        column: String,
    },
    /// An op body with a key that is no column of the table.
    #[error("the row has a key {key:?} that is no column of the table")]
    UnknownColumn {
        /// The key (truncated when long).
        key: String,
    },
    /// An op body with a column twice.
    #[error("the row gives column {column} twice")]
    DuplicateColumn {
        /// The column.
        column: String,
    },
    /// An op body that is not a JSON object.
    #[error("the row is not a JSON object: {reason}")]
    NotAnObject {
        /// What serde_json said.
        reason: String,
    },
    /// One value that does not follow its type's rule.
    #[error("column {column} ({pg_type}): {reason}: {value}")]
    BadValue {
        /// The column.
        column: String,
        /// Its type, as [`PgType`] displays it.
        pg_type: String,
        /// The value as it came (COPY text or JSON), truncated when long.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// How much of a value an error shows.
const EXCERPT_CHARS: usize = 64;

/// `text`, cut to [`EXCERPT_CHARS`] characters with its full length said.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}... ({} bytes in all)", &text[..cut], text.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_settings_are_sql_to_send_as_they_are() {
        assert_eq!(
            session_settings_sql(),
            "SET DateStyle = 'ISO, MDY'; SET TimeZone = 'UTC'; SET IntervalStyle = 'iso_8601'; \
             SET extra_float_digits = '3'; SET bytea_output = 'hex'; SET client_encoding = 'UTF8';"
        );
    }

    #[test]
    fn errors_show_a_long_value_cut() {
        let long = "é".repeat(100);
        let shown = excerpt(&long);
        assert!(shown.starts_with(&"é".repeat(64)), "{shown}");
        assert!(shown.ends_with("... (200 bytes in all)"), "{shown}");
        assert_eq!(excerpt("short"), "short");
    }
}

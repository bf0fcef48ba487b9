//! The `jsonl` adapter: ops as JSON Lines, one op a line, in a file or on
//! stdin / stdout. A bring-your-own-platform source, and a readable dump of
//! any backup.
//!
//! A line is an object:
//!
//! | field | type | |
//! | --- | --- | --- |
//! | `key` or `key_b64` | string | the resource key; `key_b64` (standard base64) for keys that are not UTF-8 |
//! | `method` | string | the request to replay, e.g. `Put` |
//! | `body` or `body_b64` | any JSON value, or base64 string | the request body; `body` is kept byte for byte as written |
//! | `kind` | string, optional | resource kind, e.g. `etcd.kv` |
//! | `txn` | integer, optional | adjacent lines with the same non-zero `txn` are one transaction |
//! | `position` | integer, optional | the source's own order (revision, LSN) |
//! | `platform_version` | string, optional | the API version the body is written in |
//! | `content_type` | string, optional | defaults to `application/json` with `body`, `application/octet-stream` with `body_b64` |
//! | `deps` or `deps_b64` | array of strings, optional | keys that must exist first |
//! | `seq` | integer, optional | ignored on input: ferry numbers ops in file order; written on output |
//!
//! Unknown fields are refused (a misspelt `methdo` is an error, not a loss).
//! Blank lines are skipped.

mod sink;
mod source;

pub use sink::JsonlSink;
pub use source::JsonlSource;

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::registry::Adapter;
use super::{AdapterError, Sink, SinkOptions, Source, SourceOptions};
use crate::Op;

/// jsonl in the registry: a batch source and sink, never live.
pub const ADAPTER: Adapter = Adapter {
    name: "jsonl",
    schemes: &["jsonl"],
    urls: "jsonl:///PATH, jsonl://- (stdin or stdout)",
    source: Some(open_source),
    sink: Some(open_sink),
    live_source: None,
    live_sink: None,
    in_place: None,
    digest_entry: None,
};

fn open_source(url: &str, options: &SourceOptions) -> crate::Result<Box<dyn Source>> {
    if !options.prefix.is_empty() {
        return Err(AdapterError::BadUrl {
            url: url.to_owned(),
            reason: "a jsonl source takes every line: --prefix is for sources that hold keys"
                .to_owned(),
        }
        .into());
    }
    Ok(Box::new(JsonlSource::new(Location::parse(url)?)))
}

fn open_sink(url: &str, options: &SinkOptions) -> crate::Result<Box<dyn Sink>> {
    if options.rewrite_prefix.is_some() {
        return Err(AdapterError::BadUrl {
            url: url.to_owned(),
            reason: "a jsonl target writes ops as they are: --rewrite-prefix is for targets that hold keys"
                .to_owned(),
        }
        .into());
    }
    Ok(Box::new(JsonlSink::create(Location::parse(url)?)?))
}

/// Media type of a `body` field.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// Media type of a `body_b64` field.
pub const BINARY_CONTENT_TYPE: &str = "application/octet-stream";

/// Where the lines are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A file.
    File(PathBuf),
    /// stdin for a source, stdout for a sink: `jsonl://-`.
    Stdio,
}

impl Location {
    /// Parses `jsonl:///path`, `jsonl://relative/path` or `jsonl://-`.
    pub fn parse(url: &str) -> Result<Self, AdapterError> {
        let rest = url
            .strip_prefix("jsonl://")
            .ok_or_else(|| AdapterError::BadUrl {
                url: url.to_owned(),
                reason: "a jsonl URL starts with jsonl://".to_owned(),
            })?;
        match rest {
            "-" => Ok(Location::Stdio),
            "" => Err(AdapterError::BadUrl {
                url: url.to_owned(),
                reason: "name a file (jsonl:///path/ops.jsonl) or - for stdin/stdout".to_owned(),
            }),
            path => Ok(Location::File(PathBuf::from(path))),
        }
    }

    /// The location for people.
    pub fn display_name(&self, stdio: &str) -> String {
        match self {
            Location::File(path) => path.display().to_string(),
            Location::Stdio => stdio.to_owned(),
        }
    }
}

/// One line as it is read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineIn<'a> {
    #[serde(default)]
    #[allow(dead_code, reason = "accepted and ignored: ferry numbers ops itself")]
    seq: Option<u64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    key_b64: Option<String>,
    method: Option<String>,
    #[serde(default, borrow, deserialize_with = "present_raw")]
    body: Option<&'a RawValue>,
    #[serde(default)]
    body_b64: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    txn: Option<u64>,
    #[serde(default)]
    position: Option<u64>,
    #[serde(default)]
    platform_version: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    deps: Option<Vec<String>>,
    #[serde(default)]
    deps_b64: Option<Vec<String>>,
}

/// `"body": null` is a body (the JSON `null`), not a missing one.
fn present_raw<'de, D>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Parses one line (without its newline) into an op numbered `seq`. The
/// error is the reason alone; the caller adds the file and line.
fn parse_line(line: &[u8], seq: u64) -> Result<Op, String> {
    let parsed: LineIn<'_> = serde_json::from_slice(line).map_err(|error| {
        // serde_json's column is the useful part; its "line 1" is not.
        let text = error.to_string();
        text.split(" at line ").next().unwrap_or(&text).to_owned()
            + &format!(" (column {})", error.column())
    })?;
    let key = match (parsed.key, parsed.key_b64) {
        (Some(key), None) => Bytes::from(key),
        (None, Some(encoded)) => decode_b64("key_b64", &encoded)?,
        (Some(_), Some(_)) => return Err("give `key` or `key_b64`, not both".to_owned()),
        (None, None) => return Err("missing field `key` (or `key_b64`)".to_owned()),
    };
    let method = parsed.method.ok_or("missing field `method`")?;
    if method.is_empty() {
        return Err("`method` is empty".to_owned());
    }
    let (body, default_content_type) = match (parsed.body, parsed.body_b64) {
        (Some(raw), None) => (
            Bytes::copy_from_slice(raw.get().as_bytes()),
            JSON_CONTENT_TYPE,
        ),
        (None, Some(encoded)) => (decode_b64("body_b64", &encoded)?, BINARY_CONTENT_TYPE),
        (Some(_), Some(_)) => return Err("give `body` or `body_b64`, not both".to_owned()),
        (None, None) => return Err("missing field `body` (or `body_b64`)".to_owned()),
    };
    let deps = match (parsed.deps, parsed.deps_b64) {
        (Some(deps), None) => deps.into_iter().map(Bytes::from).collect(),
        (None, Some(deps)) => deps
            .iter()
            .map(|dep| decode_b64("deps_b64", dep))
            .collect::<Result<_, _>>()?,
        (Some(_), Some(_)) => return Err("give `deps` or `deps_b64`, not both".to_owned()),
        (None, None) => Vec::new(),
    };
    let txn = parsed.txn.unwrap_or(0);
    Ok(Op {
        seq,
        position: parsed.position.unwrap_or(0),
        txn,
        // Set by the reader once it sees the next line.
        txn_last: true,
        kind: parsed.kind.map(Bytes::from).unwrap_or_default(),
        key,
        method: Bytes::from(method),
        body,
        content_type: parsed.content_type.map_or(
            Bytes::from_static(default_content_type.as_bytes()),
            Bytes::from,
        ),
        platform_version: parsed.platform_version.map(Bytes::from).unwrap_or_default(),
        deps,
    })
}

fn decode_b64(field: &str, encoded: &str) -> Result<Bytes, String> {
    BASE64
        .decode(encoded)
        .map(Bytes::from)
        .map_err(|error| format!("`{field}` is not standard base64: {error}"))
}

/// True when `body` can be written as a `body` field and read back to the
/// same bytes: one JSON value, no surrounding whitespace, no line break.
fn is_inline_json(body: &[u8]) -> bool {
    if body.is_empty() || body.contains(&b'\n') || body.contains(&b'\r') {
        return false;
    }
    match serde_json::from_slice::<&RawValue>(body) {
        Ok(raw) => raw.get().len() == body.len(),
        Err(_) => false,
    }
}

/// Appends one op as a line, newline included. The line reads back (through
/// [`parse_line`]) as the same op, byte for byte. Fails, naming the field,
/// when a text field of the op is not UTF-8 (JSON Lines cannot carry it).
fn write_line(op: &Op, line: &mut Vec<u8>) -> Result<(), &'static str> {
    fn text<'a>(field: &'static str, value: &'a [u8]) -> Result<&'a str, &'static str> {
        std::str::from_utf8(value).map_err(|_| field)
    }
    fn string(line: &mut Vec<u8>, value: &str) {
        serde_json::to_writer(&mut *line, value).expect("writing to a Vec cannot fail");
    }
    fn field(line: &mut Vec<u8>, name: &str) {
        line.extend_from_slice(b",\"");
        line.extend_from_slice(name.as_bytes());
        line.extend_from_slice(b"\":");
    }
    let start = line.len();
    line.extend_from_slice(b"{\"seq\":");
    line.extend_from_slice(op.seq.to_string().as_bytes());
    if !op.kind.is_empty() {
        field(line, "kind");
        string(line, text("kind", &op.kind)?);
    }
    if op.txn != 0 {
        field(line, "txn");
        line.extend_from_slice(op.txn.to_string().as_bytes());
    }
    if op.position != 0 {
        field(line, "position");
        line.extend_from_slice(op.position.to_string().as_bytes());
    }
    if !op.platform_version.is_empty() {
        field(line, "platform_version");
        string(line, text("platform_version", &op.platform_version)?);
    }
    match std::str::from_utf8(&op.key) {
        Ok(key) => {
            field(line, "key");
            string(line, key);
        }
        Err(_) => {
            field(line, "key_b64");
            string(line, &BASE64.encode(&op.key));
        }
    }
    field(line, "method");
    string(line, text("method", &op.method)?);
    let inline = is_inline_json(&op.body);
    let default_content_type = if inline {
        JSON_CONTENT_TYPE
    } else {
        BINARY_CONTENT_TYPE
    };
    if op.content_type != default_content_type.as_bytes() {
        field(line, "content_type");
        string(line, text("content_type", &op.content_type)?);
    }
    if !op.deps.is_empty() {
        let texts: Option<Vec<&str>> = op
            .deps
            .iter()
            .map(|dep| std::str::from_utf8(dep).ok())
            .collect();
        match texts {
            Some(texts) => {
                field(line, "deps");
                serde_json::to_writer(&mut *line, &texts).expect("writing to a Vec cannot fail");
            }
            None => {
                field(line, "deps_b64");
                let encoded: Vec<String> = op.deps.iter().map(|dep| BASE64.encode(dep)).collect();
                serde_json::to_writer(&mut *line, &encoded).expect("writing to a Vec cannot fail");
            }
        }
    }
    if inline {
        field(line, "body");
        line.extend_from_slice(&op.body);
    } else {
        field(line, "body_b64");
        string(line, &BASE64.encode(&op.body));
    }
    line.extend_from_slice(b"}\n");
    debug_assert!(line.len() > start);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_the_documented_shape() {
        let line = br#"{"key":"/a","method":"Put","body":{"x": [1, 2]},"kind":"etcd.kv","txn":7,"position":42,"platform_version":"1.7"}"#;
        let op = parse_line(line, 3).expect("valid line");
        assert_eq!(op.seq, 3);
        assert_eq!(&op.key[..], b"/a");
        assert_eq!(
            &op.body[..],
            br#"{"x": [1, 2]}"#,
            "the body is kept byte for byte"
        );
        assert_eq!(op.content_type, JSON_CONTENT_TYPE);
        assert_eq!(op.method, "Put");
        assert_eq!((op.txn, op.position), (7, 42));
    }

    #[test]
    fn a_text_field_that_is_not_utf8_is_refused_by_name() {
        let op = Op {
            seq: 9,
            key: Bytes::from_static(b"k"),
            method: Bytes::from_static(b"\xffPut"),
            ..Op::default()
        };
        assert_eq!(write_line(&op, &mut Vec::new()), Err("method"));
    }

    #[test]
    fn a_null_body_is_a_body() {
        let op =
            parse_line(br#"{"key":"k","method":"Delete","body":null}"#, 1).expect("valid line");
        assert_eq!(&op.body[..], b"null");
    }

    #[test]
    fn names_what_is_wrong() {
        let cases: [(&[u8], &str); 6] = [
            (br#"{"method":"Put","body":1}"#, "missing field `key`"),
            (br#"{"key":"k","body":1}"#, "missing field `method`"),
            (br#"{"key":"k","method":"Put"}"#, "missing field `body`"),
            (
                br#"{"key":"k","method":"Put","body":1,"methdo":"x"}"#,
                "unknown field `methdo`",
            ),
            (
                br#"{"key":"k","method":"Put","body_b64":"%%"}"#,
                "not standard base64",
            ),
            (br#"{"key":"k","method":"Put","body":1"#, "EOF"),
        ];
        for (line, expected) in cases {
            let error = parse_line(line, 1).expect_err("invalid line");
            assert!(
                error.contains(expected),
                "{error:?} should mention {expected:?}"
            );
        }
    }

    fn arbitrary_op() -> impl Strategy<Value = Op> {
        let text_or_bytes = prop_oneof![
            "[ -~]{0,40}".prop_map(|text| text.into_bytes()),
            proptest::collection::vec(any::<u8>(), 0..40),
        ];
        let body = prop_oneof![
            text_or_bytes.clone(),
            Just(br#"{"a": 1, "b": [true, null]}"#.to_vec()),
            Just(b"  {}".to_vec()),
            Just(b"{\n}".to_vec()),
        ];
        let content_type = prop_oneof![
            Just(""),
            Just(JSON_CONTENT_TYPE),
            Just(BINARY_CONTENT_TYPE),
            Just("text/plain"),
        ];
        (
            (1u64..1000, any::<u64>(), any::<u64>(), "[a-z.]{0,8}"),
            (text_or_bytes.clone(), "[A-Za-z]{1,8}", body, content_type),
            (
                "[0-9.]{0,4}",
                proptest::collection::vec(text_or_bytes, 0..3),
            ),
        )
            .prop_map(
                |(
                    (seq, position, txn, kind),
                    (key, method, body, content_type),
                    (platform_version, deps),
                )| Op {
                    seq,
                    position,
                    txn,
                    txn_last: true,
                    kind: kind.into(),
                    key: key.into(),
                    method: method.into(),
                    body: body.into(),
                    content_type: Bytes::from_static(content_type.as_bytes()),
                    platform_version: platform_version.into(),
                    deps: deps.into_iter().map(Bytes::from).collect(),
                },
            )
    }

    proptest! {
        #[test]
        fn every_op_survives_a_line(op in arbitrary_op()) {
            let mut line = Vec::new();
            write_line(&op, &mut line).expect("text fields are UTF-8");
            prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            prop_assert_eq!(line.last(), Some(&b'\n'));
            let back = parse_line(&line[..line.len() - 1], op.seq).expect("a written line reads back");
            prop_assert_eq!(back, op);
        }
    }
}

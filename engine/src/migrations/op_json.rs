//! The JSON object a jq filter sees for one op, and the op it gives back.
//!
//! In:
//!
//! ```json
//! {"seq": 12, "key": "/v3/pipelines/Foo", "kind": "etcd.kv", "method": "Put",
//!  "content_type": "", "platform_version": "v3", "deps": [],
//!  "body": {"name": "Foo", "environment": "py39"}}
//! ```
//!
//! - `body` holds the body parsed when it is JSON (strict JSON, RFC 8259);
//!   a body that is UTF-8 text but not JSON (an empty one included) comes
//!   as `body_text`, a string, instead. Exactly one of the two is there.
//! - `seq` is there to be read; the chain numbers the ops it hands on.
//!
//! Out: an object with a string `key` and exactly one of `body` (any JSON,
//! written back as JSON) and `body_text` (a string, written back as its
//! UTF-8 bytes). `kind`, `method`, `content_type` and `deps` may be left
//! out, and then keep the op's values. A filter that gives no output
//! (`empty`) drops the op; several outputs make several ops.
//!
//! Bytes are kept: a `body` equal to the one read (as JSON values) is
//! written back with the original bytes, untouched; a changed one is
//! written compact (no spaces), its object keys in the order the filter
//! left them and its numbers as they were written (`1.50` stays `1.50`).
//! So a document written compact comes back byte for byte after an `up`
//! and its `down`. What is not kept in a changed body: spaces between
//! tokens, `\/` and `\uXXXX` escapes of characters that need none.
//!
//! A key, a body or a dep that is not UTF-8 cannot be shown to a filter:
//! an op with one passes through untouched unless a migration matches it,
//! which is then an error naming the op.

use bytes::Bytes;
use jaq_json::{Map, Num, Val};

use crate::Op;

/// Why an op cannot be shown to a filter, or a filter's output is not an op.
pub type Reason = String;

fn text(value: &str) -> Val {
    Val::from(value.to_owned())
}

fn field<'a>(map: &'a Map, name: &str) -> Option<&'a Val> {
    map.get(&text(name))
}

fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, Reason> {
    std::str::from_utf8(bytes).map_err(|_| {
        format!("its {what} is not UTF-8, and jq filters see {what}s as text; narrow the migration's [match] so it does not take this op")
    })
}

/// Whether `body` is strict JSON (jaq's reader also takes comments, NaN
/// and byte strings, which are not JSON).
pub fn is_json(body: &[u8]) -> bool {
    !body.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

/// The op as a filter sees it.
pub fn op_to_val(op: &Op) -> Result<Val, Reason> {
    let mut map = Map::default();
    map.insert(text("seq"), Val::Num(Num::from_integral(op.seq)));
    map.insert(text("key"), text(utf8(&op.key, "key")?));
    map.insert(text("kind"), text(utf8(&op.kind, "kind")?));
    map.insert(text("method"), text(utf8(&op.method, "method")?));
    map.insert(
        text("content_type"),
        text(utf8(&op.content_type, "content type")?),
    );
    map.insert(
        text("platform_version"),
        text(utf8(&op.platform_version, "platform version")?),
    );
    let deps = op
        .deps
        .iter()
        .map(|dep| utf8(dep, "dep").map(text))
        .collect::<Result<Vec<_>, _>>()?;
    map.insert(text("deps"), deps.into_iter().collect());
    if is_json(&op.body) {
        let body = jaq_json::read::parse_single(&op.body)
            .map_err(|error| format!("its JSON body does not parse: {error}"))?;
        map.insert(text("body"), body);
    } else {
        map.insert(text("body_text"), text(utf8(&op.body, "body")?));
    }
    Ok(Val::obj(map))
}

fn string_field(map: &Map, name: &str) -> Result<Option<Bytes>, Reason> {
    match field(map, name) {
        None => Ok(None),
        Some(Val::TStr(bytes)) => {
            std::str::from_utf8(bytes)
                .map_err(|_| format!("the output's `{name}` is not valid UTF-8"))?;
            Ok(Some((**bytes).clone()))
        }
        Some(other) => Err(format!(
            "the output's `{name}` must be a string, not {other}"
        )),
    }
}

/// Writes a jq value as compact JSON, refusing what JSON cannot hold.
pub fn val_to_json(value: &Val) -> Result<Vec<u8>, Reason> {
    let mut json = Vec::new();
    jaq_json::write::write(&mut json, &jaq_json::write::Pp::default(), 0, value)
        .map_err(|error| format!("the output's body cannot be written: {error}"))?;
    if !is_json(&json) {
        return Err(format!(
            "the output's body is not valid JSON ({}): NaN, infinities, byte strings and non-string object keys have no JSON form",
            String::from_utf8_lossy(&json)
        ));
    }
    Ok(json)
}

/// The op a filter's output describes. `input` is the op the filter was
/// given and `input_val` its JSON view: fields left out keep their values,
/// and a body equal to the input's keeps its bytes.
pub fn val_to_op(output: &Val, input: &Op, input_val: &Val) -> Result<Op, Reason> {
    let Val::Obj(map) = output else {
        return Err(format!(
            "the output must be an object (an op), not {output}"
        ));
    };
    let key = string_field(map, "key")?.ok_or("the output has no string `key`")?;
    if key.is_empty() {
        return Err("the output's `key` is empty".to_owned());
    }
    let body = match (field(map, "body"), field(map, "body_text")) {
        (Some(_), Some(_)) => {
            return Err("the output has both `body` and `body_text`; keep one".to_owned());
        }
        (None, None) => {
            return Err(
                "the output has neither `body` (JSON) nor `body_text` (text); to drop the op, output `empty`"
                    .to_owned(),
            );
        }
        (Some(body), None) => {
            let unchanged = match input_val {
                Val::Obj(input_map) => field(input_map, "body") == Some(body),
                _ => false,
            };
            if unchanged {
                input.body.clone()
            } else {
                Bytes::from(val_to_json(body)?)
            }
        }
        (None, Some(_)) => string_field(map, "body_text")?.unwrap_or_default(),
    };
    let deps = match field(map, "deps") {
        None => input.deps.clone(),
        Some(Val::Arr(items)) => items
            .iter()
            .map(|item| match item {
                Val::TStr(bytes) => Ok((**bytes).clone()),
                other => Err(format!(
                    "the output's `deps` must hold strings, not {other}"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(format!(
                "the output's `deps` must be an array of strings, not {other}"
            ));
        }
    };
    let method = string_field(map, "method")?.unwrap_or_else(|| input.method.clone());
    if method.is_empty() {
        return Err("the output's `method` is empty".to_owned());
    }
    Ok(Op {
        seq: input.seq,
        position: input.position,
        txn: input.txn,
        txn_last: input.txn_last,
        kind: string_field(map, "kind")?.unwrap_or_else(|| input.kind.clone()),
        key,
        method,
        body,
        content_type: string_field(map, "content_type")?
            .unwrap_or_else(|| input.content_type.clone()),
        platform_version: input.platform_version.clone(),
        deps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &str, body: &[u8]) -> Op {
        Op {
            seq: 3,
            key: Bytes::copy_from_slice(key.as_bytes()),
            kind: Bytes::from_static(b"etcd.kv"),
            method: Bytes::from_static(b"Put"),
            body: Bytes::copy_from_slice(body),
            txn_last: true,
            ..Op::default()
        }
    }

    #[test]
    fn json_bodies_are_values_and_text_bodies_are_text() {
        let json = op_to_val(&op("/a", br#"{"b":1.50}"#)).expect("shown");
        assert!(json.to_string().contains(r#""body":{"b":1.50}"#), "{json}");
        let plain = op_to_val(&op("/a", b"hello")).expect("shown");
        assert!(
            plain.to_string().contains(r#""body_text":"hello""#),
            "{plain}"
        );
        let empty = op_to_val(&op("/a", b"")).expect("shown");
        assert!(empty.to_string().contains(r#""body_text":"""#), "{empty}");
    }

    #[test]
    fn binary_keys_and_bodies_cannot_be_shown() {
        assert!(op_to_val(&op("/a", b"\xff\x00")).is_err());
        let mut binary_key = op("/a", b"{}");
        binary_key.key = Bytes::from_static(b"/\xff");
        assert!(op_to_val(&binary_key).is_err());
    }

    #[test]
    fn an_unchanged_body_keeps_its_bytes() {
        let input = op("/a", b"{ \"b\" : 1.0 }");
        let shown = op_to_val(&input).expect("shown");
        let back = val_to_op(&shown, &input, &shown).expect("an op");
        assert_eq!(back.body, input.body);
    }

    #[test]
    fn outputs_that_are_not_ops_are_refused() {
        let input = op("/a", b"{}");
        let shown = op_to_val(&input).expect("shown");
        for bad in [
            Val::from("x".to_owned()),
            Val::obj(Map::default()),
            Val::obj([(text("key"), text("/a"))].into_iter().collect()),
            Val::obj(
                [
                    (text("key"), text("/a")),
                    (text("body"), Val::Num(Num::Float(f64::NAN))),
                ]
                .into_iter()
                .collect(),
            ),
        ] {
            assert!(val_to_op(&bad, &input, &shown).is_err(), "{bad}");
        }
    }
}

//! Restore: an op's body (the row's JSON object) to one COPY text line.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::array_literal;
use super::copy_text::{NULL_FIELD, escape_field};
use super::datetime::{self, DateTimeKind};
use super::json_text::{self, JsonStr};
use super::{Column, PgType, ValueError, excerpt};

/// Turns the JSON objects of one table's rows into COPY text lines with the
/// columns in the order given (the order of the `COPY ... (columns) FROM
/// STDIN`).
#[derive(Debug, Clone)]
pub struct RowEncoder {
    columns: Vec<Column>,
    /// `{"name":` for the first column, `,"name":` for the others: what
    /// the extract writes before each value (see [`Self::encode_as_written`]).
    key_prefixes: Vec<Vec<u8>>,
    index_by_name: HashMap<String, usize>,
    /// The text form of the value being written, before COPY's escapes.
    text: String,
    /// An array element's text form, before the literal's quoting.
    element: String,
}

impl RowEncoder {
    /// An encoder for rows of `columns`.
    pub fn new(columns: impl IntoIterator<Item = Column>) -> Self {
        let columns: Vec<Column> = columns.into_iter().collect();
        let index_by_name = columns
            .iter()
            .enumerate()
            .map(|(index, column)| (column.name.clone(), index))
            .collect();
        let key_prefixes = columns
            .iter()
            .enumerate()
            .map(|(index, column)| json_text::key_prefix(index, &column.name))
            .collect();
        Self {
            columns,
            key_prefixes,
            index_by_name,
            text: String::new(),
            element: String::new(),
        }
    }

    /// The columns, in order.
    pub fn columns(&self) -> impl ExactSizeIterator<Item = &Column> {
        self.columns.iter()
    }

    /// Appends the COPY text line, newline included, of the JSON object
    /// `body`. Every column must be a key (`null` for NULL) and every key a
    /// column. On an error `line` is left as it was.
    pub fn encode_row(&mut self, body: &[u8], line: &mut Vec<u8>) -> Result<(), ValueError> {
        let start = line.len();
        let encoded = self.encode_into(body, line);
        if encoded.is_err() {
            line.truncate(start);
        }
        encoded
    }

    fn encode_into(&mut self, body: &[u8], line: &mut Vec<u8>) -> Result<(), ValueError> {
        // UTF-8 checked once here; serde_json then reads the text as is.
        let body = std::str::from_utf8(body).map_err(|error| ValueError::NotAnObject {
            reason: error.to_string(),
        })?;
        let start = line.len();
        match self.encode_as_written(body, line) {
            Some(encoded) => return encoded,
            None => line.truncate(start),
        }
        let row: RowObject =
            serde_json::from_str(body).map_err(|error| ValueError::NotAnObject {
                reason: error.to_string(),
            })?;
        // The extract writes the columns in the table's order: then no
        // lookup by name is needed.
        let in_order = row.entries.len() == self.columns.len()
            && row
                .entries
                .iter()
                .zip(&self.columns)
                .all(|((key, _), column)| key.as_ref() == column.name);
        if in_order {
            for (index, (_, value)) in row.entries.iter().enumerate() {
                self.write_field(index, value, line)?;
            }
        } else {
            let mut values: Vec<Option<&RawValue>> = vec![None; self.columns.len()];
            for (key, value) in row.entries {
                let index = *self
                    .index_by_name
                    .get(key.as_ref())
                    .ok_or_else(|| ValueError::UnknownColumn { key: excerpt(&key) })?;
                if values[index].replace(value).is_some() {
                    return Err(ValueError::DuplicateColumn {
                        column: self.columns[index].name.clone(),
                    });
                }
            }
            for (index, value) in values.into_iter().enumerate() {
                let value = value.ok_or_else(|| ValueError::MissingColumn {
                    column: self.columns[index].name.clone(),
                })?;
                self.write_field(index, value, line)?;
            }
        }
        line.push(b'\n');
        Ok(())
    }

    /// The columns the JSON object `body` gives (some or all, in any
    /// order), each as its index and its text form (`None` for NULL), in
    /// the order written: what an UPDATE sets. A key that is no column, or
    /// a column given twice, is an error.
    pub fn text_values(&mut self, body: &[u8]) -> Result<Vec<(usize, Option<String>)>, ValueError> {
        let row: RowObject =
            serde_json::from_slice(body).map_err(|error| ValueError::NotAnObject {
                reason: error.to_string(),
            })?;
        let mut values: Vec<(usize, Option<String>)> = Vec::with_capacity(row.entries.len());
        for (key, value) in row.entries {
            let index = *self
                .index_by_name
                .get(key.as_ref())
                .ok_or_else(|| ValueError::UnknownColumn { key: excerpt(&key) })?;
            if values.iter().any(|(given, _)| *given == index) {
                return Err(ValueError::DuplicateColumn {
                    column: self.columns[index].name.clone(),
                });
            }
            if value.get() == "null" {
                values.push((index, None));
                continue;
            }
            let column = &self.columns[index];
            let mut text = String::new();
            write_text(&column.pg_type, value, &mut text, &mut self.element).map_err(|reason| {
                ValueError::BadValue {
                    column: column.name.clone(),
                    pg_type: column.pg_type.to_string(),
                    value: excerpt(value.get()),
                    reason,
                }
            })?;
            values.push((index, Some(text)));
        }
        Ok(values)
    }

    /// The way for a body as the extract writes it: the columns in order,
    /// no whitespace, `{"a":1,"b":"x"}`. One pass over the body finds each
    /// value's end; values whose JSON text is their COPY text (numbers,
    /// strings without escapes, json) are copied as they are, the others go
    /// through [`Self::write_field`]. `None` when the body has another shape
    /// (keys in another order, whitespace...): the caller reads it as any
    /// JSON object. A value the body has but its column's type refuses is
    /// an error here as there.
    fn encode_as_written(
        &mut self,
        body: &str,
        line: &mut Vec<u8>,
    ) -> Option<Result<(), ValueError>> {
        let bytes = body.as_bytes();
        let mut at = 0;
        for index in 0..self.columns.len() {
            let prefix = &self.key_prefixes[index];
            if !bytes[at..].starts_with(prefix) {
                return None;
            }
            at += prefix.len();
            let end = at + json_text::value_len(&bytes[at..])?;
            let value = &body[at..end];
            at = end;
            if self.copy_as_is(index, value, line) {
                continue;
            }
            let value: &RawValue = serde_json::from_str(value).ok()?;
            if let Err(error) = self.write_field(index, value, line) {
                return Some(Err(error));
            }
        }
        if &bytes[at..] != b"}" {
            return None;
        }
        line.push(b'\n');
        Some(Ok(()))
    }

    /// Writes column `index`'s JSON text `value` when that text, or a
    /// string's inside, is already its COPY field; false (nothing written)
    /// otherwise.
    fn copy_as_is(&mut self, index: usize, value: &str, line: &mut Vec<u8>) -> bool {
        let bytes = value.as_bytes();
        // A string with no escape and so no control character (JSON has
        // none raw in a string) holds nothing COPY escapes either.
        let plain_string = || {
            (bytes.len() >= 2 && bytes[0] == b'"' && !bytes[1..].contains(&b'\\'))
                .then(|| &bytes[1..bytes.len() - 1])
        };
        let field: &[u8] = match &self.columns[index].pg_type {
            _ if value == "null" => NULL_FIELD,
            PgType::Bool => match value {
                "true" => b"t",
                "false" => b"f",
                _ => return false,
            },
            PgType::Int2 | PgType::Int4 | PgType::Int8 | PgType::Oid
                if json_text::is_integer(value) =>
            {
                bytes
            }
            PgType::Float4 | PgType::Float8 | PgType::Numeric if json_text::is_number(value) => {
                bytes
            }
            text_like if text_like.is_carried_as_text() => match plain_string() {
                Some(text) => text,
                None => return false,
            },
            PgType::Json | PgType::Jsonb
                if !value.starts_with('"') && !bytes.starts_with(b"{\"$json\"") =>
            {
                if index > 0 {
                    line.push(b'\t');
                }
                escape_field(bytes, line);
                return true;
            }
            _ => return false,
        };
        if index > 0 {
            line.push(b'\t');
        }
        line.extend_from_slice(field);
        true
    }

    /// Writes column `index`'s `value`, after a tab unless it is the first.
    fn write_field(
        &mut self,
        index: usize,
        value: &RawValue,
        line: &mut Vec<u8>,
    ) -> Result<(), ValueError> {
        if index > 0 {
            line.push(b'\t');
        }
        if value.get() == "null" {
            line.extend_from_slice(NULL_FIELD);
            return Ok(());
        }
        let column = &self.columns[index];
        self.text.clear();
        write_text(&column.pg_type, value, &mut self.text, &mut self.element).map_err(
            |reason| ValueError::BadValue {
                column: column.name.clone(),
                pg_type: column.pg_type.to_string(),
                value: excerpt(value.get()),
                reason,
            },
        )?;
        escape_field(self.text.as_bytes(), line);
        Ok(())
    }
}

/// The body of a row op: its keys and values in the order written, each
/// value kept as its JSON text (so numbers keep their digits and json
/// values their spelling).
struct RowObject<'a> {
    entries: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'de> Deserialize<'de> for RowObject<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RowObject<'de>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a JSON object with one key per column")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RowObject<'de>, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((key, value)) = map.next_entry::<JsonStr<'de>, &'de RawValue>()? {
                    entries.push((key.0, value));
                }
                Ok(RowObject { entries })
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Appends the text form of the non-null JSON value `value` of `pg_type`.
fn write_text(
    pg_type: &PgType,
    value: &RawValue,
    out: &mut String,
    element: &mut String,
) -> Result<(), String> {
    match pg_type {
        PgType::Array {
            element: element_type,
            delimiter,
        } => write_array(element_type, *delimiter, value, out, element),
        scalar => write_scalar(scalar, value, out),
    }
}

fn write_scalar(pg_type: &PgType, value: &RawValue, out: &mut String) -> Result<(), String> {
    let json = value.get();
    match pg_type {
        PgType::Bool => out.push_str(match json {
            "true" => "t",
            "false" => "f",
            _ => return Err("expected true or false".to_owned()),
        }),
        PgType::Int2 | PgType::Int4 | PgType::Int8 | PgType::Oid => {
            if !json_text::is_integer(json) {
                return Err("expected a JSON integer".to_owned());
            }
            out.push_str(json);
        }
        PgType::Float4 | PgType::Float8 => {
            if json_text::is_number(json) {
                out.push_str(json);
            } else {
                match string(value).as_deref() {
                    Ok(special @ ("NaN" | "Infinity" | "-Infinity")) => out.push_str(special),
                    _ => {
                        return Err(
                            r#"expected a JSON number, "NaN", "Infinity" or "-Infinity""#
                                .to_owned(),
                        );
                    }
                }
            }
        }
        // A number is taken with its digits as written, for ops written by hand.
        PgType::Numeric if json_text::is_number(json) => out.push_str(json),
        PgType::Numeric
        | PgType::Text
        | PgType::Uuid
        | PgType::Enum
        | PgType::Time
        | PgType::Timetz
        | PgType::Interval
        | PgType::Other { .. } => out.push_str(&text_string(value)?),
        PgType::Bytea => {
            let bytes = BASE64
                .decode(string(value)?.as_bytes())
                .map_err(|error| format!("not padded standard base64: {error}"))?;
            out.reserve(2 + 2 * bytes.len());
            out.push_str("\\x");
            for byte in bytes {
                write!(out, "{byte:02x}").expect("writing to a String cannot fail");
            }
        }
        PgType::Json | PgType::Jsonb => match json_text::unwrap(json) {
            Some(wrapped) => out.push_str(&wrapped),
            None => out.push_str(json),
        },
        PgType::Timestamptz => {
            datetime::from_json(DateTimeKind::Timestamptz, &string(value)?, out)?;
        }
        PgType::Timestamp => datetime::from_json(DateTimeKind::Timestamp, &string(value)?, out)?,
        PgType::Date => datetime::from_json(DateTimeKind::Date, &string(value)?, out)?,
        PgType::Array { .. } => return Err("an array type as an array element".to_owned()),
    }
    Ok(())
}

/// The JSON string `value`, unescaped.
fn string(value: &RawValue) -> Result<Cow<'_, str>, String> {
    serde_json::from_str::<JsonStr>(value.get())
        .map(|string| string.0)
        .map_err(|_| "expected a JSON string".to_owned())
}

/// A JSON string that becomes PostgreSQL text, which cannot hold NUL.
fn text_string(value: &RawValue) -> Result<Cow<'_, str>, String> {
    let text = string(value)?;
    if text.contains('\0') {
        return Err("PostgreSQL text cannot hold the NUL character (\\u0000)".to_owned());
    }
    Ok(text)
}

/// `{"lower_bounds": [...], "values": [...]}`: an array whose lower bounds
/// are not all 1.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BoundedArray<'a> {
    lower_bounds: Vec<i64>,
    #[serde(borrow)]
    values: &'a RawValue,
}

fn write_array(
    element_type: &PgType,
    delimiter: u8,
    value: &RawValue,
    out: &mut String,
    element: &mut String,
) -> Result<(), String> {
    let mut shape = Shape::default();
    let mut writer = ArrayLiteralWriter {
        element_type,
        delimiter: char::from(delimiter),
        element,
    };
    let json = value.get();
    if json.starts_with('[') {
        return writer.level(value, 0, &mut shape, out);
    }
    if !json.starts_with('{') {
        return Err("expected a JSON array".to_owned());
    }
    let bounded: BoundedArray = serde_json::from_str(json).map_err(|error| {
        format!("expected a JSON array, or an object of lower_bounds and values: {error}")
    })?;
    let mut values = String::new();
    writer.level(bounded.values, 0, &mut shape, &mut values)?;
    if bounded.lower_bounds.len() != shape.lengths.len() {
        return Err(format!(
            "lower_bounds gives {} dimensions but values has {}",
            bounded.lower_bounds.len(),
            shape.lengths.len()
        ));
    }
    for (lower, &length) in bounded.lower_bounds.iter().zip(&shape.lengths) {
        let length = i64::try_from(length).map_err(|_| "an array too long".to_owned())?;
        let upper = lower
            .checked_add(length - 1)
            .ok_or("a lower bound out of range")?;
        write!(out, "[{lower}:{upper}]").expect("writing to a String cannot fail");
    }
    out.push('=');
    out.push_str(&values);
    Ok(())
}

/// What the levels of a JSON array seen so far say its shape is:
/// PostgreSQL's arrays are rectangular.
#[derive(Default)]
struct Shape {
    /// The length of the arrays at each depth.
    lengths: Vec<usize>,
    /// The depth of the arrays whose elements are values, once one is seen.
    values_depth: Option<usize>,
}

struct ArrayLiteralWriter<'a> {
    element_type: &'a PgType,
    delimiter: char,
    element: &'a mut String,
}

/// PostgreSQL's limit on dimensions (`MAXDIM`).
const MAX_DIMENSIONS: usize = 6;

impl ArrayLiteralWriter<'_> {
    /// Writes the JSON array `value` at `depth` (0 for the outermost) as
    /// `{...}`.
    fn level(
        &mut self,
        value: &RawValue,
        depth: usize,
        shape: &mut Shape,
        out: &mut String,
    ) -> Result<(), String> {
        if depth == MAX_DIMENSIONS {
            return Err("more than 6 dimensions".to_owned());
        }
        let items: Vec<&RawValue> = serde_json::from_str(value.get())
            .map_err(|error| format!("expected a JSON array: {error}"))?;
        match shape.lengths.get(depth) {
            Some(&length) if length != items.len() => {
                return Err(not_rectangular());
            }
            Some(_) => {}
            None => shape.lengths.push(items.len()),
        }
        out.push('{');
        for (index, item) in items.into_iter().enumerate() {
            if index > 0 {
                out.push(self.delimiter);
            }
            if item.get().starts_with('[') {
                if shape.values_depth == Some(depth) {
                    return Err(not_rectangular());
                }
                self.level(item, depth + 1, shape, out)?;
                continue;
            }
            let sub_arrays_seen = shape.lengths.len() > depth + 1;
            if sub_arrays_seen || shape.values_depth.is_some_and(|seen| seen != depth) {
                return Err(not_rectangular());
            }
            shape.values_depth = Some(depth);
            if item.get() == "null" {
                out.push_str("NULL");
                continue;
            }
            self.element.clear();
            self.element_text(item)
                .map_err(|reason| format!("array element {}: {reason}", excerpt(item.get())))?;
            array_literal::write_element(self.element, self.delimiter as u8, out);
        }
        out.push('}');
        Ok(())
    }

    fn element_text(&mut self, item: &RawValue) -> Result<(), String> {
        match self.element_type {
            // Carried as strings: a JSON array here would be a dimension.
            PgType::Json | PgType::Jsonb => self.element.push_str(&string(item)?),
            element_type => write_scalar(element_type, item, self.element)?,
        }
        Ok(())
    }
}

fn not_rectangular() -> String {
    "the sub-arrays differ in length or depth; PostgreSQL arrays are rectangular".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, pg_type: PgType) -> Column {
        Column {
            name: name.to_owned(),
            pg_type,
        }
    }

    fn array_of(element: PgType) -> PgType {
        PgType::Array {
            element: Box::new(element),
            delimiter: b',',
        }
    }

    /// The COPY field (no newline) of the JSON `value` of `pg_type`, the
    /// same whether the body is as the extract writes it or spaced out (any
    /// JSON object).
    fn try_encode(pg_type: PgType, value: &str) -> Result<String, ValueError> {
        let mut encoder = RowEncoder::new([column("v", pg_type)]);
        let mut field = |body: String| {
            let mut line = Vec::new();
            encoder.encode_row(body.as_bytes(), &mut line)?;
            let line = String::from_utf8(line).expect("the encoder writes UTF-8");
            Ok(line
                .strip_suffix('\n')
                .expect("a line ends in a newline")
                .to_owned())
        };
        let as_written = field(format!(r#"{{"v":{value}}}"#));
        let spaced = field(format!(r#"{{ "v" : {value} }}"#));
        assert_eq!(
            format!("{as_written:?}"),
            format!("{spaced:?}"),
            "{value}: the extract's shape and any JSON object give the same"
        );
        as_written
    }

    #[test]
    fn a_row_as_the_extract_writes_it_is_copied_in_one_pass() {
        let mut encoder = RowEncoder::new([
            column("id", PgType::Int8),
            column("name", PgType::Text),
            column("doc", PgType::Jsonb),
            column("when", PgType::Timestamptz),
            column("tags", array_of(PgType::Text)),
        ]);
        let mut line = Vec::new();
        encoder
            .encode_row(
                br#"{"id":-7,"name":"caf\u00e9\tx","doc":{"a":"}\"\\","b":[1,{"c":null}]},"when":"2024-01-02T03:04:05Z","tags":["a","b c"]}"#,
                &mut line,
            )
            .expect("encodes");
        assert_eq!(
            String::from_utf8(line).expect("UTF-8"),
            "-7\tcaf\u{e9}\\tx\t{\"a\":\"}\\\\\"\\\\\\\\\",\"b\":[1,{\"c\":null}]}\t2024-01-02 03:04:05+00\t{a,\"b c\"}\n"
        );
    }

    #[test]
    fn a_row_not_as_the_extract_writes_it_is_read_as_any_object() {
        let mut encoder = RowEncoder::new([column("a", PgType::Int4), column("b", PgType::Text)]);
        for (body, expected) in [
            (r#"{"b":"x","a":1}"#, Ok("1\tx\n")),
            (r#"{"a":1,"b":"x","c":2}"#, Err("no column")),
            (r#"{"a":1}"#, Err("no key for column b")),
            (r#"{"a":1,"a":2,"b":"x"}"#, Err("twice")),
            (r#"{"a":1,"b":"x"} "#, Ok("1\tx\n")),
            (r#"{"a":1,"b":"x"}x"#, Err("not a json object")),
            ("{\"a\":1,\"b\":\"raw\ttab\"}", Err("not a json object")),
            (r#"{"a":1,"b":"unterminated}"#, Err("not a json object")),
            (r#"{"a":1.5,"b":"x"}"#, Err("expected a json integer")),
        ] {
            let mut line = b"kept\n".to_vec();
            let encoded = encoder.encode_row(body.as_bytes(), &mut line);
            match expected {
                Ok(text) => {
                    encoded.unwrap_or_else(|error| panic!("{body}: {error}"));
                    assert_eq!(
                        String::from_utf8_lossy(&line),
                        format!("kept\n{text}"),
                        "{body}"
                    );
                }
                Err(word) => {
                    let error = encoded.expect_err(body).to_string();
                    assert!(error.to_lowercase().contains(word), "{body}: {error}");
                    assert_eq!(line, b"kept\n", "{body}: nothing of it is written");
                }
            }
        }
    }

    fn encode(pg_type: PgType, value: &str) -> String {
        try_encode(pg_type, value).unwrap_or_else(|error| panic!("{value}: {error}"))
    }

    fn reason(error: ValueError) -> String {
        match error {
            ValueError::BadValue { reason, .. } => reason,
            other => panic!("expected a bad value, got {other:?}"),
        }
    }

    #[test]
    fn a_line_has_the_columns_in_their_order_whatever_the_order_of_the_keys() {
        let mut encoder = RowEncoder::new([
            column("id", PgType::Int8),
            column("name", PgType::Text),
            column("gone", PgType::Text),
        ]);
        let mut line = b"previous\n".to_vec();
        encoder
            .encode_row(br#"{"gone": null, "name": "a\tb", "id": 7}"#, &mut line)
            .expect("a valid row");
        assert_eq!(line, b"previous\n7\ta\\tb\t\\N\n");
    }

    #[test]
    fn missing_unknown_and_repeated_keys_are_errors_that_name_them() {
        let mut encoder =
            RowEncoder::new([column("id", PgType::Int8), column("name", PgType::Text)]);
        let mut line = b"kept".to_vec();
        assert_eq!(
            encoder.encode_row(br#"{"id":1}"#, &mut line),
            Err(ValueError::MissingColumn {
                column: "name".into()
            })
        );
        assert_eq!(
            encoder.encode_row(br#"{"id":1,"name":"x","extra":2}"#, &mut line),
            Err(ValueError::UnknownColumn {
                key: "extra".into()
            })
        );
        assert_eq!(
            encoder.encode_row(br#"{"id":1,"id":2,"name":"x"}"#, &mut line),
            Err(ValueError::DuplicateColumn {
                column: "id".into()
            })
        );
        assert!(matches!(
            encoder.encode_row(b"[1, 2]", &mut line),
            Err(ValueError::NotAnObject { .. })
        ));
        assert!(matches!(
            encoder.encode_row(b"{\"id\":1", &mut line),
            Err(ValueError::NotAnObject { .. })
        ));
        assert_eq!(line, b"kept");
    }

    #[test]
    fn text_is_escaped_for_copy() {
        assert_eq!(encode(PgType::Text, r#""""#), "");
        assert_eq!(encode(PgType::Text, "null"), "\\N");
        assert_eq!(encode(PgType::Text, r#""\\N""#), "\\\\N");
        assert_eq!(encode(PgType::Text, r#""NULL""#), "NULL");
        assert_eq!(
            encode(PgType::Text, r#""a\tb\nc\\d\re\u0001\u000b""#),
            "a\\tb\\nc\\\\d\\re\x01\\v"
        );
        assert_eq!(encode(PgType::Text, r#""\u00e9 😀""#), "é 😀");
        assert!(
            reason(try_encode(PgType::Text, r#""a\u0000""#).expect_err("the value is refused"))
                .contains("NUL")
        );
        assert!(
            reason(try_encode(PgType::Text, "1").expect_err("the value is refused"))
                .contains("string")
        );
    }

    #[test]
    fn numbers_keep_their_digits() {
        assert_eq!(encode(PgType::Bool, "true"), "t");
        assert_eq!(encode(PgType::Bool, "false"), "f");
        assert_eq!(
            encode(PgType::Int8, "-9223372036854775808"),
            "-9223372036854775808"
        );
        assert_eq!(encode(PgType::Float8, "1e-300"), "1e-300");
        assert_eq!(encode(PgType::Float8, "-0"), "-0");
        assert_eq!(encode(PgType::Float8, "0.1"), "0.1");
        assert_eq!(encode(PgType::Float8, r#""NaN""#), "NaN");
        assert_eq!(encode(PgType::Float4, r#""-Infinity""#), "-Infinity");
        let long = format!("1{}.{}", "0".repeat(1000), "5".repeat(300));
        assert_eq!(encode(PgType::Numeric, &format!("\"{long}\"")), long);
        assert_eq!(encode(PgType::Numeric, &long), long);
        assert_eq!(encode(PgType::Numeric, r#""NaN""#), "NaN");
        assert!(try_encode(PgType::Bool, r#""t""#).is_err());
        assert!(try_encode(PgType::Int4, "1.0").is_err());
        assert!(try_encode(PgType::Int4, r#""1""#).is_err());
        assert!(try_encode(PgType::Float8, r#""nan""#).is_err());
    }

    #[test]
    fn bytea_comes_back_as_hex() {
        assert_eq!(encode(PgType::Bytea, r#""""#), "\\\\x");
        assert_eq!(encode(PgType::Bytea, r#""AP8Q""#), "\\\\x00ff10");
        assert!(
            reason(try_encode(PgType::Bytea, r#""AP8""#).expect_err("the value is refused"))
                .contains("base64")
        );
    }

    #[test]
    fn json_is_written_as_it_is_and_wrappers_are_unwrapped() {
        assert_eq!(
            encode(PgType::Jsonb, r#"{"a": [1, 2.50, "x\"y\\"], "b": "\t"}"#),
            r#"{"a": [1, 2.50, "x\\"y\\\\"], "b": "\\t"}"#
        );
        assert_eq!(
            encode(PgType::Jsonb, "12345678901234567890.5"),
            "12345678901234567890.5"
        );
        assert_eq!(encode(PgType::Jsonb, r#"{"$json":"null"}"#), "null");
        assert_eq!(
            encode(PgType::Json, r#"{"$json":" [1,  2] \n"}"#),
            " [1,  2] \\n"
        );
        assert_eq!(encode(PgType::Json, r#"{"$json":" null\n"}"#), " null\\n");
        assert_eq!(encode(PgType::Jsonb, r#""null""#), r#""null""#);
        assert_eq!(encode(PgType::Jsonb, "null"), "\\N");
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(
            encode(PgType::Timestamptz, r#""-0043-03-15T12:00:00.5Z""#),
            "0044-03-15 12:00:00.5+00 BC"
        );
        assert_eq!(encode(PgType::Date, r#""+10000-01-01""#), "10000-01-01");
        assert_eq!(encode(PgType::Interval, r#""P1D""#), "P1D");
        let error = reason(
            try_encode(PgType::Timestamptz, r#""2024-01-02T03:04:05+01:00""#)
                .expect_err("the value is refused"),
        );
        assert!(error.contains("YYYY-MM-DDTHH:MM:SS[.ffffff]Z"), "{error}");
    }

    #[test]
    fn arrays_become_literals_with_elements_quoted_as_array_out_quotes_them() {
        assert_eq!(encode(array_of(PgType::Int4), "[]"), "{}");
        assert_eq!(encode(array_of(PgType::Int4), "[1,null,3]"), "{1,NULL,3}");
        assert_eq!(
            encode(array_of(PgType::Int4), "[[1,2],[3,4]]"),
            "{{1,2},{3,4}}"
        );
        assert_eq!(
            encode(
                array_of(PgType::Text),
                r#"["",null,"NULL","a b","x\\\"y","é","\t","{}",","]"#
            ),
            r#"{"",NULL,"NULL","a b","x\\\\\\"y",é,"\t","{}",","}"#
        );
        assert_eq!(
            encode(array_of(PgType::Bytea), r#"["AP8=",null]"#),
            r#"{"\\\\x00ff",NULL}"#
        );
        assert_eq!(
            encode(array_of(PgType::Jsonb), r#"["[1, 2]","{\"a\": null}"]"#),
            r#"{"[1, 2]","{\\"a\\": null}"}"#
        );
        assert_eq!(
            encode(
                PgType::Array {
                    element: Box::new(PgType::Other { name: "box".into() }),
                    delimiter: b';'
                },
                r#"["(1,1),(0,0)","(2,2),(1,1)"]"#
            ),
            "{(1,1),(0,0);(2,2),(1,1)}"
        );
        assert_eq!(
            encode(
                array_of(PgType::Int2),
                r#"{"lower_bounds":[2,-1],"values":[[1,2],[3,4]]}"#
            ),
            "[2:3][-1:0]={{1,2},{3,4}}"
        );
    }

    #[test]
    fn ragged_arrays_and_bad_bounds_are_errors() {
        for ragged in [
            "[[1],[2,3]]",
            "[[1],2]",
            "[1,[2]]",
            "[[[1]],[2]]",
            "[[1],[[2]]]",
        ] {
            let error = reason(
                try_encode(array_of(PgType::Int4), ragged).expect_err("the value is refused"),
            );
            assert!(error.contains("rectangular"), "{ragged}: {error}");
        }
        assert!(
            try_encode(
                array_of(PgType::Int4),
                r#"{"lower_bounds":[1,1],"values":[1]}"#
            )
            .is_err()
        );
        assert!(try_encode(array_of(PgType::Int4), r#"{"values":[1]}"#).is_err());
        assert!(try_encode(array_of(PgType::Int4), r#""{1,2}""#).is_err());
        let error = reason(
            try_encode(array_of(PgType::Int4), "[1,\"x\"]").expect_err("the value is refused"),
        );
        assert!(error.starts_with(r#"array element "x":"#), "{error}");
    }
}

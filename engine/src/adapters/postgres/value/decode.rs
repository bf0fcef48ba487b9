//! Extract: one COPY text line to the row's JSON object, written straight
//! into the caller's buffer. This runs once per row of every table, so it
//! allocates nothing per field: fields without escapes are read where they
//! lie, and the scratch buffers live as long as the decoder.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::array_literal::{self, ArrayVisitor};
use super::copy_text::split_line;
use super::datetime::{self, DateTimeKind};
use super::json_text::{self, WRAPPER_KEY};
use super::{Column, PgType, ValueError, excerpt};

/// Turns COPY text lines of one table into JSON objects, one key per
/// column in the order given.
#[derive(Debug, Clone)]
pub struct RowDecoder {
    columns: Vec<DecodeColumn>,
    /// A field with its COPY escapes undone.
    field: Vec<u8>,
    /// An array element with its quoting undone.
    element: String,
    /// A bytea value's bytes.
    bytes: Vec<u8>,
}

#[derive(Debug, Clone)]
struct DecodeColumn {
    column: Column,
    /// `{"name":` for the first column, `,"name":` for the others: the name
    /// is escaped once, here.
    key_prefix: Vec<u8>,
}

impl RowDecoder {
    /// A decoder for rows of `columns`, in the order of the `COPY`'s select
    /// list.
    pub fn new(columns: impl IntoIterator<Item = Column>) -> Self {
        let columns = columns
            .into_iter()
            .enumerate()
            .map(|(index, column)| DecodeColumn {
                key_prefix: json_text::key_prefix(index, &column.name),
                column,
            })
            .collect();
        Self {
            columns,
            field: Vec::new(),
            element: String::new(),
            bytes: Vec::new(),
        }
    }

    /// The columns, in order.
    pub fn columns(&self) -> impl ExactSizeIterator<Item = &Column> {
        self.columns.iter().map(|column| &column.column)
    }

    /// Appends the JSON object of the COPY text `line` (with or without its
    /// newline) to `out`. On an error `out` is left as it was.
    pub fn decode_line(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
        let start = out.len();
        let decoded = self.decode_into(line, out);
        if decoded.is_err() {
            out.truncate(start);
        }
        decoded
    }

    fn decode_into(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
        let expected = self.columns.len();
        if expected == 0 {
            // A row of no columns is an empty line, not one empty field.
            if line.strip_suffix(b"\n").unwrap_or(line).is_empty() {
                out.extend_from_slice(b"{}");
                return Ok(());
            }
            return Err(ValueError::FieldCount {
                expected,
                found: split_line(line).count(),
            });
        }
        let mut fields = split_line(line);
        for (index, DecodeColumn { column, key_prefix }) in self.columns.iter().enumerate() {
            out.extend_from_slice(key_prefix);
            let Some(field) = fields.next() else {
                return Err(ValueError::FieldCount {
                    expected,
                    found: index,
                });
            };
            if field.is_null() {
                out.extend_from_slice(b"null");
                continue;
            }
            let bytes = field
                .unescape(&mut self.field)
                .map_err(|error| bad_value(column, field.escaped(), error.to_string()))?;
            write_column(
                column,
                bytes,
                field.escaped(),
                out,
                &mut self.element,
                &mut self.bytes,
            )?;
        }
        let extra = fields.count();
        if extra != 0 {
            return Err(ValueError::FieldCount {
                expected,
                found: expected + extra,
            });
        }
        out.push(b'}');
        Ok(())
    }
}

/// One column's value as a logical replication stream sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextValue<'a> {
    /// NULL.
    Null,
    /// Not sent (a TOASTed value the change left as it was): the column is
    /// left out of the object.
    Absent,
    /// The value's text form, without COPY's escapes.
    Text(&'a [u8]),
}

impl RowDecoder {
    /// Appends the JSON object of a row given as one [`TextValue`] per
    /// column, in the decoder's order; [`TextValue::Absent`] columns are
    /// left out. On an error `out` is left as it was.
    pub fn decode_values<'a>(
        &mut self,
        values: impl ExactSizeIterator<Item = TextValue<'a>>,
        out: &mut Vec<u8>,
    ) -> Result<(), ValueError> {
        let expected = self.columns.len();
        if values.len() != expected {
            return Err(ValueError::FieldCount {
                expected,
                found: values.len(),
            });
        }
        let start = out.len();
        out.push(b'{');
        let mut first = true;
        for (DecodeColumn { column, key_prefix }, value) in self.columns.iter().zip(values) {
            let text = match value {
                TextValue::Absent => continue,
                TextValue::Null => None,
                TextValue::Text(text) => Some(text),
            };
            // The prefix is `{"name":` or `,"name":`: its first byte is
            // chosen here, by what was written before.
            if !first {
                out.push(b',');
            }
            out.extend_from_slice(&key_prefix[1..]);
            first = false;
            let Some(text) = text else {
                out.extend_from_slice(b"null");
                continue;
            };
            let written = write_column(column, text, text, out, &mut self.element, &mut self.bytes);
            if let Err(error) = written {
                out.truncate(start);
                return Err(error);
            }
        }
        out.push(b'}');
        Ok(())
    }
}

/// A value of `column` that does not follow its type's rule, shown as
/// `shown` (as it came).
fn bad_value(column: &Column, shown: &[u8], reason: String) -> ValueError {
    ValueError::BadValue {
        column: column.name.clone(),
        pg_type: column.pg_type.to_string(),
        value: excerpt(&String::from_utf8_lossy(shown)),
        reason,
    }
}

/// Appends the JSON for `text`, the text form of a value of `column`
/// (`shown` in errors, as it came).
fn write_column(
    column: &Column,
    text: &[u8],
    shown: &[u8],
    out: &mut Vec<u8>,
    element: &mut String,
    bytes: &mut Vec<u8>,
) -> Result<(), ValueError> {
    let text = std::str::from_utf8(text).map_err(|error| {
        bad_value(
            column,
            shown,
            format!("not UTF-8 ({error}); is the session's client_encoding UTF8?"),
        )
    })?;
    write_value(&column.pg_type, text, out, element, bytes)
        .map_err(|reason| bad_value(column, shown, reason))
}

/// Appends the JSON for the text form `text` of a value of `pg_type`.
fn write_value(
    pg_type: &PgType,
    text: &str,
    out: &mut Vec<u8>,
    element: &mut String,
    bytes: &mut Vec<u8>,
) -> Result<(), String> {
    let PgType::Array {
        element: element_type,
        delimiter,
    } = pg_type
    else {
        return write_scalar(pg_type, text, out, bytes);
    };
    let mut writer = JsonArrayWriter {
        element_type,
        out,
        bytes,
        has_lower_bounds: false,
    };
    array_literal::parse(text, *delimiter, element, &mut writer)?;
    if writer.has_lower_bounds {
        writer.out.push(b'}');
    }
    Ok(())
}

fn write_scalar(
    pg_type: &PgType,
    text: &str,
    out: &mut Vec<u8>,
    bytes: &mut Vec<u8>,
) -> Result<(), String> {
    match pg_type {
        PgType::Bool => match text {
            "t" => out.extend_from_slice(b"true"),
            "f" => out.extend_from_slice(b"false"),
            _ => return Err("expected t or f".to_owned()),
        },
        PgType::Int2 | PgType::Int4 | PgType::Int8 | PgType::Oid => {
            if !json_text::is_integer(text) {
                return Err("not an integer as PostgreSQL prints it".to_owned());
            }
            out.extend_from_slice(text.as_bytes());
        }
        PgType::Float4 | PgType::Float8 => match text {
            "NaN" | "Infinity" | "-Infinity" => json_text::write_string(text, out),
            _ if json_text::is_number(text) => out.extend_from_slice(text.as_bytes()),
            _ => return Err("not a number as PostgreSQL prints floats".to_owned()),
        },
        PgType::Numeric
        | PgType::Text
        | PgType::Uuid
        | PgType::Enum
        | PgType::Time
        | PgType::Timetz
        | PgType::Interval
        | PgType::Other { .. } => json_text::write_string(text, out),
        PgType::Bytea => write_bytea(text, out, bytes)?,
        PgType::Json | PgType::Jsonb => {
            check_json(text)?;
            if json_text::needs_wrapping(text) {
                out.extend_from_slice(b"{");
                json_text::write_string(WRAPPER_KEY, out);
                out.push(b':');
                json_text::write_string(text, out);
                out.push(b'}');
            } else {
                out.extend_from_slice(text.as_bytes());
            }
        }
        PgType::Timestamptz => datetime::to_json(DateTimeKind::Timestamptz, text, out)?,
        PgType::Timestamp => datetime::to_json(DateTimeKind::Timestamp, text, out)?,
        PgType::Date => datetime::to_json(DateTimeKind::Date, text, out)?,
        PgType::Array { .. } => return Err("an array type as an array element".to_owned()),
    }
    Ok(())
}

/// PostgreSQL checked the value; this keeps a value serde_json would not
/// read (there should be none) from making the op's body invalid.
fn check_json(text: &str) -> Result<(), String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(drop)
        .map_err(|error| format!("not JSON ferry can read: {error}"))
}

/// `\x0102ff` (`bytea_output = hex`) to base64.
fn write_bytea(text: &str, out: &mut Vec<u8>, bytes: &mut Vec<u8>) -> Result<(), String> {
    let hex_digits = text
        .strip_prefix("\\x")
        .ok_or("not bytea in hex form; is the session's bytea_output hex?")?;
    if hex_digits.len() % 2 != 0 {
        return Err("an odd number of hex digits".to_owned());
    }
    bytes.clear();
    bytes.resize(hex_digits.len() / 2, 0);
    hex::decode_to_slice(hex_digits, bytes).map_err(|error| error.to_string())?;
    out.push(b'"');
    let start = out.len();
    let encoded_length = base64::encoded_len(bytes.len(), true)
        .ok_or("a bytea value too large to encode in base64")?;
    out.resize(start + encoded_length, 0);
    let written = BASE64
        .encode_slice(&bytes[..], &mut out[start..])
        .map_err(|error| error.to_string())?;
    out.truncate(start + written);
    out.push(b'"');
    Ok(())
}

/// Writes an array literal as nested JSON arrays, or as
/// `{"lower_bounds":[...],"values":[...]}` when it gives bounds.
struct JsonArrayWriter<'a> {
    element_type: &'a PgType,
    out: &'a mut Vec<u8>,
    bytes: &'a mut Vec<u8>,
    has_lower_bounds: bool,
}

impl ArrayVisitor for JsonArrayWriter<'_> {
    fn lower_bounds(&mut self, lower_bounds: &[i64]) {
        use std::io::Write as _;
        self.has_lower_bounds = true;
        self.out.extend_from_slice(b"{\"lower_bounds\":[");
        for (index, lower) in lower_bounds.iter().enumerate() {
            if index > 0 {
                self.out.push(b',');
            }
            write!(self.out, "{lower}").expect("writing to a Vec cannot fail");
        }
        self.out.extend_from_slice(b"],\"values\":");
    }

    fn open(&mut self) {
        self.out.push(b'[');
    }

    fn close(&mut self) {
        self.out.push(b']');
    }

    fn separator(&mut self) {
        self.out.push(b',');
    }

    fn element(&mut self, text: Option<&str>) -> Result<(), String> {
        let Some(text) = text else {
            self.out.extend_from_slice(b"null");
            return Ok(());
        };
        let written = match self.element_type {
            // As strings: a JSON array here would read back as a dimension.
            PgType::Json | PgType::Jsonb => {
                check_json(text).map(|()| json_text::write_string(text, self.out))
            }
            element_type => write_scalar(element_type, text, self.out, self.bytes),
        };
        written.map_err(|reason| format!("array element {}: {reason}", excerpt(text)))
    }
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

    #[test]
    fn values_of_a_replication_stream_decode_with_absent_ones_left_out() {
        let mut decoder = RowDecoder::new([
            column("id", PgType::Int8),
            column("note", PgType::Text),
            column("blob", PgType::Bytea),
            column("tags", array_of(PgType::Text)),
        ]);
        let mut out = Vec::new();
        let values = [
            TextValue::Text(b"7"),
            TextValue::Text(b"tab\there\\"),
            TextValue::Absent,
            TextValue::Null,
        ];
        decoder
            .decode_values(values.into_iter(), &mut out)
            .expect("the values decode");
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"id":7,"note":"tab\there\\","tags":null}"#
        );
        out.clear();
        let first_absent = [
            TextValue::Absent,
            TextValue::Null,
            TextValue::Text(b"\\x00ff"),
            TextValue::Text(b"{a,\"b c\"}"),
        ];
        decoder
            .decode_values(first_absent.into_iter(), &mut out)
            .expect("the values decode");
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"note":null,"blob":"AP8=","tags":["a","b c"]}"#
        );
        out.clear();
        let bad = [
            TextValue::Text(b"x"),
            TextValue::Null,
            TextValue::Null,
            TextValue::Null,
        ];
        let error = decoder.decode_values(bad.into_iter(), &mut out);
        assert!(
            matches!(&error, Err(ValueError::BadValue { column, .. }) if column == "id"),
            "{error:?}"
        );
        assert!(out.is_empty(), "nothing is left of a row that failed");
        let short = decoder.decode_values([TextValue::Null].into_iter(), &mut out);
        assert!(matches!(
            short,
            Err(ValueError::FieldCount {
                expected: 4,
                found: 1
            })
        ));
    }

    /// The JSON of one field of type `pg_type`, as COPY sends it.
    fn try_decode(pg_type: PgType, field: &str) -> Result<String, ValueError> {
        let mut decoder = RowDecoder::new([column("v", pg_type)]);
        let mut out = Vec::new();
        decoder.decode_line(format!("{field}\n").as_bytes(), &mut out)?;
        let object = String::from_utf8(out).expect("the decoder writes UTF-8");
        let value: serde_json::Value =
            serde_json::from_str(&object).expect("the decoder writes valid JSON");
        assert!(value.is_object(), "{object}");
        Ok(object
            .strip_prefix("{\"v\":")
            .and_then(|rest| rest.strip_suffix('}'))
            .expect("the object has the one key")
            .to_owned())
    }

    fn decode(pg_type: PgType, field: &str) -> String {
        try_decode(pg_type, field).unwrap_or_else(|error| panic!("{field:?}: {error}"))
    }

    fn reason(error: ValueError) -> String {
        match error {
            ValueError::BadValue { reason, .. } => reason,
            other => panic!("expected a bad value, got {other:?}"),
        }
    }

    #[test]
    fn a_row_is_one_object_with_the_columns_in_order_and_names_escaped_once() {
        let mut decoder = RowDecoder::new([
            column("id", PgType::Int8),
            column("na\"me", PgType::Text),
            column("gone", PgType::Text),
        ]);
        let mut out = b"previous ".to_vec();
        decoder
            .decode_line(b"7\tx\t\\N\n", &mut out)
            .expect("a valid line");
        assert_eq!(out, br#"previous {"id":7,"na\"me":"x","gone":null}"#);
    }

    #[test]
    fn the_wrong_number_of_fields_is_an_error_and_leaves_the_buffer_as_it_was() {
        let mut decoder = RowDecoder::new([column("a", PgType::Int4), column("b", PgType::Int4)]);
        let mut out = b"kept".to_vec();
        assert_eq!(
            decoder.decode_line(b"1\n", &mut out),
            Err(ValueError::FieldCount {
                expected: 2,
                found: 1
            })
        );
        assert_eq!(
            decoder.decode_line(b"1\t2\t3\t4", &mut out),
            Err(ValueError::FieldCount {
                expected: 2,
                found: 4
            })
        );
        assert_eq!(out, b"kept");
        let mut no_columns = RowDecoder::new([]);
        no_columns
            .decode_line(b"\n", &mut out)
            .expect("an empty line is a row of no columns");
        assert_eq!(out, b"kept{}");
    }

    #[test]
    fn text_keeps_empty_strings_null_look_alikes_escapes_and_unicode() {
        assert_eq!(decode(PgType::Text, ""), r#""""#);
        assert_eq!(decode(PgType::Text, "\\\\N"), r#""\\N""#);
        assert_eq!(decode(PgType::Text, "NULL"), r#""NULL""#);
        assert_eq!(decode(PgType::Text, "\\N"), "null");
        assert_eq!(
            decode(PgType::Text, "a\\tb\\nc\\\\d\\re\\x01"),
            r#""a\tb\nc\\d\re\u0001""#
        );
        assert_eq!(decode(PgType::Text, "é 😀 \"q\""), r#""é 😀 \"q\"""#);
        let error = try_decode(PgType::Text, "\\377").expect_err("the value is refused");
        assert!(reason(error).contains("client_encoding"));
    }

    #[test]
    fn numbers_keep_the_digits_postgresql_printed() {
        assert_eq!(decode(PgType::Bool, "t"), "true");
        assert_eq!(decode(PgType::Bool, "f"), "false");
        assert_eq!(
            decode(PgType::Int8, "-9223372036854775808"),
            "-9223372036854775808"
        );
        assert_eq!(decode(PgType::Oid, "4294967295"), "4294967295");
        assert_eq!(decode(PgType::Float8, "1e-300"), "1e-300");
        assert_eq!(decode(PgType::Float8, "-0"), "-0");
        assert_eq!(
            decode(PgType::Float8, "1.7976931348623157e+308"),
            "1.7976931348623157e+308"
        );
        assert_eq!(decode(PgType::Float4, "3.4028235e+38"), "3.4028235e+38");
        assert_eq!(decode(PgType::Float8, "NaN"), r#""NaN""#);
        assert_eq!(decode(PgType::Float8, "Infinity"), r#""Infinity""#);
        assert_eq!(decode(PgType::Float8, "-Infinity"), r#""-Infinity""#);
        let long = format!("1{}.{}", "0".repeat(1000), "5".repeat(300));
        assert_eq!(decode(PgType::Numeric, &long), format!("\"{long}\""));
        assert_eq!(decode(PgType::Numeric, "NaN"), r#""NaN""#);
        assert_eq!(decode(PgType::Numeric, "-0.00100"), r#""-0.00100""#);
        assert!(try_decode(PgType::Bool, "true").is_err());
        assert!(try_decode(PgType::Int4, "1.0").is_err());
        assert!(try_decode(PgType::Float8, "inf").is_err());
    }

    #[test]
    fn bytea_is_base64() {
        assert_eq!(decode(PgType::Bytea, "\\\\x"), r#""""#);
        assert_eq!(decode(PgType::Bytea, "\\\\x00ff10"), r#""AP8Q""#);
        assert_eq!(decode(PgType::Bytea, "\\\\x68656c6c6f"), r#""aGVsbG8=""#);
        let error = try_decode(PgType::Bytea, "hello").expect_err("the value is refused");
        assert!(reason(error).contains("bytea_output"));
        assert!(try_decode(PgType::Bytea, "\\\\x0").is_err());
        assert!(try_decode(PgType::Bytea, "\\\\xzz").is_err());
    }

    #[test]
    fn json_is_embedded_as_it_is_and_null_is_wrapped() {
        assert_eq!(
            decode(PgType::Jsonb, r#"{"a": [1, 2.50, "x\\"y"]}"#),
            r#"{"a": [1, 2.50, "x\"y"]}"#
        );
        assert_eq!(decode(PgType::Json, "\"\\\\u00e9\\\\n\""), r#""\u00e9\n""#);
        assert_eq!(
            decode(PgType::Jsonb, "12345678901234567890.5"),
            "12345678901234567890.5"
        );
        assert_eq!(decode(PgType::Jsonb, "null"), r#"{"$json":"null"}"#);
        // json keeps whitespace around its value; the op body would not.
        assert_eq!(
            decode(PgType::Json, " [1,  2] \\n"),
            r#"{"$json":" [1,  2] \n"}"#
        );
        assert_eq!(
            decode(PgType::Jsonb, r#"{"$json": "x"}"#),
            r#"{"$json":"{\"$json\": \"x\"}"}"#
        );
        assert_eq!(
            decode(PgType::Json, "{\"a\":1,\\n \"a\":2}"),
            "{\"a\":1,\n \"a\":2}"
        );
        assert!(try_decode(PgType::Jsonb, "{").is_err());
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(
            decode(PgType::Timestamptz, "2024-01-02 03:04:05.123456+00"),
            r#""2024-01-02T03:04:05.123456Z""#
        );
        assert_eq!(
            decode(PgType::Timestamp, "0044-03-15 00:00:00 BC"),
            r#""-0043-03-15T00:00:00""#
        );
        assert_eq!(decode(PgType::Date, "infinity"), r#""infinity""#);
        assert_eq!(decode(PgType::Time, "03:04:05.5"), r#""03:04:05.5""#);
        assert_eq!(
            decode(PgType::Timetz, "03:04:05+05:30"),
            r#""03:04:05+05:30""#
        );
        assert_eq!(
            decode(PgType::Interval, "P1Y2M3DT4H5M6.5S"),
            r#""P1Y2M3DT4H5M6.5S""#
        );
    }

    #[test]
    fn arrays_nest_and_keep_nulls_and_quoted_text() {
        assert_eq!(decode(array_of(PgType::Int4), "{}"), "[]");
        assert_eq!(decode(array_of(PgType::Int4), "{1,NULL,3}"), "[1,null,3]");
        assert_eq!(
            decode(array_of(PgType::Int4), "{{1,2},{3,4}}"),
            "[[1,2],[3,4]]"
        );
        assert_eq!(
            decode(
                array_of(PgType::Text),
                r#"{"",NULL,"NULL","a b","x\\\\\\"y",é,"\t"}"#
            ),
            r#"["",null,"NULL","a b","x\\\"y","é","\t"]"#
        );
        assert_eq!(
            decode(array_of(PgType::Float8), "{NaN,-Infinity,1e-300,-0}"),
            r#"["NaN","-Infinity",1e-300,-0]"#
        );
        assert_eq!(
            decode(array_of(PgType::Bytea), r#"{"\\\\x00ff",NULL}"#),
            r#"["AP8=",null]"#
        );
        assert_eq!(
            decode(
                array_of(PgType::Timestamptz),
                r#"{"2024-01-02 03:04:05+00",infinity}"#
            ),
            r#"["2024-01-02T03:04:05Z","infinity"]"#
        );
        assert_eq!(
            decode(
                array_of(PgType::Jsonb),
                r#"{"[1, 2]",null,"{\\"a\\": null}"}"#
            ),
            r#"["[1, 2]",null,"{\"a\": null}"]"#
        );
        assert_eq!(
            decode(array_of(PgType::Bool), "[0:1]={t,f}"),
            r#"{"lower_bounds":[0],"values":[true,false]}"#
        );
        assert_eq!(
            decode(array_of(PgType::Int2), "[2:3][-1:0]={{1,2},{3,4}}"),
            r#"{"lower_bounds":[2,-1],"values":[[1,2],[3,4]]}"#
        );
        let error = try_decode(array_of(PgType::Int4), "{1,x}").expect_err("the value is refused");
        assert!(reason(error).starts_with("array element x:"));
    }

    #[test]
    fn an_error_names_the_column_its_type_and_the_value() {
        let mut decoder = RowDecoder::new([
            column("id", PgType::Int4),
            column("created", PgType::Timestamptz),
        ]);
        let error = decoder
            .decode_line(b"1\t2024-01-02 03:04:05+02\n", &mut Vec::new())
            .expect_err("a time zone other than UTC");
        let ValueError::BadValue {
            column,
            pg_type,
            value,
            reason,
        } = &error
        else {
            panic!("{error:?}");
        };
        assert_eq!(column, "created");
        assert_eq!(pg_type, "timestamptz");
        assert_eq!(value, "2024-01-02 03:04:05+02");
        assert!(reason.contains("TimeZone"), "{reason}");
        assert!(error.to_string().contains("created"), "{error}");
    }
}

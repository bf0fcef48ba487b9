//! Writing JSON by hand into a byte buffer, and the checks that keep what
//! is written valid JSON.

use std::borrow::Cow;

use serde::Deserialize;

/// Appends `text` as a JSON string, quotes included: `"` and `\` escaped,
/// control characters as `\n`-style or `\u00XX` escapes, everything else
/// (all of Unicode) as it is.
pub(super) fn write_string(text: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut run_start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        if !NEEDS_ESCAPE[usize::from(byte)] {
            continue;
        }
        out.extend_from_slice(&bytes[run_start..index]);
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            control => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(control >> 4)]);
                out.push(HEX[usize::from(control & 0xf)]);
            }
        }
        run_start = index + 1;
    }
    out.extend_from_slice(&bytes[run_start..]);
    out.push(b'"');
}

/// What comes before the value of the column named `name` at `index` in a
/// row's object as the extract writes it: `{"name":` for the first column,
/// `,"name":` for the others.
pub(super) fn key_prefix(index: usize, name: &str) -> Vec<u8> {
    let mut prefix = vec![if index == 0 { b'{' } else { b',' }];
    write_string(name, &mut prefix);
    prefix.push(b':');
    prefix
}

const NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// The length of the JSON value at the start of `bytes`, found without
/// reading it: a string to its closing quote, an object or array to its
/// closing bracket (strings inside skipped), anything else to the `,`, `}`
/// or `]` after it. `None` when it does not end, or when a string holds a
/// raw control character (not JSON: the caller then reads the whole text
/// as JSON, and says what is wrong). What lies inside is not checked.
pub(super) fn value_len(bytes: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'"' => {
                index += 1 + string_len(&bytes[index + 1..])?;
                if depth == 0 {
                    return Some(index);
                }
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    return Some(index + 1);
                }
            }
            b',' | b'}' | b']' if depth == 0 => return (index > 0).then_some(index),
            _ => {}
        }
        index += 1;
    }
    None
}

/// The length of the rest of a JSON string after its opening quote, its
/// closing quote included.
fn string_len(bytes: &[u8]) -> Option<usize> {
    let mut index = 0;
    loop {
        let found = index + memchr::memchr2(b'"', b'\\', &bytes[index..])?;
        // A fold, not `any`: no early exit, so it runs on whole vectors.
        let control = bytes[index..found]
            .iter()
            .fold(false, |seen, &byte| seen | (byte < 0x20));
        if control {
            return None;
        }
        if bytes[found] == b'"' {
            return Some(found + 1);
        }
        match bytes.get(found + 1) {
            Some(&escaped) if escaped >= 0x20 => index = found + 2,
            _ => return None,
        }
    }
}

/// True when `text` is a number by JSON's grammar:
/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
pub(super) fn is_number(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut index = integer_end(bytes);
    if index == 0 {
        return false;
    }
    if bytes.get(index) == Some(&b'.') {
        let digits = digits_from(bytes, index + 1);
        if digits == 0 {
            return false;
        }
        index += 1 + digits;
    }
    if matches!(bytes.get(index), Some(b'e' | b'E')) {
        index += 1;
        if matches!(bytes.get(index), Some(b'+' | b'-')) {
            index += 1;
        }
        let digits = digits_from(bytes, index);
        if digits == 0 {
            return false;
        }
        index += digits;
    }
    index == bytes.len()
}

/// True when `text` is an integer by JSON's grammar: `-? (0 | [1-9][0-9]*)`.
pub(super) fn is_integer(text: &str) -> bool {
    let bytes = text.as_bytes();
    let end = integer_end(bytes);
    end != 0 && end == bytes.len()
}

/// Where the integer part at the start of `bytes` ends, 0 when there is none.
fn integer_end(bytes: &[u8]) -> usize {
    let sign = usize::from(bytes.first() == Some(&b'-'));
    match bytes.get(sign) {
        Some(b'0') => sign + 1,
        Some(b'1'..=b'9') => sign + 1 + digits_from(bytes, sign + 1),
        _ => 0,
    }
}

fn digits_from(bytes: &[u8], start: usize) -> usize {
    bytes.get(start..).map_or(0, |rest| {
        rest.iter().take_while(|byte| byte.is_ascii_digit()).count()
    })
}

/// The one key of the object that carries a json or jsonb value that could
/// not be carried as itself: the JSON value `null` (which would read back as
/// SQL NULL), a `json` text with whitespace around the value (which the
/// op body would not keep), and an object that is itself such a wrapper.
pub(super) const WRAPPER_KEY: &str = "$json";

/// `{"$json": "<the value's JSON text>"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapper<'a> {
    #[serde(rename = "$json", borrow)]
    text: Cow<'a, str>,
}

/// When `json` (a valid JSON text) is a wrapper, the text it wraps.
pub(super) fn unwrap(json: &str) -> Option<Cow<'_, str>> {
    let trimmed = json.trim_matches(is_json_whitespace);
    // Only an object with a `$` or an escape in it can be a wrapper: the
    // parse below runs for almost no value.
    if !trimmed.starts_with('{') || !(trimmed.contains('$') || trimmed.contains("\\u")) {
        return None;
    }
    serde_json::from_str::<Wrapper>(trimmed)
        .ok()
        .map(|wrapper| wrapper.text)
}

/// True when the json or jsonb value `json` must travel wrapped: it is
/// `null`, has whitespace around it, or is itself a wrapper.
pub(super) fn needs_wrapping(json: &str) -> bool {
    let trimmed = json.trim_matches(is_json_whitespace);
    trimmed.len() != json.len() || trimmed == "null" || unwrap(json).is_some()
}

fn is_json_whitespace(character: char) -> bool {
    matches!(character, ' ' | '\t' | '\n' | '\r')
}

/// A JSON string, borrowed from the input when it has no escapes.
pub(super) struct JsonStr<'a>(pub(super) Cow<'a, str>);

impl<'de> Deserialize<'de> for JsonStr<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = JsonStr<'de>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<JsonStr<'de>, E> {
                Ok(JsonStr(Cow::Borrowed(text)))
            }

            fn visit_str<E>(self, text: &str) -> Result<JsonStr<'de>, E> {
                Ok(JsonStr(Cow::Owned(text.to_owned())))
            }

            fn visit_string<E>(self, text: String) -> Result<JsonStr<'de>, E> {
                Ok(JsonStr(Cow::Owned(text)))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_ends_where_json_says() {
        for (text, expected) in [
            (r#""a,b}"x"#, Some(6)),
            (r#""a\"}",x"#, Some(6)),
            (r#""\\",x"#, Some(4)),
            (r#"{"a":"}","b":[1,{}]},x"#, Some(20)),
            (r#"[[1],[2]]}"#, Some(9)),
            ("-1.5e3,x", Some(6)),
            ("null}", Some(4)),
            (",", None),
            (r#""open"#, None),
            ("{\"a\":1", None),
            ("\"raw\ttab\",", None),
            ("123", None),
        ] {
            assert_eq!(value_len(text.as_bytes()), expected, "{text}");
        }
    }

    fn string(text: &str) -> String {
        let mut out = Vec::new();
        write_string(text, &mut out);
        String::from_utf8(out).expect("JSON strings are UTF-8")
    }

    #[test]
    fn strings_escape_what_json_requires_and_nothing_else() {
        assert_eq!(string(""), r#""""#);
        assert_eq!(string("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(string("\n\r\t\x08\x0c"), r#""\n\r\t\b\f""#);
        assert_eq!(string("\x00\x01\x1f\x7f"), "\"\\u0000\\u0001\\u001f\x7f\"");
        assert_eq!(string("é😀\u{2028}"), "\"é😀\u{2028}\"");
        for text in ["", "a\"b", "\x00\x1f", "é😀", "\\N"] {
            assert_eq!(
                serde_json::from_str::<String>(&string(text)).expect("a valid JSON string"),
                text
            );
        }
    }

    #[test]
    fn numbers_follow_the_json_grammar() {
        for good in [
            "0", "-0", "12", "1.5", "1e-300", "1E+20", "-1.25e05", "0.000001",
        ] {
            assert!(is_number(good), "{good}");
        }
        for bad in [
            "", "-", "01", "1.", ".5", "1e", "1e+", "+1", "NaN", "Infinity", "1 ",
        ] {
            assert!(!is_number(bad), "{bad}");
        }
        assert!(is_integer("-9223372036854775808"));
        for bad in ["1.0", "1e3", "00", "-", ""] {
            assert!(!is_integer(bad), "{bad}");
        }
    }

    #[test]
    fn null_and_wrappers_need_wrapping_and_nothing_else_does() {
        for wrapped in [
            "null",
            " null\n",
            " {}",
            "[1]\n",
            "\t\"s\"\r",
            r#"{"$json":"null"}"#,
            r#"{ "$json" : "x" }"#,
            r#"{"\u0024json":"x"}"#,
        ] {
            assert!(needs_wrapping(wrapped), "{wrapped}");
        }
        for not_wrapped in [
            r#""null""#,
            "[null]",
            r#"{"$json":1}"#,
            r#"{"$json":"x","y":1}"#,
            r#"{"$other":"x"}"#,
            r#"{"a":"\u0041"}"#,
            "{}",
        ] {
            assert!(!needs_wrapping(not_wrapped), "{not_wrapped}");
        }
        assert_eq!(unwrap(r#"{"$json":"a\"b"}"#).as_deref(), Some("a\"b"));
    }
}

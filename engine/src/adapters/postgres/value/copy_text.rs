//! COPY's text format: one row a line, fields separated by a tab, `\N` for
//! NULL, and backslash escapes for the bytes that would break the line.

use std::fmt;

/// The fields of one COPY text line, as they are on the wire (still
/// escaped). A backslash takes the byte after it along, so an escaped tab
/// does not end a field.
#[derive(Debug, Clone)]
pub struct CopyFields<'a> {
    /// What is left of the line; `None` once its last field is out.
    rest: Option<&'a [u8]>,
}

/// Splits `line` (with or without its newline) into its fields. A line
/// always has at least one field: an empty line is one empty field.
pub fn split_line(line: &[u8]) -> CopyFields<'_> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    CopyFields { rest: Some(line) }
}

impl<'a> Iterator for CopyFields<'a> {
    type Item = CopyField<'a>;

    fn next(&mut self) -> Option<CopyField<'a>> {
        let rest = self.rest?;
        let mut has_backslash = false;
        let mut index = 0;
        while index < rest.len() {
            match rest[index] {
                b'\t' => {
                    self.rest = Some(&rest[index + 1..]);
                    return Some(CopyField {
                        escaped: &rest[..index],
                        has_backslash,
                    });
                }
                b'\\' => {
                    has_backslash = true;
                    index += 2;
                }
                _ => index += 1,
            }
        }
        self.rest = None;
        Some(CopyField {
            escaped: rest,
            has_backslash,
        })
    }
}

/// One field of a COPY text line, still escaped.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CopyField<'a> {
    escaped: &'a [u8],
    has_backslash: bool,
}

impl fmt::Debug for CopyField<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "CopyField({:?})",
            String::from_utf8_lossy(self.escaped)
        )
    }
}

/// A field that ends in a lone backslash: the line was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the field ends in a lone backslash")]
pub struct TrailingBackslash;

impl<'a> CopyField<'a> {
    /// True for SQL NULL: the field is exactly `\N`.
    pub fn is_null(&self) -> bool {
        self.escaped == b"\\N"
    }

    /// The field as it is on the wire.
    pub fn escaped(&self) -> &'a [u8] {
        self.escaped
    }

    /// The field's bytes with COPY's escapes undone: the field itself when
    /// it has none (no copy), else written into `scratch`. `\b \f \n \r \t
    /// \v` are those control bytes, `\` and one to three octal digits or
    /// `x` and one or two hex digits the byte of that value, and a
    /// backslash before anything else that thing itself (`\\` is `\`).
    pub fn unescape<'s>(&self, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], TrailingBackslash>
    where
        'a: 's,
    {
        if !self.has_backslash {
            return Ok(self.escaped);
        }
        scratch.clear();
        let bytes = self.escaped;
        let mut index = 0;
        while index < bytes.len() {
            let run_end = bytes[index..]
                .iter()
                .position(|&byte| byte == b'\\')
                .map_or(bytes.len(), |offset| index + offset);
            scratch.extend_from_slice(&bytes[index..run_end]);
            if run_end == bytes.len() {
                break;
            }
            let Some(&escaped) = bytes.get(run_end + 1) else {
                return Err(TrailingBackslash);
            };
            index = run_end + 2;
            let byte = match escaped {
                b'b' => 0x08,
                b'f' => 0x0c,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'v' => 0x0b,
                b'0'..=b'7' => {
                    let mut value = u32::from(escaped - b'0');
                    for _ in 0..2 {
                        match bytes.get(index) {
                            Some(&digit @ b'0'..=b'7') => {
                                value = value * 8 + u32::from(digit - b'0');
                                index += 1;
                            }
                            _ => break,
                        }
                    }
                    // PostgreSQL keeps the low byte of `\777`.
                    (value & 0xff) as u8
                }
                b'x' => match bytes.get(index).and_then(|&digit| hex_value(digit)) {
                    Some(high) => {
                        index += 1;
                        match bytes.get(index).and_then(|&digit| hex_value(digit)) {
                            Some(low) => {
                                index += 1;
                                high * 16 + low
                            }
                            None => high,
                        }
                    }
                    None => b'x',
                },
                other => other,
            };
            scratch.push(byte);
        }
        Ok(scratch)
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// `names` as one COPY text line (fields escaped, tab-separated, ended by
/// a newline): the line that names the columns of a run of rows.
pub fn names_line<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut line = Vec::new();
    for (index, name) in names.into_iter().enumerate() {
        if index > 0 {
            line.push(b'\t');
        }
        escape_field(name.as_bytes(), &mut line);
    }
    line.push(b'\n');
    line
}

/// Appends `text` as one COPY text field, escaped exactly as PostgreSQL's
/// `COPY TO` escapes it: backslash and the control bytes `\b \f \n \r \t
/// \v`; every other byte as it is.
pub fn escape_field(text: &[u8], line: &mut Vec<u8>) {
    let mut run_start = 0;
    for (index, &byte) in text.iter().enumerate() {
        let escaped = match byte {
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x0b => b'v',
            _ => continue,
        };
        line.extend_from_slice(&text[run_start..index]);
        line.extend_from_slice(&[b'\\', escaped]);
        run_start = index + 1;
    }
    line.extend_from_slice(&text[run_start..]);
}

/// What a NULL field is on the wire.
pub const NULL_FIELD: &[u8] = b"\\N";

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(line: &[u8]) -> Vec<&[u8]> {
        split_line(line).map(|field| field.escaped()).collect()
    }

    fn unescaped(field: &[u8]) -> Vec<u8> {
        let field = split_line(field).next().expect("a line has a field");
        let mut scratch = Vec::new();
        field
            .unescape(&mut scratch)
            .expect("a well-formed field")
            .to_vec()
    }

    #[test]
    fn a_line_splits_on_tabs_and_keeps_empty_fields() {
        assert_eq!(fields(b"a\tb\t\\N\n"), [&b"a"[..], b"b", b"\\N"]);
        assert_eq!(fields(b""), [&b""[..]]);
        assert_eq!(fields(b"\t"), [&b""[..], b""]);
        assert_eq!(fields(b"a\t\n"), [&b"a"[..], b""]);
    }

    #[test]
    fn an_escaped_tab_does_not_end_a_field() {
        assert_eq!(fields(b"a\\\tb\tc"), [&b"a\\\tb"[..], b"c"]);
        assert_eq!(unescaped(b"a\\\tb"), b"a\tb");
        // An escaped backslash does not escape the tab after it.
        assert_eq!(fields(b"a\\\\\tb"), [&b"a\\\\"[..], b"b"]);
    }

    #[test]
    fn only_the_whole_field_backslash_n_is_null() {
        let nulls: Vec<bool> = split_line(b"\\N\t\\\\N\taa\\N\tN")
            .map(|field| field.is_null())
            .collect();
        assert_eq!(nulls, [true, false, false, false]);
        assert_eq!(unescaped(b"\\\\N"), b"\\N");
        assert_eq!(unescaped(b"aa\\N"), b"aaN");
    }

    #[test]
    fn every_escape_of_the_copy_docs() {
        assert_eq!(
            unescaped(b"\\b\\f\\n\\r\\t\\v\\\\"),
            b"\x08\x0c\n\r\t\x0b\\"
        );
        assert_eq!(unescaped(b"\\101\\0\\7x\\1010"), b"A\0\x07xA0");
        assert_eq!(unescaped(b"\\777"), b"\xff");
        assert_eq!(unescaped(b"\\x41\\x4g\\xg\\x414"), b"A\x04gxgA4");
        assert_eq!(unescaped(b"\\q\\.\\\""), b"q.\"");
        assert_eq!(unescaped("é\\tü".as_bytes()), "é\tü".as_bytes());
    }

    #[test]
    fn a_field_without_backslash_is_not_copied() {
        let line = b"plain";
        let field = split_line(line).next().expect("a line has a field");
        let mut scratch = Vec::new();
        let text = field.unescape(&mut scratch).expect("a well-formed field");
        assert!(std::ptr::eq(text, &line[..]));
    }

    #[test]
    fn a_trailing_lone_backslash_is_an_error() {
        let field = split_line(b"ab\\").next().expect("a line has a field");
        assert_eq!(field.unescape(&mut Vec::new()), Err(TrailingBackslash));
    }

    #[test]
    fn escaping_matches_copy_to_and_leaves_other_control_bytes() {
        let mut line = Vec::new();
        escape_field(b"a\tb\nc\\d\re\x08\x0c\x0b\x01\x7f\\N", &mut line);
        assert_eq!(line, b"a\\tb\\nc\\\\d\\re\\b\\f\\v\x01\x7f\\\\N");
    }

    #[test]
    fn a_names_line_splits_back_into_the_names() {
        let names = ["id", "Some Column", "tab\there", "back\\slash", ""];
        let line = names_line(names);
        assert!(line.ends_with(b"\n"));
        let mut scratch = Vec::new();
        let back: Vec<Vec<u8>> = split_line(&line)
            .map(|field| field.unescape(&mut scratch).expect("whole").to_vec())
            .collect();
        let expected: Vec<Vec<u8>> = names.iter().map(|name| name.as_bytes().to_vec()).collect();
        assert_eq!(back, expected);
    }
}

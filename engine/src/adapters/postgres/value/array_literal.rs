//! PostgreSQL's array literal, as `array_out` prints it and `array_in`
//! reads it: `{1,2}`, `{{"a b",NULL},{c,"\"q\""}}`, `{}`, and when a lower
//! bound is not 1, the bounds first: `[0:1]={1,2}`.

/// PostgreSQL's limit on dimensions (`MAXDIM`).
const MAX_DIMENSIONS: usize = 6;

/// What [`parse`] found, in the order of the literal.
pub(super) trait ArrayVisitor {
    /// The lower bound of each dimension, when the literal starts with
    /// bounds; called before the outermost [`open`](Self::open).
    fn lower_bounds(&mut self, lower_bounds: &[i64]);
    /// A `{`.
    fn open(&mut self);
    /// A `}`.
    fn close(&mut self);
    /// The delimiter between two elements or two sub-arrays.
    fn separator(&mut self);
    /// One element: `None` for NULL, else its text with the literal's
    /// quoting undone.
    fn element(&mut self, text: Option<&str>) -> Result<(), String>;
}

/// Parses the array literal `text` whose elements are separated by
/// `delimiter`, telling `visitor` what it finds. `scratch` holds an
/// element while its escapes are undone; elements without escapes are
/// borrowed from `text`.
pub(super) fn parse(
    text: &str,
    delimiter: u8,
    scratch: &mut String,
    visitor: &mut impl ArrayVisitor,
) -> Result<(), String> {
    let mut parser = Parser {
        text,
        position: 0,
        delimiter,
        scratch,
        deepest: 0,
    };
    let lower_bounds = parser.lower_bounds()?;
    if let Some(lower_bounds) = &lower_bounds {
        visitor.lower_bounds(lower_bounds);
    }
    parser.skip_whitespace();
    parser.level(1, visitor)?;
    parser.skip_whitespace();
    if parser.position != text.len() {
        return Err(parser.malformed("text after the closing brace"));
    }
    if let Some(lower_bounds) = lower_bounds
        && lower_bounds.len() != parser.deepest
    {
        return Err(format!(
            "the array literal gives bounds for {} dimensions but has {}",
            lower_bounds.len(),
            parser.deepest
        ));
    }
    Ok(())
}

struct Parser<'text, 'scratch> {
    text: &'text str,
    position: usize,
    delimiter: u8,
    scratch: &'scratch mut String,
    /// The most dimensions seen, for checking them against the bounds.
    deepest: usize,
}

impl<'text> Parser<'text, '_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.position).copied()
    }

    fn malformed(&self, what: &str) -> String {
        format!("malformed array literal: {what} at byte {}", self.position)
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        if self.peek() != Some(byte) {
            return Err(self.malformed(&format!("expected {:?}", char::from(byte))));
        }
        self.position += 1;
        Ok(())
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(is_array_whitespace) {
            self.position += 1;
        }
    }

    /// `[lower:upper]` per dimension and `=`, when the literal has them.
    fn lower_bounds(&mut self) -> Result<Option<Vec<i64>>, String> {
        if self.peek() != Some(b'[') {
            return Ok(None);
        }
        let mut lower_bounds = Vec::new();
        while self.peek() == Some(b'[') {
            self.position += 1;
            let lower = self.integer()?;
            self.expect(b':')?;
            let upper = self.integer()?;
            self.expect(b']')?;
            if upper < lower {
                return Err(self.malformed("an upper bound below its lower bound"));
            }
            lower_bounds.push(lower);
        }
        self.expect(b'=')?;
        Ok(Some(lower_bounds))
    }

    fn integer(&mut self) -> Result<i64, String> {
        let start = self.position;
        if self.peek() == Some(b'-') {
            self.position += 1;
        }
        while self.peek().is_some_and(|byte| byte.is_ascii_digit()) {
            self.position += 1;
        }
        self.text[start..self.position]
            .parse()
            .map_err(|_| self.malformed("expected a bound"))
    }

    /// One `{...}`, at nesting `depth` (1 for the outermost).
    fn level(&mut self, depth: usize, visitor: &mut impl ArrayVisitor) -> Result<(), String> {
        if depth > MAX_DIMENSIONS {
            return Err(self.malformed("more than 6 dimensions"));
        }
        self.deepest = self.deepest.max(depth);
        self.expect(b'{')?;
        visitor.open();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.position += 1;
            visitor.close();
            return Ok(());
        }
        loop {
            if self.peek() == Some(b'{') {
                self.level(depth + 1, visitor)?;
            } else {
                let element = self.element()?;
                visitor.element(element.map(|element| element.text(self.text, self.scratch)))?;
            }
            self.skip_whitespace();
            match self.peek() {
                Some(b'}') => {
                    self.position += 1;
                    visitor.close();
                    return Ok(());
                }
                Some(byte) if byte == self.delimiter => {
                    self.position += 1;
                    visitor.separator();
                    self.skip_whitespace();
                }
                _ => return Err(self.malformed("expected a delimiter or '}'")),
            }
        }
    }

    /// One element, quoted or not; `None` for an unquoted NULL.
    fn element(&mut self) -> Result<Option<Element>, String> {
        if self.peek() == Some(b'"') {
            self.position += 1;
            return self.quoted().map(Some);
        }
        let start = self.position;
        let mut escaped = false;
        // Where the element ends once trailing whitespace is dropped:
        // whitespace a backslash escaped stays.
        let mut kept_end = start;
        loop {
            match self.peek() {
                None => return Err(self.malformed("the literal ends inside an element")),
                Some(b'}') => break,
                Some(byte) if byte == self.delimiter => break,
                Some(b'"' | b'{') => {
                    return Err(self.malformed("a quote or brace inside an unquoted element"));
                }
                Some(b'\\') => {
                    if !escaped {
                        escaped = true;
                        self.scratch.clear();
                        kept_end = start;
                    }
                    // Whitespace before an escaped character is not trailing.
                    self.scratch.push_str(&self.text[kept_end..self.position]);
                    self.position += 1;
                    let character = self.escaped_character()?;
                    self.scratch.push(character);
                    kept_end = self.position;
                }
                Some(byte) => {
                    self.position += if byte.is_ascii() {
                        1
                    } else {
                        self.text[self.position..]
                            .chars()
                            .next()
                            .map_or(1, char::len_utf8)
                    };
                    if !is_array_whitespace(byte) {
                        if escaped {
                            let pending = &self.text[kept_end..self.position];
                            self.scratch.push_str(pending);
                        }
                        kept_end = self.position;
                    }
                }
            }
        }
        if escaped {
            return Ok(Some(Element::Scratch));
        }
        let element = &self.text[start..kept_end];
        if element.is_empty() {
            return Err(self.malformed("an empty unquoted element"));
        }
        if element.eq_ignore_ascii_case("NULL") {
            return Ok(None);
        }
        Ok(Some(Element::Borrowed(start, kept_end)))
    }

    /// The rest of a quoted element, after its opening quote.
    fn quoted(&mut self) -> Result<Element, String> {
        let start = self.position;
        let mut escaped = false;
        let mut run_start = start;
        loop {
            match self.peek() {
                None => return Err(self.malformed("the literal ends inside a quoted element")),
                Some(b'"') => {
                    let end = self.position;
                    self.position += 1;
                    if !escaped {
                        return Ok(Element::Borrowed(start, end));
                    }
                    self.scratch.push_str(&self.text[run_start..end]);
                    return Ok(Element::Scratch);
                }
                Some(b'\\') => {
                    if !escaped {
                        escaped = true;
                        self.scratch.clear();
                    }
                    self.scratch.push_str(&self.text[run_start..self.position]);
                    self.position += 1;
                    let character = self.escaped_character()?;
                    self.scratch.push(character);
                    run_start = self.position;
                }
                Some(_) => self.position += 1,
            }
        }
    }

    /// The character after a backslash, taken as it is.
    fn escaped_character(&mut self) -> Result<char, String> {
        let character = self.text[self.position..]
            .chars()
            .next()
            .ok_or_else(|| self.malformed("the literal ends after a backslash"))?;
        self.position += character.len_utf8();
        Ok(character)
    }
}

/// Where an element's text is: in the literal, or in the scratch buffer.
enum Element {
    Borrowed(usize, usize),
    Scratch,
}

impl Element {
    fn text<'a>(&self, literal: &'a str, scratch: &'a str) -> &'a str {
        match *self {
            Element::Borrowed(start, end) => &literal[start..end],
            Element::Scratch => scratch,
        }
    }
}

/// `array_isspace`: what `array_in` skips around elements.
fn is_array_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Appends one element's text form, quoted exactly when `array_out` quotes
/// it: empty, `NULL` in any case, or holding a brace, a quote, a backslash,
/// the delimiter or whitespace; inside quotes `"` and `\` get a backslash.
pub(super) fn write_element(text: &str, delimiter: u8, out: &mut String) {
    let needs_quotes = text.is_empty()
        || text.eq_ignore_ascii_case("NULL")
        || text.bytes().any(|byte| {
            matches!(byte, b'{' | b'}' | b'"' | b'\\')
                || byte == delimiter
                || is_array_whitespace(byte)
        });
    if !needs_quotes {
        out.push_str(text);
        return;
    }
    out.push('"');
    let mut run_start = 0;
    for (index, byte) in text.bytes().enumerate() {
        if byte == b'"' || byte == b'\\' {
            out.push_str(&text[run_start..index]);
            out.push('\\');
            run_start = index;
        }
    }
    out.push_str(&text[run_start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The literal as a readable trace: `[lower bounds]`, `{`, `}`, `,`,
    /// `<element>` and `NULL`.
    #[derive(Default)]
    struct Trace(String);

    impl ArrayVisitor for Trace {
        fn lower_bounds(&mut self, lower_bounds: &[i64]) {
            self.0.push_str(&format!("{lower_bounds:?}"));
        }
        fn open(&mut self) {
            self.0.push('{');
        }
        fn close(&mut self) {
            self.0.push('}');
        }
        fn separator(&mut self) {
            self.0.push(',');
        }
        fn element(&mut self, text: Option<&str>) -> Result<(), String> {
            match text {
                Some(text) => self.0.push_str(&format!("<{text}>")),
                None => self.0.push_str("NULL"),
            }
            Ok(())
        }
    }

    fn try_trace(literal: &str, delimiter: u8) -> Result<String, String> {
        let mut trace = Trace::default();
        parse(literal, delimiter, &mut String::new(), &mut trace)?;
        Ok(trace.0)
    }

    fn trace(literal: &str, delimiter: u8) -> String {
        try_trace(literal, delimiter).unwrap_or_else(|error| panic!("{literal:?}: {error}"))
    }

    #[test]
    fn what_array_out_prints() {
        assert_eq!(trace("{}", b','), "{}");
        assert_eq!(trace("{1,2,3}", b','), "{<1>,<2>,<3>}");
        assert_eq!(
            trace("{{1,NULL},{null,4}}", b','),
            "{{<1>,NULL},{NULL,<4>}}"
        );
        assert_eq!(
            trace(r#"{"","NULL","a b","x\"y\\z","{}",é}"#, b','),
            r#"{<>,<NULL>,<a b>,<x"y\z>,<{}>,<é>}"#
        );
        assert_eq!(trace("[0:1]={a,b}", b','), "[0]{<a>,<b>}");
        assert_eq!(
            trace("[-2:-1][1:2]={{a,b},{c,d}}", b','),
            "[-2, 1]{{<a>,<b>},{<c>,<d>}}"
        );
        assert_eq!(
            trace("{(1,1),(0,0);(2,2),(1,1)}", b';'),
            "{<(1,1),(0,0)>,<(2,2),(1,1)>}"
        );
    }

    #[test]
    fn what_array_in_also_reads() {
        assert_eq!(
            trace(" { a , \"b\" , c\\ d\\  } ", b','),
            "{<a>,<b>,<c d >}"
        );
        assert_eq!(trace(r"{N\ULL,\é}", b','), "{<NULL>,<é>}");
    }

    #[test]
    fn malformed_literals_are_errors() {
        for bad in [
            "",
            "{",
            "{a",
            "{a,}",
            "{,a}",
            "{\"a}",
            "{a\"b}",
            "{a}x",
            "[1:2]{a,b}",
            "[2:1]={a}",
            "[1:1]={{a}}",
            "{{{{{{{1}}}}}}}",
            "{a\\",
        ] {
            assert!(try_trace(bad, b',').is_err(), "{bad:?}");
        }
    }

    fn written(elements: &[&str]) -> String {
        let mut out = String::new();
        for element in elements {
            write_element(element, b',', &mut out);
            out.push(',');
        }
        out
    }

    #[test]
    fn elements_are_quoted_exactly_when_array_out_quotes_them() {
        assert_eq!(written(&["a", "1.5", "é", "(1,2)"]), "a,1.5,é,\"(1,2)\",");
        assert_eq!(
            written(&[
                "", "NULL", "null", "a b", "a\tb", "{", "}", "\"", "\\", "x,y"
            ]),
            r#""","NULL","null","a b","a	b","{","}","\"","\\","x,y","#
        );
        let mut out = String::new();
        write_element("(1,1),(0,0)", b';', &mut out);
        assert_eq!(out, "(1,1),(0,0)");
    }
}

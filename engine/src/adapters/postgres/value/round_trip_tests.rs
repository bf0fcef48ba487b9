//! The codec's promise, checked on generated values: the COPY text
//! PostgreSQL prints, decoded to JSON and encoded again, is the same text,
//! and the JSON in between says the same value to a reader that knows only
//! the rules.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use proptest::prelude::*;
use serde_json::Value;

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

/// Decodes `line` and encodes the JSON again; returns the JSON and the
/// line that came back.
fn round_trip(columns: Vec<Column>, line: &[u8]) -> (Value, Vec<u8>) {
    let mut decoder = RowDecoder::new(columns.clone());
    let mut encoder = RowEncoder::new(columns);
    let mut json = Vec::new();
    decoder
        .decode_line(line, &mut json)
        .unwrap_or_else(|error| panic!("{error}: {:?}", String::from_utf8_lossy(line)));
    let mut back = Vec::new();
    encoder
        .encode_row(&json, &mut back)
        .unwrap_or_else(|error| panic!("{error}: {}", String::from_utf8_lossy(&json)));
    let value = serde_json::from_slice(&json).expect("the decoder wrote valid JSON");
    (value, back)
}

/// One field as `COPY TO` prints it, with the newline.
fn copy_line(text: &str) -> Vec<u8> {
    let mut line = Vec::new();
    escape_field(text.as_bytes(), &mut line);
    line.push(b'\n');
    line
}

/// The JSON text the decoder writes for the one-field `line`, as a reader
/// that parses numbers exactly (not through serde_json's `f64`) sees it.
fn carried_json(pg_type: PgType, line: &str) -> String {
    let mut decoder = RowDecoder::new([column("v", pg_type)]);
    let mut json = Vec::new();
    decoder
        .decode_line(line.as_bytes(), &mut json)
        .expect("a valid line");
    let json = String::from_utf8(json).expect("the decoder writes UTF-8");
    json.strip_prefix("{\"v\":")
        .and_then(|rest| rest.strip_suffix('}'))
        .expect("the object has the one key")
        .to_owned()
}

/// `float8out` / `float4out` with `extra_float_digits > 0`: the shortest
/// digits, in plain notation for exponents -4..15, else `d.ddde+XX`.
fn postgres_float(digits_and_exponent: String) -> String {
    let (mantissa, exponent) = digits_and_exponent
        .split_once('e')
        .expect("{:e} has an exponent");
    let exponent: i32 = exponent.parse().expect("{:e} has an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(unsigned) => ("-", unsigned),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if digits == "0" {
        return format!("{sign}0");
    }
    if (-4..15).contains(&exponent) {
        let point = exponent + 1;
        if point <= 0 {
            return format!("{sign}0.{}{digits}", "0".repeat((-point) as usize));
        }
        let point = point as usize;
        if digits.len() <= point {
            return format!("{sign}{digits}{}", "0".repeat(point - digits.len()));
        }
        return format!("{sign}{}.{}", &digits[..point], &digits[point..]);
    }
    let fraction = if digits.len() > 1 {
        format!(".{}", &digits[1..])
    } else {
        String::new()
    };
    let exponent_sign = if exponent < 0 { '-' } else { '+' };
    format!(
        "{sign}{}{fraction}e{exponent_sign}{:02}",
        &digits[..1],
        exponent.abs()
    )
}

fn postgres_float8(value: f64) -> String {
    match value {
        _ if value.is_nan() => "NaN".to_owned(),
        f64::INFINITY => "Infinity".to_owned(),
        f64::NEG_INFINITY => "-Infinity".to_owned(),
        _ => postgres_float(format!("{value:e}")),
    }
}

fn postgres_float4(value: f32) -> String {
    match value {
        _ if value.is_nan() => "NaN".to_owned(),
        f32::INFINITY => "Infinity".to_owned(),
        f32::NEG_INFINITY => "-Infinity".to_owned(),
        _ => postgres_float(format!("{value:e}")),
    }
}

#[test]
fn the_float_helper_prints_as_postgresql_does() {
    assert_eq!(postgres_float8(1e-300), "1e-300");
    assert_eq!(postgres_float8(1e20), "1e+20");
    assert_eq!(postgres_float8(1e-5), "1e-05");
    assert_eq!(postgres_float8(0.0001), "0.0001");
    assert_eq!(postgres_float8(123456789012345.0), "123456789012345");
    assert_eq!(postgres_float8(1234567890123456.0), "1.234567890123456e+15");
    assert_eq!(postgres_float8(0.1), "0.1");
    assert_eq!(postgres_float8(-0.0), "-0");
    assert_eq!(postgres_float8(1.5), "1.5");
    assert_eq!(postgres_float4(3.4028235e38), "3.4028235e+38");
}

/// `array_out`'s quoting, from its description in the PostgreSQL docs
/// rather than from the code under test.
fn array_out(elements: &[Option<String>]) -> String {
    let mut literal = String::from("{");
    for (index, element) in elements.iter().enumerate() {
        if index > 0 {
            literal.push(',');
        }
        let Some(element) = element else {
            literal.push_str("NULL");
            continue;
        };
        let quoted = element.is_empty()
            || element.eq_ignore_ascii_case("null")
            || element
                .chars()
                .any(|character| "{}\",\\ \t\n\r\x0b\x0c".contains(character));
        if !quoted {
            literal.push_str(element);
            continue;
        }
        literal.push('"');
        for character in element.chars() {
            if character == '"' || character == '\\' {
                literal.push('\\');
            }
            literal.push(character);
        }
        literal.push('"');
    }
    literal.push('}');
    literal
}

/// Text PostgreSQL can hold: anything but NUL, weighted towards what COPY
/// and array literals must escape.
fn postgres_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[^\u{0}]*",
        "[a\\\\\t\n\r\u{8}\u{b}\u{c}\"{}, NUL\u{1}é😀]{0,12}",
        Just("NULL".to_owned()),
        Just("\\N".to_owned()),
    ]
}

proptest! {
    #[test]
    fn text_round_trips(text in postgres_text()) {
        let (json, back) = round_trip(vec![column("t", PgType::Text)], &copy_line(&text));
        prop_assert_eq!(&json["t"], &Value::String(text.clone()));
        prop_assert_eq!(back, copy_line(&text));
    }

    #[test]
    fn integers_round_trip(value: i64, small: i16) {
        let line = format!("{value}\t{small}\n");
        let (json, back) = round_trip(
            vec![column("a", PgType::Int8), column("b", PgType::Int2)],
            line.as_bytes(),
        );
        prop_assert_eq!(json["a"].as_i64(), Some(value));
        prop_assert_eq!(json["b"].as_i64(), Some(i64::from(small)));
        prop_assert_eq!(back, line.into_bytes());
    }

    #[test]
    fn float8_round_trips_to_the_same_float(bits: u64) {
        let value = f64::from_bits(bits);
        let text = postgres_float8(value);
        let line = format!("{text}\n");
        let (_, back) = round_trip(vec![column("f", PgType::Float8)], line.as_bytes());
        prop_assert_eq!(String::from_utf8(back).expect("COPY text is UTF-8"), line.clone());
        let carried = carried_json(PgType::Float8, &line);
        if value.is_finite() {
            prop_assert_eq!(carried.parse::<f64>().expect("a finite float is carried as a number").to_bits(), value.to_bits());
        } else {
            prop_assert_eq!(carried, format!("\"{text}\""));
        }
    }

    #[test]
    fn float4_round_trips_to_the_same_float(bits: u32) {
        let value = f32::from_bits(bits);
        let line = format!("{}\n", postgres_float4(value));
        let (_, back) = round_trip(vec![column("f", PgType::Float4)], line.as_bytes());
        prop_assert_eq!(String::from_utf8(back).expect("COPY text is UTF-8"), line.clone());
        if value.is_finite() {
            let carried = carried_json(PgType::Float4, &line).parse::<f32>().expect("a finite float is carried as a number");
            prop_assert_eq!(carried.to_bits(), value.to_bits());
        }
    }

    #[test]
    fn bytea_round_trips(bytes: Vec<u8>) {
        let line = format!("\\\\x{}\n", hex::encode(&bytes));
        let (json, back) = round_trip(vec![column("b", PgType::Bytea)], line.as_bytes());
        let carried = BASE64_STANDARD
            .decode(json["b"].as_str().expect("bytea is a string"))
            .expect("bytea is base64");
        prop_assert_eq!(carried, bytes);
        prop_assert_eq!(String::from_utf8(back).expect("COPY text is UTF-8"), line);
    }

    #[test]
    fn arrays_of_text_round_trip(elements in prop::collection::vec(prop::option::of(postgres_text()), 0..6)) {
        let line = copy_line(&array_out(&elements));
        let (json, back) = round_trip(vec![column("a", array_of(PgType::Text))], &line);
        let expected: Vec<Value> = elements
            .iter()
            .map(|element| element.clone().map_or(Value::Null, Value::String))
            .collect();
        prop_assert_eq!(&json["a"], &Value::Array(expected));
        prop_assert_eq!(back, line);
    }

    #[test]
    fn two_dimensional_arrays_of_text_round_trip(
        rows in (1..4usize).prop_flat_map(|width| {
            prop::collection::vec(
                prop::collection::vec(prop::option::of(postgres_text()), width),
                1..4,
            )
        })
    ) {
        let inner: Vec<String> = rows.iter().map(|row| array_out(row)).collect();
        let literal = format!("{{{}}}", inner.join(","));
        let line = copy_line(&literal);
        let (json, back) = round_trip(vec![column("a", array_of(PgType::Text))], &line);
        let expected = Value::Array(
            rows.iter()
                .map(|row| {
                    Value::Array(
                        row.iter()
                            .map(|element| element.clone().map_or(Value::Null, Value::String))
                            .collect(),
                    )
                })
                .collect(),
        );
        prop_assert_eq!(&json["a"], &expected);
        prop_assert_eq!(back, line);
    }

    #[test]
    fn timestamps_round_trip(
        year in 1..300_000i64,
        before_christ: bool,
        month in 1..=12u32,
        day in 1..=28u32,
        seconds_of_day in 0..86_400u32,
        fraction in prop::option::of("[0-9]{0,5}[1-9]"),
    ) {
        let year = if before_christ { year.min(4713) } else { year };
        let clock = format!(
            "{:02}:{:02}:{:02}{}",
            seconds_of_day / 3600,
            seconds_of_day / 60 % 60,
            seconds_of_day % 60,
            fraction.map(|digits| format!(".{digits}")).unwrap_or_default()
        );
        let era = if before_christ { " BC" } else { "" };
        let date = format!("{year:04}-{month:02}-{day:02}");
        let line = format!("{date} {clock}+00{era}\t{date} {clock}{era}\t{date}{era}\n");
        let (json, back) = round_trip(
            vec![
                column("with_zone", PgType::Timestamptz),
                column("without_zone", PgType::Timestamp),
                column("day", PgType::Date),
            ],
            line.as_bytes(),
        );
        prop_assert_eq!(String::from_utf8(back).expect("COPY text is UTF-8"), line);
        let carried = json["day"].as_str().expect("a date is a string");
        let carried_year: i64 = carried[..carried.len() - 6]
            .parse()
            .expect("a year is a signed integer");
        prop_assert_eq!(carried_year, if before_christ { 1 - year } else { year });
    }

    #[test]
    fn json_values_round_trip_as_themselves(value in json_value()) {
        let text = serde_json::to_string(&value).expect("a Value serializes");
        let line = copy_line(&text);
        let (json, back) = round_trip(vec![column("j", PgType::Jsonb)], &line);
        let looks_like_the_wrapper = value
            .as_object()
            .is_some_and(|object| object.len() == 1 && object.get("$json").is_some_and(Value::is_string));
        if value.is_null() || looks_like_the_wrapper {
            prop_assert_eq!(&json["j"], &serde_json::json!({"$json": text}));
        } else {
            prop_assert_eq!(&json["j"], &value);
        }
        prop_assert_eq!(back, line);
    }

    #[test]
    fn rows_of_mixed_columns_round_trip(
        id: i64,
        name in prop::option::of(postgres_text()),
        payload in prop::option::of(any::<Vec<u8>>()),
        tags in prop::option::of(prop::collection::vec(prop::option::of(postgres_text()), 0..4)),
    ) {
        let mut line = format!("{id}\t").into_bytes();
        match &name {
            Some(name) => escape_field(name.as_bytes(), &mut line),
            None => line.extend_from_slice(NULL_FIELD),
        }
        line.push(b'\t');
        match &payload {
            Some(payload) => line.extend_from_slice(format!("\\\\x{}", hex::encode(payload)).as_bytes()),
            None => line.extend_from_slice(NULL_FIELD),
        }
        line.push(b'\t');
        match &tags {
            Some(tags) => escape_field(array_out(tags).as_bytes(), &mut line),
            None => line.extend_from_slice(NULL_FIELD),
        }
        line.push(b'\n');
        let (json, back) = round_trip(
            vec![
                column("id", PgType::Int8),
                column("name", PgType::Text),
                column("payload", PgType::Bytea),
                column("tags", array_of(PgType::Text)),
            ],
            &line,
        );
        prop_assert_eq!(json["name"].is_null(), name.is_none());
        prop_assert_eq!(back, line);
    }
}

/// JSON values as jsonb prints them would be too narrow a test of the
/// codec, which must carry any JSON text: serde_json's spelling is enough.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "[^\u{0}]{0,8}".prop_map(Value::String),
        Just(serde_json::json!({"$json": "x"})),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z$]{0,5}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

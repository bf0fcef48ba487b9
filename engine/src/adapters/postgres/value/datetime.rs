//! `date`, `timestamp` and `timestamptz` between PostgreSQL's ISO text
//! (`DateStyle = ISO`, `TimeZone = UTC`) and ISO 8601 / RFC 3339 in JSON.
//!
//! PostgreSQL writes the years before 1 AD with a ` BC` suffix
//! (`0044-03-15 BC`); JSON gets ISO 8601's astronomical year numbering
//! instead, signed when outside 0000..=9999: 1 BC is `0000`, 44 BC is
//! `-0043`, and 10000 AD is `+10000`. The fraction of a second keeps the
//! digits PostgreSQL printed (it drops trailing zeros), so the round trip
//! gives back the same text.

/// Which of the three types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DateTimeKind {
    Date,
    Timestamp,
    Timestamptz,
}

/// Appends the JSON string for PostgreSQL's text `text` of `kind`.
pub(super) fn to_json(kind: DateTimeKind, text: &str, out: &mut Vec<u8>) -> Result<(), String> {
    if text == "infinity" || text == "-infinity" {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
        return Ok(());
    }
    let not_iso = || {
        format!(
            "not a {} in PostgreSQL's ISO form (is the session's DateStyle ISO?)",
            kind.name()
        )
    };
    let (body, before_christ) = match text.strip_suffix(" BC") {
        Some(body) => (body, true),
        None => (text, false),
    };
    let (year, rest) = split_year(body).ok_or_else(not_iso)?;
    let year: i64 = year.parse().map_err(|_| not_iso())?;
    let astronomical_year = match (before_christ, year) {
        (_, 0) => return Err(not_iso()),
        (true, year) => 1 - year,
        (false, year) => year,
    };
    let (month_day, time) = rest.split_at_checked(6).ok_or_else(not_iso)?;
    if !matches_pattern(month_day, b"-99-99") {
        return Err(not_iso());
    }
    let time = match kind {
        DateTimeKind::Date if time.is_empty() => None,
        DateTimeKind::Date => return Err(not_iso()),
        DateTimeKind::Timestamp => {
            Some(split_time(time.strip_prefix(' '), "").ok_or_else(not_iso)?)
        }
        DateTimeKind::Timestamptz => {
            let (clock, offset) = split_time(time.strip_prefix(' '), "+").ok_or_else(not_iso)?;
            if offset != "+00" {
                return Err(format!(
                    "has UTC offset {offset}; the session's TimeZone must be UTC"
                ));
            }
            Some((clock, offset))
        }
    };
    out.push(b'"');
    write_astronomical_year(astronomical_year, out);
    out.extend_from_slice(month_day.as_bytes());
    if let Some((clock, _)) = time {
        out.push(b'T');
        out.extend_from_slice(clock.as_bytes());
        if kind == DateTimeKind::Timestamptz {
            out.push(b'Z');
        }
    }
    out.push(b'"');
    Ok(())
}

/// Appends PostgreSQL's text for the JSON string `json` of `kind`.
pub(super) fn from_json(kind: DateTimeKind, json: &str, out: &mut String) -> Result<(), String> {
    use std::fmt::Write as _;
    if json == "infinity" || json == "-infinity" {
        out.push_str(json);
        return Ok(());
    }
    let expected = || {
        format!(
            "expected {}, infinity or -infinity",
            match kind {
                DateTimeKind::Date => "YYYY-MM-DD",
                DateTimeKind::Timestamp => "YYYY-MM-DDTHH:MM:SS[.ffffff]",
                DateTimeKind::Timestamptz => "YYYY-MM-DDTHH:MM:SS[.ffffff]Z",
            }
        )
    };
    let (sign, unsigned) = match json.as_bytes().first() {
        Some(b'-') => (-1, &json[1..]),
        Some(b'+') => (1, &json[1..]),
        _ => (1, json),
    };
    let (year, rest) = split_year(unsigned).ok_or_else(expected)?;
    let astronomical_year = sign * year.parse::<i64>().map_err(|_| expected())?;
    let (month_day, time) = rest.split_at_checked(6).ok_or_else(expected)?;
    if !matches_pattern(month_day, b"-99-99") {
        return Err(expected());
    }
    let clock = match kind {
        DateTimeKind::Date if time.is_empty() => None,
        DateTimeKind::Date => return Err(expected()),
        DateTimeKind::Timestamp => Some(
            split_time(time.strip_prefix('T'), "")
                .ok_or_else(expected)?
                .0,
        ),
        DateTimeKind::Timestamptz => {
            let (clock, zone) = split_time(time.strip_prefix('T'), "Z").ok_or_else(expected)?;
            if zone != "Z" {
                return Err(expected());
            }
            Some(clock)
        }
    };
    let before_christ = astronomical_year <= 0;
    let year = if before_christ {
        1 - astronomical_year
    } else {
        astronomical_year
    };
    write!(out, "{year:04}").expect("writing to a String cannot fail");
    out.push_str(month_day);
    if let Some(clock) = clock {
        out.push(' ');
        out.push_str(clock);
        if kind == DateTimeKind::Timestamptz {
            out.push_str("+00");
        }
    }
    if before_christ {
        out.push_str(" BC");
    }
    Ok(())
}

impl DateTimeKind {
    fn name(self) -> &'static str {
        match self {
            DateTimeKind::Date => "date",
            DateTimeKind::Timestamp => "timestamp",
            DateTimeKind::Timestamptz => "timestamptz",
        }
    }
}

/// The year's digits (four to nine of them) and what follows.
fn split_year(text: &str) -> Option<(&str, &str)> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    (4..=9).contains(&digits).then(|| text.split_at(digits))
}

/// `HH:MM:SS` with an optional fraction of one to six digits, then the
/// rest, which must start with `zone_start` (or be empty when that is).
fn split_time<'a>(text: Option<&'a str>, zone_start: &str) -> Option<(&'a str, &'a str)> {
    let text = text?;
    let (whole_seconds, rest) = text.split_at_checked(8)?;
    if !matches_pattern(whole_seconds, b"99:99:99") {
        return None;
    }
    let fraction_digits = match rest.strip_prefix('.') {
        Some(fraction) => {
            let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
            if !(1..=6).contains(&digits) {
                return None;
            }
            1 + digits
        }
        None => 0,
    };
    let (clock, zone) = text.split_at(8 + fraction_digits);
    let zone_ok = if zone_start.is_empty() {
        zone.is_empty()
    } else {
        zone.starts_with(zone_start)
    };
    zone_ok.then_some((clock, zone))
}

/// `pattern` has `9` where `text` must have a digit, and the bytes `text`
/// must have elsewhere.
fn matches_pattern(text: &str, pattern: &[u8]) -> bool {
    text.len() == pattern.len()
        && text.bytes().zip(pattern).all(|(byte, &want)| match want {
            b'9' => byte.is_ascii_digit(),
            want => byte == want,
        })
}

fn write_astronomical_year(year: i64, out: &mut Vec<u8>) {
    use std::io::Write as _;
    match year {
        ..0 => write!(out, "-{:04}", -year),
        0..=9999 => write!(out, "{year:04}"),
        _ => write!(out, "+{year}"),
    }
    .expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(kind: DateTimeKind, text: &str) -> Result<String, String> {
        let mut out = Vec::new();
        to_json(kind, text, &mut out)?;
        Ok(String::from_utf8(out).expect("the JSON is ASCII"))
    }

    fn text(kind: DateTimeKind, json: &str) -> Result<String, String> {
        let mut out = String::new();
        from_json(kind, json, &mut out)?;
        Ok(out)
    }

    /// Each pair is PostgreSQL's text and ferry's JSON string (without
    /// quotes); both directions are checked.
    fn assert_pairs(kind: DateTimeKind, pairs: &[(&str, &str)]) {
        for (postgres, carried) in pairs {
            assert_eq!(
                json(kind, postgres).as_deref(),
                Ok(&*format!("\"{carried}\""))
            );
            assert_eq!(text(kind, carried).as_deref(), Ok(*postgres));
        }
    }

    #[test]
    fn timestamptz_in_utc_with_and_without_fraction_and_outside_the_common_era() {
        assert_pairs(
            DateTimeKind::Timestamptz,
            &[
                ("2024-01-02 03:04:05+00", "2024-01-02T03:04:05Z"),
                (
                    "2024-01-02 03:04:05.123456+00",
                    "2024-01-02T03:04:05.123456Z",
                ),
                ("2024-01-02 03:04:05.12+00", "2024-01-02T03:04:05.12Z"),
                ("0001-01-01 00:00:00+00", "0001-01-01T00:00:00Z"),
                (
                    "0001-12-31 23:59:59.999999+00 BC",
                    "0000-12-31T23:59:59.999999Z",
                ),
                ("0044-03-15 12:00:00+00 BC", "-0043-03-15T12:00:00Z"),
                ("4714-11-24 00:00:00+00 BC", "-4713-11-24T00:00:00Z"),
                ("10000-01-01 00:00:00+00", "+10000-01-01T00:00:00Z"),
                (
                    "294276-12-31 23:59:59.999999+00",
                    "+294276-12-31T23:59:59.999999Z",
                ),
                ("infinity", "infinity"),
                ("-infinity", "-infinity"),
            ],
        );
    }

    #[test]
    fn timestamptz_outside_utc_is_an_error_that_names_the_setting() {
        let error = json(DateTimeKind::Timestamptz, "2024-01-02 03:04:05+02").expect_err("refused");
        assert!(
            error.contains("+02") && error.contains("TimeZone"),
            "{error}"
        );
        let error =
            json(DateTimeKind::Timestamptz, "2024-01-02 03:04:05+05:30").expect_err("refused");
        assert!(error.contains("+05:30"), "{error}");
        let error =
            json(DateTimeKind::Timestamptz, "Tue Jan 02 03:04:05 2024 UTC").expect_err("refused");
        assert!(error.contains("DateStyle"), "{error}");
    }

    #[test]
    fn timestamp_and_date() {
        assert_pairs(
            DateTimeKind::Timestamp,
            &[
                ("2024-01-02 03:04:05", "2024-01-02T03:04:05"),
                ("2024-01-02 03:04:05.5", "2024-01-02T03:04:05.5"),
                ("0044-03-15 00:00:00 BC", "-0043-03-15T00:00:00"),
                ("infinity", "infinity"),
            ],
        );
        assert_pairs(
            DateTimeKind::Date,
            &[
                ("2024-02-29", "2024-02-29"),
                ("0001-01-01 BC", "0000-01-01"),
                ("4714-11-24 BC", "-4713-11-24"),
                ("5874897-12-31", "+5874897-12-31"),
                ("-infinity", "-infinity"),
            ],
        );
    }

    #[test]
    fn malformed_values_are_errors_in_both_directions() {
        for bad in [
            "2024-01-02",
            "2024-01-02 03:04:05+00",
            "24-01-02 03:04:05",
            "2024-1-02 03:04:05",
            "2024-01-02 03:04:05.",
            "2024-01-02 03:04:05.1234567",
            "0000-01-01 00:00:00",
        ] {
            assert!(json(DateTimeKind::Timestamp, bad).is_err(), "{bad}");
        }
        for bad in [
            "2024-01-02T03:04:05",
            "2024-01-02T03:04:05+00:00",
            "2024-01-02 03:04:05Z",
            "2024-01-02T03:04:05.1234567Z",
            "Infinity",
            "",
        ] {
            assert!(text(DateTimeKind::Timestamptz, bad).is_err(), "{bad}");
        }
        assert!(text(DateTimeKind::Date, "2024-01-02T00:00:00").is_err());
    }
}

//! jq filters, compiled once and run on every op by the jaq crates
//! (jaq-core, jaq-std, jaq-json), and the migration that uses them.

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data, unwrap_valr};
use jaq_json::Val;
use regex::bytes::Regex;

use super::op_json::{op_to_val, val_to_op};
use super::{Direction, Migration, MigrationError, printable};
use crate::Op;

type Data = data::JustLut<Val>;

/// One compiled jq filter.
pub struct JqFilter {
    source: String,
    filter: jaq_core::Filter<Data>,
}

impl std::fmt::Debug for JqFilter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("JqFilter")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Where a parse error is, for people: the start of what follows it.
fn near(rest: &str) -> String {
    let snippet: String = rest.chars().take(24).collect();
    if snippet.is_empty() {
        "at the end".to_owned()
    } else {
        format!("near `{snippet}`")
    }
}

impl JqFilter {
    /// Compiles `source` with jq's standard library. The error says what is
    /// wrong and where.
    pub fn compile(source: &str) -> Result<Self, String> {
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let funs = jaq_core::funs::<Data>()
            .chain(jaq_std::funs::<Data>())
            .chain(jaq_json::funs::<Data>());
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let modules = loader
            .load(
                &arena,
                File {
                    code: source,
                    path: (),
                },
            )
            .map_err(|errors| {
                let mut reasons = Vec::new();
                for (_file, error) in errors {
                    match error {
                        jaq_core::load::Error::Io(items) => {
                            for (path, reason) in items {
                                reasons.push(format!("cannot load {path}: {reason}"));
                            }
                        }
                        jaq_core::load::Error::Lex(items) => {
                            for (expected, rest) in items {
                                reasons.push(format!(
                                    "expected {} {}",
                                    expected.as_str(),
                                    near(rest)
                                ));
                            }
                        }
                        jaq_core::load::Error::Parse(items) => {
                            for (expected, rest) in items {
                                reasons.push(format!(
                                    "expected {} {}",
                                    expected.as_str(),
                                    near(rest)
                                ));
                            }
                        }
                    }
                }
                format!("it does not parse: {}", reasons.join("; "))
            })?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errors| {
                let reasons: Vec<String> = errors
                    .into_iter()
                    .flat_map(|(_file, undefined)| undefined)
                    .map(|(name, kind)| format!("undefined {} `{name}`", kind.as_str()))
                    .collect();
                format!("it does not compile: {}", reasons.join("; "))
            })?;
        Ok(Self {
            source: source.to_owned(),
            filter,
        })
    }

    /// The filter's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Runs the filter on `input`: every output, or the first error.
    pub fn run(&self, input: Val) -> Result<Vec<Val>, String> {
        let context = Ctx::<Data>::new(&self.filter.lut, Vars::new([]));
        self.filter
            .id
            .run((context, input))
            .map(unwrap_valr)
            .map(|result| result.map_err(|error| error.to_string()))
            .collect()
    }
}

/// Which ops a migration takes. Every condition given must hold; an empty
/// match takes every op.
#[derive(Debug, Clone, Default)]
pub struct OpMatch {
    /// The op's kind is one of these (e.g. `etcd.kv`).
    pub kinds: Vec<String>,
    /// The key starts with this.
    pub key_prefix: Option<String>,
    /// The key, as UTF-8 text, matches this regular expression (a key that
    /// is not UTF-8 never matches).
    pub key_regex: Option<Regex>,
}

impl OpMatch {
    /// Whether `op` is taken.
    pub fn matches(&self, op: &Op) -> bool {
        if !self.kinds.is_empty() && !self.kinds.iter().any(|kind| kind.as_bytes() == op.kind) {
            return false;
        }
        if let Some(prefix) = &self.key_prefix
            && !op.key.starts_with(prefix.as_bytes())
        {
            return false;
        }
        if let Some(pattern) = &self.key_regex {
            return std::str::from_utf8(&op.key).is_ok() && pattern.is_match(&op.key);
        }
        true
    }
}

/// A migration whose transforms are jq filters (a migration file).
#[derive(Debug)]
pub struct JqMigration {
    /// `<unix-ms>_<name>`.
    pub id: String,
    /// The older version.
    pub from: String,
    /// The newer version.
    pub to: String,
    /// Which ops it takes (up; and down unless `op_match_down` is set).
    pub op_match: OpMatch,
    /// Which ops it takes down, when that differs (keys in the newer shape).
    pub op_match_down: Option<OpMatch>,
    /// From `from` to `to`.
    pub up: JqFilter,
    /// From `to` back to `from`, when it can.
    pub down: Option<JqFilter>,
}

impl JqMigration {
    fn filter(&self, direction: Direction) -> Option<&JqFilter> {
        match direction {
            Direction::Up => Some(&self.up),
            Direction::Down => self.down.as_ref(),
        }
    }
}

impl Migration for JqMigration {
    fn id(&self) -> &str {
        &self.id
    }

    fn older_version(&self) -> &str {
        &self.from
    }

    fn newer_version(&self) -> &str {
        &self.to
    }

    fn has_down(&self) -> bool {
        self.down.is_some()
    }

    fn matches(&self, direction: Direction, op: &Op) -> bool {
        match (direction, &self.op_match_down) {
            (Direction::Down, Some(op_match)) => op_match.matches(op),
            _ => self.op_match.matches(op),
        }
    }

    fn describe(&self, direction: Direction) -> String {
        self.filter(direction)
            .map_or_else(|| "(none)".to_owned(), |filter| filter.source().to_owned())
    }

    fn apply(&self, direction: Direction, op: Op) -> Result<Vec<Op>, MigrationError> {
        let failed = |reason: String| MigrationError::Transform {
            id: self.id.clone(),
            direction,
            seq: op.seq,
            key: printable(&op.key),
            reason,
            filter: self.describe(direction),
        };
        let filter = self
            .filter(direction)
            .ok_or_else(|| failed("it has no filter for this direction".to_owned()))?;
        let input = op_to_val(&op).map_err(&failed)?;
        let outputs = filter
            .run(input.clone())
            .map_err(|reason| failed(format!("jq error: {reason}")))?;
        outputs
            .iter()
            .map(|output| val_to_op(output, &op, &input).map_err(&failed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn op(key: &str, body: &str) -> Op {
        Op {
            seq: 7,
            key: Bytes::copy_from_slice(key.as_bytes()),
            kind: Bytes::from_static(b"etcd.kv"),
            method: Bytes::from_static(b"Put"),
            body: Bytes::copy_from_slice(body.as_bytes()),
            txn_last: true,
            ..Op::default()
        }
    }

    fn migration(up: &str, down: Option<&str>) -> JqMigration {
        JqMigration {
            id: "1700000000000_test".to_owned(),
            from: "1".to_owned(),
            to: "2".to_owned(),
            op_match: OpMatch::default(),
            op_match_down: None,
            up: JqFilter::compile(up).expect("compiles"),
            down: down.map(|down| JqFilter::compile(down).expect("compiles")),
        }
    }

    #[test]
    fn filters_that_do_not_parse_or_compile_say_why() {
        let error = JqFilter::compile(".key |").expect_err("does not parse");
        assert!(error.contains("does not parse"), "{error}");
        let error = JqFilter::compile("no_such_filter").expect_err("does not compile");
        assert!(
            error.contains("undefined filter `no_such_filter`"),
            "{error}"
        );
    }

    #[test]
    fn exodus_up_then_down_gives_back_the_bytes() {
        let migration = migration(
            r#"if .body | has("baz") then . else .body.baz = .body.foo + (.body.bar | tostring) end"#,
            Some("del(.body.baz)"),
        );
        let original =
            r#"{"_id":"m1","foo":"abc","bar":12,"ratio":1.50,"nested":{"z":1,"a":[1e3,-0.0]}}"#;
        let up = migration
            .apply(Direction::Up, op("/models/m1", original))
            .expect("up");
        assert_eq!(up.len(), 1);
        assert_eq!(
            std::str::from_utf8(&up[0].body).expect("text"),
            r#"{"_id":"m1","foo":"abc","bar":12,"ratio":1.50,"nested":{"z":1,"a":[1e3,-0.0]},"baz":"abc12"}"#
        );
        let down = migration
            .apply(Direction::Down, up[0].clone())
            .expect("down");
        assert_eq!(std::str::from_utf8(&down[0].body).expect("text"), original);
    }

    #[test]
    fn empty_drops_and_errors_name_the_op_and_filter() {
        let migration = migration("empty", Some(".body.x.y"));
        assert!(
            migration
                .apply(Direction::Up, op("/a", "{}"))
                .expect("runs")
                .is_empty()
        );
        let error = migration
            .apply(Direction::Down, op("/a", r#"{"x":"text"}"#))
            .expect_err("cannot index a string");
        let message = error.to_string();
        for part in ["1700000000000_test", "seq 7", "/a", ".body.x.y", "down"] {
            assert!(message.contains(part), "{part} missing from: {message}");
        }
    }

    #[test]
    fn matches_take_kind_prefix_and_pattern() {
        let op_match = OpMatch {
            kinds: vec!["etcd.kv".to_owned()],
            key_prefix: Some("/v3/".to_owned()),
            key_regex: Some(Regex::new("^/v3/pipelines/").expect("regex")),
        };
        assert!(op_match.matches(&op("/v3/pipelines/a", "")));
        assert!(!op_match.matches(&op("/v3/runs/a", "")));
        assert!(!op_match.matches(&op("/v4/pipelines/a", "")));
        let mut lease = op("/v3/pipelines/a", "");
        lease.kind = Bytes::from_static(b"etcd.lease");
        assert!(!op_match.matches(&lease));
    }
}

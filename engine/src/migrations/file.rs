//! A migration file, written by hand: TOML, one migration per file, named
//! `<id>.toml`.
//!
//! ```toml
//! format_version = 1                 # optional; this ferry reads 1
//! id = "1700000000000_lowercase"     # optional; else the file name
//! from = "v3"
//! to = "v4"
//! description = "names are lowercase in v4"
//! # jq filters over one op (see `op_json`): `empty` drops it
//! up = '.key |= ascii_downcase'
//! down = '.'                         # optional; without it, no way down
//!
//! [match]                            # optional; every op when left out
//! kind = "etcd.kv"                   # or kinds = ["etcd.kv", ...]
//! key_prefix = "/v3/"
//! key_regex = "^/v3/(pipelines|runs)/"
//!
//! [match_down]                       # optional; `[match]` when left out
//! key_prefix = "/v4/"                # down, ops are in the newer shape
//! ```
//!
//! Unknown fields are refused: a misspelt `dwon` is an error, not a
//! migration that silently has no way down.

use std::path::Path;

use regex::bytes::Regex;
use serde::{Deserialize, Serialize};

use super::MigrationError;
use super::jq::{JqFilter, JqMigration, OpMatch};

/// The migration file format this build writes, and the newest it reads.
pub const MIGRATION_FORMAT_VERSION: u32 = 1;

/// A migration file as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationFile {
    /// The file format; a newer one is refused, not misread.
    #[serde(default = "format_one")]
    pub format_version: u32,
    /// `<unix-ms>_<name>`; the file's name without `.toml` when left out.
    #[serde(default)]
    pub id: Option<String>,
    /// The older version.
    pub from: String,
    /// The newer version.
    pub to: String,
    /// What it does, for people.
    #[serde(default)]
    pub description: Option<String>,
    /// The jq filter from `from` to `to`.
    pub up: String,
    /// The jq filter from `to` back to `from`, when there is one.
    #[serde(default)]
    pub down: Option<String>,
    /// Which ops the filters see; the others pass untouched.
    #[serde(default, rename = "match")]
    pub op_match: MatchFile,
    /// Which ops `down` sees, when not the same as `[match]` (their keys
    /// are in the newer version's shape).
    #[serde(default)]
    pub match_down: Option<MatchFile>,
}

fn format_one() -> u32 {
    1
}

/// The `[match]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    /// One op kind.
    #[serde(default)]
    pub kind: Option<String>,
    /// Several op kinds.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// A key prefix.
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// A regular expression the key must match (Rust `regex` syntax).
    #[serde(default)]
    pub key_regex: Option<String>,
}

impl MatchFile {
    fn compile(&self, table: &str) -> Result<OpMatch, String> {
        let mut kinds = self.kinds.clone();
        kinds.extend(self.kind.clone());
        let key_regex = self
            .key_regex
            .as_deref()
            .map(|pattern| {
                Regex::new(pattern).map_err(|error| format!("[{table}] key_regex: {error}"))
            })
            .transpose()?;
        Ok(OpMatch {
            kinds,
            key_prefix: self.key_prefix.clone(),
            key_regex,
        })
    }
}

/// Whether `id` is `<unix-ms>_<name>`: digits, `_`, then letters, digits,
/// `_` or `-`.
pub fn is_valid_id(id: &str) -> bool {
    let Some((millis, name)) = id.split_once('_') else {
        return false;
    };
    !millis.is_empty()
        && millis.bytes().all(|byte| byte.is_ascii_digit())
        && !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

impl MigrationFile {
    /// Parses a migration file's text; `path` is for messages and names
    /// the migration when the file has no `id`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, MigrationError> {
        let invalid = |reason: String| MigrationError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let mut file: MigrationFile =
            toml::from_str(text).map_err(|error| invalid(error.to_string()))?;
        if file.format_version == 0 || file.format_version > MIGRATION_FORMAT_VERSION {
            return Err(invalid(format!(
                "format_version {} is not one this ferry reads (up to {MIGRATION_FORMAT_VERSION}); use a newer ferry",
                file.format_version
            )));
        }
        let stem = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .unwrap_or_default()
            .to_owned();
        let id = file.id.clone().unwrap_or_else(|| stem.clone());
        if !is_valid_id(&id) {
            return Err(invalid(format!(
                "the id {id:?} is not <unix-ms>_<name> (e.g. 1700000000000_lowercase_names)"
            )));
        }
        if id != stem {
            return Err(invalid(format!(
                "the id {id:?} is not the file's name; name the file {id}.toml"
            )));
        }
        if file.from == file.to {
            return Err(invalid(format!(
                "`from` and `to` are both {:?}; a migration moves between two versions",
                file.from
            )));
        }
        file.id = Some(id);
        Ok(file)
    }

    /// Reads and parses the file at `path`.
    pub fn read(path: &Path) -> Result<Self, MigrationError> {
        let text = std::fs::read_to_string(path).map_err(|error| MigrationError::Read {
            path: path.display().to_string(),
            reason: error.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// The id (set by [`MigrationFile::parse`]).
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    /// Compiles the filters and the match; `path` is for messages.
    pub fn compile(&self, path: &Path) -> Result<JqMigration, MigrationError> {
        let invalid = |reason: String| MigrationError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let up = JqFilter::compile(&self.up)
            .map_err(|reason| invalid(format!("the `up` filter: {reason}")))?;
        let down = self
            .down
            .as_deref()
            .map(|down| {
                JqFilter::compile(down)
                    .map_err(|reason| invalid(format!("the `down` filter: {reason}")))
            })
            .transpose()?;
        let op_match_down = self
            .match_down
            .as_ref()
            .map(|table| table.compile("match_down").map_err(&invalid))
            .transpose()?;
        if op_match_down.is_some() && self.down.is_none() {
            return Err(invalid(
                "[match_down] is set but there is no `down` filter".to_owned(),
            ));
        }
        Ok(JqMigration {
            id: self.id().to_owned(),
            from: self.from.clone(),
            to: self.to.clone(),
            op_match: self.op_match.compile("match").map_err(&invalid)?,
            op_match_down,
            up,
            down,
        })
    }
}

/// The text of a new migration file, as `ferry migrations new` writes it.
pub fn template(id: &str, from: &str, to: &str) -> String {
    format!(
        r#"# A ferry migration: ops go from version {from:?} to {to:?} through `up`, and
# back through `down`. Each filter is jq (run by jaq), given one op as
#   {{"seq": 12, "key": "...", "kind": "etcd.kv", "method": "Put",
#    "content_type": "", "platform_version": "{from}", "deps": [],
#    "body": <the body, parsed, when it is JSON>
#    or "body_text": "<the body, when it is text but not JSON>"}}
# and giving back the op (fields left out keep their values), several ops,
# or `empty` to drop it. Only ops the [match] takes are given to the filters.
format_version = {MIGRATION_FORMAT_VERSION}
id = "{id}"
from = "{from}"
to = "{to}"
description = "TODO: what changes between {from} and {to}"

# TODO: the change, e.g. '.body.baz = .body.foo + (.body.bar | tostring)'
up = '.'
# TODO: the change undone, e.g. 'del(.body.baz)'; remove the line if there is no way back
down = '.'

[match]
# kind = "etcd.kv"
# key_prefix = "/app/"
# key_regex = "^/app/models/[^/]+$"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_millis_then_a_name() {
        assert!(is_valid_id("1646728080972_foo"));
        assert!(is_valid_id("1_a-b_c"));
        assert!(!is_valid_id("foo"));
        assert!(!is_valid_id("_foo"));
        assert!(!is_valid_id("12x_foo"));
        assert!(!is_valid_id("12_"));
        assert!(!is_valid_id("12_a b"));
    }

    #[test]
    fn the_template_parses_and_compiles() {
        let path = Path::new("1700000000000_new.toml");
        let file = MigrationFile::parse(path, &template("1700000000000_new", "1", "2"))
            .expect("the template parses");
        assert_eq!(file.id(), "1700000000000_new");
        file.compile(path).expect("the template compiles");
    }

    #[test]
    fn misspelt_fields_and_newer_formats_are_refused() {
        let path = Path::new("1_a.toml");
        let error = MigrationFile::parse(path, "from='1'\nto='2'\nup='.'\ndwon='.'\n")
            .expect_err("unknown field");
        assert!(error.to_string().contains("dwon"), "{error}");
        assert!(
            MigrationFile::parse(path, "format_version=2\nfrom='1'\nto='2'\nup='.'\n").is_err()
        );
        assert!(
            MigrationFile::parse(
                Path::new("2_b.toml"),
                "id='1_a'\nfrom='1'\nto='2'\nup='.'\n"
            )
            .is_err()
        );
    }
}

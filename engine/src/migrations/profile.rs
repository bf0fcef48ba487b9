//! A platform profile: a folder holding `profile.toml` and the migration
//! files it lists.
//!
//! ```toml
//! format_version = 1
//! platform = "mystic"
//! versions = ["v3", "v4"]          # oldest first
//! migrations = [                   # in order; `ferry migrations new` appends
//!   "1700000000000_lowercase_names.toml",
//! ]
//! ```
//!
//! Every migration moves between two adjacent versions of the list. A
//! `.toml` file in the folder that the profile does not list is an error:
//! a migration that exists but never runs is a mistake, not a choice.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::file::{MigrationFile, template};
use super::{Migration, MigrationError};

/// The profile format this build writes, and the newest it reads.
pub const PROFILE_FORMAT_VERSION: u32 = 1;
/// The profile's file in its folder.
pub const PROFILE_FILE: &str = "profile.toml";

/// `profile.toml` as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    /// The file format; a newer one is refused.
    #[serde(default = "format_one")]
    pub format_version: u32,
    /// The platform (e.g. `mystic`): a backup whose source names the same
    /// platform gives its version to the chain.
    pub platform: String,
    /// Its versions, oldest first.
    pub versions: Vec<String>,
    /// The migration files, in order.
    #[serde(default)]
    pub migrations: Vec<String>,
}

fn format_one() -> u32 {
    1
}

/// A loaded profile: its versions and its migrations, compiled.
#[derive(Clone)]
pub struct Profile {
    /// The folder it was read from (empty for one built in code).
    pub dir: PathBuf,
    /// The platform.
    pub platform: String,
    /// Its versions, oldest first.
    pub versions: Vec<String>,
    migrations: Vec<Arc<dyn Migration>>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Profile")
            .field("dir", &self.dir)
            .field("platform", &self.platform)
            .field("versions", &self.versions)
            .field(
                "migrations",
                &self
                    .migrations
                    .iter()
                    .map(|migration| migration.id().to_owned())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn invalid(path: &Path, reason: String) -> MigrationError {
    MigrationError::Invalid {
        path: path.display().to_string(),
        reason,
    }
}

fn read_profile_file(dir: &Path) -> Result<(PathBuf, String, ProfileFile), MigrationError> {
    let path = dir.join(PROFILE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|error| MigrationError::Read {
        path: path.display().to_string(),
        reason: format!("{error}; a profile is a folder with a {PROFILE_FILE}"),
    })?;
    let file: ProfileFile =
        toml::from_str(&text).map_err(|error| invalid(&path, error.to_string()))?;
    if file.format_version == 0 || file.format_version > PROFILE_FORMAT_VERSION {
        return Err(invalid(
            &path,
            format!(
                "format_version {} is not one this ferry reads (up to {PROFILE_FORMAT_VERSION}); use a newer ferry",
                file.format_version
            ),
        ));
    }
    Ok((path, text, file))
}

impl Profile {
    /// A profile with no migrations yet, for migrations written in Rust.
    pub fn new(platform: &str, versions: Vec<String>) -> Self {
        Self {
            dir: PathBuf::new(),
            platform: platform.to_owned(),
            versions,
            migrations: Vec::new(),
        }
    }

    /// Reads the profile in `dir` and compiles every migration it lists.
    pub fn load(dir: &Path) -> Result<Self, MigrationError> {
        let (path, _text, file) = read_profile_file(dir)?;
        if file.versions.len() < 2 {
            return Err(invalid(
                &path,
                "`versions` must list at least two versions, oldest first".to_owned(),
            ));
        }
        for (index, version) in file.versions.iter().enumerate() {
            if version.is_empty() || file.versions[..index].contains(version) {
                return Err(invalid(
                    &path,
                    format!("version {version:?} is empty or listed twice"),
                ));
            }
        }
        let mut profile = Self {
            dir: dir.to_owned(),
            platform: file.platform.clone(),
            versions: file.versions.clone(),
            migrations: Vec::new(),
        };
        for name in &file.migrations {
            let migration_path = dir.join(name);
            let migration = MigrationFile::read(&migration_path)?;
            profile.add_migration(Arc::new(migration.compile(&migration_path)?))?;
        }
        let listed: Vec<&str> = file.migrations.iter().map(String::as_str).collect();
        let entries = std::fs::read_dir(dir).map_err(|error| MigrationError::Read {
            path: dir.display().to_string(),
            reason: error.to_string(),
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".toml") && name != PROFILE_FILE && !listed.contains(&name.as_str()) {
                return Err(invalid(
                    &path,
                    format!(
                        "{name} is in the profile's folder but not in its `migrations` list; add it to the list or move it away"
                    ),
                ));
            }
        }
        Ok(profile)
    }

    /// Adds a migration (one written in Rust, say). It must move between two
    /// adjacent versions and have an id of its own.
    pub fn add_migration(&mut self, migration: Arc<dyn Migration>) -> Result<(), MigrationError> {
        let place = || {
            if self.dir.as_os_str().is_empty() {
                format!("profile {}", self.platform)
            } else {
                self.dir.display().to_string()
            }
        };
        let from = self.version_index(migration.older_version())?;
        let to = self.version_index(migration.newer_version())?;
        if to != from + 1 {
            return Err(MigrationError::Invalid {
                path: place(),
                reason: format!(
                    "migration {} goes from {} to {}, which are not adjacent versions of {:?}; a migration moves one version up",
                    migration.id(),
                    migration.older_version(),
                    migration.newer_version(),
                    self.versions
                ),
            });
        }
        if self
            .migrations
            .iter()
            .any(|known| known.id() == migration.id())
        {
            return Err(MigrationError::Invalid {
                path: place(),
                reason: format!("migration {} is listed twice", migration.id()),
            });
        }
        self.migrations.push(migration);
        Ok(())
    }

    /// Where `version` is in the list of versions.
    pub fn version_index(&self, version: &str) -> Result<usize, MigrationError> {
        self.versions
            .iter()
            .position(|known| known == version)
            .ok_or_else(|| MigrationError::UnknownVersion {
                platform: self.platform.clone(),
                version: version.to_owned(),
                known: self.versions.join(", "),
            })
    }

    /// The newest version.
    pub fn latest_version(&self) -> &str {
        self.versions.last().map_or("", String::as_str)
    }

    /// The oldest version.
    pub fn first_version(&self) -> &str {
        self.versions.first().map_or("", String::as_str)
    }

    /// The migrations from `from` to `to` (adjacent versions), in id order.
    pub fn migrations_between(&self, from: &str, to: &str) -> Vec<Arc<dyn Migration>> {
        let mut found: Vec<Arc<dyn Migration>> = self
            .migrations
            .iter()
            .filter(|migration| {
                migration.older_version() == from && migration.newer_version() == to
            })
            .cloned()
            .collect();
        found.sort_by(|left, right| left.id().cmp(right.id()));
        found
    }

    /// Every migration, as listed.
    pub fn migrations(&self) -> &[Arc<dyn Migration>] {
        &self.migrations
    }
}

/// What `ferry migrations new` made.
#[derive(Debug, Clone)]
pub struct NewMigration {
    /// The migration's id.
    pub id: String,
    /// The file written.
    pub path: PathBuf,
    /// Its `from` version.
    pub from: String,
    /// Its `to` version.
    pub to: String,
}

/// Writes a new migration file from the template into the profile in `dir`
/// and appends it to the profile's list (comments in `profile.toml` kept).
/// `from` and `to` default to the profile's last two versions; `millis` is
/// the id's timestamp (now, for the CLI).
pub fn new_migration(
    dir: &Path,
    name: &str,
    from: Option<&str>,
    to: Option<&str>,
    millis: u128,
) -> Result<NewMigration, MigrationError> {
    let (path, text, file) = read_profile_file(dir)?;
    let id = format!("{millis}_{name}");
    if !super::file::is_valid_id(&id) {
        return Err(invalid(
            &path,
            format!("{name:?} cannot be a migration name: use letters, digits, `_` and `-`"),
        ));
    }
    let count = file.versions.len();
    let default_from = count
        .checked_sub(2)
        .and_then(|index| file.versions.get(index));
    let from = from
        .map(str::to_owned)
        .or_else(|| default_from.cloned())
        .ok_or_else(|| {
            invalid(
                &path,
                "the profile lists fewer than two versions".to_owned(),
            )
        })?;
    let to = match to {
        Some(to) => to.to_owned(),
        None => {
            let index = file
                .versions
                .iter()
                .position(|version| *version == from)
                .ok_or_else(|| {
                    invalid(
                        &path,
                        format!("version {from:?} is not in {:?}", file.versions),
                    )
                })?;
            file.versions.get(index + 1).cloned().ok_or_else(|| {
                invalid(
                    &path,
                    format!("{from:?} is the newest version; add a newer one to `versions` first"),
                )
            })?
        }
    };
    for version in [&from, &to] {
        if !file.versions.contains(version) {
            return Err(invalid(
                &path,
                format!(
                    "version {version:?} is not in {:?}; add it to `versions` first",
                    file.versions
                ),
            ));
        }
    }
    let file_name = format!("{id}.toml");
    let migration_path = dir.join(&file_name);
    let mut document: toml_edit::DocumentMut = text
        .parse()
        .map_err(|error: toml_edit::TomlError| invalid(&path, error.to_string()))?;
    let list = document
        .entry("migrations")
        .or_insert_with(|| toml_edit::value(toml_edit::Array::new()));
    let Some(array) = list.as_array_mut() else {
        return Err(invalid(&path, "`migrations` is not an array".to_owned()));
    };
    array.push(file_name.as_str());
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&migration_path)
        .and_then(|mut created| {
            std::io::Write::write_all(&mut created, template(&id, &from, &to).as_bytes())
        })
        .map_err(|error| MigrationError::Read {
            path: migration_path.display().to_string(),
            reason: format!("cannot create it: {error}"),
        })?;
    std::fs::write(&path, document.to_string()).map_err(|error| MigrationError::Read {
        path: path.display().to_string(),
        reason: format!("cannot write it: {error}"),
    })?;
    Ok(NewMigration {
        id,
        path: migration_path,
        from,
        to,
    })
}

//! What a live migration (`ferry migrate --live`) is told: the agents and
//! gateways of the cutover and its limits ([`MigrateOptions`]), the version
//! migration chain its relay may take the ops through
//! ([`VersionMigrations`]), and where the backup written beside it goes
//! ([`Tee`]).

use std::path::PathBuf;
use std::time::Duration;

use ferry_engine::Op;
use ferry_engine::migrations::MigrationError;
use ferry_engine::migrations::chain::Chain;
use ferry_engine::migrations::profile::Profile;
use ferry_proto::v1::DescribeResponse;
use tokio::sync::mpsc;

use crate::client::ClientOptions;

/// What a live migration needs.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The SourceAgent beside the old plane.
    pub source_agent: String,
    /// The TargetAgent beside the new plane.
    pub target_agent: String,
    /// The admin addresses of every gateway replica in front of the old
    /// plane: all are held, fenced behind and switched together.
    pub gateways: Vec<String>,
    /// Token for the agents and the gateway.
    pub client: ClientOptions,
    /// The longest clients' writes may be held at cutover.
    pub max_pause: Duration,
    /// The cutover starts once the target is at most this many source
    /// positions behind, in the source's unit (its agent's Describe names
    /// it: etcd revisions).
    pub max_lag: u64,
    /// Only keys starting with this (empty: everything).
    pub key_prefix: Vec<u8>,
    /// How long the target may take to catch up before the migration gives
    /// up (nothing is held or fenced while it catches up).
    pub catch_up_timeout: Duration,
    /// How long a broken agent stream is retried without any progress.
    pub reconnect_timeout: Duration,
    /// Follow the live changes at least this long before cutting over (a
    /// soak period, to watch the lag under real load first).
    pub follow_at_least: Duration,
    /// Where the running migration writes its status, for `ferry migrate status`.
    pub status_file: Option<PathBuf>,
    /// A version migration chain every op is taken through on the way.
    pub migrations: Option<VersionMigrations>,
    /// Cutover step 7: before switching, compare a digest of the old plane
    /// at the fenced position with one of the new plane; a difference rolls
    /// back. It reads both planes whole while writes are held, within
    /// `max_pause`. Not with `migrations` (the new plane holds the
    /// transformed keys).
    pub verify: bool,
}

/// `--migrations DIR --to-version V [--from-version V0]` of a live migration.
#[derive(Debug, Clone)]
pub struct VersionMigrations {
    /// The platform profile.
    pub profile: Profile,
    /// The version the ops are written in on the target.
    pub to_version: String,
    /// The version the source's ops are in; else the source agent's
    /// platform version when its platform is the profile's.
    pub from_version: Option<String>,
}

impl VersionMigrations {
    /// The version the source's ops start in: `from_version`, else what the
    /// source agent describes when it stands beside the profile's platform.
    /// (An etcd source agent describes etcd and its server version, which
    /// name no version of a platform kept in etcd.)
    pub fn from_version_of(&self, source: &DescribeResponse) -> Result<String, MigrationError> {
        if let Some(version) = &self.from_version {
            return Ok(version.clone());
        }
        if source.platform == self.profile.platform && !source.platform_version.is_empty() {
            return Ok(source.platform_version.clone());
        }
        Err(MigrationError::NoFromVersion {
            platform: self.profile.platform.clone(),
            reason: format!(
                "the source agent stands beside {} {} and its ops name no version of profile {:?}",
                if source.platform.is_empty() {
                    "a plane"
                } else {
                    &source.platform
                },
                if source.platform_version.is_empty() {
                    "(version unknown)"
                } else {
                    &source.platform_version
                },
                self.profile.platform
            ),
        })
    }

    /// Plans the chain from the source's version to `to_version`: unknown
    /// versions, holes and missing `down` filters are refused here, before
    /// anything is held, fenced or written.
    pub fn plan(&self, source: &DescribeResponse) -> Result<Chain, MigrationError> {
        let from = self.from_version_of(source)?;
        Chain::new(self.profile.clone(), &from, &self.to_version)
    }
}

/// Where the backup written beside a migration goes (`--tee`).
pub struct Tee {
    /// The ops as they are relayed, in seq order; closed at the end.
    pub ops: mpsc::Sender<Vec<Op>>,
}

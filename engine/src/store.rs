//! The backup store: backups as objects under a URL, through `object_store`.
//!
//! ```text
//! <root>/backups/<backup-id>/segments/<first-seq:020>-<last-seq:020>.ops.zst
//! <root>/backups/<backup-id>/started.json   (written first: what `restore --follow` begins from)
//! <root>/backups/<backup-id>/alive.json     (rewritten every 2 s while the extract runs)
//! <root>/backups/<backup-id>/manifest.json  (written last: seals the backup)
//! <root>/backups/<backup-id>/failed.json    (only when the extract stopped on an error)
//! ```
//!
//! URLs: `file:///dir` (or a plain path; the default for one machine),
//! `s3://bucket/prefix` (AWS or any S3-compatible server; credentials,
//! region and endpoint from the `AWS_*` environment variables, plain-HTTP
//! endpoints allowed), `memory://` (unit tests only: it lives as long as the
//! process).

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use time::OffsetDateTime;

use crate::error::ErrorKind;
use crate::manifest::{FailureRecord, Heartbeat, Manifest, ManifestError, StartRecord};
use crate::segment::{SealedSegment, SegmentName};

/// How segments are uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadOptions {
    /// Segments at least this large go up as multipart uploads.
    pub multipart_threshold_bytes: u64,
    /// The size of each part (S3 wants at least 5 MiB but for the last).
    pub part_size_bytes: usize,
    /// Parts of one segment in flight at once.
    pub part_concurrency: usize,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self {
            multipart_threshold_bytes: 16 * 1024 * 1024,
            part_size_bytes: 8 * 1024 * 1024,
            part_concurrency: 4,
        }
    }
}

/// The object store failed or refused. Messages name the object; they never
/// carry an endpoint or a credential of ferry's own making.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL cannot be used.
    #[error("cannot use store {url}: {reason}")]
    BadUrl {
        /// The URL as given (without credentials; none belong in it).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A store operation failed.
    #[error("cannot {action} {path} in {store}: {source}")]
    Operation {
        /// What ferry was doing: `read`, `write`, `list`.
        action: &'static str,
        /// The object or prefix.
        path: String,
        /// The store, as ferry displays it.
        store: String,
        /// What object_store said (boxed: it is large, and errors are rare).
        source: Box<object_store::Error>,
    },
    /// A create-only put found the object already there.
    #[error("{path} already exists in {store}; ferry never overwrites a sealed backup")]
    AlreadyExists {
        /// The object.
        path: String,
        /// The store.
        store: String,
    },
}

impl StoreError {
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            StoreError::BadUrl { .. } => ErrorKind::Usage,
            StoreError::Operation { .. } | StoreError::AlreadyExists { .. } => ErrorKind::Storage,
        }
    }
}

/// A backup's start record, relative to its folder.
const START_RECORD: &str = "started.json";
/// The record of a failed extract, relative to its backup's folder.
const FAILURE_RECORD: &str = "failed.json";
/// A running extract's heartbeat, relative to its backup's folder.
const HEARTBEAT: &str = "alive.json";

/// One backup as listed in a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupListing {
    /// Its id.
    pub backup_id: String,
    /// Its manifest, when it is complete.
    pub manifest: Option<Manifest>,
    /// For an incomplete backup: the segments found and their bytes.
    pub segments_found: u64,
    /// Bytes in the backup's segments (from the manifest, or listed).
    pub bytes_found: u64,
    /// When it was created: the manifest's time, or the oldest object's.
    pub created_at: Option<OffsetDateTime>,
}

impl BackupListing {
    /// Sealed by a manifest, and so restorable.
    pub fn is_complete(&self) -> bool {
        self.manifest.is_some()
    }
}

/// Backups under one root of one object store.
#[derive(Debug, Clone)]
pub struct BackupStore {
    store: Arc<dyn ObjectStore>,
    root: Path,
    display: String,
}

impl BackupStore {
    /// Opens the store a URL names. For `file://`, `create` makes the folder
    /// when it is missing (extract does; restore and inspect do not).
    pub fn open(url: &str, create: bool) -> Result<Self, StoreError> {
        let bad_url = |reason: String| StoreError::BadUrl {
            url: url.to_owned(),
            reason,
        };
        if url == "memory://" || url.starts_with("memory://") {
            return Ok(Self::from_object_store(
                Arc::new(InMemory::new()),
                Path::default(),
                "memory://",
            ));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad_url(
                    "an s3:// URL needs a bucket: s3://BUCKET/PREFIX".to_owned(),
                ));
            }
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            let plain_http = [AmazonS3ConfigKey::Endpoint, AmazonS3ConfigKey::S3Endpoint]
                .iter()
                .filter_map(|key| builder.get_config_value(key))
                .any(|endpoint| endpoint.starts_with("http://"));
            if plain_http {
                // An S3-compatible server on a private network or loopback.
                builder = builder.with_allow_http(true);
            }
            let store = builder
                .build()
                .map_err(|error| bad_url(error.to_string()))?;
            let root = Path::parse(prefix).map_err(|error| bad_url(error.to_string()))?;
            return Ok(Self::from_object_store(
                Arc::new(store),
                root,
                &format!("s3://{bucket}/{prefix}"),
            ));
        }
        let dir = match url.strip_prefix("file://") {
            Some(path) if path.starts_with('/') => std::path::PathBuf::from(path),
            Some(_) => {
                return Err(bad_url(
                    "a file:// URL needs an absolute path: file:///var/backups/ferry".to_owned(),
                ));
            }
            None if url.contains("://") => {
                return Err(bad_url(
                    "unknown scheme; use file:///DIR, s3://BUCKET/PREFIX or memory://".to_owned(),
                ));
            }
            None => std::path::PathBuf::from(url),
        };
        if create {
            std::fs::create_dir_all(&dir)
                .map_err(|error| bad_url(format!("cannot create {}: {error}", dir.display())))?;
        } else if !dir.is_dir() {
            return Err(bad_url(format!("{} is not a folder", dir.display())));
        }
        let store =
            LocalFileSystem::new_with_prefix(&dir).map_err(|error| bad_url(error.to_string()))?;
        let display = format!("file://{}", dir.canonicalize().unwrap_or(dir).display());
        Ok(Self::from_object_store(
            Arc::new(store),
            Path::default(),
            &display,
        ))
    }

    /// Wraps an object store already built (tests, embedding).
    pub fn from_object_store(store: Arc<dyn ObjectStore>, root: Path, display: &str) -> Self {
        Self {
            store,
            root,
            display: display.to_owned(),
        }
    }

    /// The store as shown to people.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// The object store underneath.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn backups_prefix(&self) -> Path {
        self.root.clone().join("backups")
    }

    fn backup_prefix(&self, backup_id: &str) -> Path {
        self.backups_prefix().join(backup_id)
    }

    /// Where a backup's object with relative path `relative` lives.
    pub fn object_path(&self, backup_id: &str, relative: &str) -> Path {
        relative
            .split('/')
            .fold(self.backup_prefix(backup_id), |path, part| path.join(part))
    }

    /// Where a backup's manifest lives.
    pub fn manifest_path(&self, backup_id: &str) -> Path {
        self.object_path(backup_id, "manifest.json")
    }

    fn failed(&self, action: &'static str, path: &Path, source: object_store::Error) -> StoreError {
        StoreError::Operation {
            action,
            path: path.to_string(),
            store: self.display.clone(),
            source: Box::new(source),
        }
    }

    /// Uploads a sealed segment; large ones as multipart uploads.
    pub async fn put_segment(
        &self,
        backup_id: &str,
        segment: &SealedSegment,
        options: UploadOptions,
    ) -> Result<(), StoreError> {
        let path = self.object_path(backup_id, &format!("segments/{}", segment.name.file_name()));
        if segment.len() < options.multipart_threshold_bytes {
            let payload = PutPayload::from_iter([segment.prefix.clone(), segment.payload.clone()]);
            self.store
                .put(&path, payload)
                .await
                .map_err(|error| self.failed("write", &path, error))?;
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|error| self.failed("start a multipart upload of", &path, error))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, options.part_size_bytes);
        for chunk in [&segment.prefix, &segment.payload] {
            let mut rest = chunk.clone();
            while !rest.is_empty() {
                writer
                    .wait_for_capacity(options.part_concurrency)
                    .await
                    .map_err(|error| self.failed("upload a part of", &path, error))?;
                let piece = rest.split_to(rest.len().min(options.part_size_bytes));
                writer.put(piece);
            }
        }
        writer
            .finish()
            .await
            .map_err(|error| self.failed("finish the multipart upload of", &path, error))?;
        Ok(())
    }

    /// Seals a backup: writes its manifest with a create-only put, so a
    /// sealed backup is never overwritten.
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
        self.put_create_only(self.manifest_path(&manifest.backup_id), manifest.to_json())
            .await
    }

    /// Writes `bytes` at `path` unless an object is there already.
    async fn put_create_only(&self, path: Path, bytes: Vec<u8>) -> Result<(), StoreError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(()),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Err(StoreError::AlreadyExists {
                path: path.to_string(),
                store: self.display.clone(),
            }),
            Err(error) => Err(self.failed("write", &path, error)),
        }
    }

    /// Writes a backup's start record (`started.json`), create-only: an
    /// extract writes it before its first segment.
    pub async fn put_start_record(&self, record: &StartRecord) -> Result<(), StoreError> {
        self.put_create_only(
            self.object_path(&record.backup_id, START_RECORD),
            record.to_json(),
        )
        .await
    }

    /// Reads a backup's start record; `Ok(None)` when it has none (not
    /// started yet, or written by a ferry older than `restore --follow`).
    pub async fn get_start_record(
        &self,
        backup_id: &str,
    ) -> Result<Option<StartRecord>, crate::Error> {
        match self.get_object(backup_id, START_RECORD).await? {
            Some(json) => Ok(Some(StartRecord::from_json(backup_id, &json)?)),
            None => Ok(None),
        }
    }

    /// Records that a backup's extract stopped on an error (`failed.json`).
    pub async fn put_failure(&self, record: &FailureRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(record).expect("a failure record always serializes");
        self.put_object(&record.backup_id, FAILURE_RECORD, json)
            .await
    }

    /// Writes a running extract's heartbeat (`alive.json`) over the last.
    pub async fn put_heartbeat(&self, heartbeat: &Heartbeat) -> Result<(), StoreError> {
        let json = serde_json::to_vec(heartbeat).expect("a heartbeat always serializes");
        self.put_object(&heartbeat.backup_id, HEARTBEAT, json).await
    }

    /// Writes object `name` of backup `backup_id`, over any before it.
    async fn put_object(
        &self,
        backup_id: &str,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        let path = self.object_path(backup_id, name);
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|error| self.failed("write", &path, error))?;
        Ok(())
    }

    /// Reads an extract's last heartbeat; `Ok(None)` when it has none (not
    /// beating yet, or written by a ferry older than heartbeats) or one that
    /// does not parse (a follower then waits out its timeout, as without).
    pub async fn get_heartbeat(&self, backup_id: &str) -> Result<Option<Heartbeat>, StoreError> {
        let json = self.get_object(backup_id, HEARTBEAT).await?;
        Ok(json.and_then(|json| serde_json::from_slice(&json).ok()))
    }

    /// Reads the record of a failed extract; `Ok(None)` when there is none.
    pub async fn get_failure(&self, backup_id: &str) -> Result<Option<FailureRecord>, StoreError> {
        let Some(json) = self.get_object(backup_id, FAILURE_RECORD).await? else {
            return Ok(None);
        };
        // A record that does not parse still says the extract failed.
        Ok(Some(serde_json::from_slice(&json).unwrap_or_else(|_| {
            FailureRecord {
                backup_id: backup_id.to_owned(),
                failed_at: OffsetDateTime::UNIX_EPOCH,
                reason: String::from_utf8_lossy(&json).into_owned(),
            }
        })))
    }

    /// The segment objects of a backup whose names sort after `after` (all
    /// of them without it), by name, with their sizes: what a restore that
    /// follows a backup being written lists, so each look costs the new
    /// segments only.
    pub async fn list_segments_after(
        &self,
        backup_id: &str,
        after: Option<&SegmentName>,
    ) -> Result<Vec<(SegmentName, u64)>, StoreError> {
        let prefix = self.object_path(backup_id, "segments");
        let listing = match after {
            Some(after) => self
                .store
                .list_with_offset(Some(&prefix), &prefix.clone().join(after.file_name())),
            None => self.store.list(Some(&prefix)),
        };
        let objects: Vec<_> = listing
            .try_collect()
            .await
            .map_err(|error| self.failed("list", &prefix, error))?;
        let mut segments: Vec<(SegmentName, u64)> = objects
            .iter()
            .filter_map(|meta| {
                let name = SegmentName::parse_file_name(meta.location.filename()?)?;
                Some((name, meta.size))
            })
            .filter(|(name, _)| after.is_none_or(|after| name > after))
            .collect();
        segments.sort();
        Ok(segments)
    }

    /// Reads an object of a backup; `Ok(None)` when it does not exist.
    pub async fn get_object(
        &self,
        backup_id: &str,
        relative: &str,
    ) -> Result<Option<Bytes>, StoreError> {
        let path = self.object_path(backup_id, relative);
        let result = match self.store.get(&path).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(self.failed("read", &path, error)),
        };
        match result.bytes().await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(self.failed("read", &path, error)),
        }
    }

    /// Reads a backup's manifest; `Ok(None)` when it has none (incomplete or
    /// missing).
    pub async fn get_manifest(&self, backup_id: &str) -> Result<Option<Manifest>, crate::Error> {
        let Some(json) = self.get_object(backup_id, "manifest.json").await? else {
            return Ok(None);
        };
        let manifest = Manifest::from_json(backup_id, &json)?;
        if manifest.backup_id != backup_id {
            return Err(ManifestError::Inconsistent {
                backup_id: backup_id.to_owned(),
                segment: "backup_id".to_owned(),
                reason: format!("it names backup {}", manifest.backup_id),
            }
            .into());
        }
        Ok(Some(manifest))
    }

    /// The ids of every backup in the store, complete or not, oldest first
    /// (ids begin with their UTC creation time).
    pub async fn backup_ids(&self) -> Result<Vec<String>, StoreError> {
        let prefix = self.backups_prefix();
        let listing = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|error| self.failed("list", &prefix, error))?;
        let mut ids: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|path| path.filename().map(str::to_owned))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The segment objects stored for a backup, by name, with their sizes.
    pub async fn list_segments(
        &self,
        backup_id: &str,
    ) -> Result<Vec<(SegmentName, u64)>, StoreError> {
        self.list_segments_after(backup_id, None).await
    }

    /// Lists every backup, oldest first, with its manifest when it has one.
    pub async fn list_backups(&self) -> Result<Vec<BackupListing>, crate::Error> {
        let mut listings = Vec::new();
        for backup_id in self.backup_ids().await? {
            listings.push(self.describe(&backup_id).await?);
        }
        Ok(listings)
    }

    /// Lists one backup; a backup id with no object at all is not found.
    pub async fn describe(&self, backup_id: &str) -> Result<BackupListing, crate::Error> {
        if let Some(manifest) = self.get_manifest(backup_id).await? {
            return Ok(BackupListing {
                backup_id: backup_id.to_owned(),
                segments_found: manifest.totals.segments,
                bytes_found: manifest.totals.compressed_bytes,
                created_at: Some(manifest.created_at),
                manifest: Some(manifest),
            });
        }
        let segments = self.list_segments(backup_id).await?;
        Ok(BackupListing {
            backup_id: backup_id.to_owned(),
            manifest: None,
            segments_found: segments.len() as u64,
            bytes_found: segments.iter().map(|(_, size)| size).sum(),
            created_at: crate::backup::created_at_of_id(backup_id),
        })
    }
}

//! The volume catalog: which volumes exist, and the one open handle of each. It owns the
//! `volumes` table of the metadata store (key: the volume's name; value: its [`VolumeInfo`] as
//! JSON), the `volume-intents` table (key: a volume id; value: an [`Intent`] as JSON) and the
//! volume files in its directory (`<id>.img`, format in `local.rs`).
//!
//! Crash safety: `create` records its intent, makes the file (durably), then writes the entry
//! and drops the intent in one transaction; `delete` removes the entry and records its intent
//! in one transaction, then removes the file and drops the intent. So a crash at any point
//! leaves at most a file that no entry but an intent names (an orphan), never an entry without
//! its file. At start, before anything can create a volume, [`Catalog::recover`] finishes
//! what intents record, and moves any other file no entry names into `quarantine/`: such a
//! file is not a crash artifact but a volume whose entry was lost (a missing, damaged or
//! older metadata store), and deleting it would lose the volume. The daemon refuses to start
//! at all when the metadata store is new but volume files exist ([`Catalog::unnamed_files`]).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::cached::{self, CachedVolume};
use super::local::{self, LocalVolume, LocalVolumeError};
use super::{BlockDevice, Mode};
use crate::local::meta::{MetaError, MetaStore};
use crate::local::space::SpaceBudget;
use crate::local::sync_parent_dir;
use crate::seal::Sealer;

const TABLE: &str = "volumes";
const INTENTS: &str = "volume-intents";
/// How long a deleted cached volume's uploader may take to finish the step it is in.
const RETIRE_GRACE: Duration = Duration::from_secs(10);

/// Deleted cached volumes whose bucket objects could not all be deleted yet, by id.
const BUCKET_DELETES: &str = "volume-bucket-deletes";
/// Takeovers a crash cut short, by id (value: the takeover's [`Intent`]): their commit may be
/// in the bucket, so [`Catalog::finish_takeovers`] asks it and finishes them.
const TAKEOVERS: &str = "volume-takeovers";
/// Where files no entry or intent names are moved, inside the volume directory.
pub const QUARANTINE: &str = "quarantine";
const MAX_NAME_LEN: usize = 64;
/// The version of the local volume file format (see `local.rs`) this code writes and reads.
pub const LOCAL_FORMAT: u32 = 1;

/// One volume, as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    /// Random, never reused: names the file and derives the key, so a volume deleted and
    /// created again under the same name gets a new file and a new key.
    pub id: String,
    pub size: u64,
    pub mode: Mode,
    pub read_only: bool,
    /// RFC 3339, UTC.
    pub created: String,
    /// The version of the volume's on-disk format.
    pub format: u32,
    /// Address blocks (CIDR) whose network clients may attach; empty means the server-wide
    /// list. Kept as text: the engine stores it, the door enforces it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// TLS client identities (PSK identities or certificate common names) that may attach;
    /// empty means any client the door admits. The door enforces it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<String>,
    /// A cached volume's own limits on local space, where they differ from `[volumes]`.
    #[serde(flatten)]
    pub limits: Limits,
}

/// A cached volume's own `log_max` and `cache_max`, instead of `[volumes]`' (for this
/// gateway: they are kept in its catalog, not in the bucket).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_max: Option<u64>,
}

impl Limits {
    /// `defaults` with these limits in place of theirs.
    pub fn apply(&self, defaults: &cached::Settings) -> cached::Settings {
        cached::Settings {
            log_max: self.log_max.unwrap_or(defaults.log_max),
            cache_max: self.cache_max.unwrap_or(defaults.cache_max),
            ..defaults.clone()
        }
    }
}

/// How a new volume may be reached and what local space it may take.
#[derive(Debug, Clone, Default)]
pub struct VolumeOptions {
    pub read_only: bool,
    /// Address blocks (CIDR) whose network clients may attach; empty: the server-wide list.
    pub allow: Vec<String>,
    /// TLS identities that may attach; empty: any client the door admits.
    pub clients: Vec<String>,
    pub limits: Limits,
}

/// A change to the volume files in progress, recorded before it starts so that a crash in
/// the middle leaves a file the catalog knows about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// `create`, `delete` or `takeover`.
    pub op: IntentOp,
    pub name: String,
    /// RFC 3339, UTC.
    pub time: String,
    /// A takeover's limits, for finishing it after a crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntentOp {
    Create,
    Delete,
    /// A cached volume taken over from the bucket: its commit there makes this gateway the
    /// owner, so a crash after it must not be forgotten (`finish_takeovers`).
    Takeover,
}

/// What [`Catalog::recover`] did at start.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Files of creates or deletes a crash interrupted, removed as their intents asked.
    pub removed: Vec<PathBuf>,
    /// Files that no entry or intent names, moved into the quarantine folder (old path, new
    /// path).
    pub quarantined: Vec<(PathBuf, PathBuf)>,
    /// Names of volumes whose takeover a crash cut short: `finish_takeovers` asks the bucket
    /// whether it happened and finishes it if so.
    pub takeovers: Vec<String>,
}

/// Why a catalog operation failed. Every message names the volume.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "volume name {name:?} is not valid: {reason}; use 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ -, not starting with . or -"
    )]
    InvalidName { name: String, reason: &'static str },

    #[error(
        "volume {name:?}: size {size} is not valid: it must be a positive multiple of {} bytes, at most {}",
        local::SECTOR_SIZE,
        local::MAX_SIZE
    )]
    InvalidSize { name: String, size: u64 },

    #[error("volume {name:?}: {message}")]
    InvalidLimits { name: String, message: String },

    #[error("volume {name:?} already exists")]
    Exists { name: String },

    #[error("no volume named {name:?}")]
    NotFound { name: String },

    #[error("the bucket holds no volume named {name:?} with id {id:?}")]
    NoSuchId { name: String, id: String },

    #[error(
        "the bucket holds no volume named {name:?} that this gateway's key opens; {unreadable} volume(s) there do not open with it (written under another key, or another passphrase or its salt)"
    )]
    NotFoundUnreadable { name: String, unreadable: usize },

    #[error("volume {name:?} has format version {format}; this firn reads version {LOCAL_FORMAT}")]
    Format { name: String, format: u32 },

    #[error("volume {name:?}: {source}")]
    File {
        name: String,
        #[source]
        source: LocalVolumeError,
    },

    #[error("volume {name:?}: cannot remove its file {}: {source}; remove it by hand", .path.display())]
    Remove {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("volume directory {}: {source}", .path.display())]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    // Boxed: a `MetaError` is large, and every result of the catalog would carry its size.
    #[error("volume {name:?}: {source}")]
    Meta {
        name: String,
        #[source]
        source: Box<MetaError>,
    },

    #[error("volume {name:?}: cannot move its file {} into quarantine: {source}", .path.display())]
    Quarantine {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "volume {name:?}: cached volumes need the bucket, which this catalog was opened without"
    )]
    NoBucket { name: String },

    #[error(
        "volume {name:?}: not enough local space: its log needs {} MiB more of it (log_max: the volume's own, or [volumes]') and {} MiB must stay free ([local] min_free), but {} MiB are free",
        *.reserve >> 20, *.min_free >> 20, *.free >> 20
    )]
    NoSpace {
        name: String,
        reserve: u64,
        min_free: u64,
        free: u64,
    },

    #[error("volume {name:?} cannot be resized: {reason}")]
    Resize { name: String, reason: String },

    /// `unavailable`: the bucket did not answer (an outage or errors that outlasted the
    /// retries); the same takeover may work later.
    #[error("volume {name:?}: taking it over from the bucket: {message}")]
    Takeover {
        name: String,
        message: String,
        unavailable: bool,
    },

    #[error("volume {name:?}: a create or takeover of that name is already under way here")]
    NameBusy { name: String },

    #[error("the bucket holds {} volumes named {name:?} ({}): say which with --id", .found.len(), .found.join("; "))]
    Ambiguous { name: String, found: Vec<String> },

    /// `unavailable` as for `Takeover`.
    #[error("the bucket's volumes: {message}")]
    Bucket { message: String, unavailable: bool },

    #[error("listing volumes: {source}")]
    List {
        #[source]
        source: Box<MetaError>,
    },
}

impl CatalogError {
    /// The bucket did not answer (an outage, or errors that outlasted the retries): the same
    /// request may work later.
    pub fn bucket_unavailable(&self) -> bool {
        matches!(
            self,
            CatalogError::Takeover {
                unavailable: true,
                ..
            } | CatalogError::Bucket {
                unavailable: true,
                ..
            }
        )
    }
}

/// The volumes of this gateway. Every method takes `&self`; share it behind an `Arc`.
pub struct Catalog {
    meta: Arc<MetaStore>,
    dir: PathBuf,
    sealer: Arc<Sealer>,
    space: Option<Arc<SpaceBudget>>,
    bucket: Option<BucketContext>,
    /// Open volumes by id. All users of a volume must share one device, whose locks keep
    /// partial-sector writes from different connections from losing each other.
    open: Mutex<HashMap<String, Weak<dyn BlockDevice>>>,
    /// Cached volumes stay open while the daemon runs, attached or not: their uploads go on.
    pinned: Mutex<HashMap<String, Arc<CachedVolume>>>,
    /// Why a cached volume's last open failed, by id, until one succeeds: shown to the
    /// operator, since such a volume uploads nothing and serves no client.
    open_errors: Mutex<HashMap<String, String>>,
    /// Calls to the bucket from blocking threads, which a stop ends (`bucket_call`).
    gate: crate::remote::gate::StopGate,
    /// Names being created or taken over here: one at a time per name. A second takeover's
    /// failure would remove what the first restored; a create that took the name during a
    /// takeover failed it after its commit and lease were in the bucket, which fenced the
    /// gateway serving the volume and left it served nowhere.
    claimed: Mutex<std::collections::HashSet<String>>,
    /// Held from the check that the disk has room for a cached volume's log to the moment
    /// the log takes it (its open, or a larger `log_max`): two at once would each find the
    /// same free space.
    room: Mutex<()>,
}

/// A create or takeover of a name under way here, until dropped.
struct NameClaim<'c> {
    names: &'c Mutex<std::collections::HashSet<String>>,
    name: String,
}

impl<'c> NameClaim<'c> {
    fn begin(
        names: &'c Mutex<std::collections::HashSet<String>>,
        name: &str,
    ) -> Result<NameClaim<'c>, CatalogError> {
        if !names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string())
        {
            return Err(CatalogError::NameBusy {
                name: name.to_string(),
            });
        }
        Ok(NameClaim {
            names,
            name: name.to_string(),
        })
    }
}

impl Drop for NameClaim<'_> {
    fn drop(&mut self) {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.name);
    }
}

/// How long a delete waits for the bucket to take the volume's objects; past it, the delete
/// is done here and the objects go later (`retry_bucket_deletes`).
const DELETE_WAIT: Duration = Duration::from_secs(10);

/// What cached volumes need from the daemon: the bucket, the runtimes their bucket reads and
/// their uploads run on, this gateway's id, and their settings.
#[derive(Clone, Debug)]
pub struct BucketContext {
    /// The bucket, without the remote layer's digests: all a cached volume stores is sealed,
    /// and it checks the tags of what it reads (`remote::Stack::sealed`).
    pub remote: Arc<dyn crate::remote::Remote>,
    pub runtime: tokio::runtime::Handle,
    pub uploads: tokio::runtime::Handle,
    pub gateway: String,
    pub settings: cached::Settings,
}

impl BucketContext {
    /// The bucket as the cached volume `id` sees it: its objects under `volumes/<id>/`.
    fn volume(&self, id: &str) -> cached::Bucket {
        cached::Bucket {
            remote: self.remote.clone(),
            prefix: format!("volumes/{id}/"),
            runtime: self.runtime.clone(),
            uploads: self.uploads.clone(),
            gateway: self.gateway.clone(),
        }
    }
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Catalog {
    /// The catalog over `meta`'s `volumes` table, keeping volume files in `volumes_dir`
    /// (created if missing).
    pub fn new(
        meta: Arc<MetaStore>,
        volumes_dir: impl Into<PathBuf>,
        sealer: Arc<Sealer>,
    ) -> Result<Catalog, CatalogError> {
        let dir = volumes_dir.into();
        if !dir.is_dir() {
            let directory_error = |source| CatalogError::Directory {
                path: dir.clone(),
                source,
            };
            // Only the gateway's user has any business in here.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(directory_error)?;
            // Volume files are synced into this directory; the directory must survive too.
            sync_parent_dir(&dir).map_err(directory_error)?;
        }
        Ok(Catalog {
            meta,
            dir,
            sealer,
            space: None,
            bucket: None,
            open: Mutex::new(HashMap::new()),
            pinned: Mutex::new(HashMap::new()),
            open_errors: Mutex::new(HashMap::new()),
            gate: Default::default(),
            claimed: Mutex::new(Default::default()),
            room: Mutex::new(()),
        })
    }

    /// Cached volumes keep their data in `bucket`.
    pub fn with_bucket(mut self, bucket: BucketContext) -> Catalog {
        self.bucket = Some(bucket);
        self
    }

    /// Volumes opened from now on take new space only as `budget` allows.
    pub fn with_space_budget(mut self, budget: Arc<SpaceBudget>) -> Catalog {
        self.space = Some(budget);
        self
    }

    /// Creates an all-zero volume. Its file is sparse, so this is quick whatever the size.
    pub fn create(
        &self,
        name: &str,
        size: u64,
        mode: Mode,
        read_only: bool,
    ) -> Result<VolumeInfo, CatalogError> {
        let options = VolumeOptions {
            read_only,
            ..VolumeOptions::default()
        };
        self.create_with(name, size, mode, options)
    }

    /// `create`, with the volume's own client address allowlist, the TLS identities that
    /// may attach and its limits on local space, recorded in the same entry.
    pub fn create_with(
        &self,
        name: &str,
        size: u64,
        mode: Mode,
        options: VolumeOptions,
    ) -> Result<VolumeInfo, CatalogError> {
        check_name(name)?;
        if size == 0 || size % local::SECTOR_SIZE != 0 || size > local::MAX_SIZE {
            return Err(CatalogError::InvalidSize {
                name: name.to_string(),
                size,
            });
        }
        if mode == Mode::Local && options.limits != Limits::default() {
            return Err(CatalogError::InvalidLimits {
                name: name.to_string(),
                message: "log_max and cache_max are for cached volumes; a local volume keeps all its data here".into(),
            });
        }
        self.check_limits(name, &options.limits)?;
        let _only = NameClaim::begin(&self.claimed, name)?;
        // Checked again when the entry is written; this spares creating a file in vain.
        if self.get(name)?.is_some() {
            return Err(CatalogError::Exists {
                name: name.to_string(),
            });
        }
        let mut id = [0u8; 16];
        rand::rng().fill_bytes(&mut id);
        let info = VolumeInfo {
            name: name.to_string(),
            id: hex::encode(id),
            size,
            mode,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            format: LOCAL_FORMAT,
            read_only: options.read_only,
            allow: options.allow,
            clients: options.clients,
            limits: options.limits,
        };
        let path = self.path(&info);
        // Until the volume's open below has taken its log's room.
        let _room = (mode == Mode::Cached)
            .then(|| self.room.lock().unwrap_or_else(PoisonError::into_inner));
        if mode == Mode::Cached {
            self.check_room(&info)?;
        }
        self.meta
            .put_json(INTENTS, &info.id, &intent(IntentOp::Create, name))
            .map_err(|source| meta_error(name, source))?;
        match mode {
            Mode::Local => {
                let key = self.sealer.volume_key(&info.id);
                if let Err(source) = LocalVolume::create(&path, size, &key) {
                    // Nothing was left at `path`; a stale intent would be cleared at start.
                    let _ = self.meta.delete(INTENTS, &info.id);
                    return Err(CatalogError::File {
                        name: name.to_string(),
                        source,
                    });
                }
            }
            Mode::Cached => {
                if self.bucket.is_none() {
                    let _ = self.meta.delete(INTENTS, &info.id);
                    return Err(CatalogError::NoBucket {
                        name: name.to_string(),
                    });
                }
                let made = std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .and_then(|()| sync_parent_dir(&path));
                if let Err(source) = made {
                    let _ = std::fs::remove_dir(&path);
                    let _ = self.meta.delete(INTENTS, &info.id);
                    return Err(CatalogError::Directory { path, source });
                }
            }
        }
        let inserted = self.meta.transaction(|tx| {
            if tx.get(TABLE, name)?.is_some() {
                return Ok(false);
            }
            tx.put_json(TABLE, name, &info)?;
            tx.delete(INTENTS, &info.id)?;
            Ok(true)
        });
        let failure = match inserted {
            Ok(true) => {
                if info.mode != Mode::Cached {
                    return Ok(info);
                }
                // Its uploader starts now, and first puts the descriptor in the bucket. A
                // volume that does not open (its log's room taken by another meanwhile) was
                // never used: it goes again, entry and directory.
                match self.open(name) {
                    Ok(_) => return Ok(info),
                    Err(e) => {
                        if let Err(gone) = self.meta.transaction(|tx| {
                            tx.put_json(INTENTS, &info.id, &intent(IntentOp::Delete, name))?;
                            tx.delete(TABLE, name)
                        }) {
                            tracing::warn!(volume = name, "cannot drop its entry: {gone}");
                            return Err(e);
                        }
                        e
                    }
                }
            }
            Ok(false) => CatalogError::Exists {
                name: name.to_string(),
            },
            Err(source) => meta_error(name, source),
        };
        match remove_volume_path(&path) {
            // The intent goes only with the file: if either stays, the next start finishes.
            Ok(()) => {
                let _ = self.meta.delete(INTENTS, &info.id);
            }
            Err(e) => tracing::warn!(
                volume = name,
                path = %path.display(),
                "cannot remove the file of a volume whose creation failed: {e}"
            ),
        }
        Err(failure)
    }

    /// A cached volume's log takes its room (`log_max`) when the volume opens: one the disk
    /// has no room for beside `min_free` is refused before anything is made, rather than
    /// filling the disk and then failing to open.
    fn check_room(&self, info: &VolumeInfo) -> Result<(), CatalogError> {
        let Some(bucket) = &self.bucket else {
            return Ok(());
        };
        let settings = &info.limits.apply(&bucket.settings);
        self.check_free(&info.name, settings.log_max, settings.min_free)
    }

    /// Whether `needed` bytes for volume `name`'s log are free beside `min_free`.
    fn check_free(&self, name: &str, needed: u64, min_free: u64) -> Result<(), CatalogError> {
        let free = nix::sys::statvfs::statvfs(&self.dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .map_err(|e| CatalogError::Directory {
                path: self.dir.clone(),
                source: e.into(),
            })?;
        if free < needed.saturating_add(min_free) {
            return Err(CatalogError::NoSpace {
                name: name.to_string(),
                reserve: needed,
                min_free,
                free,
            });
        }
        Ok(())
    }

    /// A log must hold two segments, as `[volumes] log_max` must.
    fn check_limits(&self, name: &str, limits: &Limits) -> Result<(), CatalogError> {
        let segment_bytes = self
            .bucket
            .as_ref()
            .map_or(cached::Settings::default().segment_bytes, |b| {
                b.settings.segment_bytes
            });
        let least = 2 * cached::record::max_segment(segment_bytes);
        match limits.log_max {
            Some(log_max) if log_max < least => Err(CatalogError::InvalidLimits {
                name: name.to_string(),
                message: format!(
                    "log_max must hold at least two segments ({least} bytes with [volumes] segment_size = {segment_bytes})"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Volume-like files (`<32 hex digits>.img`) in the volume directory that no entry names,
    /// in name order. The daemon asks this of a new metadata store: any file then is a volume
    /// whose catalog was lost, not an orphan.
    pub fn unnamed_files(&self) -> Result<Vec<PathBuf>, CatalogError> {
        let known: HashSet<String> = self.list()?.into_iter().map(|info| info.id).collect();
        let mut files: Vec<PathBuf> = self
            .volume_files()?
            .into_iter()
            .filter(|(id, _)| !known.contains(id))
            .map(|(_, path)| path)
            .collect();
        files.sort();
        Ok(files)
    }

    /// Finishes what a crash interrupted and sets aside what the catalog does not know. Call
    /// it only while nothing else can create or delete a volume, at start.
    ///
    /// A file that an intent names and no entry does is removed (a create that never wrote
    /// its entry, or a delete that never removed its file); every intent is then dropped. A
    /// file that neither names is never deleted: it is moved to `quarantine/`, from where an
    /// operator can restore it (with the metadata store that names it).
    pub fn recover(&self) -> Result<Recovered, CatalogError> {
        let known: HashSet<String> = self.list()?.into_iter().map(|info| info.id).collect();
        let intents = self
            .meta
            .list(INTENTS, "")
            .map_err(|source| CatalogError::List {
                source: Box::new(source),
            })?;
        let directory_error = |source| CatalogError::Directory {
            path: self.dir.clone(),
            source,
        };
        let mut recovered = Recovered::default();
        let mut intended = HashSet::new();
        for (id, bytes) in &intents {
            let name = serde_json::from_slice::<Intent>(bytes)
                .map(|i| i.name)
                .unwrap_or_default();
            intended.insert(id.clone());
            if known.contains(id) {
                continue;
            }
            for path in [self.dir.join(format!("{id}.img")), self.dir.join(id)] {
                match remove_volume_path(&path) {
                    Ok(()) => recovered.removed.push(path),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(CatalogError::Remove { name, path, source }),
                }
            }
        }
        if !recovered.removed.is_empty() {
            sync_parent_dir(&recovered.removed[0]).map_err(directory_error)?;
        }
        for (id, bytes) in &intents {
            let takeover = serde_json::from_slice::<Intent>(bytes)
                .ok()
                .filter(|i| i.op == IntentOp::Takeover && !known.contains(id));
            self.meta
                .transaction(|tx| {
                    if let Some(takeover) = &takeover {
                        tx.put_json(TAKEOVERS, id, takeover)?;
                    }
                    tx.delete(INTENTS, id)
                })
                .map_err(|source| meta_error(id, source))?;
            recovered.takeovers.extend(takeover.map(|t| t.name));
        }
        for (id, path) in self.volume_files()? {
            if known.contains(&id) || intended.contains(&id) {
                continue;
            }
            let moved = self.quarantine(&id, &path)?;
            recovered.quarantined.push((path, moved));
        }
        Ok(recovered)
    }

    /// Moves a volume file into the quarantine folder, durably, under a name not yet taken.
    fn quarantine(&self, id: &str, path: &Path) -> Result<PathBuf, CatalogError> {
        let quarantine_error = |source| CatalogError::Quarantine {
            name: id.to_string(),
            path: path.to_path_buf(),
            source,
        };
        let folder = self.dir.join(QUARANTINE);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&folder)
            .map_err(quarantine_error)?;
        let leaf = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("{id}.img"));
        let mut target = folder.join(&leaf);
        let mut n = 1;
        while target.exists() {
            target = folder.join(format!("{leaf}.{n}"));
            n += 1;
        }
        std::fs::rename(path, &target).map_err(quarantine_error)?;
        sync_parent_dir(&target)
            .and_then(|()| sync_parent_dir(path))
            .map_err(quarantine_error)?;
        Ok(target)
    }

    /// The volume-like files of the volume directory, with their ids.
    fn volume_files(&self) -> Result<Vec<(String, PathBuf)>, CatalogError> {
        let directory_error = |source| CatalogError::Directory {
            path: self.dir.clone(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(directory_error)? {
            let path = entry.map_err(directory_error)?.path();
            let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
                continue;
            };
            // A local volume's file, or a cached volume's directory.
            let (id, kind_ok) = match name.strip_suffix(".img") {
                Some(id) => (id, path.is_file()),
                None => (name, path.is_dir()),
            };
            if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && kind_ok {
                files.push((id.to_string(), path));
            }
        }
        Ok(files)
    }

    /// Every volume, in name order.
    pub fn list(&self) -> Result<Vec<VolumeInfo>, CatalogError> {
        let entries = self
            .meta
            .list(TABLE, "")
            .map_err(|source| CatalogError::List {
                source: Box::new(source),
            })?;
        entries
            .into_iter()
            .map(|(name, bytes)| {
                serde_json::from_slice(&bytes).map_err(|source| {
                    let error = MetaError::Json {
                        path: self.meta.path().to_path_buf(),
                        table: TABLE.to_string(),
                        key: name.clone(),
                        action: "decode",
                        source,
                    };
                    meta_error(&name, error)
                })
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<Option<VolumeInfo>, CatalogError> {
        self.meta
            .get_json(TABLE, name)
            .map_err(|source| meta_error(name, source))
    }

    /// Removes the volume: its entry, then its file. Handles already open keep working on the
    /// unlinked file until dropped, so callers should stop serving the volume first.
    pub fn delete(&self, name: &str) -> Result<VolumeInfo, CatalogError> {
        let removed = self.meta.transaction(|tx| {
            let info: Option<VolumeInfo> = tx.get_json(TABLE, name)?;
            if let Some(info) = &info {
                tx.delete(TABLE, name)?;
                tx.put_json(INTENTS, &info.id, &intent(IntentOp::Delete, name))?;
                // Noted with the delete itself, so a crash before the bucket's objects are
                // gone leaves the retry to finish it.
                if info.mode == Mode::Cached {
                    tx.put_json(BUCKET_DELETES, &info.id, info)?;
                }
            }
            Ok(info)
        });
        let info = match removed {
            Ok(Some(info)) => info,
            Ok(None) => {
                return Err(CatalogError::NotFound {
                    name: name.to_string(),
                });
            }
            Err(source) => return Err(meta_error(name, source)),
        };
        // Clients still attached to a local volume (a forced delete) get errors from now on.
        if let Some(volume) = self
            .open_volumes()
            .remove(&info.id)
            .and_then(|v| v.upgrade())
        {
            volume.mark_deleted();
        }
        let pinned = self.pinned_volumes().remove(&info.id);
        // Clients still attached (a forced delete) get errors from now on, and the uploader
        // is stopped before the bucket's objects go, so none of its puts outlives them.
        let answering = pinned.is_none_or(|volume| volume.retire(RETIRE_GRACE));
        if info.mode == Mode::Cached {
            // A gateway that lost the volume to another deletes only its own copy: the
            // bucket's objects are the new owner's now.
            let fenced = self
                .meta
                .get_json::<cached::Progress>(cached::PROGRESS_TABLE, &info.id)
                .ok()
                .flatten()
                .is_some_and(|p| p.fenced.is_some());
            if fenced {
                tracing::warn!(
                    volume = name,
                    "deleted here only: another gateway took the volume over, and its objects in the bucket are that gateway's"
                );
                let _ = self.meta.delete(BUCKET_DELETES, &info.id);
                let _ = self.meta.delete(cached::PROGRESS_TABLE, &info.id);
            } else if answering {
                // The progress record goes with the last of the objects: it names the
                // chunks a collection made since the newest checkpoint.
                self.delete_bucket_objects(&info);
            } else {
                // The bucket did not answer the uploader: the retry deletes the objects
                // once it does, rather than this delete waiting longer.
                tracing::warn!(
                    volume = %info.name,
                    "the bucket is not answering: the volume's objects under volumes/{}/ are deleted once it does",
                    info.id
                );
            }
        }
        let path = self.path(&info);
        match remove_volume_path(&path) {
            Ok(()) => {}
            // A crash or an operator got there first; the volume is gone either way.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // The intent stays, so the next start removes the file.
            Err(source) => {
                return Err(CatalogError::Remove {
                    name: name.to_string(),
                    path,
                    source,
                });
            }
        }
        // The entry is gone; a stale intent only makes the next start look for the file.
        if let Err(e) = self.meta.delete(INTENTS, &info.id) {
            tracing::warn!(volume = name, "cannot drop the delete intent: {e}");
        }
        Ok(info)
    }

    /// The volume, open for I/O. While a handle is alive, every `open` returns the same one.
    pub fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, CatalogError> {
        let info = self.get(name)?.ok_or_else(|| CatalogError::NotFound {
            name: name.to_string(),
        })?;
        if info.format != LOCAL_FORMAT {
            return Err(CatalogError::Format {
                name: name.to_string(),
                format: info.format,
            });
        }
        // Held while opening, so two concurrent first opens cannot make two handles.
        let mut open = self.open_volumes();
        if let Some(volume) = open.get(&info.id).and_then(Weak::upgrade) {
            return Ok(volume);
        }
        let volume: Arc<dyn BlockDevice> = match info.mode {
            Mode::Local => {
                let key = self.sealer.volume_key(&info.id);
                let mut volume =
                    LocalVolume::open(self.path(&info), info.size, &key, info.read_only).map_err(
                        |source| CatalogError::File {
                            name: name.to_string(),
                            source,
                        },
                    )?;
                if let Some(budget) = &self.space {
                    volume.set_space_budget(budget.clone());
                }
                Arc::new(volume)
            }
            Mode::Cached => {
                let opened = self.open_cached(&info);
                let mut errors = self
                    .open_errors
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                match &opened {
                    Ok(_) => errors.remove(&info.id),
                    Err(e) => errors.insert(info.id.clone(), e.to_string()),
                };
                drop(errors);
                let volume = opened?;
                self.pinned_volumes()
                    .insert(info.id.clone(), volume.clone());
                volume
            }
        };
        open.retain(|_, handle| handle.strong_count() > 0);
        open.insert(info.id, Arc::downgrade(&volume));
        Ok(volume)
    }

    fn open_cached(&self, info: &VolumeInfo) -> Result<Arc<CachedVolume>, CatalogError> {
        let bucket = self.bucket.as_ref().ok_or_else(|| CatalogError::NoBucket {
            name: info.name.clone(),
        })?;
        let volume = CachedVolume::open(cached::OpenParams {
            id: info.id.clone(),
            name: info.name.clone(),
            size: info.size,
            read_only: info.read_only,
            created: info.created.clone(),
            dir: self.path(info),
            sealer: self.sealer.clone(),
            meta: self.meta.clone(),
            bucket: bucket.volume(&info.id),
            settings: info.limits.apply(&bucket.settings),
        })
        .map_err(|source| CatalogError::Directory {
            path: self.path(info),
            source,
        })?;
        Ok(Arc::new(volume))
    }

    /// Opens every cached volume, so that their uploads resume. Call at start.
    pub fn open_cached_volumes(&self) -> Vec<(String, CatalogError)> {
        let mut failed = Vec::new();
        for info in self.list().unwrap_or_default() {
            if info.mode == Mode::Cached
                && let Err(e) = self.open(&info.name)
            {
                failed.push((info.name.clone(), e));
            }
        }
        failed
    }

    /// Stops every open cached volume (the daemon is stopping): writes still waiting for room
    /// in a log whose uploads cannot make any fail, as do later requests, so that the
    /// threads serving them end. What was written before stays in the logs.
    /// At a stop, before `stop_cached_volumes`: has every cached volume commit what its
    /// clients flushed (`CachedVolume::drain`), `limit` in all at most, and names each that
    /// did not in the log.
    pub fn drain_cached_volumes(&self, limit: Duration, moving: &dyn Fn() -> u64) {
        let deadline = std::time::Instant::now() + limit;
        let volumes: Vec<_> = self
            .pinned_volumes()
            .iter()
            .map(|(id, volume)| (id.clone(), volume.clone()))
            .collect();
        for (_, volume) in &volumes {
            volume.begin_drain();
        }
        for (id, volume) in volumes {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let drained = volume.drain(left, moving);
            if drained.flushes > 0 {
                tracing::warn!(
                    volume = %volume.name(),
                    "{} flushes made here are not in the bucket yet (volume id {id}): they upload when firn starts again here, and a takeover elsewhere before that does not have them",
                    drained.flushes
                );
            }
            if drained.size {
                tracing::warn!(
                    volume = %volume.name(),
                    "the volume's new size is not in the bucket yet (volume id {id}): it goes up when firn starts again here, and a takeover elsewhere before that serves the old size"
                );
            }
        }
    }

    pub fn stop_cached_volumes(&self) {
        for volume in self.pinned_volumes().values() {
            volume.stop();
        }
        // No call to the bucket from a blocking thread outlives the runtime it runs on.
        self.gate.stop_and_wait();
    }

    /// The first step of a stop: calls to the bucket that blocking threads wait on (a
    /// delete's, a takeover's, a listing's) end now, so that none holds the stop up.
    pub fn begin_stop(&self) {
        self.gate.begin_stop();
    }

    /// `call`, to the bucket, run on `runtime` from this blocking thread: for `limit` at
    /// most, if given, and never past the start of a stop (`begin_stop`). Either ends it
    /// with a transient error (what it did not do is done again later).
    fn bucket_call<T>(
        &self,
        runtime: &tokio::runtime::Handle,
        limit: Option<Duration>,
        call: impl std::future::Future<Output = T>,
    ) -> Result<T, crate::remote::Error> {
        let cut_short = |message: String| crate::remote::Error::Transient {
            op: "call",
            key: String::new(),
            message,
        };
        let limited = async {
            match limit {
                Some(limit) => tokio::time::timeout(limit, call)
                    .await
                    .map_err(|_| cut_short(format!("no answer within {limit:?}"))),
                None => Ok(call.await),
            }
        };
        self.gate
            .call(runtime, limited)
            .unwrap_or_else(|| Err(cut_short("the daemon is stopping".into())))
    }

    /// A cached volume's upload state, if it is one and open.
    pub fn cached_status(&self, name: &str) -> Option<cached::CachedStatus> {
        let info = self.get(name).ok()??;
        let pinned = self.pinned_volumes();
        pinned.get(&info.id).map(|volume| volume.status())
    }

    /// `info` as clients find the volume: a cached volume this gateway was fenced from (another
    /// one took it over) is read-only, whatever its entry says.
    pub fn as_served(&self, mut info: VolumeInfo) -> VolumeInfo {
        if let Some(volume) = self.pinned_volumes().get(&info.id) {
            info.read_only |= volume.fenced().is_some();
        }
        info
    }

    /// Why cached volume `name` could not be opened, if its last open failed.
    pub fn open_error(&self, name: &str) -> Option<String> {
        let info = self.get(name).ok()??;
        let errors = self
            .open_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        errors.get(&info.id).cloned()
    }

    /// Every open cached volume's name and upload state, in name order.
    pub fn cached_statuses(&self) -> Vec<(String, cached::CachedStatus)> {
        let mut out = Vec::new();
        for info in self.list().unwrap_or_default() {
            if let Some(volume) = self.pinned_volumes().get(&info.id) {
                out.push((info.name.clone(), volume.status()));
            }
        }
        out
    }

    /// The open cached volume itself (tests and tools wait on its commits).
    pub fn cached(&self, name: &str) -> Option<Arc<CachedVolume>> {
        let info = self.get(name).ok()??;
        self.pinned_volumes().get(&info.id).cloned()
    }

    /// The cached volumes in the bucket that this gateway does not have, as their
    /// descriptors say (a volume whose descriptor cannot be read is skipped with a warning).
    pub fn bucket_volumes(&self) -> Result<Vec<cached::Descriptor>, CatalogError> {
        self.bucket_volumes_counting().map(|(found, _)| found)
    }

    /// `bucket_volumes`, and how many descriptors did not open with this gateway's key.
    fn bucket_volumes_counting(&self) -> Result<(Vec<cached::Descriptor>, usize), CatalogError> {
        let Some(bucket) = &self.bucket else {
            return Ok((Vec::new(), 0));
        };
        let known: HashSet<String> = self.list()?.into_iter().map(|info| info.id).collect();
        let remote = bucket.remote.clone();
        let sealer = self.sealer.clone();
        let found = self.bucket_call(&bucket.runtime, None, async move {
            let listing = remote.list_dir("volumes/").await?;
            let mut found = Vec::new();
            let mut unreadable = 0;
            for dir in listing.dirs {
                let id = dir
                    .trim_start_matches("volumes/")
                    .trim_end_matches('/')
                    .to_string();
                if known.contains(&id) {
                    continue;
                }
                let key = format!("{dir}descriptor");
                match remote.get(&key).await {
                    Ok(object) => match cached::open_descriptor(&sealer, &id, &object.body) {
                        Ok(descriptor) => found.push(descriptor),
                        Err(e) => {
                            unreadable += 1;
                            tracing::warn!("{key}: {e} (another key's volume?)")
                        }
                    },
                    Err(crate::remote::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok((found, unreadable))
        });
        found
            .and_then(|found| found)
            .map_err(|e| CatalogError::Bucket {
                unavailable: matches!(e, crate::remote::Error::Transient { .. }),
                message: e.to_string(),
            })
    }

    /// Serves here the cached volume `name` that the bucket holds: restores the image of its
    /// newest commit and fences the gateway that wrote it (`cached::restore`). `honoured`
    /// is whether the store refuses a second create; without it, or while another
    /// gateway's lease is live, only `force` takes over.
    /// `id` picks one of several volumes of that name in the bucket (each gateway names its
    /// own, so two may share one); without it, several are refused.
    pub fn take_over(
        &self,
        name: &str,
        id: Option<&str>,
        limits: Limits,
        honoured: bool,
        force: bool,
    ) -> Result<VolumeInfo, CatalogError> {
        self.check_limits(name, &limits)?;
        let _only = NameClaim::begin(&self.claimed, name)?;
        if self.get(name)?.is_some() {
            return Err(CatalogError::Exists {
                name: name.to_string(),
            });
        }
        let bucket = self.bucket.as_ref().ok_or_else(|| CatalogError::NoBucket {
            name: name.to_string(),
        })?;
        let (found, unreadable) = self.bucket_volumes_counting()?;
        let mut found: Vec<_> = found
            .into_iter()
            .filter(|d| d.name == name && id.is_none_or(|id| d.id == id))
            .collect();
        if found.len() > 1 {
            return Err(CatalogError::Ambiguous {
                name: name.to_string(),
                found: found
                    .iter()
                    .map(|d| format!("id {}, created {}", d.id, d.created))
                    .collect(),
            });
        }
        let descriptor = found.pop().ok_or_else(|| match id {
            Some(id) => CatalogError::NoSuchId {
                name: name.to_string(),
                id: id.to_string(),
            },
            None if unreadable > 0 => CatalogError::NotFoundUnreadable {
                name: name.to_string(),
                unreadable,
            },
            None => CatalogError::NotFound {
                name: name.to_string(),
            },
        })?;
        let id = descriptor.id.clone();
        let info = VolumeInfo {
            name: name.to_string(),
            id: id.clone(),
            size: descriptor.size,
            mode: Mode::Cached,
            read_only: false,
            created: descriptor.created.clone(),
            format: LOCAL_FORMAT,
            allow: Vec::new(),
            clients: Vec::new(),
            limits,
        };
        let dir = self.path(&info);
        self.check_room(&info)?;
        // A deletion of this volume still to be retried here would wipe it in the bucket.
        let _ = self.meta.delete(BUCKET_DELETES, &id);
        self.meta
            .put_json(
                INTENTS,
                &id,
                &Intent {
                    limits: Some(limits),
                    ..intent(IntentOp::Takeover, name)
                },
            )
            .map_err(|source| meta_error(name, source))?;
        let context = bucket.volume(&id);
        let taken = self
            .bucket_call(
                &bucket.runtime,
                None,
                cached::restore::take_over(
                    &context,
                    &self.sealer,
                    &self.meta,
                    &id,
                    &dir,
                    honoured,
                    force,
                ),
            )
            .unwrap_or_else(|e| Err(e.into()));
        let taken = match taken {
            Ok(taken) => taken,
            Err(e) => {
                let _ = remove_volume_path(&dir);
                let _ = self.meta.delete(cached::PROGRESS_TABLE, &id);
                let _ = self.meta.delete(INTENTS, &id);
                // Not `Corrupt`: a rotten object stays rotten.
                let unavailable = matches!(
                    &e,
                    cached::restore::TakeoverError::Remote(crate::remote::Error::Transient { .. })
                        | cached::restore::TakeoverError::Unconfirmed {
                            source: crate::remote::Error::Transient { .. },
                            ..
                        }
                );
                return Err(CatalogError::Takeover {
                    name: name.to_string(),
                    message: e.to_string(),
                    unavailable,
                });
            }
        };
        // The size of the newest commit where the volume grew after its descriptor was last
        // written (or a gateway that lost it wrote an old size again): never smaller.
        let info = VolumeInfo {
            size: info.size.max(taken.descriptor.size),
            ..info
        };
        // The bucket names this gateway the owner now: a failure from here on says so.
        let after_commit = |cause: String| CatalogError::Takeover {
            name: name.to_string(),
            message: cached::restore::after_commit(taken.commit, &cause),
            unavailable: false,
        };
        sync_parent_dir(&dir).map_err(|e| after_commit(format!("{}: {e}", dir.display())))?;
        let inserted = self
            .meta
            .transaction(|tx| {
                // Never so while the name is claimed (creates wait their turn); should it
                // be, the volume there keeps it.
                if tx.get(TABLE, name)?.is_some() {
                    return Ok(false);
                }
                tx.put_json(TABLE, name, &info)?;
                tx.delete(INTENTS, &id)?;
                Ok(true)
            })
            .map_err(|source| after_commit(meta_error(name, source).to_string()))?;
        if !inserted {
            let _ = remove_volume_path(&dir);
            let _ = self.meta.delete(cached::PROGRESS_TABLE, &id);
            let _ = self.meta.delete(INTENTS, &id);
            return Err(CatalogError::Exists {
                name: name.to_string(),
            });
        }
        {
            // The log takes its room as the free space is now, not as it was checked before
            // the restore, one volume at a time.
            let _room = self.room.lock().unwrap_or_else(PoisonError::into_inner);
            self.open(name)?;
        }
        Ok(info)
    }

    /// The records of work to retry in `table`, by volume id; an unreadable one is dropped.
    fn to_retry<T: serde::de::DeserializeOwned>(&self, table: &str) -> Vec<(String, T)> {
        let records = match self.meta.list(table, "") {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!("listing {table}: {e}");
                return Vec::new();
            }
        };
        let mut found = Vec::new();
        for (id, bytes) in records {
            match serde_json::from_slice(&bytes) {
                Ok(record) => found.push((id, record)),
                Err(e) => {
                    tracing::warn!("{table} {id}: {e}; dropped");
                    let _ = self.meta.delete(table, &id);
                }
            }
        }
        found
    }

    /// Finishes the takeovers a crash cut short (`recover` names them): one whose commit is
    /// the newest in the bucket made this gateway the volume's owner, and no gateway serves
    /// the volume until it is set up here, so it is taken over again (its own commit needs
    /// no `force`); one whose commit is not there never happened. Those the bucket cannot
    /// answer for now are kept for the next call; how many.
    pub fn finish_takeovers(&self) -> usize {
        let Some(bucket) = self.bucket.as_ref() else {
            return 0;
        };
        let mut left = 0;
        for (id, takeover) in self.to_retry::<Intent>(TAKEOVERS) {
            let name = takeover.name.as_str();
            let context = bucket.volume(&id);
            let owner = self
                .bucket_call(
                    &bucket.runtime,
                    Some(DELETE_WAIT),
                    cached::restore::committed_by(&context, &self.sealer, &id),
                )
                .unwrap_or_else(|e| Err(e.into()));
            let finished = match owner {
                Err(e) => {
                    tracing::warn!(volume = %name, "a takeover a crash cut short waits for the bucket to say whether its commit went in: {e}");
                    left += 1;
                    continue;
                }
                Ok(owner) if owner.as_deref() != Some(bucket.gateway.as_str()) => {
                    tracing::info!(volume = %name, "the takeover a crash cut short never committed: the volume is where it was");
                    true
                }
                Ok(_) => match self.take_over(
                    name,
                    Some(&id),
                    takeover.limits.unwrap_or_default(),
                    true,
                    false,
                ) {
                    Ok(_) => {
                        tracing::info!(volume = %name, "finished the takeover a crash cut short after its commit: the volume is served here");
                        true
                    }
                    Err(e) if e.bucket_unavailable() => {
                        tracing::warn!(volume = %name, "finishing the takeover a crash cut short after its commit waits for the bucket: {e}");
                        false
                    }
                    Err(e) => {
                        tracing::error!(volume = %name, "the takeover a crash cut short after its commit could not be finished ({e}): no gateway serves the volume until `firn volume takeover {name} --id {id}` works");
                        true
                    }
                },
            };
            if finished {
                let _ = self.meta.delete(TAKEOVERS, &id);
            } else {
                left += 1;
            }
        }
        left
    }

    /// Deletes a cached volume's objects: the descriptor first, so that no gateway finds a
    /// half-deleted volume, then the rest. If the bucket does not answer, the volume is noted
    /// and `retry_bucket_deletes` tries again later.
    fn delete_bucket_objects(&self, info: &VolumeInfo) {
        // A bucket out of reach (or uploads paused) does not hold the delete up: the note
        // made with it stays, and the retry finishes the work.
        match self.try_delete_bucket_objects(info, Some(DELETE_WAIT)) {
            Ok(()) => {
                let _ = self.meta.delete(BUCKET_DELETES, &info.id);
                let _ = self.meta.delete(cached::PROGRESS_TABLE, &info.id);
            }
            // The note made with the delete stays, and the retry finishes the work.
            Err(e) => tracing::warn!(
                volume = %info.name,
                "some of the volume's objects under volumes/{}/ are still in the bucket ({e}); deleting them is retried until it succeeds",
                info.id
            ),
        }
    }

    /// Deletes the bucket objects of volumes deleted while the bucket did not answer; how
    /// many are still to do.
    pub fn retry_bucket_deletes(&self) -> usize {
        let mut left = 0;
        for (id, info) in self.to_retry::<VolumeInfo>(BUCKET_DELETES) {
            match self.try_delete_bucket_objects(&info, None) {
                Ok(()) => {
                    tracing::info!(volume = %info.name, "the deleted volume's objects are gone from the bucket");
                    let _ = self.meta.delete(BUCKET_DELETES, &id);
                    let _ = self.meta.delete(cached::PROGRESS_TABLE, &id);
                }
                Err(e) => {
                    tracing::debug!(volume = %info.name, "deleting the volume's objects: {e}");
                    left += 1;
                }
            }
        }
        left
    }

    /// Deletes the bucket objects of `info`, for `limit` at most if given.
    fn try_delete_bucket_objects(
        &self,
        info: &VolumeInfo,
        limit: Option<Duration>,
    ) -> Result<(), crate::remote::Error> {
        let Some(bucket) = &self.bucket else {
            return Ok(());
        };
        let remote = bucket.remote.clone();
        let prefix = format!("volumes/{}/", info.id);
        let (sealer, id) = (self.sealer.clone(), info.id.clone());
        // Chunks a collection put since the newest checkpoint are named only here.
        let pending = self
            .meta
            .get_json::<cached::Progress>(cached::PROGRESS_TABLE, &info.id)
            .ok()
            .flatten()
            .map(|p| p.gc_pending)
            .unwrap_or_default();
        let context = cached::Bucket {
            remote: remote.clone(),
            prefix: prefix.clone(),
            runtime: bucket.runtime.clone(),
            uploads: bucket.uploads.clone(),
            gateway: bucket.gateway.clone(),
        };
        let name = info.name.clone();
        let done = self.bucket_call(&bucket.runtime, limit, async move {
            // Asked at every try: a gateway cut off from the bucket may have lost the volume
            // to a takeover without knowing it, and its objects are the new owner's now.
            if let Some(owner) = owner_elsewhere(&context, &sealer, &id).await? {
                tracing::warn!(
                    volume = %name,
                    "deleted here only: gateway {owner} took the volume over, and its objects in the bucket are that gateway's"
                );
                return Ok(());
            }
            remote.delete(&format!("{prefix}descriptor")).await?;
            // The chunks the volume's checkpoints name lie outside its prefix.
            let mut chunks = cached::chunk_keys(remote.as_ref(), &sealer, &id, &prefix).await?;
            chunks.extend(pending);
            // And those a gateway made and no checkpoint names (its own record may be lost
            // with it): marked under the prefix.
            for marker in remote.list(&format!("{prefix}gc-pending/")).await? {
                chunks.extend(cached::marked_chunk(&marker.key));
            }
            // Before the checkpoints that name them, or a retry could not find them.
            for key in chunks {
                remote.delete(&key).await?;
            }
            for object in remote.list(&prefix).await? {
                remote.delete(&object.key).await?;
            }
            Ok::<(), crate::remote::Error>(())
        });
        done.and_then(|done| done)
    }

    /// Grows a cached volume to `size` bytes, online. Local volumes cannot be resized yet.
    pub fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo, CatalogError> {
        let info = self.get(name)?.ok_or_else(|| CatalogError::NotFound {
            name: name.to_string(),
        })?;
        if info.mode != Mode::Cached {
            return Err(CatalogError::Resize {
                name: name.to_string(),
                reason: "only cached volumes can be resized".into(),
            });
        }
        let check = |info: &VolumeInfo| {
            if size <= info.size || size % local::SECTOR_SIZE != 0 || size > local::MAX_SIZE {
                return Err(CatalogError::Resize {
                    name: name.to_string(),
                    reason: format!(
                        "the new size must be larger than the current {} bytes (volumes only grow), a multiple of {} bytes, at most {}",
                        info.size,
                        local::SECTOR_SIZE,
                        local::MAX_SIZE
                    ),
                });
            }
            Ok(())
        };
        check(&info)?;
        // Its new size would never reach the bucket.
        if let Some(why) = self
            .pinned_volumes()
            .get(&info.id)
            .and_then(|volume| volume.fenced())
        {
            return Err(CatalogError::Resize {
                name: name.to_string(),
                reason: format!("this gateway no longer serves it ({why}); it is read-only here"),
            });
        }
        // Checked again on the record as it is now: another resize may have grown it since.
        let info = self.rewrite(name, &info.id, |info| {
            check(info)?;
            info.size = size;
            Ok(())
        })?;
        if let Some(volume) = self.pinned_volumes().get(&info.id) {
            volume.grow(size);
        }
        Ok(info)
    }

    /// Changes a cached volume's own limits on local space, each to a size, back to
    /// `[volumes]`' (`Some(None)`), or not at all (`None`). Both hold from now on: the
    /// volume evicts down to a smaller `cache_max`; a smaller `log_max` gives local space
    /// back and makes writes wait until the backlog is under it; a larger one takes its room
    /// on local disk, which must be free beside `[local] min_free`. `firn volume show` gives
    /// both the volume's limits and those in force.
    pub fn set_limits(
        &self,
        name: &str,
        log_max: Option<Option<u64>>,
        cache_max: Option<Option<u64>>,
    ) -> Result<VolumeInfo, CatalogError> {
        let mut info = self.get(name)?.ok_or_else(|| CatalogError::NotFound {
            name: name.to_string(),
        })?;
        if info.mode != Mode::Cached {
            return Err(CatalogError::InvalidLimits {
                name: name.to_string(),
                message: "log_max and cache_max are for cached volumes; a local volume keeps all its data here".into(),
            });
        }
        let change = |info: &mut VolumeInfo| {
            if let Some(log_max) = log_max {
                info.limits.log_max = log_max;
            }
            if let Some(cache_max) = cache_max {
                info.limits.cache_max = cache_max;
            }
            self.check_limits(name, &info.limits)
        };
        change(&mut info)?;
        // Until a larger log has taken its room.
        let _room = self.room.lock().unwrap_or_else(PoisonError::into_inner);
        let open = self.pinned_volumes().get(&info.id).cloned();
        if let (Some(volume), Some(bucket)) = (&open, &self.bucket) {
            // A larger log takes its room at once: refused, as at open, if the disk has
            // not that much more free.
            let now = volume.status().log_max;
            let wanted = info.limits.apply(&bucket.settings).log_max;
            if wanted > now {
                self.check_free(name, wanted - now, bucket.settings.min_free)?;
            }
        }
        // Only the limits change, on the record as it is now (a resize may have run since).
        let info = self.rewrite(name, &info.id, change)?;
        if let (Some(volume), Some(bucket)) = (open, &self.bucket) {
            let settings = info.limits.apply(&bucket.settings);
            volume.set_cache_max(settings.cache_max);
            volume.set_log_max(settings.log_max);
        }
        Ok(info)
    }

    /// Stores `info` in place of its entry, unless the name was deleted (or taken by another
    /// volume) meanwhile.
    fn rewrite(
        &self,
        name: &str,
        id: &str,
        change: impl FnOnce(&mut VolumeInfo) -> Result<(), CatalogError>,
    ) -> Result<VolumeInfo, CatalogError> {
        let mut refused = None;
        let updated = self.meta.transaction(|tx| {
            let current: Option<VolumeInfo> = tx.get_json(TABLE, name)?;
            let Some(mut current) = current.filter(|current| current.id == id) else {
                return Ok(None);
            };
            if let Err(e) = change(&mut current) {
                refused = Some(e);
                return Ok(None);
            }
            tx.put_json(TABLE, name, &current)?;
            Ok(Some(current))
        });
        match updated {
            Ok(Some(info)) => Ok(info),
            Ok(None) => Err(refused.unwrap_or_else(|| CatalogError::NotFound {
                name: name.to_string(),
            })),
            Err(source) => Err(meta_error(name, source)),
        }
    }

    /// Whether a handle from `open` is alive for the volume (a client has it attached).
    pub fn in_use(&self, name: &str) -> Result<bool, CatalogError> {
        let Some(info) = self.get(name)? else {
            return Ok(false);
        };
        let open = self.open_volumes();
        // A cached volume's pinned handle is one of them.
        let own = usize::from(info.mode == Mode::Cached);
        Ok(open
            .get(&info.id)
            .is_some_and(|handle| handle.strong_count() > own))
    }

    /// Where the volume's file (local) or directory (cached) is.
    pub fn path(&self, info: &VolumeInfo) -> PathBuf {
        match info.mode {
            Mode::Local => self.dir.join(format!("{}.img", info.id)),
            Mode::Cached => self.dir.join(&info.id),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn open_volumes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<dyn BlockDevice>>> {
        // The map stays consistent whatever a panicking holder was doing.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pinned_volumes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<CachedVolume>>> {
        self.pinned.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The gateway other than `bucket`'s that holds volume `id`, if one does: its commit is the
/// newest, or its lease is in the bucket (a takeover writes both). A commit or lease that
/// cannot be read proves nothing either way, so it counts as another owner: the bucket's
/// objects are left alone.
async fn owner_elsewhere(
    bucket: &cached::Bucket,
    sealer: &crate::seal::Sealer,
    id: &str,
) -> Result<Option<String>, crate::remote::Error> {
    use cached::restore::TakeoverError;
    let unreadable = |what: &str, e: TakeoverError| match e {
        TakeoverError::Remote(e) => Err(e),
        e => Ok(Some(format!("unknown (the {what} cannot be read: {e})"))),
    };
    match cached::restore::newest_commit(bucket, sealer, id).await {
        Ok(Some(commit)) if commit.gateway != bucket.gateway => return Ok(Some(commit.gateway)),
        Ok(_) => {}
        Err(e) => return unreadable("newest commit", e),
    }
    match cached::restore::lease(bucket, sealer, id).await {
        Ok(Some(lease)) if lease.gateway != bucket.gateway => Ok(Some(lease.gateway)),
        Ok(_) => Ok(None),
        Err(e) => unreadable("lease", e),
    }
}

/// Removes a local volume's file or a cached volume's directory.
fn remove_volume_path(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

fn intent(op: IntentOp, name: &str) -> Intent {
    Intent {
        op,
        name: name.to_string(),
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        limits: None,
    }
}

fn meta_error(name: &str, source: MetaError) -> CatalogError {
    CatalogError::Meta {
        name: name.to_string(),
        source: Box::new(source),
    }
}

fn check_name(name: &str) -> Result<(), CatalogError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_NAME_LEN {
        "it is too long"
    } else if name.starts_with(['.', '-']) {
        "it starts with . or -"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        "it has a character outside the allowed set"
    } else {
        return Ok(());
    };
    Err(CatalogError::InvalidName {
        // Names come from clients; keep a hostile one from flooding the message.
        name: name.chars().take(2 * MAX_NAME_LEN).collect(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::volume::BlockError;
    use crate::seal::MasterKey;

    struct Fixture {
        dir: tempfile::TempDir,
        meta: Arc<MetaStore>,
        catalog: Catalog,
    }

    fn sealer(seed: u8) -> Arc<Sealer> {
        Arc::new(Sealer::new(&MasterKey::from_bytes([seed; 32])))
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(MetaStore::open(dir.path().join("meta.redb")).unwrap());
        let catalog = Catalog::new(meta.clone(), dir.path().join("volumes"), sealer(1)).unwrap();
        Fixture { dir, meta, catalog }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn create_list_get_open() {
        let f = fixture();
        assert!(f.catalog.list().unwrap().is_empty());
        let info = f
            .catalog
            .create("db-1", 1 << 30, Mode::Local, false)
            .unwrap();
        assert_eq!(info.name, "db-1");
        assert_eq!(info.size, 1 << 30);
        assert_eq!(info.id.len(), 32);
        assert_eq!(info.format, LOCAL_FORMAT);
        assert!(chrono::DateTime::parse_from_rfc3339(&info.created).is_ok());
        assert_eq!(files(f.catalog.dir()), [format!("{}.img", info.id)]);
        assert_eq!(
            std::fs::metadata(f.catalog.path(&info)).unwrap().len(),
            1 << 30
        );
        f.catalog.create("a.b_c", 4096, Mode::Local, true).unwrap();
        let names: Vec<String> = f
            .catalog
            .list()
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["a.b_c", "db-1"]);
        assert_eq!(f.catalog.get("db-1").unwrap(), Some(info.clone()));
        assert_eq!(f.catalog.get("nope").unwrap(), None);

        let volume = f.catalog.open("db-1").unwrap();
        assert_eq!(volume.size(), 1 << 30);
        assert!(!volume.read_only());
        volume.write(4096, &mut b"hello".to_owned(), true).unwrap();
        // One handle per volume while it is open.
        assert!(Arc::ptr_eq(&volume, &f.catalog.open("db-1").unwrap()));
        let read_only = f.catalog.open("a.b_c").unwrap();
        assert!(matches!(
            read_only.write(0, &mut b"x".to_owned(), false),
            Err(BlockError::ReadOnly)
        ));
    }

    #[test]
    fn data_survives_reopening_the_catalog_and_needs_the_master_key() {
        let f = fixture();
        f.catalog.create("v", 1 << 20, Mode::Local, false).unwrap();
        let volume = f.catalog.open("v").unwrap();
        volume
            .write(100, &mut b"kept across restarts".to_owned(), false)
            .unwrap();
        volume.flush().unwrap();
        drop(volume);
        let Fixture { dir, meta, catalog } = f;
        drop(catalog);

        let again = Catalog::new(meta.clone(), dir.path().join("volumes"), sealer(1)).unwrap();
        let mut buf = [0u8; 20];
        again.open("v").unwrap().read(100, &mut buf).unwrap();
        assert_eq!(&buf, b"kept across restarts");

        let other = Catalog::new(meta, dir.path().join("volumes"), sealer(2)).unwrap();
        other.open("v").unwrap().read(100, &mut buf).unwrap();
        assert_ne!(&buf, b"kept across restarts");
    }

    #[test]
    fn duplicate_names_are_refused_without_leaving_files() {
        let f = fixture();
        let first = f.catalog.create("v", 4096, Mode::Local, false).unwrap();
        let err = f.catalog.create("v", 8192, Mode::Local, false).unwrap_err();
        assert!(matches!(err, CatalogError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("\"v\""), "{err}");
        assert_eq!(files(f.catalog.dir()), [format!("{}.img", first.id)]);
        assert_eq!(f.catalog.get("v").unwrap(), Some(first));
    }

    #[test]
    fn bad_names_and_sizes_are_refused() {
        let f = fixture();
        let long = "x".repeat(65);
        for name in [
            "",
            ".hidden",
            "-flag",
            "a/b",
            "a b",
            "vol\u{e9}",
            "..",
            &long,
        ] {
            let err = f
                .catalog
                .create(name, 4096, Mode::Local, false)
                .unwrap_err();
            assert!(
                matches!(err, CatalogError::InvalidName { .. }),
                "{name:?}: {err}"
            );
        }
        f.catalog
            .create(&"x".repeat(64), 4096, Mode::Local, false)
            .unwrap();
        f.catalog
            .create("0.9_a-", 4096, Mode::Local, false)
            .unwrap();
        for size in [0, 100, 4097, 1 << 63, u64::MAX] {
            let err = f
                .catalog
                .create("sized", size, Mode::Local, false)
                .unwrap_err();
            assert!(
                matches!(err, CatalogError::InvalidSize { .. }),
                "{size}: {err}"
            );
            assert!(err.to_string().contains("\"sized\""), "{err}");
        }
        assert_eq!(files(f.catalog.dir()).len(), 2);
    }

    #[test]
    fn a_failed_create_leaves_neither_entry_nor_file() {
        let f = fixture();
        // Valid for the catalog, too large for the file system.
        let err = f
            .catalog
            .create("huge", local::MAX_SIZE, Mode::Local, false)
            .unwrap_err();
        assert!(matches!(err, CatalogError::File { .. }), "{err}");
        assert!(err.to_string().contains("\"huge\""), "{err}");
        assert_eq!(f.catalog.get("huge").unwrap(), None);
        assert!(files(f.catalog.dir()).is_empty());
    }

    #[test]
    fn delete_removes_entry_then_file() {
        let f = fixture();
        let info = f.catalog.create("v", 4096, Mode::Local, false).unwrap();
        let volume = f.catalog.open("v").unwrap();
        assert_eq!(f.catalog.delete("v").unwrap(), info);
        assert_eq!(f.catalog.get("v").unwrap(), None);
        assert!(files(f.catalog.dir()).is_empty());
        assert!(matches!(
            f.catalog.delete("v"),
            Err(CatalogError::NotFound { .. })
        ));
        assert!(matches!(
            f.catalog.open("v"),
            Err(CatalogError::NotFound { .. })
        ));
        // The same name again is a new volume with a new file and key.
        let again = f.catalog.create("v", 4096, Mode::Local, false).unwrap();
        assert_ne!(again.id, info.id);
        assert!(!Arc::ptr_eq(&volume, &f.catalog.open("v").unwrap()));

        // An entry whose file is already gone still deletes.
        std::fs::remove_file(f.catalog.path(&again)).unwrap();
        f.catalog.delete("v").unwrap();
    }

    #[test]
    fn recovery_removes_intended_orphans_and_quarantines_the_rest() {
        let f = fixture();
        let kept = f.catalog.create("kept", 8192, Mode::Local, false).unwrap();
        f.catalog
            .open("kept")
            .unwrap()
            .write(0, &mut [7u8; 4096], true)
            .unwrap();
        // Creates and deletes leave no intent behind.
        let gone = f.catalog.create("gone", 4096, Mode::Local, false).unwrap();
        f.catalog.delete("gone").unwrap();
        assert!(f.meta.list(INTENTS, "").unwrap().is_empty());
        assert!(!f.catalog.path(&gone).exists());
        // What a crash between the file and the entry of `create` leaves: an intent and a file.
        let crashed = "ab".repeat(16);
        let orphan = f.catalog.dir().join(format!("{crashed}.img"));
        std::fs::write(&orphan, b"").unwrap();
        f.meta
            .put_json(INTENTS, &crashed, &intent(IntentOp::Create, "crashed"))
            .unwrap();
        // A file no entry and no intent names: a volume whose entry was lost.
        let lost = f.catalog.dir().join(format!("{}.img", "cd".repeat(16)));
        std::fs::write(&lost, b"data of a volume").unwrap();
        // Not named like a volume file: left alone.
        let stranger = f.catalog.dir().join("notes.img");
        std::fs::write(&stranger, b"mine").unwrap();
        assert_eq!(
            f.catalog.unnamed_files().unwrap(),
            vec![orphan.clone(), lost.clone()]
        );

        let recovered = f.catalog.recover().unwrap();
        assert_eq!(recovered.removed, vec![orphan.clone()]);
        let moved = f
            .catalog
            .dir()
            .join(QUARANTINE)
            .join(format!("{}.img", "cd".repeat(16)));
        assert_eq!(recovered.quarantined, vec![(lost.clone(), moved.clone())]);
        assert!(!orphan.exists() && !lost.exists() && stranger.exists());
        assert_eq!(std::fs::read(&moved).unwrap(), b"data of a volume");
        assert!(f.meta.list(INTENTS, "").unwrap().is_empty());
        assert!(f.catalog.path(&kept).exists());
        let mut buf = [0u8; 4096];
        f.catalog.open("kept").unwrap().read(0, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 4096]);
        assert_eq!(f.catalog.recover().unwrap(), Recovered::default());

        // A second lost file of the same id does not overwrite the first in quarantine.
        std::fs::write(&lost, b"again").unwrap();
        let again = f.catalog.recover().unwrap();
        assert_eq!(again.quarantined[0].1, moved.with_extension("img.1"));
        assert_eq!(std::fs::read(&moved).unwrap(), b"data of a volume");
    }

    #[test]
    fn a_delete_whose_file_stays_is_finished_at_recovery() {
        let f = fixture();
        let info = f.catalog.create("v", 4096, Mode::Local, false).unwrap();
        // What a crash between the entry's removal and the file's leaves.
        f.meta
            .transaction(|tx| {
                tx.delete(TABLE, "v")?;
                tx.put_json(INTENTS, &info.id, &intent(IntentOp::Delete, "v"))
            })
            .unwrap();
        let recovered = f.catalog.recover().unwrap();
        assert_eq!(recovered.removed, vec![f.catalog.path(&info)]);
        assert!(recovered.quarantined.is_empty());
        assert!(!f.catalog.path(&info).exists());
    }

    #[test]
    fn a_missing_file_or_unknown_format_is_a_clear_error() {
        let f = fixture();
        let info = f.catalog.create("v", 4096, Mode::Local, false).unwrap();
        std::fs::remove_file(f.catalog.path(&info)).unwrap();
        let Err(err) = f.catalog.open("v") else {
            panic!("opened")
        };
        assert!(matches!(err, CatalogError::File { .. }), "{err}");
        assert!(err.to_string().contains(&info.id), "{err}");

        let future = VolumeInfo {
            format: LOCAL_FORMAT + 1,
            ..info
        };
        f.meta.put_json(TABLE, "v", &future).unwrap();
        assert!(matches!(
            f.catalog.open("v"),
            Err(CatalogError::Format { .. })
        ));
        f.meta.put(TABLE, "broken", b"{").unwrap();
        let err = f.catalog.list().unwrap_err();
        assert!(err.to_string().contains("\"broken\""), "{err}");
        assert!(f.dir.path().exists());
    }
}

//! The share engine against the directory store and Garage: files land as plain objects
//! under the share's prefix with their POSIX metadata, renames and removes move and delete
//! objects, a restart keeps fileids and uploads what was left, a file changing during its
//! upload is never stored torn, and hostile names are refused with nothing created.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use firn::engines::share::namespace::Kind;
use firn::engines::share::{SetAttrs, Settings, Share, ShareError, Shares, Squash};
use firn::local::meta::MetaStore;
use firn::remote::dir::DirStore;
use firn::remote::faults::{FaultPlan, FaultSettings};
use firn::remote::limit::{Limiter, Policy};
use firn::remote::metered::RemoteMetrics;
use firn::remote::retry::RetryPolicy;
use firn::remote::s3::S3Store;
use firn::remote::{self, Remote};
use rand::RngCore;

mod common;
use common::{boto3_keys, rclone, s3_options};

/// One gateway's share engine over one bucket, reopenable on the same local state.
struct Rig {
    runtime: tokio::runtime::Runtime,
    remote: Arc<dyn Remote>,
    /// The bucket without firn's remote stack: how another tool writes to it.
    raw: Arc<dyn Remote>,
    /// For Garage: the key prefix every object of this rig is under.
    s3_prefix: Option<String>,
    meta: Arc<MetaStore>,
    dir: tempfile::TempDir,
    shares: Option<Shares>,
    cache_max: u64,
    listing_ttl: Option<Duration>,
    /// `Settings::refresh`: how often the share refreshes from the bucket by itself.
    refresh: Option<Duration>,
    read_timeout: Duration,
    /// `Settings::bucket_prefix`: the S3 store's own prefix and its `/`.
    bucket_prefix: String,
    /// The fault injector in the stack (injecting nothing until a test says so).
    faults: Arc<FaultPlan>,
    /// The stack's request counts.
    metrics: Arc<RemoteMetrics>,
}

/// A rig per bucket: the directory store, and Garage when the environment has one.
fn rigs(settle: Duration) -> Vec<Rig> {
    let mut backends: Vec<(Arc<dyn Remote>, Option<String>)> = Vec::new();
    let bucket_dir = tempfile::tempdir().expect("tempdir");
    backends.push((
        Arc::new(DirStore::open(bucket_dir.path().join("bucket")).expect("dir store")),
        None,
    ));
    if let Some(options) = s3_options() {
        let limiter = Arc::new(Limiter::new(Policy::default()));
        let store = Arc::new(S3Store::new(&options, limiter).expect("s3 store"));
        backends.push((store, Some(options.prefix.clone())));
    }
    let rigs = backends
        .into_iter()
        .map(|(backend, s3_prefix)| {
            let mut registry = prometheus_client::registry::Registry::default();
            let raw = backend.clone();
            let faults = Arc::new(FaultPlan::default());
            let metrics = Arc::new(RemoteMetrics::new(&mut registry));
            let stack = remote::stack(
                backend,
                RetryPolicy {
                    first_backoff: Duration::from_millis(20),
                    max_backoff: Duration::from_millis(500),
                    give_up_after: Duration::from_secs(30),
                },
                Arc::new(Limiter::new(Policy::default())),
                metrics.clone(),
                Some(faults.clone()),
            );
            let dir = tempfile::tempdir().expect("tempdir");
            let meta = Arc::new(MetaStore::open(dir.path().join("meta.redb")).expect("meta"));
            let mut rig = Rig {
                runtime: tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime"),
                remote: stack.remote,
                raw,
                s3_prefix: s3_prefix.clone(),
                meta,
                dir,
                shares: None,
                cache_max: Settings::default().cache_max,
                listing_ttl: None,
                refresh: None,
                read_timeout: Settings::default().read_timeout,
                bucket_prefix: s3_prefix
                    .as_deref()
                    .map_or(String::new(), |p| format!("{}/", p.trim_matches('/'))),
                faults,
                metrics,
            };
            rig.reopen(settle);
            rig
        })
        .collect();
    // The directory bucket lives as long as the test process needs it.
    std::mem::forget(bucket_dir);
    rigs
}

impl Rig {
    /// Opens the share engine again on the same metadata and local files (a restart).
    fn reopen(&mut self, settle: Duration) {
        self.shares = None;
        self.shares = Some(
            Shares::open(
                self.meta.clone(),
                self.dir.path().join("shares"),
                self.remote.clone(),
                self.runtime.handle().clone(),
                Settings {
                    settle,
                    cache_max: self.cache_max,
                    refresh: self.refresh,
                    listing_ttl: self.listing_ttl,
                    read_timeout: self.read_timeout,
                    defaults: Default::default(),
                    bucket_prefix: self.bucket_prefix.clone(),
                    max_file: firn::engines::share::MAX_FILE,
                },
                None,
            )
            .expect("shares"),
        );
    }

    fn shares(&self) -> &Shares {
        self.shares.as_ref().expect("open")
    }

    fn share(&self, name: &str) -> Arc<Share> {
        self.shares().share(name).expect("share")
    }

    /// A new share `name` over the prefix `name/`: it, and its root's id.
    fn new_share(&self, name: &str) -> (Arc<Share>, u64) {
        self.shares()
            .create(name, &format!("{name}/"), false, Vec::new(), Squash::Root)
            .expect("create");
        let share = self.share(name);
        let root = share.root();
        (share, root)
    }

    /// Waits until share `name` has nothing left to upload or delete.
    fn wait_clean(&self, name: &str) {
        let started = Instant::now();
        loop {
            let status = self.share(name).status();
            if status.dirty_files == 0 && status.pending_deletes == 0 && status.uploading_files == 0
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "share {name} not uploaded: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn get(&self, key: &str) -> Option<(Vec<u8>, remote::Meta)> {
        match self.runtime.block_on(self.remote.get(key)) {
            Ok(object) => Some((object.body.to_vec(), object.meta)),
            Err(remote::Error::NotFound { .. }) => None,
            Err(e) => panic!("get {key}: {e}"),
        }
    }
}

/// A store that reads every upload's body slowly, in 256 KiB slices a millisecond apart,
/// and notes any body whose bytes are not all one value: a torn read, for the test below,
/// whatever reached the bucket after it.
#[derive(Debug)]
struct Inspecting {
    inner: Arc<dyn Remote>,
    torn: Arc<std::sync::atomic::AtomicU64>,
    /// How long a put waits between reading its body and storing it.
    hold: Duration,
    /// While set, every delete fails (transiently): removed files' objects stay.
    refuse_deletes: Arc<std::sync::atomic::AtomicBool>,
    /// With `refuse_deletes`: deletes of directory markers (`a/b/`) go through all the same.
    spare_markers: bool,
    /// The first put of each key stores its object, then fails (transiently) as if its
    /// answer were lost: below firn's retry layer, which sends the body again.
    lose_first_answer: bool,
    answered: std::sync::Mutex<std::collections::HashSet<String>>,
    /// How long a put waits between storing its object and answering.
    answer_after: Duration,
    /// Puts of keys that contain this fail at once, for good (as a store refusing a key).
    refuse_puts_of: Option<&'static str>,
}

impl Inspecting {
    /// A store over `inner` that inspects every body and changes nothing.
    fn over(inner: Arc<dyn Remote>) -> Inspecting {
        Inspecting {
            inner,
            torn: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            hold: Duration::ZERO,
            refuse_deletes: Default::default(),
            spare_markers: false,
            answer_after: Duration::ZERO,
            lose_first_answer: false,
            answered: Default::default(),
            refuse_puts_of: None,
        }
    }
}

#[async_trait::async_trait]
impl Remote for Inspecting {
    async fn put_body(
        &self,
        key: &str,
        body: Arc<dyn remote::Body>,
        meta: remote::Meta,
    ) -> remote::Result<remote::Stored> {
        if self.refuse_puts_of.is_some_and(|part| key.contains(part)) {
            return Err(remote::Error::Permanent {
                op: "put",
                key: key.to_string(),
                message: "refused by the test".into(),
            });
        }
        let mut bytes = Vec::with_capacity(body.len() as usize);
        let mut at = 0;
        while at < body.len() {
            let end = (at + (256 << 10)).min(body.len());
            bytes.extend_from_slice(&body.read(at..end).await?);
            at = end;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if bytes.iter().any(|&b| b != bytes[0]) {
            self.torn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        tokio::time::sleep(self.hold).await;
        let stored = self
            .inner
            .put_body(key, Arc::new(bytes::Bytes::from(bytes)), meta)
            .await;
        tokio::time::sleep(self.answer_after).await;
        if self.lose_first_answer
            && stored.is_ok()
            && self.answered.lock().unwrap().insert(key.to_string())
        {
            return Err(remote::Error::Transient {
                op: "put",
                key: key.to_string(),
                message: "stored, but the answer was lost (the test)".into(),
            });
        }
        stored
    }
    async fn get_to(&self, key: &str, sink: &dyn remote::Sink) -> remote::Result<remote::Fetched> {
        self.inner.get_to(key, sink).await
    }
    async fn create(
        &self,
        key: &str,
        body: bytes::Bytes,
        meta: remote::Meta,
    ) -> remote::Result<()> {
        self.inner.create(key, body, meta).await
    }
    async fn get_range_if(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
        etag: Option<&str>,
    ) -> remote::Result<bytes::Bytes> {
        self.inner.get_range_if(key, range, etag).await
    }
    async fn head(&self, key: &str) -> remote::Result<Option<remote::ObjectInfo>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> remote::Result<Vec<remote::ObjectInfo>> {
        self.inner.list(prefix).await
    }
    async fn list_dir(&self, prefix: &str) -> remote::Result<remote::Listing> {
        self.inner.list_dir(prefix).await
    }
    async fn list_dir_page(
        &self,
        prefix: &str,
        cursor: Option<&str>,
    ) -> remote::Result<remote::ListingPage> {
        self.inner.list_dir_page(prefix, cursor).await
    }
    async fn delete(&self, key: &str) -> remote::Result<()> {
        if self
            .refuse_deletes
            .load(std::sync::atomic::Ordering::Relaxed)
            && !(self.spare_markers && key.ends_with('/'))
        {
            return Err(remote::Error::Transient {
                op: "delete",
                key: key.to_string(),
                message: "refused by the test".into(),
            });
        }
        self.inner.delete(key).await
    }
}

/// The names in directory `dir` of `share`, sorted.
fn names(share: &Share, dir: u64) -> Vec<String> {
    let mut names: Vec<String> = share
        .list(dir, None, 100)
        .expect("list")
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    names.sort();
    names
}

fn random(len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    rand::rng().fill_bytes(&mut data);
    data
}

#[test]
fn files_land_as_plain_objects_with_their_metadata() {
    for rig in rigs(Duration::from_millis(200)) {
        rig.shares()
            .create("media", "media/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("media");
        let a = share
            .mkdir(share.root(), "a", 0o755, 1000, 100)
            .expect("mkdir");
        let b = share.mkdir(a.fileid, "b", 0o750, 1000, 100).expect("mkdir");
        let c = share
            .create(b.fileid, "c.txt", 0o644, 1000, 100, true)
            .expect("create");
        // Over the S3 store's multipart threshold, written in pieces as a client would.
        let data = random(7 << 20);
        for (i, piece) in data.chunks(1 << 20).enumerate() {
            share
                .write(c.fileid, (i << 20) as u64, piece, false)
                .expect("write");
        }
        share.commit(c.fileid).expect("commit");
        let empty = share
            .create(share.root(), "empty", 0o600, 0, 0, true)
            .expect("create");
        let link = share
            .symlink(a.fileid, "to-c", "b/c.txt", 1000, 100)
            .expect("symlink");
        assert_eq!(link.kind, Kind::Symlink);
        rig.wait_clean("media");

        let (body, meta) = rig.get("media/a/b/c.txt").expect("c.txt uploaded");
        assert!(body == data, "c.txt differs in the bucket");
        assert_eq!(meta["file-permissions"], "100644");
        assert_eq!(meta["file-owner"], "1000");
        assert_eq!(meta["file-group"], "100");
        let mtime = share.attrs(c.fileid).expect("attrs").mtime_ns;
        assert_eq!(meta["file-mtime"], format!("{mtime}ns"));
        let (body, meta) = rig.get("media/empty").expect("empty uploaded");
        assert!(body.is_empty());
        assert_eq!(meta["file-permissions"], "100600");
        let (body, meta) = rig.get("media/a/to-c").expect("symlink uploaded");
        assert_eq!(body, b"b/c.txt");
        assert_eq!(meta["file-permissions"], "120777");
        assert_eq!(share.readlink(link.fileid).expect("readlink"), "b/c.txt");
        // Read back through the share too.
        let (head, eof) = share.read(c.fileid, 0, 4096).expect("read");
        assert_eq!(head, &data[..4096]);
        assert!(!eof);
        let (tail, eof) = share
            .read(c.fileid, data.len() as u64 - 10, 4096)
            .expect("read");
        assert_eq!(tail, &data[data.len() - 10..]);
        assert!(eof);
        assert_eq!(share.attrs(empty.fileid).expect("attrs").size, 0);
        let status = share.status();
        // Three files, and the markers of directories a and a/b.
        assert_eq!(status.uploaded_files, 5, "{status:?}");
        // What rclone, a client firn did not write, sees in the bucket.
        if let Some(prefix) = &rig.s3_prefix {
            let path = format!(
                "{}/{prefix}/media/a/b/c.txt",
                std::env::var("FIRN_TEST_S3_BUCKET").expect("bucket")
            );
            let cat = rclone(&["cat", &format!("garage:{path}")]);
            assert!(cat == data, "rclone cat differs from what was written");
            let listed = rclone(&["lsjson", "-M", &format!("garage:{path}")]);
            let listed: serde_json::Value = serde_json::from_slice(&listed).expect("lsjson");
            let meta = &listed[0]["Metadata"];
            assert_eq!(meta["file-permissions"], "100644", "{listed}");
            assert_eq!(meta["file-owner"], "1000", "{listed}");
            assert_eq!(meta["file-group"], "100", "{listed}");
        }
    }
}

/// Directories are marker objects (`a/b/`) with their metadata: an empty one persists in
/// the bucket, a rename moves the markers below it, a chmod rewrites one, an rmdir deletes
/// it, and a marker another tool wrote brings its directory, mode and owner into the share.
#[test]
fn new_directories_and_symlinks_go_up_without_waiting_to_settle() {
    for rig in rigs(Duration::from_secs(3600)) {
        rig.shares()
            .create("n", "n/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("n");
        let d = share.mkdir(share.root(), "d", 0o755, 0, 0).expect("mkdir");
        share
            .symlink(d.fileid, "l", "../elsewhere", 0, 0)
            .expect("symlink");
        let f = share
            .create(d.fileid, "f", 0o644, 0, 0, true)
            .expect("create");
        share.write(f.fileid, 0, b"settling", false).expect("write");
        let head = |key: &str| rig.runtime.block_on(rig.raw.head(key)).expect("head");
        let started = Instant::now();
        while head("n/d/").is_none() || head("n/d/l").is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the new directory or symlink waits to settle"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The file, neither committed nor settled, is not up yet.
        assert!(head("n/d/f").is_none());
        assert_eq!(share.status().dirty_files, 1);
    }
}

#[test]
fn empty_directories_persist_as_marker_objects() {
    for rig in rigs(Duration::from_millis(100)) {
        let (share, root) = rig.new_share("m");
        let head = |key: &str| rig.runtime.block_on(rig.raw.head(key)).expect("head");
        let empty = share.mkdir(root, "empty", 0o750, 7, 8).expect("mkdir");
        let p = share.mkdir(root, "p", 0o755, 0, 0).expect("mkdir");
        share.mkdir(p.fileid, "q", 0o700, 0, 0).expect("mkdir");
        rig.wait_clean("m");
        let marker = head("m/empty/").expect("m/empty/ is in the bucket");
        assert_eq!(marker.meta["file-permissions"], "40750");
        assert_eq!(marker.meta["file-owner"], "7");
        assert_eq!(marker.meta["file-group"], "8");
        assert!(head("m/p/q/").is_some());
        if let Some(prefix) = &rig.s3_prefix {
            // As an S3 tool sees them: empty objects under their exact names.
            assert_eq!(
                boto3_keys(&format!("{prefix}/m/")),
                ["empty/", "p/", "p/q/"].map(|k| format!("{prefix}/m/{k}"))
            );
        }
        share.rename(root, "p", root, "p2").expect("rename");
        share
            .setattr(
                empty.fileid,
                firn::engines::share::SetAttrs {
                    mode: Some(0o700),
                    ..Default::default()
                },
            )
            .expect("chmod");
        rig.wait_clean("m");
        assert!(
            head("m/p/").is_none() && head("m/p/q/").is_none(),
            "old markers stay"
        );
        assert_eq!(
            head("m/p2/q/").expect("moved").meta["file-permissions"],
            "40700"
        );
        assert_eq!(
            head("m/empty/").expect("kept").meta["file-permissions"],
            "40700"
        );
        share.rmdir(root, "empty").expect("rmdir");
        rig.wait_clean("m");
        assert!(head("m/empty/").is_none(), "rmdir left its marker");
        // A marker another tool wrote, and a directory only a deeper object implies.
        let meta = remote::Meta::from([
            ("file-permissions".to_string(), "40711".to_string()),
            ("file-owner".to_string(), "42".to_string()),
        ]);
        rig.runtime
            .block_on(rig.raw.put("m/theirs/", bytes::Bytes::new(), meta))
            .expect("marker by another tool");
        rig.runtime
            .block_on(rig.raw.put(
                "m/implied/x",
                bytes::Bytes::from_static(b"x"),
                remote::Meta::new(),
            ))
            .expect("object by another tool");
        share.refresh("").expect("refresh");
        let theirs = share
            .attrs(share.lookup(root, "theirs").expect("theirs"))
            .expect("attrs");
        assert_eq!(
            (theirs.kind, theirs.mode, theirs.uid),
            (Kind::Dir, 0o711, 42)
        );
        let implied = share
            .attrs(share.lookup(root, "implied").expect("implied"))
            .expect("attrs");
        assert_eq!(
            (implied.kind, implied.mode, implied.uid),
            (Kind::Dir, 0o777, 65534),
            "the default mode and owner"
        );
        // Found there, not made here: nothing to upload.
        assert_eq!(share.status().dirty_files, 0);
        share.rmdir(root, "theirs").expect("rmdir");
        rig.wait_clean("m");
        assert!(
            head("m/theirs/").is_none(),
            "rmdir left the other tool's marker"
        );
        // A marker with data (S3 lets `a/` hold bytes; the directory store does not) is
        // another tool's object: a chmod here never puts an empty marker over it, and an
        // rmdir leaves it.
        let Some(prefix) = &rig.s3_prefix else {
            continue;
        };
        common::boto3_put(&format!("{prefix}/m/data/"), b"notes", &[]);
        share.refresh("").expect("refresh");
        let data = share.lookup(root, "data").expect("data");
        share
            .setattr(
                data,
                firn::engines::share::SetAttrs {
                    mode: Some(0o700),
                    ..Default::default()
                },
            )
            .expect("chmod");
        rig.wait_clean("m");
        assert_eq!(share.attrs(data).expect("attrs").mode, 0o700);
        let size = |key: &str| head(key).map(|info| info.size);
        assert_eq!(size("m/data/"), Some(5), "a chmod emptied the marker");
        share.rmdir(root, "data").expect("rmdir");
        rig.wait_clean("m");
        assert_eq!(size("m/data/"), Some(5), "an rmdir deleted it");
    }
}

#[test]
fn renames_and_removes_move_and_delete_the_objects() {
    for rig in rigs(Duration::from_millis(100)) {
        let (share, root) = rig.new_share("s");
        let dir = share.mkdir(root, "d", 0o755, 0, 0).expect("mkdir");
        let mut files = Vec::new();
        for name in ["x", "y", "z"] {
            let f = share
                .create(dir.fileid, name, 0o644, 0, 0, true)
                .expect("create");
            share
                .write(f.fileid, 0, name.as_bytes(), true)
                .expect("write");
            files.push(f.fileid);
        }
        rig.wait_clean("s");
        assert!(rig.get("s/d/x").is_some());
        // A directory renamed: every object below it moves.
        share.rename(root, "d", root, "e").expect("rename dir");
        // A file renamed over another: one object stays, the source's goes.
        share
            .rename(dir.fileid, "x", dir.fileid, "y")
            .expect("rename over");
        share.remove(dir.fileid, "z").expect("remove");
        rig.wait_clean("s");
        for gone in ["s/d/x", "s/d/y", "s/d/z", "s/e/x", "s/e/z"] {
            assert!(rig.get(gone).is_none(), "{gone} is still in the bucket");
        }
        let (body, _) = rig.get("s/e/y").expect("e/y");
        assert_eq!(body, b"x", "e/y holds what x held");
        // Fileids follow the files.
        assert_eq!(share.lookup(dir.fileid, "y").expect("lookup"), files[0]);
        assert_eq!(share.path(files[0]).expect("path"), "e/y");
        assert!(matches!(share.attrs(files[2]), Err(ShareError::Stale(_))));
        // Directories: only empty ones go, and not with REMOVE.
        assert_eq!(share.rmdir(root, "e"), Err(ShareError::NotEmpty));
        assert_eq!(share.remove(root, "e"), Err(ShareError::IsDir));
        share.remove(dir.fileid, "y").expect("remove");
        share.rmdir(root, "e").expect("rmdir");
        rig.wait_clean("s");
        assert!(rig.get("s/e/y").is_none());
        assert!(share.list(root, None, 100).expect("list").is_empty());
    }
}

#[test]
fn a_restart_keeps_fileids_and_uploads_what_was_left() {
    for mut rig in rigs(Duration::from_secs(3600)) {
        rig.shares()
            .create("r", "r/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("r");
        let f = share
            .create(share.root(), "kept", 0o640, 7, 8, true)
            .expect("create");
        let data = random(100_000);
        share.write(f.fileid, 0, &data, false).expect("write");
        share.commit(f.fileid).expect("commit");
        // Committed but settling for an hour: not yet uploaded when the gateway stops.
        let pending = share
            .create(share.root(), "later", 0o644, 0, 0, true)
            .expect("create");
        share
            .write(pending.fileid, 0, b"later", true)
            .expect("write");
        drop(share);
        rig.reopen(Duration::from_secs(3600));
        let share = rig.share("r");
        assert_eq!(
            share.lookup(share.root(), "kept").expect("lookup"),
            f.fileid
        );
        assert_eq!(
            share.lookup(share.root(), "later").expect("lookup"),
            pending.fileid
        );
        rig.wait_clean("r");
        let (body, meta) = rig.get("r/later").expect("uploaded after the restart");
        assert_eq!(body, b"later");
        assert_eq!(meta["file-permissions"], "100644");
        let (body, meta) = rig.get("r/kept").expect("kept");
        assert!(body == data);
        assert_eq!(meta["file-owner"], "7");
        assert_eq!(meta["file-group"], "8");
    }
}

#[test]
fn status_counts_what_waits_to_go_up() {
    for mut rig in rigs(Duration::from_secs(3600)) {
        let (share, root) = rig.new_share("st");
        let a = share
            .create(root, "a", 0o644, 0, 0, true)
            .expect("a")
            .fileid;
        let b = share
            .create(root, "b", 0o644, 0, 0, true)
            .expect("b")
            .fileid;
        share.write(a, 0, &random(100_000), false).expect("write a");
        // Writes inside a file and past its end, with a hole.
        share.write(b, 0, &random(60_000), false).expect("write b");
        share.write(b, 200_000, &random(5), false).expect("write b");
        share.write(b, 1000, &random(10), false).expect("write b");
        let status = share.status();
        assert_eq!((status.dirty_files, status.dirty_bytes), (2, 300_005));
        // Truncated.
        share
            .setattr(
                a,
                firn::engines::share::SetAttrs {
                    size: Some(1000),
                    ..Default::default()
                },
            )
            .expect("truncate");
        assert_eq!(share.status().dirty_bytes, 201_005);
        // The same after a restart, before anything went up.
        drop(share);
        rig.reopen(Duration::from_secs(3600));
        let share = rig.share("st");
        let status = share.status();
        assert_eq!((status.dirty_files, status.dirty_bytes), (2, 201_005));
        share.commit(a).expect("commit");
        share.commit(b).expect("commit");
        rig.wait_clean("st");
        let status = share.status();
        assert_eq!(
            (status.dirty_files, status.dirty_bytes, status.cached_files),
            (0, 0, 2)
        );
        assert!(status.cached_bytes >= 201_005, "{status:?}");
        // New attributes: the whole object goes up again, so its bytes wait again.
        share
            .setattr(
                a,
                firn::engines::share::SetAttrs {
                    mode: Some(0o600),
                    ..Default::default()
                },
            )
            .expect("chmod");
        let status = share.status();
        assert_eq!((status.dirty_files, status.dirty_bytes), (1, 1000));
        // Removes wait as deletes while the bucket is unreachable.
        rig.faults.outage(Duration::from_secs(600));
        share.remove(root, "b").expect("remove");
        share.remove(root, "a").expect("remove");
        let status = share.status();
        assert_eq!(
            (status.dirty_files, status.pending_deletes),
            (0, 2),
            "{status:?}"
        );
        rig.faults.end_outage();
        rig.wait_clean("st");
        assert!(rig.get("st/a").is_none() && rig.get("st/b").is_none());
    }
}

/// Large files are read for their upload as it goes, small ones whole before it: both ways.
#[test]
fn a_file_changing_during_its_upload_is_never_stored_torn() {
    for len in [8 << 20, 64 << 10] {
        a_file_of_len_changing_during_its_upload_is_never_stored_torn(len);
    }
}

fn a_file_of_len_changing_during_its_upload_is_never_stored_torn(len: usize) {
    for mut rig in rigs(Duration::ZERO) {
        let torn = Arc::new(std::sync::atomic::AtomicU64::new(0));
        rig.remote = Arc::new(Inspecting {
            torn: torn.clone(),
            ..Inspecting::over(rig.remote.clone())
        });
        rig.reopen(Duration::ZERO);
        rig.shares()
            .create("t", "t/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("t");
        let f = share
            .create(share.root(), "f", 0o644, 0, 0, true)
            .expect("create");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Each round replaces the whole file with one byte value: any object that mixes
        // two values was read while a round was under way.
        let writer = {
            let (share, stop) = (share.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut value = 0u8;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    value = value.wrapping_add(1);
                    // One write per round: the file between two writes is a state an upload
                    // may take (each write is whole, no more is promised), so a round in
                    // pieces could be uploaded half old, half new without any tear.
                    share
                        .write(f.fileid, 0, &vec![value; len], false)
                        .expect("write");
                    share.commit(f.fileid).expect("commit");
                    // Now and then quiet for longer than an upload takes, so some finish.
                    let pause = if rand::random_bool(0.2) {
                        300
                    } else {
                        rand::random_range(0..20)
                    };
                    std::thread::sleep(Duration::from_millis(pause));
                }
                value
            })
        };
        let started = Instant::now();
        let mut checked = 0;
        while started.elapsed() < Duration::from_secs(4) {
            // Empty is the file as created, uploaded before the first write reached it.
            if let Some((body, _)) = rig.get("t/f").filter(|(body, _)| !body.is_empty()) {
                assert_eq!(body.len(), len);
                assert!(
                    body.iter().all(|&b| b == body[0]),
                    "a torn object: it mixes {} and others",
                    body[0]
                );
                checked += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let last = writer.join().expect("writer");
        rig.wait_clean("t");
        let (body, _) = rig.get("t/f").expect("final object");
        assert!(
            body.iter().all(|&b| b == last),
            "the final object is not the last write"
        );
        eprintln!("{checked} objects checked");
        assert!(checked > 3, "only {checked} objects checked");
        assert_eq!(
            torn.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "uploads read a file while it changed"
        );
    }
}

#[test]
fn a_refresh_before_the_bucket_catches_up_brings_back_nothing_removed_or_renamed() {
    for mut rig in rigs(Duration::from_secs(3600)) {
        let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
        rig.remote = Arc::new(Inspecting {
            refuse_deletes: refuse.clone(),
            ..Inspecting::over(rig.remote.clone())
        });
        rig.reopen(Duration::from_secs(3600));
        let (share, root) = rig.new_share("g");
        let d = share.mkdir(root, "d", 0o755, 0, 0).expect("mkdir").fileid;
        for (dir, name) in [(root, "x"), (d, "y"), (root, "z")] {
            let f = share.create(dir, name, 0o644, 0, 0, true).expect("create");
            share
                .write(f.fileid, 0, name.as_bytes(), false)
                .expect("write");
            share.commit(f.fileid).expect("commit");
        }
        rig.wait_clean("g");
        // The objects of x (removed) and of d/ and d/y (renamed, not uploaded again: an
        // hour to settle) stay in the bucket while a refresh lists them.
        refuse.store(true, std::sync::atomic::Ordering::Relaxed);
        share.remove(root, "x").expect("remove");
        share.rename(root, "d", root, "e").expect("rename");
        share.rename(root, "z", root, "w").expect("rename");
        assert!(rig.get("g/x").is_some() && rig.get("g/d/y").is_some());
        let report = share.refresh("").expect("refresh");
        let names = |dir| names(&share, dir);
        assert_eq!(names(root), ["e", "w"], "{report:?}");
        let e = share.lookup(root, "e").expect("e");
        assert_eq!(names(e), ["y"]);
        // Once the bucket catches up, the old keys go and the new ones hold the files.
        refuse.store(false, std::sync::atomic::Ordering::Relaxed);
        for (dir, name) in [(root, "e"), (e, "y"), (root, "w")] {
            share
                .commit(share.lookup(dir, name).expect("lookup"))
                .expect("commit");
        }
        rig.wait_clean("g");
        for gone in ["g/x", "g/d/y", "g/z"] {
            assert!(rig.get(gone).is_none(), "{gone} is still in the bucket");
        }
        assert_eq!(rig.get("g/e/y").expect("e/y").0, b"y");
        assert_eq!(rig.get("g/w").expect("w").0, b"z");
        share.refresh("").expect("refresh");
        assert_eq!(names(root), ["e", "w"]);
    }
}

#[test]
fn a_removed_directory_never_comes_back_while_objects_below_it_wait_to_go() {
    for mut rig in rigs(Duration::ZERO) {
        let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
        rig.remote = Arc::new(Inspecting {
            refuse_deletes: refuse.clone(),
            spare_markers: true,
            ..Inspecting::over(rig.remote.clone())
        });
        rig.reopen(Duration::ZERO);
        let (share, root) = rig.new_share("g");
        let d = share.mkdir(root, "d", 0o755, 0, 0).expect("mkdir").fileid;
        for name in ["f0", "f1", "f2"] {
            let f = share.create(d, name, 0o644, 0, 0, true).expect("create");
            share.write(f.fileid, 0, b"x", false).expect("write");
            share.commit(f.fileid).expect("commit");
        }
        rig.wait_clean("g");
        // `rm -rf d` while the bucket refuses to delete the files' objects (but not the
        // directory's marker): the objects below d/ stay, and list d as a directory.
        refuse.store(true, std::sync::atomic::Ordering::Relaxed);
        for name in ["f0", "f1", "f2"] {
            share.remove(d, name).expect("remove");
        }
        share.rmdir(root, "d").expect("rmdir");
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            rig.get("g/d/f0").is_some(),
            "no test: the object was deleted"
        );
        let report = share.refresh("").expect("refresh");
        assert!(
            names(&share, root).is_empty(),
            "the refresh took in {report:?}"
        );
        refuse.store(false, std::sync::atomic::Ordering::Relaxed);
        rig.wait_clean("g");
        let listed = rig.runtime.block_on(rig.remote.list("g/")).expect("list");
        assert!(listed.is_empty(), "left in the bucket: {listed:?}");
        share.refresh("").expect("refresh");
        assert!(names(&share, root).is_empty());
    }
}

/// A file removed or renamed while its first upload is being answered (its object stored,
/// the answer not back yet, so nothing records the object): a refresh in that window takes
/// nothing in, and once the answers come, the objects of the old names go.
#[test]
fn a_refresh_during_a_first_upload_brings_back_nothing_removed_or_renamed() {
    for mut rig in rigs(Duration::ZERO) {
        rig.remote = Arc::new(Inspecting {
            answer_after: Duration::from_secs(3),
            ..Inspecting::over(rig.remote.clone())
        });
        rig.reopen(Duration::ZERO);
        let (share, root) = rig.new_share("r");
        for name in ["x", "y"] {
            let f = share.create(root, name, 0o644, 0, 0, true).expect("create");
            share
                .write(f.fileid, 0, name.as_bytes(), false)
                .expect("write");
            share.commit(f.fileid).expect("commit");
        }
        let started = Instant::now();
        while rig.get("r/x").is_none() || rig.get("r/y").is_none() {
            assert!(started.elapsed() < Duration::from_secs(20), "never stored");
            std::thread::sleep(Duration::from_millis(10));
        }
        share.remove(root, "x").expect("remove");
        share.rename(root, "y", root, "z").expect("rename");
        let names = || names(&share, root);
        let report = share.refresh("").expect("refresh");
        assert_eq!(names(), ["z"], "the refresh took in {report:?}");
        rig.wait_clean("r");
        assert!(rig.get("r/x").is_none(), "the removed file's object stayed");
        assert!(rig.get("r/y").is_none(), "the old name's object stayed");
        assert_eq!(rig.get("r/z").expect("z").0, b"y");
        share.refresh("").expect("refresh");
        assert_eq!(names(), ["z"]);
    }
}

/// A directory renamed while a refresh is taking its objects in moves whole: the files taken
/// in before the rename and those taken in after it all live under the new name, their
/// objects go to the new keys, and nothing comes back under the old name.
#[test]
fn a_directory_renamed_while_a_refresh_takes_it_in_moves_whole() {
    const FILES: usize = 60;
    for rig in rigs(Duration::ZERO) {
        for i in 0..FILES {
            rig.runtime
                .block_on(rig.raw.put(
                    &format!("m/d/s/f{i:03}"),
                    bytes::Bytes::from(format!("file {i}")),
                    remote::Meta::new(),
                ))
                .expect("put");
        }
        let (share, root) = rig.new_share("m");
        // Every request waits: the refresh takes a while over the objects.
        rig.faults.set(FaultSettings {
            latency_ms: 30,
            ..Default::default()
        });
        let refresh = {
            let share = share.clone();
            std::thread::spawn(move || share.refresh(""))
        };
        let in_s = |top: &str| {
            share
                .lookup(root, top)
                .and_then(|d| share.lookup(d, "s"))
                .map(|s| names(&share, s))
        };
        let started = Instant::now();
        while in_s("d").map_or(0, |names| names.len()) < 10 {
            assert!(started.elapsed() < Duration::from_secs(30), "no refresh");
            std::thread::sleep(Duration::from_millis(5));
        }
        share.rename(root, "d", root, "e").expect("rename");
        let report = refresh.join().expect("refresh").expect("refresh");
        assert!(
            report.added < FILES as u64 + 2,
            "the rename came after the refresh: no test ({report:?})"
        );
        rig.faults.set(FaultSettings::default());
        rig.wait_clean("m");
        share.refresh("").expect("refresh again");
        assert_eq!(names(&share, root), ["e"]);
        let files = in_s("e").expect("e/s");
        assert_eq!(files.len(), FILES, "{files:?}");
        let s = share
            .lookup(share.lookup(root, "e").expect("e"), "s")
            .expect("s");
        for i in [0, FILES / 2, FILES - 1] {
            let id = share.lookup(s, &format!("f{i:03}")).expect("file");
            let (data, _) = share.read(id, 0, 100).expect("read");
            assert_eq!(data, format!("file {i}").as_bytes());
        }
        let keys: Vec<String> = rig
            .runtime
            .block_on(rig.remote.list("m/"))
            .expect("list")
            .into_iter()
            .map(|o| o.key)
            .filter(|k| !k.ends_with('/'))
            .collect();
        assert!(
            keys.len() == FILES && keys.iter().all(|k| k.starts_with("m/e/s/f")),
            "{keys:?}"
        );
    }
}

#[test]
fn an_upload_recorded_after_its_file_was_renamed_brings_back_no_old_name() {
    // Uploads store their object 1 s after reading the file and answer 1 s after that: the
    // file renamed in between goes up under its new name next, and until that object is
    // stored, the old name's is the file's, under a name it no longer has. A refresh
    // meanwhile must not take it in.
    for mut rig in rigs(Duration::ZERO) {
        rig.remote = Arc::new(Inspecting {
            hold: Duration::from_secs(1),
            answer_after: Duration::from_secs(1),
            ..Inspecting::over(rig.remote.clone())
        });
        rig.reopen(Duration::ZERO);
        let (share, root) = rig.new_share("r");
        let f = share.create(root, "y", 0o644, 0, 0, true).expect("create");
        share.write(f.fileid, 0, b"y", false).expect("write");
        share.commit(f.fileid).expect("commit");
        let started = Instant::now();
        while rig.get("r/y").is_none() {
            assert!(started.elapsed() < Duration::from_secs(20), "never stored");
            std::thread::sleep(Duration::from_millis(10));
        }
        share.rename(root, "y", root, "z").expect("rename");
        // Half-way between y's upload being recorded (1 s after its object was stored) and
        // z's object being stored (1 s after that).
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            rig.get("r/z").is_none(),
            "z went up before the refresh: no test"
        );
        let report = share.refresh("").expect("refresh");
        assert_eq!(names(&share, root), ["z"], "the refresh took in {report:?}");
        rig.wait_clean("r");
        assert!(rig.get("r/y").is_none(), "the old name's object stayed");
        assert_eq!(rig.get("r/z").expect("z").0, b"y");
        share.refresh("").expect("refresh");
        assert_eq!(names(&share, root), ["z"]);
    }
}

#[test]
fn files_removed_or_renamed_while_their_upload_is_retried_leave_no_object_behind() {
    for mut rig in rigs(Duration::from_millis(500)) {
        // Firn's stack over a store that loses the first answer to each put: the retry sends
        // the body again, and finds the file changed (removed, renamed) since.
        let mut registry = prometheus_client::registry::Registry::default();
        rig.remote = remote::stack(
            Arc::new(Inspecting {
                answer_after: Duration::from_secs(1),
                lose_first_answer: true,
                ..Inspecting::over(rig.raw.clone())
            }),
            RetryPolicy {
                first_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(500),
                give_up_after: Duration::from_secs(30),
            },
            Arc::new(Limiter::new(Policy::default())),
            Arc::new(RemoteMetrics::new(&mut registry)),
            None,
        )
        .remote;
        rig.reopen(Duration::from_millis(500));
        let (share, root) = rig.new_share("t");
        // Past the size read whole before the upload: the retry reads the file again.
        let data = random(512 << 10);
        for name in ["gone", "moving"] {
            let f = share.create(root, name, 0o644, 0, 0, true).expect("create");
            share.write(f.fileid, 0, &data, false).expect("write");
            share.commit(f.fileid).expect("commit");
        }
        let started = Instant::now();
        while rig.get("t/gone").is_none() || rig.get("t/moving").is_none() {
            assert!(started.elapsed() < Duration::from_secs(20), "never stored");
            std::thread::sleep(Duration::from_millis(10));
        }
        share.remove(root, "gone").expect("remove");
        share.rename(root, "moving", root, "moved").expect("rename");
        rig.wait_clean("t");
        assert!(
            rig.get("t/gone").is_none(),
            "the removed file's object stayed"
        );
        assert!(
            rig.get("t/moving").is_none(),
            "the old name's object stayed"
        );
        assert_eq!(rig.get("t/moved").expect("moved").0, data);
        share.refresh("").expect("refresh");
        assert_eq!(names(&share, root), ["moved"]);
    }
}

#[test]
fn hostile_names_are_refused_and_create_nothing() {
    for rig in rigs(Duration::from_millis(100)) {
        let (share, root) = rig.new_share("h");
        let long = "n".repeat(256);
        for name in ["", ".", "..", "a/b", "../x", "bad\nname", long.as_str()] {
            let made = share.create(root, name, 0o644, 0, 0, true);
            assert!(
                matches!(
                    made,
                    Err(ShareError::Invalid(_) | ShareError::NameTooLong(_))
                ),
                "{name:?}: {made:?}"
            );
            assert!(share.mkdir(root, name, 0o755, 0, 0).is_err(), "{name:?}");
        }
        // A path longer than an object key can be is refused at the name that crosses it.
        let mut dir = root;
        let mut refused = false;
        for _ in 0..10 {
            match share.mkdir(dir, &"d".repeat(200), 0o755, 0, 0) {
                Ok(attrs) => dir = attrs.fileid,
                Err(ShareError::NameTooLong(_)) => {
                    refused = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused, "a 2000-byte path was taken");
        // A directory's "." and ".." are not entries to rename or remove: taking them would
        // give a directory a second name and, moved below itself, a cycle.
        let sub = share.mkdir(root, "sub", 0o755, 0, 0).expect("mkdir").fileid;
        for name in [".", ".."] {
            for (from, to) in [(sub, root), (root, sub)] {
                assert!(
                    matches!(
                        share.rename(from, name, to, "z"),
                        Err(ShareError::Invalid(_))
                    ),
                    "rename {name:?}"
                );
            }
            assert!(share.remove(sub, name).is_err(), "remove {name:?}");
            assert!(share.rmdir(sub, name).is_err(), "rmdir {name:?}");
        }
        assert_eq!(share.path(sub).expect("path"), "sub");
        // Past the largest object S3 stores: FBIG for the client, nothing written.
        let big = share
            .create(sub, "big", 0o644, 0, 0, true)
            .expect("create")
            .fileid;
        let max = firn::engines::share::MAX_FILE;
        assert_eq!(
            share.write(big, max, b"x", false),
            Err(ShareError::TooBig(max))
        );
        let grow = firn::engines::share::SetAttrs {
            size: Some(max + 1),
            ..Default::default()
        };
        assert_eq!(share.setattr(big, grow), Err(ShareError::TooBig(max)));
        assert_eq!(share.attrs(big).expect("attrs").size, 0);
        share.remove(sub, "big").expect("remove");
        assert!(share.list(sub, None, 10).expect("list").is_empty());
        share.rmdir(root, "sub").expect("rmdir");
        assert_eq!(
            share.list(root, None, 10).expect("list").len(),
            1,
            "only the deep directory exists"
        );
        // Bad share names and prefixes.
        for (name, prefix) in [
            ("..", "p/"),
            ("a/b", "p/"),
            // Taken for an option by the CLI and by mount commands.
            ("-o", "p/"),
            ("ok", "no-slash"),
            ("ok", "../"),
            ("ok", "a//"),
        ] {
            assert!(
                rig.shares()
                    .create(name, prefix, false, Vec::new(), Squash::Root)
                    .is_err(),
                "{name:?} {prefix:?}"
            );
        }
        assert_eq!(
            rig.shares()
                .create("h", "x/", false, Vec::new(), Squash::Root),
            Err(ShareError::ShareExists("h".into()))
        );
        // A read-only share refuses changes.
        rig.shares()
            .create("ro", "ro/", true, Vec::new(), Squash::Root)
            .expect("create");
        let ro = rig.share("ro");
        assert_eq!(
            ro.create(ro.root(), "f", 0o644, 0, 0, true),
            Err(ShareError::ReadOnly)
        );
    }
}

#[test]
fn files_renamed_or_removed_during_their_upload_leave_no_object_behind() {
    for mut rig in rigs(Duration::ZERO) {
        // Uploads read their file, then take 200 ms to store it: the renames and removes
        // below land after the read and before the object is there.
        rig.remote = Arc::new(Inspecting {
            hold: Duration::from_millis(200),
            ..Inspecting::over(rig.remote.clone())
        });
        rig.reopen(Duration::ZERO);
        let (share, root) = rig.new_share("m");
        let data = random(4 << 20);
        for round in 0..6 {
            let dir = share
                .mkdir(root, &format!("d{round}"), 0o755, 0, 0)
                .expect("mkdir");
            let f = share
                .create(dir.fileid, "f", 0o644, 0, 0, true)
                .expect("create");
            share.write(f.fileid, 0, &data, false).expect("write");
            share.commit(f.fileid).expect("commit");
            std::thread::sleep(Duration::from_millis(100));
            if round % 2 == 0 {
                share
                    .rename(root, &format!("d{round}"), root, &format!("moved{round}"))
                    .expect("rename");
            } else {
                share.remove(dir.fileid, "f").expect("remove");
            }
        }
        rig.wait_clean("m");
        let listed: Vec<String> = rig
            .runtime
            .block_on(rig.remote.list("m/"))
            .expect("list")
            .into_iter()
            .map(|o| o.key)
            .collect();
        // The files, and the markers of the directories (an emptied one stays).
        assert_eq!(
            listed,
            [
                "m/d1/",
                "m/d3/",
                "m/d5/",
                "m/moved0/",
                "m/moved0/f",
                "m/moved2/",
                "m/moved2/f",
                "m/moved4/",
                "m/moved4/f"
            ]
        );
    }
}

/// One long upload holds up no other: a file a client committed while a large one is on its
/// way goes up at once, not after it.
#[test]
fn a_long_upload_holds_up_no_other() {
    // Files go up only when committed.
    for rig in rigs(Duration::from_secs(3600)) {
        let (share, root) = rig.new_share("m");
        rig.faults.set(FaultSettings {
            latency_ms: 8000,
            only_keys: "/big".into(),
            ..Default::default()
        });
        let big = share
            .create(root, "big", 0o644, 0, 0, true)
            .expect("create");
        share
            .write(big.fileid, 0, &random(1 << 20), false)
            .expect("write");
        share.commit(big.fileid).expect("commit");
        let started = Instant::now();
        while share.status().uploading_files == 0 {
            assert!(started.elapsed() < Duration::from_secs(5), "no upload");
            std::thread::sleep(Duration::from_millis(10));
        }
        let small = share
            .create(root, "small", 0o644, 0, 0, true)
            .expect("create");
        share
            .write(small.fileid, 0, b"committed", false)
            .expect("write");
        share.commit(small.fileid).expect("commit");
        let started = Instant::now();
        while rig.get("m/small").is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "the small file waited for the large one's upload"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Asked past the injected latency, which hits every request for the key.
        let big_there = rig.runtime.block_on(rig.raw.head("m/big")).expect("head");
        assert!(big_there.is_none(), "the large upload was not slow");
        rig.faults.set(FaultSettings::default());
        rig.wait_clean("m");
        assert_eq!(rig.get("m/small").expect("small").0, b"committed");
    }
}

/// A file whose upload always fails (a key the store refuses) holds up no other: it is tried
/// again on a back-off of its own, and the other files go up as they are committed.
#[test]
fn a_file_the_store_refuses_holds_up_no_other() {
    for mut rig in rigs(Duration::from_secs(3600)) {
        rig.remote = Arc::new(Inspecting {
            refuse_puts_of: Some("/bad"),
            ..Inspecting::over(rig.remote.clone())
        });
        rig.reopen(Duration::from_secs(3600));
        let (share, root) = rig.new_share("m");
        let bad = share
            .create(root, "bad", 0o644, 0, 0, true)
            .expect("create");
        share
            .write(bad.fileid, 0, b"refused", false)
            .expect("write");
        share.commit(bad.fileid).expect("commit");
        // Failing all the while: a back-off held for the whole share would be 8 s by now.
        std::thread::sleep(Duration::from_secs(8));
        for i in 0..3 {
            let name = format!("f{i}");
            let f = share
                .create(root, &name, 0o644, 0, 0, true)
                .expect("create");
            share
                .write(f.fileid, 0, name.as_bytes(), false)
                .expect("write");
            share.commit(f.fileid).expect("commit");
            let started = Instant::now();
            while rig.get(&format!("m/{name}")).is_none() {
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "{name} waited behind the refused file"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let status = share.status();
        assert_eq!(status.dirty_files, 1, "{status:?}");
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("m/bad")),
            "{status:?}"
        );
    }
}

/// An object another tool puts at a file's key after the file was removed here stays: the
/// removal deletes the object firn knew there, not whatever is there when the deletion goes.
#[test]
fn another_tools_object_put_after_a_remove_stays() {
    for rig in rigs(Duration::ZERO) {
        let (share, root) = rig.new_share("m");
        let f = share.create(root, "f", 0o644, 0, 0, true).expect("create");
        share.write(f.fileid, 0, b"ours", false).expect("write");
        share.commit(f.fileid).expect("commit");
        rig.wait_clean("m");
        // The deletion takes 3 s to reach the bucket; the other tool's put lands meanwhile.
        rig.faults.set(FaultSettings {
            latency_ms: 3000,
            only_keys: "m/f".into(),
            ..Default::default()
        });
        share.remove(root, "f").expect("remove");
        std::thread::sleep(Duration::from_millis(500));
        rig.runtime
            .block_on(rig.raw.put(
                "m/f",
                bytes::Bytes::from_static(b"theirs"),
                remote::Meta::new(),
            ))
            .expect("put by another tool");
        rig.wait_clean("m");
        rig.faults.set(FaultSettings::default());
        let there = rig.runtime.block_on(rig.raw.get("m/f")).expect("get");
        assert_eq!(&there.body[..], b"theirs");
        share.refresh("").expect("refresh");
        let f = share.lookup(root, "f").expect("taken in");
        assert_eq!(share.read(f, 0, 100).expect("read").0, b"theirs");
        // A directory's marker with data in it (S3 lets another tool put one; the directory
        // store cannot hold one) is that tool's object: a RMDIR here leaves it.
        let Some(prefix) = &rig.s3_prefix else {
            continue;
        };
        common::boto3_put(&format!("{}/m/d/", prefix.trim_matches('/')), b"bytes", &[]);
        share.refresh("").expect("refresh");
        share.lookup(root, "d").expect("a directory");
        share.rmdir(root, "d").expect("rmdir");
        rig.wait_clean("m");
        let there = rig.runtime.block_on(rig.raw.head("m/d/")).expect("head");
        assert_eq!(there.map(|o| o.size), Some(5), "the marker with data");
    }
}

#[test]
fn clean_files_are_evicted_past_cache_max_and_fetched_back_when_used() {
    for mut rig in rigs(Duration::ZERO) {
        rig.cache_max = 3 << 20;
        rig.reopen(Duration::ZERO);
        let info = rig
            .shares()
            .create("e", "e/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("e");
        let files_dir = rig.dir.path().join("shares").join(&info.id).join("files");
        let local_bytes = || -> u64 {
            std::fs::read_dir(&files_dir)
                .expect("files")
                .flatten()
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum()
        };
        let mut files = Vec::new();
        for i in 0..6 {
            let f = share
                .create(share.root(), &format!("f{i}"), 0o644, 0, 0, true)
                .expect("create");
            let data = random(1 << 20);
            share.write(f.fileid, 0, &data, false).expect("write");
            share.commit(f.fileid).expect("commit");
            files.push((f.fileid, data));
        }
        rig.wait_clean("e");
        let started = Instant::now();
        while local_bytes() > 3 << 20 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} local bytes, past cache_max",
                local_bytes()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let evicted: Vec<usize> = (0..files.len())
            .filter(|&i| !files_dir.join(format!("{:016x}", files[i].0)).exists())
            .collect();
        assert!(evicted.len() >= 3, "evicted {evicted:?}");
        // A COMMIT of an evicted file has nothing to make durable: it fetches nothing.
        let downloaded = share.status().downloaded_bytes;
        let (id, _) = files[evicted[0]];
        share.commit(id).expect("commit");
        assert!(
            !files_dir.join(format!("{id:016x}")).exists(),
            "fetched back"
        );
        assert_eq!(share.status().downloaded_bytes, downloaded);
        // Attributes stay; every file reads back whole, fetched from the bucket if evicted.
        for (id, data) in &files {
            assert_eq!(share.attrs(*id).expect("attrs").size, data.len() as u64);
            let (read, eof) = share.read(*id, 0, 2 << 20).expect("read");
            assert!(eof);
            assert!(read == *data, "fileid {id} read back differs");
        }
        // A write into an evicted file keeps the rest of it.
        let started = Instant::now();
        let victim = loop {
            if let Some(i) =
                (0..files.len()).find(|&i| !files_dir.join(format!("{:016x}", files[i].0)).exists())
            {
                break i;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "nothing evicted again"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let (id, mut data) = files[victim].clone();
        share.write(id, 1000, b"patched!", false).expect("write");
        share.commit(id).expect("commit");
        data[1000..1008].copy_from_slice(b"patched!");
        rig.wait_clean("e");
        let (body, _) = rig.get(&format!("e/f{victim}")).expect("object");
        assert!(body == data, "the patched object lost the rest of the file");
    }
}

/// Evicted files whose objects another tool deleted or replaced, then changed here without
/// their content (a write that fails for want of it, a chmod, a rename): no upload retries
/// forever. The bucket wins: the deleted one's file goes at the next refresh, the replaced
/// one's takes the new version in, and the rename moves the new version to the new name.
#[test]
fn changes_to_an_evicted_file_give_way_to_another_tools_change_of_its_object() {
    for mut rig in rigs(Duration::ZERO) {
        rig.cache_max = 64 << 10;
        rig.reopen(Duration::ZERO);
        let info = rig
            .shares()
            .create("g", "g/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("g");
        let files_dir = rig.dir.path().join("shares").join(&info.id).join("files");
        let mut ids = Vec::new();
        for name in ["deleted", "replaced", "moved", "moved-gone", "back"] {
            let f = share
                .create(share.root(), name, 0o644, 0, 0, true)
                .expect("create");
            share
                .write(f.fileid, 0, &random(200 << 10), false)
                .expect("write");
            share.commit(f.fileid).expect("commit");
            ids.push(f.fileid);
        }
        rig.wait_clean("g");
        for &id in &ids {
            wait_evicted(&files_dir, id);
        }
        let replaced = bytes::Bytes::from(random(300 << 10));
        let moved = bytes::Bytes::from(random(100 << 10));
        rig.runtime.block_on(async {
            for key in ["g/deleted", "g/moved-gone"] {
                rig.raw.delete(key).await.expect("delete by another tool");
            }
            for (key, body) in [
                ("g/replaced", &replaced),
                ("g/moved", &moved),
                ("g/back", &replaced),
            ] {
                rig.raw
                    .put(key, body.clone(), remote::Meta::new())
                    .await
                    .expect("put by another tool");
            }
        });
        assert!(share.write(ids[0], 0, b"x", false).is_err());
        share
            .setattr(
                ids[1],
                SetAttrs {
                    mode: Some(0o600),
                    ..SetAttrs::default()
                },
            )
            .expect("chmod");
        let root = share.root();
        share.rename(root, "moved", root, "moved2").expect("rename");
        share
            .rename(root, "moved-gone", root, "moved-gone2")
            .expect("rename");
        // Away and back: at its old key again, whose object another tool replaced.
        share.rename(root, "back", root, "back2").expect("rename");
        share.rename(root, "back2", root, "back").expect("rename");
        rig.wait_clean("g");
        share.refresh("").expect("refresh");
        for name in ["deleted", "moved-gone2", "moved-gone"] {
            assert!(
                matches!(share.lookup(root, name), Err(ShareError::NotFound)),
                "{name} is still in the share"
            );
        }
        for (name, body) in [
            ("replaced", &replaced),
            ("moved2", &moved),
            ("back", &replaced),
        ] {
            let id = share.lookup(root, name).expect(name);
            let (read, _) = share.read(id, 0, 1 << 20).expect("read");
            assert!(read == body[..], "{name} reads otherwise");
        }
        rig.wait_clean("g");
        let (object, _) = rig.get("g/moved2").expect("the renamed file's object");
        assert!(object == moved[..], "g/moved2 is not the bucket's version");
        assert!(
            rig.get("g/moved").is_none(),
            "the old name stays in the bucket"
        );
        assert!(rig.get("g/deleted").is_none());
        // The old name of the file that went is free: what another tool puts there shows up.
        rig.runtime
            .block_on(
                rig.raw
                    .put("g/moved-gone", moved.clone(), remote::Meta::new()),
            )
            .expect("put by another tool");
        share.refresh("").expect("refresh");
        share.lookup(root, "moved-gone").expect("taken in");
    }
}

/// A directory another tool deleted whole in the bucket (marker, objects, subdirectories)
/// goes at the next refresh, with everything below it; one whose marker alone went stays for
/// the objects below it, and an empty one with its marker stays.
#[test]
fn a_directory_deleted_whole_in_the_bucket_goes_at_a_refresh() {
    for rig in rigs(Duration::ZERO) {
        let (share, root) = rig.new_share("x");
        let w1 = share.mkdir(root, "w1", 0o755, 0, 0).expect("mkdir").fileid;
        let sub = share.mkdir(w1, "sub", 0o755, 0, 0).expect("mkdir").fileid;
        let w2 = share.mkdir(root, "w2", 0o755, 0, 0).expect("mkdir").fileid;
        share.mkdir(root, "keep", 0o755, 0, 0).expect("mkdir");
        // Made by a refresh from a deeper key (no marker), then emptied by a client.
        rig.runtime
            .block_on(rig.raw.put(
                "x/deep/a",
                bytes::Bytes::from_static(b"a"),
                remote::Meta::new(),
            ))
            .expect("put by another tool");
        share.refresh("").expect("refresh");
        let deep = share.lookup(root, "deep").expect("made from a deeper key");
        share.remove(deep, "a").expect("remove");
        for (dir, name) in [(sub, "f"), (w1, "g"), (w2, "h")] {
            let f = share.create(dir, name, 0o644, 0, 0, true).expect("create");
            share.write(f.fileid, 0, b"data", false).expect("write");
            share.commit(f.fileid).expect("commit");
        }
        rig.wait_clean("x");
        rig.runtime.block_on(async {
            for key in ["x/w1/sub/f", "x/w1/sub/", "x/w1/g", "x/w1/", "x/w2/"] {
                rig.raw.delete(key).await.expect("delete by another tool");
            }
        });
        let report = share.refresh("").expect("refresh");
        assert!(
            matches!(share.lookup(root, "w1"), Err(ShareError::NotFound)),
            "w1 stays: {report:?}"
        );
        assert_eq!(report.removed, 4, "{report:?}");
        share
            .lookup(root, "keep")
            .expect("an empty directory with its marker");
        share
            .lookup(root, "deep")
            .expect("a directory a client emptied here");
        let w2 = share
            .lookup(root, "w2")
            .expect("a directory with an object below");
        share.lookup(w2, "h").expect("its object");
    }
}

/// Waits until file `id` of the share in `files_dir` has been evicted by cache_max.
/// A file emptied by SETATTR (O_TRUNC, a copy over it) while evicted is not fetched first:
/// emptying it works during an outage, and what is written then goes up.
#[test]
fn an_evicted_file_emptied_is_not_fetched_first() {
    for mut rig in rigs(Duration::ZERO) {
        rig.cache_max = 64 << 10;
        rig.reopen(Duration::ZERO);
        let info = rig
            .shares()
            .create("e", "e/", false, Vec::new(), Squash::Root)
            .expect("create");
        let files_dir = rig.dir.path().join("shares").join(&info.id).join("files");
        let share = rig.share("e");
        let old = random(3 << 20);
        let f = share
            .create(share.root(), "f", 0o644, 0, 0, true)
            .expect("create");
        for at in (0..old.len()).step_by(1 << 20) {
            share
                .write(f.fileid, at as u64, &old[at..at + (1 << 20)], false)
                .expect("write");
        }
        share.commit(f.fileid).expect("commit");
        rig.wait_clean("e");
        wait_evicted(&files_dir, f.fileid);
        rig.faults.outage(Duration::from_secs(600));
        let emptied = share
            .setattr(
                f.fileid,
                SetAttrs {
                    size: Some(0),
                    ..Default::default()
                },
            )
            .expect("emptied during the outage");
        assert_eq!(emptied.size, 0);
        share.write(f.fileid, 0, b"new", false).expect("write");
        assert_eq!(share.read(f.fileid, 0, 100).expect("read").0, b"new");
        rig.faults.end_outage();
        share.commit(f.fileid).expect("commit");
        rig.wait_clean("e");
        assert_eq!(rig.get("e/f").expect("uploaded").0, b"new");
    }
}

/// Files read a block at a time keep a part file open each: however many are read, the
/// share keeps a bounded number open (the directory store alone: 400 objects of a little
/// more than a block each).
#[test]
fn reading_many_files_a_block_at_a_time_keeps_open_files_bounded() {
    let rig = rigs(Duration::ZERO).swap_remove(0);
    rig.shares()
        .create("p", "p/", false, Vec::new(), Squash::Root)
        .expect("create");
    let share = rig.share("p");
    let body = bytes::Bytes::from(random((1 << 20) + 4096));
    for i in 0..400 {
        rig.runtime
            .block_on(
                rig.raw
                    .put(&format!("p/f{i:03}"), body.clone(), remote::Meta::new()),
            )
            .expect("put by another tool");
    }
    share.refresh("").expect("refresh");
    let open_files = || std::fs::read_dir("/proc/self/fd").expect("fds").count();
    let before = open_files();
    for i in 0..400 {
        let id = share
            .lookup(share.root(), &format!("f{i:03}"))
            .expect("lookup");
        let (read, _) = share.read(id, 1 << 20, 4096).expect("read");
        assert!(read == body[1 << 20..], "f{i:03} reads otherwise");
    }
    let opened = open_files().saturating_sub(before);
    assert!(opened <= 300, "{opened} files more open after reading 400");
    // Nor does the memory kept for eviction grow with every file ever read.
    let remembered = share.remembered_uses();
    assert!(
        remembered <= 300,
        "{remembered} uses remembered after 400 files"
    );
}

/// A large file fetched back whole does not hold up the fetch of a small one (every request
/// to the bucket slowed by 200 ms: the large one takes eight ranged GETs).
#[test]
fn a_large_whole_fetch_does_not_hold_up_a_small_one() {
    for rig in rigs(Duration::ZERO) {
        rig.shares()
            .create("w", "w/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("w");
        // Through firn's stack, as another gateway puts them: with a digest, and no block
        // hashes here, so a read fetches each whole.
        let (big, small) = (random(64 << 20), random(100_000));
        for (key, body) in [("w/big", &big), ("w/small", &small)] {
            rig.runtime
                .block_on(rig.remote.put(
                    key,
                    bytes::Bytes::from(body.clone()),
                    remote::Meta::new(),
                ))
                .expect("put");
        }
        share.refresh("").expect("refresh");
        let (big_id, small_id) = (
            share.lookup(share.root(), "big").expect("big"),
            share.lookup(share.root(), "small").expect("small"),
        );
        rig.faults.set(firn::remote::faults::FaultSettings {
            latency_ms: 200,
            ..Default::default()
        });
        let started = Instant::now();
        std::thread::scope(|s| {
            let large = s.spawn(|| {
                let read = share.read(big_id, 0, 4096).expect("read big");
                assert!(read.0 == big[..4096]);
                started.elapsed()
            });
            std::thread::sleep(Duration::from_millis(300));
            let (read, _) = share.read(small_id, 0, 4096).expect("read small");
            assert!(read == small[..4096]);
            let small_took = started.elapsed() - Duration::from_millis(300);
            let large_took = large.join().expect("large");
            assert!(
                small_took < Duration::from_millis(1000) && large_took > small_took * 2,
                "the small read took {small_took:?}, the large one {large_took:?}"
            );
        });
        rig.faults.set(Default::default());
    }
}

fn wait_evicted(files_dir: &std::path::Path, id: u64) {
    let started = Instant::now();
    while files_dir.join(format!("{id:016x}")).exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "fileid {id} not evicted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With the bucket out of reach, a read of an evicted file fails with an I/O error once
/// `read_timeout` has passed (for its own fetch, or for blocks another read is fetching),
/// while the share goes on serving everything else; once the bucket is back, the same reads
/// give the file's bytes.
#[test]
fn a_read_of_an_evicted_file_fails_in_bounded_time_during_an_outage() {
    const MIB: u64 = 1 << 20;
    for mut rig in rigs(Duration::ZERO) {
        rig.cache_max = 64 << 10;
        rig.reopen(Duration::ZERO);
        let info = rig
            .shares()
            .create("o", "o/", false, Vec::new(), Squash::Root)
            .expect("create");
        let files_dir = rig.dir.path().join("shares").join(&info.id).join("files");
        let share = rig.share("o");
        // Read back whole (up to 1 MiB), and a block at a time.
        let (small, big) = (random(200_000), random((3 * MIB + 5) as usize));
        let mut ids = Vec::new();
        for (name, data) in [("small", &small), ("big", &big)] {
            let f = share
                .create(share.root(), name, 0o644, 0, 0, true)
                .expect("create");
            for at in (0..data.len()).step_by(MIB as usize) {
                let end = (at + MIB as usize).min(data.len());
                share
                    .write(f.fileid, at as u64, &data[at..end], false)
                    .expect("write");
            }
            share.commit(f.fileid).expect("commit");
            ids.push(f.fileid);
        }
        rig.wait_clean("o");
        for &id in &ids {
            wait_evicted(&files_dir, id);
        }
        drop(share);
        rig.cache_max = 1 << 30;
        rig.read_timeout = Duration::from_secs(1);
        rig.reopen(Duration::ZERO);
        let share = rig.share("o");
        let (small_id, big_id) = (ids[0], ids[1]);
        // One block of the big file, out of order (nothing read ahead): its part file is
        // made, with the object's HEAD, before the outage.
        let (read, _) = share.read(big_id, MIB + 10, 4096).expect("read");
        assert!(read == big[(MIB + 10) as usize..][..4096], "read differs");

        rig.faults.outage(Duration::from_secs(600));
        let timed_out = |result: Result<(Vec<u8>, bool), ShareError>, what: &str| match result {
            Err(ShareError::Io(message)) => {
                assert!(
                    message.contains("did not answer within"),
                    "{what}: {message}"
                )
            }
            other => panic!("{what} during the outage: {other:?}"),
        };
        let started = Instant::now();
        timed_out(share.read(small_id, 0, 4096), "small");
        // The next block, by two readers at once: one fetches it, the other waits for it.
        std::thread::scope(|s| {
            let readers: Vec<_> = (0..2)
                .map(|_| s.spawn(|| share.read(big_id, 2 * MIB + 7, 4096)))
                .collect();
            for reader in readers {
                timed_out(reader.join().expect("reader"), "big");
            }
        });
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "reads took {took:?} to fail"
        );
        // Everything else goes on: attributes, and a new file written and read back.
        assert_eq!(share.attrs(big_id).expect("attrs").size, big.len() as u64);
        let new = share
            .create(share.root(), "new", 0o644, 0, 0, true)
            .expect("create during the outage");
        share
            .write(new.fileid, 0, b"written offline", false)
            .expect("write during the outage");
        assert_eq!(
            share.read(new.fileid, 0, 100).expect("read").0,
            b"written offline"
        );

        rig.faults.end_outage();
        let (read, eof) = share.read(small_id, 0, 300_000).expect("read small");
        assert!(eof && read == small, "small read back differs");
        let (read, _) = share.read(big_id, 2 * MIB + 7, 4096).expect("read big");
        assert!(
            read == big[(2 * MIB + 7) as usize..][..4096],
            "big read differs"
        );
    }
}

/// Reading evicted files keeps the share's local bytes near `cache_max`: each fetch first
/// evicts other clean files past the bound, so reads do not overrun it between two eviction
/// passes (the file just read whole would otherwise stay beside the next one).
#[test]
fn reading_evicted_files_keeps_near_the_cache_bound() {
    const MIB: u64 = 1 << 20;
    for mut rig in rigs(Duration::ZERO) {
        rig.cache_max = MIB;
        rig.reopen(Duration::ZERO);
        let info = rig
            .shares()
            .create("c", "c/", false, Vec::new(), Squash::Root)
            .expect("create");
        let files_dir = rig.dir.path().join("shares").join(&info.id).join("files");
        let share = rig.share("c");
        let mut files = Vec::new();
        for name in ["a", "b"] {
            let f = share
                .create(share.root(), name, 0o644, 0, 0, true)
                .expect("create");
            let data = random((40 * MIB) as usize);
            for (i, piece) in data.chunks(MIB as usize).enumerate() {
                share
                    .write(f.fileid, i as u64 * MIB, piece, false)
                    .expect("write");
            }
            share.commit(f.fileid).expect("commit");
            files.push((f.fileid, data));
        }
        rig.wait_clean("c");
        for (id, _) in &files {
            wait_evicted(&files_dir, *id);
        }
        drop(share);
        rig.cache_max = 16 * MIB;
        rig.reopen(Duration::ZERO);
        let share = rig.share("c");
        let local = || -> u64 {
            std::fs::read_dir(&files_dir)
                .expect("files")
                .filter_map(|e| e.ok())
                .map(|e| allocated(&e.path()))
                .sum()
        };
        let mut most = Vec::new();
        for (id, data) in &files {
            let mut at = 0;
            let mut peak = 0;
            while at < data.len() {
                let (read, _) = share.read(*id, at as u64, MIB as u32).expect("read");
                assert!(read == data[at..at + read.len()], "read at {at} differs");
                at += read.len();
                peak = peak.max(local());
            }
            most.push(peak);
        }
        // While b is read, a (read whole, 40 MiB) is gone: b's blocks, and what is in
        // flight (a run of 8 MiB and two ahead of it), not a's as well.
        assert!(
            most[1] <= 40 * MIB + 3 * 8 * MIB,
            "{} MiB on disk reading b with a 16 MiB cache",
            most[1] / MIB
        );
    }
}

/// Another tool's object (no digest, so its blocks cannot be checked) rewritten in place at
/// the same size while the share reads it by blocks: the blocks already fetched are of the
/// old version, so they are dropped and the read starts over on the new one. A file never
/// mixes two versions.
#[test]
fn a_file_read_by_blocks_never_mixes_two_versions_of_its_object() {
    const MIB: usize = 1 << 20;
    for rig in rigs(Duration::ZERO) {
        rig.shares()
            .create("v", "v/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("v");
        let (old, new) = (vec![1u8; 4 * MIB], vec![2u8; 4 * MIB]);
        let key = "v/theirs.bin";
        let put = |body: &Vec<u8>| {
            rig.runtime
                .block_on(
                    rig.raw
                        .put(key, bytes::Bytes::from(body.clone()), remote::Meta::new()),
                )
                .expect("put by another tool")
        };
        put(&old);
        share.refresh("").expect("refresh");
        let id = share.lookup(share.root(), "theirs.bin").expect("listed");
        // One block, out of order (nothing read ahead): the part file holds the old version.
        let (read, _) = share.read(id, (2 * MIB) as u64, 4096).expect("read");
        assert!(
            read.iter().all(|&b| b == 1),
            "first read is not the old version"
        );
        put(&new);
        // Read it all, in order, before any refresh: one version throughout.
        let mut back = Vec::new();
        loop {
            let (read, eof) = share.read(id, back.len() as u64, MIB as u32).expect("read");
            back.extend_from_slice(&read);
            if eof {
                break;
            }
        }
        assert_eq!(back.len(), 4 * MIB);
        assert!(
            back == new,
            "read back mixes versions: {} bytes of the old one",
            back.iter().filter(|&&b| b == 1).count()
        );
    }
}

/// Bytes a file takes on disk (a part file is sparse).
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

#[test]
fn an_evicted_file_is_read_back_a_verified_block_at_a_time() {
    const MIB: u64 = 1 << 20;
    for mut rig in rigs(Duration::ZERO) {
        rig.cache_max = MIB;
        rig.reopen(Duration::ZERO);
        let info = rig
            .shares()
            .create("p", "p/", false, Vec::new(), Squash::Root)
            .expect("create");
        let files_dir = rig.dir.path().join("shares").join(&info.id).join("files");
        let share = rig.share("p");
        let f = share
            .create(share.root(), "big", 0o644, 0, 0, true)
            .expect("create");
        let id = f.fileid;
        let data = random((6 * MIB + 123) as usize);
        for at in (0..data.len()).step_by(MIB as usize) {
            let end = (at + MIB as usize).min(data.len());
            share
                .write(id, at as u64, &data[at..end], false)
                .expect("write");
        }
        share.commit(id).expect("commit");
        rig.wait_clean("p");
        wait_evicted(&files_dir, id);
        drop(share);
        // A cache large enough that nothing is evicted while the test looks.
        rig.cache_max = 1 << 30;
        rig.reopen(Duration::ZERO);
        let share = rig.share("p");
        let content = files_dir.join(format!("{id:016x}"));
        let part = files_dir.join(format!("{id:016x}.part"));

        // A small read fetches the one block it lies in, not the file.
        let at = 3 * MIB + 10;
        let (read, eof) = share.read(id, at, 4096).expect("read");
        assert!(!eof);
        assert!(
            read == data[at as usize..at as usize + 4096],
            "read differs"
        );
        assert!(!content.exists(), "a 4 KiB read fetched the whole file");
        let fetched = allocated(&part);
        assert!(
            (4096..=MIB + 65536).contains(&fetched),
            "{fetched} bytes fetched for a 4 KiB read"
        );
        let status = share.status();
        assert_eq!(status.downloaded_bytes, MIB, "{status:?}");
        assert_eq!((status.cache_hits, status.cache_misses), (0, 1));

        // Read in order to the end: every byte right, and then it is the file's content.
        let mut back = Vec::new();
        loop {
            let (read, eof) = share.read(id, back.len() as u64, MIB as u32).expect("read");
            back.extend_from_slice(&read);
            if eof {
                break;
            }
        }
        assert!(back == data, "read back in order differs");
        assert!(content.exists() && !part.exists(), "not made the content");
        // Each block fetched once, read ahead or not.
        let status = share.status();
        assert_eq!(status.downloaded_bytes, data.len() as u64, "{status:?}");
        assert!(status.cache_misses >= 2, "{status:?}");

        // Evicted again, and the object corrupted in the bucket behind firn's back (same
        // size, same metadata): blocks that still match are served, the bad one is not.
        drop(share);
        rig.cache_max = MIB;
        rig.reopen(Duration::ZERO);
        wait_evicted(&files_dir, id);
        rig.cache_max = 1 << 30;
        rig.reopen(Duration::ZERO);
        let share = rig.share("p");
        let meta = rig
            .runtime
            .block_on(rig.raw.head("p/big"))
            .expect("head")
            .expect("object")
            .meta;
        let mut bad = data.clone();
        bad[(4 * MIB + 99) as usize] ^= 0x40;
        rig.runtime
            .block_on(rig.raw.put("p/big", bytes::Bytes::from(bad), meta))
            .expect("corrupt the object");
        let (read, _) = share.read(id, MIB, 8192).expect("a good block");
        assert!(read == data[MIB as usize..MIB as usize + 8192]);
        let err = share
            .read(id, 4 * MIB, 4096)
            .expect_err("a corrupt block was served");
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(!content.exists(), "a corrupt object became the content");

        // An object another tool put carries no digest: its blocks are fetched as needed.
        let other = random((3 * MIB + 5) as usize);
        rig.runtime
            .block_on(rig.raw.put(
                "p/other",
                bytes::Bytes::from(other.clone()),
                Default::default(),
            ))
            .expect("put by another tool");
        share.refresh("").expect("refresh");
        let o = share.lookup(share.root(), "other").expect("other");
        let (read, eof) = share.read(o, 2 * MIB + 5, 4096).expect("read");
        assert!(!eof);
        assert!(read == other[(2 * MIB + 5) as usize..(2 * MIB + 5) as usize + 4096]);
        assert!(!files_dir.join(format!("{o:016x}")).exists());
        assert!(files_dir.join(format!("{o:016x}.part")).exists());

        // A restart forgets fetched blocks (their map was in memory).
        drop(share);
        rig.reopen(Duration::ZERO);
        let parts = std::fs::read_dir(&files_dir)
            .expect("files")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .count();
        assert_eq!(parts, 0, "part files left after a restart");
    }
}

#[test]
fn objects_other_tools_put_or_delete_show_up_after_a_refresh() {
    for rig in rigs(Duration::from_secs(3600)) {
        rig.shares()
            .create("r", "r/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("r");
        let put = |key: &str, body: Vec<u8>, meta: &[(&str, &str)]| {
            let meta: remote::Meta = meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            rig.runtime
                .block_on(rig.raw.put(key, bytes::Bytes::from(body), meta))
                .expect("put by another tool");
        };
        let small = b"written by another tool".to_vec();
        let big = random(3 << 20);
        let aws_meta = [
            ("file-permissions", "100600"),
            ("file-owner", "1234"),
            ("file-group", "99"),
            ("file-mtime", "1700000000123456789ns"),
            ("file-atime", "1700000001000000007ns"),
        ];
        match &rig.s3_prefix {
            // In Garage, put by boto3 with the headers AWS's file tools send.
            Some(prefix) => common::boto3_put(
                &format!("{}/r/docs/a.txt", prefix.trim_matches('/')),
                &small,
                &aws_meta,
            ),
            None => put("r/docs/a.txt", small.clone(), &aws_meta),
        }
        put("r/docs/b.bin", big.clone(), &[]);
        put("elsewhere/c.txt", b"not the share's".to_vec(), &[]);
        // A symlink as firn (and AWS's file tools) store one: its target as the body.
        put(
            "r/docs/link",
            b"../elsewhere/c.txt".to_vec(),
            &[("file-permissions", "120777"), ("file-owner", "7")],
        );
        assert_eq!(share.status().last_refresh, None);
        let report = share.refresh("").expect("refresh");
        assert_eq!((report.added, report.removed), (3, 0), "{report:?}");
        assert!(share.status().last_refresh.is_some(), "no refresh time");
        let docs = share.lookup(share.root(), "docs").expect("docs");
        let a = share.lookup(docs, "a.txt").expect("a.txt");
        let attrs = share.attrs(a).expect("attrs");
        assert_eq!(
            (
                attrs.mode,
                attrs.uid,
                attrs.gid,
                attrs.size,
                attrs.mtime_ns,
                attrs.atime_ns
            ),
            (
                0o600,
                1234,
                99,
                small.len() as u64,
                1_700_000_000_123_456_789,
                1_700_000_001_000_000_007
            )
        );
        assert_eq!(share.read(a, 0, 1000).expect("read").0, small);
        let b = share.lookup(docs, "b.bin").expect("b.bin");
        assert_eq!(
            share.attrs(b).expect("attrs").mode,
            0o666,
            "the default mode"
        );
        assert!(share.read(b, 0, 4 << 20).expect("read").0 == big);
        let link = share.lookup(docs, "link").expect("link");
        let attrs = share.attrs(link).expect("attrs");
        assert_eq!((attrs.kind, attrs.uid), (Kind::Symlink, 7));
        assert_eq!(
            share.readlink(link).expect("readlink"),
            "../elsewhere/c.txt"
        );
        // Refreshing again changes nothing.
        assert_eq!(share.refresh("").expect("refresh"), Default::default());
        // A file here where another tool made a directory: the file stays, and the refresh
        // goes on past it.
        let f = share
            .create(share.root(), "clash", 0o644, 0, 0, true)
            .expect("create");
        share.write(f.fileid, 0, b"local", false).expect("write");
        put("r/clash/inner.txt", b"theirs".to_vec(), &[]);
        put("r/docs/new.txt", b"new".to_vec(), &[]);
        let report = share.refresh("").expect("refresh past a clash");
        assert_eq!(report.added, 1, "{report:?}");
        assert_eq!(&share.read(f.fileid, 0, 10).expect("read").0, b"local");
        // Changed and deleted by the other tool.
        put(
            "r/docs/a.txt",
            b"changed elsewhere, and longer".to_vec(),
            &[],
        );
        rig.runtime
            .block_on(rig.raw.delete("r/docs/b.bin"))
            .expect("delete");
        let report = share.refresh("docs").expect("refresh");
        assert_eq!((report.updated, report.removed), (1, 1), "{report:?}");
        assert_eq!(
            share.read(a, 0, 1000).expect("read").0,
            b"changed elsewhere, and longer"
        );
        assert!(matches!(
            share.lookup(docs, "b.bin"),
            Err(ShareError::NotFound)
        ));
        // A file changed here and not yet uploaded stays, whatever the bucket says.
        share.write(a, 0, b"mine", false).expect("write");
        rig.runtime
            .block_on(rig.raw.delete("r/docs/a.txt"))
            .expect("delete");
        let report = share.refresh("").expect("refresh");
        assert_eq!(report.removed, 0, "{report:?}");
        assert_eq!(&share.read(a, 0, 4).expect("read").0, b"mine");
        // A path only the bucket has yet (`share refresh --path new/deep`): its levels are
        // taken in on the way down; one neither has is not found.
        put("r/new/deep/x.txt", b"deep".to_vec(), &[]);
        put("r/new/other.txt", b"beside".to_vec(), &[]);
        share
            .refresh("new/deep/")
            .expect("refresh of a path only the bucket has");
        let new = share.lookup(share.root(), "new").expect("new");
        let deep = share.lookup(new, "deep").expect("deep");
        let x = share.lookup(deep, "x.txt").expect("x.txt");
        assert_eq!(&share.read(x, 0, 10).expect("read").0, b"deep");
        assert!(share.lookup(new, "other.txt").is_ok(), "the level above");
        assert!(matches!(
            share.refresh("new/nowhere"),
            Err(ShareError::NotFound)
        ));
        // Names no directory has: refused before anything is listed.
        for path in ["..", "./", "new/..", "new/../../x"] {
            assert!(
                matches!(share.refresh(path), Err(ShareError::Invalid(_))),
                "{path:?}"
            );
        }
        assert!(matches!(
            share.refresh("new/other.txt"),
            Err(ShareError::NotDir)
        ));
    }
}

/// Objects no file here can be are left alone, counted and named: one where the share has a
/// directory of that name, and objects below a name the share has a file at. The share's own
/// entries stay as they are.
#[test]
fn objects_no_file_here_can_be_are_left_alone_counted_and_named() {
    for rig in rigs(Duration::from_secs(3600)) {
        rig.shares()
            .create("k", "k/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("k");
        let put = |key: &str| {
            rig.runtime
                .block_on(
                    rig.raw
                        .put(key, bytes::Bytes::from_static(b"other"), Default::default()),
                )
                .expect("put by another tool");
        };
        put("k/d");
        put("k/f/x");
        let root = share.root();
        let d = share.mkdir(root, "d", 0o755, 0, 0).expect("mkdir").fileid;
        let f = share
            .create(root, "f", 0o644, 0, 0, false)
            .expect("create")
            .fileid;
        share.write(f, 0, b"local", false).expect("write");
        let report = share.refresh("").expect("refresh");
        assert_eq!((report.added, report.skipped), (0, 2), "{report:?}");
        let first = report.first_skipped.as_deref().unwrap_or_default();
        assert!(
            first.contains("k/d") && first.contains("directory of that name"),
            "{report:?}"
        );
        assert_eq!(share.lookup(root, "d").expect("d"), d);
        assert_eq!(share.attrs(d).expect("d").kind, Kind::Dir);
        assert_eq!(share.lookup(root, "f").expect("f"), f);
        assert_eq!(share.read(f, 0, 100).expect("read").0, b"local");
    }
}

/// Refresh tells objects apart by ETag, not only size: a same-size rewrite by another tool
/// replaces a clean file's content, while firn's own uploads are not mistaken for one. With a
/// listing TTL, a client's listing of a directory brings in what another tool just put there.
/// With `refresh` set, what other tools put or delete shows up with no one asking.
#[test]
fn the_share_refreshes_from_the_bucket_by_itself() {
    for mut rig in rigs(Duration::from_secs(3600)) {
        rig.refresh = Some(Duration::from_millis(500));
        rig.reopen(Duration::from_secs(3600));
        rig.shares()
            .create("p", "p/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("p");
        let wait_for = |present: bool| {
            let started = Instant::now();
            while share.lookup(share.root(), "theirs.txt").is_ok() != present {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "no refresh brought the change (present: {present})"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        rig.runtime
            .block_on(rig.raw.put(
                "p/theirs.txt",
                bytes::Bytes::from_static(b"put by another tool"),
                remote::Meta::new(),
            ))
            .expect("put");
        wait_for(true);
        // Set as the refresh that brought the file ends, a moment after the file shows.
        let started = Instant::now();
        while share.status().last_refresh.is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no last refresh"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        rig.runtime
            .block_on(rig.raw.delete("p/theirs.txt"))
            .expect("delete");
        wait_for(false);
    }
}

#[test]
fn same_size_rewrites_and_listed_directories_are_noticed() {
    for mut rig in rigs(Duration::from_millis(50)) {
        rig.listing_ttl = Some(Duration::ZERO);
        rig.reopen(Duration::from_millis(50));
        let (share, root) = rig.new_share("t");
        let put = |key: &str, body: &[u8]| {
            rig.runtime
                .block_on(rig.raw.put(
                    key,
                    bytes::Bytes::copy_from_slice(body),
                    remote::Meta::new(),
                ))
                .expect("put by another tool");
        };
        put("t/a.txt", b"aaaa");
        // No refresh asked for: listing the directory brings it in.
        let names: Vec<String> = share
            .list(root, None, 100)
            .expect("list")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a.txt"]);
        let a = share.lookup(root, "a.txt").expect("lookup");
        assert_eq!(share.read(a, 0, 100).expect("read").0, b"aaaa");
        let mine = share
            .create(root, "mine.txt", 0o644, 0, 0, true)
            .expect("create");
        share.write(mine.fileid, 0, b"mine", true).expect("write");
        rig.wait_clean("t");
        // firn's own upload, and an unchanged object: nothing to take in.
        assert_eq!(share.refresh("").expect("refresh"), Default::default());
        assert_eq!(share.refresh("").expect("refresh"), Default::default());
        // Same sizes, other bytes.
        put("t/a.txt", b"bbbb");
        put("t/mine.txt", b"MINE");
        let report = share.refresh("").expect("refresh");
        assert_eq!(report.updated, 2, "{report:?}");
        assert_eq!(share.read(a, 0, 100).expect("read").0, b"bbbb");
        assert_eq!(share.read(mine.fileid, 0, 100).expect("read").0, b"MINE");
        // A file changed here wins over a rewrite there.
        share.write(mine.fileid, 0, b"ours", true).expect("write");
        put("t/mine.txt", b"XXXX");
        share.refresh("").expect("refresh");
        assert_eq!(share.read(mine.fileid, 0, 100).expect("read").0, b"ours");
        rig.wait_clean("t");
        assert_eq!(rig.get("t/mine.txt").expect("uploaded").0, b"ours");
        // The upload's own answer tells its ETag: a same-size rewrite right after it, before
        // any listing, is noticed too.
        share.write(mine.fileid, 0, b"once", true).expect("write");
        rig.wait_clean("t");
        put("t/mine.txt", b"more");
        let report = share.refresh("").expect("refresh");
        assert_eq!(report.updated, 1, "{report:?}");
        assert_eq!(share.read(mine.fileid, 0, 100).expect("read").0, b"more");
        // A rewrite that keeps the size and the mtime (a copy that keeps the metadata):
        // the change time tells clients to drop what they cached.
        let before = share.attrs(a).expect("attrs");
        let meta =
            remote::Meta::from([("file-mtime".to_string(), format!("{}ns", before.mtime_ns))]);
        rig.runtime
            .block_on(
                rig.raw
                    .put("t/a.txt", bytes::Bytes::from_static(b"cccc"), meta),
            )
            .expect("put by another tool");
        let report = share.refresh("").expect("refresh");
        assert_eq!(report.updated, 1, "{report:?}");
        let after = share.attrs(a).expect("attrs");
        assert_eq!(share.read(a, 0, 100).expect("read").0, b"cccc");
        assert_eq!((after.size, after.mtime_ns), (before.size, before.mtime_ns));
        assert!(after.ctime_ns > before.ctime_ns, "{before:?} -> {after:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Renames and removes from several clients at once, and the key limit below a renamed
// directory: every check of a namespace change is made under the metadata store's writer
// lock, in the change's own transaction.

/// A directory rename that would give a file below it a key past S3's 1024 bytes (which no
/// upload could ever store) is refused, and nothing moves.
#[test]
fn a_directory_rename_never_gives_a_file_below_a_key_past_the_limit() {
    let rig = rigs(Duration::ZERO).remove(0);
    rig.shares()
        .create("k", "k/", false, Vec::new(), Squash::Root)
        .expect("create");
    let share = rig.share("k");
    let root = share.root();
    let mut dir = share.mkdir(root, "a", 0o755, 0, 0).expect("mkdir").fileid;
    for _ in 0..4 {
        dir = share
            .mkdir(dir, &"d".repeat(200), 0o755, 0, 0)
            .expect("mkdir")
            .fileid;
    }
    // Key: "k/" + "a/" + 4 x 201 + 200 = 1008 bytes.
    let f = share
        .create(dir, &"f".repeat(200), 0o644, 0, 0, true)
        .expect("create")
        .fileid;
    share.write(f, 0, b"hello", false).expect("write");
    share.commit(f).expect("commit");
    rig.wait_clean("k");
    // The renamed directory's own key is short; the file's would be 1107 bytes.
    let renamed = share.rename(root, "a", root, &"b".repeat(100));
    assert!(renamed.is_err(), "refused: {renamed:?}");
    let path = share.path(f).expect("path");
    assert!(path.starts_with("a/"), "nothing moved: {path}");
    assert!(share.status().dirty_files == 0, "nothing to upload again");
    // A shorter name fits.
    share
        .rename(root, "a", root, "b")
        .expect("a rename that fits");
    assert_eq!("k/".len() + share.path(f).expect("path").len(), 1008);
}

/// Two RENAMEs of one file from two clients at once: one lands, and the file has one name.
#[test]
fn concurrent_renames_of_one_file_never_give_it_two_names() {
    let rig = rigs(Duration::from_secs(3600)).remove(0);
    rig.shares()
        .create("r", "r/", false, Vec::new(), Squash::Root)
        .expect("create");
    let share = rig.share("r");
    let root = share.root();
    for round in 0..50 {
        let x = format!("x{round}");
        share.create(root, &x, 0o644, 0, 0, true).expect("create");
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = ["y", "z"]
            .into_iter()
            .map(|to| {
                let (share, barrier, x) = (share.clone(), barrier.clone(), x.clone());
                let to = format!("{to}{round}");
                std::thread::spawn(move || {
                    barrier.wait();
                    share.rename(root, &x, root, &to)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let y = share.lookup(root, &format!("y{round}"));
        let z = share.lookup(root, &format!("z{round}"));
        assert!(
            !(y.is_ok() && z.is_ok()),
            "round {round}: renames {results:?}: y{round} -> {y:?} and z{round} -> {z:?}, one file with two names"
        );
    }
}

/// A REMOVE racing a RENAME of the same file never leaves a name pointing at nothing (which
/// CREATE would call taken and LOOKUP would answer with a stale handle).
#[test]
fn a_remove_racing_a_rename_never_leaves_a_dangling_entry() {
    let rig = rigs(Duration::from_secs(3600)).remove(0);
    rig.shares()
        .create("q", "q/", false, Vec::new(), Squash::Root)
        .expect("create");
    let share = rig.share("q");
    let root = share.root();
    for round in 0..300 {
        let (x, y) = (format!("x{round}"), format!("y{round}"));
        share.create(root, &x, 0o644, 0, 0, true).expect("create");
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let remover = {
            let (share, barrier, x) = (share.clone(), barrier.clone(), x.clone());
            std::thread::spawn(move || {
                barrier.wait();
                // A little later than the rename, by a varying amount.
                let spin = Instant::now();
                while spin.elapsed() < Duration::from_micros((round % 30) as u64 * 5) {}
                share.remove(root, &x)
            })
        };
        let renamer = {
            let (share, barrier, x, y) = (share.clone(), barrier.clone(), x.clone(), y.clone());
            std::thread::spawn(move || {
                barrier.wait();
                share.rename(root, &x, root, &y)
            })
        };
        let removed = remover.join().unwrap();
        let renamed = renamer.join().unwrap();
        if let Ok(id) = share.lookup(root, &y) {
            assert!(
                share.attrs(id).is_ok(),
                "round {round}: remove {removed:?}, rename {renamed:?}: {y} names fileid {id}, which is gone ({:?}); creating {y} again: {:?}",
                share.attrs(id),
                share.create(root, &y, 0o644, 0, 0, true).map(|_| ())
            );
        }
    }
}

/// Two directory renames at once, `a` into `b` and `b` into `a`: one is refused, so the two
/// never form a cycle cut off from the root with everything below them.
#[test]
fn concurrent_directory_renames_never_make_a_cycle() {
    let rig = rigs(Duration::from_secs(3600)).remove(0);
    rig.shares()
        .create("c", "c/", false, Vec::new(), Squash::Root)
        .expect("create");
    let share = rig.share("c");
    let root = share.root();
    for round in 0..50 {
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        let a_id = share.mkdir(root, &a, 0o755, 0, 0).expect("mkdir").fileid;
        let b_id = share.mkdir(root, &b, 0o755, 0, 0).expect("mkdir").fileid;
        let f = share
            .create(a_id, "data", 0o644, 0, 0, true)
            .expect("create")
            .fileid;
        share.write(f, 0, b"precious", false).expect("write");
        // a -> b/x and b -> a/y at once: each alone is fine, both make a cycle.
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let one = {
            let (share, barrier, a) = (share.clone(), barrier.clone(), a.clone());
            std::thread::spawn(move || {
                barrier.wait();
                share.rename(root, &a, b_id, "x")
            })
        };
        let two = {
            let (share, barrier, b) = (share.clone(), barrier.clone(), b.clone());
            std::thread::spawn(move || {
                barrier.wait();
                share.rename(root, &b, a_id, "y")
            })
        };
        let (one, two) = (one.join().unwrap(), two.join().unwrap());
        assert!(
            one.is_ok() != two.is_ok(),
            "round {round}: exactly one rename succeeds: {one:?}, {two:?}"
        );
        let path = share
            .path(f)
            .expect("the file below is still reachable from the root");
        // a moved into b, or b into a (which stays where it was).
        let expected = if one.is_ok() {
            format!("{b}/x/data")
        } else {
            format!("{a}/data")
        };
        assert_eq!(path, expected, "round {round}");
        assert_eq!(share.read(f, 0, 100).expect("read").0, b"precious");
    }
}

/// The bucket's own prefix (`[remote] prefix`) takes room from every key too: a name that
/// would fit without it is refused, rather than made into a file no upload can store.
#[test]
fn the_bucket_prefix_counts_in_the_key_limit() {
    let mut rig = rigs(Duration::ZERO).remove(0);
    rig.bucket_prefix = format!("{}/", "b".repeat(99));
    rig.reopen(Duration::ZERO);
    rig.shares()
        .create("p", "p/", false, Vec::new(), Squash::Root)
        .expect("create");
    let share = rig.share("p");
    let root = share.root();
    let mut dir = root;
    for _ in 0..4 {
        dir = share
            .mkdir(dir, &"d".repeat(180), 0o755, 0, 0)
            .expect("mkdir")
            .fileid;
    }
    // 100 + "p/" + 4 x 181 + 200 = 1026 bytes: two too many.
    let made = share.create(dir, &"f".repeat(200), 0o644, 0, 0, true);
    assert!(made.is_err(), "refused: {made:?}");
    let made = share.create(dir, &"f".repeat(198), 0o644, 0, 0, true);
    assert!(made.is_ok(), "1024 bytes fit: {made:?}");
    rig.wait_clean("p");
}

/// A share deleted while clients keep changing it: the changes under way finish before the
/// delete clears the share's tables, so nothing of it is left in the metadata store.
#[test]
fn a_share_deleted_under_busy_writers_leaves_no_rows() {
    let rig = rigs(Duration::from_secs(60)).swap_remove(0);
    for round in 0..5 {
        let name = format!("busy{round}");
        let info = rig
            .shares()
            .create(&name, &format!("{name}/"), false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share(&name);
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let share = share.clone();
                std::thread::spawn(move || {
                    let mut changes = 0u64;
                    for i in 0.. {
                        let file = format!("t{t}-{i}");
                        let Ok(f) = share.create(share.root(), &file, 0o644, 0, 0, true) else {
                            break;
                        };
                        if share.write(f.fileid, 0, &[7; 4096], false).is_err()
                            || share.remove(share.root(), &file).is_err()
                        {
                            break;
                        }
                        changes += 3;
                    }
                    changes
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        rig.shares().delete(&name).expect("delete");
        let changes: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
        assert!(changes > 0, "the writers never got going");
        for table in [
            "inodes",
            "names",
            "dirty",
            "deletes",
            "leaving",
            "uploading",
            "blocks",
        ] {
            let table = format!("share-{}-{table}", info.id);
            assert_eq!(
                rig.meta.len(&table).unwrap_or(0),
                0,
                "round {round}: {table} kept rows after {changes} changes"
            );
        }
    }
}

/// A step of `random_sequences_of_changes_match_a_model`: paths are indexes into `PATHS`.
#[derive(Debug, Clone)]
enum Step {
    Create(usize),
    Mkdir(usize),
    Write(usize, u16, u16, u8),
    Truncate(usize, u16),
    Remove(usize),
    Rmdir(usize),
    Rename(usize, usize),
}

/// Every path a sequence touches: two names at the top and under each of them.
const PATHS: [&str; 6] = ["a", "b", "a/a", "a/b", "b/a", "b/b"];

#[derive(Debug, Clone, PartialEq)]
enum Node {
    File(Vec<u8>),
    Dir,
}

fn parent_and_name(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// What a POSIX file system does with `step`: `false` (an error, nothing changed) or `true`
/// with the model changed.
fn model_step(model: &mut std::collections::BTreeMap<String, Node>, step: &Step) -> bool {
    let parent_is_dir = |model: &std::collections::BTreeMap<String, Node>, path: &str| {
        let (parent, _) = parent_and_name(path);
        parent.is_empty() || model.get(parent) == Some(&Node::Dir)
    };
    let has_children = |model: &std::collections::BTreeMap<String, Node>, path: &str| {
        let below = format!("{path}/");
        model.keys().any(|k| k.starts_with(&below))
    };
    match *step {
        Step::Create(p) | Step::Mkdir(p) => {
            let path = PATHS[p];
            if !parent_is_dir(model, path) || model.contains_key(path) {
                return false;
            }
            let node = match step {
                Step::Mkdir(_) => Node::Dir,
                _ => Node::File(Vec::new()),
            };
            model.insert(path.to_string(), node);
            true
        }
        Step::Write(p, at, len, byte) => match model.get_mut(PATHS[p]) {
            Some(Node::File(data)) => {
                let end = at as usize + len as usize;
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[at as usize..end].fill(byte);
                true
            }
            _ => false,
        },
        Step::Truncate(p, size) => match model.get_mut(PATHS[p]) {
            Some(Node::File(data)) => {
                data.resize(size as usize, 0);
                true
            }
            _ => false,
        },
        Step::Remove(p) => match model.get(PATHS[p]) {
            Some(Node::File(_)) => {
                model.remove(PATHS[p]);
                true
            }
            _ => false,
        },
        Step::Rmdir(p) => match model.get(PATHS[p]) {
            Some(Node::Dir) if !has_children(model, PATHS[p]) => {
                model.remove(PATHS[p]);
                true
            }
            _ => false,
        },
        Step::Rename(from, to) => {
            let (from, to) = (PATHS[from], PATHS[to]);
            let Some(moving) = model.get(from).cloned() else {
                return false;
            };
            if !parent_is_dir(model, to) || to.starts_with(&format!("{from}/")) {
                return false;
            }
            if from == to {
                return true;
            }
            match (&moving, model.get(to)) {
                (_, None) => {}
                (Node::File(_), Some(Node::File(_))) => {}
                (Node::Dir, Some(Node::Dir)) if !has_children(model, to) => {}
                _ => return false,
            }
            model.remove(to);
            let below = format!("{from}/");
            let moved: Vec<(String, Node)> = model
                .iter()
                .filter(|(k, _)| *k == from || k.starts_with(&below))
                .map(|(k, v)| (format!("{to}{}", &k[from.len()..]), v.clone()))
                .collect();
            model.retain(|k, _| k != from && !k.starts_with(&below));
            model.extend(moved);
            true
        }
    }
}

/// What the share holds, walked from its root: paths, kinds and contents.
fn share_tree(share: &Share) -> std::collections::BTreeMap<String, Node> {
    let mut tree = std::collections::BTreeMap::new();
    let mut dirs = vec![(share.root(), String::new())];
    while let Some((dir, path)) = dirs.pop() {
        for (name, attrs) in share.list(dir, None, 100).expect("list") {
            let child = if path.is_empty() {
                name
            } else {
                format!("{path}/{name}")
            };
            if attrs.kind == Kind::Dir {
                dirs.push((attrs.fileid, child.clone()));
                tree.insert(child, Node::Dir);
            } else {
                let (data, _) = share.read(attrs.fileid, 0, 1 << 20).expect("read");
                tree.insert(child, Node::File(data));
            }
        }
    }
    tree
}

fn step_strategy() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let path = 0..PATHS.len();
    prop_oneof![
        path.clone().prop_map(Step::Create),
        path.clone().prop_map(Step::Mkdir),
        (path.clone(), 0..5000u16, 1..3000u16, any::<u8>())
            .prop_map(|(p, at, len, byte)| Step::Write(p, at, len, byte)),
        (path.clone(), 0..6000u16).prop_map(|(p, size)| Step::Truncate(p, size)),
        path.clone().prop_map(Step::Remove),
        path.clone().prop_map(Step::Rmdir),
        (path.clone(), path).prop_map(|(from, to)| Step::Rename(from, to)),
    ]
}

/// Random sequences of creates, writes, truncations, removes and renames (of files and
/// directories, over and into each other) on a share that uploads as it goes: each step
/// succeeds exactly when a POSIX file system's would, the tree then matches the model, and
/// once uploaded the bucket holds the model's files (same bytes) and directory markers under
/// the share's prefix, and nothing else.
#[test]
fn random_sequences_of_changes_match_a_model() {
    use proptest::prelude::*;
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(24);
    for rig in rigs(Duration::ZERO) {
        let case = std::sync::atomic::AtomicU32::new(0);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases));
        runner
            .run(
                &proptest::collection::vec(step_strategy(), 1..40),
                |steps| {
                    let name = format!("m{}", case.fetch_add(1, Ordering::Relaxed));
                    run_steps(&rig, &name, &steps)
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// One case of `random_sequences_of_changes_match_a_model`, on a new share `name`.
fn run_steps(
    rig: &Rig,
    name: &str,
    steps: &[Step],
) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prelude::*;
    let name = name.to_string();
    rig.shares()
        .create(&name, &format!("{name}/"), false, Vec::new(), Squash::Root)
        .expect("create");
    let share = rig.share(&name);
    let mut model = std::collections::BTreeMap::new();
    for step in steps {
        let expected = model_step(&mut model, step);
        let id = |path: &str| -> Result<u64, ShareError> {
            let mut id = share.root();
            for part in path.split('/').filter(|p| !p.is_empty()) {
                id = share.lookup(id, part)?;
            }
            Ok(id)
        };
        let parent = |path: &str| id(parent_and_name(path).0);
        let name_of = |path: &str| parent_and_name(path).1.to_string();
        let done = match *step {
            Step::Create(p) => parent(PATHS[p])
                .and_then(|d| share.create(d, &name_of(PATHS[p]), 0o644, 0, 0, true))
                .is_ok(),
            Step::Mkdir(p) => parent(PATHS[p])
                .and_then(|d| share.mkdir(d, &name_of(PATHS[p]), 0o755, 0, 0))
                .is_ok(),
            Step::Write(p, at, len, byte) => id(PATHS[p])
                .and_then(|f| share.write(f, u64::from(at), &vec![byte; len as usize], false))
                .is_ok(),
            Step::Truncate(p, size) => id(PATHS[p])
                .and_then(|f| {
                    let set = firn::engines::share::SetAttrs {
                        size: Some(u64::from(size)),
                        ..Default::default()
                    };
                    share.setattr(f, set)
                })
                .is_ok(),
            Step::Remove(p) => parent(PATHS[p])
                .and_then(|d| share.remove(d, &name_of(PATHS[p])))
                .is_ok(),
            Step::Rmdir(p) => parent(PATHS[p])
                .and_then(|d| share.rmdir(d, &name_of(PATHS[p])))
                .is_ok(),
            Step::Rename(from, to) => parent(PATHS[from])
                .and_then(|fd| {
                    let td = parent(PATHS[to])?;
                    share.rename(fd, &name_of(PATHS[from]), td, &name_of(PATHS[to]))
                })
                .is_ok(),
        };
        prop_assert_eq!(done, expected, "{:?} after {:?}", step, steps);
    }
    prop_assert_eq!(&share_tree(&share), &model);
    rig.wait_clean(&name);
    let mut bucket = std::collections::BTreeMap::new();
    for object in rig
        .runtime
        .block_on(rig.raw.list(&format!("{name}/")))
        .expect("list")
    {
        let path = object.key[name.len() + 1..].to_string();
        if let Some(dir) = path.strip_suffix('/') {
            bucket.insert(dir.to_string(), Node::Dir);
        } else {
            let body = rig
                .runtime
                .block_on(rig.raw.get(&object.key))
                .expect("get")
                .body;
            bucket.insert(path, Node::File(body.to_vec()));
        }
    }
    prop_assert_eq!(&bucket, &model, "the bucket after {:?}", steps);
    Ok(())
}

/// A directory of more objects than one page of the bucket's listing holds (S3 gives 1,000
/// a page, the directory store 10,000) is refreshed whole, a page at a time: every object
/// comes in, a file written here and not uploaded stays, and of the objects deleted from
/// the bucket, on every page, exactly those go.
#[test]
fn a_directory_of_many_listing_pages_is_refreshed_whole() {
    for rig in rigs(Duration::from_secs(3600)) {
        let count = if rig.s3_prefix.is_some() {
            2_100
        } else {
            10_100
        };
        rig.shares()
            .create("m", "m/", false, Vec::new(), Squash::Root)
            .expect("create");
        let share = rig.share("m");
        let name = |i: usize| format!("f{i:05}");
        let keys: Vec<String> = (0..count).map(|i| format!("m/{}", name(i))).collect();
        let put_all = |keys: &[String]| {
            for batch in keys.chunks(64) {
                rig.runtime
                    .block_on(futures::future::try_join_all(batch.iter().map(|key| {
                        rig.raw
                            .put(key, bytes::Bytes::from(key.clone()), remote::Meta::new())
                    })))
                    .expect("put by another tool");
            }
        };
        put_all(&keys);
        // A directory among the files, and a file of the share's own between them.
        put_all(&["m/f01000.d/inner".to_string()]);
        let own = share
            .create(share.root(), "f01500-own", 0o644, 0, 0, true)
            .expect("create");
        share.write(own.fileid, 0, b"mine", false).expect("write");
        let report = share.refresh("").expect("refresh");
        assert_eq!(
            (report.added, report.removed),
            (count as u64 + 1, 0),
            "{report:?}"
        );
        let dir = share
            .lookup(share.root(), "f01000.d")
            .expect("the directory");
        share.lookup(dir, "inner").expect("the file in it");
        // Every 7th goes from the bucket.
        let deleted: Vec<usize> = (0..count).step_by(7).collect();
        for batch in deleted.chunks(64) {
            rig.runtime
                .block_on(futures::future::try_join_all(
                    batch.iter().map(|&i| rig.raw.delete(&keys[i])),
                ))
                .expect("delete by another tool");
        }
        let heads = rig.metrics.requests_total("head");
        let report = share.refresh("").expect("refresh");
        assert_eq!(
            (report.added, report.removed),
            (0, deleted.len() as u64),
            "{report:?}"
        );
        // The walk of the namespace kept pace with the listing: only the files no page
        // listed were asked for once more (a HEAD each) before they went.
        assert_eq!(
            rig.metrics.requests_total("head") - heads,
            deleted.len() as u64
        );
        for i in 0..count {
            let found = share.lookup(share.root(), &name(i)).is_ok();
            assert_eq!(found, i % 7 != 0, "{}", name(i));
        }
        share
            .lookup(share.root(), "f01500-own")
            .expect("the share's own file");
        share
            .lookup(dir, "inner")
            .expect("the file in the directory");
    }
}

/// A refresh under way shows in the share's status (`share show`): since when, where, and
/// how far it has come; once it ends, it does not, and its end is the last refresh.
#[test]
fn a_refresh_under_way_shows_its_progress() {
    for rig in rigs(Duration::from_secs(3600)) {
        let (share, _) = rig.new_share("s");
        for d in 0..6 {
            rig.runtime
                .block_on(rig.raw.put(
                    &format!("s/d{d}/f"),
                    bytes::Bytes::from_static(b"new"),
                    remote::Meta::new(),
                ))
                .expect("put by another tool");
        }
        assert!(share.status().refreshing.is_none());
        // Each listing page takes 300 ms: the refresh of 7 directories takes seconds.
        rig.faults.set(firn::remote::faults::FaultSettings {
            latency_ms: 300,
            ..Default::default()
        });
        let refreshing = std::thread::spawn({
            let share = share.clone();
            move || share.refresh("")
        });
        let started = Instant::now();
        let mut seen = Vec::new();
        while !refreshing.is_finished() {
            if let Some(progress) = share.status().refreshing {
                seen.push(progress);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        rig.faults.set(Default::default());
        let report = refreshing.join().expect("refresh").expect("refresh");
        assert!(report.added >= 6, "{report:?}");
        let (first, last) = (
            seen.first().expect("no progress shown"),
            seen.last().unwrap(),
        );
        assert!(
            first.under.is_empty() && !first.since.is_empty(),
            "{first:?}"
        );
        assert!(
            last.directories > first.directories && last.added > first.added,
            "no progress in {:?}: {seen:?}",
            started.elapsed()
        );
        let status = share.status();
        assert!(status.refreshing.is_none(), "{:?}", status.refreshing);
        assert!(status.last_refresh.is_some());
    }
}

/// A client's listing that refreshes its directory waits at most about `LISTING_WAIT` (2 s)
/// however slow the bucket and however many objects are new (each costs a HEAD), and later
/// listings take in the rest.
#[test]
fn a_listing_waits_boundedly_for_a_slow_refresh_and_later_ones_finish_it() {
    for mut rig in rigs(Duration::from_secs(3600)) {
        rig.listing_ttl = Some(Duration::ZERO);
        rig.reopen(Duration::from_secs(3600));
        let (share, root) = rig.new_share("s");
        for i in 0..40 {
            rig.runtime
                .block_on(rig.raw.put(
                    &format!("s/n{i:02}"),
                    bytes::Bytes::from_static(b"new"),
                    remote::Meta::new(),
                ))
                .expect("put by another tool");
        }
        // 40 HEADs of 150 ms each would take 6 s.
        rig.faults.set(firn::remote::faults::FaultSettings {
            latency_ms: 150,
            ..Default::default()
        });
        let started = Instant::now();
        let first = share.list(root, None, 100).expect("list").len();
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(4),
            "the listing waited {waited:?}"
        );
        assert!(first < 40, "all {first} taken in within {waited:?}");
        rig.faults.set(Default::default());
        let mut listed = first;
        for _ in 0..10 {
            listed = share.list(root, None, 100).expect("list").len();
            if listed == 40 {
                break;
            }
        }
        assert_eq!(listed, 40);
    }
}

/// Two shares never hold the same objects: a prefix inside, around or equal to another
/// share's in the same bucket is refused, and nothing is made; beside it, it is fine.
#[test]
fn shares_in_one_bucket_never_overlap() {
    let rig = rigs(Duration::from_secs(3600)).remove(0);
    let shares = rig.shares();
    let create =
        |name: &str, prefix: &str| shares.create(name, prefix, false, Vec::new(), Squash::Root);
    let refused = |name: &str, prefix: &str, over: &str| {
        match create(name, prefix) {
            Err(ShareError::Invalid(why)) => {
                assert!(why.contains("overlaps") && why.contains(over), "{why}")
            }
            other => panic!("{prefix:?} over {over}: {other:?}"),
        }
        assert!(shares.get(name).expect("get").is_none(), "{name} was made");
    };
    create("media", "media/").expect("media");
    refused("inside", "media/sub/", "media");
    refused("same", "media/", "media");
    create("beside", "mediax/").expect("a prefix beside another");
    shares.delete("media").expect("delete media");
    create("deep", "media/sub/").expect("free once media is gone");
    refused("around", "media/", "deep");
}

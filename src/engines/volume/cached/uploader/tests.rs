//! The uploader driven by hand: a cached volume whose uploader task never runs by itself (it
//! is spawned on a runtime nobody drives); a test calls `step`, so it chooses every
//! interleaving of uploads, checkpoints and commits.

use std::sync::Arc;
use std::time::Duration;

use super::super::{Bucket, CachedVolume, OpenParams, Settings, lock};
use super::step;
use crate::engines::volume::BlockDevice;
use crate::local::meta::MetaStore;
use crate::remote::Remote;
use crate::seal::{MasterKey, Sealer};

struct Harness {
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    idle: tokio::runtime::Runtime,
    vol: CachedVolume,
    remote: Arc<dyn Remote>,
    sealer: Arc<Sealer>,
    id: String,
}

fn settings() -> Settings {
    Settings {
        segment_bytes: 64 << 10,
        log_max: 64 << 20,
        cache_max: 1 << 30,
        commit_interval: Duration::from_millis(1),
        checkpoint_segments: 1,
        read_timeout: Duration::from_secs(5),
        gc_live_percent: 50,
        gc_interval: Duration::ZERO,
        gc_grace: Duration::ZERO,
        min_free: 0,
    }
}

fn open(settings: Settings) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let remote: Arc<dyn Remote> =
        Arc::new(crate::remote::dir::DirStore::open(dir.path().join("bucket")).unwrap());
    let sealer = Arc::new(Sealer::new(&MasterKey::from_bytes([9; 32])));
    let meta = Arc::new(MetaStore::open(dir.path().join("meta.redb")).unwrap());
    let id = "0123456789abcdef0123456789abcdef".to_string();
    let h = Closed {
        dir,
        rt,
        idle,
        remote,
        sealer,
        id: id.clone(),
        meta,
    }
    .reopen(settings);
    // What the uploader's loop does first.
    let descriptor = super::super::Descriptor {
        format: 1,
        id,
        name: "v".into(),
        size: 64 << 20,
        created: "now".into(),
    };
    h.rt.block_on(super::put_descriptor(&h.vol.inner, &descriptor))
        .unwrap();
    h
}

impl Harness {
    /// One uploader step, as the uploader's loop runs it.
    fn step(&self) -> bool {
        std::thread::sleep(Duration::from_millis(3)); // commit_interval passes
        let inner = self.vol.inner.clone();
        self.rt.block_on(step(&inner)).unwrap()
    }
    /// Steps until the uploader has nothing to do.
    fn drive(&self) {
        for _ in 0..200 {
            if !self.step() {
                return;
            }
        }
        panic!("the uploader never went idle");
    }
    fn write(&self, offset: u64, byte: u8) {
        let mut data = vec![byte; 4096];
        self.vol.write(offset, &mut data, false).unwrap();
    }
    fn bucket_has(&self, key: &str) -> bool {
        self.rt.block_on(self.remote.head(key)).unwrap().is_some()
    }
    /// The volume's bucket as gateway `gateway` sees it, through `remote`; its uploads run
    /// on the runtime nobody drives.
    fn bucket(&self, remote: Arc<dyn Remote>, gateway: &str) -> Bucket {
        Bucket {
            remote,
            prefix: self.prefix(),
            runtime: self.rt.handle().clone(),
            uploads: self.idle.handle().clone(),
            gateway: gateway.into(),
        }
    }
    fn prefix(&self) -> String {
        format!("volumes/{}/", self.id)
    }
    /// A second gateway takes the volume over from the bucket (`--force`), into a new
    /// directory and metadata store.
    fn take_over(&self) -> Result<(), String> {
        // On a copy of the bucket, so that the takeover's commit fences nothing here.
        let n = TAKEOVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let copy = self.dir.path().join(format!("bucket-copy-{n}"));
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(self.dir.path().join("bucket"))
            .arg(&copy)
            .status()
            .unwrap();
        assert!(status.success());
        let remote: Arc<dyn Remote> = Arc::new(crate::remote::dir::DirStore::open(&copy).unwrap());
        let meta = MetaStore::open(self.dir.path().join(format!("meta-b{n}.redb"))).unwrap();
        let bucket = self.bucket(remote, "gw-b");
        self.rt
            .block_on(super::super::restore::take_over(
                &bucket,
                &self.sealer,
                &meta,
                &self.id,
                &self.dir.path().join(format!("vol-b{n}")),
                true,
                true,
            ))
            .map(drop)
            .map_err(|e| e.to_string())
    }
    fn newest_commit(&self) -> super::super::Commit {
        let bucket = self.bucket(self.remote.clone(), "gw-x");
        self.rt
            .block_on(super::super::restore::newest_commit(
                &bucket,
                &self.sealer,
                &self.id,
            ))
            .unwrap()
            .unwrap()
    }
}

/// A harness whose volume was stopped and dropped, as by a daemon's restart: its
/// directory, bucket and metadata store stay for the next open.
struct Closed {
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    idle: tokio::runtime::Runtime,
    remote: Arc<dyn Remote>,
    sealer: Arc<Sealer>,
    id: String,
    meta: Arc<MetaStore>,
}

impl Harness {
    fn close(self) -> Closed {
        let Harness {
            dir,
            rt,
            idle,
            vol,
            remote,
            sealer,
            id,
        } = self;
        // The store stays open (the volume's uploader task, never run, holds it too).
        let meta = vol.inner.meta.clone();
        vol.stop();
        drop(vol);
        Closed {
            dir,
            rt,
            idle,
            remote,
            sealer,
            id,
            meta,
        }
    }
}

impl Closed {
    fn open(&self, settings: Settings) -> std::io::Result<CachedVolume> {
        CachedVolume::open(OpenParams {
            id: self.id.clone(),
            name: "v".into(),
            size: 64 << 20,
            read_only: false,
            created: "now".into(),
            dir: self.dir.path().join("vol"),
            sealer: self.sealer.clone(),
            meta: self.meta.clone(),
            bucket: Bucket {
                remote: self.remote.clone(),
                prefix: format!("volumes/{}/", self.id),
                runtime: self.rt.handle().clone(),
                uploads: self.idle.handle().clone(),
                gateway: "gw-a".into(),
            },
            settings,
        })
    }
    fn reopen(self, settings: Settings) -> Harness {
        let vol = self.open(settings).expect("reopen");
        Harness {
            dir: self.dir,
            rt: self.rt,
            idle: self.idle,
            vol,
            remote: self.remote,
            sealer: self.sealer,
            id: self.id,
        }
    }
}

const B: u64 = 4096;
static TAKEOVERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A commit whose cut is older than every checkpoint the progress record still lists must
/// still name a checkpoint that is in the bucket (the newest commit's), not replay from
/// segment 1, which garbage collection deleted long before.
#[test]
fn a_commit_behind_many_checkpoints_names_one_still_in_the_bucket() {
    let h = open(settings());
    // Phase 1: segment 1 holds data overwritten later, so it is garbage once a commit
    // names a checkpoint past it.
    for round in 1..=2u8 {
        for block in 0..16 {
            h.write(block * B, round);
        }
    }
    h.vol.flush().unwrap();
    h.drive();
    h.drive();
    let seg1 = format!("{}segments/{:016x}", h.prefix(), 1);
    assert!(!h.bucket_has(&seg1), "garbage collection deleted segment 1");
    let before = h.newest_commit();
    eprintln!("after phase 1: {before:?}");
    assert!(before.checkpoint.segment > 1);
    h.take_over().expect("the image restores before");

    // Phase 2: a client flushes once, then keeps writing without flushing while the
    // uploader is busy: each time its backlog drains it writes a checkpoint (one per
    // segment here), and a segment fills meanwhile, so no commit runs in between (nor
    // between uploads: the newest commit counts as made just now for the whole phase).
    lock(&h.vol.inner.state).last_commit_at =
        Some(std::time::Instant::now() + Duration::from_secs(3600));
    h.write(100 * B, 7);
    h.vol.flush().unwrap();
    let flushed_at = h.vol.inner.log.lock().unwrap().position();
    h.write(101 * B, 8); // not flushed
    let commit_n = lock(&h.vol.inner.state).progress.commit;
    let mut next = 200;
    let mut checkpoints = 0;
    for _ in 0..40 {
        let before = lock(&h.vol.inner.state).checkpoint;
        assert!(h.step());
        if lock(&h.vol.inner.state).checkpoint != before {
            checkpoints += 1;
            if checkpoints == 5 {
                break;
            }
            // A segment's worth of writes arrived while the checkpoint was written.
            for _ in 0..32 {
                h.write(next * B, 9);
                next += 1;
            }
        }
        assert_eq!(
            lock(&h.vol.inner.state).progress.commit,
            commit_n,
            "no commit in between"
        );
    }
    assert_eq!(checkpoints, 5);
    h.drive();
    let after = h.newest_commit();
    assert!(after.n > before.n, "a commit ran after the checkpoints");
    assert!(
        after.cut >= flushed_at,
        "{after:?} covers the flush at {flushed_at:?}"
    );
    assert_ne!(after.checkpoint.segment, 0, "{after:?} names a checkpoint");
    h.take_over()
        .expect("a new gateway restores the bucket's newest image");
}

/// An old gateway that still holds a backlog when the volume is taken over uploads it, in
/// order, until its next commit or lease renewal fences it. The new owner's segments are
/// numbered past all of that backlog, so they collide with none of it and the new owner
/// keeps the volume.
#[test]
fn an_old_gateways_backlog_does_not_collide_with_the_new_owners_segments() {
    let h = open(settings());
    h.write(0, 1);
    h.vol.flush().unwrap();
    h.drive();
    // A backlog of many segments (16 writes fill one here), flushed and not uploaded yet.
    for block in 0..40 * 16 {
        h.write(block * B, 2);
    }
    h.vol.flush().unwrap();

    // Gateway B takes the volume over in the same bucket.
    let meta = Arc::new(MetaStore::open(h.dir.path().join("meta-b.redb")).unwrap());
    let bucket = |gateway: &str| h.bucket(h.remote.clone(), gateway);
    let dir = h.dir.path().join("vol-b");
    let descriptor =
        h.rt.block_on(super::super::restore::take_over(
            &bucket("gw-b"),
            &h.sealer,
            &meta,
            &h.id,
            &dir,
            true,
            true,
        ))
        .unwrap()
        .descriptor;

    // The old gateway uploads its backlog, then its commit is refused.
    for _ in 0..200 {
        let inner = h.vol.inner.clone();
        if !matches!(h.rt.block_on(step(&inner)), Ok(true)) {
            break;
        }
    }
    assert!(
        lock(&h.vol.inner.state).fenced.is_some(),
        "the old gateway is fenced"
    );

    // The new owner writes, flushes and commits.
    let b = CachedVolume::open(OpenParams {
        id: h.id.clone(),
        name: "v".into(),
        size: descriptor.size,
        read_only: false,
        created: descriptor.created.clone(),
        dir,
        sealer: h.sealer.clone(),
        meta,
        bucket: bucket("gw-b"),
        settings: settings(),
    })
    .unwrap();
    for block in 0..3 * 16 {
        let mut data = vec![3; 4096];
        b.write(block * B, &mut data, false).unwrap();
    }
    b.flush().unwrap();
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(3));
        let inner = b.inner.clone();
        if !h.rt.block_on(step(&inner)).unwrap() {
            break;
        }
    }
    let fenced = lock(&b.inner.state).fenced.clone();
    assert_eq!(fenced, None, "the new owner keeps the volume");
    let newest = h.newest_commit();
    assert_eq!(newest.gateway, "gw-b");
    assert!(newest.cut == lock(&b.inner.state).committed.unwrap());
}

/// A gateway that comes back after another took the volume over, and finds that one's lease
/// stale (it is down), fences itself all the same: the newest commit is the other's, so
/// nothing it would accept could ever commit.
#[test]
fn a_stale_lease_of_a_newer_owner_fences_the_old_one() {
    let h = open(settings());
    h.write(0, 1);
    h.vol.flush().unwrap();
    h.drive();
    let meta = MetaStore::open(h.dir.path().join("meta-b.redb")).unwrap();
    let bucket = h.bucket(h.remote.clone(), "gw-b");
    h.rt.block_on(super::super::restore::take_over(
        &bucket,
        &h.sealer,
        &meta,
        &h.id,
        &h.dir.path().join("vol-b"),
        true,
        true,
    ))
    .unwrap();
    // Gateway B's lease, as B left it long ago.
    let mut lease =
        h.rt.block_on(super::super::restore::lease(&bucket, &h.sealer, &h.id))
            .unwrap()
            .unwrap();
    assert!(lease.since > 0);
    lease.time = 1;
    let sealed = h.sealer.seal(
        &super::super::restore::lease_context(&h.id),
        &serde_json::to_vec(&lease).unwrap(),
    );
    h.rt.block_on(h.remote.put(
        &format!("{}lease", h.prefix()),
        sealed.into(),
        crate::remote::Meta::new(),
    ))
    .unwrap();

    let inner = h.vol.inner.clone();
    h.rt.block_on(super::put_lease(&inner)).unwrap();
    assert!(
        lock(&inner.state).fenced.is_some(),
        "the old owner is fenced"
    );
    let after =
        h.rt.block_on(super::super::restore::lease(&bucket, &h.sealer, &h.id))
            .unwrap()
            .unwrap();
    assert_eq!(after.gateway, "gw-b", "the newer owner's lease stays");
}

/// Descriptors, commits and leases carry their format version; one this firn does not know
/// is refused by name, and a lease from before the field reads as version 1.
#[test]
fn other_format_versions_are_refused_by_name() {
    let sealer = Sealer::new(&MasterKey::from_bytes([3; 32]));
    let id = "0123456789abcdef0123456789abcdef";
    let commit = |format: u32| {
        let text = format!(
            r#"{{"format":{format},"volume":"{id}","n":1,"size":4096,"checkpoint":{{"segment":0,"end":0}},"runs":[],"cut":{{"segment":1,"end":64}},"gateway":"gw","time":1}}"#
        );
        sealer.seal(&super::commit_context(id), text.as_bytes())
    };
    assert_eq!(super::open_commit(&sealer, id, &commit(1)).unwrap().n, 1);
    let e = super::open_commit(&sealer, id, &commit(2)).unwrap_err();
    assert!(e.contains("commit format version 2"), "{e}");

    let descriptor = |format: u32| {
        let text = format!(
            r#"{{"format":{format},"id":"{id}","name":"v","size":4096,"created":"2026-01-01T00:00:00Z"}}"#
        );
        sealer.seal(&super::descriptor_context(id), text.as_bytes())
    };
    assert_eq!(
        super::open_descriptor(&sealer, id, &descriptor(1))
            .unwrap()
            .name,
        "v"
    );
    let e = super::open_descriptor(&sealer, id, &descriptor(7)).unwrap_err();
    assert!(e.contains("descriptor format version 7"), "{e}");

    // Leases, read through the bucket as a takeover does.
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let remote: Arc<dyn Remote> =
        Arc::new(crate::remote::dir::DirStore::open(dir.path().join("bucket")).unwrap());
    let bucket = Bucket {
        remote: remote.clone(),
        prefix: format!("volumes/{id}/"),
        runtime: rt.handle().clone(),
        uploads: rt.handle().clone(),
        gateway: "gw".into(),
    };
    let read_lease = |text: &str| {
        let sealed = sealer.seal(&super::super::restore::lease_context(id), text.as_bytes());
        rt.block_on(remote.put(&bucket.lease_key(), sealed.into(), Default::default()))
            .unwrap();
        rt.block_on(super::super::restore::lease(&bucket, &sealer, id))
    };
    let old = read_lease(r#"{"gateway":"gw","time":5}"#).unwrap().unwrap();
    assert_eq!((old.format, old.since), (1, 0));
    let e = read_lease(r#"{"format":2,"gateway":"gw","time":5,"since":3}"#).unwrap_err();
    assert!(e.to_string().contains("lease format version 2"), "{e}");
}

/// A volume whose local checkpoint file is gone (deleted by hand, left out of a restored
/// backup) is not opened: without it the volume would read as zeros and set its flushed,
/// not yet uploaded log aside. The error names the file.
#[test]
fn a_volume_whose_local_checkpoint_is_gone_is_not_opened() {
    let h = open(settings());
    for block in 0..32 {
        h.write(block * B, 1);
    }
    h.vol.flush().unwrap();
    h.drive();
    assert_ne!(
        lock(&h.vol.inner.state).checkpoint.segment,
        0,
        "no checkpoint"
    );
    // Flushed after the checkpoint, not uploaded: only the local log holds it.
    h.write(40 * B, 2);
    h.vol.flush().unwrap();
    let closed = h.close();
    let checkpoint = closed.dir.path().join("vol/checkpoint");
    let kept = closed.dir.path().join("checkpoint-aside");
    std::fs::rename(&checkpoint, &kept).unwrap();
    let e = closed
        .open(settings())
        .expect_err("opened without its checkpoint");
    assert!(e.to_string().contains("local checkpoint"), "{e}");
    // Put back, the volume opens with every flushed write.
    std::fs::rename(&kept, &checkpoint).unwrap();
    let vol = closed.open(settings()).expect("reopen");
    let mut buf = vec![0; 4096];
    vol.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![1; 4096]);
    vol.read(40 * B, &mut buf).unwrap();
    assert_eq!(buf, vec![2; 4096]);
}

/// A write that closes a segment sees room in the reserve, then waits for the records still
/// being written into the old segment; if the reserve shrinks meanwhile (a checkpoint takes
/// its file's space out of it on a full disk, a smaller `log_max` gives some back), the
/// write waits for room, as it does when there was none to begin with. It failed with EIO.
#[test]
fn a_reserve_that_shrinks_while_a_segment_closes_makes_the_write_wait() {
    use super::super::record::{self, Kind};
    let h = open(settings());
    let inner = h.vol.inner.clone();
    let record = record::record_len(Kind::Write, B);
    // Fill the open segment until it has room for one more record.
    let mut block = 0;
    while lock(&inner.log).end + 2 * record <= inner.settings.segment_bytes {
        h.write(block * B, 3);
        block += 1;
    }
    // That record is taken and held half-written, as another connection's would be.
    let held = {
        let mut w = lock(&inner.log);
        inner.reserve(&mut w, Kind::Write, block * B, B)
    };
    let writer = {
        let inner = inner.clone();
        std::thread::spawn(move || {
            let mut data = vec![4u8; B as usize];
            inner.append(Kind::Write, (block + 1) * B, B, &mut data)
        })
    };
    // The writer saw room, and waits for the held record before it closes the segment.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!writer.is_finished());
    let taken = {
        let mut reserve = lock(&inner.reserve);
        let all = reserve.held();
        assert!(reserve.take(all).unwrap());
        all
    };
    let mut data = vec![3u8; B as usize];
    inner.complete(held, &mut data).unwrap();
    // No room now: the writer waits rather than failing.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !writer.is_finished(),
        "the write ended without room: {:?}",
        writer.join().unwrap()
    );
    lock(&inner.reserve).give(taken);
    inner.room.notify_all();
    writer
        .join()
        .unwrap()
        .expect("the write once room came back");
    let mut buf = vec![0; B as usize];
    h.vol.read((block + 1) * B, &mut buf).unwrap();
    assert_eq!(buf, vec![4; B as usize]);
    h.vol.read(block * B, &mut buf).unwrap();
    assert_eq!(buf, vec![3; B as usize]);
}

/// A log write that fails (a disk error) leaves a hole in its segment, and records after it
/// when other writes were in flight. That segment is never sealed and uploaded as it is: a
/// restart cuts it at the hole, and the bucket's copy must be what the log replays, or a
/// later commit past it could not be restored (the hole reads as a torn record).
#[test]
fn a_segment_with_a_failed_write_is_not_uploaded_with_its_hole() {
    use super::super::record::Kind;
    let h = open(settings());
    let inner = h.vol.inner.clone();
    for block in 0..4 {
        h.write(block * B, 1);
    }
    h.vol.flush().unwrap();
    h.drive();
    // A backlog: a segment closed (and flushed) before the failure, not uploaded yet.
    let sealed = lock(&inner.log).seq;
    let mut block = 100;
    while lock(&inner.log).seq == sealed {
        h.write(block * B, 5);
        block += 1;
    }
    h.vol.flush().unwrap();
    // The next record's write fails: the open segment's handle refuses writes for it.
    let (path, writable) = {
        let w = lock(&inner.log);
        let path = h.dir.path().join(format!("vol/segments/{:016x}", w.seq));
        (path, w.file.clone())
    };
    lock(&inner.log).file = Arc::new(std::fs::File::open(&path).unwrap());
    let mut data = vec![2u8; B as usize];
    h.vol
        .write(8 * B, &mut data, false)
        .expect_err("a write into a read-only handle");
    // A write that was in flight at the time lands after the hole.
    lock(&inner.log).file = writable;
    let mut data = vec![3u8; B as usize];
    inner.append(Kind::Write, 9 * B, B, &mut data).unwrap();
    h.vol.flush().expect_err("a flush after a failed write");
    // The uploader's steps would close the segment by age (each then stops at the failed
    // sync a checkpoint needs).
    std::thread::sleep(Duration::from_millis(50));
    for _ in 0..5 {
        let _ = h.rt.block_on(step(&inner));
    }
    // The backlog from before the failure still goes up.
    assert!(
        h.bucket_has(&inner.bucket.segment_key(sealed)),
        "the segment closed before the failure was not uploaded"
    );
    drop(inner);
    // Reattached: the log is cut at the hole; new writes go on, and are committed.
    let h = h.close().reopen(Settings {
        // No checkpoint past the hole's segment: a restore replays it.
        checkpoint_segments: 1000,
        ..settings()
    });
    for block in 16..20 {
        h.write(block * B, 4);
    }
    h.vol.flush().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    h.drive();
    let mut buf = vec![0; B as usize];
    h.vol.read(9 * B, &mut buf).unwrap();
    assert_eq!(buf, vec![0; B as usize], "a write after the hole survived");
    // Another gateway restores the newest commit, past the hole's segment.
    h.take_over().expect("a takeover of the newest commit");
}

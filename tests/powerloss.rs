//! Power loss: the daemon's data directory on a file system that forgets every unsynced change
//! when the power is cut (tests/common/powerloss.rs), so what firn promises after a crash is
//! checked against a disk that loses its cache, not just against kill -9.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Lines, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

use common::powerloss::{CutReport, PowerCut, PowerLossMount};
use common::{Daemon, free_port};
use firn::local::log::Log;
use rand::{Rng, SeedableRng};

/// A backing directory and a mount of it, in one temporary directory.
fn mounted() -> (tempfile::TempDir, PowerLossMount) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mountpoint) = (dir.path().join("backing"), dir.path().join("mnt"));
    fs::create_dir(&backing).expect("backing dir");
    fs::create_dir(&mountpoint).expect("mountpoint");
    let mount = PowerLossMount::mount(&backing, &mountpoint)
        .expect("mount the power-loss file system (needs /dev/fuse and fusermount3)");
    (dir, mount)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 7) as u8))
        .collect()
}

/// The harness itself: synced data survives a cut, unsynced writes, truncates and punched
/// holes are gone, and every page after a partial cut holds its synced or its newer content.
#[test]
fn the_file_system_forgets_exactly_what_was_not_synced() {
    let (_dir, mut mount) = mounted();
    let path = mount.path().join("f");
    let synced = pattern(1, 64 << 10);
    {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        file.write_all_at(&synced, 0).expect("write");
        file.sync_data().expect("fdatasync");
        file.write_all_at(&pattern(2, 8192), 4096).expect("write");
        file.write_all_at(b"tail", 70_000)
            .expect("write past the end");
        nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            32768,
            8192,
        )
        .expect("punch");
        // Before the cut, the file reads as written.
        let mut now = fs::read(&path).expect("read");
        assert_eq!(now.len(), 70_004);
        assert_eq!(&now[4096..12288], &pattern(2, 8192)[..]);
        assert!(now[32768..40960].iter().all(|&b| b == 0));
        now.truncate(16);
        assert!(mount.dirty_pages() > 0);
    }
    let report = mount.power_cut(PowerCut::LoseAll).expect("power cut");
    assert_eq!(report.files, 1);
    assert_eq!(fs::read(&path).expect("read after the cut"), synced);

    // A truncate is undone by a cut too.
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.set_len(100).expect("truncate");
    drop(file);
    mount.power_cut(PowerCut::LoseAll).expect("power cut");
    assert_eq!(fs::read(&path).expect("read after the cut"), synced);

    // A partial cut keeps some pages and loses others, each one whole.
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    for page in 0..16u64 {
        file.write_all_at(&pattern(3 + page as u8, 4096), page * 4096)
            .expect("write");
    }
    drop(file);
    mount
        .power_cut(PowerCut::LoseSome(7))
        .expect("partial power cut");
    let after = fs::read(&path).expect("read after the partial cut");
    for (page, bytes) in after.chunks(4096).enumerate() {
        let old = &synced[page * 4096..][..bytes.len()];
        let new = &pattern(3 + page as u8, 4096)[..bytes.len()];
        assert!(
            bytes == old || bytes == new,
            "page {page} is neither its old nor its new content"
        );
    }
    assert_eq!(after.len(), synced.len());
    assert_ne!(after, synced, "seed 7 keeps some pages");
}

/// The harness's directory operations: a creation, rename or removal is durable once its
/// directory is fsynced (a creation or rename also with an fsync of the file itself); a power
/// cut undoes the rest.
#[test]
fn the_file_system_forgets_directory_changes_no_fsync_covered() {
    let (_dir, mut mount) = mounted();
    let root = mount.path().to_path_buf();
    let sync_dir = |path: &std::path::Path| {
        fs::File::open(path)
            .and_then(|d| d.sync_all())
            .expect("fsync dir")
    };
    fs::create_dir(root.join("d")).expect("mkdir");
    fs::write(root.join("d/synced-dir"), b"a").expect("create");
    fs::File::create(root.join("d/removed"))
        .and_then(|mut f| f.write_all(b"b").and_then(|()| f.sync_all()))
        .expect("create, write and fsync");
    sync_dir(&root.join("d"));
    sync_dir(&root);
    fs::File::create(root.join("d/synced-file"))
        .and_then(|f| f.sync_all())
        .expect("create and fsync");
    fs::write(root.join("d/unsynced"), b"c").expect("create");
    fs::rename(root.join("d/synced-dir"), root.join("d/renamed")).expect("rename");
    fs::remove_file(root.join("d/removed")).expect("unlink");
    let names = |root: &std::path::Path| {
        let mut names: Vec<String> = fs::read_dir(root.join("d"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&root), ["renamed", "synced-file", "unsynced"]);
    let report = mount.power_cut(PowerCut::LoseAll).expect("power cut");
    assert_eq!(report.entries_undone, 3, "{report:?}");
    assert_eq!(names(&root), ["removed", "synced-dir", "synced-file"]);
    assert_eq!(fs::read(root.join("d/removed")).expect("read"), b"b");
    // Its name was synced, its data was not.
    assert_eq!(fs::read(root.join("d/synced-dir")).expect("read"), b"");
    // The file system's own bookkeeping is not visible.
    assert_eq!(
        fs::read_dir(&root).expect("readdir").count(),
        1,
        "only d at the root"
    );
}

#[test]
fn a_rename_over_a_file_survives_a_power_cut_whole_or_not_at_all() {
    let (_dir, mut mount) = mounted();
    let root = mount.path().to_path_buf();
    let write_synced = |name: &str, data: &[u8]| {
        fs::File::create(root.join(name))
            .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()))
            .expect("create, write and fsync");
    };
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..24 {
        write_synced("f", b"old");
        fs::File::open(&root)
            .and_then(|d| d.sync_all())
            .expect("fsync dir");
        write_synced("f.new", b"new");
        // Atomic as rename(2) is: after a power cut, `f` is the old file or the new one.
        fs::rename(root.join("f.new"), root.join("f")).expect("rename");
        let report = mount
            .power_cut(PowerCut::LoseSome(seed))
            .expect("power cut");
        let found = fs::read(root.join("f")).unwrap_or_else(|e| {
            panic!("seed {seed}: the rename's target is gone after a power cut ({report:?}): {e}")
        });
        assert!(found == b"old" || found == b"new", "seed {seed}: {found:?}");
        seen.insert(found);
        let _ = fs::remove_file(root.join("f.new"));
    }
    // Both outcomes happen over 24 seeds, so the test sees the cut land on either side.
    assert_eq!(seen.len(), 2, "{seen:?}");
}

/// A gateway whose data directory is on a power-loss mount. The NBD socket and the bucket
/// directory live outside it (the mount has no Unix sockets; the bucket is not under test).
struct Gateway {
    // Dropped in this order: the daemon (its files keep the mount busy), the mount, the
    // directory holding it.
    daemon: Option<Daemon>,
    mount: PowerLossMount,
    /// Holds the backing directory, the mountpoint, the config and the socket.
    dir: tempfile::TempDir,
    config: PathBuf,
    http_port: u16,
    nbd_port: u16,
    nfs_port: u16,
}

impl Gateway {
    fn start() -> Gateway {
        Gateway::start_with("")
    }

    /// With `extra` appended to the config.
    fn start_with(extra: &str) -> Gateway {
        let (dir, mount) = mounted();
        let (http_port, nbd_port, nfs_port) = (free_port(), free_port(), free_port());
        let config = dir.path().join("firn.toml");
        fs::write(
            &config,
            format!(
                "[local]\ndata_dir = \"{}\"\n\
                 [remote]\nkind = \"local\"\npath = \"{}\"\n\
                 [http]\nlisten = \"127.0.0.1:{http_port}\"\n\
                 [nfs]\nlisten = \"127.0.0.1:{nfs_port}\"\n[shares]\nsettle_secs = 3600\n\
                 [nbd]\nlisten = \"127.0.0.1:{nbd_port}\"\nsocket = \"{}\"\n{extra}",
                mount.path().join("data").display(),
                dir.path().join("bucket").display(),
                dir.path().join("nbd.sock").display(),
            ),
        )
        .expect("config");
        let mut gateway = Gateway {
            dir,
            mount,
            config,
            http_port,
            nbd_port,
            nfs_port,
            daemon: None,
        };
        gateway.restart();
        gateway
    }

    fn restart(&mut self) {
        self.daemon = Some(Daemon::start(&self.config, self.http_port, &[]));
    }

    /// kill -9, then the power cut; the daemon is not restarted.
    fn crash(&mut self, cut: PowerCut) -> CutReport {
        self.daemon.take().expect("running").kill9();
        let report = self.mount.power_cut(cut).expect("power cut");
        eprintln!("power cut ({cut:?}): {report:?}");
        report
    }

    fn firn(&self, args: &[&str]) -> String {
        common::firn_ok(&self.config, args)
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd_port)
    }

    /// Removes `name` from the root of share `share` over NFS; the answer must be OK.
    async fn nfs_remove(&self, share: &str, name: &str) {
        use nfs3_types::nfs3::*;
        let mut c = common::nfs_client(self.nfs_port, share, 1000, 1000).await;
        let root = c.root_nfs_fh3();
        let removed = c
            .remove(&REMOVE3args {
                object: diropargs3 {
                    dir: root,
                    name: filename3::from(name.as_bytes().to_vec()),
                },
            })
            .await
            .expect("rpc");
        assert!(
            matches!(removed, Nfs3Result::Ok(_)),
            "remove {name}: {removed:?}"
        );
    }

    /// Asserts that the root of share `share` has no entry `name`: a removed file stayed so.
    async fn assert_gone(&self, share: &str, name: &str) {
        use nfs3_types::nfs3::*;
        let mut c = common::nfs_client(self.nfs_port, share, 1000, 1000).await;
        let root = c.root_nfs_fh3();
        let looked = c
            .lookup(&LOOKUP3args {
                what: diropargs3 {
                    dir: root,
                    name: filename3::from(name.as_bytes().to_vec()),
                },
            })
            .await
            .expect("rpc");
        assert!(
            matches!(looked, Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _))),
            "the removed file {name} came back after the power cut: {looked:?}"
        );
    }

    /// The data directory as the backing file system holds it (what survived).
    fn backing_data(&self) -> PathBuf {
        self.dir.path().join("backing/data")
    }
}

/// An NBD client (libnbd's Python bindings) that runs one command per line and answers each
/// with `ok` or `error: ...`, so a test can act between requests and kill the server under
/// a connected client.
const CLIENT: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[0] in ("write", "writefua"):
            flags = nbd.CMD_FLAG_FUA if cmd[0] == "writefua" else 0
            with open(cmd[2], "rb") as f:
                h.pwrite(f.read(), int(cmd[1]), flags)
        elif cmd[0] == "trim":
            h.trim(int(cmd[2]), int(cmd[1]))
        elif cmd[0] == "flush":
            h.flush()
        elif cmd[0] == "read":
            with open(cmd[3], "wb") as f:
                f.write(h.pread(int(cmd[2]), int(cmd[1])))
        print("ok", flush=True)
    except nbd.Error as e:
        print("error:", e, flush=True)
"#;

struct Client {
    child: Child,
    replies: Lines<BufReader<ChildStdout>>,
    scratch: tempfile::TempDir,
    writes: usize,
}

impl Client {
    fn connect(uri: &str) -> Client {
        // Debian's interpreter: the bindings come from the python3-libnbd package.
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", CLIENT, uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with libnbd (scripts/test installs python3-libnbd)");
        let replies = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Client {
            child,
            replies,
            scratch: tempfile::tempdir().expect("tempdir"),
            writes: 0,
        }
    }

    /// Sends one command; its reply, `Ok` or the error's text.
    fn send(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("send to the client");
        stdin.flush().expect("send to the client");
        let reply = self
            .replies
            .next()
            .expect("the client ended")
            .expect("read the client");
        match reply.strip_prefix("error: ") {
            None if reply == "ok" => Ok(()),
            Some(error) => Err(error.to_string()),
            None => panic!("odd reply from the client: {reply}"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.write_with("write", offset, data)
    }

    /// A write with NBD_CMD_FLAG_FUA.
    fn write_fua(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.write_with("writefua", offset, data)
    }

    fn write_with(&mut self, command: &str, offset: u64, data: &[u8]) -> Result<(), String> {
        self.writes += 1;
        let path = self.scratch.path().join(format!("w{}", self.writes));
        fs::write(&path, data).expect("write the request's data");
        self.send(&format!("{command} {offset} {}", path.display()))
    }

    fn trim(&mut self, offset: u64, length: u64) -> Result<(), String> {
        self.send(&format!("trim {offset} {length}"))
    }

    fn flush(&mut self) -> Result<(), String> {
        self.send("flush")
    }

    fn read(&mut self, offset: u64, length: u64) -> Vec<u8> {
        let path = self.scratch.path().join("read");
        self.send(&format!("read {offset} {length} {}", path.display()))
            .expect("read");
        fs::read(&path).expect("read the reply")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn random(len: usize, rng: &mut impl rand::RngCore) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    data
}

const MIB: u64 = 1 << 20;
const SECTOR: usize = 4096;

/// The volume as a client changes it: `flushed` as of the last completed FLUSH, `latest`
/// with every acknowledged write since.
struct Model {
    flushed: Vec<u8>,
    latest: Vec<u8>,
}

impl Model {
    fn write(&mut self, client: &mut Client, offset: u64, data: &[u8]) {
        client.write(offset, data).expect("write");
        self.latest[offset as usize..][..data.len()].copy_from_slice(data);
    }

    /// A FUA write is on stable storage when acknowledged, whatever follows.
    fn write_fua(&mut self, client: &mut Client, offset: u64, data: &[u8]) {
        client.write_fua(offset, data).expect("FUA write");
        let range = offset as usize..offset as usize + data.len();
        self.latest[range.clone()].copy_from_slice(data);
        self.flushed[range].copy_from_slice(data);
    }

    fn trim(&mut self, client: &mut Client, offset: u64, length: u64) {
        client.trim(offset, length).expect("trim");
        self.latest[offset as usize..][..length as usize].fill(0);
    }

    fn flush(&mut self, client: &mut Client) {
        client.flush().expect("flush");
        self.flushed.clone_from(&self.latest);
    }

    /// After a crash: every sector holds its flushed content or, if it changed since, its
    /// latest. Returns how many sectors held the latest content where it differed.
    fn check(&self, found: &[u8]) -> usize {
        assert_eq!(found.len(), self.latest.len());
        let mut newer = 0;
        for (sector, got) in found.chunks(SECTOR).enumerate() {
            let flushed = &self.flushed[sector * SECTOR..][..SECTOR];
            let latest = &self.latest[sector * SECTOR..][..SECTOR];
            if got == flushed {
                continue;
            }
            assert_eq!(
                got,
                latest,
                "sector {sector} (byte {}) holds neither its content as of the last FLUSH nor \
                 its latest",
                sector * SECTOR
            );
            newer += 1;
        }
        newer
    }
}

/// DESIGN.md's promise, against a disk that loses its cache: after kill -9 and a power cut,
/// every write acknowledged before the last completed FLUSH (and every FUA write) reads back
/// unchanged, and every 4 KiB sector holds its old or its new content. Twice, so the volume also works after
/// recovering from a cut.
#[test]
fn flushed_volume_writes_survive_power_loss() {
    let mut g = Gateway::start();
    g.firn(&[
        "volume", "create", "disk", "--size", "32M", "--mode", "local",
    ]);
    let size = 32 * MIB;
    let mut model = Model {
        flushed: vec![0; size as usize],
        latest: vec![0; size as usize],
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for round in 0..2u64 {
        let mut client = Client::connect(&g.uri("disk"));
        // Flushed: whole sectors in 256 KiB requests, a trim, partial sectors at both ends.
        for i in 0..48 {
            model.write(&mut client, i * 256 * 1024, &random(256 << 10, &mut rng));
        }
        model.trim(&mut client, 2 * MIB, MIB);
        model.write(&mut client, 12 * MIB + 100, &random(10_000, &mut rng));
        model.flush(&mut client);
        // Acknowledged, never flushed: overlapping the flushed data and beyond it.
        for i in 0..48 {
            model.write(
                &mut client,
                6 * MIB + i * 256 * 1024,
                &random(256 << 10, &mut rng),
            );
        }
        model.trim(&mut client, MIB, MIB / 2);
        model.write_fua(&mut client, 24 * MIB, &random(64 << 10, &mut rng));
        model.write(&mut client, 20 * MIB + 3000, &random(5000, &mut rng));
        assert!(g.mount.dirty_pages() > 0, "the mount holds unsynced pages");

        let report = g.crash(PowerCut::LoseSome(round));
        assert!(report.pages_lost > 0, "{report:?}");
        drop(client);
        g.restart();
        let mut client = Client::connect(&g.uri("disk"));
        let found = client.read(0, size);
        let newer = model.check(&found);
        eprintln!("round {round}: {report:?}; {newer} sectors held unflushed writes");
        // What survived is the state from here on.
        model.latest = found;
        model.flushed.clone_from(&model.latest);
    }
}

/// The catalog (meta.redb) after power cuts: every volume created through the API is still
/// listed and opens with its data; a deleted one stays deleted; no volume file is lost. The
/// first cut loses every unsynced page, the next ones a random half.
#[test]
fn the_catalog_survives_power_loss() {
    let mut g = Gateway::start();
    let mut live: Vec<String> = Vec::new();
    for round in 0..4u8 {
        let (name, doomed) = (format!("kept{round}"), format!("dropped{round}"));
        g.firn(&["volume", "create", &name, "--size", "8M", "--mode", "local"]);
        g.firn(&[
            "volume", "create", &doomed, "--size", "8M", "--mode", "local",
        ]);
        let mut client = Client::connect(&g.uri(&name));
        client.write(0, &[round + 1; 8192]).expect("write");
        client.flush().expect("flush");
        drop(client);
        g.firn(&["volume", "delete", &doomed]);
        live.push(name);
        let last = format!("last{round}");
        g.firn(&["volume", "create", &last, "--size", "4M", "--mode", "local"]);
        live.push(last);
        g.crash(match round {
            0 => PowerCut::LoseAll,
            _ => PowerCut::LoseSome(u64::from(round)),
        });
        g.restart();

        let list = g.firn(&["volume", "list"]);
        let mut names: Vec<&str> = list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        names.sort();
        let mut expected: Vec<&str> = live.iter().map(String::as_str).collect();
        expected.sort();
        assert_eq!(names, expected, "round {round}: {list}");
        for kept in 0..=round {
            let mut client = Client::connect(&g.uri(&format!("kept{kept}")));
            assert_eq!(client.read(0, 8192), vec![kept + 1; 8192]);
            assert!(client.read(8192, 4096).iter().all(|&b| b == 0));
        }
        let mut client = Client::connect(&g.uri(&format!("last{round}")));
        assert_eq!(client.read(0, 4 * MIB).len() as u64, 4 * MIB);
        let files = fs::read_dir(g.backing_data().join("volumes"))
            .expect("volumes dir")
            .count();
        assert_eq!(files, live.len(), "round {round}: one file per volume");
    }
}

/// The audit log: a management call's record is synced before the call returns, so every
/// call that got an answer is in the log after a power cut.
#[test]
fn audit_records_survive_power_loss() {
    let mut g = Gateway::start();
    let calls = 6;
    for i in 0..calls {
        g.firn(&[
            "volume",
            "create",
            &format!("v{i}"),
            "--size",
            "4M",
            "--mode",
            "local",
        ]);
    }
    g.crash(PowerCut::LoseAll);
    let (mut log, _) = Log::open(g.backing_data().join("audit.log")).expect("open the audit log");
    let creates = log
        .iter()
        .expect("read the audit log")
        .map(|record| {
            let record = record.expect("a whole record");
            serde_json::from_slice::<serde_json::Value>(&record.payload).expect("json")
        })
        .filter(|r| r["method"] == "POST" && r["path"] == "/api/v1/volumes")
        .count();
    assert!(
        creates >= calls,
        "{creates} of {calls} creates in the audit log"
    );
    drop(log);
    g.restart();
    assert_eq!(g.firn(&["volume", "list"]).lines().count(), calls);
}

/// The local log: every record acknowledged by `sync` survives a power cut that keeps a
/// random half of the unsynced pages, and recovery keeps nothing but whole, correct records
/// in order. Several rounds on one log, so appends after a recovery are checked too.
#[test]
fn synced_log_records_survive_power_loss() {
    let (_dir, mut mount) = mounted();
    let path = mount.path().join("records.log");
    let payload = |seq: u64| -> Vec<u8> {
        let len = (seq * 7919 % 3000) as usize;
        seq.to_le_bytes()
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    };
    let mut synced = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for round in 0..8 {
        let (mut log, recovery) = Log::open(&path).expect("open");
        assert!(
            recovery.records >= synced,
            "round {round}: {} records after the cut, {synced} were synced",
            recovery.records
        );
        let records: Vec<_> = log
            .iter()
            .expect("iter")
            .map(|r| r.expect("record"))
            .collect();
        for record in &records {
            assert_eq!(record.payload, payload(record.seq), "record {}", record.seq);
        }
        let mut seq = recovery.records;
        for _ in 0..rng.random_range(1..6) {
            for _ in 0..rng.random_range(1..40) {
                assert_eq!(log.append(&payload(seq)).expect("append"), seq);
                seq += 1;
            }
            log.sync().expect("sync");
            synced = seq;
        }
        for _ in 0..rng.random_range(0..40) {
            log.append(&payload(seq)).expect("append");
            seq += 1;
        }
        drop(log);
        mount
            .power_cut(PowerCut::LoseSome(round))
            .expect("power cut");
    }
}

/// A failed fdatasync loses the pages it could not write and the kernel reports it once, so
/// a retried FLUSH would succeed over lost writes. The volume keeps the error: after one
/// failed FLUSH, every FLUSH and WRITE fails until the volume is opened again.
#[test]
fn a_failed_flush_fails_every_later_flush_and_write_until_reopened() {
    let g = Gateway::start();
    g.firn(&[
        "volume", "create", "disk", "--size", "8M", "--mode", "local",
    ]);
    let file = fs::read_dir(g.backing_data().join("volumes"))
        .expect("volumes dir")
        .next()
        .expect("the volume's file")
        .expect("entry")
        .file_name();
    let mut client = Client::connect(&g.uri("disk"));
    client.write(0, &[1; 4096]).expect("write");
    client.flush().expect("flush");
    client.write(4096, &[2; 4096]).expect("write");
    g.mount.fail_next_fsync(file.to_str().expect("utf-8"));
    let first = client.flush().expect_err("the injected fsync error");
    assert!(first.contains("Input/output error"), "{first}");
    let again = client.flush().expect_err("a retried flush must fail too");
    assert!(again.contains("Input/output error"), "{again}");
    client
        .write(8192, &[3; 4096])
        .expect_err("a write after a failed flush must fail");
    assert_eq!(client.read(0, 4096), vec![1; 4096], "reads go on");
    drop(client);

    // Once its last client is gone the volume is opened anew and works again; the write the
    // failed flush lost is gone, as the client was told.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut client = loop {
        let mut client = Client::connect(&g.uri("disk"));
        if client.flush().is_ok() {
            break client;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the volume was not reopened after its clients left"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    client
        .write(8192, &[4; 4096])
        .expect("write after reopening");
    client.flush().expect("flush after reopening");
    assert_eq!(client.read(0, 4096), vec![1; 4096]);
    assert_eq!(client.read(4096, 4096), vec![0; 4096]);
    assert_eq!(client.read(8192, 4096), vec![4; 4096]);
}

/// A file share's promise against a disk that loses its cache: a file made, written and
/// committed over NFS is there after kill -9 and a power cut, with its bytes, even though
/// its creation was committed lazily (it rides on the COMMIT's fsync and is entered again at
/// start); a file removed before the cut stays removed; files never committed may be gone,
/// and the share works on. Twice: losing everything unsynced, then a random part of it.
#[test]
fn committed_share_files_survive_power_loss() {
    use nfs3_types::nfs3::*;
    let mut g = Gateway::start();
    g.firn(&["share", "create", "s"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x51a7e);
    let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
    for round in 0..2u64 {
        g.firn(&["bandwidth", "--upload", "paused"]);
        runtime.block_on(async {
            let mut c = common::nfs_client(g.nfs_port, "s", 1000, 1000).await;
            let root = c.root_nfs_fh3();
            let dirop = |name: &str| diropargs3 {
                dir: root.clone(),
                name: filename3::from(name.as_bytes().to_vec()),
            };
            for i in 0..3 {
                let name = format!("r{round}-gone{i}");
                common::nfs_new_file(&mut c, &root, &name, b"removed before the cut", true).await;
                let removed = c
                    .remove(&REMOVE3args {
                        object: dirop(&name),
                    })
                    .await
                    .expect("rpc");
                assert!(matches!(removed, Nfs3Result::Ok(_)), "remove {name}");
            }
            // Made after the last durable commit (the removes'): only the COMMIT's fsync
            // and the recovery at start keep them (their content file's `user.firn.entry`).
            // Uploads are paused, or the durable record of their start would cover the lazy
            // creations and no recovery would be needed.
            for i in 0..12 {
                let (name, data) = (
                    format!("r{round}-kept{i}"),
                    random(3000 + i * 1000, &mut rng),
                );
                common::nfs_new_file(&mut c, &root, &name, &data, true).await;
                kept.push((name, data));
            }
            for i in 0..3 {
                common::nfs_new_file(
                    &mut c,
                    &root,
                    &format!("r{round}-uncommitted{i}"),
                    b"never committed",
                    false,
                )
                .await;
            }
        });
        g.crash(if round == 0 {
            PowerCut::LoseAll
        } else {
            PowerCut::LoseSome(round)
        });
        g.restart();
        runtime.block_on(async {
            let mut c = common::nfs_client(g.nfs_port, "s", 1000, 1000).await;
            let root = c.root_nfs_fh3();
            for (name, data) in &kept {
                let looked = common::nfs_lookup(&mut c, &root, name).await;
                let Nfs3Result::Ok(looked) = looked else {
                    panic!("round {round}: the committed file {name} is gone: {looked:?}")
                };
                let read = c
                    .read(&READ3args {
                        file: looked.object,
                        offset: 0,
                        count: 1 << 20,
                    })
                    .await
                    .expect("rpc");
                let Nfs3Result::Ok(read) = read else {
                    panic!("read {name}")
                };
                assert!(
                    read.data.as_ref() == &data[..],
                    "round {round}: {name} differs"
                );
            }
            for i in 0..3 {
                let name = format!("r{round}-gone{i}");
                let looked = c
                    .lookup(&LOOKUP3args {
                        what: diropargs3 {
                            dir: root.clone(),
                            name: filename3::from(name.into_bytes()),
                        },
                    })
                    .await
                    .expect("rpc");
                assert!(
                    matches!(looked, Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _))),
                    "round {round}: a removed file came back"
                );
            }
        });
    }
}

/// A file created (and committed) in one run and removed first thing in the next stays
/// removed after a power cut that undoes the unlink of its content file: the removal counts
/// every earlier run's creation as durable, so recovery takes the content file for a removed
/// file's, not a lost creation's.
#[test]
fn a_file_removed_after_a_restart_stays_removed_after_a_power_cut() {
    let mut g = Gateway::start();
    g.firn(&["share", "create", "s"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut c = common::nfs_client(g.nfs_port, "s", 1000, 1000).await;
        let root = c.root_nfs_fh3();
        common::nfs_new_file(&mut c, &root, "old", b"removed after the restart", true).await;
    });
    // Stopped in order, started again.
    g.daemon.take().expect("running").stop();
    g.restart();
    runtime.block_on(g.nfs_remove("s", "old"));
    // The REMOVE was answered: it is durable.
    g.crash(PowerCut::LoseAll);
    g.restart();
    runtime.block_on(g.assert_gone("s", "old"));
}

/// A file removed while its first upload is under way (no record names its object yet) stays
/// removed when a power cut loses the upload's lazily committed record: the key was on
/// record before the upload began, so the restart deletes the object instead of a refresh
/// taking it in as a new file.
#[test]
fn a_file_removed_during_its_first_upload_stays_removed_after_a_power_cut() {
    // Every request to the bucket waits 1.5 s first: time to remove the file mid-upload.
    let mut g = Gateway::start_with("[faults]\nlatency_ms = 1500\n");
    g.firn(&["share", "create", "s"]);
    let object = g.dir.path().join("bucket/s/f");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut c = common::nfs_client(g.nfs_port, "s", 1000, 1000).await;
        let root = c.root_nfs_fh3();
        // COMMIT sends it up at once.
        common::nfs_new_file(&mut c, &root, "f", b"removed during its upload", true).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!object.exists(), "the upload was not slowed");
        g.nfs_remove("s", "f").await;
    });
    let started = std::time::Instant::now();
    while !object.exists() {
        assert!(started.elapsed().as_secs() < 30, "the upload never landed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Its record is committed lazily just after; then the power goes.
    std::thread::sleep(std::time::Duration::from_millis(300));
    g.crash(PowerCut::LoseAll);
    g.restart();
    g.firn(&["share", "refresh", "s"]);
    runtime.block_on(g.assert_gone("s", "f"));
    let started = std::time::Instant::now();
    while object.exists() {
        assert!(
            started.elapsed().as_secs() < 30,
            "the removed file's object stayed in the bucket"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

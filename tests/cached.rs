//! Cached volumes end to end: the real daemon, real NBD clients (qemu-io, nbdcopy, fio), and
//! the bucket both as a local directory and as the Garage server scripts/test starts (its
//! address in FIRN_TEST_S3_*; without it, outside CI, the Garage half is skipped). Also:
//! restarts, kill -9 and power loss (the data directory on tests/common/powerloss.rs), the
//! fault injector's errors and outages, and fencing on a moto S3 server, whose conditional
//! creates behave as S3's (skipped when moto is not installed, outside CI).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, MOTO_BUCKET, Moto, firn, free_port, metric, run};

/// A master key shared by the gateways of one test, so one can restore what another wrote.
const KEY: &str = "5e2b6f0d8c1a4e7b9f3d2c6a8b0e4f1d7c9a3b5e2d8f0a6c4b1e9d7f3a5c2b80";

/// The passphrase of the gateways whose config asks for one.
const PASSPHRASE: &str = "firn test passphrase: horse battery staple";

/// Which bucket a test's gateways use.
#[derive(Clone)]
enum Bucket {
    Dir(PathBuf),
    Garage {
        prefix: String,
    },
    /// A moto server (`Moto::start`): a store that refuses a second create, as S3 does.
    Moto {
        endpoint: String,
        prefix: String,
    },
}

fn garage() -> Option<Bucket> {
    if std::env::var("FIRN_TEST_S3_ENDPOINT").is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run against Garage: FIRN_TEST_S3_ENDPOINT is not set (run scripts/test)"
        );
        eprintln!("FIRN_TEST_S3_ENDPOINT not set: skipping the Garage half");
        return None;
    }
    let mut id = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
    Some(Bucket::Garage {
        prefix: format!("cached-test-{}/", hex::encode(id)),
    })
}

impl Bucket {
    fn section(&self) -> String {
        match self {
            Bucket::Dir(path) => format!(
                "[remote]\nkind = \"local\"\npath = \"{}\"\n",
                path.display()
            ),
            Bucket::Garage { prefix } => {
                let var = |name: &str| std::env::var(name).unwrap_or_default();
                format!(
                    "[remote]\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nprefix = \"{prefix}\"\nretry_for_secs = 20\n",
                    var("FIRN_TEST_S3_ENDPOINT"),
                    var("FIRN_TEST_S3_BUCKET"),
                    var("FIRN_TEST_S3_REGION"),
                    var("FIRN_TEST_S3_ACCESS_KEY_ID"),
                    var("FIRN_TEST_S3_SECRET_ACCESS_KEY"),
                )
            }
            Bucket::Moto { endpoint, prefix } => format!(
                "[remote]\nkind = \"s3\"\nendpoint = \"{endpoint}\"\nbucket = \"{MOTO_BUCKET}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nprefix = \"{prefix}\"\nretry_for_secs = 20\n"
            ),
        }
    }
}

/// One gateway: its folder, config and daemon.
struct Gateway {
    dir: PathBuf,
    config: PathBuf,
    http: u16,
    nbd: u16,
    daemon: Option<Daemon>,
}

impl Gateway {
    /// A gateway in `dir` (its data in `dir/data`) over `bucket`, with small segments, an
    /// empty read cache and a checkpoint per segment, so data leaves the local disk soon
    /// after it is uploaded. `extra` is appended to the config.
    fn start(dir: &Path, bucket: &Bucket, extra: &str) -> Gateway {
        Gateway::start_with(dir, bucket, "64MiB", None, extra)
    }

    /// As `start`, with the log capped at `log_max` and, if given, the data directory at
    /// `data` (the NBD socket then stays in `dir`).
    fn start_with(
        dir: &Path,
        bucket: &Bucket,
        log_max: &str,
        data: Option<&Path>,
        extra: &str,
    ) -> Gateway {
        Gateway::start_tuned(dir, bucket, log_max, data, "", extra)
    }

    /// As `start_with`, with `volumes` added to the `[volumes]` section.
    fn start_tuned(
        dir: &Path,
        bucket: &Bucket,
        log_max: &str,
        data: Option<&Path>,
        volumes: &str,
        extra: &str,
    ) -> Gateway {
        std::fs::create_dir_all(dir).expect("dir");
        let (http, nbd) = (free_port(), free_port());
        let config = dir.join("firn.toml");
        let (data_dir, socket) = match data {
            None => ("data".to_string(), String::new()),
            Some(data) => (
                data.display().to_string(),
                format!("socket = \"{}\"\n", dir.join("nbd.sock").display()),
            ),
        };
        // The master key from the environment, unless `extra` says where it comes from.
        let keys = if extra.contains("[keys]") {
            ""
        } else {
            "[keys]\nsource = \"env\"\n"
        };
        std::fs::write(
            &config,
            format!(
                "[local]\ndata_dir = \"{data_dir}\"\nmin_free = \"0\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[nbd]\nlisten = \"127.0.0.1:{nbd}\"\n{socket}[nfs]\nlisten = \"\"\n{keys}[volumes]\nsegment_size = \"1MiB\"\nlog_max = \"{log_max}\"\ncache_max = \"0\"\ncheckpoint_segments = 1\ncommit_interval_ms = 100\ngc_interval_secs = 1\n{volumes}{}{extra}",
                bucket.section()
            ),
        )
        .expect("config");
        let mut g = Gateway {
            dir: dir.to_path_buf(),
            config,
            http,
            nbd,
            daemon: None,
        };
        g.restart();
        g
    }

    /// Replaces `from` with `to` in the config, each pair once, and restarts.
    fn reconfigure(&mut self, changes: &[(&str, &str)]) {
        let mut text = std::fs::read_to_string(&self.config).expect("config");
        for (from, to) in changes {
            assert!(text.contains(from), "{from:?} is not in the config");
            text = text.replacen(from, to, 1);
        }
        std::fs::write(&self.config, text).expect("config");
        self.restart();
    }

    fn restart(&mut self) {
        self.daemon = None;
        let env = [("FIRN_MASTER_KEY", KEY), ("FIRN_PASSPHRASE", PASSPHRASE)];
        // A port chosen free may be taken by a test running beside this one before the
        // daemon binds it: then new ports, and again.
        for _ in 0..4 {
            match Daemon::try_start(&self.config, self.http, &env) {
                Ok(daemon) => {
                    self.daemon = Some(daemon);
                    return;
                }
                Err(stdout) => {
                    eprintln!("firn did not start ({stdout:?}); trying other ports");
                    let (http, nbd) = (free_port(), free_port());
                    let text = std::fs::read_to_string(&self.config).expect("config");
                    let text = text
                        .replace(
                            &format!("127.0.0.1:{}\"", self.http),
                            &format!("127.0.0.1:{http}\""),
                        )
                        .replace(
                            &format!("127.0.0.1:{}\"", self.nbd),
                            &format!("127.0.0.1:{nbd}\""),
                        );
                    std::fs::write(&self.config, text).expect("config");
                    (self.http, self.nbd) = (http, nbd);
                }
            }
        }
        panic!("firn did not start, with four sets of ports");
    }

    fn kill9(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            daemon.kill9();
        }
    }

    /// SIGTERM: a stop may upload for 20 s (what clients flushed), after up to 10 s for
    /// clients to finish.
    fn stop(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            assert!(daemon.stop_within(Duration::from_secs(45)).success());
        }
    }

    fn firn(&self, args: &[&str]) -> String {
        common::firn_ok(&self.config, args)
    }

    fn try_firn(&self, args: &[&str]) -> (bool, String) {
        let mut full = args.to_vec();
        full.extend(["--config", self.config.to_str().expect("utf-8")]);
        let (ok, out, err) = firn(&full);
        (ok, format!("{out}{err}"))
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.nbd)
    }

    /// Waits for the start's check of conditional creates (a takeover without --force
    /// treats a store not yet checked as one that ignores them), and returns its line.
    fn conditional_create_checked(&self) -> String {
        let started = Instant::now();
        loop {
            let status = self.firn(&["status"]);
            let line = status
                .lines()
                .find(|l| l.starts_with("conditional put"))
                .unwrap_or_default()
                .to_string();
            if !line.contains("unknown") && !line.is_empty() {
                return line;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "conditional creates not checked: {status}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn metrics(&self) -> String {
        common::metrics(self.http)
    }

    fn show(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.firn(&["volume", "show", name])).expect("json")
    }

    /// Waits (30 s at most) until volume `name` is fenced here; what `show` then says.
    fn wait_fenced(&self, name: &str) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let shown = self.show(name);
            if !shown["cache"]["fenced"].is_null() {
                return shown;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the old gateway was not fenced: {shown:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every flush so far is committed to the bucket and, with an empty
    /// cache, until the uploaded data has left the local disk.
    fn wait_drained(&self, name: &str, evicted: bool) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let shown = self.show(name);
            let cache = &shown["cache"];
            // One open segment's header remains, and the newest checkpoint may keep one
            // uploaded segment here.
            let dirty = cache["dirty_bytes"].as_u64().expect("dirty_bytes");
            let cached = cache["cached_bytes"].as_u64().expect("cached_bytes");
            if dirty <= 64
                && cache["pending_flushes"].as_u64() == Some(0)
                && (!evicted || cached <= (2 << 20))
            {
                return shown;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the volume did not drain: {shown:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn random_file(path: &Path, len: usize) {
    let mut data = vec![0u8; len];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut data);
    // Zeros in places, so zero records are part of it.
    for chunk in data.chunks_mut(1 << 20).step_by(3) {
        chunk[..65536].fill(0);
    }
    std::fs::write(path, data).expect("write");
}

/// Writes with qemu-io and nbdcopy, then reads back through nbdcopy and qemu-img compare:
/// first while cached, then after the cache is dropped, from the bucket alone.
fn written_data_reads_back_from_the_cache_and_from_the_bucket(bucket: Bucket) {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = Gateway::start(&dir.path().join("a"), &bucket, "");
    g.firn(&["volume", "create", "disk", "--size", "64M"]);
    let source = dir.path().join("source.img");
    random_file(&source, 48 << 20);
    run(
        "nbdcopy",
        &["--flush", source.to_str().unwrap(), &g.uri("disk")],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 50M 1M",
            "-c",
            "write -P 0xcd 1000 5000",
            // A record whose 4 KiB frames start 1000 bytes into a volume block: the reads
            // below take frames whole, and in part at either end.
            "-c",
            "write -P 0x3e 7341032 20000",
            "-c",
            "write -z 52M 2M",
            "-c",
            "discard 60M 4M",
            "-c",
            "flush",
            &g.uri("disk"),
        ],
    );
    let expect = |g: &Gateway| {
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0xab 50M 1M",
                "-c",
                "read -P 0xcd 1000 5000",
                "-c",
                "read -P 0x3e 7341032 20000",
                "-c",
                "read -P 0x3e 7343032 4000",
                "-c",
                "read -P 0x3e 7345128 8192",
                "-c",
                "read -P 0x3e 7360032 1000",
                "-c",
                "read -P 0x3e 7346000 3",
                "-c",
                "read -P 0 52M 2M",
                "-c",
                "read -P 0 60M 4M",
                &g.uri("disk"),
            ],
        );
        let back = dir.path().join("back.img");
        run("nbdcopy", &[&g.uri("disk"), back.to_str().unwrap()]);
        let mut want = std::fs::read(&source).unwrap();
        want.resize(64 << 20, 0);
        want[50 << 20..51 << 20].fill(0xab);
        want[1000..6000].fill(0xcd);
        want[7341032..7361032].fill(0x3e);
        want[52 << 20..54 << 20].fill(0);
        want[60 << 20..].fill(0);
        let got = std::fs::read(&back).unwrap();
        assert!(got == want, "the volume does not read back as written");
        std::fs::remove_file(back).unwrap();
    };
    expect(&g);
    let shown = g.wait_drained("disk", true);
    let cache = &shown["cache"];
    assert!(cache["commit"].as_u64().unwrap() >= 1, "{shown:#}");
    // Upload amplification: the log's overhead is a header per record and a tag per 4 KiB.
    let uploaded = cache["bytes_uploaded"].as_u64().unwrap();
    assert!(
        uploaded < (50 << 20) * 11 / 10,
        "{uploaded} bytes uploaded for ~50 MiB"
    );
    expect(&g);
    let shown = g.show("disk");
    assert!(
        shown["cache"]["bytes_downloaded"].as_u64().unwrap() >= 40 << 20,
        "reads did not come from the bucket: {shown:#}"
    );
}

#[test]
fn data_reads_back_from_the_cache_and_the_bucket_with_a_directory_bucket() {
    let dir = tempfile::tempdir().expect("tempdir");
    written_data_reads_back_from_the_cache_and_from_the_bucket(Bucket::Dir(
        dir.path().join("bucket"),
    ));
}

#[test]
fn data_reads_back_from_the_cache_and_the_bucket_with_garage() {
    if let Some(bucket) = garage() {
        written_data_reads_back_from_the_cache_and_from_the_bucket(bucket);
    }
}

/// The first gateway writes and commits, and loses its disk; a second one with an empty data
/// directory takes the volume over from the bucket and serves exactly the committed image.
fn a_new_gateway_restores_the_committed_image(bucket: Bucket, refusal: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "db", "--size", "32M"]);
    let source = dir.path().join("source.img");
    random_file(&source, 32 << 20);
    run(
        "nbdcopy",
        &["--flush", source.to_str().unwrap(), &a.uri("db")],
    );
    // A trim longer than a write record, and a write after it (qemu-io flushes at exit):
    // both are part of the image the new gateway restores.
    qemu_io(&a.uri("db"), &["discard 4M 4M", "write -P 0x42 9M 64k"]);
    let mut want = std::fs::read(&source).unwrap();
    want[4 << 20..8 << 20].fill(0);
    want[9 << 20..(9 << 20) + (64 << 10)].fill(0x42);
    a.wait_drained("db", false);
    // Written after the last commit and never flushed: not part of the image.
    run(
        "fio",
        &[
            "--name=late",
            "--ioengine=nbd",
            &format!("--uri={}", a.uri("db")),
            "--rw=write",
            "--bs=4k",
            "--size=64k",
            "--offset=1M",
            "--end_fsync=0",
        ],
    );
    a.kill9();
    std::fs::remove_dir_all(a.dir.join("data")).expect("lose the disk");

    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    let listed = b.firn(&["volume", "list", "--bucket"]);
    assert!(listed.contains("db"), "{listed}");
    // The first gateway's lease is fresh (and Garage cannot fence it): only --force.
    b.conditional_create_checked();
    let (ok, out) = b.try_firn(&["volume", "takeover", "db"]);
    assert!(
        !ok && out.contains(refusal) && out.contains("--force"),
        "{out}"
    );
    b.firn(&["volume", "takeover", "db", "--force"]);
    let back = dir.path().join("back.img");
    run("nbdcopy", &[&b.uri("db"), back.to_str().unwrap()]);
    let got = std::fs::read(&back).unwrap();
    let differing: Vec<usize> = (0..got.len() / 4096)
        .filter(|&i| got[i * 4096..(i + 1) * 4096] != want[i * 4096..(i + 1) * 4096])
        .collect();
    assert!(
        differing.is_empty(),
        "the restored volume is not the committed image: {} blocks differ, from block {:?} to {:?}",
        differing.len(),
        differing.first(),
        differing.last()
    );
    // It serves writes, and they reach the bucket.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 1M",
            "-c",
            "flush",
            &b.uri("db"),
        ],
    );
    let shown = b.wait_drained("db", false);
    assert!(shown["cache"]["fenced"].is_null(), "{shown:#}");
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x77 0 1M", &b.uri("db")],
    );
}

/// `firn volume resize` grows a cached volume while it is served: new connections see the
/// new size, the added space reads as zeros and takes writes, the old data stays; a shrink
/// is refused; the size holds across a restart and reaches the bucket, so a takeover sees it.
#[test]
fn a_cached_volume_grows_online_and_never_shrinks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "db", "--size", "16M"]);
    qemu_io(&a.uri("db"), &["write -P 0x11 1M 1M"]);
    let size = |g: &Gateway| -> u64 {
        run("nbdinfo", &["--size", &g.uri("db")])
            .trim()
            .parse()
            .expect("nbdinfo --size")
    };
    assert_eq!(size(&a), 16 << 20);
    // The descriptor as it is now (16M), kept aside: written back below, as a gateway that
    // lost the volume and starts again with its old size would write it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let descriptor = loop {
        let found = walk_files(&dir.path().join("bucket"))
            .into_iter()
            .find(|p| p.file_name().is_some_and(|n| n == "descriptor"));
        match found {
            Some(path) => break path,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            None => panic!("no descriptor in the bucket"),
        }
    };
    let stale = dir.path().join("stale-descriptor");
    std::fs::hard_link(&descriptor, &stale).expect("keep the descriptor");
    a.firn(&["volume", "resize", "db", "--size", "32M"]);
    assert_eq!(size(&a), 32 << 20);
    qemu_io(
        &a.uri("db"),
        &[
            "read -P 0 20M 1M",
            "write -P 0x22 24M 1M",
            "read -P 0x11 1M 1M",
        ],
    );
    let (ok, out) = a.try_firn(&["volume", "resize", "db", "--size", "8M"]);
    assert!(!ok && out.contains("only grow"), "{out}");
    assert_eq!(a.show("db")["size"], 32 << 20);
    a.restart();
    assert_eq!(size(&a), 32 << 20);
    a.wait_drained("db", false);
    a.kill9();
    std::fs::remove_dir_all(a.dir.join("data")).expect("lose the disk");
    // The newest commit, not a stale descriptor, has the last word on the size.
    std::fs::rename(&stale, &descriptor).expect("the stale descriptor back");
    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    b.firn(&["volume", "takeover", "db", "--force"]);
    assert_eq!(size(&b), 32 << 20);
    assert_eq!(b.show("db")["size"], 32 << 20);
    qemu_io(&b.uri("db"), &["read -P 0x22 24M 1M", "read -P 0x11 1M 1M"]);
}

/// Resizes and limit changes of one volume at once: each applies to the record as the others
/// left it, so the catalog keeps the largest size granted, the one clients were given, and a
/// restart serves it (a change made on a copy read before another's used to write back the
/// older size).
#[test]
fn resizes_and_limit_changes_at_once_keep_the_largest_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "v", "--size", "16M"]);
    let served = |g: &Gateway| -> u64 {
        run("nbdinfo", &["--size", &g.uri("v")])
            .trim()
            .parse()
            .expect("nbdinfo --size")
    };
    let mut granted = 16u64 << 20;
    for round in 0..12u64 {
        let sizes = [round * 8 + 20, round * 8 + 22, round * 8 + 24];
        let results = std::thread::scope(|s| {
            let resizes: Vec<_> = sizes
                .iter()
                .map(|mib| {
                    let a = &a;
                    s.spawn(move || {
                        let size = format!("{mib}M");
                        (
                            mib << 20,
                            a.try_firn(&["volume", "resize", "v", "--size", &size]).0,
                        )
                    })
                })
                .collect();
            let limits = s.spawn(|| {
                let cache = format!("{}M", 64 + round);
                a.try_firn(&["volume", "limits", "v", "--cache-max", &cache])
            });
            let (ok, out) = limits.join().expect("limits");
            assert!(ok, "limits: {out}");
            resizes
                .into_iter()
                .map(|r| r.join().expect("resize"))
                .collect::<Vec<_>>()
        });
        for (size, ok) in results {
            if ok {
                granted = granted.max(size);
            }
        }
        assert_eq!(a.show("v")["size"], granted, "round {round}");
        assert_eq!(served(&a), granted, "round {round}");
    }
    a.restart();
    assert_eq!(a.show("v")["size"], granted);
    assert_eq!(served(&a), granted);
}

/// A volume grown after its newest checkpoint, and written past its old size, is taken over
/// whole: the new gateway's checkpoint has the grown size, so the volume opens, there and on
/// any later gateway.
#[test]
fn a_volume_grown_since_its_checkpoint_is_taken_over_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "db", "--size", "16M"]);
    qemu_io(&a.uri("db"), &["write -P 0x11 0 8M"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.show("db")["cache"]["checkpoint"]["segment"].as_u64() == Some(0) {
        assert!(
            Instant::now() < deadline,
            "no checkpoint: {:#}",
            a.show("db")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // No checkpoint from now on: the commits after it carry the growth.
    a.reconfigure(&[
        ("checkpoint_segments = 1", "checkpoint_segments = 1000"),
        ("cache_max = \"0\"", "cache_max = \"1GiB\""),
    ]);
    a.firn(&["volume", "resize", "db", "--size", "32M"]);
    qemu_io(&a.uri("db"), &["write -P 0x22 24M 64k"]);
    a.wait_drained("db", false);
    a.kill9();
    std::fs::remove_dir_all(a.dir.join("data")).expect("lose the disk");
    for name in ["b", "c"] {
        let mut g = Gateway::start(&dir.path().join(name), &bucket, "");
        g.firn(&["volume", "takeover", "db", "--force"]);
        assert_eq!(g.show("db")["size"], 32 << 20);
        assert_eq!(g.show("db").get("error"), None, "{:#}", g.show("db"));
        qemu_io(&g.uri("db"), &["read -P 0x22 24M 64k", "read -P 0x11 0 8M"]);
        g.kill9();
    }
}

/// Two takeovers of one volume at once on one gateway: the second is refused at once, and
/// the first's volume is whole, before and after a restart (the second's failure used to
/// remove the local copy the first had restored, and flushed writes with it). So is a create
/// of the name meanwhile (which used to fail the takeover after its commit and lease were in
/// the bucket: the volume was then served nowhere).
#[test]
fn a_second_takeover_or_a_create_under_way_is_refused_and_harms_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "db", "--size", "16M"]);
    qemu_io(&a.uri("db"), &["write -P 0x33 0 4M"]);
    a.wait_drained("db", false);
    a.kill9();
    // Every request to the bucket waits: the takeover takes seconds.
    let mut b = Gateway::start(
        &dir.path().join("b"),
        &bucket,
        "[faults]\nlatency_ms = 200\n",
    );
    let first = std::process::Command::new(common::FIRN)
        .args(["volume", "takeover", "db", "--force", "--config"])
        .arg(&b.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the takeover");
    std::thread::sleep(Duration::from_millis(600));
    let (ok, out) = b.try_firn(&["volume", "takeover", "db", "--force"]);
    let (created, refusal) = b.try_firn(&["volume", "create", "db", "--size", "32M"]);
    let first = first.wait_with_output().expect("the first takeover");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(!ok && out.contains("already under way"), "{out}");
    assert!(
        !created && refusal.contains("409") && refusal.contains("already under way"),
        "{refusal}"
    );
    assert_eq!(b.show("db")["size"], 16 << 20);
    qemu_io(&b.uri("db"), &["read -P 0x33 0 4M", "write -P 0x44 4M 1M"]);
    b.restart();
    assert_eq!(b.show("db").get("error"), None, "{:#}", b.show("db"));
    qemu_io(&b.uri("db"), &["read -P 0x33 0 4M", "read -P 0x44 4M 1M"]);
}

/// A takeover the bucket does not answer (an outage outlasting the retries) is refused with
/// 503, not 409: nothing is in the way, and the same takeover works once the bucket answers.
#[test]
fn a_takeover_the_bucket_does_not_answer_is_503_and_works_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "v", "--size", "8M"]);
    qemu_io(&a.uri("v"), &["write -P 0x5a 0 2M"]);
    a.wait_drained("v", false);
    drop(a);
    let mut b = Gateway::start(
        &dir.path().join("b"),
        &bucket,
        "retry_for_secs = 1\n[faults]\noutage_secs = 600\n",
    );
    let (ok, out) = b.try_firn(&["volume", "takeover", "v", "--force"]);
    assert!(!ok && out.contains("503"), "{out}");
    let (ok, out) = b.try_firn(&["volume", "list", "--bucket"]);
    assert!(!ok && out.contains("503"), "{out}");
    let listed = b.firn(&["volume", "list"]);
    assert!(
        listed.trim().is_empty(),
        "after a failed takeover: {listed}"
    );
    b.reconfigure(&[("outage_secs = 600", "outage_secs = 0")]);
    b.firn(&["volume", "takeover", "v", "--force"]);
    qemu_io(&b.uri("v"), &["read -P 0x5a 0 2M"]);
}

/// Two gateways each made a volume of one name in a bucket (names are each gateway's own):
/// a takeover of that name is refused, naming both, and `--id` picks one.
#[test]
fn a_takeover_of_a_name_two_volumes_share_needs_an_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut ids = Vec::new();
    for (gateway, pattern) in [("a1", "0x11"), ("a2", "0x22")] {
        let a = Gateway::start(&dir.path().join(gateway), &bucket, "");
        a.firn(&["volume", "create", "dup", "--size", "8M"]);
        qemu_io(&a.uri("dup"), &[&format!("write -P {pattern} 0 1M")]);
        a.wait_drained("dup", false);
        ids.push(a.show("dup")["id"].as_str().expect("id").to_string());
    }
    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    let (ok, out) = b.try_firn(&["volume", "takeover", "dup", "--force"]);
    assert!(
        !ok && out.contains("409")
            && out.contains("--id")
            && ids.iter().all(|id| out.contains(id.as_str())),
        "{out}"
    );
    assert!(b.firn(&["volume", "list"]).trim().is_empty());
    let (ok, out) = b.try_firn(&["volume", "takeover", "dup", "--id", "nosuchid", "--force"]);
    assert!(
        !ok && out.contains("404") && out.contains("with id \"nosuchid\""),
        "{out}"
    );
    b.firn(&["volume", "takeover", "dup", "--id", &ids[1], "--force"]);
    assert_eq!(b.show("dup")["id"], ids[1].as_str());
    qemu_io(&b.uri("dup"), &["read -P 0x22 0 1M"]);
    // The other one is still in the bucket to take.
    let listed = b.firn(&["volume", "list", "--bucket"]);
    assert!(
        listed.contains(&ids[0]) && !listed.contains(&ids[1]),
        "{listed}"
    );
}

/// A stop (SIGTERM) commits what clients flushed before it ends, so that a takeover right
/// after has it: stopping one gateway and taking its volume over on another is how a volume
/// moves. The stop used to end with the last flushes still in the local log (for up to
/// `commit_interval_ms`, here 10 s), and the takeover served the volume without them.
#[test]
fn a_stop_commits_every_flush_before_it_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.reconfigure(&[("commit_interval_ms = 100\n", "commit_interval_ms = 10000\n")]);
    a.firn(&["volume", "create", "v", "--size", "16M"]);
    qemu_io(
        &a.uri("v"),
        &["write -P 0x61 0 2M", "flush", "write -P 0x62 2M 2M"],
    );
    a.stop();
    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    b.firn(&["volume", "takeover", "v", "--force"]);
    qemu_io(&b.uri("v"), &["read -P 0x61 0 2M", "read -P 0x62 2M 2M"]);
}

/// A stop waits for an upload that is moving, however slowly (it gave up after 5 s without a
/// whole segment up), and for a new size to reach the bucket; once all is in it releases the
/// lease, so the takeover elsewhere right after needs no --force (it was refused for 30 s,
/// the lease said "serving").
#[test]
fn a_stop_over_a_slow_uplink_hands_over_every_flush_the_size_and_the_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "v", "--size", "16M"]);
    // A 1 MiB segment takes 8 s to go up.
    a.firn(&["bandwidth", "--upload", "128KiB"]);
    qemu_io(&a.uri("v"), &["write -P 0x71 0 1536k", "flush"]);
    a.firn(&["volume", "resize", "v", "--size", "24M"]);
    a.stop();
    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    b.conditional_create_checked();
    b.firn(&["volume", "takeover", "v"]);
    assert_eq!(b.show("v")["size"].as_u64(), Some(24 << 20));
    qemu_io(&b.uri("v"), &["read -P 0x71 0 1536k", "read -P 0 1536k 1M"]);
}

/// A takeover whose commit create had its answer lost (the commit is in) and whose read-back
/// of it then fails cannot tell whether the commit is its own: it must not say that it left
/// nothing behind, since its commit may have fenced the old gateway. It says what may have
/// happened and what to do, and doing that works.
#[test]
fn a_takeover_that_cannot_read_its_commit_back_says_it_may_be_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket_dir = dir.path().join("bucket");
    let bucket = Bucket::Dir(bucket_dir.clone());
    let a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "v", "--size", "8M"]);
    qemu_io(&a.uri("v"), &["write -P 0x5a 0 2M"]);
    let shown = a.wait_drained("v", false);
    let id = shown["id"].as_str().expect("id").to_string();
    let next = shown["cache"]["commit"].as_u64().expect("commit") + 1;
    drop(a);
    let commit = format!("/commits/{next:016x}");
    let mut b = Gateway::start(
        &dir.path().join("b"),
        &bucket,
        &format!("retry_for_secs = 2\n[faults]\nerror_rate = 1.0\nonly_keys = \"{commit}\"\n"),
    );
    let (ok, out) = b.try_firn(&["volume", "takeover", "v", "--force"]);
    assert!(
        !ok && out.contains("503")
            && out.contains("may be this takeover's own")
            && out.contains("--force"),
        "{out}"
    );
    // Half the injected errors come after the create stored the object: over the retries it
    // is in but for about one run in ten, and then A is fenced at its next commit.
    let stored = bucket_dir.join(format!("volumes/{id}{commit}")).exists();
    eprintln!("the takeover's commit is in the bucket: {stored}");
    b.reconfigure(&[("error_rate = 1.0", "error_rate = 0.0")]);
    b.firn(&["volume", "takeover", "v", "--force"]);
    qemu_io(&b.uri("v"), &["read -P 0x5a 0 2M"]);
}

/// Every file below `dir`.
fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// A volume's own `--log-max` and `--cache-max` replace `[volumes]`' for it alone, are
/// checked as the config's are, change while it is served (`firn volume limits`), and last
/// across a restart and into a takeover.
#[test]
fn a_volume_keeps_its_own_limits_on_local_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, "");
    let refused = [
        (
            vec!["--log-max", "1MiB"],
            "log_max must hold at least two segments",
        ),
        (
            vec!["--mode", "local", "--cache-max", "1G"],
            "for cached volumes",
        ),
        (vec!["--cache-max", "lots"], "lots"),
    ];
    for (flags, says) in refused {
        let mut args = vec!["volume", "create", "bad", "--size", "8M"];
        args.extend(flags);
        let (ok, out) = a.try_firn(&args);
        assert!(!ok && out.contains(says), "{args:?}: {out}");
    }
    assert!(a.firn(&["volume", "list"]).trim().is_empty());

    a.firn(&[
        "volume",
        "create",
        "kept",
        "--size",
        "32M",
        "--log-max",
        "8MiB",
        "--cache-max",
        "24MiB",
    ]);
    a.firn(&["volume", "create", "plain", "--size", "32M"]);
    let limits = |g: &Gateway, name: &str| {
        let shown = g.show(name);
        let cache = &shown["cache"];
        (
            shown["log_max"].as_u64(),
            shown["cache_max"].as_u64(),
            cache["log_max"].as_u64().unwrap(),
            cache["cache_max"].as_u64().unwrap(),
        )
    };
    assert_eq!(
        limits(&a, "kept"),
        (Some(8 << 20), Some(24 << 20), 8 << 20, 24 << 20)
    );
    assert_eq!(limits(&a, "plain"), (None, None, 64 << 20, 0));

    // The cache each keeps after its upload: all of it, and none (the config's `cache_max`).
    for name in ["kept", "plain"] {
        fio(
            &a.uri(name),
            &strs(&fio_verified("16M", "1M", &["--end_fsync=1"])),
        );
    }
    let kept = a.wait_drained("kept", false)["cache"]["cached_bytes"]
        .as_u64()
        .unwrap();
    assert!((15 << 20..=26 << 20).contains(&kept), "kept {kept} bytes");
    a.wait_drained("plain", true);

    // Changed while served, at once: the cache empties, and the log's room on local disk (the
    // reserve file) grows by the 8 MiB more it may hold.
    let id = a.show("kept")["id"].as_str().unwrap().to_string();
    let reserve = a.dir.join("data/volumes").join(&id).join("reserve");
    let held = || std::fs::metadata(&reserve).expect("reserve").len();
    let before = held();
    a.firn(&[
        "volume",
        "limits",
        "kept",
        "--cache-max",
        "0",
        "--log-max",
        "16MiB",
    ]);
    assert_eq!(limits(&a, "kept"), (Some(16 << 20), Some(0), 16 << 20, 0));
    a.wait_drained("kept", true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while held() < before + (8 << 20) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let grown = held();
    assert!(
        grown >= before + (8 << 20) && grown <= 16 << 20,
        "the reserve grows to the new log_max: {before} -> {grown}"
    );
    // A log the disk has no room for is refused, as at create (507), and nothing changes.
    let (ok, out) = a.try_firn(&["volume", "limits", "kept", "--log-max", "900TiB"]);
    assert!(
        !ok && out.contains("not enough local space") && out.contains("507"),
        "{out}"
    );
    assert_eq!(limits(&a, "kept"), (Some(16 << 20), Some(0), 16 << 20, 0));
    // A smaller one gives the room back at once.
    a.firn(&["volume", "limits", "kept", "--log-max", "8MiB"]);
    assert_eq!(
        held() + (8 << 20),
        grown,
        "the reserve shrinks with log_max"
    );
    a.firn(&["volume", "limits", "kept", "--log-max", "16MiB"]);
    a.firn(&["volume", "limits", "kept", "--cache-max", "24MiB"]);
    a.firn(&[
        "volume", "create", "here", "--size", "8M", "--mode", "local",
    ]);
    let refused = [
        (vec!["kept", "--log-max", "1MiB"], "two segments"),
        (vec!["here", "--cache-max", "1G"], "for cached volumes"),
        (vec!["nowhere", "--cache-max", "1G"], "nowhere"),
        (vec!["kept"], "nothing to change"),
    ];
    for (args, says) in refused {
        let (ok, out) = a.try_firn(&[&["volume", "limits"][..], &args].concat());
        assert!(!ok && out.contains(says), "{args:?}: {out}");
    }
    assert_eq!(
        limits(&a, "kept"),
        (Some(16 << 20), Some(24 << 20), 16 << 20, 24 << 20)
    );

    a.restart();
    assert_eq!(
        limits(&a, "kept"),
        (Some(16 << 20), Some(24 << 20), 16 << 20, 24 << 20)
    );
    a.firn(&["volume", "limits", "kept", "--log-max", "default"]);
    assert_eq!(
        limits(&a, "kept"),
        (None, Some(24 << 20), 64 << 20, 24 << 20)
    );
    a.kill9();
    std::fs::remove_dir_all(a.dir.join("data")).expect("lose the disk");
    let mut b = Gateway::start(&dir.path().join("b"), &bucket, "");
    let (ok, out) = b.try_firn(&["volume", "takeover", "kept", "--force", "--log-max", "1KiB"]);
    assert!(!ok && out.contains("two segments"), "{out}");
    b.firn(&[
        "volume",
        "takeover",
        "kept",
        "--force",
        "--cache-max",
        "4MiB",
    ]);
    assert_eq!(limits(&b, "kept"), (None, Some(4 << 20), 64 << 20, 4 << 20));
    let mut verify = fio_verified("16M", "1M", &[]);
    verify.push("--verify_only".to_string());
    fio(&b.uri("kept"), &strs(&verify));

    // `[volumes] cache_max` as a share of the data directory's file system.
    b.firn(&["volume", "takeover", "plain", "--force"]);
    b.reconfigure(&[("cache_max = \"0\"", "cache_max = \"3%\"")]);
    let stat = nix::sys::statvfs::statvfs(&b.dir.join("data")).expect("statvfs");
    let disk = stat.blocks() * stat.fragment_size();
    assert_eq!(limits(&b, "plain"), (None, None, 64 << 20, disk * 3 / 100));
    assert_eq!(limits(&b, "kept").3, 4 << 20, "its own stays");
}

/// NBD_CMD_CACHE (libnbd's `cache`) brings a range of a volume that only the bucket holds to
/// local disk: read afterwards with the bucket gone, it is all there. The prefetch counts as
/// neither a cache hit nor a miss; the reads after it are hits.
#[test]
fn nbd_cache_brings_a_range_to_local_disk_before_the_bucket_goes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("bucket");
    let bucket = Bucket::Dir(root.clone());
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "v", "--size", "32M"]);
    qemu_io(
        &a.uri("v"),
        &["write -P 0x3c 4M 8M", "write -P 0x5d 16M 4M", "flush"],
    );
    a.wait_drained("v", true);
    a.kill9();
    std::fs::remove_dir_all(a.dir.join("data")).expect("lose the disk");
    let tuned = "read_timeout_secs = 2\ngc_grace_secs = 5\n";
    let b = Gateway::start_tuned(&dir.path().join("b"), &bucket, "64MiB", None, tuned, "");
    b.firn(&["volume", "takeover", "v", "--force", "--cache-max", "64MiB"]);
    let before = b.show("v")["cache"]["bytes_downloaded"].as_u64().unwrap();
    run(
        "/usr/bin/python3",
        &[
            "-c",
            "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nassert h.can_cache()\nh.cache(8 << 20, 4 << 20)\nh.shutdown()",
            &b.uri("v"),
        ],
    );
    let fetched = b.show("v")["cache"]["bytes_downloaded"].as_u64().unwrap() - before;
    assert!(fetched >= 8 << 20, "fetched {fetched} bytes");
    // No client read anything: the hit rate is the clients' alone.
    let counts = |g: &Gateway| {
        let cache = &g.show("v")["cache"];
        (
            cache["cache_hits"].as_u64().unwrap(),
            cache["cache_misses"].as_u64().unwrap(),
        )
    };
    assert_eq!(counts(&b), (0, 0), "a prefetch counted as reads");
    // The bucket emptied (the store holds its root open, so what it holds moves out), the
    // range reads from local disk.
    let gone = dir.path().join("gone");
    let move_all = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).expect("dir");
        for entry in std::fs::read_dir(from).expect("read_dir") {
            let entry = entry.expect("entry");
            std::fs::rename(entry.path(), to.join(entry.file_name())).expect("move");
        }
    };
    move_all(&root, &gone);
    qemu_io(&b.uri("v"), &["read -P 0x3c 4M 8M"]);
    let (hits, misses) = counts(&b);
    assert!(hits > 0 && misses == 0, "{hits} hits, {misses} misses");
    // A written range not fetched cannot be read.
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x5d 16M 4M", &b.uri("v")])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    move_all(&gone, &root);
}

/// Lose the gateway: an ext4 made and written through the kernel (a loop device over a FUSE
/// export) on a cached volume, unmounted (which flushes it) and committed, is served by a
/// new gateway from the bucket alone; it passes `e2fsck -n` there, its files intact.
#[test]
fn an_ext4_on_a_lost_gateways_volume_passes_e2fsck_on_the_new_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "fs", "--size", "128M"]);
    let files = {
        let ext4 = common::ext4_on(&a.dir.join("data/nbd.sock"), "fs", 128 << 20, &a.dir);
        ext4.files.clone()
    };
    a.wait_drained("fs", false);
    a.kill9();
    std::fs::remove_dir_all(a.dir.join("data")).expect("lose the disk");
    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    b.firn(&["volume", "takeover", "fs", "--force"]);
    let image = dir.path().join("restored.img");
    run("nbdcopy", &[&b.uri("fs"), image.to_str().expect("utf-8")]);
    run("e2fsck", &["-fn", image.to_str().expect("utf-8")]);
    let (mnt, _mounted) = common::mount_image(&image, dir.path());
    for (i, data) in files.iter().enumerate() {
        assert!(
            std::fs::read(mnt.join(format!("f{i}"))).expect("read back") == *data,
            "f{i} differs on the new gateway"
        );
    }
}

#[test]
fn a_new_gateway_restores_the_committed_image_from_a_directory_bucket() {
    let dir = tempfile::tempdir().expect("tempdir");
    a_new_gateway_restores_the_committed_image(Bucket::Dir(dir.path().join("bucket")), "lease");
}

#[test]
fn a_new_gateway_restores_the_committed_image_from_garage_with_force() {
    // Garage ignores If-None-Match, so nothing could fence the old gateway: --force only.
    if let Some(bucket) = garage() {
        a_new_gateway_restores_the_committed_image(bucket, "If-None-Match");
    }
}

/// Flushed writes survive kill -9 at random moments, over and over; the upload resumes after
/// each restart and, at the end, the bucket image equals the volume. For a soak
/// (scripts/crash-soak.sh): `FIRN_SOAK_CYCLES` (default 20; 0 = until the time limit),
/// `FIRN_SOAK_MINUTES` (a time limit; default or 0, none), `FIRN_SOAK_BUCKET=garage` (Garage, from
/// FIRN_TEST_S3_*, instead of a directory).
#[test]
fn flushed_writes_survive_repeated_kill_9() {
    let cycles = match soak_var("FIRN_SOAK_CYCLES").unwrap_or(20) {
        0 => u64::MAX,
        n => n,
    };
    let limit = soak_var("FIRN_SOAK_MINUTES")
        .filter(|&minutes| minutes > 0)
        .map(|minutes| Duration::from_secs(minutes * 60));
    assert!(
        cycles < u64::MAX || limit.is_some(),
        "0 cycles needs FIRN_SOAK_MINUTES"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = match std::env::var("FIRN_SOAK_BUCKET").as_deref() {
        Ok("garage") => garage().expect("FIRN_SOAK_BUCKET=garage needs FIRN_TEST_S3_*"),
        Ok("dir") | Err(_) => Bucket::Dir(dir.path().join("bucket")),
        Ok(other) => panic!("FIRN_SOAK_BUCKET={other:?}: dir or garage"),
    };
    let started = Instant::now();
    let (mut done, mut peak_rss_kib) = (0u64, 0u64);
    let mut g = Gateway::start(&dir.path().join("a"), &bucket, "");
    g.firn(&["volume", "create", "v", "--size", "16M"]);
    let mut model = vec![0u8; 8 << 20];
    let mut rng = rand::rng();
    for cycle in 0..cycles {
        if limit.is_some_and(|limit| started.elapsed() >= limit) {
            break;
        }
        // Flushed: written with a pattern per cycle at a few places, then flushed.
        let mut commands = Vec::new();
        for _ in 0..4 {
            let block = rand::Rng::random_range(&mut rng, 0..(8u64 << 8));
            let byte = (cycle % 250 + 1) as u8;
            commands.push(format!("write -P {byte} {} 4k", block * 4096));
            let at = (block * 4096) as usize;
            model[at..at + 4096].fill(byte);
        }
        commands.push("flush".to_string());
        let mut args = vec!["-f", "raw"];
        for c in &commands {
            args.extend(["-c", c.as_str()]);
        }
        let uri = g.uri("v");
        args.push(&uri);
        run("qemu-io", &args);
        // Unflushed writes elsewhere, racing the kill.
        let writer = std::process::Command::new("fio")
            .args([
                "--name=noise",
                "--thread",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--offset=8M",
                "--size=8M",
                "--time_based",
                "--runtime=5",
                "--end_fsync=0",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("fio");
        let pause = rand::Rng::random_range(&mut rng, 50..600);
        std::thread::sleep(Duration::from_millis(pause));
        if let Some(daemon) = &g.daemon {
            peak_rss_kib = peak_rss_kib.max(peak_rss(daemon.child.id()));
        }
        g.kill9();
        kill_fio(writer);
        g.restart();
        // The flushed half reads back exactly; the noise half is whatever survived.
        let back = dir.path().join("back.img");
        run("nbdcopy", &[&g.uri("v"), back.to_str().unwrap()]);
        let got = std::fs::read(&back).unwrap();
        for (i, (want, have)) in model[..8 << 20]
            .chunks(4096)
            .zip(got[..8 << 20].chunks(4096))
            .enumerate()
        {
            assert!(
                want == have,
                "cycle {cycle}: flushed block {i} changed after kill -9"
            );
        }
        done += 1;
        println!(
            "crash soak: cycle {done} verified ({} s)",
            started.elapsed().as_secs()
        );
    }
    let shown = g.wait_drained("v", false);
    let commit = shown["cache"]["commit"].as_u64().unwrap();
    assert!(commit >= 1);
    println!(
        "crash soak: {done} cycles of kill -9 under fio writes, 2048 flushed blocks verified \
         after each, upload drained to commit {commit}; peak daemon RSS {} MiB; {} s",
        peak_rss_kib >> 10,
        started.elapsed().as_secs()
    );
}

/// A soak setting from the environment, a whole number.
fn soak_var(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
    )
}

/// The most resident memory a process has had (VmHWM), in KiB; 0 if unknown.
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Runs qemu-io on `uri` with `commands` (it sends a FLUSH when it exits).
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    // Reads only: opened read-only, as a fenced volume's export must be.
    if commands.iter().all(|c| c.starts_with("read")) {
        args.push("-r");
    }
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {commands:?}:\n{out}"
    );
    out
}

/// fio over NBD, which must succeed with no I/O error reaching it.
fn fio(uri: &str, args: &[&str]) -> String {
    let uri = format!("--uri={uri}");
    let mut full = vec!["--ioengine=nbd", uri.as_str(), "--output-format=normal"];
    full.extend_from_slice(args);
    let out = run("fio", &full);
    assert!(!out.contains("err=") || out.contains("err= 0"), "{out}");
    out
}

/// The fio job of the fault and outage tests: `size` written at `bs` from the start of the
/// volume, each block with a CRC32C header, read back and verified after writing.
fn fio_verified<'a>(size: &'a str, bs: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut args = vec![
        "--name=verified".to_string(),
        "--rw=write".to_string(),
        format!("--bs={bs}"),
        format!("--size={size}"),
        "--verify=crc32c".to_string(),
        "--do_verify=1".to_string(),
        "--verify_fatal=1".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Reads the whole volume through nbdcopy.
fn image(g: &Gateway, name: &str, to: &Path) -> Vec<u8> {
    run("nbdcopy", &[&g.uri(name), to.to_str().unwrap()]);
    let data = std::fs::read(to).expect("read the copy");
    std::fs::remove_file(to).expect("remove the copy");
    data
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    let differing: Vec<usize> = (0..got.len() / 4096)
        .filter(|&i| got[i * 4096..(i + 1) * 4096] != want[i * 4096..(i + 1) * 4096])
        .collect();
    assert!(
        differing.is_empty(),
        "{what}: {} blocks differ, from block {:?} to {:?}",
        differing.len(),
        differing.first(),
        differing.last()
    );
}

/// SIGTERM with uploads still to do (slowed by latency), then a start: the flushed data reads
/// back, and the upload picks up where it stopped and drains.
#[test]
fn flushed_data_survives_a_restart_and_the_upload_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut g = Gateway::start(
        &dir.path().join("a"),
        &bucket,
        "[faults]\nlatency_ms = 300\n",
    );
    g.firn(&["volume", "create", "v", "--size", "32M"]);
    let uri = g.uri("v");
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 8M",
            "write -P 0xa5 8M 4M",
            // Zeroes and a trim longer than a write record can be, with writes after them:
            // the restart replays them all.
            "write -z 12M 4M",
            "write -P 0x11 24M 8M",
            "discard 24M 8M",
            "write -P 0x3c 20M 64k",
        ],
    );
    let before = g.show("v");
    let dirty = before["cache"]["dirty_bytes"].as_u64().unwrap();
    assert!(
        dirty > 1 << 20,
        "nothing left to upload at the stop: {before:#}"
    );
    g.stop();
    g.restart();
    let reads = [
        "read -P 0x5a 0 8M",
        "read -P 0xa5 8M 4M",
        "read -P 0 12M 8M",
        "read -P 0x3c 20M 64k",
        "read -P 0 20544k 11712k",
    ];
    qemu_io(&g.uri("v"), &reads);
    let shown = g.wait_drained("v", true);
    assert!(
        shown["cache"]["bytes_uploaded"].as_u64().unwrap() > 0,
        "the upload did not resume: {shown:#}"
    );
    assert!(shown["cache"]["commit"].as_u64().unwrap() >= 1, "{shown:#}");
    // Now from the bucket.
    qemu_io(&g.uri("v"), &reads);
    assert!(
        g.show("v")["cache"]["bytes_downloaded"].as_u64().unwrap() >= 10 << 20,
        "the reads after the drain did not come from the bucket"
    );
    // The newest commit's age is known after a restart with nothing new to commit.
    g.restart();
    let shown = g.show("v");
    let age = shown["cache"]["last_commit_age_secs"].as_f64();
    assert!(age.is_some_and(|age| age < 600.0), "{shown:#}");
}

/// A cached volume that cannot be opened at start (here its local checkpoint is gone) is
/// shown with the reason, a client's attach fails, other volumes are served; with the file
/// back, the next attach opens it with its data.
#[test]
fn a_volume_that_cannot_open_says_why_and_opens_once_mended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut g = Gateway::start(&dir.path().join("a"), &bucket, "");
    g.firn(&["volume", "create", "v", "--size", "8M"]);
    g.firn(&["volume", "create", "w", "--size", "8M"]);
    qemu_io(&g.uri("v"), &["write -P 0x3d 0 2M"]);
    g.wait_drained("v", false);
    let id = g.show("v")["id"].as_str().expect("id").to_string();
    g.stop();
    let checkpoint = g.dir.join("data/volumes").join(&id).join("checkpoint");
    let aside = checkpoint.with_extension("aside");
    std::fs::rename(&checkpoint, &aside).expect("move the checkpoint aside");
    g.restart();
    let shown = g.show("v");
    let error = shown["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("local checkpoint") && shown["cache"].is_null(),
        "{shown:#}"
    );
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", &g.uri("v")])
        .output()
        .expect("qemu-io");
    assert!(
        !out.status.success(),
        "attached a volume that cannot open: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    qemu_io(&g.uri("w"), &["write -P 0x11 0 1M", "read -P 0x11 0 1M"]);
    std::fs::rename(&aside, &checkpoint).expect("put the checkpoint back");
    qemu_io(&g.uri("v"), &["read -P 0x3d 0 2M"]);
    let shown = g.show("v");
    assert!(
        shown["error"].is_null() && !shown["cache"].is_null(),
        "{shown:#}"
    );
}

/// During an outage, a read of data that only the bucket holds fails with EIO once
/// `read_timeout_secs` has passed, while writes, flushes and reads of what is local are still
/// served; after the outage the same read succeeds.
#[test]
fn a_read_the_bucket_cannot_answer_fails_in_bounded_time_and_the_rest_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut g = Gateway::start(&dir.path().join("a"), &bucket, "");
    g.firn(&["volume", "create", "v", "--size", "32M"]);
    qemu_io(&g.uri("v"), &["write -P 0x5a 0 4M"]);
    g.wait_drained("v", true);
    g.reconfigure(&[
        ("[volumes]\n", "[volumes]\nread_timeout_secs = 2\n"),
        ("[nfs]\n", "[faults]\noutage_secs = 10\n[nfs]\n"),
    ]);
    let outage = Instant::now();
    let started = Instant::now();
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x5a 0 64k", &g.uri("v")])
        .output()
        .expect("qemu-io");
    let took = started.elapsed();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("Input/output error"), "{said}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(9),
        "the read failed after {took:?}"
    );
    // Writes, flushes and reads of them do not wait for the bucket.
    qemu_io(
        &g.uri("v"),
        &["write -P 0x77 8M 64k", "read -P 0x77 8M 64k"],
    );
    assert!(
        outage.elapsed() < Duration::from_secs(10),
        "too slow to check"
    );
    // Once the bucket is back, the read succeeds.
    while outage.elapsed() < Duration::from_secs(11) {
        std::thread::sleep(Duration::from_millis(200));
    }
    qemu_io(&g.uri("v"), &["read -P 0x5a 0 4M", "read -P 0x77 8M 64k"]);
}

/// Many reads that only the bucket can answer, in flight at once on one connection during an
/// outage, do not hold up that connection's writes and flush: those wait for workers, which
/// reads waiting for the bucket do not keep.
#[test]
fn reads_waiting_for_the_bucket_do_not_hold_up_the_connections_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut g = Gateway::start(&dir.path().join("a"), &bucket, "");
    g.firn(&["volume", "create", "v", "--size", "32M"]);
    qemu_io(&g.uri("v"), &["write -P 0x5a 0 16M", "flush"]);
    g.wait_drained("v", true);
    g.reconfigure(&[
        (
            "[volumes]\n",
            "[volumes]\nread_timeout_secs = 5\ngc_grace_secs = 20\n",
        ),
        ("[nfs]\n", "[faults]\noutage_secs = 30\n[nfs]\n"),
    ]);
    // 48 reads of 64 KiB spread over 16 MiB (three times the connection's workers), then a
    // write and a flush on the same connection: the seconds until those two are done, and
    // how many reads failed (EIO, at the read timeout).
    let script = r#"
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
buffers = [nbd.Buffer(65536) for _ in range(48)]
reads = [h.aio_pread(b, i * 349525 // 4096 * 4096) for i, b in enumerate(buffers)]
time.sleep(0.5)
start = time.monotonic()
data = nbd.Buffer.from_bytearray(bytearray(b"\x77" * 65536))
outcome = {}
def finish(cookie):
    while cookie not in outcome:
        try:
            if h.aio_command_completed(cookie):
                outcome[cookie] = "ok"
        except nbd.Error:
            outcome[cookie] = "failed"
        if cookie not in outcome:
            h.poll(-1)
    return outcome[cookie]
write = h.aio_pwrite(data, 20 << 20)
flush = h.aio_flush()
done = finish(write), finish(flush)
print(round(time.monotonic() - start, 3), *done)
print(sum(finish(cookie) == "failed" for cookie in reads))
h.shutdown()
"#;
    let out = run("/usr/bin/python3", &["-c", script, &g.uri("v")]);
    let mut lines = out.lines();
    let first: Vec<&str> = lines.next().expect("timing").split(' ').collect();
    let took: f64 = first[0].parse().expect("seconds");
    assert_eq!(first[1..], ["ok", "ok"], "{out}");
    assert!(
        took < 2.5,
        "the write and flush took {took} s behind reads: {out}"
    );
    let failed: u32 = lines.next().expect("failed").parse().expect("count");
    // Reads of what the newest checkpoint kept here succeed; the rest fail.
    assert!(
        failed >= 40,
        "reads of what only the bucket holds fail: {out}"
    );
    qemu_io(&g.uri("v"), &["read -P 0x77 20M 64k"]);
}

/// 30% of the remote's requests fail: no error reaches the client, everything drains, and
/// the bucket image (restored on a second gateway) equals the volume.
#[test]
fn injected_remote_errors_never_reach_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let a = Gateway::start(
        &dir.path().join("a"),
        &bucket,
        // Bodies cut short too: one read back after a create whose answer was lost is no
        // proof that another gateway made the object.
        "[faults]\nerror_rate = 0.3\ntruncate_rate = 0.3\n",
    );
    let t = Instant::now();
    a.firn(&["volume", "create", "v", "--size", "16M"]);
    eprintln!("{:?} created", t.elapsed());
    let job = fio_verified("8M", "64k", &["--end_fsync=1"]);
    fio(&a.uri("v"), &strs(&job));
    eprintln!("{:?} written in order", t.elapsed());
    let random = fio_verified(
        "8M",
        "4k",
        &["--rw=randwrite", "--number_ios=200", "--fsync=32"],
    );
    fio(&a.uri("v"), &strs(&random));
    eprintln!("{:?} written", t.elapsed());
    qemu_io(&a.uri("v"), &["write -P 0xee 14M 2M"]);
    let shown = a.wait_drained("v", true);
    eprintln!("{:?} drained", t.elapsed());
    assert!(shown["cache"]["commit"].as_u64().unwrap() >= 1, "{shown:#}");
    // Read back through the faults, from the bucket.
    let copy = dir.path().join("copy.img");
    let local = image(&a, "v", &copy);
    assert!(local[14 << 20..16 << 20].iter().all(|&b| b == 0xee));
    eprintln!("{:?} read back", t.elapsed());
    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    b.firn(&["volume", "takeover", "v", "--force"]);
    let restored = image(&b, "v", &copy);
    assert_same(&restored, &local, "the bucket image against the volume");
}

/// Writers outpacing the uplink do not freeze the bucket's image: while sealed segments wait
/// to go up, commits go on at about their interval (the image trails the newest flush by
/// the upload backlog, not by the whole run), and the cache keeps its bound.
#[test]
fn commits_and_eviction_go_on_while_writes_outpace_the_uplink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let g = Gateway::start(&dir.path().join("a"), &bucket, "");
    g.firn(&["volume", "create", "v", "--size", "256M"]);
    g.firn(&["bandwidth", "--upload", "2MiB"]);
    let job: Vec<String> = [
        "--name=outpace",
        "--thread",
        "--rw=write",
        "--bs=64k",
        "--size=200M",
        "--rate=8m",
        "--fsync=16",
    ]
    .map(String::from)
    .to_vec();
    let writer = fio_spawn(&g.uri("v"), &job);
    let mut commits = Vec::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_secs(1));
        commits.push(g.show("v")["cache"]["commit"].as_u64().expect("commit"));
    }
    let shown = g.show("v");
    kill_fio(writer);
    let cache = &shown["cache"];
    assert!(
        cache["dirty_bytes"].as_u64().expect("dirty") > 8 << 20,
        "no backlog to test with: {shown:#}"
    );
    let age = cache["last_commit_age_secs"].as_f64().unwrap_or(f64::MAX);
    assert!(
        age < 3.0 && commits[7] >= commits[2] + 3,
        "commits stood still behind the backlog ({commits:?}): {shown:#}"
    );
    // Segment files on local disk, less those still to go up: the clean ones.
    let clean = cache["cached_bytes"].as_u64().expect("cached")
        - cache["dirty_bytes"].as_u64().expect("dirty");
    assert!(
        clean <= 4 << 20,
        "the cache (cache_max 0) kept {clean} bytes: {shown:#}"
    );
}

/// Data read back from the bucket is evicted past `cache_max` while the uploads wait (paused
/// here; a slow commit or an outage alike): eviction runs beside them, not only between
/// their steps, where everything read meanwhile stayed on local disk.
#[test]
fn reads_while_uploads_wait_keep_the_cache_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let g = Gateway::start(&dir.path().join("a"), &bucket, "");
    g.firn(&["volume", "create", "v", "--size", "64M"]);
    qemu_io(&g.uri("v"), &["write -P 0x33 0 16M"]);
    g.wait_drained("v", true);
    // The uploader waits on a segment it may not send.
    g.firn(&["bandwidth", "--upload", "paused"]);
    qemu_io(&g.uri("v"), &["write -P 0x44 32M 1M"]);
    qemu_io(&g.uri("v"), &["read -P 0x33 0 16M"]);
    let started = Instant::now();
    loop {
        let shown = g.show("v");
        let cache = &shown["cache"];
        let clean = cache["cached_bytes"].as_u64().expect("cached")
            - cache["dirty_bytes"].as_u64().expect("dirty");
        if clean <= 4 << 20 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the cache (cache_max 0) kept {clean} bytes read back: {shown:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    g.firn(&["bandwidth", "--upload", "unlimited"]);
    qemu_io(&g.uri("v"), &["read -P 0x33 0 16M", "read -P 0x44 32M 1M"]);
}

/// Starts fio over NBD in the background, its output captured.
fn fio_spawn(uri: &str, args: &[String]) -> std::process::Child {
    std::process::Command::new("fio")
        .args(["--ioengine=nbd", &format!("--uri={uri}")])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio")
}

/// Ends a background fio (run with --thread, so that its jobs are threads of this one
/// process: forked jobs put themselves in sessions of their own and would outlive the test).
fn kill_fio(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn fio_finish(child: std::process::Child) -> String {
    let out = child.wait_with_output().expect("fio");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fio failed:\n{text}");
    assert!(!text.contains("err=") || text.contains("err= 0"), "{text}");
    text
}

/// A log of two segments, the smallest allowed, with a checkpoint per segment: each
/// checkpoint takes a few KiB from the log's reserve, and the reserve must get them back, or
/// the next segment never finds its room and writes wait for good.
#[test]
fn a_log_of_two_segments_keeps_going_through_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let least = 2 * firn::engines::volume::cached::record::max_segment(1 << 20);
    let g = Gateway::start(&dir.path().join("a"), &bucket, "");
    g.firn(&[
        "volume",
        "create",
        "v",
        "--size",
        "64M",
        "--log-max",
        &least.to_string(),
    ]);
    // 24 MiB in 256 KiB writes, each flushed: many segments, each checkpointed.
    let writer = fio_spawn(
        &g.uri("v"),
        &fio_verified("24M", "256k", &["--fsync=1", "--thread"]),
    );
    let started = Instant::now();
    let mut writer = writer;
    while writer.try_wait().expect("fio").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "writes stopped: {:#}",
            g.show("v")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    fio_finish(writer);
    g.wait_drained("v", false);
}

/// Uploaded segments kept for reads take on disk what they hold, not the whole segment
/// preallocated at their creation: on ext4 a hole punched past a file's end frees nothing,
/// so small flushed segments each kept a full segment's blocks that neither `cached_bytes`
/// nor `cache_max` counted, and the disk filled far past the volume's limits.
#[test]
fn uploaded_segments_give_back_what_they_preallocated() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let g = Gateway::start(&dir.path().join("a"), &bucket, "");
    g.firn(&[
        "volume",
        "create",
        "v",
        "--size",
        "64M",
        "--cache-max",
        "256MiB",
    ]);
    // Small flushed writes, each its own small segment once committed.
    for k in 0..12 {
        qemu_io(&g.uri("v"), &[&format!("write -P 0x42 {} 64k", k * 65536)]);
        std::thread::sleep(Duration::from_millis(300));
    }
    let shown = g.wait_drained("v", false);
    let id = shown["id"].as_str().expect("id");
    let segments = dir.path().join(format!("a/data/volumes/{id}/segments"));
    let (mut files, mut allocated, mut length) = (0, 0, 0);
    for entry in std::fs::read_dir(&segments).expect("segments") {
        let meta = entry.expect("entry").metadata().expect("metadata");
        files += 1;
        allocated += meta.blocks() * 512;
        length += meta.len();
    }
    assert!(
        files >= 8,
        "{files} segments: the writes did not each close one"
    );
    // The open segment (and the spare, if one is made) keep their 1 MiB preallocation.
    assert!(
        allocated <= length + 2 * (1 << 20) + files * 4096,
        "{files} segment files of {length} bytes take {allocated} bytes on disk"
    );
}

/// The smallest log the config allows (two 1 MiB segments and a largest record) and an
/// outage of the whole remote: writes beyond the log's room wait, they do not fail, and go
/// on once the outage ends; the data verifies, then again from the bucket.
#[test]
fn writes_wait_for_room_in_a_full_log_during_an_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let started = Instant::now();
    let g = Gateway::start(
        &dir.path().join("a"),
        &bucket,
        "[faults]\noutage_secs = 12\n",
    );
    // The volume's own log_max, far under the config's.
    g.firn(&[
        "volume",
        "create",
        "v",
        "--size",
        "80M",
        "--log-max",
        "18MiB",
        "--cache-max",
        "1MiB",
    ]);
    let job = fio_verified("64M", "1M", &["--end_fsync=1"]);
    let writer = fio_spawn(&g.uri("v"), &job);
    std::thread::sleep(Duration::from_secs(5));
    let shown = g.show("v");
    assert!(
        started.elapsed() < Duration::from_secs(11),
        "too slow to check within the outage"
    );
    let cache = &shown["cache"];
    assert!(
        cache["queued_writes"].as_u64().unwrap() > 0,
        "no write waits for room: {shown:#}"
    );
    // And says why.
    let why = cache["writes_waiting"].as_str().unwrap_or_default();
    assert!(why.contains("fills the log"), "{shown:#}");
    assert!(
        cache["dirty_bytes"].as_u64().unwrap() <= 18 << 20,
        "the log outgrew log_max: {shown:#}"
    );
    assert!(
        cache["bytes_uploaded"].as_u64().unwrap() == 0,
        "uploaded during the outage: {shown:#}"
    );
    // The gateway's figures say the same as the volume's.
    let metrics = g.metrics();
    for (name, at_least) in [
        ("firn_gateway_queued_writes", 1.0),
        ("firn_gateway_upload_backlog_bytes", (1 << 20) as f64),
        ("firn_gateway_cache_percent_dirty", 5.0),
        ("firn_gateway_seconds_since_last_recovery_point", 0.0),
        ("firn_gateway_write_ops_total", 1.0),
    ] {
        let value = metric(&metrics, name);
        assert!(value >= at_least, "{name} = {value}\n{metrics}");
    }
    // The log fills its own room, not the read cache's: the share of the volume's local
    // space (log_max + cache_max) in use stays a percentage.
    for name in [
        "firn_gateway_cache_percent_dirty",
        "firn_gateway_cache_percent_used",
        "firn_volume_cache_percent_used{volume=\"v\"}",
    ] {
        let value = metric(&metrics, name);
        assert!(
            (5.0..=100.0).contains(&value),
            "{name} = {value}\n{metrics}"
        );
    }
    let mut writer = writer;
    assert!(
        writer.try_wait().expect("fio").is_none(),
        "fio finished 64 MiB through an 18 MiB log during an outage"
    );
    fio_finish(writer);
    eprintln!("fio done after {:?}", started.elapsed());
    g.wait_drained("v", true);
    let metrics = g.metrics();
    // What stays is the open segment's header.
    assert!(metric(&metrics, "firn_gateway_upload_backlog_bytes") <= 64.0);
    assert_eq!(metric(&metrics, "firn_gateway_queued_writes"), 0.0);
    assert!(g.show("v")["cache"].get("writes_waiting").is_none());
    let mut verify = job.clone();
    verify.push("--verify_only".to_string());
    fio(&g.uri("v"), &strs(&verify));
    let metrics = g.metrics();
    let hit = metric(&metrics, "firn_gateway_cache_hit_percent");
    assert!((0.0..=100.0).contains(&hit), "{metrics}");
    assert!(metric(&metrics, "firn_gateway_read_bytes_total") >= (64 << 20) as f64);
}

/// A larger `log_max` (`firn volume limits`) lets writes that wait for room in a full log go
/// on at once, uploads paused or not: the log's room on disk grows then, not when an upload
/// next gives some back.
#[test]
fn a_larger_log_max_lets_waiting_writes_go_on_while_uploads_are_paused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let g = Gateway::start(&dir.path().join("a"), &bucket, "");
    g.firn(&[
        "volume",
        "create",
        "v",
        "--size",
        "32M",
        "--log-max",
        "4MiB",
    ]);
    g.firn(&["bandwidth", "--upload", "paused"]);
    let writer = waiting_write(&g, "v", "write -P 0x44 0 8M");
    g.firn(&["volume", "limits", "v", "--log-max", "32MiB"]);
    let (ok, said) = finished(writer, "the write, with log_max raised");
    assert!(ok && !said.contains("failed"), "{said}");
    qemu_io(&g.uri("v"), &["read -P 0x44 0 8M"]);
    g.firn(&["bandwidth", "--upload", "unlimited"]);
    g.wait_drained("v", false);
}

/// qemu-io running `command` on volume `name`, once the volume has a write waiting for room
/// in its log (30 s at most).
fn waiting_write(g: &Gateway, name: &str, command: &str) -> std::process::Child {
    let writer = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, &g.uri(name)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let started = Instant::now();
    while g.show(name)["cache"]["queued_writes"].as_u64().unwrap_or(0) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no write waits for room"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    writer
}

/// Whether `child` (qemu-io) succeeded, and what it said, once it ends: within 15 s, or the
/// test fails (`what` still waits).
fn finished(mut child: std::process::Child, what: &str) -> (bool, String) {
    let started = Instant::now();
    while child.try_wait().expect("qemu-io").is_none() {
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still waits");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("qemu-io");
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said.into_owned())
}

/// Bytes free on the file system of `path` (for an unprivileged user).
fn free_bytes(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path).expect("statvfs");
    stat.blocks_available() * stat.fragment_size()
}

/// A gateway in `dir` whose data directory is on a 64 MiB ext4 of its own (the mount point
/// returned), with the log capped at `log_max`, a cache allowed far more than the disk holds,
/// and `changes` to its config. The gateway goes first, then the file system.
fn on_small_disk(
    dir: &Path,
    log_max: &str,
    changes: &[(&str, &str)],
) -> (PathBuf, common::Teardown, Gateway) {
    let (mnt, teardown) = common::ext4_of(dir, 64);
    let bucket = Bucket::Dir(dir.join("bucket"));
    let mut g = Gateway::start_with(
        &dir.join("a"),
        &bucket,
        log_max,
        Some(&mnt.join("data")),
        "",
    );
    let mut all = vec![("cache_max = \"0\"", "cache_max = \"1GiB\"")];
    all.extend_from_slice(changes);
    g.reconfigure(&all);
    (mnt, teardown, g)
}

/// The data directory on a 64 MiB disk, the log's reserve taking 18 MiB of it, and a cache
/// allowed far more than the disk holds: once uploaded segments fill the disk, they are
/// evicted to give the reserve its room back, and the writes (waiting meanwhile) go on.
#[test]
fn a_disk_filled_by_the_cache_gives_the_log_its_room_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_mnt, _teardown, g) = on_small_disk(dir.path(), "18MiB", &[]);
    g.firn(&["volume", "create", "v", "--size", "160M"]);
    let job = fio_verified("128M", "1M", &["--fsync=4", "--end_fsync=1"]);
    let mut writer = fio_spawn(&g.uri("v"), &job);
    let started = Instant::now();
    while writer.try_wait().expect("fio").is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let shown = g.show("v");
            kill_fio(writer);
            panic!("128 MiB not written in 120 s: {shown:#}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    fio_finish(writer);
    let shown = g.wait_drained("v", false);
    assert!(
        shown["cache"]["cached_bytes"].as_u64().unwrap() < 64 << 20,
        "more cached than the disk holds: {shown:#}"
    );
    let mut verify = job.clone();
    verify.push("--verify_only".to_string());
    fio(&g.uri("v"), &strs(&verify));
}

/// `[local] min_free` holds for cached volumes too: clean data goes, whatever `cache_max`
/// allows, to keep that much of the disk free, and reads back from the bucket.
#[test]
fn the_cache_leaves_min_free_on_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mnt, _teardown, g) = on_small_disk(
        dir.path(),
        "8MiB",
        &[("min_free = \"0\"", "min_free = \"24MiB\"")],
    );
    g.firn(&["volume", "create", "v", "--size", "64M"]);
    qemu_io(&g.uri("v"), &["write -P 0x33 0 40M"]);
    g.wait_drained("v", false);
    let free = || free_bytes(&mnt);
    // Eviction follows the uploads by a step or two.
    let started = Instant::now();
    while free() < 23 << 20 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} MiB free, under min_free: {:#}",
            free() >> 20,
            g.show("v")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    qemu_io(&g.uri("v"), &["read -P 0x33 0 40M"]);
}

/// Each cached volume takes its log's room (`log_max`) when it opens: a volume the disk has no
/// room for beside `min_free` is refused with 507 and leaves nothing behind (no entry, no
/// directory, no space taken), and the volumes there go on working.
#[test]
fn a_volume_the_disk_has_no_room_for_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mnt, _teardown, g) = on_small_disk(
        dir.path(),
        "20MiB",
        &[("min_free = \"0\"", "min_free = \"8MiB\"")],
    );
    let free = || free_bytes(&mnt);
    let mut created = Vec::new();
    let refusal = loop {
        let name = format!("v{}", created.len() + 1);
        let (ok, out) = g.try_firn(&["volume", "create", &name, "--size", "64M"]);
        if !ok {
            break out;
        }
        created.push(name);
        assert!(
            created.len() < 4,
            "a 64 MiB disk took {created:?} of 20 MiB logs"
        );
    };
    assert!(!created.is_empty(), "none created: {refusal}");
    assert!(
        refusal.contains("507") && refusal.contains("not enough local space"),
        "{refusal}"
    );
    assert!(
        free() >= 8 << 20,
        "{} KiB free after: {refusal}",
        free() >> 10
    );
    let listed = g.firn(&["volume", "list"]);
    let names: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, created, "{listed}");
    let dirs = std::fs::read_dir(mnt.join("data/volumes"))
        .expect("volumes")
        .count();
    assert_eq!(dirs, created.len());
    let last = created.last().expect("one");
    qemu_io(&g.uri(last), &["write -P 0x5a 0 1M"]);
    qemu_io(&g.uri(last), &["read -P 0x5a 0 1M"]);
    g.wait_drained(last, false);
    // A takeover the disk has no room for is refused the same way, before anything is made.
    let second = dir.path().join("second");
    std::fs::create_dir(&second).expect("dir");
    let (mnt_b, _teardown_b) = common::ext4_of(&second, 64);
    let b = Gateway::start_with(
        &dir.path().join("b"),
        &Bucket::Dir(dir.path().join("bucket")),
        "60MiB",
        Some(&mnt_b.join("data")),
        "",
    );
    let (ok, out) = b.try_firn(&["volume", "takeover", last, "--force"]);
    assert!(
        !ok && out.contains("507") && out.contains("not enough local space"),
        "{out}"
    );
    assert_eq!(b.firn(&["volume", "list"]).trim(), "");
}

/// SIGTERM while writes wait for room in a full log (the bucket out of reach for good):
/// firn stops after its grace for clients, the waiting writes failing unacknowledged. Started
/// again, still in the outage, the volume opens with its full log and serves reads; once the
/// bucket is back, the log drains and writes go on.
#[test]
fn a_stop_while_writes_wait_for_room_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut g = Gateway::start_with(
        &dir.path().join("a"),
        &bucket,
        "18MiB",
        None,
        "[faults]\noutage_secs = 600\n",
    );
    g.firn(&["volume", "create", "v", "--size", "80M"]);
    let job = fio_verified("64M", "1M", &[]);
    let writer = fio_spawn(&g.uri("v"), &job);
    let started = Instant::now();
    while g.show("v")["cache"]["queued_writes"].as_u64() == Some(0) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no write waits for room"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let daemon = g.daemon.take().expect("running");
    // The grace for connected clients (10 s), then the waiting writes fail.
    assert!(daemon.stop_within(Duration::from_secs(30)).success());
    kill_fio(writer);
    let flushed = "write -P 0x6b 70M 1M";
    g.restart();
    let shown = g.show("v");
    assert!(
        shown["cache"]["dirty_bytes"]
            .as_u64()
            .is_some_and(|dirty| dirty > 16 << 20),
        "the full log is not there after the restart: {shown:#}"
    );
    qemu_io(&g.uri("v"), &["read 0 1M"]);
    g.reconfigure(&[("outage_secs = 600", "outage_secs = 0")]);
    qemu_io(&g.uri("v"), &[flushed]);
    g.wait_drained("v", false);
    qemu_io(&g.uri("v"), &["read -P 0x6b 70M 1M"]);
}

/// A flush every 8 writes of 4 KiB, all during an outage: no error, and all of it verifies,
/// then again from the bucket once the outage is over.
#[test]
fn a_flush_storm_during_an_outage_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let started = Instant::now();
    let g = Gateway::start_with(
        &dir.path().join("a"),
        &bucket,
        "18MiB",
        None,
        "[faults]\noutage_secs = 10\n",
    );
    g.firn(&["volume", "create", "v", "--size", "16M"]);
    let job = fio_verified("6M", "4k", &["--fsync=8"]);
    fio(&g.uri("v"), &strs(&job));
    let shown = g.show("v");
    eprintln!("the storm ended after {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the storm outlasted the outage"
    );
    assert!(
        shown["cache"]["pending_flushes"].as_u64().unwrap() > 0,
        "{shown:#}"
    );
    assert!(shown["cache"]["commit"].as_u64().unwrap() == 0, "{shown:#}");
    g.wait_drained("v", true);
    let mut verify = job.clone();
    verify.push("--verify_only".to_string());
    fio(&g.uri("v"), &strs(&verify));
    let shown = g.show("v");
    assert!(
        shown["cache"]["bytes_downloaded"].as_u64().unwrap() >= 5 << 20,
        "the verification did not read from the bucket: {shown:#}"
    );
}

/// The data directory on the power-loss file system: flushed writes, then unflushed ones,
/// kill -9 and a power cut that loses all (then a random part) of what no fsync covered. The
/// daemon starts cleanly each time, every flushed write reads back, and the upload drains.
/// A gateway in `dir` with its data directory on the power-loss file system (mounted at
/// `dir/mnt`) and the bucket beside it, serving a 16 MiB volume `v`.
fn on_power_loss_fs(dir: &Path) -> (common::powerloss::PowerLossMount, Gateway) {
    let (backing, mountpoint) = (dir.join("backing"), dir.join("mnt"));
    std::fs::create_dir(&backing).expect("backing dir");
    std::fs::create_dir(&mountpoint).expect("mountpoint");
    let mount = common::powerloss::PowerLossMount::mount(&backing, &mountpoint)
        .expect("mount the power-loss file system (needs /dev/fuse and fusermount3)");
    let bucket = Bucket::Dir(dir.join("bucket"));
    let data = mountpoint.join("data");
    let g = Gateway::start_with(&dir.join("a"), &bucket, "64MiB", Some(&data), "");
    g.firn(&["volume", "create", "v", "--size", "16M"]);
    (mount, g)
}

#[test]
fn flushed_writes_survive_power_loss() {
    use common::powerloss::PowerCut;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut mount, mut g) = on_power_loss_fs(dir.path());
    let mut model = vec![0u8; 8 << 20];
    let mut rng = rand::rng();
    let cuts = [
        PowerCut::LoseAll,
        PowerCut::LoseSome(1),
        PowerCut::LoseAll,
        PowerCut::LoseSome(7),
    ];
    for (round, cut) in cuts.into_iter().enumerate() {
        let byte = 0x11 * (round as u8 + 1);
        let mut commands = Vec::new();
        for _ in 0..6 {
            let block = rand::Rng::random_range(&mut rng, 0..(8u64 << 4));
            let len = 64 << 10;
            commands.push(format!("write -P {byte} {} {len}", block * len));
            let at = (block * len) as usize;
            model[at..at + len as usize].fill(byte);
        }
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        qemu_io(&g.uri("v"), &commands);
        // Unflushed, in the other half.
        fio(
            &g.uri("v"),
            &[
                "--name=unflushed",
                "--rw=randwrite",
                "--bs=4k",
                "--offset=8M",
                "--size=8M",
                "--number_ios=500",
                "--end_fsync=0",
            ],
        );
        g.kill9();
        let report = mount.power_cut(cut).expect("power cut");
        eprintln!("round {round}, power cut ({cut:?}): {report:?}");
        g.restart();
        let got = image(&g, "v", &dir.path().join("back.img"));
        assert_same(
            &got[..8 << 20],
            &model,
            &format!("round {round}: flushed writes after a power cut ({cut:?})"),
        );
    }
    let shown = g.wait_drained("v", true);
    assert!(shown["cache"]["fenced"].is_null(), "{shown:#}");
    let got = image(&g, "v", &dir.path().join("back.img"));
    assert_same(&got[..8 << 20], &model, "flushed writes, from the bucket");
}

/// A takeover on a store that refuses a second create fences the old gateway while it still
/// runs: its next commit collides with the takeover's (412), it turns read-only but keeps
/// serving reads, and the new gateway serves the image as of the takeover.
/// Gateway A, serving volume `v` (16 MiB, its first 4 MiB 0x11, all of it committed) and
/// about to be taken over; its garbage collection, whose sweep would notice the new owner's
/// commit, is off for the length of a test.
fn serving_old_gateway(dir: &Path, bucket: &Bucket) -> Gateway {
    let mut a = Gateway::start(dir, bucket, "");
    a.reconfigure(&[(
        "gc_interval_secs = 1\n",
        "gc_interval_secs = 40\ngc_grace_secs = 600\n",
    )]);
    a.firn(&["volume", "create", "v", "--size", "16M"]);
    qemu_io(&a.uri("v"), &["write -P 0x11 0 4M"]);
    a.wait_drained("v", false);
    a
}

/// A gateway whose volume another took over fences itself at its next lease renewal, even if
/// its clients never flush (a commit, refused, would tell it only at a flush); a write that
/// waited for room in its full log then fails rather than waiting for good.
#[test]
fn a_gateway_taken_over_fences_itself_without_a_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let a = serving_old_gateway(&dir.path().join("a"), &bucket);
    a.firn(&["volume", "limits", "v", "--log-max", "4MiB"]);
    a.firn(&["bandwidth", "--upload", "128KiB"]);
    // 8 MiB past what the log holds: a minute of uploads, well past the fence.
    let waiting = waiting_write(&a, "v", "write -P 0x33 4M 12M");
    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    b.firn(&["volume", "takeover", "v", "--force"]);
    let shown = a.wait_fenced("v");
    let fenced = shown["cache"]["fenced"].as_str().unwrap_or_default();
    assert!(fenced.contains("took the volume over"), "{shown:#}");
    let (_, said) = finished(waiting, "a write waiting for room, after the fence");
    assert!(said.contains("failed"), "the waiting write: {said}");
    // The new one serves and commits, unfenced by the old one's renewals.
    qemu_io(&b.uri("v"), &["read -P 0x11 0 4M", "write -P 0x22 0 1M"]);
    std::thread::sleep(LEASE_RENEWED);
    let shown = b.wait_drained("v", false);
    assert!(shown["cache"]["fenced"].is_null(), "{shown:#}");
}

/// A takeover whose lease does not go in (the bucket refuses that one put past the retries)
/// has still decided the volume with its commit: it serves, and its uploads put the lease
/// first once the bucket takes it, which fences the old gateway without a flush. It used to
/// fail after the commit, which left the volume served by no gateway.
#[test]
fn a_takeover_whose_lease_does_not_go_in_serves_and_puts_it_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let a = serving_old_gateway(&dir.path().join("a"), &bucket);
    let mut b = Gateway::start(
        &dir.path().join("b"),
        &bucket,
        "retry_for_secs = 1\n[faults]\nerror_rate = 1.0\nonly_keys = \"/lease\"\n",
    );
    b.firn(&["volume", "takeover", "v", "--force"]);
    qemu_io(&b.uri("v"), &["read -P 0x11 0 4M", "write -P 0x22 0 1M"]);
    let started = Instant::now();
    loop {
        let shown = b.show("v");
        let error = shown["cache"]["last_error"].as_str().unwrap_or_default();
        if error.contains("lease") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{shown:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    b.reconfigure(&[("error_rate = 1.0", "error_rate = 0.0")]);
    let shown = a.wait_fenced("v");
    let fenced = shown["cache"]["fenced"].as_str().unwrap_or_default();
    assert!(fenced.contains("took the volume over"), "{shown:#}");
    b.wait_drained("v", false);
    qemu_io(&b.uri("v"), &["read -P 0x22 0 1M", "read -P 0x11 1M 3M"]);
}

/// A takeover killed after its commit went in has made the volume this gateway's in the
/// bucket, and fenced the old one: its next start finishes it (no `--force`), rather than
/// leaving the volume served by no gateway.
#[test]
fn a_takeover_killed_after_its_commit_is_finished_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("bucket");
    let bucket = Bucket::Dir(root.clone());
    let a = serving_old_gateway(&dir.path().join("a"), &bucket);
    let shown = a.show("v");
    let id = shown["id"].as_str().expect("id").to_string();
    let next = shown["cache"]["commit"].as_u64().expect("commit") + 1;
    let commit = root.join(format!("volumes/{id}/commits/{next:016x}"));
    // The lease, put right after the commit, takes 5 s: time to kill the takeover there.
    let mut b = Gateway::start(
        &dir.path().join("b"),
        &bucket,
        "[faults]\nlatency_ms = 5000\nonly_keys = \"/lease\"\n",
    );
    let mut taking = std::process::Command::new(env!("CARGO_BIN_EXE_firn"))
        .args(["volume", "takeover", "v", "--force", "--config"])
        .arg(&b.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("firn");
    let started = Instant::now();
    while !commit.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the takeover's commit did not go in"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    b.kill9();
    assert!(
        !taking.wait().expect("firn").success(),
        "the takeover ended before it was killed"
    );

    b.reconfigure(&[("latency_ms = 5000", "latency_ms = 0")]);
    let started = Instant::now();
    while !b.try_firn(&["volume", "show", "v"]).0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the takeover was not finished: {}",
            b.try_firn(&["volume", "list"]).1
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    qemu_io(&b.uri("v"), &["read -P 0x11 0 4M", "write -P 0x22 0 1M"]);
    b.wait_drained("v", false);
    let shown = a.wait_fenced("v");
    let fenced = shown["cache"]["fenced"].as_str().unwrap_or_default();
    assert!(fenced.contains("took the volume over"), "{shown:#}");
}

/// A renewal of the old gateway's lease that lands just after a takeover wrote the new one's
/// (the old gateway read its own lease a moment before) leaves a live lease of the old
/// gateway in the bucket. The new owner must not take that for a newer takeover: it keeps
/// serving and writes its lease again, and the old gateway is the one fenced.
#[test]
fn an_old_gateways_late_lease_renewal_does_not_fence_the_new_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("bucket");
    let bucket = Bucket::Dir(root.clone());
    let a = serving_old_gateway(&dir.path().join("a"), &bucket);
    let lease = bucket_objects(&root)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "lease"))
        .expect("the volume's lease is in the bucket");
    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    // A's renewal, as A would put it now: its lease is at most one renewal old.
    let renewal = std::fs::read(&lease).expect("lease");
    b.firn(&["volume", "takeover", "v", "--force"]);
    // After the lease B puts when the volume opens.
    std::thread::sleep(Duration::from_secs(2));
    let landed = lease.with_extension("late");
    std::fs::write(&landed, &renewal).expect("lease");
    std::fs::rename(&landed, &lease).expect("lease");

    // B renews (and finds A's live lease) at least once, and serves and commits through it.
    std::thread::sleep(LEASE_RENEWED);
    qemu_io(&b.uri("v"), &["read -P 0x11 0 4M", "write -P 0x22 0 1M"]);
    let shown = b.wait_drained("v", false);
    assert!(shown["cache"]["fenced"].is_null(), "{shown:#}");
    assert_ne!(
        std::fs::read(&lease).expect("lease"),
        renewal,
        "the new owner did not put its lease back"
    );
    let shown = a.wait_fenced("v");
    let fenced = shown["cache"]["fenced"].as_str().unwrap_or_default();
    assert!(fenced.contains("took the volume over"), "{shown:#}");
    let shown = b.show("v");
    assert!(shown["cache"]["fenced"].is_null(), "{shown:#}");
}

/// A commit's cut lies on a client's FLUSH: writes that no client flushed stay out of the
/// bucket's image, even after they are uploaded and a checkpoint past them waits for a commit
/// to name it (garbage collection marks a cut of its own only where a flush left the log).
#[test]
fn writes_no_client_flushed_stay_out_of_the_bucket_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "v", "--size", "16M"]);
    qemu_io(&a.uri("v"), &["write -P 0x11 0 4M"]);
    let commit = a.wait_drained("v", false)["cache"]["commit"].clone();
    // Never flushed (fio sends no FLUSH here): its segments close by age and go up, and a
    // checkpoint follows them.
    run(
        "fio",
        &[
            "--name=unflushed",
            "--ioengine=nbd",
            &format!("--uri={}", a.uri("v")),
            "--rw=write",
            "--bs=64k",
            "--size=2M",
            "--offset=1M",
            "--buffer_pattern=0x55",
        ],
    );
    a.wait_drained("v", false);
    // Garbage collection runs every second here: time for a few passes.
    std::thread::sleep(Duration::from_secs(4));
    let shown = a.show("v");
    assert_eq!(shown["cache"]["commit"], commit, "{shown:#}");
    a.kill9();
    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    b.firn(&["volume", "takeover", "v", "--force"]);
    qemu_io(&b.uri("v"), &["read -P 0x11 0 4M"]);
}

/// Longer than a lease renewal (10 s), so that each gateway has renewed (or tried) once.
const LEASE_RENEWED: Duration = Duration::from_secs(11);

#[test]
fn a_takeover_fences_the_running_gateway_on_a_store_with_conditional_creates() {
    let Some(moto) = Moto::start() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Moto {
        endpoint: moto.endpoint.clone(),
        prefix: "fence/".to_string(),
    };
    let a = Gateway::start(&dir.path().join("a"), &bucket, "");
    a.firn(&["volume", "create", "v", "--size", "16M"]);
    qemu_io(&a.uri("v"), &["write -P 0x11 0 4M"]);
    let shown = a.wait_drained("v", false);
    let before = shown["cache"]["commit"].as_u64().unwrap();
    assert!(before >= 1, "{shown:#}");

    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    // The store fences, so only A's live lease stands in the way.
    let checked = b.conditional_create_checked();
    assert!(checked.contains("honoured"), "{checked}");
    let (ok, out) = b.try_firn(&["volume", "takeover", "v"]);
    assert!(
        !ok && out.contains("lease") && out.contains("--force"),
        "{out}"
    );
    b.firn(&["volume", "takeover", "v", "--force"]);

    // A, still running, takes a write and a flush; its commit must be refused.
    qemu_io(&a.uri("v"), &["write -P 0x22 4M 1M"]);
    let shown = a.wait_fenced("v");
    let fenced = shown["cache"]["fenced"].as_str().unwrap_or_default();
    assert!(fenced.contains("another gateway"), "{shown:#}");
    assert_eq!(shown["read_only"], true, "{shown:#}");
    let listed = a.firn(&["volume", "list"]);
    assert!(listed.contains("read-only"), "{listed}");
    assert_eq!(
        shown["cache"]["commit"].as_u64(),
        Some(before),
        "the old gateway committed after the takeover: {shown:#}"
    );
    // Read-only now: writes are refused, reads still served; and so after a restart.
    let refuses_writes_serves_reads = |a: &Gateway| {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x33 0 4k", &a.uri("v")])
            .output()
            .expect("qemu-io");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            // Refused per request, or (the export is read-only) at the open.
            ["Operation not permitted", "Read-only", "Permission denied"]
                .iter()
                .any(|refusal| text.contains(refusal)),
            "the fenced gateway took a write: {text}"
        );
        qemu_io(&a.uri("v"), &["read -P 0x11 0 4M", "read -P 0x22 4M 1M"]);
    };
    refuses_writes_serves_reads(&a);
    // New connections are told at the handshake, and a resize (which would never reach the
    // bucket) is refused.
    let info = run("nbdinfo", &["--json", &a.uri("v")]);
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    let (resized, out) = a.try_firn(&["volume", "resize", "v", "--size", "32M"]);
    assert!(!resized && out.contains("no longer serves"), "{out}");
    // The new owner grows the volume; the old one, restarted, must not write its old
    // descriptor (and size) over the new owner's.
    b.firn(&["volume", "resize", "v", "--size", "32M"]);
    let mut a = a;
    a.stop();
    a.restart();
    let shown = a.show("v");
    assert!(
        !shown["cache"]["fenced"].is_null(),
        "a restart unfenced the old gateway: {shown:#}"
    );
    refuses_writes_serves_reads(&a);
    let c = Gateway::start(&dir.path().join("c"), &bucket, "");
    let listed = c.firn(&["volume", "list", "--bucket"]);
    assert!(listed.contains("32.0 MiB"), "{listed}");

    // B serves the image as of the takeover, and carries on.
    qemu_io(&b.uri("v"), &["read -P 0x11 0 4M", "read -P 0 4M 12M"]);
    qemu_io(&b.uri("v"), &["write -P 0x44 8M 1M"]);
    let shown = b.wait_drained("v", false);
    assert!(shown["cache"]["fenced"].is_null(), "{shown:#}");
    assert!(
        shown["cache"]["commit"].as_u64().unwrap() > before + 1,
        "{shown:#}"
    );
    qemu_io(&b.uri("v"), &["read -P 0x44 8M 1M"]);

    // The old gateway drops its stale copy: the bucket's objects are B's and stay.
    a.firn(&["volume", "delete", "v", "--force"]);
    let listed = a.firn(&["volume", "list", "--bucket"]);
    assert!(
        listed.contains('v'),
        "a fenced gateway's delete took the bucket's volume: {listed}"
    );
    qemu_io(&b.uri("v"), &["write -P 0x55 9M 1M"]);
    b.wait_drained("v", true);
    qemu_io(&b.uri("v"), &["read -P 0x44 8M 1M", "read -P 0x55 9M 1M"]);
}

/// As above, with the kill racing unflushed writes and the uploader (closing, uploading,
/// checkpointing, evicting) at a random moment, round after round: flushed writes survive,
/// the gateway never finds its own segments in the bucket changed (it would fence itself),
/// and it drains at the end.
#[test]
fn flushed_writes_survive_power_loss_at_random_moments() {
    use common::powerloss::PowerCut;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut mount, mut g) = on_power_loss_fs(dir.path());
    let mut model = vec![0u8; 8 << 20];
    let mut rng = rand::rng();
    for round in 0..12u64 {
        let byte = (round % 250 + 1) as u8;
        let mut commands = Vec::new();
        for _ in 0..4 {
            let block = rand::Rng::random_range(&mut rng, 0..(8u64 << 8));
            commands.push(format!("write -P {byte} {} 4k", block * 4096));
            let at = (block * 4096) as usize;
            model[at..at + 4096].fill(byte);
        }
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        qemu_io(&g.uri("v"), &commands);
        let noise = fio_spawn(
            &g.uri("v"),
            &[
                "--name=noise",
                "--thread",
                "--rw=randwrite",
                "--bs=64k",
                "--offset=8M",
                "--size=8M",
                "--time_based",
                "--runtime=5",
                "--end_fsync=0",
            ]
            .map(String::from),
        );
        let pause = rand::Rng::random_range(&mut rng, 50..800);
        std::thread::sleep(Duration::from_millis(pause));
        g.kill9();
        kill_fio(noise);
        let cut = if round % 2 == 0 {
            PowerCut::LoseAll
        } else {
            PowerCut::LoseSome(round)
        };
        let report = mount.power_cut(cut).expect("power cut");
        eprintln!("round {round} after {pause} ms, power cut ({cut:?}): {report:?}");
        g.restart();
        let got = image(&g, "v", &dir.path().join("back.img"));
        assert_same(
            &got[..8 << 20],
            &model,
            &format!("round {round}: flushed writes after a power cut ({cut:?})"),
        );
        let shown = g.show("v");
        assert!(
            shown["cache"]["fenced"].is_null(),
            "round {round}: {shown:#}"
        );
    }
    let shown = g.wait_drained("v", true);
    assert!(shown["cache"]["fenced"].is_null(), "{shown:#}");
    let got = image(&g, "v", &dir.path().join("back.img"));
    assert_same(&got[..8 << 20], &model, "flushed writes, from the bucket");
}

/// A log that flushes after every write gets its segments written with zeros ahead of use
/// (spares, so that a flush syncs data and no file-system metadata). Power cuts while the
/// open segment is such a spare lose no flushed write, and the daemon reads the zeros after
/// the last record as the end of the log, not as damage (no segment set aside).
#[test]
fn flushed_writes_into_spare_segments_survive_power_loss() {
    use common::powerloss::PowerCut;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut mount, mut g) = on_power_loss_fs(dir.path());
    // Segments closed when full, not every 100 ms: a spare follows a segment of many flushes.
    let text = std::fs::read_to_string(&g.config).expect("config");
    let text = text.replace("commit_interval_ms = 100\n", "commit_interval_ms = 10000\n");
    std::fs::write(&g.config, text).expect("config");
    g.kill9();
    g.restart();
    let volume_dir = || {
        let volumes = dir.path().join("mnt/data/volumes");
        std::fs::read_dir(&volumes)
            .expect("volumes dir")
            .map(|entry| entry.expect("entry").path())
            .find(|path| path.join("segments").is_dir())
            .expect("the volume's directory")
    };
    let mut jobs = Vec::new();
    for (round, cut) in [PowerCut::LoseAll, PowerCut::LoseSome(5), PowerCut::LoseAll]
        .into_iter()
        .enumerate()
    {
        // 4 KiB writes, each flushed (fio's `fsync` flushes before the next write, so the
        // last one needs `end_fsync`): 1 MiB segments of about 250 flushes each.
        let offset = format!("--offset={}M", round * 4);
        let job = fio_verified("3M", "4k", &["--fsync=1", "--end_fsync=1", &offset]);
        fio(&g.uri("v"), &strs(&job));
        jobs.push(job);
        // The spare is written in the background: the one that follows the segments above.
        let vdir = volume_dir();
        let segment_size = 1u64 << 20;
        let deadline = Instant::now() + Duration::from_secs(10);
        let spare_seen = loop {
            let open_is_spare = std::fs::read_dir(vdir.join("segments"))
                .expect("segments")
                .any(|e| e.expect("entry").metadata().expect("stat").len() > segment_size);
            if open_is_spare || vdir.join("segments/spare").exists() {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        eprintln!("spare_seen {spare_seen}");
        g.kill9();
        let report = mount.power_cut(cut).expect("power cut");
        eprintln!("round {round}, power cut ({cut:?}): {report:?}");
        g.restart();
        for (i, job) in jobs.iter().enumerate() {
            let mut verify = job.clone();
            verify.push("--verify_only".to_string());
            fio(&g.uri("v"), &strs(&verify));
            eprintln!("round {round}: job {i}'s flushed writes verified");
        }
        if matches!(cut, PowerCut::LoseAll) {
            let damaged: Vec<_> = std::fs::read_dir(volume_dir().join("segments"))
                .expect("segments")
                .map(|e| e.expect("entry").file_name())
                .filter(|name| name.to_string_lossy().ends_with(".damaged"))
                .collect();
            assert!(damaged.is_empty(), "round {round}: set aside {damaged:?}");
        }
    }
    g.wait_drained("v", true);
    for job in &jobs {
        let mut verify = job.clone();
        verify.push("--verify_only".to_string());
        fio(&g.uri("v"), &strs(&verify));
    }
}

/// With a passphrase as the key source, the salt that stretches it is in the bucket too: a
/// new gateway with an empty data directory and the same passphrase derives the same key and
/// restores the volume.
#[test]
fn a_new_gateway_with_the_same_passphrase_restores_the_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let keys = "[keys]\nsource = \"passphrase\"\n";
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, keys);
    a.firn(&["volume", "create", "db", "--size", "8M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 0 2M",
            "-c",
            "flush",
            &a.uri("db"),
        ],
    );
    a.wait_drained("db", false);
    a.kill9();
    std::fs::remove_dir_all(a.dir.join("data")).expect("lose the disk");
    let mut b = Gateway::start(&dir.path().join("b"), &bucket, keys);
    b.firn(&["volume", "takeover", "db", "--force"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x3c 0 2M",
            "-c",
            "read -P 0 2M 6M",
            &b.uri("db"),
        ],
    );

    // The bucket's salt lost: a new gateway refuses to make one of its own (which would
    // never open the volume, and, put in the bucket, would mislead every later gateway).
    let salt_object = dir.path().join("bucket/keys/passphrase-salt");
    let salt = std::fs::read(&salt_object).expect("the salt is in the bucket");
    std::fs::remove_file(&salt_object).expect("lose the salt");
    let c = dir.path().join("c");
    std::fs::create_dir_all(&c).expect("dir");
    std::fs::copy(&b.config, c.join("firn.toml")).expect("config");
    let refused = |expected: &str| {
        let out = std::process::Command::new(common::FIRN)
            .args(["serve", "--config"])
            .arg(c.join("firn.toml"))
            .env("FIRN_PASSPHRASE", PASSPHRASE)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("firn serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started: {stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(
            !c.join("data/passphrase.salt").exists(),
            "a salt was kept in the data directory"
        );
    };
    refused("holds volumes but not their passphrase salt");
    assert!(!salt_object.exists(), "a new salt was put in the bucket");
    // A damaged salt is not taken in either.
    std::fs::write(&salt_object, "garbage-not-hex!").expect("damage the salt");
    refused("is not 32 hex digits");
    // A gateway that has the salt puts it back at its start.
    b.restart();
    assert_eq!(std::fs::read(&salt_object).expect("salt"), salt);

    // Another passphrase: the volume is there, but does not open, and the takeover says so.
    let e = dir.path().join("e");
    std::fs::create_dir_all(&e).expect("dir");
    let port = free_port();
    let text = std::fs::read_to_string(&b.config)
        .expect("config")
        .replace(
            &format!("127.0.0.1:{}\"", b.http),
            &format!("127.0.0.1:{port}\""),
        )
        .replace(&format!("127.0.0.1:{}\"", b.nbd), "127.0.0.1:0\"");
    std::fs::write(e.join("firn.toml"), text).expect("config");
    let other = Daemon::try_start(
        &e.join("firn.toml"),
        port,
        &[("FIRN_PASSPHRASE", "another passphrase altogether")],
    )
    .expect("starts");
    let (ok, _, stderr) = firn(&[
        "volume",
        "takeover",
        "db",
        "--force",
        "--config",
        e.join("firn.toml").to_str().expect("utf-8"),
    ]);
    assert!(!ok && stderr.contains("do not open with it"), "{stderr}");
    drop(other);
}

/// Overwrites three quarters of the volume, round after round, with kill -9 at random moments
/// while garbage collection runs; flushed data always reads back. Then the collector has
/// moved the live data into chunks and deleted the dead objects, the volume still reads as
/// written from the bucket alone, and a new gateway restores it from the bucket.
fn garbage_collection_keeps_the_image(bucket: Bucket) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tuned = "read_timeout_secs = 2\ngc_grace_secs = 5\n";
    let start =
        |at: &str| Gateway::start_tuned(&dir.path().join(at), &bucket, "64MiB", None, tuned, "");
    let mut g = start("a");
    g.firn(&["volume", "create", "v", "--size", "16M"]);
    let source = dir.path().join("source.img");
    random_file(&source, 16 << 20);
    run(
        "nbdcopy",
        &["--flush", source.to_str().unwrap(), &g.uri("v")],
    );
    let mut model = std::fs::read(&source).expect("source");
    let mut rng = rand::rng();
    let back = dir.path().join("back.img");
    for round in 0..6u64 {
        // 192 KiB of every 256 KiB, shifted each round: a quarter of each stays live.
        let mut commands = Vec::new();
        for group in 0..64u64 {
            let byte = (round * 16 + group % 16 + 1) as u8;
            let at = group * (256 << 10) + (round % 4) * (64 << 10);
            let len = (192u64 << 10).min((16 << 20) - at);
            commands.push(format!("write -P {byte} {at} {len}"));
            model[at as usize..(at + len) as usize].fill(byte);
        }
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        qemu_io(&g.uri("v"), &commands);
        if round >= 2 {
            // Collection passes run every second: kill somewhere in one.
            std::thread::sleep(Duration::from_millis(rand::Rng::random_range(
                &mut rng,
                0..2500,
            )));
            g.kill9();
            g.restart();
        }
        assert_same(&image(&g, "v", &back), &model, &format!("round {round}"));
    }
    // Left alone, the collector finishes: chunks made, dead objects deleted.
    let started = Instant::now();
    let shown = loop {
        let shown = g.wait_drained("v", false);
        let cache = &shown["cache"];
        // Deletions come a grace period after the objects became garbage, pass by pass.
        let settled = match &bucket {
            Bucket::Dir(root) => data_bytes(root) < 32 << 20,
            _ => true,
        };
        if cache["chunks"].as_u64().unwrap_or(0) > 0
            && cache["gc_deleted_objects"].as_u64().unwrap_or(0) > 0
            && settled
        {
            break shown;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "garbage collection did not finish: {shown:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("after collection: {:#}", shown["cache"]);
    let metrics = run(
        "curl",
        &["-fsS", &format!("http://127.0.0.1:{}/metrics", g.http)],
    );
    assert!(
        metrics.contains("firn_volume_gc_deleted_objects_total{volume=\"v\"}")
            && metrics.contains("firn_volume_chunks{volume=\"v\"}"),
        "no garbage collection metrics"
    );
    if let Bucket::Dir(root) = &bucket {
        // 16 MiB written, then 6 × 12 MiB over it: 88 MiB, of which 16 MiB are live.
        let stored = data_bytes(root);
        eprintln!("segment and chunk bytes in the bucket: {stored}");
        assert!(
            stored < 32 << 20,
            "{stored} bytes of segments and chunks for 16 MiB live"
        );
    }
    assert_same(&image(&g, "v", &back), &model, "after collection");
    // A new gateway restores it from the bucket: checkpoints name the chunks.
    g.kill9();
    let b = start("b");
    b.firn(&["volume", "takeover", "v", "--force"]);
    assert_same(&image(&b, "v", &back), &model, "restored on a new gateway");
    if let Bucket::Dir(root) = &bucket {
        // What a gateway lost in the middle of a collection pass leaves: a chunk no
        // checkpoint names, and its mark under the volume's prefix. The new owner sweeps
        // both, a grace period later.
        let id = b.show("v")["id"].as_str().expect("id").to_string();
        let hex = "ab".repeat(32);
        let orphan = root.join(format!("chunks/ab/{hex}"));
        let mark = root.join(format!("volumes/{id}/gc-pending/{hex}"));
        for (path, body) in [(&orphan, &b"lost chunk"[..]), (&mark, &b""[..])] {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, body).expect("plant");
        }
        let started = Instant::now();
        while orphan.exists() || mark.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the lost gateway's chunk ({}) or its mark ({}) stayed",
                orphan.exists(),
                mark.exists()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    // Deleting the volume takes its chunks, outside its prefix, with it.
    b.firn(&["volume", "delete", "v", "--force"]);
    if let Bucket::Dir(root) = &bucket {
        assert_eq!(data_bytes(root), 0, "segments or chunks left after delete");
    }
}

/// Bytes of segment and chunk objects in a directory bucket. The collector deletes objects
/// (and prunes the directories they leave empty) while this walks: what vanishes under it
/// counts as gone.
fn data_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("read_dir {}: {e}", dir.display()),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let text = path.to_string_lossy();
                if text.contains("/segments/") || text.contains("/chunks/") {
                    total += entry.metadata().map_or(0, |m| m.len());
                }
            }
        }
    }
    total
}

#[test]
fn garbage_collection_keeps_the_image_with_a_directory_bucket() {
    let dir = tempfile::tempdir().expect("tempdir");
    garbage_collection_keeps_the_image(Bucket::Dir(dir.path().join("bucket")));
}

#[test]
fn garbage_collection_keeps_the_image_with_garage() {
    if let Some(bucket) = garage() {
        garbage_collection_keeps_the_image(bucket);
    }
}

/// Objects under `volumes/` and `chunks/` of a directory bucket.
fn bucket_objects(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.join("volumes"), root.join("chunks")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else {
                found.push(entry.path());
            }
        }
    }
    found
}

/// A volume deleted while segments are on their way up leaves nothing behind: its uploader
/// stops before the objects are deleted, so no put in flight lands after them.
#[test]
fn a_volume_deleted_while_uploading_leaves_nothing_in_the_bucket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("bucket");
    let g = Gateway::start(&dir.path().join("a"), &Bucket::Dir(root.clone()), "");
    g.firn(&["volume", "create", "v", "--size", "32M"]);
    // 1 MiB segments at 1 MiB/s: each upload takes about a second.
    g.firn(&["bandwidth", "--upload", "1MiB"]);
    qemu_io(&g.uri("v"), &["write -P 7 0 12M"]);
    let started = Instant::now();
    while !bucket_objects(&root)
        .iter()
        .any(|p| p.to_string_lossy().contains("/segments/"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no segment uploaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let backlog = g.show("v")["cache"]["dirty_bytes"].as_u64();
    assert!(
        backlog.is_some_and(|b| b > 4 << 20),
        "uploads not in flight: {backlog:?}"
    );
    g.firn(&["volume", "delete", "v", "--force"]);
    // A put that outlived the delete would land within a segment's upload time.
    std::thread::sleep(Duration::from_secs(3));
    let left = bucket_objects(&root);
    assert!(left.is_empty(), "left in the bucket: {left:?}");
}

/// A volume deleted while the bucket does not answer is gone at once here, and its objects
/// leave the bucket by themselves once it answers again.
#[test]
fn a_volume_deleted_during_an_outage_leaves_the_bucket_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("bucket");
    let mut g = Gateway::start(&dir.path().join("a"), &Bucket::Dir(root.clone()), "");
    g.firn(&["volume", "create", "v", "--size", "8M"]);
    qemu_io(&g.uri("v"), &["write -P 7 0 4M"]);
    g.wait_drained("v", false);
    let files = |root: &Path| bucket_objects(root).len();
    assert!(files(&root) > 0);
    // The next start begins with a 15 s outage of the whole bucket.
    let mut config = std::fs::read_to_string(&g.config).expect("config");
    config.push_str("[faults]\noutage_secs = 25\n");
    std::fs::write(&g.config, config).expect("config");
    g.restart();
    // The delete does not wait out the outage (nor the remote layer's retries): the volume
    // is gone here at once, its objects later.
    let asked = Instant::now();
    g.firn(&["volume", "delete", "v", "--force"]);
    assert!(
        asked.elapsed() < Duration::from_secs(13),
        "the delete waited {:?} for the bucket",
        asked.elapsed()
    );
    let listed = g.firn(&["volume", "list"]);
    assert!(!listed.contains('v'), "{listed}");
    assert!(files(&root) > 0, "the outage did not keep the objects");
    let started = Instant::now();
    while files(&root) > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} objects of the deleted volume are still in the bucket",
            files(&root)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A gateway that lost a volume to a takeover while it was down, and is cut off from the
/// bucket when the volume is deleted there, cannot learn that it lost it. Its deletion of the
/// bucket's objects, retried once the bucket answers, asks the bucket first: the newest commit
/// is the new owner's, so it deletes only its own copy, and the new owner's volume stays whole.
#[test]
fn a_gateway_that_lost_a_volume_unknowing_deletes_only_its_own_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = Bucket::Dir(dir.path().join("bucket"));
    let quick = "retry_for_secs = 1\n";
    let mut a = Gateway::start(&dir.path().join("a"), &bucket, quick);
    a.firn(&["volume", "create", "v", "--size", "8M"]);
    qemu_io(&a.uri("v"), &["write -P 7 0 4M"]);
    a.wait_drained("v", false);
    a.kill9();
    let b = Gateway::start(&dir.path().join("b"), &bucket, "");
    b.firn(&["volume", "takeover", "v", "--force"]);
    qemu_io(&b.uri("v"), &["write -P 9 4M 1M"]);
    b.wait_drained("v", false);
    // A comes back cut off from the bucket for 6 s, and the volume is deleted there.
    let mut config = std::fs::read_to_string(&a.config).expect("config");
    config.push_str("[faults]\noutage_secs = 6\n");
    std::fs::write(&a.config, config).expect("config");
    let restarted = Instant::now();
    a.restart();
    a.firn(&["volume", "delete", "v", "--force"]);
    // A retries the bucket's part every 10 s: once after the outage, and once more.
    std::thread::sleep(Duration::from_secs(22).saturating_sub(restarted.elapsed()));
    a.stop();
    let c = Gateway::start(&dir.path().join("c"), &bucket, "");
    c.firn(&["volume", "takeover", "v", "--force"]);
    qemu_io(&c.uri("v"), &["read -P 7 0 4M", "read -P 9 4M 1M"]);
}

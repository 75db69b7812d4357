//! The NBD door with real clients (nbdinfo, nbdcopy, qemu-img, qemu-io, fio), with hostile
//! input from a raw socket, and across kill -9.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, FIRN, firn, free_port, metric, run, small_ext4};

struct Gateway {
    daemon: Option<Daemon>,
    dir: tempfile::TempDir,
    config: PathBuf,
    http_port: u16,
    nbd_port: u16,
}

/// Writes `dir/firn.toml` with fresh HTTP and NBD ports, the data in `data_dir` (relative to
/// `dir`) and `nbd_extra` ending the `[nbd]` section; returns it and the two ports.
fn write_nbd_config(dir: &Path, data_dir: &str, nbd_extra: &str) -> (PathBuf, u16, u16) {
    let (http_port, nbd_port) = (free_port(), free_port());
    let config = dir.join("firn.toml");
    std::fs::write(
        &config,
        format!(
            "[local]\ndata_dir = \"{data_dir}\"\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[nfs]\nlisten = \"\"\n[nbd]\nlisten = \"127.0.0.1:{nbd_port}\"\n{nbd_extra}"
        ),
    )
    .expect("config");
    (config, http_port, nbd_port)
}

/// `firn ARGS --config CONFIG`; panics unless it succeeds.
fn firn_at(config: &Path, args: &[&str]) -> String {
    let mut full = args.to_vec();
    full.extend(["--config", config.to_str().expect("utf-8")]);
    let (ok, out, err) = firn(&full);
    assert!(ok, "firn {args:?}: {err}");
    out
}

/// `firn volume create NAME --size SIZE` against the gateway of `config`.
fn create_volume(config: &Path, name: &str, size: &str) {
    let config = config.to_str().expect("utf-8");
    let (ok, _, err) = firn(&["volume", "create", name, "--size", size, "--config", config]);
    assert!(ok, "volume create {name}: {err}");
}

impl Gateway {
    fn start() -> Gateway {
        Gateway::start_with("")
    }

    /// A gateway whose `[nbd]` section ends with `nbd_extra`.
    fn start_with(nbd_extra: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let (config, http_port, nbd_port) = write_nbd_config(dir.path(), "data", nbd_extra);
        let daemon = Daemon::start(&config, http_port, &[]);
        Gateway {
            daemon: Some(daemon),
            dir,
            config,
            http_port,
            nbd_port,
        }
    }

    fn restart(&mut self) {
        self.daemon = Some(Daemon::start(&self.config, self.http_port, &[]));
    }

    fn kill9(&mut self) {
        self.daemon.take().expect("running").kill9();
    }

    fn firn(&self, args: &[&str]) -> String {
        firn_at(&self.config, args)
    }

    fn tcp(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd_port)
    }

    fn unix(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.dir.path().join("data/nbd.sock").display()
        )
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// GET /metrics (it needs no token).
    fn metrics(&self) -> String {
        common::metrics(self.http_port)
    }
}

fn random_file(path: &Path, len: usize) {
    let mut data = vec![0u8; len];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut data);
    std::fs::write(path, data).expect("write");
}

#[test]
fn real_clients_interoperate_with_a_cached_volume() {
    real_clients_interoperate("cached");
}

#[test]
fn real_clients_interoperate_with_a_local_volume() {
    real_clients_interoperate("local");
}

fn real_clients_interoperate(mode: &str) {
    let g = Gateway::start();
    g.firn(&["volume", "create", "disk", "--size", "64M", "--mode", mode]);
    assert!(g.firn(&["volume", "list"]).contains("disk"));

    let list = run("nbdinfo", &["--list", &g.tcp("")]);
    assert!(list.contains("export=\"disk\""), "{list}");
    let info = run("nbdinfo", &[&g.tcp("disk")]);
    assert!(info.contains("export-size: 67108864"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("block_size_preferred: 4096"), "{info}");

    // A missing export is refused with a reason, not a dropped connection.
    let out = Command::new("nbdinfo")
        .arg(g.tcp("nope"))
        .output()
        .expect("nbdinfo");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
    assert!(
        err.contains("server replied with error") && err.contains("No such file"),
        "{err}"
    );

    // nbdcopy round trip over the Unix socket and back over TCP.
    let source = g.path("source.img");
    random_file(&source, 64 << 20);
    run(
        "nbdcopy",
        &[source.to_str().expect("utf-8"), &g.unix("disk")],
    );
    let back = g.path("back.img");
    run("nbdcopy", &[&g.tcp("disk"), back.to_str().expect("utf-8")]);
    assert!(
        std::fs::read(&source).expect("source") == std::fs::read(&back).expect("back"),
        "nbdcopy round trip differs"
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            source.to_str().expect("utf-8"),
            &g.tcp("disk"),
        ],
    );
    let info = run("qemu-img", &["info", "-f", "raw", &g.unix("disk")]);
    assert!(info.contains("virtual size: 64 MiB"), "{info}");
    let converted = g.path("converted.img");
    let converted_arg = converted.to_str().expect("utf-8");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &g.tcp("disk"),
            converted_arg,
        ],
    );
    assert!(
        std::fs::read(&converted).expect("converted") == std::fs::read(&source).expect("source")
    );

    // Trim and write-zeroes show up as holes in the map; reads see zeros there.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "discard 0 4M",
            "-c",
            "write -z -u 8M 1M",
            "-c",
            "write -z 12M 1M",
            &g.tcp("disk"),
        ],
    );
    let map = run("nbdinfo", &["--map", &g.tcp("disk")]);
    let first = map.lines().next().unwrap_or_default();
    assert!(
        first.split_whitespace().take(2).collect::<Vec<_>>() == ["0", "4194304"]
            && first.contains("hole"),
        "{map}"
    );
    assert!(
        map.lines()
            .any(|l| l.trim_start().starts_with("8388608") && l.contains("hole")),
        "{map}"
    );
    // Zeroes written without permission to unmap (NBD_CMD_FLAG_NO_HOLE) stay allocated.
    let covering = |at: u64| {
        map.lines()
            .find(|l| {
                let f: Vec<u64> = l
                    .split_whitespace()
                    .take(2)
                    .filter_map(|n| n.parse().ok())
                    .collect();
                f.len() == 2 && f[0] <= at && at < f[0] + f[1]
            })
            .unwrap_or_default()
    };
    // (Allocated: "data", or "zero" where the volume knows it reads as zeros.)
    assert!(
        !covering(12 << 20).contains("hole")
            && !covering(12 << 20).is_empty()
            && covering(8 << 20).contains("hole"),
        "{map}"
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0 0 4M",
            "-c",
            "read -P 0 8M 1M",
            "-c",
            "read -P 0 12M 1M",
            &g.tcp("disk"),
        ],
    );

    // qemu-io: patterns, unaligned I/O, FUA, flush.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1000 5000",
            "-c",
            "write -f -P 0xcd 20M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 1000 5000",
            "-c",
            "read -P 0xcd 20M 64k",
            &g.unix("disk"),
        ],
    );

    // fio verifying its own writes over several connections.
    run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", g.tcp("disk")),
            "--rw=randwrite",
            "--bs=4k,64k",
            "--size=32M",
            "--iodepth=16",
            "--numjobs=2",
            "--offset_increment=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--group_reporting",
        ],
    );

    // What moved shows in /metrics: at least the nbdcopy round trip of 64 MiB each way.
    let metrics = g.metrics();
    for (name, at_least) in [
        ("firn_nbd_bytes_total{direction=\"write\"}", 64 << 20),
        ("firn_nbd_bytes_total{direction=\"read\"}", 64 << 20),
        ("firn_nbd_requests_total{command=\"write\"}", 64),
        ("firn_nbd_requests_total{command=\"flush\"}", 1),
        ("firn_nbd_connections_opened_total", 5),
    ] {
        let value = metric(&metrics, name);
        assert!(value >= at_least as f64, "{name} = {value}\n{metrics}");
    }
    assert_eq!(
        metric(&metrics, "firn_nbd_errors_total{command=\"write\"}"),
        0.0
    );
    if mode == "cached" {
        let written = metric(&metrics, "firn_volume_written_bytes_total{volume=\"disk\"}");
        assert!(written >= (64 << 20) as f64, "{metrics}");
        let hit = metric(&metrics, "firn_volume_cache_hit_percent{volume=\"disk\"}");
        assert!((0.0..=100.0).contains(&hit), "{metrics}");
    }
}

/// A raw NBD client for what polite clients never send.
struct Raw {
    s: TcpStream,
}

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

impl Raw {
    fn connect(port: u16) -> Raw {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("hello");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).expect("flags");
        Raw { s }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).expect("option");
    }

    /// (reply type, data) of one option reply.
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).expect("option reply data");
        (kind, data)
    }

    /// NBD_OPT_GO for `name`, without structured replies; returns the export size.
    fn go(&mut self, name: &str) -> Result<u64, (u32, String)> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &data);
        let mut size = 0;
        loop {
            let (kind, data) = self.option_reply();
            match kind {
                1 => return Ok(size),
                3 if data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().expect("8"))
                }
                3 => {}
                k => return Err((k, String::from_utf8_lossy(&data).into_owned())),
            }
        }
    }

    fn request(&mut self, flags: u16, kind: u16, offset: u64, length: u32, payload: &[u8]) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).expect("request");
    }

    /// The error of a simple reply, and `data_len` bytes of data when it succeeded.
    fn reply(&mut self, data_len: usize) -> (u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("reply");
        assert_eq!(h[..4], 0x6744_6698u32.to_be_bytes());
        let error = u32::from_be_bytes(h[4..8].try_into().expect("4"));
        let mut data = vec![0u8; if error == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut data).expect("data");
        (error, data)
    }

    /// (type, payload) of one structured reply chunk.
    fn structured_reply(&mut self) -> (u16, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("structured reply");
        assert_eq!(h[..4], 0x668e_33efu32.to_be_bytes());
        let kind = u16::from_be_bytes(h[6..8].try_into().expect("2"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).expect("structured reply data");
        (kind, data)
    }

    /// True when the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn hostile_input_gets_the_spec_errors_and_changes_nothing_on_a_cached_volume() {
    hostile_input_gets_the_spec_errors_and_changes_nothing("cached");
}

#[test]
fn hostile_input_gets_the_spec_errors_and_changes_nothing_on_a_local_volume() {
    hostile_input_gets_the_spec_errors_and_changes_nothing("local");
}

fn hostile_input_gets_the_spec_errors_and_changes_nothing(mode: &str) {
    let g = Gateway::start();
    g.firn(&["volume", "create", "disk", "--size", "1M", "--mode", mode]);
    g.firn(&[
        "volume",
        "create",
        "frozen",
        "--size",
        "1M",
        "--read-only",
        "--mode",
        mode,
    ]);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();

    let mut c = Raw::connect(g.nbd_port);
    assert_eq!(
        c.go("nope").expect_err("unknown export").0,
        0x8000_0006,
        "NBD_REP_ERR_UNKNOWN"
    );
    assert_eq!(c.go("disk").expect("go"), 1 << 20);
    c.request(0, 1, 0, 8192, &pattern);
    assert_eq!(c.reply(0).0, 0);
    c.request(0, 0, 1 << 20, 1, &[]);
    assert_eq!(c.reply(1).0, 22, "read past the end: EINVAL");
    c.request(0, 0, u64::MAX - 10, 100, &[]);
    assert_eq!(c.reply(100).0, 22, "offset overflow: EINVAL");
    c.request(0, 1, (1 << 20) - 10, 20, &[0xee; 20]);
    assert_eq!(c.reply(0).0, 28, "write past the end: ENOSPC");
    c.request(0, 6, (1 << 20) - 4096, 8192, &[]);
    assert_eq!(c.reply(0).0, 28, "write zeroes past the end: ENOSPC");
    c.request(0, 99, 0, 4096, &[]);
    assert_eq!(c.reply(0).0, 22, "unknown command: EINVAL");
    c.request(1 << 9, 0, 0, 4096, &[]);
    assert_eq!(c.reply(4096).0, 22, "unknown flag: EINVAL");
    c.request(0, 7, 0, 4096, &[]);
    assert_eq!(
        c.reply(0).0,
        22,
        "block status without a meta context: EINVAL"
    );
    c.request(0x12, 6, 0, 4096, &[]);
    assert_eq!(
        c.reply(0).0,
        95,
        "fast zero that must stay allocated: ENOTSUP"
    );
    c.request(0, 0, 0, 8192, &[]);
    assert_eq!(
        c.reply(8192),
        (0, pattern.clone()),
        "nothing above changed the data"
    );
    // A write larger than the advertised maximum ends the connection.
    c.request(0, 1, 0, 64 << 20, &[]);
    assert!(c.closed());

    let mut c = Raw::connect(g.nbd_port);
    assert_eq!(c.go("frozen").expect("go"), 1 << 20);
    c.request(0, 1, 0, 4096, &[1; 4096]);
    assert_eq!(c.reply(0).0, 1, "write to a read-only export: EPERM");
    c.request(0, 4, 0, 4096, &[]);
    assert_eq!(c.reply(0).0, 1, "trim on a read-only export: EPERM");

    // Garbage where a request header belongs ends that connection only.
    let mut c = Raw::connect(g.nbd_port);
    c.go("disk").expect("go");
    c.s.write_all(&[0x42; 28]).expect("garbage");
    assert!(c.closed());

    // An absurd option length, and a truncated option, end the negotiation.
    let mut c = Raw::connect(g.nbd_port);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&b).expect("option");
    assert!(c.closed());
    let mut c = Raw::connect(g.nbd_port);
    c.s.write_all(&IHAVEOPT.to_be_bytes()[..5])
        .expect("partial");
    drop(c);

    // Unknown options are refused politely and negotiation goes on.
    let mut c = Raw::connect(g.nbd_port);
    c.option(4242, b"whatever");
    assert_eq!(c.option_reply().0, 0x8000_0001, "NBD_REP_ERR_UNSUP");
    c.option(7, &[0, 0, 0, 200, b'x']);
    assert_eq!(
        c.option_reply().0,
        0x8000_0003,
        "malformed GO: NBD_REP_ERR_INVALID"
    );
    assert_eq!(c.go("disk").expect("go"), 1 << 20);
    c.request(0, 0, 0, 8192, &[]);
    assert_eq!(
        c.reply(8192),
        (0, pattern),
        "the daemon kept serving and the data is intact"
    );

    // base:allocation selected for one export is not selected for a GO to another.
    for (meta_for, served) in [("frozen", false), ("disk", true)] {
        let mut c = Raw::connect(g.nbd_port);
        c.option(8, &[]);
        assert_eq!(c.option_reply().0, 1, "structured replies");
        let mut meta = (meta_for.len() as u32).to_be_bytes().to_vec();
        meta.extend_from_slice(meta_for.as_bytes());
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        c.option(10, &meta);
        assert_eq!(c.option_reply().0, 4, "NBD_REP_META_CONTEXT");
        assert_eq!(c.option_reply().0, 1, "NBD_REP_ACK");
        c.go("disk").expect("go");
        c.request(0, 7, 0, 4096, &[]);
        let (kind, payload) = c.structured_reply();
        if served {
            assert_eq!(kind, 5, "NBD_REPLY_TYPE_BLOCK_STATUS");
        } else {
            assert_eq!(kind, 0x8001, "NBD_REPLY_TYPE_ERROR: {kind:#x}");
            assert_eq!(payload[..4], 22u32.to_be_bytes(), "EINVAL");
        }
    }

    let info = run("nbdinfo", &[&g.tcp("disk")]);
    assert!(info.contains("export-size: 1048576"), "{info}");
    let metrics = g.metrics();
    assert!(metric(&metrics, "firn_nbd_errors_total{command=\"read\"}") >= 3.0);
    assert!(metric(&metrics, "firn_nbd_errors_total{command=\"write\"}") >= 2.0);
}

#[test]
fn requests_during_a_stop_get_eshutdown_and_the_stop_waits_for_clients_on_a_cached_volume() {
    requests_during_a_stop_get_eshutdown_and_the_stop_waits_for_clients("cached");
}

#[test]
fn requests_during_a_stop_get_eshutdown_and_the_stop_waits_for_clients_on_a_local_volume() {
    requests_during_a_stop_get_eshutdown_and_the_stop_waits_for_clients("local");
}

fn requests_during_a_stop_get_eshutdown_and_the_stop_waits_for_clients(mode: &str) {
    let mut g = Gateway::start();
    g.firn(&["volume", "create", "disk", "--size", "1M", "--mode", mode]);
    let mut c = Raw::connect(g.nbd_port);
    c.go("disk").expect("go");
    c.request(0, 1, 0, 4096, &[0x11; 4096]);
    assert_eq!(c.reply(0).0, 0, "a write before the stop");

    let mut daemon = g.daemon.take().expect("running");
    let pid = nix::unistd::Pid::from_raw(daemon.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    std::thread::sleep(Duration::from_millis(300));
    // The daemon is stopping but waits for this client, which gets ESHUTDOWN (108) for
    // new requests, and nothing is written.
    assert!(
        daemon.child.try_wait().expect("wait").is_none(),
        "exited under a client"
    );
    c.request(0, 1, 4096, 4096, &[0x22; 4096]);
    assert_eq!(c.reply(0).0, 108, "a write during the stop");
    c.request(0, 0, 0, 4096, &[]);
    assert_eq!(c.reply(4096).0, 108, "a read during the stop");
    c.request(0, 2, 0, 0, &[]); // NBD_CMD_DISC
    let status = daemon.child.wait().expect("wait");
    assert!(status.success(), "the stop failed: {status:?}");

    g.restart();
    let mut c = Raw::connect(g.nbd_port);
    c.go("disk").expect("go");
    c.request(0, 0, 0, 8192, &[]);
    let (error, data) = c.reply(8192);
    assert_eq!(error, 0);
    assert!(
        data[..4096].iter().all(|&b| b == 0x11),
        "the write before the stop"
    );
    assert!(
        data[4096..].iter().all(|&b| b == 0),
        "a write refused with ESHUTDOWN landed"
    );
}

#[test]
fn flushed_writes_survive_kill_9_on_a_cached_volume() {
    flushed_writes_survive_kill_9("cached");
}

#[test]
fn flushed_writes_survive_kill_9_on_a_local_volume() {
    flushed_writes_survive_kill_9("local");
}

fn flushed_writes_survive_kill_9(mode: &str) {
    let mut g = Gateway::start();
    g.firn(&["volume", "create", "disk", "--size", "16M", "--mode", mode]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "flush",
            "-c",
            "write -f -P 0xa5 4M 1M",
            &g.tcp("disk"),
        ],
    );
    g.kill9();
    // A file no volume (and no create or delete intent) names: the start moves it to
    // quarantine, never deletes it.
    let orphan = g
        .path("data/volumes")
        .join(format!("{}.img", "0f".repeat(16)));
    std::fs::write(&orphan, [1u8; 4096]).expect("orphan");
    g.restart();
    assert!(
        !orphan.exists(),
        "the start left an unnamed volume file in place"
    );
    let quarantined = g
        .path("data/volumes/quarantine")
        .join(format!("{}.img", "0f".repeat(16)));
    assert_eq!(
        std::fs::read(&quarantined).expect("quarantined"),
        [1u8; 4096]
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 4M",
            "-c",
            "read -P 0xa5 4M 1M",
            "-c",
            "read -P 0 5M 11M",
            &g.tcp("disk"),
        ],
    );
    // Nothing under the data directory (volume files, a cached volume's log) holds the
    // plaintext.
    let mut dirs = vec![g.path("data")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if !path.is_file() {
                continue; // the NBD socket
            }
            let bytes = std::fs::read(&path).expect("read");
            assert!(
                !bytes.windows(64).any(|w| w.iter().all(|&b| b == 0x5a)),
                "plaintext in {}",
                path.display()
            );
        }
    }
}

#[test]
fn a_full_disk_gives_enospc_and_the_rest_keeps_working() {
    // The data directory on a 32 MiB ext4 file system, holding a 64 MiB sparse local volume.
    // (A cached volume never answers ENOSPC: its writes wait for the upload instead.)
    let dir = tempfile::tempdir().expect("tempdir");
    let (_mnt, _teardown) = small_ext4(dir.path());
    let (config, http_port, nbd_port) = write_nbd_config(dir.path(), "mnt/data", "");
    // The file system's own ENOSPC is the point here, not [local] min_free (tested in
    // tests/safekeeping.rs), whose default is larger than this disk.
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("[local]\n", "[local]\nmin_free = \"0\"\n"),
    )
    .expect("config");
    let daemon = Daemon::start(&config, http_port, &[]);
    firn_at(
        &config,
        &[
            "volume", "create", "big", "--size", "64M", "--mode", "local",
        ],
    );

    let mut c = Raw::connect(nbd_port);
    c.go("big").expect("go");
    c.request(1, 1, 0, 4096, &[0x5e; 4096]); // FUA write
    assert_eq!(c.reply(0).0, 0);
    // Fill with 1 MiB writes until the file system is full: ENOSPC (28), not a dropped
    // connection or a crash.
    let chunk = vec![0xc3u8; 1 << 20];
    let mut full_at = None;
    for mib in 1..64u64 {
        c.request(0, 1, mib << 20, 1 << 20, &chunk);
        match c.reply(0).0 {
            0 => {}
            28 => {
                full_at = Some(mib);
                break;
            }
            other => panic!("write at {mib} MiB: error {other}, expected ENOSPC"),
        }
    }
    let full_at = full_at.expect("a 64 MiB volume filled a 32 MiB disk without ENOSPC");
    assert!(full_at > 8, "full after only {full_at} MiB");
    // Data written before is intact, on this connection and on a new one.
    c.request(0, 0, 0, 4096, &[]);
    assert_eq!(c.reply(4096), (0, vec![0x5e; 4096]));
    c.request(0, 0, 1 << 20, 4096, &[]);
    assert_eq!(c.reply(4096), (0, vec![0xc3; 4096]));
    let info = run("nbdinfo", &[&format!("nbd://127.0.0.1:{nbd_port}/big")]);
    assert!(info.contains("export-size: 67108864"), "{info}");
    // Trimming gives the space back, and writes work again.
    c.request(0, 4, 1 << 20, (full_at as u32 - 1) << 20, &[]); // NBD_CMD_TRIM
    assert_eq!(c.reply(0).0, 0);
    c.request(1, 1, full_at << 20, 1 << 20, &chunk);
    assert_eq!(c.reply(0).0, 0, "a write after the trim freed space");
    c.request(0, 0, full_at << 20, 4096, &[]);
    assert_eq!(c.reply(4096), (0, vec![0xc3; 4096]));
    drop(c);
    assert!(daemon.stop().success());
}

/// A gateway's config with its data directory on a 32 MiB ext4 file system under `dir` (no
/// `min_free`), the bucket a directory beside it, and cached volumes of 1 MiB segments, an
/// empty cache, `log_max` and `checkpoint_segments`: the mount, its teardown, the config and
/// the HTTP and NBD ports.
fn cached_on_small_ext4(
    dir: &Path,
    log_max: &str,
    checkpoint_segments: u32,
) -> (PathBuf, common::Teardown, PathBuf, u16, u16) {
    cached_on_ext4(dir, 32, "0", log_max, checkpoint_segments)
}

/// A gateway's config for cached volumes with its data directory on an ext4 file system of
/// `mib` MiB, `min_free` kept free: (mount point, its teardown, config, HTTP and NBD ports).
fn cached_on_ext4(
    dir: &Path,
    mib: u64,
    min_free: &str,
    log_max: &str,
    checkpoint_segments: u32,
) -> (PathBuf, common::Teardown, PathBuf, u16, u16) {
    let (mnt, teardown) = common::ext4_of(dir, mib);
    let bucket = dir.join("bucket");
    let (config, http_port, nbd_port) = write_nbd_config(dir, "mnt/data", "");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("[local]\n", &format!("[local]\nmin_free = \"{min_free}\"\n"))
            + &format!(
                "[remote]\nkind = \"local\"\npath = \"{}\"\n[volumes]\nsegment_size = \"1MiB\"\nlog_max = \"{log_max}\"\ncache_max = \"0\"\ncheckpoint_segments = {checkpoint_segments}\n",
                bucket.display()
            ),
    )
    .expect("config");
    (mnt, teardown, config, http_port, nbd_port)
}

/// Free bytes of the file system under `path`.
fn free_bytes(path: &Path) -> u64 {
    let out = run(
        "df",
        &["--output=avail", "-B1", path.to_str().expect("utf-8")],
    );
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df printed the free bytes")
}

#[test]
fn logs_never_take_the_room_min_free_keeps_whatever_the_limits_or_how_many_at_once() {
    // The data directory on a 64 MiB ext4 file system, 16 MiB of it kept free.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mnt, _teardown, config, http_port, _) =
        cached_on_ext4(dir.path(), 64, "16MiB", "4MiB", 64);
    let _daemon = Daemon::start(&config, http_port, &[]);
    let cfg = config.to_str().expect("utf-8");
    // Room is checked against what stays free, with no wrap-around for absurd limits.
    create_volume(&config, "v", "8M");
    let huge = u64::MAX.to_string();
    for args in [
        vec!["volume", "limits", "v", "--log-max", &huge],
        vec!["volume", "create", "w", "--size", "8M", "--log-max", &huge],
    ] {
        let mut full = args.clone();
        full.extend(["--config", cfg]);
        let (ok, _, err) = firn(&full);
        assert!(
            !ok && err.contains("not enough local space"),
            "{args:?}: {err}"
        );
    }
    let floor = 14 << 20;
    assert!(free_bytes(&mnt) >= floor, "{} bytes free", free_bytes(&mnt));
    // Creates at once, more than there is room for: each takes its room or is refused for
    // want of it, and together they leave what min_free keeps.
    let outcomes: Vec<(bool, String)> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..10)
            .map(|i| {
                s.spawn(move || {
                    let name = format!("p{i}");
                    let (ok, _, err) = firn(&[
                        "volume",
                        "create",
                        &name,
                        "--size",
                        "8M",
                        "--log-max",
                        "6MiB",
                        "--config",
                        cfg,
                    ]);
                    (ok, err)
                })
            })
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().expect("thread"))
            .collect()
    });
    let made = outcomes.iter().filter(|(ok, _)| *ok).count();
    assert!((1..10).contains(&made), "{made} of 10 made");
    for (ok, err) in &outcomes {
        assert!(*ok || err.contains("not enough local space"), "{err}");
    }
    assert!(free_bytes(&mnt) >= floor, "{} bytes free", free_bytes(&mnt));
    // Larger logs at once, the same.
    let names: Vec<String> = (0..10)
        .map(|i| format!("p{i}"))
        .filter(|n| firn(&["volume", "show", n, "--config", cfg]).0)
        .collect();
    std::thread::scope(|s| {
        for name in &names {
            s.spawn(move || {
                let (ok, _, err) = firn(&[
                    "volume",
                    "limits",
                    name,
                    "--log-max",
                    "12MiB",
                    "--config",
                    cfg,
                ]);
                assert!(ok || err.contains("not enough local space"), "{err}");
            });
        }
    });
    assert!(free_bytes(&mnt) >= floor, "{} bytes free", free_bytes(&mnt));
}

#[test]
fn a_full_disk_makes_cached_writes_wait_for_uploads_not_fail() {
    // The data directory on a 32 MiB ext4 file system, the bucket elsewhere, and a cached
    // volume twice that size: its log's room is held at attach, so filling the volume never
    // gives a client ENOSPC; writes wait for uploads to free room instead.
    let dir = tempfile::tempdir().expect("tempdir");
    let (_mnt, _teardown, config, http_port, nbd_port) =
        cached_on_small_ext4(dir.path(), "18MiB", 1);
    let daemon = Daemon::start(&config, http_port, &[]);
    create_volume(&config, "big", "64M");
    let uri = format!("nbd://127.0.0.1:{nbd_port}/big");
    run(
        "fio",
        &[
            "--name=fill",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=write",
            "--bs=1m",
            "--size=64M",
            "--iodepth=4",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    let shown = firn_at(&config, &["volume", "show", "big"]);
    assert!(shown.contains("\"fenced\": null"), "{shown}");
    drop(daemon);
}

/// Another program fills the disk while the log is full (uploads paused, as in an outage):
/// once uploads go on, their records and the checkpoint that lets the uploaded segments go
/// are written in the headroom the volume gives back, the cache frees the space, and the
/// writer goes on (it waited for good before).
#[test]
fn a_disk_filled_by_another_program_during_an_outage_frees_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mnt, _teardown, config, http_port, nbd_port) =
        cached_on_small_ext4(dir.path(), "12MiB", 64);
    let daemon = Daemon::start(&config, http_port, &[]);
    create_volume(&config, "v", "64M");
    firn_at(&config, &["bandwidth", "--upload", "paused"]);
    let uri = format!("nbd://127.0.0.1:{nbd_port}/v");
    let job = |name: &str, offset: &str, size: &str| -> Vec<String> {
        [
            &format!("--name={name}"),
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=write",
            "--bs=256k",
            &format!("--offset={offset}"),
            &format!("--size={size}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ]
        .map(String::from)
        .to_vec()
    };
    // More than the log holds: the writer fills it and waits.
    let args = job("fill", "0", "24M");
    let mut writer = Command::new("fio")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio");
    let show = || -> serde_json::Value {
        serde_json::from_str(&firn_at(&config, &["volume", "show", "v"])).expect("json")
    };
    let started = Instant::now();
    let waiting = |shown: &serde_json::Value| {
        let cache = &shown["cache"];
        cache["queued_writes"].as_u64() > Some(0) && cache["dirty_bytes"].as_u64() > Some(6 << 20)
    };
    while !waiting(&show()) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the log did not fill: {:#}",
            show()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Another program takes every free block.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "status=none"])
        .arg(format!("of={}", mnt.join("hog").display()))
        .status();
    firn_at(&config, &["bandwidth", "--upload", "unlimited"]);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = writer.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = writer.kill();
            panic!("the writer still waits for room: {:#}", show());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "fio: {status}");
    let more = job("more", "32M", "8M");
    run("fio", &more.iter().map(String::as_str).collect::<Vec<_>>());
    let shown = show();
    assert!(shown["cache"]["fenced"].is_null(), "{shown:#}");
    drop(daemon);
}

#[test]
fn ext4_through_qemu_storage_daemon_fuse_and_a_loop_device() {
    let g = Gateway::start();
    g.firn(&[
        "volume", "create", "fs", "--size", "256M", "--mode", "local",
    ]);
    common::ext4_on(&g.path("data/nbd.sock"), "fs", 256 << 20, g.dir.path());
}

/// mkfs.ext4 and blkdiscard of a 2 TiB cached volume: quick, and next to nothing uploaded
/// (trims are records; empty block groups are zeros, which upload nothing).
#[test]
fn ext4_and_blkdiscard_on_a_2_tib_cached_volume_upload_next_to_nothing() {
    let g = Gateway::start();
    g.firn(&["volume", "create", "fs", "--size", "2T"]);
    let started = std::time::Instant::now();
    let loop_dev = common::ext4_on(&g.path("data/nbd.sock"), "fs", 2 << 40, g.dir.path());
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(120),
        "mkfs, mount and checks took {took:?}"
    );
    let show = |g: &Gateway| -> serde_json::Value {
        serde_json::from_str(&g.firn(&["volume", "show", "fs"])).expect("json")
    };
    let uploaded_bytes = |g: &Gateway| loop {
        let shown = show(g);
        let cache = &shown["cache"];
        if cache["pending_flushes"].as_u64() == Some(0) && cache["dirty_bytes"].as_u64() <= Some(64)
        {
            break cache["bytes_uploaded"].as_u64().expect("bytes_uploaded");
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "no drain: {shown:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let after_mkfs = uploaded_bytes(&g);
    assert!(
        after_mkfs < 256 << 20,
        "{after_mkfs} bytes uploaded for mkfs of 2 TiB"
    );
    let discard = std::time::Instant::now();
    run("blkdiscard", &["-f", &loop_dev.dev]);
    run("sync", &[]);
    let took = discard.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "blkdiscard of 2 TiB took {took:?}"
    );
    let after_discard = uploaded_bytes(&g);
    // The kernel sends the discard through the loop device and FUSE in pieces of 32 MiB:
    // 65,536 trims of 64 bytes each in the log, 4 MiB for 2 TiB.
    eprintln!(
        "mkfs.ext4 of 2 TiB uploaded {after_mkfs} bytes, blkdiscard {} more",
        after_discard - after_mkfs
    );
    assert!(
        after_discard - after_mkfs < 8 << 20,
        "blkdiscard of 2 TiB uploaded {} bytes",
        after_discard - after_mkfs
    );
    let zeros = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0 0 1M", &g.tcp("fs")],
    );
    assert!(!zeros.contains("failed"), "{zeros}");
    drop(loop_dev);
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl command.
fn make_certificates(dir: &Path) {
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
          -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN=firn-test-ca 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
          -keyout server-key.pem -out server.csr -subj /CN=127.0.0.1 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > ext.cnf
        openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
          -out server-cert.pem -days 2 -extfile ext.cnf 2>/dev/null",
    );
}

/// A client certificate for `name` signed by the CA in `ca_dir`, laid out in `dir` as libnbd's
/// `tls-certificates=` and qemu's `tls-creds-x509` read it (ca-cert.pem, client-cert.pem,
/// client-key.pem).
fn make_client_certificate(dir: &Path, ca_dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::copy(ca_dir.join("ca-cert.pem"), dir.join("ca-cert.pem")).expect("copy CA");
    let out = Command::new("sh")
        .arg("-ec")
        .arg(format!(
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
              -keyout client-key.pem -out client.csr -subj /CN={name} 2>/dev/null
            printf 'extendedKeyUsage=clientAuth\\n' > client-ext.cnf
            openssl x509 -req -in client.csr -CA {ca}/ca-cert.pem -CAkey {ca}/ca-key.pem \
              -CAcreateserial -out client-cert.pem -days 2 -extfile client-ext.cnf 2>/dev/null",
            ca = ca_dir.display()
        ))
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A gateway whose `[nbd]` section ends with `nbd_extra`, for the TLS tests; `prepare` runs
/// in its directory before the start. It has one 8 MiB volume, `disk`.
struct TlsGateway {
    dir: tempfile::TempDir,
    config: PathBuf,
    daemon: Daemon,
    nbd_port: u16,
}

impl TlsGateway {
    fn start(nbd_extra: &str, prepare: impl FnOnce(&Path)) -> TlsGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        prepare(dir.path());
        let (config, http_port, nbd_port) = write_nbd_config(dir.path(), "data", nbd_extra);
        let daemon = Daemon::start(&config, http_port, &[]);
        create_volume(&config, "disk", "8M");
        TlsGateway {
            dir,
            config,
            daemon,
            nbd_port,
        }
    }

    fn firn(&self, args: &[&str]) -> String {
        firn_at(&self.config, args)
    }

    /// qemu-io on `disk` with the TLS credentials object `creds` (id tls0).
    fn qemu_io(&self, creds: &str, commands: &[&str]) {
        let image_opts = format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=disk,tls-creds=tls0",
            self.nbd_port
        );
        let mut args = vec!["--object", creds, "--image-opts", &image_opts];
        for command in commands {
            args.extend(["-c", command]);
        }
        run("qemu-io", &args);
    }

    /// Reads the whole of `disk` with nbdcopy.
    fn read_back(&self, uri: &str) -> Vec<u8> {
        let back = self.dir.path().join("back.img");
        run("nbdcopy", &[uri, back.to_str().expect("utf-8")]);
        std::fs::read(&back).expect("back")
    }

    /// Asserts that nbdinfo cannot attach with any of these URIs.
    fn refuses(&self, uris: &[String]) {
        for uri in uris {
            let out = Command::new("nbdinfo").arg(uri).output().expect("nbdinfo");
            assert!(!out.status.success(), "{uri} was served");
        }
    }

    fn plain_uris(&self) -> Vec<String> {
        vec![
            format!("nbd://127.0.0.1:{}/disk", self.nbd_port),
            format!(
                "nbd+unix:///disk?socket={}",
                self.dir.path().join("data/nbd.sock").display()
            ),
        ]
    }
}

#[test]
fn x509_tls_is_required_and_works_with_libnbd_and_qemu() {
    let g = TlsGateway::start(
        "tls = \"x509\"\ntls_cert = \"pki/server-cert.pem\"\ntls_key = \"pki/server-key.pem\"\n",
        |dir| {
            std::fs::create_dir(dir.join("pki")).expect("mkdir");
            make_certificates(&dir.join("pki"));
        },
    );
    assert!(g.daemon.stdout.join("\n").contains("x509 required"));
    let pki = g.dir.path().join("pki");
    let tls_uri = format!(
        "nbds://127.0.0.1:{}/disk?tls-certificates={}",
        g.nbd_port,
        pki.display()
    );
    let info = run("nbdinfo", &[&tls_uri]);
    assert!(info.contains("export-size: 8388608"), "{info}");
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.display()
    );
    g.qemu_io(&creds, &["write -P 0x77 0 1M", "read -P 0x77 0 1M"]);
    let data = g.read_back(&tls_uri);
    assert!(data[..1 << 20].iter().all(|&b| b == 0x77) && data[1 << 20..].iter().all(|&b| b == 0));

    // Plain connections are refused; so is a client that does not trust the certificate.
    let other = g.dir.path().join("other-pki");
    std::fs::create_dir(&other).expect("mkdir");
    make_certificates(&other);
    let mut refused = g.plain_uris();
    refused.push(format!(
        "nbds://127.0.0.1:{}/disk?tls-certificates={}",
        g.nbd_port,
        other.display()
    ));
    g.refuses(&refused);
    assert!(g.daemon.stop().success());
}

#[test]
fn psk_tls_is_required_and_works_with_libnbd_and_qemu() {
    use std::os::unix::fs::PermissionsExt;
    let g = TlsGateway::start("tls = \"psk\"\n", |_| {});
    assert!(g.daemon.stdout.join("\n").contains("PSK required"));
    // The first start wrote a private key file in psktool's format.
    let keys = g.dir.path().join("data/nbd-psk/keys.psk");
    let mode = std::fs::metadata(&keys)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the PSK file must be private");
    let text = std::fs::read_to_string(&keys).expect("key file");
    assert!(
        text.starts_with("firn:") && text.trim_end().len() == 5 + 64,
        "{text:?}"
    );

    let port = g.nbd_port;
    let tls_uri = format!(
        "nbds://firn@127.0.0.1:{port}/disk?tls-psk-file={}",
        keys.display()
    );
    let info = run("nbdinfo", &[&tls_uri]);
    assert!(
        info.contains("with TLS") && info.contains("export-size: 8388608"),
        "{info}"
    );
    let unix_uri = format!(
        "nbds+unix://firn@/disk?socket={}&tls-psk-file={}",
        g.dir.path().join("data/nbd.sock").display(),
        keys.display()
    );
    let info = run("nbdinfo", &[&unix_uri]);
    assert!(info.contains("with TLS"), "{info}");

    // qemu reads the same file as `keys.psk` in its credentials directory.
    let creds = format!(
        "tls-creds-psk,id=tls0,dir={},username=firn,endpoint=client",
        g.dir.path().join("data/nbd-psk").display()
    );
    g.qemu_io(&creds, &["write -P 0x3c 4096 1M", "read -P 0x3c 4096 1M"]);
    let data = g.read_back(&tls_uri);
    assert!(data[..4096].iter().all(|&b| b == 0));
    assert!(data[4096..4096 + (1 << 20)].iter().all(|&b| b == 0x3c));
    assert!(data[4096 + (1 << 20)..].iter().all(|&b| b == 0));

    // Refused: plain TCP, plain Unix socket, a wrong key, an unknown identity.
    let wrong = g.dir.path().join("wrong.psk");
    std::fs::write(&wrong, format!("firn:{}\n", "ab".repeat(32))).expect("write");
    let stranger = g.dir.path().join("stranger.psk");
    std::fs::write(&stranger, text.replacen("firn:", "mallory:", 1)).expect("write");
    let mut refused = g.plain_uris();
    refused.push(format!(
        "nbds://firn@127.0.0.1:{port}/disk?tls-psk-file={}",
        wrong.display()
    ));
    refused.push(format!(
        "nbds://mallory@127.0.0.1:{port}/disk?tls-psk-file={}",
        stranger.display()
    ));
    g.refuses(&refused);
    // Those refusals ended only their own connections.
    let info = run("nbdinfo", &[&tls_uri]);
    assert!(info.contains("export-size: 8388608"), "{info}");
    assert!(g.daemon.stop().success());
}

#[test]
fn tls_turns_on_when_an_allowlist_reaches_beyond_this_machine() {
    // Loopback plus a site network: PSK is required of every client, loopback included.
    let remote = "allow = [\"127.0.0.0/8\", \"10.20.0.0/16\"]\n";
    let g = TlsGateway::start(remote, |_| {});
    assert!(g.daemon.stdout.join("\n").contains("PSK required"));
    g.refuses(&g.plain_uris());
    let keys = g.dir.path().join("data/nbd-psk/keys.psk");
    let info = run(
        "nbdinfo",
        &[&format!(
            "nbds://firn@127.0.0.1:{}/disk?tls-psk-file={}",
            g.nbd_port,
            keys.display()
        )],
    );
    assert!(info.contains("export-size: 8388608"), "{info}");
    assert!(g.daemon.stop().success());

    // Turning TLS off for such a list must be said explicitly.
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, _, _) = write_nbd_config(dir.path(), "data", &format!("tls = \"off\"\n{remote}"));
    let out = Command::new(FIRN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with plain text for 10.20.0.0/16"
    );
    assert!(err.contains("allow_plaintext"), "{err}");
    let (config, http_port, nbd_port) = write_nbd_config(
        dir.path(),
        "data",
        &format!("tls = \"off\"\nallow_plaintext = true\n{remote}"),
    );
    let daemon = Daemon::start(&config, http_port, &[]);
    create_volume(&config, "disk", "1M");
    run("nbdinfo", &[&format!("nbd://127.0.0.1:{nbd_port}/disk")]);
    assert!(daemon.stop().success());
}

#[test]
fn x509_client_certificates_name_the_clients_a_volume_admits() {
    let g = TlsGateway::start(
        "tls = \"x509\"\ntls_cert = \"pki/server-cert.pem\"\ntls_key = \"pki/server-key.pem\"\ntls_client_ca = \"pki/ca-cert.pem\"\n",
        |dir| {
            std::fs::create_dir(dir.join("pki")).expect("mkdir");
            make_certificates(&dir.join("pki"));
        },
    );
    let root = g.dir.path();
    let pki = root.join("pki");
    make_client_certificate(&root.join("alice"), &pki, "alice");
    make_client_certificate(&root.join("bob"), &pki, "bob");
    // Trusts the server but has no certificate of its own.
    std::fs::create_dir(root.join("anonymous")).expect("mkdir");
    std::fs::copy(pki.join("ca-cert.pem"), root.join("anonymous/ca-cert.pem")).expect("copy");
    // A certificate for "alice" from an authority the server does not trust.
    std::fs::create_dir(root.join("rogue-ca")).expect("mkdir");
    make_certificates(&root.join("rogue-ca"));
    make_client_certificate(&root.join("forged"), &root.join("rogue-ca"), "alice");
    std::fs::copy(pki.join("ca-cert.pem"), root.join("forged/ca-cert.pem")).expect("copy");

    g.firn(&[
        "volume", "create", "private", "--size", "1M", "--client", "alice",
    ]);
    assert!(g.firn(&["volume", "show", "private"]).contains("alice"));
    let uri = |who: &str, export: &str| {
        format!(
            "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
            g.nbd_port,
            root.join(who).display()
        )
    };
    let info = run("nbdinfo", &[&uri("alice", "private")]);
    assert!(info.contains("export-size: 1048576"), "{info}");
    run("nbdinfo", &[&uri("bob", "disk")]);
    let out = Command::new("nbdinfo")
        .arg(uri("bob", "private"))
        .output()
        .expect("nbdinfo");
    assert!(!out.status.success(), "bob may not open private");
    g.refuses(&[
        uri("anonymous", "disk"),
        uri("forged", "private"),
        uri("forged", "disk"),
    ]);

    // qemu presents the client certificate in its credentials directory.
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        root.join("alice").display()
    );
    let image_opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=private,tls-creds=tls0",
        g.nbd_port
    );
    run(
        "qemu-io",
        &[
            "--object",
            &creds,
            "--image-opts",
            &image_opts,
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
        ],
    );
    // The refusals ended only their own connections.
    run("nbdinfo", &[&uri("alice", "private")]);
    assert!(g.daemon.stop().success());
}

#[test]
fn psk_identities_name_the_clients_a_volume_admits() {
    let g = TlsGateway::start("tls = \"psk\"\ntls_psk_file = \"psk/keys.psk\"\n", |dir| {
        std::fs::create_dir(dir.join("psk")).expect("mkdir");
        std::fs::write(
            dir.join("psk/keys.psk"),
            format!("firn:{}\nalice:{}\n", "11".repeat(32), "22".repeat(32)),
        )
        .expect("write keys");
    });
    g.firn(&[
        "volume", "create", "private", "--size", "1M", "--client", "alice",
    ]);
    let keys = g.dir.path().join("psk/keys.psk");
    let uri = |who: &str, export: &str| {
        format!(
            "nbds://{who}@127.0.0.1:{}/{export}?tls-psk-file={}",
            g.nbd_port,
            keys.display()
        )
    };
    run("nbdinfo", &[&uri("alice", "private")]);
    run("nbdinfo", &[&uri("firn", "disk")]);
    // Each identity is shown only what it may open.
    let list = run("nbdinfo", &["--list", &uri("alice", "")]);
    assert!(
        list.contains("export=\"private\"") && list.contains("export=\"disk\""),
        "{list}"
    );
    let list = run("nbdinfo", &["--list", &uri("firn", "")]);
    assert!(
        !list.contains("private") && list.contains("export=\"disk\""),
        "{list}"
    );
    let out = Command::new("nbdinfo")
        .arg(uri("firn", "private"))
        .output()
        .expect("nbdinfo");
    assert!(!out.status.success(), "firn may not open private");
    // A bad identity is refused when the volume is made, naming the field.
    let (ok, _, err) = firn(&[
        "volume",
        "create",
        "bad",
        "--size",
        "1M",
        "--client",
        "a:b",
        "--config",
        g.config.to_str().expect("utf-8"),
    ]);
    assert!(!ok && err.contains("volume clients"), "{err}");
    run("nbdinfo", &[&uri("alice", "private")]);
    // `firn volume show` names the TLS client attached now.
    let alice = hold_open(&uri("alice", "private"));
    let clients = clients_when(&g.config, "private", 1);
    assert_eq!(clients[0]["tls"], true, "{clients:?}");
    assert_eq!(clients[0]["identity"], "alice", "{clients:?}");
    let_go(alice);
    clients_when(&g.config, "private", 0);
    assert!(g.daemon.stop().success());
}

#[test]
fn trim_and_zeroing_a_2_tib_volume_is_metadata_not_io_on_a_cached_volume() {
    trim_and_zeroing_a_2_tib_volume_is_metadata_not_io("cached");
}

#[test]
fn trim_and_zeroing_a_2_tib_volume_is_metadata_not_io_on_a_local_volume() {
    trim_and_zeroing_a_2_tib_volume_is_metadata_not_io("local");
}

fn trim_and_zeroing_a_2_tib_volume_is_metadata_not_io(mode: &str) {
    let g = Gateway::start();
    g.firn(&["volume", "create", "huge", "--size", "2T", "--mode", mode]);
    let mut c = Raw::connect(g.nbd_port);
    let size = c.go("huge").expect("go");
    assert_eq!(size, 2 << 40);
    let marks = [0u64, 1 << 30, size / 2 + 4096, size - 4096];
    for &at in &marks {
        c.request(0, 1, at, 4096, &[0xee; 4096]);
        assert_eq!(c.reply(0).0, 0);
    }
    // The largest request length is just under 4 GiB: 512 requests cover 2 TiB.
    let step = 1u64 << 32;
    for (kind, name) in [(4u16, "trim"), (6u16, "write zeroes")] {
        let started = std::time::Instant::now();
        let mut offset = 0;
        while offset < size {
            let len = (size - offset).min(step - 4096);
            c.request(0, kind, offset, len as u32, &[]);
            assert_eq!(c.reply(0).0, 0, "{name} at {offset}");
            offset += len;
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "{name} of 2 TiB took {took:?}"
        );
    }
    for &at in &marks {
        c.request(0, 0, at, 4096, &[]);
        assert_eq!(
            c.reply(4096),
            (0, vec![0; 4096]),
            "offset {at} reads as zeros"
        );
    }
}

#[test]
fn per_volume_allowlists_replace_the_server_wide_one() {
    let g = Gateway::start();
    g.firn(&["volume", "create", "open", "--size", "1M"]);
    g.firn(&[
        "volume",
        "create",
        "fenced",
        "--size",
        "1M",
        "--allow",
        "127.0.0.2/32",
    ]);
    let (ok, _, err) = firn(&[
        "volume",
        "create",
        "bad",
        "--size",
        "1M",
        "--allow",
        "10.0.0.0/99",
        "--config",
        g.config.to_str().expect("utf-8"),
    ]);
    assert!(!ok && err.contains("10.0.0.0/99"), "{err}");
    assert!(
        g.firn(&["volume", "show", "fenced"])
            .contains("127.0.0.2/32")
    );

    let mut c = Raw::connect(g.nbd_port);
    let (code, message) = c
        .go("fenced")
        .expect_err("127.0.0.1 is not in the volume's list");
    assert_eq!(code, 0x8000_0002, "NBD_REP_ERR_POLICY");
    assert!(
        message.contains("not in the volume's allow list"),
        "{message}"
    );
    assert_eq!(
        c.go("open").expect("the server-wide list allows loopback"),
        1 << 20
    );
    // The Unix socket is guarded by its file mode, not by address lists.
    run("nbdinfo", &[&g.unix("fenced")]);

    // Without TLS a volume's own list stays on this machine too.
    let (ok, _, err) = firn(&[
        "volume",
        "create",
        "far",
        "--size",
        "1M",
        "--allow",
        "10.9.9.0/24",
        "--config",
        g.config.to_str().expect("utf-8"),
    ]);
    assert!(!ok && err.contains("NBD TLS is off"), "{err}");

    // A volume that names its TLS clients admits nobody over a plain connection.
    g.firn(&[
        "volume", "create", "named", "--size", "1M", "--client", "alice",
    ]);
    let mut c = Raw::connect(g.nbd_port);
    let (code, message) = c.go("named").expect_err("no TLS, no identity");
    assert_eq!(code, 0x8000_0002, "NBD_REP_ERR_POLICY");
    assert!(message.contains("only named TLS clients"), "{message}");
}

#[test]
fn an_attached_volume_cannot_be_deleted() {
    let g = Gateway::start();
    g.firn(&["volume", "create", "busy", "--size", "1M"]);
    let mut c = Raw::connect(g.nbd_port);
    c.go("busy").expect("go");
    let config = g.config.to_str().expect("utf-8");
    let (ok, _, err) = firn(&["volume", "delete", "busy", "--config", config]);
    assert!(!ok && err.contains("attached"), "{err}");
    c.request(0, 2, 0, 0, &[]); // NBD_CMD_DISC
    drop(c);
    let started = std::time::Instant::now();
    loop {
        let (ok, _, err) = firn(&["volume", "delete", "busy", "--config", config]);
        if ok {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still attached: {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!g.firn(&["volume", "list"]).contains("busy"));
}

/// The CLI sends each name as one segment of the API's path: a name that looks like a path
/// or a query names nothing else, and nothing changes.
#[test]
fn a_name_never_reaches_another_object_through_the_cli() {
    let g = Gateway::start();
    g.firn(&[
        "volume", "create", "victim", "--size", "1M", "--mode", "local",
    ]);
    let config = g.config.to_str().expect("utf-8");
    for args in [
        &["share", "delete", "../volumes/victim"][..],
        &["volume", "delete", "victim?force=true"],
        &["volume", "delete", "victim#"],
        &["volume", "delete", "x/../victim"],
        &["volume", "delete", ".."],
    ] {
        let (ok, out, err) = firn(&[args, &["--config", config]].concat());
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(
            err.contains("no volume") || err.contains("no share") || err.contains("404"),
            "{args:?}: {err}"
        );
    }
    assert!(g.firn(&["volume", "list"]).contains("victim"));
}

/// A forced delete cuts off the clients still attached, whatever the volume's mode: their
/// writes, flushes and reads fail from then on, and none is acknowledged into a volume that
/// is gone.
#[test]
fn a_forced_delete_fails_the_attached_clients_requests() {
    let g = Gateway::start();
    for mode in ["local", "cached"] {
        let name = format!("gone-{mode}");
        g.firn(&["volume", "create", &name, "--size", "1M", "--mode", mode]);
        let mut c = Raw::connect(g.nbd_port);
        c.go(&name).expect("go");
        c.request(0, 1, 0, 4096, &[7u8; 4096]); // NBD_CMD_WRITE
        assert_eq!(c.reply(0).0, 0, "{mode}: a write before the delete");
        g.firn(&["volume", "delete", &name, "--force"]);
        c.request(0, 1, 4096, 4096, &[8u8; 4096]);
        assert_ne!(
            c.reply(0).0,
            0,
            "{mode}: a write after the delete succeeded"
        );
        c.request(0, 3, 0, 0, &[]); // NBD_CMD_FLUSH
        assert_ne!(
            c.reply(0).0,
            0,
            "{mode}: a flush after the delete succeeded"
        );
        c.request(0, 0, 0, 4096, &[]); // NBD_CMD_READ
        assert_ne!(
            c.reply(4096).0,
            0,
            "{mode}: a read after the delete succeeded"
        );
    }
}

/// A real NBD client (libnbd, through Debian's python3, which has its module) held open
/// until its stdin closes.
fn hold_open(uri: &str) -> std::process::Child {
    Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import nbd, sys
h = nbd.NBD()
h.set_uri_allow_local_file(True)  # for tls-psk-file=
h.connect_uri(sys.argv[1])
sys.stdin.read()
h.shutdown()",
            uri,
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("python3-libnbd (scripts/test installs it)")
}

/// Closes the held client's stdin, so it disconnects, and waits for it.
fn let_go(mut client: std::process::Child) {
    drop(client.stdin.take());
    let status = client.wait().expect("python3");
    assert!(status.success(), "the libnbd client: {status}");
}

/// `firn volume show`'s clients, against the gateway of `config`, once `count` of them are
/// listed.
fn clients_when(config: &Path, name: &str, count: usize) -> Vec<serde_json::Value> {
    let started = std::time::Instant::now();
    loop {
        let shown: serde_json::Value =
            serde_json::from_str(&firn_at(config, &["volume", "show", name])).expect("json");
        let clients = shown["connections"]
            .as_array()
            .expect("connections")
            .clone();
        if clients.len() == count {
            assert_eq!(shown["attached"], count > 0, "{shown}");
            return clients;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waiting for {count} clients: {shown}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn show_lists_the_attached_clients_and_metrics_count_each_volume() {
    let g = Gateway::start();
    g.firn(&["volume", "create", "seen", "--size", "8M"]);
    g.firn(&[
        "volume", "create", "other", "--size", "8M", "--mode", "local",
    ]);
    assert!(clients_when(&g.config, "seen", 0).is_empty());

    let tcp = hold_open(&g.tcp("seen"));
    let clients = clients_when(&g.config, "seen", 1);
    let client = &clients[0];
    assert!(
        client["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{client}"
    );
    assert_eq!(client["tls"], false, "{client}");
    assert!(client["identity"].is_null(), "{client}");
    let flags = client["handshake_flags"].as_array().unwrap();
    assert!(flags.iter().any(|f| f == "fixed_newstyle"), "{client}");
    assert_eq!(client["structured_replies"], true, "libnbd asks: {client}");
    let since = client["since"].as_str().unwrap();
    let since = chrono::DateTime::parse_from_rfc3339(since).expect("RFC 3339");
    let age = chrono::Utc::now().signed_duration_since(since);
    assert!(age.num_seconds().abs() < 60, "{client}");
    assert!(
        clients_when(&g.config, "other", 0).is_empty(),
        "another volume's list"
    );

    let unix = hold_open(&g.unix("seen"));
    let clients = clients_when(&g.config, "seen", 2);
    assert_eq!(clients[0], *client, "oldest first, unchanged");
    assert_eq!(clients[1]["peer"], "unix");
    let_go(tcp);
    let clients = clients_when(&g.config, "seen", 1);
    assert_eq!(clients[0]["peer"], "unix");
    let_go(unix);
    clients_when(&g.config, "seen", 0);

    // Per-volume counts and latencies, for a cached and a local volume alike.
    for name in ["seen", "other"] {
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 7 0 64k",
                "-c",
                "read -P 7 0 64k",
                "-c",
                "flush",
                "-c",
                "discard 64k 64k",
                &g.tcp(name),
            ],
        );
    }
    let metrics = g.metrics();
    for name in ["seen", "other"] {
        let volume = format!("{{volume=\"{name}\"}}");
        for (family, at_least) in [
            ("firn_volume_write_ops_total", 1),
            ("firn_volume_read_ops_total", 1),
            ("firn_volume_write_bytes_total", 64 << 10),
            ("firn_volume_read_bytes_total", 64 << 10),
        ] {
            let value = metric(&metrics, &format!("{family}{volume}"));
            assert!(value >= at_least as f64, "{family}{volume} = {value}");
        }
        for op in ["read", "write", "flush", "trim"] {
            let labels = format!("{{volume=\"{name}\",op=\"{op}\"}}");
            let count = metric(&metrics, &format!("firn_volume_op_seconds_count{labels}"));
            assert!(count >= 1.0, "{op} of {name}: {count}\n{metrics}");
            let all = format!(
                "firn_volume_op_seconds_bucket{{volume=\"{name}\",op=\"{op}\",le=\"+Inf\"}}"
            );
            assert_eq!(metric(&metrics, &all), count);
            let sum = metric(&metrics, &format!("firn_volume_op_seconds_sum{labels}"));
            assert!(sum > 0.0, "{op} of {name}: {sum}");
        }
    }
    // The gateway's totals count both volumes.
    let per_volume = |metrics: &str, family: &str| {
        ["seen", "other"]
            .iter()
            .map(|name| metric(metrics, &format!("{family}{{volume=\"{name}\"}}")))
            .sum::<f64>()
    };
    let gateway_writes = metric(&metrics, "firn_gateway_write_ops_total");
    assert_eq!(
        gateway_writes,
        per_volume(&metrics, "firn_volume_write_ops_total")
    );
    assert_eq!(
        metric(&metrics, "firn_gateway_read_bytes_total"),
        per_volume(&metrics, "firn_volume_read_bytes_total")
    );
    assert!(metric(&metrics, "firn_gateway_op_seconds_count{op=\"trim\"}") >= 2.0);
    // A deleted volume's metrics go with it; the gateway's totals keep what it did.
    g.firn(&["volume", "delete", "other"]);
    let metrics = g.metrics();
    assert!(!metrics.contains("volume=\"other\""), "{metrics}");
    assert!(metrics.contains("firn_volume_write_ops_total{volume=\"seen\"}"));
    assert_eq!(
        metric(&metrics, "firn_gateway_write_ops_total"),
        gateway_writes
    );
}

/// The resident memory of a process (VmRSS), in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib << 10
}

#[test]
fn a_client_that_never_reads_its_replies_cannot_grow_memory() {
    // The server's per-connection budget (two maximum reads and 1 MiB), and room for what
    // else moves: the writer's buffer, threads, the other client.
    const BUDGET: u64 = 65 << 20;
    const SLACK: u64 = 40 << 20;
    let g = Gateway::start();
    g.firn(&["volume", "create", "big", "--size", "4G"]);
    let pid = g.daemon.as_ref().expect("running").child.id();
    let before = rss(pid);

    let mut c = Raw::connect(g.nbd_port);
    assert_eq!(c.go("big").expect("go"), 4 << 30);
    let sender = flood_with_reads(&c);

    let started = std::time::Instant::now();
    let mut peak = before;
    let mut other_client_served = false;
    while started.elapsed() < Duration::from_secs(10) {
        peak = peak.max(rss(pid));
        // Stop at once past the bound: without it memory grows by gigabytes a second.
        if peak > before + BUDGET + SLACK {
            break;
        }
        if !other_client_served && started.elapsed() > Duration::from_secs(4) {
            // Another client is served meanwhile, on the same volume.
            run(
                "timeout",
                &[
                    "30",
                    "qemu-io",
                    "-f",
                    "raw",
                    &g.tcp("big"),
                    "-c",
                    "read -P 0 1G 1M",
                ],
            );
            other_client_served = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    c.s.shutdown(std::net::Shutdown::Both).expect("shutdown");
    let sent = sender.join().expect("sender");
    drop(c); // the client exits: its socket closes with replies unread
    assert!(
        peak <= before + BUDGET + SLACK,
        "firn grew from {} MiB to {} MiB for a client that does not read ({sent} requests sent)",
        before >> 20,
        peak >> 20
    );
    assert!(other_client_served, "the other client was not served");
    assert!(sent > 2, "the client could not send requests");
    // The client is gone, so is its connection: the requests still buffered are not run
    // (the send timeout, a minute by default, plays no part in this).
    assert!(
        connections_drop_to_zero(&g, Duration::from_secs(5)),
        "the connection of a client that left is still served"
    );
    // The daemon lives on.
    run(
        "qemu-io",
        &["-f", "raw", &g.tcp("big"), "-c", "read -P 0 0 4k"],
    );
}

/// 32 MiB READs on `c`'s socket (simple replies: every byte of data goes back), as fast as
/// the socket takes them, and not one reply read; returns how many were sent.
fn flood_with_reads(c: &Raw) -> std::thread::JoinHandle<u64> {
    let mut stream = c.s.try_clone().expect("clone");
    std::thread::spawn(move || {
        let mut sent = 0u64;
        loop {
            let offset = (sent % 128) << 25;
            let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&sent.to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(&(32u32 << 20).to_be_bytes());
            if stream.write_all(&b).is_err() {
                return sent;
            }
            sent += 1;
        }
    })
}

/// Whether `firn_nbd_connections` reaches 0 within `limit`.
fn connections_drop_to_zero(g: &Gateway, limit: Duration) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if metric(&g.metrics(), "firn_nbd_connections") == 0.0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn clients_that_stop_reading_share_one_memory_budget_and_are_dropped() {
    const MEMORY: u64 = 192 << 20;
    const SLACK: u64 = 40 << 20;
    const CLIENTS: usize = 6; // 6 connections' own budgets: 390 MiB
    let g = Gateway::start_with("memory = \"192MiB\"\nsend_timeout_secs = 3\n");
    g.firn(&["volume", "create", "big", "--size", "4G"]);
    let pid = g.daemon.as_ref().expect("running").child.id();
    let before = rss(pid);
    let clients: Vec<Raw> = (0..CLIENTS)
        .map(|_| {
            let mut c = Raw::connect(g.nbd_port);
            assert_eq!(c.go("big").expect("go"), 4 << 30);
            c
        })
        .collect();
    let senders: Vec<_> = clients.iter().map(flood_with_reads).collect();
    let started = std::time::Instant::now();
    let mut peak = before;
    // Before the send timeout: every stalled client holds what it could take.
    while started.elapsed() < Duration::from_millis(2500) {
        peak = peak.max(rss(pid));
        if peak > before + MEMORY + SLACK {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        peak <= before + MEMORY + SLACK,
        "{CLIENTS} clients that do not read took firn from {} MiB to {} MiB",
        before >> 20,
        peak >> 20
    );
    // Clients that take nothing for the send timeout lose their connections, and with them
    // the memory, though their sockets stay open.
    assert!(
        connections_drop_to_zero(&g, Duration::from_secs(15)),
        "stalled clients kept their connections"
    );
    run(
        "timeout",
        &[
            "30",
            "qemu-io",
            "-f",
            "raw",
            &g.tcp("big"),
            "-c",
            "read -P 0 1G 1M",
        ],
    );
    for (c, sender) in clients.iter().zip(senders) {
        // The server has closed these already.
        let _ = c.s.shutdown(std::net::Shutdown::Both);
        assert!(
            sender.join().expect("sender") > 0,
            "a client could not send"
        );
    }
}

/// A write's memory is taken before its payload arrives: clients that stop halfway through
/// their payloads lose their connections, and hold no other client up for longer.
#[test]
fn clients_stalled_in_a_payload_are_dropped_and_hold_no_one_up() {
    let g = Gateway::start_with("memory = \"192MiB\"\nsend_timeout_secs = 3\n");
    g.firn(&["volume", "create", "big", "--size", "1G"]);
    // Six 32 MiB writes take the whole budget, each with one byte of its payload sent.
    let stalled: Vec<Raw> = (0..6u64)
        .map(|i| {
            let mut c = Raw::connect(g.nbd_port);
            assert_eq!(c.go("big").expect("go"), 1 << 30);
            c.request(0, 1, i << 25, 32 << 20, &[0x55]);
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    run(
        "timeout",
        &[
            "30",
            "qemu-io",
            "-f",
            "raw",
            &g.tcp("big"),
            "-c",
            "read -P 0 0 64k",
        ],
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "a read waited {:?} behind stalled writes",
        started.elapsed()
    );
    for mut c in stalled {
        assert!(
            closed_at_once(&mut c.s),
            "a stalled client kept its connection"
        );
    }
}

/// Whether the server closed `s` without a word (not even its greeting), within 5 s.
fn closed_at_once(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn connections_beyond_the_caps_are_refused_and_silent_peers_dropped() {
    let g = Gateway::start_with(
        "max_connections = 4\nmax_connections_per_address = 3\nnegotiation_timeout_secs = 3\n",
    );
    g.firn(&["volume", "create", "disk", "--size", "1M"]);
    // Three silent peers from 127.0.0.1: each gets the greeting, and says nothing.
    let started = std::time::Instant::now();
    let mut idle: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", g.nbd_port)).expect("connect");
            let mut hello = [0u8; 18];
            s.read_exact(&mut hello).expect("greeting");
            s
        })
        .collect();
    // A fourth from the same address is closed as it arrives; so is a client that would have
    // been served.
    let mut fourth = TcpStream::connect(("127.0.0.1", g.nbd_port)).expect("connect");
    assert!(
        closed_at_once(&mut fourth),
        "a 4th connection from one address was served"
    );
    let out = Command::new("nbdinfo")
        .arg(g.tcp("disk"))
        .output()
        .expect("nbdinfo");
    assert!(
        !out.status.success(),
        "nbdinfo got past the per-address cap"
    );
    // The Unix socket fills the last place of the total; one more there is refused.
    let socket = g.path("data/nbd.sock");
    let mut unix = std::os::unix::net::UnixStream::connect(&socket).expect("unix");
    let mut hello = [0u8; 18];
    unix.read_exact(&mut hello)
        .expect("greeting over the Unix socket");
    let mut over = std::os::unix::net::UnixStream::connect(&socket).expect("unix");
    over.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert!(
        matches!(over.read(&mut hello), Ok(0) | Err(_)),
        "a connection past max_connections was served"
    );

    // The silent peers are dropped once the negotiation deadline passes, and not before.
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut b = [0u8; 1];
        assert!(
            matches!(s.read(&mut b), Ok(0) | Err(_)),
            "a silent peer was kept"
        );
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_secs(9),
        "silent peers dropped after {waited:?}, not after the 3 s deadline"
    );
    drop(unix);
    // Their places are free again: a real client connects.
    let info = run("nbdinfo", &[&g.tcp("disk")]);
    assert!(info.contains("export-size: 1048576"), "{info}");
    let metrics = g.metrics();
    assert!(metric(&metrics, "firn_nbd_refused_total{reason=\"too_many\"}") >= 3.0);
    assert!(metric(&metrics, "firn_nbd_refused_total{reason=\"timeout\"}") >= 3.0);
}

#[test]
fn peers_see_only_what_their_allowlists_admit() {
    // Loopback is in no list at first: not even the greeting.
    let g = Gateway::start_with("allow = [\"127.0.0.2/32\"]\n");
    g.firn(&["volume", "create", "other", "--size", "1M"]);
    g.firn(&[
        "volume",
        "create",
        "fenced",
        "--size",
        "1M",
        "--allow",
        "127.0.0.3/32",
    ]);
    let mut s = TcpStream::connect(("127.0.0.1", g.nbd_port)).expect("connect");
    assert!(closed_at_once(&mut s), "a peer in no allowlist was served");
    assert!(
        metric(
            &g.metrics(),
            "firn_nbd_refused_total{reason=\"not_allowed\"}"
        ) >= 1.0,
        "the refusal was not counted"
    );

    // A volume of its own admits the peer, which then sees that volume and nothing else.
    g.firn(&[
        "volume",
        "create",
        "mine",
        "--size",
        "1M",
        "--allow",
        "127.0.0.1/32",
    ]);
    let list = run("nbdinfo", &["--list", &g.tcp("")]);
    assert!(list.contains("export=\"mine\""), "{list}");
    for hidden in ["other", "fenced"] {
        assert!(
            !list.contains(hidden),
            "{hidden} listed to a peer that may not open it:\n{list}"
        );
    }
    // Meta contexts of an export the peer may not open answer like an unknown export.
    let mut c = Raw::connect(g.nbd_port);
    for (name, known) in [
        ("mine", true),
        ("other", false),
        ("fenced", false),
        ("nope", false),
    ] {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u32.to_be_bytes());
        c.option(9, &data); // NBD_OPT_LIST_META_CONTEXT
        let (kind, _) = c.option_reply();
        if known {
            assert_eq!(kind, 4, "NBD_REP_META_CONTEXT for {name}");
            assert_eq!(c.option_reply().0, 1, "NBD_REP_ACK");
        } else {
            assert_eq!(kind, 0x8000_0006, "NBD_REP_ERR_UNKNOWN for {name}");
        }
    }
    // The Unix socket is guarded by its mode: it lists every volume.
    let list = run("nbdinfo", &["--list", &g.unix("")]);
    for name in ["mine", "other", "fenced"] {
        assert!(list.contains(&format!("export=\"{name}\"")), "{list}");
    }
}

/// Odd requests through libnbd's Python bindings with strict mode off, as a new user would
/// send them: each must get its own clean error, and the next request on the same
/// connection must still succeed. Prints `name errno` (0 for success) per case.
const ODD_REQUESTS: &str = r#"
import errno, sys
import nbd

uri, structured = sys.argv[1], sys.argv[2] == "1"
h = nbd.NBD()
h.set_strict_mode(0)
h.set_request_structured_replies(structured)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
assert h.get_structured_replies_negotiated() == structured
size = h.get_size()
pattern = bytes((i * 7) % 251 for i in range(8192))
h.pwrite(pattern, 0)
top = 2**64 - 1
cases = [
    ("read-zero", lambda: h.pread(0, 0)),
    ("read-zero-at-end", lambda: h.pread(0, size)),
    ("write-zero", lambda: h.pwrite(b"", 4096)),
    ("trim-zero", lambda: h.trim(0, 4096)),
    ("zero-zero", lambda: h.zero(0, 4096)),
    ("cache-zero", lambda: h.cache(0, 4096)),
    ("read-past-end", lambda: h.pread(8192, size - 4096)),
    ("read-offset-overflows", lambda: h.pread(4096, top - 100)),
    ("read-at-top", lambda: h.pread(1, top)),
    ("write-past-end", lambda: h.pwrite(b"x" * 8192, size - 4096)),
    ("write-offset-overflows", lambda: h.pwrite(b"x" * 10, top - 4)),
    ("trim-past-end", lambda: h.trim(8192, size - 4096)),
    ("trim-offset-overflows", lambda: h.trim(4096, top - 100)),
    ("zero-past-end", lambda: h.zero(8192, size - 4096)),
    ("zero-offset-overflows", lambda: h.zero(4096, top - 100)),
    ("cache-past-end", lambda: h.cache(8192, size - 4096)),
    ("cache-offset-overflows", lambda: h.cache(4096, top - 100)),
]
if structured:
    extents = lambda *args: 0
    cases += [
        ("block-status-zero", lambda: h.block_status(0, 0, extents)),
        ("block-status-past-end", lambda: h.block_status(8192, size - 4096, extents)),
        ("block-status-offset-overflows", lambda: h.block_status(4096, top - 100, extents)),
    ]
for name, request in cases:
    try:
        request()
        outcome = 0
    except nbd.Error as e:
        outcome = e.errnum
    # The connection lives on and still reads what was written.
    if h.pread(8192, 0) != pattern:
        sys.exit(f"after {name}: the next read returned other data")
    print(name, outcome, flush=True)
h.shutdown()
"#;

#[test]
fn odd_requests_from_libnbd_get_clean_errors_and_the_connection_lives_on_a_cached_volume() {
    odd_requests_from_libnbd_get_clean_errors_and_the_connection_lives("cached");
}

#[test]
fn odd_requests_from_libnbd_get_clean_errors_and_the_connection_lives_on_a_local_volume() {
    odd_requests_from_libnbd_get_clean_errors_and_the_connection_lives("local");
}

fn odd_requests_from_libnbd_get_clean_errors_and_the_connection_lives(mode: &str) {
    let g = Gateway::start();
    g.firn(&["volume", "create", "disk", "--size", "1M", "--mode", mode]);
    const EINVAL: i32 = 22;
    const ENOSPC: i32 = 28;
    for structured in ["1", "0"] {
        let out = run(
            "/usr/bin/python3",
            &["-c", ODD_REQUESTS, &g.tcp("disk"), structured],
        );
        let outcomes: Vec<(String, i32)> = out
            .lines()
            .map(|line| {
                let (name, code) = line.split_once(' ').expect("name errno");
                (name.to_string(), code.parse().expect("errno"))
            })
            .collect();
        let expected_count = if structured == "1" { 20 } else { 17 };
        assert_eq!(outcomes.len(), expected_count, "{out}");
        for (name, code) in &outcomes {
            // Writes past the end are ENOSPC (the protocol says so), everything else EINVAL.
            let expected = if name.starts_with("write-") && name != "write-zero"
                || name.starts_with("zero-") && name != "zero-zero"
            {
                ENOSPC
            } else {
                EINVAL
            };
            assert_eq!(
                *code, expected,
                "{name} (structured replies: {structured}) answered errno {code}"
            );
        }
    }
    let metrics = g.metrics();
    assert_eq!(metric(&metrics, "firn_nbd_panics_total"), 0.0);
}

#[test]
fn a_peer_silent_in_the_tls_handshake_is_dropped_at_the_deadline() {
    let g = TlsGateway::start("tls = \"psk\"\nnegotiation_timeout_secs = 2\n", |_| {});
    let started = std::time::Instant::now();
    let mut c = Raw::connect(g.nbd_port);
    c.option(5, &[]); // NBD_OPT_STARTTLS
    assert_eq!(c.option_reply().0, 1, "NBD_REP_ACK");
    // No ClientHello follows: the server waits in the handshake until the deadline.
    assert!(c.closed(), "the silent peer was kept");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "dropped after {waited:?}, not at the 2 s deadline"
    );
}

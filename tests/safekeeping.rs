//! Nothing is lost silently: volumes, keys and audit records survive a lost or stale catalog,
//! a missing key check, a failing audit log, a full disk; and what firn keeps is private to
//! its user. Run against the real `firn` binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, FIRN, Teardown, firn, free_port, run, small_ext4, write_config};

/// `firn serve` expected to refuse to start: its stderr.
fn refused_start(config: &Path, env: &[(&str, &str)]) -> String {
    let mut child = Command::new(FIRN)
        .args(["serve", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run firn");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("firn started and kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "firn started: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn volume_files(data: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data.join("volumes"))
        .expect("volumes dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .collect();
    files.sort();
    files
}

fn create_volume(config: &Path, name: &str, size: &str) {
    let config = config.to_str().expect("utf-8");
    // These tests are about local volume files and their space checks.
    let (ok, _, err) = firn(&[
        "volume", "create", name, "--size", size, "--mode", "local", "--config", config,
    ]);
    assert!(ok, "volume create {name}: {err}");
}

#[test]
fn a_missing_key_check_is_not_rewritten_over_existing_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "[keys]\nsource = \"env\"\n");
    let data = dir.path().join("data");
    let key_a = "11".repeat(32);
    let key_b = "22".repeat(32);
    let daemon = Daemon::start(&config, port, &[("FIRN_MASTER_KEY", &key_a)]);
    create_volume(&config, "v", "1M");
    assert!(daemon.stop().success());
    let volumes = volume_files(&data);
    assert_eq!(volumes.len(), 1);

    std::fs::remove_file(data.join("keycheck")).expect("remove keycheck");
    let err = refused_start(&config, &[("FIRN_MASTER_KEY", &key_b)]);
    assert!(err.contains("keycheck") && err.contains("Restore"), "{err}");
    assert!(
        !data.join("keycheck").exists(),
        "a new key check was written"
    );
    assert_eq!(volume_files(&data), volumes);
}

#[test]
fn a_lost_or_older_catalog_never_deletes_volume_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let config_arg = config.to_str().expect("utf-8");
    let data = dir.path().join("data");
    let daemon = Daemon::start(&config, port, &[]);
    create_volume(&config, "a", "1M");
    assert!(daemon.stop().success());
    let older = dir.path().join("meta.redb.older");
    std::fs::copy(data.join("meta.redb"), &older).expect("copy the catalog");
    let daemon = Daemon::start(&config, port, &[]);
    create_volume(&config, "b", "1M");
    assert!(daemon.stop().success());
    let files = volume_files(&data);
    assert_eq!(files.len(), 2);

    // The catalog is gone (damaged and moved aside): firn refuses to start, and says how to
    // go on; no volume file is touched.
    std::fs::rename(data.join("meta.redb"), dir.path().join("meta.redb.damaged")).expect("mv");
    for _ in 0..2 {
        let err = refused_start(&config, &[]);
        assert!(
            err.contains("Restore meta.redb") && err.contains("2 volume file"),
            "{err}"
        );
        assert_eq!(volume_files(&data), files);
    }

    // An older catalog comes back: the volume it names is served, the one it does not know
    // goes to quarantine, whole.
    std::fs::copy(&older, data.join("meta.redb")).expect("restore the older catalog");
    let b_bytes: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("read"))
        .collect();
    let daemon = Daemon::start(&config, port, &[]);
    let banner = daemon.stdout.join("\n");
    assert!(banner.contains("quarantine"), "{banner}");
    let (ok, out, err) = firn(&["volume", "list", "--config", config_arg]);
    assert!(ok, "{err}");
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, ["a"], "{out}");
    assert!(daemon.stop().success());
    let remaining = volume_files(&data);
    assert_eq!(remaining.len(), 1);
    let quarantined: Vec<PathBuf> = std::fs::read_dir(data.join("volumes/quarantine"))
        .expect("quarantine folder")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    let mut all = remaining.clone();
    all.extend(quarantined.iter().cloned());
    let mut kept_bytes: Vec<Vec<u8>> = all
        .iter()
        .map(|f| std::fs::read(f).expect("read"))
        .collect();
    let mut before = b_bytes;
    kept_bytes.sort();
    before.sort();
    assert_eq!(
        kept_bytes, before,
        "every volume file is kept, byte for byte"
    );
    assert_eq!(
        quarantined[0].file_name(),
        files
            .iter()
            .find(|f| !remaining.contains(f))
            .and_then(|f| f.file_name()),
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn the_data_directory_and_its_files_are_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let config_arg = config.to_str().expect("utf-8");
    let data = dir.path().join("data");
    // The test's own umask (022 as a rule) would give 0755 and 0644.
    let daemon = Daemon::start(&config, port, &[]);
    create_volume(&config, "v", "1M");
    assert!(daemon.stop().success());
    let source = dir.path().join("object.txt");
    std::fs::write(&source, b"into the local bucket").expect("write");
    let (ok, _, err) = firn(&[
        "remote",
        "--config",
        config_arg,
        "put",
        source.to_str().expect("utf-8"),
        "object.txt",
    ]);
    assert!(ok, "{err}");
    let daemon = Daemon::start(&config, port, &[]);
    // Listening now: the socket keeps the mode firn gives it.
    assert_eq!(mode(&data.join("nbd.sock")), 0o660, "nbd.sock");
    assert!(daemon.stop().success());

    for folder in ["", "volumes"] {
        assert_eq!(mode(&data.join(folder)), 0o700, "{folder:?}");
    }
    let mut files = vec![
        data.join("meta.redb"),
        data.join("audit.log"),
        data.join("lock"),
        data.join("api-token"),
        data.join("keycheck"),
        data.join("bucket/object.txt"),
    ];
    files.extend(volume_files(&data));
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

/// A full disk under the metadata store costs the changes tried while it is full, not the
/// store: redb refuses every transaction after an I/O error until it is opened again, and
/// the store does that itself, so once there is room changes go through again without a
/// restart, and what was committed before is all there.
#[test]
fn the_metadata_store_takes_changes_again_once_a_full_disk_has_room() {
    use firn::local::meta::MetaStore;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mnt, _teardown) = small_tmpfs(dir.path(), "8m");
    let store = MetaStore::open(mnt.join("meta.redb")).expect("open");
    store.put("t", "before", b"kept").expect("put");
    fill(&mnt.join("filler"));
    let value = vec![7u8; 64 << 10];
    let refused = (0..256).any(|i| store.put("t", &format!("k{i}"), &value).is_err());
    assert!(refused, "the full disk refused nothing: no test");
    std::fs::remove_file(mnt.join("filler")).expect("room again");
    store
        .put("t", "after", b"taken")
        .expect("a change once there is room");
    assert_eq!(
        store.get("t", "before").expect("get"),
        Some(b"kept".to_vec())
    );
    assert_eq!(
        store.get("t", "after").expect("get"),
        Some(b"taken".to_vec())
    );
    drop(store);
    let store = MetaStore::open(mnt.join("meta.redb")).expect("open again");
    assert_eq!(
        store.get("t", "after").expect("get"),
        Some(b"taken".to_vec())
    );
}

/// A small tmpfs at `dir/mnt`, unmounted when the returned guard drops.
fn small_tmpfs(dir: &Path, size: &str) -> (PathBuf, Teardown) {
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mnt_arg = mnt.to_str().expect("utf-8").to_string();
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            &mnt_arg,
        ],
    );
    let teardown = Teardown(vec![Box::new(move || {
        let _ = Command::new("umount").arg(&mnt_arg).status();
    })]);
    (mnt, teardown)
}

/// Fills the file system holding `path` with one file there, until it is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = vec![0x55u8; 64 << 10];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("fill: {e}"),
        }
    }
    let _ = file.sync_all();
}

/// Every record of the audit log, as JSON.
fn audit_records(data: &Path) -> Vec<serde_json::Value> {
    let (mut log, _) = firn::local::log::Log::open(data.join("audit.log")).expect("audit log");
    log.iter()
        .expect("iter")
        .map(|r| serde_json::from_slice(&r.expect("record").payload).expect("json"))
        .collect()
}

#[test]
fn changes_are_refused_while_the_audit_log_cannot_be_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_mnt, _teardown) = small_tmpfs(dir.path(), "32m");
    let port = free_port();
    let config = write_config(dir.path(), port, "")
        .to_str()
        .expect("utf-8")
        .to_string();
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("\"data\"", "\"mnt/data\"")).expect("config");
    let daemon = Daemon::start(Path::new(&config), port, &[]);
    let bandwidth = |rate: &str| firn(&["bandwidth", "--config", &config, "--upload", rate]);
    // A read: it still answers while the audit log cannot be written.
    let upload_limit = || {
        let (ok, out, err) = firn(&["status", "--config", &config, "--json"]);
        assert!(ok, "{err}");
        out.lines()
            .find(|l| l.contains("\"upload_limit\""))
            .map(|l| l.split('"').nth(3).unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    let (ok, _, err) = bandwidth("20MiB");
    assert!(ok, "{err}");

    // The room the audit log keeps aside for a full disk, spent as about 3,000 records on
    // one would spend it (`daemon::the_api_takes_changes_on_a_disk_another_program_filled`
    // has it taken): what follows is a disk with no room left for the log at all.
    std::fs::remove_file(dir.path().join("mnt/data/audit.log.reserve"))
        .expect("the audit log's reserve, made at start");
    let filler = dir.path().join("mnt/filler");
    fill(&filler);
    // The log's last page may still have room for a few records.
    let mut successes = 1;
    let mut refused = false;
    for mib in 21..80 {
        let (ok, _, err) = bandwidth(&format!("{mib}MiB"));
        if ok {
            successes += 1;
            continue;
        }
        assert!(err.contains("audit log cannot be written"), "{err}");
        assert_eq!(
            upload_limit(),
            format!("{}MiB/s", mib - 1),
            "the refused change was made"
        );
        refused = true;
        break;
    }
    assert!(refused, "changes went through unaudited on a full disk");

    // Once the disk has room again, so does the audit log: no restart needed.
    std::fs::remove_file(&filler).expect("rm filler");
    let (ok, _, err) = bandwidth("7MiB");
    assert!(ok, "{err}");
    successes += 1;
    assert_eq!(upload_limit(), "7MiB/s");
    assert!(daemon.stop().success());

    let records = audit_records(&dir.path().join("mnt/data"));
    let puts = |phase: &str| -> Vec<serde_json::Value> {
        records
            .iter()
            .filter(|r| r["method"] == "PUT" && r["phase"] == phase)
            .cloned()
            .collect()
    };
    let (intents, outcomes) = (puts("intent"), puts("outcome"));
    // Every change made has its intent on disk; an outcome may miss when the disk filled
    // between the two.
    assert_eq!(intents.len(), successes, "{records:?}");
    assert!(outcomes.len() + 1 >= successes, "{records:?}");
    for outcome in &outcomes {
        assert_eq!(outcome["status"], 200);
        assert!(
            intents.iter().any(|i| i["call"] == outcome["call"]),
            "no intent before {outcome}"
        );
    }
}

#[test]
fn a_damaged_audit_record_is_kept_aside_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let config_arg = config.to_str().expect("utf-8");
    let data = dir.path().join("data");
    let daemon = Daemon::start(&config, port, &[]);
    for _ in 0..10 {
        let (ok, _, err) = firn(&["status", "--config", config_arg]);
        assert!(ok, "{err}");
    }
    assert!(daemon.stop().success());
    let log = data.join("audit.log");
    let original = std::fs::read(&log).expect("read");
    let middle = original.len() / 2;
    let mut damaged = original.clone();
    damaged[middle] ^= 0x40;
    std::fs::write(&log, &damaged).expect("damage");

    let daemon = Daemon::start(&config, port, &[]);
    let banner = daemon.stdout.join("\n");
    assert!(
        banner.contains("WARNING: audit log") && banner.contains("damaged"),
        "{banner}"
    );
    assert!(daemon.stop().success());
    let aside: Vec<PathBuf> = std::fs::read_dir(&data)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit.log.damaged-"))
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let kept = std::fs::read(&aside[0]).expect("read aside");
    assert!(
        kept.len() >= original.len() - middle,
        "{} bytes",
        kept.len()
    );
    assert_eq!(kept[..], damaged[damaged.len() - kept.len()..]);
    // The records before the damage are still in the log.
    let now = std::fs::read(&log).expect("read");
    let cut = damaged.len() - kept.len();
    assert_eq!(now[..cut], original[..cut]);
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_calls_are_counted_not_written_one_by_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let daemon = Daemon::start(&config, port, &[]);
    let http = reqwest::Client::new();
    let long = format!("/api/v1/{}", "x".repeat(8000));
    let calls = 2000;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (http, url) = (http.clone(), daemon.url(&long));
        tasks.push(tokio::spawn(async move {
            for _ in (worker..calls).step_by(8) {
                let status = http
                    .get(&url)
                    .bearer_auth("wrong")
                    .send()
                    .await
                    .expect("get")
                    .status();
                assert_eq!(status, 401);
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    let seconds = started.elapsed().as_secs() + 1;
    let before = std::fs::metadata(dir.path().join("data/audit.log"))
        .expect("stat")
        .len();
    assert!(daemon.stop().success());

    let records = audit_records(&dir.path().join("data"));
    let refused: Vec<&serde_json::Value> = records.iter().filter(|r| r["status"] == 401).collect();
    let counted: u64 = refused.iter().filter_map(|r| r["count"].as_u64()).sum();
    assert_eq!(
        counted,
        calls as u64,
        "{} records of refused calls",
        refused.len()
    );
    assert!(
        refused.len() as u64 <= seconds + 2,
        "{} records for {calls} refused calls in {seconds} s",
        refused.len()
    );
    for record in &refused {
        assert!(record.to_string().len() < 1024, "{record}");
        assert_eq!(record["path_bytes"], long.len());
    }
    assert!(before < 64 << 10, "the audit log grew to {before} bytes");
}

/// Runs qemu-io commands against an NBD URI; its output, whatever the outcome.
fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in commands {
        args.push("-c".to_string());
        args.push(c.clone());
    }
    args.push(uri.to_string());
    let out = Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("qemu-io (scripts/test installs qemu-utils)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Bytes the files under `dir` take on disk.
fn used_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry"))
    {
        let meta = entry.metadata().expect("stat");
        total += meta.blocks() * 512;
        if meta.is_dir() {
            total += used_bytes(&entry.path());
        }
    }
    total
}

fn free_bytes(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path).expect("statvfs");
    stat.blocks_available() * stat.fragment_size()
}

/// A gateway whose data directory is `data_dir` (relative to `dir`), `[local]` extended by
/// `local`, with volume `v` of `size`; its Unix NBD URI.
fn space_gateway(dir: &Path, data_dir: &str, local: &str, size: &str) -> (Daemon, PathBuf, String) {
    let port = free_port();
    let config = write_config(dir, port, "");
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replace(
        "data_dir = \"data\"\n",
        &format!("data_dir = \"{data_dir}\"\n{local}\n"),
    );
    std::fs::write(&config, text).expect("config");
    let daemon = Daemon::start(&config, port, &[]);
    create_volume(&config, "v", size);
    let uri = format!(
        "nbd+unix:///v?socket={}",
        dir.join(data_dir).join("nbd.sock").display()
    );
    (daemon, config, uri)
}

/// Writes 1 MiB at each MiB up to `mib`; how many succeeded and how many got ENOSPC.
fn fill_volume(uri: &str, mib: u64) -> (usize, usize) {
    let commands: Vec<String> = (0..mib)
        .map(|i| format!("write -P 0xc3 {}M 1M", i))
        .collect();
    let out = qemu_io(uri, &commands);
    let wrote = out.matches("wrote 1048576/1048576").count();
    let full = out.matches("No space left on device").count();
    assert_eq!(wrote + full, mib as usize, "{out}");
    (wrote, full)
}

/// After the limit: overwriting written data works, metadata and the audit log too.
fn the_rest_keeps_working(uri: &str, config: &Path) {
    let out = qemu_io(
        uri,
        &[
            "write -P 0x5e 0 64k".to_string(),
            "read -P 0x5e 0 64k".to_string(),
        ],
    );
    assert!(
        out.contains("wrote 65536/65536") && out.contains("read 65536/65536"),
        "{out}"
    );
    create_volume(config, "more", "1M");
}

/// The create of [`the_rest_keeps_working`] is in the audit log (read after the stop).
fn the_create_was_audited(data: &Path) {
    let records = audit_records(data);
    assert!(
        records
            .iter()
            .any(|r| r["method"] == "POST" && r["phase"] == "outcome" && r["status"] == 201),
        "{records:?}"
    );
}

#[test]
fn min_free_keeps_room_for_metadata_and_the_audit_log() {
    // The data directory on a 32 MiB ext4 file system, holding a 64 MiB sparse volume.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mnt, _teardown) = small_ext4(dir.path());
    let (daemon, config, uri) =
        space_gateway(dir.path(), "mnt/data", "min_free = \"12MiB\"", "64M");
    let (wrote, full) = fill_volume(&uri, 40);
    assert!(full > 0 && wrote > 4, "wrote {wrote} MiB, {full} refused");
    let free = free_bytes(&mnt);
    assert!(free >= 11 << 20, "only {free} bytes left free");
    the_rest_keeps_working(&uri, &config);
    assert!(daemon.stop().success());
    the_create_was_audited(&mnt.join("data"));
}

#[test]
fn max_bytes_caps_the_data_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, config, uri) = space_gateway(
        dir.path(),
        "data",
        "min_free = \"0\"\nmax_bytes = \"16MiB\"",
        "64M",
    );
    let (wrote, full) = fill_volume(&uri, 40);
    assert!(full > 0 && wrote > 4, "wrote {wrote} MiB, {full} refused");
    let data = dir.path().join("data");
    let used = used_bytes(&data);
    assert!(used <= 16 << 20, "the data directory holds {used} bytes");
    the_rest_keeps_working(&uri, &config);
    assert!(daemon.stop().success());
    the_create_was_audited(&data);
}

//! Nothing is lost silently: volumes, keys and audit records survive a lost or stale catalog,
//! a missing key check, a failing audit log, a full disk; and what firn keeps is private to
//! its user. Run against the real `firn` binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, FIRN, firn, free_port, write_config};

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
    let (ok, _, err) = firn(&["volume", "create", name, "--size", size, "--config", config]);
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

//! Keys must not leave the daemon's memory through its process: the key variables are gone
//! from /proc/PID/environ, a crash writes no core file, and other processes of the same
//! user cannot read the daemon's /proc entries.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, FIRN, firn, free_port, write_config};

const NOBODY: u32 = 65534;

fn serve(config: &Path) -> Command {
    let mut command = Command::new(FIRN);
    command.args(["serve", "--config"]).arg(config);
    command
}

/// The firn binary at a path `nobody` can run: FIRN itself when every folder above it lets
/// others through, else a link or copy inside `dir` (the suite may be cloned under /root).
fn firn_for_nobody(dir: &Path) -> std::path::PathBuf {
    let binary = Path::new(FIRN);
    let open_to_others = binary
        .ancestors()
        .skip(1)
        .all(|folder| std::fs::metadata(folder).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if open_to_others {
        return binary.to_path_buf();
    }
    let copy = dir.join("firn");
    if std::fs::hard_link(binary, &copy).is_err() {
        std::fs::copy(binary, &copy).expect("copy firn");
    }
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    copy
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// The test's own user: /proc/self belongs to it.
fn my_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .expect("stat /proc/self")
        .uid()
}

fn is_root() -> bool {
    my_uid() == 0
}

#[test]
fn key_variables_are_wiped_from_proc_environ() {
    let (ok, key, err) = firn(&["keygen"]);
    assert!(ok, "{err}");
    let key = key.trim().to_string();
    assert_eq!(key.len(), 64);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "[keys]\nsource = \"env\"\n");

    let mut command = serve(&config);
    command
        .env("FIRN_MASTER_KEY", &key)
        .env("FIRN_TEST_MARKER", "still-here");
    let daemon = Daemon::spawn(command, port);
    let environ = std::fs::read(format!("/proc/{}/environ", daemon.child.id()))
        .expect("read the daemon's /proc/PID/environ (the suite runs as root or as its user)");
    // The file is read whole: other variables are still there.
    assert!(contains(&environ, "FIRN_TEST_MARKER=still-here"));
    assert!(!contains(&environ, &key), "the master key is in environ");
    assert!(
        !contains(&environ, "FIRN_MASTER_KEY"),
        "the variable is in environ"
    );
    assert!(daemon.stop().success());

    // The key taken out of the environment is the one used: the same key opens the data
    // directory again, another one does not.
    let mut command = serve(&config);
    command.env("FIRN_MASTER_KEY", &key);
    assert!(Daemon::spawn(command, port).stop().success());
    let out = serve(&config)
        .env("FIRN_MASTER_KEY", "33".repeat(32))
        .output()
        .expect("run");
    assert!(!out.status.success());

    // The passphrase source, under a variable name of the config's choosing.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(
        dir.path(),
        port,
        "[keys]\nsource = \"passphrase\"\nenv = \"MY_FIRN_PHRASE\"\n",
    );
    let phrase = "correct horse battery staple 7f3a";
    let mut command = serve(&config);
    command
        .env("MY_FIRN_PHRASE", phrase)
        .env("FIRN_PASSPHRASE", "unused but secret 91c2");
    let daemon = Daemon::spawn(command, port);
    let environ =
        std::fs::read(format!("/proc/{}/environ", daemon.child.id())).expect("read environ");
    assert!(!contains(&environ, phrase), "the passphrase is in environ");
    assert!(!contains(&environ, "unused but secret 91c2"));
    assert!(!contains(&environ, "MY_FIRN_PHRASE"));
    assert!(daemon.stop().success());
    let mut command = serve(&config);
    command.env("MY_FIRN_PHRASE", phrase);
    assert!(
        Daemon::spawn(command, port).stop().success(),
        "same phrase, same key"
    );
}

#[test]
fn a_crash_writes_no_core_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    // Raise the core limit as far as this user may, so that only firn itself can keep a
    // core from being written; core_pattern "core" (the kernel's default) puts it in the
    // working directory.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("ulimit -c \"$(ulimit -H -c)\"; exec \"$0\" \"$@\"")
        .arg(FIRN)
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(dir.path());
    let mut daemon = Daemon::spawn(command, port);
    let pid = daemon.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core limit line");
    let numbers: Vec<&str> = core.split_whitespace().skip(4).take(2).collect();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGABRT,
    )
    .expect("kill");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = daemon.child.try_wait().expect("wait") {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "still running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.signal(), Some(nix::libc::SIGABRT), "{status:?}");
    assert!(!status.core_dumped(), "the kernel dumped core");
    let cores: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("core"))
        .collect();
    assert!(cores.is_empty(), "core files: {cores:?}");
    // Soft and hard limits both 0: nothing in the process can raise it again.
    assert_eq!(numbers, ["0", "0"], "{core}");
}

/// PR_SET_DUMPABLE 0 makes the daemon's /proc files root's, so another process of the
/// daemon's own (non-root) user can neither read its environment or memory nor attach to
/// it. Observable only from root (to start the daemon as another user) or from a non-root
/// user (who is then that other process).
#[test]
fn other_processes_of_the_same_user_cannot_read_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "[keys]\nsource = \"env\"\n");
    let key = "5a".repeat(32);
    let mut command = serve(&config);
    let user = if is_root() {
        // The daemon runs as nobody, in a directory nobody can write.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        command = Command::new(firn_for_nobody(dir.path()));
        command.args(["serve", "--config"]).arg(&config);
        command.uid(NOBODY).gid(NOBODY);
        NOBODY
    } else {
        my_uid()
    };
    command.env("FIRN_MASTER_KEY", &key);
    let daemon = Daemon::spawn(command, port);
    let pid = daemon.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert!(
        uid_line.split_whitespace().nth(1) == Some(&user.to_string()),
        "{uid_line}"
    );
    for file in ["environ", "mem", "maps"] {
        let owner = std::fs::metadata(format!("/proc/{pid}/{file}"))
            .expect("stat")
            .uid();
        assert_eq!(owner, 0, "/proc/{pid}/{file} belongs to {owner}, not root");
    }
    // And as that user: reading the environment is refused.
    let mut reader = Command::new("cat");
    reader.arg(format!("/proc/{pid}/environ"));
    if is_root() {
        reader.uid(NOBODY).gid(NOBODY);
    }
    let out = reader.output().expect("run cat");
    assert!(
        !out.status.success(),
        "a process of the same user read the environment: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(daemon.stop().success());
}

/// Without the right to lock memory (RLIMIT_MEMLOCK 0, and not root), the daemon warns once
/// and works: locking keeps keys out of swap, it is not a condition to serve.
#[test]
fn refused_memory_locking_is_one_warning_not_a_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "[keys]\nsource = \"env\"\n");
    let binary = if is_root() {
        firn_for_nobody(dir.path())
    } else {
        FIRN.into()
    };
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("ulimit -l 0 && exec \"$0\" \"$@\" 2>firn.err")
        .arg(binary)
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("FIRN_MASTER_KEY", "6b".repeat(32));
    if is_root() {
        // Root may lock memory whatever the limit says; nobody may not.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        command.uid(NOBODY).gid(NOBODY);
    }
    let daemon = Daemon::spawn(command, port);
    // A volume brings one more key; it is made and served with locking refused.
    let config = config.to_str().expect("utf-8");
    let (ok, _, err) = firn(&[
        "volume", "create", "v", "--size", "1MiB", "--config", config,
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = firn(&["volume", "show", "v", "--config", config]);
    assert!(ok && out.contains('v'), "{out}{err}");
    assert!(daemon.stop().success());
    let log = std::fs::read_to_string(dir.path().join("firn.err")).expect("stderr log");
    assert_eq!(
        log.matches("cannot lock key memory").count(),
        1,
        "one warning expected: {log}"
    );
}

/// Every writable mapping of process `pid` (where a key can have been put), with its
/// `VmFlags`, from /proc/PID/smaps and /proc/PID/mem.
fn memory_of(pid: u32) -> Vec<(usize, Vec<u8>, Vec<String>)> {
    use std::os::unix::fs::FileExt;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    let mut mappings: Vec<(usize, usize, bool, Vec<String>)> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            let readable = words.next().is_some_and(|perms| perms.starts_with("rw"));
            // [vvar] and the like cannot be read through mem.
            let special = line.contains("[vvar") || line.contains("[vsyscall]");
            mappings.push((start, end, readable && !special, Vec::new()));
        } else if let Some(flags) = line.strip_prefix("VmFlags:")
            && let Some(last) = mappings.last_mut()
        {
            last.3 = flags.split_whitespace().map(str::to_string).collect();
        }
    }
    let mut memory = Vec::new();
    for (start, end, readable, flags) in mappings {
        if !readable {
            continue;
        }
        let mut bytes = vec![0u8; end - start];
        if mem.read_exact_at(&mut bytes, start as u64).is_ok() {
            memory.push((start, bytes, flags));
        }
    }
    memory
}

/// Where `needle` occurs in `memory`: each hit's address and whether its mapping is left
/// out of core dumps ("dd").
fn find(memory: &[(usize, Vec<u8>, Vec<String>)], needle: &[u8]) -> Vec<(usize, bool)> {
    let mut hits = Vec::new();
    for (start, bytes, flags) in memory {
        let dontdump = flags.iter().any(|f| f == "dd");
        for (at, window) in bytes.windows(needle.len()).enumerate() {
            if window[0] == needle[0] && window == needle {
                hits.push((start + at, dontdump));
            }
        }
    }
    hits
}

/// Reads the running daemon's whole memory (root can, whatever the dumpable flag says) and
/// looks for its keys: the master key, raw or in hex, must be nowhere (it is dropped once
/// the subkeys are derived, and every buffer it passed through was wiped); the subkeys and
/// the NBD pre-shared key must be found, and only in pages left out of core dumps.
#[test]
fn no_stray_copy_of_a_key_is_left_in_the_daemons_memory() {
    if !is_root() {
        // Another user's process of the same uid may not read a non-dumpable process:
        // that is the protection, and it leaves nothing to scan.
        eprintln!("not root: the daemon's memory cannot be read, which the other tests check");
        return;
    }
    let (ok, key_hex, err) = firn(&["keygen"]);
    assert!(ok, "{err}");
    let key_hex = key_hex.trim().to_string();
    let mut master = [0u8; 32];
    hex::decode_to_slice(&key_hex, &mut master).expect("keygen prints hex");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(
        dir.path(),
        port,
        &format!(
            "[keys]\nsource = \"env\"\n[nbd]\nlisten = \"127.0.0.1:{}\"\ntls = \"psk\"\n",
            free_port()
        ),
    );
    let mut command = serve(&config);
    command.env("FIRN_MASTER_KEY", &key_hex);
    let daemon = Daemon::spawn(command, port);

    let memory = memory_of(daemon.child.id());
    let scanned: usize = memory.iter().map(|(_, bytes, _)| bytes.len()).sum();
    assert!(scanned > 1 << 20, "only {scanned} bytes read");
    assert_eq!(find(&memory, &master), [], "the master key, raw");
    assert_eq!(
        find(&memory, key_hex.as_bytes()),
        [],
        "the master key, in hex"
    );
    assert_eq!(
        find(&memory, key_hex.to_uppercase().as_bytes()),
        [],
        "the master key, in upper-case hex"
    );
    for context in [
        "firn seal data key v1",
        "firn content address key v1",
        "firn volume sector key v1",
    ] {
        let subkey = blake3::derive_key(context, &master);
        let hits = find(&memory, &subkey);
        assert!(
            !hits.is_empty(),
            "{context}: not found, so the scan sees nothing"
        );
        assert!(
            hits.iter().all(|&(_, dontdump)| dontdump),
            "{context}: copies outside key pages at {hits:x?}"
        );
    }
    let psk_file =
        std::fs::read_to_string(dir.path().join("data/nbd-psk/keys.psk")).expect("psk file");
    let psk_hex = psk_file
        .trim()
        .rsplit_once(':')
        .map(|(_, key)| key.to_string())
        .expect("identity:key");
    let psk = hex::decode(&psk_hex).expect("hex");
    let hits = find(&memory, &psk);
    assert!(!hits.is_empty(), "the PSK is not found");
    assert!(
        hits.iter().all(|&(_, dontdump)| dontdump),
        "PSK copies outside key pages at {hits:x?}"
    );
    assert_eq!(find(&memory, psk_hex.as_bytes()), [], "the PSK file's text");
    assert!(daemon.stop().success());

    // A passphrase: neither it nor the key Argon2id makes of it stays behind.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "[keys]\nsource = \"passphrase\"\n");
    let phrase = "a passphrase to look for 0c7d52";
    let mut command = serve(&config);
    command.env("FIRN_PASSPHRASE", phrase);
    let daemon = Daemon::spawn(command, port);
    let memory = memory_of(daemon.child.id());
    let salt = std::fs::read_to_string(dir.path().join("data/passphrase.salt")).expect("salt");
    let params = argon2::Params::new(64 * 1024, 3, 1, Some(32)).expect("params");
    let mut master = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(phrase.as_bytes(), salt.trim().as_bytes(), &mut master)
        .expect("argon2");
    assert_eq!(find(&memory, phrase.as_bytes()), [], "the passphrase");
    assert_eq!(find(&memory, &master), [], "the stretched master key");
    let subkey = blake3::derive_key("firn seal data key v1", &master);
    let hits = find(&memory, &subkey);
    assert!(
        !hits.is_empty(),
        "the data key is not found: docs' parameters changed?"
    );
    assert!(hits.iter().all(|&(_, dontdump)| dontdump), "{hits:x?}");
    assert!(daemon.stop().success());
}

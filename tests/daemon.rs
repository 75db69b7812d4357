//! `firn serve`, `firn status` and the HTTP API, run as a user would: the real binary, a
//! config file, signals.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, FIRN, firn, free_port, write_config};

#[tokio::test]
async fn serve_status_api_and_clean_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let config_arg = config.to_str().expect("utf-8");
    let daemon = Daemon::start(&config, port, &[]);
    let banner = daemon.stdout.join("\n");
    assert!(banner.contains("DEVELOPMENT MODE"), "{banner}");
    assert!(
        banner.contains(&format!("http://127.0.0.1:{port}/metrics")),
        "{banner}"
    );
    let token = std::fs::read_to_string(dir.path().join("data/api-token")).expect("token file");
    assert!(
        banner.contains(token.trim()),
        "the first start shows the token"
    );

    // A reader that stops reading (`firn status | true`) ends the command quietly, by
    // SIGPIPE, as for any Unix tool: no panic.
    let piped = Command::new(FIRN)
        .args(["status", "--config", config_arg])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("firn status");
    let mut piped = piped;
    drop(piped.stdout.take());
    let piped = piped.wait_with_output().expect("firn status");
    let said = String::from_utf8_lossy(&piped.stderr);
    assert!(!said.contains("panicked"), "{said}");
    assert!(
        piped.status.success()
            || std::os::unix::process::ExitStatusExt::signal(&piped.status) == Some(13),
        "{:?}: {said}",
        piped.status
    );

    let http = reqwest::Client::new();
    let health = http
        .get(daemon.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    let anonymous = http
        .get(daemon.url("/api/v1/status"))
        .send()
        .await
        .expect("status");
    assert_eq!(anonymous.status(), 401);
    let wrong = http
        .get(daemon.url("/api/v1/status"))
        .bearer_auth("nope")
        .send()
        .await
        .expect("status");
    assert_eq!(wrong.status(), 401);
    let status: serde_json::Value = http
        .get(daemon.url("/api/v1/status"))
        .bearer_auth(token.trim())
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["remote"]["reachable"], true);
    assert!(status["local"]["free_bytes"].as_u64().expect("free") > 0);
    assert!(status["local"]["used_bytes"].as_u64().expect("used") > 0);

    let (ok, out, err) = firn(&["status", "--config", config_arg]);
    assert!(ok, "firn status failed: {err}");
    assert!(
        out.contains("reachable") && out.contains("local space"),
        "{out}"
    );

    let (ok, out, err) = firn(&["bandwidth", "--config", config_arg, "--upload", "20MiB"]);
    assert!(ok, "{err}");
    assert!(out.contains("upload 20MiB/s"), "{out}");
    let (_, out, _) = firn(&["status", "--config", config_arg, "--json"]);
    assert!(out.contains("\"upload_limit\": \"20MiB/s\""), "{out}");
    let bad = http
        .put(daemon.url("/api/v1/bandwidth"))
        .bearer_auth(token.trim())
        .body("{\"upload\": \"warp speed\"}")
        .send()
        .await
        .expect("put");
    assert_eq!(bad.status(), 400);
    let message = bad.text().await.expect("body");
    assert!(message.contains("warp speed"), "{message}");
    // Zero is not a synonym for unlimited any more; "paused" is explicit.
    let zero = http
        .put(daemon.url("/api/v1/bandwidth"))
        .bearer_auth(token.trim())
        .body("{\"upload\": \"0\"}")
        .send()
        .await
        .expect("put");
    assert_eq!(zero.status(), 400);
    let message = zero.text().await.expect("body");
    assert!(message.contains("paused"), "{message}");
    // A body that is not an object is refused, and the policy stays.
    let array = http
        .put(daemon.url("/api/v1/bandwidth"))
        .bearer_auth(token.trim())
        .body("[]")
        .send()
        .await
        .expect("put");
    assert_eq!(array.status(), 400);
    let (_, out, _) = firn(&["status", "--config", config_arg, "--json"]);
    assert!(out.contains("\"upload_limit\": \"20MiB/s\""), "{out}");
    let gone = http
        .delete(daemon.url("/api/v1/volumes/nosuch?force=true"))
        .bearer_auth(token.trim())
        .send()
        .await
        .expect("delete");
    assert_eq!(gone.status(), 404);
    // A query that does not parse gets the API's JSON error, as every other refusal; the
    // scheme of the Authorization header is case-insensitive.
    let odd = http
        .delete(daemon.url("/api/v1/volumes/nosuch?force=maybe"))
        .header("authorization", format!("bearer {}", token.trim()))
        .send()
        .await
        .expect("delete");
    assert_eq!(odd.status(), 400);
    let message: serde_json::Value = odd.json().await.expect("a JSON error");
    assert!(
        message["error"]
            .as_str()
            .is_some_and(|m| m.contains("force")),
        "{message}"
    );
    let (ok, out, err) = firn(&["bandwidth", "--config", config_arg, "--upload", "paused"]);
    assert!(ok, "{err}");
    assert!(out.contains("upload paused"), "{out}");
    // A token sent where it does not go is refused, and kept out of the audit log; a body
    // too large is refused, and recorded as refused.
    let misplaced = http
        .get(daemon.url(&format!("/api/v1/status?token={}", token.trim())))
        .send()
        .await
        .expect("get");
    assert_eq!(misplaced.status(), 401);
    // On a connection of its own: the server closes one whose body it did not read.
    let huge = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
        .post(daemon.url("/api/v1/volumes"))
        .bearer_auth(token.trim())
        .body(vec![b' '; 3 << 20])
        .send()
        .await
        .expect("post");
    assert_eq!(huge.status(), 413);

    let metrics = http
        .get(daemon.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("firn_remote_up 1"), "{metrics}");
    assert!(
        metrics.contains("firn_remote_requests_total{op=\"list\"}")
            || metrics.contains("firn_uptime_seconds"),
        "{metrics}"
    );

    // A second daemon on the same data directory is refused with a reason.
    let (ok, _, err) = firn(&["serve", "--config", config_arg]);
    assert!(!ok);
    assert!(err.contains("in use by another firn"), "{err}");

    let status = daemon.stop();
    assert!(status.success(), "firn exited with {status}");

    // Every API call above is in the audit log, fsynced, with its status.
    let (mut log, _) =
        firn::local::log::Log::open(dir.path().join("data/audit.log")).expect("audit log");
    let records: Vec<String> = log
        .iter()
        .expect("iter")
        .map(|r| String::from_utf8(r.expect("record").payload).expect("utf-8"))
        .collect();
    drop(log); // it holds the log's writer lock
    assert!(
        records.iter().any(|r| r.contains("\"status\":401")),
        "{records:?}"
    );
    assert!(
        !records.iter().any(|r| r.contains(token.trim())),
        "the token is in the audit log: {records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r.contains("\"refused\":\"body\"") && r.contains("\"status\":413")),
        "{records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r.contains("\"method\":\"PUT\"") && r.contains("bandwidth")),
        "{records:?}"
    );
    // A change's intent carries what it asked for: its query, its body.
    assert!(
        records.iter().any(
            |r| r.contains("\"path\":\"/api/v1/volumes/nosuch?force=true\"")
                && r.contains("\"status\":404")
        ),
        "{records:?}"
    );
    let asked: Vec<serde_json::Value> = records
        .iter()
        .map(|r| serde_json::from_str(r).expect("json"))
        .filter(|r: &serde_json::Value| r["phase"] == "intent" && r["path"] == "/api/v1/bandwidth")
        .collect();
    assert!(
        asked
            .iter()
            .any(|r| r["request"] == serde_json::json!({"upload": "warp speed"})),
        "{asked:?}"
    );

    // The second start reuses the token and does not show it again.
    let daemon = Daemon::start(&config, port, &[]);
    assert!(!daemon.stdout.join("\n").contains(token.trim()));
    assert!(daemon.stop().success());
}

/// Another program fills the data directory's disk: changes through the API are still
/// recorded and made, in the space the audit log keeps aside (a bandwidth change that resumes
/// paused uploads is what lets writers waiting for room go on).
#[test]
fn the_api_takes_changes_on_a_disk_another_program_filled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mnt, _teardown) = common::small_ext4(dir.path());
    let port = free_port();
    let config = write_config(&mnt, port, "");
    let daemon = Daemon::start(&config, port, &[]);
    let config_arg = config.to_str().expect("utf-8");
    let filler = mnt.join("filler");
    fill(&filler);
    for upload in ["paused", "unlimited", "paused", "unlimited"] {
        let (ok, out, err) = firn(&["bandwidth", "--config", config_arg, "--upload", upload]);
        assert!(ok, "bandwidth {upload} on a full disk: {out}{err}");
    }
    std::fs::remove_file(&filler).expect("rm filler");
    assert!(daemon.stop().success());
    let (mut log, _) = firn::local::log::Log::open(mnt.join("data/audit.log")).expect("audit log");
    let outcomes = log
        .iter()
        .expect("iter")
        .map(|r| String::from_utf8(r.expect("record").payload).expect("utf-8"))
        .filter(|r| r.contains("/api/v1/bandwidth") && r.contains("\"phase\":\"outcome\""))
        .count();
    assert_eq!(outcomes, 4, "the bandwidth changes' outcomes");
    drop(log);

    // A record torn by a crash, and the disk full again without the log's reserve: there is
    // no room to keep the damaged tail aside before cutting it. The daemon starts all the
    // same, answers reads, refuses changes (503) until there is room, then takes them.
    let audit = mnt.join("data/audit.log");
    let mut torn = std::fs::OpenOptions::new()
        .append(true)
        .open(&audit)
        .expect("audit log");
    std::io::Write::write_all(&mut torn, b"\xe1\0\0\0\x5f\x70\x60\0{\"call\":2,").expect("tear");
    drop(torn);
    let _ = std::fs::remove_file(mnt.join("data/audit.log.reserve"));
    fill(&filler);
    let daemon = Daemon::start(&config, port, &[]);
    let (ok, out, err) = firn(&["status", "--config", config_arg]);
    assert!(ok, "status on a full disk: {out}{err}");
    let (ok, out, err) = firn(&["bandwidth", "--config", config_arg, "--upload", "paused"]);
    assert!(
        !ok && err.contains("503"),
        "a change not recorded: {out}{err}"
    );
    std::fs::remove_file(&filler).expect("rm filler");
    let (ok, out, err) = firn(&["bandwidth", "--config", config_arg, "--upload", "unlimited"]);
    assert!(ok, "a change once there is room: {out}{err}");
    assert!(daemon.stop().success());
    let aside = std::fs::read_dir(mnt.join("data"))
        .expect("data dir")
        .filter(|e| {
            e.as_ref().is_ok_and(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("audit.log.damaged-")
            })
        })
        .count();
    assert_eq!(aside, 1, "the torn tail kept aside");
}

/// Fills the file system `path` is on with `path`.
fn fill(path: &std::path::Path) {
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![1u8; 1 << 20];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    for size in [4096, 1024] {
        while std::io::Write::write_all(&mut f, &chunk[..size]).is_ok() {}
    }
    let _ = f.sync_all();
    // Blocks of a small file system may be 1 KiB: small files take what is left.
    for n in 0..64 {
        let small = path.with_extension(n.to_string());
        if std::fs::write(&small, b"x").is_err() {
            let _ = std::fs::remove_file(&small);
            break;
        }
    }
}

/// A daemon on a config of its own with `extra` in it: its directory (to keep until the
/// end), config file, HTTP port and process.
fn started(extra: &str) -> (tempfile::TempDir, std::path::PathBuf, u16, Daemon) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, extra);
    let daemon = Daemon::start(&config, port, &[]);
    (dir, config, port, daemon)
}

#[test]
fn config_mistakes_get_one_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("[remote]\nkind = \"s3\"\nbuckett = \"x\"\n", "buckett"),
        ("[local]\nmax_bytes = \"plenty\"\n", "plenty"),
        ("[http]\nlisten = \"everywhere\"\n", "listen"),
        ("[remote]\nkind = \"s3\"\n", "bucket"),
        ("not toml at all [", "firn.toml"),
        (
            "[keys]\nsource = \"env\"\nenv = \"FIRN_TEST_UNSET_KEY\"\n",
            "FIRN_TEST_UNSET_KEY",
        ),
        ("[remote]\nupload_nice = 25\n", "upload_nice"),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("firn.toml");
        std::fs::write(&path, text).expect("write");
        let (ok, _, err) = firn(&["serve", "--config", path.to_str().expect("utf-8")]);
        assert!(!ok, "{text:?} was accepted");
        assert!(err.contains(expected), "{text:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{text:?}: {err}"
        );
        let errors = err.lines().filter(|l| l.starts_with("firn: ")).count();
        assert_eq!(errors, 1, "{text:?}: not one clear message: {err}");
    }
    let (ok, _, err) = firn(&["status", "--config", "/nonexistent/firn.toml"]);
    assert!(!ok && err.contains("/nonexistent/firn.toml"), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "said twice: {err}");
    // `firn remote` before any `firn serve` makes the data directory (the embedded
    // default's bucket is in it) as private as `serve` does.
    let path = dir.path().join("firn.toml");
    std::fs::write(&path, "[local]\ndata_dir = \"fresh\"\n").expect("write");
    let (ok, _, err) = firn(&["remote", "--config", path.to_str().expect("utf-8"), "ls"]);
    assert!(ok, "{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("fresh"))
        .expect("data dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "data dir mode {mode:o}");
}

/// The nice value of each of a process's threads, by thread name.
fn thread_nice_values(pid: u32) -> Vec<(String, i64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let task = task.expect("task").path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue; // the thread ended between the listing and the read
        };
        // After the ")" that closes the name: state is field 3, nice is field 19.
        let fields: Vec<&str> = stat[stat.rfind(')').expect("stat") + 2..]
            .split(' ')
            .collect();
        threads.push((comm.trim().to_string(), fields[16].parse().expect("nice")));
    }
    threads
}

#[test]
fn uploads_run_at_the_configured_lower_priority() {
    let (_dir, _, _, daemon) = started("[remote]\nupload_nice = 15\n");
    let threads = thread_nice_values(daemon.child.id());
    let (uploads, serving): (Vec<_>, Vec<_>) =
        threads.iter().partition(|(name, _)| name == "firn-upload");
    assert!(!uploads.is_empty(), "no upload threads: {threads:?}");
    assert!(uploads.iter().all(|(_, nice)| *nice == 15), "{threads:?}");
    assert!(serving.iter().all(|(_, nice)| *nice == 0), "{threads:?}");
    assert!(daemon.stop().success());
}

#[test]
fn an_unreachable_endpoint_is_named_and_the_gateway_keeps_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let dead = free_port();
    let config = write_config(
        dir.path(),
        port,
        &format!(
            "[remote]\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:{dead}\"\nbucket = \"b\"\naccess_key_id = \"k\"\nsecret_access_key = \"s\"\n"
        ),
    );
    let daemon = Daemon::start(&config, port, &[]);
    let banner = daemon.stdout.join("\n");
    assert!(
        banner.contains(&format!("http://127.0.0.1:{dead}")),
        "{banner}"
    );
    assert!(banner.contains("UNREACHABLE"), "{banner}");
    let (ok, out, err) = firn(&["status", "--config", config.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    assert!(out.contains("UNREACHABLE"), "{out}");
    assert!(daemon.stop().success());
}

/// The CLI talks to the daemon on this machine directly, whatever proxy the environment
/// names for the uplink: through one it failed, and handed the proxy its API token.
#[test]
fn the_cli_never_sends_its_token_through_a_proxy() {
    let (_dir, config, _, daemon) = started("");
    // A proxy that hangs up on whoever calls, and tells.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy_url = format!("http://{}", proxy.local_addr().expect("addr"));
    let called = Arc::new(AtomicBool::new(false));
    {
        let called = called.clone();
        std::thread::spawn(move || {
            for stream in proxy.incoming() {
                called.store(true, Ordering::SeqCst);
                drop(stream);
            }
        });
    }
    let mut status = Command::new(FIRN);
    status
        .args(["status", "--config", config.to_str().expect("utf-8")])
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .envs(
            ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
                .map(|var| (var, proxy_url.as_str())),
        );
    common::checked(status, "firn status");
    assert!(!called.load(Ordering::SeqCst), "the CLI called the proxy");
    assert!(daemon.stop().success());
}

#[test]
fn a_wrong_master_key_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, "[keys]\nsource = \"env\"\n");
    let key_a = "11".repeat(32);
    let key_b = "22".repeat(32);
    let daemon = Daemon::start(&config, port, &[("FIRN_MASTER_KEY", &key_a)]);
    assert!(!daemon.stdout.join("\n").contains("DEVELOPMENT MODE"));
    assert!(daemon.stop().success());
    assert!(
        !dir.path().join("data/dev-master-key").exists(),
        "no key material on disk"
    );

    let out = Command::new(FIRN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("FIRN_MASTER_KEY", &key_b)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not the one the data directory"), "{err}");

    let daemon = Daemon::start(&config, port, &[("FIRN_MASTER_KEY", &key_a)]);
    assert!(daemon.stop().success());
}

#[test]
fn remote_cli_rides_out_a_drilled_outage_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        free_port(),
        "[faults]\nerror_rate = 0.3\noutage_secs = 2\n",
    );
    let config = config.to_str().expect("utf-8");
    let source = dir.path().join("source");
    std::fs::create_dir_all(source.join("sub")).expect("mkdir");
    for i in 0..20 {
        std::fs::write(
            source.join("sub").join(format!("f{i}")),
            vec![i as u8; 1000 * i],
        )
        .expect("write");
    }
    let started = Instant::now();
    let (ok, out, err) = firn(&[
        "remote",
        "--config",
        config,
        "put",
        source.to_str().expect("utf-8"),
        "tree",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("uploaded 20 objects"), "{out}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "finished inside the outage"
    );
    let back = dir.path().join("back");
    let (ok, out, err) = firn(&[
        "remote",
        "--config",
        config,
        "get",
        "tree/",
        back.to_str().expect("utf-8"),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("downloaded 20 objects"), "{out}");
    for i in 0..20 {
        let name = format!("sub/f{i}");
        assert_eq!(
            std::fs::read(back.join(&name)).expect("read back"),
            std::fs::read(source.join(&name)).expect("read source"),
            "{name}"
        );
    }
    let (ok, out, _) = firn(&["remote", "--config", config, "ls", "tree/sub/f1"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 11, "f1, f10..f19: {out}");
}

/// Idle HTTP connections beyond the door's bound (256) wait in the kernel's backlog (128
/// more), not in the daemon: a local process holding hundreds of half-sent requests leaves
/// the daemon its
/// file descriptors, and the NBD door serves meanwhile. Once they close, the API answers.
#[test]
fn idle_http_connections_cannot_take_the_daemons_descriptors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, nbd) = (free_port(), free_port());
    let config = write_config(
        dir.path(),
        port,
        &format!("[nbd]\nlisten = \"127.0.0.1:{nbd}\"\n"),
    );
    let daemon = Daemon::start(&config, port, &[]);
    common::firn_ok(
        &config,
        &["volume", "create", "v", "--size", "1M", "--mode", "local"],
    );
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
            .expect("fds")
            .count()
    };
    let before = open_fds();
    let mut idle = Vec::new();
    for _ in 0..350 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        std::io::Write::write_all(&mut c, b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n")
            .expect("half a request");
        idle.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = open_fds();
    assert!(
        during < before + 300,
        "{before} descriptors before, {during} with 350 idle HTTP connections"
    );
    let size = common::run("nbdinfo", &["--size", &format!("nbd://127.0.0.1:{nbd}/v")]);
    assert_eq!(size.trim(), "1048576");
    drop(idle);
    let started = Instant::now();
    while !firn(&["status", "--config", config.to_str().expect("utf-8")]).0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the API did not answer after the idle connections closed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(daemon.stop().success());
}

/// Clients that trickle requests' heads, a byte a second, on every place the HTTP door has
/// (256) and more in the backlog, keep the API from nobody for long: a connection that has
/// not sent its whole head within 30 s is closed, and the API answers others meanwhile. So
/// is one that asks for answers and reads none of them.
#[test]
fn clients_trickling_request_heads_give_their_place_up() {
    let (_dir, config, port, daemon) = started("");
    let path = config.to_str().expect("utf-8").to_string();
    // Requests sent until the daemon stops reading them: its answers fill the buffers.
    let mut deaf = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    deaf.set_write_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let requests = b"GET /metrics HTTP/1.1\r\nHost: firn\r\n\r\n".repeat(64);
    let mut asked = 0;
    while std::io::Write::write_all(&mut deaf, &requests).is_ok() {
        asked += 64;
        assert!(
            asked < 1_000_000,
            "the daemon reads requests it cannot answer"
        );
    }
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        std::io::Write::write_all(&mut c, b"GET /api/v1/status HTTP/1.1\r\nX-Slow: ")
            .expect("the start of a head");
        slow.push(c);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // A byte a second on each, for as long as the daemon keeps them open.
            let mut open = slow.len();
            while !stop.load(Ordering::Relaxed) {
                open = 0;
                for c in &mut slow {
                    if std::io::Write::write_all(c, b"x").is_ok() {
                        open += 1;
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            open
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let mut status = Command::new(FIRN)
        .args(["status", "--config", &path])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("firn status");
    let answered = loop {
        if let Some(answered) = status.try_wait().expect("wait") {
            break answered;
        }
        if started.elapsed() > Duration::from_secs(45) {
            let _ = status.kill();
            panic!("the API did not answer within 45 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(answered.success(), "{answered:?}");
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let open = trickler.join().expect("trickler");
    // Writes to a closed connection fail from the second on; those accepted last may still
    // be within their 30 s.
    assert!(open < 100, "{open} of 300 trickling connections still open");
    // The deaf client, 30 s on: its connection was closed before all its answers went.
    deaf.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut answers = Vec::new();
    let ended = std::io::Read::read_to_end(&mut deaf, &mut answers);
    let answered = answers.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
    assert!(
        answered < asked,
        "all {asked} answers came ({ended:?}): the connection waited on its client"
    );
    assert!(daemon.stop().success());
}

/// Calls that cannot be done say why with the status that fits: a name taken (409), a
/// volume gone (404), a refresh of a path that is a file (400).
#[test]
fn refused_calls_get_the_status_that_fits() {
    let (dir, config, _, daemon) = started("");
    let path = config.to_str().expect("utf-8");
    let refused = |args: &[&str], status: &str| {
        let (ok, out, err) = firn(&[args, &["--config", path]].concat());
        assert!(
            !ok && err.contains(status),
            "{args:?}: wanted {status}: {out}{err}"
        );
    };
    common::firn_ok(&config, &["volume", "create", "v", "--size", "1M"]);
    refused(&["volume", "create", "v", "--size", "1M"], "409");
    refused(&["volume", "delete", "nowhere"], "404");
    common::firn_ok(&config, &["share", "create", "media"]);
    std::fs::create_dir_all(dir.path().join("data/bucket/media")).expect("mkdir");
    std::fs::write(dir.path().join("data/bucket/media/f.txt"), b"x").expect("object");
    common::firn_ok(&config, &["share", "refresh", "media"]);
    refused(&["share", "refresh", "media", "--path", "f.txt"], "400");
    assert!(daemon.stop().success());
}

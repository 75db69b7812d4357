//! Running the real `firn` binary in tests: a daemon with a config file, and one-shot
//! commands.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod powerloss;

pub const FIRN: &str = env!("CARGO_BIN_EXE_firn");

/// A port for a server a test starts, free now. Taken below the kernel's ephemeral range
/// (32768 and up here), where port 0 binds and outgoing connections land, so that neither
/// another test's listener nor some client's connection takes it before the server binds;
/// never the same twice in one test process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        let port = rand::random_range(20_000..32_000);
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub stdout: Vec<String>,
}

impl Daemon {
    /// Starts `firn serve` and waits for its banner.
    pub fn start(config: &Path, port: u16, env: &[(&str, &str)]) -> Daemon {
        let mut command = Command::new(FIRN);
        command
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().copied());
        Daemon::spawn(command, port)
    }

    /// Starts `command` (a `firn serve` with its arguments, environment and user already set)
    /// and waits for its banner.
    pub fn spawn(command: Command, port: u16) -> Daemon {
        match Daemon::try_spawn(command, port) {
            Ok(daemon) => daemon,
            Err(stdout) => panic!("firn did not start: {stdout:?}"),
        }
    }

    /// `start`, or what the daemon printed when it exited before its banner.
    pub fn try_start(
        config: &Path,
        port: u16,
        env: &[(&str, &str)],
    ) -> Result<Daemon, Vec<String>> {
        let mut command = Command::new(FIRN);
        command
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().copied());
        Daemon::try_spawn(command, port)
    }

    /// `start`, with the daemon's stderr written to `log` instead of the test's.
    pub fn start_logged(config: &Path, port: u16, log: &Path) -> Daemon {
        let mut command = Command::new(FIRN);
        command.args(["serve", "--config"]).arg(config);
        let log = std::fs::File::create(log).expect("create the log");
        match Daemon::try_spawn_to(command, port, log.into()) {
            Ok(daemon) => daemon,
            Err(stdout) => panic!("firn did not start: {stdout:?}"),
        }
    }

    /// `spawn`, or what the daemon printed when it exited before its banner.
    pub fn try_spawn(command: Command, port: u16) -> Result<Daemon, Vec<String>> {
        Daemon::try_spawn_to(command, port, Stdio::inherit())
    }

    /// `try_spawn`, the daemon's stderr going to `stderr`.
    fn try_spawn_to(mut command: Command, port: u16, stderr: Stdio) -> Result<Daemon, Vec<String>> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn firn");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut stdout = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("read stdout");
            let done = line.starts_with("Press Ctrl-C");
            stdout.push(line);
            if done {
                break;
            }
        }
        if !stdout.iter().any(|l| l.starts_with("Press Ctrl-C")) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(stdout);
        }
        // Keep draining stdout so the daemon never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Daemon {
            child,
            port,
            stdout,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// SIGTERM, and the exit status.
    pub fn stop(self) -> std::process::ExitStatus {
        self.stop_within(Duration::from_secs(10))
    }

    /// SIGTERM, and the exit status, which must come within `limit`.
    pub fn stop_within(mut self, limit: Duration) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("kill");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(started.elapsed() < limit, "firn ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let path = dir.join("firn.toml");
    // Tests run side by side: every daemon gets its own NBD port too.
    let nbd = if extra.contains("[nbd]") {
        String::new()
    } else {
        format!("[nbd]\nlisten = \"127.0.0.1:{}\"\n", free_port())
    };
    // No NFS server unless the test asks for one: they would all want port 2049.
    let nfs = if extra.contains("[nfs]") {
        ""
    } else {
        "[nfs]\nlisten = \"\"\n"
    };
    std::fs::write(
        &path,
        format!(
            "[local]\ndata_dir = \"data\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n{nbd}{nfs}{extra}"
        ),
    )
    .expect("write config");
    path
}

/// `firn <args> --config <config>`, which must succeed: its stdout.
pub fn firn_ok(config: &Path, args: &[&str]) -> String {
    let mut full = args.to_vec();
    full.extend(["--config", config.to_str().expect("utf-8")]);
    let (ok, out, err) = firn(&full);
    assert!(ok, "firn {args:?}: {err}");
    out
}

pub fn firn(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(FIRN).args(args).output().expect("run firn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Daemon {
    /// kill -9: no chance to flush or clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a real client or tool and returns its stdout; panics, with its output, unless it
/// succeeds.
/// GET /metrics of the daemon whose HTTP API listens on `port` (it needs no token).
pub fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: firn\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("response");
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
}

/// One sample's value from an OpenMetrics text, which must have it.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (is it installed? scripts/test installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Undoes, in reverse order, what a test set up, even when it fails halfway.
pub struct Teardown(pub Vec<Box<dyn FnOnce()>>);

impl Drop for Teardown {
    fn drop(&mut self) {
        while let Some(undo) = self.0.pop() {
            undo();
        }
    }
}

/// A 32 MiB ext4 file system mounted (through a loop device) at `dir/mnt`, for tests of a
/// full disk; the returned teardown unmounts it.
pub fn small_ext4(dir: &Path) -> (PathBuf, Teardown) {
    ext4_of(dir, 32)
}

/// As `small_ext4`, `mib` MiB large.
pub fn ext4_of(dir: &Path, mib: u64) -> (PathBuf, Teardown) {
    let image = dir.join("small-fs.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(mib << 20))
        .expect("image");
    run(
        "mkfs.ext4",
        &["-q", "-m", "0", image.to_str().expect("utf-8")],
    );
    mount_image(&image, dir)
}

/// Mounts the file system image `image` (through a loop device) at `dir/mnt`; the returned
/// teardown unmounts it.
pub fn mount_image(image: &Path, dir: &Path) -> (PathBuf, Teardown) {
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let mnt_arg = mnt.to_str().expect("utf-8").to_string();
    run(
        "mount",
        &["-o", "loop", image.to_str().expect("utf-8"), &mnt_arg],
    );
    let teardown = Teardown(vec![Box::new(move || {
        let _ = Command::new("umount").arg(&mnt_arg).status();
    })]);
    (mnt, teardown)
}

/// Garage's address and key from the environment (`scripts/test` sets them), each call under
/// a prefix of its own; `None` outside CI when they are not set.
pub fn s3_options() -> Option<firn::remote::s3::S3Options> {
    let var = |name: &str| std::env::var(name).ok();
    let Some(endpoint) = var("FIRN_TEST_S3_ENDPOINT") else {
        assert!(
            var("CI").is_none(),
            "CI must run against Garage: FIRN_TEST_S3_ENDPOINT is not set (run scripts/test)"
        );
        eprintln!("FIRN_TEST_S3_ENDPOINT not set: skipping the S3 backend");
        return None;
    };
    let mut id = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
    Some(firn::remote::s3::S3Options {
        endpoint: Some(endpoint),
        bucket: var("FIRN_TEST_S3_BUCKET").expect("FIRN_TEST_S3_BUCKET"),
        region: var("FIRN_TEST_S3_REGION").unwrap_or_else(|| "garage".to_string()),
        // Each test run writes under its own prefix.
        prefix: format!("test-{}", hex::encode(id)),
        path_style: true,
        access_key_id: var("FIRN_TEST_S3_ACCESS_KEY_ID"),
        secret_access_key: var("FIRN_TEST_S3_SECRET_ACCESS_KEY"),
        checksum: true,
        multipart_threshold: 6 << 20,
        part_size: 5 << 20,
        part_concurrency: 4,
        request_timeout: Duration::from_secs(30),
        server_side_encryption: None,
        sse_kms_key_id: None,
    })
}

/// Every key under `prefix/` as boto3 lists it (its own decoding of the wire format), sorted.
pub fn boto3_keys(prefix: &str) -> Vec<String> {
    let script = r#"
import json, os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["FIRN_TEST_S3_ENDPOINT"],
    region_name=os.environ.get("FIRN_TEST_S3_REGION", "garage"),
    aws_access_key_id=os.environ["FIRN_TEST_S3_ACCESS_KEY_ID"],
    aws_secret_access_key=os.environ["FIRN_TEST_S3_SECRET_ACCESS_KEY"])
keys = []
for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=os.environ["FIRN_TEST_S3_BUCKET"], Prefix=sys.argv[1]):
    keys += [o["Key"] for o in page.get("Contents", [])]
print(json.dumps(sorted(keys)))
"#;
    serde_json::from_slice(&boto3(script, &[prefix])).expect("boto3 printed JSON")
}

/// Puts `body` at `key` of the test bucket with boto3, with user metadata `meta` (sent as
/// `x-amz-meta-*` headers, as AWS's file tools write them).
pub fn boto3_put(key: &str, body: &[u8], meta: &[(&str, &str)]) {
    let script = r#"
import json, os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["FIRN_TEST_S3_ENDPOINT"],
    region_name=os.environ.get("FIRN_TEST_S3_REGION", "garage"),
    aws_access_key_id=os.environ["FIRN_TEST_S3_ACCESS_KEY_ID"],
    aws_secret_access_key=os.environ["FIRN_TEST_S3_SECRET_ACCESS_KEY"])
s3.put_object(Bucket=os.environ["FIRN_TEST_S3_BUCKET"], Key=sys.argv[1],
    Body=bytes.fromhex(sys.argv[2]), Metadata=json.loads(sys.argv[3]))
"#;
    let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
    let meta: serde_json::Map<String, serde_json::Value> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    boto3(
        script,
        &[key, &hex, &serde_json::Value::Object(meta).to_string()],
    );
}

/// rclone against the test Garage (configured from the environment); its stdout.
pub fn rclone(args: &[&str]) -> Vec<u8> {
    let var = |name: &str| std::env::var(name).expect(name);
    let mut command = std::process::Command::new("rclone");
    command
        .args(args)
        .env_remove("AWS_CA_BUNDLE")
        .env("RCLONE_CONFIG_GARAGE_TYPE", "s3")
        .env("RCLONE_CONFIG_GARAGE_PROVIDER", "Other")
        .env(
            "RCLONE_CONFIG_GARAGE_ENDPOINT",
            var("FIRN_TEST_S3_ENDPOINT"),
        )
        .env("RCLONE_CONFIG_GARAGE_REGION", var("FIRN_TEST_S3_REGION"))
        .env(
            "RCLONE_CONFIG_GARAGE_ACCESS_KEY_ID",
            var("FIRN_TEST_S3_ACCESS_KEY_ID"),
        )
        .env(
            "RCLONE_CONFIG_GARAGE_SECRET_ACCESS_KEY",
            var("FIRN_TEST_S3_SECRET_ACCESS_KEY"),
        )
        .env("RCLONE_CONFIG_GARAGE_FORCE_PATH_STYLE", "true");
    checked(command, &format!("rclone {args:?}")).stdout
}

/// s3cmd against the test Garage (configured from the environment, no config file); its
/// stdout and stderr.
pub fn s3cmd(args: &[&str]) -> String {
    let var = |name: &str| std::env::var(name).expect(name);
    let endpoint = var("FIRN_TEST_S3_ENDPOINT");
    let host = endpoint.trim_start_matches("http://");
    let mut command = std::process::Command::new("s3cmd");
    command
        .args([
            "--no-ssl",
            "--config=/dev/null",
            &format!("--host={host}"),
            &format!("--host-bucket={host}"),
            &format!("--access_key={}", var("FIRN_TEST_S3_ACCESS_KEY_ID")),
            &format!("--secret_key={}", var("FIRN_TEST_S3_SECRET_ACCESS_KEY")),
            &format!("--region={}", var("FIRN_TEST_S3_REGION")),
        ])
        .args(args)
        .env_remove("AWS_CA_BUNDLE");
    let out = checked(command, &format!("s3cmd {args:?}"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `command` (named `what` in messages), which must succeed; its output.
pub fn checked(mut command: Command, what: &str) -> std::process::Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (scripts/test installs it)"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Downloads `key` of the test bucket with boto3 into `to`: false if there is no such object.
pub fn boto3_get(key: &str, to: &Path) -> bool {
    let script = r#"
import os, sys, boto3, botocore
s3 = boto3.client("s3", endpoint_url=os.environ["FIRN_TEST_S3_ENDPOINT"],
    region_name=os.environ.get("FIRN_TEST_S3_REGION", "garage"),
    aws_access_key_id=os.environ["FIRN_TEST_S3_ACCESS_KEY_ID"],
    aws_secret_access_key=os.environ["FIRN_TEST_S3_SECRET_ACCESS_KEY"])
try:
    s3.download_file(os.environ["FIRN_TEST_S3_BUCKET"], sys.argv[1], sys.argv[2])
    print("found")
except botocore.exceptions.ClientError as e:
    if e.response["Error"]["Code"] not in ("404", "NoSuchKey"):
        raise
    print("missing")
"#;
    let out = boto3(script, &[key, to.to_str().expect("utf-8")]);
    String::from_utf8_lossy(&out).trim() == "found"
}

/// The `[remote]` section of a gateway on the test Garage, under a prefix of its own (its
/// object keys start with it and `/`), or `None` outside CI without one.
pub fn garage_remote() -> Option<(String, String)> {
    let options = s3_options()?;
    let section = format!(
        "[remote]\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\n\
         access_key_id = \"{}\"\nsecret_access_key = \"{}\"\nprefix = \"{}\"\n",
        options.endpoint.clone().unwrap_or_default(),
        options.bucket,
        options.region,
        options.access_key_id.clone().unwrap_or_default(),
        options.secret_access_key.clone().unwrap_or_default(),
        options.prefix,
    );
    Some((section, options.prefix.clone()))
}

/// Runs a Python script that uses boto3 (`python3 -c script args...`), which must succeed;
/// its stdout. Without `AWS_CA_BUNDLE`, which breaks clients of plain-HTTP endpoints.
pub fn boto3(script: &str, args: &[&str]) -> Vec<u8> {
    let mut command = std::process::Command::new("python3");
    command
        .arg("-c")
        .arg(script)
        .args(args)
        .env_remove("AWS_CA_BUNDLE");
    checked(command, "a boto3 script").stdout
}

/// The bucket a moto server (`Moto::start`) holds.
pub const MOTO_BUCKET: &str = "firn-test";

/// A moto S3 server on loopback holding the bucket `MOTO_BUCKET`; killed on drop.
pub struct Moto {
    child: std::process::Child,
    pub endpoint: String,
}

impl Moto {
    /// None (skipping) when moto is not installed, outside CI; in CI it must be.
    pub fn start() -> Option<Moto> {
        let installed = std::process::Command::new("moto_server")
            .arg("--help")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                std::env::var("CI").is_err(),
                "CI must run the moto test: moto_server is not installed (scripts/test installs it)"
            );
            eprintln!("moto_server not installed (pip install 'moto[server]'): skipping");
            return None;
        }
        let port = free_port();
        let child = std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server");
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "moto_server did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = |args: &[&str]| moto.put(args);
        let bucket = format!("{}/{MOTO_BUCKET}", moto.endpoint);
        assert_eq!(status(&[&bucket]), "200", "creating the bucket");
        // The store must refuse a second create for the fencing under test to exist at all.
        let probe = format!("{bucket}/conditional-probe");
        let create = ["-H", "If-None-Match: *", "--data", "x", probe.as_str()];
        assert_eq!(status(&create), "200", "a first create");
        assert_eq!(
            status(&create),
            "412",
            "this moto does not refuse a second PutObject with If-None-Match: *"
        );
        Some(moto)
    }
}

impl Moto {
    /// A signed PUT to moto with curl's `args` (the URL last); the HTTP status. Signed: moto
    /// answers an unsigned conditional put with 403.
    pub fn put(&self, args: &[&str]) -> String {
        let mut full = vec![
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            "test:test",
        ];
        full.extend_from_slice(args);
        run("curl", &full)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The scripted NFSv3 client of the tests (`nfs3_client`), over TCP.
pub type NfsClient =
    nfs3_client::Nfs3Connection<nfs3_client::tokio::TokioIo<tokio::net::TcpStream>>;

/// LOOKUP of `name` in directory `dir` through the scripted client.
pub async fn nfs_lookup(
    c: &mut NfsClient,
    dir: &nfs3_types::nfs3::nfs_fh3,
    name: &str,
) -> nfs3_types::nfs3::LOOKUP3res {
    use nfs3_types::nfs3::*;
    c.lookup(&LOOKUP3args {
        what: diropargs3 {
            dir: dir.clone(),
            name: filename3::from(name.as_bytes().to_vec()),
        },
    })
    .await
    .expect("rpc")
}

/// Makes file `name` in directory `dir` through the scripted client (GUARDED); its handle.
pub async fn nfs_create(
    c: &mut NfsClient,
    dir: &nfs3_types::nfs3::nfs_fh3,
    name: &str,
) -> nfs3_types::nfs3::nfs_fh3 {
    use nfs3_types::nfs3::*;
    let made = c
        .create(&CREATE3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: filename3::from(name.as_bytes().to_vec()),
            },
            how: createhow3::GUARDED(sattr3::default()),
        })
        .await
        .expect("rpc");
    let Nfs3Result::Ok(made) = made else {
        panic!("create {name}: {made:?}")
    };
    made.obj.unwrap()
}

/// Makes file `name` in directory `dir` through the scripted client, writes `data` to it
/// (UNSTABLE) and, with `commit`, commits it; its handle.
pub async fn nfs_new_file(
    c: &mut NfsClient,
    dir: &nfs3_types::nfs3::nfs_fh3,
    name: &str,
    data: &[u8],
    commit: bool,
) -> nfs3_types::nfs3::nfs_fh3 {
    use nfs3_types::nfs3::*;
    use nfs3_types::xdr_codec::Opaque;
    let file = nfs_create(c, dir, name).await;
    let written = c
        .write(&WRITE3args {
            file: file.clone(),
            offset: 0,
            count: data.len() as u32,
            stable: stable_how::UNSTABLE,
            data: Opaque::borrowed(data),
        })
        .await
        .expect("rpc");
    assert!(matches!(written, Nfs3Result::Ok(_)), "write {name}");
    if commit {
        let committed = c
            .commit(&COMMIT3args {
                file: file.clone(),
                offset: 0,
                count: 0,
            })
            .await
            .expect("rpc");
        assert!(matches!(committed, Nfs3Result::Ok(_)), "commit {name}");
    }
    file
}

/// A scripted client mounting `/share` from the NFS server on `port` (MOUNT and NFS on one
/// port), calling as `uid`/`gid`.
pub async fn nfs_client(port: u16, share: &str, uid: u32, gid: u32) -> NfsClient {
    use nfs3_types::xdr_codec::{Opaque, Pack};
    let auth = nfs3_types::rpc::auth_unix {
        stamp: 1,
        machinename: Opaque::owned(b"test".to_vec()),
        uid,
        gid,
        gids: vec![gid],
    };
    let mut body = Vec::new();
    auth.pack(&mut body).expect("pack");
    nfs3_client::Nfs3ConnectionBuilder::new(
        nfs3_client::tokio::TokioConnector,
        "127.0.0.1",
        format!("/{share}"),
    )
    .connect_from_privileged_port(false)
    .mount_port(port)
    .nfs3_port(port)
    .credential(nfs3_types::rpc::opaque_auth {
        flavor: nfs3_types::rpc::auth_flavor::AUTH_UNIX,
        body: Opaque::owned(body),
    })
    .mount()
    .await
    .expect("mount")
}

/// A loop device over a FUSE export of `fs` (through qemu-storage-daemon), its teardown
/// inside.
pub struct LoopDevice {
    pub dev: String,
    /// The files written through the mount, `f0` to `f7`.
    pub files: Vec<Vec<u8>>,
    _teardown: Teardown,
}

/// mkfs.ext4 on NBD export `export` (`size` bytes) of the server at unix socket `socket`,
/// through qemu-storage-daemon's FUSE export and a loop device, with its mount points in
/// `work`; files written through the mount read back after an unmount (which flushes
/// them) and `e2fsck -n`. The loop device stays attached (unmounted) for the caller.
pub fn ext4_on(socket: &Path, export: &str, size: u64, work: &Path) -> LoopDevice {
    let image = work.join("fuse-image");
    std::fs::write(&image, b"").expect("mountpoint file");
    let mut teardown = Teardown(Vec::new());
    let mut qsd = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=nbd,node-name=n0,discard=unmap,server.type=unix,server.path={},export={export}",
            socket.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=fuse,id=e0,node-name=n0,mountpoint={},writable=on",
            image.display()
        ))
        .spawn()
        .expect("qemu-storage-daemon (from qemu-utils)");
    let started = std::time::Instant::now();
    while std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0) != size {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the FUSE export did not appear"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mountpoint = image.clone();
    teardown.0.push(Box::new(move || {
        // SIGTERM, so that the daemon takes its FUSE export down as it exits (killed, it
        // would leave the mount behind); then a lazy unmount in case it could not.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(qsd.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = qsd.wait();
        let _ = Command::new("fusermount3")
            .args(["-u", "-z", "-q"])
            .arg(&mountpoint)
            .status();
    }));
    let image_arg = image.to_str().expect("utf-8").to_string();
    let loop_dev = run("losetup", &["-f", "--show", &image_arg])
        .trim()
        .to_string();
    let detach = loop_dev.clone();
    teardown.0.push(Box::new(move || {
        let _ = Command::new("losetup").args(["-d", &detach]).status();
    }));
    run("mkfs.ext4", &["-q", &loop_dev]);
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let mnt_arg = mnt.to_str().expect("utf-8").to_string();
    run("mount", &[&loop_dev, &mnt_arg]);
    let unmount = mnt_arg.clone();
    teardown.0.push(Box::new(move || {
        let _ = Command::new("umount").arg(&unmount).status();
    }));
    let mut files = Vec::new();
    for i in 0..8 {
        let mut data = vec![0u8; 1 << (12 + i)];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut data);
        std::fs::write(mnt.join(format!("f{i}")), &data).expect("write through ext4");
        files.push(data);
    }
    run("umount", &[&mnt_arg]);
    run("e2fsck", &["-fn", &loop_dev]);
    run("mount", &[&loop_dev, &mnt_arg]);
    for (i, data) in files.iter().enumerate() {
        assert!(
            std::fs::read(mnt.join(format!("f{i}"))).expect("read back") == *data,
            "f{i} differs"
        );
    }
    run("umount", &[&mnt_arg]);
    LoopDevice {
        dev: loop_dev,
        files,
        _teardown: teardown,
    }
}

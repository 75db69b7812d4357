//! The NFSv3 door with clients firn did not write: libnfs's `nfs-cp`, `nfs-ls` and `nfs-cat`,
//! and the `nfs3_client` crate as a scripted client for what those tools cannot do (mkdir,
//! rename, symlinks, attributes, hostile names). Files land as plain objects in the bucket;
//! handles outlive a restart while the write verifier changes; malformed RPCs get errors and
//! the server keeps serving; a share's allowlist holds.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nfs3_types::nfs3::*;
use nfs3_types::xdr_codec::Opaque;
use rand::RngCore;

mod common;
use common::{Daemon, free_port, write_config};

/// A gateway with the NFS door on a port of its own and the bucket in a directory.
struct Gateway {
    dir: tempfile::TempDir,
    config: PathBuf,
    nfs_port: u16,
    daemon: Option<Daemon>,
    http_port: u16,
}

impl Gateway {
    fn start() -> Gateway {
        Gateway::start_with("")
    }

    /// A gateway whose config ends with `extra`.
    fn start_with(extra: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let (http_port, nfs_port) = (free_port(), free_port());
        let config = write_config(
            dir.path(),
            http_port,
            &format!(
                "[nfs]\nlisten = \"127.0.0.1:{nfs_port}\"\n[shares]\nsettle_secs = 1\n{extra}"
            ),
        );
        let mut g = Gateway {
            dir,
            config,
            nfs_port,
            daemon: None,
            http_port,
        };
        g.restart();
        g
    }

    fn restart(&mut self) {
        self.daemon = None;
        self.daemon = Some(Daemon::start(&self.config, self.http_port, &[]));
    }

    fn firn(&self, args: &[&str]) -> String {
        common::firn_ok(&self.config, args)
    }

    fn url(&self, path: &str) -> String {
        format!(
            "nfs://127.0.0.1/{path}?nfsport={0}&mountport={0}",
            self.nfs_port
        )
    }

    /// The directory that stands in for the bucket.
    fn bucket(&self) -> PathBuf {
        self.config.parent().expect("dir").join("data/bucket")
    }

    fn show(&self, share: &str) -> serde_json::Value {
        serde_json::from_str(&self.firn(&["share", "show", share])).expect("json")
    }

    /// Waits for the share's first refresh from the bucket (it runs as the share opens), so
    /// that what a test puts into the bucket next is left for the refresh it asks for.
    fn wait_refreshed(&self, share: &str) {
        let started = Instant::now();
        while self.show(share)["status"]["last_refresh"].is_null() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no refresh as the share opened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the share has nothing left to upload or delete.
    fn wait_uploaded(&self, share: &str) {
        let started = Instant::now();
        loop {
            let status = &self.show(share)["status"];
            if status["dirty_files"] == 0
                && status["pending_deletes"] == 0
                && status["uploading_files"] == 0
            {
                return;
            }
            // Generous: under injected errors a thousand uploads retry on a loaded machine.
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "not uploaded: {status}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A plain TCP connection to the NFS port, reads timing out after 10 s.
    fn connect(&self) -> std::net::TcpStream {
        let stream = std::net::TcpStream::connect(("127.0.0.1", self.nfs_port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream
    }

    /// A scripted client on `/share`, calling as `uid`/`gid`.
    async fn client(&self, share: &str, uid: u32, gid: u32) -> Client {
        common::nfs_client(self.nfs_port, share, uid, gid).await
    }
}

fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/test installs libnfs-utils)"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(path, &data).expect("write");
    data
}

fn xattr(path: &Path, name: &str) -> Option<String> {
    xattr::get(path, format!("user.firn.{name}"))
        .ok()
        .flatten()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

#[test]
fn libnfs_tools_copy_files_in_and_out_and_they_land_as_objects() {
    let g = Gateway::start();
    g.firn(&["share", "create", "media"]);
    let listed = g.firn(&["share", "list"]);
    assert!(
        listed.contains("media") && listed.contains("prefix media/"),
        "{listed}"
    );
    let local = g.dir.path().join("local");
    std::fs::create_dir(&local).expect("mkdir");
    let big = random_file(&local.join("big.bin"), 9 << 20);
    let small = random_file(&local.join("small.txt"), 100);
    for name in ["big.bin", "small.txt"] {
        let (ok, _, err) = run(
            "nfs-cp",
            &[
                local.join(name).to_str().expect("utf-8"),
                &g.url(&format!("media/{name}")),
            ],
        );
        assert!(ok, "nfs-cp {name}: {err}");
    }
    let (ok, listing, err) = run("nfs-ls", &[&g.url("media")]);
    assert!(ok, "nfs-ls: {err}");
    assert!(
        listing.contains("big.bin") && listing.contains("small.txt"),
        "{listing}"
    );
    let cat = std::process::Command::new("nfs-cat")
        .arg(g.url("media/small.txt"))
        .output()
        .expect("nfs-cat");
    assert!(cat.status.success(), "nfs-cat: {:?}", cat.stderr);
    assert_eq!(cat.stdout, small);
    let back = local.join("back.bin");
    let (ok, _, err) = run(
        "nfs-cp",
        &[&g.url("media/big.bin"), back.to_str().expect("utf-8")],
    );
    assert!(ok, "nfs-cp out: {err}");
    assert!(
        std::fs::read(&back).expect("read") == big,
        "big.bin read back differs"
    );

    g.wait_uploaded("media");
    let object = g.bucket().join("media/big.bin");
    assert!(
        std::fs::read(&object).expect("object") == big,
        "the object differs from the file"
    );
    assert_eq!(
        std::fs::read(g.bucket().join("media/small.txt")).expect("object"),
        small
    );
    // Root squashed to nobody; the mode nfs-cp asked for; a regular file.
    // The directory store keeps an object's metadata in `user.firn.<name>` attributes.
    let permissions = xattr(&object, "file-permissions").expect("file-permissions");
    assert!(permissions.starts_with("100"), "{permissions}");
    assert_eq!(xattr(&object, "file-owner").as_deref(), Some("65534"));
    assert_eq!(xattr(&object, "file-group").as_deref(), Some("65534"));
    assert!(xattr(&object, "file-mtime").is_some_and(|t| t.ends_with("ns")));
    let status = &g.show("media")["status"];
    assert_eq!(status["uploaded_files"], 2, "{status}");
    let (ok, metrics, err) = run(
        "curl",
        &["-fsS", &format!("http://127.0.0.1:{}/metrics", g.http_port)],
    );
    assert!(ok, "metrics: {err}");
    let value = |line_start: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in the metrics"))
    };
    assert!(value("firn_nfs_calls_total{procedure=\"write\"}") >= 10.0);
    assert!(value("firn_nfs_calls_total{procedure=\"mount\"}") >= 1.0);
    assert!(metrics.contains("firn_nfs_call_seconds_bucket{"));
    assert_eq!(
        value("firn_share_uploaded_files_total{share=\"media\"}"),
        2.0
    );
    assert_eq!(value("firn_share_dirty_files{share=\"media\"}"), 0.0);
    // Every read was of a file on local disk.
    assert_eq!(
        value("firn_share_cache_hit_percent{share=\"media\"}"),
        100.0
    );
    assert!(value("firn_share_cached_bytes{share=\"media\"}") > 0.0);
    // When each file reached the bucket, for workflows waiting on them.
    let uploads = g.firn(&["share", "uploads", "media"]);
    let keys: Vec<&str> = uploads
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert_eq!(keys.len(), 2, "{uploads}");
    assert!(
        keys.contains(&"media/big.bin") && keys.contains(&"media/small.txt"),
        "{uploads}"
    );
    let first: u64 = uploads
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("seq");
    let later = g.firn(&["share", "uploads", "media", "--after", &first.to_string()]);
    assert_eq!(later.lines().count(), 1, "{later}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_client_works_the_namespace_and_gets_clear_errors() {
    let g = Gateway::start();
    g.firn(&[
        "share",
        "create",
        "work",
        "--prefix",
        "teams/work/",
        "--squash",
        "none",
    ]);
    let mut c = g.client("work", 1000, 100).await;
    let root = c.root_nfs_fh3();
    let dirop = |dir: &nfs_fh3, name: &str| diropargs3 {
        dir: dir.clone(),
        name: filename3::from(name.as_bytes().to_vec()),
    };
    let sattr = |mode: u32| sattr3 {
        mode: Nfs3Option::Some(mode),
        ..sattr3::default()
    };
    // mkdir a; create a/f; write and commit.
    let a = match c
        .mkdir(&MKDIR3args {
            where_: dirop(&root, "a"),
            attributes: sattr(0o750),
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => ok.obj.unwrap(),
        Nfs3Result::Err((e, _)) => panic!("mkdir: {e:?}"),
    };
    let f = match c
        .create(&CREATE3args {
            where_: dirop(&a, "f.txt"),
            how: createhow3::GUARDED(sattr(0o640)),
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => ok.obj.unwrap(),
        Nfs3Result::Err((e, _)) => panic!("create: {e:?}"),
    };
    let data = b"written through NFS\n".repeat(1000);
    let verf = match c
        .write(&WRITE3args {
            file: f.clone(),
            offset: 0,
            count: data.len() as u32,
            stable: stable_how::UNSTABLE,
            data: Opaque::borrowed(&data),
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => {
            assert_eq!(ok.count as usize, data.len());
            ok.verf
        }
        Nfs3Result::Err((e, _)) => panic!("write: {e:?}"),
    };
    match c
        .commit(&COMMIT3args {
            file: f.clone(),
            offset: 0,
            count: 0,
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => assert_eq!(ok.verf, verf, "the verifier changed without a restart"),
        Nfs3Result::Err((e, _)) => panic!("commit: {e:?}"),
    }
    // A guarded create of an existing name, and names no file can have.
    let exists = c
        .create(&CREATE3args {
            where_: dirop(&a, "f.txt"),
            how: createhow3::GUARDED(sattr(0o640)),
        })
        .await
        .expect("rpc");
    assert!(matches!(
        exists,
        Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _))
    ));
    // An EXCLUSIVE create sent again with its verifier (its reply was lost) gets the file it
    // made; with another verifier, EXIST.
    let exclusive = |verf: [u8; 8]| CREATE3args {
        where_: dirop(&a, "x.txt"),
        how: createhow3::EXCLUSIVE(createverf3(verf)),
    };
    let mut made = Vec::new();
    for verf in [*b"verifier", *b"verifier", *b"another!"] {
        made.push(match c.create(&exclusive(verf)).await.expect("rpc") {
            Nfs3Result::Ok(ok) => Ok(ok.obj),
            Nfs3Result::Err((e, _)) => Err(e),
        });
    }
    assert!(made[0].is_ok(), "{made:?}");
    assert_eq!(made[1], made[0], "a retransmitted EXCLUSIVE create");
    assert_eq!(made[2], Err(nfsstat3::NFS3ERR_EXIST));
    let removed = c
        .remove(&REMOVE3args {
            object: dirop(&a, "x.txt"),
        })
        .await
        .expect("rpc");
    assert!(matches!(removed, Nfs3Result::Ok(_)));
    let long = "x".repeat(300);
    for (name, want) in [
        ("..", nfsstat3::NFS3ERR_INVAL),
        ("a/b", nfsstat3::NFS3ERR_INVAL),
        (long.as_str(), nfsstat3::NFS3ERR_NAMETOOLONG),
    ] {
        let made = c
            .create(&CREATE3args {
                where_: dirop(&root, name),
                how: createhow3::UNCHECKED(sattr(0o644)),
            })
            .await
            .expect("rpc");
        match made {
            Nfs3Result::Err((e, _)) => assert_eq!(e, want, "{name:?}"),
            Nfs3Result::Ok(_) => panic!("{name:?} was created"),
        }
    }
    let bad_utf8 = c
        .mkdir(&MKDIR3args {
            where_: diropargs3 {
                dir: root.clone(),
                name: filename3::from(vec![0xff, 0xfe]),
            },
            attributes: sattr(0o755),
        })
        .await
        .expect("rpc");
    assert!(matches!(
        bad_utf8,
        Nfs3Result::Err((nfsstat3::NFS3ERR_INVAL, _))
    ));
    // Hard links and device nodes cannot be objects.
    let link = c
        .link(&LINK3args {
            file: f.clone(),
            link: dirop(&root, "hard"),
        })
        .await
        .expect("rpc");
    assert!(matches!(
        link,
        Nfs3Result::Err((nfsstat3::NFS3ERR_NOTSUPP, _))
    ));
    // A symlink, kept as it is (firn never follows it).
    let target = "../../outside/etc/passwd";
    let s = match c
        .symlink(&SYMLINK3args {
            where_: dirop(&a, "link"),
            symlink: symlinkdata3 {
                symlink_attributes: sattr3::default(),
                symlink_data: nfspath3::from(target.as_bytes().to_vec()),
            },
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => ok.obj.unwrap(),
        Nfs3Result::Err((e, _)) => panic!("symlink: {e:?}"),
    };
    match c
        .readlink(&READLINK3args { symlink: s })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => assert_eq!(ok.data.as_ref(), target.as_bytes()),
        Nfs3Result::Err((e, _)) => panic!("readlink: {e:?}"),
    }
    // Rename the directory: its files move in the bucket.
    match c
        .rename(&RENAME3args {
            from: dirop(&root, "a"),
            to: dirop(&root, "b"),
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(_) => {}
        Nfs3Result::Err((e, _)) => panic!("rename: {e:?}"),
    }
    // The handle follows the file; READDIRPLUS lists the directory with attributes.
    match c
        .getattr(&GETATTR3args { object: f.clone() })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => {
            assert_eq!(ok.obj_attributes.size, data.len() as u64);
            assert_eq!(ok.obj_attributes.mode, 0o640);
            assert_eq!(ok.obj_attributes.uid, 1000);
            assert_eq!(ok.obj_attributes.gid, 100);
        }
        Nfs3Result::Err((e, _)) => panic!("getattr: {e:?}"),
    }
    let b = match c
        .lookup(&LOOKUP3args {
            what: dirop(&root, "b"),
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => ok.object,
        Nfs3Result::Err((e, _)) => panic!("lookup: {e:?}"),
    };
    match c
        .readdirplus(&READDIRPLUS3args {
            dir: b.clone(),
            cookie: 0,
            cookieverf: cookieverf3::default(),
            dircount: 4096,
            maxcount: 8192,
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => {
            let names: Vec<String> = ok
                .reply
                .entries
                .0
                .iter()
                .map(|e| String::from_utf8_lossy(e.name.as_ref()).into_owned())
                .collect();
            assert_eq!(names, ["f.txt", "link"]);
            assert!(ok.reply.eof);
        }
        Nfs3Result::Err((e, _)) => panic!("readdirplus: {e:?}"),
    }
    let not_empty = c
        .rmdir(&RMDIR3args {
            object: dirop(&root, "b"),
        })
        .await
        .expect("rpc");
    assert!(matches!(
        not_empty,
        Nfs3Result::Err((nfsstat3::NFS3ERR_NOTEMPTY, _))
    ));

    g.wait_uploaded("work");
    let bucket = g.bucket();
    assert_eq!(
        std::fs::read(bucket.join("teams/work/b/f.txt")).expect("moved object"),
        data
    );
    assert!(
        !bucket.join("teams/work/a/f.txt").exists(),
        "the old object stayed"
    );
    assert_eq!(
        std::fs::read(bucket.join("teams/work/b/link")).expect("symlink object"),
        target.as_bytes()
    );
    // Nothing escaped the prefix: the symlink is an object, never followed.
    assert!(!bucket.join("outside").exists());

    // Remove everything: the objects go too.
    for name in ["f.txt", "link"] {
        match c
            .remove(&REMOVE3args {
                object: dirop(&b, name),
            })
            .await
            .expect("rpc")
        {
            Nfs3Result::Ok(_) => {}
            Nfs3Result::Err((e, _)) => panic!("remove {name}: {e:?}"),
        }
    }
    g.wait_uploaded("work");
    assert!(!bucket.join("teams/work/b/f.txt").exists());
    assert!(!bucket.join("teams/work/b/link").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_outlive_a_restart_and_the_write_verifier_does_not() {
    let mut g = Gateway::start();
    g.firn(&["share", "create", "keep"]);
    let mut c = g.client("keep", 0, 0).await;
    let root = c.root_nfs_fh3();
    let f = match c
        .create(&CREATE3args {
            where_: diropargs3 {
                dir: root.clone(),
                name: filename3::from(b"file".to_vec()),
            },
            how: createhow3::UNCHECKED(sattr3::default()),
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => ok.obj.unwrap(),
        Nfs3Result::Err((e, _)) => panic!("create: {e:?}"),
    };
    let before = match c
        .write(&WRITE3args {
            file: f.clone(),
            offset: 0,
            count: 5,
            stable: stable_how::FILE_SYNC,
            data: Opaque::borrowed(b"hello"),
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => ok.verf,
        Nfs3Result::Err((e, _)) => panic!("write: {e:?}"),
    };
    drop(c);
    g.restart();
    let mut c = g.client("keep", 0, 0).await;
    // The old handle, from before the restart.
    match c
        .read(&READ3args {
            file: f.clone(),
            offset: 0,
            count: 100,
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => {
            assert_eq!(ok.data.as_ref(), b"hello");
            assert!(ok.eof);
        }
        Nfs3Result::Err((e, _)) => panic!("read with a handle from before the restart: {e:?}"),
    }
    match c
        .commit(&COMMIT3args {
            file: f,
            offset: 0,
            count: 0,
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => assert_ne!(ok.verf, before, "the verifier survived a restart"),
        Nfs3Result::Err((e, _)) => panic!("commit: {e:?}"),
    }
    // A handle of a share that does not exist is stale, and a made-up one bad.
    let mut other = root.data.to_vec();
    other[1] ^= 0xff;
    let stale = c
        .getattr(&GETATTR3args {
            object: nfs_fh3 {
                data: Opaque::owned(other),
            },
        })
        .await
        .expect("rpc");
    assert!(matches!(
        stale,
        Nfs3Result::Err((nfsstat3::NFS3ERR_STALE, _))
    ));
    let bad = c
        .getattr(&GETATTR3args {
            object: nfs_fh3 {
                data: Opaque::owned(vec![9; 7]),
            },
        })
        .await
        .expect("rpc");
    assert!(matches!(
        bad,
        Nfs3Result::Err((nfsstat3::NFS3ERR_BADHANDLE, _))
    ));
}

/// SETATTR's owner, group, times and size reach the file and its object's metadata; a
/// guard that no longer matches is NOT_SYNC and changes nothing; FSSTAT, FSINFO and PATHCONF
/// answer what the share can hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setattr_and_the_file_system_calls_answer_as_nfs_says() {
    let g = Gateway::start_with("max_file_size = \"1MiB\"\n");
    g.firn(&["share", "create", "attrs", "--squash", "none"]);
    let mut c = g.client("attrs", 0, 0).await;
    let root = c.root_nfs_fh3();
    let f = common::nfs_create(&mut c, &root, "f").await;
    assert!(matches!(
        write_sync(&mut c, &f, 0, &[7u8; 10_000]).await,
        Nfs3Result::Ok(_)
    ));
    let before = getattr(&mut c, &f).await;
    let (atime, mtime) = (
        nfstime3 {
            seconds: 1_600_000_000,
            nseconds: 5,
        },
        nfstime3 {
            seconds: 1_650_000_000,
            nseconds: 7,
        },
    );
    let set = |guard: Option<nfstime3>| SETATTR3args {
        object: f.clone(),
        new_attributes: sattr3 {
            uid: Nfs3Option::Some(1234),
            gid: Nfs3Option::Some(99),
            size: Nfs3Option::Some(100),
            atime: set_atime::SET_TO_CLIENT_TIME(atime),
            mtime: set_mtime::SET_TO_CLIENT_TIME(mtime),
            ..sattr3::default()
        },
        guard: guard.map_or(Nfs3Option::None, Nfs3Option::Some),
    };
    // A guard of another ctime: refused, nothing changed.
    let stale = nfstime3 {
        seconds: before.ctime.seconds.wrapping_sub(100),
        nseconds: 0,
    };
    assert!(matches!(
        c.setattr(&set(Some(stale))).await.expect("rpc"),
        Nfs3Result::Err((nfsstat3::NFS3ERR_NOT_SYNC, _))
    ));
    let unchanged = getattr(&mut c, &f).await;
    assert_eq!((unchanged.size, unchanged.uid), (10_000, 0));
    // The right guard: everything at once.
    assert!(matches!(
        c.setattr(&set(Some(before.ctime))).await.expect("rpc"),
        Nfs3Result::Ok(_)
    ));
    let after = getattr(&mut c, &f).await;
    assert_eq!(
        (after.size, after.uid, after.gid, after.atime, after.mtime),
        (100, 1234, 99, atime, mtime)
    );
    let read = c
        .read(&READ3args {
            file: f.clone(),
            offset: 0,
            count: 1 << 20,
        })
        .await
        .expect("rpc");
    let Nfs3Result::Ok(read) = read else {
        panic!("read")
    };
    assert!(read.eof && read.data.as_ref() == [7u8; 100], "truncated");
    // The object carries them.
    let _ = c
        .commit(&COMMIT3args {
            file: f.clone(),
            offset: 0,
            count: 0,
        })
        .await
        .expect("rpc");
    g.wait_uploaded("attrs");
    let object = g.bucket().join("attrs/f");
    assert_eq!(std::fs::metadata(&object).expect("object").len(), 100);
    for (name, value) in [
        ("file-owner", "1234"),
        ("file-group", "99"),
        ("file-mtime", "1650000000000000007ns"),
        ("file-atime", "1600000000000000005ns"),
        ("file-permissions", "100644"),
    ] {
        assert_eq!(xattr(&object, name).as_deref(), Some(value), "{name}");
    }
    // What the share can hold.
    let Nfs3Result::Ok(stat) = c
        .fsstat(&FSSTAT3args {
            fsroot: root.clone(),
        })
        .await
        .expect("rpc")
    else {
        panic!("fsstat")
    };
    assert!(stat.tbytes > 0 && stat.fbytes <= stat.tbytes && stat.abytes <= stat.fbytes);
    let Nfs3Result::Ok(info) = c
        .fsinfo(&FSINFO3args {
            fsroot: root.clone(),
        })
        .await
        .expect("rpc")
    else {
        panic!("fsinfo")
    };
    assert!(info.rtmax >= 65536 && info.wtmax >= 65536, "{info:?}");
    assert_eq!(info.maxfilesize, 1 << 20, "[shares] max_file_size");
    // Past it: FBIG, nothing changed (a far write would cost an upload of that size).
    assert!(matches!(
        write_sync(&mut c, &f, (1 << 20) - 1, b"xy").await,
        Nfs3Result::Err((nfsstat3::NFS3ERR_FBIG, _))
    ));
    let mut grow = set(None);
    grow.new_attributes = sattr3 {
        size: Nfs3Option::Some((1 << 20) + 1),
        ..sattr3::default()
    };
    assert!(matches!(
        c.setattr(&grow).await.expect("rpc"),
        Nfs3Result::Err((nfsstat3::NFS3ERR_FBIG, _))
    ));
    assert_eq!(getattr(&mut c, &f).await.size, 100);
    assert!(matches!(
        write_sync(&mut c, &f, (1 << 20) - 1, b"z").await,
        Nfs3Result::Ok(_)
    ));
    let Nfs3Result::Ok(conf) = c
        .pathconf(&PATHCONF3args { object: root })
        .await
        .expect("rpc")
    else {
        panic!("pathconf")
    };
    assert_eq!((conf.name_max, conf.no_trunc), (255, true));
}

/// `firn share delete` refuses while files wait to go up (they would be lost), deletes with
/// `--force`; the objects stay in the bucket, the share's local files go, and its name can
/// be used again, for a share that starts empty of local state.
#[test]
fn deleting_a_share_keeps_its_objects_and_refuses_while_files_wait() {
    let g = Gateway::start();
    g.firn(&["share", "create", "gone"]);
    let id = g.show("gone")["id"].as_str().expect("id").to_string();
    let local = g.dir.path().join("local");
    std::fs::create_dir_all(&local).expect("mkdir");
    let kept = random_file(&local.join("kept.bin"), 50_000);
    copy_in(&local.join("kept.bin"), &g.url("gone/kept.bin"));
    g.wait_uploaded("gone");
    g.firn(&["bandwidth", "--upload", "paused"]);
    random_file(&local.join("waiting.bin"), 1000);
    copy_in(&local.join("waiting.bin"), &g.url("gone/waiting.bin"));
    let config = g.config.to_str().expect("utf-8");
    let (ok, _, err) = common::firn(&["share", "delete", "gone", "--config", config]);
    assert!(!ok && err.contains("not yet in the bucket"), "{err}");
    assert!(g.firn(&["share", "list"]).contains("gone"));
    g.firn(&["share", "delete", "gone", "--force"]);
    assert!(!g.firn(&["share", "list"]).contains("gone"));
    let (ok, _, _) = run("nfs-ls", &[&g.url("gone")]);
    assert!(!ok, "a deleted share still mounts");
    assert_eq!(
        std::fs::read(g.bucket().join("gone/kept.bin")).expect("the object stayed"),
        kept
    );
    assert!(!g.bucket().join("gone/waiting.bin").exists());
    let share_dir = g.dir.path().join("data/shares").join(&id);
    assert!(!share_dir.exists(), "{} stayed", share_dir.display());
    // The name again: a new share, which finds the objects (its own refresh as it opens, and
    // the one asked for, which waits for it).
    g.firn(&["bandwidth", "--upload", "unlimited"]);
    g.firn(&["share", "create", "gone"]);
    assert_ne!(g.show("gone")["id"].as_str(), Some(id.as_str()));
    g.firn(&["share", "refresh", "gone"]);
    let (ok, listed, err) = run("nfs-ls", &[&g.url("gone")]);
    assert!(ok, "{err}");
    assert!(
        listed.contains("kept.bin") && !listed.contains("waiting.bin"),
        "{listed}"
    );
}

/// Four clients write at once: each its own 25 files in one directory, and two of them the
/// two halves of one shared file, 64 KiB at a time. Every object in the bucket is its file
/// whole, the shared one both halves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_each_land_whole() {
    let g = Gateway::start();
    g.firn(&["share", "create", "busy"]);
    let mut c = g.client("busy", 1000, 1000).await;
    let root = c.root_nfs_fh3();
    let shared = common::nfs_create(&mut c, &root, "shared.bin").await;
    const HALF: usize = 1 << 20;
    let half = |w: usize| -> Vec<u8> { (0..HALF).map(|i| (i * 7 + w * 101) as u8).collect() };
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4usize {
        let (port, root, shared) = (g.nfs_port, root.clone(), shared.clone());
        writers.spawn(async move {
            let mut c = common::nfs_client(port, "busy", 1000, 1000).await;
            let mut files = Vec::new();
            let mine = (w < 2).then(|| half(w));
            for i in 0..25usize {
                let name = format!("w{w}-{i}.bin");
                let data = vec![(w * 25 + i) as u8; 1000 + i * 997 + w * 131];
                common::nfs_new_file(&mut c, &root, &name, &data, true).await;
                files.push((name, data));
                // Between files, a piece of this writer's half of the shared file.
                if let Some(mine) = &mine {
                    for at in (i * HALF / 25..(i + 1) * HALF / 25).step_by(65536) {
                        let end = (at + 65536).min((i + 1) * HALF / 25);
                        let offset = (w * HALF + at) as u64;
                        assert!(matches!(
                            write_sync(&mut c, &shared, offset, &mine[at..end]).await,
                            Nfs3Result::Ok(_)
                        ));
                    }
                }
            }
            files
        });
    }
    let mut files = Vec::new();
    while let Some(written) = writers.join_next().await {
        files.extend(written.expect("writer"));
    }
    let _ = c
        .commit(&COMMIT3args {
            file: shared,
            offset: 0,
            count: 0,
        })
        .await
        .expect("rpc");
    g.wait_uploaded("busy");
    let objects = g.bucket().join("busy");
    for (name, data) in &files {
        let stored = std::fs::read(objects.join(name)).expect(name);
        assert!(stored == *data, "{name} differs in the bucket");
    }
    let stored = std::fs::read(objects.join("shared.bin")).expect("shared.bin");
    assert!(
        stored.len() == 2 * HALF && stored[..HALF] == half(0)[..] && stored[HALF..] == half(1)[..],
        "the shared file is not both halves"
    );
    assert_eq!(std::fs::read_dir(&objects).expect("list").count(), 101);
}

/// A file's attributes by the scripted client.
async fn getattr(c: &mut Client, file: &nfs_fh3) -> fattr3 {
    match c
        .getattr(&GETATTR3args {
            object: file.clone(),
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => ok.obj_attributes,
        Nfs3Result::Err((e, _)) => panic!("getattr: {e:?}"),
    }
}

/// Sends one RPC record and reads one back (or `None` if the server closed).
fn exchange(port: u16, record: &[u8]) -> Option<Vec<u8>> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    round_trip(&mut stream, record)
}

/// Sends one RPC record on `stream` and reads one back (or `None` if the server closed).
fn round_trip(stream: &mut std::net::TcpStream, record: &[u8]) -> Option<Vec<u8>> {
    let mut framed = (0x8000_0000u32 | record.len() as u32)
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(record);
    stream.write_all(&framed).ok()?;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).ok()?;
    let len = (u32::from_be_bytes(header) & 0x7fff_ffff) as usize;
    let mut reply = vec![0; len];
    stream.read_exact(&mut reply).ok()?;
    Some(reply)
}

/// An RPC call header: xid 7, AUTH_NULL.
fn call(prog: u32, vers: u32, proc: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for word in [7u32, 0, 2, prog, vers, proc, 0, 0, 0, 0] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out
}

/// The accept status of an accepted reply (the word after the verifier).
fn accept_status(reply: &[u8]) -> u32 {
    assert_eq!(&reply[..4], &7u32.to_be_bytes(), "xid");
    assert_eq!(&reply[8..12], &0u32.to_be_bytes(), "accepted");
    u32::from_be_bytes(reply[20..24].try_into().expect("status"))
}

#[test]
fn malformed_calls_get_errors_and_the_server_keeps_serving() {
    let g = Gateway::start();
    g.firn(&["share", "create", "media"]);
    let port = g.nfs_port;
    // Unknown program, wrong version, unknown procedure, arguments cut short.
    assert_eq!(
        accept_status(&exchange(port, &call(200_000, 3, 0)).expect("reply")),
        1
    );
    assert_eq!(
        accept_status(&exchange(port, &call(100_003, 2, 0)).expect("reply")),
        2
    );
    assert_eq!(
        accept_status(&exchange(port, &call(100_003, 3, 99)).expect("reply")),
        3
    );
    let mut short = call(100_003, 3, 1);
    short.extend_from_slice(&[0, 0, 0, 200, 1, 2]);
    assert_eq!(accept_status(&exchange(port, &short).expect("reply")), 4);
    // Garbage, and a record header announcing 2 GiB: no reply, the connection goes.
    assert!(exchange(port, b"not an rpc call at all").is_none());
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .write_all(&0xffff_ffffu32.to_be_bytes())
        .expect("write");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    assert!(matches!(stream.read(&mut byte), Ok(0) | Err(_)));
    // The server still serves.
    let (ok, _, err) = run("nfs-ls", &[&g.url("media")]);
    assert!(ok, "nfs-ls after the bad calls: {err}");
}

/// One NULL call on an open connection: its reply, `None` if the server closed it.
fn null_call(stream: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    round_trip(stream, &call(100_003, 3, 0))
}

#[test]
fn connections_past_the_limit_from_one_address_are_closed() {
    let g = Gateway::start();
    g.firn(&["share", "create", "media"]);
    let connect = || g.connect();
    // 32 connections from one address are served; the 33rd is closed at once.
    let mut held: Vec<_> = (0..32).map(|_| connect()).collect();
    for stream in &mut held {
        assert_eq!(accept_status(&null_call(stream).expect("a reply")), 0);
    }
    let mut extra = connect();
    assert!(
        null_call(&mut extra).is_none(),
        "a 33rd connection was served"
    );
    // Once one closes, a new one is served again.
    drop(held.pop());
    let started = Instant::now();
    loop {
        if let Some(reply) = null_call(&mut connect()) {
            assert_eq!(accept_status(&reply), 0);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no room again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client that no share admits gets no connection at all: it could mount nothing, but
/// could hold the door's connections and calls from the clients that can.
#[test]
fn a_client_no_share_admits_gets_no_connection() {
    let g = Gateway::start();
    g.firn(&["share", "create", "closed", "--allow", "10.9.0.0/16"]);
    let connect = || g.connect();
    assert!(
        null_call(&mut connect()).is_none(),
        "a client no share admits was served"
    );
    g.firn(&["share", "create", "open"]);
    assert_eq!(
        accept_status(&null_call(&mut connect()).expect("a reply")),
        0
    );
}

#[test]
fn a_share_allowlist_keeps_other_clients_out() {
    let g = Gateway::start();
    g.firn(&["share", "create", "closed", "--allow", "10.9.0.0/16"]);
    g.firn(&["share", "create", "open"]);
    let (ok, _, _) = run("nfs-ls", &[&g.url("closed")]);
    assert!(!ok, "a client outside the allowlist mounted the share");
    let (ok, _, err) = run("nfs-ls", &[&g.url("open")]);
    assert!(ok, "nfs-ls open: {err}");
    let (ok, _, _) = run("nfs-ls", &[&g.url("missing")]);
    assert!(!ok, "a share that does not exist mounted");
}

use common::NfsClient as Client;

/// A FILE_SYNC write by the scripted client.
async fn write_sync(c: &mut Client, file: &nfs_fh3, offset: u64, data: &[u8]) -> WRITE3res {
    c.write(&WRITE3args {
        file: file.clone(),
        offset,
        count: data.len() as u32,
        stable: stable_how::FILE_SYNC,
        data: Opaque::borrowed(data),
    })
    .await
    .expect("rpc")
}

/// nfs-cp of a local file into `url`.
fn copy_in(local: &Path, url: &str) {
    let (ok, _, err) = run("nfs-cp", &[local.to_str().expect("utf-8"), url]);
    assert!(ok, "nfs-cp {}: {err}", local.display());
}

#[test]
fn a_gateway_killed_during_an_upload_uploads_the_file_whole_after_restart() {
    let g = Gateway::start();
    let object = g.bucket().join("media/big.bin");
    killed_during_an_upload(g, |_: &Gateway, to: &Path| {
        std::fs::copy(&object, to).is_ok()
    });
}

/// The same against Garage: the kill lands in the middle of a multipart upload.
#[test]
fn a_gateway_killed_during_a_multipart_upload_to_s3_uploads_the_file_whole_after_restart() {
    let Some((remote, prefix)) = common::garage_remote() else {
        return;
    };
    // Parts of 5 MiB: the 24 MiB file goes up in five.
    let g = Gateway::start_with(&format!(
        "{remote}multipart_threshold = \"8MiB\"\npart_size = \"5MiB\"\n"
    ));
    killed_during_an_upload(g, move |_: &Gateway, to: &Path| {
        common::boto3_get(&format!("{prefix}/media/big.bin"), to)
    });
}

/// A 24 MiB file goes up at 2 MiB/s; the gateway is killed mid-upload and restarted. No
/// partial object was stored, and after the restart the object is the file. `fetch` copies
/// the object to a path, false if there is none.
fn killed_during_an_upload(mut g: Gateway, fetch: impl Fn(&Gateway, &Path) -> bool) {
    g.firn(&["share", "create", "media"]);
    // Slow uploads, so the kill lands in the middle of one.
    g.firn(&["bandwidth", "--upload", "2MiB"]);
    let local = g.dir.path().join("big.bin");
    let data = random_file(&local, 24 << 20);
    copy_in(&local, &g.url("media/big.bin"));
    let fetched = g.dir.path().join("fetched.bin");
    // Settled after a second; then about twelve seconds of upload.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !fetch(&g, &fetched),
        "uploaded already: the kill would not land mid-upload"
    );
    g.daemon.take().expect("daemon").kill9();
    assert!(!fetch(&g, &fetched), "a partial object is in the bucket");
    // The bandwidth limit was the running daemon's; the restarted one has none.
    g.restart();
    g.wait_uploaded("media");
    assert!(fetch(&g, &fetched), "no object after the restart");
    assert!(
        std::fs::read(&fetched).expect("object") == data,
        "the object is not the file"
    );
    let (ok, listing, err) = run("nfs-ls", &[&g.url("media")]);
    assert!(ok && listing.contains("big.bin"), "{listing} {err}");
}

/// Bytes of the files under `root`.
fn local_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// The BLAKE3 hash of everything `read` yields, read 8 MiB at a time.
fn hash_stream(mut read: impl std::io::Read) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0; 8 << 20];
    loop {
        let n = read.read(&mut buf).expect("read");
        if n == 0 {
            return hasher.finalize();
        }
        hasher.update(&buf[..n]);
    }
}

#[test]
fn a_file_of_several_gib_lands_whole_and_reads_back_after_eviction() {
    // Past 4 GiB, so offsets that do not fit 32 bits are exercised on both paths.
    const SIZE: u64 = (4 << 30) + (300 << 20) + 12345;
    let g = Gateway::start_with("cache_max = \"1MiB\"\n");
    g.firn(&["share", "create", "media"]);
    let local = g.dir.path().join("huge.bin");
    let written = {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&local).expect("create"));
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0; 8 << 20];
        let mut left = SIZE;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rand::rng().fill_bytes(&mut buf[..n]);
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).expect("write");
            left -= n as u64;
        }
        out.flush().expect("flush");
        hasher.finalize()
    };
    copy_in(&local, &g.url("media/huge.bin"));
    std::fs::remove_file(&local).expect("remove the local copy");
    g.wait_uploaded("media");
    let object = g.bucket().join("media/huge.bin");
    assert_eq!(std::fs::metadata(&object).expect("object").len(), SIZE);
    assert_eq!(
        hash_stream(std::fs::File::open(&object).expect("object")),
        written,
        "the object is not the file"
    );
    // Past cache_max, the file's content is evicted; read back through NFS, it is fetched
    // a verified block at a time.
    let files = g.dir.path().join("data/shares");
    let started = Instant::now();
    while local_bytes(&files) > 64 << 20 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not evicted: {} bytes",
            local_bytes(&files)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut cat = std::process::Command::new("nfs-cat")
        .arg(g.url("media/huge.bin"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("nfs-cat (scripts/test installs libnfs-utils)");
    let read = hash_stream(cat.stdout.take().expect("stdout"));
    assert!(cat.wait().expect("nfs-cat").success(), "nfs-cat failed");
    assert_eq!(read, written, "read back differs");
    // Fetched a block at a time, about once each: with 1 MiB of cache the part file is
    // evicted every 2 s under the reader, losing the blocks fetched ahead of it (the slower
    // the reader, the more often: 14% more on a machine busy with other tests).
    let status = &g.show("media")["status"];
    let downloaded = status["downloaded_bytes"]
        .as_u64()
        .expect("downloaded_bytes");
    assert!(
        (SIZE..=SIZE + SIZE / 4).contains(&downloaded),
        "{downloaded} bytes fetched to read {SIZE}: {status}"
    );
    assert!(status["cache_misses"].as_u64() >= Some(1), "{status}");
}

#[test]
fn a_stop_while_uploads_are_paused_is_prompt_and_places_no_object() {
    let mut g = Gateway::start();
    g.firn(&["share", "create", "media"]);
    g.firn(&["bandwidth", "--upload", "paused"]);
    let local = g.dir.path().join("f.bin");
    let data = random_file(&local, 3 << 20);
    copy_in(&local, &g.url("media/f.bin"));
    // Settled after a second: its upload then waits for the paused uplink.
    std::thread::sleep(Duration::from_secs(3));
    let daemon = g.daemon.take().expect("running");
    assert!(daemon.stop_within(Duration::from_secs(15)).success());
    // The waiting upload gave up cleanly: no object, and no staged part of one (a thread
    // that died waiting would have left its staging file).
    let object = g.bucket().join("media/f.bin");
    assert!(!object.exists(), "uploaded while paused");
    let staged: Vec<_> = std::fs::read_dir(g.bucket().join(".firn-staging"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(staged.is_empty(), "left staged: {staged:?}");
    // The bandwidth policy was the stopped daemon's: after a start the file goes up.
    g.restart();
    g.wait_uploaded("media");
    assert!(std::fs::read(&object).expect("object") == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_copied_through_store_errors_and_an_outage_arrives_whole() {
    // The first 5 s of the daemon's life the bucket is out, then 10% of requests fail.
    let g = Gateway::start_with("[faults]\nerror_rate = 0.1\noutage_secs = 5\n");
    g.firn(&["share", "create", "tree"]);
    // Ten thousand small files through the scripted client, committed one by one.
    let mut c = g.client("tree", 0, 0).await;
    let root = c.root_nfs_fh3();
    let mut files = Vec::new();
    for i in 0..10_000usize {
        let name = format!("f{i:04}.dat");
        let mut data = vec![0u8; 100 + (i % 1000) * 7];
        rand::rng().fill_bytes(&mut data);
        common::nfs_new_file(&mut c, &root, &name, &data, true).await;
        files.push((name, data));
    }
    // Also nfs-cp, a client of its own, during the errors.
    let local = g.dir.path().join("one.bin");
    let one = random_file(&local, 3 << 20);
    copy_in(&local, &g.url("tree/one.bin"));
    files.push(("one.bin".to_string(), one));
    g.wait_uploaded("tree");
    for (name, data) in &files {
        let object = g.bucket().join("tree").join(name);
        assert!(
            std::fs::read(&object).ok().as_ref() == Some(data),
            "{name} did not arrive whole"
        );
    }
    let status = &g.show("tree")["status"];
    assert!(
        status["uploaded_files"]
            .as_u64()
            .is_some_and(|n| n >= 10_001),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_taken_over_during_an_upload_holds_the_new_files_bytes() {
    // Every request of the share is slow and half fail (before or after the store took the
    // put), so an upload retried lands more than once, and late.
    let g = Gateway::start_with(
        "[faults]\nerror_rate = 0.5\nlatency_ms = 300\nonly_keys = \"race/\"\n",
    );
    g.firn(&["share", "create", "race"]);
    let mut c = g.client("race", 0, 0).await;
    let root = c.root_nfs_fh3();
    let dirop = |name: &str| diropargs3 {
        dir: root.clone(),
        name: filename3::from(name.as_bytes().to_vec()),
    };
    let mut expected = Vec::new();
    for i in 0..16 {
        // f{i} goes up, is renamed away while its put is on the way, and a new f{i} is
        // committed at once: the bucket must end with the new one's bytes at f{i}.
        let mut old = vec![0u8; 5000];
        rand::rng().fill_bytes(&mut old);
        let new = format!("new file {i}").into_bytes();
        let (name, moved) = (format!("f{i}"), format!("moved{i}"));
        common::nfs_new_file(&mut c, &root, &name, &old, true).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let renamed = c
            .rename(&RENAME3args {
                from: dirop(&name),
                to: dirop(&moved),
            })
            .await
            .expect("rpc");
        assert!(matches!(renamed, Nfs3Result::Ok(_)), "rename {name}");
        common::nfs_new_file(&mut c, &root, &name, &new, true).await;
        expected.push((name, new));
        expected.push((moved, old));
    }
    tokio::task::block_in_place(|| g.wait_uploaded("race"));
    let bucket = g.bucket().join("race");
    let mut found: Vec<String> = std::fs::read_dir(&bucket)
        .expect("bucket")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut names: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(
        found, names,
        "the bucket holds the share's files, no others"
    );
    for (name, data) in &expected {
        let object = std::fs::read(bucket.join(name)).expect("object");
        assert!(
            object == *data,
            "{name} holds {} bytes, not its file's {}",
            object.len(),
            data.len()
        );
    }
}

#[test]
fn evicted_files_read_back_whole_through_store_errors() {
    // A 1 MiB cache, so every file is evicted once uploaded; then 30% of requests fail.
    let g = Gateway::start_with("cache_max = \"1MiB\"\n[faults]\nerror_rate = 0.3\n");
    g.firn(&["share", "create", "media"]);
    let mut files = Vec::new();
    for (name, len) in [
        ("a.bin", (20 << 20) + 77),
        ("b.bin", 3 << 20),
        ("c.bin", 5000),
    ] {
        let local = g.dir.path().join(name);
        let data = random_file(&local, len);
        copy_in(&local, &g.url(&format!("media/{name}")));
        files.push((name, data));
    }
    g.wait_uploaded("media");
    let files_dir = g.dir.path().join("data/shares");
    let started = Instant::now();
    while local_bytes(&files_dir) > 1 << 20 {
        assert!(started.elapsed() < Duration::from_secs(60), "not evicted");
        std::thread::sleep(Duration::from_millis(200));
    }
    for (name, data) in &files {
        let (read, err) = run_bytes("nfs-cat", &[&g.url(&format!("media/{name}"))]);
        let read = read.unwrap_or_else(|| panic!("nfs-cat {name}: {err}"));
        assert!(read == *data, "{name} read back differs");
    }
    let status = &g.show("media")["status"];
    // The two larger ones were evicted (the small one fits the cache).
    assert!(status["cache_misses"].as_u64() >= Some(2), "{status}");
}

#[test]
fn a_gateway_killed_right_after_an_eviction_still_has_the_file() {
    // A 1 MiB cache: the file is evicted once uploaded, and the gateway is killed at once.
    // The record of the upload must be on disk before the eviction, or the restarted
    // gateway would find the file dirty, with no local copy to upload and none to fetch.
    let mut g = Gateway::start_with("cache_max = \"1MiB\"\n");
    g.firn(&["share", "create", "media"]);
    let local = g.dir.path().join("f.bin");
    let data = random_file(&local, 3 << 20);
    copy_in(&local, &g.url("media/f.bin"));
    g.wait_uploaded("media");
    let files_dir = g.dir.path().join("data/shares");
    let started = Instant::now();
    while local_bytes(&files_dir) > 1 << 20 {
        assert!(started.elapsed() < Duration::from_secs(60), "not evicted");
        std::thread::sleep(Duration::from_millis(20));
    }
    g.daemon.take().expect("daemon").kill9();
    g.restart();
    g.wait_uploaded("media");
    let object = g.bucket().join("media/f.bin");
    assert!(
        std::fs::read(&object).expect("object") == data,
        "the object is not the file"
    );
    let (read, err) = run_bytes("nfs-cat", &[&g.url("media/f.bin")]);
    assert!(read.expect(&err) == data, "the file reads back different");
}

/// `program args`: its stdout if it succeeded, and its stderr.
fn run_bytes(program: &str, args: &[&str]) -> (Option<Vec<u8>>, String) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/test installs libnfs-utils)"));
    (
        out.status.success().then_some(out.stdout),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn files_another_tool_puts_in_the_bucket_show_up_after_a_refresh() {
    // Objects without the file-tool metadata get the configured mode.
    let g = Gateway::start_with("default_file_mode = 0o600\n");
    g.firn(&["share", "create", "media"]);
    g.wait_refreshed("media");
    // Another tool writes straight into the directory bucket (the embedded default), as
    // rclone or s3cmd would into S3; it keeps metadata in `user.firn.*` attributes.
    let dir = g.bucket().join("media/incoming");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let report = random_file(&dir.join("report.csv"), 70_000);
    xattr::set(
        dir.join("report.csv"),
        "user.firn.file-permissions",
        b"100640",
    )
    .expect("xattr");
    random_file(&dir.join("plain.txt"), 10);
    let listed = g.firn(&["share", "refresh", "media"]);
    assert!(listed.contains("2 added"), "{listed}");
    let (ok, listing, err) = run("nfs-ls", &[&g.url("media/incoming")]);
    assert!(ok, "nfs-ls: {err}");
    let line = |name: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(name))
            .unwrap_or_else(|| panic!("no {name} in {listing}"))
            .to_string()
    };
    assert!(line("report.csv").starts_with("-rw-r-----"), "{listing}");
    assert!(line("plain.txt").starts_with("-rw-------"), "{listing}");
    let cat = std::process::Command::new("nfs-cat")
        .arg(g.url("media/incoming/report.csv"))
        .output()
        .expect("nfs-cat");
    assert!(cat.status.success(), "nfs-cat: {:?}", cat.stderr);
    assert!(cat.stdout == report, "the file differs from the object");
    // Deleted by the other tool: gone from the share after the next refresh.
    std::fs::remove_file(dir.join("report.csv")).expect("rm");
    let listed = g.firn(&["share", "refresh", "media", "--path", "incoming"]);
    assert!(listed.contains("1 removed"), "{listed}");
    let (ok, listing, _) = run("nfs-ls", &[&g.url("media/incoming")]);
    assert!(ok && !listing.contains("report.csv"), "{listing}");
}

/// A share made over objects already in the bucket shows them at once, and objects put
/// while the gateway was down show as it starts again: each share refreshes as it opens,
/// nobody has to ask.
#[test]
fn objects_already_in_the_bucket_show_without_a_refresh_asked_for() {
    fn put(g: &Gateway, path: &str, len: usize) -> Vec<u8> {
        let object = g.bucket().join(path);
        std::fs::create_dir_all(object.parent().expect("parent")).expect("mkdir");
        random_file(&object, len)
    }
    fn shows(g: &Gateway, dir: &str, name: &str, data: &[u8]) {
        let started = Instant::now();
        loop {
            let (ok, listing, err) = run("nfs-ls", &[&g.url(dir)]);
            if ok && listing.lines().any(|l| l.ends_with(name)) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{name} never showed in {dir}: {listing} {err}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (read, err) = run_bytes("nfs-cat", &[&g.url(&format!("{dir}/{name}"))]);
        assert!(read.expect(&err) == data, "{name} reads back different");
    }
    let mut g = Gateway::start();
    let old = put(&g, "media/2025/old.bin", 5000);
    g.firn(&["share", "create", "media"]);
    shows(&g, "media/2025", "old.bin", &old);
    let status = g.daemon.take().expect("daemon").stop();
    assert!(status.success(), "{status:?}");
    let new = put(&g, "media/2026/new.bin", 7000);
    g.restart();
    shows(&g, "media/2026", "new.bin", &new);
}

/// The same against Garage, with real S3 tools on the other side: rclone and s3cmd put
/// objects (one with the file gateway's mode metadata) that a refresh brings into the share,
/// a file written over NFS is what s3cmd fetches, with its metadata, and s3cmd's delete
/// takes a file out at the next refresh.
#[test]
fn objects_rclone_and_s3cmd_put_show_up_through_nfs_and_nfs_files_through_them() {
    let Some((remote, prefix)) = common::garage_remote() else {
        return;
    };
    let g = Gateway::start_with(&remote);
    g.firn(&["share", "create", "media"]);
    g.wait_refreshed("media");
    let bucket = std::env::var("FIRN_TEST_S3_BUCKET").expect("bucket");
    let work = tempfile::tempdir().expect("tempdir");
    let report = random_file(&work.path().join("report.csv"), 70_000);
    let plain = random_file(&work.path().join("plain.txt"), 10);
    let incoming = format!("{bucket}/{prefix}/media/incoming");
    common::rclone(&[
        "copyto",
        "--metadata",
        "--metadata-set",
        "file-permissions=100640",
        work.path().join("report.csv").to_str().unwrap(),
        &format!("garage:{incoming}/report.csv"),
    ]);
    common::s3cmd(&[
        "put",
        work.path().join("plain.txt").to_str().unwrap(),
        &format!("s3://{incoming}/plain.txt"),
    ]);
    let listed = g.firn(&["share", "refresh", "media"]);
    assert!(listed.contains("2 added"), "{listed}");
    let (ok, listing, err) = run("nfs-ls", &[&g.url("media/incoming")]);
    assert!(ok, "nfs-ls: {err}");
    let line = |listing: &str, name: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(name))
            .unwrap_or_else(|| panic!("no {name} in {listing}"))
            .to_string()
    };
    assert!(
        line(&listing, "report.csv").starts_with("-rw-r-----"),
        "{listing}"
    );
    // No metadata: the default mode, 0666.
    assert!(
        line(&listing, "plain.txt").starts_with("-rw-rw-rw-"),
        "{listing}"
    );
    for (name, body) in [("report.csv", &report), ("plain.txt", &plain)] {
        let cat = std::process::Command::new("nfs-cat")
            .arg(g.url(&format!("media/incoming/{name}")))
            .output()
            .expect("nfs-cat");
        assert!(cat.status.success(), "nfs-cat: {:?}", cat.stderr);
        assert!(cat.stdout == *body, "{name} differs from the object");
    }

    // A file written over NFS, as s3cmd sees it.
    let written = random_file(&work.path().join("out.bin"), 300_000);
    copy_in(
        &work.path().join("out.bin"),
        &g.url("media/incoming/out.bin"),
    );
    g.wait_uploaded("media");
    let fetched = work.path().join("fetched.bin");
    common::s3cmd(&[
        "get",
        &format!("s3://{incoming}/out.bin"),
        fetched.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&fetched).expect("fetched") == written);
    let info = common::s3cmd(&["info", &format!("s3://{incoming}/out.bin")]);
    assert!(info.contains("x-amz-meta-file-permissions: 100"), "{info}");
    assert!(info.contains("x-amz-meta-file-mtime:"), "{info}");

    // Deleted by s3cmd: gone from the share after the next refresh.
    common::s3cmd(&["del", &format!("s3://{incoming}/report.csv")]);
    let listed = g.firn(&["share", "refresh", "media", "--path", "incoming"]);
    assert!(listed.contains("1 removed"), "{listed}");
    let (ok, listing, _) = run("nfs-ls", &[&g.url("media/incoming")]);
    assert!(ok && !listing.contains("report.csv"), "{listing}");
    assert!(listing.contains("out.bin"), "{listing}");
}

/// A gateway whose data directory is on a 32 MiB file system with 4 MiB kept free (the
/// bucket elsewhere), `[shares]` ending with `extra`; and the file system's mount point. The
/// gateway stops before the file system goes (bind the three in this order).
fn on_a_small_disk(extra: &str) -> (common::Teardown, PathBuf, Gateway) {
    on_a_small_disk_keeping("4MiB", extra)
}

/// `on_a_small_disk`, keeping `min_free` free.
fn on_a_small_disk_keeping(min_free: &str, extra: &str) -> (common::Teardown, PathBuf, Gateway) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mnt, teardown) = common::small_ext4(dir.path());
    let (http_port, nfs_port) = (free_port(), free_port());
    let config = dir.path().join("firn.toml");
    std::fs::write(
        &config,
        format!(
            "[local]\ndata_dir = \"{}\"\nmin_free = \"{min_free}\"\n[remote]\nkind = \"local\"\npath = \"{}\"\n\
             [http]\nlisten = \"127.0.0.1:{http_port}\"\n[nbd]\nlisten = \"\"\n\
             [nfs]\nlisten = \"127.0.0.1:{nfs_port}\"\n[shares]\nsettle_secs = 1\n{extra}",
            mnt.join("data").display(),
            dir.path().join("bucket").display()
        ),
    )
    .expect("config");
    let g = Gateway {
        dir,
        config: config.clone(),
        nfs_port,
        daemon: Some(Daemon::start(&config, http_port, &[])),
        http_port,
    };
    (teardown, mnt, g)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_writers_wait_and_loses_nothing() {
    // The data directory on a 32 MiB file system, 4 MiB of it kept free; the bucket elsewhere.
    let (_teardown, _, mut g) = on_a_small_disk("");
    g.firn(&["share", "create", "full"]);
    // The uplink is down: nothing leaves the disk.
    g.firn(&["bandwidth", "--upload", "paused"]);
    let mut c = g.client("full", 0, 0).await;
    let root = c.root_nfs_fh3();
    let chunk = vec![7u8; 1 << 20];
    let mut written = Vec::new();
    let mut jukebox = None;
    'files: for i in 0..40 {
        let name = format!("f{i:02}");
        let file = common::nfs_create(&mut c, &root, &name).await;
        for j in 0..2u64 {
            match write_sync(&mut c, &file, j << 20, &chunk).await {
                Nfs3Result::Ok(_) => {}
                Nfs3Result::Err((nfsstat3::NFS3ERR_JUKEBOX, _)) => {
                    jukebox = Some((name.clone(), file.clone(), j));
                    break 'files;
                }
                Nfs3Result::Err((e, _)) => panic!("write {name}: {e:?} instead of JUKEBOX"),
            }
        }
        written.push(name);
    }
    let (name, file, offset) = jukebox.expect("the disk never filled");
    assert!(written.len() >= 5, "full after {} files", written.len());
    // Killed and started again on the full disk, with the uplink still down: the share is
    // back with every file written, and a writer still waits.
    drop(c);
    let mut config = std::fs::read_to_string(&g.config).expect("config");
    config.push_str("[remote.bandwidth]\nupload = \"paused\"\n");
    std::fs::write(&g.config, config).expect("config");
    g.restart();
    let mut c = g.client("full", 0, 0).await;
    for name in &written {
        let found = common::nfs_lookup(&mut c, &root, name).await;
        let Nfs3Result::Ok(found) = found else {
            panic!("{name} after the restart: {found:?}")
        };
        let Nfs3Option::Some(attrs) = found.obj_attributes else {
            panic!("{name}: no attributes")
        };
        assert_eq!(attrs.size, 2 << 20, "{name} after the restart");
    }
    assert!(
        matches!(
            write_sync(&mut c, &file, offset << 20, &chunk).await,
            Nfs3Result::Err((nfsstat3::NFS3ERR_JUKEBOX, _))
        ),
        "a write found room on the full disk after the restart"
    );
    // The uplink comes back: uploads make the written files clean, eviction makes room, and
    // the waiting write goes through when the client retries it.
    g.firn(&["bandwidth", "--upload", "unlimited"]);
    let started = Instant::now();
    loop {
        match write_sync(&mut c, &file, offset << 20, &chunk).await {
            Nfs3Result::Ok(_) => break,
            Nfs3Result::Err((nfsstat3::NFS3ERR_JUKEBOX, _)) => {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "{name} still waits for room"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Nfs3Result::Err((e, _)) => panic!("retried write of {name}: {e:?}"),
        }
    }
    g.wait_uploaded("full");
    for name in &written {
        let object = std::fs::read(g.dir.path().join("bucket/full").join(name)).expect("object");
        assert!(
            object.len() == 2 << 20 && object.iter().all(|&b| b == 7),
            "{name} did not arrive whole"
        );
    }
}

/// A disk filled by something else (`[local] min_free = 0`) until the metadata store fails a
/// commit: that call gets NFS3ERR_JUKEBOX, and the store is opened again, which loses its
/// lazy commits as a crash would, among them the entry of a file just created. The running
/// share enters it again before it answers anyone: the client never sees it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_created_before_the_metadata_store_fails_on_a_full_disk_stay() {
    let (_teardown, mnt, g) = on_a_small_disk_keeping("0", "");
    g.firn(&["share", "create", "full"]);
    g.firn(&["bandwidth", "--upload", "paused"]);
    let mut c = g.client("full", 0, 0).await;
    let root = c.root_nfs_fh3();
    let filler = mnt.join("filler");
    let fill = || {
        let mut f = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&filler)
            .expect("filler");
        let chunk = vec![1u8; 1 << 20];
        while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
        // The last few blocks too.
        while std::io::Write::write_all(&mut f, &chunk[..4096]).is_ok() {}
        let _ = f.sync_all();
    };
    // Directories (committed durably) until the store fails one: the disk is full to it.
    let mut made = 0;
    let mut fail_one = async |c: &mut common::NfsClient, from: &str| loop {
        let name = format!("{from}{made:05}");
        made += 1;
        assert!(made < 20_000, "the metadata store never failed");
        let res = c
            .mkdir(&MKDIR3args {
                where_: diropargs3 {
                    dir: root.clone(),
                    name: filename3::from(name.into_bytes()),
                },
                attributes: sattr3::default(),
            })
            .await
            .expect("rpc");
        match res {
            Nfs3Result::Ok(_) => {}
            Nfs3Result::Err((status, _)) => return status,
        }
    };
    fill();
    let status = fail_one(&mut c, "a").await;
    assert_eq!(status, nfsstat3::NFS3ERR_JUKEBOX, "a full disk");
    // A little room, for files created now, whose commits are lazy (their entry rides with
    // their content) ...
    let len = std::fs::metadata(&filler).expect("filler").len();
    std::fs::File::options()
        .write(true)
        .open(&filler)
        .and_then(|f| f.set_len(len.saturating_sub(256 << 10)))
        .expect("truncate");
    let mut kept = Vec::new();
    for i in 0..5 {
        let name = format!("kept{i}");
        let made = c
            .create(&CREATE3args {
                where_: diropargs3 {
                    dir: root.clone(),
                    name: filename3::from(name.clone().into_bytes()),
                },
                how: createhow3::GUARDED(sattr3::default()),
            })
            .await
            .expect("rpc");
        if let Nfs3Result::Ok(made) = made {
            kept.push((name, made.obj.unwrap()));
        }
    }
    assert!(!kept.is_empty(), "no file could be created");
    // ... and lost from the store when it fails again and opens again.
    fill();
    fail_one(&mut c, "b").await;
    std::fs::remove_file(&filler).expect("rm filler");
    for (name, handle) in &kept {
        let found = common::nfs_lookup(&mut c, &root, name).await;
        assert!(matches!(found, Nfs3Result::Ok(_)), "{name}: {found:?}");
        let attrs = c
            .getattr(&GETATTR3args {
                object: handle.clone(),
            })
            .await
            .expect("rpc");
        assert!(matches!(attrs, Nfs3Result::Ok(_)), "{name}: {attrs:?}");
        assert!(
            matches!(
                write_sync(&mut c, handle, 0, b"data").await,
                Nfs3Result::Ok(_)
            ),
            "{name}: write"
        );
    }
}

/// A read of an evicted file while dirty files fill the local disk gets NFS3ERR_JUKEBOX (the
/// client tries again), not an I/O error, and succeeds once uploads have made room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_read_on_a_full_disk_waits_for_room() {
    let (_teardown, mnt, g) = on_a_small_disk("cache_max = \"1MiB\"\n");
    g.firn(&["share", "create", "full"]);
    let mut c = g.client("full", 0, 0).await;
    let root = c.root_nfs_fh3();
    let mut cold_data = vec![0u8; 8 << 20];
    rand::rng().fill_bytes(&mut cold_data);
    let cold = common::nfs_create(&mut c, &root, "cold").await;
    for (i, chunk) in cold_data.chunks(1 << 20).enumerate() {
        let written = write_sync(&mut c, &cold, (i as u64) << 20, chunk).await;
        assert!(matches!(written, Nfs3Result::Ok(_)), "write cold");
    }
    g.wait_uploaded("full");
    let shares = mnt.join("data/shares");
    let started = Instant::now();
    while local_bytes(&shares) > 1 << 20 {
        assert!(started.elapsed() < Duration::from_secs(30), "not evicted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The uplink goes down and dirty files fill the disk.
    g.firn(&["bandwidth", "--upload", "paused"]);
    let chunk = vec![7u8; 1 << 20];
    let mut full = false;
    'files: for i in 0..40 {
        let file = common::nfs_create(&mut c, &root, &format!("f{i:02}")).await;
        for j in 0..2u64 {
            match write_sync(&mut c, &file, j << 20, &chunk).await {
                Nfs3Result::Ok(_) => {}
                Nfs3Result::Err((nfsstat3::NFS3ERR_JUKEBOX, _)) => {
                    full = true;
                    break 'files;
                }
                Nfs3Result::Err((e, _)) => panic!("write: {e:?} instead of JUKEBOX"),
            }
        }
    }
    assert!(full, "the disk never filled");
    let outcome = read_at(&mut c, &cold, 3 << 20, 65536).await;
    assert_eq!(
        outcome,
        Err(nfsstat3::NFS3ERR_JUKEBOX),
        "a cold read on a full disk"
    );
    // The uplink comes back: uploads make the files clean, eviction makes room.
    g.firn(&["bandwidth", "--upload", "unlimited"]);
    let started = Instant::now();
    loop {
        match read_at(&mut c, &cold, 3 << 20, 65536).await {
            Ok(data) => {
                assert!(
                    data == cold_data[3 << 20..(3 << 20) + 65536],
                    "read back differs"
                );
                break;
            }
            Err(nfsstat3::NFS3ERR_JUKEBOX) => {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "the read still waits for room"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("retried read: {e:?}"),
        }
    }
}

async fn read_at(
    c: &mut Client,
    file: &nfs_fh3,
    offset: u64,
    count: u32,
) -> Result<Vec<u8>, nfsstat3> {
    let args = READ3args {
        file: file.clone(),
        offset,
        count,
    };
    match c.read(&args).await.expect("rpc") {
        Nfs3Result::Ok(ok) => Ok(ok.data.as_ref().to_vec()),
        Nfs3Result::Err((e, _)) => Err(e),
    }
}

/// Reads `child`'s stdout on a thread; the lines so far, shared.
fn collect_lines(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    use std::io::BufRead;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = child.stdout.take().expect("piped stdout");
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().expect("lines").push(line);
        }
    });
    lines
}

/// `GET /api/v1/shares/<name>/events` tells when each file is in the bucket, to curl (a
/// client firn did not write) and to `firn share uploads --follow`; the object is there when
/// its event arrives, and a client that reconnects with `Last-Event-ID` gets only what came
/// after.
#[test]
fn an_event_stream_tells_when_each_file_reaches_the_bucket() {
    let mut g = Gateway::start();
    g.firn(&["share", "create", "media"]);
    let token = std::fs::read_to_string(g.dir.path().join("data/api-token")).expect("token");
    let url = format!(
        "http://127.0.0.1:{}/api/v1/shares/media/events",
        g.http_port
    );
    let auth = format!("Authorization: Bearer {}", token.trim());
    let mut curl = std::process::Command::new("curl")
        .args(["-sN", "-H", &auth, &url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    let streamed = collect_lines(&mut curl);
    let mut follow = std::process::Command::new(common::FIRN)
        .args(["share", "uploads", "media", "--follow", "--config"])
        .arg(&g.config)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("firn share uploads --follow");
    let followed = collect_lines(&mut follow);
    std::thread::sleep(Duration::from_millis(300));
    let local = g.dir.path().join("local");
    std::fs::create_dir_all(&local).expect("mkdir");
    for name in ["a.bin", "b.bin"] {
        random_file(&local.join(name), 300_000);
        copy_in(&local.join(name), &g.url(&format!("media/{name}")));
    }
    // Each event names a file that is in the bucket when the event arrives.
    let started = Instant::now();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "events so far: {:?}",
            streamed.lock().expect("lines")
        );
        let lines = streamed.lock().expect("lines").clone();
        for data in lines.iter().filter_map(|l| l.strip_prefix("data: ")) {
            let record: serde_json::Value = serde_json::from_str(data).expect("JSON data");
            let key = record["key"].as_str().expect("key").to_string();
            if !seen.contains(&key) {
                assert!(
                    g.bucket().join(&key).exists(),
                    "{key} announced before it was stored"
                );
                assert_eq!(record["size"], 300_000);
                seen.push(key);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    seen.sort();
    assert_eq!(seen, ["media/a.bin", "media/b.bin"]);
    let lines = streamed.lock().expect("lines").clone();
    assert!(lines.contains(&"event: uploaded".to_string()), "{lines:?}");
    // Consecutive sequence numbers.
    let ids: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("id: ")?.parse().ok())
        .collect();
    assert!(ids.len() == 2 && ids[1] == ids[0] + 1, "{lines:?}");
    let started = Instant::now();
    while followed.lock().expect("lines").len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "--follow printed {:?}",
            followed.lock().expect("lines")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let printed = followed.lock().expect("lines").join("\n");
    assert!(
        printed.contains("media/a.bin") && printed.contains("media/b.bin"),
        "{printed}"
    );
    // Reconnecting after the first event: only the second comes, then the stream waits
    // (cut at 2 s).
    let resume = |after: u64| {
        let resumed = std::process::Command::new("curl")
            .args(["-sN", "--max-time", "2", "-H", &auth, "-H"])
            .arg(format!("Last-Event-ID: {after}"))
            .arg(&url)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&resumed.stdout).into_owned()
    };
    let resumed = resume(ids[0]);
    assert!(
        resumed.contains(&format!("id: {}\n", ids[1]))
            && !resumed.contains(&format!("id: {}\n", ids[0])),
        "{resumed}"
    );
    // Without the token: refused, as every API call.
    let refused = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&refused.stdout), "401");
    for mut child in [curl, follow] {
        let _ = child.kill();
        let _ = child.wait();
    }
    // After a restart, what came before is not remembered: a client resuming from the last
    // event it saw is told so, and numbers go on growing.
    g.restart();
    random_file(&local.join("c.bin"), 1000);
    copy_in(&local.join("c.bin"), &g.url("media/c.bin"));
    g.wait_uploaded("media");
    let resumed = resume(ids[1]);
    assert!(resumed.contains("event: lost"), "{resumed}");
    let id: u64 = resumed
        .lines()
        .find_map(|l| l.strip_prefix("id: ")?.parse().ok())
        .expect("an uploaded event");
    assert!(id > ids[1] + 1, "{resumed}");
    assert!(resumed.contains("media/c.bin"), "{resumed}");
}

/// A share in another bucket (`--bucket`) on the gateway's S3 endpoint: its files land there
/// under the share's prefix, and not in the gateway's bucket. A bucket that does not exist,
/// a name S3 would refuse, or a gateway whose remote is a directory are clear errors.
#[test]
fn a_share_in_another_bucket_puts_its_files_there() {
    let Some(moto) = common::Moto::start() else {
        return;
    };
    let other = "firn-other-bucket";
    let created = moto.put(&[&format!("{}/{other}", moto.endpoint)]);
    assert_eq!(created, "200", "creating the other bucket");
    let g = Gateway::start_with(&format!(
        "[remote]\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"us-east-1\"\n\
         access_key_id = \"test\"\nsecret_access_key = \"test\"\nprefix = \"gw\"\n",
        moto.endpoint,
        common::MOTO_BUCKET
    ));
    g.firn(&["share", "create", "media", "--bucket", other]);
    let local = g.dir.path().join("local");
    std::fs::create_dir_all(&local).expect("mkdir");
    let data = random_file(&local.join("a.bin"), 200_000);
    copy_in(&local.join("a.bin"), &g.url("media/a.bin"));
    g.wait_uploaded("media");
    let script = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
    aws_access_key_id="test", aws_secret_access_key="test")
for bucket in sys.argv[2:]:
    for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        if "media/" in o["Key"]:
            print(bucket, o["Key"])
sys.stdout.buffer.write(s3.get_object(Bucket=sys.argv[2], Key="media/a.bin")["Body"].read())
"#;
    let stdout = common::boto3(script, &[&moto.endpoint, other, common::MOTO_BUCKET]);
    let listing = format!("{other} media/a.bin\n");
    assert!(
        stdout.starts_with(listing.as_bytes()),
        "{}",
        String::from_utf8_lossy(&stdout)
    );
    assert!(
        stdout[listing.len()..] == data,
        "the object differs from the file"
    );
    let shown = g.show("media");
    assert_eq!(shown["bucket"], other);
    // Upload records name whole keys: `[remote] prefix` applies in the gateway's bucket only.
    g.firn(&["share", "create", "home"]);
    copy_in(&local.join("a.bin"), &g.url("home/a.bin"));
    g.wait_uploaded("home");
    for (share, key) in [("media", "media/a.bin"), ("home", "gw/home/a.bin")] {
        let uploads = g.firn(&["share", "uploads", share]);
        assert!(uploads.trim_end().ends_with(key), "{share}: {uploads}");
    }
    for (bucket, reason) in [
        ("no-such-bucket", "no-such-bucket"),
        ("Bad_Name", "not a bucket name"),
    ] {
        let config = g.config.to_str().expect("utf-8");
        let (ok, _, err) = common::firn(&[
            "share", "create", "x", "--bucket", bucket, "--config", config,
        ]);
        assert!(!ok && err.contains(reason), "{bucket}: {err}");
    }
    // The gateway's own bucket named as another: never over the gateway's own objects
    // (under its `[remote] prefix`, gw/), but beside them.
    let config = g.config.to_str().expect("utf-8");
    for (prefix, reason) in [
        ("", "holds the gateway's own objects"),
        ("gw/", "holds the gateway's own objects"),
        ("gw/volumes/", "volumes/ is where"),
        // Share home's objects (gw/home/ in the gateway's bucket), named another way.
        ("gw/home/", "overlaps share \"home\""),
        ("gw/home/sub/", "overlaps share \"home\""),
    ] {
        let (ok, _, err) = common::firn(&[
            "share",
            "create",
            "x",
            "--bucket",
            common::MOTO_BUCKET,
            "--prefix",
            prefix,
            "--config",
            config,
        ]);
        assert!(!ok && err.contains(reason), "{prefix:?}: {err}");
    }
    g.firn(&[
        "share",
        "create",
        "beside",
        "--bucket",
        common::MOTO_BUCKET,
        "--prefix",
        "beside/",
    ]);
    // A gateway whose bucket is a directory has no other buckets.
    let local_gateway = Gateway::start();
    let config = local_gateway.config.to_str().expect("utf-8");
    let (ok, _, err) = common::firn(&[
        "share", "create", "x", "--bucket", other, "--config", config,
    ]);
    assert!(!ok && err.contains("kind = \"s3\""), "{err}");
}

/// A share in the gateway's own bucket never lies over the gateway's own objects: not the
/// whole bucket, not `volumes/` (a share named `volumes` included, whose prefix would be
/// that), nor the other names of the bucket layout; below a prefix of its own they are
/// ordinary names.
#[test]
fn a_share_never_lies_over_the_gateways_own_objects() {
    let g = Gateway::start();
    let config = g.config.to_str().expect("utf-8");
    for (args, reason) in [
        (
            vec!["all", "--prefix", ""],
            "the whole of the gateway's bucket",
        ),
        (
            vec!["volumes"],
            "volumes/ is where the gateway keeps its own objects",
        ),
        (vec!["k", "--prefix", "keys/x/"], "keys/ is where"),
        (vec!["c", "--prefix", "chunks/"], "chunks/ is where"),
        (vec!["p", "--prefix", "firn-probe/"], "firn-probe/ is where"),
    ] {
        let mut full = vec!["share", "create"];
        full.extend(&args);
        full.extend(["--config", config]);
        let (ok, _, err) = common::firn(&full);
        assert!(!ok && err.contains(reason), "{args:?}: {err}");
    }
    assert_eq!(g.firn(&["share", "list"]).trim(), "");
    g.firn(&["share", "create", "media", "--prefix", "media/volumes/"]);
}

/// Modes are enforced as a kernel NFS server enforces them: another user cannot look into a
/// private directory, read or write a private file, chmod what it does not own or remove
/// from a directory it cannot write; ACCESS says what each may do; an owner may still write
/// a file it made read-only. A squashed root is nobody, and libnfs's `nfs-ls` (as root, so
/// squashed) is refused a private directory too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_are_enforced_for_every_caller() {
    let g = Gateway::start();
    g.firn(&["share", "create", "p", "--squash", "root"]);
    let mut alice = g.client("p", 1000, 100).await;
    let mut bob = g.client("p", 2000, 200).await;
    let root = alice.root_nfs_fh3();
    let dirop = |dir: &nfs_fh3, name: &str| diropargs3 {
        dir: dir.clone(),
        name: filename3::from(name.as_bytes().to_vec()),
    };
    let mkdir = |mode: u32, name: &'static str| MKDIR3args {
        where_: dirop(&root, name),
        attributes: sattr3 {
            mode: Nfs3Option::Some(mode),
            ..sattr3::default()
        },
    };
    let Nfs3Result::Ok(private) = alice.mkdir(&mkdir(0o700, "private")).await.expect("rpc") else {
        panic!("mkdir private")
    };
    let private = private.obj.unwrap();
    let Nfs3Result::Ok(shared) = alice.mkdir(&mkdir(0o755, "shared")).await.expect("rpc") else {
        panic!("mkdir shared")
    };
    let shared = shared.obj.unwrap();
    common::nfs_create(&mut alice, &private, "secret").await;
    let notes = common::nfs_create(&mut alice, &shared, "notes").await;
    assert!(matches!(
        write_sync(&mut alice, &notes, 0, b"alice's").await,
        Nfs3Result::Ok(_)
    ));
    let chmod = |file: &nfs_fh3, mode: u32| SETATTR3args {
        object: file.clone(),
        new_attributes: sattr3 {
            mode: Nfs3Option::Some(mode),
            ..sattr3::default()
        },
        guard: Nfs3Option::None,
    };
    assert!(matches!(
        alice.setattr(&chmod(&notes, 0o600)).await.expect("rpc"),
        Nfs3Result::Ok(_)
    ));

    // Bob: no way into the private directory, no reading or writing alice's file, no chmod.
    let looked = bob
        .lookup(&LOOKUP3args {
            what: dirop(&private, "secret"),
        })
        .await
        .expect("rpc");
    assert!(
        matches!(looked, Nfs3Result::Err((nfsstat3::NFS3ERR_ACCES, _))),
        "{looked:?}"
    );
    let read = bob
        .read(&READ3args {
            file: notes.clone(),
            offset: 0,
            count: 100,
        })
        .await
        .expect("rpc");
    assert!(
        matches!(read, Nfs3Result::Err((nfsstat3::NFS3ERR_ACCES, _))),
        "{read:?}"
    );
    let written = write_sync(&mut bob, &notes, 0, b"bob's").await;
    assert!(
        matches!(written, Nfs3Result::Err((nfsstat3::NFS3ERR_ACCES, _))),
        "{written:?}"
    );
    let chmodded = bob.setattr(&chmod(&notes, 0o666)).await.expect("rpc");
    assert!(
        matches!(chmodded, Nfs3Result::Err((nfsstat3::NFS3ERR_PERM, _))),
        "{chmodded:?}"
    );
    let removed = bob
        .remove(&REMOVE3args {
            object: dirop(&shared, "notes"),
        })
        .await
        .expect("rpc");
    assert!(
        matches!(removed, Nfs3Result::Err((nfsstat3::NFS3ERR_ACCES, _))),
        "{removed:?}"
    );
    let made = bob
        .create(&CREATE3args {
            where_: dirop(&shared, "bobs"),
            how: createhow3::GUARDED(sattr3::default()),
        })
        .await
        .expect("rpc");
    assert!(
        matches!(made, Nfs3Result::Err((nfsstat3::NFS3ERR_ACCES, _))),
        "{made:?}"
    );
    let all = ACCESS3_READ | ACCESS3_LOOKUP | ACCESS3_MODIFY | ACCESS3_EXTEND | ACCESS3_DELETE;
    let access = ACCESS3args {
        object: shared.clone(),
        access: all,
    };
    let Nfs3Result::Ok(granted) = bob.access(&access).await.expect("rpc") else {
        panic!("access")
    };
    assert_eq!(granted.access, ACCESS3_READ | ACCESS3_LOOKUP);
    let Nfs3Result::Ok(granted) = alice.access(&access).await.expect("rpc") else {
        panic!("access")
    };
    assert_eq!(granted.access, all);
    // Alice made her file read-only, and may still write it.
    assert!(matches!(
        alice.setattr(&chmod(&notes, 0o400)).await.expect("rpc"),
        Nfs3Result::Ok(_)
    ));
    assert!(matches!(
        write_sync(&mut alice, &notes, 0, b"ALICE'S").await,
        Nfs3Result::Ok(_)
    ));
    // Moving a directory to another parent rewrites its `..`: bob, who may write both
    // parents but not alice's directory, may rename it in place but not move it.
    let Nfs3Result::Ok(open) = alice.mkdir(&mkdir(0o777, "open")).await.expect("rpc") else {
        panic!("mkdir open")
    };
    let open = open.obj.unwrap();
    let Nfs3Result::Ok(other) = alice.mkdir(&mkdir(0o777, "other")).await.expect("rpc") else {
        panic!("mkdir other")
    };
    let other = other.obj.unwrap();
    let made = alice
        .mkdir(&MKDIR3args {
            where_: dirop(&open, "alices"),
            attributes: sattr3 {
                mode: Nfs3Option::Some(0o755),
                ..sattr3::default()
            },
        })
        .await
        .expect("rpc");
    assert!(matches!(made, Nfs3Result::Ok(_)), "{made:?}");
    let rename = |from: &nfs_fh3, from_name: &str, to: &nfs_fh3, to_name: &str| RENAME3args {
        from: dirop(from, from_name),
        to: dirop(to, to_name),
    };
    let moved = bob
        .rename(&rename(&open, "alices", &other, "alices"))
        .await
        .expect("rpc");
    assert!(
        matches!(moved, Nfs3Result::Err((nfsstat3::NFS3ERR_ACCES, _))),
        "{moved:?}"
    );
    let renamed = bob
        .rename(&rename(&open, "alices", &open, "renamed"))
        .await
        .expect("rpc");
    assert!(matches!(renamed, Nfs3Result::Ok(_)), "{renamed:?}");
    let moved = alice
        .rename(&rename(&open, "renamed", &other, "alices"))
        .await
        .expect("rpc");
    assert!(matches!(moved, Nfs3Result::Ok(_)), "{moved:?}");
    // nfs-ls runs as root, which the share squashes to nobody.
    let (ok, _, _) = run("nfs-ls", &[&g.url("p/private")]);
    assert!(!ok, "a squashed root listed a 0700 directory");
    let (ok, listing, err) = run("nfs-ls", &[&g.url("p/shared")]);
    assert!(ok && listing.contains("notes"), "{listing}{err}");
}

/// A listing read a page at a time goes on after the last name it was given, even when that
/// entry was removed (iterate-and-delete, as `rm -r` does) or renamed in between: nothing is
/// skipped, and no NFS3ERR_BAD_COOKIE ends it early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_goes_on_after_its_last_entry_is_removed_or_renamed() {
    let g = Gateway::start();
    g.firn(&["share", "create", "list", "--squash", "none"]);
    let mut c = g.client("list", 0, 0).await;
    let root = c.root_nfs_fh3();
    let dirop = |name: &str| diropargs3 {
        dir: root.clone(),
        name: filename3::from(name.as_bytes().to_vec()),
    };
    let all: Vec<String> = (0..60).map(|i| format!("f{i:03}")).collect();
    for name in &all {
        match c
            .create(&CREATE3args {
                where_: dirop(name),
                how: createhow3::UNCHECKED(sattr3::default()),
            })
            .await
            .expect("rpc")
        {
            Nfs3Result::Ok(_) => {}
            Nfs3Result::Err((e, _)) => panic!("create {name}: {e:?}"),
        }
    }
    // Pages of a few entries (READDIR's count is in bytes); after each page its last entry
    // is removed (pages 1, 3, ...) or renamed past the end (pages 2, 4, ...).
    let mut seen = Vec::new();
    let mut cookie = 0;
    for page in 1.. {
        let reply = c
            .readdir(&READDIR3args {
                dir: root.clone(),
                cookie,
                cookieverf: cookieverf3::default(),
                count: 400,
            })
            .await
            .expect("rpc");
        let ok = match reply {
            Nfs3Result::Ok(ok) => ok,
            Nfs3Result::Err((e, _)) => panic!("readdir page {page}: {e:?}"),
        };
        let entries = &ok.reply.entries.0;
        for e in entries {
            seen.push(String::from_utf8_lossy(e.name.as_ref()).into_owned());
        }
        if ok.reply.eof {
            break;
        }
        let last = entries
            .last()
            .expect("a page that is not the end lists something");
        cookie = last.cookie;
        let name = String::from_utf8_lossy(last.name.as_ref()).into_owned();
        let changed = if page % 2 == 1 {
            matches!(
                c.remove(&REMOVE3args {
                    object: dirop(&name)
                })
                .await
                .expect("rpc"),
                Nfs3Result::Ok(_)
            )
        } else {
            matches!(
                c.rename(&RENAME3args {
                    from: dirop(&name),
                    to: dirop(&format!("z-{name}")),
                })
                .await
                .expect("rpc"),
                Nfs3Result::Ok(_)
            )
        };
        assert!(changed, "changing {name}");
        assert!(page < 100, "the listing never ends");
    }
    for name in &all {
        assert!(seen.contains(name), "{name} was never listed: {seen:?}");
    }
}

/// A client may go on from any entry of a page, not only its last (Linux does, from the
/// last entry it handed to `getdents`): after that entry is renamed to a later name, or
/// moved to another directory, the listing goes on after where it was, neither ending early
/// nor starting over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_goes_on_from_any_entry_of_a_page_after_it_moves() {
    let g = Gateway::start();
    g.firn(&["share", "create", "list", "--squash", "none"]);
    let mut c = g.client("list", 0, 0).await;
    let root = c.root_nfs_fh3();
    let dirop = |dir: &nfs_fh3, name: &str| diropargs3 {
        dir: dir.clone(),
        name: filename3::from(name.as_bytes().to_vec()),
    };
    let other = match c
        .mkdir(&MKDIR3args {
            where_: dirop(&root, "other"),
            attributes: sattr3::default(),
        })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => ok.obj.unwrap(),
        Nfs3Result::Err((e, _)) => panic!("mkdir: {e:?}"),
    };
    let all: Vec<String> = (0..100).map(|i| format!("f{i:03}")).collect();
    for name in &all {
        match c
            .create(&CREATE3args {
                where_: dirop(&root, name),
                how: createhow3::UNCHECKED(sattr3::default()),
            })
            .await
            .expect("rpc")
        {
            Nfs3Result::Ok(_) => {}
            Nfs3Result::Err((e, _)) => panic!("create {name}: {e:?}"),
        }
    }
    // The rest of the listing from `cookie` on, a page at a time.
    async fn rest(c: &mut Client, dir: &nfs_fh3, mut cookie: u64) -> Vec<(String, u64)> {
        let mut seen = Vec::new();
        loop {
            let reply = c
                .readdir(&READDIR3args {
                    dir: dir.clone(),
                    cookie,
                    cookieverf: cookieverf3::default(),
                    count: 1024,
                })
                .await
                .expect("rpc");
            let ok = match reply {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((e, _)) => panic!("readdir from {cookie}: {e:?}"),
            };
            for e in &ok.reply.entries.0 {
                seen.push((
                    String::from_utf8_lossy(e.name.as_ref()).into_owned(),
                    e.cookie,
                ));
                cookie = e.cookie;
            }
            if ok.reply.eof {
                return seen;
            }
        }
    }
    let first = rest(&mut c, &root, 0).await;
    let cookie_of = |name: &str| first.iter().find(|(n, _)| n == name).expect(name).1;
    let names = |listed: Vec<(String, u64)>| listed.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    let rename = |from: &str, to_dir: &nfs_fh3, to: &str| RENAME3args {
        from: dirop(&root, from),
        to: dirop(to_dir, to),
    };
    // f010 (in the middle of the first page) renamed past the end.
    let cookie = cookie_of("f010");
    assert!(matches!(
        c.rename(&rename("f010", &root, "zzz")).await.expect("rpc"),
        Nfs3Result::Ok(_)
    ));
    let mut want: Vec<String> = all[11..].to_vec();
    want.extend(["other".to_string(), "zzz".to_string()]);
    assert_eq!(names(rest(&mut c, &root, cookie).await), want);
    // f005 moved to another directory, under a name that sorts first there.
    let cookie = cookie_of("f005");
    assert!(matches!(
        c.rename(&rename("f005", &other, "a00")).await.expect("rpc"),
        Nfs3Result::Ok(_)
    ));
    let mut want: Vec<String> = all[6..].iter().filter(|n| *n != "f010").cloned().collect();
    want.extend(["other".to_string(), "zzz".to_string()]);
    assert_eq!(names(rest(&mut c, &root, cookie).await), want);
}

/// Clients that stall in the middle of a call, on every connection their address may have
/// (32), lock nobody out for long: a call not sent whole within 30 s of its first byte
/// costs its connection, and the address's clients get through again.
#[test]
fn clients_stalled_in_the_middle_of_a_call_give_their_connections_up() {
    use std::io::Write;
    let g = Gateway::start();
    g.firn(&["share", "create", "media"]);
    let mut stalled = Vec::new();
    for _ in 0..32 {
        let mut c = g.connect();
        // A record of 100 bytes, 10 of them sent.
        c.write_all(&(0x8000_0000u32 | 100).to_be_bytes())
            .expect("mark");
        c.write_all(&[0; 10]).expect("part of a call");
        stalled.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (ok, _, _) = run("nfs-ls", &[&g.url("media")]);
    assert!(!ok, "a 33rd connection got through: no test");
    let started = Instant::now();
    loop {
        let (ok, _, err) = run("nfs-ls", &[&g.url("media")]);
        if ok {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "still locked out: {err}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(stalled);
}

/// A stop during a long refresh (a slow bucket, many directories to list) is prompt and
/// clean: the refresh ends with an answer that says why, the daemon exits at once, well
/// within its grace for clients, and nothing panics on a runtime that is going away.
#[test]
fn a_stop_during_a_long_refresh_is_prompt_and_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(
        dir.path(),
        port,
        &format!(
            "[nfs]\nlisten = \"127.0.0.1:{}\"\n[faults]\nlatency_ms = 300\n",
            free_port()
        ),
    );
    let log = dir.path().join("stderr.log");
    let daemon = Daemon::start_logged(&config, port, &log);
    common::firn_ok(&config, &["share", "create", "slow"]);
    // A hundred directories: a listing each, 300 ms apiece, half a minute of refresh.
    let bucket = dir.path().join("data/bucket/slow");
    for i in 0..100 {
        std::fs::create_dir_all(bucket.join(format!("d{i}"))).expect("mkdir");
        std::fs::write(bucket.join(format!("d{i}/f")), b"x").expect("object");
    }
    let refresh = std::process::Command::new(common::FIRN)
        .args(["share", "refresh", "slow", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the refresh");
    std::thread::sleep(Duration::from_secs(2));
    let status = daemon.stop_within(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    let refresh = refresh.wait_with_output().expect("the refresh's end");
    let said = String::from_utf8_lossy(&refresh.stderr);
    assert!(
        !refresh.status.success() && said.contains("stopping"),
        "the refresh cut short by the stop said: {said}"
    );
    let logged = std::fs::read_to_string(&log).expect("the log");
    assert!(!logged.contains("panicked"), "{logged}");
}

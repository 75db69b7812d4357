//! An NFSv3 copy client for `bench/nfs-share.sh`: the same client against every server.
//! Copies a local file or a flat directory of files into a directory of an NFS export, over
//! several connections at once, each file written in 1 MiB UNSTABLE writes and committed;
//! prints `files bytes seconds`.
//!
//!   cargo run --release --example nfs_copy -- HOST:NFS_PORT:MOUNT_PORT /export LOCAL DIR_NAME [CONNECTIONS]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use nfs3_client::Nfs3ConnectionBuilder;
use nfs3_client::tokio::TokioConnector;
use nfs3_types::nfs3::*;
use nfs3_types::rpc::{auth_flavor, auth_unix, opaque_auth};
use nfs3_types::xdr_codec::{Opaque, Pack};

const CHUNK: usize = 1 << 20;

type Connection = nfs3_client::Nfs3Connection<nfs3_client::tokio::TokioIo<tokio::net::TcpStream>>;

async fn connect(host: &str, nfs_port: u16, mount_port: u16, export: &str) -> Connection {
    let auth = auth_unix {
        stamp: 1,
        machinename: Opaque::owned(b"bench".to_vec()),
        uid: 0,
        gid: 0,
        gids: vec![],
    };
    let mut body = Vec::new();
    auth.pack(&mut body).expect("pack");
    Nfs3ConnectionBuilder::new(TokioConnector, host, export)
        .connect_from_privileged_port(false)
        .mount_port(mount_port)
        .nfs3_port(nfs_port)
        .credential(opaque_auth {
            flavor: auth_flavor::AUTH_UNIX,
            body: Opaque::owned(body),
        })
        .mount()
        .await
        .unwrap_or_else(|e| panic!("mount {export}: {e:?}"))
}

fn dirop(dir: &nfs_fh3, name: &str) -> diropargs3<'static> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3::from(name.as_bytes().to_vec()),
    }
}

async fn create(c: &mut Connection, dir: &nfs_fh3, name: &str) -> nfs_fh3 {
    let how = createhow3::UNCHECKED(sattr3 {
        mode: Nfs3Option::Some(0o644),
        ..sattr3::default()
    });
    match c
        .create(&CREATE3args {
            where_: dirop(dir, name),
            how,
        })
        .await
        .expect("create rpc")
    {
        Nfs3Result::Ok(ok) => ok.obj.unwrap(),
        Nfs3Result::Err((e, _)) => panic!("create {name}: {e:?}"),
    }
}

async fn write(c: &mut Connection, file: &nfs_fh3, offset: u64, data: &[u8]) {
    match c
        .write(&WRITE3args {
            file: file.clone(),
            offset,
            count: data.len() as u32,
            stable: stable_how::UNSTABLE,
            data: Opaque::borrowed(data),
        })
        .await
        .expect("write rpc")
    {
        Nfs3Result::Ok(ok) => assert_eq!(ok.count as usize, data.len(), "short write"),
        Nfs3Result::Err((e, _)) => panic!("write: {e:?}"),
    }
}

async fn commit(c: &mut Connection, file: &nfs_fh3) {
    match c
        .commit(&COMMIT3args {
            file: file.clone(),
            offset: 0,
            count: 0,
        })
        .await
        .expect("commit rpc")
    {
        Nfs3Result::Ok(_) => {}
        Nfs3Result::Err((e, _)) => panic!("commit: {e:?}"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: nfs_copy HOST:NFS_PORT:MOUNT_PORT /export LOCAL DIR_NAME [CONNECTIONS]");
        std::process::exit(2);
    }
    let mut address = args[1].split(':');
    let host = address.next().expect("host").to_string();
    let nfs_port: u16 = address.next().expect("nfs port").parse().expect("port");
    let mount_port: u16 = address.next().expect("mount port").parse().expect("port");
    let (export, local, dir_name) = (&args[2], PathBuf::from(&args[3]), &args[4]);
    let connections: usize = args.get(5).map_or(4, |n| n.parse().expect("connections"));

    let mut first = connect(&host, nfs_port, mount_port, export).await;
    let root = first.root_nfs_fh3();
    let started = Instant::now();
    let dir = match first
        .mkdir(&MKDIR3args {
            where_: dirop(&root, dir_name),
            attributes: sattr3 {
                mode: Nfs3Option::Some(0o755),
                ..sattr3::default()
            },
        })
        .await
        .expect("mkdir rpc")
    {
        Nfs3Result::Ok(ok) => ok.obj.unwrap(),
        Nfs3Result::Err((e, _)) => panic!("mkdir {dir_name}: {e:?}"),
    };
    let mut clients = vec![first];
    for _ in 1..connections {
        clients.push(connect(&host, nfs_port, mount_port, export).await);
    }

    let (files, bytes) = if local.is_dir() {
        copy_tree(clients, &dir, &local).await
    } else {
        copy_file(clients, &dir, &local).await
    };
    println!("{files} {bytes} {:.3}", started.elapsed().as_secs_f64());
}

/// Every file of `local` (flat), the connections taking the next file as each finishes.
async fn copy_tree(clients: Vec<Connection>, dir: &nfs_fh3, local: &Path) -> (usize, u64) {
    let mut names: Vec<PathBuf> = std::fs::read_dir(local)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let names = Arc::new(names);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for mut c in clients {
        let (names, next, dir) = (names.clone(), next.clone(), dir.clone());
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(path) = names.get(i) else { break };
                let data = std::fs::read(path).expect("read");
                let name = path.file_name().and_then(|n| n.to_str()).expect("name");
                let file = create(&mut c, &dir, name).await;
                for (j, chunk) in data.chunks(CHUNK).enumerate() {
                    write(&mut c, &file, (j * CHUNK) as u64, chunk).await;
                }
                commit(&mut c, &file).await;
                bytes += data.len() as u64;
            }
            bytes
        }));
    }
    let mut bytes = 0;
    for task in tasks {
        bytes += task.await.expect("copy task");
    }
    (names.len(), bytes)
}

/// One large file, its 1 MiB chunks spread over the connections, then one commit.
async fn copy_file(mut clients: Vec<Connection>, dir: &nfs_fh3, local: &Path) -> (usize, u64) {
    let started = Instant::now();
    let name = local.file_name().and_then(|n| n.to_str()).expect("name");
    let file = create(&mut clients[0], dir, name).await;
    let len = std::fs::metadata(local).expect("stat").len();
    let chunks = len.div_ceil(CHUNK as u64) as usize;
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for mut c in clients {
        let (next, file, local) = (next.clone(), file.clone(), local.to_path_buf());
        tasks.push(tokio::spawn(async move {
            use std::os::unix::fs::FileExt;
            let source = std::fs::File::open(&local).expect("open");
            let mut buf = vec![0u8; CHUNK];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= chunks {
                    break;
                }
                let offset = (i * CHUNK) as u64;
                let n = (len - offset).min(CHUNK as u64) as usize;
                source.read_exact_at(&mut buf[..n], offset).expect("read");
                write(&mut c, &file, offset, &buf[..n]).await;
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.expect("copy task"));
    }
    let written = Instant::now();
    commit(&mut clients[0], &file).await;
    // The commit of a large file is the disk's time to take it: told apart on stderr.
    eprintln!(
        "{name}: writes {:.3}s, commit {:.3}s",
        (written - started).as_secs_f64(),
        written.elapsed().as_secs_f64()
    );
    (1, len)
}

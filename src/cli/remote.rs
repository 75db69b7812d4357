//! `firn remote`: put, get, list and delete objects on the configured store through the full
//! remote stack (retries, checksums, limits), without a daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use async_trait::async_trait;
use bytes::Bytes;
use clap::Subcommand;
use futures::{StreamExt, TryStreamExt};

use crate::daemon::config::Config;
use crate::remote::{Body, Error, FileBody, Meta, Remote, Sink};
use crate::size::Human;

#[derive(Subcommand)]
pub enum RemoteCommand {
    /// Upload a file to KEY, or a directory tree under the prefix KEY/.
    Put {
        source: PathBuf,
        key: String,
        /// Objects in flight at once.
        #[arg(long, default_value_t = 16)]
        jobs: usize,
    },
    /// Download KEY to a file, or every object under PREFIX/ (ending in /) into a directory.
    Get {
        key: String,
        destination: PathBuf,
        #[arg(long, default_value_t = 16)]
        jobs: usize,
    },
    /// List the objects under a prefix.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Delete one object.
    Rm { key: String },
}

pub async fn run(config: &Config, command: RemoteCommand) -> anyhow::Result<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    let stack = crate::daemon::open_remote(config, &mut registry)?;
    let remote = stack.remote;
    match command {
        RemoteCommand::Put { source, key, jobs } => {
            interruptible(put(remote, &source, &key, jobs, &Budget::new(config))).await
        }
        RemoteCommand::Get {
            key,
            destination,
            jobs,
        } => interruptible(get(remote, &key, &destination, jobs, &Budget::new(config))).await,
        RemoteCommand::Ls { prefix } => {
            for object in remote.list(&prefix).await? {
                println!("{:>14}  {}", object.size, object.key);
            }
            Ok(())
        }
        RemoteCommand::Rm { key } => {
            // A delete of what is not there succeeds: only a look at the bucket tells a
            // removed object from a bucket that does not exist.
            remote.delete(&key).await?;
            bucket_is_there(remote.as_ref()).await
        }
    }
}

/// An error if the bucket does not exist (or cannot be listed); for the answers that cannot
/// tell it from a missing object (a delete's, a 404 without a body).
async fn bucket_is_there(remote: &dyn Remote) -> anyhow::Result<()> {
    remote.list_dir_page("", None).await?;
    Ok(())
}

/// The regular files below `root`. Symlinks (not followed: one could lead out of the tree,
/// or round it), FIFOs, sockets and devices have no object to be: each is named on stderr.
/// `work`, or an error at Ctrl-C (SIGINT) or SIGTERM: the work is dropped, and with it the
/// temporary files of downloads under way.
async fn interruptible(
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signal = tokio::select! {
        done = work => return done,
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    };
    // The multipart uploads of puts under way are aborted as they are dropped.
    crate::remote::s3::aborts_settled(std::time::Duration::from_secs(5)).await;
    bail!("{signal}: objects whose transfer had not ended are neither stored nor downloaded")
}

fn files_under(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            } else {
                eprintln!(
                    "skipped {}: not a regular file or directory",
                    entry.path().display()
                );
            }
        }
    }
    files.sort();
    Ok(files)
}

fn report(verb: &str, objects: usize, bytes: u64, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{verb} {objects} objects, {} in {seconds:.2}s ({:.1} MiB/s)",
        Human(bytes),
        bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9)
    );
}

/// How much memory the objects in flight may hold. One object holds at most its size, and at
/// most its parts in flight and read ahead; large objects take turns, so `--jobs` multiplies
/// only small objects and memory stays near one large object's worth.
struct Budget {
    /// One permit per KiB.
    kib: tokio::sync::Semaphore,
    cap_kib: u32,
}

impl Budget {
    fn new(config: &Config) -> Budget {
        let remote = &config.remote;
        let per_object = remote.part_size.0 * (remote.part_concurrency as u64 + 3);
        let cap_kib = per_object.div_ceil(1024).clamp(1, u32::MAX as u64 >> 4) as u32;
        Budget {
            kib: tokio::sync::Semaphore::new(cap_kib as usize),
            cap_kib,
        }
    }

    /// Held while the object is in flight. (`None` only if the semaphore were closed, which
    /// it never is.)
    async fn admit(&self, size: u64) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let kib = size.div_ceil(1024).clamp(1, self.cap_kib as u64) as u32;
        self.kib.acquire_many(kib).await.ok()
    }
}

async fn put(
    remote: Arc<dyn Remote>,
    source: &Path,
    key: &str,
    jobs: usize,
    budget: &Budget,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let meta =
        std::fs::metadata(source).with_context(|| format!("cannot read {}", source.display()))?;
    let uploads: Vec<(PathBuf, String)> = if meta.is_dir() {
        let prefix = key.trim_end_matches('/');
        files_under(source)?
            .into_iter()
            .map(|file| {
                // A name that is not UTF-8 has no S3 spelling; refuse it rather than store
                // a mangled one.
                let rel = file
                    .strip_prefix(source)
                    .unwrap_or(&file)
                    .to_str()
                    .with_context(|| {
                        format!(
                            "{} is not valid UTF-8, so it cannot be an object name: rename it",
                            file.display()
                        )
                    })?
                    .to_string();
                let key = if prefix.is_empty() {
                    rel
                } else {
                    format!("{prefix}/{rel}")
                };
                anyhow::Ok((file, key))
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        vec![(source.to_path_buf(), key.to_string())]
    };
    let count = uploads.len();
    let bytes = futures::stream::iter(uploads)
        .map(|(file, key)| {
            let remote = remote.clone();
            async move {
                // Read a part at a time as the upload needs it, never whole.
                let body = Arc::new(
                    FileBody::open(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?,
                );
                let n = body.len();
                let _memory = budget.admit(n).await;
                remote.put_body(&key, body.clone(), Meta::new()).await?;
                // Its checksum was taken in a pass before the upload read it: a file written
                // to meanwhile went up as no one version, and its object would never verify.
                if !body.unchanged().unwrap_or(false) {
                    let deleted = remote.delete(&key).await;
                    bail!(
                        "{} changed while it was uploaded, so {key:?} would not match it: {}; run again once it is still",
                        file.display(),
                        match deleted {
                            Ok(()) => "the object was deleted".to_string(),
                            Err(e) => format!("deleting the object failed too ({e})"),
                        }
                    );
                }
                anyhow::Ok(n)
            }
        })
        .buffer_unordered(jobs.max(1))
        .try_fold(0u64, |total, n| async move { Ok(total + n) })
        .await?;
    report("uploaded", count, bytes, started);
    Ok(())
}

async fn get(
    remote: Arc<dyn Remote>,
    key: &str,
    destination: &Path,
    jobs: usize,
    budget: &Budget,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut markers = Vec::new();
    let downloads: Vec<(String, PathBuf, u64)> = if key.ends_with('/') || key.is_empty() {
        remote
            .list(key)
            .await?
            .into_iter()
            .filter_map(|object| {
                let rel = object.key[key.len()..].to_string();
                // A directory marker (`a/b/`, as shares and S3 consoles make) is a directory.
                if object.key.ends_with('/') {
                    markers.push((object.key, destination.join(rel)));
                    return None;
                }
                Some((object.key, destination.join(rel), object.size))
            })
            .collect()
    } else {
        vec![(key.to_string(), destination.to_path_buf(), u64::MAX)]
    };
    if downloads.is_empty() && markers.is_empty() {
        bail!("no objects under {key:?}");
    }
    // A listed key names its file below the destination: one whose name would lead
    // elsewhere (`..`, a leading `/`) is refused before anything is made.
    let named = downloads
        .iter()
        .map(|(key, file, _)| (key, file))
        .chain(markers.iter().map(|(key, dir)| (key, dir)));
    for (key, file) in named {
        let below = file.strip_prefix(destination).is_ok_and(|rel| {
            rel.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        });
        if !below {
            bail!(
                "refusing to download {key:?}: its name leads out of {}",
                destination.display()
            );
        }
    }
    for (_, dir) in &markers {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let count = downloads.len();
    let bytes = futures::stream::iter(downloads)
        .map(|(key, file, size)| {
            let remote = remote.clone();
            async move {
                let _memory = budget.admit(size).await;
                if let Some(parent) = file.parent() {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .with_context(|| format!("cannot create {}", parent.display()))?;
                }
                let sink = FileSink::create(&file)?;
                match remote.get_to(&key, &sink).await {
                    Ok(fetched) => sink.finish(fetched.size),
                    Err(e) => {
                        sink.discard();
                        if matches!(e, Error::NotFound { .. }) {
                            bucket_is_there(remote.as_ref()).await?;
                        }
                        Err(e.into())
                    }
                }
            }
        })
        .buffer_unordered(jobs.max(1))
        .try_fold(0u64, |total, n| async move { Ok(total + n) })
        .await?;
    report("downloaded", count, bytes, started);
    Ok(())
}

/// A download in progress: parts go straight into a temporary file beside the destination
/// (positional writes, so a retry overwrites from the start), renamed into place only when
/// the whole object has arrived and passed verification.
/// Dropped unfinished (an error elsewhere in a tree, an interrupt), it removes its
/// temporary file.
struct FileSink {
    file: Arc<std::fs::File>,
    temporary: PathBuf,
    destination: PathBuf,
    finished: std::sync::atomic::AtomicBool,
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if !self.finished.load(std::sync::atomic::Ordering::Relaxed) {
            self.discard();
        }
    }
}

impl FileSink {
    fn create(destination: &Path) -> anyhow::Result<FileSink> {
        let name = destination
            .file_name()
            .with_context(|| format!("{} names no file", destination.display()))?;
        let mut temporary_name = std::ffi::OsString::from(".");
        temporary_name.push(name);
        temporary_name.push(format!(".firn-{}", std::process::id()));
        let temporary = destination.with_file_name(temporary_name);
        let file = std::fs::File::create(&temporary)
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        Ok(FileSink {
            file: Arc::new(file),
            temporary,
            destination: destination.to_path_buf(),
            finished: Default::default(),
        })
    }

    /// Cuts what an earlier, longer attempt left and moves the file into place.
    fn finish(&self, size: u64) -> anyhow::Result<u64> {
        let done = self
            .file
            .set_len(size)
            .and_then(|()| std::fs::rename(&self.temporary, &self.destination));
        if let Err(e) = done {
            self.discard();
            return Err(e).with_context(|| format!("cannot write {}", self.destination.display()));
        }
        self.finished
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(size)
    }

    fn discard(&self) {
        let _ = std::fs::remove_file(&self.temporary);
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&self, offset: u64, bytes: Bytes) -> crate::remote::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.write_all_at(&bytes, offset))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
            .map_err(|e| Error::Permanent {
                op: "write",
                key: self.temporary.display().to_string(),
                message: e.to_string(),
            })
    }
}

//! Taking a cached volume over from the bucket: what a gateway does to serve a volume whose
//! data another gateway (lost, or stopped) wrote.
//!
//! The new gateway reads the newest commit, loads the checkpoint it names, replays the
//! segments of its runs up to its cut, and so holds the map of the bucket image. It then
//! writes that map as a checkpoint of its own, numbered past every segment the old gateway
//! may have uploaded without committing, and creates the next commit (create-if-absent):
//! from then on a commit or segment of the old gateway collides with the new one's and is
//! refused, on stores that honour conditional creates. Nothing else is downloaded: data is
//! read through on demand.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::map::Map;
use super::record::LogKey;
use super::state::{
    Progress, open_checkpoint, replay_records, seal_checkpoint, store_local_checkpoint,
};
use super::uploader::{commit_context, open_commit, open_descriptor};
use super::{Bucket, Checkpoint, Commit, Cut, Descriptor, PROGRESS_TABLE};
use crate::local::meta::MetaStore;
use crate::remote::{self, Meta};
use crate::seal::Sealer;

/// A lease younger than this, held by another gateway, means that gateway is serving the
/// volume.
pub const LEASE_LIVE: Duration = Duration::from_secs(30);
/// How often a serving gateway renews its lease.
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
/// Segment numbers skipped at a takeover past the last one found in the bucket, so that an
/// old gateway still uploading collides with nothing of the new one's: it goes on uploading
/// its backlog, in order, until its next commit or lease renewal fences it, and that backlog
/// is up to its `log_max` (thousands of segments), so the gap is more than any log holds.
/// Nothing walks the numbers in between; chunks are numbered from `CHUNK_BASE` (2^63) up.
const SEGMENT_GAP: u64 = 1 << 32;

/// Who serves a volume, renewed while it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// [`FORMAT`]; leases written before it had the field are format 1 too.
    #[serde(default = "first_format")]
    pub format: u32,
    pub gateway: String,
    /// Seconds since the epoch.
    pub time: u64,
    /// The number of the commit by which the gateway took the volume over (0: it made the
    /// volume). Each takeover creates a commit numbered past every earlier one, so of two
    /// leases the one with the higher `since` is the newer owner's: an old gateway's renewal
    /// that lands just after a takeover's lease cannot make the new owner fence itself.
    #[serde(default)]
    pub since: u64,
}

/// The version of the descriptor, commit and lease formats this firn writes and reads.
pub const FORMAT: u32 = 1;

fn first_format() -> u32 {
    1
}

/// `Ok` if `format` is one this firn reads; the error names `what` and the version.
pub(super) fn check_format(what: &str, format: u32) -> Result<(), String> {
    if format == FORMAT {
        Ok(())
    } else {
        Err(format!(
            "{what} format version {format} is not one this firn reads (it reads {FORMAT}); a newer firn wrote it"
        ))
    }
}

pub(super) fn lease_context(id: &str) -> Vec<u8> {
    format!("firn volume lease {id}").into_bytes()
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a takeover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no volume with id {0} in the bucket")]
    NotFound(String),
    #[error(
        "gateway {gateway} renewed its lease on the volume {age}s ago: it is serving it. Stop it first, or take over with --force if it is gone for good"
    )]
    Leased { gateway: String, age: u64 },
    #[error(
        "this object store does not refuse a second create (If-None-Match), so nothing would stop the old gateway from writing over this one. Make sure it is gone for good, then take over with --force"
    )]
    Unfenced,
    #[error("another gateway committed to the volume during the takeover; try again")]
    Raced,
    #[error("{0}")]
    Remote(#[from] remote::Error),
    #[error("{0}")]
    Damaged(String),
    #[error("local disk: {0}")]
    Local(#[from] std::io::Error),
    /// Past the point of no return: the bucket names this gateway the volume's owner.
    #[error("{}", after_commit(*.n, .cause))]
    AfterCommit { n: u64, cause: String },
    /// The takeover's commit create found one there (its own answer lost, or a racer's),
    /// and reading it back failed: the takeover may have happened.
    #[error(
        "commit {n} is in the bucket, but reading it back failed ({source}): it may be this takeover's own, whose answer was lost. If so, the volume is no longer the old gateway's to write and no gateway serves it: run the takeover again with --force once the bucket answers"
    )]
    Unconfirmed { n: u64, source: remote::Error },
}

/// A volume taken over: its descriptor (the size as of the commit taken over) and the
/// number of the takeover's own commit.
#[derive(Debug)]
pub struct Taken {
    pub descriptor: Descriptor,
    pub commit: u64,
}

/// What a takeover that failed after its commit tells the user: the volume is this gateway's
/// in the bucket, and no gateway serves it until the takeover runs again.
pub fn after_commit(n: u64, cause: &str) -> String {
    format!(
        "the takeover's commit {n} is in the bucket, so the volume is no longer the old gateway's to write, but setting it up here failed: {cause}. Mend that, then run the takeover again with --force; until then no gateway serves the volume"
    )
}

/// The volume's descriptor, from the bucket.
pub async fn descriptor(
    bucket: &Bucket,
    sealer: &Sealer,
    id: &str,
) -> Result<Descriptor, TakeoverError> {
    let object = match bucket.remote.get(&bucket.descriptor_key()).await {
        Err(remote::Error::NotFound { .. }) => return Err(TakeoverError::NotFound(id.into())),
        other => other?,
    };
    open_descriptor(sealer, id, &object.body).map_err(TakeoverError::Damaged)
}

/// The newest commit in the bucket, if any.
pub async fn newest_commit(
    bucket: &Bucket,
    sealer: &Sealer,
    id: &str,
) -> Result<Option<Commit>, TakeoverError> {
    let commits = bucket
        .remote
        .list(&format!("{}commits/", bucket.prefix))
        .await?;
    let Some(newest) = commits.last() else {
        return Ok(None);
    };
    let object = bucket.remote.get(&newest.key).await?;
    open_commit(sealer, id, &object.body)
        .map(Some)
        .map_err(|e| TakeoverError::Damaged(format!("{}: {e}", newest.key)))
}

/// Says that `bucket`'s gateway serves volume `id`, as of now, since the takeover commit
/// `since` (0: since it made the volume).
/// Puts this gateway's lease, renewed at `time` (0: released, by a stop that left nothing
/// to commit: a takeover need not wait for it to age).
pub(super) async fn put_lease(
    bucket: &Bucket,
    sealer: &Sealer,
    id: &str,
    since: u64,
    time: u64,
) -> remote::Result<()> {
    let lease = Lease {
        format: FORMAT,
        gateway: bucket.gateway.clone(),
        time,
        since,
    };
    let plain = serde_json::to_vec(&lease).expect("a lease serializes");
    let sealed = sealer.seal(&lease_context(id), &plain);
    bucket
        .remote
        .put(&bucket.lease_key(), Bytes::from(sealed), Meta::new())
        .await
        .map(|_| ())
}

/// The volume's lease, if one is there.
pub async fn lease(
    bucket: &Bucket,
    sealer: &Sealer,
    id: &str,
) -> Result<Option<Lease>, TakeoverError> {
    match bucket.remote.get(&bucket.lease_key()).await {
        Err(remote::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
        Ok(object) => {
            let plain = sealer
                .open(&lease_context(id), &object.body)
                .map_err(|e| TakeoverError::Damaged(format!("lease: {e}")))?;
            let lease: Lease = serde_json::from_slice(&plain)
                .map_err(|e| TakeoverError::Damaged(format!("lease: {e}")))?;
            check_format("lease", lease.format).map_err(TakeoverError::Damaged)?;
            Ok(Some(lease))
        }
    }
}

/// The bucket image of the newest commit, as a map.
async fn image(
    bucket: &Bucket,
    sealer: &Sealer,
    key: &LogKey,
    id: &str,
    size: u64,
    commit: Option<&Commit>,
) -> Result<Checkpoint, TakeoverError> {
    let Some(commit) = commit else {
        return Ok(Checkpoint {
            at: Cut::default(),
            next_record: 1,
            size,
            map: Map::new(),
            salts: Default::default(),
            chunks: Default::default(),
            next_chunk: 0,
        });
    };
    let mut image = if commit.checkpoint.segment > 0 {
        let key = bucket.checkpoint_key(commit.checkpoint);
        let object = bucket.remote.get(&key).await?;
        open_checkpoint(sealer, id, Vec::from(object.body))
            .map_err(|e| TakeoverError::Damaged(format!("{key}: {e}")))?
    } else {
        Checkpoint {
            size,
            next_record: 1,
            ..Checkpoint::default()
        }
    };
    let last = commit.runs.last().map(|run| run.1);
    for &(first, end) in &commit.runs {
        for seq in first..=end {
            let object = bucket.remote.get(&bucket.segment_key(seq)).await?;
            let mut body: &[u8] = &object.body;
            if Some(seq) == last && commit.cut.segment == seq {
                // Records up to the cut must all be there: a body cut short at a record's
                // end would otherwise replay as a clean, shorter log.
                if body.len() < commit.cut.end as usize {
                    return Err(TakeoverError::Damaged(format!(
                        "segment {seq} holds {} bytes, but commit {} cuts it at {}",
                        body.len(),
                        commit.n,
                        commit.cut.end
                    )));
                }
                body = &body[..commit.cut.end as usize];
            }
            let from = if seq == commit.checkpoint.segment {
                commit.checkpoint.end as usize
            } else {
                0
            };
            let (_, damaged) = replay_records(
                key,
                seq,
                body,
                from,
                false,
                &mut image.map,
                &mut image.salts,
                &mut image.next_record,
            )
            .map_err(|e| TakeoverError::Damaged(format!("segment {seq}: {e}")))?;
            if damaged {
                return Err(TakeoverError::Damaged(format!(
                    "segment {seq} of commit {} does not hold whole records up to its cut",
                    commit.n
                )));
            }
        }
    }
    // The volume as of the commit, which may have grown since the checkpoint: a checkpoint
    // sealed from this image must hold every piece below its size.
    image.size = image.size.max(size);
    image.map.truncate(image.size);
    Ok(image)
}

/// Which gateway wrote the volume's newest commit, if it has one.
pub async fn committed_by(
    bucket: &Bucket,
    sealer: &Sealer,
    id: &str,
) -> Result<Option<String>, TakeoverError> {
    Ok(newest_commit(bucket, sealer, id).await?.map(|c| c.gateway))
}

/// Takes the volume `id` over from the bucket into `dir` (which must be empty): see the
/// module documentation. `honoured` is whether the store refuses a second create. Where the
/// newest commit is this gateway's own (a takeover of its own that a crash cut short), the
/// takeover needs no `force`.
#[allow(clippy::too_many_arguments)]
pub async fn take_over(
    bucket: &Bucket,
    sealer: &Sealer,
    meta: &MetaStore,
    id: &str,
    dir: &std::path::Path,
    honoured: bool,
    force: bool,
) -> Result<Taken, TakeoverError> {
    let descriptor = descriptor(bucket, sealer, id).await?;
    let key = LogKey::new(sealer.log_key(id));
    let commit = newest_commit(bucket, sealer, id).await?;
    // A takeover of this gateway's own that a crash cut short after its commit: the bucket
    // names this gateway already, and the old one is fenced, whatever its lease says.
    let resumed = commit.as_ref().is_some_and(|c| c.gateway == bucket.gateway);
    if !force && !resumed {
        if !honoured {
            return Err(TakeoverError::Unfenced);
        }
        if let Some(lease) = lease(bucket, sealer, id).await?
            && lease.gateway != bucket.gateway
        {
            let age = now_secs().saturating_sub(lease.time);
            if age < LEASE_LIVE.as_secs() {
                return Err(TakeoverError::Leased {
                    gateway: lease.gateway,
                    age,
                });
            }
        }
    }
    // The volume may have grown after the descriptor was last written.
    let mut descriptor = descriptor;
    if let Some(c) = &commit {
        descriptor.size = descriptor.size.max(c.size);
    }
    match &commit {
        Some(c) => tracing::info!(
            volume = %descriptor.name,
            "taking over at commit {} of gateway {} (checkpoint at {:?}, segments {:?} up to byte {} of {})",
            c.n, c.gateway, c.checkpoint, c.runs, c.cut.end, c.cut.segment
        ),
        None => {
            tracing::warn!(volume = %descriptor.name, "taking over a volume with no commit: it reads as zeros")
        }
    }
    let mut image = image(bucket, sealer, &key, id, descriptor.size, commit.as_ref()).await?;
    descriptor.size = image.size;

    // Past every segment in the bucket: the old gateway's uncommitted ones included.
    let mut free = commit
        .as_ref()
        .map(|c| c.cut.segment.max(c.checkpoint.segment))
        .unwrap_or(0)
        + 1;
    while bucket
        .remote
        .head(&bucket.segment_key(free))
        .await?
        .is_some()
    {
        free += 1;
    }
    let label = Cut {
        segment: free - 1 + SEGMENT_GAP,
        end: u64::MAX,
    };
    image.at = label;
    let sealed = Bytes::from(seal_checkpoint(sealer, id, &image));
    bucket
        .remote
        .put(&bucket.checkpoint_key(label), sealed.clone(), Meta::new())
        .await?;
    let n = commit.as_ref().map_or(0, |c| c.n) + 1;
    let cut = label;
    let takeover = Commit {
        format: FORMAT,
        volume: id.to_string(),
        n,
        size: descriptor.size,
        checkpoint: label,
        runs: Vec::new(),
        cut,
        gateway: bucket.gateway.clone(),
        time: now_secs(),
    };
    let plain = serde_json::to_vec(&takeover).map_err(|e| TakeoverError::Damaged(e.to_string()))?;
    let sealed_commit = sealer.seal(&commit_context(id), &plain);
    let key = bucket.commit_key(n);
    match bucket
        .remote
        .create(&key, Bytes::from(sealed_commit), Meta::new())
        .await
    {
        Ok(()) => {}
        // A create that failed for good, or that found a commit there: the one there says
        // whether this takeover happened (an attempt whose answer was lost stored it) or
        // another gateway's came first. Only a commit that is not there means nothing did.
        Err(failed @ (remote::Error::Exists { .. } | remote::Error::Transient { .. })) => {
            match bucket.remote.get(&key).await {
                Ok(there) => {
                    if open_commit(sealer, id, &there.body).as_ref() != Ok(&takeover) {
                        return Err(TakeoverError::Raced);
                    }
                }
                Err(remote::Error::NotFound { .. })
                    if matches!(failed, remote::Error::Transient { .. }) =>
                {
                    return Err(failed.into());
                }
                Err(source) => return Err(TakeoverError::Unconfirmed { n, source }),
            }
        }
        Err(e) => return Err(e.into()),
    }
    // This gateway's lease from now on: a running gateway that served the volume finds it
    // at its next renewal and fences itself. The commit has decided the takeover; should the
    // lease not go in now, the volume's uploads put it before anything else.
    if let Err(e) = put_lease(bucket, sealer, id, n, now_secs()).await {
        tracing::warn!(
            volume = %descriptor.name,
            "the takeover's commit {n} is in the bucket but its lease is not ({e}); the volume's uploads put it first"
        );
    }
    let local = |e: std::io::Error| TakeoverError::AfterCommit {
        n,
        cause: e.to_string(),
    };
    std::fs::create_dir_all(dir.join("segments")).map_err(local)?;
    store_local_checkpoint(dir, &sealed).map_err(local)?;
    let progress = Progress {
        uploaded: label.segment,
        commit: n,
        committed: Some(cut),
        checkpoint: label,
        checkpoints: vec![label],
        fenced: None,
        commit_checkpoint: label,
        gc_pending: Vec::new(),
        leased_since: n,
        // The takeover's own commit.
        commit_time: now_secs(),
    };
    meta.put_json(PROGRESS_TABLE, id, &progress)
        .map_err(|e| TakeoverError::AfterCommit {
            n,
            cause: e.to_string(),
        })?;
    Ok(Taken {
        descriptor,
        commit: n,
    })
}

//! What `GET /api/v1/status` answers and `firn status` prints.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Gateway;
use crate::remote::limit::Direction;
use crate::size::Human;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub gateway_id: String,
    pub uptime_seconds: u64,
    pub data_dir: String,
    pub development_keys: bool,
    pub remote: RemoteStatus,
    pub local: LocalStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteStatus {
    pub target: String,
    pub reachable: bool,
    pub last_error: Option<String>,
    pub checked_seconds_ago: Option<u64>,
    pub uploaded_bytes: u64,
    pub downloaded_bytes: u64,
    pub upload_limit: String,
    pub download_limit: String,
    /// Absent from the answers of older daemons: `unknown`.
    #[serde(default)]
    pub conditional_create: ConditionalCreate,
}

/// Whether the store refuses a second create of one key (S3 `If-None-Match: *`), which is
/// what fences two gateways off one volume; found once the remote answers, by
/// [`crate::remote::probe_create`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConditionalCreate {
    /// Not checked yet (the remote has not answered, or the check failed).
    #[default]
    Unknown,
    /// A second create fails: creates fence.
    Honoured,
    /// The store overwrote: creates do not fence.
    Ignored,
}

/// Said when the store overwrites on a create, at start and in `firn status`.
pub const IGNORED_WARNING: &str = "this object store ignores If-None-Match: two gateways could \
                                   write one volume at once; takeovers need --force";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalStatus {
    /// Bytes the data directory takes on disk.
    pub used_bytes: u64,
    /// Bytes free for firn on the data directory's file system.
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub max_bytes: Option<u64>,
}

/// (free for unprivileged users, total) bytes of the file system holding `dir`.
pub fn disk_space(dir: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => {
            let unit = s.fragment_size();
            (s.blocks_available() * unit, s.blocks() * unit)
        }
        Err(_) => (0, 0),
    }
}

impl Status {
    pub async fn of(gateway: &Gateway) -> Status {
        let data_dir = gateway.data_dir().to_path_buf();
        let (used, (free, total)) = tokio::task::spawn_blocking(move || {
            (
                crate::local::space::used_bytes(&data_dir),
                disk_space(&data_dir),
            )
        })
        .await
        .unwrap_or((0, (0, 0)));
        let health = gateway
            .health
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let limiter = &gateway.remote.limiter;
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            gateway_id: gateway.gateway_id.clone(),
            uptime_seconds: gateway.started.elapsed().as_secs(),
            data_dir: gateway.data_dir().display().to_string(),
            development_keys: gateway.dev_keys(),
            remote: RemoteStatus {
                target: gateway.config.remote_target(),
                reachable: health.reachable,
                last_error: health.last_error,
                checked_seconds_ago: health.checked.map(|t| t.elapsed().as_secs()),
                uploaded_bytes: gateway.remote.metrics.bytes_total("upload"),
                downloaded_bytes: gateway.remote.metrics.bytes_total("download"),
                upload_limit: limiter.rate_now(Direction::Upload).to_string(),
                download_limit: limiter.rate_now(Direction::Download).to_string(),
                conditional_create: *gateway
                    .conditional_create
                    .read()
                    .unwrap_or_else(|e| e.into_inner()),
            },
            local: LocalStatus {
                used_bytes: used,
                free_bytes: free.saturating_sub(gateway.config.local.min_free.0),
                total_bytes: total,
                max_bytes: gateway.config.local.max_bytes.map(|m| m.0),
            },
        }
    }

    /// The human form `firn status` prints.
    pub fn render(&self) -> String {
        let r = &self.remote;
        let l = &self.local;
        let mut out = format!(
            "firn {} ({}), up {}\n",
            self.version,
            self.gateway_id,
            uptime(self.uptime_seconds)
        );
        out += &format!("data directory  {}\n", self.data_dir);
        if self.development_keys {
            out += "keys            DEVELOPMENT MODE (master key stored in the data directory)\n";
        }
        out += &format!(
            "remote          {}: {}\n",
            r.target,
            if r.reachable {
                "reachable".to_string()
            } else {
                format!(
                    "UNREACHABLE ({})",
                    r.last_error.as_deref().unwrap_or("no answer")
                )
            }
        );
        out += &format!(
            "conditional put {}\n",
            match r.conditional_create {
                ConditionalCreate::Honoured =>
                    "honoured (a second create of an object is refused)".to_string(),
                ConditionalCreate::Ignored => format!("IGNORED: {IGNORED_WARNING}"),
                ConditionalCreate::Unknown => "unknown (not checked yet)".to_string(),
            }
        );
        out += &format!(
            "transferred     {} up, {} down (limits: up {}, down {})\n",
            Human(r.uploaded_bytes),
            Human(r.downloaded_bytes),
            r.upload_limit,
            r.download_limit
        );
        out += &format!(
            "local space     {} used, {} free of {}{}\n",
            Human(l.used_bytes),
            Human(l.free_bytes),
            Human(l.total_bytes),
            l.max_bytes
                .map(|m| format!(" (firn limit {})", Human(m)))
                .unwrap_or_default()
        );
        out
    }
}

fn uptime(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

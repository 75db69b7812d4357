//! The NBD door's metrics: gateway-wide (`firn_nbd_*`) and per export (`firn_volume_*` ops,
//! bytes and latencies). Counters are looked up once, when the metrics are made or a session
//! starts, so a request costs a few atomic additions and no lock.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::proto::*;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Why a connection was refused or dropped before transmission.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    /// No allowlist admits the peer's address.
    NotAllowed,
    /// `[nbd] max_connections` or `max_connections_per_address` reached.
    TooMany,
    /// Negotiation (TLS handshake included) took longer than `[nbd] negotiation_timeout_secs`.
    Timeout,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// The commands counted one by one; anything else counts as "other".
const COMMANDS: [(u16, &str); 8] = [
    (CMD_READ, "read"),
    (CMD_WRITE, "write"),
    (CMD_FLUSH, "flush"),
    (CMD_TRIM, "trim"),
    (CMD_WRITE_ZEROES, "write_zeroes"),
    (CMD_BLOCK_STATUS, "block_status"),
    (CMD_CACHE, "cache"),
    (u16::MAX, "other"),
];

#[derive(Debug)]
pub struct NbdMetrics {
    connections: Gauge,
    connections_total: Counter,
    requests: Vec<Counter>,
    errors: Vec<Counter>,
    read_bytes: Counter,
    written_bytes: Counter,
    panics: Counter,
    /// Indexed by `Refusal as usize`.
    refused: Vec<Counter>,
    /// Each export's counts and latencies, by name. Locked when a session starts, when a
    /// volume is deleted and at scrape time, never per request.
    exports: Mutex<HashMap<String, Arc<ExportOps>>>,
    /// Every export's counts and latencies together, kept apart so that they never go back
    /// when a volume is deleted: `firn_gateway_*`.
    gateway: Arc<ExportOps>,
}

impl NbdMetrics {
    pub fn new(registry: &mut Registry) -> NbdMetrics {
        let requests = Family::<CommandLabels, Counter>::default();
        let errors = Family::<CommandLabels, Counter>::default();
        let bytes = Family::<DirectionLabels, Counter>::default();
        let refused = Family::<ReasonLabels, Counter>::default();
        // One statement each: `get_or_create` holds the family's lock until the statement
        // ends, and a second one in the same statement would wait for it forever.
        let read_bytes = bytes
            .get_or_create(&DirectionLabels { direction: "read" })
            .clone();
        let written_bytes = bytes
            .get_or_create(&DirectionLabels { direction: "write" })
            .clone();
        let metrics = NbdMetrics {
            connections: Gauge::default(),
            connections_total: Counter::default(),
            // A clone of a counter shares its value with the one in the family.
            requests: COMMANDS
                .iter()
                .map(|&(_, command)| requests.get_or_create(&CommandLabels { command }).clone())
                .collect(),
            errors: COMMANDS
                .iter()
                .map(|&(_, command)| errors.get_or_create(&CommandLabels { command }).clone())
                .collect(),
            read_bytes,
            written_bytes,
            panics: Counter::default(),
            refused: ["not_allowed", "too_many", "timeout"]
                .into_iter()
                .map(|reason| refused.get_or_create(&ReasonLabels { reason }).clone())
                .collect(),
            exports: Mutex::new(HashMap::new()),
            gateway: Arc::default(),
        };
        registry.register(
            "firn_nbd_connections",
            "NBD connections open now (negotiating or transmitting)",
            metrics.connections.clone(),
        );
        registry.register(
            "firn_nbd_connections_opened",
            "NBD connections accepted since the start",
            metrics.connections_total.clone(),
        );
        registry.register(
            "firn_nbd_requests",
            "NBD requests in transmission, by command",
            requests,
        );
        registry.register(
            "firn_nbd_errors",
            "NBD requests answered with an error, by command",
            errors,
        );
        registry.register(
            "firn_nbd_panics",
            "NBD requests that hit a bug and were answered with EIO (should stay 0)",
            metrics.panics.clone(),
        );
        registry.register(
            "firn_nbd_refused",
            "NBD connections refused at accept (not_allowed, too_many) or dropped for not \
             finishing negotiation in time (timeout)",
            refused,
        );
        registry.register(
            "firn_nbd_bytes",
            "Bytes read and written by NBD clients",
            bytes,
        );
        metrics
    }

    fn slot(command: u16) -> usize {
        COMMANDS
            .iter()
            .position(|&(kind, _)| kind == command)
            .unwrap_or(COMMANDS.len() - 1)
    }

    /// Counts a connection until the guard is dropped.
    pub(super) fn connection(&self) -> ConnectionGuard<'_> {
        self.connections.inc();
        self.connections_total.inc();
        ConnectionGuard(self)
    }

    pub(super) fn refused(&self, why: Refusal) {
        self.refused[why as usize].inc();
    }

    pub(super) fn request(&self, command: u16) {
        self.requests[Self::slot(command)].inc();
    }

    pub(super) fn error(&self, command: u16) {
        self.errors[Self::slot(command)].inc();
    }

    pub(super) fn panicked(&self) {
        self.panics.inc();
    }

    /// Requests that panicked since the start.
    pub fn panics(&self) -> u64 {
        self.panics.get()
    }

    pub(super) fn read(&self, bytes: u32) {
        self.read_bytes.inc_by(u64::from(bytes));
    }

    pub(super) fn written(&self, bytes: u32) {
        self.written_bytes.inc_by(u64::from(bytes));
    }
}

impl NbdMetrics {
    /// The counts and latencies of the export `name`, which a session keeps for its requests.
    pub(super) fn export(&self, name: &str) -> Arc<ExportOps> {
        self.exports_map()
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ExportOps {
                    gateway: Some(self.gateway.clone()),
                    ..ExportOps::default()
                })
            })
            .clone()
    }

    /// Drops what was counted for the export `name` (its volume was deleted). Sessions still
    /// attached keep counting into their copy, which no scrape shows.
    pub fn forget_export(&self, name: &str) {
        self.exports_map().remove(name);
    }

    /// The per-export families in OpenMetrics text, for the exports `exists` names: one line
    /// each of `firn_volume_{read,write}_{ops,bytes}_total` and the `firn_volume_op_seconds`
    /// histogram by `op`. Exports that no longer exist and no session uses are dropped here,
    /// so memory stays bounded by the volumes there are.
    pub fn encode_exports(&self, exists: impl Fn(&str) -> bool) -> String {
        let mut exports: Vec<(String, Arc<ExportOps>)> = {
            let mut map = self.exports_map();
            map.retain(|name, ops| exists(name) || Arc::strong_count(ops) > 1);
            map.iter()
                .filter(|(name, _)| exists(name))
                .map(|(name, ops)| (name.clone(), ops.clone()))
                .collect()
        };
        exports.sort_by(|a, b| a.0.cmp(&b.0));
        let labelled: Vec<(String, &ExportOps)> = exports
            .iter()
            .map(|(name, ops)| (format!("volume=\"{name}\""), &**ops))
            .collect();
        encode_ops(
            "firn_volume",
            "the volume",
            "NBD requests of the volume",
            &labelled,
        )
    }

    /// Every export's counts and latencies together, in OpenMetrics text:
    /// `firn_gateway_{read,write}_{ops,bytes}_total` and `firn_gateway_op_seconds` by `op`.
    /// Counted since the daemon started, deleted volumes included.
    pub fn encode_gateway(&self) -> String {
        encode_ops(
            "firn_gateway",
            "all volumes",
            "NBD requests of all volumes",
            &[(String::new(), &*self.gateway)],
        )
    }

    fn exports_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ExportOps>>> {
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `ops`' counters and latency histograms as OpenMetrics families named `{prefix}_...`, one
/// sample per entry with its labels (`""` for none).
fn encode_ops(prefix: &str, whose: &str, requests: &str, ops: &[(String, &ExportOps)]) -> String {
    let mut text = String::new();
    type Value = fn(&ExportOps) -> u64;
    let counters: [(&str, &str, Value); 4] = [
        ("read_ops", "NBD reads of", |o| o.count(Op::Read)),
        ("write_ops", "NBD writes to", |o| o.count(Op::Write)),
        ("read_bytes", "Bytes NBD clients read from", |o| {
            o.read_bytes.load(Ordering::Relaxed)
        }),
        ("write_bytes", "Bytes NBD clients wrote to", |o| {
            o.write_bytes.load(Ordering::Relaxed)
        }),
    ];
    let braced = |labels: &str| {
        if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        }
    };
    for (name, help, value) in counters {
        let _ = writeln!(
            text,
            "# HELP {prefix}_{name} {help} {whose} since the daemon started.\n# TYPE {prefix}_{name} counter"
        );
        for (labels, ops) in ops {
            let _ = writeln!(
                text,
                "{prefix}_{name}_total{} {}",
                braced(labels),
                value(ops)
            );
        }
    }
    let name = format!("{prefix}_op_seconds");
    let _ = writeln!(
        text,
        "# HELP {name} Time the device took for {requests}, by operation: the device call alone, \
         without queueing or the network.\n# TYPE {name} histogram"
    );
    for (labels, ops) in ops {
        for op in Op::ALL {
            let stats = &ops.ops[op as usize];
            let labels = if labels.is_empty() {
                format!("op=\"{}\"", op.name())
            } else {
                format!("{labels},op=\"{}\"", op.name())
            };
            let mut count = 0;
            for ((_, bound), bucket) in BUCKETS.iter().zip(&stats.buckets) {
                count += bucket.load(Ordering::Relaxed);
                let _ = writeln!(text, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
            }
            count += stats.buckets[BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(text, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
            let sum = stats.nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(text, "{name}_sum{{{labels}}} {sum}");
            let _ = writeln!(text, "{name}_count{{{labels}}} {count}");
        }
    }
    text
}

/// What an export's latency histogram is split on: upper bounds in nanoseconds, and as the
/// `le` label writes them (`+Inf` after the last).
const BUCKETS: [(u64, &str); 16] = [
    (50_000, "0.00005"),
    (100_000, "0.0001"),
    (250_000, "0.00025"),
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1.0"),
    (2_500_000_000, "2.5"),
    (10_000_000_000, "10.0"),
];

/// The requests whose device time an export's histogram records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl Op {
    const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes];

    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
        }
    }
}

/// One operation's latency histogram: a count per bucket (not cumulative; summed at scrape
/// time) and the total time, so recording is two atomic additions.
#[derive(Debug, Default)]
struct OpStats {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    nanos: AtomicU64,
}

/// One export's counts, bytes and latencies, shared by every session on it.
#[derive(Debug, Default)]
pub struct ExportOps {
    ops: [OpStats; Op::ALL.len()],
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    /// Where the gateway's totals are counted too (none for the totals themselves).
    gateway: Option<Arc<ExportOps>>,
}

impl ExportOps {
    /// `op` ran on the device (successfully or not) for `took`.
    pub(super) fn done(&self, op: Op, took: Duration) {
        let stats = &self.ops[op as usize];
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKETS
            .iter()
            .position(|&(bound, _)| nanos <= bound)
            .unwrap_or(BUCKETS.len());
        stats.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        stats.nanos.fetch_add(nanos, Ordering::Relaxed);
        if let Some(gateway) = &self.gateway {
            gateway.done(op, took);
        }
    }

    pub(super) fn read(&self, bytes: u32) {
        self.read_bytes
            .fetch_add(u64::from(bytes), Ordering::Relaxed);
        if let Some(gateway) = &self.gateway {
            gateway.read(bytes);
        }
    }

    pub(super) fn written(&self, bytes: u32) {
        self.write_bytes
            .fetch_add(u64::from(bytes), Ordering::Relaxed);
        if let Some(gateway) = &self.gateway {
            gateway.written(bytes);
        }
    }

    /// Requests of `op` that ran.
    fn count(&self, op: Op) -> u64 {
        self.ops[op as usize]
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

pub(super) struct ConnectionGuard<'a>(&'a NbdMetrics);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_histograms_are_cumulative_and_gone_exports_are_dropped() {
        let metrics = NbdMetrics::new(&mut Registry::default());
        let disk = metrics.export("disk");
        disk.done(Op::Read, Duration::from_micros(10));
        disk.done(Op::Read, Duration::from_millis(3));
        disk.done(Op::Read, Duration::from_secs(60));
        disk.read(4096);
        disk.written(512);
        disk.done(Op::Write, Duration::from_micros(70));
        drop(disk);
        let text = metrics.encode_exports(|name| name == "disk");
        for line in [
            "firn_volume_read_ops_total{volume=\"disk\"} 3",
            "firn_volume_write_ops_total{volume=\"disk\"} 1",
            "firn_volume_read_bytes_total{volume=\"disk\"} 4096",
            "firn_volume_write_bytes_total{volume=\"disk\"} 512",
            "firn_volume_op_seconds_bucket{volume=\"disk\",op=\"read\",le=\"0.00005\"} 1",
            "firn_volume_op_seconds_bucket{volume=\"disk\",op=\"read\",le=\"0.0025\"} 1",
            "firn_volume_op_seconds_bucket{volume=\"disk\",op=\"read\",le=\"0.005\"} 2",
            "firn_volume_op_seconds_bucket{volume=\"disk\",op=\"read\",le=\"10.0\"} 2",
            "firn_volume_op_seconds_bucket{volume=\"disk\",op=\"read\",le=\"+Inf\"} 3",
            "firn_volume_op_seconds_count{volume=\"disk\",op=\"read\"} 3",
            "firn_volume_op_seconds_sum{volume=\"disk\",op=\"read\"} 60.00301",
            "firn_volume_op_seconds_bucket{volume=\"disk\",op=\"write\",le=\"0.0001\"} 1",
            "firn_volume_op_seconds_count{volume=\"disk\",op=\"trim\"} 0",
            "# TYPE firn_volume_op_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }

        // A volume that is gone disappears; one a session still uses stays hidden until
        // the session ends.
        let held = metrics.export("held");
        metrics.export("gone");
        let text = metrics.encode_exports(|_| false);
        assert!(!text.contains("volume="), "{text}");
        assert_eq!(metrics.exports_map().len(), 1, "only the held one is kept");
        drop(held);
        metrics.encode_exports(|_| false);
        assert!(metrics.exports_map().is_empty());

        // Forgetting starts a volume of the same name from zero.
        metrics.export("disk").done(Op::Flush, Duration::ZERO);
        metrics.forget_export("disk");
        assert_eq!(metrics.export("disk").count(Op::Flush), 0);

        // The gateway's totals count every volume's requests, the dropped ones included.
        metrics
            .export("other")
            .done(Op::Read, Duration::from_micros(10));
        let text = metrics.encode_gateway();
        for line in [
            "firn_gateway_read_ops_total 4",
            "firn_gateway_write_ops_total 1",
            "firn_gateway_read_bytes_total 4096",
            "firn_gateway_write_bytes_total 512",
            "firn_gateway_op_seconds_bucket{op=\"read\",le=\"0.00005\"} 2",
            "firn_gateway_op_seconds_count{op=\"read\"} 4",
            "firn_gateway_op_seconds_count{op=\"flush\"} 1",
            "# TYPE firn_gateway_op_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}

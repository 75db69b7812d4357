//! The NBD door's metrics (`firn_nbd_*`). Counters are looked up once, when the metrics are
//! made, so a request costs a few atomic additions and no lock.

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

pub(super) struct ConnectionGuard<'a>(&'a NbdMetrics);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

//! The NBD door: a fixed-newstyle NBD server over [`BlockDevice`]. It knows the protocol and
//! the block-device trait, nothing of volumes' storage or of the object store.
//!
//! [`BlockDevice`]: crate::engines::volume::BlockDevice

pub mod metrics;
pub mod proto;
pub mod server;

pub use metrics::NbdMetrics;
pub use server::{
    Attachment, Client, ExportInfo, Exports, Limits, NbdServer, OpenError, Peer, TlsAcceptor,
    psk_identity_slot,
};

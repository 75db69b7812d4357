//! What `firn serve` does to its own process before anything else runs: files and sockets
//! are created for its user alone (umask 077).

use nix::sys::stat::{Mode, umask};

/// Call first thing in `firn serve`, before the async runtime starts its threads.
pub fn harden() {
    // Everything firn creates (the catalog, logs, the NBD socket before its mode is set, the
    // local bucket's folders) is its user's alone; modes given explicitly still apply.
    umask(Mode::from_bits_truncate(0o077));
}

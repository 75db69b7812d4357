//! What `firn serve` does to its own process before anything else runs: files and sockets
//! are created for its user alone (umask 077), no core dump can be written (it would hold
//! keys and volume plaintext), and the key or passphrase is taken out of the environment,
//! where /proc/PID/environ would show it for as long as the daemon runs.

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::stat::{Mode, umask};

use crate::seal::KeySource;
use crate::seal::keys::take_env_secret;

/// Call first thing in `firn serve`.
///
/// # Safety
///
/// No other thread may exist yet (it changes the environment): call it before the async
/// runtime, or anything else that starts threads, is built.
pub unsafe fn harden(keys: &KeySource) {
    // Everything firn creates (the catalog, logs, the NBD socket before its mode is set, the
    // local bucket's folders) is its user's alone; modes given explicitly still apply.
    umask(Mode::from_bits_truncate(0o077));
    // Not dumpable: no core file, and other processes of the same user cannot ptrace it or
    // read its memory or environment through /proc.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("cannot turn core dumps off (prctl PR_SET_DUMPABLE): {e}");
    }
    if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        tracing::warn!("cannot set the core file size limit to 0: {e}");
    }
    match keys {
        // SAFETY: no other thread exists (this function's own contract).
        KeySource::Env { env } | KeySource::Passphrase { env } => unsafe { take_env_secret(env) },
        KeySource::Dev | KeySource::File { .. } => {}
    }
}

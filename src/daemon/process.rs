//! What `firn serve` does to its own process first, so that keys and plaintext cannot reach
//! disk or other users through it: files and sockets for its user alone (umask 077), no core
//! dumps, and key variables out of the environment.
//! Key memory itself is `seal::Secret`'s concern (locked, out of dumps, wiped). Also the
//! allocator's arena count, which otherwise grows with the threads that ever allocated.

use crate::seal::KeySource;
use crate::seal::environment;

/// The variables whose values are taken out of the environment at start, whatever
/// `[keys]` says: a key left in the environment is readable in /proc/PID/environ and is
/// inherited by every child.
const KEY_VARIABLES: [&str; 2] = ["FIRN_MASTER_KEY", "FIRN_PASSPHRASE"];

/// Sets the umask, takes the key variables out of the environment, then turns core dumps off.
/// Must run while the process has one thread (before the async runtime starts); it says so in
/// the log and goes on otherwise, as it does when the kernel refuses a step.
pub fn harden(keys: &KeySource) {
    // Everything firn creates (the catalog, logs, the NBD socket before its mode is set, the
    // local bucket's folders) is its user's alone; modes given explicitly still apply.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let mut names: Vec<&str> = KEY_VARIABLES.to_vec();
    if let KeySource::Env { env } | KeySource::Passphrase { env } = keys
        && !names.contains(&env.as_str())
    {
        names.push(env);
    }
    // Before core dumps are turned off: a process that is not dumpable may lose access to
    // parts of its own /proc entry, which `take` reads.
    if let Err(e) = environment::take(&names) {
        tracing::warn!("{e}; /proc/PID/environ may show the key to its readers");
    }
    forbid_core_dumps();
}

/// No core file (RLIMIT_CORE 0, hard limit too, so nothing in the process can raise it),
/// and not dumpable (PR_SET_DUMPABLE 0), which also covers core handlers that ignore the
/// limit (a `|program` core_pattern) and makes /proc/PID/environ, mem, maps and the like
/// owned by root, so other processes of the same non-root user cannot read them, nor
/// ptrace this one.
fn forbid_core_dumps() {
    use nix::sys::resource::{Resource, setrlimit};
    if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        tracing::warn!("cannot set RLIMIT_CORE to 0 ({e}): a crash may write a core file");
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("cannot clear the dumpable flag ({e}): a crash may write a core file");
    }
}

/// Raises the soft limit on open files to the hard one (commonly 1,024 against 524,288): the
/// daemon keeps files open per volume and share (each bounded) and a socket per client, and
/// the soft default is sized for interactive programs, not servers.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("cannot raise the open files limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!("cannot read the open files limit: {e}"),
    }
}

/// Most glibc malloc arenas. glibc gives a thread that allocates under contention an arena of
/// its own (up to 8 per core), and freed memory stays in it: with the runtime's many blocking
/// threads each request's buffers ended up spread over 16 arenas of 10 to 16 MiB each, which
/// is most of the daemon's resident memory. Measured with 4 KiB random writes: peak RSS 203
/// MiB with the default, 55 MiB with 2 arenas, the same IOPS.
const MALLOC_ARENAS: i32 = 4;

/// Caps glibc's malloc arenas (see `MALLOC_ARENAS`); `MALLOC_ARENA_MAX` in the environment
/// still wins, as glibc reads it first. Call before the runtime's threads start.
pub fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only changes the allocator's tuning; called while single-threaded.
    let ok = unsafe { nix::libc::mallopt(nix::libc::M_ARENA_MAX, MALLOC_ARENAS) };
    if ok != 1 {
        tracing::debug!("mallopt(M_ARENA_MAX) refused; memory may grow with the thread count");
    }
}

/// Lowers the calling thread's CPU priority to nice value `nice` (Linux keeps one per thread).
/// For the threads of the upload runtime (`[remote] upload_nice`); a refusal is logged and
/// the thread goes on at the daemon's priority.
pub fn lower_thread_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: setpriority only changes the scheduling of the thread it names (0: the caller).
    let rc = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        tracing::debug!(
            "setpriority({nice}) refused ({}); uploads run at the daemon's priority",
            std::io::Error::last_os_error()
        );
    }
}

//! Key material passed in environment variables (`FIRN_MASTER_KEY`, `FIRN_PASSPHRASE`, or
//! the names `[keys] env` gives): taken out of the process environment once at start, while
//! the process has a single thread, and kept in locked memory (`Secret`) until the key
//! loader asks for it.
//!
//! Removing a variable (`unsetenv`) only edits libc's array of pointers. The strings stay
//! where the kernel put them at exec, on the initial stack, and that area (`env_start` to
//! `env_end`, fields 50 and 51 of /proc/self/stat) is what /proc/PID/environ shows to
//! anyone allowed to read it. So the bytes there are overwritten with zeros as well: the
//! variable then reads as a run of empty entries.

use std::ffi::CStr;
use std::sync::{Mutex, PoisonError};

use zeroize::Zeroize;

use super::secret::SecretBuf;

#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error(
        "the process already runs {0} threads; key variables can only be taken out of the environment while it runs one"
    )]
    Threads(usize),
    #[error("cannot read /proc/self ({0}); key variables stay in the environment")]
    Proc(String),
}

/// Values taken out of the environment, by variable name, until the key loader takes them.
static TAKEN: Mutex<Vec<(String, SecretBuf)>> = Mutex::new(Vec::new());

/// Moves the variables `names` out of the environment into locked memory, wiping the bytes
/// /proc/PID/environ shows. Returns how many were present. Refuses (and changes nothing)
/// unless the calling thread is the process's only thread: nothing else may read the
/// environment while it is edited.
pub fn take(names: &[&str]) -> Result<usize, TakeError> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|e| TakeError::Proc(e.to_string()))?
        .count();
    if threads != 1 {
        return Err(TakeError::Threads(threads));
    }
    let area = initial_environment_area()?;
    let mut taken = 0;
    for name in names {
        if let Some(value) = take_one(name, &area) {
            let mut slots = TAKEN.lock().unwrap_or_else(PoisonError::into_inner);
            slots.retain(|(known, _)| known != name);
            slots.push((name.to_string(), value));
            taken += 1;
        }
    }
    Ok(taken)
}

/// The value of the key variable `name`: the one `take` kept (handed over once), or else
/// read from the environment now (tests, and library callers that never called `take`).
pub fn variable(name: &str) -> Option<SecretBuf> {
    let mut slots = TAKEN.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(at) = slots.iter().position(|(known, _)| known == name) {
        return Some(slots.swap_remove(at).1);
    }
    drop(slots);
    let mut value = std::env::var_os(name)?.into_encoded_bytes();
    let secret = SecretBuf::copy_of(&value);
    value.zeroize();
    Some(secret)
}

/// Where the kernel placed the environment strings at exec.
fn initial_environment_area() -> Result<std::ops::Range<usize>, TakeError> {
    let stat =
        std::fs::read_to_string("/proc/self/stat").map_err(|e| TakeError::Proc(e.to_string()))?;
    // Field 2 (the command name) may hold spaces and parentheses; count from the last ')'.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `fields[0]` is field 3, so field n is `fields[n - 3]`.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<usize>().ok());
    match (field(50), field(51)) {
        (Some(start), Some(end)) if start < end => Ok(start..end),
        _ => Err(TakeError::Proc(
            "no env_start/env_end in /proc/self/stat".to_string(),
        )),
    }
}

/// Copies out, removes and wipes every `name=...` entry. The first entry's value is the
/// one `getenv` would have returned.
fn take_one(name: &str, area: &std::ops::Range<usize>) -> Option<SecretBuf> {
    let prefix = format!("{name}=");
    let mut value = None;
    let mut originals: Vec<(*mut u8, usize)> = Vec::new();
    // SAFETY: `take` checked this is the only thread, so nothing changes `environ` or the
    // strings it points to while we read: it is a null-terminated array of pointers to
    // NUL-terminated strings, as exec and libc keep it.
    unsafe {
        let mut entry = nix::libc::environ;
        while !entry.is_null() && !(*entry).is_null() {
            let text = CStr::from_ptr(*entry).to_bytes();
            if let Some(found) = text.strip_prefix(prefix.as_bytes()) {
                if value.is_none() {
                    value = Some(SecretBuf::copy_of(found));
                }
                originals.push(((*entry).cast::<u8>(), text.len()));
            }
            entry = entry.add(1);
        }
    }
    value.as_ref()?;
    // SAFETY: the only thread, as `take` checked, so no other thread reads or writes the
    // environment during this call (the requirement `remove_var` states).
    unsafe { std::env::remove_var(name) };
    for (start, len) in originals {
        let address = start as usize;
        // Only the strings exec placed are overwritten: a variable set later with setenv
        // lives in libc's heap, where libc may still track it, and /proc does not show it.
        if area.contains(&address) && address + len <= area.end {
            // SAFETY: `start..start + len` is a string in the initial environment area,
            // which is mapped and writable (the main thread's stack) for the life of the
            // process. After `remove_var` no entry of `environ` points to it, no Rust
            // reference to it exists (the only ones, in the loop above, have ended), and no
            // other thread runs: writing zeros there aliases nothing.
            unsafe { std::slice::from_raw_parts_mut(start, len) }.zeroize();
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_read_directly_when_nothing_was_taken() {
        // The test harness runs many threads, so `take` must refuse here.
        assert!(matches!(take(&["PATH"]), Err(TakeError::Threads(_))));
        let path = variable("PATH").expect("PATH is set");
        assert_eq!(
            path.as_bytes(),
            std::env::var_os("PATH").expect("PATH").as_encoded_bytes()
        );
        assert!(variable("FIRN_TEST_NO_SUCH_VARIABLE").is_none());
    }

    #[test]
    fn the_environment_area_is_found() {
        let area = initial_environment_area().expect("env_start/env_end");
        assert!(area.end - area.start > 0);
    }
}

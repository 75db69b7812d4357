//! Calls to the bucket that a blocking thread waits on (`block_on`), and the stop that ends
//! them: once it begins, calls under way are dropped and new ones are refused, and the stop
//! can wait for the last to end, so that none outlives the runtime it runs on (which panics).

use std::future::Future;
use std::sync::{PoisonError, RwLock};

#[derive(Debug)]
pub struct StopGate {
    stopping: tokio::sync::watch::Sender<bool>,
    /// Held (shared) by each call; `stop_and_wait` takes it whole.
    calls: RwLock<()>,
}

impl Default for StopGate {
    fn default() -> StopGate {
        StopGate {
            stopping: tokio::sync::watch::Sender::new(false),
            calls: RwLock::new(()),
        }
    }
}

impl StopGate {
    /// `call`, run on `runtime` from this blocking thread; `None` if the stop began first
    /// (or begins while it runs: it is then dropped).
    pub fn call<T>(
        &self,
        runtime: &tokio::runtime::Handle,
        call: impl Future<Output = T>,
    ) -> Option<T> {
        let _running = self.calls.read().unwrap_or_else(PoisonError::into_inner);
        let mut stopping = self.stopping.subscribe();
        if *stopping.borrow_and_update() {
            return None;
        }
        runtime.block_on(async move {
            tokio::select! {
                biased;
                _ = stopping.wait_for(|stopping| *stopping) => None,
                answer = call => Some(answer),
            }
        })
    }

    /// Ends the calls under way and refuses new ones.
    pub fn begin_stop(&self) {
        self.stopping.send_replace(true);
    }

    /// `begin_stop`, then waits for the calls under way to end (at once: they are dropped).
    pub fn stop_and_wait(&self) {
        self.begin_stop();
        drop(self.calls.write().unwrap_or_else(PoisonError::into_inner));
    }
}

//! A prefix watch: a paced loop of blocking reads.

use std::time::Duration;

use tokio::time::Instant;

use super::{BlockingQuery, ConsulKv, Error};
use crate::backoff::Backoff;
use crate::types::KvPair;

/// Pacing of a [`PrefixWatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchOptions {
    /// Blocking wait asked of the server (it caps at 10 minutes).
    pub wait: Duration,
    /// Least time between the starts of two requests, so that a server
    /// answering at once (index reset, bug, proxy) cannot cause a busy loop.
    pub min_interval: Duration,
    /// First delay after a failed read; doubles per consecutive failure.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            wait: Duration::from_secs(5 * 60),
            min_interval: Duration::from_millis(100),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// The prefix's content at a new index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchUpdate {
    pub index: u64,
    /// Every entry under the prefix; empty means the prefix really is
    /// empty (a failed read is an `Err`, never an empty update).
    pub entries: Vec<KvPair>,
    /// The server's index went backwards (new cluster, restored snapshot,
    /// fresh data dir): treat `entries` as a full resync, not a delta.
    pub reset: bool,
}

/// Watches every key under a prefix.
///
/// Each [`PrefixWatch::next`] returns the prefix's entries once their index
/// differs from the last one returned (the first call returns at once).
/// A failed read returns `Err`: the caller can tell "Consul unreachable"
/// from "prefix empty". Calling `next` again retries after a backoff with
/// jitter. When the index goes backwards the watch starts over from index 0
/// and marks the update as a reset.
#[derive(Debug)]
pub struct PrefixWatch {
    client: ConsulKv,
    prefix: String,
    options: WatchOptions,
    /// Index of the last update returned; 0 before the first, or after the
    /// server's index went backwards.
    index: u64,
    reset_pending: bool,
    last_request: Option<Instant>,
    consecutive_failures: u32,
}

impl PrefixWatch {
    pub(crate) fn new(client: ConsulKv, prefix: String, options: WatchOptions) -> Self {
        PrefixWatch {
            client,
            prefix,
            options,
            index: 0,
            reset_pending: false,
            last_request: None,
            consecutive_failures: 0,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Index of the last update returned (0 before the first).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Waits for the next change under the prefix.
    pub async fn next(&mut self) -> Result<WatchUpdate, Error> {
        loop {
            self.pace().await;
            self.last_request = Some(Instant::now());
            let answer = if self.index == 0 {
                self.client.get_recurse(&self.prefix).await
            } else {
                let query = BlockingQuery {
                    index: self.index,
                    wait: self.options.wait,
                };
                self.client.get_recurse_blocking(&self.prefix, query).await
            };
            let answer = match answer {
                Ok(answer) => answer,
                Err(error) => {
                    self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                    return Err(error);
                }
            };
            self.consecutive_failures = 0;
            // An index below 1 would make the next read non-blocking.
            let index = answer.index.max(1);
            if self.index != 0 && index < self.index {
                tracing::info!(
                    prefix = %self.prefix,
                    previous = self.index,
                    current = index,
                    "consul index went backwards; resynchronising the watch"
                );
                self.index = 0;
                self.reset_pending = true;
                continue;
            }
            if index == self.index {
                // The wait ended without a change.
                continue;
            }
            self.index = index;
            return Ok(WatchUpdate {
                index,
                entries: answer.value,
                reset: std::mem::take(&mut self.reset_pending),
            });
        }
    }

    /// Sleeps for what remains of the minimum interval, or of the backoff
    /// after failures (jittered in its upper half, so that many watchers
    /// do not retry in step).
    async fn pace(&self) {
        let Some(last) = self.last_request else {
            return;
        };
        let mut gap = self.options.min_interval;
        if self.consecutive_failures > 0 {
            let backoff = Backoff::new(self.options.backoff_initial, self.options.backoff_max);
            gap = gap.max(backoff.delay(self.consecutive_failures));
        }
        tokio::time::sleep_until(last + gap).await;
    }
}

//! The shared store: state behind a lock, durable commits, and a channel
//! that announces each new index to blocking queries.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

use crate::persist::{PersistError, Persistence};
use crate::state::{evaluate, KvState, ReceivedOp};
use consul_kv::types::{TxnOpError, TxnResult};

/// The outcome of a transaction.
#[derive(Debug)]
pub(crate) enum Outcome {
    Committed(Vec<TxnResult>),
    Refused(Vec<TxnOpError>),
}

/// A write could not be made durable; nothing was applied.
#[derive(Debug, thiserror::Error)]
#[error("failed to persist the write: {0}")]
pub(crate) struct CommitError(String);

struct Inner {
    state: KvState,
    persistence: Option<Persistence>,
    /// Set when the log could not be repaired after a failed append; every
    /// later write is refused rather than risk an unreadable log.
    broken: bool,
}

pub(crate) struct Store {
    inner: Mutex<Inner>,
    index_tx: watch::Sender<u64>,
}

impl Store {
    pub fn open(
        data_dir: Option<&Path>,
        compact_after_bytes: u64,
        max_tombstones: usize,
    ) -> Result<Self, PersistError> {
        let (persistence, mut state) = match data_dir {
            Some(dir) => {
                let (persistence, state) = Persistence::open(dir, compact_after_bytes)?;
                (Some(persistence), state)
            }
            None => (None, KvState::default()),
        };
        state.tombstone_limit = max_tombstones;
        state.reap_tombstones();
        let (index_tx, _) = watch::channel(state.last_index);
        Ok(Store {
            inner: Mutex::new(Inner {
                state,
                persistence,
                broken: false,
            }),
            index_tx,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while the state is half-changed (apply is plain
        // map updates), so a poisoned lock still guards a consistent state.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn read<R>(&self, query: impl FnOnce(&KvState) -> R) -> R {
        query(&self.lock().state)
    }

    /// A receiver that sees every committed index.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.index_tx.subscribe()
    }

    /// Runs a transaction; may block on fsync, so call it off the async
    /// executor.
    pub fn commit(&self, ops: &[ReceivedOp]) -> Result<Outcome, CommitError> {
        let mut inner = self.lock();
        // Index 1 is what an empty store answers (never 0), so the first
        // write must be above it or a watcher at 1 would miss it; Consul
        // gets the same from Raft's own first entries.
        let index = inner.state.last_index.max(1) + 1;
        let evaluation = evaluate(&inner.state, index, ops);
        if !evaluation.errors.is_empty() {
            return Ok(Outcome::Refused(evaluation.errors));
        }
        if evaluation.mutations.is_empty() {
            return Ok(Outcome::Committed(evaluation.results));
        }
        if inner.broken {
            return Err(CommitError(
                "the data log is unusable after an earlier failure".into(),
            ));
        }
        if let Some(persistence) = inner.persistence.as_mut() {
            if let Err(failure) = persistence.append(index, &evaluation.mutations) {
                tracing::error!(error = %failure.error, "kv log append failed");
                inner.broken = !failure.log_intact;
                return Err(CommitError(failure.error.to_string()));
            }
        }
        inner.state.apply(index, &evaluation.mutations);
        let Inner {
            state, persistence, ..
        } = &mut *inner;
        if let Some(persistence) = persistence.as_mut() {
            if let Err(error) = persistence.maybe_compact(state) {
                // The log still holds everything; compaction is retried on
                // the next write.
                tracing::warn!(%error, "kv snapshot failed");
            }
        }
        self.index_tx.send_replace(index);
        Ok(Outcome::Committed(evaluation.results))
    }
}

//! Everything volumed writes to the KV store.
//!
//! * Statuses and the host record go through one [`Writer`] task, which
//!   keeps the latest value per key, skips writes that would change nothing,
//!   and retries with backoff while the store is unreachable, so the
//!   reconcile loop never waits on the store.
//! * Every status write is a txn guarded by the desired record it was
//!   computed from (`check-index`, or `check-not-exists` for orphans): a
//!   status can never outlive the record, e.g. be resurrected after the
//!   destroy txn removed both.
//! * [`commit_destroy`] is the destroy txn: desired, status and sealed key
//!   go, and the ledger shrinks, in one txn with CAS on the ledger.

use crate::metrics::Metrics;
use consul_kv::{ConsulKv, TxnOp};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use volume_control::layout::{
    HostRecord, Layout, Ledger, SnapshotSpec, SnapshotStatus, VolumeStatus,
};
use volume_core::names::{HostId, VolumeId};
use volume_core::units::Bytes;

/// What a status write requires of the desired record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// The record exists with this `ModifyIndex`.
    Desired(u64),
    /// There is no record (orphans, and dropping stale statuses).
    NoDesired,
}

#[derive(Debug)]
pub enum WriterCmd {
    Status {
        id: VolumeId,
        guard: Guard,
        /// `None` deletes the status.
        status: Option<VolumeStatus>,
    },
    /// The destroy txn removed the status: forget it without writing.
    Forget(VolumeId),
    Host(Box<HostRecord>),
    /// The store was reset (index went backwards): what was published is
    /// unknown again, so read it before the next write.
    Reseed,
    /// Every volume the daemon knows of (a record or an LV): statuses of
    /// any other volume found in the store are stale and are deleted
    /// (guarded: only while no record exists for them).
    Known(std::collections::BTreeSet<VolumeId>),
    /// Resolves once nothing is pending (or the store is unreachable).
    Flush(oneshot::Sender<bool>),
}

/// The handle the reconcile loop writes through.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    tx: mpsc::UnboundedSender<WriterCmd>,
}

impl WriterHandle {
    pub fn send(&self, cmd: WriterCmd) {
        // The writer outlives every sender; a send fails only at shutdown.
        let _ = self.tx.send(cmd);
    }

    /// Waits until everything sent so far is written; `false` if the store
    /// could not be reached.
    pub async fn flush(&self) -> bool {
        let (done, wait) = oneshot::channel();
        self.send(WriterCmd::Flush(done));
        wait.await.unwrap_or(false)
    }
}

struct Pending {
    guard: Guard,
    status: Option<VolumeStatus>,
}

pub struct Writer {
    kv: ConsulKv,
    layout: Layout,
    host: HostId,
    metrics: Arc<Metrics>,
    retry_max: Duration,
    seeded: bool,
    /// What the store holds, as last read or written; `None` for a status
    /// that is present but unreadable.
    published: HashMap<VolumeId, Option<VolumeStatus>>,
    pending: BTreeMap<VolumeId, Pending>,
    host_record: Option<HostRecord>,
    known: Option<std::collections::BTreeSet<VolumeId>>,
    waiters: Vec<oneshot::Sender<bool>>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// Statuses per txn: two operations each, well under the 64-operation
/// limit of older Consul servers.
const STATUSES_PER_TXN: usize = 30;

impl Writer {
    pub fn spawn(
        kv: ConsulKv,
        layout: Layout,
        host: HostId,
        metrics: Arc<Metrics>,
        retry_max: Duration,
    ) -> (WriterHandle, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            kv,
            layout,
            host,
            metrics,
            retry_max,
            seeded: false,
            published: HashMap::new(),
            pending: BTreeMap::new(),
            host_record: None,
            known: None,
            waiters: Vec::new(),
            failures: 0,
            retry_at: None,
        };
        (WriterHandle { tx }, tokio::spawn(writer.run(rx)))
    }

    fn apply(&mut self, cmd: WriterCmd) {
        match cmd {
            WriterCmd::Status { id, guard, status } => {
                self.pending.insert(id, Pending { guard, status });
            }
            WriterCmd::Forget(id) => {
                self.pending.remove(&id);
                self.published.remove(&id);
            }
            WriterCmd::Host(record) => self.host_record = Some(*record),
            WriterCmd::Reseed => {
                self.seeded = false;
                self.published.clear();
            }
            WriterCmd::Known(known) => {
                self.known = Some(known);
                if self.seeded {
                    self.prune_unknown();
                }
            }
            WriterCmd::Flush(done) => self.waiters.push(done),
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<WriterCmd>) {
        loop {
            // `None`: the backoff timer fired; `Some(None)`: every handle is gone.
            let received = match self.retry_at {
                Some(at) => tokio::select! {
                    cmd = rx.recv() => Some(cmd),
                    () = tokio::time::sleep_until(at) => None,
                },
                None => Some(rx.recv().await),
            };
            match received {
                None => self.retry_at = None,
                Some(None) => {
                    // One last attempt, then stop.
                    self.flush().await;
                    return;
                }
                Some(Some(cmd)) => self.apply(cmd),
            }
            while let Ok(cmd) = rx.try_recv() {
                self.apply(cmd);
            }
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                // Backing off: report failure to anyone waiting, keep the work.
                for waiter in self.waiters.drain(..) {
                    let _ = waiter.send(false);
                }
                continue;
            }
            self.retry_at = None;
            let ok = self.flush().await;
            if ok {
                self.failures = 0;
                self.metrics.set_kv_up(true);
            } else {
                self.failures = self.failures.saturating_add(1);
                self.metrics.set_kv_up(false);
                self.retry_at = Some(Instant::now() + backoff(self.failures, self.retry_max));
            }
            for waiter in self.waiters.drain(..) {
                let _ = waiter.send(ok);
            }
        }
    }

    /// Writes everything pending; `false` on a store failure (the rest
    /// stays pending).
    async fn flush(&mut self) -> bool {
        if !self.seeded && (!self.pending.is_empty() || self.known.is_some()) {
            match self
                .kv
                .get_recurse(&self.layout.status_prefix(&self.host))
                .await
            {
                Ok(answer) => {
                    self.published = answer
                        .value
                        .iter()
                        .filter_map(|pair| {
                            let (_, id) = self.layout.parse_volume_key(&pair.key)?;
                            let status = serde_json::from_slice::<VolumeStatus>(&pair.value)
                                .ok()
                                .filter(|status| status.id == id);
                            Some((id, status))
                        })
                        .collect();
                    self.seeded = true;
                    self.prune_unknown();
                }
                Err(error) => {
                    self.log_failure("reading published statuses", &error);
                    return false;
                }
            }
        }
        if let Some(record) = self.host_record.take() {
            let key = self.layout.host_info(&self.host);
            let value = serde_json::to_vec(&record).expect("host records serialize");
            self.metrics.kv_write();
            if let Err(error) = self.kv.put(&key, &value).await {
                self.log_failure("publishing the host record", &error);
                self.host_record = Some(record);
                return false;
            }
        }
        // Writes that would change nothing are dropped unsent.
        let published = &self.published;
        self.pending
            .retain(|id, pending| match (&pending.status, published.get(id)) {
                (Some(new), Some(Some(old))) => !crate::plan::same_status(new, old),
                (None, None) => false,
                _ => true,
            });
        while !self.pending.is_empty() {
            let batch: Vec<VolumeId> = self
                .pending
                .keys()
                .take(STATUSES_PER_TXN)
                .cloned()
                .collect();
            let mut ops = Vec::with_capacity(batch.len() * 2);
            for id in &batch {
                let pending = &self.pending[id];
                let desired = self.layout.desired(&self.host, id);
                ops.push(match pending.guard {
                    Guard::Desired(index) => TxnOp::CheckIndex {
                        key: desired,
                        index,
                    },
                    Guard::NoDesired => TxnOp::CheckNotExists { key: desired },
                });
                let key = self.layout.status(&self.host, id);
                ops.push(match &pending.status {
                    Some(status) => TxnOp::Set {
                        key,
                        value: serde_json::to_vec(status).expect("statuses serialize"),
                        flags: 0,
                    },
                    None => TxnOp::Delete { key },
                });
            }
            self.metrics.kv_write();
            match self.kv.txn(&ops).await {
                Ok(_) => {
                    for id in batch {
                        if let Some(pending) = self.pending.remove(&id) {
                            match pending.status {
                                Some(status) => self.published.insert(id, Some(status)),
                                None => self.published.remove(&id),
                            };
                        }
                    }
                }
                Err(consul_kv::Error::TxnConflict { failures }) => {
                    // A guard failed: that record changed since the status
                    // was computed, and a newer status is on its way.
                    // Nothing of the txn was written; the others go again.
                    for failure in failures {
                        if let Some(id) = batch.get(failure.op_index / 2) {
                            tracing::debug!(volume = %id, reason = %failure.what, "stale status dropped");
                            self.pending.remove(id);
                        }
                    }
                }
                Err(error) => {
                    self.log_failure("writing statuses", &error);
                    return false;
                }
            }
        }
        true
    }

    /// Queues deletes of statuses (readable or not) of volumes nobody knows.
    fn prune_unknown(&mut self) {
        let Some(known) = &self.known else {
            return;
        };
        let stale: Vec<VolumeId> = self
            .published
            .keys()
            .filter(|id| !known.contains(*id) && !self.pending.contains_key(*id))
            .cloned()
            .collect();
        for id in stale {
            tracing::info!(volume = %id, "dropping the status of a volume with neither record nor LV");
            self.pending.insert(
                id,
                Pending {
                    guard: Guard::NoDesired,
                    status: None,
                },
            );
        }
    }

    fn log_failure(&self, what: &str, error: &consul_kv::Error) {
        self.metrics.error("kv");
        if self.failures == 0 {
            tracing::warn!(%error, "{what} failed; retrying with backoff");
        } else {
            tracing::debug!(%error, "{what} failed again");
        }
    }
}

/// Doubling from 500 ms up to `max`, jittered in its upper half.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    consul_kv::Backoff::new(Duration::from_millis(500), max).delay(failures)
}

/// How a destroy's KV commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Desired, status and sealed key removed; the ledger shrank.
    Done,
    /// The desired record was already gone (an earlier attempt committed
    /// but its answer was lost): nothing to do, and the ledger is not
    /// shrunk twice.
    AlreadyGone,
    /// The desired record changed since it was read; the loop re-decides.
    RecordChanged,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("committing the destroy of {id} to the KV store failed: {source}")]
    Kv {
        id: VolumeId,
        #[source]
        source: consul_kv::Error,
    },
    #[error("reading the ledger at {key} or the desired records failed: {source}")]
    LedgerRead {
        key: String,
        #[source]
        source: consul_kv::Error,
    },
    #[error("the ledger at {key} is malformed ({reason}); not touching it")]
    LedgerMalformed { key: String, reason: String },
    #[error("the ledger at {key} kept changing; gave up after {attempts} attempts")]
    Contended { key: String, attempts: u32 },
}

const COMMIT_ATTEMPTS: u32 = 16;

/// Removes a destroyed volume's records and returns its reservation, in
/// one txn: `check-index` on the desired record (so a retry after a lost
/// answer cannot shrink the ledger twice), `cas` on the ledger, then the
/// deletes. A 409 from a concurrent ledger writer is retried.
pub async fn commit_destroy(
    kv: &ConsulKv,
    layout: &Layout,
    host: &HostId,
    id: &VolumeId,
    size: Bytes,
    desired_index: u64,
    metrics: &Metrics,
) -> Result<Committed, CommitError> {
    let ledger_key = layout.host_ledger(host);
    let desired_key = layout.desired(host, id);
    let kv_error = |source| CommitError::Kv {
        id: id.clone(),
        source,
    };
    for _ in 0..COMMIT_ATTEMPTS {
        let ledger = kv.get(&ledger_key).await.map_err(kv_error)?.value;
        // Its snapshots went with it (`VolumeHost::delete`): their records
        // and reservations go in the same txn.
        let snapshots: Vec<SnapshotSpec> = snapshot_records(
            &kv.get_recurse(&layout.snapshot_desired_prefix(host))
                .await
                .map_err(kv_error)?
                .value,
        )
        .into_iter()
        .filter_map(|(_, record)| record.ok())
        .filter(|(spec, _)| spec.volume == *id)
        .map(|(spec, _)| spec)
        .collect();
        let snapshot_bytes: Bytes = snapshots.iter().map(|s| s.size).sum();
        let ledger_op = match ledger {
            None => TxnOp::CheckNotExists {
                key: ledger_key.clone(),
            },
            Some(pair) => {
                let ledger: Ledger = serde_json::from_slice(&pair.value).map_err(|e| {
                    CommitError::LedgerMalformed {
                        key: ledger_key.clone(),
                        reason: e.to_string(),
                    }
                })?;
                let after = Ledger {
                    reserved: ledger
                        .reserved
                        .saturating_sub(size)
                        .saturating_sub(snapshot_bytes),
                    volumes: ledger.volumes.saturating_sub(1),
                };
                TxnOp::Cas {
                    key: ledger_key.clone(),
                    value: serde_json::to_vec(&after).expect("ledgers serialize"),
                    flags: 0,
                    index: pair.modify_index,
                }
            }
        };
        let mut ops = vec![
            TxnOp::CheckIndex {
                key: desired_key.clone(),
                index: desired_index,
            },
            ledger_op,
            TxnOp::Delete {
                key: desired_key.clone(),
            },
            TxnOp::Delete {
                key: layout.status(host, id),
            },
            TxnOp::Delete {
                key: layout.sealed_key(id),
            },
        ];
        for snapshot in &snapshots {
            ops.push(TxnOp::Delete {
                key: layout.snapshot_desired(host, &snapshot.id),
            });
            ops.push(TxnOp::Delete {
                key: layout.snapshot_status(host, &snapshot.id),
            });
        }
        metrics.kv_write();
        match kv.txn(&ops).await {
            Ok(_) => return Ok(Committed::Done),
            Err(consul_kv::Error::TxnConflict { failures }) => {
                if failures.iter().any(|f| f.op_index == 0) {
                    let now = kv.get(&desired_key).await.map_err(kv_error)?;
                    return Ok(match now.value {
                        None => Committed::AlreadyGone,
                        Some(_) => Committed::RecordChanged,
                    });
                }
                tracing::debug!(volume = %id, "ledger changed during the destroy commit; retrying");
            }
            Err(source) => return Err(kv_error(source)),
        }
    }
    Err(CommitError::Contended {
        key: ledger_key,
        attempts: COMMIT_ATTEMPTS,
    })
}

/// A ledger that disagrees with the desired records, as one check saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerDrift {
    /// The ledger's `ModifyIndex` (0: there is none).
    pub index: u64,
    pub recorded: Ledger,
    /// What the desired records add up to.
    pub computed: Ledger,
}

/// What one ledger check found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerCheck {
    Consistent,
    /// Seen for the first time: corrected only if the next check sees the
    /// very same drift at the same ledger index, so a writer that puts a
    /// record and its reservation in two steps is never "corrected".
    Drift(LedgerDrift),
    /// The ledger now holds `computed` (CAS at `index`).
    Repaired(LedgerDrift),
    /// The records cannot be summed (one does not parse): nothing written.
    Unknowable {
        key: String,
    },
}

/// Recomputes the host's ledger from its desired records and, when the
/// drift is the one `seen_before`, writes it back with CAS. The ledger is
/// read before the records: every create, extend and destroy changes the
/// ledger's index in the same txn as its record, so a CAS at the index read
/// first cannot overwrite a reservation the records did not show.
/// A ledger check's finding, and the desired records it read (the daemon
/// compares their index with its watch's: a store that went backwards
/// shows here even while the watch still blocks at the old index).
#[derive(Debug)]
pub struct LedgerReport {
    pub check: LedgerCheck,
    pub desired: consul_kv::Indexed<Vec<consul_kv::KvPair>>,
}

pub async fn check_ledger(
    kv: &ConsulKv,
    layout: &Layout,
    host: &HostId,
    seen_before: Option<LedgerDrift>,
    metrics: &Metrics,
) -> Result<LedgerReport, CommitError> {
    let ledger_key = layout.host_ledger(host);
    let kv_error = |source| CommitError::LedgerRead {
        key: ledger_key.clone(),
        source,
    };
    let (index, recorded) = match kv.get(&ledger_key).await.map_err(kv_error)?.value {
        None => (0, Ledger::default()),
        Some(pair) => {
            let ledger: Ledger =
                serde_json::from_slice(&pair.value).map_err(|e| CommitError::LedgerMalformed {
                    key: ledger_key.clone(),
                    reason: e.to_string(),
                })?;
            (pair.modify_index, ledger)
        }
    };
    let desired = kv
        .get_recurse(&layout.desired_prefix(host))
        .await
        .map_err(kv_error)?;
    let snapshots = kv
        .get_recurse(&layout.snapshot_desired_prefix(host))
        .await
        .map_err(kv_error)?;
    let check = compare_ledger(
        kv,
        &ledger_key,
        index,
        recorded,
        (&desired.value, &snapshots.value),
        seen_before,
        metrics,
    )
    .await
    .map_err(kv_error)?;
    Ok(LedgerReport { check, desired })
}

async fn compare_ledger(
    kv: &ConsulKv,
    ledger_key: &str,
    index: u64,
    recorded: Ledger,
    (records, snapshot_pairs): (&[consul_kv::KvPair], &[consul_kv::KvPair]),
    seen_before: Option<LedgerDrift>,
    metrics: &Metrics,
) -> Result<LedgerCheck, consul_kv::Error> {
    let mut computed = Ledger::default();
    for pair in records {
        match serde_json::from_slice::<volume_control::layout::VolumeSpec>(&pair.value) {
            Ok(spec) if computed.reserved.checked_add(spec.size).is_some() => {
                computed.reserved = computed.reserved + spec.size;
                computed.volumes = computed.volumes.saturating_add(1);
            }
            _ => {
                return Ok(LedgerCheck::Unknowable {
                    key: pair.key.clone(),
                })
            }
        }
    }
    // A snapshot reserves its size, not a volume slot.
    for (key, record) in snapshot_records(snapshot_pairs) {
        match record {
            Ok((spec, _)) if computed.reserved.checked_add(spec.size).is_some() => {
                computed.reserved = computed.reserved + spec.size;
            }
            _ => return Ok(LedgerCheck::Unknowable { key }),
        }
    }
    if computed == recorded {
        return Ok(LedgerCheck::Consistent);
    }
    let drift = LedgerDrift {
        index,
        recorded,
        computed,
    };
    if seen_before != Some(drift) {
        return Ok(LedgerCheck::Drift(drift));
    }
    metrics.kv_write();
    let value = serde_json::to_vec(&computed).expect("ledgers serialize");
    if kv.put_cas(ledger_key, &value, index).await? {
        Ok(LedgerCheck::Repaired(drift))
    } else {
        // Someone changed it meanwhile: look again next time.
        Ok(LedgerCheck::Consistent)
    }
}

/// A snapshot record's key and, when it parses, the record and its
/// `ModifyIndex` (else why not).
pub type SnapshotRecord = (String, Result<(SnapshotSpec, u64), String>);

/// A ledger's change in reserved bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerChange {
    pub add: Bytes,
    pub sub: Bytes,
}

/// Every snapshot record of a prefix read.
pub fn snapshot_records(pairs: &[consul_kv::KvPair]) -> Vec<SnapshotRecord> {
    pairs
        .iter()
        .map(|pair| {
            let record = serde_json::from_slice::<SnapshotSpec>(&pair.value)
                .map(|spec| (spec, pair.modify_index))
                .map_err(|e| e.to_string());
            (pair.key.clone(), record)
        })
        .collect()
}

/// One txn that moves the host's ledger by `change` (CAS at
/// the index read) together with `ops`. `Ok(false)`: one of `ops`' checks
/// failed (a record changed), nothing written. A 409 on the ledger alone
/// is retried.
pub async fn ledger_txn(
    kv: &ConsulKv,
    layout: &Layout,
    host: &HostId,
    volume: &VolumeId,
    change: LedgerChange,
    ops: Vec<TxnOp>,
    metrics: &Metrics,
) -> Result<bool, CommitError> {
    let LedgerChange { add, sub } = change;
    let ledger_key = layout.host_ledger(host);
    let kv_error = |source| CommitError::Kv {
        id: volume.clone(),
        source,
    };
    for _ in 0..COMMIT_ATTEMPTS {
        let (index, ledger) = match kv.get(&ledger_key).await.map_err(kv_error)?.value {
            None => (0, Ledger::default()),
            Some(pair) => (
                pair.modify_index,
                serde_json::from_slice::<Ledger>(&pair.value).map_err(|e| {
                    CommitError::LedgerMalformed {
                        key: ledger_key.clone(),
                        reason: e.to_string(),
                    }
                })?,
            ),
        };
        let after = Ledger {
            reserved: ledger
                .reserved
                .saturating_sub(sub)
                .checked_add(add)
                .unwrap_or(Bytes(u64::MAX)),
            volumes: ledger.volumes,
        };
        let mut all = vec![TxnOp::Cas {
            key: ledger_key.clone(),
            value: serde_json::to_vec(&after).expect("ledgers serialize"),
            flags: 0,
            index,
        }];
        all.extend(ops.iter().cloned());
        metrics.kv_write();
        match kv.txn(&all).await {
            Ok(_) => return Ok(true),
            Err(consul_kv::Error::TxnConflict { failures }) => {
                if failures.iter().any(|f| f.op_index != 0) {
                    return Ok(false);
                }
            }
            Err(source) => return Err(kv_error(source)),
        }
    }
    Err(CommitError::Contended {
        key: ledger_key,
        attempts: COMMIT_ATTEMPTS,
    })
}

/// A new snapshot record and its reservation, in one txn (create-only).
pub async fn put_snapshot_record(
    kv: &ConsulKv,
    layout: &Layout,
    spec: &SnapshotSpec,
    metrics: &Metrics,
) -> Result<bool, CommitError> {
    let ops = vec![TxnOp::Cas {
        key: layout.snapshot_desired(&spec.host, &spec.id),
        value: serde_json::to_vec(spec).expect("snapshot records serialize"),
        flags: 0,
        index: 0,
    }];
    ledger_txn(
        kv,
        layout,
        &spec.host,
        &spec.volume,
        LedgerChange {
            add: spec.size,
            sub: Bytes::ZERO,
        },
        ops,
        metrics,
    )
    .await
}

/// Removes a destroyed snapshot's records and returns its reservation:
/// `check-index` on the record, so a retry cannot refund twice.
pub async fn commit_snapshot_destroy(
    kv: &ConsulKv,
    layout: &Layout,
    spec: &SnapshotSpec,
    index: u64,
    metrics: &Metrics,
) -> Result<bool, CommitError> {
    let key = layout.snapshot_desired(&spec.host, &spec.id);
    let ops = vec![
        TxnOp::CheckIndex {
            key: key.clone(),
            index,
        },
        TxnOp::Delete { key },
        TxnOp::Delete {
            key: layout.snapshot_status(&spec.host, &spec.id),
        },
    ];
    ledger_txn(
        kv,
        layout,
        &spec.host,
        &spec.volume,
        LedgerChange {
            add: Bytes::ZERO,
            sub: spec.size,
        },
        ops,
        metrics,
    )
    .await
}

/// Sets a snapshot's status, guarded by its record's index.
pub async fn put_snapshot_status(
    kv: &ConsulKv,
    layout: &Layout,
    host: &HostId,
    index: u64,
    status: &SnapshotStatus,
    metrics: &Metrics,
) -> Result<(), consul_kv::Error> {
    let ops = [
        TxnOp::CheckIndex {
            key: layout.snapshot_desired(host, &status.id),
            index,
        },
        TxnOp::Set {
            key: layout.snapshot_status(host, &status.id),
            value: serde_json::to_vec(status).expect("snapshot statuses serialize"),
            flags: 0,
        },
    ];
    metrics.kv_write();
    match kv.txn(&ops).await {
        Ok(_) | Err(consul_kv::Error::TxnConflict { .. }) => Ok(()),
        Err(other) => Err(other),
    }
}

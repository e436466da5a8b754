//! Snapshot records, converged; scheduled snapshots and their retention.
//!
//! One task, woken by a watch on the host's snapshot records (a new
//! record, a destroy, a delete) and at the latest every
//! `snapshot_check_interval` (the schedule's clock, and the backstop for
//! whatever the watch misses): one read each of the volumes' desired
//! records and the snapshot records and statuses. From them alone it
//! decides:
//! * **Schedule.** Each volume whose record asks for scheduled snapshots
//!   gets one per `snapshot_period`, at a fixed offset in the period
//!   spread by its id (`SnapshotSchedule::latest_slot`): a new record
//!   (`scheduled: true`) with its reservation, in one txn, create-only.
//!   Scheduled records older than `retention_days` periods get
//!   `destroy: true` (CAS on the record).
//! * **Converge.** A record with no `ready` status is taken
//!   (`VolumeHost::snapshot`: `Identity` if a crash came after the LV was
//!   made), then its status is written, guarded by the record's index. A
//!   record with `destroy: true` loses its LV, then one txn deletes record
//!   and status and returns the reservation (`check-index`, so a retry
//!   cannot refund twice).
//!
//! Only when there is work does it call LVM (the changes, then one list);
//! an idle pass costs three KV reads, and every [`LIST_EVERY`]th idle pass
//! one LVM list too. Snapshot LVs with no record (and not a fork's own,
//! see [`orphan_snapshots`]) are orphans: counted
//! (`volumed_orphan_snapshots`) from those lists, never removed (that is
//! `volumed gc`'s, with its rules). A record whose volume has no record is
//! left alone and reported in its status: a lost store must not destroy
//! snapshots.

use crate::kv;
use crate::metrics::Metrics;
use crate::worker::{now_ms, on_host};
use consul_kv::{ConsulKv, WatchOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use volume_control::layout::{
    Layout, SnapshotSchedule, SnapshotSpec, SnapshotState, SnapshotStatus, VolumeSource, VolumeSpec,
};
use volume_core::host::{LocalSnapshot, NoFreeze, SnapshotInventory, VolumeHost};
use volume_core::names::{HostId, SnapshotId, VolumeId};

/// An idle pass lists LVM (for the orphan count) once in this many.
pub const LIST_EVERY: u32 = 10;

/// The snapshot LVs the store does not account for. A snapshot is
/// accounted for by its own record (`recorded`: the ids under the
/// snapshot prefix, malformed records included), or while it is a fork's
/// own snapshot: a volume record names it as its fork source and that
/// volume is not `ready` yet (the fork still needs it; a ready fork's
/// snapshot left by a crash before its removal is an orphan).
pub fn orphan_snapshots<'a>(
    inventory: &'a SnapshotInventory,
    recorded: &BTreeSet<SnapshotId>,
    volumes: impl IntoIterator<Item = &'a VolumeSpec>,
) -> Vec<&'a LocalSnapshot> {
    let in_forks: BTreeSet<&SnapshotId> = volumes
        .into_iter()
        .filter(|spec| !inventory.ready_volumes.contains(&spec.id))
        .filter_map(|spec| match &spec.source {
            Some(VolumeSource::Fork { snapshot, .. }) => Some(snapshot),
            _ => None,
        })
        .collect();
    inventory
        .snapshots
        .iter()
        .filter(|s| !recorded.contains(&s.id) && !in_forks.contains(&s.id))
        .collect()
}

/// The snapshot ids named by the keys under `prefix`, whatever the values
/// hold: a malformed record still accounts for its snapshot.
pub fn recorded_snapshot_ids(prefix: &str, pairs: &[consul_kv::KvPair]) -> BTreeSet<SnapshotId> {
    pairs
        .iter()
        .filter_map(|pair| pair.key.strip_prefix(prefix))
        .filter_map(|rest| SnapshotId::new(rest).ok())
        .collect()
}

pub struct SnapshotLoop {
    pub host: Arc<VolumeHost>,
    pub kv: ConsulKv,
    pub layout: Layout,
    pub host_id: HostId,
    pub metrics: Arc<Metrics>,
    pub period: Duration,
    /// The periodic pass: the schedule's clock, and the backstop for a
    /// change the watch missed.
    pub interval: Duration,
    /// Pacing of the watch on the snapshot records.
    pub watch: WatchOptions,
}

/// What one pass read from the store.
struct Records {
    volumes: BTreeMap<VolumeId, VolumeSpec>,
    snapshots: Vec<(SnapshotSpec, u64)>,
    /// Every id under the snapshot prefix, malformed records included.
    recorded: BTreeSet<SnapshotId>,
    statuses: BTreeMap<SnapshotId, SnapshotStatus>,
}

impl SnapshotLoop {
    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let changed = Arc::new(Notify::new());
        let watcher = tokio::spawn(wake_on_changes(
            self.kv.clone(),
            self.layout.snapshot_desired_prefix(&self.host_id),
            self.watch.clone(),
            changed.clone(),
            "snapshot",
        ));
        let mut passes: u32 = 0;
        loop {
            passes = passes.wrapping_add(1);
            if let Err(error) = self.pass(passes.is_multiple_of(LIST_EVERY)).await {
                self.metrics.error("snapshot");
                tracing::warn!(%error, "snapshot pass failed; trying again next interval");
            }
            // A change during the pass left a permit: the next pass starts
            // at once and reads it.
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = changed.notified() => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                watcher.abort();
                return;
            }
        }
    }

    async fn read(&self) -> Result<Records, consul_kv::Error> {
        let desired = self
            .kv
            .get_recurse(&self.layout.desired_prefix(&self.host_id))
            .await?;
        let volumes = desired
            .value
            .iter()
            .filter_map(|pair| serde_json::from_slice::<VolumeSpec>(&pair.value).ok())
            .map(|spec| (spec.id.clone(), spec))
            .collect();
        let prefix = self.layout.snapshot_desired_prefix(&self.host_id);
        let records = self.kv.get_recurse(&prefix).await?;
        let recorded = recorded_snapshot_ids(&prefix, &records.value);
        let snapshots = kv::snapshot_records(&records.value)
            .into_iter()
            .filter_map(|(key, record)| match record {
                Ok(found) if found.0.host == self.host_id => Some(found),
                Ok(_) => None,
                Err(reason) => {
                    tracing::warn!(%key, %reason, "malformed snapshot record; left alone");
                    None
                }
            })
            .collect();
        let statuses = self
            .kv
            .get_recurse(&self.layout.snapshot_status_prefix(&self.host_id))
            .await?
            .value
            .iter()
            .filter_map(|pair| serde_json::from_slice::<SnapshotStatus>(&pair.value).ok())
            .map(|status| (status.id.clone(), status))
            .collect();
        Ok(Records {
            volumes,
            snapshots,
            recorded,
            statuses,
        })
    }

    /// One pass; `list` forces one LVM listing (for the orphan count).
    pub async fn pass(&self, list: bool) -> Result<(), String> {
        let records = self.read().await.map_err(|e| e.to_string())?;
        let scheduled = self.schedule(&records).await?;
        let records = if scheduled {
            self.read().await.map_err(|e| e.to_string())?
        } else {
            records
        };
        let work: Vec<&(SnapshotSpec, u64)> = records
            .snapshots
            .iter()
            .filter(|(spec, _)| {
                spec.destroy
                    || records.statuses.get(&spec.id).map(|s| s.state) != Some(SnapshotState::Ready)
            })
            .collect();
        if work.is_empty() && !list {
            self.publish_metrics(&records, None);
            return Ok(());
        }
        for (spec, index) in work {
            self.converge(spec, *index, &records).await;
        }
        let listed = on_host(&self.host, |host| host.snapshot_inventory())
            .await
            .map_err(|(_, e)| e)?;
        let after = self.read().await.map_err(|e| e.to_string())?;
        self.publish_metrics(&after, Some(&listed));
        Ok(())
    }

    fn publish_metrics(&self, records: &Records, listed: Option<&SnapshotInventory>) {
        let ready: Vec<&SnapshotStatus> = records
            .statuses
            .values()
            .filter(|s| s.state == SnapshotState::Ready)
            .collect();
        let bytes = ready.iter().map(|s| s.size.0).sum();
        let orphans = match listed {
            Some(listed) => {
                orphan_snapshots(listed, &records.recorded, records.volumes.values()).len()
            }
            None => usize::try_from(self.metrics.snapshots().2).unwrap_or(0),
        };
        self.metrics.set_snapshots(ready.len(), bytes, orphans);
    }

    /// New scheduled records and retention marks; true if it wrote any.
    async fn schedule(&self, records: &Records) -> Result<bool, String> {
        let period_ms = u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX);
        let now = now_ms();
        let mut wrote = false;
        for volume in records.volumes.values() {
            if volume.destroy || !volume.snapshots.enabled {
                continue;
            }
            let ours: Vec<&(SnapshotSpec, u64)> = records
                .snapshots
                .iter()
                .filter(|(s, _)| s.volume == volume.id && s.scheduled)
                .collect();
            let slot = SnapshotSchedule::latest_slot(&volume.id, period_ms, now);
            let due = slot > volume.created_ms && !ours.iter().any(|(s, _)| s.created_ms >= slot);
            if due {
                let spec = SnapshotSpec {
                    id: SnapshotId::generate(),
                    volume: volume.id.clone(),
                    host: self.host_id.clone(),
                    size: volume.size,
                    created_ms: now,
                    scheduled: true,
                    destroy: false,
                };
                let put = kv::put_snapshot_record(&self.kv, &self.layout, &spec, &self.metrics)
                    .await
                    .map_err(|e| e.to_string())?;
                if put {
                    tracing::info!(volume = %volume.id, snapshot = %spec.id, "scheduled snapshot recorded");
                    wrote = true;
                }
            }
            let keep_ms = period_ms.saturating_mul(u64::from(volume.snapshots.retention_days));
            for (spec, index) in ours {
                if spec.destroy || now.saturating_sub(spec.created_ms) <= keep_ms {
                    continue;
                }
                let marked = SnapshotSpec {
                    destroy: true,
                    ..spec.clone()
                };
                let value = serde_json::to_vec(&marked).expect("snapshot records serialize");
                self.metrics.kv_write();
                let key = self.layout.snapshot_desired(&self.host_id, &spec.id);
                if self
                    .kv
                    .put_cas(&key, &value, *index)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    tracing::info!(volume = %volume.id, snapshot = %spec.id, "scheduled snapshot past retention");
                    wrote = true;
                }
            }
        }
        Ok(wrote)
    }

    async fn converge(&self, spec: &SnapshotSpec, index: u64, records: &Records) {
        let (id, volume) = (spec.id.clone(), spec.volume.clone());
        if spec.destroy {
            let _ = self
                .status(spec, index, SnapshotState::Destroying, None, None)
                .await;
            let started = std::time::Instant::now();
            let removed = on_host(&self.host, move |host| host.destroy_snapshot(&id)).await;
            if let Err((_, error)) = removed {
                self.failed(spec, index, "destroy snapshot", error).await;
                return;
            }
            match kv::commit_snapshot_destroy(&self.kv, &self.layout, spec, index, &self.metrics)
                .await
            {
                Ok(_) => {
                    self.metrics.observe("snapshot_destroy", started.elapsed());
                    tracing::info!(volume = %spec.volume, snapshot = %spec.id, "snapshot destroyed");
                }
                Err(error) => {
                    self.failed(spec, index, "destroy snapshot", error.to_string())
                        .await
                }
            }
            return;
        }
        if !records.volumes.contains_key(&spec.volume) {
            self.failed(
                spec,
                index,
                "snapshot",
                format!("volume {} has no desired record on this host", spec.volume),
            )
            .await;
            return;
        }
        let _ = self
            .status(spec, index, SnapshotState::Taking, None, None)
            .await;
        let started = std::time::Instant::now();
        match on_host(&self.host, move |host| {
            host.snapshot(&volume, &id, &mut NoFreeze)
        })
        .await
        {
            Ok(taken) => {
                self.metrics.observe("snapshot", started.elapsed());
                let taken = taken.into_inner();
                tracing::info!(volume = %spec.volume, snapshot = %spec.id, "snapshot ready");
                let _ = self
                    .status(spec, index, SnapshotState::Ready, taken.taken, None)
                    .await;
            }
            Err((_, error)) => self.failed(spec, index, "snapshot", error).await,
        }
    }

    async fn failed(&self, spec: &SnapshotSpec, index: u64, what: &str, error: String) {
        self.metrics.error("snapshot");
        tracing::warn!(volume = %spec.volume, snapshot = %spec.id, %error, "{what} failed");
        let _ = self
            .status(spec, index, SnapshotState::Error, None, Some(error))
            .await;
    }

    async fn status(
        &self,
        spec: &SnapshotSpec,
        index: u64,
        state: SnapshotState,
        taken: Option<u64>,
        error: Option<String>,
    ) -> Result<(), consul_kv::Error> {
        let status = SnapshotStatus {
            id: spec.id.clone(),
            volume: spec.volume.clone(),
            state,
            size: spec.size,
            taken,
            error,
            updated_ms: now_ms(),
        };
        kv::put_snapshot_status(
            &self.kv,
            &self.layout,
            &self.host_id,
            index,
            &status,
            &self.metrics,
        )
        .await
    }
}

/// Wakes a loop at every change under `prefix` (for the snapshot loop: a
/// new record, a `destroy: true`, a delete), so a `volctl snapshots
/// create` converges in one pass instead of at the next periodic one. The
/// watch paces itself and backs off after failures; the loop's periodic
/// pass covers whatever it misses. `records` names them in the log.
pub(crate) async fn wake_on_changes(
    kv: ConsulKv,
    prefix: String,
    options: WatchOptions,
    changed: Arc<Notify>,
    records: &'static str,
) {
    let mut watch = kv.watch_prefix(prefix, options);
    loop {
        match watch.next().await {
            Ok(_) => changed.notify_one(),
            Err(error) => {
                tracing::debug!(%error, records, "watching the records failed; retrying");
            }
        }
    }
}

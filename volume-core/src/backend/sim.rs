//! An in-memory thin pool with the same trait and the same checks as the LVM
//! backend, for fast tests of everything above the backend.

use super::shared::{self, FoundLv};
use super::{
    BackendError, LvPresence, PoolFill, PoolStatus, ThinAllocation, ThinBackend, ThinCopy,
    ThinPoolSpec, ThinVolume,
};
use crate::actions::{CreateAction, DeleteAction, ExtendAction};
use crate::capacity::PoolUsage;
use crate::health::{PoolHealth, VolumeHealth};
use crate::names::{LvName, OWNER_TAG};
use crate::pool_growth::{self, PoolGrowth, PoolPart};
use crate::units::{Bytes, ExtentSize, Percent, GIB, MIB};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

/// Counts of backend calls, so tests can assert on the cost of an operation
/// (e.g. a restart does a constant number of reports).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimCallCounts {
    pub reports: u64,
    /// Reports that read every LV of the pool (LVM's cost of these grows
    /// with the volume count), a subset of `reports`.
    pub full_reports: u64,
    pub changes: u64,
}

#[derive(Debug)]
struct SimState {
    pool_exists: bool,
    pool_health: PoolHealth,
    volumes: BTreeMap<LvName, ThinVolume>,
    calls: SimCallCounts,
    data_size: Bytes,
    metadata_size: Bytes,
    /// Metadata in use beyond what the volumes take, as if written.
    metadata_written: Bytes,
    vg_free: Bytes,
}

/// The simulated pool. Its data size starts at `spec.data_size` (default
/// 3 GiB); its VG has no free space until [`SimBackend::set_vg_free`].
#[derive(Debug)]
pub struct SimBackend {
    spec: ThinPoolSpec,
    state: Mutex<SimState>,
}

const SIM_METADATA: Bytes = Bytes(64 * MIB);

impl SimBackend {
    pub fn new(spec: ThinPoolSpec) -> SimBackend {
        let data_size = spec.data_size.unwrap_or(Bytes(3 * GIB));
        let metadata_size = spec.metadata_size.unwrap_or(SIM_METADATA);
        SimBackend {
            spec,
            state: Mutex::new(SimState {
                pool_exists: false,
                pool_health: PoolHealth::Healthy,
                volumes: BTreeMap::new(),
                calls: SimCallCounts::default(),
                data_size,
                metadata_size,
                metadata_written: Bytes::ZERO,
                vg_free: Bytes::ZERO,
            }),
        }
    }

    /// Unallocated space in the simulated VG, room for the pool to grow.
    pub fn set_vg_free(&self, free: Bytes) {
        self.lock().vg_free = free;
    }

    /// Marks `used` of the pool's metadata in use, as many mappings would.
    pub fn simulate_metadata_use(&self, used: Bytes) {
        self.lock().metadata_written = used;
    }

    /// `retag`, with or without the report that finds the LV first.
    fn change_tags(
        &self,
        lv: &LvName,
        add: &[String],
        remove: &[String],
        report: bool,
    ) -> Result<ThinVolume, BackendError> {
        shared::check_retag(add, remove)?;
        let mut state = self.lock();
        if report {
            state.calls.reports += 1;
        }
        let found = self.find(&state, lv).ok_or_else(|| self.not_found(lv))?;
        shared::require_ours(&self.spec, found)?;
        let volume = state
            .volumes
            .get_mut(lv)
            .expect("found above under the same lock");
        for tag in remove {
            volume.tags.remove(tag);
        }
        volume.tags.extend(add.iter().cloned());
        let volume = volume.clone();
        state.calls.changes += 1;
        Ok(volume)
    }

    pub fn calls(&self) -> SimCallCounts {
        self.lock().calls
    }

    /// Marks `percent` of a volume's virtual size as written, as if a guest
    /// had filled it; the pool's data usage follows.
    pub fn simulate_write(&self, lv: &LvName, percent: Percent) -> Result<(), BackendError> {
        let mut state = self.lock();
        let volume = state
            .volumes
            .get_mut(lv)
            .ok_or_else(|| self.not_found(lv))?;
        volume.data_percent = percent;
        Ok(())
    }

    /// Sets the pool's health as LVM would report it (a full pool is
    /// `OutOfData`), so tests can drive an unhealthy pool.
    pub fn simulate_pool_health(&self, health: PoolHealth) {
        self.lock().pool_health = health;
    }

    /// Sets one thin LV's own health as LVM would report it.
    pub fn simulate_volume_health(
        &self,
        lv: &LvName,
        health: VolumeHealth,
    ) -> Result<(), BackendError> {
        let mut state = self.lock();
        let volume = state
            .volumes
            .get_mut(lv)
            .ok_or_else(|| self.not_found(lv))?;
        volume.health = health;
        Ok(())
    }

    /// Puts an LV without our tag in the pool, as an LV of someone else's
    /// (or one of ours whose tag was lost) would be: listing skips it and
    /// every change to it is refused as not ours.
    pub fn plant_untagged(&self, lv: &LvName, size: Bytes) {
        let volume = ThinVolume {
            lv: lv.clone(),
            virtual_size: size,
            data_percent: Percent::ZERO,
            tags: BTreeSet::new(),
            device: Some(self.device_of(lv)),
            health: VolumeHealth::Healthy,
        };
        self.lock().volumes.insert(lv.clone(), volume);
    }

    /// The error for an LV this pool does not hold.
    fn not_found(&self, lv: &LvName) -> BackendError {
        BackendError::NotFound {
            lv: lv.clone(),
            pool: self.spec.pool.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn status_of(&self, state: &SimState) -> PoolStatus {
        let provisioned: Bytes = state.volumes.values().map(|v| v.virtual_size).sum();
        let written: u128 = state
            .volumes
            .values()
            .map(|v| {
                u128::from(v.virtual_size.0) * u128::from(v.data_percent.hundredths()) / 10_000
            })
            .sum();
        let data_size = state.data_size;
        let metadata_used = Bytes(MIB + state.volumes.len() as u64 * 64 * 1024)
            .checked_add(state.metadata_written)
            .unwrap_or(Bytes(u64::MAX));
        PoolStatus {
            vg: self.spec.vg.clone(),
            pool: self.spec.pool.clone(),
            usage: PoolUsage {
                data_size,
                data_used: Bytes(u64::try_from(written).unwrap_or(u64::MAX).min(data_size.0)),
                metadata_size: state.metadata_size,
                metadata_used: metadata_used.min(state.metadata_size),
                provisioned,
                volume_count: state.volumes.len() as u32,
                health: state.pool_health,
            },
            extent_size: ExtentSize::DEFAULT,
            vg_free: state.vg_free,
        }
    }

    fn require_pool(&self, state: &SimState) -> Result<(), BackendError> {
        if state.pool_exists {
            Ok(())
        } else {
            Err(BackendError::PoolMismatch {
                vg: self.spec.vg.clone(),
                reason: format!("thin pool {} does not exist yet", self.spec.pool),
            })
        }
    }

    fn find(&self, state: &SimState, lv: &LvName) -> Option<FoundLv> {
        state.volumes.get(lv).map(|volume| FoundLv {
            volume: volume.clone(),
            pool: Some(self.spec.pool.clone()),
        })
    }

    fn device_of(&self, lv: &LvName) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{}", self.spec.vg, lv))
    }
}

impl ThinBackend for SimBackend {
    fn spec(&self) -> &ThinPoolSpec {
        &self.spec
    }

    fn ensure_pool(&self) -> Result<CreateAction<PoolStatus>, BackendError> {
        let mut state = self.lock();
        state.calls.reports += 1;
        state.calls.full_reports += 1;
        if state.pool_exists {
            return Ok(CreateAction::Identity(self.status_of(&state)));
        }
        if self.spec.pvs.is_empty() {
            return Err(BackendError::NoPhysicalVolumes {
                vg: self.spec.vg.clone(),
            });
        }
        state.pool_exists = true;
        state.calls.changes += 1;
        Ok(CreateAction::Created(self.status_of(&state)))
    }

    fn pool_status(&self) -> Result<PoolStatus, BackendError> {
        let mut state = self.lock();
        self.require_pool(&state)?;
        state.calls.reports += 1;
        state.calls.full_reports += 1;
        Ok(self.status_of(&state))
    }

    /// One (full) report, as the LVM backend's: the size report names
    /// every LV of the VG, foreign ones too.
    fn pool_status_and_lv(&self, lv: &LvName) -> Result<(PoolStatus, LvPresence), BackendError> {
        let mut state = self.lock();
        self.require_pool(&state)?;
        state.calls.reports += 1;
        state.calls.full_reports += 1;
        let presence = if state.volumes.contains_key(lv) {
            LvPresence::Present
        } else {
            LvPresence::Absent
        };
        Ok((self.status_of(&state), presence))
    }

    /// Read off the state, not counted as a report: the LVM backend reads
    /// it from device-mapper with no LVM command.
    fn pool_fill(&self) -> Result<Option<PoolFill>, BackendError> {
        let state = self.lock();
        self.require_pool(&state)?;
        let usage = self.status_of(&state).usage;
        Ok(Some(PoolFill {
            data: usage.data_percent(),
            metadata: usage.metadata_percent(),
            health: usage.health,
        }))
    }

    fn create_thin(
        &self,
        lv: &LvName,
        size: Bytes,
        tags: &[String],
    ) -> Result<CreateAction<ThinVolume>, BackendError> {
        shared::check_create_inputs(lv, size, tags)?;
        let size = shared::round_to_extents(size, ExtentSize::DEFAULT)?;
        let mut state = self.lock();
        self.require_pool(&state)?;
        // As the LVM backend: straight to lvcreate, and a report only when
        // LVM refuses the name.
        if state.volumes.contains_key(lv) {
            state.calls.reports += 1;
        }
        if let Some(existing) = shared::decide_create(&self.spec, self.find(&state, lv), size)? {
            return Ok(CreateAction::Identity(existing));
        }
        let mut all_tags: BTreeSet<String> = tags.iter().cloned().collect();
        all_tags.insert(OWNER_TAG.to_owned());
        let volume = ThinVolume {
            lv: lv.clone(),
            virtual_size: size,
            data_percent: Percent::ZERO,
            tags: all_tags,
            device: Some(self.device_of(lv)),
            health: VolumeHealth::Healthy,
        };
        state.volumes.insert(lv.clone(), volume.clone());
        state.calls.changes += 1;
        Ok(CreateAction::Created(volume))
    }

    fn remove_thin(&self, lv: &LvName) -> Result<DeleteAction, BackendError> {
        shared::check_our_name(lv)?;
        let mut state = self.lock();
        self.require_pool(&state)?;
        state.calls.reports += 1;
        let Some(found) = self.find(&state, lv) else {
            return Ok(DeleteAction::Identity);
        };
        shared::require_ours(&self.spec, found)?;
        state.volumes.remove(lv);
        state.calls.changes += 1;
        Ok(DeleteAction::Deleted)
    }

    fn extend_thin(&self, lv: &LvName, size: Bytes) -> Result<ExtendAction, BackendError> {
        shared::check_our_name(lv)?;
        let size = shared::round_to_extents(size, ExtentSize::DEFAULT)?;
        let mut state = self.lock();
        self.require_pool(&state)?;
        state.calls.reports += 1;
        let found = self.find(&state, lv).ok_or_else(|| self.not_found(lv))?;
        let volume = shared::require_ours(&self.spec, found)?;
        let Some(from) = shared::decide_extend(&volume, size)? else {
            return Ok(ExtendAction::Identity(size));
        };
        if let Some(v) = state.volumes.get_mut(lv) {
            v.virtual_size = size;
        }
        state.calls.changes += 1;
        Ok(ExtendAction::Extended { from, to: size })
    }

    fn list_thins(&self) -> Result<Vec<ThinVolume>, BackendError> {
        let mut state = self.lock();
        self.require_pool(&state)?;
        state.calls.reports += 1;
        state.calls.full_reports += 1;
        Ok(state
            .volumes
            .values()
            .filter(|v| shared::is_ours(v))
            .cloned()
            .collect())
    }

    fn thin(&self, lv: &LvName) -> Result<Option<ThinVolume>, BackendError> {
        let mut state = self.lock();
        self.require_pool(&state)?;
        state.calls.reports += 1;
        Ok(state
            .volumes
            .get(lv)
            .filter(|volume| shared::is_ours(volume))
            .cloned())
    }

    fn tagged(&self, tag: &str) -> Result<Vec<ThinVolume>, BackendError> {
        shared::check_tag(tag)?;
        let mut state = self.lock();
        self.require_pool(&state)?;
        state.calls.reports += 1;
        Ok(state
            .volumes
            .values()
            .filter(|v| shared::is_ours(v) && v.tags.contains(tag))
            .cloned()
            .collect())
    }

    fn retag(
        &self,
        lv: &LvName,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, BackendError> {
        self.change_tags(lv, add, remove, true)
    }

    /// No report: LVM's `lvchange` alone, which fails for a missing LV.
    fn retag_seen(
        &self,
        seen: &ThinVolume,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, BackendError> {
        self.change_tags(&seen.lv, add, remove, false)
    }

    /// Allocation of the active LVs, read off the state and not counted as
    /// a report: the LVM backend reads it from device-mapper with no LVM
    /// command.
    fn thin_allocations(&self, lvs: &[LvName]) -> Result<Vec<ThinAllocation>, BackendError> {
        let state = self.lock();
        Ok(lvs
            .iter()
            .filter_map(|lv| state.volumes.get(lv))
            .filter(|volume| volume.device.is_some())
            .map(|volume| ThinAllocation {
                lv: volume.lv.clone(),
                size: volume.virtual_size,
                allocated: volume.data_percent,
            })
            .collect())
    }

    fn activate_thin(&self, lv: &LvName) -> Result<PathBuf, BackendError> {
        let state = self.lock();
        let found = self.find(&state, lv).ok_or_else(|| self.not_found(lv))?;
        shared::require_ours(&self.spec, found)?;
        Ok(self.device_of(lv))
    }

    fn grow_pool(&self, part: PoolPart, by: Bytes) -> Result<PoolGrowth, BackendError> {
        let mut state = self.lock();
        self.require_pool(&state)?;
        state.calls.reports += 1;
        let from = match part {
            PoolPart::Data => state.data_size,
            PoolPart::Metadata => state.metadata_size,
        };
        // As LVM: metadata growth takes as much again for the spare.
        let room = match part {
            PoolPart::Data => state.vg_free,
            PoolPart::Metadata => Bytes(state.vg_free.0 / 2),
        };
        let Some(by) = pool_growth::bounded_growth(by, room, ExtentSize::DEFAULT.bytes()) else {
            return Ok(PoolGrowth::VgFull { part, size: from });
        };
        let taken = match part {
            PoolPart::Data => {
                state.data_size = from + by;
                by
            }
            PoolPart::Metadata => {
                state.metadata_size = from + by;
                by + by
            }
        };
        state.vg_free = state.vg_free.saturating_sub(taken);
        state.calls.changes += 1;
        Ok(PoolGrowth::Grown {
            part,
            from,
            to: from + by,
        })
    }

    fn snapshot_thin(
        &self,
        origin: &LvName,
        copy: &LvName,
        kind: ThinCopy,
        tags: &[String],
    ) -> Result<CreateAction<ThinVolume>, BackendError> {
        shared::check_snapshot_inputs(origin, copy, tags)?;
        let mut state = self.lock();
        self.require_pool(&state)?;
        state.calls.reports += 1;
        if let Some(existing) = self.find(&state, copy) {
            return Ok(CreateAction::Identity(shared::require_ours(
                &self.spec, existing,
            )?));
        }
        let found = self
            .find(&state, origin)
            .ok_or_else(|| self.not_found(origin))?;
        let source = shared::require_ours(&self.spec, found)?;
        let mut all_tags: BTreeSet<String> = tags.iter().cloned().collect();
        all_tags.insert(OWNER_TAG.to_owned());
        let volume = ThinVolume {
            lv: copy.clone(),
            virtual_size: source.virtual_size,
            // An inactive LV reports no data% (see `thin_volume`).
            data_percent: match kind {
                ThinCopy::Snapshot => Percent::ZERO,
                ThinCopy::Volume => source.data_percent,
            },
            tags: all_tags,
            // As LVM: a kept snapshot is not activated.
            device: (kind == ThinCopy::Volume).then(|| self.device_of(copy)),
            health: VolumeHealth::Healthy,
        };
        state.volumes.insert(copy.clone(), volume.clone());
        state.calls.changes += 1;
        Ok(CreateAction::Created(volume))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{VgName, VolumeId};

    fn sim() -> SimBackend {
        let spec = ThinPoolSpec::new(
            VgName::new("vg0").unwrap(),
            LvName::new("pool0").unwrap(),
            vec![PathBuf::from("/dev/loop0")],
        )
        .unwrap();
        let sim = SimBackend::new(spec);
        assert!(sim.ensure_pool().unwrap().changed());
        assert!(!sim.ensure_pool().unwrap().changed());
        sim
    }

    #[test]
    fn create_remove_are_idempotent() {
        let sim = sim();
        let lv = VolumeId::generate().lv_name();
        let size = Bytes(25 * GIB);
        assert!(sim.create_thin(&lv, size, &[]).unwrap().changed());
        assert!(!sim.create_thin(&lv, size, &[]).unwrap().changed());
        assert!(matches!(
            sim.create_thin(&lv, Bytes(26 * GIB), &[]),
            Err(BackendError::SizeMismatch { .. })
        ));
        assert_eq!(sim.pool_status().unwrap().usage.provisioned, size);
        assert!(sim.remove_thin(&lv).unwrap().changed());
        assert!(!sim.remove_thin(&lv).unwrap().changed());
    }

    #[test]
    fn sizes_round_up_to_extents_so_decimal_gb_is_idempotent() {
        let sim = sim();
        let lv = VolumeId::generate().lv_name();
        let created = sim
            .create_thin(&lv, Bytes::from_gb(25).unwrap(), &[])
            .unwrap();
        assert_eq!(created.inner().virtual_size.0 % (4 * MIB), 0);
        assert!(!sim
            .create_thin(&lv, Bytes::from_gb(25).unwrap(), &[])
            .unwrap()
            .changed());
    }

    #[test]
    fn bad_input_changes_nothing() {
        let sim = sim();
        let before = sim.calls();
        assert!(sim
            .create_thin(&LvName::new("root").unwrap(), Bytes(GIB), &[])
            .is_err());
        assert!(sim
            .create_thin(
                &VolumeId::generate().lv_name(),
                Bytes(GIB),
                &["bad tag".into()]
            )
            .is_err());
        assert_eq!(sim.calls().changes, before.changes);
        assert!(sim.list_thins().unwrap().is_empty());
    }

    #[test]
    fn extend_and_retag() {
        let sim = sim();
        let lv = VolumeId::generate().lv_name();
        let _ = sim.create_thin(&lv, Bytes(GIB), &[]).unwrap();
        assert_eq!(
            sim.extend_thin(&lv, Bytes(2 * GIB)).unwrap(),
            ExtendAction::Extended {
                from: Bytes(GIB),
                to: Bytes(2 * GIB)
            }
        );
        assert!(!sim.extend_thin(&lv, Bytes(2 * GIB)).unwrap().changed());
        sim.retag(&lv, &["vmv1.step=formatted".into()], &[])
            .unwrap();
        let listed = sim.list_thins().unwrap();
        assert!(listed[0].tags.contains("vmv1.step=formatted"));
    }

    #[test]
    fn pool_growth_takes_what_the_vg_has_then_reports_it_full() {
        let sim = sim();
        sim.set_vg_free(Bytes(100 * MIB));
        assert_eq!(
            sim.grow_pool(PoolPart::Data, Bytes(64 * MIB)).unwrap(),
            PoolGrowth::Grown {
                part: PoolPart::Data,
                from: Bytes(3 * GIB),
                to: Bytes(3 * GIB + 64 * MIB)
            }
        );
        // 36 MiB left: less than the step, so all of it.
        assert_eq!(
            sim.grow_pool(PoolPart::Data, Bytes(64 * MIB)).unwrap(),
            PoolGrowth::Grown {
                part: PoolPart::Data,
                from: Bytes(3 * GIB + 64 * MIB),
                to: Bytes(3 * GIB + 100 * MIB)
            }
        );
        let status = sim.pool_status().unwrap();
        assert_eq!(status.usage.data_size, Bytes(3 * GIB + 100 * MIB));
        assert_eq!(status.vg_free, Bytes::ZERO);
        assert_eq!(
            sim.grow_pool(PoolPart::Metadata, Bytes(4 * MIB)).unwrap(),
            PoolGrowth::VgFull {
                part: PoolPart::Metadata,
                size: SIM_METADATA
            }
        );
    }

    #[test]
    fn an_unhealthy_pool_reports_its_health_and_no_headroom() {
        let sim = sim();
        let lv = VolumeId::generate().lv_name();
        let _ = sim.create_thin(&lv, Bytes(GIB), &[]).unwrap();
        sim.simulate_pool_health(PoolHealth::OutOfData);
        let status = sim.pool_status().unwrap();
        assert_eq!(status.usage.health, PoolHealth::OutOfData);
        let policy = crate::capacity::CapacityPolicy::default();
        assert_eq!(status.usage.headroom(&policy), Bytes::ZERO);
        sim.simulate_volume_health(&lv, VolumeHealth::Failed)
            .unwrap();
        assert_eq!(sim.list_thins().unwrap()[0].health, VolumeHealth::Failed);
        sim.simulate_pool_health(PoolHealth::Healthy);
        assert!(sim.pool_status().unwrap().usage.headroom(&policy) > Bytes::ZERO);
    }
}

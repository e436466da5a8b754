//! Fencing: when free pool data falls into the reserve and the pool cannot
//! grow, suspend the volumes that filled it, so their I/O waits instead of
//! failing, and resume them when space returns or an operator asks.
//!
//! Which volumes, and when, is [`crate::fence_model::decide`]; this module
//! reads the devices and acts. [`DmFenceDevices`] reads everything with
//! device-mapper ioctls (the pool's and each thin LV's status, no LVM
//! report), so a check costs a few milliseconds and can run on every
//! device-mapper event and a short timer.
//!
//! What is suspended is the volume's thin LV, under its dm-crypt mapping
//! when it has one. On a no-flush suspend the thin target hands the bios
//! it has not yet mapped back to device-mapper, which holds them until
//! the resume, so nothing more reaches the pool; a suspended dm-crypt
//! mapping would first wait for every bio it had already taken, and
//! measured in the micro-VM that let ~20 MiB more into the pool over
//! 2.5 s. LVM leaves a thin LV suspended this way alone while it grows the
//! pool or changes tags and the pool's when-full mode (measured); only an
//! `lvextend` of that LV would resume it, and
//! [`crate::host::VolumeHost`] refuses to extend a fenced volume. The
//! suspend skips the filesystem freeze and does not flush
//! (`DM_SKIP_LOCKFS | DM_NOFLUSH`): a freeze would write the volume's
//! dirty data, which is exactly what must not reach the pool.
//!
//! Crash safety needs no record: only volumed suspends our thin LVs for
//! longer than an LVM command, so a suspended one found at start-up
//! ([`Fencer::recover`]) is one it fenced before a restart. It is kept
//! fenced while the pool still lacks space and resumed otherwise.

use crate::backend::lvm::kernel::dm_name;
use crate::fence_model::{
    self, FenceDecision, FencePolicy, FenceReason, FenceSample, PoolState, UnfenceCause, Zone,
};
use crate::names::{LvName, VolumeId};
use crate::units::{Bytes, SECTOR_SIZE};
use devicemapper::{DevId, DmFlags, DmName, DmOptions, ThinPoolStatus, ThinStatus, DM};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One variant per failing step; each names the device.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("opening device-mapper's control device failed: {0}")]
    Open(String),
    #[error("listing device-mapper devices failed: {0}")]
    List(String),
    #[error("reading the status of {device} failed: {reason}")]
    Status { device: String, reason: String },
    #[error("the thin pool's device ({device}) is not active")]
    NoPool { device: String },
    #[error("suspending {device} failed: {reason}")]
    Suspend { device: String, reason: String },
    #[error("resuming {device} failed: {reason}")]
    Resume { device: String, reason: String },
    #[error("volume {id} has no active device to fence")]
    NoDevice { id: VolumeId },
}

/// One reading of the devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSample {
    pub sample: FenceSample,
    /// Our volumes whose thin LV is suspended now.
    pub suspended: BTreeSet<VolumeId>,
}

/// The device operations fencing needs.
pub trait FenceDevices: Send + Sync {
    fn sample(&self) -> Result<DeviceSample, FenceError>;
    /// Suspends the volume's thin LV without flushing; idempotent.
    fn suspend(&self, id: &VolumeId) -> Result<(), FenceError>;
    /// Resumes it; idempotent.
    fn resume(&self, id: &VolumeId) -> Result<(), FenceError>;
}

/// The real devices of one pool, through device-mapper ioctls.
#[derive(Debug, Clone)]
pub struct DmFenceDevices {
    vg: String,
    pool: String,
}

impl DmFenceDevices {
    pub fn new(vg: &str, pool: &str) -> DmFenceDevices {
        DmFenceDevices {
            vg: vg.to_owned(),
            pool: pool.to_owned(),
        }
    }

    fn dm() -> Result<DM, FenceError> {
        DM::new().map_err(|err| FenceError::Open(err.to_string()))
    }

    /// The volume of a thin LV's device-mapper name, if it is one of ours.
    fn volume_of(&self, name: &str) -> Option<VolumeId> {
        let rest = name.strip_prefix(&dm_name(&self.vg, ""))?;
        // LVM doubles every `-` of an LV name; a single one separates a
        // layer (`-tpool`, `-real`), which is not a volume.
        if rest.replace("--", "").contains('-') {
            return None;
        }
        VolumeId::from_lv_name(&LvName::new(rest.replace("--", "-")).ok()?)
    }

    /// The device fencing suspends: the volume's thin LV.
    fn fenced_device(&self, dm: &DM, id: &VolumeId) -> Result<String, FenceError> {
        let lv = dm_name(&self.vg, id.lv_name().as_str());
        let exists = DmName::new(&lv)
            .ok()
            .is_some_and(|n| dm.device_info(&DevId::Name(n)).is_ok());
        if exists {
            return Ok(lv);
        }
        Err(FenceError::NoDevice { id: id.clone() })
    }

    fn set_suspended(&self, id: &VolumeId, suspend: bool) -> Result<(), FenceError> {
        let dm = Self::dm()?;
        let device = self.fenced_device(&dm, id)?;
        let name = DmName::new(&device).map_err(|err| FenceError::Status {
            device: device.clone(),
            reason: err.to_string(),
        })?;
        let id = DevId::Name(name);
        let info = dm.device_info(&id).map_err(|err| FenceError::Status {
            device: device.clone(),
            reason: err.to_string(),
        })?;
        if info.flags().contains(DmFlags::DM_SUSPEND) == suspend {
            return Ok(());
        }
        let flags = if suspend {
            DmFlags::DM_SUSPEND | DmFlags::DM_NOFLUSH | DmFlags::DM_SKIP_LOCKFS
        } else {
            DmFlags::empty()
        };
        dm.device_suspend(&id, DmOptions::default().set_flags(flags))
            .map(|_| ())
            .map_err(|err| {
                let reason = err.to_string();
                if suspend {
                    FenceError::Suspend { device, reason }
                } else {
                    FenceError::Resume { device, reason }
                }
            })
    }
}

/// One target line of a status or table: start, length, type, parameters.
type TargetLine = (u64, u64, String, String);

fn status_of(dm: &DM, device: &str, table: bool) -> Result<(DmFlags, Vec<TargetLine>), FenceError> {
    let failed = |reason: String| FenceError::Status {
        device: device.to_owned(),
        reason,
    };
    let name = DmName::new(device).map_err(|err| failed(err.to_string()))?;
    let mut flags = DmFlags::DM_NOFLUSH;
    if table {
        flags |= DmFlags::DM_STATUS_TABLE;
    }
    let (info, lines) = dm
        .table_status(&DevId::Name(name), DmOptions::default().set_flags(flags))
        .map_err(|err| failed(err.to_string()))?;
    Ok((info.flags(), lines))
}

impl FenceDevices for DmFenceDevices {
    fn sample(&self) -> Result<DeviceSample, FenceError> {
        let dm = Self::dm()?;
        let names: BTreeSet<String> = dm
            .list_devices()
            .map_err(|err| FenceError::List(err.to_string()))?
            .into_iter()
            .map(|(name, _, _)| name.to_string())
            .collect();
        let base = dm_name(&self.vg, &self.pool);
        let pool = [format!("{base}-tpool"), base]
            .into_iter()
            .find(|name| names.contains(name))
            .ok_or_else(|| FenceError::NoPool {
                device: dm_name(&self.vg, &self.pool),
            })?;
        let bad = |device: &str, reason: String| FenceError::Status {
            device: device.to_owned(),
            reason,
        };
        // <meta dev> <data dev> <data block size> ... in the table.
        let (_, table) = status_of(&dm, &pool, true)?;
        let block_sectors = table
            .first()
            .and_then(|(_, _, _, params)| params.split_whitespace().nth(2)?.parse::<u64>().ok())
            .ok_or_else(|| bad(&pool, format!("no data block size in table {table:?}")))?;
        let (_, status) = status_of(&dm, &pool, false)?;
        let params = status
            .first()
            .map(|(_, _, _, params)| params.as_str())
            .unwrap_or_default();
        let usage = match ThinPoolStatus::from_str(params) {
            Ok(ThinPoolStatus::Working(working)) => working.usage,
            Ok(other) => return Err(bad(&pool, format!("pool status {other:?}"))),
            Err(err) => return Err(bad(&pool, err.to_string())),
        };
        let block = block_sectors * SECTOR_SIZE;
        let mut sample = DeviceSample {
            sample: FenceSample {
                data_size: Bytes(usage.total_data.0 * block),
                data_used: Bytes(usage.used_data.0 * block),
                mapped: BTreeMap::new(),
            },
            suspended: BTreeSet::new(),
        };
        for name in &names {
            let Some(id) = self.volume_of(name) else {
                continue;
            };
            let (flags, lines) = status_of(&dm, name, false)?;
            if let [(_, _, target, params)] = lines.as_slice() {
                if target == "thin" {
                    if let Ok(ThinStatus::Working(working)) = ThinStatus::from_str(params) {
                        let mapped = Bytes(working.nr_mapped_sectors.0 * SECTOR_SIZE);
                        sample.sample.mapped.insert(id.clone(), mapped);
                    }
                }
            }
            if flags.contains(DmFlags::DM_SUSPEND) {
                sample.suspended.insert(id);
            }
        }
        Ok(sample)
    }

    fn suspend(&self, id: &VolumeId) -> Result<(), FenceError> {
        self.set_suspended(id, true)
    }

    fn resume(&self, id: &VolumeId) -> Result<(), FenceError> {
        self.set_suspended(id, false)
    }
}

/// Whether the pool can grow, as the auto-extender last found it.
#[derive(Debug, Default)]
pub struct PoolRoom(AtomicU8);

const ROOM_UNKNOWN: u8 = 0;
const ROOM_CAN_GROW: u8 = 1;
const ROOM_FULL: u8 = 2;

impl PoolRoom {
    pub fn set(&self, can_grow: bool) {
        let value = if can_grow { ROOM_CAN_GROW } else { ROOM_FULL };
        self.0.store(value, Ordering::Relaxed);
    }

    /// Until the first reading, the pool is taken to be able to grow: no
    /// volume is fenced on a guess.
    pub fn can_grow(&self) -> bool {
        self.0.load(Ordering::Relaxed) != ROOM_FULL
    }

    pub fn known(&self) -> bool {
        self.0.load(Ordering::Relaxed) != ROOM_UNKNOWN
    }
}

#[derive(Debug, Default)]
struct FenceState {
    fenced: BTreeMap<VolumeId, FenceReason>,
    in_reserve: bool,
    /// Operators' unfence requests, taken by the next check.
    requests: BTreeSet<VolumeId>,
}

/// The fences in force, shared by the fencer (the only writer), the
/// volume host (admission, refusals) and the daemon (status records).
#[derive(Debug, Default)]
pub struct Fences {
    state: Mutex<FenceState>,
}

impl Fences {
    fn lock(&self) -> MutexGuard<'_, FenceState> {
        // Every critical section leaves the map consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn reason(&self, id: &VolumeId) -> Option<FenceReason> {
        self.lock().fenced.get(id).copied()
    }

    pub fn fenced(&self) -> BTreeMap<VolumeId, FenceReason> {
        self.lock().fenced.clone()
    }

    /// Asks the fencer to lift `id`'s fence at its next check (within one
    /// fence interval); a volume that is not fenced makes it a no-op.
    pub fn request_unfence(&self, id: VolumeId) {
        self.lock().requests.insert(id);
    }

    /// Volumes are fenced, or free data is in the reserve with the VG
    /// full: no new space may be promised.
    pub fn contained(&self) -> bool {
        let state = self.lock();
        state.in_reserve || !state.fenced.is_empty()
    }
}

/// What one fence or unfence did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceAction {
    Fenced(FenceReason),
    Unfenced(UnfenceCause),
}

/// One change and how long it took from the start of the check that made
/// it (the sample, the decision and the suspend or resume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceChange {
    pub id: VolumeId,
    pub action: FenceAction,
    pub elapsed: Duration,
}

/// How far back a fence decision looks to tell who filled the pool. One
/// check interval is too short: an idle volume's metadata writeback (a few
/// 64 KiB chunks of ext4's lazily initialised journal and bitmaps) landing
/// in the same 100 ms as a filler's 2–3 MiB passed the tenth-of-the-largest
/// bar, so the idle volume was fenced with the filler (a CI run of
/// `real_fence` hung with both volumes' journals blocked). Over this window
/// the filler's growth is tens of MiB and a burst like that stays far below
/// the bar.
pub const ATTRIBUTION_WINDOW: Duration = Duration::from_secs(2);

/// Samples the pool and fences or unfences by [`fence_model::decide`].
pub struct Fencer {
    devices: Arc<dyn FenceDevices>,
    policy: FencePolicy,
    room: Arc<PoolRoom>,
    fences: Arc<Fences>,
    /// Recent samples, oldest first: the newest one taken at least
    /// [`ATTRIBUTION_WINDOW`] ago (when there is one) and every later one.
    history: VecDeque<(Instant, FenceSample)>,
    zone: Zone,
    /// The pool's data size when the fences in force began.
    fenced_size: Option<Bytes>,
}

impl Fencer {
    pub fn new(
        devices: Arc<dyn FenceDevices>,
        policy: FencePolicy,
        room: Arc<PoolRoom>,
        fences: Arc<Fences>,
    ) -> Fencer {
        Fencer {
            devices,
            policy,
            room,
            fences,
            history: VecDeque::new(),
            zone: Zone::Clear,
            fenced_size: None,
        }
    }

    pub fn fences(&self) -> &Arc<Fences> {
        &self.fences
    }

    /// At start-up: takes every suspended thin LV of ours as fenced
    /// before a restart, then checks, which resumes them at once if the
    /// pool has its space back (or fencing is off).
    pub fn recover(&mut self) -> Result<Vec<FenceChange>, FenceError> {
        let found = self.devices.sample()?;
        {
            let mut state = self.fences.lock();
            for id in &found.suspended {
                state
                    .fenced
                    .entry(id.clone())
                    .or_insert(FenceReason::FoundSuspended);
            }
        }
        if !found.suspended.is_empty() {
            self.fenced_size = Some(found.sample.data_size);
            // They were fenced for a worse zone than clear.
            self.zone = self
                .policy
                .zone(found.sample.free_percent())
                .max(Zone::Reserve);
            tracing::warn!(
                volumes = found.suspended.len(),
                "found fenced (suspended) volumes at start-up"
            );
        }
        self.check()
    }

    /// Samples, decides and acts. A failed suspend or resume is logged and
    /// tried again at the next check.
    pub fn check(&mut self) -> Result<Vec<FenceChange>, FenceError> {
        self.check_at(Instant::now())
    }

    /// [`Fencer::check`] with the time of the sample given, so a test can
    /// space its samples without sleeping.
    fn check_at(&mut self, now: Instant) -> Result<Vec<FenceChange>, FenceError> {
        let started = Instant::now();
        let requests = std::mem::take(&mut self.fences.lock().requests);
        let mut changes = Vec::new();
        for id in requests {
            if let Some(change) = self.release(&id, UnfenceCause::Requested, started)? {
                changes.push(change);
            }
        }
        let current = self.devices.sample()?;
        let fenced = self.fences.fenced();
        let can_grow = self.room.can_grow();
        let entered = self.zone;
        let baseline = self.baseline(now, &current.sample);
        let FenceDecision {
            fence,
            unfence,
            zone,
        } = fence_model::decide(
            &self.policy,
            baseline.as_ref(),
            &current.sample,
            PoolState {
                entered,
                can_grow,
                grew_since_fence: self
                    .fenced_size
                    .is_some_and(|size| current.sample.data_size > size),
            },
            &fenced,
        );
        self.zone = zone;
        for (id, reason) in fence {
            match self.devices.suspend(&id) {
                Ok(()) => {
                    self.fenced_size.get_or_insert(current.sample.data_size);
                    self.fences.lock().fenced.insert(id.clone(), reason);
                    changes.push(FenceChange {
                        id,
                        action: FenceAction::Fenced(reason),
                        elapsed: started.elapsed(),
                    });
                }
                Err(error) => {
                    tracing::error!(volume = %id, %error, "fencing failed; trying again at the next check");
                    // Not taken as entered: the next check tries again.
                    self.zone = entered;
                }
            }
        }
        for (id, cause) in unfence {
            if let Some(change) = self.release(&id, cause, started)? {
                changes.push(change);
            }
        }
        if self.fences.lock().fenced.is_empty() {
            self.fenced_size = None;
        }
        let zone_now = self.policy.zone(current.sample.free_percent());
        self.fences.lock().in_reserve = !can_grow && zone_now > Zone::Clear;
        self.history.push_back((now, current.sample));
        Ok(changes)
    }

    /// What each volume of `current` had mapped at the start of the
    /// attribution window that ends `now`: from the oldest remembered
    /// sample that has it (a volume created since is measured from its
    /// first sample). Forgets the samples before that start.
    fn baseline(&mut self, now: Instant, current: &FenceSample) -> Option<FenceSample> {
        if let Some(cutoff) = now.checked_sub(ATTRIBUTION_WINDOW) {
            while self.history.get(1).is_some_and(|(at, _)| *at <= cutoff) {
                self.history.pop_front();
            }
        }
        let (_, oldest) = self.history.front()?;
        let mut baseline = oldest.clone();
        // Only a volume newer than the oldest sample needs a later one.
        for id in current.mapped.keys() {
            if baseline.mapped.contains_key(id) {
                continue;
            }
            if let Some(mapped) = self.history.iter().find_map(|(_, s)| s.mapped.get(id)) {
                baseline.mapped.insert(id.clone(), *mapped);
            }
        }
        Some(baseline)
    }

    /// Unfences `id` on request; `None` when it was not fenced (the
    /// request is done either way).
    pub fn unfence(&mut self, id: &VolumeId) -> Result<Option<FenceChange>, FenceError> {
        self.release(id, UnfenceCause::Requested, Instant::now())
    }

    fn release(
        &mut self,
        id: &VolumeId,
        cause: UnfenceCause,
        started: Instant,
    ) -> Result<Option<FenceChange>, FenceError> {
        if self.fences.reason(id).is_none() {
            return Ok(None);
        }
        match self.devices.resume(id) {
            Ok(()) | Err(FenceError::NoDevice { .. }) => {}
            Err(error) => return Err(error),
        }
        let mut state = self.fences.lock();
        state.fenced.remove(id);
        if state.fenced.is_empty() && cause == UnfenceCause::SpaceReturned {
            state.in_reserve = false;
        }
        Ok(Some(FenceChange {
            id: id.clone(),
            action: FenceAction::Unfenced(cause),
            elapsed: started.elapsed(),
        }))
    }
}

/// Simulated devices over the simulated backend: mapped data is each
/// volume's data% of its size, suspension a set.
#[cfg(feature = "testing")]
pub mod sim {
    use super::*;
    use crate::backend::sim::SimBackend;
    use crate::backend::ThinBackend;

    pub struct SimFenceDevices {
        backend: Arc<SimBackend>,
        suspended: Mutex<BTreeSet<VolumeId>>,
    }

    impl SimFenceDevices {
        pub fn new(backend: Arc<SimBackend>) -> SimFenceDevices {
            SimFenceDevices {
                backend,
                suspended: Mutex::new(BTreeSet::new()),
            }
        }

        fn lock(&self) -> MutexGuard<'_, BTreeSet<VolumeId>> {
            self.suspended
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }

        pub fn is_suspended(&self, id: &VolumeId) -> bool {
            self.lock().contains(id)
        }
    }

    impl FenceDevices for SimFenceDevices {
        fn sample(&self) -> Result<DeviceSample, FenceError> {
            let failed = |err: crate::backend::BackendError| FenceError::Status {
                device: "simulated pool".into(),
                reason: err.to_string(),
            };
            let status = self.backend.pool_status().map_err(failed)?;
            let mut mapped = BTreeMap::new();
            for volume in self.backend.list_thins().map_err(failed)? {
                if let Some(id) = VolumeId::from_lv_name(&volume.lv) {
                    let bytes = u128::from(volume.virtual_size.0)
                        * u128::from(volume.data_percent.hundredths())
                        / 10_000;
                    mapped.insert(id, Bytes(u64::try_from(bytes).unwrap_or(u64::MAX)));
                }
            }
            Ok(DeviceSample {
                sample: FenceSample {
                    data_size: status.usage.data_size,
                    data_used: status.usage.data_used,
                    mapped,
                },
                suspended: self.lock().clone(),
            })
        }

        fn suspend(&self, id: &VolumeId) -> Result<(), FenceError> {
            self.lock().insert(id.clone());
            Ok(())
        }

        fn resume(&self, id: &VolumeId) -> Result<(), FenceError> {
            self.lock().remove(id);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sim::SimFenceDevices;
    use super::*;
    use crate::backend::sim::SimBackend;
    use crate::backend::{ThinBackend, ThinPoolSpec};
    use crate::names::VgName;
    use crate::units::{Percent, GIB, MIB};
    use std::path::PathBuf;

    fn setup() -> (Arc<SimBackend>, Arc<SimFenceDevices>, Arc<PoolRoom>, Fencer) {
        let mut spec = ThinPoolSpec::new(
            VgName::new("vg0").unwrap(),
            LvName::new("pool0").unwrap(),
            vec![PathBuf::from("/dev/loop0")],
        )
        .unwrap();
        spec.data_size = Some(Bytes(100 * MIB));
        let backend = Arc::new(SimBackend::new(spec));
        let _ = backend.ensure_pool().unwrap();
        let devices = Arc::new(SimFenceDevices::new(backend.clone()));
        let room = Arc::new(PoolRoom::default());
        let fencer = Fencer::new(
            devices.clone(),
            FencePolicy::new(Percent::from_whole(10)).unwrap(),
            room.clone(),
            Arc::new(Fences::default()),
        );
        (backend, devices, room, fencer)
    }

    #[test]
    fn only_the_filler_is_fenced_and_released_when_the_pool_grows() {
        let (backend, devices, room, mut fencer) = setup();
        let [filler, other] = volumes(&backend);
        backend
            .simulate_write(&other.lv_name(), Percent::from_whole(2))
            .unwrap();
        room.set(false);
        assert!(fencer.check().unwrap().is_empty());
        // The filler takes the pool to 92 % used (2 % of 1 GiB is ~20 MiB).
        backend
            .simulate_write(&filler.lv_name(), Percent::from_whole(7))
            .unwrap();
        let changes = fencer.check().unwrap();
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].id, filler);
        assert!(matches!(
            changes[0].action,
            FenceAction::Fenced(FenceReason::PoolReserve { .. })
        ));
        assert!(devices.is_suspended(&filler) && !devices.is_suspended(&other));
        assert!(fencer.fences().contained());
        // The host leaves the fenced volume alone and promises no space.
        let keys = tempfile::tempdir().unwrap();
        let host = crate::host::VolumeHost::new(
            backend.clone(),
            Arc::new(crate::host::sim::SimDevices::new(backend.clone())),
            Arc::new(crate::keys::LocalKeyDir::open(keys.path().join("keys")).unwrap()),
            Default::default(),
        )
        .with_fences(fencer.fences().clone());
        for result in [
            host.extend(&filler, Bytes(2 * GIB)).map(drop),
            host.delete(&filler).map(drop),
            host.close(&filler).map(drop),
            // A thin snapshot makes LVM suspend and resume its origin,
            // which would lift the fence behind the fencer's back.
            host.snapshot(
                &filler,
                &volume_model::names::SnapshotId::generate(),
                &mut crate::host::NoFreeze,
            )
            .map(drop),
        ] {
            let err = result.unwrap_err();
            assert!(
                matches!(err, crate::host::HostError::Fenced { ref id, .. } if *id == filler),
                "{err}"
            );
            assert!(err.to_string().contains("unfence it first"), "{err}");
        }
        let status = host.pool_status().unwrap();
        assert_eq!(status.usage.health, crate::health::PoolHealth::InReserve);
        assert_eq!(status.usage.headroom(&Default::default()), Bytes::ZERO);
        // The other volume writes on inside the reserve, unfenced.
        backend
            .simulate_write(&other.lv_name(), Percent::from_hundredths(220))
            .unwrap();
        assert!(fencer.check().unwrap().is_empty());
        // A PV was added and the pool grew: the filler is let go.
        room.set(true);
        backend.set_vg_free(Bytes(GIB));
        let _ = backend
            .grow_pool(crate::pool_growth::PoolPart::Data, Bytes(100 * MIB))
            .unwrap();
        let changes = fencer.check().unwrap();
        assert_eq!(
            changes
                .iter()
                .map(|c| (&c.id, c.action))
                .collect::<Vec<_>>(),
            [(&filler, FenceAction::Unfenced(UnfenceCause::SpaceReturned))]
        );
        assert!(!devices.is_suspended(&filler));
        assert!(!fencer.fences().contained());
    }

    /// `N` new 1 GiB thin LVs on `backend`.
    fn volumes<const N: usize>(backend: &SimBackend) -> [VolumeId; N] {
        std::array::from_fn(|_| {
            let id = VolumeId::generate();
            let _ = backend.create_thin(&id.lv_name(), Bytes(GIB), &[]).unwrap();
            id
        })
    }

    /// The volumes `changes` fenced or unfenced, in order.
    fn changed(changes: &[FenceChange]) -> Vec<&VolumeId> {
        changes.iter().map(|c| &c.id).collect()
    }

    /// `mib` MiB as the share of a 1 GiB volume that `simulate_write` sets.
    fn mib_of_a_gib(mib: u32) -> Percent {
        Percent::from_hundredths((mib * 10_000).div_ceil(1024))
    }

    /// An idle volume's small burst in the same short interval as the
    /// filler's last writes does not get it fenced: growth is measured over
    /// the attribution window, where the filler wrote far more.
    #[test]
    fn a_burst_beside_the_filler_is_not_taken_for_filling() {
        let (backend, devices, room, mut fencer) = setup();
        let [filler, idle] = volumes(&backend);
        room.set(false);
        backend
            .simulate_write(&idle.lv_name(), mib_of_a_gib(20))
            .unwrap();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert!(fencer.check_at(at(0)).unwrap().is_empty());
        // The filler writes 15 MiB every 100 ms: the pool is 80 % used.
        for step in 1..=4 {
            backend
                .simulate_write(&filler.lv_name(), mib_of_a_gib(15 * step))
                .unwrap();
            assert!(fencer
                .check_at(at(100 * u64::from(step)))
                .unwrap()
                .is_empty());
        }
        // In the next 100 ms it writes 12 MiB more and the idle volume's
        // writeback maps 2 MiB: more than a tenth of the filler's growth in
        // that interval, but not of its growth over the window.
        backend
            .simulate_write(&filler.lv_name(), mib_of_a_gib(72))
            .unwrap();
        backend
            .simulate_write(&idle.lv_name(), mib_of_a_gib(22))
            .unwrap();
        let changes = fencer.check_at(at(500)).unwrap();
        assert_eq!(changed(&changes), [&filler], "{changes:?}");
        assert!(devices.is_suspended(&filler) && !devices.is_suspended(&idle));
    }

    /// A sample older than the window is no longer the baseline once a
    /// later one is: growth long past does not count.
    #[test]
    fn the_baseline_slides_with_the_window() {
        let (backend, devices, room, mut fencer) = setup();
        let [early, filler] = volumes(&backend);
        room.set(false);
        let start = Instant::now();
        let window = ATTRIBUTION_WINDOW.as_millis() as u64;
        assert!(fencer.check_at(start).unwrap().is_empty());
        // `early` wrote 60 MiB well before the window; the filler fills now.
        backend
            .simulate_write(&early.lv_name(), mib_of_a_gib(60))
            .unwrap();
        let later = start + Duration::from_millis(window + 100);
        assert!(fencer.check_at(later).unwrap().is_empty());
        backend
            .simulate_write(&filler.lv_name(), mib_of_a_gib(32))
            .unwrap();
        let changes = fencer
            .check_at(later + Duration::from_millis(window))
            .unwrap();
        assert_eq!(changed(&changes), [&filler], "{changes:?}");
        assert!(!devices.is_suspended(&early));
    }

    #[test]
    fn a_restart_finds_the_fence_and_an_operator_can_lift_it() {
        let (backend, devices, room, mut fencer) = setup();
        let filler = VolumeId::generate();
        let _ = backend
            .create_thin(&filler.lv_name(), Bytes(GIB), &[])
            .unwrap();
        backend
            .simulate_write(&filler.lv_name(), Percent::from_whole(9))
            .unwrap();
        devices.suspend(&filler).unwrap();
        room.set(false);
        // A new fencer (volumed restarted) keeps the fence: no space came back.
        let mut restarted = Fencer::new(
            devices.clone(),
            fencer.policy,
            room.clone(),
            Arc::new(Fences::default()),
        );
        assert!(restarted.recover().unwrap().is_empty());
        assert_eq!(
            restarted.fences().reason(&filler),
            Some(FenceReason::FoundSuspended)
        );
        assert!(devices.is_suspended(&filler));
        // Requested: resumed; a second request is a no-op.
        let lifted = restarted.unfence(&filler).unwrap().unwrap();
        assert_eq!(
            lifted.action,
            FenceAction::Unfenced(UnfenceCause::Requested)
        );
        assert!(!devices.is_suspended(&filler));
        assert_eq!(restarted.unfence(&filler).unwrap(), None);
        // With the space back, a restart resumes what it finds at once.
        devices.suspend(&filler).unwrap();
        backend
            .simulate_write(&filler.lv_name(), Percent::from_whole(1))
            .unwrap();
        let changes = fencer.recover().unwrap();
        assert_eq!(
            changes.iter().map(|c| c.action).collect::<Vec<_>>(),
            [FenceAction::Unfenced(UnfenceCause::SpaceReturned)]
        );
        assert!(!devices.is_suspended(&filler));
    }

    #[test]
    fn dm_names_map_back_to_volumes_and_skip_layers() {
        let devices = DmFenceDevices::new("vmv1-test", "pool");
        let id = VolumeId::generate();
        let name = dm_name("vmv1-test", id.lv_name().as_str());
        assert_eq!(devices.volume_of(&name), Some(id));
        assert_eq!(devices.volume_of("vmv1--test-pool-tpool"), None);
        assert_eq!(devices.volume_of("vmv1--test-pool"), None);
        assert_eq!(devices.volume_of("other-vg-x"), None);
    }
}

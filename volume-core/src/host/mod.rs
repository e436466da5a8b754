//! [`VolumeHost`]: the library API the VM worker links.
//!
//! It orchestrates a [`ThinBackend`] (LVM or the simulator), a
//! [`VolumeDevices`] (real LUKS2/ext4 or the simulator) and a [`KeyStore`].
//! The orchestration is the same code in production and in fast tests: the
//! simulators sit below it, never beside it.
//!
//! Guarantees, for every operation:
//! * **Idempotent.** Repeating a call that succeeded changes nothing and
//!   says so (`Identity`).
//! * **Crash-safe.** Progress is recorded in LV tags ([`progress`]) after
//!   every step that changes the disk, so a re-run after a crash at any
//!   point finishes the job (create, expose, extend) or finishes the
//!   clean-up (delete, rollback).
//! * **Never formats over data.** Only volumes whose recorded progress is
//!   before `ready` are formatted, and the format and mkfs steps themselves
//!   refuse any signature they did not make.
//! * **Rollback removes only what this call made.** A failed create removes
//!   the key, LV, header and mapping *it* made, never a key stored before
//!   the call (another host's, with the envelope store) or the LV of an
//!   earlier, unfinished create (a re-run resumes it; delete removes it);
//!   a failed expose removes its node and record. A failed rollback is
//!   reported as [`HostError::RollbackFailed`] with both errors. Extend and
//!   delete need no rollback: re-running them converges.
//! * **No secrets in errors or logs.** Keys never leave [`crate::keys`]
//!   types; errors name volumes, devices and paths only.
//!
//! ```
//! use std::sync::Arc;
//! use volume_core::backend::{sim::SimBackend, ThinBackend, ThinPoolSpec};
//! use volume_core::host::{sim::SimDevices, Encryption, VolumeHost, NewVolume};
//! use volume_core::jail::{JailPath, NodeOwner};
//! use volume_core::keys::LocalKeyDir;
//! use volume_core::names::{LvName, VgName, VolumeId, VolumeName};
//! use volume_core::units::Bytes;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let scratch = tempfile::tempdir()?;
//! # std::fs::create_dir(scratch.path().join("dev"))?;
//! let spec = ThinPoolSpec::new(VgName::new("vg0")?, LvName::new("pool0")?, vec!["/dev/vdb".into()])?;
//! let backend = Arc::new(SimBackend::new(spec));
//! backend.ensure_pool()?;
//! let host = VolumeHost::new(
//!     backend.clone(),
//!     Arc::new(SimDevices::new(backend.clone())),
//!     Arc::new(LocalKeyDir::open(scratch.path().join("keys"))?),
//!     Default::default(),
//! );
//!
//! let id = VolumeId::generate();
//! let volume = NewVolume {
//!     id: id.clone(),
//!     name: VolumeName::new("data")?,
//!     size: Bytes::from_gib(25)?,
//!     encryption: Encryption::Luks2,
//! };
//! let created = host.create(&volume)?;
//! assert!(created.changed());
//! assert!(!host.create(&volume)?.changed()); // idempotent
//!
//! let jail = JailPath::new(scratch.path(), "dev/vdb")?;
//! host.expose(&id, &jail, NodeOwner { uid: 1000, gid: 1000 })?;
//! host.extend(&id, Bytes::from_gib(30)?)?;
//! assert_eq!(host.list()?.len(), 1);
//! host.delete(&id)?;
//! assert!(host.list()?.is_empty());
//! # Ok(())
//! # }
//! ```

pub mod devices;
#[cfg(feature = "testing")]
pub mod faults;
#[cfg(test)]
mod hydration_tests;
#[cfg(feature = "testing")]
pub mod sim;
#[cfg(test)]
mod snapshot_tests;
pub mod steps;
#[cfg(test)]
mod tests;

pub use devices::{RealDevices, VolumeDevices};
#[cfg(feature = "testing")]
pub use faults::{Fault, FaultInjector, FaultPlan};
pub use progress::{Encryption, Progress};
pub use snapshots::{FreezeHook, LocalSnapshot, NoFreeze, Restore, SnapshotInventory};
pub use steps::Step;
pub use volume_model::progress;

use crate::actions::{CreateAction, DeleteAction, ExtendAction};
use crate::backend::{BackendError, LvPresence, PoolStatus, ThinBackend, ThinVolume};
use crate::capacity::{CapacityPolicy, Refusal};
use crate::crypt::{CryptError, FormatGuard};
use crate::fence::Fences;
use crate::fence_model::FenceReason;
use crate::fs::{FsError, GrowOutcome, Holders};
use crate::health::PoolHealth;
use crate::health::VolumeHealth;
use crate::jail::{self, ExposedNode, JailError, JailPath, NodeOwner};
use crate::keys::{KeyError, KeyStore, VolumeKey};
use crate::migrate::MigrateError;
use crate::names::{MigrationId, SnapshotId, VolumeId, VolumeName};
use crate::units::{Bytes, ExtentSize, Percent, UnitError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVolume {
    pub id: VolumeId,
    pub name: VolumeName,
    /// Virtual size; rounded up to whole extents.
    pub size: Bytes,
    pub encryption: Encryption,
}

/// A volume as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVolume {
    pub id: VolumeId,
    pub name: Option<VolumeName>,
    pub size: Bytes,
    pub data_percent: Percent,
    pub encryption: Option<Encryption>,
    /// `None` when the recorded progress is unreadable.
    pub progress: Option<Progress>,
    /// The device a VM gets (the dm-crypt mapping or the LV), when open.
    pub device: Option<PathBuf>,
    /// Jail nodes recorded for this volume.
    pub exposed: Vec<JailPath>,
    /// The thin LV's own health, as LVM reports it.
    pub health: VolumeHealth,
}

/// What an extend did at each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendOutcome {
    pub lv: ExtendAction,
    pub filesystem: FsGrowth,
}

/// The filesystem part of an extend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsGrowth {
    Grown(ExtendAction),
    /// The volume is exposed to a VM, whose guest has the filesystem
    /// mounted where this host cannot see it; the guest grows it online
    /// (`resize2fs /dev/vdX`) after it sees the new device size. Growing it
    /// offline from here under a running guest would corrupt it.
    LeftToGuest,
    /// Not exposed through a jail node, but something holds the device (or
    /// the LV beneath it) open: a VM given the device path directly, a
    /// mount in another namespace. Left to whoever has it, as for
    /// [`FsGrowth::LeftToGuest`]; a later extend grows it once released.
    InUse(Holders),
}

/// The `map_err` of a step that failed on volume `id`: wraps the cause in
/// that step's variant, `HostError::$step { id, source }`.
macro_rules! failed_at {
    ($step:ident, $id:expr) => {
        |source| HostError::$step {
            id: $id.clone(),
            source: Box::new(source),
        }
    };
}

// After `failed_at!`, which they use.
pub mod hydration;
pub mod snapshots;

pub use hydration::Hydration;

/// One variant per failing step. None carries key material.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("volume {id}: no such volume")]
    NotFound { id: VolumeId },
    #[error("volume {id} is fenced ({reason}); nothing changed: unfence it first")]
    Fenced { id: VolumeId, reason: FenceReason },
    #[error("volume {id} exists with {field} {existing}, not the requested {requested}; nothing changed")]
    SpecMismatch {
        id: VolumeId,
        field: &'static str,
        existing: String,
        requested: String,
    },
    #[error(
        "volume {id} is {progress:?}, not ready; re-run create to finish it or delete to remove it"
    )]
    NotReady { id: VolumeId, progress: Progress },
    #[error("volume {id} is hydrating (migration {migration}) but its copying layer is not up (after a restart): call hydrate again to rebuild it")]
    Hydrating {
        id: VolumeId,
        migration: MigrationId,
    },
    #[error("volume {id} is still hydrating (migration {migration}): its LV here is not complete yet; complete or cancel the migration first")]
    HydrationUnfinished {
        id: VolumeId,
        migration: MigrationId,
    },
    #[error("volume {id} is hydrating (migration {migration}) but this host takes no part in migrations (no run directory to cancel it from); nothing changed")]
    MigrationsOff {
        id: VolumeId,
        migration: MigrationId,
    },
    #[error("volume {id}: starting its hydration (migration {migration}) failed: {source}")]
    HydrationStart {
        id: VolumeId,
        migration: MigrationId,
        #[source]
        source: Box<MigrateError>,
    },
    #[error("volume {id}: reading the progress of its hydration (migration {migration}) failed: {source}")]
    HydrationProgress {
        id: VolumeId,
        migration: MigrationId,
        #[source]
        source: Box<MigrateError>,
    },
    #[error("volume {id}: completing its hydration (migration {migration}) failed: {source}")]
    HydrationComplete {
        id: VolumeId,
        migration: MigrationId,
        #[source]
        source: Box<MigrateError>,
    },
    #[error("volume {id}: cancelling its hydration (migration {migration}) failed: {source}")]
    HydrationCancel {
        id: VolumeId,
        migration: MigrationId,
        #[source]
        source: Box<MigrateError>,
    },
    #[error("volume {id} has unreadable progress tags {tags:?}; refusing to guess")]
    UnreadableProgress { id: VolumeId, tags: Vec<String> },
    #[error("volume {id}: capacity refused: {refusal}")]
    Admission { id: VolumeId, refusal: Refusal },
    #[error("reading pool status failed: {0}")]
    PoolStatus(#[source] BackendError),
    #[error("listing volumes failed: {0}")]
    List(#[source] BackendError),
    #[error("listing the dm-crypt mappings failed: {0}")]
    CryptList(#[source] CryptError),
    #[error("volume {id}: storing a new key failed: {source}")]
    KeyCreate {
        id: VolumeId,
        #[source]
        source: Box<KeyError>,
    },
    #[error("volume {id}: loading its key failed: {source}")]
    KeyLoad {
        id: VolumeId,
        #[source]
        source: Box<KeyError>,
    },
    #[error("volume {id} is encrypted but its key is missing from the key store; refusing to reformat it")]
    KeyMissing { id: VolumeId },
    #[error("volume {id}: destroying its key failed: {source}")]
    KeyDestroy {
        id: VolumeId,
        #[source]
        source: Box<KeyError>,
    },
    #[error(
        "volume {id}: a size of {} bytes cannot be rounded up to whole extents of {} bytes: {source}",
        size.0,
        extent.bytes().0
    )]
    SizeNotRoundable {
        id: VolumeId,
        size: Bytes,
        extent: ExtentSize,
        #[source]
        source: UnitError,
    },
    #[error("volume {id}: creating the LV failed: {source}")]
    LvCreate {
        id: VolumeId,
        #[source]
        source: Box<BackendError>,
    },
    #[error("volume {id}: activating the LV failed: {source}")]
    LvActivate {
        id: VolumeId,
        #[source]
        source: Box<BackendError>,
    },
    #[error("volume {id}: extending the LV failed: {source}")]
    LvExtend {
        id: VolumeId,
        #[source]
        source: Box<BackendError>,
    },
    #[error("volume {id}: removing the LV failed: {source}")]
    LvRemove {
        id: VolumeId,
        #[source]
        source: Box<BackendError>,
    },
    #[error("volume {id}: recording progress ({what}) failed: {source}")]
    Record {
        id: VolumeId,
        what: &'static str,
        #[source]
        source: Box<BackendError>,
    },
    #[error("volume {id}: LUKS2 format failed: {source}")]
    CryptFormat {
        id: VolumeId,
        #[source]
        source: Box<CryptError>,
    },
    #[error("volume {id}: opening the dm-crypt mapping failed: {source}")]
    CryptOpen {
        id: VolumeId,
        #[source]
        source: Box<CryptError>,
    },
    #[error("volume {id}: reading the dm-crypt mapping failed: {source}")]
    CryptStatus {
        id: VolumeId,
        #[source]
        source: Box<CryptError>,
    },
    #[error("volume {id}: closing the dm-crypt mapping failed: {source}")]
    CryptClose {
        id: VolumeId,
        #[source]
        source: Box<CryptError>,
    },
    #[error("volume {id}: resizing the dm-crypt mapping failed: {source}")]
    CryptResize {
        id: VolumeId,
        #[source]
        source: Box<CryptError>,
    },
    #[error("volume {id}: erasing the LUKS2 header failed: {source}")]
    CryptErase {
        id: VolumeId,
        #[source]
        source: Box<CryptError>,
    },
    #[error("volume {id}: making the filesystem failed: {source}")]
    Mkfs {
        id: VolumeId,
        #[source]
        source: Box<FsError>,
    },
    #[error("volume {id}: growing the filesystem failed: {source}")]
    FsGrow {
        id: VolumeId,
        #[source]
        source: Box<FsError>,
    },
    #[error("volume {id}: jail path {path} is too long to record in an LV tag")]
    JailPathTooLong { id: VolumeId, path: PathBuf },
    #[error("volume {id}: reading the device number failed: {source}")]
    DeviceNumber {
        id: VolumeId,
        #[source]
        source: Box<JailError>,
    },
    #[error("volume {id}: exposing it failed: {source}")]
    Expose {
        id: VolumeId,
        #[source]
        source: Box<JailError>,
    },
    #[error("volume {id}: removing a jail node failed: {source}")]
    Unexpose {
        id: VolumeId,
        #[source]
        source: Box<JailError>,
    },
    #[error("snapshot {snapshot}: no such snapshot")]
    SnapshotNotFound { snapshot: SnapshotId },
    #[error(
        "snapshot {snapshot} has unreadable tags {tags:?} (no origin volume); refusing to guess"
    )]
    UnreadableSnapshot {
        snapshot: SnapshotId,
        tags: Vec<String>,
    },
    #[error("snapshot {snapshot} exists as a snapshot of volume {existing}, not of {requested}; nothing changed")]
    SnapshotOfOther {
        snapshot: SnapshotId,
        existing: String,
        requested: VolumeId,
    },
    #[error("volume {id}: the freeze hook failed before snapshot {snapshot}: {reason}")]
    Freeze {
        id: VolumeId,
        snapshot: SnapshotId,
        reason: String,
    },
    #[error("volume {id}: taking snapshot {snapshot} failed: {source}")]
    SnapshotCreate {
        id: VolumeId,
        snapshot: SnapshotId,
        #[source]
        source: Box<BackendError>,
    },
    #[error("snapshot {snapshot}: removing it failed: {source}")]
    SnapshotRemove {
        snapshot: SnapshotId,
        #[source]
        source: Box<BackendError>,
    },
    #[error("volume {id}: {} bytes is smaller than snapshot {snapshot} ({} bytes); a restore is at least the snapshot's size", size.0, snapshot_size.0)]
    RestoreTooSmall {
        id: VolumeId,
        snapshot: SnapshotId,
        size: Bytes,
        snapshot_size: Bytes,
    },
    #[error("volume {id} is being restored from a snapshot; re-run the restore to finish it or delete it")]
    RestoreUnfinished { id: VolumeId },
    #[error("volume {id}: copying the data key of volume {origin} failed: {source}")]
    KeyCopy {
        id: VolumeId,
        origin: VolumeId,
        #[source]
        source: Box<KeyError>,
    },
    #[error("volume {id}: adopting the restored LUKS2 header failed: {source}")]
    HeaderAdopt {
        id: VolumeId,
        #[source]
        source: Box<CryptError>,
    },
    #[error("volume {id}: checking the restored filesystem failed: {source}")]
    FsCheck {
        id: VolumeId,
        #[source]
        source: Box<FsError>,
    },
    #[error("volume {id}: giving the restored filesystem its own UUID failed: {source}")]
    FsAdopt {
        id: VolumeId,
        #[source]
        source: Box<FsError>,
    },
    #[cfg(feature = "testing")]
    #[error("volume {id}: injected failure after step {step}")]
    InjectedFailure { id: VolumeId, step: Step },
    #[cfg(feature = "testing")]
    #[error("volume {id}: injected crash after step {step} (nothing rolled back)")]
    InjectedCrash { id: VolumeId, step: Step },
    #[error("{error}; rolling back failed too: {rollback}")]
    RollbackFailed {
        error: Box<HostError>,
        rollback: Box<HostError>,
    },
}

impl HostError {
    #[cfg(feature = "testing")]
    fn is_crash(&self) -> bool {
        matches!(self, HostError::InjectedCrash { .. })
    }

    /// Only an injected crash skips rollback, and only tests inject one.
    #[cfg(not(feature = "testing"))]
    fn is_crash(&self) -> bool {
        false
    }
}

/// A requested size rounded up to whole extents, as LVM will allocate it.
fn round_to_extents(id: &VolumeId, size: Bytes, extent: ExtentSize) -> Result<Bytes, HostError> {
    size.round_up_to(extent.bytes())
        .map_err(|source| HostError::SizeNotRoundable {
            id: id.clone(),
            size,
            extent,
            source,
        })
}

/// What one create call made itself, so that its rollback removes exactly
/// that.
#[derive(Debug, Default, Clone, Copy)]
struct Made {
    key: bool,
    lv: bool,
    mapping: bool,
}

/// Whether a teardown destroys the volume's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyFate {
    Destroy,
    /// The key existed before the create being rolled back.
    Keep,
}

/// The volume API for one host's thin pool.
pub struct VolumeHost {
    backend: Arc<dyn ThinBackend>,
    devices: Arc<dyn VolumeDevices>,
    keys: Arc<dyn KeyStore>,
    policy: CapacityPolicy,
    #[cfg(feature = "testing")]
    faults: Option<Arc<dyn FaultInjector>>,
    /// Held across admission and LV creation/extension so two requests
    /// cannot both take the last headroom.
    pool_lock: Mutex<()>,
    /// One lock per volume: operations on one volume run one at a time.
    volume_locks: Mutex<HashMap<VolumeId, Arc<Mutex<()>>>>,
    /// The fences in force, when a fencer runs ([`crate::fence`]).
    fences: Option<Arc<Fences>>,
    /// Set when this host takes part in migrations.
    migrations: Option<hydration::MigrationSetup>,
}

impl std::fmt::Debug for VolumeHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeHost")
            .field("pool", self.backend.spec())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the guarded data consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl VolumeHost {
    pub fn new(
        backend: Arc<dyn ThinBackend>,
        devices: Arc<dyn VolumeDevices>,
        keys: Arc<dyn KeyStore>,
        policy: CapacityPolicy,
    ) -> VolumeHost {
        VolumeHost {
            backend,
            devices,
            keys,
            policy,
            #[cfg(feature = "testing")]
            faults: None,
            pool_lock: Mutex::new(()),
            volume_locks: Mutex::new(HashMap::new()),
            fences: None,
            migrations: None,
        }
    }

    /// Follows the fences a fencer keeps: a fenced volume is not opened,
    /// exposed, extended, closed or deleted (each would read its suspended
    /// LV, or resume it behind the fencer's back), its listing reads no
    /// header, and while the pool is contained no new
    /// space is promised (its health reads `in_reserve`).
    pub fn with_fences(mut self, fences: Arc<Fences>) -> VolumeHost {
        self.fences = Some(fences);
        self
    }

    /// The fences this host follows, if any.
    pub fn fences(&self) -> Option<&Arc<Fences>> {
        self.fences.as_ref()
    }

    fn refuse_if_fenced(&self, id: &VolumeId) -> Result<(), HostError> {
        match self.fences.as_ref().and_then(|fences| fences.reason(id)) {
            Some(reason) => Err(HostError::Fenced {
                id: id.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// The pool as the backend reads it, with the fences' containment.
    fn read_pool(&self) -> Result<PoolStatus, HostError> {
        let status = self.backend.pool_status().map_err(HostError::PoolStatus)?;
        Ok(self.contained(status))
    }

    /// `status` with the fences' containment.
    fn contained(&self, mut status: PoolStatus) -> PoolStatus {
        if self
            .fences
            .as_ref()
            .is_some_and(|fences| fences.contained())
        {
            status.usage.health = status.usage.health.worst(PoolHealth::InReserve);
        }
        status
    }

    /// Injects faults between steps (tests, on the simulator and the real
    /// stack alike).
    #[cfg(feature = "testing")]
    pub fn with_faults(mut self, faults: Arc<dyn FaultInjector>) -> VolumeHost {
        self.faults = Some(faults);
        self
    }

    pub fn backend(&self) -> &Arc<dyn ThinBackend> {
        &self.backend
    }

    fn volume_lock(&self, id: &VolumeId) -> Arc<Mutex<()>> {
        lock(&self.volume_locks)
            .entry(id.clone())
            .or_default()
            .clone()
    }

    fn step(&self, id: &VolumeId, step: Step) -> Result<(), HostError> {
        tracing::debug!(volume = %id, %step, "step done");
        #[cfg(feature = "testing")]
        if let Some(fault) = self.faults.as_ref().and_then(|f| f.after(step)) {
            let id = id.clone();
            return Err(match fault {
                Fault::Fail => HostError::InjectedFailure { id, step },
                Fault::Crash => HostError::InjectedCrash { id, step },
            });
        }
        Ok(())
    }

    /// The volume's LV, from a report of that LV alone.
    fn find(&self, id: &VolumeId) -> Result<Option<ThinVolume>, HostError> {
        self.backend.thin(&id.lv_name()).map_err(HostError::List)
    }

    fn progress_of(id: &VolumeId, volume: &ThinVolume) -> Result<Progress, HostError> {
        progress::step(&volume.tags).ok_or_else(|| HostError::UnreadableProgress {
            id: id.clone(),
            tags: volume.tags.iter().cloned().collect(),
        })
    }

    fn encryption_of(id: &VolumeId, volume: &ThinVolume) -> Result<Encryption, HostError> {
        progress::encryption(&volume.tags).ok_or_else(|| HostError::UnreadableProgress {
            id: id.clone(),
            tags: volume.tags.iter().cloned().collect(),
        })
    }

    fn retag(
        &self,
        id: &VolumeId,
        what: &'static str,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, HostError> {
        self.backend
            .retag(&id.lv_name(), add, remove)
            .map_err(|source| HostError::Record {
                id: id.clone(),
                what,
                source: Box::new(source),
            })
    }

    /// Records `reached` on `volume`, read or made under the volume lock.
    fn set_progress(
        &self,
        id: &VolumeId,
        volume: &ThinVolume,
        reached: Progress,
    ) -> Result<ThinVolume, HostError> {
        self.retag_seen(
            id,
            "step",
            volume,
            &[progress::step_tag(reached)],
            &progress::other_step_tags(reached),
        )
    }

    /// [`Self::retag`] of `volume`, read (or made) moments ago under the
    /// volume lock: the change alone, with no report first.
    fn retag_seen(
        &self,
        id: &VolumeId,
        what: &'static str,
        volume: &ThinVolume,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, HostError> {
        self.backend
            .retag_seen(volume, add, remove)
            .map_err(|source| HostError::Record {
                id: id.clone(),
                what,
                source: Box::new(source),
            })
    }

    fn load_key(&self, id: &VolumeId) -> Result<VolumeKey, HostError> {
        self.keys
            .load(id)
            .map_err(failed_at!(KeyLoad, id))?
            .ok_or_else(|| HostError::KeyMissing { id: id.clone() })
    }

    fn activate(&self, id: &VolumeId) -> Result<PathBuf, HostError> {
        self.backend
            .activate_thin(&id.lv_name())
            .map_err(failed_at!(LvActivate, id))
    }

    /// The LV's device: as `volume`'s report shows it when active, else
    /// after activating it (a report read moments ago under the volume
    /// lock spares a second one).
    fn lv_device(&self, id: &VolumeId, volume: &ThinVolume) -> Result<PathBuf, HostError> {
        match &volume.device {
            Some(device) => Ok(device.clone()),
            None => self.activate(id),
        }
    }

    /// Activates the LV and opens the mapping; returns the final device.
    fn ensure_open(
        &self,
        id: &VolumeId,
        encryption: Encryption,
        volume: &ThinVolume,
    ) -> Result<PathBuf, HostError> {
        Ok(self.ensure_open_layers(id, encryption, volume)?.0)
    }

    /// [`Self::ensure_open`], also returning the LV under a mapping.
    fn ensure_open_layers(
        &self,
        id: &VolumeId,
        encryption: Encryption,
        volume: &ThinVolume,
    ) -> Result<(PathBuf, Option<PathBuf>), HostError> {
        let lv_device = self.lv_device(id, volume)?;
        match encryption {
            Encryption::None => Ok((lv_device, None)),
            Encryption::Luks2 => {
                let key = self.load_key(id)?;
                let mapping = self
                    .devices
                    .open_crypt(&lv_device, id, &key)
                    .map_err(failed_at!(CryptOpen, id))?
                    .into_inner();
                Ok((mapping, Some(lv_device)))
            }
        }
    }

    fn status_of(&self, volume: &ThinVolume) -> Result<Option<LocalVolume>, HostError> {
        let Some(id) = VolumeId::from_lv_name(&volume.lv) else {
            return Ok(None);
        };
        let encryption = progress::encryption(&volume.tags);
        let fenced = self
            .fences
            .as_ref()
            .is_some_and(|fences| fences.reason(&id).is_some());
        let device = match encryption {
            // The LV under a fenced volume's mapping is suspended: no
            // header read, or the listing would wait for the unfence.
            Some(Encryption::Luks2) if fenced => self.devices.crypt_mapping_unread(&id),
            Some(Encryption::Luks2) => self
                .devices
                .crypt_mapping(&id)
                .map_err(failed_at!(CryptStatus, id))?,
            _ => volume.device.clone(),
        };
        Ok(Some(Self::local_volume(id, volume, device)))
    }

    /// The volume as its LV's report and its final `device` describe it.
    fn local_volume(id: VolumeId, volume: &ThinVolume, device: Option<PathBuf>) -> LocalVolume {
        LocalVolume {
            name: progress::name(&volume.tags),
            size: volume.virtual_size,
            data_percent: volume.data_percent,
            encryption: progress::encryption(&volume.tags),
            progress: progress::step(&volume.tags),
            device,
            exposed: progress::nodes(&volume.tags)
                .into_iter()
                .map(|(jail, _)| jail)
                .collect(),
            health: volume.health,
            id,
        }
    }

    fn status(&self, id: &VolumeId) -> Result<LocalVolume, HostError> {
        let volume = self
            .find(id)?
            .ok_or_else(|| HostError::NotFound { id: id.clone() })?;
        self.status_of(&volume)?
            .ok_or_else(|| HostError::NotFound { id: id.clone() })
    }

    fn check_spec(spec: &NewVolume, volume: &ThinVolume) -> Result<(), HostError> {
        let mismatch = |field, existing: String, requested: String| HostError::SpecMismatch {
            id: spec.id.clone(),
            field,
            existing,
            requested,
        };
        let encryption = Self::encryption_of(&spec.id, volume)?;
        if encryption != spec.encryption {
            return Err(mismatch(
                "encryption",
                format!("{encryption:?}"),
                format!("{:?}", spec.encryption),
            ));
        }
        let name = progress::name(&volume.tags);
        if name.as_ref() != Some(&spec.name) {
            return Err(mismatch(
                "name",
                name.map(|n| n.to_string()).unwrap_or_default(),
                spec.name.to_string(),
            ));
        }
        Ok(())
    }

    fn admit_new(&self, spec: &NewVolume) -> Result<(), HostError> {
        let status = self.read_pool()?;
        self.admit_on(spec, &status)
    }

    fn admit_on(&self, spec: &NewVolume, status: &PoolStatus) -> Result<(), HostError> {
        let size = round_to_extents(&spec.id, spec.size, status.extent_size)?;
        status
            .usage
            .admit_new(&self.policy, size)
            .map(|_| ())
            .map_err(|refusal| HostError::Admission {
                id: spec.id.clone(),
                refusal,
            })
    }

    /// Creates a volume: key, thin LV, LUKS2 header, mapping, ext4; or
    /// finishes one a crash interrupted. `Identity` for a volume that is
    /// already ready with this spec (it is opened if it was closed).
    pub fn create(&self, spec: &NewVolume) -> Result<CreateAction<LocalVolume>, HostError> {
        let volume_lock = self.volume_lock(&spec.id);
        let _held = lock(&volume_lock);
        let id = &spec.id;
        // Nearly every create is of a new name: the admission's one pool
        // report says so, and the volume is admitted on it, under the pool
        // lock. Only a name the VG holds is read on its own.
        let pool_guard = lock(&self.pool_lock);
        let (status, presence) = self
            .backend
            .pool_status_and_lv(&id.lv_name())
            .map_err(HostError::PoolStatus)?;
        let (admitted, mut existing) = match presence {
            LvPresence::Absent => {
                self.admit_on(spec, &self.contained(status))?;
                (Some(pool_guard), None)
            }
            LvPresence::Present => {
                drop(pool_guard);
                (None, self.find(id)?)
            }
        };
        if let Some(volume) = &existing {
            if Self::progress_of(id, volume)? == Progress::Deleting {
                // A delete or rollback began; finish it, then start afresh.
                let fate = if progress::key_kept(&volume.tags) {
                    KeyFate::Keep
                } else {
                    KeyFate::Destroy
                };
                let _ = self.teardown(id, existing.take(), fate)?;
            }
        }
        if let Some(volume) = &existing {
            if progress::step(&volume.tags) == Some(Progress::Restoring) {
                return Err(HostError::RestoreUnfinished { id: id.clone() });
            }
            if let Some(migration) = Self::migration_of(volume) {
                // Never formatted: it holds the source's data.
                return Err(HostError::HydrationUnfinished {
                    id: id.clone(),
                    migration,
                });
            }
            Self::check_spec(spec, volume)?;
            // Same size check as LVM makes: identity or SizeMismatch.
            if let Err(source) = self.backend.create_thin(&id.lv_name(), spec.size, &[]) {
                return Err(match source {
                    BackendError::SizeMismatch {
                        existing,
                        requested,
                        ..
                    } => HostError::SpecMismatch {
                        id: id.clone(),
                        field: "size",
                        existing: existing.to_string(),
                        requested: requested.to_string(),
                    },
                    BackendError::NotRoundable {
                        size,
                        extent,
                        source,
                    } => HostError::SizeNotRoundable {
                        id: id.clone(),
                        size,
                        extent,
                        source,
                    },
                    other => HostError::LvCreate {
                        id: id.clone(),
                        source: Box::new(other),
                    },
                });
            }
            if Self::progress_of(id, volume)? == Progress::Ready {
                self.refuse_if_fenced(id)?;
                self.ensure_open(id, spec.encryption, volume)?;
                return Ok(CreateAction::Identity(self.status(id)?));
            }
            tracing::info!(volume = %id, "resuming an unfinished create");
        }
        let mut made = Made::default();
        match self.build(spec, existing, admitted, &mut made) {
            Ok(status) => Ok(CreateAction::Created(status)),
            Err(error) if error.is_crash() => Err(error),
            Err(error) => {
                tracing::warn!(volume = %id, %error, "create failed; rolling back");
                match self.discard_unfinished(id, made) {
                    Ok(()) => Err(error),
                    Err(rollback) if rollback.is_crash() => Err(rollback),
                    Err(rollback) => Err(HostError::RollbackFailed {
                        error: Box::new(error),
                        rollback: Box::new(rollback),
                    }),
                }
            }
        }
    }

    /// The mutating part of create; any error here is rolled back, and
    /// `made` says what this call made.
    /// `admitted`: the pool lock, held since this new volume was admitted.
    fn build(
        &self,
        spec: &NewVolume,
        existing: Option<ThinVolume>,
        admitted: Option<MutexGuard<'_, ()>>,
        made: &mut Made,
    ) -> Result<LocalVolume, HostError> {
        let id = &spec.id;
        // A new volume is admitted, and its key and LV made, under the pool
        // lock, so two creates cannot both take the last headroom; one pool
        // report serves the admission.
        let pool_guard = match (&existing, admitted) {
            (Some(_), _) => None,
            (None, Some(guard)) => Some(guard),
            (None, None) => {
                let guard = lock(&self.pool_lock);
                self.admit_new(spec)?;
                Some(guard)
            }
        };
        let key = match spec.encryption {
            Encryption::Luks2 => {
                let key = self
                    .keys
                    .get_or_create(id)
                    .map_err(failed_at!(KeyCreate, id))?;
                made.key = key.changed();
                let key = key.into_inner();
                self.step(id, Step::KeyReady)?;
                Some(key)
            }
            Encryption::None => None,
        };
        let (state, seen, created_device) = match existing {
            Some(volume) => (Self::progress_of(id, &volume)?, volume, None),
            None => {
                // Every tag a create needs goes in with the LV: one
                // metadata commit.
                let tags = [
                    progress::step_tag(Progress::LvCreated),
                    progress::encryption_tag(spec.encryption),
                    progress::name_tag(&spec.name),
                ];
                let created = self
                    .backend
                    .create_thin(&id.lv_name(), spec.size, &tags)
                    .map_err(failed_at!(LvCreate, id))?;
                made.lv = created.changed();
                drop(pool_guard);
                tracing::info!(volume = %id, size = %spec.size, "created LV");
                let created = created.into_inner();
                let device = created.device.clone();
                (Progress::LvCreated, created, device)
            }
        };
        self.step(id, Step::LvCreated)?;
        // An LV lvcreate just made is active; only a resumed one may not be.
        let lv_device = match created_device {
            Some(device) => device,
            None => self.activate(id)?,
        };
        let fs_device = match &key {
            Some(key) => {
                if state == Progress::LvCreated {
                    // The LV is ours and was never ready: nothing of value
                    // can be on it, so a half-written header may be replaced.
                    // No progress is recorded for the header: a re-run
                    // finds it (format is identity for our own header with
                    // this key), so a record would cost a metadata commit
                    // and save nothing.
                    let _ = self
                        .devices
                        .format_crypt(&lv_device, id, key, FormatGuard::AllowUnfinishedOwnHeader)
                        .map_err(failed_at!(CryptFormat, id))?;
                    self.step(id, Step::CryptFormatted)?;
                }
                let mapping = self
                    .devices
                    .open_crypt(&lv_device, id, key)
                    .map_err(failed_at!(CryptOpen, id))?;
                made.mapping = mapping.changed();
                let mapping = mapping.into_inner();
                self.step(id, Step::CryptOpened)?;
                mapping
            }
            None => lv_device,
        };
        let _ = self
            .devices
            .make_fs(&fs_device, id)
            .map_err(failed_at!(Mkfs, id))?;
        self.step(id, Step::FsMade)?;
        let mut volume = self.set_progress(id, &seen, Progress::Ready)?;
        self.step(id, Step::ProgressReady)?;
        tracing::info!(volume = %id, device = %fs_device.display(), "volume ready");
        // The LV was read or made under the volume lock; what mkfs
        // allocated comes from the thin device's own counters, and the
        // device is the one just made: no report is needed for the status.
        if let Ok(allocations) = self.backend.thin_allocations(&[id.lv_name()]) {
            if let Some(allocation) = allocations.first() {
                volume.data_percent = allocation.allocated;
            }
        }
        Ok(Self::local_volume(id.clone(), &volume, Some(fs_device)))
    }

    /// Rollback of a failed create: removes what this call made (`made`),
    /// and nothing once the volume reached `ready` (it may be in use).
    /// * This call made the LV: the LV goes with its header and mapping.
    /// * The LV is an earlier call's (a resumed create): only the mapping
    ///   this call opened is closed; the LV keeps its progress for a re-run.
    /// * The key goes only if this call made it.
    fn discard_unfinished(&self, id: &VolumeId, made: Made) -> Result<(), HostError> {
        let fate = if made.key {
            KeyFate::Destroy
        } else {
            KeyFate::Keep
        };
        if made.lv {
            let existing = self.find(id)?;
            if let Some(volume) = &existing {
                if progress::step(&volume.tags) == Some(Progress::Ready) {
                    return Ok(());
                }
            }
            return self.teardown(id, existing, fate).map(|_| ());
        }
        if made.mapping {
            let _ = self
                .devices
                .close_crypt(id)
                .map_err(failed_at!(CryptClose, id))?;
            self.step(id, Step::CryptClosed)?;
        }
        if fate == KeyFate::Destroy {
            self.destroy_key(id)?;
        }
        Ok(())
    }

    fn destroy_key(&self, id: &VolumeId) -> Result<bool, HostError> {
        let changed = self
            .keys
            .destroy(id)
            .map_err(failed_at!(KeyDestroy, id))?
            .changed();
        self.step(id, Step::KeyDestroyed)?;
        Ok(changed)
    }

    /// Removes a volume and everything of it, in an order that a re-run
    /// after a crash at any point completes: mark, unexpose, close, erase
    /// the header, remove the LV, destroy the key (unless `key` says keep;
    /// the mark then records that, for the re-run).
    fn teardown(
        &self,
        id: &VolumeId,
        existing: Option<ThinVolume>,
        key: KeyFate,
    ) -> Result<DeleteAction, HostError> {
        let mut changed = false;
        let mut encrypted = true;
        // A hydrating volume's copy is cancelled (checked first: refused
        // with nothing changed when this host cannot).
        let hydration = match existing.as_ref().and_then(Self::migration_of) {
            Some(migration) => Some(self.hydration_site(id, migration)?),
            None => None,
        };
        if let Some(volume) = &existing {
            // Unknown encryption: treat as encrypted; erasing finds no
            // header of ours on a plain volume and does nothing.
            encrypted = progress::encryption(&volume.tags) != Some(Encryption::None);
            if progress::step(&volume.tags) != Some(Progress::Deleting) {
                let mut add = vec![progress::step_tag(Progress::Deleting)];
                if key == KeyFate::Keep {
                    add.push(progress::key_kept_tag());
                }
                self.retag(
                    id,
                    "step",
                    &add,
                    &progress::other_step_tags(Progress::Deleting),
                )?;
                changed = true;
                self.step(id, Step::MarkedDeleting)?;
            }
            let nodes = progress::nodes(&volume.tags);
            for (jail, _) in &nodes {
                match jail::unexpose(jail, id) {
                    Ok(removed) => changed |= removed.changed(),
                    // Our node was replaced by someone else's: theirs is
                    // not ours to remove, and ours is gone.
                    Err(JailError::Foreign { path, found, .. }) => {
                        tracing::warn!(volume = %id, node = %path.display(), %found,
                            "recorded node now holds something else; left alone");
                    }
                    Err(source) => {
                        return Err(HostError::Unexpose {
                            id: id.clone(),
                            source: Box::new(source),
                        })
                    }
                }
                self.step(id, Step::NodeRemoved)?;
            }
            if !nodes.is_empty() {
                let tags: Vec<String> = nodes.into_iter().map(|(_, tag)| tag).collect();
                self.retag(id, "node records", &[], &tags)?;
                self.step(id, Step::NodeForgotten)?;
            }
        }
        if let Some((site, tools)) = &hydration {
            // Before the mapping is touched: its I/O may be held behind a
            // copy that waits on a source that is gone.
            changed |= self.disconnect_hydration(id, site, tools)?;
        }
        changed |= self
            .devices
            .close_crypt(id)
            .map_err(failed_at!(CryptClose, id))?
            .changed();
        self.step(id, Step::CryptClosed)?;
        let mut existing = existing;
        if let Some((site, tools)) = &hydration {
            // Layer, nbd client, files, metadata LVs and the LV itself. The
            // header is not erased: it is a copy of the source volume's,
            // under the key that volume still has.
            self.cancel_hydration(id, site, tools)?;
            changed = true;
            existing = None;
        }
        if let Some(volume) = &existing {
            let lv_device = self.lv_device(id, volume)?;
            let restoring = progress::restored_from(&volume.tags).is_some();
            changed |= match self.devices.erase(&lv_device, id, encrypted) {
                // A restore that had not adopted its copy of the origin's
                // header yet: that header is the origin's, opened by the
                // origin's key, and not ours to erase; the LV goes anyway.
                Err(CryptError::ForeignHeader { .. }) if restoring => DeleteAction::Identity,
                erased => erased.map_err(failed_at!(CryptErase, id))?,
            }
            .changed();
            self.step(id, Step::HeaderErased)?;
            changed |= self
                .backend
                .remove_thin(&id.lv_name())
                .map_err(failed_at!(LvRemove, id))?
                .changed();
            self.step(id, Step::LvRemoved)?;
        }
        if key == KeyFate::Destroy {
            changed |= self.destroy_key(id)?;
        }
        if changed {
            tracing::info!(volume = %id, "deleted");
        }
        Ok(if changed {
            DeleteAction::Deleted
        } else {
            DeleteAction::Identity
        })
    }

    /// Deletes a volume and its key, nodes, mapping and LV; `Identity` if
    /// nothing of it is left. The VM using it must be stopped first
    /// (a mapping held open is reported as busy). A hydrating volume is
    /// marked `deleting` first, then its hydration cancelled
    /// ([`VolumeHost::with_migrations`]).
    pub fn delete(&self, id: &VolumeId) -> Result<DeleteAction, HostError> {
        let volume_lock = self.volume_lock(id);
        let _held = lock(&volume_lock);
        self.refuse_if_fenced(id)?;
        let existing = self.find(id)?;
        // Its snapshots first: they hold its data under its key, which the
        // teardown destroys.
        let _ = self.destroy_snapshots_of(id)?;
        self.teardown(id, existing, KeyFate::Destroy)
    }

    /// Opens a ready volume (after a host restart): activates the LV and
    /// opens the mapping. Returns the device a VM gets. A hydrating
    /// volume's is its mapping over the copying layer when that is up;
    /// after a restart it is not, and only `hydrate` can rebuild it
    /// ([`HostError::Hydrating`]).
    pub fn open(&self, id: &VolumeId) -> Result<PathBuf, HostError> {
        let volume_lock = self.volume_lock(id);
        let _held = lock(&volume_lock);
        self.refuse_if_fenced(id)?;
        Ok(self.usable_volume(id)?.1)
    }

    /// Closes a volume's mapping (the LV stays active). A mapping in use is
    /// reported as busy. A hydrating volume's is refused
    /// ([`HostError::HydrationUnfinished`]): its layer would go on copying
    /// under no mapping, and only `hydrate` could open it again.
    pub fn close(&self, id: &VolumeId) -> Result<DeleteAction, HostError> {
        let volume_lock = self.volume_lock(id);
        let _held = lock(&volume_lock);
        self.refuse_if_fenced(id)?;
        if let Some(volume) = self.find(id)? {
            if let Some(migration) = Self::migration_of(&volume) {
                return Err(HostError::HydrationUnfinished {
                    id: id.clone(),
                    migration,
                });
            }
        }
        let closed = self
            .devices
            .close_crypt(id)
            .map_err(failed_at!(CryptClose, id))?;
        self.step(id, Step::CryptClosed)?;
        Ok(closed)
    }

    fn ready_volume(&self, id: &VolumeId) -> Result<ThinVolume, HostError> {
        let volume = self
            .find(id)?
            .ok_or_else(|| HostError::NotFound { id: id.clone() })?;
        match Self::progress_of(id, &volume)? {
            Progress::Ready => Ok(volume),
            other => Err(Self::not_ready(id, &volume, other)),
        }
    }

    /// A volume a VM can use, and its final device, opened if needed: a
    /// ready one, or a hydrating one whose mapping is up.
    fn usable_volume(&self, id: &VolumeId) -> Result<(ThinVolume, PathBuf), HostError> {
        let volume = self
            .find(id)?
            .ok_or_else(|| HostError::NotFound { id: id.clone() })?;
        let device = match Self::progress_of(id, &volume)? {
            Progress::Ready => self.ensure_open(id, Self::encryption_of(id, &volume)?, &volume)?,
            Progress::Hydrating => self.hydrating_device(id, &volume)?,
            other => return Err(Self::not_ready(id, &volume, other)),
        };
        Ok((volume, device))
    }

    /// Exposes a ready volume's final device (opening it if needed), or a
    /// hydrating one's mapping, as a block node at `jail`, owned by
    /// `owner`. A stale node of ours is replaced; anything else at that
    /// path is refused.
    pub fn expose(
        &self,
        id: &VolumeId,
        jail: &JailPath,
        owner: NodeOwner,
    ) -> Result<CreateAction<ExposedNode>, HostError> {
        let volume_lock = self.volume_lock(id);
        let _held = lock(&volume_lock);
        self.refuse_if_fenced(id)?;
        let record = progress::node_tag(jail).ok_or_else(|| HostError::JailPathTooLong {
            id: id.clone(),
            path: jail.full(),
        })?;
        let (volume, device) = self.usable_volume(id)?;
        let rdev = self
            .devices
            .device_number(&device)
            .map_err(failed_at!(DeviceNumber, id))?;
        let recorded_now = !volume.tags.contains(&record);
        if recorded_now {
            // Recorded first: a node made after a crash is still found.
            self.retag_seen(
                id,
                "node record",
                &volume,
                std::slice::from_ref(&record),
                &[],
            )?;
        }
        let mut made_node = false;
        let exposed: Result<_, HostError> = (|| {
            self.step(id, Step::NodeRecorded)?;
            let exposed = jail::expose(jail, rdev, owner, id).map_err(failed_at!(Expose, id))?;
            made_node = exposed.changed();
            self.step(id, Step::NodeMade)?;
            Ok(exposed)
        })();
        let error = match exposed {
            Ok(exposed) => return Ok(exposed),
            Err(error) if error.is_crash() => return Err(error),
            Err(error) => error,
        };
        // jail::expose leaves nothing behind when it fails; a node it made
        // before a later step failed is ours and goes.
        let mut rollback = Ok(());
        if made_node {
            rollback = jail::unexpose(jail, id)
                .map(|_| ())
                .map_err(failed_at!(Unexpose, id));
        }
        if recorded_now && rollback.is_ok() {
            rollback = self.retag(id, "node record", &[], &[record]).map(|_| ());
        }
        match rollback {
            Ok(()) => Err(error),
            Err(rollback) => Err(HostError::RollbackFailed {
                error: Box::new(error),
                rollback: Box::new(rollback),
            }),
        }
    }

    /// Removes the node at `jail` if it is this volume's, and its record.
    pub fn unexpose(&self, id: &VolumeId, jail: &JailPath) -> Result<DeleteAction, HostError> {
        let volume_lock = self.volume_lock(id);
        let _held = lock(&volume_lock);
        let removed = jail::unexpose(jail, id).map_err(failed_at!(Unexpose, id))?;
        self.step(id, Step::NodeRemoved)?;
        if let (Some(volume), Some(record)) = (self.find(id)?, progress::node_tag(jail)) {
            if volume.tags.contains(&record) {
                self.retag(id, "node record", &[], &[record])?;
                self.step(id, Step::NodeForgotten)?;
                return Ok(DeleteAction::Deleted);
            }
        }
        Ok(removed)
    }

    /// Grows a ready volume to `size`: LV (after admission), mapping, and
    /// filesystem (unless a VM has it: see [`FsGrowth::LeftToGuest`], or
    /// anything else holds it open: [`FsGrowth::InUse`]).
    /// Re-running after a failure or crash completes the layers left.
    pub fn extend(&self, id: &VolumeId, size: Bytes) -> Result<ExtendOutcome, HostError> {
        let volume_lock = self.volume_lock(id);
        let _held = lock(&volume_lock);
        self.refuse_if_fenced(id)?;
        let volume = self.ready_volume(id)?;
        let encryption = Self::encryption_of(id, &volume)?;
        let lv = {
            let _pool = lock(&self.pool_lock);
            let status = self.read_pool()?;
            let target = round_to_extents(id, size, status.extent_size)?;
            if let Some(growth) = target.checked_sub(volume.virtual_size) {
                if growth > Bytes::ZERO {
                    status
                        .usage
                        .admit_growth(&self.policy, growth)
                        .map_err(|refusal| HostError::Admission {
                            id: id.clone(),
                            refusal,
                        })?;
                }
            }
            self.backend
                .extend_thin(&id.lv_name(), size)
                .map_err(failed_at!(LvExtend, id))?
        };
        self.step(id, Step::LvExtended)?;
        let (device, lower) = self.ensure_open_layers(id, encryption, &volume)?;
        if encryption == Encryption::Luks2 {
            self.devices
                .resize_crypt(id)
                .map_err(failed_at!(CryptResize, id))?;
            self.step(id, Step::CryptResized)?;
        }
        let filesystem = if progress::nodes(&volume.tags).is_empty() {
            match self
                .devices
                .grow_fs(&device, lower.as_deref())
                .map_err(failed_at!(FsGrow, id))?
            {
                GrowOutcome::Grown(grown) => {
                    self.step(id, Step::FsGrown)?;
                    FsGrowth::Grown(grown)
                }
                GrowOutcome::InUse(holders) => {
                    tracing::warn!(volume = %id, device = %device.display(), %holders,
                        "filesystem not grown: something holds the device open");
                    FsGrowth::InUse(holders)
                }
            }
        } else {
            FsGrowth::LeftToGuest
        };
        Ok(ExtendOutcome { lv, filesystem })
    }

    /// Every volume of ours in the pool: one LVM report, and one listing of
    /// the device-mapper devices when any volume is encrypted (a restart
    /// with 1,000 volumes costs two queries, not one per volume).
    pub fn list(&self) -> Result<Vec<LocalVolume>, HostError> {
        let volumes = self.backend.list_thins().map_err(HostError::List)?;
        let encrypted =
            |volume: &ThinVolume| progress::encryption(&volume.tags) == Some(Encryption::Luks2);
        let mappings = if volumes.iter().any(encrypted) {
            self.devices
                .crypt_mappings()
                .map_err(HostError::CryptList)?
        } else {
            Default::default()
        };
        Ok(volumes
            .iter()
            .filter_map(|volume| {
                let id = VolumeId::from_lv_name(&volume.lv)?;
                let device = if encrypted(volume) {
                    mappings.get(&id.crypt_name()).cloned()
                } else {
                    volume.device.clone()
                };
                Some(Self::local_volume(id, volume, device))
            })
            .collect())
    }

    pub fn pool_status(&self) -> Result<PoolStatus, HostError> {
        self.read_pool()
    }
}

//! The thin-pool backend: the one seam between volume orchestration and LVM.
//!
//! Two implementations share this trait and the checks in [`shared`]:
//! [`lvm::LvmBackend`] (liblvm2cmd, in process, on one dedicated thread) and
//! [`sim::SimBackend`] (in memory, for fast tests of the code above it).

pub mod lvm;
pub mod shared;
#[cfg(feature = "testing")]
pub mod sim;

use crate::actions::{CreateAction, DeleteAction, ExtendAction};
use crate::capacity::PoolUsage;
use crate::health::{PoolHealth, VolumeHealth};
use crate::names::{LvName, NameError, VgName};
use crate::pool_growth::{PoolGrowth, PoolPart};
use crate::units::{Bytes, ExtentSize, Percent, UnitError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// The VG and thin pool a backend manages, and the PVs they live on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinPoolSpec {
    pub vg: VgName,
    pub pool: LvName,
    /// Block devices for `pvcreate`/`vgcreate` when the VG does not exist.
    pub pvs: Vec<PathBuf>,
    /// Physical data size of the pool; `None` takes the VG's free space
    /// less room for metadata.
    pub data_size: Option<Bytes>,
    /// Thin-pool metadata size; `None` lets LVM choose.
    pub metadata_size: Option<Bytes>,
}

impl ThinPoolSpec {
    /// Checks what the names alone cannot: device-mapper names the pool
    /// `<vg>-<pool>` (with `-` doubled), which must stay under 128 bytes.
    pub fn new(vg: VgName, pool: LvName, pvs: Vec<PathBuf>) -> Result<ThinPoolSpec, NameError> {
        let dm_len = vg.as_str().len()
            + pool.as_str().len()
            + 1
            + vg.as_str().matches('-').count()
            + pool.as_str().matches('-').count();
        if dm_len > 127 {
            return Err(NameError {
                kind: "pool",
                value: format!("{vg}/{pool}"),
                reason: "VG and pool names together exceed device-mapper's 127-byte limit".into(),
            });
        }
        Ok(ThinPoolSpec {
            vg,
            pool,
            pvs,
            data_size: None,
            metadata_size: None,
        })
    }
}

/// A thin LV as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinVolume {
    pub lv: LvName,
    pub virtual_size: Bytes,
    /// Share of the virtual size backed by pool data.
    pub data_percent: Percent,
    pub tags: BTreeSet<String>,
    /// `/dev/<vg>/<lv>` when active.
    pub device: Option<PathBuf>,
    /// The thin target's own health, as LVM reports it.
    #[serde(default)]
    pub health: VolumeHealth,
}

/// How much of one thin LV the pool has allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinAllocation {
    pub lv: LvName,
    pub size: Bytes,
    /// Share of `size` backed by pool data (LVM's data%).
    pub allocated: Percent,
}

/// Pool state from one LVM report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub vg: VgName,
    pub pool: LvName,
    /// Usage and health (`usage.health`: the worse of LVM's report and the
    /// pool target's status line).
    pub usage: PoolUsage,
    pub extent_size: ExtentSize,
    /// Unallocated space left in the VG (room to grow the pool).
    pub vg_free: Bytes,
}

/// Whether a VG holds an LV of some name, as one report showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LvPresence {
    Absent,
    Present,
}

/// The pool's use and health as its own device-mapper target reports them:
/// what a watcher needs to decide whether anything must be done, without
/// an LVM command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolFill {
    /// Used shares of the data and metadata devices, rounded up to a
    /// hundredth of a percent (a decision must not see less than is used).
    pub data: Percent,
    pub metadata: Percent,
    pub health: PoolHealth,
}

/// One variant per failing step; each carries what an operator needs.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("`{command}` failed (status {status}): {}", lines_or_none(.errors))]
    Lvm {
        command: String,
        status: i32,
        errors: Vec<String>,
    },
    #[error("could not parse the report of `{command}`: {reason}")]
    Report { command: String, reason: String },
    #[error("LV {lv} exists with size {existing}, not the requested {requested}")]
    SizeMismatch {
        lv: LvName,
        existing: Bytes,
        requested: Bytes,
    },
    #[error("LV {lv} is {current}; shrinking to {requested} is refused")]
    Shrink {
        lv: LvName,
        current: Bytes,
        requested: Bytes,
    },
    #[error("LV {lv} does not exist in pool {pool}")]
    NotFound { lv: LvName, pool: LvName },
    #[error("LV {lv} exists but is not ours (no '{tag}' tag or not a thin LV in {pool}); refusing to touch it")]
    NotOurs {
        lv: LvName,
        pool: LvName,
        tag: &'static str,
    },
    #[error("VG {vg} exists but {reason}")]
    PoolMismatch { vg: VgName, reason: String },
    #[error("no physical volumes given to create VG {vg}")]
    NoPhysicalVolumes { vg: VgName },
    #[error("the LVM worker thread has stopped")]
    WorkerGone,
    #[error("could not start the LVM worker thread: {0}")]
    WorkerSpawn(std::io::Error),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(
        "a size of {} bytes cannot be rounded up to whole extents of {} bytes: {source}",
        size.0,
        extent.bytes().0
    )]
    NotRoundable {
        size: Bytes,
        extent: ExtentSize,
        #[source]
        source: UnitError,
    },
    #[error(transparent)]
    Unit(#[from] UnitError),
    #[error("device-mapper status of {device}: {reason}")]
    DeviceMapper { device: String, reason: String },
}

fn lines_or_none(lines: &[String]) -> String {
    if lines.is_empty() {
        "no error output".to_owned()
    } else {
        lines.join("; ")
    }
}

/// What a thin snapshot of one of our LVs is made as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinCopy {
    /// A kept snapshot: read-only, with LVM's activation skip set and not
    /// activated, so it holds no device-mapper device and nothing can
    /// write to it.
    Snapshot,
    /// A new volume from a snapshot (a restore): writable, activation skip
    /// cleared, and active.
    Volume,
}

/// What the volume layer needs from a thin pool. All methods are idempotent.
pub trait ThinBackend: Send + Sync {
    /// The pool this backend manages.
    fn spec(&self) -> &ThinPoolSpec;

    /// Makes the PVs, VG and thin pool if missing; activates them if not.
    fn ensure_pool(&self) -> Result<CreateAction<PoolStatus>, BackendError>;

    fn pool_status(&self) -> Result<PoolStatus, BackendError>;

    /// The pool's status, and whether the VG holds an LV named `lv` (ours
    /// or not), from the one reading an admission needs: a create of a new
    /// name needs no report of its LV. By default, the status and a report
    /// of that LV.
    fn pool_status_and_lv(&self, lv: &LvName) -> Result<(PoolStatus, LvPresence), BackendError> {
        let status = self.pool_status()?;
        let presence = match self.thin(lv)? {
            Some(_) => LvPresence::Present,
            None => LvPresence::Absent,
        };
        Ok((status, presence))
    }

    /// The pool's use and health, as often as a caller likes: where the
    /// backend can, from device-mapper's own status, with no LVM command
    /// and no wait on one. `None` when it cannot be read so (no working
    /// pool target): [`ThinBackend::pool_status`] says why. By default,
    /// from the pool's status.
    fn pool_fill(&self) -> Result<Option<PoolFill>, BackendError> {
        let usage = self.pool_status()?.usage;
        Ok(Some(PoolFill {
            data: usage.data_percent(),
            metadata: usage.metadata_percent(),
            health: usage.health,
        }))
    }

    /// Creates an active thin LV carrying [`crate::names::OWNER_TAG`] plus
    /// `tags`. Same name and same (extent-rounded) size is `Identity`; a
    /// different size is [`BackendError::SizeMismatch`].
    fn create_thin(
        &self,
        lv: &LvName,
        size: Bytes,
        tags: &[String],
    ) -> Result<CreateAction<ThinVolume>, BackendError>;

    /// Removes one of our thin LVs; a missing LV is `Identity`.
    fn remove_thin(&self, lv: &LvName) -> Result<DeleteAction, BackendError>;

    /// Grows one of our thin LVs; the same size is `Identity`, smaller is refused.
    fn extend_thin(&self, lv: &LvName, size: Bytes) -> Result<ExtendAction, BackendError>;

    /// Our thin LVs in the pool (never foreign ones), from one report.
    fn list_thins(&self) -> Result<Vec<ThinVolume>, BackendError>;

    /// One of our thin LVs by name (`None` when there is none, or it is not
    /// ours), from a report of that LV alone: its cost does not grow with
    /// the number of volumes in the pool.
    fn thin(&self, lv: &LvName) -> Result<Option<ThinVolume>, BackendError>;

    /// Our thin LVs in the pool carrying `tag`, from a report of those
    /// alone (LVM's `@tag` argument): like [`ThinBackend::thin`], its cost
    /// does not grow with the number of other volumes in the pool.
    fn tagged(&self, tag: &str) -> Result<Vec<ThinVolume>, BackendError>;

    /// Adds and removes tags on one of our LVs, in one LVM command. Returns
    /// the LV as it is after the change.
    fn retag(
        &self,
        lv: &LvName,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, BackendError>;

    /// [`ThinBackend::retag`] of an LV the caller read moments ago, under
    /// the locks that keep every other change of it out: the one LVM
    /// command, no report. Returns `seen` with its tags changed.
    fn retag_seen(
        &self,
        seen: &ThinVolume,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, BackendError>;

    /// Activates one of our LVs (after a host restart) and returns its device.
    fn activate_thin(&self, lv: &LvName) -> Result<PathBuf, BackendError>;

    /// Makes `copy`, a thin snapshot of our thin LV `origin` in the same pool,
    /// carrying [`crate::names::OWNER_TAG`] plus `tags` (LVM copies no tags
    /// from the origin). Metadata only, in constant time whatever was
    /// written. LVM suspends an active origin around the pool's
    /// `create_snap` message and resumes it, so every write completed
    /// before is in the copy and none is torn. An LV of ours already named
    /// `copy` is `Identity` (names are random ids: the same request).
    fn snapshot_thin(
        &self,
        origin: &LvName,
        copy: &LvName,
        kind: ThinCopy,
        tags: &[String],
    ) -> Result<CreateAction<ThinVolume>, BackendError>;

    /// Grows the pool's data or metadata by `by` (rounded up to extents),
    /// or by what the VG has free if that is less. Not one extent free is
    /// [`PoolGrowth::VgFull`], not an error: the caller contains the pool.
    fn grow_pool(&self, part: PoolPart, by: Bytes) -> Result<PoolGrowth, BackendError>;

    /// The allocated share of each of `lvs` that is active (others are
    /// left out), as often as a caller likes: where the backend can, from
    /// device-mapper's own counters, with no LVM command and no wait on
    /// one. By default, from one listing.
    fn thin_allocations(&self, lvs: &[LvName]) -> Result<Vec<ThinAllocation>, BackendError> {
        Ok(self
            .list_thins()?
            .into_iter()
            .filter(|volume| volume.device.is_some() && lvs.contains(&volume.lv))
            .map(|volume| ThinAllocation {
                lv: volume.lv,
                size: volume.virtual_size,
                allocated: volume.data_percent,
            })
            .collect())
    }
}

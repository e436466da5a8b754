//! The LVM backend: LVM2 thin pools through liblvm2cmd, in process, on one
//! dedicated thread ([`runner`]), reading LVM's JSON reports ([`report`]).
//!
//! Every method reads with at most one report, decides with
//! [`super::shared`] exactly as the simulator does, and only then runs at
//! most a few changing commands. Methods about one LV report that LV (and
//! the pool row) alone, `lvs <vg>/<pool> <vg>/<lv>`, so LVM queries the
//! kernel for those devices only; `pool_status`, `list_thins` and
//! `ensure_pool` read every LV. `create_thin` goes straight to `lvcreate`
//! and reads only when that fails. Foreign LVs are read (their virtual size
//! counts against the pool) but never changed.

pub mod kernel;
pub mod report;
pub mod runner;

use self::report::{LvKind, LvRecord, VgRecord};
use self::runner::{CommandLine, CommandLineBuilder, LvmRunner};
use super::shared::{self, FoundLv};
use super::{
    BackendError, LvPresence, PoolFill, PoolStatus, ThinAllocation, ThinBackend, ThinCopy,
    ThinPoolSpec, ThinVolume,
};
use crate::actions::{CreateAction, DeleteAction, ExtendAction};
use crate::capacity::PoolUsage;
use crate::health::VolumeHealth;
use crate::names::{LvName, NameError, OWNER_TAG};
use crate::pool_growth::{self, PoolGrowth, PoolPart};
use crate::units::{Bytes, Percent, Sectors, SECTOR_SIZE};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

/// LVM's memory locking around device suspends, set for a daemon. While it
/// suspends a device, LVM touches `reserved_memory` (8 MiB by default),
/// then `mlock`s every readable mapping of the process, so that nothing it
/// needs must be read back from a device it suspended; after the `munlock`
/// every page stays resident. In volumed that kept 91 MiB resident during
/// a burst of creates (`VmLck` 90.7 MiB): volumed's and its libraries' file
/// pages, every malloc arena and thread stack in full, LVM's own 8 MiB
/// block cache, the reserve. None of it can come from a suspended device:
/// volumed's files live on the root filesystem and its anonymous memory in
/// RAM or swap, never in the thin pool volumed owns (the only thing it
/// suspends; its volumes belong to VMs). So LVM is told to lock nothing,
/// as `reserved_memory=0` says from LVM 2.03.27 on:
/// - `mlock_filter=["/","00:00"]`: skip file-backed mappings (their lines
///   name a path) and anonymous ones (device `00:00`, which no file-backed
///   mapping has); LVM matches each entry as a substring of the maps line
///   after its permissions, and no entry may hold a space (see
///   `CommandLineBuilder::config`).
/// - `reserved_memory=0`: LVM touches no reserve of malloc'd memory
///   before a suspend. (It still touches a fixed 2 MB buffer and
///   `reserved_stack`, lib/mm/memlock.c `_allocate_memory`.)
pub const MEMLOCK_SETTINGS: &str =
    r#"activation{mlock_filter=["/","00:00"]}activation{reserved_memory=0}"#;

/// No D-Bus notice after a change. With `global/notify_dbus` on (LVM's
/// default), every command that changed metadata opens a new system-bus
/// connection and calls lvmdbusd's `ExternalEvent`, waiting for the reply
/// (tools/lvmcmdline.c, lib/notify/lvmnotify.c): a round trip per change on
/// any host running D-Bus, which can also start lvmdbusd by bus activation,
/// and sd-bus code paged in for it. The notice only tells lvmdbusd to
/// re-read LVM; volumed's volumes are managed through volumed, and
/// lvmdbusd, if it runs, still sees the changes by its udev events. Every
/// command carries it, reports too: in process, a change leaves its
/// notice pending in LVM's command context when the setting is off, and
/// the next command to run with it on sends it.
pub const NO_DBUS_NOTICE: &str = "global{notify_dbus=0}";

/// LVM's metadata archive kept to its newest `backup/retain_min` copies
/// (10 by default). With `archive` on (LVM's default), every change first
/// writes the VG's whole metadata to a new file in the archive directory,
/// and keeps every file younger than `retain_days` (30): a few changes per
/// volume made it grow without bound on a busy host (81 KB a copy at 200
/// thin LVs, in /etc), while each change also lists and sorts the whole
/// directory (lib/format_text/archive.c). `retain_days=0` leaves only the
/// count: the newest copies stay for `vgcfgrestore`, alongside the copies
/// LVM keeps in the PV's own metadata area. Whether LVM archives at all
/// stays as lvm.conf says.
pub const BOUNDED_ARCHIVE: &str = "backup{retain_days=0}";

/// A thin pool managed through liblvm2cmd.
#[derive(Debug)]
pub struct LvmBackend {
    spec: ThinPoolSpec,
    runner: LvmRunner,
    /// Each trait call reads, decides and changes as one step, as the
    /// simulator does under its lock; LVM's own locks cover other processes.
    operation: Mutex<()>,
    /// The pool table's `low_water_mark`, as a used share in whole percent
    /// (0: LVM's default, no mark). See [`LvmBackend::set_low_water`].
    low_water: AtomicU32,
    /// The VG's extent size in bytes and LVM's device directory for its
    /// LVs, from the last report that showed them (0 / `None`: not seen
    /// yet). They let a create go straight to `lvcreate`, without a report
    /// first; `vgchange -s` can change the extent size, so a create that
    /// fails re-reads before deciding.
    extent_bytes: std::sync::atomic::AtomicU64,
    lv_dir: Mutex<Option<PathBuf>>,
}

impl LvmBackend {
    /// Joins (or starts) the process's LVM worker thread. Touches no device:
    /// call [`ThinBackend::ensure_pool`] to make or check the pool.
    pub fn start(spec: ThinPoolSpec) -> Result<LvmBackend, BackendError> {
        Ok(LvmBackend {
            spec,
            runner: LvmRunner::start()?,
            operation: Mutex::new(()),
            low_water: AtomicU32::new(0),
            extent_bytes: std::sync::atomic::AtomicU64::new(0),
            lv_dir: Mutex::new(None),
        })
    }

    /// Makes every pool table LVM loads from now on carry a
    /// `low_water_mark` at `threshold` used, so the kernel raises a
    /// device-mapper event when data use crosses it. LVM computes the mark
    /// from `activation/thin_pool_autoextend_threshold` whenever it loads
    /// the table (creation, activation, every extension) and leaves it at 0
    /// without that setting, so each changing command carries it.
    pub fn set_low_water(&self, threshold: Percent) {
        let whole = threshold.hundredths() / 100;
        let whole = if (50..100).contains(&whole) { whole } else { 0 };
        self.low_water.store(whole, Ordering::Relaxed);
    }

    /// Adds what the pool target itself says (`needs_check` is only there)
    /// to LVM's reading. A status that cannot be read leaves LVM's reading
    /// as it is: LVM read the same target moments ago.
    fn with_kernel_health(&self, mut status: PoolStatus) -> PoolStatus {
        if let Ok(Some(health)) =
            kernel::pool_health(self.spec.vg.as_str(), self.spec.pool.as_str())
        {
            status.usage.health = status.usage.health.worst(health);
        }
        status
    }

    /// The pool's use and health from its own target, and the sizes from a
    /// report of [`report::SIZE_FIELDS`]: LVM queries no thin LV's device
    /// for it, where a full report queries every active one (measured in
    /// the micro-VM at 100 active thin LVs, in process: 856, 587 and 428 ms
    /// against 1161, 889 and 680 ms for the full report, three rounds).
    /// `None` when the target is not a working pool: then the full report
    /// says why.
    fn pool_status_from_target(&self) -> Result<Option<(PoolStatus, VgView)>, BackendError> {
        let (vg, pool_name) = (self.spec.vg.as_str(), self.spec.pool.as_str());
        let Ok(Some(target)) = kernel::pool_target(vg, pool_name) else {
            return Ok(None);
        };
        let line = report_command("lvs")
            .args(["-o", report::SIZE_FIELDS, vg])
            .build()?;
        let output = self.runner.run(&line)?;
        let rows =
            report::parse_size_report(&output.report).map_err(|err| BackendError::Report {
                command: line.to_string(),
                reason: err.to_string(),
            })?;
        let view = VgView { rows, line };
        self.remember(&view);
        let Some(pool) = view.pool(&self.spec)? else {
            return Ok(None);
        };
        let mut pool = pool.clone();
        pool.active = true;
        pool.data_percent = Some(target.data);
        pool.metadata_percent = Some(target.metadata);
        let mut status = view.status(&self.spec, &pool)?;
        status.usage.health = status.usage.health.worst(target.health);
        Ok(Some((status, view)))
    }

    /// The pool's status and the report it came from (whose rows name
    /// every LV of the VG).
    fn pool_reading(&self) -> Result<(PoolStatus, VgView), BackendError> {
        let _operation = self.lock();
        if let Some(reading) = self.pool_status_from_target()? {
            return Ok(reading);
        }
        let view = self.read_vg()?;
        let pool = view.pool(&self.spec)?.ok_or_else(|| self.pool_missing())?;
        let status = self.with_kernel_health(view.status(&self.spec, pool)?);
        Ok((status, view))
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded data is `()`; a panic elsewhere leaves nothing broken.
        self.operation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every visible LV of our VG, one report.
    fn read_vg(&self) -> Result<VgView, BackendError> {
        let line = report_command("lvs")
            .args(["-o", report::LV_FIELDS, self.spec.vg.as_str()])
            .build()?;
        let output = self.runner.run(&line)?;
        self.view_of(line, &output.report)
    }

    /// Only the named LVs of our VG, one report. LVM reads the VG's
    /// metadata either way, but queries the kernel only for these, so the
    /// cost stays flat as the pool fills. A name that does not exist is
    /// left out (LVM reports the others and fails for it alone).
    fn read_named(&self, names: &[&str]) -> Result<VgView, BackendError> {
        let vg = self.spec.vg.as_str();
        let line = report_command("lvs")
            .args(["-o", report::LV_FIELDS])
            .args(names.iter().map(|name| format!("{vg}/{name}")))
            .build()?;
        let missing: Vec<String> = names
            .iter()
            .map(|name| format!("Failed to find logical volume \"{vg}/{name}\""))
            .collect();
        let output = self
            .runner
            .run_tolerating(&line, |error| missing.iter().any(|m| m == error))?;
        self.view_of(line, &output.report)
    }

    fn view_of(&self, line: CommandLine, report: &str) -> Result<VgView, BackendError> {
        let rows = report::parse_lv_report(report).map_err(|err| BackendError::Report {
            command: line.to_string(),
            reason: err.to_string(),
        })?;
        let view = VgView { rows, line };
        self.remember(&view);
        Ok(view)
    }

    /// Keeps what every row of the VG says alike (see `extent_bytes`).
    fn remember(&self, view: &VgView) {
        if let Some(row) = view.rows.first() {
            self.extent_bytes
                .store(row.extent_size.bytes().0, Ordering::Relaxed);
        }
        if let Some(dir) = view.lv_dir() {
            *self
                .lv_dir
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(dir);
        }
    }

    /// Where a new LV's device appears, as [`VgView::device_of`] would say.
    fn device_of(&self, lv: &LvName) -> PathBuf {
        let dir = self
            .lv_dir
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        dir.map(|dir| dir.join(lv.as_str()))
            .unwrap_or_else(|| PathBuf::from(format!("/dev/{}/{}", self.spec.vg, lv)))
    }

    /// The LV `lvcreate` just made, active and empty.
    /// One `lvchange` of `volume`'s tags, and the same change to `volume`.
    fn change_tags(
        &self,
        volume: &mut ThinVolume,
        add: &[String],
        remove: &[String],
    ) -> Result<(), BackendError> {
        let mut line = CommandLine::command("lvchange").arg("-qq");
        for tag in add {
            line = line.args(["--addtag", tag.as_str()]);
        }
        for tag in remove {
            line = line.args(["--deltag", tag.as_str()]);
        }
        self.change(line.arg(self.vg_lv(volume.lv.as_str())))?;
        for tag in remove {
            volume.tags.remove(tag);
        }
        volume.tags.extend(add.iter().cloned());
        Ok(())
    }

    fn new_thin(&self, lv: &LvName, size: Bytes, tags: BTreeSet<String>) -> ThinVolume {
        ThinVolume {
            lv: lv.clone(),
            virtual_size: size,
            data_percent: Percent::ZERO,
            tags,
            device: Some(self.device_of(lv)),
            health: VolumeHealth::Healthy,
        }
    }

    fn cached_extent(&self) -> Option<crate::units::ExtentSize> {
        match self.extent_bytes.load(Ordering::Relaxed) {
            0 => None,
            bytes => crate::units::ExtentSize::new(Bytes(bytes)).ok(),
        }
    }

    /// Every VG on the host, one report; a missing VG is not an error here.
    fn read_vgs(&self) -> Result<Vec<VgRecord>, BackendError> {
        let line = report_command("vgs")
            .args(["-o", report::VG_FIELDS])
            .build()?;
        let output = self.runner.run(&line)?;
        report::parse_vg_report(&output.report).map_err(|err| BackendError::Report {
            command: line.to_string(),
            reason: err.to_string(),
        })
    }

    /// Runs a command that changes LVM state, with [`MEMLOCK_SETTINGS`],
    /// [`NO_DBUS_NOTICE`], [`BOUNDED_ARCHIVE`] and the low-water threshold.
    fn change(&self, line: CommandLineBuilder) -> Result<(), BackendError> {
        let low_water = self.low_water.load(Ordering::Relaxed);
        let mut config =
            format!("{SKIP_FENCEABLE}{MEMLOCK_SETTINGS}{NO_DBUS_NOTICE}{BOUNDED_ARCHIVE}");
        if low_water != 0 {
            config.push_str(&format!(
                "activation{{thin_pool_autoextend_threshold={low_water}}}"
            ));
        }
        let line = line.config(config).build()?;
        self.runner.run(&line)?;
        tracing::info!(command = %line, "LVM changed");
        Ok(())
    }

    /// Whether I/O to a full pool should fail at once rather than queue.
    /// Error at once unless the pool auto-extends and the VG has room:
    /// then a writer that outruns a growth waits for it (up to the
    /// kernel's `no_space_timeout`) instead of failing. Without growth,
    /// nothing would ever free a full pool, and queued I/O would hang
    /// every guest on it.
    fn errors_when_full_wanted(&self, vg_free: Bytes) -> bool {
        self.low_water.load(Ordering::Relaxed) == 0 || vg_free == Bytes::ZERO
    }

    fn set_errors_when_full(&self, pool: &LvRecord, wanted: bool) -> Result<(), BackendError> {
        if pool.errors_when_full == Some(wanted) {
            return Ok(());
        }
        self.change(CommandLine::command("lvchange").args([
            "-qq",
            "--errorwhenfull",
            if wanted { "y" } else { "n" },
            &self.vg_lv(self.spec.pool.as_str()),
        ]))
    }

    fn vg_lv(&self, lv: &str) -> String {
        format!("{}/{}", self.spec.vg, lv)
    }

    fn pool_missing(&self) -> BackendError {
        BackendError::PoolMismatch {
            vg: self.spec.vg.clone(),
            reason: format!("thin pool {} does not exist yet", self.spec.pool),
        }
    }

    fn not_found(&self, lv: &LvName) -> BackendError {
        BackendError::NotFound {
            lv: lv.clone(),
            pool: self.spec.pool.clone(),
        }
    }

    /// `lvcreate --type thin-pool` for the spec.
    fn create_pool(&self) -> Result<(), BackendError> {
        let mut line = CommandLine::command("lvcreate").args(["-qq", "--type", "thin-pool"]);
        line = match self.spec.data_size {
            Some(size) => line.args(["--size".into(), size_arg(size)?]),
            // LVM subtracts room for the metadata LV and its spare itself
            // when the size is a share of free space (tools/lvcreate.c).
            None => line.args(["--extents", "100%FREE"]),
        };
        if let Some(size) = self.spec.metadata_size {
            line = line.args(["--poolmetadatasize".into(), size_arg(size)?]);
        }
        // Zeroing stays on whatever lvm.conf says: volumes go to different
        // tenants, and without it a fresh volume can read blocks a deleted
        // one left behind. (It also spares lvcreate a signature wipe per
        // thin LV.)
        // Discards pass down explicitly rather than by lvm.conf's
        // `thin_pool_discards`: with `ignore`, a guest's `fstrim` would
        // return nothing to the pool. (A data device that cannot discard
        // makes the kernel fall back to `nopassdown`, which still frees the
        // pool's blocks.)
        line = line.args(["--zero", "y", "--discards", "passdown", "--activate", "y"]);
        self.change(line.args(["--name", self.spec.pool.as_str(), self.spec.vg.as_str()]))
    }
}

/// Every command leaves our volumes' devices out of its scan for PVs
/// (they never hold one): a fenced volume's top device is suspended (see
/// `crate::fence`), and LVM's scan would read it and wait for its resume,
/// holding the process's one LVM thread. A filter, not
/// `ignore_suspended_devices`: measured in the micro-VM, that setting
/// keeps a separate `lvs` from waiting but not a command run in process,
/// where LVM restores its earlier value when `--config` rebuilds the
/// filters. The patterns match the dm-crypt mappings (`/dev/mapper/
/// vmv1-crypt-…`) and the thin LVs (`/dev/<vg>/vmv1-vol_…`,
/// `/dev/mapper/<vg>-vmv1--vol_…`, for hosts with `scan_lvs=1`), and a
/// hydrating volume's network devices: the kernel's nbd devices and the
/// copying layer (`/dev/mapper/vmv1-hydrate-…`), whose reads of blocks not
/// yet copied wait while the source is away (`crate::migrate`). This
/// replaces a `global_filter` set in lvm.conf for our commands. (One
/// `--config` word: LVM takes the option once.)
pub const SKIP_FENCEABLE: &str = r#"devices{global_filter=["r|/vmv1-crypt-|","r|/vmv1-vol_|","r|-vmv1--vol_|","r|^/dev/nbd|","r|/vmv1-hydrate-|"]}"#;

/// A report command with the format every parser here expects, and no
/// D-Bus notice ([`NO_DBUS_NOTICE`]).
fn report_command(command: &str) -> CommandLineBuilder {
    CommandLine::command(command)
        .args(["--reportformat", "json", "--units", "b", "--nosuffix"])
        .config(format!("{SKIP_FENCEABLE}{NO_DBUS_NOTICE}"))
}

/// A size in bytes as LVM takes it (`<n>b`); LVM refuses sizes that are not
/// whole sectors, so round up to one.
fn size_arg(size: Bytes) -> Result<String, BackendError> {
    let size = size.round_up_to(Bytes(SECTOR_SIZE))?;
    Ok(format!("{}b", size.0))
}

/// `lvcreate` of an active thin LV carrying `tags`, all in the one
/// metadata commit.
fn lvcreate_line(
    spec: &ThinPoolSpec,
    lv: &LvName,
    size: Bytes,
    tags: &BTreeSet<String>,
) -> Result<CommandLineBuilder, BackendError> {
    let mut line = CommandLine::command("lvcreate").args([
        "-qq".into(),
        "--type".into(),
        "thin".into(),
        "--virtualsize".into(),
        size_arg(size)?,
        "--thinpool".into(),
        spec.pool.to_string(),
        "--name".into(),
        lv.to_string(),
        "--activate".into(),
        "y".into(),
    ]);
    for tag in tags {
        line = line.args(["--addtag", tag.as_str()]);
    }
    Ok(line.arg(spec.vg.as_str()))
}

/// `share` of `whole`, rounded down.
/// One `lvs` report of our VG and the decisions read off it.
struct VgView {
    rows: Vec<LvRecord>,
    line: CommandLine,
}

impl VgView {
    fn named(&self, name: &str) -> Option<&LvRecord> {
        self.rows.iter().find(|row| row.name == name)
    }

    fn report_error(&self, row: &LvRecord, reason: impl Into<String>) -> BackendError {
        BackendError::Report {
            command: self.line.to_string(),
            reason: format!("row {}/{}: {}", row.vg, row.name, reason.into()),
        }
    }

    fn pool(&self, spec: &ThinPoolSpec) -> Result<Option<&LvRecord>, BackendError> {
        match self.named(spec.pool.as_str()) {
            None => Ok(None),
            Some(row) if row.kind == LvKind::ThinPool => Ok(Some(row)),
            Some(row) => Err(BackendError::PoolMismatch {
                vg: spec.vg.clone(),
                reason: format!(
                    "its LV {} is not a thin pool (layout {:?})",
                    row.name, row.layout
                ),
            }),
        }
    }

    /// The thin LVs in our pool, ours or not.
    fn thins<'a>(&'a self, spec: &'a ThinPoolSpec) -> impl Iterator<Item = &'a LvRecord> + 'a {
        self.rows.iter().filter(move |row| {
            row.kind == LvKind::Thin && row.pool.as_deref() == Some(spec.pool.as_str())
        })
    }

    fn thin_volume(&self, row: &LvRecord, lv: LvName) -> Result<ThinVolume, BackendError> {
        // An inactive thin LV has no data% (LVM reads it from the kernel);
        // nothing of it is in use by a guest, so 0 is what callers need.
        let data_percent = match (row.data_percent, row.active, row.kind) {
            (Some(percent), _, _) => percent,
            (None, true, LvKind::Thin) => {
                return Err(self.report_error(row, "active thin LV without data_percent"))
            }
            (None, _, _) => Percent::ZERO,
        };
        Ok(ThinVolume {
            lv,
            virtual_size: row.size,
            data_percent,
            tags: row.tags.clone(),
            device: if row.active { row.path.clone() } else { None },
            health: row.volume_health(),
        })
    }

    /// The LV called `lv`, whoever made it.
    fn find(&self, lv: &LvName) -> Result<Option<FoundLv>, BackendError> {
        let Some(row) = self.named(lv.as_str()) else {
            return Ok(None);
        };
        let pool = match row.kind {
            LvKind::Thin => row.pool.as_deref().and_then(|p| LvName::new(p).ok()),
            LvKind::ThinPool | LvKind::Other => None,
        };
        Ok(Some(FoundLv {
            volume: self.thin_volume(row, lv.clone())?,
            pool,
        }))
    }

    fn status(&self, spec: &ThinPoolSpec, pool: &LvRecord) -> Result<PoolStatus, BackendError> {
        if !pool.active {
            return Err(BackendError::PoolMismatch {
                vg: spec.vg.clone(),
                reason: format!(
                    "thin pool {} is not active, so LVM cannot report its usage",
                    spec.pool
                ),
            });
        }
        let data_percent = pool
            .data_percent
            .ok_or_else(|| self.report_error(pool, "active thin pool without data_percent"))?;
        let metadata_percent = pool
            .metadata_percent
            .ok_or_else(|| self.report_error(pool, "active thin pool without metadata_percent"))?;
        let metadata_size = pool
            .metadata_size
            .ok_or_else(|| self.report_error(pool, "thin pool without lv_metadata_size"))?;
        let (provisioned, volume_count) = self
            .thins(spec)
            .fold((Bytes::ZERO, 0u32), |(sum, count), row| {
                (sum + row.size, count + 1)
            });
        Ok(PoolStatus {
            vg: spec.vg.clone(),
            pool: spec.pool.clone(),
            usage: PoolUsage {
                data_size: pool.size,
                data_used: data_percent.of(pool.size),
                metadata_size,
                metadata_used: metadata_percent.of(metadata_size),
                provisioned,
                volume_count,
                health: pool.pool_health(),
            },
            extent_size: pool.extent_size,
            vg_free: pool.vg_free,
        })
    }

    /// Where LVM puts the LVs' device nodes, if a row shows one (this
    /// follows LVM's configured device directory; a thin pool has none).
    fn lv_dir(&self) -> Option<PathBuf> {
        self.rows
            .iter()
            .find_map(|row| Some(row.path.as_deref()?.parent()?.to_owned()))
    }

    /// Where LVM puts an LV's device node: beside the other LVs'.
    #[cfg(test)]
    fn device_of(&self, spec: &ThinPoolSpec, lv: &LvName) -> PathBuf {
        self.lv_dir()
            .map(|dir| dir.join(lv.as_str()))
            .unwrap_or_else(|| PathBuf::from(format!("/dev/{}/{}", spec.vg, lv)))
    }
}

impl ThinBackend for LvmBackend {
    fn spec(&self) -> &ThinPoolSpec {
        &self.spec
    }

    /// From each thin target's status: no LVM command, and no wait on
    /// the operation lock, so a frequent check never delays a pool growth.
    fn thin_allocations(&self, lvs: &[LvName]) -> Result<Vec<ThinAllocation>, BackendError> {
        let mut found = Vec::new();
        for lv in lvs {
            let mapped =
                kernel::thin_mapped(self.spec.vg.as_str(), lv.as_str()).map_err(|reason| {
                    BackendError::DeviceMapper {
                        device: kernel::dm_name(self.spec.vg.as_str(), lv.as_str()),
                        reason,
                    }
                })?;
            if let Some((mapped, length)) = mapped {
                let size = Sectors(length).to_bytes()?;
                found.push(ThinAllocation {
                    lv: lv.clone(),
                    size,
                    allocated: Sectors(mapped).to_bytes()?.percent_of(size),
                });
            }
        }
        Ok(found)
    }

    fn ensure_pool(&self) -> Result<CreateAction<PoolStatus>, BackendError> {
        let _operation = self.lock();
        let spec = &self.spec;
        let vg_exists = self
            .read_vgs()?
            .iter()
            .any(|vg| vg.name == spec.vg.as_str());
        let mut created = false;
        if !vg_exists {
            if spec.pvs.is_empty() {
                return Err(BackendError::NoPhysicalVolumes {
                    vg: spec.vg.clone(),
                });
            }
            let pvs = spec
                .pvs
                .iter()
                .map(|pv| {
                    pv.to_str().map(str::to_owned).ok_or_else(|| {
                        BackendError::Name(NameError {
                            kind: "PV path",
                            value: pv.display().to_string(),
                            reason: "not valid UTF-8".into(),
                        })
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            // vgcreate initialises devices that are not PVs yet (an implicit
            // pvcreate) and takes PVs left by an earlier, interrupted run,
            // so one command covers both. -qq answers "no" to every prompt:
            // a device with a filesystem or other signature is refused, not
            // wiped.
            self.change(
                CommandLine::command("vgcreate")
                    .args(["-qq", spec.vg.as_str()])
                    .args(pvs),
            )?;
            created = true;
        }

        // A new VG has no LVs: no need to look.
        let mut view = if created { None } else { Some(self.read_vg()?) };
        let pool_active = match &view {
            Some(view) => view.pool(spec)?.map(|pool| pool.active),
            None => None,
        };
        match pool_active {
            None => {
                self.create_pool()?;
                created = true;
                view = None;
            }
            Some(false) => {
                self.change(CommandLine::command("lvchange").args([
                    "-qq",
                    "--activate",
                    "y",
                    &self.vg_lv(spec.pool.as_str()),
                ]))?;
                view = None;
            }
            Some(true) => {}
        }

        let view = match view {
            Some(view) => view,
            None => self.read_vg()?,
        };
        let pool = view.pool(spec)?.ok_or_else(|| self.pool_missing())?;
        // lvcreate of LVM 2.03.16 rejects --errorwhenfull for thin pools
        // ("unsupported with thin pools"), so it is set here, which also
        // brings a pool made by an interrupted earlier run into line.
        self.set_errors_when_full(pool, self.errors_when_full_wanted(pool.vg_free))?;
        // Neither activation nor --errorwhenfull makes a pool.
        let status = self.with_kernel_health(view.status(spec, pool)?);
        Ok(if created {
            CreateAction::Created(status)
        } else {
            CreateAction::Identity(status)
        })
    }

    fn pool_status(&self) -> Result<PoolStatus, BackendError> {
        Ok(self.pool_reading()?.0)
    }

    fn pool_status_and_lv(&self, lv: &LvName) -> Result<(PoolStatus, LvPresence), BackendError> {
        let (status, view) = self.pool_reading()?;
        let presence = match view.named(lv.as_str()) {
            Some(_) => LvPresence::Present,
            None => LvPresence::Absent,
        };
        Ok((status, presence))
    }

    fn pool_fill(&self) -> Result<Option<PoolFill>, BackendError> {
        // No operation lock: a device-mapper status, not an LVM command.
        Ok(kernel::pool_target(self.spec.vg.as_str(), self.spec.pool.as_str()).unwrap_or(None))
    }

    fn create_thin(
        &self,
        lv: &LvName,
        size: Bytes,
        tags: &[String],
    ) -> Result<CreateAction<ThinVolume>, BackendError> {
        shared::check_create_inputs(lv, size, tags)?;
        let _operation = self.lock();
        let mut all_tags: BTreeSet<String> = tags.iter().cloned().collect();
        all_tags.insert(OWNER_TAG.to_owned());
        // A create is nearly always of a name that does not exist yet, and
        // LVM refuses a name that does: so go straight to lvcreate, and
        // read only when it fails, to tell identity, a size mismatch or a
        // foreign LV from LVM's own error.
        let first_try = match self.cached_extent() {
            Some(extent) => {
                let size = shared::round_to_extents(size, extent)?;
                match self.change(lvcreate_line(&self.spec, lv, size, &all_tags)?) {
                    Ok(()) => return Ok(CreateAction::Created(self.new_thin(lv, size, all_tags))),
                    Err(error) => Some(error),
                }
            }
            None => None,
        };
        let view = self.read_named(&[self.spec.pool.as_str(), lv.as_str()])?;
        let pool = view.pool(&self.spec)?.ok_or_else(|| self.pool_missing())?;
        let size = shared::round_to_extents(size, pool.extent_size)?;
        if let Some(existing) = shared::decide_create(&self.spec, view.find(lv)?, size)? {
            return Ok(CreateAction::Identity(existing));
        }
        if let Some(error) = first_try {
            return Err(error);
        }
        self.change(lvcreate_line(&self.spec, lv, size, &all_tags)?)?;
        Ok(CreateAction::Created(self.new_thin(lv, size, all_tags)))
    }

    fn remove_thin(&self, lv: &LvName) -> Result<DeleteAction, BackendError> {
        shared::check_our_name(lv)?;
        let _operation = self.lock();
        let view = self.read_named(&[self.spec.pool.as_str(), lv.as_str()])?;
        view.pool(&self.spec)?.ok_or_else(|| self.pool_missing())?;
        let Some(found) = view.find(lv)? else {
            return Ok(DeleteAction::Identity);
        };
        shared::require_ours(&self.spec, found)?;
        self.change(CommandLine::command("lvremove").args([
            "-qq",
            "-f",
            &self.vg_lv(lv.as_str()),
        ]))?;
        Ok(DeleteAction::Deleted)
    }

    fn extend_thin(&self, lv: &LvName, size: Bytes) -> Result<ExtendAction, BackendError> {
        shared::check_our_name(lv)?;
        let _operation = self.lock();
        let view = self.read_named(&[self.spec.pool.as_str(), lv.as_str()])?;
        let pool = view.pool(&self.spec)?.ok_or_else(|| self.pool_missing())?;
        let size = shared::round_to_extents(size, pool.extent_size)?;
        let found = view.find(lv)?.ok_or_else(|| self.not_found(lv))?;
        let volume = shared::require_ours(&self.spec, found)?;
        let Some(from) = shared::decide_extend(&volume, size)? else {
            return Ok(ExtendAction::Identity(size));
        };
        self.change(CommandLine::command("lvextend").args([
            "-qq".into(),
            "--size".into(),
            size_arg(size)?,
            self.vg_lv(lv.as_str()),
        ]))?;
        Ok(ExtendAction::Extended { from, to: size })
    }

    fn list_thins(&self) -> Result<Vec<ThinVolume>, BackendError> {
        let _operation = self.lock();
        let view = self.read_vg()?;
        view.pool(&self.spec)?.ok_or_else(|| self.pool_missing())?;
        let mut ours = Vec::new();
        for row in view.thins(&self.spec) {
            // Foreign LVs need not pass our name rules; ours always do.
            let Ok(lv) = LvName::new(row.name.as_str()) else {
                continue;
            };
            let volume = view.thin_volume(row, lv)?;
            if shared::is_ours(&volume) {
                ours.push(volume);
            }
        }
        Ok(ours)
    }

    fn thin(&self, lv: &LvName) -> Result<Option<ThinVolume>, BackendError> {
        let _operation = self.lock();
        let view = self.read_named(&[lv.as_str()])?;
        let Some(found) = view.find(lv)? else {
            return Ok(None);
        };
        Ok(shared::require_ours(&self.spec, found).ok())
    }

    fn tagged(&self, tag: &str) -> Result<Vec<ThinVolume>, BackendError> {
        shared::check_tag(tag)?;
        let _operation = self.lock();
        // `@tag` selects LVs of every VG; ours are picked out below. No LV
        // with the tag is an empty report, not an error.
        let line = report_command("lvs")
            .args(["-o", report::LV_FIELDS])
            .arg(format!("@{tag}"))
            .build()?;
        let output = self.runner.run(&line)?;
        let view = self.view_of(line, &output.report)?;
        let mut ours = Vec::new();
        for row in view
            .thins(&self.spec)
            .filter(|row| row.vg == self.spec.vg.as_str())
        {
            let Ok(lv) = LvName::new(row.name.as_str()) else {
                continue;
            };
            let volume = view.thin_volume(row, lv)?;
            if shared::is_ours(&volume) {
                ours.push(volume);
            }
        }
        Ok(ours)
    }

    fn retag(
        &self,
        lv: &LvName,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, BackendError> {
        shared::check_retag(add, remove)?;
        let _operation = self.lock();
        let view = self.read_named(&[lv.as_str()])?;
        let found = view.find(lv)?.ok_or_else(|| self.not_found(lv))?;
        let mut volume = shared::require_ours(&self.spec, found)?;
        if add.is_empty() && remove.is_empty() {
            return Ok(volume);
        }
        self.change_tags(&mut volume, add, remove)?;
        Ok(volume)
    }

    fn retag_seen(
        &self,
        seen: &ThinVolume,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, BackendError> {
        shared::check_retag(add, remove)?;
        if !shared::is_ours(seen) {
            return Err(BackendError::NotOurs {
                lv: seen.lv.clone(),
                pool: self.spec.pool.clone(),
                tag: OWNER_TAG,
            });
        }
        let mut volume = seen.clone();
        if add.is_empty() && remove.is_empty() {
            return Ok(volume);
        }
        let _operation = self.lock();
        self.change_tags(&mut volume, add, remove)?;
        Ok(volume)
    }

    fn activate_thin(&self, lv: &LvName) -> Result<PathBuf, BackendError> {
        let _operation = self.lock();
        let view = self.read_named(&[self.spec.pool.as_str(), lv.as_str()])?;
        view.pool(&self.spec)?.ok_or_else(|| self.pool_missing())?;
        let found = view.find(lv)?.ok_or_else(|| self.not_found(lv))?;
        let volume = shared::require_ours(&self.spec, found)?;
        if let Some(device) = volume.device {
            return Ok(device);
        }
        self.change(CommandLine::command("lvchange").args([
            "-qq",
            "--activate",
            "y",
            &self.vg_lv(lv.as_str()),
        ]))?;
        Ok(self.device_of(lv))
    }

    fn grow_pool(&self, part: PoolPart, by: Bytes) -> Result<PoolGrowth, BackendError> {
        let _operation = self.lock();
        let view = self.read_named(&[self.spec.pool.as_str()])?;
        let pool = view.pool(&self.spec)?.ok_or_else(|| self.pool_missing())?;
        let from = match part {
            PoolPart::Data => pool.size,
            PoolPart::Metadata => pool
                .metadata_size
                .ok_or_else(|| view.report_error(pool, "thin pool without lv_metadata_size"))?,
        };
        // LVM keeps its spare metadata LV as large as the largest pool
        // metadata, so growing metadata takes as much again from the VG.
        let room = match part {
            PoolPart::Data => pool.vg_free,
            PoolPart::Metadata => Bytes(pool.vg_free.0 / 2),
        };
        let Some(by) = pool_growth::bounded_growth(by, room, pool.extent_size.bytes()) else {
            // Nothing can grow the pool now: fail writes at once, not after
            // the kernel's queueing timeout.
            self.set_errors_when_full(pool, true)?;
            return Ok(PoolGrowth::VgFull { part, size: from });
        };
        // Room again (a PV was added): let writers wait for growth again.
        self.set_errors_when_full(pool, self.errors_when_full_wanted(pool.vg_free))?;
        let option = match part {
            PoolPart::Data => "--size",
            PoolPart::Metadata => "--poolmetadatasize",
        };
        self.change(CommandLine::command("lvextend").args([
            "-qq".into(),
            option.into(),
            format!("+{}", size_arg(by)?),
            self.vg_lv(self.spec.pool.as_str()),
        ]))?;
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
        let _operation = self.lock();
        let view = self.read_named(&[self.spec.pool.as_str(), copy.as_str(), origin.as_str()])?;
        view.pool(&self.spec)?.ok_or_else(|| self.pool_missing())?;
        if let Some(existing) = view.find(copy)? {
            return Ok(CreateAction::Identity(shared::require_ours(
                &self.spec, existing,
            )?));
        }
        let found = view.find(origin)?.ok_or_else(|| self.not_found(origin))?;
        let source = shared::require_ours(&self.spec, found)?;
        let mut all_tags: BTreeSet<String> = tags.iter().cloned().collect();
        all_tags.insert(OWNER_TAG.to_owned());
        // No size: a snapshot of a thin LV is a thin snapshot (LVM checks for
        // the old snapshot target first, so dm-snapshot must be loadable).
        let (permission, skip, activate) = match kind {
            ThinCopy::Snapshot => ("r", "y", "n"),
            ThinCopy::Volume => ("rw", "n", "y"),
        };
        let mut line = CommandLine::command("lvcreate").args([
            "-qq",
            "--snapshot",
            "--name",
            copy.as_str(),
            "--permission",
            permission,
            "--setactivationskip",
            skip,
            "--activate",
            activate,
        ]);
        for tag in &all_tags {
            line = line.args(["--addtag", tag.as_str()]);
        }
        self.change(line.arg(self.vg_lv(origin.as_str())))?;
        Ok(CreateAction::Created(ThinVolume {
            lv: copy.clone(),
            virtual_size: source.virtual_size,
            // An inactive LV reports no data% (see `thin_volume`).
            data_percent: match kind {
                ThinCopy::Snapshot => Percent::ZERO,
                ThinCopy::Volume => source.data_percent,
            },
            tags: all_tags,
            device: (kind == ThinCopy::Volume).then(|| self.device_of(copy)),
            health: VolumeHealth::Healthy,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::report::tests::{REAL_ACTIVE, REAL_INACTIVE};
    use super::runner::REAL_LVM_TESTS;
    use super::*;
    use crate::names::{VgName, VolumeId};
    use crate::units::{ExtentSize, GIB, MIB};

    fn spec() -> ThinPoolSpec {
        ThinPoolSpec::new(
            VgName::new("vmv1smoke").unwrap(),
            LvName::new("pool0").unwrap(),
            vec![],
        )
        .unwrap()
    }

    fn view(json: &str) -> VgView {
        VgView {
            rows: report::parse_lv_report(json).unwrap(),
            line: CommandLine::command("lvs").build().unwrap(),
        }
    }

    fn ours() -> LvName {
        LvName::new("vmv1-vol_gjq9wcbfx7i9a3iy").unwrap()
    }

    /// LVM reads the memory-lock, D-Bus and archive settings as written. It warns about a
    /// setting it does not know or of the wrong type (checked here too, so
    /// the test cannot pass for want of checking), once per command.
    #[test]
    fn lvm_takes_the_memlock_settings_without_a_warning() {
        let _serial = REAL_LVM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let runner = LvmRunner::start().unwrap();
        let vgs = |settings: &str| {
            let line = CommandLine::command("vgs")
                .config(settings)
                .args(["-o", "vg_name"])
                .build()
                .unwrap();
            runner.run(&line).unwrap()
        };
        let ours = vgs(&format!(
            "{MEMLOCK_SETTINGS}{NO_DBUS_NOTICE}{BOUNDED_ARCHIVE}"
        ));
        assert!(
            ours.messages.is_empty() && ours.errors.is_empty(),
            "{ours:?}"
        );
        for wrong in [
            "activation{mlock_filter=1}",
            "activation{no_such_setting=1}",
        ] {
            let output = vgs(&format!("{MEMLOCK_SETTINGS}{wrong}"));
            assert!(
                !(output.messages.is_empty() && output.errors.is_empty()),
                "no warning for {wrong}: {output:?}"
            );
        }
    }

    /// LVM's rule (lib/mm/memlock.c, `_maps_line`): a readable mapping is
    /// locked unless an `mlock_filter` entry is a substring of its maps
    /// line after the permissions. Checked against this process's own maps,
    /// with a second thread's stack and a large mapped buffer in them.
    #[test]
    fn the_memlock_filter_leaves_lvm_no_mapping_to_lock() {
        let filters: Vec<&str> = MEMLOCK_SETTINGS
            .split_once("mlock_filter=[")
            .and_then(|(_, rest)| rest.split_once("]}"))
            .map(|(list, _)| list.split(',').map(|f| f.trim_matches('"')).collect())
            .unwrap();
        let buffer = vec![1u8; 8 << 20];
        let maps = std::thread::spawn(|| std::fs::read_to_string("/proc/self/maps").unwrap())
            .join()
            .unwrap();
        assert_eq!(buffer[buffer.len() - 1], 1);
        let always_skipped = ["[vdso]", "[vsyscall]", "[vectors]"];
        let mut anonymous = 0;
        for line in maps.lines() {
            let mut fields = line.splitn(3, ' ');
            let (_range, perms) = (fields.next().unwrap(), fields.next().unwrap());
            let after_perms = fields.next().unwrap_or("");
            if !perms.starts_with('r') || always_skipped.iter().any(|s| after_perms.contains(s)) {
                continue;
            }
            anonymous += usize::from(!after_perms.contains('/'));
            assert!(
                filters.iter().any(|f| after_perms.contains(f)),
                "LVM would lock {line:?} (filters {filters:?})"
            );
        }
        assert!(anonymous > 2, "no anonymous mappings seen:\n{maps}");
    }

    #[test]
    fn status_counts_every_thin_lv_in_the_pool() {
        let view = view(REAL_ACTIVE);
        let pool = view.pool(&spec()).unwrap().unwrap();
        let status = view.status(&spec(), pool).unwrap();
        let usage = status.usage;
        assert_eq!(usage.data_size, Bytes(GIB));
        // 3.91% of 1 GiB, rounded down: the 40 MiB written, as LVM rounds it.
        assert_eq!(usage.data_used, Bytes(GIB * 391 / 10_000));
        assert_eq!(usage.metadata_size, Bytes(4 * MIB));
        assert_eq!(usage.metadata_used, Bytes(4 * MIB * 1143 / 10_000));
        // The foreign thin LV counts: it shares the pool's space.
        assert_eq!(usage.provisioned, Bytes(30 * GIB + 64 * MIB));
        assert_eq!(usage.volume_count, 2);
        assert_eq!(status.extent_size, ExtentSize::DEFAULT);
        assert_eq!(status.vg_free, Bytes(1_052_770_304));
    }

    #[test]
    fn found_lvs_feed_the_shared_decisions() {
        let view = view(REAL_ACTIVE);
        let found = view.find(&ours()).unwrap().unwrap();
        assert_eq!(found.pool, Some(LvName::new("pool0").unwrap()));
        let volume = shared::require_ours(&spec(), found).unwrap();
        assert_eq!(volume.virtual_size, Bytes(30 * GIB));
        assert_eq!(volume.data_percent, Percent::from_hundredths(13));
        assert_eq!(
            volume.device,
            Some(PathBuf::from("/dev/vmv1smoke/vmv1-vol_gjq9wcbfx7i9a3iy"))
        );

        // A foreign thin LV in our pool and a linear LV are never ours.
        let foreign = view
            .find(&LvName::new("foreign").unwrap())
            .unwrap()
            .unwrap();
        assert!(matches!(
            shared::require_ours(&spec(), foreign),
            Err(BackendError::NotOurs { .. })
        ));
        let linear = view
            .find(&LvName::new("linear1").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(linear.pool, None);
        assert!(view
            .find(&LvName::new("vmv1-vol_ffffffffffffffff").unwrap())
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_same_named_lv_that_is_not_a_thin_pool_is_a_mismatch() {
        let mut spec = spec();
        spec.pool = LvName::new("linear1").unwrap();
        let err = view(REAL_ACTIVE).pool(&spec).unwrap_err();
        assert!(
            matches!(&err, BackendError::PoolMismatch { reason, .. } if reason.contains("\"linear\"")),
            "{err}"
        );
    }

    #[test]
    fn an_inactive_vg_has_no_status_and_no_devices() {
        let view = view(REAL_INACTIVE);
        let pool = view.pool(&spec()).unwrap().unwrap();
        assert!(!pool.active);
        assert!(matches!(
            view.status(&spec(), pool),
            Err(BackendError::PoolMismatch { .. })
        ));
        let volume = shared::require_ours(&spec(), view.find(&ours()).unwrap().unwrap()).unwrap();
        assert_eq!(volume.device, None);
        assert_eq!(volume.data_percent, Percent::ZERO);
    }

    #[test]
    fn an_active_thin_lv_without_data_percent_is_a_report_error() {
        let text = REAL_ACTIVE.replace("\"data_percent\":\"0.13\"", "\"data_percent\":\"\"");
        let err = view(&text).find(&ours()).unwrap_err();
        assert!(
            matches!(&err, BackendError::Report { reason, .. } if reason.contains("vmv1-vol_gjq9wcbfx7i9a3iy")),
            "{err}"
        );
    }

    #[test]
    fn new_devices_sit_beside_the_others() {
        let lv = VolumeId::generate().lv_name();
        assert_eq!(
            view(REAL_ACTIVE).device_of(&spec(), &lv),
            PathBuf::from(format!("/dev/vmv1smoke/{lv}"))
        );
    }

    #[test]
    fn sizes_are_whole_sectors_in_bytes() {
        assert_eq!(size_arg(Bytes(4 * MIB)).unwrap(), "4194304b");
        assert_eq!(size_arg(Bytes(1000)).unwrap(), "1024b");
    }

    /// liblvm2cmd for real, on a VG that does not exist: no device needed.
    #[test]
    fn a_missing_vg_is_an_lvm_error_with_the_command_line() {
        let _serial = REAL_LVM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let spec = ThinPoolSpec::new(
            VgName::new("vmv1-test-absent-vg").unwrap(),
            LvName::new("pool0").unwrap(),
            vec![],
        )
        .unwrap();
        let backend = LvmBackend::start(spec).unwrap();
        match backend.pool_status().unwrap_err() {
            BackendError::Lvm {
                command, errors, ..
            } => {
                assert!(command.starts_with("lvs --reportformat json"), "{command}");
                assert!(command.ends_with(" vmv1-test-absent-vg"), "{command}");
                assert!(errors.iter().any(|e| e.contains("not found")), "{errors:?}");
            }
            other => panic!("unexpected {other}"),
        }
        // No PVs to make the VG from: refused before any change.
        assert!(matches!(
            backend.ensure_pool(),
            Err(BackendError::NoPhysicalVolumes { .. })
        ));
    }
}

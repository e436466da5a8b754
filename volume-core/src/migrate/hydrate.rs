//! The destination end: build the volume over the copying layer, report
//! its progress, and swap in a direct table when it is complete.

use super::nbd::{self, EndFiles};
use super::raid::{self, CopyTable, Leg, LOCAL_LEG, NETWORK_LEG};
use super::{with_rollback, MigrateError};
use crate::actions::{CreateAction, DeleteAction};
use crate::backend::ThinBackend;
use crate::cmd::MigrationTools;
use crate::crypt::{self, CryptOptions};
use crate::hydration::{migration_tag, HydrationProgress, HydrationState, RecoveryRate};
use crate::keys::{MigrationSecret, VolumeKey};
use crate::names::{LvName, MigrationId, VolumeId};
use crate::units::{Bytes, Sectors, SECTOR_SIZE};
use devicemapper::{DevId, Device, DmFlags, DmName, DmOptions, DM};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a connected nbd device may take to show its size.
const NBD_START_WAIT: Duration = Duration::from_secs(30);

/// What to build on the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HydrateSpec {
    pub migration: MigrationId,
    /// The new volume here.
    pub volume: VolumeId,
    /// The source volume: its LUKS2 header is the one that arrives, and is
    /// adopted as `volume`'s (as a fork on one host does).
    pub origin: VolumeId,
    /// The source volume's recorded size. The local LV is made of it,
    /// rounded up to whole extents as the source's LV was, and the export
    /// must be exactly that LV's size.
    pub size: Bytes,
    /// The source's export address.
    pub source: SocketAddr,
    pub rate: RecoveryRate,
    /// The daemon's run directory; this end's files go in
    /// `<run_dir>/<migration>/hydrate/`.
    pub run_dir: PathBuf,
    /// Tags the volume's LV gets in its `lvcreate`, besides the migration
    /// tag (which every LV of the migration carries): the volume host's
    /// own (name, encryption, step), so that the LV is a volume of its from
    /// its first metadata commit. Empty for a volume no host manages.
    pub tags: Vec<String>,
}

/// What this host's side of a hydration is, by name: its layer, nbd
/// client, files and LVs all follow from these. Enough to cancel it from
/// an LV's migration tag and the run directory alone, when the request
/// that started it is gone (a delete after a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HydrationSite {
    pub migration: MigrationId,
    /// The new volume here.
    pub volume: VolumeId,
    /// As [`HydrateSpec::run_dir`].
    pub run_dir: PathBuf,
}

impl HydrationSite {
    fn files(&self) -> EndFiles {
        EndFiles::new(&self.run_dir, &self.migration, "hydrate")
    }

    fn error_layer(&self, step: &'static str, reason: impl ToString) -> MigrateError {
        layer_error(&self.migration, step, reason)
    }
}

impl HydrateSpec {
    pub fn site(&self) -> HydrationSite {
        HydrationSite {
            migration: self.migration.clone(),
            volume: self.volume.clone(),
            run_dir: self.run_dir.clone(),
        }
    }

    fn files(&self) -> EndFiles {
        EndFiles::new(&self.run_dir, &self.migration, "hydrate")
    }

    fn error_layer(&self, step: &'static str, reason: impl ToString) -> MigrateError {
        layer_error(&self.migration, step, reason)
    }
}

/// The volume, usable while it hydrates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hydrating {
    /// The dm-crypt mapping: what a VM or a mount uses.
    pub crypt: PathBuf,
    /// The copying layer's device.
    pub layer: PathBuf,
    /// The nbd device of the network leg.
    pub nbd: PathBuf,
    /// The local thin LV.
    pub local: PathBuf,
}

/// The result of [`Destination::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// How long the layer was suspended for its table swap (I/O waited,
    /// none failed). `None` when an earlier call had swapped it already.
    pub swap: Option<Duration>,
}

/// What one call of [`Destination::start`] made, for its rollback.
#[derive(Default)]
struct Made {
    lv: bool,
    meta: [bool; 2],
    files: bool,
    nbd: bool,
    layer: bool,
}

/// The destination host's side of migrations.
pub struct Destination<'a> {
    backend: &'a dyn ThinBackend,
    tools: &'a MigrationTools,
    crypt: CryptOptions,
}

fn layer_error(migration: &MigrationId, step: &'static str, reason: impl ToString) -> MigrateError {
    MigrateError::Layer {
        migration: migration.clone(),
        step,
        device: migration.layer_name().to_string(),
        reason: reason.to_string(),
    }
}

fn dm(migration: &MigrationId) -> Result<DM, MigrateError> {
    DM::new().map_err(|error| layer_error(migration, "open control", error))
}

/// `/dev/mapper/<name>` of the copying layer, made here when udev has
/// not (hosts without udev): LVM's filter recognises the layer by this
/// name and must never read it (a read of a block not yet copied waits
/// for the source). devtmpfs's `/dev/dm-N` alone would not match.
fn mapper_node(name: &DmName, device: Device) -> Result<PathBuf, String> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let path = Path::new("/dev/mapper").join(name.to_string());
    let wanted = makedev(u64::from(device.major), u64::from(device.minor));
    for _ in 0..2 {
        match nix::sys::stat::stat(&path) {
            Ok(found) if found.st_rdev == wanted => return Ok(path),
            // A stale node of an earlier layer of this name (the name is
            // this migration's alone): replaced.
            Ok(found)
                if SFlag::from_bits_truncate(found.st_mode) & SFlag::S_IFMT == SFlag::S_IFBLK =>
            {
                std::fs::remove_file(&path)
                    .map_err(|e| format!("removing stale {}: {e}", path.display()))?;
            }
            Ok(_) => {
                return Err(format!(
                    "{} exists and is not a block device",
                    path.display()
                ))
            }
            Err(nix::errno::Errno::ENOENT) => {}
            Err(errno) => return Err(format!("stat {}: {errno}", path.display())),
        }
        match mknod(
            &path,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            wanted,
        ) {
            // udev may have made it meanwhile: look again.
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(errno) => return Err(format!("mknod {}: {errno}", path.display())),
        }
    }
    Ok(path)
}

fn device_of(path: &Path) -> Result<Device, String> {
    crate::jail::device_number(path)
        .map(|number| Device::from(number.0))
        .map_err(|error| error.to_string())
}

impl<'a> Destination<'a> {
    pub fn new(
        backend: &'a dyn ThinBackend,
        tools: &'a MigrationTools,
        crypt: CryptOptions,
    ) -> Destination<'a> {
        Destination {
            backend,
            tools,
            crypt,
        }
    }

    /// Builds the volume: thin LV, metadata LVs, nbd device, copying layer,
    /// dm-crypt. Usable when this returns; the copy runs in the kernel.
    /// Idempotent: after a crash of this host, or of the source's export,
    /// the same call reconnects and resumes from the layer's superblock.
    /// `Identity` when everything was up already.
    pub fn start(
        &self,
        spec: &HydrateSpec,
        secret: &MigrationSecret,
        key: &VolumeKey,
    ) -> Result<CreateAction<Hydrating>, MigrateError> {
        let mut made = Made::default();
        match self.build(spec, secret, key, &mut made) {
            Ok(hydrating) => {
                let changed = made.lv || made.meta.contains(&true) || made.nbd || made.layer;
                Ok(if changed {
                    tracing::info!(migration = %spec.migration, volume = %spec.volume, "hydrating");
                    CreateAction::Created(hydrating)
                } else {
                    CreateAction::Identity(hydrating)
                })
            }
            Err(error) => Err(with_rollback(error, || self.roll_back(spec, &made))),
        }
    }

    fn build(
        &self,
        spec: &HydrateSpec,
        secret: &MigrationSecret,
        key: &VolumeKey,
        made: &mut Made,
    ) -> Result<Hydrating, MigrateError> {
        let migration = &spec.migration;
        let tag = migration_tag(migration);
        let mut volume_tags = spec.tags.clone();
        volume_tags.push(tag.clone());
        // LVM rounds the size up to whole extents, as it did the source's
        // LV: the layer spans the LV (and the export) whole, not the
        // record's size, or the volume's tail would never be copied.
        let (local, local_size) = self.thin(
            spec,
            &spec.volume.lv_name(),
            spec.size,
            &volume_tags,
            &mut made.lv,
        )?;
        let mut metas = Vec::with_capacity(2);
        for leg in [NETWORK_LEG, LOCAL_LEG] {
            let lv = migration.meta_lv_name(leg as u8);
            let (path, _) = self.thin(
                spec,
                &lv,
                raid::META_SIZE,
                std::slice::from_ref(&tag),
                &mut made.meta[leg],
            )?;
            metas.push(path);
        }
        let nbd = self.connect(spec, secret, local_size, made)?;
        let length = Sectors(local_size.0 / SECTOR_SIZE);
        let layer = self.layer(spec, &nbd, &metas, (&local, length), &mut made.layer)?;
        if spec.origin != spec.volume {
            crypt::adopt_header(&layer, &spec.origin, &spec.volume)
                .map(|_| ())
                .map_err(|source| MigrateError::AdoptHeader {
                    migration: migration.clone(),
                    source: Box::new(source),
                })?;
        }
        // The last step: a failed open leaves no mapping (crypt::open).
        let opened = crypt::open(&layer, &spec.volume, key, &self.crypt).map_err(|source| {
            MigrateError::OpenCrypt {
                migration: migration.clone(),
                source: Box::new(source),
            }
        })?;
        let crypt = match opened {
            CreateAction::Created(path) | CreateAction::Identity(path) => path,
        };
        Ok(Hydrating {
            crypt,
            layer,
            nbd,
            local,
        })
    }

    /// One of this migration's thin LVs, made if missing, active, at least
    /// `size`.
    fn thin(
        &self,
        spec: &HydrateSpec,
        lv: &LvName,
        size: Bytes,
        tags: &[String],
        made: &mut bool,
    ) -> Result<(PathBuf, Bytes), MigrateError> {
        let migration = &spec.migration;
        let created =
            self.backend
                .create_thin(lv, size, tags)
                .map_err(|source| MigrateError::CreateLv {
                    migration: migration.clone(),
                    lv: lv.clone(),
                    source: Box::new(source),
                })?;
        *made = created.changed();
        let volume = match created {
            CreateAction::Created(volume) | CreateAction::Identity(volume) => volume,
        };
        if volume.virtual_size < size {
            return Err(MigrateError::LvTooSmall {
                migration: migration.clone(),
                lv: lv.clone(),
                found: volume.virtual_size.0,
                wanted: size.0,
            });
        }
        let device = match volume.device {
            Some(device) => device,
            None => self
                .backend
                .activate_thin(lv)
                .map_err(|source| MigrateError::Activate {
                    migration: migration.clone(),
                    lv: lv.clone(),
                    source: Box::new(source),
                })?,
        };
        Ok((device, volume.virtual_size))
    }

    /// The nbd device, connected to the source (kept if it still is).
    fn connect(
        &self,
        spec: &HydrateSpec,
        secret: &MigrationSecret,
        local_size: Bytes,
        made: &mut Made,
    ) -> Result<PathBuf, MigrateError> {
        let migration = &spec.migration;
        let files = spec.files();
        if nbd::running_pid(&files.pid_file()).is_some() {
            if let Ok(device) = std::fs::read_to_string(files.device_file()) {
                return Ok(PathBuf::from(device.trim()));
            }
        }
        made.files = nbd::write_psk(&files, migration, secret).map_err(|source| {
            MigrateError::SecretFile {
                migration: migration.clone(),
                dir: files.dir.clone(),
                source,
            }
        })?;
        let device = nbd::free_device().ok_or_else(|| MigrateError::NoNbdDevice {
            migration: migration.clone(),
        })?;
        let args = nbd::client_args(&files, migration, spec.source, &device).map_err(|reason| {
            MigrateError::Arguments {
                migration: migration.clone(),
                reason,
            }
        })?;
        self.tools
            .qemu_nbd
            .run_detached(args, &files.log_file())
            .map_err(|source| MigrateError::Connect {
                migration: migration.clone(),
                nbd: device.clone(),
                source: Box::new(source),
            })?;
        made.nbd = true;
        let record = std::fs::write(files.device_file(), device.as_os_str().as_encoded_bytes());
        record.map_err(|source| MigrateError::SecretFile {
            migration: migration.clone(),
            dir: files.dir.clone(),
            source,
        })?;
        // qemu-nbd's parent returns once its client thread is started, not
        // once the kernel has the device: the size shows when the kernel
        // starts it (NBD_DO_IT). Wait for it, bounded.
        let waiting = Instant::now();
        let mut found = nbd::device_size(&device);
        while found.is_none_or(|size| size < local_size.0) && waiting.elapsed() < NBD_START_WAIT {
            std::thread::sleep(Duration::from_millis(20));
            found = nbd::device_size(&device);
        }
        // Exactly the local LV's size: a larger export (the hosts' VGs
        // round to other extents) would leave its tail uncopied, a
        // smaller one cannot fill the LV.
        if found != Some(local_size.0) {
            return Err(MigrateError::ExportSize {
                migration: migration.clone(),
                nbd: device,
                found,
                wanted: local_size.0,
            });
        }
        Ok(device)
    }

    /// The copying layer: left as it is when it exists, else built, with
    /// `rebuild` of the local leg only when its metadata has no superblock
    /// yet (a first build; later builds resume the recorded offset).
    fn layer(
        &self,
        spec: &HydrateSpec,
        nbd: &Path,
        metas: &[PathBuf],
        (local, length): (&Path, Sectors),
        made: &mut bool,
    ) -> Result<PathBuf, MigrateError> {
        let dm = dm(&spec.migration)?;
        let name = spec.migration.layer_name();
        let dm_name = DmName::new(name.as_str()).map_err(|e| spec.error_layer("name", e))?;
        let id = DevId::Name(dm_name);
        if let Ok(info) = dm.device_info(&id) {
            return mapper_node(dm_name, info.device()).map_err(|e| spec.error_layer("node", e));
        }
        let local_meta = &metas[LOCAL_LEG];
        let mut first = [0u8; 4096];
        std::fs::File::open(local_meta)
            .and_then(|mut file| file.read_exact(&mut first))
            .map_err(|source| MigrateError::ReadDevice {
                migration: spec.migration.clone(),
                path: local_meta.clone(),
                source,
            })?;
        let devices = |path: &Path| device_of(path).map_err(|e| spec.error_layer("stat", e));
        let table = CopyTable {
            length,
            network: Leg {
                meta: devices(&metas[NETWORK_LEG])?,
                data: devices(nbd)?,
            },
            local: Leg {
                meta: devices(local_meta)?,
                data: devices(local)?,
            },
            rebuild_local: !raid::has_superblock(&first),
            rate: spec.rate,
        };
        let info = dm
            .device_create(dm_name, None, DmOptions::default())
            .map_err(|e| spec.error_layer("create", e))?;
        *made = true;
        dm.table_load(&id, &[table.target()], DmOptions::default())
            .map_err(|e| spec.error_layer("load", e))?;
        dm.device_suspend(&id, DmOptions::default())
            .map_err(|e| spec.error_layer("resume", e))?;
        tracing::info!(
            migration = %spec.migration,
            rebuild = table.rebuild_local,
            rate = %spec.rate,
            "copying layer up"
        );
        mapper_node(dm_name, info.device()).map_err(|e| spec.error_layer("node", e))
    }

    /// Undoes what one `start` made, newest first.
    fn roll_back(&self, spec: &HydrateSpec, made: &Made) -> Result<(), MigrateError> {
        let migration = &spec.migration;
        let site = spec.site();
        // The network leg first: see `cancel_site`.
        if made.nbd {
            let _ = self.disconnect(&site)?;
        }
        if made.layer {
            self.remove_layer(&site)?;
        }
        if made.files {
            let _ = nbd::remove_files(&spec.files());
        }
        for leg in [LOCAL_LEG, NETWORK_LEG] {
            if made.meta[leg] {
                self.remove_lv(&site, &migration.meta_lv_name(leg as u8))?;
            }
        }
        if made.lv {
            self.remove_lv(&site, &spec.volume.lv_name())?;
        }
        Ok(())
    }

    fn remove_lv(&self, site: &HydrationSite, lv: &LvName) -> Result<(), MigrateError> {
        self.backend
            .remove_thin(lv)
            .map(|_| ())
            .map_err(|source| MigrateError::RemoveLv {
                migration: site.migration.clone(),
                lv: lv.clone(),
                source: Box::new(source),
            })
    }

    fn remove_layer(&self, site: &HydrationSite) -> Result<(), MigrateError> {
        let dm = dm(&site.migration)?;
        let name = site.migration.layer_name();
        let dm_name = DmName::new(name.as_str()).map_err(|e| site.error_layer("name", e))?;
        let id = DevId::Name(dm_name);
        if dm.device_info(&id).is_err() {
            return Ok(());
        }
        dm.device_remove(&id, DmOptions::default())
            .map_err(|e| site.error_layer("remove", e))?;
        // The node this module may have made (udev removes its own).
        let _ = std::fs::remove_file(Path::new("/dev/mapper").join(name.as_str()));
        Ok(())
    }

    /// Disconnects this migration's nbd device and waits for its client;
    /// from then on a read of a block not yet copied fails. The first step
    /// of a cancel: with the source gone (stopped by the same cancel, or
    /// dead), the copy's read of it is held by qemu's client while it
    /// tries to reconnect, and md's resync barrier holds every other I/O
    /// to that region behind it: dm-crypt's header read and removal, and
    /// the layer's removal. Disconnected, the held reads fail, the copy
    /// stops, and the rest goes at once. Idempotent.
    pub fn disconnect(&self, site: &HydrationSite) -> Result<DeleteAction, MigrateError> {
        let migration = &site.migration;
        let files = site.files();
        let Some(_) = nbd::running_pid(&files.pid_file()) else {
            return Ok(DeleteAction::Identity);
        };
        let device = std::fs::read_to_string(files.device_file())
            .map(|text| PathBuf::from(text.trim()))
            .map_err(|source| MigrateError::ReadDevice {
                migration: migration.clone(),
                path: files.device_file(),
                source,
            })?;
        self.tools
            .qemu_nbd
            .run(
                [std::ffi::OsStr::new("--disconnect"), device.as_os_str()],
                &[0],
            )
            .map_err(|source| MigrateError::Disconnect {
                migration: migration.clone(),
                nbd: device.clone(),
                source: Box::new(source),
            })?;
        nbd::stop(&files.pid_file(), Duration::from_secs(5)).map_err(|reason| {
            MigrateError::StopProcess {
                migration: migration.clone(),
                reason,
            }
        })?;
        tracing::info!(%migration, nbd = %device.display(), "network leg disconnected");
        Ok(DeleteAction::Deleted)
    }

    /// Changes the background copy's rate limit: the same layer reloaded
    /// with the new rate and without `rebuild`, so md resumes from its
    /// recorded offset (a suspend and resume; I/O waits, none fails).
    pub fn set_rate(&self, spec: &HydrateSpec, rate: RecoveryRate) -> Result<(), MigrateError> {
        let dm = dm(&spec.migration)?;
        let name = spec.migration.layer_name();
        let dm_name = DmName::new(name.as_str()).map_err(|e| spec.error_layer("name", e))?;
        let id = DevId::Name(dm_name);
        let (_, table) = dm
            .table_status(
                &id,
                DmOptions::default().set_flags(DmFlags::DM_NOFLUSH | DmFlags::DM_STATUS_TABLE),
            )
            .map_err(|e| spec.error_layer("table", e))?;
        let Some((_, length, _, params)) = table.iter().find(|(_, _, kind, _)| kind == "raid")
        else {
            // Swapped to the direct table already: nothing is copied.
            return Ok(());
        };
        let (network, local) = raid::parse_legs(params).ok_or_else(|| {
            spec.error_layer("table", format!("unexpected raid table {params:?}"))
        })?;
        let table = CopyTable {
            length: Sectors(*length),
            network,
            local,
            rebuild_local: false,
            rate,
        };
        dm.table_load(&id, &[table.target()], DmOptions::default())
            .map_err(|e| spec.error_layer("load", e))?;
        dm.device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
            .map_err(|e| spec.error_layer("suspend", e))?;
        dm.device_suspend(&id, DmOptions::default())
            .map_err(|e| spec.error_layer("resume", e))?;
        tracing::info!(migration = %spec.migration, %rate, "hydration rate changed");
        Ok(())
    }

    /// Cancels the migration here: closes dm-crypt (refused while anything
    /// holds it: [`crate::crypt::CryptError::Busy`]), removes the layer,
    /// disconnects the nbd device, removes the files and the meta LVs, and
    /// the volume's LV, but only when it carries this migration's tag (an
    /// LV this migration did not make is never removed). The reservation
    /// and the key are the caller's. Idempotent.
    pub fn cancel(&self, spec: &HydrateSpec) -> Result<(), MigrateError> {
        self.cancel_site(&spec.site())
    }

    /// [`Destination::cancel`] from the names alone: a cancel needs no
    /// source address, size, rate or secret.
    pub fn cancel_site(&self, site: &HydrationSite) -> Result<(), MigrateError> {
        let migration = &site.migration;
        // The network leg goes first, before any I/O to the layer: see
        // [`Destination::disconnect`].
        let _ = self.disconnect(site)?;
        let _ = crypt::close(&site.volume).map_err(|source| MigrateError::CloseCrypt {
            migration: migration.clone(),
            source: Box::new(source),
        })?;
        self.remove_layer(site)?;
        let _ = nbd::remove_files(&site.files());
        for leg in [LOCAL_LEG, NETWORK_LEG] {
            self.remove_lv(site, &migration.meta_lv_name(leg as u8))?;
        }
        let lv = site.volume.lv_name();
        let listed = self
            .backend
            .list_thins()
            .map_err(|source| MigrateError::RemoveLv {
                migration: migration.clone(),
                lv: lv.clone(),
                source: Box::new(source),
            })?;
        let ours = listed
            .iter()
            .find(|volume| volume.lv == lv)
            .is_some_and(|volume| {
                crate::hydration::migration(&volume.tags).as_ref() == Some(migration)
            });
        if ours {
            self.remove_lv(site, &lv)?;
        }
        tracing::info!(%migration, volume = %site.volume, "hydration cancelled");
        Ok(())
    }

    /// The copy's progress, from the layer's status (no flush, no I/O to
    /// either leg). A layer already swapped to its direct table reads as
    /// complete.
    pub fn progress(&self, spec: &HydrateSpec) -> Result<HydrationProgress, MigrateError> {
        let dm = dm(&spec.migration)?;
        let name = spec.migration.layer_name();
        let dm_name = DmName::new(name.as_str()).map_err(|e| spec.error_layer("name", e))?;
        let (_, lines) = dm
            .table_status(
                &DevId::Name(dm_name),
                DmOptions::default().set_flags(DmFlags::DM_NOFLUSH),
            )
            .map_err(|e| spec.error_layer("status", e))?;
        match lines.as_slice() {
            [(_, length, kind, _)] if kind == "linear" => Ok(HydrationProgress {
                copied: Bytes(length * SECTOR_SIZE),
                total: Bytes(length * SECTOR_SIZE),
                state: HydrationState::Complete,
            }),
            [(_, _, kind, params)] if kind == "raid" => raid::parse_status(params)
                .map(|status| status.progress())
                .map_err(|e| spec.error_layer("status", e)),
            other => Err(spec.error_layer("status", format!("unexpected table {other:?}"))),
        }
    }

    /// Once every block is local: the layer's table becomes `linear` over
    /// the local LV (a suspend, a load, a resume: I/O waits for the swap,
    /// none fails, dm-crypt above never notices), then the nbd device is
    /// disconnected and the metadata LVs removed. Refused while the copy is
    /// not complete. Idempotent. The source's export is released by the
    /// caller ([`super::Source::stop`]) after this returns.
    pub fn complete(&self, spec: &HydrateSpec) -> Result<Completion, MigrateError> {
        let progress = self.progress(spec)?;
        if !progress.is_complete() {
            return Err(MigrateError::NotComplete {
                migration: spec.migration.clone(),
                progress,
            });
        }
        let dm = dm(&spec.migration)?;
        let name = spec.migration.layer_name();
        let dm_name = DmName::new(name.as_str()).map_err(|e| spec.error_layer("name", e))?;
        let id = DevId::Name(dm_name);
        let (_, table) = dm
            .table_status(
                &id,
                DmOptions::default().set_flags(DmFlags::DM_NOFLUSH | DmFlags::DM_STATUS_TABLE),
            )
            .map_err(|e| spec.error_layer("table", e))?;
        let raid_length = table
            .iter()
            .find(|(_, _, kind, _)| kind == "raid")
            .map(|(_, length, _, _)| Sectors(*length));
        let swap = if let Some(length) = raid_length {
            let local = self
                .backend
                .activate_thin(&spec.volume.lv_name())
                .map_err(|source| MigrateError::Activate {
                    migration: spec.migration.clone(),
                    lv: spec.volume.lv_name(),
                    source: Box::new(source),
                })?;
            let local = device_of(&local).map_err(|e| spec.error_layer("stat", e))?;
            // As long as the layer it replaces, which spans the local LV.
            let linear = raid::linear_target(length, local);
            // Loaded first (into the inactive slot), so the suspend lasts
            // only for the swap itself.
            dm.table_load(&id, &[linear], DmOptions::default())
                .map_err(|e| spec.error_layer("load linear", e))?;
            let started = Instant::now();
            dm.device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
                .map_err(|e| spec.error_layer("suspend", e))?;
            let resumed = dm.device_suspend(&id, DmOptions::default());
            let swap = started.elapsed();
            resumed.map_err(|e| spec.error_layer("resume", e))?;
            tracing::info!(migration = %spec.migration, swap_ms = swap.as_millis() as u64, "direct table in place");
            Some(swap)
        } else {
            None
        };
        let site = spec.site();
        let _ = self.disconnect(&site)?;
        let _ = nbd::remove_files(&spec.files());
        for leg in [LOCAL_LEG, NETWORK_LEG] {
            self.remove_lv(&site, &spec.migration.meta_lv_name(leg as u8))?;
        }
        Ok(Completion { swap })
    }
}

/// A hydrated volume's layer after its swap ([`Destination::complete`]):
/// one `linear` target over the volume's LV. It stays under dm-crypt (an
/// open mapping cannot change its device) until the volume is next
/// closed, so the volume's own operations meet it: an open finds the
/// mapping on it, a close removes it after the mapping, an extend grows
/// it before the mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectLayer {
    name: crate::names::DmName,
    /// The LV it maps.
    local: Device,
    length: Sectors,
}

impl DirectLayer {
    /// The direct layer at `device`, if `device` is one: a device-mapper
    /// device of a migration's layer name whose table is one `linear`
    /// target. `None` for anything else, a layer still copying included.
    pub fn at(device: &Path) -> Result<Option<DirectLayer>, String> {
        let wanted = device_of(device)?;
        let dm = DM::new().map_err(|e| e.to_string())?;
        let prefix = format!("{}-hydrate-", crate::names::NAME_PREFIX);
        let listed = dm.list_devices().map_err(|e| e.to_string())?;
        let Some(name) = listed.into_iter().find_map(|(name, number, _)| {
            let name = name.to_string();
            if number != wanted || !name.starts_with(&prefix) {
                return None;
            }
            crate::names::DmName::new(name).ok()
        }) else {
            return Ok(None);
        };
        let dm_name = DmName::new(name.as_str()).map_err(|e| e.to_string())?;
        let (_, table) = dm
            .table_status(
                &DevId::Name(dm_name),
                DmOptions::default().set_flags(DmFlags::DM_NOFLUSH | DmFlags::DM_STATUS_TABLE),
            )
            .map_err(|e| format!("reading the table of {name}: {e}"))?;
        let [(0, length, kind, params)] = table.as_slice() else {
            return Ok(None);
        };
        let mut words = params.split_whitespace();
        let (Some(local), Some("0"), None) = (words.next(), words.next(), words.next()) else {
            return Ok(None);
        };
        let local = match (kind.as_str(), local.parse::<Device>()) {
            ("linear", Ok(local)) => local,
            _ => return Ok(None),
        };
        Ok(Some(DirectLayer {
            name,
            local,
            length: Sectors(*length),
        }))
    }

    pub fn name(&self) -> &crate::names::DmName {
        &self.name
    }

    fn id(&self) -> Result<DevId<'_>, String> {
        DmName::new(self.name.as_str())
            .map(DevId::Name)
            .map_err(|e| e.to_string())
    }

    /// Whether it maps the LV at `lv` (the same blocks).
    pub fn maps(&self, lv: &Path) -> bool {
        device_of(lv).is_ok_and(|device| device == self.local)
    }

    /// Removes it; for when nothing holds it (its mapping is closed).
    pub fn remove(&self) -> Result<(), String> {
        let dm = DM::new().map_err(|e| e.to_string())?;
        dm.device_remove(&self.id()?, DmOptions::default())
            .map_err(|e| format!("removing {}: {e}", self.name))?;
        // The node `mapper_node` may have made (udev removes its own).
        let _ = std::fs::remove_file(Path::new("/dev/mapper").join(self.name.as_str()));
        tracing::info!(layer = %self.name, "direct layer removed after its mapping");
        Ok(())
    }

    /// Grows its table to its LV's size, after an extend of the LV (a
    /// suspend and resume: I/O waits, none fails). `false` if it has that
    /// size already.
    pub fn grow(&self) -> Result<bool, String> {
        let size = format!(
            "/sys/dev/block/{}:{}/size",
            self.local.major, self.local.minor
        );
        let sectors: u64 = std::fs::read_to_string(&size)
            .map_err(|e| format!("reading {size}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("reading {size}: {e}"))?;
        if sectors <= self.length.0 {
            return Ok(false);
        }
        let dm = DM::new().map_err(|e| e.to_string())?;
        let id = self.id()?;
        let table = raid::linear_target(Sectors(sectors), self.local);
        dm.table_load(&id, &[table], DmOptions::default())
            .map_err(|e| format!("loading the grown table of {}: {e}", self.name))?;
        dm.device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
            .map_err(|e| format!("suspending {}: {e}", self.name))?;
        dm.device_suspend(&id, DmOptions::default())
            .map_err(|e| format!("resuming {}: {e}", self.name))?;
        Ok(true)
    }
}

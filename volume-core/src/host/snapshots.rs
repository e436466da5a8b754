//! Snapshots, restore and fork on one host's pool.
//!
//! * A **snapshot** is a read-only thin snapshot LV of a ready volume
//!   (`vmv1-snap_…`, tags `vmv1.origin=<volume>`, `vmv1.taken=<seconds>`,
//!   `vmv1.enc`), made in one LVM command, so it either exists whole or not
//!   at all. It is never activated.
//! * **Crash-consistent.** LVM suspends an active origin around the pool's
//!   `create_snap` message, so every write completed before is in the
//!   snapshot and none is torn, as after a power cut. For a clean
//!   filesystem image as well, the caller passes a [`FreezeHook`]: the VM
//!   worker asks its guest agent to `fsfreeze -f` the mount in `freeze` and
//!   `fsfreeze -u` in `thaw`. [`VolumeHost::snapshot`] calls `freeze`, takes
//!   the snapshot, and calls `thaw` whatever happened.
//! * A **restore** makes a new volume as a writable thin snapshot of the
//!   snapshot (the snapshot stays as it is), at `vmv1.step=restoring` with
//!   `vmv1.from=<origin volume>`. Encrypted: the data carries the origin's
//!   LUKS2 header, so the origin's data key is stored again under the new
//!   id, and the header's UUID and label become the new volume's. Then
//!   `e2fsck -f -p` replays the journal, the filesystem gets the new
//!   volume's UUID and label (`tune2fs`), the LV, mapping and filesystem grow
//!   to a bigger size if asked, and the volume is `ready`. Each step is
//!   recorded or idempotent, so a re-run after a crash finishes it.
//! * A **fork** is a fresh snapshot, a restore of it, and the removal of
//!   that snapshot.
//! * A volume's delete removes its snapshots first: they hold its data
//!   under its key.

use super::{lock, progress, Encryption, HostError, Made, Progress, Step, VolumeHost};
use crate::actions::{CreateAction, DeleteAction};
use crate::backend::{ThinCopy, ThinVolume};
use crate::fs::GrowOutcome;
use crate::names::{SnapshotId, VolumeId, VolumeName};
use crate::units::Bytes;

/// Lets the VM worker quiesce the guest's filesystem around a snapshot.
pub trait FreezeHook {
    /// Called right before the snapshot. An error stops the snapshot (and
    /// `thaw` is still called).
    fn freeze(&mut self, volume: &VolumeId) -> Result<(), String>;
    /// Called right after the snapshot, whether it was taken or not.
    fn thaw(&mut self, volume: &VolumeId);
}

/// No freeze: the snapshot is crash-consistent only.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFreeze;

impl FreezeHook for NoFreeze {
    fn freeze(&mut self, _volume: &VolumeId) -> Result<(), String> {
        Ok(())
    }
    fn thaw(&mut self, _volume: &VolumeId) {}
}

/// A snapshot as this host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSnapshot {
    pub id: SnapshotId,
    /// The volume it was taken of.
    pub volume: VolumeId,
    /// Its virtual size: the volume's when taken. It counts in admission
    /// and in the pool's provisioned size at this size, as LVM counts it.
    pub size: Bytes,
    /// Seconds since the Unix epoch.
    pub taken: Option<u64>,
    pub encryption: Option<Encryption>,
}

impl LocalSnapshot {
    fn of(volume: &ThinVolume) -> Result<Option<LocalSnapshot>, HostError> {
        let Some(id) = SnapshotId::from_lv_name(&volume.lv) else {
            return Ok(None);
        };
        let origin =
            progress::origin(&volume.tags).ok_or_else(|| HostError::UnreadableSnapshot {
                snapshot: id.clone(),
                tags: volume.tags.iter().cloned().collect(),
            })?;
        Ok(Some(LocalSnapshot {
            id,
            volume: origin,
            size: volume.virtual_size,
            taken: progress::taken(&volume.tags),
            encryption: progress::encryption(&volume.tags),
        }))
    }
}

/// [`VolumeHost::snapshot_inventory`]'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotInventory {
    pub snapshots: Vec<LocalSnapshot>,
    /// Volumes whose LV is at `ready`.
    pub ready_volumes: std::collections::BTreeSet<VolumeId>,
}

/// What to restore, and as which new volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    pub snapshot: SnapshotId,
    pub id: VolumeId,
    pub name: VolumeName,
    /// At least the snapshot's size; `None` takes the snapshot's.
    pub size: Option<Bytes>,
}

fn now_unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl VolumeHost {
    /// Every snapshot of ours in the pool, or only `volume`'s.
    pub fn snapshots(&self, volume: Option<&VolumeId>) -> Result<Vec<LocalSnapshot>, HostError> {
        let mut found = Vec::new();
        // One volume's: a report of its snapshots alone, so that a delete
        // does not cost a report of every volume.
        let lvs = match volume {
            Some(volume) => self.backend.tagged(&progress::origin_tag(volume)),
            None => self.backend.list_thins(),
        };
        for lv in lvs.map_err(HostError::List)? {
            if let Some(snapshot) = LocalSnapshot::of(&lv)? {
                if volume.is_none_or(|v| *v == snapshot.volume) {
                    found.push(snapshot);
                }
            }
        }
        Ok(found)
    }

    /// Every snapshot of ours, and the volumes whose LV is `ready`, from
    /// one listing: what telling an orphan snapshot from a fork's own (in
    /// use until its new volume is ready) needs.
    pub fn snapshot_inventory(&self) -> Result<SnapshotInventory, HostError> {
        let mut inventory = SnapshotInventory::default();
        for lv in self.backend.list_thins().map_err(HostError::List)? {
            if let Some(snapshot) = LocalSnapshot::of(&lv)? {
                inventory.snapshots.push(snapshot);
            } else if let Some(id) = VolumeId::from_lv_name(&lv.lv) {
                if progress::step(&lv.tags) == Some(Progress::Ready) {
                    let _ = inventory.ready_volumes.insert(id);
                }
            }
        }
        Ok(inventory)
    }

    fn find_snapshot(&self, snapshot: &SnapshotId) -> Result<Option<LocalSnapshot>, HostError> {
        let lv = snapshot.lv_name();
        match self.backend.thin(&lv).map_err(HostError::List)? {
            Some(volume) => LocalSnapshot::of(&volume),
            None => Ok(None),
        }
    }

    /// Takes snapshot `snapshot` of the ready volume `id` (see the module
    /// docs), after admission at the volume's size. `Identity` if that
    /// snapshot of this volume exists already.
    pub fn snapshot(
        &self,
        id: &VolumeId,
        snapshot: &SnapshotId,
        hook: &mut dyn FreezeHook,
    ) -> Result<CreateAction<LocalSnapshot>, HostError> {
        let volume_lock = self.volume_lock(id);
        let _held = lock(&volume_lock);
        // LVM suspends and resumes the origin around a thin snapshot, which
        // would resume a fenced volume behind the fencer's back.
        self.refuse_if_fenced(id)?;
        if let Some(existing) = self.find_snapshot(snapshot)? {
            if existing.volume != *id {
                return Err(HostError::SnapshotOfOther {
                    snapshot: snapshot.clone(),
                    existing: existing.volume.to_string(),
                    requested: id.clone(),
                });
            }
            return Ok(CreateAction::Identity(existing));
        }
        let volume = self.ready_volume(id)?;
        let encryption = Self::encryption_of(id, &volume)?;
        let tags = [
            progress::origin_tag(id),
            progress::taken_tag(now_unix_seconds()),
            progress::encryption_tag(encryption),
        ];
        hook.freeze(id).map_err(|reason| {
            hook.thaw(id);
            HostError::Freeze {
                id: id.clone(),
                snapshot: snapshot.clone(),
                reason,
            }
        })?;
        let taken = {
            let _pool = lock(&self.pool_lock);
            self.admit_size(id, volume.virtual_size).and_then(|()| {
                self.backend
                    .snapshot_thin(
                        &id.lv_name(),
                        &snapshot.lv_name(),
                        ThinCopy::Snapshot,
                        &tags,
                    )
                    .map_err(|source| HostError::SnapshotCreate {
                        id: id.clone(),
                        snapshot: snapshot.clone(),
                        source: Box::new(source),
                    })
            })
        };
        hook.thaw(id);
        let taken = taken?;
        self.devices.lv_copied(&id.lv_name(), &snapshot.lv_name());
        self.step(id, Step::SnapshotTaken)?;
        tracing::info!(volume = %id, %snapshot, "snapshot taken");
        let made =
            LocalSnapshot::of(taken.inner())?.ok_or_else(|| HostError::SnapshotNotFound {
                snapshot: snapshot.clone(),
            })?;
        Ok(if taken.changed() {
            CreateAction::Created(made)
        } else {
            CreateAction::Identity(made)
        })
    }

    /// Removes one snapshot; `Identity` if it is gone. Its blocks return
    /// to the pool (which zeroes blocks it provisions again); its data was
    /// under its volume's key, which it never had a copy of.
    pub fn destroy_snapshot(&self, snapshot: &SnapshotId) -> Result<DeleteAction, HostError> {
        let Some(found) = self.find_snapshot(snapshot)? else {
            return Ok(DeleteAction::Identity);
        };
        let removed = self
            .backend
            .remove_thin(&snapshot.lv_name())
            .map_err(|source| HostError::SnapshotRemove {
                snapshot: snapshot.clone(),
                source: Box::new(source),
            })?;
        self.step(&found.volume, Step::SnapshotRemoved)?;
        tracing::info!(volume = %found.volume, %snapshot, "snapshot removed");
        Ok(removed)
    }

    /// Removes every snapshot of `id` (part of its delete).
    pub(super) fn destroy_snapshots_of(&self, id: &VolumeId) -> Result<DeleteAction, HostError> {
        let mut changed = false;
        for snapshot in self.snapshots(Some(id))? {
            changed |= self.destroy_snapshot(&snapshot.id)?.changed();
        }
        Ok(if changed {
            DeleteAction::Deleted
        } else {
            DeleteAction::Identity
        })
    }

    fn admit_size(&self, id: &VolumeId, size: Bytes) -> Result<(), HostError> {
        let status = self.backend.pool_status().map_err(HostError::PoolStatus)?;
        status
            .usage
            .admit_new(&self.policy, size)
            .map(|_| ())
            .map_err(|refusal| HostError::Admission {
                id: id.clone(),
                refusal,
            })
    }

    /// Restores a snapshot into a new volume on this host (see the module
    /// docs), after admission at its size like a create. `Identity` if that
    /// volume is ready already; a re-run finishes one a crash interrupted.
    /// A failure removes what this call made (key copy, LV, mapping).
    pub fn restore(
        &self,
        restore: &Restore,
    ) -> Result<CreateAction<super::LocalVolume>, HostError> {
        let id = &restore.id;
        let volume_lock = self.volume_lock(id);
        let _held = lock(&volume_lock);
        let mut existing = self.find(id)?;
        if let Some(volume) = &existing {
            match Self::progress_of(id, volume)? {
                Progress::Deleting => {
                    let fate = if progress::key_kept(&volume.tags) {
                        super::KeyFate::Keep
                    } else {
                        super::KeyFate::Destroy
                    };
                    let _ = self.teardown(id, existing.take(), fate)?;
                }
                Progress::Ready => {
                    let encryption = Self::encryption_of(id, volume)?;
                    self.check_restored_name(restore, volume)?;
                    self.ensure_open(id, encryption, volume)?;
                    return Ok(CreateAction::Identity(self.status(id)?));
                }
                Progress::Restoring => self.check_restored_name(restore, volume)?,
                other => return Err(Self::not_ready(id, volume, other)),
            }
        }
        let snapshot =
            self.find_snapshot(&restore.snapshot)?
                .ok_or_else(|| HostError::SnapshotNotFound {
                    snapshot: restore.snapshot.clone(),
                })?;
        if let Some(from) = existing
            .as_ref()
            .and_then(|v| progress::restored_from(&v.tags))
        {
            if from != snapshot.volume {
                return Err(HostError::SpecMismatch {
                    id: id.clone(),
                    field: "origin",
                    existing: from.to_string(),
                    requested: snapshot.volume.to_string(),
                });
            }
        }
        let encryption = snapshot
            .encryption
            .ok_or_else(|| HostError::UnreadableSnapshot {
                snapshot: snapshot.id.clone(),
                tags: Vec::new(),
            })?;
        // As LVM will allocate it: a record's decimal size of the same
        // volume is not smaller than its extent-rounded snapshot.
        let size = match restore.size {
            Some(size) => {
                let extent = self.pool_status()?.extent_size;
                super::round_to_extents(id, size, extent)?
            }
            None => snapshot.size,
        };
        if size < snapshot.size {
            return Err(HostError::RestoreTooSmall {
                id: id.clone(),
                snapshot: snapshot.id.clone(),
                size,
                snapshot_size: snapshot.size,
            });
        }
        let mut made = Made::default();
        let built = self.build_restore(restore, &snapshot, encryption, size, existing, &mut made);
        match built {
            Ok(status) => Ok(CreateAction::Created(status)),
            Err(error) if error.is_crash() => Err(error),
            Err(error) => {
                tracing::warn!(volume = %id, %error, "restore failed; rolling back");
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

    fn check_restored_name(&self, restore: &Restore, volume: &ThinVolume) -> Result<(), HostError> {
        let name = progress::name(&volume.tags);
        if name.as_ref() != Some(&restore.name) {
            return Err(HostError::SpecMismatch {
                id: restore.id.clone(),
                field: "name",
                existing: name.map(|n| n.to_string()).unwrap_or_default(),
                requested: restore.name.to_string(),
            });
        }
        Ok(())
    }

    /// The mutating part of a restore; any error here is rolled back, and
    /// `made` says what this call made.
    fn build_restore(
        &self,
        restore: &Restore,
        snapshot: &LocalSnapshot,
        encryption: Encryption,
        size: Bytes,
        existing: Option<ThinVolume>,
        made: &mut Made,
    ) -> Result<super::LocalVolume, HostError> {
        let id = &restore.id;
        let origin = &snapshot.volume;
        let key = match encryption {
            Encryption::Luks2 => {
                let key = self.load_key(origin)?;
                match self.keys.load(id).map_err(failed_key_copy(id, origin))? {
                    Some(stored) if stored.same_as(&key) => {}
                    Some(_) => {
                        return Err(HostError::SpecMismatch {
                            id: id.clone(),
                            field: "key",
                            existing: "another key".into(),
                            requested: format!("the key of volume {origin}"),
                        })
                    }
                    None => {
                        self.keys
                            .insert(id, &key)
                            .map_err(failed_key_copy(id, origin))?;
                        made.key = true;
                    }
                }
                self.step(id, Step::KeyCopied)?;
                Some(key)
            }
            Encryption::None => None,
        };
        if existing.is_none() {
            let tags = [
                progress::step_tag(Progress::Restoring),
                progress::encryption_tag(encryption),
                progress::name_tag(&restore.name),
                progress::restored_from_tag(origin),
            ];
            let _pool = lock(&self.pool_lock);
            self.admit_size(id, size)?;
            made.lv = self
                .backend
                .snapshot_thin(
                    &snapshot.id.lv_name(),
                    &id.lv_name(),
                    ThinCopy::Volume,
                    &tags,
                )
                .map_err(failed_at!(LvCreate, id))?
                .changed();
            self.devices
                .lv_copied(&snapshot.id.lv_name(), &id.lv_name());
            tracing::info!(volume = %id, snapshot = %snapshot.id, "restored LV");
        }
        self.step(id, Step::LvCreated)?;
        let grown = size > snapshot.size;
        if grown {
            let _ = self
                .backend
                .extend_thin(&id.lv_name(), size)
                .map_err(failed_at!(LvExtend, id))?;
            self.step(id, Step::LvExtended)?;
        }
        let lv_device = self.activate(id)?;
        let (fs_device, lower) = match &key {
            Some(key) => {
                let _ = self
                    .devices
                    .adopt_header(&lv_device, origin, id)
                    .map_err(failed_at!(HeaderAdopt, id))?;
                self.step(id, Step::HeaderAdopted)?;
                let mapping = self
                    .devices
                    .open_crypt(&lv_device, id, key)
                    .map_err(failed_at!(CryptOpen, id))?;
                made.mapping = mapping.changed();
                self.step(id, Step::CryptOpened)?;
                if grown {
                    self.devices
                        .resize_crypt(id)
                        .map_err(failed_at!(CryptResize, id))?;
                    self.step(id, Step::CryptResized)?;
                }
                (mapping.into_inner(), Some(lv_device))
            }
            None => (lv_device, None),
        };
        self.devices
            .check_fs(&fs_device)
            .map_err(failed_at!(FsCheck, id))?;
        self.step(id, Step::FsChecked)?;
        let _ = self
            .devices
            .adopt_fs(&fs_device, id)
            .map_err(failed_at!(FsAdopt, id))?;
        self.step(id, Step::FsAdopted)?;
        if grown {
            match self
                .devices
                .grow_fs(&fs_device, lower.as_deref())
                .map_err(failed_at!(FsGrow, id))?
            {
                GrowOutcome::Grown(_) => self.step(id, Step::FsGrown)?,
                GrowOutcome::InUse(holders) => {
                    return Err(HostError::FsCheck {
                        id: id.clone(),
                        source: Box::new(crate::fs::FsError::Busy {
                            device: fs_device.clone(),
                            holders,
                        }),
                    })
                }
            }
        }
        let mut remove = progress::other_step_tags(Progress::Ready);
        remove.push(progress::restored_from_tag(origin));
        self.retag(id, "step", &[progress::step_tag(Progress::Ready)], &remove)?;
        self.step(id, Step::ProgressReady)?;
        tracing::info!(volume = %id, snapshot = %snapshot.id, "restored volume ready");
        self.status(id)
    }

    /// A new volume `restore.id` from a fresh snapshot `restore.snapshot`
    /// of the ready volume `id`; the snapshot is removed after. Re-running
    /// with the same ids after a crash finishes it.
    pub fn fork(
        &self,
        id: &VolumeId,
        restore: &Restore,
        hook: &mut dyn FreezeHook,
    ) -> Result<CreateAction<super::LocalVolume>, HostError> {
        let snapshot = &restore.snapshot;
        let ready = self
            .find(&restore.id)?
            .is_some_and(|v| progress::step(&v.tags) == Some(Progress::Ready));
        if !ready {
            let _ = self.snapshot(id, snapshot, hook)?;
        }
        let forked = self.restore(restore)?;
        let _ = self.destroy_snapshot(snapshot)?;
        Ok(forked)
    }
}

fn failed_key_copy<'a>(
    id: &'a VolumeId,
    origin: &'a VolumeId,
) -> impl Fn(crate::keys::KeyError) -> HostError + 'a {
    move |source| HostError::KeyCopy {
        id: id.clone(),
        origin: origin.clone(),
        source: Box::new(source),
    }
}

//! A volume arriving from another host ([`crate::migrate`]): the host's
//! side of it.
//!
//! * [`VolumeHost::hydrate`] stores the volume's key under the new id and
//!   builds the volume over its copying layer ([`Destination::start`]); the
//!   LV is made with the volume's own tags (name, `luks2`,
//!   `vmv1.step=hydrating`) and the migration's, in its one `lvcreate`. It
//!   is usable at once: `open` and `expose` give its dm-crypt mapping.
//! * While it hydrates, nothing may treat its LV as complete: `extend`,
//!   `snapshot` (so `fork`), a `restore` or `create` onto its id, and
//!   `close` (which would leave the layer copying with nothing on top that
//!   a host can reopen but `hydrate`) are refused with
//!   [`HostError::HydrationUnfinished`]. After a restart its layer is gone;
//!   `open` says so ([`HostError::Hydrating`]) and `hydrate` rebuilds it,
//!   resuming the copy.
//! * [`VolumeHost::complete_hydration`] swaps in the direct table
//!   ([`Destination::complete`]) and then records `ready`, dropping the
//!   migration tag: from then on it is a volume like any other.
//! * `delete` of a hydrating volume cancels the hydration
//!   ([`Destination::cancel_site`], from the LV's migration tag and the run
//!   directory given by [`VolumeHost::with_migrations`]) after marking it
//!   `deleting`, so that a re-run after a crash cancels again.

use super::{lock, progress, HostError, KeyFate, LocalVolume, Progress, Step};
use super::{Encryption, VolumeHost};
use crate::actions::CreateAction;
use crate::backend::ThinVolume;
use crate::cmd::MigrationTools;
use crate::hydration::{self, HydrationProgress, HydrationState, RecoveryRate};
use crate::keys::{MigrationSecret, VolumeKey};
use crate::migrate::{Completion, Destination, HydrateSpec, HydrationSite};
use crate::names::{MigrationId, VolumeId, VolumeName};
use crate::units::Bytes;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A volume to hydrate here from another host's export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hydration {
    pub migration: MigrationId,
    /// The new volume here.
    pub id: VolumeId,
    pub name: VolumeName,
    /// The source volume (its LUKS2 header arrives, and is adopted as
    /// `id`'s).
    pub origin: VolumeId,
    /// The source volume's size.
    pub size: Bytes,
    /// The source's export address.
    pub source: SocketAddr,
    pub rate: RecoveryRate,
    /// The daemon's run directory (the hydration's files go under it).
    pub run_dir: PathBuf,
}

impl Hydration {
    /// The tags the volume's LV is made with, besides the migration's.
    fn volume_tags(&self) -> Vec<String> {
        volume_tags(&self.name)
    }

    fn spec(&self) -> HydrateSpec {
        HydrateSpec {
            migration: self.migration.clone(),
            volume: self.id.clone(),
            origin: self.origin.clone(),
            size: self.size,
            source: self.source,
            rate: self.rate,
            run_dir: self.run_dir.clone(),
            tags: self.volume_tags(),
        }
    }
}

/// A hydrating volume's own tags (the migration tag is the layer's to add).
pub(super) fn volume_tags(name: &VolumeName) -> Vec<String> {
    vec![
        progress::step_tag(Progress::Hydrating),
        progress::encryption_tag(Encryption::Luks2),
        progress::name_tag(name),
    ]
}

/// What a host taking part in migrations needs to cancel a hydration it
/// finds on a volume being deleted (its delete has no request to read them
/// from: it may run after a restart, from create or restore finishing an
/// interrupted delete too).
#[derive(Debug, Clone)]
pub(super) struct MigrationSetup {
    pub(super) tools: MigrationTools,
    pub(super) run_dir: PathBuf,
}

impl VolumeHost {
    /// Takes part in migrations: a delete of a hydrating volume cancels its
    /// hydration with `tools` and the files under `run_dir` (the same run
    /// directory the daemon passes in each [`Hydration`]). Without it such
    /// a delete is refused ([`HostError::MigrationsOff`]).
    pub fn with_migrations(mut self, tools: MigrationTools, run_dir: PathBuf) -> VolumeHost {
        self.migrations = Some(MigrationSetup { tools, run_dir });
        self
    }

    /// The migration an LV of a volume belongs to, if it is hydrating.
    pub(super) fn migration_of(volume: &ThinVolume) -> Option<MigrationId> {
        hydration::migration(&volume.tags)
    }

    /// The site a delete of hydrating volume `id` cancels; refused, with
    /// nothing changed, when this host takes no part in migrations.
    pub(super) fn hydration_site(
        &self,
        id: &VolumeId,
        migration: MigrationId,
    ) -> Result<(HydrationSite, MigrationTools), HostError> {
        let setup = self
            .migrations
            .as_ref()
            .ok_or_else(|| HostError::MigrationsOff {
                id: id.clone(),
                migration: migration.clone(),
            })?;
        let site = HydrationSite {
            migration,
            volume: id.clone(),
            run_dir: setup.run_dir.clone(),
        };
        Ok((site, setup.tools.clone()))
    }

    /// The first step of a cancel, before the mapping is touched
    /// ([`Destination::disconnect`]); whether it disconnected anything.
    pub(super) fn disconnect_hydration(
        &self,
        id: &VolumeId,
        site: &HydrationSite,
        tools: &MigrationTools,
    ) -> Result<bool, HostError> {
        let disconnected =
            Destination::new(self.backend.as_ref(), tools, self.devices.crypt_options())
                .disconnect(site)
                .map_err(|source| HostError::HydrationCancel {
                    id: id.clone(),
                    migration: site.migration.clone(),
                    source: Box::new(source),
                })?;
        self.step(id, Step::HydrationDisconnected)?;
        Ok(disconnected.changed())
    }

    /// Cancels a hydration as part of a delete (see [`Self::teardown`]).
    pub(super) fn cancel_hydration(
        &self,
        id: &VolumeId,
        site: &HydrationSite,
        tools: &MigrationTools,
    ) -> Result<(), HostError> {
        Destination::new(self.backend.as_ref(), tools, self.devices.crypt_options())
            .cancel_site(site)
            .map_err(|source| HostError::HydrationCancel {
                id: id.clone(),
                migration: site.migration.clone(),
                source: Box::new(source),
            })?;
        self.step(id, Step::HydrationCancelled)
    }

    /// The refusal of an operation that needs a complete LV, for a volume
    /// at `progress`.
    pub(super) fn not_ready(id: &VolumeId, volume: &ThinVolume, progress: Progress) -> HostError {
        match (progress, Self::migration_of(volume)) {
            (Progress::Hydrating, Some(migration)) => HostError::HydrationUnfinished {
                id: id.clone(),
                migration,
            },
            (progress, _) => HostError::NotReady {
                id: id.clone(),
                progress,
            },
        }
    }

    /// A hydrating volume's device: its dm-crypt mapping over the copying
    /// layer, when `hydrate` has it up; else [`HostError::Hydrating`] (only
    /// `hydrate` can rebuild the layer: it needs the source's address and
    /// the migration's secret).
    pub(super) fn hydrating_device(
        &self,
        id: &VolumeId,
        volume: &ThinVolume,
    ) -> Result<PathBuf, HostError> {
        let migration =
            Self::migration_of(volume).ok_or_else(|| HostError::UnreadableProgress {
                id: id.clone(),
                tags: volume.tags.iter().cloned().collect(),
            })?;
        self.devices
            .crypt_mapping(id)
            .map_err(failed_at!(CryptStatus, id))?
            .ok_or_else(|| HostError::Hydrating {
                id: id.clone(),
                migration,
            })
    }

    /// Checks that the LV of `request.id` is this migration's.
    fn check_hydration(request: &Hydration, volume: &ThinVolume) -> Result<(), HostError> {
        let id = &request.id;
        let found = Self::migration_of(volume);
        if found.as_ref() != Some(&request.migration) {
            return Err(HostError::SpecMismatch {
                id: id.clone(),
                field: "migration",
                existing: found
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "none".into()),
                requested: request.migration.to_string(),
            });
        }
        Self::check_name(request, volume)
    }

    /// Checks that the LV of `request.id` carries the volume's name.
    fn check_name(request: &Hydration, volume: &ThinVolume) -> Result<(), HostError> {
        let name = progress::name(&volume.tags);
        if name.as_ref() != Some(&request.name) {
            return Err(HostError::SpecMismatch {
                id: request.id.clone(),
                field: "name",
                existing: name.map(|n| n.to_string()).unwrap_or_default(),
                requested: request.name.to_string(),
            });
        }
        Ok(())
    }

    /// Whether the LV is a hydration that has completed (`ready`, migration
    /// tag dropped).
    fn hydrated(volume: &ThinVolume) -> bool {
        progress::step(&volume.tags) == Some(Progress::Ready)
            && Self::migration_of(volume).is_none()
    }

    /// Stores `key` under `id` unless that same key is there; another key
    /// is refused (it would not open the arriving header, and is not ours
    /// to replace). Returns whether this call stored it.
    fn store_migrated_key(&self, request: &Hydration, key: &VolumeKey) -> Result<bool, HostError> {
        let id = &request.id;
        let other_key = || HostError::SpecMismatch {
            id: id.clone(),
            field: "key",
            existing: "another key".into(),
            requested: format!("the key of migration {}", request.migration),
        };
        if let Some(stored) = self.keys.load(id).map_err(failed_at!(KeyLoad, id))? {
            return if stored.same_as(key) {
                Ok(false)
            } else {
                Err(other_key())
            };
        }
        match self.keys.insert(id, key) {
            Ok(()) => Ok(true),
            // A racing call stored one meanwhile: the same is fine.
            Err(crate::keys::KeyError::AlreadyExists { .. }) => {
                match self.keys.load(id).map_err(failed_at!(KeyLoad, id))? {
                    Some(stored) if stored.same_as(key) => Ok(false),
                    _ => Err(other_key()),
                }
            }
            Err(source) => Err(HostError::KeyCreate {
                id: id.clone(),
                source: Box::new(source),
            }),
        }
    }

    /// Hydrates volume `request.id` from the source's export: stores `key`
    /// under it (`Identity` for that same key; another is refused), makes
    /// the LV with the volume's tags and the migration's in one `lvcreate`
    /// (after admission, as a create), and builds the copying layer and
    /// dm-crypt over it ([`Destination::start`]). The volume is usable
    /// when this returns: its `device` is the dm-crypt mapping.
    ///
    /// Idempotent: `Identity` when all is up already; after a restart it
    /// rebuilds the layer, which resumes the copy; for a volume whose
    /// hydration completed it opens it as any ready volume. A failure
    /// rolls back what this call made (the destination's LVs, layer and
    /// files; the key only if this call stored it).
    pub fn hydrate(
        &self,
        tools: &MigrationTools,
        request: &Hydration,
        secret: &MigrationSecret,
        key: &VolumeKey,
    ) -> Result<CreateAction<LocalVolume>, HostError> {
        let id = &request.id;
        let volume_lock = self.volume_lock(id);
        let _held = lock(&volume_lock);
        self.refuse_if_fenced(id)?;
        let mut existing = self.find(id)?;
        if let Some(volume) = &existing {
            match Self::progress_of(id, volume)? {
                Progress::Deleting => {
                    // A delete began; finish it, then start afresh, as
                    // create does.
                    let fate = if progress::key_kept(&volume.tags) {
                        KeyFate::Keep
                    } else {
                        KeyFate::Destroy
                    };
                    let _ = self.teardown(id, existing.take(), fate)?;
                }
                Progress::Hydrating => Self::check_hydration(request, volume)?,
                Progress::Ready if Self::hydrated(volume) => {
                    Self::check_name(request, volume)?;
                    self.ensure_open(id, Encryption::Luks2, volume)?;
                    return Ok(CreateAction::Identity(self.status(id)?));
                }
                other => return Err(Self::not_ready(id, volume, other)),
            }
        }
        let made_key = self.store_migrated_key(request, key)?;
        let started: Result<_, HostError> = (|| {
            self.step(id, Step::KeyReady)?;
            // A new LV is admitted and made under the pool lock, as a
            // create's; the lock is held across the layer's build (a few
            // seconds) since the LV is made inside it.
            let _pool = match existing {
                None => {
                    let guard = lock(&self.pool_lock);
                    let status = self.read_pool()?;
                    let size = super::round_to_extents(id, request.size, status.extent_size)?;
                    status
                        .usage
                        .admit_new(&self.policy, size)
                        .map_err(|refusal| HostError::Admission {
                            id: id.clone(),
                            refusal,
                        })?;
                    Some(guard)
                }
                Some(_) => None,
            };
            Destination::new(self.backend.as_ref(), tools, self.devices.crypt_options())
                .start(&request.spec(), secret, key)
                .map_err(|source| HostError::HydrationStart {
                    id: id.clone(),
                    migration: request.migration.clone(),
                    source: Box::new(source),
                })
        })();
        let started = match started {
            Ok(started) => started,
            Err(error) if error.is_crash() => return Err(error),
            Err(error) if made_key => {
                return match self.destroy_key(id) {
                    Ok(_) => Err(error),
                    Err(rollback) => Err(HostError::RollbackFailed {
                        error: Box::new(error),
                        rollback: Box::new(rollback),
                    }),
                }
            }
            Err(error) => return Err(error),
        };
        let changed = started.changed() || made_key;
        let crypt = started.into_inner().crypt;
        let volume = self
            .find(id)?
            .ok_or_else(|| HostError::NotFound { id: id.clone() })?;
        let local = Self::local_volume(id.clone(), &volume, Some(crypt));
        Ok(if changed {
            CreateAction::Created(local)
        } else {
            CreateAction::Identity(local)
        })
    }

    /// How far the copy of `request` is, from its layer's status (no I/O
    /// to either leg). A volume whose hydration completed reads as
    /// complete, layer or not.
    pub fn hydration_progress(
        &self,
        tools: &MigrationTools,
        request: &Hydration,
    ) -> Result<HydrationProgress, HostError> {
        let id = &request.id;
        let volume = self
            .find(id)?
            .ok_or_else(|| HostError::NotFound { id: id.clone() })?;
        if Self::hydrated(&volume) {
            return Ok(HydrationProgress {
                copied: request.size,
                total: request.size,
                state: HydrationState::Complete,
            });
        }
        Self::check_hydration(request, &volume)?;
        Destination::new(self.backend.as_ref(), tools, self.devices.crypt_options())
            .progress(&request.spec())
            .map_err(|source| HostError::HydrationProgress {
                id: id.clone(),
                migration: request.migration.clone(),
                source: Box::new(source),
            })
    }

    /// Once every block is local: [`Destination::complete`] (the direct
    /// table in place, the nbd device and metadata LVs gone), then the
    /// volume is recorded `ready` and its migration tag dropped. Refused
    /// while the copy is not complete. Idempotent: a volume already
    /// recorded so is `Completion { swap: None }`.
    pub fn complete_hydration(
        &self,
        tools: &MigrationTools,
        request: &Hydration,
    ) -> Result<Completion, HostError> {
        let id = &request.id;
        let volume_lock = self.volume_lock(id);
        let _held = lock(&volume_lock);
        self.refuse_if_fenced(id)?;
        let volume = self
            .find(id)?
            .ok_or_else(|| HostError::NotFound { id: id.clone() })?;
        if Self::hydrated(&volume) {
            return Ok(Completion { swap: None });
        }
        Self::check_hydration(request, &volume)?;
        match Self::progress_of(id, &volume)? {
            Progress::Hydrating => {}
            other => return Err(Self::not_ready(id, &volume, other)),
        }
        let completion =
            Destination::new(self.backend.as_ref(), tools, self.devices.crypt_options())
                .complete(&request.spec())
                .map_err(|source| HostError::HydrationComplete {
                    id: id.clone(),
                    migration: request.migration.clone(),
                    source: Box::new(source),
                })?;
        let mut remove = progress::other_step_tags(Progress::Ready);
        remove.push(hydration::migration_tag(&request.migration));
        let _ = self.retag(id, "step", &[progress::step_tag(Progress::Ready)], &remove)?;
        self.step(id, Step::ProgressReady)?;
        tracing::info!(volume = %id, migration = %request.migration, "hydrated; ready");
        Ok(completion)
    }
}

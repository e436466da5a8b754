//! The source end: export a snapshot of the volume's LV over NBD.

use super::nbd::{self, EndFiles};
use super::{with_rollback, MigrateError};
use crate::actions::{CreateAction, DeleteAction};
use crate::backend::{ThinBackend, ThinCopy};
use crate::cmd::MigrationTools;
use crate::hydration::migration_tag;
use crate::keys::MigrationSecret;
use crate::names::{MigrationId, VolumeId};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What to export, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub migration: MigrationId,
    pub volume: VolumeId,
    /// The address in the source's host record.
    pub listen: SocketAddr,
    /// The daemon's run directory (a tmpfs); the export's files go in
    /// `<run_dir>/<migration>/export/`.
    pub run_dir: PathBuf,
}

impl ExportSpec {
    fn files(&self) -> EndFiles {
        EndFiles::new(&self.run_dir, &self.migration, "export")
    }
}

/// A running export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The snapshot's device (ciphertext: below the volume's dm-crypt).
    pub device: PathBuf,
    pub pid: i32,
}

/// The source host's side of migrations.
pub struct Source<'a> {
    backend: &'a dyn ThinBackend,
    tools: &'a MigrationTools,
}

impl<'a> Source<'a> {
    pub fn new(backend: &'a dyn ThinBackend, tools: &'a MigrationTools) -> Source<'a> {
        Source { backend, tools }
    }

    /// Takes the export snapshot (once: a re-run keeps the first, so every
    /// restart serves the same blocks) and serves it. `Identity` when the
    /// server is already running. Writes the volume gets after the
    /// snapshot are not exported: for a move, stop its user first.
    pub fn start(
        &self,
        spec: &ExportSpec,
        secret: &MigrationSecret,
    ) -> Result<CreateAction<Exported>, MigrateError> {
        let migration = &spec.migration;
        let lv = migration.export_lv_name();
        let files = spec.files();
        let snapshot = self
            .backend
            .snapshot_thin(
                &spec.volume.lv_name(),
                &lv,
                // Writable: the destination's writes reach both legs.
                ThinCopy::Volume,
                &[migration_tag(migration)],
            )
            .map_err(|source| MigrateError::Snapshot {
                migration: migration.clone(),
                lv: lv.clone(),
                source: Box::new(source),
            })?;
        let made_snapshot = snapshot.changed();
        let remove_snapshot = || {
            if !made_snapshot {
                return Ok(());
            }
            self.backend
                .remove_thin(&lv)
                .map(|_| ())
                .map_err(|source| MigrateError::RemoveLv {
                    migration: migration.clone(),
                    lv: lv.clone(),
                    source: Box::new(source),
                })
        };
        let device = match self.backend.activate_thin(&lv) {
            Ok(device) => device,
            Err(source) => {
                let error = MigrateError::Activate {
                    migration: migration.clone(),
                    lv: lv.clone(),
                    source: Box::new(source),
                };
                return Err(with_rollback(error, remove_snapshot));
            }
        };
        if let Some(pid) = nbd::running_pid(&files.pid_file()) {
            return Ok(CreateAction::Identity(Exported { device, pid }));
        }
        let made_files = match nbd::write_psk(&files, migration, secret) {
            Ok(made) => made,
            Err(source) => {
                let error = MigrateError::SecretFile {
                    migration: migration.clone(),
                    dir: files.dir.clone(),
                    source,
                };
                return Err(with_rollback(error, remove_snapshot));
            }
        };
        let undo = || {
            if made_files {
                let _ = nbd::remove_files(&files);
            }
            remove_snapshot()
        };
        let started = nbd::server_args(&files, migration, spec.listen, &device)
            .map_err(|reason| MigrateError::Arguments {
                migration: migration.clone(),
                reason,
            })
            .and_then(|args| {
                self.tools
                    .qemu_nbd
                    .run_detached(args, &files.log_file())
                    .map_err(|source| MigrateError::StartExport {
                        migration: migration.clone(),
                        source: Box::new(source),
                    })
            });
        if let Err(error) = started {
            return Err(with_rollback(error, undo));
        }
        let Some(pid) = nbd::running_pid(&files.pid_file()) else {
            let error = MigrateError::StopProcess {
                migration: migration.clone(),
                reason: "qemu-nbd reported ready but its pid file names no live qemu-nbd"
                    .to_owned(),
            };
            return Err(with_rollback(error, undo));
        };
        tracing::info!(%migration, volume = %spec.volume, listen = %spec.listen, pid, "exporting");
        Ok(CreateAction::Created(Exported { device, pid }))
    }

    /// Stops the server and removes its files and the snapshot (a fork's
    /// release once the destination is complete, or a cancel). `Identity`
    /// when nothing was left.
    pub fn stop(&self, spec: &ExportSpec) -> Result<DeleteAction, MigrateError> {
        let migration = &spec.migration;
        let files = spec.files();
        let was_running = nbd::running_pid(&files.pid_file()).is_some();
        nbd::stop(&files.pid_file(), Duration::from_secs(5)).map_err(|reason| {
            MigrateError::StopProcess {
                migration: migration.clone(),
                reason,
            }
        })?;
        let had_files = files.dir.exists();
        nbd::remove_files(&files).map_err(|source| MigrateError::SecretFile {
            migration: migration.clone(),
            dir: files.dir.clone(),
            source,
        })?;
        let lv = migration.export_lv_name();
        let removed = self
            .backend
            .remove_thin(&lv)
            .map_err(|source| MigrateError::RemoveLv {
                migration: migration.clone(),
                lv,
                source: Box::new(source),
            })?;
        if was_running || had_files || removed.changed() {
            tracing::info!(%migration, volume = %spec.volume, "export released");
            Ok(DeleteAction::Deleted)
        } else {
            Ok(DeleteAction::Identity)
        }
    }
}

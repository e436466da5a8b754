//! Moving and forking a volume to another host, lazily: the destination's
//! volume is usable as soon as its layers are up, and its blocks are copied
//! from the source in the background (ARCHITECTURE.md, "Move and fork
//! across hosts").
//!
//! * [`Source`] (the volume's host): a writable thin snapshot of the
//!   volume's LV, below dm-crypt, so only ciphertext leaves the host,
//!   exported by qemu-nbd with TLS-PSK under the migration's secret.
//! * [`Destination`]: a thin LV of the volume's size, the kernel's nbd
//!   device connected to the export, the copying layer (dm-raid raid1:
//!   network leg in sync, local leg rebuilt under a rate limit) and the
//!   dm-crypt mapping on top, opened with the volume's key. Then
//!   [`Destination::progress`] from the layer's status, and
//!   [`Destination::complete`]: a direct `linear` table in its place, the
//!   nbd device disconnected, the layer's metadata LVs removed.
//!
//! Every step is idempotent, so a re-run after a crash (of either end)
//! picks up where it stopped; a failed call rolls back only what it made.

mod export;
mod hydrate;
pub mod nbd;
pub mod raid;

pub use export::{ExportSpec, Exported, Source};
pub use hydrate::{Completion, Destination, DirectLayer, HydrateSpec, Hydrating, HydrationSite};

use crate::backend::BackendError;
use crate::cmd::CmdError;
use crate::crypt::CryptError;
use crate::hydration::HydrationProgress;
use crate::names::{LvName, MigrationId};
use std::path::PathBuf;

/// One variant per failing step; each names what it was working on. None
/// carries the migration secret or a key.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {migration}: taking the export snapshot {lv}: {source}")]
    Snapshot {
        migration: MigrationId,
        lv: LvName,
        #[source]
        source: Box<BackendError>,
    },
    #[error("migration {migration}: activating {lv}: {source}")]
    Activate {
        migration: MigrationId,
        lv: LvName,
        #[source]
        source: Box<BackendError>,
    },
    #[error("migration {migration}: writing the pre-shared key under {dir}: {source}")]
    SecretFile {
        migration: MigrationId,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("migration {migration}: {reason}")]
    Arguments {
        migration: MigrationId,
        reason: String,
    },
    #[error("migration {migration}: starting the NBD export: {source}")]
    StartExport {
        migration: MigrationId,
        #[source]
        source: Box<CmdError>,
    },
    #[error("migration {migration}: stopping qemu-nbd: {reason}")]
    StopProcess {
        migration: MigrationId,
        reason: String,
    },
    #[error("migration {migration}: removing {lv}: {source}")]
    RemoveLv {
        migration: MigrationId,
        lv: LvName,
        #[source]
        source: Box<BackendError>,
    },
    #[error("migration {migration}: creating {lv}: {source}")]
    CreateLv {
        migration: MigrationId,
        lv: LvName,
        #[source]
        source: Box<BackendError>,
    },
    #[error("migration {migration}: {lv} is {found} bytes, smaller than the volume's {wanted}")]
    LvTooSmall {
        migration: MigrationId,
        lv: LvName,
        found: u64,
        wanted: u64,
    },
    #[error("migration {migration}: reading {path}: {source}")]
    ReadDevice {
        migration: MigrationId,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("migration {migration}: no free nbd device (is the nbd module loaded?)")]
    NoNbdDevice { migration: MigrationId },
    #[error("migration {migration}: connecting {nbd} to the source: {source}")]
    Connect {
        migration: MigrationId,
        nbd: PathBuf,
        #[source]
        source: Box<CmdError>,
    },
    #[error(
        "migration {migration}: the export on {nbd} is {found:?} bytes, the local LV {wanted} \
         (the two volume groups must round to the same extent size)"
    )]
    ExportSize {
        migration: MigrationId,
        nbd: PathBuf,
        found: Option<u64>,
        wanted: u64,
    },
    #[error("migration {migration}: device-mapper {step} of {device}: {reason}")]
    Layer {
        migration: MigrationId,
        step: &'static str,
        device: String,
        reason: String,
    },
    #[error("migration {migration}: adopting the volume's LUKS2 header: {source}")]
    AdoptHeader {
        migration: MigrationId,
        #[source]
        source: Box<CryptError>,
    },
    #[error("migration {migration}: opening dm-crypt on the copying layer: {source}")]
    OpenCrypt {
        migration: MigrationId,
        #[source]
        source: Box<CryptError>,
    },
    #[error("migration {migration}: closing dm-crypt on the copying layer: {source}")]
    CloseCrypt {
        migration: MigrationId,
        #[source]
        source: Box<CryptError>,
    },
    #[error("migration {migration}: not complete yet ({progress})")]
    NotComplete {
        migration: MigrationId,
        progress: HydrationProgress,
    },
    #[error("migration {migration}: disconnecting {nbd}: {source}")]
    Disconnect {
        migration: MigrationId,
        nbd: PathBuf,
        #[source]
        source: Box<CmdError>,
    },
    #[error("{error}; rolling back also failed: {rollback}")]
    RollbackFailed {
        error: Box<MigrateError>,
        rollback: Box<MigrateError>,
    },
}

/// Runs `rollback` after `error` and keeps both when it fails too.
fn with_rollback(
    error: MigrateError,
    rollback: impl FnOnce() -> Result<(), MigrateError>,
) -> MigrateError {
    match rollback() {
        Ok(()) => error,
        Err(rollback) => MigrateError::RollbackFailed {
            error: Box::new(error),
            rollback: Box::new(rollback),
        },
    }
}

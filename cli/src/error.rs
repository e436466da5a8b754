//! Every way a command can fail, and the exit code each maps to.

use std::time::Duration;

use volume_control::migration::MigrationRefusal;
use volume_control::placement::{NoPlacement, Skip};
use volume_model::capacity::Refusal;
use volume_model::names::{HostId, MigrationId, SnapshotId, VolumeId};
use volume_model::units::Bytes;

/// Exit codes, as documented under `--help`.
pub mod exit {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const CAPACITY: i32 = 3;
    pub const TIMED_OUT: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const UNREACHABLE: i32 = 6;
    pub const CONTENDED: i32 = 7;
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Arguments that parse but cannot apply; nothing was changed.
    #[error("{0}")]
    Usage(String),

    #[error("destroying {id} deletes its data: pass --yes (there is no terminal to ask on)")]
    ConfirmationRequired { id: VolumeId },

    #[error("destroy of {id} cancelled; nothing changed")]
    Declined { id: VolumeId },

    #[error("{0}")]
    NoPlacement(Box<NoPlacement>),

    /// `--count N`: some volumes were placed before one did not fit.
    #[error("placed {} of {wanted} volumes ({}); the next one did not fit: {source}",
            placed.len(), list_ids(placed))]
    PartialPlacement {
        wanted: u32,
        placed: Vec<VolumeId>,
        source: Box<NoPlacement>,
    },

    /// `--count N`: some volumes were recorded before another step failed.
    #[error("recorded {} of {wanted} volumes ({}) before: {source}", placed.len(), list_ids(placed))]
    PartialCreate {
        wanted: u32,
        placed: Vec<VolumeId>,
        source: Box<CliError>,
    },

    /// `--count`: checked before anything is written.
    #[error("only {fit} of {wanted} volumes fit; nothing was placed: {source}")]
    CountDoesNotFit {
        wanted: u32,
        fit: u32,
        source: Box<NoPlacement>,
    },

    #[error("host {host} cannot grow {id} by {}: {}", crate::format::size(*growth), refusal_text(refusal))]
    GrowthRefused {
        id: VolumeId,
        host: HostId,
        growth: Bytes,
        refusal: Refusal,
    },

    #[error("host {host} cannot take a snapshot of {volume} ({}): {}", crate::format::size(*size), refusal_text(refusal))]
    SnapshotRefused {
        volume: VolumeId,
        host: HostId,
        size: Bytes,
        refusal: Refusal,
    },

    #[error("no snapshot {id} (looked under {prefix})")]
    SnapshotNotFound { id: SnapshotId, prefix: String },

    #[error("snapshot {id} on {host} failed: {message}")]
    SnapshotFailed {
        id: SnapshotId,
        host: HostId,
        message: String,
    },

    #[error("{0}")]
    TimedOut(Box<WaitTimedOut>),

    #[error("volume {id} on {host} failed: {message}")]
    VolumeFailed {
        id: VolumeId,
        host: HostId,
        message: String,
    },

    #[error("no volume {id} (looked under {prefix})")]
    NotFound { id: VolumeId, prefix: String },

    #[error("volume {id} is being destroyed")]
    BeingDestroyed { id: VolumeId },

    #[error("cannot reach the KV store: {0}")]
    Unreachable(#[source] consul_kv::Error),

    #[error("KV store: {0}")]
    Kv(#[source] consul_kv::Error),

    /// A create was sent, its answer was lost and the store stopped
    /// answering before volctl could read back whether it landed.
    #[error(
        "cannot tell whether {id} was recorded on {host}: the store stopped answering \
             after the create was sent ({source}); nothing more was sent. \
             See `volctl show {id}`, or rerun the same command with `--id {id}`: \
             it creates the volume only if it is not recorded yet"
    )]
    OutcomeUnknown {
        id: VolumeId,
        host: HostId,
        #[source]
        source: consul_kv::Error,
    },

    /// `--id` names a volume recorded with other settings.
    #[error(
        "{id} is already recorded as {existing}, not {requested}; nothing changed \
             (an id names one volume: pick another --id)"
    )]
    IdInUse {
        id: VolumeId,
        existing: String,
        requested: String,
    },

    #[error("{what}: every one of {attempts} attempts lost a race with another writer; retry")]
    Contended { what: String, attempts: u32 },

    #[error("unreadable record at {key}: {reason}")]
    BadRecord { key: String, reason: String },

    #[error("cannot write output: {0}")]
    Output(#[source] std::io::Error),

    #[error(
        "volume {volume} is unencrypted: a fork or move to another host streams its blocks \
         between hosts, and that stream must carry only ciphertext; nothing changed"
    )]
    Unencrypted { volume: VolumeId },

    /// A move needs its source to itself: a second move would destroy it
    /// twice over, and a fork would lose its source when the move ends.
    #[error(
        "volume {volume} is the source of {kind} {migration}, still in progress: a move needs          its source to itself (wait for it or `volctl cancel {migration}`); nothing changed"
    )]
    SourceInMigration {
        volume: VolumeId,
        migration: MigrationId,
        kind: &'static str,
    },

    /// A host taking part in a migration has no `migration` in its record.
    #[error(
        "host {host} (the {role}) publishes no migration endpoint: start its volumed with \
         --migration-listen; nothing changed"
    )]
    NoMigrationEndpoint { host: HostId, role: &'static str },

    #[error("{}; nothing changed", migration_refusal_text(volume, refusal))]
    MigrationRefused {
        volume: VolumeId,
        refusal: MigrationRefusal,
    },

    /// `--region`: no host of the region can take the migration.
    #[error("{}", no_migration_host_text(placement, without_endpoint))]
    NoMigrationHost {
        placement: Box<NoPlacement>,
        /// Hosts of the region passed over for publishing no endpoint.
        without_endpoint: Vec<HostId>,
    },

    #[error("no migration {id} (looked at {key})")]
    MigrationNotFound { id: MigrationId, key: String },

    #[error("volume {volume} is not the new volume of a fork or move to another host: nothing to cancel{}",
            source_of.as_ref().map(|id| format!(" (it is the source of migration {id}: `volctl cancel {id}`)")).unwrap_or_default())]
    NotAMigration {
        volume: VolumeId,
        /// A migration in progress that copies from it.
        source_of: Option<MigrationId>,
    },

    /// A snapshot, fork, move or growth of a volume still copying from its
    /// source would see only the blocks copied so far.
    #[error(
        "cannot {action} {volume} yet: its blocks are still being copied from its source \
         (migration {migration}: {progress}); retry once `volctl show {volume}` says \
         hydration complete"
    )]
    StillHydrating {
        volume: VolumeId,
        migration: MigrationId,
        progress: String,
        action: &'static str,
    },

    /// Destroying a migration's source before the copy is complete would
    /// lose the blocks not yet copied.
    #[error(
        "{volume} is the source of migration {migration}, whose copy is not complete: \
         destroying it would lose the blocks not yet copied; `volctl cancel {migration}` first; \
         nothing changed"
    )]
    SourceOfMigration {
        volume: VolumeId,
        migration: MigrationId,
    },

    #[error("nothing to cancel: migration {id} is complete")]
    MigrationComplete { id: MigrationId },

    #[error("migration {id} failed on {host}: {message}")]
    MigrationFailed {
        id: MigrationId,
        host: HostId,
        message: String,
    },

    #[error("migration {id} was cancelled (see `volctl show {volume}`)")]
    MigrationCancelled { id: MigrationId, volume: VolumeId },

    /// The migration's txn was sent, its answer was lost and the store
    /// stopped answering before volctl could read back whether it landed.
    #[error(
        "cannot tell whether migration {id} (new volume {volume}) was recorded: the store \
         stopped answering after it was sent ({source}); nothing more was sent. \
         See `volctl show {volume}`"
    )]
    MigrationOutcomeUnknown {
        id: MigrationId,
        volume: VolumeId,
        #[source]
        source: consul_kv::Error,
    },
}

/// The deadline of a wait passed; the request itself stays recorded.
#[derive(Debug, thiserror::Error)]
#[error("gave up after {}s waiting for {id} on {host} to become {goal}; last state: {last_state}{hint}",
        timeout.as_secs())]
pub struct WaitTimedOut {
    pub id: VolumeId,
    pub host: HostId,
    pub goal: String,
    pub last_state: String,
    pub timeout: Duration,
    /// What the operator can do next.
    pub hint: String,
}

fn list_ids(ids: &[VolumeId]) -> String {
    ids.iter()
        .map(VolumeId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<consul_kv::Error> for CliError {
    fn from(error: consul_kv::Error) -> Self {
        if error.is_transport() {
            CliError::Unreachable(error)
        } else {
            CliError::Kv(error)
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> Self {
        CliError::Output(error)
    }
}

impl From<NoPlacement> for CliError {
    fn from(error: NoPlacement) -> Self {
        CliError::NoPlacement(Box::new(error))
    }
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::PartialCreate { source, .. } => source.exit_code(),
            CliError::Usage(_)
            | CliError::ConfirmationRequired { .. }
            | CliError::IdInUse { .. } => exit::USAGE,
            CliError::NoPlacement(_)
            | CliError::PartialPlacement { .. }
            | CliError::CountDoesNotFit { .. }
            | CliError::GrowthRefused { .. }
            | CliError::SnapshotRefused { .. } => exit::CAPACITY,
            CliError::TimedOut(_) => exit::TIMED_OUT,
            CliError::NotFound { .. } | CliError::SnapshotNotFound { .. } => exit::NOT_FOUND,
            CliError::Unreachable(_) | CliError::OutcomeUnknown { .. } => exit::UNREACHABLE,
            CliError::Contended { .. } => exit::CONTENDED,
            CliError::Unencrypted { .. }
            | CliError::SourceInMigration { .. }
            | CliError::NoMigrationEndpoint { .. }
            | CliError::NotAMigration { .. }
            | CliError::MigrationComplete { .. }
            | CliError::StillHydrating { .. }
            | CliError::SourceOfMigration { .. } => exit::USAGE,
            CliError::MigrationRefused { refusal, .. } => match refusal {
                MigrationRefusal::SameHost { .. } | MigrationRefusal::NoDestinationHost { .. } => {
                    exit::USAGE
                }
                MigrationRefusal::DestinationCapacity { .. } => exit::CAPACITY,
                MigrationRefusal::NoSourceVolume { .. } => exit::NOT_FOUND,
                MigrationRefusal::SourceOnOtherHost { .. }
                | MigrationRefusal::SourceDestroying { .. } => exit::ERROR,
            },
            CliError::NoMigrationHost { .. } => exit::CAPACITY,
            CliError::MigrationNotFound { .. } => exit::NOT_FOUND,
            CliError::MigrationOutcomeUnknown { .. } => exit::UNREACHABLE,
            CliError::MigrationFailed { .. } | CliError::MigrationCancelled { .. } => exit::ERROR,
            CliError::Declined { .. }
            | CliError::VolumeFailed { .. }
            | CliError::SnapshotFailed { .. }
            | CliError::BeingDestroyed { .. }
            | CliError::Kv(_)
            | CliError::BadRecord { .. }
            | CliError::Output(_) => exit::ERROR,
        }
    }

    /// Lines worth printing under the message: why each host was passed over.
    pub fn details(&self) -> Vec<String> {
        let refusal = match self {
            CliError::PartialCreate { source, .. } => return source.details(),
            CliError::NoMigrationHost { placement, .. } => placement,
            CliError::NoPlacement(refusal) => refusal,
            CliError::PartialPlacement { source, .. }
            | CliError::CountDoesNotFit { source, .. } => source,
            _ => return Vec::new(),
        };
        skip_lines(refusal)
    }
}

/// Why each host was passed over, one line each.
fn skip_lines(refusal: &NoPlacement) -> Vec<String> {
    refusal
        .skipped
        .iter()
        .map(|(host, why)| match why {
            Skip::Capacity { refusal } => format!("{host}: {}", refusal_text(refusal)),
            other => format!("{host}: {other}"),
        })
        .collect()
}

/// A migration refusal naming the volume, sizes in decimal units.
fn migration_refusal_text(volume: &VolumeId, refusal: &MigrationRefusal) -> String {
    match refusal {
        MigrationRefusal::SameHost { host } => format!(
            "{volume} is on host {host} already: a fork or move to another host needs another \
             (a fork without --host or --region stays on the volume's host)"
        ),
        MigrationRefusal::NoDestinationHost { host } => {
            format!("host {host} has published no host record (see `volctl hosts`)")
        }
        MigrationRefusal::DestinationCapacity {
            host,
            size,
            refusal,
        } => format!(
            "host {host} cannot take {volume} ({}): {}",
            crate::format::size(*size),
            refusal_text(refusal)
        ),
        other => other.to_string(),
    }
}

fn no_migration_host_text(placement: &NoPlacement, without_endpoint: &[HostId]) -> String {
    let mut text = if placement.skipped.is_empty() {
        format!(
            "no host in {} can take a migration (the volume's own host never does)",
            placement.region
        )
    } else {
        placement.to_string()
    };
    if !without_endpoint.is_empty() {
        let hosts: Vec<&str> = without_endpoint.iter().map(HostId::as_str).collect();
        text.push_str(&format!(
            "; {} publish no migration endpoint (start their volumed with --migration-listen)",
            hosts.join(", ")
        ));
    }
    text
}

/// A refusal with sizes in decimal units, the ones `--size` takes.
pub fn refusal_text(refusal: &Refusal) -> String {
    match refusal {
        Refusal::Overcommit {
            requested,
            headroom,
            ratio,
        } => format!(
            "over-commit: {} requested, {} headroom at ratio {ratio}",
            crate::format::size(*requested),
            crate::format::size(*headroom)
        ),
        other => other.to_string(),
    }
}

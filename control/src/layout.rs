//! Where everything lives in the KV store, and what it holds.
//!
//! ```text
//! <root>/hosts/<host>/info        HostRecord   written by that host's volumed;
//!                                              `pool.health` is the pool's
//!                                              health (headroom 0 unless
//!                                              `healthy`)
//! <root>/hosts/<host>/ledger      Ledger       reservations; every create's txn
//!                                              checks its index (CAS), so two
//!                                              creates can never over-commit
//! <root>/desired/<host>/<volume>  VolumeSpec   written by volctl; volumed watches
//!                                              <root>/desired/<host>/
//! <root>/status/<host>/<volume>   VolumeStatus written by volumed; `fenced`
//!                                              holds the reason while the
//!                                              volume is fenced
//! <root>/unfence/<host>/<volume>  UnfenceRequest written by `volctl unfence`;
//!                                              volumed lifts the fence (a
//!                                              no-op if none) and deletes it
//! <root>/keys/<volume>            sealed key   envelope store only; ciphertext
//! <root>/keys/<migration>         sealed transfer  the migration's secret and the
//!                                              volume key, sealed by the source
//!                                              to the destination's public key
//! <root>/snapshots/desired/<host>/<snapshot>  SnapshotSpec    volctl (on
//!                                              demand) or volumed (scheduled)
//! <root>/snapshots/status/<host>/<snapshot>   SnapshotStatus  volumed
//! <root>/migrations/<migration>  MigrationSpec  written by volctl (fork or
//!                                              move to another host), with
//!                                              the destination's VolumeSpec
//!                                              and ledger in one txn
//! <root>/migrations/status/<host>/<migration>  MigrationStatus  each end's
//!                                              volumed
//! <root>/usage/<host>/<volume>    FsUsageReport the filesystem's own usage, written
//!                                              by the VM worker from its guest's
//!                                              agent; read by volumed's volume
//!                                              auto-extend while fresh
//! ```
//!
//! A snapshot record reserves its size in the host's ledger (`reserved`,
//! not `volumes`), as a create does: a snapshot counts at its virtual size.
//!
//! `<root>` defaults to `volumes/v1`; the version lets a later layout live
//! beside this one during a migration. Every prefix that is watched or listed
//! ends in `/`, because Consul's prefix match is plain string prefix
//! (`desired/h1` would also match `desired/h10`).
//!
//! How volumed writes (see `volumed/src/kv.rs`):
//! * Every status write is a txn guarded by the desired record it was
//!   computed from (`check-index` on it; `check-not-exists` for an orphan),
//!   so a status never outlives its record.
//! * Only a record with `destroy: true` makes volumed delete data. After the
//!   volume is gone, one txn does `check-index` on the desired record, `cas`
//!   on the ledger (`reserved -= size`, `volumes -= 1`), and deletes the
//!   desired record, the status and the sealed key; a 409 from a concurrent
//!   ledger writer is retried, and a lost answer cannot refund twice.
//! * Sealed keys are written create-only (`cas=0`) and hold ciphertext:
//!   volume-core's envelope store seals each key under the host's KEK,
//!   bound to the volume id.

use serde::{Deserialize, Serialize};
use volume_model::capacity::{CapacityPolicy, PoolUsage};
use volume_model::fence::FenceReason;
use volume_model::health::VolumeHealth;
use volume_model::names::{HostId, MigrationId, Region, SnapshotId, VolumeId, VolumeName, Zone};
use volume_model::units::{Bytes, Percent};
use volume_model::volume_growth::{AutoExtend, FsUsage};

pub const DEFAULT_ROOT: &str = "volumes/v1";

/// Builds and parses KV keys under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: String,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            root: DEFAULT_ROOT.to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid KV root {0:?}: use segments of A-Z a-z 0-9 _ - . joined by '/', without leading or trailing '/'")]
pub struct BadRoot(pub String);

impl Layout {
    pub fn new(root: &str) -> Result<Layout, BadRoot> {
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        };
        if root.split('/').all(segment_ok) {
            Ok(Layout {
                root: root.to_owned(),
            })
        } else {
            Err(BadRoot(root.to_owned()))
        }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn hosts_prefix(&self) -> String {
        format!("{}/hosts/", self.root)
    }

    pub fn host_info(&self, host: &HostId) -> String {
        format!("{}/hosts/{host}/info", self.root)
    }

    pub fn host_ledger(&self, host: &HostId) -> String {
        format!("{}/hosts/{host}/ledger", self.root)
    }

    pub fn desired_root(&self) -> String {
        format!("{}/desired/", self.root)
    }

    pub fn desired_prefix(&self, host: &HostId) -> String {
        format!("{}/desired/{host}/", self.root)
    }

    pub fn desired(&self, host: &HostId, volume: &VolumeId) -> String {
        format!("{}/desired/{host}/{volume}", self.root)
    }

    pub fn status_root(&self) -> String {
        format!("{}/status/", self.root)
    }

    pub fn status_prefix(&self, host: &HostId) -> String {
        format!("{}/status/{host}/", self.root)
    }

    pub fn status(&self, host: &HostId, volume: &VolumeId) -> String {
        format!("{}/status/{host}/{volume}", self.root)
    }

    pub fn unfence_prefix(&self, host: &HostId) -> String {
        format!("{}/unfence/{host}/", self.root)
    }

    pub fn unfence(&self, host: &HostId, volume: &VolumeId) -> String {
        format!("{}/unfence/{host}/{volume}", self.root)
    }

    pub fn sealed_key(&self, volume: &VolumeId) -> String {
        format!("{}/keys/{volume}", self.root)
    }

    /// A migration's secret and the volume's key, sealed by the source's
    /// volumed to the destination host's public key (ciphertext only; a
    /// migration id never equals a volume id, so it cannot shadow a key).
    pub fn sealed_migration(&self, migration: &MigrationId) -> String {
        format!("{}/keys/{migration}", self.root)
    }

    pub fn snapshot_desired_prefix(&self, host: &HostId) -> String {
        format!("{}/snapshots/desired/{host}/", self.root)
    }

    pub fn snapshot_desired(&self, host: &HostId, snapshot: &SnapshotId) -> String {
        format!("{}/snapshots/desired/{host}/{snapshot}", self.root)
    }

    pub fn snapshot_status_prefix(&self, host: &HostId) -> String {
        format!("{}/snapshots/status/{host}/", self.root)
    }

    pub fn snapshot_status(&self, host: &HostId, snapshot: &SnapshotId) -> String {
        format!("{}/snapshots/status/{host}/{snapshot}", self.root)
    }

    /// The snapshot id of a snapshot desired or status key under `host`.
    pub fn parse_snapshot_key(&self, host: &HostId, key: &str) -> Option<SnapshotId> {
        let id = key
            .strip_prefix(&self.snapshot_desired_prefix(host))
            .or_else(|| key.strip_prefix(&self.snapshot_status_prefix(host)))?;
        SnapshotId::new(id).ok()
    }

    /// Where a VM worker reports the filesystem usage its guest sees.
    pub fn fs_usage(&self, host: &HostId, volume: &VolumeId) -> String {
        format!("{}/usage/{host}/{volume}", self.root)
    }

    pub fn fs_usage_prefix(&self, host: &HostId) -> String {
        format!("{}/usage/{host}/", self.root)
    }

    /// Every migration spec; a watch here also sees the status records
    /// below `migrations/status/`, which [`Layout::parse_migration_key`]
    /// tells apart (a migration id is `mig_` + 16 characters, never
    /// `status`, and has no `/`).
    pub fn migrations_prefix(&self) -> String {
        format!("{}/migrations/", self.root)
    }

    pub fn migration(&self, migration: &MigrationId) -> String {
        format!("{}/migrations/{migration}", self.root)
    }

    fn migration_status_root(&self) -> String {
        format!("{}/migrations/status/", self.root)
    }

    pub fn migration_status_prefix(&self, host: &HostId) -> String {
        format!("{}{host}/", self.migration_status_root())
    }

    pub fn migration_status(&self, host: &HostId, migration: &MigrationId) -> String {
        format!("{}/migrations/status/{host}/{migration}", self.root)
    }

    /// The migration of a `migrations/<migration>` spec key; `None` for a
    /// status key or anything else.
    pub fn parse_migration_key(&self, key: &str) -> Option<MigrationId> {
        let id = key.strip_prefix(&self.migrations_prefix())?;
        MigrationId::new(id).ok()
    }

    /// `(host, migration)` of a `migrations/status/<host>/<migration>` key.
    pub fn parse_migration_status_key(&self, key: &str) -> Option<(HostId, MigrationId)> {
        let rest = key.strip_prefix(&self.migration_status_root())?;
        let (host, migration) = rest.split_once('/')?;
        Some((HostId::new(host).ok()?, MigrationId::new(migration).ok()?))
    }

    /// `(host, volume)` from a desired or status key; `None` for anything else.
    pub fn parse_volume_key(&self, key: &str) -> Option<(HostId, VolumeId)> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix('/')?;
        let rest = rest
            .strip_prefix("desired/")
            .or_else(|| rest.strip_prefix("status/"))?;
        let (host, volume) = rest.split_once('/')?;
        Some((HostId::new(host).ok()?, VolumeId::new(volume).ok()?))
    }

    /// The host of a `hosts/<host>/info` key.
    pub fn parse_host_info_key(&self, key: &str) -> Option<HostId> {
        let rest = key.strip_prefix(&self.hosts_prefix())?;
        let host = rest.strip_suffix("/info")?;
        HostId::new(host).ok()
    }

    /// The host of a `hosts/<host>/ledger` key.
    pub fn parse_host_ledger_key(&self, key: &str) -> Option<HostId> {
        let rest = key.strip_prefix(&self.hosts_prefix())?;
        let host = rest.strip_suffix("/ledger")?;
        HostId::new(host).ok()
    }
}

/// A host as its daemon publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: HostId,
    pub region: Region,
    pub zone: Zone,
    /// The pool as LVM last reported it.
    pub pool: PoolUsage,
    pub policy: CapacityPolicy,
    /// Milliseconds since the Unix epoch of the daemon's last publish.
    pub heartbeat_ms: u64,
    /// Our LVs that have no desired record (never deleted without an explicit gc).
    #[serde(default)]
    pub orphans: Vec<VolumeId>,
    /// Which daemon publishes this record (`<machine id>:<volume group>`):
    /// a second daemon for the same host id refuses to start while this
    /// one's heartbeat is fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Where this host exports volumes to other hosts, and the key others
    /// seal a migration's secrets to; `None`: it takes no part in moves
    /// or forks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationEndpoint>,
}

/// A host's part in migrations, in its [`HostRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationEndpoint {
    /// The TCP address its NBD exports listen on.
    pub address: std::net::SocketAddr,
    /// Its X25519 public key, base64 (standard alphabet, padded): a source
    /// seals the migration's secret and the volume key to it.
    pub public_key: String,
}

/// Reservations on one host. Only changed inside a txn that checks its
/// index, so every writer sees every reservation before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Sum of the sizes of every desired volume on the host.
    pub reserved: Bytes,
    pub volumes: u32,
}

/// What a volume should be. Written by volctl, read by volumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub id: VolumeId,
    pub name: VolumeName,
    pub host: HostId,
    pub region: Region,
    pub zone: Zone,
    pub size: Bytes,
    pub encrypted: bool,
    pub created_ms: u64,
    /// The explicit destroy intent: only this makes volumed delete data.
    #[serde(default)]
    pub destroy: bool,
    /// Where the data comes from; `None`: a fresh, empty volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    /// Daily snapshots taken by volumed, and how long they are kept.
    #[serde(default)]
    pub snapshots: SnapshotSchedule,
    /// Grow by an increment at a usage threshold, up to a limit; none:
    /// the volume grows only when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_extend: Option<AutoExtend>,
}

/// A filesystem's usage as the agent in a volume's guest reported it, at
/// `<root>/usage/<host>/<volume>`. The VM worker writes it (a plain put);
/// volumed's volume auto-extend prefers it over the thin LV's data% while
/// it is younger than `[daemon] fs_usage_max_age`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsUsageReport {
    #[serde(flatten)]
    pub usage: FsUsage,
    /// Milliseconds since the Unix epoch when the guest measured it.
    pub reported_ms: u64,
}

impl FsUsageReport {
    pub fn new(usage: FsUsage, reported_ms: u64) -> FsUsageReport {
        FsUsageReport { usage, reported_ms }
    }

    /// The report as the value to put at [`Layout::fs_usage`].
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("usage reports serialize")
    }
}

/// A volume made from existing data: on the same host (a snapshot or a
/// fork), or on another (a migration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeSource {
    /// A restore of a snapshot (which stays).
    Snapshot { snapshot: SnapshotId },
    /// A fork of a live volume: a fresh snapshot `snapshot` of it, restored
    /// and then removed.
    Fork {
        volume: VolumeId,
        snapshot: SnapshotId,
    },
    /// A fork or move from another host (the spec at
    /// `<root>/migrations/<id>`): usable at once, copied in the background.
    Migration {
        id: MigrationId,
        /// The source volume and its host.
        volume: VolumeId,
        host: HostId,
    },
}

/// Scheduled snapshots of one volume: daily at a time of day spread by the
/// volume id, each kept `retention_days`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSchedule {
    pub enabled: bool,
    pub retention_days: u8,
}

/// Retention is 1 to 60 days, 5 by default, as on Fly.
pub const RETENTION_DAYS: std::ops::RangeInclusive<u8> = 1..=60;
pub const DEFAULT_RETENTION_DAYS: u8 = 5;

impl Default for SnapshotSchedule {
    /// A record written before schedules existed takes none.
    fn default() -> Self {
        SnapshotSchedule {
            enabled: false,
            retention_days: DEFAULT_RETENTION_DAYS,
        }
    }
}

impl SnapshotSchedule {
    /// `None` unless `days` is within [`RETENTION_DAYS`].
    pub fn new(enabled: bool, retention_days: u8) -> Option<SnapshotSchedule> {
        RETENTION_DAYS
            .contains(&retention_days)
            .then_some(SnapshotSchedule {
                enabled,
                retention_days,
            })
    }

    /// Where in each `period` this volume's snapshot falls: a fixed offset
    /// from the volume id, so volumes do not all snap at once.
    pub fn offset_in(volume: &VolumeId, period_ms: u64) -> u64 {
        // FNV-1a: stable across builds and platforms (std's hasher is not).
        let hash = volume
            .as_str()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        hash % period_ms.max(1)
    }

    /// The start of the latest slot of `volume` at or before `now_ms`.
    pub fn latest_slot(volume: &VolumeId, period_ms: u64, now_ms: u64) -> u64 {
        let period = period_ms.max(1);
        let offset = SnapshotSchedule::offset_in(volume, period);
        if now_ms < offset {
            return 0;
        }
        (now_ms - offset) / period * period + offset
    }
}

/// A snapshot that should exist. Written by volctl (on demand) or by
/// volumed (scheduled), read by volumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSpec {
    pub id: SnapshotId,
    pub volume: VolumeId,
    pub host: HostId,
    /// The volume's size when asked for: what the ledger reserves.
    pub size: Bytes,
    pub created_ms: u64,
    /// Taken by the schedule (and pruned by its retention).
    #[serde(default)]
    pub scheduled: bool,
    /// The explicit destroy intent.
    #[serde(default)]
    pub destroy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    Taking,
    Ready,
    Destroying,
    Error,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Taking => "taking",
            SnapshotState::Ready => "ready",
            SnapshotState::Destroying => "destroying",
            SnapshotState::Error => "error",
        }
    }
}

/// A snapshot as its host last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStatus {
    pub id: SnapshotId,
    pub volume: VolumeId,
    pub state: SnapshotState,
    pub size: Bytes,
    /// Seconds since the Unix epoch, from the LV's tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken: Option<u64>,
    /// Set when `state` is `error`; never holds secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub updated_ms: u64,
}

/// Lifecycle as volumed reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    Creating,
    Ready,
    Extending,
    Destroying,
    Error,
    /// One of our LVs with no desired record.
    Orphan,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Ready => "ready",
            VolumeState::Extending => "extending",
            VolumeState::Destroying => "destroying",
            VolumeState::Error => "error",
            VolumeState::Orphan => "orphan",
        }
    }
}

/// What a volume is, as its host last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub id: VolumeId,
    pub state: VolumeState,
    /// The block device a VM gets: the crypt mapping or the thin LV.
    pub device: Option<String>,
    pub size: Bytes,
    pub data_percent: Percent,
    pub encrypted: bool,
    /// Set when `state` is `error`; never holds secrets.
    pub error: Option<String>,
    pub updated_ms: u64,
    /// The block-device node made for the volume in its jail directory,
    /// when the host exposes volumes into jails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The thin LV's own health as LVM reports it; left out while healthy.
    /// (The pool's health is in the host record: `pool.health`.)
    #[serde(default, skip_serializing_if = "is_healthy")]
    pub health: VolumeHealth,
    /// Why the last auto-extend step was refused (e.g. no headroom on the
    /// host); left out while none is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_extend_refused: Option<String>,
    /// Why volumed fenced the volume (its I/O waits); absent when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<FenceReason>,
}

/// An operator's request to lift a volume's fence (`volctl unfence`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnfenceRequest {
    pub id: VolumeId,
    pub requested_ms: u64,
}

fn is_healthy(health: &VolumeHealth) -> bool {
    *health == VolumeHealth::Healthy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_prefixes_end_in_slash() {
        let layout = Layout::default();
        let host = HostId::new("h1").unwrap();
        let vol = VolumeId::new("vol_0123456789abcdef").unwrap();
        assert_eq!(
            layout.desired(&host, &vol),
            "volumes/v1/desired/h1/vol_0123456789abcdef"
        );
        assert_eq!(
            layout.parse_volume_key(&layout.desired(&host, &vol)),
            Some((host.clone(), vol.clone()))
        );
        assert_eq!(
            layout.parse_volume_key(&layout.status(&host, &vol)),
            Some((host.clone(), vol))
        );
        assert_eq!(
            layout.parse_host_info_key(&layout.host_info(&host)),
            Some(host.clone())
        );
        assert_eq!(
            layout.parse_host_ledger_key(&layout.host_ledger(&host)),
            Some(host.clone())
        );
        assert_eq!(layout.parse_host_ledger_key(&layout.host_info(&host)), None);
        assert!(layout.desired_prefix(&host).ends_with("/h1/"));
        assert_eq!(layout.parse_volume_key("volumes/v1/desired/h1/../x"), None);
    }

    #[test]
    fn snapshot_keys_round_trip_and_old_specs_take_no_schedule() {
        let layout = Layout::default();
        let host = HostId::new("h1").unwrap();
        let snap = SnapshotId::new("snap_0123456789abcdef").unwrap();
        let key = layout.snapshot_desired(&host, &snap);
        assert_eq!(key, "volumes/v1/snapshots/desired/h1/snap_0123456789abcdef");
        assert_eq!(layout.parse_snapshot_key(&host, &key), Some(snap.clone()));
        assert_eq!(
            layout.parse_snapshot_key(&host, &layout.snapshot_status(&host, &snap)),
            Some(snap)
        );
        // Not under the volumes' desired prefix: their watch never sees it.
        assert!(!key.starts_with(&layout.desired_prefix(&host)));
        let old = r#"{"id":"vol_0123456789abcdef","name":"data","host":"h1","region":"ewr",
            "zone":"a","size":1073741824,"encrypted":true,"created_ms":1}"#;
        let spec: VolumeSpec = serde_json::from_str(old).unwrap();
        assert_eq!(spec.source, None);
        assert!(!spec.snapshots.enabled);
        assert!(SnapshotSchedule::new(true, 0).is_none());
        assert!(SnapshotSchedule::new(true, 61).is_none());
        assert!(SnapshotSchedule::new(true, 60).is_some());
    }

    #[test]
    fn schedule_slots_are_spread_and_stable() {
        let day = 86_400_000;
        let a = VolumeId::new("vol_0123456789abcdef").unwrap();
        let b = VolumeId::new("vol_0123456789abcdee").unwrap();
        let offset = SnapshotSchedule::offset_in(&a, day);
        assert!(offset < day);
        assert_ne!(offset, SnapshotSchedule::offset_in(&b, day));
        let now = 20 * day + 5;
        let slot = SnapshotSchedule::latest_slot(&a, day, now);
        assert!(slot <= now && now - slot < day);
        assert_eq!(slot % day, offset);
        assert_eq!(SnapshotSchedule::latest_slot(&a, day, slot), slot);
    }

    #[test]
    fn records_without_auto_extend_still_read_and_usage_reports_have_their_key() {
        let old = r#"{"id":"vol_0123456789abcdef","name":"data","host":"h1","region":"ewr",
            "zone":"ewr-a","size":1000000000,"encrypted":true,"created_ms":1}"#;
        let spec: VolumeSpec = serde_json::from_str(old).unwrap();
        assert_eq!(spec.auto_extend, None);
        assert!(!serde_json::to_string(&spec)
            .unwrap()
            .contains("auto_extend"));
        let layout = Layout::default();
        let host = HostId::new("h1").unwrap();
        assert_eq!(
            layout.fs_usage(&host, &spec.id),
            "volumes/v1/usage/h1/vol_0123456789abcdef"
        );
        assert!(layout
            .fs_usage(&host, &spec.id)
            .starts_with(&layout.fs_usage_prefix(&host)));
        // Not under the desired prefix: the watch and the ledger check
        // never mistake a report for a record.
        assert!(!layout
            .fs_usage(&host, &spec.id)
            .starts_with(&layout.desired_root()));
        let report =
            FsUsageReport::new(FsUsage::new(Bytes(3), Bytes(4)).unwrap(), 1_700_000_000_000);
        assert_eq!(
            String::from_utf8(report.to_json()).unwrap(),
            r#"{"used":3,"total":4,"reported_ms":1700000000000}"#
        );
        assert_eq!(
            serde_json::from_slice::<FsUsageReport>(&report.to_json()).unwrap(),
            report
        );
    }

    #[test]
    fn migration_keys_round_trip_and_status_is_never_a_spec() {
        let layout = Layout::default();
        let host = HostId::new("h1").unwrap();
        let mig = MigrationId::new("mig_0123456789abcdef").unwrap();
        let spec = layout.migration(&mig);
        assert_eq!(spec, "volumes/v1/migrations/mig_0123456789abcdef");
        assert_eq!(layout.parse_migration_key(&spec), Some(mig.clone()));
        let status = layout.migration_status(&host, &mig);
        assert_eq!(
            status,
            "volumes/v1/migrations/status/h1/mig_0123456789abcdef"
        );
        assert!(status.starts_with(&layout.migration_status_prefix(&host)));
        assert!(layout.migrations_prefix().ends_with('/'));
        assert!(layout.migration_status_prefix(&host).ends_with('/'));
        assert_eq!(
            layout.parse_migration_status_key(&status),
            Some((host.clone(), mig.clone()))
        );
        // A status key (and the bare status folder) is never a spec.
        assert_eq!(layout.parse_migration_key(&status), None);
        assert_eq!(
            layout.parse_migration_key("volumes/v1/migrations/status"),
            None
        );
        assert!(MigrationId::new("status").is_err());
        assert_eq!(layout.parse_migration_status_key(&spec), None);
        // Outside desired/: neither the volume watch nor its parse sees it.
        assert!(!spec.starts_with(&layout.desired_root()));
        assert_eq!(layout.parse_volume_key(&status), None);
    }

    #[test]
    fn volume_sources_keep_their_shapes() {
        let snapshot = r#"{"snapshot":{"snapshot":"snap_0123456789abcdef"}}"#;
        let fork =
            r#"{"fork":{"volume":"vol_0123456789abcdef","snapshot":"snap_0123456789abcdef"}}"#;
        let migration = r#"{"migration":{"id":"mig_0123456789abcdef","volume":"vol_0123456789abcdef","host":"h1"}}"#;
        for text in [snapshot, fork, migration] {
            let source: VolumeSource = serde_json::from_str(text).unwrap();
            assert_eq!(serde_json::to_string(&source).unwrap(), text);
        }
    }

    #[test]
    fn roots_are_checked() {
        assert!(Layout::new("volumes/v2").is_ok());
        for bad in ["", "/volumes", "volumes/", "a//b", "a/../b", "a b"] {
            assert!(Layout::new(bad).is_err(), "{bad:?}");
        }
    }
}

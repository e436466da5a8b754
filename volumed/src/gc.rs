//! `volumed gc`: the only way an orphan (an LV of ours with no desired
//! record: a volume, or a snapshot) is ever deleted. Without `--yes` it
//! only lists them.
//!
//! The LVs are listed first, then the records are read: a record made
//! before the listing is always seen. A failed read is an error, never "no
//! records". Right before each delete the candidate's record is read
//! again, so a volume or snapshot whose record landed meanwhile is kept.
//! An empty desired prefix while volumes or snapshots exist looks exactly
//! like a lost KV store, and so does an empty snapshot prefix while orphan
//! snapshots exist (a lost or wiped snapshot subtree); `--yes` refuses
//! both unless `--allow-empty-desired` says it is meant. A snapshot that a
//! fork still in progress names is no orphan (see
//! [`crate::snapshots::orphan_snapshots`]). Snapshots go first: a volume's
//! delete takes its snapshots with it. Run it while the daemon is stopped,
//! or send the daemon SIGHUP afterwards so it lists the volumes again.

use crate::config::Config;
use crate::plan::{self, Desired};
use crate::snapshots::{orphan_snapshots, recorded_snapshot_ids};
use crate::worker::on_host;
use consul_kv::{ConsulKv, TxnOp};
use std::sync::Arc;
use volume_core::host::{self, LocalSnapshot, VolumeHost};
use volume_core::jail::JailPath;
use volume_core::names::{SnapshotId, VolumeId};

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("reading the desired records failed, so nothing is known to be an orphan: {0}")]
    Desired(#[source] consul_kv::Error),
    #[error("reading the snapshot records failed, so no snapshot is known to be an orphan: {0}")]
    SnapshotRecords(#[source] consul_kv::Error),
    #[error("listing the volumes failed: {0}")]
    List(String),
    #[error("listing the snapshots failed: {0}")]
    ListSnapshots(String),
    #[error("the desired prefix {prefix} is empty but {volumes} volume(s) and {snapshots} snapshot(s) exist; after a KV loss this would delete every one of them, so nothing was deleted (pass --allow-empty-desired if they really are all to go)")]
    EmptyDesired {
        prefix: String,
        volumes: usize,
        snapshots: usize,
    },
    #[error("the snapshot prefix {prefix} is empty but {snapshots} snapshot(s) have no record; after a loss of the snapshot records this would delete every snapshot, so nothing was deleted (pass --allow-empty-desired if they really are all to go)")]
    EmptySnapshotRecords { prefix: String, snapshots: usize },
}

/// What `volumed gc` is asked to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcOptions {
    /// Delete the orphans (without it, only list them).
    pub yes: bool,
    /// Delete even when there is no desired (or no snapshot) record at all.
    pub allow_empty_desired: bool,
}

/// One orphan volume and, with `--yes`, what became of it.
#[derive(Debug)]
pub struct Orphan {
    pub volume: host::LocalVolume,
    /// `None` when only listed or kept; `Some(Err)` when its delete failed.
    pub deleted: Option<Result<(), String>>,
    /// Its record appeared between the listing and the delete: kept.
    pub record_appeared: bool,
}

/// One orphan snapshot and, with `--yes`, what became of it.
#[derive(Debug)]
pub struct SnapshotOrphan {
    pub snapshot: LocalSnapshot,
    /// `None` when only listed or kept; `Some(Err)` when its delete failed.
    pub deleted: Option<Result<(), String>>,
    /// Its record appeared between the listing and the delete: kept.
    pub record_appeared: bool,
}

/// Every orphan found, and what became of each.
#[derive(Debug, Default)]
pub struct GcReport {
    pub volumes: Vec<Orphan>,
    pub snapshots: Vec<SnapshotOrphan>,
}

impl GcReport {
    pub fn is_empty(&self) -> bool {
        self.volumes.is_empty() && self.snapshots.is_empty()
    }

    pub fn len(&self) -> usize {
        self.volumes.len() + self.snapshots.len()
    }
}

/// Lists the orphans and, with `yes`, deletes them (refusing an empty
/// desired prefix).
pub async fn gc(
    config: &Config,
    host: &Arc<VolumeHost>,
    kv: &ConsulKv,
    yes: bool,
) -> Result<GcReport, GcError> {
    let options = GcOptions {
        yes,
        allow_empty_desired: false,
    };
    gc_with(config, host, kv, options).await
}

pub async fn gc_with(
    config: &Config,
    host: &Arc<VolumeHost>,
    kv: &ConsulKv,
    options: GcOptions,
) -> Result<GcReport, GcError> {
    let listed = on_host(host, |host| host.list())
        .await
        .map_err(|(_, error)| GcError::List(error))?;
    let inventory = on_host(host, |host| host.snapshot_inventory())
        .await
        .map_err(|(_, error)| GcError::ListSnapshots(error))?;
    let prefix = config.layout.desired_prefix(&config.host);
    let entries = kv.get_recurse(&prefix).await.map_err(GcError::Desired)?;
    let snapshot_prefix = config.layout.snapshot_desired_prefix(&config.host);
    let snapshot_entries = kv
        .get_recurse(&snapshot_prefix)
        .await
        .map_err(GcError::SnapshotRecords)?;
    let refuse_empty = options.yes && !options.allow_empty_desired;
    let lvs = listed.len() + inventory.snapshots.len();
    if refuse_empty && entries.value.is_empty() && lvs > 0 {
        return Err(GcError::EmptyDesired {
            prefix,
            volumes: listed.len(),
            snapshots: inventory.snapshots.len(),
        });
    }
    let desired = plan::parse_desired(&config.layout, &config.host, &entries.value);
    let recorded = recorded_snapshot_ids(&snapshot_prefix, &snapshot_entries.value);
    let specs = desired.volumes.values().filter_map(Desired::spec);
    let orphan_snaps: Vec<LocalSnapshot> = orphan_snapshots(&inventory, &recorded, specs)
        .into_iter()
        .cloned()
        .collect();
    if refuse_empty && snapshot_entries.value.is_empty() && !orphan_snaps.is_empty() {
        return Err(GcError::EmptySnapshotRecords {
            prefix: snapshot_prefix,
            snapshots: orphan_snaps.len(),
        });
    }
    let mut report = GcReport::default();
    for snapshot in orphan_snaps {
        let mut orphan = SnapshotOrphan {
            snapshot,
            deleted: None,
            record_appeared: false,
        };
        if options.yes {
            let key = config
                .layout
                .snapshot_desired(&config.host, &orphan.snapshot.id);
            match has_key(kv, &key).await {
                Ok(true) => orphan.record_appeared = true,
                Ok(false) => {
                    orphan.deleted =
                        Some(delete_orphan_snapshot(config, host, kv, &orphan.snapshot.id).await);
                }
                Err(error) => orphan.deleted = Some(Err(error)),
            }
        }
        report.snapshots.push(orphan);
    }
    for volume in listed {
        if desired.volumes.contains_key(&volume.id) {
            continue;
        }
        let mut orphan = Orphan {
            volume,
            deleted: None,
            record_appeared: false,
        };
        if options.yes {
            let key = config.layout.desired(&config.host, &orphan.volume.id);
            match has_key(kv, &key).await {
                Ok(true) => orphan.record_appeared = true,
                Ok(false) => {
                    orphan.deleted = Some(delete_orphan(config, host, kv, &orphan.volume.id).await);
                }
                Err(error) => orphan.deleted = Some(Err(error)),
            }
        }
        report.volumes.push(orphan);
    }
    Ok(report)
}

/// Reads the candidate's record again, right before its delete.
async fn has_key(kv: &ConsulKv, key: &str) -> Result<bool, String> {
    match kv.get(key).await {
        Ok(answer) => Ok(answer.value.is_some()),
        Err(error) => Err(format!(
            "not deleted: re-reading its record failed: {error}"
        )),
    }
}

async fn delete_orphan_snapshot(
    config: &Config,
    host: &Arc<VolumeHost>,
    kv: &ConsulKv,
    id: &SnapshotId,
) -> Result<(), String> {
    let remove_id = id.clone();
    let _ = on_host(host, move |host| host.destroy_snapshot(&remove_id))
        .await
        .map_err(|(_, e)| e)?;
    // A status left from a record deleted by hand goes too, unless a
    // record appeared meanwhile.
    let ops = [
        TxnOp::CheckNotExists {
            key: config.layout.snapshot_desired(&config.host, id),
        },
        TxnOp::Delete {
            key: config.layout.snapshot_status(&config.host, id),
        },
    ];
    kv.txn(&ops)
        .await
        .map_err(|e| format!("deleted, but removing its status failed: {e}"))?;
    tracing::info!(snapshot = %id, "orphan snapshot deleted by gc");
    Ok(())
}

async fn delete_orphan(
    config: &Config,
    host: &Arc<VolumeHost>,
    kv: &ConsulKv,
    id: &VolumeId,
) -> Result<(), String> {
    let jail = config
        .jails
        .as_ref()
        .and_then(|jails| JailPath::new(jails.dir.join(id.as_str()), &jails.node).ok());
    if let Some(jail) = jail.clone() {
        let unexpose_id = id.clone();
        let _ = on_host(host, move |host| host.unexpose(&unexpose_id, &jail))
            .await
            .map_err(|(_, e)| e)?;
    }
    let delete_id = id.clone();
    let _ = on_host(host, move |host| host.delete(&delete_id))
        .await
        .map_err(|(_, e)| e)?;
    if let Some(jails) = &config.jails {
        let _ = std::fs::remove_dir(jails.dir.join(id.as_str()));
    }
    // Its orphan status goes too, unless a record appeared meanwhile.
    let ops = [
        TxnOp::CheckNotExists {
            key: config.layout.desired(&config.host, id),
        },
        TxnOp::Delete {
            key: config.layout.status(&config.host, id),
        },
        TxnOp::Delete {
            key: config.layout.sealed_key(id),
        },
    ];
    kv.txn(&ops)
        .await
        .map_err(|e| format!("deleted, but removing its status failed: {e}"))?;
    tracing::info!(volume = %id, "orphan deleted by gc");
    Ok(())
}

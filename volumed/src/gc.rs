//! `volumed gc`: the only way an orphan (an LV of ours with no desired
//! record) is ever deleted. Without `--yes` it only lists them.
//!
//! The volumes are listed first, then the desired records are read: a
//! record made before the listing is always seen. A failed read is an
//! error, never "no records". Right before each delete the candidate's
//! record is read again, so a volume whose record landed meanwhile is kept.
//! An empty desired prefix while volumes exist looks exactly like a lost KV
//! store, so `--yes` refuses it unless `--allow-empty-desired` says it is
//! meant. Run it while the daemon is stopped, or send the daemon SIGHUP
//! afterwards so it lists the volumes again.

use crate::config::Config;
use crate::plan;
use crate::worker::on_host;
use consul_kv::{ConsulKv, TxnOp};
use std::sync::Arc;
use volume_core::host::{self, VolumeHost};
use volume_core::jail::JailPath;
use volume_core::names::VolumeId;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("reading the desired records failed, so nothing is known to be an orphan: {0}")]
    Desired(#[source] consul_kv::Error),
    #[error("listing the volumes failed: {0}")]
    List(String),
    #[error("the desired prefix {prefix} is empty but {volumes} volume(s) exist; after a KV loss this would delete every volume, so nothing was deleted (pass --allow-empty-desired if every volume really is to go)")]
    EmptyDesired { prefix: String, volumes: usize },
}

/// What `volumed gc` is asked to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcOptions {
    /// Delete the orphans (without it, only list them).
    pub yes: bool,
    /// Delete even when there is no desired record at all.
    pub allow_empty_desired: bool,
}

/// One orphan and, with `--yes`, what became of it.
#[derive(Debug)]
pub struct Orphan {
    pub volume: host::LocalVolume,
    /// `None` when only listed or kept; `Some(Err)` when its delete failed.
    pub deleted: Option<Result<(), String>>,
    /// Its record appeared between the listing and the delete: kept.
    pub record_appeared: bool,
}

/// Lists the orphans and, with `yes`, deletes them (refusing an empty
/// desired prefix).
pub async fn gc(
    config: &Config,
    host: &Arc<VolumeHost>,
    kv: &ConsulKv,
    yes: bool,
) -> Result<Vec<Orphan>, GcError> {
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
) -> Result<Vec<Orphan>, GcError> {
    let listed = on_host(host, |host| host.list())
        .await
        .map_err(|(_, error)| GcError::List(error))?;
    let prefix = config.layout.desired_prefix(&config.host);
    let entries = kv.get_recurse(&prefix).await.map_err(GcError::Desired)?;
    if options.yes && entries.value.is_empty() && !listed.is_empty() && !options.allow_empty_desired
    {
        return Err(GcError::EmptyDesired {
            prefix,
            volumes: listed.len(),
        });
    }
    let desired = plan::parse_desired(&config.layout, &config.host, &entries.value);
    let mut orphans = Vec::new();
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
            match has_record(config, kv, &orphan.volume.id).await {
                Ok(true) => orphan.record_appeared = true,
                Ok(false) => {
                    orphan.deleted = Some(delete_orphan(config, host, kv, &orphan.volume.id).await);
                }
                Err(error) => orphan.deleted = Some(Err(error)),
            }
        }
        orphans.push(orphan);
    }
    Ok(orphans)
}

/// Reads the candidate's record again, right before its delete.
async fn has_record(config: &Config, kv: &ConsulKv, id: &VolumeId) -> Result<bool, String> {
    let key = config.layout.desired(&config.host, id);
    match kv.get(&key).await {
        Ok(answer) => Ok(answer.value.is_some()),
        Err(error) => Err(format!(
            "not deleted: re-reading its desired record failed: {error}"
        )),
    }
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

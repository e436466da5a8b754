//! `volumed gc`: the only way an orphan (an LV of ours with no desired
//! record) is ever deleted. Without `--yes` it only lists them.
//!
//! The desired records must be read successfully first: a failed read is
//! an error, never "no records". Run it while the daemon is stopped, or
//! send the daemon SIGHUP afterwards so it lists the volumes again.

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
}

/// One orphan and, with `--yes`, what became of it.
#[derive(Debug)]
pub struct Orphan {
    pub volume: host::LocalVolume,
    /// `None` when only listed; `Some(Err)` when its delete failed.
    pub deleted: Option<Result<(), String>>,
}

pub async fn gc(
    config: &Config,
    host: &Arc<VolumeHost>,
    kv: &ConsulKv,
    yes: bool,
) -> Result<Vec<Orphan>, GcError> {
    let prefix = config.layout.desired_prefix(&config.host);
    let entries = kv.get_recurse(&prefix).await.map_err(GcError::Desired)?;
    let desired = plan::parse_desired(&config.layout, &config.host, &entries.value);
    let listed = on_host(host, |host| host.list())
        .await
        .map_err(|(_, error)| GcError::List(error))?;
    let mut orphans = Vec::new();
    for volume in listed {
        if desired.volumes.contains_key(&volume.id) {
            continue;
        }
        let deleted = if yes {
            Some(delete_orphan(config, host, kv, &volume.id).await)
        } else {
            None
        };
        orphans.push(Orphan { volume, deleted });
    }
    Ok(orphans)
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

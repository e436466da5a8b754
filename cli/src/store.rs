//! Reading the records volctl needs from the KV store, with their indexes
//! (the indexes are what the writes check).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use consul_kv::{ConsulKv, KvPair};
use serde::de::DeserializeOwned;
use volume_control::layout::{HostRecord, Layout, Ledger, VolumeSpec, VolumeStatus};
use volume_model::names::{HostId, VolumeId};

use crate::error::CliError;
use crate::ui::Ui;

/// What every command works with.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub kv: ConsulKv,
    pub layout: Layout,
    /// Hosts with an older heartbeat are not placed on.
    pub heartbeat_ttl: Duration,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn decode<T: DeserializeOwned>(pair: &KvPair) -> Result<T, CliError> {
    serde_json::from_slice(&pair.value).map_err(|e| CliError::BadRecord {
        key: pair.key.clone(),
        reason: e.to_string(),
    })
}

pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

/// A host's published record and its reservation ledger.
#[derive(Debug, Clone)]
pub struct HostEntry {
    pub record: HostRecord,
    pub ledger: Ledger,
    /// The ledger's `ModifyIndex`; 0 when it does not exist yet.
    pub ledger_index: u64,
}

/// A desired record and its `ModifyIndex`.
#[derive(Debug, Clone)]
pub struct SpecEntry {
    pub spec: VolumeSpec,
    pub index: u64,
}

/// A status record: parsed, and as stored (so fields added later still show).
#[derive(Debug, Clone)]
pub struct StatusEntry {
    pub status: VolumeStatus,
    pub raw: serde_json::Value,
    pub index: u64,
}

impl StatusEntry {
    pub fn decode(pair: &KvPair) -> Result<StatusEntry, CliError> {
        Ok(StatusEntry {
            status: decode(pair)?,
            raw: decode(pair)?,
            index: pair.modify_index,
        })
    }
}

/// Every host with a published record. Unreadable records are skipped with
/// a warning: a host whose ledger cannot be read is never placed on.
pub async fn read_hosts(ctx: &Ctx, ui: &mut Ui<'_>) -> Result<Vec<HostEntry>, CliError> {
    let entries = ctx.kv.get_recurse(&ctx.layout.hosts_prefix()).await?.value;
    let mut records: BTreeMap<HostId, HostRecord> = BTreeMap::new();
    let mut ledgers: BTreeMap<HostId, Result<(Ledger, u64), CliError>> = BTreeMap::new();
    for pair in &entries {
        if let Some(host) = ctx.layout.parse_host_info_key(&pair.key) {
            match decode::<HostRecord>(pair) {
                Ok(record) if record.id == host => {
                    records.insert(host, record);
                }
                Ok(record) => ui.warn(&format!(
                    "skipping host record at {}: it names host {}",
                    pair.key, record.id
                )),
                Err(error) => ui.warn(&format!("skipping host: {error}")),
            }
        } else if let Some(host) = ctx.layout.parse_host_ledger_key(&pair.key) {
            ledgers.insert(host, decode(pair).map(|ledger| (ledger, pair.modify_index)));
        }
    }
    let mut hosts = Vec::new();
    for (id, record) in records {
        match ledgers.remove(&id) {
            None => hosts.push(HostEntry {
                record,
                ledger: Ledger::default(),
                ledger_index: 0,
            }),
            Some(Ok((ledger, ledger_index))) => hosts.push(HostEntry {
                record,
                ledger,
                ledger_index,
            }),
            Some(Err(error)) => ui.warn(&format!("skipping host {id}: {error}")),
        }
    }
    Ok(hosts)
}

/// One host's record and ledger; the record must exist.
pub async fn read_host(ctx: &Ctx, host: &HostId) -> Result<HostEntry, CliError> {
    let info_key = ctx.layout.host_info(host);
    let Some(info) = ctx.kv.get(&info_key).await?.value else {
        return Err(CliError::BadRecord {
            key: info_key,
            reason: format!("host {host} has published no record"),
        });
    };
    let record: HostRecord = decode(&info)?;
    let (ledger, ledger_index) = match ctx.kv.get(&ctx.layout.host_ledger(host)).await?.value {
        Some(pair) => (decode(&pair)?, pair.modify_index),
        None => (Ledger::default(), 0),
    };
    Ok(HostEntry {
        record,
        ledger,
        ledger_index,
    })
}

/// Parses a desired record and checks it sits under its own host and id.
fn decode_spec(layout: &Layout, pair: &KvPair) -> Result<SpecEntry, CliError> {
    let spec: VolumeSpec = decode(pair)?;
    let placed = layout.parse_volume_key(&pair.key);
    if placed.as_ref() != Some(&(spec.host.clone(), spec.id.clone())) {
        return Err(CliError::BadRecord {
            key: pair.key.clone(),
            reason: format!("it describes {} on {}", spec.id, spec.host),
        });
    }
    Ok(SpecEntry {
        spec,
        index: pair.modify_index,
    })
}

/// Every desired record (unreadable ones skipped with a warning).
pub async fn read_specs(ctx: &Ctx, ui: &mut Ui<'_>) -> Result<Vec<SpecEntry>, CliError> {
    let entries = ctx.kv.get_recurse(&ctx.layout.desired_root()).await?.value;
    let mut specs = Vec::with_capacity(entries.len());
    for pair in &entries {
        match decode_spec(&ctx.layout, pair) {
            Ok(entry) => specs.push(entry),
            Err(error) => ui.warn(&format!("skipping volume: {error}")),
        }
    }
    Ok(specs)
}

/// Every status record, by host and volume.
pub async fn read_statuses(
    ctx: &Ctx,
    ui: &mut Ui<'_>,
) -> Result<BTreeMap<(HostId, VolumeId), StatusEntry>, CliError> {
    let entries = ctx.kv.get_recurse(&ctx.layout.status_root()).await?.value;
    let mut statuses = BTreeMap::new();
    for pair in &entries {
        let Some(place) = ctx.layout.parse_volume_key(&pair.key) else {
            continue;
        };
        match StatusEntry::decode(pair) {
            Ok(entry) => {
                statuses.insert(place, entry);
            }
            Err(error) => ui.warn(&format!("ignoring status: {error}")),
        }
    }
    Ok(statuses)
}

/// The desired record of `id`, wherever it is placed.
pub async fn find_spec(ctx: &Ctx, id: &VolumeId) -> Result<SpecEntry, CliError> {
    let root = ctx.layout.desired_root();
    let keys = ctx.kv.keys(&root, None).await?.value;
    let key = keys
        .into_iter()
        .find(|key| {
            ctx.layout
                .parse_volume_key(key)
                .is_some_and(|(_, found)| found == *id)
        })
        .ok_or_else(|| CliError::NotFound {
            id: id.clone(),
            prefix: root.clone(),
        })?;
    // Gone between the listing and the read: destroyed meanwhile.
    let pair = ctx
        .kv
        .get(&key)
        .await?
        .value
        .ok_or_else(|| CliError::NotFound {
            id: id.clone(),
            prefix: root,
        })?;
    decode_spec(&ctx.layout, &pair)
}

/// The status of one volume, if its host has written one.
pub async fn read_status(
    ctx: &Ctx,
    host: &HostId,
    id: &VolumeId,
) -> Result<Option<StatusEntry>, CliError> {
    match ctx.kv.get(&ctx.layout.status(host, id)).await?.value {
        Some(pair) => StatusEntry::decode(&pair).map(Some),
        None => Ok(None),
    }
}

//! `snapshots create|list|destroy`, `create --snapshot-id` and `fork`.
//!
//! A snapshot record reserves the volume's size in its host's ledger in the
//! same txn that writes it (CAS on the ledger, create-only on the record),
//! after admission against the host's committed usage, as a create does. A
//! restore or fork is a create pinned to the snapshot's (the volume's) host
//! whose record names its source; volumed restores instead of formatting.

use crate::args::{ForkArgs, SnapshotCreateArgs, SnapshotDestroyArgs, SnapshotListArgs};
use crate::commands::{finish_create, print_json};
use crate::error::{CliError, WaitTimedOut};
use crate::format::{self, Table};
use crate::reserve::{self, CreateRequest, MAX_ATTEMPTS};
use crate::store::{self, decode, encode, now_ms, Ctx};
use crate::ui::Ui;
use crate::wait::Deadline;
use consul_kv::TxnOp;
use serde::Serialize;
use std::io::Write;
use std::time::{Duration, Instant};
use volume_control::layout::{
    Ledger, SnapshotSpec, SnapshotState, SnapshotStatus, VolumeSource, VolumeSpec,
};
use volume_control::placement::Candidate;
use volume_model::names::{HostId, SnapshotId};
use volume_model::units::Bytes;

/// A snapshot as `snapshots list --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotView {
    #[serde(flatten)]
    pub spec: SnapshotSpec,
    /// `pending` until its host has written a status.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taken: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SnapshotView {
    fn new(spec: SnapshotSpec, status: Option<SnapshotStatus>) -> SnapshotView {
        SnapshotView {
            state: status
                .as_ref()
                .map(|s| s.state.as_str().to_owned())
                .unwrap_or_else(|| "pending".to_owned()),
            taken: status.as_ref().and_then(|s| s.taken),
            error: status.and_then(|s| s.error),
            spec,
        }
    }
}

/// Every snapshot record on every host, with its `ModifyIndex`.
pub async fn read_snapshots(ctx: &Ctx) -> Result<Vec<(SnapshotSpec, u64)>, CliError> {
    let prefix = format!("{}/snapshots/desired/", ctx.layout.root());
    let pairs = ctx.kv.get_recurse(&prefix).await?.value;
    pairs
        .iter()
        .map(|pair| Ok((decode::<SnapshotSpec>(pair)?, pair.modify_index)))
        .collect()
}

async fn read_snapshot_status(
    ctx: &Ctx,
    host: &HostId,
    id: &SnapshotId,
) -> Result<Option<SnapshotStatus>, CliError> {
    match ctx
        .kv
        .get(&ctx.layout.snapshot_status(host, id))
        .await?
        .value
    {
        Some(pair) => decode(&pair).map(Some),
        None => Ok(None),
    }
}

async fn find_snapshot(ctx: &Ctx, id: &SnapshotId) -> Result<(SnapshotSpec, u64), CliError> {
    read_snapshots(ctx)
        .await?
        .into_iter()
        .find(|(spec, _)| spec.id == *id)
        .ok_or_else(|| CliError::SnapshotNotFound {
            id: id.clone(),
            prefix: format!("{}/snapshots/desired/", ctx.layout.root()),
        })
}

fn snapshot_table(views: &[SnapshotView], out: &mut dyn Write) -> std::io::Result<()> {
    let mut table = Table::new(&["ID", "VOLUME", ">SIZE", "STATE", "KIND", "CREATED"]);
    let now = now_ms();
    for view in views {
        table.row(vec![
            view.spec.id.to_string(),
            view.spec.volume.to_string(),
            format::size(view.spec.size),
            view.state.clone(),
            if view.spec.scheduled {
                "scheduled"
            } else {
                "on demand"
            }
            .to_owned(),
            format!(
                "{} ago",
                format::age(now.saturating_sub(view.spec.created_ms))
            ),
        ]);
    }
    table.write(out)
}

/// `snapshots create VOLUME`.
pub async fn create(
    ctx: &Ctx,
    args: &SnapshotCreateArgs,
    ui: &mut Ui<'_>,
) -> Result<SnapshotView, CliError> {
    let id = SnapshotId::generate();
    let volume = store::find_spec(ctx, &args.volume).await?.spec;
    crate::migrate::ensure_hydrated(ctx, &volume, "snapshot").await?;
    let spec = record(ctx, &args.volume, &id).await?;
    let status = if args.wait.detach {
        None
    } else {
        let deadline = Deadline::after(Duration::from_secs(args.wait.timeout));
        Some(until(ctx, &spec, SnapshotState::Ready, deadline, ui).await?)
    };
    let view = SnapshotView::new(spec, status);
    if args.json {
        print_json(&view, ui.out())?;
    } else {
        snapshot_table(std::slice::from_ref(&view), ui.out())?;
    }
    Ok(view)
}

/// Writes a new snapshot record of `volume` and its reservation in one txn,
/// after admission on the volume's host.
async fn record(
    ctx: &Ctx,
    volume: &volume_model::names::VolumeId,
    id: &SnapshotId,
) -> Result<SnapshotSpec, CliError> {
    for attempt in 1..=MAX_ATTEMPTS {
        let entry = store::find_spec(ctx, volume).await?;
        if entry.spec.destroy {
            return Err(CliError::BeingDestroyed { id: volume.clone() });
        }
        let host = store::read_host(ctx, &entry.spec.host).await?;
        let candidate = Candidate {
            host: host.record.clone(),
            ledger: host.ledger,
        };
        let size = entry.spec.size;
        if let Err(refusal) = candidate
            .committed_usage()
            .admit_growth(&host.record.policy, size)
        {
            return Err(CliError::SnapshotRefused {
                volume: volume.clone(),
                host: entry.spec.host.clone(),
                size,
                refusal,
            });
        }
        let spec = SnapshotSpec {
            id: id.clone(),
            volume: volume.clone(),
            host: entry.spec.host.clone(),
            size,
            created_ms: now_ms(),
            scheduled: false,
            destroy: false,
        };
        let ledger_after = Ledger {
            reserved: host.ledger.reserved + size,
            volumes: host.ledger.volumes,
        };
        let ops = [
            reserve::ledger_write(ctx, &spec.host, &ledger_after, host.ledger_index),
            TxnOp::Cas {
                key: ctx.layout.snapshot_desired(&spec.host, id),
                value: encode(&spec),
                flags: 0,
                index: 0,
            },
            // The volume is still the one read (not destroyed meanwhile).
            TxnOp::CheckIndex {
                key: ctx.layout.desired(&spec.host, volume),
                index: entry.index,
            },
        ];
        match ctx.kv.txn(&ops).await {
            Ok(_) => return Ok(spec),
            Err(consul_kv::Error::TxnConflict { .. }) => reserve::backoff(attempt).await,
            Err(other) => return Err(other.into()),
        }
    }
    Err(CliError::Contended {
        what: format!("recording a snapshot of {volume}"),
        attempts: MAX_ATTEMPTS,
    })
}

/// Waits until the snapshot's host reports `goal` (or, for `Destroying`,
/// until its record is gone).
async fn until(
    ctx: &Ctx,
    spec: &SnapshotSpec,
    goal: SnapshotState,
    deadline: Deadline,
    ui: &mut Ui<'_>,
) -> Result<SnapshotStatus, CliError> {
    let started = Instant::now();
    let subject = spec.id.to_string();
    let mut last = "pending".to_owned();
    loop {
        let status = read_snapshot_status(ctx, &spec.host, &spec.id).await?;
        if let Some(status) = &status {
            last = status.state.as_str().to_owned();
            // `destroying` is the host at work, not done: a destroy is done
            // only when the record is gone (below).
            if status.state == goal && goal != SnapshotState::Destroying {
                ui.end_progress();
                return Ok(status.clone());
            }
            if status.state == SnapshotState::Error && goal != SnapshotState::Destroying {
                ui.end_progress();
                return Err(CliError::SnapshotFailed {
                    id: spec.id.clone(),
                    host: spec.host.clone(),
                    message: status.error.clone().unwrap_or_default(),
                });
            }
        }
        if goal == SnapshotState::Destroying
            && ctx
                .kv
                .get(&ctx.layout.snapshot_desired(&spec.host, &spec.id))
                .await?
                .value
                .is_none()
        {
            ui.end_progress();
            return Ok(status.unwrap_or(SnapshotStatus {
                id: spec.id.clone(),
                volume: spec.volume.clone(),
                state: SnapshotState::Destroying,
                size: spec.size,
                taken: None,
                error: None,
                updated_ms: now_ms(),
            }));
        }
        ui.progress(&subject, &last, started.elapsed());
        if tokio::time::Instant::now() >= deadline.at {
            ui.end_progress();
            return Err(CliError::TimedOut(Box::new(WaitTimedOut {
                id: spec.volume.clone(),
                host: spec.host.clone(),
                goal: format!("snapshot {} {}", spec.id, goal.as_str()),
                last_state: last,
                timeout: deadline.timeout,
                hint: String::new(),
            })));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `snapshots list VOLUME`.
pub async fn list(
    ctx: &Ctx,
    args: &SnapshotListArgs,
    ui: &mut Ui<'_>,
) -> Result<Vec<SnapshotView>, CliError> {
    let volume = store::find_spec(ctx, &args.volume).await?.spec;
    let mut views = Vec::new();
    for (spec, _) in read_snapshots(ctx).await? {
        if spec.volume == volume.id {
            let status = read_snapshot_status(ctx, &spec.host, &spec.id).await?;
            views.push(SnapshotView::new(spec, status));
        }
    }
    views.sort_by_key(|v| v.spec.created_ms);
    if args.json {
        print_json(&views, ui.out())?;
    } else {
        snapshot_table(&views, ui.out())?;
    }
    Ok(views)
}

/// `snapshots destroy SNAPSHOT`: the destroy intent on its record; its host
/// removes it and returns the reservation.
pub async fn destroy(
    ctx: &Ctx,
    args: &SnapshotDestroyArgs,
    ui: &mut Ui<'_>,
) -> Result<(), CliError> {
    let mut marked = None;
    for attempt in 1..=MAX_ATTEMPTS {
        let (mut spec, index) = find_snapshot(ctx, &args.snapshot).await?;
        if spec.destroy {
            marked = Some(spec);
            break;
        }
        spec.destroy = true;
        let op = TxnOp::Cas {
            key: ctx.layout.snapshot_desired(&spec.host, &spec.id),
            value: encode(&spec),
            flags: 0,
            index,
        };
        match ctx.kv.txn(std::slice::from_ref(&op)).await {
            Ok(_) => {
                marked = Some(spec);
                break;
            }
            Err(consul_kv::Error::TxnConflict { .. }) => reserve::backoff(attempt).await,
            Err(other) => return Err(other.into()),
        }
    }
    let spec = marked.ok_or_else(|| CliError::Contended {
        what: format!("destroying {}", args.snapshot),
        attempts: MAX_ATTEMPTS,
    })?;
    if !args.wait.detach {
        let deadline = Deadline::after(Duration::from_secs(args.wait.timeout));
        let _ = until(ctx, &spec, SnapshotState::Destroying, deadline, ui).await?;
    }
    if args.json {
        print_json(&spec, ui.out())?;
    } else if args.wait.detach {
        writeln!(ui.out(), "destroy of {} requested", spec.id)?;
    } else {
        writeln!(ui.out(), "destroyed {}", spec.id)?;
    }
    Ok(())
}

/// `create NAME --snapshot-id SNAPSHOT [--size GB]`: a create pinned to the
/// snapshot's host, at least the snapshot's size, encrypted as its volume.
pub async fn restore_request(
    ctx: &Ctx,
    args: &crate::args::CreateArgs,
    snapshot: &SnapshotId,
    size: Option<Bytes>,
) -> Result<CreateRequest, CliError> {
    let (spec, _) = find_snapshot(ctx, snapshot).await?;
    if spec.destroy {
        return Err(CliError::Usage(format!(
            "snapshot {snapshot} is being destroyed"
        )));
    }
    let origin = store::find_spec(ctx, &spec.volume).await?.spec;
    let size = size.unwrap_or(spec.size);
    if size < spec.size {
        return Err(CliError::Usage(format!(
            "--size: {} is smaller than snapshot {snapshot} ({}); a restore is at least the snapshot's size",
            format::size(size),
            format::size(spec.size)
        )));
    }
    Ok(CreateRequest {
        name: args.name.clone(),
        region: origin.region.clone(),
        size,
        encrypted: origin.encrypted,
        require_unique_zone: false,
        pinned_host: Some(spec.host.clone()),
        id_from_caller: args.id.is_some(),
        auto_extend: None,
        source: Some(VolumeSource::Snapshot {
            snapshot: snapshot.clone(),
        }),
    })
}

/// `fork VOLUME [--name NAME]`: a new volume on the volume's host from a
/// fresh snapshot of it.
pub async fn fork(ctx: &Ctx, args: &ForkArgs, ui: &mut Ui<'_>) -> Result<(), CliError> {
    let origin: VolumeSpec = store::find_spec(ctx, &args.volume).await?.spec;
    if origin.destroy {
        return Err(CliError::BeingDestroyed {
            id: origin.id.clone(),
        });
    }
    crate::migrate::ensure_hydrated(ctx, &origin, "fork").await?;
    let request = CreateRequest {
        name: args.name.clone().unwrap_or_else(|| origin.name.clone()),
        region: origin.region.clone(),
        size: origin.size,
        encrypted: origin.encrypted,
        require_unique_zone: false,
        pinned_host: Some(origin.host.clone()),
        id_from_caller: false,
        auto_extend: None,
        source: Some(VolumeSource::Fork {
            volume: origin.id.clone(),
            snapshot: SnapshotId::generate(),
        }),
    };
    let id = volume_model::names::VolumeId::generate();
    let reserved = reserve::reserve(ctx, &request, &id, ui).await?;
    let create_args = crate::args::CreateArgs {
        name: request.name.clone(),
        size: None,
        region: None,
        snapshot_id: None,
        no_encryption: !request.encrypted,
        count: 1,
        require_unique_zone: false,
        host: None,
        id: None,
        json: args.json,
        auto_extend: Default::default(),
        wait: (&args.wait).into(),
    };
    let deadline = Deadline::after(Duration::from_secs(args.wait.timeout));
    finish_create(ctx, &create_args, vec![reserved], deadline, ui)
        .await
        .map(drop)
}

/// Snapshot count and reserved size per host, for `hosts`.
pub async fn per_host(
    ctx: &Ctx,
) -> Result<std::collections::BTreeMap<HostId, (u32, Bytes)>, CliError> {
    let mut sums = std::collections::BTreeMap::new();
    for (spec, _) in read_snapshots(ctx).await? {
        let entry = sums.entry(spec.host.clone()).or_insert((0u32, Bytes::ZERO));
        entry.0 += 1;
        entry.1 = entry.1 + spec.size;
    }
    Ok(sums)
}

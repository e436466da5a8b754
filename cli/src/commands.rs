//! The commands: each reads or writes the store through [`Ctx`] and prints
//! through [`Ui`].

use std::io::Write;
use std::time::Duration;

use clap::CommandFactory;
use serde::Serialize;
use std::collections::BTreeMap;
use volume_control::layout::UnfenceRequest;
use volume_control::layout::{HostRecord, Ledger, VolumeSpec, VolumeState};
use volume_control::placement::Candidate;
use volume_model::fence::FenceReason;
use volume_model::health::{PoolHealth, VolumeHealth};
use volume_model::names::{HostId, VolumeId};
use volume_model::units::{Bytes, Percent};
use volume_model::volume_growth::AutoExtend;

use crate::args::{
    AutoExtendArgs, Cli, CompletionsArgs, CreateArgs, DestroyArgs, ExtendArgs, HostsArgs, ListArgs,
    ShowArgs, UnfenceArgs, UpdateArgs,
};
use crate::error::CliError;
use crate::format::{self, Table};
use crate::reserve::{self, CreateRequest};
use crate::store::{self, now_ms, Ctx, SpecEntry, StatusEntry};
use crate::ui::Ui;
use crate::wait::{self, Deadline, Ready};

/// A volume as `--json` prints it: the desired record's fields (`size` in
/// bytes), the state, and the host's status record as it stores it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    #[serde(flatten)]
    pub spec: VolumeSpec,
    /// The host's state, `pending` before its first report, `destroying`
    /// once destroy is requested.
    pub state: String,
    pub status: Option<serde_json::Value>,
    /// Why its host fenced the volume (its I/O waits), while it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fenced: Option<FenceReason>,
    /// A volume made by a fork or move from another host: its copy's
    /// progress (the destination's migration status).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migrate::Hydration>,
    /// `fenced` while the volume is fenced; `healthy`; the thin LV's own health when LVM flags it (`failed`,
    /// `unknown`); else `pool <health>` while its host's pool cannot take
    /// writes (e.g. `pool out_of_data`).
    pub health: String,
}

impl VolumeView {
    pub(crate) fn new(spec: VolumeSpec, status: Option<&StatusEntry>) -> VolumeView {
        let state = match status {
            _ if spec.destroy => "destroying".to_owned(),
            Some(entry) => entry.status.state.as_str().to_owned(),
            None => "pending".to_owned(),
        };
        let health = status.map(|entry| entry.status.health).unwrap_or_default();
        let fenced = status.and_then(|entry| entry.status.fenced);
        VolumeView {
            state,
            status: status.map(|entry| entry.raw.clone()),
            health: match fenced {
                Some(reason) => format!("fenced ({})", reason.as_str()),
                None => health.as_str().to_owned(),
            },
            fenced,
            migration: None,
            spec,
        }
    }

    /// The state column: `hydrating` while a usable volume's copy runs.
    fn display_state(&self) -> String {
        let copying = self.migration.as_ref().is_some_and(|m| m.copying());
        if copying && self.state == VolumeState::Ready.as_str() {
            "hydrating".to_owned()
        } else {
            self.state.clone()
        }
    }

    /// Shows the host pool's health on a volume that is otherwise healthy.
    fn with_pool_health(mut self, pool: Option<PoolHealth>) -> VolumeView {
        if let Some(pool) = pool.filter(|pool| !pool.takes_writes()) {
            if self.health == VolumeHealth::Healthy.as_str() {
                self.health = format!("pool {pool}");
            }
        }
        self
    }

    fn device(&self) -> Option<&str> {
        self.status.as_ref()?.get("device")?.as_str()
    }
}

pub(crate) fn volume_table(volumes: &[VolumeView], out: &mut dyn Write) -> std::io::Result<()> {
    let mut table = Table::new(&[
        "ID", "NAME", "REGION", "ZONE", "HOST", ">SIZE", "ENC", "STATE", "HEALTH", "DEVICE",
    ]);
    for view in volumes {
        let spec = &view.spec;
        table.row(vec![
            spec.id.to_string(),
            spec.name.to_string(),
            spec.region.to_string(),
            spec.zone.to_string(),
            spec.host.to_string(),
            format::size(spec.size),
            if spec.encrypted { "yes" } else { "no" }.to_owned(),
            view.display_state(),
            view.health.clone(),
            view.device().unwrap_or("-").to_owned(),
        ]);
    }
    table.write(out)
}

pub(crate) fn print_json<T: Serialize + ?Sized>(
    value: &T,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *out, value).expect("views serialize");
    writeln!(out)?;
    Ok(())
}

/// Places `--count` volumes one transaction each, then (unless
/// `--detach`) waits for every one to be ready.
pub async fn create(
    ctx: &Ctx,
    args: &CreateArgs,
    ui: &mut Ui<'_>,
) -> Result<Vec<VolumeView>, CliError> {
    let size = args
        .size
        .map(|gb| Bytes::from_gb(gb).map_err(|e| CliError::Usage(format!("--size: {e}"))))
        .transpose()?;
    let request = match &args.snapshot_id {
        Some(snapshot) => {
            let mut request = crate::snapshots::restore_request(ctx, args, snapshot, size).await?;
            request.auto_extend = auto_extend_settings(&args.auto_extend, request.size)?;
            request
        }
        None => {
            let size = size.ok_or_else(|| CliError::Usage("--size is required".to_owned()))?;
            let region = args
                .region
                .clone()
                .ok_or_else(|| CliError::Usage("--region is required".to_owned()))?;
            CreateRequest {
                name: args.name.clone(),
                region,
                size,
                encrypted: !args.no_encryption,
                require_unique_zone: args.require_unique_zone,
                pinned_host: args.host.clone(),
                id_from_caller: args.id.is_some(),
                auto_extend: auto_extend_settings(&args.auto_extend, size)?,
                source: None,
            }
        }
    };
    let deadline = Deadline::after(Duration::from_secs(args.wait.timeout));
    if let Some(id) = &args.id {
        if args.count > 1 {
            return Err(CliError::Usage(format!(
                "--id names one volume; it cannot go with --count {}",
                args.count
            )));
        }
        if let Some(volume) = reserve::existing(ctx, &request, id, ui).await? {
            return finish_create(ctx, args, vec![volume], deadline, ui).await;
        }
    }
    if args.count > 1 {
        reserve::check_all_fit(ctx, &request, args.count, ui).await?;
    }
    let mut reserved = Vec::new();
    for _ in 0..args.count {
        // One id per volume, fixed before its first transaction.
        let id = args.id.clone().unwrap_or_else(VolumeId::generate);
        match reserve::reserve(ctx, &request, &id, ui).await {
            Ok(volume) => reserved.push(volume),
            // Another writer took the room the check saw: say what exists.
            Err(CliError::NoPlacement(source)) if !reserved.is_empty() => {
                return Err(CliError::PartialPlacement {
                    wanted: args.count,
                    placed: reserved.into_iter().map(|r| r.spec.id).collect(),
                    source,
                })
            }
            // Say which volumes of this run are already recorded.
            Err(error) if !reserved.is_empty() => {
                return Err(CliError::PartialCreate {
                    wanted: args.count,
                    placed: reserved.into_iter().map(|r| r.spec.id).collect(),
                    source: Box::new(error),
                })
            }
            Err(error) => return Err(error),
        }
    }
    finish_create(ctx, args, reserved, deadline, ui).await
}

/// Waits (unless `--detach`) for each reserved volume and prints them.
pub(crate) async fn finish_create(
    ctx: &Ctx,
    args: &CreateArgs,
    reserved: Vec<reserve::Reserved>,
    deadline: Deadline,
    ui: &mut Ui<'_>,
) -> Result<Vec<VolumeView>, CliError> {
    let mut views = Vec::new();
    for volume in reserved {
        let status = if args.wait.detach {
            None
        } else {
            let ready = wait::until_ready(
                ctx,
                &volume.spec,
                volume.spec_index,
                Ready::Created,
                deadline,
                ui,
            )
            .await?;
            Some(ready)
        };
        views.push(VolumeView::new(volume.spec, status.as_ref()));
    }
    if args.json {
        print_json(&views, ui.out())?;
    } else {
        volume_table(&views, ui.out())?;
    }
    Ok(views)
}

/// Each host's pool health, from the host records.
async fn pool_health(ctx: &Ctx, ui: &mut Ui<'_>) -> Result<BTreeMap<HostId, PoolHealth>, CliError> {
    Ok(store::read_hosts(ctx, ui)
        .await?
        .into_iter()
        .map(|entry| (entry.record.id, entry.record.pool.health))
        .collect())
}

async fn volume_views(ctx: &Ctx, ui: &mut Ui<'_>) -> Result<Vec<VolumeView>, CliError> {
    let specs = store::read_specs(ctx, ui).await?;
    let statuses = store::read_statuses(ctx, ui).await?;
    let pools = pool_health(ctx, ui).await?;
    let migrations = crate::migrate::Migrations::read(ctx, ui).await?;
    let mut views: Vec<VolumeView> = specs
        .into_iter()
        .map(|SpecEntry { spec, .. }| {
            let status = statuses.get(&(spec.host.clone(), spec.id.clone()));
            let pool = pools.get(&spec.host).copied();
            let migration = migrations.hydration(&spec);
            let mut view = VolumeView::new(spec, status).with_pool_health(pool);
            view.migration = migration;
            view
        })
        .collect();
    views.sort_by(|a, b| {
        (&a.spec.name, a.spec.created_ms, &a.spec.id).cmp(&(
            &b.spec.name,
            b.spec.created_ms,
            &b.spec.id,
        ))
    });
    Ok(views)
}

pub async fn list(
    ctx: &Ctx,
    args: &ListArgs,
    ui: &mut Ui<'_>,
) -> Result<Vec<VolumeView>, CliError> {
    let mut views = volume_views(ctx, ui).await?;
    if let Some(region) = &args.region {
        views.retain(|view| view.spec.region == *region);
    }
    if args.json {
        print_json(&views, ui.out())?;
    } else {
        volume_table(&views, ui.out())?;
    }
    Ok(views)
}

pub async fn show(ctx: &Ctx, args: &ShowArgs, ui: &mut Ui<'_>) -> Result<VolumeView, CliError> {
    let SpecEntry { spec, .. } = store::find_spec(ctx, &args.id).await?;
    let status = store::read_status(ctx, &spec.host, &spec.id).await?;
    let pool = pool_health(ctx, ui).await?.get(&spec.host).copied();
    let migration = crate::migrate::hydration(ctx, &spec).await?;
    let mut view = VolumeView::new(spec, status.as_ref()).with_pool_health(pool);
    view.migration = migration;
    if args.json {
        print_json(&view, ui.out())?;
        return Ok(view);
    }
    let spec = &view.spec;
    let mut lines = vec![
        ("id", spec.id.to_string()),
        ("name", spec.name.to_string()),
        ("state", view.display_state()),
        ("health", view.health.clone()),
        ("host", spec.host.to_string()),
        ("region", spec.region.to_string()),
        ("zone", spec.zone.to_string()),
        ("size", format::size(spec.size)),
        (
            "encrypted",
            if spec.encrypted { "yes" } else { "no" }.to_owned(),
        ),
        (
            "auto-extend",
            describe_auto_extend(spec.auto_extend.as_ref()),
        ),
        (
            "created",
            format!(
                "{} ago",
                format::age(now_ms().saturating_sub(spec.created_ms))
            ),
        ),
    ];
    if let Some(migration) = &view.migration {
        let from = match &spec.source {
            Some(volume_control::layout::VolumeSource::Migration { volume, host, .. }) => {
                format!(" from {volume} on {host}")
            }
            _ => String::new(),
        };
        let kind = match migration.spec.as_ref().map(|spec| spec.kind) {
            Some(volume_control::migration::MigrationKind::Move) => "move",
            Some(volume_control::migration::MigrationKind::Fork) => "fork",
            None => "record gone",
        };
        lines.push(("migration", format!("{} ({kind}{from})", migration.id)));
        lines.push(("hydration", migration.describe()));
    }
    if let Some(entry) = &status {
        let status = &entry.status;
        lines.push((
            "device",
            status.device.clone().unwrap_or_else(|| "-".to_owned()),
        ));
        if let Some(node) = &status.node {
            lines.push(("jail node", node.clone()));
        }
        lines.push(("host size", format::size(status.size)));
        lines.push(("data used", status.data_percent.to_string()));
        if let Some(reason) = &status.fenced {
            lines.push(("fenced", reason.to_string()));
        }
        if let Some(error) = &status.error {
            lines.push(("error", error.clone()));
        }
        if let Some(refused) = &status.auto_extend_refused {
            lines.push(("auto-extend refused", refused.clone()));
        }
        lines.push((
            "reported",
            format!(
                "{} ago",
                format::age(now_ms().saturating_sub(status.updated_ms))
            ),
        ));
        // Fields a newer volumed reports that this volctl does not know.
        let known = [
            "id",
            "state",
            "device",
            "size",
            "data_percent",
            "encrypted",
            "error",
            "updated_ms",
            "node",
            "health",
            "auto_extend_refused",
            "fenced",
        ];
        if let Some(fields) = entry.raw.as_object() {
            for (name, value) in fields {
                if !known.contains(&name.as_str()) && !value.is_null() {
                    let text = value
                        .as_str()
                        .map_or_else(|| value.to_string(), str::to_owned);
                    lines.push((name.as_str(), text));
                }
            }
        }
    }
    let width = lines
        .iter()
        .map(|(label, _)| label.len())
        .max()
        .unwrap_or(0);
    let out = ui.out();
    for (label, value) in &lines {
        writeln!(out, "{label:<width$}  {value}")?;
    }
    Ok(view)
}

/// Records the destroy intent (after confirmation) and, unless
/// `--detach`, waits until volumed has removed the volume.
pub async fn destroy(ctx: &Ctx, args: &DestroyArgs, ui: &mut Ui<'_>) -> Result<(), CliError> {
    let SpecEntry { spec, .. } = store::find_spec(ctx, &args.id).await?;
    if !spec.destroy {
        if let Some(migration) = crate::migrate::copying_from(ctx, &spec.id).await? {
            return Err(CliError::SourceOfMigration {
                volume: spec.id,
                migration,
            });
        }
    }
    if !args.yes && !spec.destroy {
        let question = format!(
            "destroy {} ({}, {} on {})? Its data is deleted. [y/N] ",
            spec.id,
            spec.name,
            format::size(spec.size),
            spec.host
        );
        match ui.confirm(&question) {
            None => return Err(CliError::ConfirmationRequired { id: spec.id }),
            Some(Ok(true)) => {}
            Some(Ok(false)) => return Err(CliError::Declined { id: spec.id }),
            Some(Err(error)) => return Err(CliError::Output(error)),
        }
    }
    let marked = reserve::mark_destroy(ctx, &args.id).await?;
    if !args.wait.detach {
        let deadline = Deadline::after(Duration::from_secs(args.wait.timeout));
        wait::until_gone(ctx, &marked.spec, marked.index, deadline, ui).await?;
        writeln!(ui.out(), "destroyed {}", marked.spec.id)?;
    } else {
        writeln!(ui.out(), "destroy of {} requested", marked.spec.id)?;
    }
    Ok(())
}

/// Grows a volume's reservation and desired size atomically and, unless
/// `--detach`, waits for its host to report the new size.
pub async fn extend(ctx: &Ctx, args: &ExtendArgs, ui: &mut Ui<'_>) -> Result<VolumeView, CliError> {
    let size = Bytes::from_gb(args.size).map_err(|e| CliError::Usage(format!("--size: {e}")))?;
    let deadline = Deadline::after(Duration::from_secs(args.wait.timeout));
    let current = store::find_spec(ctx, &args.id).await?.spec;
    crate::migrate::ensure_hydrated(ctx, &current, "extend").await?;
    let grown = reserve::grow(ctx, &args.id, size).await?;
    let status = if args.wait.detach {
        None
    } else {
        let ready = Ready::GrownFrom(grown.previous_size);
        Some(wait::until_ready(ctx, &grown.spec, grown.spec_index, ready, deadline, ui).await?)
    };
    let view = VolumeView::new(grown.spec, status.as_ref());
    volume_table(std::slice::from_ref(&view), ui.out())?;
    Ok(view)
}

/// The three auto-extend flags as settings for a volume of `size`: all
/// three or none, each checked (the error names the flag).
pub fn auto_extend_settings(
    args: &AutoExtendArgs,
    size: Bytes,
) -> Result<Option<AutoExtend>, CliError> {
    let (threshold, increment, limit) = match (
        args.auto_extend_threshold,
        args.auto_extend_increment,
        args.auto_extend_limit,
    ) {
        (None, None, None) => return Ok(None),
        (Some(threshold), Some(increment), Some(limit)) => (threshold, increment, limit),
        (threshold, increment, limit) => {
            let missing: Vec<&str> = [
                (threshold.is_none(), "--auto-extend-threshold"),
                (increment.is_none(), "--auto-extend-increment"),
                (limit.is_none(), "--auto-extend-limit"),
            ]
            .into_iter()
            .filter_map(|(missing, flag)| missing.then_some(flag))
            .collect();
            return Err(CliError::Usage(format!(
                "auto-extend takes --auto-extend-threshold, --auto-extend-increment and \
                 --auto-extend-limit together; missing {}; nothing changed",
                missing.join(", ")
            )));
        }
    };
    let gb = |flag: &str, value: u64| {
        Bytes::from_gb(value).map_err(|e| CliError::Usage(format!("{flag}: {e}")))
    };
    let increment = gb("--auto-extend-increment", increment)?;
    let limit = gb("--auto-extend-limit", limit)?;
    AutoExtend::new(Percent::from_whole(threshold), increment, limit, size)
        .map(Some)
        .map_err(|e| {
            let flag = match e {
                volume_model::volume_growth::AutoExtendError::Threshold { .. } => {
                    "--auto-extend-threshold"
                }
                volume_model::volume_growth::AutoExtendError::Increment { .. } => {
                    "--auto-extend-increment"
                }
                volume_model::volume_growth::AutoExtendError::Limit { .. } => "--auto-extend-limit",
            };
            CliError::Usage(format!(
                "{flag}: {}; nothing changed",
                match e {
                    volume_model::volume_growth::AutoExtendError::Limit { limit, size } => format!(
                        "the limit {} must be larger than the volume's size {}",
                        format::size(limit),
                        format::size(size)
                    ),
                    other => other.to_string(),
                }
            ))
        })
}

/// Auto-extend settings in one phrase, in the units the flags take.
pub fn describe_auto_extend(settings: Option<&AutoExtend>) -> String {
    match settings {
        None => "off".to_owned(),
        Some(rule) => format!(
            "at {} used, by {}, up to {}",
            rule.threshold,
            format::size(rule.increment),
            format::size(rule.limit)
        ),
    }
}

/// Changes a volume's settings in its desired record (one `cas`); bad
/// input changes nothing, and an update that changes nothing writes
/// nothing.
pub async fn update(ctx: &Ctx, args: &UpdateArgs, ui: &mut Ui<'_>) -> Result<VolumeView, CliError> {
    let snapshot_flags = args.scheduled_snapshots.is_some() || args.snapshot_retention.is_some();
    if !args.auto_extend.any() && !args.no_auto_extend && !snapshot_flags {
        return Err(CliError::Usage(
            "nothing to update: give --auto-extend-threshold, --auto-extend-increment and \
             --auto-extend-limit, or --no-auto-extend, or --scheduled-snapshots / \
             --snapshot-retention"
                .to_owned(),
        ));
    }
    let updated = reserve::update(ctx, &args.id, |spec| {
        if args.no_auto_extend {
            spec.auto_extend = None;
        } else if args.auto_extend.any() {
            spec.auto_extend = auto_extend_settings(&args.auto_extend, spec.size)?;
        }
        if let Some(enabled) = args.scheduled_snapshots {
            spec.snapshots.enabled = enabled;
        }
        if let Some(days) = args.snapshot_retention {
            spec.snapshots.retention_days = days;
        }
        Ok(())
    })
    .await?;
    let status = store::read_status(ctx, &updated.spec.host, &updated.spec.id).await?;
    let view = VolumeView::new(updated.spec, status.as_ref());
    if args.json {
        print_json(&view, ui.out())?;
    } else {
        volume_table(std::slice::from_ref(&view), ui.out())?;
        writeln!(
            ui.out(),
            "auto-extend: {}{}",
            describe_auto_extend(view.spec.auto_extend.as_ref()),
            if updated.changed { "" } else { " (unchanged)" }
        )?;
        let schedule = view.spec.snapshots;
        writeln!(
            ui.out(),
            "scheduled snapshots: {}, kept {} day(s)",
            if schedule.enabled { "on" } else { "off" },
            schedule.retention_days
        )?;
    }
    Ok(view)
}

/// Asks the volume's host to lift its fence and, unless `--detach`, waits
/// until the host took the request and its status shows no fence. A volume
/// that is not fenced is not an error (the request is a no-op).
pub async fn unfence(ctx: &Ctx, args: &UnfenceArgs, ui: &mut Ui<'_>) -> Result<(), CliError> {
    let SpecEntry { spec, .. } = store::find_spec(ctx, &args.id).await?;
    let was_fenced = store::read_status(ctx, &spec.host, &spec.id)
        .await?
        .is_some_and(|entry| entry.status.fenced.is_some());
    let key = ctx.layout.unfence(&spec.host, &spec.id);
    let request = UnfenceRequest {
        id: spec.id.clone(),
        requested_ms: now_ms(),
    };
    let body = serde_json::to_vec(&request).expect("requests serialize");
    ctx.kv.put(&key, &body).await?;
    if args.wait.detach {
        writeln!(ui.out(), "unfence of {} requested", spec.id)?;
        return Ok(());
    }
    let deadline = Deadline::after(Duration::from_secs(args.wait.timeout));
    loop {
        let taken = ctx.kv.get(&key).await?.value.is_none();
        let status = store::read_status(ctx, &spec.host, &spec.id).await?;
        let fenced = status.as_ref().and_then(|entry| entry.status.fenced);
        if taken && fenced.is_none() {
            if was_fenced {
                writeln!(ui.out(), "unfenced {}", spec.id)?;
            } else {
                writeln!(ui.out(), "{} is not fenced", spec.id)?;
            }
            return Ok(());
        }
        let last_state = match fenced {
            Some(reason) => format!("fenced ({})", reason.as_str()),
            None => "request not taken yet".to_owned(),
        };
        if tokio::time::Instant::now() >= deadline.at {
            return Err(CliError::TimedOut(Box::new(crate::error::WaitTimedOut {
                id: spec.id.clone(),
                host: spec.host.clone(),
                goal: "unfenced".to_owned(),
                last_state,
                timeout: deadline.timeout,
                hint: format!(
                    " (is volumed running on {}?); the request stays recorded",
                    spec.host
                ),
            })));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A host as `hosts --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    #[serde(flatten)]
    pub record: HostRecord,
    pub ledger: Ledger,
    /// Virtual size still placeable at the host's ratio, counting
    /// reservations not yet on disk.
    pub headroom: Bytes,
    pub heartbeat_age_ms: u64,
    /// Whether the heartbeat is recent enough to place on this host.
    pub fresh: bool,
    /// Snapshot records on the host, and the size they reserve (a
    /// snapshot counts at its volume's virtual size).
    pub snapshots: u32,
    pub snapshot_bytes: Bytes,
}

pub async fn hosts(
    ctx: &Ctx,
    args: &HostsArgs,
    ui: &mut Ui<'_>,
) -> Result<Vec<HostView>, CliError> {
    let now = now_ms();
    let ttl_ms = u64::try_from(ctx.heartbeat_ttl.as_millis()).unwrap_or(u64::MAX);
    let snapshots = crate::snapshots::per_host(ctx).await?;
    let mut views: Vec<HostView> = store::read_hosts(ctx, ui)
        .await?
        .into_iter()
        .filter(|entry| {
            args.region
                .as_ref()
                .is_none_or(|r| entry.record.region == *r)
        })
        .map(|entry| {
            let candidate = Candidate {
                host: entry.record.clone(),
                ledger: entry.ledger,
            };
            let heartbeat_age_ms = now.saturating_sub(entry.record.heartbeat_ms);
            let (count, bytes) = snapshots
                .get(&entry.record.id)
                .copied()
                .unwrap_or((0, Bytes::ZERO));
            HostView {
                snapshots: count,
                snapshot_bytes: bytes,
                headroom: candidate.headroom(),
                fresh: heartbeat_age_ms <= ttl_ms,
                heartbeat_age_ms,
                ledger: entry.ledger,
                record: entry.record,
            }
        })
        .collect();
    views.sort_by(|a, b| {
        (&a.record.region, &a.record.zone, &a.record.id).cmp(&(
            &b.record.region,
            &b.record.zone,
            &b.record.id,
        ))
    });
    if args.json {
        print_json(&views, ui.out())?;
        return Ok(views);
    }
    let mut table = Table::new(&[
        "HOST",
        "REGION",
        "ZONE",
        ">POOL",
        ">DATA%",
        ">META%",
        ">PROVISIONED",
        ">RESERVED",
        ">RATIO",
        ">HEADROOM",
        "HEALTH",
        ">VOLUMES",
        ">ORPHANS",
        ">SNAPSHOTS",
        "HEARTBEAT",
    ]);
    for view in &views {
        let pool = &view.record.pool;
        let policy = &view.record.policy;
        let heartbeat = format::age(view.heartbeat_age_ms);
        table.row(vec![
            view.record.id.to_string(),
            view.record.region.to_string(),
            view.record.zone.to_string(),
            format::size(pool.data_size),
            pool.data_percent().to_string(),
            pool.metadata_percent().to_string(),
            format::size(pool.provisioned),
            format::size(view.ledger.reserved),
            policy.overcommit.to_string(),
            format::size(view.headroom),
            pool.health.to_string(),
            format!(
                "{}/{}",
                view.ledger.volumes.max(pool.volume_count),
                policy.max_volumes
            ),
            // LVs of ours with no desired record: the pool holds them, no
            // reservation does, until `volumed gc` removes them.
            view.record.orphans.len().to_string(),
            format!("{} ({})", view.snapshots, format::size(view.snapshot_bytes)),
            if view.fresh {
                format!("{heartbeat} ago")
            } else {
                format!("{heartbeat} ago (stale)")
            },
        ]);
    }
    table.write(ui.out())?;
    Ok(views)
}

pub fn completions(args: &CompletionsArgs, ui: &mut Ui<'_>) -> Result<(), CliError> {
    clap_complete::generate(args.shell, &mut Cli::command(), "volctl", ui.out());
    Ok(())
}

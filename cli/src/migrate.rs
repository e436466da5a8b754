//! `fork|move VOLUME --host H | --region R`, `cancel`, and the hydration
//! `show` and `list` report: a new volume on another host, usable at once
//! and copied from its source in the background (ARCHITECTURE.md, "Move and
//! fork across hosts").
//!
//! The request is one txn, as a create is: `[cas <root>/migrations/<mig>
//! @0, cas <root>/desired/<dest>/<new id> @0, cas <root>/hosts/<dest>/ledger
//! @index read, check-index <root>/desired/<source host>/<source>]`. A 409
//! re-reads and tries again. Both ids are fixed before the first attempt, so
//! an attempt whose answer was lost and a later one can never both land:
//! each creates the same migration record.
//!
//! Cancel is `[cas spec @index (cancel), cas destination desired @index
//! (destroy), check-index (or check-not-exists) on the destination's
//! migration status]`: the status check makes "refused once complete"
//! atomic, so a cancel never races a move's release into losing both ends.
//!
//! While a volume's copy runs, only part of its blocks is local: volctl
//! refuses to snapshot, fork, move or extend it ([`ensure_hydrated`]), and
//! to destroy the source the copy reads from ([`copying_from`]).

use std::time::Duration;

use consul_kv::{KvPair, TxnOp};
use serde::Serialize;
use tokio::time::Instant;
use volume_control::layout::{VolumeSource, VolumeSpec};
use volume_control::migration::{
    self, MigrationEnd, MigrationKind, MigrationSpec, MigrationState, MigrationStatus, Records,
};
use volume_control::placement::{self, Candidate, NoPlacement, Skip};
use volume_model::hydration::RecoveryRate;
use volume_model::names::{HostId, MigrationId, VolumeId};
use volume_model::units::{Bytes, Percent};

use crate::args::{
    CancelArgs, DestinationArgs, ForkArgs, MigrationWaitArgs, MoveArgs, DEFAULT_RATE_KIB_PER_SEC,
};
use crate::commands::{print_json, volume_table, VolumeView};
use crate::error::{CliError, WaitTimedOut};
use crate::format;
use crate::reserve::{self, MAX_ATTEMPTS};
use crate::store::{self, decode, encode, now_ms, Ctx, HostEntry, SpecEntry};
use crate::ui::Ui;
use crate::wait::{self, Deadline, KeyWatch, Ready};

/// A fork or move to another host, as the command line asks for it.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: MigrationKind,
    pub volume: VolumeId,
    pub destination: DestinationArgs,
    pub rate: RecoveryRate,
}

impl Request {
    fn new(
        kind: MigrationKind,
        volume: &VolumeId,
        destination: DestinationArgs,
        rate: Option<RecoveryRate>,
    ) -> Request {
        let default = RecoveryRate::from_kib_per_sec(DEFAULT_RATE_KIB_PER_SEC.into())
            .expect("the default rate is within the limits");
        Request {
            kind,
            volume: volume.clone(),
            destination,
            rate: rate.unwrap_or(default),
        }
    }
}

fn kind_word(kind: MigrationKind) -> &'static str {
    match kind {
        MigrationKind::Fork => "fork",
        MigrationKind::Move => "move",
    }
}

/// What a fork or move printed with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationOutput {
    pub migration: MigrationSpec,
    /// The new volume, with its `migration` progress.
    pub volume: VolumeView,
    /// A move's source end once it is released.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_status: Option<MigrationStatus>,
}

/// `fork VOLUME --host H | --region R`.
pub async fn fork(
    ctx: &Ctx,
    args: &ForkArgs,
    ui: &mut Ui<'_>,
) -> Result<MigrationOutput, CliError> {
    let request = Request::new(
        MigrationKind::Fork,
        &args.volume,
        args.destination.clone(),
        args.migration.rate,
    );
    run(ctx, &request, args.json, &args.wait, ui).await
}

/// `move VOLUME --host H | --region R`.
pub async fn move_volume(
    ctx: &Ctx,
    args: &MoveArgs,
    ui: &mut Ui<'_>,
) -> Result<MigrationOutput, CliError> {
    let request = Request::new(
        MigrationKind::Move,
        &args.volume,
        DestinationArgs::from(&args.destination),
        args.migration.rate,
    );
    run(ctx, &request, args.json, &args.wait, ui).await
}

/// Writes a step reached: to stdout, or to stderr when stdout is for JSON.
fn step(ui: &mut Ui<'_>, json: bool, line: &str) -> Result<(), CliError> {
    if json {
        ui.note(line);
    } else {
        ui.end_progress();
        writeln!(ui.out(), "{line}")?;
    }
    Ok(())
}

fn seconds(elapsed: Duration) -> String {
    format!("{:.1}s", elapsed.as_secs_f64())
}

/// Records the migration, then (unless `--detach`) waits until the new
/// volume is usable, its copy complete and, for a move, the source gone.
pub async fn run(
    ctx: &Ctx,
    request: &Request,
    json: bool,
    wait_args: &MigrationWaitArgs,
    ui: &mut Ui<'_>,
) -> Result<MigrationOutput, CliError> {
    let started = Instant::now();
    let recorded = record(ctx, request, ui).await?;
    let spec = &recorded.migration;
    let new = &recorded.volume;
    step(
        ui,
        json,
        &format!(
            "recorded the {} of {} on {} to {} on {} (migration {}, copy limited to {})",
            kind_word(spec.kind),
            spec.source.volume,
            spec.source.host,
            new.id,
            new.host,
            spec.id,
            spec.rate
        ),
    )?;
    let timeout = Duration::from_secs(wait_args.timeout);
    let mut ready = None;
    let mut hydrated = None;
    let mut source_status = None;
    if !wait_args.detach {
        let entry = wait::until_ready(
            ctx,
            new,
            recorded.volume_index,
            Ready::Created,
            Deadline::after(timeout),
            ui,
        )
        .await?;
        ready = Some(entry);
        step(
            ui,
            json,
            &format!(
                "{} on {} is usable after {}; copying from {} on {} in the background",
                new.id,
                new.host,
                seconds(started.elapsed()),
                spec.source.volume,
                spec.source.host
            ),
        )?;
        hydrated = Some(until_hydrated(ctx, spec, timeout, ui).await?);
        step(
            ui,
            json,
            &format!(
                "{} on {}: copy complete after {}",
                new.id,
                new.host,
                seconds(started.elapsed())
            ),
        )?;
        if spec.kind == MigrationKind::Move {
            let deadline = Deadline::after(timeout);
            source_status = Some(until_released(ctx, spec, deadline, ui).await?);
            let source = &recorded.source;
            wait::until_gone(ctx, &source.spec, source.index, deadline, ui).await?;
            step(
                ui,
                json,
                &format!(
                    "moved after {}: {} on {} is destroyed and its {} on {} returned",
                    seconds(started.elapsed()),
                    source.spec.id,
                    source.spec.host,
                    format::size(source.spec.size),
                    source.spec.host
                ),
            )?;
        }
    }
    let mut view = VolumeView::new(new.clone(), ready.as_ref());
    view.migration = Some(Hydration {
        id: spec.id.clone(),
        spec: Some(spec.clone()),
        status: hydrated,
    });
    let output = MigrationOutput {
        migration: spec.clone(),
        volume: view,
        source_status,
    };
    if json {
        print_json(&output, ui.out())?;
    } else {
        volume_table(std::slice::from_ref(&output.volume), ui.out())?;
    }
    Ok(output)
}

/// A migration as its txn recorded it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub migration: MigrationSpec,
    /// The new volume's desired record.
    pub volume: VolumeSpec,
    /// Its `ModifyIndex` as written.
    pub volume_index: u64,
    /// The source's desired record as the txn checked it.
    pub source: SpecEntry,
    /// Transactions sent (1 when nobody else was writing).
    pub attempts: u32,
}

/// The records one attempt writes, decided on one read of the store.
struct Plan {
    migration: MigrationSpec,
    volume: VolumeSpec,
    destination: HostEntry,
    ledger_after: volume_control::layout::Ledger,
}

fn require_endpoint(entry: &HostEntry, role: &'static str) -> Result<(), CliError> {
    match entry.record.migration {
        Some(_) => Ok(()),
        None => Err(CliError::NoMigrationEndpoint {
            host: entry.record.id.clone(),
            role,
        }),
    }
}

fn candidate(entry: &HostEntry) -> Candidate {
    Candidate {
        host: entry.record.clone(),
        ledger: entry.ledger,
    }
}

/// The ids and the time every attempt writes.
struct Fixed {
    migration: MigrationId,
    volume: VolumeId,
    created_ms: u64,
}

/// Checks the request against one read of the store and decides what to
/// write; refuses with nothing written.
fn plan(
    ctx: &Ctx,
    request: &Request,
    fixed: &Fixed,
    source: &VolumeSpec,
    hosts: &[HostEntry],
) -> Result<Plan, CliError> {
    if source.destroy {
        return Err(CliError::BeingDestroyed {
            id: source.id.clone(),
        });
    }
    if !source.encrypted {
        return Err(CliError::Unencrypted {
            volume: source.id.clone(),
        });
    }
    let find = |host: &HostId| hosts.iter().find(|entry| entry.record.id == *host);
    let Some(source_host) = find(&source.host) else {
        return Err(CliError::BadRecord {
            key: ctx.layout.host_info(&source.host),
            reason: format!(
                "host {} has published no record, although {} is placed on it",
                source.host, source.id
            ),
        });
    };
    require_endpoint(source_host, "source")?;
    let ttl_ms = u64::try_from(ctx.heartbeat_ttl.as_millis()).unwrap_or(u64::MAX);
    let now = now_ms();
    let (destination, destination_host) =
        match (&request.destination.host, &request.destination.region) {
            (Some(host), _) => {
                let entry = find(host);
                // The same host is `validate`'s refusal, endpoint or not.
                if let Some(entry) = entry.filter(|_| *host != source.host) {
                    require_endpoint(entry, "destination")?;
                    let age_ms = now.saturating_sub(entry.record.heartbeat_ms);
                    if age_ms > ttl_ms {
                        return Err(CliError::from(NoPlacement {
                            region: entry.record.region.clone(),
                            size: source.size,
                            pinned_host: Some(host.clone()),
                            skipped: vec![(host.clone(), Skip::StaleHeartbeat { age_ms })],
                            most_headroom: None,
                        }));
                    }
                }
                (entry, host.clone())
            }
            (None, Some(region)) => {
                let others = hosts.iter().filter(|entry| {
                    entry.record.region == *region && entry.record.id != source.host
                });
                let (with, without): (Vec<&HostEntry>, Vec<&HostEntry>) =
                    others.partition(|entry| entry.record.migration.is_some());
                let candidates: Vec<Candidate> =
                    with.iter().map(|entry| candidate(entry)).collect();
                let placed = placement::place(
                    &placement::Request {
                        region: region.clone(),
                        size: source.size,
                        zones_in_use: Default::default(),
                        require_unique_zone: false,
                        pinned_host: None,
                        now_ms: now,
                        heartbeat_ttl_ms: ttl_ms,
                        spread: rand::random(),
                    },
                    &candidates,
                )
                .map_err(|placement| CliError::NoMigrationHost {
                    placement: Box::new(placement),
                    without_endpoint: without
                        .iter()
                        .map(|entry| entry.record.id.clone())
                        .collect(),
                })?;
                (find(&placed.host), placed.host)
            }
            (None, None) => {
                return Err(CliError::Usage(
                    "give --host or --region: where the volume goes".to_owned(),
                ))
            }
        };
    let migration = MigrationSpec {
        id: fixed.migration.clone(),
        kind: request.kind,
        source: MigrationEnd {
            host: source.host.clone(),
            volume: source.id.clone(),
        },
        destination: MigrationEnd {
            host: destination_host,
            volume: fixed.volume.clone(),
        },
        rate: request.rate,
        created_ms: fixed.created_ms,
        cancel: false,
    };
    let destination_candidate = destination.map(candidate);
    let admitted = migration::validate(
        &migration,
        &Records {
            source_volume: Some(source),
            destination: destination_candidate.as_ref(),
        },
    )
    .map_err(|refusal| CliError::MigrationRefused {
        volume: source.id.clone(),
        refusal,
    })?;
    let destination = destination.expect("validate refuses a missing destination host");
    let volume = VolumeSpec {
        id: fixed.volume.clone(),
        name: source.name.clone(),
        host: destination.record.id.clone(),
        region: destination.record.region.clone(),
        zone: destination.record.zone.clone(),
        size: admitted.size,
        encrypted: source.encrypted,
        created_ms: fixed.created_ms,
        destroy: false,
        source: Some(VolumeSource::Migration {
            id: fixed.migration.clone(),
            volume: source.id.clone(),
            host: source.host.clone(),
        }),
        snapshots: source.snapshots,
        // Growing a volume while its copy runs would outgrow the source's
        // blocks; the operator sets it again once the copy is complete.
        auto_extend: None,
    };
    Ok(Plan {
        migration,
        volume,
        destination: destination.clone(),
        ledger_after: admitted.ledger_after,
    })
}

/// Reads back a migration whose txn's answer was lost: any record under
/// its (random) id is ours. `None`: it did not land.
async fn read_back(
    ctx: &Ctx,
    fixed: &Fixed,
    source: &SpecEntry,
    attempts: u32,
) -> Result<Option<Recorded>, CliError> {
    let get = |key: String| async move {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match ctx.kv.get(&key).await {
                Ok(answer) => return Ok(answer.value),
                Err(error)
                    if reserve::outcome_unknown(&error)
                        && attempt < reserve::READ_BACK_ATTEMPTS =>
                {
                    reserve::backoff(attempt).await;
                }
                Err(error) if reserve::outcome_unknown(&error) => {
                    return Err(CliError::MigrationOutcomeUnknown {
                        id: fixed.migration.clone(),
                        volume: fixed.volume.clone(),
                        source: error,
                    })
                }
                Err(error) => return Err(CliError::from(error)),
            }
        }
    };
    let Some(pair) = get(ctx.layout.migration(&fixed.migration)).await? else {
        return Ok(None);
    };
    let migration: MigrationSpec = decode(&pair)?;
    let key = ctx
        .layout
        .desired(&migration.destination.host, &fixed.volume);
    let pair: Option<KvPair> = get(key.clone()).await?;
    let Some(pair) = pair else {
        return Err(CliError::BadRecord {
            key,
            reason: format!(
                "missing, although migration {} names it as its new volume",
                fixed.migration
            ),
        });
    };
    Ok(Some(Recorded {
        volume: decode(&pair)?,
        volume_index: pair.modify_index,
        migration,
        source: source.clone(),
        attempts,
    }))
}

/// Decides and writes the migration's records in one txn; see the module docs.
pub async fn record(ctx: &Ctx, request: &Request, ui: &mut Ui<'_>) -> Result<Recorded, CliError> {
    let fixed = Fixed {
        migration: MigrationId::generate(),
        volume: VolumeId::generate(),
        created_ms: now_ms(),
    };
    let mut in_doubt = false;
    for attempt in 1..=MAX_ATTEMPTS {
        let source = store::find_spec(ctx, &request.volume).await?;
        if attempt == 1 {
            ensure_hydrated(ctx, &source.spec, kind_word(request.kind)).await?;
        }
        if in_doubt {
            // A late commit of the lost attempt shows up here.
            if let Some(recorded) = read_back(ctx, &fixed, &source, attempt - 1).await? {
                return Ok(recorded);
            }
        }
        if let Some(other) = sourced_from(ctx, &source.spec.id)
            .await?
            .into_iter()
            .find(|other| other.id != fixed.migration)
            .filter(|other| {
                request.kind == MigrationKind::Move || other.kind == MigrationKind::Move
            })
        {
            return Err(CliError::SourceInMigration {
                volume: source.spec.id.clone(),
                migration: other.id,
                kind: kind_word(other.kind),
            });
        }
        let hosts = store::read_hosts(ctx, ui).await?;
        let plan = plan(ctx, request, &fixed, &source.spec, &hosts)?;
        let volume_key = ctx.layout.desired(&plan.volume.host, &plan.volume.id);
        let ops = [
            TxnOp::Cas {
                key: ctx.layout.migration(&fixed.migration),
                value: encode(&plan.migration),
                flags: 0,
                index: 0,
            },
            TxnOp::Cas {
                key: volume_key.clone(),
                value: encode(&plan.volume),
                flags: 0,
                index: 0,
            },
            reserve::ledger_write(
                ctx,
                &plan.destination.record.id,
                &plan.ledger_after,
                plan.destination.ledger_index,
            ),
            // The source is still the one checked (not destroyed
            // meanwhile), and rewritten as it is: a concurrent fork or
            // move of it fails this `cas`, re-reads, and sees this one
            // (a move needs its source to itself).
            TxnOp::Cas {
                key: ctx.layout.desired(&source.spec.host, &source.spec.id),
                value: encode(&source.spec),
                flags: 0,
                index: source.index,
            },
        ];
        match ctx.kv.txn(&ops).await {
            Ok(results) => {
                return Ok(Recorded {
                    migration: plan.migration,
                    volume_index: reserve::written_index(&results, &volume_key),
                    volume: plan.volume,
                    source,
                    attempts: attempt,
                })
            }
            Err(consul_kv::Error::TxnConflict { .. }) => reserve::backoff(attempt).await,
            Err(error) if reserve::outcome_unknown(&error) => {
                ui.warn(&format!(
                    "the answer to the txn recording migration {} was lost ({error}); \
                     reading back whether it was recorded",
                    fixed.migration
                ));
                in_doubt = true;
            }
            Err(other) => return Err(other.into()),
        }
    }
    Err(CliError::Contended {
        what: format!(
            "recording the {} of {}",
            kind_word(request.kind),
            request.volume
        ),
        attempts: MAX_ATTEMPTS,
    })
}

/// A migration's state in a word, as it is stored.
fn state_name(state: Option<&MigrationState>) -> &'static str {
    match state {
        None => "pending",
        Some(MigrationState::Exporting { .. }) => "exporting",
        Some(MigrationState::Hydrating { .. }) => "hydrating",
        Some(MigrationState::SourceUnreachable) => "source_unreachable",
        Some(MigrationState::Complete) => "complete",
        Some(MigrationState::Released) => "released",
        Some(MigrationState::Cancelled) => "cancelled",
        Some(MigrationState::Error { .. }) => "error",
    }
}

/// `42.10% (84 MiB of 200 MiB, 3.6 MiB/s)`, `source unreachable`, `complete`.
pub fn describe_state(state: Option<&MigrationState>) -> String {
    match state {
        None => "pending (no report yet)".to_owned(),
        Some(MigrationState::Hydrating {
            copied,
            total,
            rate,
        }) => format!(
            "{} ({copied} of {total}, {}/s)",
            copied.percent_of(*total),
            Bytes(rate.0)
        ),
        Some(MigrationState::SourceUnreachable) => "source unreachable".to_owned(),
        Some(MigrationState::Error { message }) => format!("error: {message}"),
        Some(other) => state_name(Some(other)).to_owned(),
    }
}

/// The copy's progress on a terminal: `[########------------]`.
fn bar(done: Percent) -> String {
    const WIDTH: u32 = 20;
    let filled = (done.hundredths().min(10_000) * WIDTH / 10_000) as usize;
    format!(
        "[{}{}]",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled)
    )
}

/// The hydration wait's display: a redrawn bar on a terminal; else a plain
/// line per change of state and per tenth of the copy.
struct HydrationBar {
    subject: String,
    started: Instant,
    last_copied: Option<(Bytes, Bytes)>,
    shown: Option<(&'static str, u32)>,
    last_text: Option<String>,
}

impl HydrationBar {
    fn new(subject: String) -> HydrationBar {
        HydrationBar {
            subject,
            started: Instant::now(),
            last_copied: None,
            shown: None,
            last_text: None,
        }
    }

    fn show(&mut self, ui: &mut Ui<'_>, state: Option<&MigrationState>) {
        if let Some(MigrationState::Hydrating { copied, total, .. }) = state {
            self.last_copied = Some((*copied, *total));
        }
        let done = match (state, self.last_copied) {
            (Some(MigrationState::Complete), _) => Percent::FULL,
            (_, Some((copied, total))) => copied.percent_of(total),
            (_, None) => Percent::ZERO,
        };
        let text = match (state, self.last_copied) {
            // The report carries no numbers; the last known ones still hold.
            (Some(MigrationState::SourceUnreachable), Some((copied, total))) => {
                format!("source unreachable ({done}, {copied} of {total} copied)")
            }
            (None, _) => "waiting for the copy to start".to_owned(),
            _ => describe_state(state),
        };
        let stage = (state_name(state), done.hundredths() / 1000);
        if ui.err_is_terminal() {
            let line = format!("{} {text}", bar(done));
            ui.progress(&self.subject, &line, self.started.elapsed());
        } else if self.shown != Some(stage) {
            ui.progress(&self.subject, &text, self.started.elapsed());
        }
        self.shown = Some(stage);
        self.last_text = Some(text);
    }
}

/// Fails the wait once the migration is cancelled or its record is gone.
async fn ensure_going(ctx: &Ctx, spec: &MigrationSpec) -> Result<(), CliError> {
    let key = ctx.layout.migration(&spec.id);
    let Some(pair) = ctx.kv.get(&key).await?.value else {
        return Err(CliError::MigrationNotFound {
            id: spec.id.clone(),
            key,
        });
    };
    let current: MigrationSpec = decode(&pair)?;
    if current.cancel {
        return Err(CliError::MigrationCancelled {
            id: spec.id.clone(),
            volume: spec.destination.volume.clone(),
        });
    }
    Ok(())
}

fn end_failed(spec: &MigrationSpec, end: &MigrationEnd, message: &str) -> CliError {
    CliError::MigrationFailed {
        id: spec.id.clone(),
        host: end.host.clone(),
        message: message.to_owned(),
    }
}

/// Waits for the destination's status `complete`; the deadline moves on
/// each time the copy advances.
async fn until_hydrated(
    ctx: &Ctx,
    spec: &MigrationSpec,
    timeout: Duration,
    ui: &mut Ui<'_>,
) -> Result<MigrationStatus, CliError> {
    let end = &spec.destination;
    let mut watch = KeyWatch::new(ctx.layout.migration_status(&end.host, &spec.id));
    let mut display = HydrationBar::new(format!("{} on {}", end.volume, end.host));
    let mut deadline = Deadline::after(timeout);
    let mut copied_before: Option<Bytes> = None;
    let tick = wait::tick(ui);
    loop {
        let Some(pair) = watch.next(&ctx.kv, deadline, tick).await? else {
            ui.end_progress();
            return Err(CliError::TimedOut(Box::new(WaitTimedOut {
                id: end.volume.clone(),
                host: end.host.clone(),
                goal: format!("hydrated (migration {})", spec.id),
                last_state: display
                    .last_text
                    .unwrap_or_else(|| "not read yet".to_owned()),
                timeout,
                hint: format!(
                    " (the copy did not advance for {}s; is volumed running on {} and {}?); \
                     the migration carries on: see `volctl show {}`",
                    timeout.as_secs(),
                    end.host,
                    spec.source.host,
                    end.volume
                ),
            })));
        };
        let status: Option<MigrationStatus> = pair.as_ref().map(decode).transpose()?;
        let state = status.as_ref().map(|status| &status.state);
        match state {
            Some(MigrationState::Complete) => {
                display.show(ui, state);
                ui.end_progress();
                return Ok(status.expect("a state comes with its status"));
            }
            Some(MigrationState::Error { message }) => {
                ui.end_progress();
                return Err(end_failed(spec, end, message));
            }
            Some(MigrationState::Hydrating { copied, .. }) if Some(*copied) > copied_before => {
                copied_before = Some(*copied);
                deadline = Deadline::after(timeout);
            }
            _ => {}
        }
        if let Err(error) = ensure_going(ctx, spec).await {
            ui.end_progress();
            return Err(error);
        }
        display.show(ui, state);
    }
}

/// A move: waits for the source's status `released` (it has recorded the
/// source's destroy).
async fn until_released(
    ctx: &Ctx,
    spec: &MigrationSpec,
    deadline: Deadline,
    ui: &mut Ui<'_>,
) -> Result<MigrationStatus, CliError> {
    let end = &spec.source;
    let mut watch = KeyWatch::new(ctx.layout.migration_status(&end.host, &spec.id));
    let subject = format!("{} on {}", end.volume, end.host);
    let started = Instant::now();
    let mut last: Option<String> = None;
    let tick = wait::tick(ui);
    loop {
        let Some(pair) = watch.next(&ctx.kv, deadline, tick).await? else {
            ui.end_progress();
            return Err(CliError::TimedOut(Box::new(WaitTimedOut {
                id: end.volume.clone(),
                host: end.host.clone(),
                goal: format!("released (migration {})", spec.id),
                last_state: last.unwrap_or_else(|| "not read yet".to_owned()),
                timeout: deadline.timeout,
                hint: format!(
                    " (is volumed running on {}?); the new volume is complete and stays: \
                     see `volctl show {}`",
                    end.host, end.volume
                ),
            })));
        };
        let status: Option<MigrationStatus> = pair.as_ref().map(decode).transpose()?;
        match status.as_ref().map(|status| &status.state) {
            Some(MigrationState::Released) => {
                ui.end_progress();
                return Ok(status.expect("a state comes with its status"));
            }
            Some(MigrationState::Error { message }) => {
                ui.end_progress();
                return Err(end_failed(spec, end, message));
            }
            Some(MigrationState::Cancelled) => {
                ui.end_progress();
                return Err(CliError::MigrationCancelled {
                    id: spec.id.clone(),
                    volume: spec.destination.volume.clone(),
                });
            }
            _ => {}
        }
        let state = format!(
            "releasing the source: {}",
            describe_state(status.as_ref().map(|status| &status.state))
        );
        if ui.err_is_terminal() || last.as_ref() != Some(&state) {
            ui.progress(&subject, &state, started.elapsed());
        }
        last = Some(state);
    }
}

/// The migration a cancel names: its id, or the new volume's.
async fn resolve(ctx: &Ctx, target: &str) -> Result<MigrationId, CliError> {
    if let Ok(id) = MigrationId::new(target) {
        return Ok(id);
    }
    let Ok(volume) = VolumeId::new(target) else {
        return Err(CliError::Usage(format!(
            "{target:?} is neither a migration id (mig_...) nor a volume id (vol_...)"
        )));
    };
    if let Some(VolumeSource::Migration { id, .. }) =
        store::find_spec(ctx, &volume).await?.spec.source
    {
        return Ok(id);
    }
    // Named by its source: say which migration to cancel instead.
    let source_of = copying_from(ctx, &volume).await?;
    Err(CliError::NotAMigration { volume, source_of })
}

/// A migration still copying from `volume` (neither cancelled nor
/// complete), if any.
pub async fn copying_from(ctx: &Ctx, volume: &VolumeId) -> Result<Option<MigrationId>, CliError> {
    let migrations = Migrations::read_with(ctx, |_| {}).await?;
    let copying = migrations
        .sourced_by(volume, |spec| {
            migrations.state(&spec.destination.host, &spec.id) != Some(&MigrationState::Complete)
        })
        .next()
        .map(|spec| spec.id.clone());
    Ok(copying)
}

/// The migrations from `volume` still in progress: not cancelled, and not
/// released by the source yet (a move's source is destroyed only then).
async fn sourced_from(ctx: &Ctx, volume: &VolumeId) -> Result<Vec<MigrationSpec>, CliError> {
    let migrations = Migrations::read_with(ctx, |_| {}).await?;
    let ended = |spec: &MigrationSpec| {
        matches!(
            migrations.state(&spec.source.host, &spec.id),
            Some(MigrationState::Released | MigrationState::Cancelled)
        )
    };
    let pending = migrations
        .sourced_by(volume, |spec| !ended(spec))
        .cloned()
        .collect();
    Ok(pending)
}

/// `cancel MIGRATION|VOLUME`: the cancel on the migration and the destroy
/// on its new volume, in one txn; unless `--detach`, waits until the new
/// volume is gone.
pub async fn cancel(ctx: &Ctx, args: &CancelArgs, ui: &mut Ui<'_>) -> Result<(), CliError> {
    let id = resolve(ctx, &args.target).await?;
    let key = ctx.layout.migration(&id);
    let mut done = None;
    for attempt in 1..=MAX_ATTEMPTS {
        let Some(pair) = ctx.kv.get(&key).await?.value else {
            return Err(CliError::MigrationNotFound { id, key });
        };
        let spec: MigrationSpec = decode(&pair)?;
        let end = &spec.destination;
        let volume_key = ctx.layout.desired(&end.host, &end.volume);
        let volume = match ctx.kv.get(&volume_key).await?.value {
            Some(pair) => Some(SpecEntry {
                spec: decode(&pair)?,
                index: pair.modify_index,
            }),
            None => None,
        };
        let status_key = ctx.layout.migration_status(&end.host, &id);
        let status_pair = ctx.kv.get(&status_key).await?.value;
        let status: Option<MigrationStatus> = status_pair.as_ref().map(decode).transpose()?;
        let destroying = volume.as_ref().is_none_or(|entry| entry.spec.destroy);
        if spec.cancel && destroying {
            done = Some((spec, volume, true));
            break;
        }
        if !spec.cancel
            && status
                .as_ref()
                .is_some_and(|status| status.state == MigrationState::Complete)
        {
            return Err(CliError::MigrationComplete { id });
        }
        let mut ops = Vec::new();
        if !spec.cancel {
            let mut cancelled = spec.clone();
            cancelled.cancel = true;
            ops.push(TxnOp::Cas {
                key: key.clone(),
                value: encode(&cancelled),
                flags: 0,
                index: pair.modify_index,
            });
        }
        let mut volume = volume;
        if let Some(entry) = volume.as_mut().filter(|entry| !entry.spec.destroy) {
            entry.spec.destroy = true;
            ops.push(TxnOp::Cas {
                key: volume_key.clone(),
                value: encode(&entry.spec),
                flags: 0,
                index: entry.index,
            });
        }
        // Not complete at commit either: a move's source may be released
        // only once its destination is complete, never also cancelled.
        ops.push(match &status_pair {
            Some(pair) => TxnOp::CheckIndex {
                key: status_key,
                index: pair.modify_index,
            },
            None => TxnOp::CheckNotExists { key: status_key },
        });
        match ctx.kv.txn(&ops).await {
            Ok(results) => {
                if let Some(entry) = volume.as_mut() {
                    entry.index = reserve::written_index(&results, &volume_key).max(entry.index);
                }
                let mut cancelled = spec;
                cancelled.cancel = true;
                done = Some((cancelled, volume, false));
                break;
            }
            Err(consul_kv::Error::TxnConflict { .. }) => reserve::backoff(attempt).await,
            Err(other) => return Err(other.into()),
        }
    }
    let Some((spec, volume, already)) = done else {
        return Err(CliError::Contended {
            what: format!("cancelling migration {id}"),
            attempts: MAX_ATTEMPTS,
        });
    };
    let end = &spec.destination;
    let source = &spec.source;
    if already {
        writeln!(ui.out(), "migration {id} is already cancelled")?;
    }
    let Some(volume) = volume else {
        writeln!(
            ui.out(),
            "{} on {} is gone; {} on {} stays",
            end.volume,
            end.host,
            source.volume,
            source.host
        )?;
        return Ok(());
    };
    if args.wait.detach {
        writeln!(
            ui.out(),
            "cancel of migration {id} requested: {} on {} is being destroyed, {} on {} stays",
            end.volume,
            end.host,
            source.volume,
            source.host
        )?;
        return Ok(());
    }
    let deadline = Deadline::after(Duration::from_secs(args.wait.timeout));
    wait::until_gone(ctx, &volume.spec, volume.index, deadline, ui).await?;
    writeln!(
        ui.out(),
        "cancelled migration {id}: {} on {} is destroyed, {} on {} stays",
        end.volume,
        end.host,
        source.volume,
        source.host
    )?;
    Ok(())
}

/// A volume made by a migration, and how far its copy is, as `show` and
/// `list` report it. `--json`: the destination's migration status as
/// stored (`state: pending` before its first report), with `kind` and,
/// once cancelled, `cancel: true`.
#[derive(Debug, Clone)]
pub struct Hydration {
    pub id: MigrationId,
    /// `None` once the migration's record is gone.
    pub spec: Option<MigrationSpec>,
    /// The destination's status.
    pub status: Option<MigrationStatus>,
}

impl Hydration {
    pub fn state(&self) -> Option<&MigrationState> {
        self.status.as_ref().map(|status| &status.state)
    }

    fn cancelled(&self) -> bool {
        self.spec.as_ref().is_some_and(|spec| spec.cancel)
    }

    /// The `hydration` line of `show`.
    pub fn describe(&self) -> String {
        if self.cancelled() {
            return format!("cancelled ({})", describe_state(self.state()));
        }
        if self.spec.is_none() && self.status.is_none() {
            return "unknown (the migration's records are gone)".to_owned();
        }
        describe_state(self.state())
    }

    /// Still copying: a usable volume shows `hydrating` in `list`. A
    /// migration whose record is gone has ended.
    pub fn copying(&self) -> bool {
        self.spec.is_some()
            && !self.cancelled()
            && matches!(
                self.state(),
                None | Some(MigrationState::Hydrating { .. })
                    | Some(MigrationState::SourceUnreachable)
            )
    }

    fn to_json(&self) -> serde_json::Value {
        let mut value = match &self.status {
            Some(status) => serde_json::to_value(status).expect("statuses serialize"),
            None => serde_json::json!({"id": self.id, "state": "pending"}),
        };
        if let Some(spec) = &self.spec {
            value["kind"] = serde_json::to_value(spec.kind).expect("kinds serialize");
            if spec.cancel {
                value["cancel"] = true.into();
            }
        }
        value
    }
}

impl Serialize for Hydration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

/// The migration a volume was made by, if any.
fn migration_of(spec: &VolumeSpec) -> Option<&MigrationId> {
    match &spec.source {
        Some(VolumeSource::Migration { id, .. }) => Some(id),
        _ => None,
    }
}

/// `show`: the hydration of one volume, if a migration made it.
pub async fn hydration(ctx: &Ctx, spec: &VolumeSpec) -> Result<Option<Hydration>, CliError> {
    let Some(id) = migration_of(spec) else {
        return Ok(None);
    };
    let migration = match ctx.kv.get(&ctx.layout.migration(id)).await?.value {
        Some(pair) => Some(decode(&pair)?),
        None => None,
    };
    let status_key = ctx.layout.migration_status(&spec.host, id);
    let status = match ctx.kv.get(&status_key).await?.value {
        Some(pair) => Some(decode(&pair)?),
        None => None,
    };
    Ok(Some(Hydration {
        id: id.clone(),
        spec: migration,
        status,
    }))
}

/// Refuses to `action` a volume whose blocks are still being copied from
/// its source: a snapshot, fork, move or growth of it now would see only
/// the blocks copied so far.
pub async fn ensure_hydrated(
    ctx: &Ctx,
    spec: &VolumeSpec,
    action: &'static str,
) -> Result<(), CliError> {
    let Some(hydration) = hydration(ctx, spec).await? else {
        return Ok(());
    };
    let ended = hydration.spec.is_none() || hydration.state() == Some(&MigrationState::Complete);
    if ended {
        return Ok(());
    }
    Err(CliError::StillHydrating {
        volume: spec.id.clone(),
        progress: hydration.describe(),
        migration: hydration.id,
        action,
    })
}

/// `list`: every migration record and status, read once.
pub struct Migrations {
    specs: std::collections::BTreeMap<MigrationId, MigrationSpec>,
    statuses: std::collections::BTreeMap<(HostId, MigrationId), MigrationStatus>,
}

impl Migrations {
    /// Unreadable records are skipped with a warning.
    pub async fn read(ctx: &Ctx, ui: &mut Ui<'_>) -> Result<Migrations, CliError> {
        Migrations::read_with(ctx, |warning| ui.warn(&warning)).await
    }

    /// Unreadable records are skipped, each told to `skipped`.
    async fn read_with(ctx: &Ctx, mut skipped: impl FnMut(String)) -> Result<Migrations, CliError> {
        let pairs = ctx
            .kv
            .get_recurse(&ctx.layout.migrations_prefix())
            .await?
            .value;
        let mut migrations = Migrations {
            specs: Default::default(),
            statuses: Default::default(),
        };
        for pair in &pairs {
            if let Some(id) = ctx.layout.parse_migration_key(&pair.key) {
                match decode(pair) {
                    Ok(spec) => {
                        migrations.specs.insert(id, spec);
                    }
                    Err(error) => skipped(format!("skipping migration: {error}")),
                }
            } else if let Some(place) = ctx.layout.parse_migration_status_key(&pair.key) {
                match decode(pair) {
                    Ok(status) => {
                        migrations.statuses.insert(place, status);
                    }
                    Err(error) => skipped(format!("ignoring migration status: {error}")),
                }
            }
        }
        Ok(migrations)
    }

    fn state(&self, host: &HostId, id: &MigrationId) -> Option<&MigrationState> {
        self.statuses
            .get(&(host.clone(), id.clone()))
            .map(|status| &status.state)
    }

    /// The migrations from `volume`, not cancelled, that `pending` keeps.
    fn sourced_by<'a>(
        &'a self,
        volume: &'a VolumeId,
        pending: impl Fn(&MigrationSpec) -> bool + 'a,
    ) -> impl Iterator<Item = &'a MigrationSpec> + 'a {
        self.specs
            .values()
            .filter(move |spec| spec.source.volume == *volume && !spec.cancel && pending(spec))
    }

    pub fn hydration(&self, spec: &VolumeSpec) -> Option<Hydration> {
        let id = migration_of(spec)?;
        Some(Hydration {
            id: id.clone(),
            spec: self.specs.get(id).cloned(),
            status: self.statuses.get(&(spec.host.clone(), id.clone())).cloned(),
        })
    }
}

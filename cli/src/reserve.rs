//! The writes that reserve capacity, each one Consul transaction that
//! checks the indexes of what it read, retried with fresh reads when another
//! writer got there first.
//!
//! Create: `[cas <root>/hosts/<host>/ledger @ledger-index (0: create-only),
//! cas <root>/desired/<host>/<id> @0]`, plus, with `--require-unique-zone`,
//! `check-index` (or `check-not-exists`) on every other ledger of the
//! region. Every create and every destroy changes its host's ledger, so a
//! transaction that still matches all those indexes was decided on a view
//! no other writer has changed: no host is over-committed and no zone
//! gets a second volume of the name.
//!
//! With `--id`, the transaction also checks that no other host of the
//! region holds a desired record of that id, so two runs with one id
//! cannot both place it.
//!
//! A create whose answer is lost (the connection drops or times out after
//! the request was sent, or a 5xx) may or may not have committed. The id
//! and the record's contents are fixed before the first attempt, so volctl
//! reads the record back: found, the create is done; not found, it is sent
//! again, to the same host only (a late commit of the lost one and the new
//! one then both `cas` that host's ledger, so at most one lands). If the
//! store stays away, the error names the id and `--id <id>`, which makes a
//! retried *command* find the record instead of making a second volume.
//!
//! Extend: `[cas ledger @index, cas desired spec @index]`.
//! Update (settings only, no size): `[cas desired spec @index]`.
//! Destroy intent: `[cas desired spec @index]` (volumed releases the
//! reservation when it has removed the volume).

use std::collections::BTreeSet;
use std::time::Duration;

use consul_kv::TxnOp;
use volume_control::layout::{Ledger, VolumeSource, VolumeSpec};
use volume_control::placement::{self, Candidate, NoPlacement, Placement};
use volume_model::names::{HostId, Region, VolumeId, VolumeName};
use volume_model::units::Bytes;
use volume_model::volume_growth::AutoExtend;

use crate::error::CliError;
use crate::store::{self, encode, now_ms, Ctx, HostEntry, SpecEntry};
use crate::ui::Ui;

/// How many times a write is tried before volctl gives up on contention.
pub const MAX_ATTEMPTS: u32 = 16;
/// The first retry waits up to this long; each later one doubles it.
const BACKOFF_BASE: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A jittered wait that doubles per attempt, so that writers who lost the
/// same race do not collide again in step.
pub(crate) async fn backoff(attempt: u32) {
    let wait = consul_kv::Backoff::new(BACKOFF_BASE, BACKOFF_MAX).delay(attempt.saturating_add(1));
    tokio::time::sleep(wait).await;
}

/// What a new volume should be, before a host is chosen.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: VolumeName,
    pub region: Region,
    pub size: Bytes,
    pub encrypted: bool,
    pub require_unique_zone: bool,
    pub pinned_host: Option<HostId>,
    /// The id came from the caller (`--id`): another run may be creating
    /// the same id, so the transaction checks every host of the region.
    pub id_from_caller: bool,
    pub auto_extend: Option<AutoExtend>,
    /// A restore or fork on the pinned host; `None`: an empty volume.
    pub source: Option<VolumeSource>,
}

impl CreateRequest {
    /// Whether `spec` is the volume this request asks for (what a retry of
    /// the same command would record).
    pub fn matches(&self, spec: &VolumeSpec) -> bool {
        spec.name == self.name
            && spec.region == self.region
            && spec.size == self.size
            && spec.encrypted == self.encrypted
            && spec.auto_extend == self.auto_extend
            && spec.source == self.source
            && self
                .pinned_host
                .as_ref()
                .is_none_or(|host| *host == spec.host)
    }
}

/// How a record's encryption reads in messages.
fn encryption_word(encrypted: bool) -> &'static str {
    if encrypted {
        "encrypted"
    } else {
        "unencrypted"
    }
}

/// A desired record in one line, for messages.
fn describe(spec: &VolumeSpec) -> String {
    format!(
        "{} {}, {}, in {} on {}",
        spec.name,
        crate::format::size(spec.size),
        encryption_word(spec.encrypted),
        spec.region,
        spec.host
    )
}

/// Reads read-back attempts before volctl gives up on an unanswering store.
pub(crate) const READ_BACK_ATTEMPTS: u32 = 8;

/// Whether a failed write may still have been applied: the request was
/// (or may have been) sent and no answer says what happened.
pub(crate) fn outcome_unknown(error: &consul_kv::Error) -> bool {
    match error {
        consul_kv::Error::Transport { .. } => true,
        consul_kv::Error::Status { status, .. } => *status >= 500,
        _ => false,
    }
}

/// The store as one placement decision sees it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub hosts: Vec<HostEntry>,
    /// Zones of the region that hold a volume of the requested name.
    pub zones_in_use: BTreeSet<volume_model::names::Zone>,
}

/// Reads hosts, then (only if zones matter) desired records. Ledgers are
/// read first: a create that lands in between changes a ledger, which the
/// transaction then catches.
pub async fn snapshot(
    ctx: &Ctx,
    request: &CreateRequest,
    ui: &mut Ui<'_>,
) -> Result<Snapshot, CliError> {
    let hosts = store::read_hosts(ctx, ui).await?;
    let mut zones_in_use = BTreeSet::new();
    if request.require_unique_zone {
        for entry in store::read_specs(ctx, ui).await? {
            if entry.spec.name == request.name && entry.spec.region == request.region {
                zones_in_use.insert(entry.spec.zone);
            }
        }
    }
    Ok(Snapshot {
        hosts,
        zones_in_use,
    })
}

impl Snapshot {
    /// `spread` picks among the hosts tied for the most headroom
    /// (`placement::Request::spread`).
    pub fn decide(
        &self,
        ctx: &Ctx,
        request: &CreateRequest,
        spread: u64,
    ) -> Result<Placement, NoPlacement> {
        let candidates: Vec<Candidate> = self
            .hosts
            .iter()
            .map(|entry| Candidate {
                host: entry.record.clone(),
                ledger: entry.ledger,
            })
            .collect();
        let request = placement::Request {
            region: request.region.clone(),
            size: request.size,
            zones_in_use: self.zones_in_use.clone(),
            require_unique_zone: request.require_unique_zone,
            pinned_host: request.pinned_host.clone(),
            now_ms: now_ms(),
            heartbeat_ttl_ms: u64::try_from(ctx.heartbeat_ttl.as_millis()).unwrap_or(u64::MAX),
            spread,
        };
        placement::place(&request, &candidates)
    }

    /// Records a placement as if written, for planning several in a row.
    fn apply(&mut self, placed: &Placement) {
        if let Some(entry) = self.hosts.iter_mut().find(|e| e.record.id == placed.host) {
            entry.ledger = placed.ledger_after;
        }
        self.zones_in_use.insert(placed.zone.clone());
    }
}

/// Checks that `count` volumes fit one after another on the current view,
/// so that `--count` refuses up front instead of placing some of them.
pub async fn check_all_fit(
    ctx: &Ctx,
    request: &CreateRequest,
    count: u32,
    ui: &mut Ui<'_>,
) -> Result<(), CliError> {
    let mut view = snapshot(ctx, request, ui).await?;
    for fit in 0..count {
        // How many fit does not depend on which tied host each takes.
        let placed = view.decide(ctx, request, 0).map_err(|source| match fit {
            0 => CliError::from(source),
            _ => CliError::CountDoesNotFit {
                wanted: count,
                fit,
                source: Box::new(source),
            },
        })?;
        view.apply(&placed);
    }
    Ok(())
}

/// A reserved volume: its desired record is written, its host's ledger
/// counts it.
#[derive(Debug, Clone)]
pub struct Reserved {
    pub spec: VolumeSpec,
    /// `ModifyIndex` of the desired record as written.
    pub spec_index: u64,
    /// Transactions sent (1 when nobody else was writing).
    pub attempts: u32,
}

pub(crate) fn ledger_write(ctx: &Ctx, host: &HostId, ledger: &Ledger, index: u64) -> TxnOp {
    TxnOp::Cas {
        key: ctx.layout.host_ledger(host),
        value: encode(ledger),
        flags: 0,
        index,
    }
}

/// The index a transaction gave `key` (cas results carry no value).
pub(crate) fn written_index(results: &[consul_kv::TxnResult], key: &str) -> u64 {
    results
        .iter()
        .find(|result| result.kv.key == key)
        .map_or(0, |result| result.kv.modify_index)
}

/// A desired record of `id` that an earlier run recorded (`--id`): the
/// same volume is adopted, anything else under that id is refused.
pub async fn existing(
    ctx: &Ctx,
    request: &CreateRequest,
    id: &VolumeId,
    ui: &mut Ui<'_>,
) -> Result<Option<Reserved>, CliError> {
    let SpecEntry { spec, index } = match store::find_spec(ctx, id).await {
        Ok(entry) => entry,
        Err(CliError::NotFound { .. }) => return Ok(None),
        Err(error) => return Err(error),
    };
    if spec.destroy {
        return Err(CliError::BeingDestroyed { id: id.clone() });
    }
    if !request.matches(&spec) {
        return Err(CliError::IdInUse {
            id: id.clone(),
            existing: describe(&spec),
            requested: format!(
                "{} {}, {}, in {}",
                request.name,
                crate::format::size(request.size),
                encryption_word(request.encrypted),
                request.region
            ),
        });
    }
    ui.warn(&format!(
        "{id} is already recorded ({}): not creating another",
        describe(&spec)
    ));
    Ok(Some(Reserved {
        spec,
        spec_index: index,
        attempts: 0,
    }))
}

/// What a read-back found at the key a lost transaction wrote.
enum ReadBack {
    /// The record we sent: the transaction landed.
    Landed(Box<Reserved>),
    NotThere,
}

/// Reads `spec`'s desired record after a transaction's answer was lost,
/// retrying while the store does not answer.
async fn read_back(ctx: &Ctx, spec: &VolumeSpec, attempts: u32) -> Result<ReadBack, CliError> {
    let key = ctx.layout.desired(&spec.host, &spec.id);
    let mut attempt = 0;
    let pair = loop {
        attempt += 1;
        match ctx.kv.get(&key).await {
            Ok(answer) => break answer.value,
            Err(error) if outcome_unknown(&error) && attempt < READ_BACK_ATTEMPTS => {
                backoff(attempt).await;
            }
            Err(error) if outcome_unknown(&error) => {
                return Err(CliError::OutcomeUnknown {
                    id: spec.id.clone(),
                    host: spec.host.clone(),
                    source: error,
                })
            }
            Err(error) => return Err(error.into()),
        }
    };
    let Some(pair) = pair else {
        return Ok(ReadBack::NotThere);
    };
    let found: VolumeSpec = store::decode(&pair)?;
    // Ids are random and every attempt sends the same record, so anything
    // else under this key was written by someone else.
    if found != *spec {
        return Err(CliError::IdInUse {
            id: spec.id.clone(),
            existing: describe(&found),
            requested: describe(spec),
        });
    }
    Ok(ReadBack::Landed(Box::new(Reserved {
        spec: found,
        spec_index: pair.modify_index,
        attempts,
    })))
}

/// Places one volume and reserves it atomically; see the module docs.
pub async fn reserve(
    ctx: &Ctx,
    request: &CreateRequest,
    id: &VolumeId,
    ui: &mut Ui<'_>,
) -> Result<Reserved, CliError> {
    let mut request = request.clone();
    // Fixed for every attempt, so a read-back can recognise our record.
    let created_ms = now_ms();
    // The record a transaction with a lost answer may have written.
    let mut in_doubt: Option<VolumeSpec> = None;
    for attempt in 1..=MAX_ATTEMPTS {
        if let Some(sent) = &in_doubt {
            // A late commit of the lost transaction shows up here.
            if let ReadBack::Landed(reserved) = read_back(ctx, sent, attempt - 1).await? {
                return Ok(*reserved);
            }
        }
        let view = snapshot(ctx, &request, ui).await?;
        // Concurrent creates spread over the hosts tied for the most
        // headroom instead of all racing for one ledger.
        let placed = view.decide(ctx, &request, rand::random())?;
        let chosen = view
            .hosts
            .iter()
            .find(|entry| entry.record.id == placed.host)
            .expect("placement picks one of the candidates");
        let spec = VolumeSpec {
            id: id.clone(),
            name: request.name.clone(),
            host: placed.host.clone(),
            region: request.region.clone(),
            zone: placed.zone.clone(),
            size: request.size,
            encrypted: request.encrypted,
            created_ms,
            destroy: false,
            source: request.source.clone(),
            snapshots: Default::default(),
            auto_extend: request.auto_extend,
        };
        let spec_key = ctx.layout.desired(&spec.host, id);
        let mut ops = vec![
            ledger_write(ctx, &placed.host, &placed.ledger_after, chosen.ledger_index),
            TxnOp::Cas {
                key: spec_key.clone(),
                value: encode(&spec),
                flags: 0,
                index: 0,
            },
        ];
        let others_in_region = view.hosts.iter().filter(|entry| {
            entry.record.region == request.region && entry.record.id != placed.host
        });
        for entry in others_in_region {
            if request.require_unique_zone {
                let key = ctx.layout.host_ledger(&entry.record.id);
                ops.push(match entry.ledger_index {
                    0 => TxnOp::CheckNotExists { key },
                    index => TxnOp::CheckIndex { key, index },
                });
            }
            if request.id_from_caller {
                let key = ctx.layout.desired(&entry.record.id, id);
                ops.push(TxnOp::CheckNotExists { key });
            }
        }
        match ctx.kv.txn(&ops).await {
            Ok(results) => {
                return Ok(Reserved {
                    spec_index: written_index(&results, &spec_key),
                    spec,
                    attempts: attempt,
                })
            }
            Err(consul_kv::Error::TxnConflict { .. }) => {
                // Another run with the same `--id` may have won.
                if request.id_from_caller {
                    if let Some(reserved) = existing(ctx, &request, id, ui).await? {
                        return Ok(reserved);
                    }
                }
                backoff(attempt).await;
            }
            Err(error) if outcome_unknown(&error) => {
                ui.warn(&format!(
                    "the answer to the create of {id} on {} was lost ({error}); \
                     reading back whether it was recorded",
                    spec.host
                ));
                match read_back(ctx, &spec, attempt).await? {
                    ReadBack::Landed(reserved) => {
                        ui.warn(&format!("{id} was recorded on {}", spec.host));
                        return Ok(*reserved);
                    }
                    ReadBack::NotThere => ui.warn(&format!(
                        "{id} was not recorded; sending it again, to {} only",
                        spec.host
                    )),
                }
                request.pinned_host = Some(spec.host.clone());
                in_doubt = Some(spec);
            }
            Err(other) => return Err(other.into()),
        }
    }
    Err(CliError::Contended {
        what: format!("reserving {id}"),
        attempts: MAX_ATTEMPTS,
    })
}

/// A grown volume: spec and ledger both carry the new size.
#[derive(Debug, Clone)]
pub struct Grown {
    pub spec: VolumeSpec,
    pub spec_index: u64,
    pub previous_size: Bytes,
}

/// Grows a volume's reservation and desired size in one transaction,
/// after admitting the growth against the host's committed usage.
pub async fn grow(ctx: &Ctx, id: &VolumeId, new_size: Bytes) -> Result<Grown, CliError> {
    for attempt in 1..=MAX_ATTEMPTS {
        let SpecEntry { mut spec, index } = store::find_spec(ctx, id).await?;
        if spec.destroy {
            return Err(CliError::BeingDestroyed { id: id.clone() });
        }
        if new_size <= spec.size {
            return Err(CliError::Usage(format!(
                "extend must grow: {id} is {}, asked for {}",
                crate::format::size(spec.size),
                crate::format::size(new_size)
            )));
        }
        let host = store::read_host(ctx, &spec.host).await?;
        if host.ledger_index == 0 {
            // A volume with no reservation: growing it would under-count.
            return Err(CliError::BadRecord {
                key: ctx.layout.host_ledger(&spec.host),
                reason: format!("missing, although {id} is placed on {}", spec.host),
            });
        }
        let growth = new_size - spec.size;
        let candidate = Candidate {
            host: host.record.clone(),
            ledger: host.ledger,
        };
        if let Err(refusal) = candidate
            .committed_usage()
            .admit_growth(&host.record.policy, growth)
        {
            return Err(CliError::GrowthRefused {
                id: id.clone(),
                host: spec.host.clone(),
                growth,
                refusal,
            });
        }
        let ledger_after = Ledger {
            reserved: host.ledger.reserved + growth,
            volumes: host.ledger.volumes,
        };
        let previous_size = spec.size;
        spec.size = new_size;
        let spec_key = ctx.layout.desired(&spec.host, id);
        let ops = [
            ledger_write(ctx, &spec.host, &ledger_after, host.ledger_index),
            TxnOp::Cas {
                key: spec_key.clone(),
                value: encode(&spec),
                flags: 0,
                index,
            },
        ];
        match ctx.kv.txn(&ops).await {
            Ok(results) => {
                return Ok(Grown {
                    spec_index: written_index(&results, &spec_key),
                    spec,
                    previous_size,
                })
            }
            Err(consul_kv::Error::TxnConflict { .. }) => backoff(attempt).await,
            Err(other) => return Err(other.into()),
        }
    }
    Err(CliError::Contended {
        what: format!("growing {id}"),
        attempts: MAX_ATTEMPTS,
    })
}

/// An updated desired record.
#[derive(Debug, Clone)]
pub struct Updated {
    pub spec: VolumeSpec,
    pub spec_index: u64,
    /// False when the record already said so: nothing was written.
    pub changed: bool,
}

/// Applies `change` to a volume's desired record and writes it with `cas`
/// at the index read, re-reading on a conflict. `change` sees the current
/// record each time and may refuse (nothing is written). Settings only:
/// the size and the reservation are `grow`'s.
pub async fn update(
    ctx: &Ctx,
    id: &VolumeId,
    change: impl Fn(&mut VolumeSpec) -> Result<(), CliError>,
) -> Result<Updated, CliError> {
    for attempt in 1..=MAX_ATTEMPTS {
        let SpecEntry { spec, index } = store::find_spec(ctx, id).await?;
        if spec.destroy {
            return Err(CliError::BeingDestroyed { id: id.clone() });
        }
        let mut updated = spec.clone();
        change(&mut updated)?;
        debug_assert_eq!(
            (updated.size, &updated.id, &updated.host),
            (spec.size, &spec.id, &spec.host),
            "an update changes settings only"
        );
        if updated == spec {
            return Ok(Updated {
                spec,
                spec_index: index,
                changed: false,
            });
        }
        let key = ctx.layout.desired(&spec.host, id);
        let op = TxnOp::Cas {
            key: key.clone(),
            value: encode(&updated),
            flags: 0,
            index,
        };
        match ctx.kv.txn(std::slice::from_ref(&op)).await {
            Ok(results) => {
                return Ok(Updated {
                    spec_index: written_index(&results, &key),
                    spec: updated,
                    changed: true,
                })
            }
            Err(consul_kv::Error::TxnConflict { .. }) => backoff(attempt).await,
            Err(other) => return Err(other.into()),
        }
    }
    Err(CliError::Contended {
        what: format!("updating {id}"),
        attempts: MAX_ATTEMPTS,
    })
}

/// Records the destroy intent on the current spec. Returns the spec and
/// the index at which the intent was written (or found).
pub async fn mark_destroy(ctx: &Ctx, id: &VolumeId) -> Result<SpecEntry, CliError> {
    for attempt in 1..=MAX_ATTEMPTS {
        let SpecEntry { mut spec, index } = store::find_spec(ctx, id).await?;
        if spec.destroy {
            return Ok(SpecEntry { spec, index });
        }
        spec.destroy = true;
        let key = ctx.layout.desired(&spec.host, id);
        let op = TxnOp::Cas {
            key: key.clone(),
            value: encode(&spec),
            flags: 0,
            index,
        };
        match ctx.kv.txn(std::slice::from_ref(&op)).await {
            Ok(results) => {
                return Ok(SpecEntry {
                    index: written_index(&results, &key),
                    spec,
                })
            }
            Err(consul_kv::Error::TxnConflict { .. }) => backoff(attempt).await,
            Err(other) => return Err(other.into()),
        }
    }
    Err(CliError::Contended {
        what: format!("recording the destroy of {id}"),
        attempts: MAX_ATTEMPTS,
    })
}

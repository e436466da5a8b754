//! Volume auto-extend, as Fly offers it: a volume whose desired record
//! carries `auto_extend` (threshold, increment, limit) grows by the
//! increment once its usage reaches the threshold, never beyond the limit.
//!
//! Every `[daemon] volume_autoextend_interval` (5 s), while at least one
//! settled volume has auto-extend, one check runs:
//! 1. each watched thin LV's size and data% from device-mapper's own
//!    counters (`ThinBackend::thin_allocations`: a status ioctl per LV,
//!    no LVM command, so it never waits on or delays a pool growth), and
//!    one KV read of `<root>/usage/<host>/` for the guests' own filesystem
//!    reports;
//! 2. the usage of each volume: a fresh report (younger than
//!    `fs_usage_max_age`, covering the volume to within one increment) wins
//!    over data%, the allocated share, which discards lower;
//! 3. for each volume at or over its threshold, a step, admitted and
//!    reserved exactly as `volctl extend` does it: a fresh pool report,
//!    the host's committed usage (`placement::Candidate`) admits the
//!    growth, and one txn does `cas` on the ledger (`reserved += growth`)
//!    and `cas` on the desired record (`size = new size`) at the index the
//!    decision was made on. The daemon then converges the record as any
//!    extend: LV, mapping, filesystem (online when mounted on this host;
//!    left to the guest when the volume is in a jail).
//!
//! A refused step (no headroom, an unhealthy pool) is logged once, shown
//! in the volume's status (`auto_extend_refused`) and counted; that volume
//! is not tried again for [`REFUSED_RETRY_CHECKS`] intervals (30 s by
//! default). A step never starts while the
//! volume has a job or an extend pending, so one crossing makes one step.

use crate::metrics::Metrics;
use consul_kv::{ConsulKv, TxnOp};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use volume_control::layout::{FsUsageReport, HostRecord, Layout, Ledger, VolumeSpec};
use volume_control::placement::{gb, Candidate};
use volume_core::host::VolumeHost;
use volume_core::names::VolumeId;
use volume_core::units::{Bytes, Percent};
use volume_core::volume_growth::{AgedReport, UsageSource};

/// How many check intervals a volume whose step was refused waits.
pub const REFUSED_RETRY_CHECKS: u32 = 6;
/// Ledger writers racing this step: tries before giving up for this check.
const ATTEMPTS: u32 = 8;

/// A settled volume with auto-extend, as the daemon knows it.
#[derive(Debug, Clone)]
pub struct Watched {
    pub spec: VolumeSpec,
    /// `ModifyIndex` of the record the decision is made on.
    pub desired_index: u64,
}

/// One thin LV as this check measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    pub size: Bytes,
    pub allocated: Percent,
}

/// A growth one check decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub spec: VolumeSpec,
    pub desired_index: u64,
    pub to: Bytes,
    pub usage: Percent,
    pub source: UsageSource,
}

/// The steps `candidates` call for. Pure. A volume whose LV is smaller
/// than its record (an extend not yet done) or that this check did not
/// see is left alone.
pub fn plan(
    candidates: &[Watched],
    measured: &BTreeMap<VolumeId, Measured>,
    reports: &BTreeMap<VolumeId, FsUsageReport>,
    now_ms: u64,
    max_age: Duration,
    extent: Bytes,
) -> Vec<Step> {
    let max_age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    candidates
        .iter()
        .filter_map(|candidate| {
            let spec = &candidate.spec;
            let rule = spec.auto_extend.as_ref().filter(|_| !spec.destroy)?;
            let lv = measured.get(&spec.id)?;
            if lv.size < spec.size.round_up_to(extent).unwrap_or(spec.size) {
                return None;
            }
            let report = reports.get(&spec.id).map(|report| AgedReport {
                usage: report.usage,
                age_ms: now_ms.saturating_sub(report.reported_ms),
            });
            let (usage, source) = rule.usage(lv.size, lv.allocated, report, max_age_ms);
            let to = rule.next_size(spec.size, usage)?;
            Some(Step {
                spec: spec.clone(),
                desired_index: candidate.desired_index,
                to,
                usage,
                source,
            })
        })
        .collect()
}

/// How one step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// The new size and its reservation are recorded; the daemon extends.
    Grown {
        from: Bytes,
        to: Bytes,
        usage: Percent,
        source: UsageSource,
    },
    /// Admission refused the growth; the reason goes into the status.
    Refused(String),
    /// The record changed since the decision: the next check decides anew.
    RecordChanged,
    /// The store failed; the next check tries again.
    Failed(String),
}

/// What one check found, per volume.
#[derive(Debug)]
pub struct CheckReport {
    pub outcomes: Vec<(VolumeId, StepOutcome)>,
}

/// One check's inputs (see the module docs).
pub struct Check {
    pub volume_host: Arc<VolumeHost>,
    pub kv: ConsulKv,
    pub layout: Layout,
    /// The host record as the daemon would publish it; its pool is
    /// re-read before any step.
    pub host: HostRecord,
    pub candidates: Vec<Watched>,
    pub extent: Bytes,
    /// Filesystem reports older than this no longer count.
    pub max_age: Duration,
    pub metrics: Arc<Metrics>,
}

/// Runs one check (see the module docs).
pub async fn check(check: Check) -> Result<CheckReport, String> {
    let Check {
        volume_host,
        kv,
        layout,
        mut host,
        candidates,
        extent,
        max_age,
        metrics,
    } = check;
    let lvs: Vec<_> = candidates.iter().map(|c| c.spec.id.lv_name()).collect();
    let allocations = {
        let volume_host = volume_host.clone();
        tokio::task::spawn_blocking(move || volume_host.backend().thin_allocations(&lvs))
            .await
            .map_err(|join| format!("the allocation thread failed: {join}"))?
            .map_err(|e| format!("reading the volumes' allocation failed: {e}"))?
    };
    let measured: BTreeMap<VolumeId, Measured> = allocations
        .into_iter()
        .filter_map(|found| {
            Some((
                VolumeId::from_lv_name(&found.lv)?,
                Measured {
                    size: found.size,
                    allocated: found.allocated,
                },
            ))
        })
        .collect();
    let reports = read_reports(&kv, &layout, &host).await;
    let steps = plan(
        &candidates,
        &measured,
        &reports,
        crate::worker::now_ms(),
        max_age,
        extent,
    );
    if steps.is_empty() {
        return Ok(CheckReport {
            outcomes: Vec::new(),
        });
    }
    // Admission on what LVM says now, not on the heartbeat's cached report.
    let pool = tokio::task::spawn_blocking(move || volume_host.pool_status())
        .await
        .map_err(|join| format!("the pool report's thread failed: {join}"))?
        .map_err(|e| format!("reading the pool failed: {e}"))?;
    host.pool = pool.usage;
    let mut outcomes = Vec::new();
    for step in steps {
        let outcome = take_step(&kv, &layout, &host, &step, &metrics).await;
        outcomes.push((step.spec.id.clone(), outcome));
    }
    Ok(CheckReport { outcomes })
}

/// The guests' filesystem reports; an unreadable one is left out (that
/// volume falls back to data%), and a failed read leaves all out.
async fn read_reports(
    kv: &ConsulKv,
    layout: &Layout,
    host: &HostRecord,
) -> BTreeMap<VolumeId, FsUsageReport> {
    let prefix = layout.fs_usage_prefix(&host.id);
    let entries = match kv.get_recurse(&prefix).await {
        Ok(answer) => answer.value,
        Err(error) => {
            tracing::debug!(%error, "reading the filesystem usage reports failed; using data%");
            return BTreeMap::new();
        }
    };
    entries
        .iter()
        .filter_map(|pair| {
            let id = VolumeId::new(pair.key.strip_prefix(&prefix)?).ok()?;
            match serde_json::from_slice::<FsUsageReport>(&pair.value) {
                Ok(report) => Some((id, report)),
                Err(error) => {
                    tracing::debug!(key = %pair.key, %error, "unreadable filesystem usage report; using data%");
                    None
                }
            }
        })
        .collect()
}

/// Admits and records one step: `cas` ledger + `cas` desired record.
async fn take_step(
    kv: &ConsulKv,
    layout: &Layout,
    host: &HostRecord,
    step: &Step,
    metrics: &Metrics,
) -> StepOutcome {
    let id = &step.spec.id;
    let from = step.spec.size;
    let growth = step.to - from;
    let ledger_key = layout.host_ledger(&host.id);
    let desired_key = layout.desired(&host.id, id);
    for attempt in 1..=ATTEMPTS {
        let pair = match kv.get(&ledger_key).await {
            Ok(answer) => answer.value,
            Err(error) => return StepOutcome::Failed(format!("reading {ledger_key}: {error}")),
        };
        let Some(pair) = pair else {
            // No reservation recorded: growing it would under-count.
            return StepOutcome::Refused(format!(
                "no ledger at {ledger_key}, so the growth cannot be reserved"
            ));
        };
        let ledger: Ledger = match serde_json::from_slice(&pair.value) {
            Ok(ledger) => ledger,
            Err(error) => {
                return StepOutcome::Refused(format!(
                    "the ledger at {ledger_key} is malformed: {error}"
                ))
            }
        };
        let candidate = Candidate {
            host: host.clone(),
            ledger,
        };
        if let Err(refusal) = candidate
            .committed_usage()
            .admit_growth(&host.policy, growth)
        {
            return StepOutcome::Refused(format!(
                "host {} cannot grow it by {} ({} to {}): {refusal}",
                host.id,
                gb(growth),
                gb(from),
                gb(step.to)
            ));
        }
        let ledger_after = Ledger {
            reserved: ledger.reserved + growth,
            volumes: ledger.volumes,
        };
        let mut spec = step.spec.clone();
        spec.size = step.to;
        let ops = [
            TxnOp::Cas {
                key: ledger_key.clone(),
                value: serde_json::to_vec(&ledger_after).expect("ledgers serialize"),
                flags: 0,
                index: pair.modify_index,
            },
            TxnOp::Cas {
                key: desired_key.clone(),
                value: serde_json::to_vec(&spec).expect("specs serialize"),
                flags: 0,
                index: step.desired_index,
            },
        ];
        metrics.kv_write();
        match kv.txn(&ops).await {
            Ok(_) => {
                return StepOutcome::Grown {
                    from,
                    to: step.to,
                    usage: step.usage,
                    source: step.source,
                }
            }
            Err(consul_kv::Error::TxnConflict { failures }) => {
                if failures.iter().any(|failure| failure.op_index == 1) {
                    return StepOutcome::RecordChanged;
                }
                tokio::time::sleep(crate::kv::backoff(attempt, Duration::from_secs(2)) / 4).await;
            }
            Err(error) => return StepOutcome::Failed(format!("recording the growth: {error}")),
        }
    }
    StepOutcome::Failed(format!(
        "the ledger at {ledger_key} kept changing ({ATTEMPTS} attempts)"
    ))
}

/// The daemon's memory of auto-extend between checks.
#[derive(Debug)]
pub struct Tracker {
    pub checking: bool,
    /// How long a refused volume waits before its next try.
    retry_after: Duration,
    /// The refusal each volume's status shows, until a step succeeds or
    /// auto-extend is turned off.
    pub refused: BTreeMap<VolumeId, String>,
    /// No new try before this.
    pub held_until: BTreeMap<VolumeId, Instant>,
}

impl Tracker {
    pub fn new(interval: Duration) -> Tracker {
        Tracker {
            checking: false,
            retry_after: interval * REFUSED_RETRY_CHECKS,
            refused: BTreeMap::new(),
            held_until: BTreeMap::new(),
        }
    }

    /// Whether `id` may be stepped now.
    pub fn may_try(&self, id: &VolumeId, now: Instant) -> bool {
        self.held_until.get(id).is_none_or(|until| *until <= now)
    }

    /// Forgets volumes that no longer have auto-extend; returns those
    /// whose shown refusal went away.
    pub fn retain(&mut self, with_auto_extend: &[VolumeId]) -> Vec<VolumeId> {
        self.held_until
            .retain(|id, _| with_auto_extend.contains(id));
        let gone: Vec<VolumeId> = self
            .refused
            .keys()
            .filter(|id| !with_auto_extend.contains(id))
            .cloned()
            .collect();
        for id in &gone {
            self.refused.remove(id);
        }
        gone
    }

    /// Takes one check's outcomes: logs (a refusal once per reason),
    /// counts, and returns the volumes whose status note changed.
    pub fn apply(&mut self, report: CheckReport, metrics: &Metrics) -> Vec<VolumeId> {
        let mut changed = Vec::new();
        for (id, outcome) in report.outcomes {
            match outcome {
                StepOutcome::Grown {
                    from,
                    to,
                    usage,
                    source,
                } => {
                    metrics.volume_autoextend("grown");
                    tracing::info!(volume = %id, from = %gb(from), to = %gb(to), %usage, %source,
                        "volume auto-extend: usage reached the threshold; growth recorded");
                    self.held_until.remove(&id);
                    if self.refused.remove(&id).is_some() {
                        changed.push(id);
                    }
                }
                StepOutcome::Refused(reason) => {
                    metrics.volume_autoextend("refused");
                    self.held_until
                        .insert(id.clone(), Instant::now() + self.retry_after);
                    if self.refused.get(&id) != Some(&reason) {
                        tracing::warn!(volume = %id, %reason, "volume auto-extend refused");
                        self.refused.insert(id.clone(), reason);
                        changed.push(id);
                    }
                }
                StepOutcome::RecordChanged => {
                    tracing::debug!(volume = %id, "volume auto-extend: the record changed; deciding again next check");
                }
                StepOutcome::Failed(error) => {
                    metrics.error("volume_autoextend");
                    tracing::warn!(volume = %id, %error, "volume auto-extend step failed; trying again next check");
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volume_core::names::{HostId, Region, VolumeName, Zone};
    use volume_core::units::GB;
    use volume_core::volume_growth::{AutoExtend, FsUsage};

    fn spec(size: u64, rule: Option<AutoExtend>) -> VolumeSpec {
        VolumeSpec {
            id: VolumeId::generate(),
            name: VolumeName::new("data").unwrap(),
            host: HostId::new("h1").unwrap(),
            region: Region::new("ewr").unwrap(),
            zone: Zone::new("a").unwrap(),
            size: Bytes(size),
            encrypted: true,
            created_ms: 1,
            destroy: false,
            source: None,
            snapshots: Default::default(),
            auto_extend: rule,
        }
    }

    fn rule() -> AutoExtend {
        AutoExtend::new(Percent::from_whole(80), Bytes(GB), Bytes(3 * GB), Bytes(GB)).unwrap()
    }

    const EXTENT: Bytes = Bytes(4 << 20);

    #[test]
    fn steps_at_the_threshold_from_data_percent_or_a_fresh_report() {
        let over = spec(GB, Some(rule()));
        let under = spec(GB, Some(rule()));
        let off = spec(GB, None);
        let lv = |pct| Measured {
            size: Bytes(GB).round_up_to(EXTENT).unwrap(),
            allocated: Percent::from_whole(pct),
        };
        let measured = BTreeMap::from([
            (over.id.clone(), lv(85)),
            (under.id.clone(), lv(40)),
            (off.id.clone(), lv(99)),
        ]);
        let candidates: Vec<Watched> = [&over, &under, &off]
            .into_iter()
            .map(|spec| Watched {
                spec: spec.clone(),
                desired_index: 7,
            })
            .collect();
        let steps = plan(
            &candidates,
            &measured,
            &BTreeMap::new(),
            1_000,
            Duration::from_secs(60),
            EXTENT,
        );
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].spec.id, over.id);
        assert_eq!(steps[0].to, Bytes(2 * GB));
        assert_eq!(steps[0].source, UsageSource::Allocated);
        assert_eq!(steps[0].desired_index, 7);

        // The guest says its filesystem is nearly empty: no step; says it
        // is full: a step although data% is low.
        let report =
            |used, at| FsUsageReport::new(FsUsage::new(Bytes(used), Bytes(GB)).unwrap(), at);
        let reports = BTreeMap::from([
            (over.id.clone(), report(GB / 10, 900)),
            (under.id.clone(), report(GB * 9 / 10, 900)),
        ]);
        let steps = plan(
            &candidates,
            &measured,
            &reports,
            1_000,
            Duration::from_secs(60),
            EXTENT,
        );
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].spec.id, under.id);
        assert_eq!(steps[0].source, UsageSource::Filesystem);
        // Stale reports fall back to data%.
        let steps = plan(
            &candidates,
            &measured,
            &reports,
            70_000,
            Duration::from_secs(60),
            EXTENT,
        );
        assert_eq!(
            steps.iter().map(|s| &s.spec.id).collect::<Vec<_>>(),
            vec![&over.id]
        );
    }

    #[test]
    fn no_step_while_an_extend_is_pending_or_at_the_limit() {
        let mut grown = spec(2 * GB, Some(rule()));
        let full = Measured {
            size: Bytes(GB).round_up_to(EXTENT).unwrap(),
            allocated: Percent::FULL,
        };
        let measured = BTreeMap::from([(grown.id.clone(), full)]);
        let one = |spec: &VolumeSpec| {
            vec![Watched {
                spec: spec.clone(),
                desired_index: 1,
            }]
        };
        let none = BTreeMap::new();
        let minute = Duration::from_secs(60);
        assert!(plan(&one(&grown), &measured, &none, 0, minute, EXTENT).is_empty());
        grown.size = Bytes(3 * GB);
        let at_limit = Measured {
            size: Bytes(3 * GB).round_up_to(EXTENT).unwrap(),
            allocated: Percent::FULL,
        };
        let measured = BTreeMap::from([(grown.id.clone(), at_limit)]);
        assert!(plan(&one(&grown), &measured, &none, 0, minute, EXTENT).is_empty());
        grown.destroy = true;
        grown.size = Bytes(GB);
        assert!(plan(&one(&grown), &measured, &none, 0, minute, EXTENT).is_empty());
    }

    #[test]
    fn a_refusal_is_logged_and_shown_once_and_held_off() {
        let metrics = Metrics::default();
        let mut tracker = Tracker::new(Duration::from_secs(5));
        let id = VolumeId::generate();
        let refused = || CheckReport {
            outcomes: vec![(id.clone(), StepOutcome::Refused("no headroom".into()))],
        };
        assert_eq!(tracker.apply(refused(), &metrics), vec![id.clone()]);
        assert!(!tracker.may_try(&id, Instant::now()));
        assert!(!tracker.may_try(&id, Instant::now() + Duration::from_secs(25)));
        assert!(tracker.may_try(&id, Instant::now() + Duration::from_secs(30)));
        // The same refusal again changes no status.
        assert!(tracker.apply(refused(), &metrics).is_empty());
        let grown = CheckReport {
            outcomes: vec![(
                id.clone(),
                StepOutcome::Grown {
                    from: Bytes(GB),
                    to: Bytes(2 * GB),
                    usage: Percent::FULL,
                    source: UsageSource::Allocated,
                },
            )],
        };
        assert_eq!(tracker.apply(grown, &metrics), vec![id.clone()]);
        assert!(tracker.refused.is_empty() && tracker.may_try(&id, Instant::now()));
        tracker.apply(refused(), &metrics);
        assert_eq!(tracker.retain(&[]), vec![id]);
        assert!(tracker.refused.is_empty() && tracker.held_until.is_empty());
    }
}

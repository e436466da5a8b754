//! Containing a full pool: which volumes to fence when free pool data falls
//! into the reserve and the pool cannot grow, and when to let them go.
//!
//! The rule, decided here from two samples and no I/O:
//! * The pool is in one of three zones by its free data: clear (more than
//!   the reserve free), the reserve, and the floor (half the reserve or
//!   less).
//! * While the pool cannot grow (the VG is full), each time the pool
//!   enters a worse zone the volumes whose mapped data grew since the
//!   baseline sample are fenced: each one that grew by at least a tenth
//!   of the largest growth, so a volume writing a trickle beside a filler
//!   is spared. The caller picks the baseline: volume-core's `Fencer`
//!   passes one from a couple of seconds back, not the last sample, so a
//!   small burst that happens to share one short interval with the
//!   filler's writes does not count as filling. The zone is only taken as
//!   entered once a grower was found, so a sample that saw no growth (the
//!   first one) does not hide the next.
//! * The reserve's first half is for every other volume: it is not
//!   fenced for writing there. The floor is guarded once more.
//! * Every fenced volume is let go once the pool grew since the fence and
//!   free data is above the reserve (a PV was added; the auto-extender
//!   grows the pool again as the writer goes on), or once free data is
//!   above twice the reserve (data was deleted and trimmed): that gap
//!   keeps a fenced writer's queued data from pushing a pool that cannot
//!   grow straight back into the reserve.

use crate::names::VolumeId;
use crate::units::{Bytes, Percent};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The share of pool data kept free for the volumes that did not fill it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FencePolicy {
    /// 0 turns fencing off.
    pub reserve: Percent,
}

/// Why a [`FencePolicy`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pool reserve {reserve}: must be 0–50 % of the pool's data (0 turns fencing off)")]
pub struct FencePolicyError {
    pub reserve: Percent,
}

impl FencePolicy {
    /// Above half the pool, the reserve would fence writers of a pool that
    /// is mostly empty; twice the reserve must also stay reachable.
    pub fn new(reserve: Percent) -> Result<FencePolicy, FencePolicyError> {
        if reserve > Percent::from_whole(50) {
            return Err(FencePolicyError { reserve });
        }
        Ok(FencePolicy { reserve })
    }

    pub fn enabled(&self) -> bool {
        self.reserve > Percent::ZERO
    }

    /// The zone free data of `free` is in.
    pub fn zone(&self, free: Percent) -> Zone {
        if !self.enabled() || free > self.reserve {
            Zone::Clear
        } else if free.hundredths() > self.reserve.hundredths() / 2 {
            Zone::Reserve
        } else {
            Zone::Floor
        }
    }

    /// Whether fenced volumes may go: free data above the reserve in a
    /// pool that grew since the fence, else above twice the reserve.
    pub fn space_returned(&self, free: Percent, pool_grew: bool) -> bool {
        let needed = if pool_grew {
            self.reserve.hundredths()
        } else {
            self.reserve.hundredths().saturating_mul(2)
        };
        !self.enabled() || free.hundredths() > needed
    }
}

/// Where the pool's free data is, relative to the reserve; worse zones
/// compare greater.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Zone {
    #[default]
    Clear,
    Reserve,
    Floor,
}

/// Why volumed fenced a volume (suspended its thin LV, so its I/O waits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FenceReason {
    /// Free pool data fell to `free`, into the `reserve`, with the VG full,
    /// and this volume's allocation had just grown by `grew`.
    PoolReserve {
        free: Percent,
        reserve: Percent,
        grew: Bytes,
    },
    /// volumed found the device suspended when it started (it had fenced
    /// it before a restart) and the pool had not got its space back.
    FoundSuspended,
}

impl FenceReason {
    /// The machine-readable name (list columns, metric labels).
    pub fn as_str(&self) -> &'static str {
        match self {
            FenceReason::PoolReserve { .. } => "pool_reserve",
            FenceReason::FoundSuspended => "found_suspended",
        }
    }
}

impl fmt::Display for FenceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FenceReason::PoolReserve {
                free,
                reserve,
                grew,
            } => write!(
                f,
                "pool reserve: {free} of pool data free (reserve {reserve}) and the VG is full; \
                 this volume's allocation grew by {grew}"
            ),
            FenceReason::FoundSuspended => {
                f.write_str("found suspended at start-up; the pool has not got its space back yet")
            }
        }
    }
}

/// Why a fenced volume was let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnfenceCause {
    /// The pool grew, or free data is back above twice the reserve.
    SpaceReturned,
    /// An operator asked (`volctl unfence`).
    Requested,
}

impl UnfenceCause {
    pub fn as_str(self) -> &'static str {
        match self {
            UnfenceCause::SpaceReturned => "space_returned",
            UnfenceCause::Requested => "requested",
        }
    }
}

/// One reading of the pool's data and of each volume's mapped data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceSample {
    pub data_size: Bytes,
    pub data_used: Bytes,
    pub mapped: BTreeMap<VolumeId, Bytes>,
}

impl FenceSample {
    pub fn free_percent(&self) -> Percent {
        let used = self.data_used.percent_of(self.data_size);
        Percent::from_hundredths(Percent::FULL.hundredths().saturating_sub(used.hundredths()))
    }
}

/// What one check decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceDecision {
    pub fence: Vec<(VolumeId, FenceReason)>,
    pub unfence: Vec<(VolumeId, UnfenceCause)>,
    /// The zone to compare the next sample with.
    pub zone: Zone,
}

/// A grower is fenced when it grew by at least this share of the largest
/// growth in the window (1/10).
const GROWER_SHARE_DIVISOR: u64 = 10;

/// What the pool looks like to one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolState {
    /// The zone the pool was last taken to be in.
    pub entered: Zone,
    /// Whether the VG has room to grow the pool.
    pub can_grow: bool,
    /// Whether the pool's data grew since the first fence in force.
    pub grew_since_fence: bool,
}

/// Decides from `previous` (the baseline to measure growth from, if any)
/// and `current`, with `fenced` the volumes fenced now.
pub fn decide(
    policy: &FencePolicy,
    previous: Option<&FenceSample>,
    current: &FenceSample,
    pool: PoolState,
    fenced: &BTreeMap<VolumeId, FenceReason>,
) -> FenceDecision {
    let PoolState {
        entered,
        can_grow,
        grew_since_fence,
    } = pool;
    let free = current.free_percent();
    let zone = policy.zone(free);
    if policy.space_returned(free, grew_since_fence) {
        return FenceDecision {
            unfence: fenced
                .keys()
                .map(|id| (id.clone(), UnfenceCause::SpaceReturned))
                .collect(),
            zone,
            ..FenceDecision::default()
        };
    }
    // Leaving a zone for a better one is taken at once; a worse one only
    // once its growers were found (or when the pool can grow after all).
    if zone <= entered || can_grow {
        return FenceDecision {
            zone: if can_grow { zone.min(entered) } else { zone },
            ..FenceDecision::default()
        };
    }
    let growth: Vec<(VolumeId, Bytes)> = current
        .mapped
        .iter()
        .filter(|(id, _)| !fenced.contains_key(*id))
        .filter_map(|(id, now)| {
            let before = previous?.mapped.get(id).copied()?;
            let grew = now.checked_sub(before)?;
            (grew > Bytes::ZERO).then(|| (id.clone(), grew))
        })
        .collect();
    let Some(largest) = growth.iter().map(|(_, grew)| *grew).max() else {
        return FenceDecision {
            zone: entered,
            ..FenceDecision::default()
        };
    };
    let bar = Bytes(largest.0.div_ceil(GROWER_SHARE_DIVISOR));
    FenceDecision {
        fence: growth
            .into_iter()
            .filter(|(_, grew)| *grew >= bar)
            .map(|(id, grew)| {
                let reason = FenceReason::PoolReserve {
                    free,
                    reserve: policy.reserve,
                    grew,
                };
                (id, reason)
            })
            .collect(),
        unfence: Vec::new(),
        zone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;

    fn st(entered: Zone, can_grow: bool) -> PoolState {
        PoolState {
            entered,
            can_grow,
            grew_since_fence: false,
        }
    }

    fn policy() -> FencePolicy {
        FencePolicy::new(Percent::from_whole(10)).unwrap()
    }

    fn ids() -> (VolumeId, VolumeId) {
        (
            VolumeId::new("vol_0000000000000001").unwrap(),
            VolumeId::new("vol_0000000000000002").unwrap(),
        )
    }

    fn sample(used_mib: u64, a: u64, b: u64) -> FenceSample {
        let (ida, idb) = ids();
        FenceSample {
            data_size: Bytes(100 * MIB),
            data_used: Bytes(used_mib * MIB),
            mapped: [(ida, Bytes(a * MIB)), (idb, Bytes(b * MIB))].into(),
        }
    }

    #[test]
    fn zones_follow_the_reserve() {
        let p = policy();
        assert_eq!(p.zone(Percent::from_whole(11)), Zone::Clear);
        assert_eq!(p.zone(Percent::from_whole(10)), Zone::Reserve);
        assert_eq!(p.zone(Percent::from_hundredths(501)), Zone::Reserve);
        assert_eq!(p.zone(Percent::from_whole(5)), Zone::Floor);
        assert!(!p.space_returned(Percent::from_whole(20), false));
        assert!(p.space_returned(Percent::from_hundredths(2001), false));
        assert!(!p.space_returned(Percent::from_whole(10), true));
        assert!(p.space_returned(Percent::from_hundredths(1001), true));
        let off = FencePolicy::default();
        assert_eq!(off.zone(Percent::ZERO), Zone::Clear);
    }

    #[test]
    fn a_reserve_above_half_the_pool_is_refused_naming_it() {
        let err = FencePolicy::new(Percent::from_whole(60)).unwrap_err();
        assert!(err.to_string().starts_with("pool reserve 60.00%"), "{err}");
        assert!(FencePolicy::new(Percent::from_whole(50)).is_ok());
    }

    #[test]
    fn only_the_grower_is_fenced_when_the_pool_enters_the_reserve() {
        let (filler, other) = ids();
        let none = BTreeMap::new();
        // 85 % used: clear; nothing happens.
        let before = sample(85, 60, 20);
        let d = decide(&policy(), None, &before, st(Zone::Clear, false), &none);
        assert_eq!(d, FenceDecision::default());
        // 92 % used: the filler grew 7 MiB, the other nothing.
        let now = sample(92, 67, 20);
        let d = decide(
            &policy(),
            Some(&before),
            &now,
            st(Zone::Clear, false),
            &none,
        );
        assert_eq!(d.zone, Zone::Reserve);
        assert_eq!(d.fence.len(), 1);
        assert_eq!(d.fence[0].0, filler);
        assert_eq!(
            d.fence[0].1,
            FenceReason::PoolReserve {
                free: Percent::from_whole(8),
                reserve: Percent::from_whole(10),
                grew: Bytes(7 * MIB)
            }
        );
        // Inside the reserve the other volume writes on, unfenced.
        let fenced: BTreeMap<_, _> = d.fence.into_iter().collect();
        let later = sample(94, 67, 22);
        let d = decide(
            &policy(),
            Some(&now),
            &later,
            st(Zone::Reserve, false),
            &fenced,
        );
        assert!(d.fence.is_empty() && d.unfence.is_empty());
        // At the floor it is fenced too.
        let floor = sample(96, 67, 24);
        let d = decide(
            &policy(),
            Some(&later),
            &floor,
            st(Zone::Reserve, false),
            &fenced,
        );
        assert_eq!(d.zone, Zone::Floor);
        assert_eq!(d.fence.iter().map(|f| &f.0).collect::<Vec<_>>(), [&other]);
    }

    #[test]
    fn a_trickle_beside_a_filler_is_spared() {
        let (filler, _) = ids();
        let d = decide(
            &policy(),
            Some(&sample(80, 50, 20)),
            &sample(91, 60, 20),
            st(Zone::Clear, false),
            &BTreeMap::new(),
        );
        assert_eq!(d.fence.len(), 1);
        let mut before = sample(80, 50, 20);
        let mut now = sample(91, 60, 20);
        // 512 KiB beside 10 MiB: under a tenth.
        before.mapped.insert(ids().1, Bytes(20 * MIB));
        now.mapped.insert(ids().1, Bytes(20 * MIB + MIB / 2));
        let d = decide(
            &policy(),
            Some(&before),
            &now,
            st(Zone::Clear, false),
            &BTreeMap::new(),
        );
        assert_eq!(d.fence.iter().map(|f| &f.0).collect::<Vec<_>>(), [&filler]);
    }

    #[test]
    fn no_fence_while_the_pool_can_grow_or_no_grower_is_seen() {
        let none = BTreeMap::new();
        let d = decide(
            &policy(),
            Some(&sample(85, 60, 20)),
            &sample(92, 67, 20),
            st(Zone::Clear, true),
            &none,
        );
        assert!(d.fence.is_empty());
        assert_eq!(d.zone, Zone::Clear);
        // The first sample has nothing to compare with: the zone is not
        // taken as entered, so the next sample still fences the grower.
        let d = decide(
            &policy(),
            None,
            &sample(92, 67, 20),
            st(Zone::Clear, false),
            &none,
        );
        assert!(d.fence.is_empty());
        assert_eq!(d.zone, Zone::Clear);
        let d = decide(
            &policy(),
            Some(&sample(92, 67, 20)),
            &sample(93, 68, 20),
            st(Zone::Clear, false),
            &none,
        );
        assert_eq!(d.fence.len(), 1);
    }

    #[test]
    fn fenced_volumes_go_once_free_is_above_twice_the_reserve() {
        let (filler, _) = ids();
        let fenced: BTreeMap<_, _> = [(filler.clone(), FenceReason::FoundSuspended)].into();
        let d = decide(
            &policy(),
            None,
            &sample(85, 60, 20),
            st(Zone::Reserve, false),
            &fenced,
        );
        assert!(
            d.unfence.is_empty(),
            "15 % free is not yet twice the reserve"
        );
        assert_eq!(d.zone, Zone::Clear);
        let d = decide(
            &policy(),
            None,
            &sample(79, 60, 19),
            st(Zone::Clear, false),
            &fenced,
        );
        assert_eq!(
            d.unfence,
            vec![(filler.clone(), UnfenceCause::SpaceReturned)]
        );
        // A pool that grew since the fence only needs free data above the
        // reserve (the auto-extender keeps growing it as the writer goes on).
        let grown = PoolState {
            grew_since_fence: true,
            ..st(Zone::Reserve, true)
        };
        let d = decide(&policy(), None, &sample(85, 60, 20), grown, &fenced);
        assert_eq!(d.unfence, vec![(filler, UnfenceCause::SpaceReturned)]);
    }

    #[test]
    fn reasons_serialize_tagged_and_read_for_operators() {
        let reason = FenceReason::PoolReserve {
            free: Percent::from_whole(8),
            reserve: Percent::from_whole(10),
            grew: Bytes(7 * MIB),
        };
        let json = serde_json::to_value(reason).unwrap();
        assert_eq!(json["kind"], "pool_reserve");
        assert_eq!(serde_json::from_value::<FenceReason>(json).unwrap(), reason);
        assert_eq!(
            reason.to_string(),
            "pool reserve: 8.00% of pool data free (reserve 10.00%) and the VG is full; \
             this volume's allocation grew by 7 MiB"
        );
    }
}

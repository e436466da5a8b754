//! Choosing a host for a new volume. Pure: the caller reads the KV store,
//! this decides, and the caller's txn makes the decision stick.
//!
//! Candidates are the hosts of the region whose heartbeat is fresh. Each is
//! judged by the same admission check the host itself uses
//! ([`volume_model::capacity`]), against the larger of what LVM reported and
//! what the ledger has reserved (a reservation may not be on disk yet).
//!
//! **Tie rule:** the host with the most headroom wins; equal headroom goes to
//! the host with fewer volumes, then to the smaller host id.
//!
//! **Spread:** among the hosts tied for the most headroom,
//! [`Request::spread`] (a random number from the caller; 0 takes the first
//! by the tie rule) picks one. So many creates at once over equal hosts do
//! not all race for the same host's ledger, of which only one transaction
//! per read can win: 300 creates over 30 equal hosts, all chosen by the tie
//! rule, left 221 of them giving up after 16 conflicts. The choice is still
//! a function of its inputs, so tests stay deterministic.

use crate::layout::{HostRecord, Ledger};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt;
use volume_model::capacity::{PoolUsage, Refusal};
use volume_model::names::{HostId, Region, Zone};
use volume_model::units::{Bytes, GB};

/// One host as placement sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub host: HostRecord,
    pub ledger: Ledger,
}

impl Candidate {
    /// The pool as it will be once every reservation is made.
    pub fn committed_usage(&self) -> PoolUsage {
        let mut usage = self.host.pool;
        usage.provisioned = usage.provisioned.max(self.ledger.reserved);
        usage.volume_count = usage.volume_count.max(self.ledger.volumes);
        usage
    }

    pub fn headroom(&self) -> Bytes {
        self.committed_usage().headroom(&self.host.policy)
    }

    /// Admits a new volume of `size` as a create does (the host's own
    /// check, against [`Candidate::committed_usage`]): the ledger once it
    /// is reserved, and the headroom left.
    pub fn admit_new(&self, size: Bytes) -> Result<(Ledger, Bytes), Refusal> {
        let admission = self.committed_usage().admit_new(&self.host.policy, size)?;
        let ledger = Ledger {
            reserved: self.ledger.reserved + size,
            volumes: self.ledger.volumes + 1,
        };
        Ok((ledger, admission.headroom_after))
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub region: Region,
    pub size: Bytes,
    /// Zones that already hold a volume of the same name; avoided when
    /// `require_unique_zone` is set.
    pub zones_in_use: BTreeSet<Zone>,
    pub require_unique_zone: bool,
    /// Place on exactly this host (still subject to every check).
    pub pinned_host: Option<HostId>,
    pub now_ms: u64,
    /// A heartbeat older than this makes a host ineligible.
    pub heartbeat_ttl_ms: u64,
    /// Picks among the hosts tied for the most headroom (see the module
    /// docs); 0 takes the first by the tie rule.
    pub spread: u64,
}

/// Why one host was passed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Skip {
    StaleHeartbeat { age_ms: u64 },
    ZoneInUse { zone: Zone },
    Capacity { refusal: Refusal },
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::StaleHeartbeat { age_ms } => write!(f, "heartbeat {}s old", age_ms / 1000),
            Skip::ZoneInUse { zone } => {
                write!(f, "zone {zone} already holds a volume of this name")
            }
            Skip::Capacity { refusal } => write!(f, "{refusal}"),
        }
    }
}

/// The chosen host, and the ledger to write for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub host: HostId,
    pub zone: Zone,
    pub ledger_after: Ledger,
    pub headroom_after: Bytes,
}

/// Nothing fits. Displays as
/// `no host in ewr can take 25 GB: 3 hosts, most headroom 12 GB (h2)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct NoPlacement {
    pub region: Region,
    pub size: Bytes,
    pub pinned_host: Option<HostId>,
    /// Every host of the region and why it was passed over.
    pub skipped: Vec<(HostId, Skip)>,
    /// The largest headroom among fresh hosts, if any.
    pub most_headroom: Option<(HostId, Bytes)>,
}

/// Decimal gigabytes, the unit operators give sizes in.
pub fn gb(bytes: Bytes) -> String {
    let tenths = (u128::from(bytes.0) * 10 + u128::from(GB) / 2) / u128::from(GB);
    if tenths % 10 == 0 {
        format!("{} GB", tenths / 10)
    } else {
        format!("{}.{} GB", tenths / 10, tenths % 10)
    }
}

impl fmt::Display for NoPlacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(host) = &self.pinned_host {
            write!(
                f,
                "host {host} in {} cannot take {}",
                self.region,
                gb(self.size)
            )?;
            return match self.skipped.first() {
                Some((_, why)) => write!(f, ": {why}"),
                None => write!(f, ": no such host in the region"),
            };
        }
        let hosts = self.skipped.len();
        write!(f, "no host in {} can take {}: ", self.region, gb(self.size))?;
        match hosts {
            0 => return write!(f, "no hosts in the region"),
            1 => write!(f, "1 host")?,
            n => write!(f, "{n} hosts")?,
        }
        match &self.most_headroom {
            Some((host, headroom)) => write!(f, ", most headroom {} ({host})", gb(*headroom)),
            None => write!(f, ", none with a fresh heartbeat"),
        }
    }
}

/// Picks a host or says why none fits.
pub fn place(request: &Request, candidates: &[Candidate]) -> Result<Placement, NoPlacement> {
    let mut skipped = Vec::new();
    let mut most_headroom: Option<(HostId, Bytes)> = None;
    let mut admitted: Vec<(&Candidate, Placement)> = Vec::new();

    let in_scope = candidates.iter().filter(|c| {
        c.host.region == request.region
            && request
                .pinned_host
                .as_ref()
                .is_none_or(|pinned| *pinned == c.host.id)
    });
    for candidate in in_scope {
        let host = &candidate.host;
        let age_ms = request.now_ms.saturating_sub(host.heartbeat_ms);
        if age_ms > request.heartbeat_ttl_ms {
            skipped.push((host.id.clone(), Skip::StaleHeartbeat { age_ms }));
            continue;
        }
        let headroom = candidate.headroom();
        if most_headroom
            .as_ref()
            .is_none_or(|(_, most)| headroom > *most)
        {
            most_headroom = Some((host.id.clone(), headroom));
        }
        if request.require_unique_zone && request.zones_in_use.contains(&host.zone) {
            skipped.push((
                host.id.clone(),
                Skip::ZoneInUse {
                    zone: host.zone.clone(),
                },
            ));
            continue;
        }
        let (ledger_after, headroom_after) = match candidate.admit_new(request.size) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                skipped.push((host.id.clone(), Skip::Capacity { refusal }));
                continue;
            }
        };
        let placement = Placement {
            host: host.id.clone(),
            zone: host.zone.clone(),
            ledger_after,
            headroom_after,
        };
        admitted.push((candidate, placement));
    }

    admitted.sort_by(|(a, _), (b, _)| preference(a).cmp(&preference(b)));
    let most = admitted.first().map(|(c, _)| c.headroom());
    let tied = admitted
        .iter()
        .take_while(|(c, _)| Some(c.headroom()) == most)
        .count();
    match tied {
        0 => Err(NoPlacement {
            region: request.region.clone(),
            size: request.size,
            pinned_host: request.pinned_host.clone(),
            skipped,
            most_headroom,
        }),
        n => {
            let pick = usize::try_from(request.spread % n as u64).expect("below a usize count");
            Ok(admitted.swap_remove(pick).1)
        }
    }
}

/// Smaller is better: most headroom, then fewest volumes, then host id.
fn preference(candidate: &Candidate) -> (std::cmp::Reverse<Bytes>, u32, &HostId) {
    (
        std::cmp::Reverse(candidate.headroom()),
        candidate.committed_usage().volume_count,
        &candidate.host.id,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use volume_model::capacity::CapacityPolicy;
    use volume_model::health::PoolHealth;
    use volume_model::units::{OvercommitRatio, GIB};

    pub(crate) fn host(id: &str, region: &str, zone: &str, data_gib: u64) -> Candidate {
        Candidate {
            host: HostRecord {
                id: HostId::new(id).unwrap(),
                region: Region::new(region).unwrap(),
                zone: Zone::new(zone).unwrap(),
                pool: PoolUsage {
                    data_size: Bytes(data_gib * GIB),
                    data_used: Bytes::ZERO,
                    metadata_size: Bytes(64 << 20),
                    metadata_used: Bytes(1 << 20),
                    provisioned: Bytes::ZERO,
                    volume_count: 0,
                    health: Default::default(),
                },
                policy: CapacityPolicy::default(),
                heartbeat_ms: 1_000_000,
                orphans: vec![],
                owner: None,
                migration: None,
            },
            ledger: Ledger::default(),
        }
    }

    fn request(region: &str, size: Bytes) -> Request {
        Request {
            region: Region::new(region).unwrap(),
            size,
            zones_in_use: BTreeSet::new(),
            require_unique_zone: false,
            pinned_host: None,
            now_ms: 1_000_500,
            heartbeat_ttl_ms: 30_000,
            spread: 0,
        }
    }

    #[test]
    fn spread_picks_among_the_hosts_tied_for_the_most_headroom() {
        // h1..h4 have 10, 10, 10 and 9.5 GiB of headroom.
        let mut hosts: Vec<Candidate> = (1..=4)
            .map(|i| host(&format!("h{i}"), "ewr", "a", 1))
            .collect();
        hosts[3].ledger.reserved = Bytes(GIB / 2);
        let mut req = request("ewr", Bytes(GIB));
        let picks: Vec<String> = (0..6)
            .map(|spread| {
                req.spread = spread;
                place(&req, &hosts).unwrap().host.to_string()
            })
            .collect();
        // h4 has less: never picked.
        assert_eq!(picks, ["h1", "h2", "h3", "h1", "h2", "h3"]);
        // One candidate: the spread changes nothing.
        req.spread = 7;
        assert_eq!(place(&req, &hosts[3..]).unwrap().host.as_str(), "h4");
    }

    #[test]
    fn picks_most_headroom_in_region() {
        let hosts = [
            host("h1", "ewr", "a", 3),
            host("h2", "ewr", "b", 5),
            host("h3", "ord", "a", 50),
        ];
        let placement = place(&request("ewr", Bytes::from_gb(25).unwrap()), &hosts).unwrap();
        assert_eq!(placement.host.as_str(), "h2");
        assert_eq!(placement.ledger_after.volumes, 1);
    }

    #[test]
    fn a_host_whose_pool_cannot_take_writes_is_passed_over_naming_its_health() {
        let mut full = host("h1", "ewr", "a", 50);
        full.host.pool.health = PoolHealth::OutOfData;
        let hosts = [full, host("h2", "ewr", "b", 3)];
        let placement = place(&request("ewr", Bytes(GIB)), &hosts).unwrap();
        assert_eq!(placement.host.as_str(), "h2");
        assert_eq!(hosts[0].headroom(), Bytes::ZERO);
        let err = place(&request("ewr", Bytes(GIB)), &hosts[..1]).unwrap_err();
        assert_eq!(
            err.skipped[0].1.to_string(),
            "pool health: pool out of data space, so no new space is promised"
        );
    }

    #[test]
    fn ties_go_to_fewer_volumes_then_smaller_id() {
        let hosts = [host("h2", "ewr", "a", 3), host("h1", "ewr", "b", 3)];
        assert_eq!(
            place(&request("ewr", Bytes(GIB)), &hosts)
                .unwrap()
                .host
                .as_str(),
            "h1"
        );
    }

    #[test]
    fn full_region_error_reads_like_the_design_card() {
        let mut h1 = host("h1", "ewr", "a", 1);
        h1.ledger.reserved = Bytes(10 * GIB);
        let mut h2 = host("h2", "ewr", "b", 2);
        h2.ledger.reserved = Bytes::from_gb(21).unwrap() - Bytes::from_gb(12).unwrap();
        h2.host.pool.data_size = Bytes::from_gb(2).unwrap();
        h2.host.policy.overcommit = OvercommitRatio::whole(10).unwrap();
        let h3 = host("h3", "ewr", "c", 1);
        let err = place(&request("ewr", Bytes::from_gb(25).unwrap()), &[h1, h2, h3]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no host in ewr can take 25 GB: 3 hosts, most headroom 11 GB (h2)"
        );
        assert_eq!(err.skipped.len(), 3);
    }

    #[test]
    fn stale_hosts_and_used_zones_are_skipped() {
        let mut stale = host("h1", "ewr", "a", 50);
        stale.host.heartbeat_ms = 0;
        let used_zone = host("h2", "ewr", "b", 50);
        let mut req = request("ewr", Bytes(GIB));
        req.require_unique_zone = true;
        req.zones_in_use.insert(Zone::new("b").unwrap());
        let err = place(&req, &[stale, used_zone]).unwrap_err();
        assert!(matches!(err.skipped[0].1, Skip::StaleHeartbeat { .. }));
        assert!(matches!(err.skipped[1].1, Skip::ZoneInUse { .. }));
        assert_eq!(
            place(&request("nrt", Bytes(GIB)), &[])
                .unwrap_err()
                .to_string(),
            "no host in nrt can take 1.1 GB: no hosts in the region"
        );
    }

    proptest! {
        /// Applying placements one after another, as the txn-serialised
        /// creates do, never pushes any host past ratio × pool size.
        #[test]
        fn sequential_placements_never_overcommit(
            sizes in proptest::collection::vec(1u64..(40 * GIB), 1..80),
            pools in proptest::collection::vec((1u64..8, 1u32..20_000), 1..4),
        ) {
            let mut hosts: Vec<Candidate> = pools.iter().enumerate().map(|(i, (gib, ratio))| {
                let mut c = host(&format!("h{i}"), "ewr", &format!("z{i}"), *gib);
                c.host.policy.overcommit = OvercommitRatio::from_thousandths(*ratio).unwrap();
                c
            }).collect();
            for size in sizes {
                match place(&request("ewr", Bytes(size)), &hosts) {
                    Ok(placement) => {
                        let chosen = hosts.iter_mut().find(|c| c.host.id == placement.host).unwrap();
                        chosen.ledger = placement.ledger_after;
                    }
                    Err(err) => {
                        prop_assert_eq!(err.skipped.len(), hosts.len());
                        let text = err.to_string();
                        prop_assert!(text.starts_with("no host in ewr can take"), "{}", text);
                        for (_, skip) in &err.skipped {
                            let Skip::Capacity { refusal } = skip else { panic!("unexpected {skip}") };
                            prop_assert!(!refusal.limit().is_empty());
                        }
                    }
                }
                for c in &hosts {
                    prop_assert!(c.ledger.reserved <= c.host.policy.overcommit.scale(c.host.pool.data_size));
                }
            }
        }
    }
}

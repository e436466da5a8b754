//! Thin-pool capacity accounting and the admission decision.
//!
//! A thin pool promises more virtual space than it has (over-commit). This
//! module decides, with exact integer arithmetic and no I/O, whether one more
//! volume (or a growth of one) fits, and when it does not, names the limit.

use crate::health::PoolHealth;
use crate::units::{Bytes, OvercommitRatio, Percent};
use serde::{Deserialize, Serialize};
use std::fmt;

/// What a pool holds and promises right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolUsage {
    /// Physical data space of the pool.
    pub data_size: Bytes,
    /// Physical data space in use (LVM's data% of `data_size`).
    pub data_used: Bytes,
    pub metadata_size: Bytes,
    pub metadata_used: Bytes,
    /// Sum of the virtual sizes of every thin volume in the pool.
    pub provisioned: Bytes,
    pub volume_count: u32,
    /// Whether the pool can take writes; anything but healthy makes the
    /// headroom 0. A record written before this field reads as healthy.
    #[serde(default)]
    pub health: PoolHealth,
}

/// The operator's limits for one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityPolicy {
    /// Provisioned virtual size may reach `overcommit × data_size`.
    pub overcommit: OvercommitRatio,
    /// Refuse new space once free data falls below this share of the pool.
    pub data_low_water: Percent,
    /// Refuse new space once free metadata falls below this share.
    pub metadata_low_water: Percent,
    /// At most this many volumes in the pool.
    pub max_volumes: u32,
}

impl Default for CapacityPolicy {
    fn default() -> Self {
        CapacityPolicy {
            overcommit: OvercommitRatio::whole(10).expect("10 is a valid ratio"),
            data_low_water: Percent::from_whole(10),
            metadata_low_water: Percent::from_whole(20),
            max_volumes: 1000,
        }
    }
}

/// Why a request does not fit. Each variant names its limit and carries the
/// numbers an operator needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("size: a volume must be larger than 0 bytes")]
    ZeroSize,
    #[error("over-commit: {requested} requested, {headroom} headroom at ratio {ratio}")]
    Overcommit {
        requested: Bytes,
        headroom: Bytes,
        ratio: OvercommitRatio,
    },
    #[error("data low-water: {free} of pool data free, below the {mark} mark")]
    DataLowWater { free: Percent, mark: Percent },
    #[error("metadata low-water: {free} of pool metadata free, below the {mark} mark")]
    MetadataLowWater { free: Percent, mark: Percent },
    #[error("volume count: pool holds {count} volumes, the limit is {max}")]
    VolumeCount { count: u32, max: u32 },
    #[error("pool health: {}, so no new space is promised", .health.reason())]
    PoolUnhealthy { health: PoolHealth },
}

impl Refusal {
    /// A short machine-readable name of the limit hit.
    pub fn limit(&self) -> &'static str {
        match self {
            Refusal::ZeroSize => "size",
            Refusal::Overcommit { .. } => "over-commit",
            Refusal::DataLowWater { .. } => "data low-water",
            Refusal::MetadataLowWater { .. } => "metadata low-water",
            Refusal::VolumeCount { .. } => "volume count",
            Refusal::PoolUnhealthy { .. } => "pool health",
        }
    }
}

/// An accepted request and what is left after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub usage_after: PoolUsage,
    pub headroom_after: Bytes,
}

impl PoolUsage {
    pub fn data_percent(&self) -> Percent {
        self.data_used.percent_of(self.data_size)
    }

    pub fn metadata_percent(&self) -> Percent {
        self.metadata_used.percent_of(self.metadata_size)
    }

    pub fn data_free_percent(&self) -> Percent {
        Percent::from_hundredths(Percent::FULL.hundredths() - self.data_percent().hundredths())
    }

    pub fn metadata_free_percent(&self) -> Percent {
        Percent::from_hundredths(Percent::FULL.hundredths() - self.metadata_percent().hundredths())
    }

    /// The most virtual size the pool may promise under `policy`.
    pub fn virtual_limit(&self, policy: &CapacityPolicy) -> Bytes {
        policy.overcommit.scale(self.data_size)
    }

    /// Virtual size still available under `policy`: 0 while the pool
    /// cannot take writes.
    pub fn headroom(&self, policy: &CapacityPolicy) -> Bytes {
        if !self.health.takes_writes() {
            return Bytes::ZERO;
        }
        self.virtual_limit(policy).saturating_sub(self.provisioned)
    }

    /// Can a new volume of `size` be placed here?
    pub fn admit_new(&self, policy: &CapacityPolicy, size: Bytes) -> Result<Admission, Refusal> {
        if self.volume_count >= policy.max_volumes {
            return Err(Refusal::VolumeCount {
                count: self.volume_count,
                max: policy.max_volumes,
            });
        }
        if size == Bytes::ZERO {
            return Err(Refusal::ZeroSize);
        }
        let mut admission = self.admit_space(policy, size)?;
        admission.usage_after.volume_count += 1;
        Ok(admission)
    }

    /// Can an existing volume grow by `growth`?
    pub fn admit_growth(
        &self,
        policy: &CapacityPolicy,
        growth: Bytes,
    ) -> Result<Admission, Refusal> {
        self.admit_space(policy, growth)
    }

    fn admit_space(&self, policy: &CapacityPolicy, requested: Bytes) -> Result<Admission, Refusal> {
        if !self.health.takes_writes() {
            return Err(Refusal::PoolUnhealthy {
                health: self.health,
            });
        }
        let data_free = self.data_free_percent();
        if data_free < policy.data_low_water {
            return Err(Refusal::DataLowWater {
                free: data_free,
                mark: policy.data_low_water,
            });
        }
        let metadata_free = self.metadata_free_percent();
        if metadata_free < policy.metadata_low_water {
            return Err(Refusal::MetadataLowWater {
                free: metadata_free,
                mark: policy.metadata_low_water,
            });
        }
        let headroom = self.headroom(policy);
        if requested > headroom {
            return Err(Refusal::Overcommit {
                requested,
                headroom,
                ratio: policy.overcommit,
            });
        }
        let mut usage_after = *self;
        usage_after.provisioned = self.provisioned + requested;
        Ok(Admission {
            usage_after,
            headroom_after: headroom - requested,
        })
    }
}

impl fmt::Display for PoolUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "data {} of {} ({}), metadata {} of {} ({}), {} provisioned in {} volumes, {}",
            self.data_used,
            self.data_size,
            self.data_percent(),
            self.metadata_used,
            self.metadata_size,
            self.metadata_percent(),
            self.provisioned,
            self.volume_count,
            self.health
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::GIB;
    use proptest::prelude::*;

    fn pool(data_gib: u64) -> PoolUsage {
        PoolUsage {
            data_size: Bytes(data_gib * GIB),
            data_used: Bytes::ZERO,
            metadata_size: Bytes(4 << 20),
            metadata_used: Bytes(1 << 20),
            provisioned: Bytes::ZERO,
            volume_count: 0,
            health: PoolHealth::Healthy,
        }
    }

    #[test]
    fn an_unhealthy_pool_has_no_headroom_and_refuses_by_health() {
        let policy = CapacityPolicy::default();
        for health in PoolHealth::ALL {
            let mut usage = pool(3);
            usage.health = health;
            if health.takes_writes() {
                assert_eq!(usage.headroom(&policy), Bytes(30 * GIB));
                continue;
            }
            assert_eq!(usage.headroom(&policy), Bytes::ZERO, "{health}");
            let refusal = usage.admit_new(&policy, Bytes(GIB)).unwrap_err();
            assert_eq!(refusal, Refusal::PoolUnhealthy { health });
            assert_eq!(refusal.limit(), "pool health");
            assert!(usage.admit_growth(&policy, Bytes(GIB)).is_err());
        }
        let mut usage = pool(3);
        usage.health = PoolHealth::OutOfData;
        assert_eq!(
            usage
                .admit_new(&policy, Bytes(GIB))
                .unwrap_err()
                .to_string(),
            "pool health: pool out of data space, so no new space is promised"
        );
    }

    #[test]
    fn a_record_without_health_reads_as_healthy() {
        let json = r#"{"data_size":1,"data_used":0,"metadata_size":1,"metadata_used":0,"provisioned":0,"volume_count":0}"#;
        let usage: PoolUsage = serde_json::from_str(json).unwrap();
        assert_eq!(usage.health, PoolHealth::Healthy);
    }

    #[test]
    fn refusal_reads_like_the_design_card() {
        let policy = CapacityPolicy::default();
        let mut usage = pool(3);
        usage.provisioned = Bytes(30 * GIB - (GIB * 32 / 10));
        let refusal = usage.admit_new(&policy, Bytes(25 * GIB)).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "over-commit: 25 GiB requested, 3.2 GiB headroom at ratio 10"
        );
    }

    #[test]
    fn a_25_gib_volume_fits_a_3_gib_pool_at_ratio_10() {
        let admission = pool(3)
            .admit_new(&CapacityPolicy::default(), Bytes(25 * GIB))
            .unwrap();
        assert_eq!(admission.headroom_after, Bytes(5 * GIB));
        assert_eq!(admission.usage_after.volume_count, 1);
    }

    #[test]
    fn low_water_marks_refuse() {
        let policy = CapacityPolicy::default();
        let mut usage = pool(10);
        usage.data_used = Bytes(95 * GIB / 10);
        let refusal = usage.admit_new(&policy, Bytes(GIB)).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "data low-water: 5.00% of pool data free, below the 10.00% mark"
        );
        let mut usage = pool(10);
        usage.metadata_used = usage.metadata_size;
        assert_eq!(
            usage.admit_new(&policy, Bytes(GIB)).unwrap_err().limit(),
            "metadata low-water"
        );
    }

    #[derive(Debug, Clone)]
    enum Request {
        New(u64),
        Grow(u64),
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (0u64..(64 * GIB)).prop_map(Request::New),
            (0u64..(16 * GIB)).prop_map(Request::Grow),
        ]
    }

    fn policy() -> impl Strategy<Value = CapacityPolicy> {
        (1u32..=20_000, 0u32..=5000, 0u32..=5000, 1u32..=50).prop_map(|(ratio, dlw, mlw, max)| {
            CapacityPolicy {
                overcommit: OvercommitRatio::from_thousandths(ratio).unwrap(),
                data_low_water: Percent::from_hundredths(dlw),
                metadata_low_water: Percent::from_hundredths(mlw),
                max_volumes: max,
            }
        })
    }

    proptest! {
        #[test]
        fn accepted_placements_never_exceed_ratio_times_pool(
            data_gib in 1u64..64,
            policy in policy(),
            requests in proptest::collection::vec(request(), 1..60),
        ) {
            let mut usage = pool(data_gib);
            let limit = policy.overcommit.scale(usage.data_size);
            for request in requests {
                let decision = match request {
                    Request::New(size) => usage.admit_new(&policy, Bytes(size)),
                    Request::Grow(size) => usage.admit_growth(&policy, Bytes(size)),
                };
                if let Ok(admission) = decision {
                    usage = admission.usage_after;
                }
                prop_assert!(usage.provisioned <= limit);
                prop_assert!(usage.volume_count <= policy.max_volumes);
            }
        }

        #[test]
        fn every_refusal_names_its_limit(
            data_gib in 1u64..64,
            used_pct in 0u64..=100,
            meta_pct in 0u64..=100,
            provisioned in 0u64..(1u64 << 42),
            count in 0u32..60,
            policy in policy(),
            size in 0u64..(1u64 << 40),
        ) {
            let mut usage = pool(data_gib);
            usage.data_used = Bytes(usage.data_size.0 * used_pct / 100);
            usage.metadata_used = Bytes(usage.metadata_size.0 * meta_pct / 100);
            usage.provisioned = Bytes(provisioned);
            usage.volume_count = count;
            if let Err(refusal) = usage.admit_new(&policy, Bytes(size)) {
                let text = refusal.to_string();
                prop_assert!(text.starts_with(refusal.limit()), "{text}");
                match refusal {
                    Refusal::Overcommit { requested, headroom, ratio } => {
                        prop_assert!(requested > headroom);
                        prop_assert!(text.contains(&ratio.to_string()));
                        prop_assert!(text.contains(&headroom.to_string()));
                    }
                    Refusal::DataLowWater { free, mark } | Refusal::MetadataLowWater { free, mark } => {
                        prop_assert!(free < mark);
                        prop_assert!(text.contains(&mark.to_string()));
                    }
                    Refusal::VolumeCount { count, max } => {
                        prop_assert!(count >= max);
                        prop_assert!(text.contains(&max.to_string()));
                    }
                    Refusal::ZeroSize => prop_assert_eq!(size, 0),
                    Refusal::PoolUnhealthy { health } => prop_assert!(!health.takes_writes()),
                }
            }
        }
    }
}

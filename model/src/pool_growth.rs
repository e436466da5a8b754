//! When and by how much volumed grows a thin pool, from its usage alone.
//!
//! The rule is lvm.conf's `thin_pool_autoextend_threshold` / `_percent`,
//! applied to data and metadata alike: once a part is at or above its
//! threshold, grow it by `step` percent of its current size. Bounding the
//! step by the VG's free space happens where that is known (the backend).

use crate::capacity::PoolUsage;
use crate::units::{Bytes, Percent};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The two parts of a thin pool that can run out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolPart {
    Data,
    Metadata,
}

impl fmt::Display for PoolPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolPart::Data => "data",
            PoolPart::Metadata => "metadata",
        })
    }
}

/// Grow a part once its use reaches `threshold`, by `step` of its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrowthRule {
    pub threshold: Percent,
    pub step: Percent,
}

/// Why a [`GrowthRule`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrowthRuleError {
    #[error("{part} auto-extend threshold {threshold}: must be 50–100 % (100 turns it off), as lvm.conf's")]
    Threshold { part: PoolPart, threshold: Percent },
    #[error("{part} auto-extend step {step}: must be 1–1000 % of the pool's size")]
    Step { part: PoolPart, step: Percent },
}

impl GrowthRule {
    /// lvm.conf's limits: a threshold of 50–100 % (LVM raises anything
    /// lower to 50; 100 turns growth off) and a step of at least 1 %.
    pub fn new(
        part: PoolPart,
        threshold: Percent,
        step: Percent,
    ) -> Result<GrowthRule, GrowthRuleError> {
        if threshold < Percent::from_whole(50) || threshold > Percent::FULL {
            return Err(GrowthRuleError::Threshold { part, threshold });
        }
        if step < Percent::from_whole(1) || step > Percent::from_whole(1000) {
            return Err(GrowthRuleError::Step { part, step });
        }
        Ok(GrowthRule { threshold, step })
    }

    pub fn enabled(&self) -> bool {
        self.threshold < Percent::FULL
    }

    /// How much to add to a part of `size` with `used` in use, if anything:
    /// the step, or more if one step would leave it at the threshold still
    /// (so a fast writer is caught up in one command, not several).
    pub fn growth(&self, used: Bytes, size: Bytes) -> Option<Bytes> {
        if !self.enabled() || size == Bytes::ZERO || used.percent_of(size) < self.threshold {
            return None;
        }
        let step = u128::from(size.0) * u128::from(self.step.hundredths()) / 10_000;
        // The size at which `used` is just under the threshold.
        let below = u128::from(used.0) * 10_000 / u128::from(self.threshold.hundredths()) + 1;
        let needed = below.saturating_sub(u128::from(size.0));
        Some(Bytes(
            u64::try_from(step.max(needed)).unwrap_or(u64::MAX).max(1),
        ))
    }
}

/// The auto-extend settings of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolGrowthPolicy {
    pub data: GrowthRule,
    pub metadata: GrowthRule,
}

impl Default for PoolGrowthPolicy {
    /// Grow at 70 % by 20 %, data and metadata alike: at 20 % per step a
    /// pool grows ahead of a writer for as long as a step takes less time
    /// than writing 30 % of the pool.
    fn default() -> Self {
        let rule = GrowthRule {
            threshold: Percent::from_whole(70),
            step: Percent::from_whole(20),
        };
        PoolGrowthPolicy {
            data: rule,
            metadata: rule,
        }
    }
}

impl PoolGrowthPolicy {
    /// The growths `usage` calls for, metadata first: running out of
    /// metadata needs an offline repair, running out of data does not.
    pub fn plan(&self, usage: &PoolUsage) -> Vec<(PoolPart, Bytes)> {
        let mut plan = Vec::new();
        if let Some(by) = self
            .metadata
            .growth(usage.metadata_used, usage.metadata_size)
        {
            plan.push((PoolPart::Metadata, by));
        }
        if let Some(by) = self.data.growth(usage.data_used, usage.data_size) {
            plan.push((PoolPart::Data, by));
        }
        plan
    }
}

/// What one growth of a pool part did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolGrowth {
    /// The part grew; `to - from` may be less than asked when the VG had
    /// less free than the step.
    Grown {
        part: PoolPart,
        from: Bytes,
        to: Bytes,
    },
    /// The VG has not one extent free: the pool cannot grow, and what
    /// follows (containment) is up to the caller.
    VgFull { part: PoolPart, size: Bytes },
}

/// How much of a requested growth the VG can give, in whole extents:
/// `None` when not even one extent is free.
pub fn bounded_growth(requested: Bytes, vg_free: Bytes, extent: Bytes) -> Option<Bytes> {
    if extent == Bytes::ZERO {
        return None;
    }
    let wanted = requested.0.div_ceil(extent.0).max(1);
    let free = vg_free.0 / extent.0;
    let extents = wanted.min(free);
    (extents > 0).then(|| Bytes(extents * extent.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;

    fn usage(data_used: u64, metadata_used: u64) -> PoolUsage {
        PoolUsage {
            data_size: Bytes(100 * MIB),
            data_used: Bytes(data_used * MIB),
            metadata_size: Bytes(10 * MIB),
            metadata_used: Bytes(metadata_used * MIB / 10),
            provisioned: Bytes(1000 * MIB),
            volume_count: 1,
            health: crate::health::PoolHealth::Healthy,
        }
    }

    #[test]
    fn grows_at_the_threshold_not_below() {
        let policy = PoolGrowthPolicy::default();
        assert!(policy.plan(&usage(69, 10)).is_empty());
        assert_eq!(
            policy.plan(&usage(70, 10)),
            vec![(PoolPart::Data, Bytes(20 * MIB))]
        );
    }

    #[test]
    fn a_step_too_small_for_the_use_grows_by_what_is_needed() {
        let rule = PoolGrowthPolicy::default().data;
        // 95 of 100 MiB used: 20 MiB would leave 79 %; 136 MiB is under 70 %.
        let by = rule.growth(Bytes(95 * MIB), Bytes(100 * MIB)).unwrap();
        assert!(by > Bytes(35 * MIB) && by < Bytes(36 * MIB), "{by}");
        assert!(Bytes(95 * MIB).percent_of(Bytes(100 * MIB) + by) < rule.threshold);
    }

    #[test]
    fn metadata_comes_first() {
        let policy = PoolGrowthPolicy::default();
        assert_eq!(
            policy.plan(&usage(72, 75)),
            vec![
                (PoolPart::Metadata, Bytes(2 * MIB)),
                (PoolPart::Data, Bytes(20 * MIB))
            ]
        );
    }

    #[test]
    fn a_threshold_of_100_turns_growth_off() {
        let rule = GrowthRule::new(PoolPart::Data, Percent::FULL, Percent::from_whole(20)).unwrap();
        assert!(!rule.enabled());
        assert_eq!(rule.growth(Bytes(100), Bytes(100)), None);
    }

    #[test]
    fn rules_outside_lvms_limits_are_refused_naming_the_part() {
        let err = GrowthRule::new(
            PoolPart::Metadata,
            Percent::from_whole(40),
            Percent::from_whole(20),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("metadata auto-extend threshold 40"),
            "{err}"
        );
        assert!(GrowthRule::new(PoolPart::Data, Percent::from_whole(80), Percent::ZERO).is_err());
    }

    #[test]
    fn growth_is_bounded_by_vg_free_in_whole_extents() {
        let extent = Bytes(4 * MIB);
        assert_eq!(
            bounded_growth(Bytes(10 * MIB), Bytes(100 * MIB), extent),
            Some(Bytes(12 * MIB))
        );
        assert_eq!(
            bounded_growth(Bytes(100 * MIB), Bytes(9 * MIB), extent),
            Some(Bytes(8 * MIB))
        );
        assert_eq!(
            bounded_growth(Bytes(100 * MIB), Bytes(3 * MIB), extent),
            None
        );
    }
}

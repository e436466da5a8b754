//! Hydration: a volume moved or forked to another host is usable at once
//! and copied from its source in the background. These are the numbers the
//! copying layer reports and the rate it is held to.

use crate::names::MigrationId;
use crate::names::NAME_PREFIX;
use crate::units::{Bytes, Percent};
use std::collections::BTreeSet;
use std::fmt;

/// The LV tag naming the migration an LV belongs to: the source's export
/// snapshot, the destination's volume LV and its metadata LVs.
pub fn migration_tag(id: &MigrationId) -> String {
    format!("{NAME_PREFIX}.migration={id}")
}

/// The migration named by an LV's tags, if any.
pub fn migration(tags: &BTreeSet<String>) -> Option<MigrationId> {
    let prefix = format!("{NAME_PREFIX}.migration=");
    tags.iter()
        .find_map(|tag| tag.strip_prefix(&prefix))
        .and_then(|id| MigrationId::new(id).ok())
}

/// The background copy's rate limit, in KiB/s: dm-raid's
/// `max_recovery_rate` (kB/s per device; a raid1 rebuilds one device).
/// Reads a guest makes of blocks not yet copied are not limited.
/// In records it is its number of KiB/s, checked when read.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u64", into = "u32")]
pub struct RecoveryRate(u32);

impl TryFrom<u64> for RecoveryRate {
    type Error = RateError;
    fn try_from(kib_per_sec: u64) -> Result<RecoveryRate, RateError> {
        RecoveryRate::from_kib_per_sec(kib_per_sec)
    }
}

impl From<RecoveryRate> for u32 {
    fn from(rate: RecoveryRate) -> u32 {
        rate.0
    }
}

/// Why a rate limit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hydration rate {kib_per_sec} KiB/s is outside {min}..={max} KiB/s")]
pub struct RateError {
    pub kib_per_sec: u64,
    pub min: u32,
    pub max: u32,
}

impl RecoveryRate {
    /// Below this the copy of a small volume takes hours; dm-raid itself
    /// takes any positive value.
    pub const MIN_KIB_PER_SEC: u32 = 64;
    /// The kernel keeps the rate in an `int` of KiB/s.
    pub const MAX_KIB_PER_SEC: u32 = i32::MAX as u32;

    pub fn from_kib_per_sec(kib_per_sec: u64) -> Result<RecoveryRate, RateError> {
        let refused = RateError {
            kib_per_sec,
            min: Self::MIN_KIB_PER_SEC,
            max: Self::MAX_KIB_PER_SEC,
        };
        let rate = u32::try_from(kib_per_sec).map_err(|_| refused.clone())?;
        if !(Self::MIN_KIB_PER_SEC..=Self::MAX_KIB_PER_SEC).contains(&rate) {
            return Err(refused);
        }
        Ok(RecoveryRate(rate))
    }

    pub fn kib_per_sec(self) -> u32 {
        self.0
    }
}

impl fmt::Display for RecoveryRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} KiB/s", self.0)
    }
}

/// Where the background copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HydrationState {
    /// Blocks are being copied; reads of the rest go to the source.
    Copying,
    /// Every block is local; the copying layer can be replaced by a direct
    /// table.
    Complete,
    /// A leg failed (the layer reports it dead): nothing is copied and the
    /// operator must look. Never a state to swap tables in.
    Failed,
}

/// The copy's progress: how much of the volume is local.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HydrationProgress {
    pub copied: Bytes,
    pub total: Bytes,
    pub state: HydrationState,
}

impl HydrationProgress {
    pub fn percent(&self) -> Percent {
        self.copied.percent_of(self.total)
    }

    pub fn is_complete(&self) -> bool {
        self.state == HydrationState::Complete
    }
}

impl fmt::Display for HydrationProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            HydrationState::Copying => "hydrating",
            HydrationState::Complete => "hydrated",
            HydrationState::Failed => "hydration failed",
        };
        write!(
            f,
            "{state}: {} ({} of {})",
            self.percent(),
            self.copied,
            self.total
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migration_tag_round_trips() {
        let id = MigrationId::generate();
        let tags: BTreeSet<String> = [migration_tag(&id), "vmv1".to_owned()].into();
        assert_eq!(migration(&tags), Some(id));
        assert_eq!(migration(&BTreeSet::new()), None);
        crate::names::check_tag(&migration_tag(&MigrationId::generate())).unwrap();
    }

    #[test]
    fn rate_limits_are_checked_and_named() {
        assert_eq!(
            RecoveryRate::from_kib_per_sec(4096).unwrap().kib_per_sec(),
            4096
        );
        let low = RecoveryRate::from_kib_per_sec(1).unwrap_err();
        assert_eq!(
            low.to_string(),
            "hydration rate 1 KiB/s is outside 64..=2147483647 KiB/s"
        );
        assert!(RecoveryRate::from_kib_per_sec(u64::from(u32::MAX)).is_err());
        assert!(RecoveryRate::from_kib_per_sec(u64::MAX).is_err());
        let rate = RecoveryRate::from_kib_per_sec(4096).unwrap();
        assert_eq!(serde_json::to_string(&rate).unwrap(), "4096");
        assert_eq!(serde_json::from_str::<RecoveryRate>("4096").unwrap(), rate);
        assert!(serde_json::from_str::<RecoveryRate>("1").is_err());
    }

    #[test]
    fn progress_reads_as_a_percentage_of_the_volume() {
        let progress = HydrationProgress {
            copied: Bytes(50 * 1024 * 1024),
            total: Bytes(200 * 1024 * 1024),
            state: HydrationState::Copying,
        };
        assert_eq!(progress.percent(), Percent::from_whole(25));
        assert!(!progress.is_complete());
        assert!(
            progress.to_string().starts_with("hydrating: 25.00%"),
            "{progress}"
        );
    }
}

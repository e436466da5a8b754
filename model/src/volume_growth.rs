//! Volume auto-extend, as Fly offers it: grow a volume by a fixed
//! increment once its usage reaches a threshold, never beyond a limit.
//!
//! The three settings come together or not at all, so the record holds an
//! `Option<AutoExtend>`, never a partial one. Ranges follow Fly's
//! (`--auto-extend-size-threshold` 50–99 %, increment and limit in GB).
//! Usage is either the filesystem's own, reported from inside the guest
//! ([`FsUsage`]), or else the thin LV's allocated share (data%), which is
//! what the host can see; discards lower it.

use crate::units::{Bytes, Percent, GB};
use serde::{Deserialize, Serialize};

/// Lowest threshold accepted, in whole percent.
pub const THRESHOLD_MIN: u32 = 50;
/// Highest threshold accepted, in whole percent.
pub const THRESHOLD_MAX: u32 = 99;
/// The smallest increment: one decimal gigabyte.
pub const INCREMENT_MIN: Bytes = Bytes(GB);

/// A volume's auto-extend settings, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoExtend {
    /// Grow once usage is at or above this share.
    pub threshold: Percent,
    /// Added per step.
    pub increment: Bytes,
    /// The volume never grows beyond this size.
    pub limit: Bytes,
}

/// Why auto-extend settings are refused; each names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AutoExtendError {
    #[error("auto-extend threshold {threshold}: must be {THRESHOLD_MIN}–{THRESHOLD_MAX} %")]
    Threshold { threshold: Percent },
    #[error("auto-extend increment {increment}: must be at least 1 GB")]
    Increment { increment: Bytes },
    #[error("auto-extend limit {limit}: must be larger than the volume's size {size}")]
    Limit { limit: Bytes, size: Bytes },
}

impl AutoExtend {
    /// Settings for a volume now of `size`: threshold in range, an
    /// increment of at least 1 GB, and a limit above `size`.
    pub fn new(
        threshold: Percent,
        increment: Bytes,
        limit: Bytes,
        size: Bytes,
    ) -> Result<AutoExtend, AutoExtendError> {
        let settings = AutoExtend {
            threshold,
            increment,
            limit,
        };
        settings.check()?;
        if limit <= size {
            return Err(AutoExtendError::Limit { limit, size });
        }
        Ok(settings)
    }

    /// The checks a stored record must pass. (A volume may since have
    /// grown to or past its limit: then it simply grows no more.)
    pub fn check(&self) -> Result<(), AutoExtendError> {
        if self.threshold < Percent::from_whole(THRESHOLD_MIN)
            || self.threshold > Percent::from_whole(THRESHOLD_MAX)
        {
            return Err(AutoExtendError::Threshold {
                threshold: self.threshold,
            });
        }
        if self.increment < INCREMENT_MIN {
            return Err(AutoExtendError::Increment {
                increment: self.increment,
            });
        }
        Ok(())
    }

    /// The size a volume of `size` with `used` in use grows to, if it
    /// grows: one increment, cut at the limit.
    pub fn next_size(&self, size: Bytes, used: Percent) -> Option<Bytes> {
        if used < self.threshold || size >= self.limit {
            return None;
        }
        Some(
            size.checked_add(self.increment)
                .unwrap_or(self.limit)
                .min(self.limit),
        )
    }
}

/// A filesystem's usage as an agent inside the guest sees it (`statfs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsUsage {
    pub used: Bytes,
    pub total: Bytes,
}

/// Why a usage report is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsUsageError {
    #[error("filesystem usage report: total must be larger than 0")]
    EmptyTotal,
    #[error("filesystem usage report: used {used} is more than the total {total}")]
    UsedOverTotal { used: Bytes, total: Bytes },
}

impl FsUsage {
    pub fn new(used: Bytes, total: Bytes) -> Result<FsUsage, FsUsageError> {
        let usage = FsUsage { used, total };
        usage.check()?;
        Ok(usage)
    }

    pub fn check(&self) -> Result<(), FsUsageError> {
        if self.total == Bytes::ZERO {
            return Err(FsUsageError::EmptyTotal);
        }
        if self.used > self.total {
            return Err(FsUsageError::UsedOverTotal {
                used: self.used,
                total: self.total,
            });
        }
        Ok(())
    }

    pub fn percent(&self) -> Percent {
        self.used.percent_of(self.total)
    }
}

/// Where a usage figure came from, as the daemon reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The guest's own report of its filesystem.
    Filesystem,
    /// The thin LV's allocated share (data%).
    Allocated,
}

impl std::fmt::Display for UsageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UsageSource::Filesystem => "filesystem",
            UsageSource::Allocated => "allocated",
        })
    }
}

/// A filesystem report and how old it is, as the daemon holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgedReport {
    pub usage: FsUsage,
    pub age_ms: u64,
}

impl AutoExtend {
    /// The usage this rule acts on for a volume of `size`: the guest's
    /// filesystem report while it is at most `max_age_ms` old and its
    /// filesystem covers the volume to within one increment, else the thin
    /// LV's `allocated` share. (A filesystem not yet grown after a step,
    /// as a guest grows its own, would otherwise read as full again and
    /// set off step after step.)
    pub fn usage(
        &self,
        size: Bytes,
        allocated: Percent,
        report: Option<AgedReport>,
        max_age_ms: u64,
    ) -> (Percent, UsageSource) {
        match report {
            Some(AgedReport { usage, age_ms })
                if age_ms <= max_age_ms
                    && usage.check().is_ok()
                    && usage
                        .total
                        .checked_add(self.increment)
                        .is_none_or(|t| t > size) =>
            {
                (usage.percent(), UsageSource::Filesystem)
            }
            _ => (allocated, UsageSource::Allocated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gb(n: u64) -> Bytes {
        Bytes(n * GB)
    }

    #[test]
    fn settings_are_checked_naming_the_setting() {
        let ok = AutoExtend::new(Percent::from_whole(80), gb(1), gb(10), gb(5)).unwrap();
        assert_eq!(ok.limit, gb(10));
        for pct in [0, 49, 100] {
            let err = AutoExtend::new(Percent::from_whole(pct), gb(1), gb(10), gb(5)).unwrap_err();
            assert!(matches!(err, AutoExtendError::Threshold { .. }), "{pct}");
            assert!(err.to_string().contains("threshold"), "{err}");
        }
        for pct in [50, 99] {
            assert!(AutoExtend::new(Percent::from_whole(pct), gb(1), gb(10), gb(5)).is_ok());
        }
        let err =
            AutoExtend::new(Percent::from_whole(80), Bytes(GB - 1), gb(10), gb(5)).unwrap_err();
        assert!(err.to_string().contains("increment"), "{err}");
        for limit in [gb(5), gb(4)] {
            let err = AutoExtend::new(Percent::from_whole(80), gb(1), limit, gb(5)).unwrap_err();
            assert_eq!(err, AutoExtendError::Limit { limit, size: gb(5) });
            assert!(err.to_string().contains("limit"), "{err}");
        }
    }

    #[test]
    fn grows_by_the_increment_at_the_threshold_and_stops_at_the_limit() {
        let rule = AutoExtend::new(Percent::from_whole(80), gb(2), gb(9), gb(5)).unwrap();
        assert_eq!(rule.next_size(gb(5), Percent::from_hundredths(7999)), None);
        assert_eq!(rule.next_size(gb(5), Percent::from_whole(80)), Some(gb(7)));
        assert_eq!(rule.next_size(gb(8), Percent::FULL), Some(gb(9)));
        assert_eq!(rule.next_size(gb(9), Percent::FULL), None);
        // Grown past the limit by hand: no more.
        assert_eq!(rule.next_size(gb(12), Percent::FULL), None);
        let huge = AutoExtend {
            threshold: Percent::from_whole(50),
            increment: Bytes(u64::MAX),
            limit: Bytes(u64::MAX - 1),
        };
        assert_eq!(
            huge.next_size(gb(1), Percent::FULL),
            Some(Bytes(u64::MAX - 1))
        );
    }

    #[test]
    fn a_fresh_filesystem_report_wins_over_data_percent() {
        let rule = AutoExtend::new(Percent::from_whole(80), gb(1), gb(20), gb(10)).unwrap();
        let fs = FsUsage::new(gb(9), gb(10)).unwrap();
        let allocated = Percent::from_whole(30);
        let aged = |usage, age_ms| Some(AgedReport { usage, age_ms });
        assert_eq!(
            rule.usage(gb(10), allocated, aged(fs, 1_000), 60_000),
            (Percent::from_whole(90), UsageSource::Filesystem)
        );
        // Stale.
        assert_eq!(
            rule.usage(gb(10), allocated, aged(fs, 60_001), 60_000),
            (allocated, UsageSource::Allocated)
        );
        assert_eq!(
            rule.usage(gb(10), allocated, None, 60_000),
            (allocated, UsageSource::Allocated)
        );
        // The volume grew by a step the filesystem has not caught up with.
        assert_eq!(
            rule.usage(gb(11), allocated, aged(fs, 0), 60_000),
            (allocated, UsageSource::Allocated)
        );
        // ext4's own overhead keeps its total a little under the device.
        let overhead = FsUsage::new(gb(9), Bytes(9_700_000_000)).unwrap();
        assert_eq!(
            rule.usage(gb(10), allocated, aged(overhead, 0), 60_000).1,
            UsageSource::Filesystem
        );
        let bad = FsUsage {
            used: gb(11),
            total: gb(10),
        };
        assert_eq!(
            rule.usage(gb(10), allocated, aged(bad, 0), 60_000).1,
            UsageSource::Allocated
        );
        assert_eq!(
            FsUsage::new(gb(1), Bytes::ZERO),
            Err(FsUsageError::EmptyTotal)
        );
        assert!(FsUsage::new(gb(11), gb(10)).is_err());
    }

    #[test]
    fn records_round_trip() {
        let rule = AutoExtend::new(Percent::from_whole(80), gb(1), gb(10), gb(5)).unwrap();
        let json = serde_json::to_string(&rule).unwrap();
        assert_eq!(
            json,
            r#"{"threshold":8000,"increment":1000000000,"limit":10000000000}"#
        );
        assert_eq!(serde_json::from_str::<AutoExtend>(&json).unwrap(), rule);
    }
}

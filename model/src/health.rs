//! Typed health of a thin pool and of a thin volume.
//!
//! The backend reads it from what LVM and device-mapper report; this module
//! only says what each state means: a pool that is not [`PoolHealth::Healthy`]
//! cannot be trusted with writes, so admission promises it no new space
//! ([`crate::capacity`]).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The health of a thin pool, worst state first wins when several signals
/// disagree ([`PoolHealth::worst`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolHealth {
    #[default]
    Healthy,
    /// Free data is in the fencing reserve ([`crate::fence`]) with the VG
    /// full, or volumes are fenced: the pool takes writes, but the rest is
    /// kept for the volumes that did not fill it. Set by volumed, not LVM.
    InReserve,
    /// The metadata superblock has `needs_check` set: the pool must be taken
    /// offline for `thin_check`/`lvconvert --repair`.
    NeedsCheck,
    /// No free data blocks: writes to unprovisioned blocks fail (or queue).
    OutOfData,
    /// The kernel switched the pool to read-only metadata mode.
    MetadataReadOnly,
    /// LVM could not tell (`X` in `lv_attr`, or a status it does not know).
    Unknown,
    /// The pool target reports `Fail`.
    Failed,
}

impl PoolHealth {
    pub const ALL: [PoolHealth; 7] = [
        PoolHealth::Healthy,
        PoolHealth::InReserve,
        PoolHealth::NeedsCheck,
        PoolHealth::OutOfData,
        PoolHealth::MetadataReadOnly,
        PoolHealth::Unknown,
        PoolHealth::Failed,
    ];

    /// Whether the pool can take writes to new blocks. Only a healthy pool
    /// can; every other state gets no new space promised.
    pub fn takes_writes(self) -> bool {
        self == PoolHealth::Healthy
    }

    /// The machine-readable name (KV records, metric labels, columns).
    pub fn as_str(self) -> &'static str {
        match self {
            PoolHealth::Healthy => "healthy",
            PoolHealth::InReserve => "in_reserve",
            PoolHealth::NeedsCheck => "needs_check",
            PoolHealth::OutOfData => "out_of_data",
            PoolHealth::MetadataReadOnly => "metadata_read_only",
            PoolHealth::Unknown => "unknown",
            PoolHealth::Failed => "failed",
        }
    }

    /// What the state means for an operator.
    pub fn reason(self) -> &'static str {
        match self {
            PoolHealth::Healthy => "pool healthy",
            PoolHealth::InReserve => {
                "pool data in its fencing reserve with the VG full (volumes that filled it are fenced)"
            }
            PoolHealth::NeedsCheck => "pool metadata needs a check (thin_check) before full use",
            PoolHealth::OutOfData => "pool out of data space",
            PoolHealth::MetadataReadOnly => "pool metadata read-only",
            PoolHealth::Unknown => "pool health unknown",
            PoolHealth::Failed => "pool failed",
        }
    }

    fn severity(self) -> u8 {
        match self {
            PoolHealth::Healthy => 0,
            PoolHealth::InReserve => 1,
            PoolHealth::NeedsCheck => 2,
            PoolHealth::OutOfData => 3,
            PoolHealth::MetadataReadOnly => 4,
            PoolHealth::Unknown => 5,
            PoolHealth::Failed => 6,
        }
    }

    /// The worse of two readings (from LVM's report and the kernel's status).
    pub fn worst(self, other: PoolHealth) -> PoolHealth {
        if other.severity() > self.severity() {
            other
        } else {
            self
        }
    }
}

impl fmt::Display for PoolHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The health of one thin volume, where LVM reports one (a thin target only
/// ever says `Fail`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeHealth {
    #[default]
    Healthy,
    /// LVM could not tell (`X` in `lv_attr`).
    Unknown,
    /// The thin target reports `Fail`.
    Failed,
}

impl VolumeHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeHealth::Healthy => "healthy",
            VolumeHealth::Unknown => "unknown",
            VolumeHealth::Failed => "failed",
        }
    }
}

impl fmt::Display for VolumeHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_healthy_pool_takes_writes() {
        for health in PoolHealth::ALL {
            assert_eq!(health.takes_writes(), health == PoolHealth::Healthy);
        }
    }

    #[test]
    fn worst_is_symmetric_and_failed_dominates() {
        for a in PoolHealth::ALL {
            for b in PoolHealth::ALL {
                assert_eq!(a.worst(b), b.worst(a));
                assert!(a.worst(b) == a || a.worst(b) == b);
            }
            assert_eq!(a.worst(PoolHealth::Failed), PoolHealth::Failed);
            assert_eq!(a.worst(PoolHealth::Healthy), a);
        }
        assert_eq!(
            PoolHealth::OutOfData.worst(PoolHealth::NeedsCheck),
            PoolHealth::OutOfData
        );
    }

    #[test]
    fn serde_names_are_the_display_names() {
        for health in PoolHealth::ALL {
            let json = serde_json::to_string(&health).unwrap();
            assert_eq!(json, format!("\"{}\"", health.as_str()));
        }
    }
}

//! Storage units as newtypes.
//!
//! Arithmetic stays within one unit; moving between units is an explicit,
//! checked conversion. Nothing here does I/O.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Bytes per 512-byte sector, the unit device-mapper and LVM tables use.
pub const SECTOR_SIZE: u64 = 512;
pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// A decimal gigabyte, the unit of `volctl create --size`.
pub const GB: u64 = 1_000_000_000;

/// A conversion that would lose information or overflow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("{value} bytes is not a whole number of {unit}-byte {what}")]
    NotAligned {
        value: u64,
        unit: u64,
        what: &'static str,
    },
    #[error("{what} overflows 64 bits")]
    Overflow { what: &'static str },
    #[error("extent size must be a non-zero multiple of 512 bytes, got {0} bytes")]
    BadExtentSize(u64),
}

macro_rules! unit_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            pub const ZERO: $name = $name(0);

            pub fn checked_add(self, other: $name) -> Option<$name> {
                self.0.checked_add(other.0).map($name)
            }

            pub fn checked_sub(self, other: $name) -> Option<$name> {
                self.0.checked_sub(other.0).map($name)
            }

            pub fn saturating_sub(self, other: $name) -> $name {
                $name(self.0.saturating_sub(other.0))
            }
        }

        impl std::ops::Add for $name {
            type Output = $name;
            fn add(self, other: $name) -> $name {
                $name(self.0 + other.0)
            }
        }

        impl std::ops::Sub for $name {
            type Output = $name;
            fn sub(self, other: $name) -> $name {
                $name(self.0 - other.0)
            }
        }

        impl std::iter::Sum for $name {
            fn sum<I: Iterator<Item = $name>>(iter: I) -> $name {
                $name(iter.map(|v| v.0).sum())
            }
        }
    };
}

unit_newtype!(
    /// A size or offset in bytes.
    Bytes
);
unit_newtype!(
    /// A count of 512-byte sectors.
    Sectors
);
unit_newtype!(
    /// A count of LVM physical extents; meaningful only with an [`ExtentSize`].
    Extents
);
unit_newtype!(
    /// A measured transfer rate in bytes per second.
    BytesPerSec
);

impl Bytes {
    pub fn from_mib(mib: u64) -> Result<Bytes, UnitError> {
        mib.checked_mul(MIB)
            .map(Bytes)
            .ok_or(UnitError::Overflow { what: "MiB" })
    }

    pub fn from_gib(gib: u64) -> Result<Bytes, UnitError> {
        gib.checked_mul(GIB)
            .map(Bytes)
            .ok_or(UnitError::Overflow { what: "GiB" })
    }

    /// Decimal gigabytes, as operators type them (`--size 25`).
    pub fn from_gb(gb: u64) -> Result<Bytes, UnitError> {
        gb.checked_mul(GB)
            .map(Bytes)
            .ok_or(UnitError::Overflow { what: "GB" })
    }

    /// Exact conversion; refuses a size that is not whole sectors.
    pub fn to_sectors(self) -> Result<Sectors, UnitError> {
        if !self.0.is_multiple_of(SECTOR_SIZE) {
            return Err(UnitError::NotAligned {
                value: self.0,
                unit: SECTOR_SIZE,
                what: "sectors",
            });
        }
        Ok(Sectors(self.0 / SECTOR_SIZE))
    }

    /// Rounds up to whole extents: LVM allocates whole extents, so a volume
    /// is never smaller than asked.
    pub fn to_extents_ceil(self, extent: ExtentSize) -> Extents {
        Extents(self.0.div_ceil(extent.bytes().0))
    }

    /// Rounds up to a multiple of `align` bytes (`align` > 0).
    pub fn round_up_to(self, align: Bytes) -> Result<Bytes, UnitError> {
        let units = self.0.div_ceil(align.0);
        units
            .checked_mul(align.0)
            .map(Bytes)
            .ok_or(UnitError::Overflow { what: "bytes" })
    }

    /// Bytes as a percentage of `whole`, for usage reports.
    pub fn percent_of(self, whole: Bytes) -> Percent {
        if whole.0 == 0 {
            return Percent::ZERO;
        }
        let hundredths = (u128::from(self.0) * 10_000 / u128::from(whole.0)).min(10_000);
        Percent::from_hundredths(hundredths as u32)
    }
}

impl Sectors {
    pub fn to_bytes(self) -> Result<Bytes, UnitError> {
        self.0
            .checked_mul(SECTOR_SIZE)
            .map(Bytes)
            .ok_or(UnitError::Overflow { what: "sectors" })
    }
}

impl std::str::FromStr for Bytes {
    type Err = String;

    /// A whole number with an optional unit: `KiB`/`MiB`/`GiB`/`TiB` and
    /// LVM's `K`/`M`/`G`/`T` are binary, `KB`/`MB`/`GB`/`TB` decimal, and a
    /// bare number or `B` is bytes. Fractions are refused, not rounded.
    fn from_str(text: &str) -> Result<Bytes, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let value: u64 = digits
            .parse()
            .map_err(|_| format!("size {text:?} is not a whole number with an optional unit"))?;
        let scale = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => KIB,
            "M" | "MiB" => MIB,
            "G" | "GiB" => GIB,
            "T" | "TiB" => GIB << 10,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => GB,
            "TB" => GB * 1_000,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in size {text:?} (use KiB, MiB, GiB, TiB, or KB, MB, GB, TB)"
                ))
            }
        };
        value
            .checked_mul(scale)
            .map(Bytes)
            .ok_or_else(|| format!("size {text:?} overflows 64 bits"))
    }
}

/// The size of one LVM physical extent (a VG property; 4 MiB by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExtentSize(Sectors);

impl ExtentSize {
    pub const DEFAULT: ExtentSize = ExtentSize(Sectors(4 * MIB / SECTOR_SIZE));

    pub fn new(bytes: Bytes) -> Result<ExtentSize, UnitError> {
        if bytes.0 == 0 || !bytes.0.is_multiple_of(SECTOR_SIZE) {
            return Err(UnitError::BadExtentSize(bytes.0));
        }
        Ok(ExtentSize(Sectors(bytes.0 / SECTOR_SIZE)))
    }

    pub fn bytes(self) -> Bytes {
        Bytes(self.0 .0 * SECTOR_SIZE)
    }
}

impl Extents {
    pub fn to_bytes(self, extent: ExtentSize) -> Result<Bytes, UnitError> {
        self.0
            .checked_mul(extent.bytes().0)
            .map(Bytes)
            .ok_or(UnitError::Overflow { what: "extents" })
    }
}

/// A percentage with two decimals, as LVM reports `data_percent`.
/// Stored in hundredths so that comparisons are exact.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Percent(u32);

impl Percent {
    pub const ZERO: Percent = Percent(0);
    pub const FULL: Percent = Percent(10_000);

    pub fn from_hundredths(hundredths: u32) -> Percent {
        Percent(hundredths)
    }

    pub fn from_whole(pct: u32) -> Percent {
        Percent(pct.saturating_mul(100))
    }

    pub fn hundredths(self) -> u32 {
        self.0
    }

    /// This share of `whole`, rounded down (the inverse of
    /// [`Bytes::percent_of`]).
    pub fn of(self, whole: Bytes) -> Bytes {
        let part = u128::from(whole.0) * u128::from(self.0) / 10_000;
        Bytes(u64::try_from(part).unwrap_or(u64::MAX))
    }

    /// Parses LVM's decimal form (`"12.34"`, `"0.00"`, `""` for "not
    /// applicable" is the caller's business and is refused here).
    pub fn parse_lvm(text: &str) -> Option<Percent> {
        let text = text.trim();
        let (whole, frac) = match text.split_once('.') {
            Some((w, f)) => (w, f),
            None => (text, ""),
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if frac.len() > 2 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let whole: u32 = whole.parse().ok()?;
        let mut frac_hundredths: u32 = if frac.is_empty() {
            0
        } else {
            frac.parse().ok()?
        };
        if frac.len() == 1 {
            frac_hundredths *= 10;
        }
        whole
            .checked_mul(100)?
            .checked_add(frac_hundredths)
            .map(Percent)
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}%", self.0 / 100, self.0 % 100)
    }
}

impl fmt::Display for Bytes {
    /// Binary units with one decimal, e.g. `3.2 GiB`; exact below 1 KiB.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] =
            [(1 << 40, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
        for (size, name) in UNITS {
            if self.0 >= size {
                let tenths = (u128::from(self.0) * 10 + u128::from(size) / 2) / u128::from(size);
                return if tenths % 10 == 0 {
                    write!(f, "{} {name}", tenths / 10)
                } else {
                    write!(f, "{}.{} {name}", tenths / 10, tenths % 10)
                };
            }
        }
        write!(f, "{} B", self.0)
    }
}

/// How many times the pool's data size may be provisioned as virtual size,
/// in thousandths so that accounting is exact integer arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OvercommitRatio(u32);

impl OvercommitRatio {
    pub const ONE: OvercommitRatio = OvercommitRatio(1000);

    pub fn from_thousandths(thousandths: u32) -> Option<OvercommitRatio> {
        (thousandths > 0).then_some(OvercommitRatio(thousandths))
    }

    pub fn whole(ratio: u32) -> Option<OvercommitRatio> {
        ratio.checked_mul(1000).and_then(Self::from_thousandths)
    }

    pub fn thousandths(self) -> u32 {
        self.0
    }

    /// `ratio × size`, rounded down, saturating at `u64::MAX`.
    pub fn scale(self, size: Bytes) -> Bytes {
        let scaled = u128::from(size.0) * u128::from(self.0) / 1000;
        Bytes(u64::try_from(scaled).unwrap_or(u64::MAX))
    }
}

impl fmt::Display for OvercommitRatio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let frac = format!("{frac:03}");
            write!(f, "{whole}.{}", frac.trim_end_matches('0'))
        }
    }
}

impl std::str::FromStr for OvercommitRatio {
    type Err = String;

    /// Accepts `10`, `2.5`, `1.125`; refuses zero, negatives and more than
    /// three decimals.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("over-commit ratio {text:?} is not a positive number with at most 3 decimals")
        };
        let (whole, frac) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
        if whole.is_empty()
            || frac.len() > 3
            || !whole
                .bytes()
                .chain(frac.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let whole: u32 = whole.parse().map_err(|_| bad())?;
        let frac: u32 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<3}").parse().map_err(|_| bad())?
        };
        whole
            .checked_mul(1000)
            .and_then(|w| w.checked_add(frac))
            .and_then(OvercommitRatio::from_thousandths)
            .ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn display_is_human() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes::from_gib(25).unwrap().to_string(), "25 GiB");
        assert_eq!(Bytes(3 * GIB + GIB / 5).to_string(), "3.2 GiB");
        assert_eq!(Percent::from_hundredths(1234).to_string(), "12.34%");
        assert_eq!("2.5".parse::<OvercommitRatio>().unwrap().to_string(), "2.5");
        assert_eq!("10".parse::<OvercommitRatio>().unwrap().to_string(), "10");
    }

    #[test]
    fn sizes_parse_with_explicit_units() {
        assert_eq!("3GiB".parse::<Bytes>(), Ok(Bytes(3 * GIB)));
        assert_eq!("3G".parse::<Bytes>(), Ok(Bytes(3 * GIB)));
        assert_eq!("25GB".parse::<Bytes>(), Ok(Bytes(25 * GB)));
        assert_eq!("512".parse::<Bytes>(), Ok(Bytes(512)));
        for bad in [
            "",
            "1.5G",
            "-1G",
            "3 gigs",
            "99999999999999999999TiB",
            "GiB",
        ] {
            assert!(bad.parse::<Bytes>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn lvm_percent_parses() {
        assert_eq!(Percent::parse_lvm("12.34"), Some(Percent(1234)));
        assert_eq!(Percent::parse_lvm("100.00"), Some(Percent(10_000)));
        assert_eq!(Percent::parse_lvm("7.5"), Some(Percent(750)));
        assert_eq!(Percent::parse_lvm("0"), Some(Percent(0)));
        assert_eq!(Percent::parse_lvm(""), None);
        assert_eq!(Percent::parse_lvm("-1.00"), None);
        assert_eq!(Percent::parse_lvm("1.234"), None);
    }

    #[test]
    fn ratio_rejects_bad_text() {
        for bad in ["0", "0.000", "", "-1", "1.2345", "abc", "1e3", "."] {
            assert!(bad.parse::<OvercommitRatio>().is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn sectors_round_trip(sectors in 0u64..(u64::MAX / SECTOR_SIZE)) {
            let bytes = Sectors(sectors).to_bytes().unwrap();
            prop_assert_eq!(bytes.to_sectors().unwrap(), Sectors(sectors));
        }

        #[test]
        fn bytes_to_sectors_round_trips_or_is_rejected(bytes in any::<u64>()) {
            match Bytes(bytes).to_sectors() {
                Ok(sectors) => prop_assert_eq!(sectors.to_bytes().unwrap(), Bytes(bytes)),
                Err(UnitError::NotAligned { .. }) => prop_assert_ne!(bytes % SECTOR_SIZE, 0),
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }

        #[test]
        fn oversized_sectors_are_rejected(sectors in (u64::MAX / SECTOR_SIZE + 1)..=u64::MAX) {
            prop_assert!(Sectors(sectors).to_bytes().is_err());
        }

        #[test]
        fn extents_never_undershoot(bytes in 0u64..(1 << 50), mib in 1u64..=64) {
            let extent = ExtentSize::new(Bytes(mib * MIB)).unwrap();
            let covered = bytes_to_extents_to_bytes(Bytes(bytes), extent);
            prop_assert!(covered >= Bytes(bytes));
            prop_assert!(covered.0 - bytes < extent.bytes().0);
        }

        #[test]
        fn percent_display_parses_back(hundredths in 0u32..=1_000_000) {
            let pct = Percent::from_hundredths(hundredths);
            let text = pct.to_string();
            prop_assert_eq!(Percent::parse_lvm(text.trim_end_matches('%')), Some(pct));
        }

        #[test]
        fn ratio_display_parses_back(thousandths in 1u32..=1_000_000) {
            let ratio = OvercommitRatio::from_thousandths(thousandths).unwrap();
            prop_assert_eq!(ratio.to_string().parse::<OvercommitRatio>(), Ok(ratio));
        }
    }

    fn bytes_to_extents_to_bytes(bytes: Bytes, extent: ExtentSize) -> Bytes {
        bytes.to_extents_ceil(extent).to_bytes(extent).unwrap()
    }
}

//! Checked names and ids.
//!
//! Every name that reaches LVM, device-mapper, the filesystem or the KV store
//! is one of these types, validated once at the edge. None of them can hold a
//! path separator, `..`, a leading `-`, or be empty.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Versioned prefix on every LV, dm mapping and LV tag this project makes,
/// so that listing and cleanup find exactly our devices and never another's.
pub const NAME_PREFIX: &str = "vmv1";
/// The LVM tag carried by every LV this project owns.
pub const OWNER_TAG: &str = "vmv1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct NameError {
    pub kind: &'static str,
    pub value: String,
    pub reason: String,
}

fn refuse(kind: &'static str, value: &str, reason: impl Into<String>) -> NameError {
    NameError {
        kind,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Rules every name shares, whatever else its kind allows.
fn check_common(kind: &'static str, value: &str, max_len: usize) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(refuse(kind, value, "must not be empty"));
    }
    if value.len() > max_len {
        return Err(refuse(kind, value, format!("longer than {max_len} bytes")));
    }
    if value.contains('/') || value.contains('\0') {
        return Err(refuse(kind, value, "must not contain '/' or NUL"));
    }
    if value == "." || value.contains("..") {
        return Err(refuse(kind, value, "must not be '.' or contain '..'"));
    }
    if value.starts_with('-') {
        return Err(refuse(kind, value, "must not start with '-'"));
    }
    Ok(())
}

fn check_charset(
    kind: &'static str,
    value: &str,
    allowed: impl Fn(char) -> bool,
    described: &str,
) -> Result<(), NameError> {
    match value.chars().find(|c| !allowed(*c)) {
        Some(bad) => Err(refuse(
            kind,
            value,
            format!("character {bad:?} not allowed (only {described})"),
        )),
        None => Ok(()),
    }
}

macro_rules! checked_name {
    ($(#[$meta:meta])* $name:ident, $kind:literal, $check:path) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const KIND: &'static str = $kind;

            pub fn new(value: impl Into<String>) -> Result<$name, NameError> {
                let value = value.into();
                $check(&value)?;
                Ok($name(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<$name, NameError> {
                $name::new(value)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(value: &str) -> Result<$name, NameError> {
                $name::new(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

fn is_lvm_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-')
}

const LVM_CHARSET: &str = "A-Z a-z 0-9 + _ . -";

/// LVM refuses LV names that contain these (they name hidden sub-LVs).
const LV_RESERVED_PARTS: [&str; 14] = [
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_mimage", "_mlog", "_pmspare", "_rimage",
    "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin",
];

fn check_vg(value: &str) -> Result<(), NameError> {
    check_common("VG name", value, 127)?;
    check_charset("VG name", value, is_lvm_char, LVM_CHARSET)
}

fn check_lv(value: &str) -> Result<(), NameError> {
    // 127 is LVM's limit; the dm name is "<vg>-<lv>" and must stay below 128,
    // which `ThinPoolSpec` checks for the pair.
    check_common("LV name", value, 127)?;
    check_charset("LV name", value, is_lvm_char, LVM_CHARSET)?;
    if value.starts_with("snapshot") || value.starts_with("pvmove") {
        return Err(refuse(
            "LV name",
            value,
            "LVM reserves the prefixes 'snapshot' and 'pvmove'",
        ));
    }
    if let Some(part) = LV_RESERVED_PARTS.iter().find(|p| value.contains(*p)) {
        return Err(refuse(
            "LV name",
            value,
            format!("LVM reserves the part {part:?}"),
        ));
    }
    Ok(())
}

/// Volume ids are `vol_` followed by 16 lowercase letters or digits.
const VOLUME_ID_PREFIX: &str = "vol_";
const VOLUME_ID_RANDOM_LEN: usize = 16;

fn check_volume_id(value: &str) -> Result<(), NameError> {
    check_common(
        "volume id",
        value,
        VOLUME_ID_PREFIX.len() + VOLUME_ID_RANDOM_LEN,
    )?;
    let Some(random) = value.strip_prefix(VOLUME_ID_PREFIX) else {
        return Err(refuse("volume id", value, "must start with 'vol_'"));
    };
    if random.len() != VOLUME_ID_RANDOM_LEN {
        return Err(refuse(
            "volume id",
            value,
            format!("needs exactly {VOLUME_ID_RANDOM_LEN} characters after 'vol_'"),
        ));
    }
    check_charset(
        "volume id",
        random,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit(),
        "a-z 0-9 after 'vol_'",
    )
    .map_err(|e| refuse("volume id", value, e.reason))
}

/// Snapshot ids are `snap_` followed by 16 lowercase letters or digits.
const SNAPSHOT_ID_PREFIX: &str = "snap_";

fn check_snapshot_id(value: &str) -> Result<(), NameError> {
    check_common(
        "snapshot id",
        value,
        SNAPSHOT_ID_PREFIX.len() + VOLUME_ID_RANDOM_LEN,
    )?;
    let Some(random) = value.strip_prefix(SNAPSHOT_ID_PREFIX) else {
        return Err(refuse("snapshot id", value, "must start with 'snap_'"));
    };
    if random.len() != VOLUME_ID_RANDOM_LEN {
        return Err(refuse(
            "snapshot id",
            value,
            format!("needs exactly {VOLUME_ID_RANDOM_LEN} characters after 'snap_'"),
        ));
    }
    check_charset(
        "snapshot id",
        random,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit(),
        "a-z 0-9 after 'snap_'",
    )
    .map_err(|e| refuse("snapshot id", value, e.reason))
}

/// Migration ids are `mig_` followed by 16 lowercase letters or digits.
const MIGRATION_ID_PREFIX: &str = "mig_";

fn check_migration_id(value: &str) -> Result<(), NameError> {
    const KIND: &str = "migration id";
    check_common(
        KIND,
        value,
        MIGRATION_ID_PREFIX.len() + VOLUME_ID_RANDOM_LEN,
    )?;
    let Some(random) = value.strip_prefix(MIGRATION_ID_PREFIX) else {
        return Err(refuse(KIND, value, "must start with 'mig_'"));
    };
    if random.len() != VOLUME_ID_RANDOM_LEN {
        return Err(refuse(
            KIND,
            value,
            format!("needs exactly {VOLUME_ID_RANDOM_LEN} characters after 'mig_'"),
        ));
    }
    check_charset(
        KIND,
        random,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit(),
        "a-z 0-9 after 'mig_'",
    )
    .map_err(|e| refuse(KIND, value, e.reason))
}

fn check_volume_name(value: &str) -> Result<(), NameError> {
    check_common("volume name", value, 30)?;
    check_charset(
        "volume name",
        value,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-',
        "a-z 0-9 _ -",
    )
}

/// Host ids, regions and zones: DNS-label-like.
fn check_label(kind: &'static str, value: &str) -> Result<(), NameError> {
    check_common(kind, value, 63)?;
    check_charset(
        kind,
        value,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
        "a-z 0-9 -",
    )
}

fn check_host_id(value: &str) -> Result<(), NameError> {
    check_label("host id", value)
}

fn check_region(value: &str) -> Result<(), NameError> {
    check_label("region", value)
}

fn check_zone(value: &str) -> Result<(), NameError> {
    check_label("zone", value)
}

fn check_dm_name(value: &str) -> Result<(), NameError> {
    check_common("device-mapper name", value, 127)?;
    check_charset("device-mapper name", value, is_lvm_char, LVM_CHARSET)
}

checked_name!(
    /// An LVM volume group name.
    VgName, "VG name", check_vg
);
checked_name!(
    /// An LVM logical volume name.
    LvName, "LV name", check_lv
);
checked_name!(
    /// A volume's unique id (`vol_` + 16 random characters).
    VolumeId, "volume id", check_volume_id
);
checked_name!(
    /// A snapshot's unique id (`snap_` + 16 random characters).
    SnapshotId, "snapshot id", check_snapshot_id
);
checked_name!(
    /// One move or fork of a volume between hosts (`mig_` + 16 random
    /// characters): names the source's export snapshot and the
    /// destination's copying-layer metadata LVs.
    MigrationId, "migration id", check_migration_id
);
checked_name!(
    /// A volume's user-facing name; not unique (several volumes may share one).
    VolumeName, "volume name", check_volume_name
);
checked_name!(
    /// A host's id in the control plane.
    HostId, "host id", check_host_id
);
checked_name!(
    /// A region, e.g. `ewr`.
    Region, "region", check_region
);
checked_name!(
    /// An availability zone within a region.
    Zone, "zone", check_zone
);
checked_name!(
    /// A device-mapper device name (e.g. a dm-crypt mapping).
    DmName, "device-mapper name", check_dm_name
);

/// The random part of a generated id.
fn random_id_part() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..VOLUME_ID_RANDOM_LEN)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

impl VolumeId {
    /// A fresh random id.
    pub fn generate() -> VolumeId {
        VolumeId(format!("{VOLUME_ID_PREFIX}{}", random_id_part()))
    }

    /// The thin LV that backs this volume.
    pub fn lv_name(&self) -> LvName {
        LvName(format!("{NAME_PREFIX}-{}", self.0))
    }

    /// The dm-crypt mapping that decrypts this volume.
    pub fn crypt_name(&self) -> DmName {
        DmName(format!("{NAME_PREFIX}-crypt-{}", self.0))
    }

    /// The inverse of [`VolumeId::lv_name`]; `None` for LVs that are not ours.
    pub fn from_lv_name(lv: &LvName) -> Option<VolumeId> {
        let rest = lv.as_str().strip_prefix(NAME_PREFIX)?.strip_prefix('-')?;
        VolumeId::new(rest).ok()
    }
}

impl SnapshotId {
    /// A fresh random id.
    pub fn generate() -> SnapshotId {
        SnapshotId(format!("{SNAPSHOT_ID_PREFIX}{}", random_id_part()))
    }

    /// The thin snapshot LV that holds this snapshot.
    pub fn lv_name(&self) -> LvName {
        LvName(format!("{NAME_PREFIX}-{}", self.0))
    }

    /// The inverse of [`SnapshotId::lv_name`]; `None` for LVs that are not
    /// snapshots of ours.
    pub fn from_lv_name(lv: &LvName) -> Option<SnapshotId> {
        let rest = lv.as_str().strip_prefix(NAME_PREFIX)?.strip_prefix('-')?;
        SnapshotId::new(rest).ok()
    }
}

impl MigrationId {
    /// A fresh random id.
    pub fn generate() -> MigrationId {
        MigrationId(format!("{MIGRATION_ID_PREFIX}{}", random_id_part()))
    }

    /// The source's thin snapshot that is exported: `vmv1-mig_…`. Neither a
    /// volume's nor a snapshot's LV name, so listings of those never show it.
    pub fn export_lv_name(&self) -> LvName {
        LvName(format!("{NAME_PREFIX}-{}", self.0))
    }

    /// The destination's metadata LV of copying-layer leg `leg` (0 is the
    /// network leg, 1 the local one): `vmv1-mig_…-meta<leg>`.
    pub fn meta_lv_name(&self, leg: u8) -> LvName {
        LvName(format!("{NAME_PREFIX}-{}-meta{leg}", self.0))
    }

    /// The destination's copying layer (dm-raid raid1) under the volume's
    /// dm-crypt mapping: `vmv1-hydrate-mig_…`.
    pub fn layer_name(&self) -> DmName {
        DmName(format!("{NAME_PREFIX}-hydrate-{}", self.0))
    }

    /// The NBD export name, also the TLS-PSK identity.
    pub fn export_name(&self) -> &str {
        &self.0
    }
}

/// LVM tag charset: `A-Z a-z 0-9 _ + . - / = ! : & #`, at most 1024 bytes.
pub fn check_tag(tag: &str) -> Result<(), NameError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "_+.-/=!:&#".contains(c);
    if tag.is_empty() || tag.len() > 1024 || !tag.chars().all(ok_char) || tag.starts_with('-') {
        return Err(NameError {
            kind: "LV tag",
            value: tag.to_owned(),
            reason: "must be 1-1024 of A-Z a-z 0-9 _ + . - / = ! : & # and not start with '-'"
                .into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_the_classic_bad_names() {
        for bad in ["", "/", "a/b", "..", "a..b", ".", "-x", "x\0y"] {
            assert!(VgName::new(bad).is_err(), "VG {bad:?}");
            assert!(LvName::new(bad).is_err(), "LV {bad:?}");
            assert!(VolumeName::new(bad).is_err(), "volume name {bad:?}");
            assert!(HostId::new(bad).is_err(), "host {bad:?}");
            assert!(DmName::new(bad).is_err(), "dm {bad:?}");
        }
        assert!(LvName::new("pool_tmeta").is_err());
        assert!(LvName::new("snapshot1").is_err());
    }

    #[test]
    fn migration_ids_name_devices_no_listing_mistakes_for_volumes() {
        let id = MigrationId::generate();
        assert!(MigrationId::new(id.as_str()).is_ok());
        for bad in [
            "mig_",
            "mig_ABCDEFGHIJKLMNOP",
            "vol_abcdefghijklmnop",
            "mig_abc",
        ] {
            assert!(MigrationId::new(bad).is_err(), "{bad}");
        }
        let export = id.export_lv_name();
        assert!(VolumeId::from_lv_name(&export).is_none());
        assert!(SnapshotId::from_lv_name(&export).is_none());
        for leg in [0, 1] {
            let meta = id.meta_lv_name(leg);
            assert!(LvName::new(meta.as_str()).is_ok(), "{meta}");
            assert!(VolumeId::from_lv_name(&meta).is_none());
            assert!(SnapshotId::from_lv_name(&meta).is_none());
        }
        assert!(DmName::new(id.layer_name().as_str()).is_ok());
    }

    #[test]
    fn errors_name_kind_value_and_reason() {
        let err = LvName::new("a/b").unwrap_err().to_string();
        assert_eq!(err, "invalid LV name \"a/b\": must not contain '/' or NUL");
    }

    #[test]
    fn volume_ids_map_to_our_lv_names_and_back() {
        let id = VolumeId::generate();
        let lv = id.lv_name();
        assert!(lv.as_str().starts_with("vmv1-vol_"));
        assert_eq!(VolumeId::from_lv_name(&lv), Some(id.clone()));
        assert_eq!(VolumeId::from_lv_name(&LvName::new("root").unwrap()), None);
        assert!(DmName::new(id.crypt_name().as_str()).is_ok());
    }

    #[test]
    fn snapshot_ids_map_to_their_own_lv_names_and_back() {
        let id = SnapshotId::generate();
        let lv = id.lv_name();
        assert!(lv.as_str().starts_with("vmv1-snap_"));
        assert_eq!(SnapshotId::from_lv_name(&lv), Some(id.clone()));
        // A snapshot LV is never read as a volume, nor a volume as one.
        assert_eq!(VolumeId::from_lv_name(&lv), None);
        assert_eq!(
            SnapshotId::from_lv_name(&VolumeId::generate().lv_name()),
            None
        );
        assert!(SnapshotId::new("snap_short").is_err());
        assert!(SnapshotId::new("vol_0123456789abcdef").is_err());
        assert!(SnapshotId::new("snap_0123456789ABCDEF").is_err());
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<VolumeId>("\"vol_../../etc\"").is_err());
        let id: VolumeId = serde_json::from_str("\"vol_0123456789abcdef\"").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"vol_0123456789abcdef\""
        );
    }

    proptest! {
        #[test]
        fn never_accepts_a_path_separator(prefix in ".{0,20}", suffix in ".{0,20}") {
            let value = format!("{prefix}/{suffix}");
            prop_assert!(VgName::new(value.clone()).is_err());
            prop_assert!(LvName::new(value.clone()).is_err());
            prop_assert!(VolumeId::new(value.clone()).is_err());
            prop_assert!(VolumeName::new(value.clone()).is_err());
            prop_assert!(HostId::new(value.clone()).is_err());
            prop_assert!(Region::new(value.clone()).is_err());
            prop_assert!(Zone::new(value.clone()).is_err());
            prop_assert!(DmName::new(value).is_err());
        }

        #[test]
        fn accepted_names_are_safe_path_components(value in "[ -~]{0,40}") {
            if let Ok(lv) = LvName::new(value.clone()) {
                prop_assert!(!lv.as_str().is_empty());
                prop_assert!(!lv.as_str().contains('/'));
                prop_assert!(!lv.as_str().contains(".."));
                prop_assert!(!lv.as_str().starts_with('-'));
            }
        }

        #[test]
        fn generated_ids_are_valid(_seed in 0u8..32) {
            let id = VolumeId::generate();
            prop_assert!(VolumeId::new(id.as_str()).is_ok());
            prop_assert!(LvName::new(id.lv_name().as_str()).is_ok());
        }
    }
}

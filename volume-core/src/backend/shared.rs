//! Checks and decisions both backends make the same way, so that the
//! simulator cannot drift from LVM in what it accepts.

use super::{BackendError, ThinPoolSpec, ThinVolume};
use crate::names::{LvName, NameError, NAME_PREFIX, OWNER_TAG};
use crate::units::{Bytes, ExtentSize};
pub use volume_model::names::check_tag;

/// An LV found under a name, whoever made it.
#[derive(Debug, Clone)]
pub struct FoundLv {
    pub volume: ThinVolume,
    /// The thin pool it lives in, if it is a thin LV.
    pub pool: Option<LvName>,
}

/// True for LVs this project made: our name prefix and our tag.
pub fn is_ours(volume: &ThinVolume) -> bool {
    volume.lv.as_str().starts_with(NAME_PREFIX) && volume.tags.contains(OWNER_TAG)
}

/// LVM allocates whole extents; a request is rounded up so that the
/// idempotency check compares what LVM would actually make.
pub fn round_to_extents(size: Bytes, extent: ExtentSize) -> Result<Bytes, BackendError> {
    size.round_up_to(extent.bytes())
        .map_err(|source| BackendError::NotRoundable {
            size,
            extent,
            source,
        })
}

/// Checks a retag before anything changes: every tag well-formed, and our
/// owner tag never removed (that would orphan the LV from every listing).
pub fn check_retag(add: &[String], remove: &[String]) -> Result<(), NameError> {
    for tag in add.iter().chain(remove) {
        check_tag(tag)?;
    }
    if remove.iter().any(|tag| tag == OWNER_TAG) {
        return Err(NameError {
            kind: "LV tag",
            value: OWNER_TAG.to_owned(),
            reason: "the owner tag marks the LV as ours and is never removed".into(),
        });
    }
    Ok(())
}

/// The LV name must carry our prefix: we only ever make names of our own.
pub fn check_our_name(lv: &LvName) -> Result<(), NameError> {
    if lv.as_str().starts_with(&format!("{NAME_PREFIX}-")) {
        Ok(())
    } else {
        Err(NameError {
            kind: "LV name",
            value: lv.to_string(),
            reason: format!("volume LVs must start with '{NAME_PREFIX}-'"),
        })
    }
}

/// Resolves an existing LV to one of ours in our pool, or refuses.
pub fn require_ours(spec: &ThinPoolSpec, found: FoundLv) -> Result<ThinVolume, BackendError> {
    if found.pool.as_ref() == Some(&spec.pool) && is_ours(&found.volume) {
        Ok(found.volume)
    } else {
        Err(BackendError::NotOurs {
            lv: found.volume.lv,
            pool: spec.pool.clone(),
            tag: OWNER_TAG,
        })
    }
}

/// Create: `Ok(None)` means "make it"; `Ok(Some(v))` means it already exists
/// as asked (identity).
pub fn decide_create(
    spec: &ThinPoolSpec,
    existing: Option<FoundLv>,
    requested: Bytes,
) -> Result<Option<ThinVolume>, BackendError> {
    let Some(found) = existing else {
        return Ok(None);
    };
    let volume = require_ours(spec, found)?;
    if volume.virtual_size == requested {
        Ok(Some(volume))
    } else {
        Err(BackendError::SizeMismatch {
            lv: volume.lv,
            existing: volume.virtual_size,
            requested,
        })
    }
}

/// Extend: `Ok(None)` means it already has the size (identity).
pub fn decide_extend(volume: &ThinVolume, requested: Bytes) -> Result<Option<Bytes>, BackendError> {
    use std::cmp::Ordering;
    match requested.cmp(&volume.virtual_size) {
        Ordering::Equal => Ok(None),
        Ordering::Greater => Ok(Some(volume.virtual_size)),
        Ordering::Less => Err(BackendError::Shrink {
            lv: volume.lv.clone(),
            current: volume.virtual_size,
            requested,
        }),
    }
}

/// Checks every input to a create before anything is changed.
pub fn check_create_inputs(lv: &LvName, size: Bytes, tags: &[String]) -> Result<(), BackendError> {
    check_our_name(lv)?;
    if size == Bytes::ZERO {
        return Err(BackendError::Unit(crate::units::UnitError::NotAligned {
            value: 0,
            unit: 1,
            what: "non-empty volume",
        }));
    }
    for tag in tags {
        check_tag(tag)?;
    }
    Ok(())
}

/// Checks every input to a thin snapshot before anything is changed.
pub fn check_snapshot_inputs(
    origin: &LvName,
    copy: &LvName,
    tags: &[String],
) -> Result<(), BackendError> {
    check_our_name(origin)?;
    check_our_name(copy)?;
    for tag in tags {
        check_tag(tag)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{VgName, VolumeId};
    use crate::units::{Percent, MIB};
    use std::collections::BTreeSet;

    fn spec() -> ThinPoolSpec {
        ThinPoolSpec::new(
            VgName::new("vg").unwrap(),
            LvName::new("pool").unwrap(),
            vec![],
        )
        .unwrap()
    }

    fn ours(size: u64) -> FoundLv {
        FoundLv {
            volume: ThinVolume {
                lv: VolumeId::generate().lv_name(),
                virtual_size: Bytes(size),
                data_percent: Percent::ZERO,
                tags: BTreeSet::from([OWNER_TAG.to_owned()]),
                device: None,
                health: Default::default(),
            },
            pool: Some(LvName::new("pool").unwrap()),
        }
    }

    #[test]
    fn create_is_identity_only_for_the_same_size() {
        assert!(decide_create(&spec(), None, Bytes(4 * MIB))
            .unwrap()
            .is_none());
        assert!(decide_create(&spec(), Some(ours(4 * MIB)), Bytes(4 * MIB))
            .unwrap()
            .is_some());
        let err = decide_create(&spec(), Some(ours(8 * MIB)), Bytes(4 * MIB)).unwrap_err();
        assert!(matches!(err, BackendError::SizeMismatch { .. }), "{err}");
    }

    #[test]
    fn foreign_lvs_are_never_ours() {
        let mut foreign = ours(4 * MIB);
        foreign.volume.tags.clear();
        assert!(matches!(
            decide_create(&spec(), Some(foreign), Bytes(4 * MIB)),
            Err(BackendError::NotOurs { .. })
        ));
        let mut other_pool = ours(4 * MIB);
        other_pool.pool = Some(LvName::new("otherpool").unwrap());
        assert!(require_ours(&spec(), other_pool).is_err());
    }

    #[test]
    fn extend_refuses_shrink() {
        let v = ours(8 * MIB).volume;
        assert_eq!(decide_extend(&v, Bytes(8 * MIB)).unwrap(), None);
        assert_eq!(
            decide_extend(&v, Bytes(12 * MIB)).unwrap(),
            Some(Bytes(8 * MIB))
        );
        assert!(matches!(
            decide_extend(&v, Bytes(4 * MIB)),
            Err(BackendError::Shrink { .. })
        ));
    }

    #[test]
    fn tags_and_names_are_checked() {
        assert!(check_tag("vmv1.state=formatted").is_ok());
        assert!(check_tag("bad tag").is_err());
        assert!(check_tag("").is_err());
        assert!(check_our_name(&LvName::new("root").unwrap()).is_err());
        assert!(check_retag(
            &["vmv1.state=ready".into()],
            &["vmv1.state=creating".into()]
        )
        .is_ok());
        assert!(check_retag(&[], &[OWNER_TAG.to_owned()]).is_err());
    }
}

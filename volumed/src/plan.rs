//! The pure part of reconciling: what the desired records say, what one
//! volume needs, and what its status is. No I/O, so every rule here is
//! tested on its own.
//!
//! Safety rules decided here:
//! * Only an explicit destroy intent (`VolumeSpec.destroy`) leads to a
//!   delete. A volume of ours with no desired record is an orphan: reported,
//!   never touched.
//! * A malformed record gets an error status; its volume (if any) is kept
//!   and served as it is, and is not an orphan.

use consul_kv::KvPair;
use std::collections::BTreeMap;
use volume_control::layout::{Layout, VolumeSpec, VolumeState, VolumeStatus};
use volume_core::host::{self, Encryption};
use volume_core::jail::JailPath;
use volume_core::names::{HostId, VolumeId};
use volume_core::units::Bytes;

/// One desired record under `<root>/desired/<host>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    Valid {
        /// Boxed: a record is large beside a malformed one's error.
        spec: Box<VolumeSpec>,
        index: u64,
    },
    /// The key names a volume but the record cannot be used.
    Malformed { index: u64, error: String },
}

impl Desired {
    /// The record's `ModifyIndex`, which guards every write made for it.
    pub fn index(&self) -> u64 {
        match self {
            Desired::Valid { index, .. } | Desired::Malformed { index, .. } => *index,
        }
    }

    pub fn spec(&self) -> Option<&VolumeSpec> {
        match self {
            Desired::Valid { spec, .. } => Some(spec),
            Desired::Malformed { .. } => None,
        }
    }
}

/// Every desired record of this host, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredSet {
    pub volumes: BTreeMap<VolumeId, Desired>,
    /// Keys under the prefix that name no volume: `(key, why)`.
    pub stray_keys: Vec<(String, String)>,
}

/// Parses the entries of a watch update of `layout.desired_prefix(host)`.
pub fn parse_desired(layout: &Layout, host: &HostId, entries: &[KvPair]) -> DesiredSet {
    let prefix = layout.desired_prefix(host);
    let mut set = DesiredSet::default();
    for entry in entries {
        let Some(rest) = entry.key.strip_prefix(&prefix) else {
            continue;
        };
        if rest.is_empty() {
            // A folder marker some tools write; holds nothing.
            continue;
        }
        let id = match VolumeId::new(rest) {
            Ok(id) => id,
            Err(e) => {
                set.stray_keys.push((entry.key.clone(), e.to_string()));
                continue;
            }
        };
        let desired = match check_spec(host, &id, &entry.value) {
            Ok(spec) => Desired::Valid {
                spec: Box::new(spec),
                index: entry.modify_index,
            },
            Err(error) => Desired::Malformed {
                index: entry.modify_index,
                error,
            },
        };
        set.volumes.insert(id, desired);
    }
    set
}

fn check_spec(host: &HostId, id: &VolumeId, value: &[u8]) -> Result<VolumeSpec, String> {
    let spec: VolumeSpec =
        serde_json::from_slice(value).map_err(|e| format!("malformed desired record: {e}"))?;
    if spec.id != *id {
        return Err(format!(
            "malformed desired record: it names volume {} under the key of {id}",
            spec.id
        ));
    }
    if spec.host != *host {
        return Err(format!(
            "malformed desired record: it names host {} under the prefix of host {host}",
            spec.host
        ));
    }
    if spec.size == Bytes::ZERO {
        return Err("malformed desired record: size must be larger than 0".to_owned());
    }
    if let Some(auto_extend) = &spec.auto_extend {
        auto_extend
            .check()
            .map_err(|e| format!("malformed desired record: {e}"))?;
    }
    Ok(spec)
}

/// What one volume needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Converged: the status follows from what is known, no call needed.
    Settled,
    /// Neither a record nor an LV: only a stale status may be left to drop.
    Gone,
    /// An LV of ours with no desired record: reported, never deleted.
    Orphan,
    /// The record cannot be acted on; the reason goes into the status.
    Refuse(String),
    Converge(Steps),
    Destroy,
}

/// The steps toward a desired, live volume, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Steps {
    /// Create (or finish a create a crash interrupted); this also opens.
    pub create: bool,
    /// Open a ready volume whose mapping is closed (after a reboot).
    pub open: bool,
    pub extend_to: Option<Bytes>,
    pub expose: bool,
}

/// Decides what a volume needs. `observed` is the volume as the host last
/// reported it; `jail` is where it should be exposed, if anywhere;
/// `extent` is the pool's extent size, to which LV sizes are rounded.
pub fn decide(
    desired: Option<&Desired>,
    observed: Option<&host::LocalVolume>,
    jail: Option<&JailPath>,
    extent: Bytes,
) -> Work {
    let spec = match desired {
        None => {
            return match observed {
                None => Work::Gone,
                Some(_) => Work::Orphan,
            }
        }
        Some(Desired::Malformed { error, .. }) => return Work::Refuse(error.clone()),
        Some(Desired::Valid { spec, .. }) => spec,
    };
    if spec.destroy {
        return Work::Destroy;
    }
    let Some(volume) = observed else {
        return Work::Converge(Steps {
            create: true,
            expose: jail.is_some(),
            ..Steps::default()
        });
    };
    if volume.progress != Some(host::Progress::Ready) {
        return Work::Converge(Steps {
            create: true,
            expose: jail.is_some(),
            ..Steps::default()
        });
    }
    let encrypted = volume.encryption == Some(Encryption::Luks2);
    if encrypted != spec.encrypted {
        return Work::Refuse(format!(
            "the volume is {} but the desired record asks for {}; nothing changed",
            if encrypted {
                "encrypted"
            } else {
                "not encrypted"
            },
            if spec.encrypted {
                "encryption"
            } else {
                "no encryption"
            },
        ));
    }
    let wanted = spec.size.round_up_to(extent).unwrap_or(spec.size);
    if wanted < volume.size {
        return Work::Refuse(format!(
            "the desired size {} is smaller than the volume's {}; shrinking is refused",
            spec.size, volume.size
        ));
    }
    let open = volume.device.is_none();
    let steps = Steps {
        create: false,
        open,
        extend_to: (wanted > volume.size).then_some(spec.size),
        // A re-opened mapping may have a new device number: expose again.
        expose: jail.is_some_and(|jail| open || !volume.exposed.contains(jail)),
    };
    if steps == Steps::default() {
        Work::Settled
    } else {
        Work::Converge(steps)
    }
}

/// A volume's status from what is known of it.
pub fn status(
    id: &VolumeId,
    state: VolumeState,
    spec: Option<&VolumeSpec>,
    observed: Option<&host::LocalVolume>,
    node: Option<&JailPath>,
    error: Option<String>,
    now_ms: u64,
) -> VolumeStatus {
    VolumeStatus {
        id: id.clone(),
        state,
        device: observed
            .and_then(|v| v.device.as_ref())
            .map(|d| d.display().to_string()),
        size: observed
            .map(|v| v.size)
            .or(spec.map(|s| s.size))
            .unwrap_or(Bytes::ZERO),
        data_percent: observed.map(|v| v.data_percent).unwrap_or_default(),
        encrypted: observed
            .and_then(|v| v.encryption)
            .map(|e| e == Encryption::Luks2)
            .or(spec.map(|s| s.encrypted))
            .unwrap_or(false),
        error,
        updated_ms: now_ms,
        node: node
            .filter(|jail| observed.is_some_and(|v| v.exposed.contains(jail)))
            .map(|jail| jail.full().display().to_string()),
        health: observed.map(|v| v.health).unwrap_or_default(),
        // The daemon adds its own note (`Daemon::set_status`).
        auto_extend_refused: None,
        fenced: None,
    }
}

/// Two statuses that differ only in their timestamp say the same thing.
pub fn same_status(a: &VolumeStatus, b: &VolumeStatus) -> bool {
    VolumeStatus {
        updated_ms: 0,
        ..a.clone()
    } == VolumeStatus {
        updated_ms: 0,
        ..b.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volume_core::names::{Region, VolumeName, Zone};
    use volume_core::units::{GIB, MIB};

    const EXTENT: Bytes = Bytes(4 * MIB);

    fn spec(id: &VolumeId, size: u64) -> VolumeSpec {
        VolumeSpec {
            id: id.clone(),
            name: VolumeName::new("data").unwrap(),
            host: HostId::new("h1").unwrap(),
            region: Region::new("ewr").unwrap(),
            zone: Zone::new("a").unwrap(),
            size: Bytes(size),
            encrypted: true,
            created_ms: 1,
            destroy: false,
            source: None,
            snapshots: Default::default(),
            auto_extend: None,
        }
    }

    fn ready(id: &VolumeId, size: u64) -> host::LocalVolume {
        host::LocalVolume {
            id: id.clone(),
            name: None,
            size: Bytes(size),
            data_percent: Default::default(),
            encryption: Some(Encryption::Luks2),
            progress: Some(host::Progress::Ready),
            device: Some("/dev/mapper/x".into()),
            exposed: vec![],
            health: Default::default(),
        }
    }

    fn valid(spec: VolumeSpec) -> Desired {
        Desired::Valid {
            spec: Box::new(spec),
            index: 7,
        }
    }

    #[test]
    fn only_a_destroy_intent_deletes() {
        let id = VolumeId::generate();
        let observed = ready(&id, GIB);
        assert_eq!(decide(None, Some(&observed), None, EXTENT), Work::Orphan);
        let malformed = Desired::Malformed {
            index: 3,
            error: "bad".into(),
        };
        assert_eq!(
            decide(Some(&malformed), Some(&observed), None, EXTENT),
            Work::Refuse("bad".into())
        );
        let mut destroy = spec(&id, GIB);
        destroy.destroy = true;
        assert_eq!(
            decide(Some(&valid(destroy)), Some(&observed), None, EXTENT),
            Work::Destroy
        );
        assert_eq!(decide(None, None, None, EXTENT), Work::Gone);
    }

    #[test]
    fn ready_volumes_need_no_call_and_growth_extends() {
        let id = VolumeId::generate();
        let desired = valid(spec(&id, GIB));
        assert_eq!(
            decide(Some(&desired), Some(&ready(&id, GIB)), None, EXTENT),
            Work::Settled
        );
        // A decimal size rounds up to the extent the LV already has.
        let decimal = valid(spec(&id, 1_000_000_000));
        assert_eq!(
            decide(
                Some(&decimal),
                Some(&ready(&id, 1_002_438_656)),
                None,
                EXTENT
            ),
            Work::Settled
        );
        let grown = valid(spec(&id, 2 * GIB));
        assert_eq!(
            decide(Some(&grown), Some(&ready(&id, GIB)), None, EXTENT),
            Work::Converge(Steps {
                extend_to: Some(Bytes(2 * GIB)),
                ..Steps::default()
            })
        );
        assert!(matches!(
            decide(Some(&desired), Some(&ready(&id, 2 * GIB)), None, EXTENT),
            Work::Refuse(reason) if reason.contains("shrinking is refused")
        ));
    }

    #[test]
    fn unfinished_closed_and_unexposed_volumes_converge() {
        let id = VolumeId::generate();
        let desired = valid(spec(&id, GIB));
        let jail = JailPath::new("/srv/jails/x", "vol").unwrap();
        let mut half = ready(&id, GIB);
        half.progress = Some(host::Progress::CryptFormatted);
        assert_eq!(
            decide(Some(&desired), Some(&half), Some(&jail), EXTENT),
            Work::Converge(Steps {
                create: true,
                expose: true,
                ..Steps::default()
            })
        );
        let mut closed = ready(&id, GIB);
        closed.device = None;
        closed.exposed = vec![jail.clone()];
        assert_eq!(
            decide(Some(&desired), Some(&closed), Some(&jail), EXTENT),
            Work::Converge(Steps {
                open: true,
                expose: true,
                ..Steps::default()
            })
        );
        let mut exposed = ready(&id, GIB);
        exposed.exposed = vec![jail.clone()];
        assert_eq!(
            decide(Some(&desired), Some(&exposed), Some(&jail), EXTENT),
            Work::Settled
        );
        let mut plain = spec(&id, GIB);
        plain.encrypted = false;
        assert!(matches!(
            decide(Some(&valid(plain)), Some(&exposed), None, EXTENT),
            Work::Refuse(reason) if reason.contains("encrypted")
        ));
    }

    #[test]
    fn records_are_parsed_strictly() {
        let layout = Layout::default();
        let host = HostId::new("h1").unwrap();
        let good = VolumeId::generate();
        let wrong_id = VolumeId::generate();
        let pair = |key: String, value: Vec<u8>| KvPair {
            key,
            value,
            modify_index: 5,
            ..KvPair::default()
        };
        let entries = vec![
            pair(layout.desired_prefix(&host), vec![]),
            pair(
                layout.desired(&host, &good),
                serde_json::to_vec(&spec(&good, GIB)).unwrap(),
            ),
            pair(
                layout.desired(&host, &wrong_id),
                serde_json::to_vec(&spec(&good, GIB)).unwrap(),
            ),
            pair(
                format!("{}not-an-id", layout.desired_prefix(&host)),
                vec![1],
            ),
        ];
        let set = parse_desired(&layout, &host, &entries);
        assert!(matches!(
            set.volumes[&good],
            Desired::Valid { index: 5, .. }
        ));
        assert!(matches!(
            &set.volumes[&wrong_id],
            Desired::Malformed { error, .. } if error.contains("under the key of")
        ));
        assert_eq!(set.stray_keys.len(), 1);
        let garbage = parse_desired(
            &layout,
            &host,
            &[pair(layout.desired(&host, &good), b"{not json".to_vec())],
        );
        assert!(matches!(
            &garbage.volumes[&good],
            Desired::Malformed { error, .. } if error.starts_with("malformed desired record")
        ));
    }

    #[test]
    fn statuses_compare_without_their_timestamp() {
        let id = VolumeId::generate();
        let jail = JailPath::new("/srv/jails/x", "vol").unwrap();
        let mut observed = ready(&id, GIB);
        observed.exposed = vec![jail.clone()];
        let a = status(
            &id,
            VolumeState::Ready,
            None,
            Some(&observed),
            Some(&jail),
            None,
            1,
        );
        assert_eq!(a.node.as_deref(), Some("/srv/jails/x/vol"));
        assert_eq!(a.device.as_deref(), Some("/dev/mapper/x"));
        assert!(a.encrypted);
        let b = VolumeStatus {
            updated_ms: 2,
            ..a.clone()
        };
        assert!(same_status(&a, &b));
        let c = VolumeStatus {
            state: VolumeState::Orphan,
            ..a.clone()
        };
        assert!(!same_status(&a, &c));
    }
}

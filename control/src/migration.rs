//! Moving or forking a volume to another host: the records and the pure
//! check of a request against what the KV store holds (see ARCHITECTURE.md,
//! "Move and fork across hosts"). No I/O: the caller reads the records and
//! writes, in one txn as a create does, the [`MigrationSpec`] and the
//! destination's `VolumeSpec` create-only with a `cas` on the destination
//! ledger at the index it read ([`Admitted::ledger_after`]).

use crate::layout::{Ledger, VolumeSpec};
use crate::placement::Candidate;
use serde::{Deserialize, Serialize};
use volume_model::capacity::Refusal;
use volume_model::hydration::RecoveryRate;
use volume_model::names::{HostId, MigrationId, VolumeId};
use volume_model::units::{Bytes, BytesPerSec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationKind {
    /// The source stays; the destination is a new volume of the same data.
    Fork,
    /// The source is destroyed (and its reservation returned) once the
    /// destination says `complete`.
    Move,
}

/// One end of a migration: a volume on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationEnd {
    pub host: HostId,
    pub volume: VolumeId,
}

/// A fork or move, at `<root>/migrations/<migration>`. Written by volctl.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSpec {
    pub id: MigrationId,
    pub kind: MigrationKind,
    pub source: MigrationEnd,
    /// The destination host and the new volume's id.
    pub destination: MigrationEnd,
    /// The background copy's limit.
    pub rate: RecoveryRate,
    pub created_ms: u64,
    /// Set by `volctl cancel`: both ends remove their part.
    #[serde(default)]
    pub cancel: bool,
}

/// One end's state, as its volumed reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MigrationState {
    /// Source: the export is serving at `address`: the source host's
    /// endpoint port or the next free one above it, one port per
    /// concurrent export (qemu-nbd serves one export per socket). Kept
    /// across restarts, so a destination reconnects to the same place.
    Exporting {
        address: std::net::SocketAddr,
    },
    /// Destination: copying in the background.
    Hydrating {
        copied: Bytes,
        total: Bytes,
        rate: BytesPerSec,
    },
    /// Destination: the copy has not moved and the source's address
    /// refuses connections.
    SourceUnreachable,
    /// Destination: every block is local.
    Complete,
    /// Source: the export is stopped (and, for a move, the source gone).
    Released,
    Cancelled,
    /// Never holds secrets.
    Error {
        message: String,
    },
}

/// `<root>/migrations/status/<host>/<migration>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub id: MigrationId,
    #[serde(flatten)]
    pub state: MigrationState,
    pub updated_ms: u64,
}

/// What a request is checked against, as the caller read it.
#[derive(Debug, Clone)]
pub struct Records<'a> {
    /// The source volume's desired record, if there is one.
    pub source_volume: Option<&'a VolumeSpec>,
    /// The destination host's record and ledger.
    pub destination: Option<&'a Candidate>,
}

/// Why a fork or move was refused; each names what it was checked against.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationRefusal {
    #[error("source and destination are both host {host}: a migration goes to another host")]
    SameHost { host: HostId },
    #[error("volume {volume} has no record on host {host}")]
    NoSourceVolume { host: HostId, volume: VolumeId },
    #[error("volume {volume} is on host {actual}, not {given}")]
    SourceOnOtherHost {
        volume: VolumeId,
        given: HostId,
        actual: HostId,
    },
    #[error("volume {volume} is being destroyed")]
    SourceDestroying { volume: VolumeId },
    #[error("destination host {host} has no host record")]
    NoDestinationHost { host: HostId },
    #[error("destination host {host} cannot take {size} bytes: {refusal}")]
    DestinationCapacity {
        host: HostId,
        size: Bytes,
        refusal: Refusal,
    },
}

/// The request admitted: the size to reserve and the destination ledger
/// the txn writes (with `cas` at the index read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub size: Bytes,
    pub ledger_after: Ledger,
    pub headroom_after: Bytes,
}

/// Checks `spec` against `records`, in the order of [`MigrationRefusal`];
/// the destination is admitted at the source volume's size as a create is
/// ([`Candidate::admit_new`], as placement does).
pub fn validate(spec: &MigrationSpec, records: &Records<'_>) -> Result<Admitted, MigrationRefusal> {
    if spec.source.host == spec.destination.host {
        return Err(MigrationRefusal::SameHost {
            host: spec.source.host.clone(),
        });
    }
    let Some(volume) = records
        .source_volume
        .filter(|volume| volume.id == spec.source.volume)
    else {
        return Err(MigrationRefusal::NoSourceVolume {
            host: spec.source.host.clone(),
            volume: spec.source.volume.clone(),
        });
    };
    if volume.host != spec.source.host {
        return Err(MigrationRefusal::SourceOnOtherHost {
            volume: volume.id.clone(),
            given: spec.source.host.clone(),
            actual: volume.host.clone(),
        });
    }
    if volume.destroy {
        return Err(MigrationRefusal::SourceDestroying {
            volume: volume.id.clone(),
        });
    }
    let Some(destination) = records
        .destination
        .filter(|candidate| candidate.host.id == spec.destination.host)
    else {
        return Err(MigrationRefusal::NoDestinationHost {
            host: spec.destination.host.clone(),
        });
    };
    let (ledger_after, headroom_after) = destination.admit_new(volume.size).map_err(|refusal| {
        MigrationRefusal::DestinationCapacity {
            host: spec.destination.host.clone(),
            size: volume.size,
            refusal,
        }
    })?;
    Ok(Admitted {
        size: volume.size,
        ledger_after,
        headroom_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::host;
    use volume_model::units::GIB;

    fn source_volume(size: Bytes) -> VolumeSpec {
        serde_json::from_value(serde_json::json!({
            "id": "vol_0123456789abcdef", "name": "data", "host": "h1",
            "region": "ewr", "zone": "ewr-a", "size": size.0,
            "encrypted": true, "created_ms": 1
        }))
        .unwrap()
    }

    fn spec(from: &str, to: &str) -> MigrationSpec {
        MigrationSpec {
            id: MigrationId::new("mig_0123456789abcdef").unwrap(),
            kind: MigrationKind::Move,
            source: MigrationEnd {
                host: HostId::new(from).unwrap(),
                volume: VolumeId::new("vol_0123456789abcdef").unwrap(),
            },
            destination: MigrationEnd {
                host: HostId::new(to).unwrap(),
                volume: VolumeId::new("vol_fedcba9876543210").unwrap(),
            },
            rate: RecoveryRate::from_kib_per_sec(4096).unwrap(),
            created_ms: 7,
            cancel: false,
        }
    }

    #[test]
    fn specs_and_statuses_have_their_shapes() {
        let spec = spec("h1", "h2");
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "mig_0123456789abcdef", "kind": "move",
                "source": {"host": "h1", "volume": "vol_0123456789abcdef"},
                "destination": {"host": "h2", "volume": "vol_fedcba9876543210"},
                "rate": 4096, "created_ms": 7, "cancel": false
            })
        );
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("cancel");
        assert_eq!(serde_json::from_value::<MigrationSpec>(old).unwrap(), spec);
        let mut slow = json;
        slow["rate"] = 1.into();
        assert!(serde_json::from_value::<MigrationSpec>(slow).is_err());

        let status = MigrationStatus {
            id: spec.id.clone(),
            state: MigrationState::Hydrating {
                copied: Bytes(84 << 20),
                total: Bytes(200 << 20),
                rate: BytesPerSec(3_774_873),
            },
            updated_ms: 9,
        };
        let text = serde_json::to_string(&status).unwrap();
        assert_eq!(
            text,
            r#"{"id":"mig_0123456789abcdef","state":"hydrating","copied":88080384,"total":209715200,"rate":3774873,"updated_ms":9}"#
        );
        assert_eq!(
            serde_json::from_str::<MigrationStatus>(&text).unwrap(),
            status
        );
        for state in [
            MigrationState::Exporting {
                address: "127.0.0.1:10809".parse().unwrap(),
            },
            MigrationState::SourceUnreachable,
            MigrationState::Complete,
            MigrationState::Released,
            MigrationState::Cancelled,
            MigrationState::Error {
                message: "export refused".into(),
            },
        ] {
            let status = MigrationStatus {
                id: spec.id.clone(),
                state,
                updated_ms: 1,
            };
            let text = serde_json::to_string(&status).unwrap();
            assert_eq!(
                serde_json::from_str::<MigrationStatus>(&text).unwrap(),
                status
            );
        }
        assert!(serde_json::to_string(&MigrationStatus {
            id: spec.id.clone(),
            state: MigrationState::SourceUnreachable,
            updated_ms: 1
        })
        .unwrap()
        .contains(r#""state":"source_unreachable""#));
    }

    #[test]
    fn a_request_that_fits_reserves_the_source_size_on_the_destination() {
        let volume = source_volume(Bytes(10 * GIB));
        let destination = host("h2", "ewr", "ewr-b", 100);
        let admitted = validate(
            &spec("h1", "h2"),
            &Records {
                source_volume: Some(&volume),
                destination: Some(&destination),
            },
        )
        .unwrap();
        assert_eq!(admitted.size, Bytes(10 * GIB));
        assert_eq!(
            admitted.ledger_after,
            Ledger {
                reserved: Bytes(10 * GIB),
                volumes: 1
            }
        );
        assert_eq!(
            Ok((admitted.ledger_after, admitted.headroom_after)),
            destination.admit_new(Bytes(10 * GIB))
        );
    }

    #[test]
    fn each_failing_check_has_its_refusal() {
        let volume = source_volume(Bytes(10 * GIB));
        let destination = host("h2", "ewr", "ewr-b", 100);
        let records = Records {
            source_volume: Some(&volume),
            destination: Some(&destination),
        };
        let h1 = HostId::new("h1").unwrap();
        let h2 = HostId::new("h2").unwrap();
        let vol = volume.id.clone();

        let same = validate(&spec("h2", "h2"), &records).unwrap_err();
        assert_eq!(same, MigrationRefusal::SameHost { host: h2.clone() });
        assert!(same.to_string().contains("h2"));

        let none = Records {
            source_volume: None,
            ..records.clone()
        };
        assert_eq!(
            validate(&spec("h1", "h2"), &none).unwrap_err(),
            MigrationRefusal::NoSourceVolume {
                host: h1.clone(),
                volume: vol.clone()
            }
        );

        let elsewhere = validate(&spec("h3", "h2"), &records).unwrap_err();
        assert_eq!(
            elsewhere,
            MigrationRefusal::SourceOnOtherHost {
                volume: vol.clone(),
                given: HostId::new("h3").unwrap(),
                actual: h1.clone()
            }
        );
        assert!(elsewhere.to_string().contains("h3"));

        let mut destroying = volume.clone();
        destroying.destroy = true;
        assert_eq!(
            validate(
                &spec("h1", "h2"),
                &Records {
                    source_volume: Some(&destroying),
                    ..records.clone()
                }
            )
            .unwrap_err(),
            MigrationRefusal::SourceDestroying {
                volume: vol.clone()
            }
        );

        let other = host("h4", "ewr", "ewr-c", 100);
        for missing in [None, Some(&other)] {
            assert_eq!(
                validate(
                    &spec("h1", "h2"),
                    &Records {
                        destination: missing,
                        ..records.clone()
                    }
                )
                .unwrap_err(),
                MigrationRefusal::NoDestinationHost { host: h2.clone() }
            );
        }

        // Full by its ledger, though LVM reports an empty pool: the
        // reservations count, as for a create.
        let mut small = host("h2", "ewr", "ewr-b", 10);
        small.ledger.reserved = Bytes(95 * GIB);
        let full = validate(
            &spec("h1", "h2"),
            &Records {
                destination: Some(&small),
                ..records.clone()
            },
        )
        .unwrap_err();
        let MigrationRefusal::DestinationCapacity {
            host,
            size,
            refusal,
        } = &full
        else {
            panic!("{full:?}");
        };
        assert_eq!((host, *size), (&h2, Bytes(10 * GIB)));
        assert_eq!(
            Err(refusal.clone()),
            small.admit_new(Bytes(10 * GIB)).map(|_| ())
        );
        assert!(full.to_string().contains("over-commit"), "{full}");
    }
}

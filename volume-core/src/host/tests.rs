//! The full orchestration on the simulator: the same `VolumeHost` code as
//! production, with faults injected after every step.

use super::sim::{SimCounts, SimDevices};
use super::*;
use crate::backend::sim::SimBackend;
use crate::backend::ThinPoolSpec;
use crate::keys::LocalKeyDir;
use crate::names::{LvName, VgName};
use crate::units::GIB;
use std::path::Path;

pub(super) struct Harness {
    pub(super) backend: Arc<SimBackend>,
    pub(super) devices: Arc<SimDevices>,
    pub(super) keys: Arc<LocalKeyDir>,
    pub(super) plan: Arc<FaultPlan>,
    pub(super) host: VolumeHost,
    pub(super) dir: tempfile::TempDir,
}

const OWNER: NodeOwner = NodeOwner {
    uid: 1000,
    gid: 1000,
};

pub(super) fn harness_with(policy: CapacityPolicy) -> Harness {
    let mut spec = ThinPoolSpec::new(
        VgName::new("vg0").unwrap(),
        LvName::new("pool0").unwrap(),
        vec![PathBuf::from("/dev/vdb")],
    )
    .unwrap();
    spec.data_size = Some(Bytes(3 * GIB));
    let backend = Arc::new(SimBackend::new(spec));
    let _ = backend.ensure_pool().unwrap();
    let devices = Arc::new(SimDevices::new(backend.clone()));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("dev")).unwrap();
    let keys = Arc::new(LocalKeyDir::open(dir.path().join("keys")).unwrap());
    let plan = Arc::new(FaultPlan::new());
    let host = VolumeHost::new(backend.clone(), devices.clone(), keys.clone(), policy)
        .with_faults(plan.clone());
    Harness {
        backend,
        devices,
        keys,
        plan,
        host,
        dir,
    }
}

pub(super) fn harness() -> Harness {
    harness_with(CapacityPolicy::default())
}

pub(super) fn spec(encryption: Encryption) -> NewVolume {
    NewVolume {
        id: VolumeId::generate(),
        name: VolumeName::new("data").unwrap(),
        size: Bytes(25 * GIB),
        encryption,
    }
}

impl Harness {
    fn jail(&self, name: &str) -> JailPath {
        JailPath::new(self.dir.path(), format!("dev/{name}")).unwrap()
    }

    pub(super) fn key_files(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("keys"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn jail_nodes(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("dev"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// No LV, mapping, header, filesystem, key or node is left.
    pub(super) fn assert_clean(&self) {
        assert!(self.backend.list_thins().unwrap().is_empty(), "orphan LV");
        assert!(self.devices.mappings().is_empty(), "orphan mapping");
        assert!(
            self.devices.devices_with_content().is_empty(),
            "orphan content"
        );
        assert!(
            self.key_files().is_empty(),
            "orphan key {:?}",
            self.key_files()
        );
        assert!(
            self.jail_nodes().is_empty(),
            "orphan node {:?}",
            self.jail_nodes()
        );
    }

    pub(super) fn assert_ready(&self, spec: &NewVolume) -> LocalVolume {
        let status = self
            .host
            .list()
            .unwrap()
            .into_iter()
            .find(|s| s.id == spec.id)
            .expect("volume listed");
        assert_eq!(status.progress, Some(Progress::Ready));
        assert_eq!(status.encryption, Some(spec.encryption));
        assert_eq!(status.name.as_ref(), Some(&spec.name));
        assert!(status.device.is_some(), "ready volume is open");
        status
    }
}

#[test]
fn create_is_idempotent_and_delete_leaves_nothing() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let created = h.host.create(&spec).unwrap();
    assert!(created.changed());
    let status = created.into_inner();
    assert_eq!(status.size, Bytes(25 * GIB));
    assert_eq!(
        status.device,
        Some(PathBuf::from(format!(
            "/dev/mapper/{}",
            spec.id.crypt_name()
        )))
    );
    assert!(!h.host.create(&spec).unwrap().changed());
    h.assert_ready(&spec);
    assert_eq!(
        h.devices.counts(&spec.id),
        SimCounts {
            crypt_formats: 1,
            mkfs_runs: 1,
            opens: 1,
            fs_grows: 0
        }
    );
    assert_eq!(h.host.pool_status().unwrap().usage.volume_count, 1);
    assert_eq!(h.host.delete(&spec.id).unwrap(), DeleteAction::Deleted);
    assert_eq!(h.host.delete(&spec.id).unwrap(), DeleteAction::Identity);
    h.assert_clean();
}

#[test]
fn plain_volumes_have_no_key_and_no_mapping() {
    let h = harness();
    let spec = spec(Encryption::None);
    let status = h.host.create(&spec).unwrap().into_inner();
    assert_eq!(
        status.device,
        Some(PathBuf::from(format!("/dev/vg0/{}", spec.id.lv_name())))
    );
    assert!(h.key_files().is_empty());
    assert!(h.devices.mappings().is_empty());
    assert_eq!(h.devices.counts(&spec.id).mkfs_runs, 1);
    let _ = h.host.delete(&spec.id).unwrap();
    h.assert_clean();
}

#[test]
fn a_different_spec_is_refused_and_changes_nothing() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let _ = h.host.create(&spec).unwrap();
    let before = h.backend.calls().changes;
    for (field, changed) in [
        (
            "size",
            NewVolume {
                size: Bytes(26 * GIB),
                ..spec.clone()
            },
        ),
        (
            "encryption",
            NewVolume {
                encryption: Encryption::None,
                ..spec.clone()
            },
        ),
        (
            "name",
            NewVolume {
                name: VolumeName::new("other").unwrap(),
                ..spec.clone()
            },
        ),
    ] {
        match h.host.create(&changed) {
            Err(HostError::SpecMismatch { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: unexpected {other:?}"),
        }
    }
    assert_eq!(h.backend.calls().changes, before);
    h.assert_ready(&spec);
}

#[test]
fn a_size_that_cannot_be_rounded_to_extents_is_named_and_changes_nothing() {
    let h = harness();
    let extent = h.backend.pool_status().unwrap().extent_size;
    let mut huge = spec(Encryption::Luks2);
    huge.size = Bytes(u64::MAX);
    let err = h.host.create(&huge).unwrap_err();
    assert!(
        matches!(&err, HostError::SizeNotRoundable { size, extent: e, .. } if *size == huge.size && *e == extent),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(&u64::MAX.to_string()), "{message}");
    assert!(message.contains(&extent.bytes().0.to_string()), "{message}");
    h.assert_clean();

    let volume = spec(Encryption::Luks2);
    let _ = h.host.create(&volume).unwrap();
    // Re-creating an existing volume checks its size through the backend.
    let resized = NewVolume {
        size: Bytes(u64::MAX),
        ..volume.clone()
    };
    let err = h.host.create(&resized).unwrap_err();
    assert!(
        matches!(&err, HostError::SizeNotRoundable { size, extent: e, .. } if *size == resized.size && *e == extent),
        "{err:?}"
    );
    let err = h.host.extend(&volume.id, Bytes(u64::MAX)).unwrap_err();
    assert!(
        matches!(&err, HostError::SizeNotRoundable { size, .. } if *size == Bytes(u64::MAX)),
        "{err:?}"
    );
    assert_eq!(h.assert_ready(&volume).size, volume.size);
}

#[test]
fn admission_refusal_creates_nothing() {
    let h = harness();
    let mut big = spec(Encryption::Luks2);
    big.size = Bytes(31 * GIB);
    let err = h.host.create(&big).unwrap_err();
    match &err {
        HostError::Admission { refusal, .. } => assert_eq!(refusal.limit(), "over-commit"),
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("over-commit"), "{err}");
    h.assert_clean();
    // The volume count limit, too.
    let h = harness_with(CapacityPolicy {
        max_volumes: 1,
        ..CapacityPolicy::default()
    });
    let _ = h.host.create(&spec(Encryption::Luks2)).unwrap();
    let err = h.host.create(&spec(Encryption::Luks2)).unwrap_err();
    assert!(matches!(err, HostError::Admission { .. }), "{err}");
    assert_eq!(h.backend.list_thins().unwrap().len(), 1);
    assert_eq!(h.key_files().len(), 1);
}

#[test]
fn a_crash_after_any_create_step_converges_on_rerun_without_reformatting() {
    for (encryption, steps) in [
        (Encryption::Luks2, &Step::CREATE_ENCRYPTED[..]),
        (Encryption::None, &Step::CREATE_PLAIN[..]),
    ] {
        for step in steps {
            let h = harness();
            let spec = spec(encryption);
            h.plan.at(*step, Fault::Crash);
            let err = h.host.create(&spec).unwrap_err();
            assert!(
                matches!(err, HostError::InjectedCrash { step: s, .. } if s == *step),
                "{step}: {err}"
            );
            // A restart: mappings do not survive it.
            let _ = h.devices.close_crypt(&spec.id).unwrap();
            let rerun = h.host.create(&spec).unwrap();
            assert_eq!(
                rerun.changed(),
                *step != Step::ProgressReady,
                "{step}: a finished create is identity"
            );
            h.assert_ready(&spec);
            let counts = h.devices.counts(&spec.id);
            let formats = u32::from(encryption == Encryption::Luks2);
            assert_eq!(counts.crypt_formats, formats, "{step}: reformatted");
            assert_eq!(counts.mkfs_runs, 1, "{step}: mkfs ran twice");
            assert!(h.plan.pending().is_empty());
            let _ = h.host.delete(&spec.id).unwrap();
            h.assert_clean();
        }
    }
}

#[test]
fn a_failure_after_any_create_step_rolls_everything_back() {
    for (encryption, steps) in [
        (Encryption::Luks2, &Step::CREATE_ENCRYPTED[..]),
        (Encryption::None, &Step::CREATE_PLAIN[..]),
    ] {
        for step in steps {
            let h = harness();
            let spec = spec(encryption);
            h.plan.at(*step, Fault::Fail);
            let err = h.host.create(&spec).unwrap_err();
            assert!(
                matches!(err, HostError::InjectedFailure { step: s, .. } if s == *step),
                "{step}: {err}"
            );
            if *step == Step::ProgressReady {
                // Recorded as ready: it may be in use, so it is kept, and a
                // re-run says it is there.
                h.assert_ready(&spec);
                assert!(!h.host.create(&spec).unwrap().changed());
                let _ = h.host.delete(&spec.id).unwrap();
            }
            h.assert_clean();
            // And the same spec can then be created from scratch.
            assert!(h.host.create(&spec).unwrap().changed());
            let _ = h.host.delete(&spec.id).unwrap();
            h.assert_clean();
        }
    }
}

#[test]
fn a_failed_rollback_is_reported_with_both_errors_and_a_rerun_converges() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    h.plan
        .at(Step::FsMade, Fault::Fail)
        .at(Step::LvRemoved, Fault::Fail);
    let err = h.host.create(&spec).unwrap_err();
    match &err {
        HostError::RollbackFailed { error, rollback } => {
            assert!(matches!(
                **error,
                HostError::InjectedFailure {
                    step: Step::FsMade,
                    ..
                }
            ));
            assert!(matches!(
                **rollback,
                HostError::InjectedFailure {
                    step: Step::LvRemoved,
                    ..
                }
            ));
        }
        other => panic!("unexpected {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("FsMade") && text.contains("rolling back failed too"),
        "{text}"
    );
    // The key survived the failed rollback; the LV is gone. A re-run starts
    // over and ends with exactly one volume and one key.
    assert_eq!(h.key_files().len(), 1);
    assert!(h.host.create(&spec).unwrap().changed());
    h.assert_ready(&spec);
    assert_eq!(h.key_files().len(), 1);
    let _ = h.host.delete(&spec.id).unwrap();
    h.assert_clean();
}

#[test]
fn a_crash_during_rollback_is_finished_by_the_next_create() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    h.plan
        .at(Step::FsMade, Fault::Fail)
        .at(Step::HeaderErased, Fault::Crash);
    let err = h.host.create(&spec).unwrap_err();
    assert!(
        matches!(
            err,
            HostError::InjectedCrash {
                step: Step::HeaderErased,
                ..
            }
        ),
        "{err}"
    );
    let listed = h.host.list().unwrap();
    assert_eq!(listed[0].progress, Some(Progress::Deleting));
    assert!(matches!(
        h.host.open(&spec.id),
        Err(HostError::NotReady {
            progress: Progress::Deleting,
            ..
        })
    ));
    assert!(h.host.create(&spec).unwrap().changed());
    h.assert_ready(&spec);
    assert_eq!(h.devices.counts(&spec.id).crypt_formats, 2);
    let _ = h.host.delete(&spec.id).unwrap();
    h.assert_clean();
}

#[test]
fn expose_makes_a_node_for_the_open_mapping_and_replaces_it_when_stale() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let _ = h.host.create(&spec).unwrap();
    let jail = h.jail("vdb");
    let first = h.host.expose(&spec.id, &jail, OWNER).unwrap();
    assert!(first.changed());
    let node = first.into_inner();
    let meta = std::fs::symlink_metadata(jail.full()).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.rdev(), node.rdev.0);
    assert_eq!((meta.uid(), meta.gid()), (OWNER.uid, OWNER.gid));
    assert!(!h.host.expose(&spec.id, &jail, OWNER).unwrap().changed());
    assert_eq!(h.host.list().unwrap()[0].exposed, vec![jail.clone()]);
    // Close and reopen: the mapping gets a new minor; expose replaces the
    // stale node.
    let _ = h.host.close(&spec.id).unwrap();
    let again = h.host.expose(&spec.id, &jail, OWNER).unwrap();
    assert!(again.changed());
    assert_eq!(again.inner().replaced, Some(node.rdev));
    assert_ne!(again.inner().rdev, node.rdev);
    // Unexpose removes node and record; delete has nothing left to find.
    assert_eq!(
        h.host.unexpose(&spec.id, &jail).unwrap(),
        DeleteAction::Deleted
    );
    assert_eq!(
        h.host.unexpose(&spec.id, &jail).unwrap(),
        DeleteAction::Identity
    );
    assert!(h.host.list().unwrap()[0].exposed.is_empty());
    assert!(h.jail_nodes().is_empty());
    let _ = h.host.delete(&spec.id).unwrap();
    h.assert_clean();
}

#[test]
fn expose_refuses_a_foreign_node_and_rolls_back_its_record() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let _ = h.host.create(&spec).unwrap();
    let jail = h.jail("vdb");
    std::fs::write(jail.full(), b"someone else's").unwrap();
    let err = h.host.expose(&spec.id, &jail, OWNER).unwrap_err();
    assert!(matches!(err, HostError::Expose { .. }), "{err}");
    assert!(h.host.list().unwrap()[0].exposed.is_empty());
    assert_eq!(std::fs::read(jail.full()).unwrap(), b"someone else's");
    // Delete leaves the foreign file alone.
    let _ = h.host.delete(&spec.id).unwrap();
    assert_eq!(std::fs::read(jail.full()).unwrap(), b"someone else's");
}

#[test]
fn expose_of_an_unfinished_or_missing_volume_is_refused() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let jail = h.jail("vdb");
    assert!(matches!(
        h.host.expose(&spec.id, &jail, OWNER),
        Err(HostError::NotFound { .. })
    ));
    h.plan.at(Step::CryptOpened, Fault::Crash);
    let _ = h.host.create(&spec).unwrap_err();
    assert!(matches!(
        h.host.expose(&spec.id, &jail, OWNER),
        Err(HostError::NotReady {
            progress: Progress::LvCreated,
            ..
        })
    ));
    assert!(h.jail_nodes().is_empty());
}

#[test]
fn crashes_during_expose_and_delete_converge_on_rerun() {
    for expose_step in [Step::NodeRecorded, Step::NodeMade] {
        for delete_step in Step::DELETE {
            let h = harness();
            let spec = spec(Encryption::Luks2);
            let _ = h.host.create(&spec).unwrap();
            let jail = h.jail("vdb");
            h.plan.at(expose_step, Fault::Crash);
            assert!(h.host.expose(&spec.id, &jail, OWNER).is_err());
            let _ = h.host.expose(&spec.id, &jail, OWNER).unwrap();
            assert_eq!(h.jail_nodes(), ["vdb"]);
            h.plan.at(delete_step, Fault::Crash);
            let err = h.host.delete(&spec.id).unwrap_err();
            assert!(
                matches!(err, HostError::InjectedCrash { step, .. } if step == delete_step),
                "{expose_step}/{delete_step}: {err}"
            );
            let rerun = h.host.delete(&spec.id).unwrap();
            // After the last step there is nothing left to do.
            assert_eq!(
                rerun.changed(),
                delete_step != Step::KeyDestroyed,
                "{expose_step}/{delete_step}"
            );
            h.assert_clean();
        }
    }
}

#[test]
fn a_failed_expose_step_rolls_back_node_and_record() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let _ = h.host.create(&spec).unwrap();
    let jail = h.jail("vdb");
    h.plan.at(Step::NodeMade, Fault::Fail);
    let err = h.host.expose(&spec.id, &jail, OWNER).unwrap_err();
    assert!(matches!(err, HostError::InjectedFailure { .. }), "{err}");
    assert!(h.jail_nodes().is_empty());
    assert!(h.host.list().unwrap()[0].exposed.is_empty());
}

#[test]
fn delete_of_a_volume_in_use_fails_busy_and_converges_once_released() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let _ = h.host.create(&spec).unwrap();
    let _ = h.host.expose(&spec.id, &h.jail("vdb"), OWNER).unwrap();
    h.devices.set_busy(&spec.id, true);
    let err = h.host.delete(&spec.id).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(h.backend.list_thins().unwrap().len(), 1);
    assert_eq!(h.key_files().len(), 1);
    h.devices.set_busy(&spec.id, false);
    assert_eq!(h.host.delete(&spec.id).unwrap(), DeleteAction::Deleted);
    h.assert_clean();
}

#[test]
fn extend_grows_lv_and_filesystem_or_leaves_the_fs_to_the_guest() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let _ = h.host.create(&spec).unwrap();
    let grown = h.host.extend(&spec.id, Bytes(28 * GIB)).unwrap();
    assert_eq!(
        grown.lv,
        ExtendAction::Extended {
            from: Bytes(25 * GIB),
            to: Bytes(28 * GIB)
        }
    );
    assert!(matches!(
        grown.filesystem,
        FsGrowth::Grown(ExtendAction::Extended { .. })
    ));
    let same = h.host.extend(&spec.id, Bytes(28 * GIB)).unwrap();
    assert!(!same.lv.changed());
    assert_eq!(
        same.filesystem,
        FsGrowth::Grown(ExtendAction::Identity(Bytes(28 * GIB - (2 << 20))))
    );
    assert!(matches!(
        h.host.extend(&spec.id, Bytes(20 * GIB)),
        Err(HostError::LvExtend { .. })
    ));
    let _ = h.host.expose(&spec.id, &h.jail("vdb"), OWNER).unwrap();
    let exposed = h.host.extend(&spec.id, Bytes(29 * GIB)).unwrap();
    assert!(exposed.lv.changed());
    assert_eq!(exposed.filesystem, FsGrowth::LeftToGuest);
    assert_eq!(h.devices.counts(&spec.id).fs_grows, 1);
    // Growth past the over-commit limit is refused and changes nothing.
    let err = h.host.extend(&spec.id, Bytes(40 * GIB)).unwrap_err();
    assert!(matches!(err, HostError::Admission { .. }), "{err}");
    assert_eq!(h.host.list().unwrap()[0].size, Bytes(29 * GIB));
}

#[test]
fn a_crash_after_any_extend_step_converges_on_rerun() {
    for step in [Step::LvExtended, Step::CryptResized, Step::FsGrown] {
        let h = harness();
        let spec = spec(Encryption::Luks2);
        let _ = h.host.create(&spec).unwrap();
        h.plan.at(step, Fault::Crash);
        assert!(h.host.extend(&spec.id, Bytes(27 * GIB)).is_err());
        let rerun = h.host.extend(&spec.id, Bytes(27 * GIB)).unwrap();
        assert!(!rerun.lv.changed(), "{step}");
        let fs_done_before = step == Step::FsGrown;
        assert_eq!(
            matches!(
                rerun.filesystem,
                FsGrowth::Grown(ExtendAction::Extended { .. })
            ),
            !fs_done_before,
            "{step}"
        );
        assert_eq!(h.devices.counts(&spec.id).fs_grows, 1, "{step}");
    }
}

#[test]
fn a_ready_volume_whose_key_is_lost_is_never_reformatted() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let _ = h.host.create(&spec).unwrap();
    let _ = h.host.close(&spec.id).unwrap();
    let _ = h.keys.destroy(&spec.id).unwrap();
    let err = h.host.create(&spec).unwrap_err();
    assert!(matches!(err, HostError::KeyMissing { .. }), "{err}");
    assert!(err.to_string().contains("refusing to reformat"), "{err}");
    assert_eq!(h.devices.counts(&spec.id).crypt_formats, 1);
    h.assert_ready_state_kept(&spec);
}

impl Harness {
    fn assert_ready_state_kept(&self, spec: &NewVolume) {
        let listed = self.host.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].progress, Some(Progress::Ready));
        assert_eq!(listed[0].id, spec.id);
    }
}

#[test]
fn a_wrong_key_is_a_clear_error_that_reveals_no_key() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let _ = h.host.create(&spec).unwrap();
    let _ = h.host.close(&spec.id).unwrap();
    let real_key = h.keys.load(&spec.id).unwrap().unwrap();
    let _ = h.keys.destroy(&spec.id).unwrap();
    let wrong = VolumeKey::generate().unwrap();
    h.keys.insert(&spec.id, &wrong).unwrap();
    let err = h.host.open(&spec.id).unwrap_err();
    let text = format!("{err} | {err:?}");
    assert!(text.contains("wrong key"), "{text}");
    for key in [&real_key, &wrong] {
        let bytes = key.expose_secret();
        let decimal = format!("{}, {}, {}", bytes[0], bytes[1], bytes[2]);
        let hex: String = bytes[..4].iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&decimal) && !text.contains(&hex), "{text}");
    }
    assert!(h.devices.mappings().is_empty(), "no half-made mapping");
}

#[test]
fn a_resumed_create_refuses_foreign_content_on_its_lv() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    h.plan.at(Step::LvCreated, Fault::Crash);
    let _ = h.host.create(&spec).unwrap_err();
    let device = PathBuf::from(format!("/dev/vg0/{}", spec.id.lv_name()));
    h.devices.plant_foreign(&device, "an XFS filesystem");
    let err = h.host.create(&spec).unwrap_err();
    assert!(
        err.to_string().contains("refusing to format over it"),
        "{err}"
    );
    assert_eq!(h.devices.counts(&spec.id).crypt_formats, 0);
}

#[test]
fn concurrent_creates_respect_admission() {
    let h = Arc::new(harness_with(CapacityPolicy::default()));
    // 3 GiB pool at ratio 10: room for three 10 GiB volumes, not four.
    let specs: Vec<NewVolume> = (0..4)
        .map(|_| NewVolume {
            size: Bytes(10 * GIB),
            ..spec(Encryption::None)
        })
        .collect();
    let results: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = specs
            .iter()
            .map(|s| {
                let h = h.clone();
                scope.spawn(move || h.host.create(s).is_ok())
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|ok| **ok).count(), 3);
    assert_eq!(h.backend.list_thins().unwrap().len(), 3);
    assert!(Path::new(h.dir.path()).exists());
}

#[test]
fn delete_leaves_a_foreign_node_that_replaced_ours_alone() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let _ = h.host.create(&spec).unwrap();
    let jail = h.jail("vdb");
    let _ = h.host.expose(&spec.id, &jail, OWNER).unwrap();
    std::fs::remove_file(jail.full()).unwrap();
    std::fs::write(jail.full(), b"replaced by someone").unwrap();
    assert_eq!(h.host.delete(&spec.id).unwrap(), DeleteAction::Deleted);
    assert_eq!(std::fs::read(jail.full()).unwrap(), b"replaced by someone");
    assert!(h.backend.list_thins().unwrap().is_empty());
    assert!(h.key_files().is_empty());
}

/// Reproduced: an LV that listing does not show (it lost our tag) made
/// create fail with `NotOurs`, and the rollback destroyed the key that was
/// stored before the call.
#[test]
fn a_failed_create_keeps_a_key_that_existed_before_it() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    let key = VolumeKey::generate().unwrap();
    h.keys.insert(&spec.id, &key).unwrap();
    h.backend.plant_untagged(&spec.id.lv_name(), Bytes(GIB));
    let err = h.host.create(&spec).unwrap_err();
    assert!(
        matches!(&err, HostError::LvCreate { source, .. } if matches!(**source, BackendError::NotOurs { .. })),
        "{err}"
    );
    let kept = h.keys.load(&spec.id).unwrap().expect("key kept");
    assert!(kept.same_as(&key));
    // The same when the failure comes after this call made its LV: the LV
    // goes, the older key stays.
    let spec = self::spec(Encryption::Luks2);
    h.keys.insert(&spec.id, &key).unwrap();
    h.plan.at(Step::FsMade, Fault::Fail);
    assert!(matches!(
        h.host.create(&spec),
        Err(HostError::InjectedFailure { .. })
    ));
    assert!(h.backend.list_thins().unwrap().is_empty());
    assert!(h
        .keys
        .load(&spec.id)
        .unwrap()
        .expect("key kept")
        .same_as(&key));
    // Even when that rollback crashes half-way and a later create finishes it.
    let spec = self::spec(Encryption::Luks2);
    h.keys.insert(&spec.id, &key).unwrap();
    h.plan
        .at(Step::FsMade, Fault::Fail)
        .at(Step::HeaderErased, Fault::Crash);
    assert!(h.host.create(&spec).is_err());
    assert!(h.host.create(&spec).unwrap().changed());
    assert!(h
        .keys
        .load(&spec.id)
        .unwrap()
        .expect("key kept")
        .same_as(&key));
}

/// With the envelope store, every host sees every sealed key: a second
/// host's failed create of the same volume id must not delete it.
#[test]
fn a_second_hosts_failed_create_never_deletes_the_shared_sealed_key() {
    use crate::keys::{EnvelopeKeyStore, KeyEncryptionKey, LocalSealedStorage};
    let first = harness();
    let second = harness();
    let sealed_dir = first.dir.path().join("sealed");
    let kek = [7u8; crate::keys::KEK_BYTES];
    let store = |h: &Harness| -> VolumeHost {
        let keys = EnvelopeKeyStore::new(
            KeyEncryptionKey::from_bytes(&kek).unwrap(),
            LocalSealedStorage::open(&sealed_dir).unwrap(),
        );
        VolumeHost::new(
            h.backend.clone(),
            h.devices.clone(),
            Arc::new(keys),
            CapacityPolicy::default(),
        )
        .with_faults(h.plan.clone())
    };
    let (host_one, host_two) = (store(&first), store(&second));
    let spec = spec(Encryption::Luks2);
    let _ = host_one.create(&spec).unwrap();
    second.plan.at(Step::FsMade, Fault::Fail);
    assert!(matches!(
        host_two.create(&spec),
        Err(HostError::InjectedFailure { .. })
    ));
    assert!(second.backend.list_thins().unwrap().is_empty());
    // The first host's volume still opens with the shared key.
    let _ = first.devices.close_crypt(&spec.id).unwrap();
    host_one
        .open(&spec.id)
        .expect("the sealed key is still there");
}

/// A create that resumes an unfinished one and fails removes only what it
/// made itself: the earlier call's LV and key stay for the next re-run.
#[test]
fn a_failed_resumed_create_leaves_what_earlier_calls_made() {
    let h = harness();
    let spec = spec(Encryption::Luks2);
    h.plan.at(Step::LvCreated, Fault::Crash);
    let _ = h.host.create(&spec).unwrap_err();
    h.plan.at(Step::CryptOpened, Fault::Fail);
    assert!(matches!(
        h.host.create(&spec),
        Err(HostError::InjectedFailure { .. })
    ));
    let listed = h.host.list().unwrap();
    assert_eq!(listed.len(), 1, "the earlier call's LV stays");
    assert_eq!(listed[0].progress, Some(Progress::LvCreated));
    assert!(h.devices.mappings().is_empty(), "this call's mapping went");
    assert_eq!(h.key_files().len(), 1, "the earlier call's key stays");
    assert!(h.host.create(&spec).unwrap().changed());
    h.assert_ready(&spec);
    assert_eq!(h.devices.counts(&spec.id).crypt_formats, 1);
    let _ = h.host.delete(&spec.id).unwrap();
    h.assert_clean();
}

/// What a restart costs: listing many encrypted volumes takes one report
/// of the pool and one device-mapper query in all, not one per volume.
#[test]
fn listing_many_volumes_costs_one_report_and_one_device_mapper_query() {
    let h = harness_with(CapacityPolicy {
        overcommit: crate::units::OvercommitRatio::from_thousandths(1_000_000).unwrap(),
        ..CapacityPolicy::default()
    });
    let volumes: Vec<NewVolume> = (0..20).map(|_| spec(Encryption::Luks2)).collect();
    for volume in &volumes {
        let _ = h.host.create(volume).unwrap();
    }
    let _ = h.devices.close_crypt(&volumes[0].id).unwrap();
    let (reports, queries) = (h.backend.calls().reports, h.devices.dm_queries());
    let listed = h.host.list().unwrap();
    assert_eq!(listed.len(), volumes.len());
    assert_eq!(h.backend.calls().reports - reports, 1, "LVM reports");
    assert_eq!(h.devices.dm_queries() - queries, 1, "device-mapper queries");
    for volume in &listed {
        let open = volume.id != volumes[0].id;
        assert_eq!(volume.device.is_some(), open, "{}", volume.id);
    }
}

/// A create of a new name is admitted on the pool report that also says the
/// name is free, and records `ready` on the LV it made without reading it
/// again; an expose records its node on the LV it just read.
#[test]
fn a_create_reads_the_pool_once_and_an_expose_reads_its_volume_once() {
    let h = harness_with(CapacityPolicy {
        overcommit: crate::units::OvercommitRatio::from_thousandths(1_000_000).unwrap(),
        ..CapacityPolicy::default()
    });
    for (encryption, jail) in [(Encryption::None, "vdb"), (Encryption::Luks2, "vdc")] {
        let volume = spec(encryption);
        let before = h.backend.calls();
        let created = h.host.create(&volume).unwrap();
        let after = h.backend.calls();
        assert_eq!(after.reports - before.reports, 1, "create: LVM reports");
        assert_eq!(
            after.full_reports - before.full_reports,
            1,
            "create: the admission"
        );
        assert_eq!(
            after.changes - before.changes,
            2,
            "create: lvcreate and ready"
        );
        assert!(matches!(created, CreateAction::Created(_)));

        let before = h.backend.calls();
        let _ = h.host.expose(&volume.id, &h.jail(jail), OWNER).unwrap();
        let after = h.backend.calls();
        assert_eq!(after.reports - before.reports, 1, "expose: LVM reports");
        assert_eq!(after.changes - before.changes, 1, "expose: the node record");

        let again = h.host.create(&volume).unwrap();
        assert!(matches!(again, CreateAction::Identity(_)), "{again:?}");
    }
}

/// Create, expose, extend and delete of one volume read that volume alone
/// (and the pool once where admission needs it), however many volumes the
/// pool holds.
#[test]
fn operations_on_one_volume_do_not_read_every_volume() {
    let h = harness_with(CapacityPolicy {
        overcommit: crate::units::OvercommitRatio::from_thousandths(1_000_000).unwrap(),
        ..CapacityPolicy::default()
    });
    for _ in 0..30 {
        let _ = h.host.create(&spec(Encryption::None)).unwrap();
    }
    let full_reports = |h: &Harness| h.backend.calls().full_reports;
    let volume = spec(Encryption::Luks2);
    let before = full_reports(&h);
    let _ = h.host.create(&volume).unwrap();
    assert_eq!(full_reports(&h) - before, 1, "create: the admission alone");
    let before = full_reports(&h);
    let _ = h.host.expose(&volume.id, &h.jail("vdb"), OWNER).unwrap();
    assert_eq!(full_reports(&h) - before, 0, "expose");
    let before = full_reports(&h);
    let _ = h.host.extend(&volume.id, Bytes(26 * GIB)).unwrap();
    assert_eq!(full_reports(&h) - before, 1, "extend: the admission alone");
    let before = full_reports(&h);
    let _ = h.host.delete(&volume.id).unwrap();
    assert_eq!(full_reports(&h) - before, 0, "delete");
}

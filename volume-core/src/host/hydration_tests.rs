//! A hydrating volume as the host sees it, on the simulator: its tags,
//! listing, open, and the refusals of what needs a complete LV. The
//! copying layer itself is device-mapper's (tests/tests/real_migrate.rs).

use super::tests::{harness, Harness};
use super::*;
use crate::cmd::{MigrationTools, Program};
use crate::crypt::FormatGuard;
use crate::hydration::{migration_tag, HydrationState, RecoveryRate};
use crate::keys::MigrationSecret;
use crate::units::GIB;

const OWNER: NodeOwner = NodeOwner {
    uid: 1000,
    gid: 1000,
};

fn request() -> Hydration {
    Hydration {
        migration: MigrationId::generate(),
        id: VolumeId::generate(),
        name: VolumeName::new("data").unwrap(),
        origin: VolumeId::generate(),
        size: Bytes(GIB),
        source: "127.0.0.1:1".parse().unwrap(),
        rate: RecoveryRate::from_kib_per_sec(4096).unwrap(),
        run_dir: PathBuf::from("/nonexistent/run"),
    }
}

/// Never run here: every test stops before the layer is built.
fn tools() -> MigrationTools {
    MigrationTools {
        qemu_nbd: Program::at("qemu-nbd", std::env::current_exe().unwrap()).unwrap(),
    }
}

impl Harness {
    /// The LV `hydrate` makes, with `tags`, its header, its key stored
    /// and, when `open`, its mapping up (as over the layer).
    fn plant(&self, request: &Hydration, tags: Vec<String>, open: bool) -> VolumeKey {
        let key = VolumeKey::generate().unwrap();
        self.keys.insert(&request.id, &key).unwrap();
        let lv = self
            .backend
            .create_thin(&request.id.lv_name(), request.size, &tags)
            .unwrap()
            .into_inner();
        let device = lv.device.unwrap();
        let _ = self
            .devices
            .format_crypt(&device, &request.id, &key, FormatGuard::RequireBlank)
            .unwrap();
        if open {
            let _ = self.devices.open_crypt(&device, &request.id, &key).unwrap();
        }
        key
    }

    fn plant_hydrating(&self, request: &Hydration, open: bool) -> VolumeKey {
        let mut tags = hydration::volume_tags(&request.name);
        tags.push(migration_tag(&request.migration));
        self.plant(request, tags, open)
    }

    fn listed(&self, id: &VolumeId) -> LocalVolume {
        self.host
            .list()
            .unwrap()
            .into_iter()
            .find(|v| v.id == *id)
            .expect("listed")
    }
}

fn is_unfinished(result: Result<impl std::fmt::Debug, HostError>, request: &Hydration) {
    match result {
        Err(HostError::HydrationUnfinished { id, migration }) => {
            assert_eq!(
                (id, migration),
                (request.id.clone(), request.migration.clone())
            )
        }
        other => panic!("expected HydrationUnfinished, got {other:?}"),
    }
}

#[test]
fn a_hydrating_volume_is_listed_usable_and_refused_what_needs_its_whole_lv() {
    let h = harness();
    let request = request();
    let _ = h.plant_hydrating(&request, true);
    let tags = h.backend.thin(&request.id.lv_name()).unwrap().unwrap().tags;
    for tag in [
        "vmv1.step=hydrating",
        "vmv1.enc=luks2",
        "vmv1.name=data",
        &migration_tag(&request.migration),
    ] {
        assert!(tags.contains(tag), "{tag} in {tags:?}");
    }

    let mapping = PathBuf::from(format!("/dev/mapper/{}", request.id.crypt_name()));
    let listed = h.listed(&request.id);
    assert_eq!(listed.progress, Some(Progress::Hydrating));
    assert_eq!(listed.device.as_ref(), Some(&mapping));
    assert_eq!(listed.name, Some(request.name.clone()));
    assert_eq!(h.host.open(&request.id).unwrap(), mapping);
    let jail = JailPath::new(h.dir.path(), "dev/vdb").unwrap();
    let exposed = h.host.expose(&request.id, &jail, OWNER).unwrap();
    assert!(exposed.changed(), "a hydrating volume is given to its VM");

    let id = &request.id;
    is_unfinished(h.host.extend(id, Bytes(2 * GIB)), &request);
    let snapshot = SnapshotId::generate();
    is_unfinished(h.host.snapshot(id, &snapshot, &mut NoFreeze), &request);
    let fork = Restore {
        snapshot: snapshot.clone(),
        id: VolumeId::generate(),
        name: VolumeName::new("copy").unwrap(),
        size: None,
    };
    is_unfinished(h.host.fork(id, &fork, &mut NoFreeze), &request);
    let onto = Restore {
        id: id.clone(),
        ..fork.clone()
    };
    is_unfinished(h.host.restore(&onto), &request);
    let create = NewVolume {
        id: id.clone(),
        name: request.name.clone(),
        size: request.size,
        encryption: Encryption::Luks2,
    };
    is_unfinished(h.host.create(&create), &request);
    let closed = h.host.close(id);
    let message = closed.as_ref().unwrap_err().to_string();
    assert!(
        message.contains(request.migration.as_str()) && message.contains("complete or cancel"),
        "{message}"
    );
    is_unfinished(closed, &request);

    // Nothing of it changed: not formatted, still open, still hydrating.
    assert_eq!(h.devices.counts(id).crypt_formats, 1);
    assert_eq!(h.devices.counts(id).mkfs_runs, 0);
    assert_eq!(h.listed(id).device, Some(mapping));
    assert_eq!(h.listed(id).progress, Some(Progress::Hydrating));
    assert!(h.backend.thin(&snapshot.lv_name()).unwrap().is_none());
}

#[test]
fn open_of_a_hydrating_volume_whose_layer_is_gone_says_to_hydrate_again() {
    let h = harness();
    let request = request();
    let _ = h.plant_hydrating(&request, false);
    let err = h.host.open(&request.id).unwrap_err();
    assert!(
        matches!(&err, HostError::Hydrating { id, migration }
            if *id == request.id && *migration == request.migration),
        "{err:?}"
    );
    assert!(err.to_string().contains("call hydrate again"), "{err}");
    let jail = JailPath::new(h.dir.path(), "dev/vdb").unwrap();
    assert!(matches!(
        h.host.expose(&request.id, &jail, OWNER),
        Err(HostError::Hydrating { .. })
    ));
    assert!(h.devices.mappings().is_empty(), "open made no mapping");
    let listed = h.listed(&request.id);
    assert_eq!(listed.progress, Some(Progress::Hydrating));
    assert_eq!(listed.device, None);
}

#[test]
fn delete_of_a_hydrating_volume_on_a_host_without_migrations_changes_nothing() {
    let h = harness();
    let request = request();
    let _ = h.plant_hydrating(&request, true);
    let err = h.host.delete(&request.id).unwrap_err();
    assert!(
        matches!(&err, HostError::MigrationsOff { id, migration }
            if *id == request.id && *migration == request.migration),
        "{err:?}"
    );
    assert_eq!(h.listed(&request.id).progress, Some(Progress::Hydrating));
    assert_eq!(h.key_files().len(), 1);
    assert_eq!(h.devices.mappings().len(), 1);
}

#[test]
fn hydrate_refuses_another_key_or_migration_and_rolls_back_only_its_own_key() {
    let h = harness();
    let secret = MigrationSecret::generate().unwrap();
    let key = VolumeKey::generate().unwrap();

    // Another key stored under the new id: refused, nothing made.
    let request = request();
    let other = VolumeKey::generate().unwrap();
    h.keys.insert(&request.id, &other).unwrap();
    let err = h
        .host
        .hydrate(&tools(), &request, &secret, &key)
        .unwrap_err();
    assert!(
        matches!(&err, HostError::SpecMismatch { field: "key", .. }),
        "{err:?}"
    );
    assert!(h.keys.load(&request.id).unwrap().unwrap().same_as(&other));
    assert!(h.backend.list_thins().unwrap().is_empty());
    let _ = h.keys.destroy(&request.id).unwrap();

    // A failure after the key was stored removes the key this call stored.
    let request = self::request();
    h.plan.at(Step::KeyReady, Fault::Fail);
    assert!(matches!(
        h.host.hydrate(&tools(), &request, &secret, &key),
        Err(HostError::InjectedFailure {
            step: Step::KeyReady,
            ..
        })
    ));
    assert!(h.key_files().is_empty(), "{:?}", h.key_files());
    // So does a failure of the destination's first step (an LV of that
    // name that is not ours), and nothing else is left.
    h.backend.plant_untagged(&request.id.lv_name(), Bytes(GIB));
    let err = h
        .host
        .hydrate(&tools(), &request, &secret, &key)
        .unwrap_err();
    assert!(
        matches!(&err, HostError::HydrationStart { migration, .. } if *migration == request.migration),
        "{err:?}"
    );
    assert!(h.key_files().is_empty(), "{:?}", h.key_files());
    // The same key stored before the call stays.
    h.keys.insert(&request.id, &key).unwrap();
    assert!(h.host.hydrate(&tools(), &request, &secret, &key).is_err());
    assert!(h.keys.load(&request.id).unwrap().unwrap().same_as(&key));

    // The LV of another migration: refused, nothing changed.
    let request = self::request();
    let planted = h.plant_hydrating(&request, false);
    let again = Hydration {
        migration: MigrationId::generate(),
        ..request.clone()
    };
    let err = h
        .host
        .hydrate(&tools(), &again, &secret, &planted)
        .unwrap_err();
    assert!(
        matches!(
            &err,
            HostError::SpecMismatch {
                field: "migration",
                ..
            }
        ),
        "{err:?}"
    );
    for call in [
        h.host.hydration_progress(&tools(), &again).map(|_| ()),
        h.host.complete_hydration(&tools(), &again).map(|_| ()),
    ] {
        assert!(
            matches!(
                &call,
                Err(HostError::SpecMismatch {
                    field: "migration",
                    ..
                })
            ),
            "{call:?}"
        );
    }
    assert_eq!(h.listed(&request.id).progress, Some(Progress::Hydrating));
}

#[test]
fn a_completed_hydration_reads_as_done_and_hydrate_opens_it_as_a_ready_volume() {
    let h = harness();
    let request = request();
    let tags = vec![
        progress::step_tag(Progress::Ready),
        progress::encryption_tag(Encryption::Luks2),
        progress::name_tag(&request.name),
    ];
    let key = h.plant(&request, tags, false);
    let done = h.host.hydration_progress(&tools(), &request).unwrap();
    assert_eq!(done.state, HydrationState::Complete);
    assert_eq!((done.copied, done.total), (request.size, request.size));
    assert_eq!(
        h.host.complete_hydration(&tools(), &request).unwrap().swap,
        None,
        "complete twice: the second reads as done"
    );
    // After a restart the daemon calls hydrate again: the volume opens on
    // its LV like any other.
    let secret = MigrationSecret::generate().unwrap();
    let again = h.host.hydrate(&tools(), &request, &secret, &key).unwrap();
    assert!(!again.changed());
    let mapping = PathBuf::from(format!("/dev/mapper/{}", request.id.crypt_name()));
    assert_eq!(again.inner().device.as_ref(), Some(&mapping));
    assert_eq!(again.inner().progress, Some(Progress::Ready));
    assert_eq!(h.host.close(&request.id).unwrap(), DeleteAction::Deleted);
    assert_eq!(h.host.delete(&request.id).unwrap(), DeleteAction::Deleted);
    h.assert_clean();
}

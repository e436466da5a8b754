//! Snapshots, restore and fork on the simulator, with faults after every
//! step.

use super::tests::{harness, harness_with, spec, Harness};
use super::*;
use crate::capacity::Refusal;
use crate::units::GIB;

fn restore_of(snapshot: &SnapshotId, size: Option<Bytes>) -> Restore {
    Restore {
        snapshot: snapshot.clone(),
        id: VolumeId::generate(),
        name: VolumeName::new("restored").unwrap(),
        size,
    }
}

/// A ready origin and one snapshot of it.
fn origin_with_snapshot(h: &Harness, encryption: Encryption) -> (NewVolume, SnapshotId) {
    let mut origin = spec(encryption);
    origin.size = Bytes(2 * GIB);
    let _ = h.host.create(&origin).unwrap();
    let snapshot = SnapshotId::generate();
    assert!(h
        .host
        .snapshot(&origin.id, &snapshot, &mut NoFreeze)
        .unwrap()
        .changed());
    (origin, snapshot)
}

#[derive(Default)]
struct Recorder {
    calls: Vec<&'static str>,
    fail_freeze: bool,
}

impl FreezeHook for Recorder {
    fn freeze(&mut self, _volume: &VolumeId) -> Result<(), String> {
        self.calls.push("freeze");
        if self.fail_freeze {
            Err("guest agent did not answer".into())
        } else {
            Ok(())
        }
    }
    fn thaw(&mut self, _volume: &VolumeId) {
        self.calls.push("thaw");
    }
}

#[test]
fn snapshot_is_idempotent_listed_counted_and_frozen_around() {
    let h = harness();
    let mut origin = spec(Encryption::Luks2);
    origin.size = Bytes(2 * GIB);
    let _ = h.host.create(&origin).unwrap();
    let before = h.host.pool_status().unwrap().usage;
    let snapshot = SnapshotId::generate();
    let mut hook = Recorder::default();
    let taken = h.host.snapshot(&origin.id, &snapshot, &mut hook).unwrap();
    assert!(taken.changed());
    assert_eq!(hook.calls, ["freeze", "thaw"]);
    let taken = taken.into_inner();
    assert_eq!(taken.volume, origin.id);
    assert_eq!(taken.size, Bytes(2 * GIB));
    assert_eq!(taken.encryption, Some(Encryption::Luks2));
    assert!(taken.taken.is_some());
    // Identity, without freezing the guest again.
    let mut again = Recorder::default();
    assert!(!h
        .host
        .snapshot(&origin.id, &snapshot, &mut again)
        .unwrap()
        .changed());
    assert!(again.calls.is_empty());
    assert_eq!(h.host.snapshots(Some(&origin.id)).unwrap(), vec![taken]);
    assert!(h
        .host
        .snapshots(Some(&VolumeId::generate()))
        .unwrap()
        .is_empty());
    // Not a volume: `list` shows only the origin.
    assert_eq!(h.host.list().unwrap().len(), 1);
    // Counted at its virtual size, as LVM counts it.
    let after = h.host.pool_status().unwrap().usage;
    assert_eq!(after.provisioned, before.provisioned + Bytes(2 * GIB));
    // The same snapshot id for another volume is refused.
    let mut other = spec(Encryption::None);
    other.size = Bytes(GIB);
    let _ = h.host.create(&other).unwrap();
    assert!(matches!(
        h.host.snapshot(&other.id, &snapshot, &mut NoFreeze),
        Err(HostError::SnapshotOfOther { .. })
    ));
}

#[test]
fn a_failed_freeze_takes_no_snapshot_and_still_thaws() {
    let h = harness();
    let mut origin = spec(Encryption::None);
    origin.size = Bytes(GIB);
    let _ = h.host.create(&origin).unwrap();
    let mut hook = Recorder {
        fail_freeze: true,
        ..Recorder::default()
    };
    let err = h
        .host
        .snapshot(&origin.id, &SnapshotId::generate(), &mut hook)
        .unwrap_err();
    assert!(
        matches!(&err, HostError::Freeze { reason, .. } if reason.contains("guest agent")),
        "{err}"
    );
    assert_eq!(hook.calls, ["freeze", "thaw"]);
    assert!(h.host.snapshots(None).unwrap().is_empty());
}

#[test]
fn a_snapshot_needs_headroom_like_a_create() {
    // 3 GiB pool at ratio 10: 30 GiB; a 20 GiB volume leaves 10.
    let h = harness();
    let mut origin = spec(Encryption::Luks2);
    origin.size = Bytes(20 * GIB);
    let _ = h.host.create(&origin).unwrap();
    let err = h
        .host
        .snapshot(&origin.id, &SnapshotId::generate(), &mut NoFreeze)
        .unwrap_err();
    assert!(
        matches!(
            &err,
            HostError::Admission {
                refusal: Refusal::Overcommit { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(h.host.snapshots(None).unwrap().is_empty());
}

#[test]
fn restore_copies_the_key_adopts_the_header_and_grows() {
    for encryption in [Encryption::Luks2, Encryption::None] {
        let h = harness();
        let (origin, snapshot) = origin_with_snapshot(&h, encryption);
        let restore = restore_of(&snapshot, Some(Bytes(3 * GIB)));
        let restored = h.host.restore(&restore).unwrap();
        assert!(restored.changed());
        let restored = restored.into_inner();
        assert_eq!(restored.progress, Some(Progress::Ready));
        assert_eq!(restored.size, Bytes(3 * GIB));
        assert_eq!(restored.encryption, Some(encryption));
        assert!(restored.device.is_some());
        // Nothing was formatted: the data is the snapshot's.
        let counts = h.devices.counts(&restore.id);
        assert_eq!((counts.crypt_formats, counts.mkfs_runs), (0, 0));
        // The copy's filesystem is its own now (its UUID and label, on
        // the real stack), so a create over it would know it; the
        // simulator counts its growth under it, not the origin.
        let device = restored.device.clone().expect("open");
        assert!(!h.devices.make_fs(&device, &restore.id).unwrap().changed());
        assert_eq!(h.devices.counts(&restore.id).fs_grows, 1);
        assert_eq!(h.devices.counts(&origin.id).fs_grows, 0);
        if encryption == Encryption::Luks2 {
            let copy = h.keys.load(&restore.id).unwrap().expect("key copied");
            let original = h.keys.load(&origin.id).unwrap().unwrap();
            assert!(copy.same_as(&original), "a fork shares the data key");
        }
        assert!(!h.host.restore(&restore).unwrap().changed());
        // Independent of the origin and the snapshot from now on.
        let _ = h.host.delete(&origin.id).unwrap();
        assert!(h.host.snapshots(None).unwrap().is_empty());
        // A restart: mappings do not survive it.
        let _ = h.devices.close_crypt(&restore.id).unwrap();
        let _ = h.host.open(&restore.id).unwrap();
        let _ = h.host.delete(&restore.id).unwrap();
        h.assert_clean();
    }
}

#[test]
fn restore_refuses_a_smaller_size_a_missing_snapshot_and_no_headroom() {
    let h = harness();
    let (_, snapshot) = origin_with_snapshot(&h, Encryption::Luks2);
    let before = h.backend.calls().changes;
    let err = h
        .host
        .restore(&restore_of(&snapshot, Some(Bytes(GIB))))
        .unwrap_err();
    assert!(matches!(err, HostError::RestoreTooSmall { .. }), "{err}");
    let err = h
        .host
        .restore(&restore_of(&SnapshotId::generate(), None))
        .unwrap_err();
    assert!(matches!(err, HostError::SnapshotNotFound { .. }), "{err}");
    let err = h
        .host
        .restore(&restore_of(&snapshot, Some(Bytes(40 * GIB))))
        .unwrap_err();
    assert!(matches!(err, HostError::Admission { .. }), "{err}");
    assert_eq!(h.backend.calls().changes, before, "bad input changed LVM");
    assert_eq!(h.key_files().len(), 1, "only the origin's key");
}

#[test]
fn a_crash_after_any_restore_step_converges_on_rerun() {
    for step in Step::RESTORE_ENCRYPTED {
        let h = harness();
        let (origin, snapshot) = origin_with_snapshot(&h, Encryption::Luks2);
        let restore = restore_of(&snapshot, Some(Bytes(3 * GIB)));
        h.plan.at(step, Fault::Crash);
        let err = h.host.restore(&restore).unwrap_err();
        assert!(
            matches!(err, HostError::InjectedCrash { step: s, .. } if s == step),
            "{step}: {err}"
        );
        // A restart: mappings do not survive it.
        let _ = h.devices.close_crypt(&restore.id).unwrap();
        // A plain create over the half-restored volume is refused.
        if step != Step::KeyCopied && step != Step::ProgressReady {
            let over = NewVolume {
                id: restore.id.clone(),
                name: restore.name.clone(),
                size: Bytes(3 * GIB),
                encryption: Encryption::Luks2,
            };
            assert!(
                matches!(
                    h.host.create(&over),
                    Err(HostError::RestoreUnfinished { .. })
                ),
                "{step}"
            );
        }
        let rerun = h.host.restore(&restore).unwrap();
        assert_eq!(rerun.changed(), step != Step::ProgressReady, "{step}");
        let status = rerun.into_inner();
        assert_eq!(status.progress, Some(Progress::Ready), "{step}");
        assert_eq!(status.size, Bytes(3 * GIB), "{step}");
        assert_eq!(h.devices.counts(&restore.id).crypt_formats, 0, "{step}");
        assert!(h.plan.pending().is_empty());
        let _ = h.host.delete(&restore.id).unwrap();
        let _ = h.host.delete(&origin.id).unwrap();
        h.assert_clean();
    }
}

#[test]
fn a_failure_after_any_restore_step_rolls_back_only_what_it_made() {
    for step in Step::RESTORE_ENCRYPTED {
        let h = harness();
        let (origin, snapshot) = origin_with_snapshot(&h, Encryption::Luks2);
        let restore = restore_of(&snapshot, Some(Bytes(3 * GIB)));
        h.plan.at(step, Fault::Fail);
        let err = h.host.restore(&restore).unwrap_err();
        assert!(
            matches!(err, HostError::InjectedFailure { step: s, .. } if s == step),
            "{step}: {err}"
        );
        if step == Step::ProgressReady {
            // Recorded as ready: it may be in use, so it is kept.
            assert!(!h.host.restore(&restore).unwrap().changed());
            let _ = h.host.delete(&restore.id).unwrap();
        }
        // The origin and its snapshot are untouched; nothing of the new
        // volume is left.
        assert_eq!(h.host.list().unwrap().len(), 1, "{step}");
        assert_eq!(h.host.snapshots(Some(&origin.id)).unwrap().len(), 1);
        assert_eq!(h.key_files().len(), 1, "{step}: only the origin's key");
        assert!(h.host.restore(&restore).unwrap().changed(), "{step}");
        let _ = h.host.delete(&restore.id).unwrap();
        let _ = h.host.delete(&origin.id).unwrap();
        h.assert_clean();
    }
}

#[test]
fn fork_leaves_no_snapshot_and_delete_returns_all_capacity() {
    let h = harness_with(CapacityPolicy::default());
    let empty = h.host.pool_status().unwrap().usage;
    let (origin, _) = origin_with_snapshot(&h, Encryption::Luks2);
    let fork = restore_of(&SnapshotId::generate(), None);
    let mut hook = Recorder::default();
    let forked = h.host.fork(&origin.id, &fork, &mut hook).unwrap();
    assert!(forked.changed());
    assert_eq!(hook.calls, ["freeze", "thaw"]);
    // The fork's own snapshot is gone; the earlier one stays.
    assert_eq!(h.host.snapshots(Some(&origin.id)).unwrap().len(), 1);
    assert!(!h
        .host
        .fork(&origin.id, &fork, &mut NoFreeze)
        .unwrap()
        .changed());
    // Deleting the origin takes its snapshot with it; the fork stays.
    let _ = h.host.delete(&origin.id).unwrap();
    assert!(h.host.snapshots(None).unwrap().is_empty());
    assert_eq!(h.host.list().unwrap().len(), 1);
    let _ = h.host.delete(&fork.id).unwrap();
    let usage = h.host.pool_status().unwrap().usage;
    assert_eq!(usage.provisioned, empty.provisioned);
    assert_eq!(usage.volume_count, empty.volume_count);
    h.assert_clean();
}

#[test]
fn destroy_snapshot_is_idempotent() {
    let h = harness();
    let (origin, snapshot) = origin_with_snapshot(&h, Encryption::None);
    assert!(h.host.destroy_snapshot(&snapshot).unwrap().changed());
    assert!(!h.host.destroy_snapshot(&snapshot).unwrap().changed());
    let _ = h.host.delete(&origin.id).unwrap();
    h.assert_clean();
}

#[test]
fn a_restore_at_the_volumes_own_unrounded_size_is_not_too_small() {
    // A record's size is decimal (2 GB); LVM rounds the LV and so the
    // snapshot up to whole extents. The same size again is not smaller.
    let h = harness();
    let mut origin = spec(Encryption::Luks2);
    origin.size = Bytes::from_gb(2).unwrap();
    let _ = h.host.create(&origin).unwrap();
    let fork = restore_of(&SnapshotId::generate(), Some(origin.size));
    let forked = h.host.fork(&origin.id, &fork, &mut NoFreeze).unwrap();
    let forked = forked.into_inner();
    assert_eq!(forked.size, h.host.list().unwrap()[0].size);
    // Nothing was grown: same size after rounding.
    assert_eq!(h.devices.counts(&fork.id).fs_grows, 0);
    assert_eq!(h.devices.counts(&origin.id).fs_grows, 0);
}

/// Taking a snapshot and deleting a volume with snapshots read the pool
/// once where admission needs it and otherwise only the LVs involved,
/// however many other volumes and snapshots the pool holds.
#[test]
fn snapshots_of_one_volume_are_read_without_a_report_of_every_volume() {
    let h = harness_with(crate::capacity::CapacityPolicy {
        overcommit: crate::units::OvercommitRatio::from_thousandths(1_000_000).unwrap(),
        ..crate::capacity::CapacityPolicy::default()
    });
    let others: Vec<(NewVolume, SnapshotId)> = (0..10)
        .map(|_| origin_with_snapshot(&h, Encryption::None))
        .collect();
    let origin = spec(Encryption::Luks2);
    let _ = h.host.create(&origin).unwrap();
    let full_reports = |h: &Harness| h.backend.calls().full_reports;
    let snapshot = SnapshotId::generate();
    let before = full_reports(&h);
    let _ = h
        .host
        .snapshot(&origin.id, &snapshot, &mut NoFreeze)
        .unwrap();
    assert_eq!(
        full_reports(&h) - before,
        1,
        "snapshot: the admission alone"
    );
    let before = full_reports(&h);
    assert!(!h
        .host
        .snapshot(&origin.id, &snapshot, &mut NoFreeze)
        .unwrap()
        .changed());
    assert_eq!(full_reports(&h) - before, 0, "snapshot again");
    let before = full_reports(&h);
    assert!(h.host.delete(&origin.id).unwrap().changed());
    assert_eq!(full_reports(&h) - before, 0, "delete with a snapshot");
    let left = h.host.snapshots(None).unwrap();
    assert!(left.iter().all(|s| s.id != snapshot), "{left:?}");
    assert_eq!(left.len(), others.len(), "{left:?}");
}

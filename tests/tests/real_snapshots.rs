//! Real-kernel tests of snapshots, restore and fork: `VolumeHost` over LVM
//! thin snapshots, dm-crypt and ext4 on a loop-backed thin pool. Run inside
//! the micro-VM:
//! `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/target/debug/microvm
//!  cargo test -p volume-tests --test real_snapshots -- --test-threads=1`.

use nix::mount::umount;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use volume_core::backend::ThinBackend;
use volume_core::crypt;
use volume_core::fs::{probe, volume_label, volume_uuid, Signature, UuidPurpose};
use volume_core::host::{Encryption, FreezeHook, NoFreeze, Progress, Restore, VolumeHost};
use volume_core::keys::KeyStore;
use volume_core::names::{SnapshotId, VolumeId, VolumeName};
use volume_core::units::{Bytes, GIB, MIB};
use volume_tests::stack::{fsck_clean, mount_ext4, new_volume, pattern, write_synced, Stack};

fn restore_of(snapshot: &SnapshotId, name: &str, size: Option<Bytes>) -> Restore {
    Restore {
        snapshot: snapshot.clone(),
        id: VolumeId::generate(),
        name: VolumeName::new(name).unwrap(),
        size,
    }
}

fn device(host: &VolumeHost, id: &VolumeId) -> PathBuf {
    host.list()
        .unwrap()
        .into_iter()
        .find(|v| v.id == *id)
        .and_then(|v| v.device)
        .expect("volume open")
}

/// The ext4 filesystem on `device` has volume `id`'s UUID and label.
fn assert_own_fs(device: &Path, id: &VolumeId) {
    match probe(device).unwrap() {
        Signature::Ext(sb) => {
            assert_eq!(sb.uuid, volume_uuid(UuidPurpose::Filesystem, id), "{id}");
            assert_eq!(sb.label, volume_label(id), "{id}");
        }
        other => panic!("{}: {other}", device.display()),
    }
}

/// A freeze hook that runs `fsfreeze` on a mount of this host, as a VM
/// worker's guest agent would inside the guest.
struct FsFreeze<'a>(&'a Path);

impl FreezeHook for FsFreeze<'_> {
    fn freeze(&mut self, _volume: &VolumeId) -> Result<(), String> {
        let status = std::process::Command::new("fsfreeze")
            .arg("-f")
            .arg(self.0)
            .status()
            .map_err(|e| e.to_string())?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("fsfreeze -f: {status}"))
    }
    fn thaw(&mut self, _volume: &VolumeId) {
        let _ = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(self.0)
            .status();
    }
}

/// Pattern → snapshot → overwrite → restore (encrypted, grown), then a
/// fork of a mounted volume under a writer, frozen and not, each checking
/// clean; then deleting the origin takes its snapshots and all their
/// capacity with it.
#[test]
fn real_test_snapshot_restore_fork_and_delete_on_the_real_stack() {
    let stack = Stack::new("snap-restore");
    let host = stack.host();
    let empty = host.pool_status().unwrap().usage;
    let origin = new_volume(Bytes(2 * GIB), Encryption::Luks2);
    let _ = host.create(&origin).expect("create origin");
    let origin_dev = device(&host, &origin.id);
    let mnt = stack.dir("origin");
    let old = pattern(1, 8 * MIB as usize);
    let new = pattern(2, 8 * MIB as usize);

    mount_ext4(&origin_dev, &mnt);
    write_synced(&mnt.join("pattern.bin"), &old);
    umount(&mnt).unwrap();
    let snapshot = SnapshotId::generate();
    let taken = host
        .snapshot(&origin.id, &snapshot, &mut NoFreeze)
        .expect("snapshot");
    assert!(taken.changed());
    assert!(!host
        .snapshot(&origin.id, &snapshot, &mut NoFreeze)
        .unwrap()
        .changed());
    assert_eq!(host.snapshots(Some(&origin.id)).unwrap().len(), 1);
    assert_eq!(host.list().unwrap().len(), 1, "a snapshot is not a volume");
    // Counted at its virtual size, as LVM's own provisioned sum does.
    let with_snapshot = host.pool_status().unwrap().usage;
    assert_eq!(
        with_snapshot.provisioned,
        empty.provisioned + Bytes(4 * GIB)
    );
    mount_ext4(&origin_dev, &mnt);
    write_synced(&mnt.join("pattern.bin"), &new);
    umount(&mnt).unwrap();

    let restore = restore_of(&snapshot, "restored", Some(Bytes(3 * GIB)));
    let restored = host.restore(&restore).expect("restore");
    assert!(restored.changed());
    let restored = restored.into_inner();
    assert_eq!(restored.progress, Some(Progress::Ready));
    assert_eq!(restored.size, Bytes(3 * GIB));
    assert!(!host.restore(&restore).unwrap().changed(), "idempotent");
    // Its header is its own now; its key is a copy of the origin's.
    let restored_lv = stack.lv_path(&restore.id);
    assert!(matches!(probe(&restored_lv).unwrap(), Signature::Luks));
    assert!(
        !crypt::adopt_header(&restored_lv, &origin.id, &restore.id)
            .expect("the header is the restored volume's")
            .changed(),
        "adopted already"
    );
    let copy = stack.keys.load(&restore.id).unwrap().expect("key copied");
    assert!(copy.same_as(&stack.keys.load(&origin.id).unwrap().unwrap()));
    let restored_dev = restored.device.clone().expect("restored is open");
    fsck_clean(&restored_dev);
    // Its filesystem is its own too: a new UUID and label, so the origin
    // and the copy can sit in one VM and mount by UUID.
    assert_own_fs(&restored_dev, &restore.id);
    assert_own_fs(&origin_dev, &origin.id);
    let restored_mnt = stack.dir("restored");
    mount_ext4(&restored_dev, &restored_mnt);
    assert!(
        fs::read(restored_mnt.join("pattern.bin")).unwrap() == old,
        "the restore holds the old pattern"
    );
    let stat = nix::sys::statvfs::statvfs(&restored_mnt).unwrap();
    let fs_bytes = stat.blocks() * stat.fragment_size();
    assert!(
        fs_bytes > 2 * GIB,
        "filesystem grown to the new size: {fs_bytes}"
    );
    umount(&restored_mnt).unwrap();
    mount_ext4(&origin_dev, &mnt);
    assert!(
        fs::read(mnt.join("pattern.bin")).unwrap() == new,
        "the origin holds the new pattern"
    );

    // Fork while a writer keeps writing to the mounted origin, without a
    // freeze (crash-consistent: the restore's e2fsck -p replays the
    // journal) and with one (fsfreeze around the snapshot).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let dir = mnt.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let path = dir.join(format!("w{}", n % 16));
                write_synced(&path, &pattern(n as u8, 256 * 1024));
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let fork = restore_of(&SnapshotId::generate(), "fork", None);
    let forked = host
        .fork(&origin.id, &fork, &mut NoFreeze)
        .expect("fork under a writer");
    assert!(forked.changed());
    let frozen_fork = restore_of(&SnapshotId::generate(), "frozen", None);
    let _ = host
        .fork(&origin.id, &frozen_fork, &mut FsFreeze(&mnt))
        .expect("frozen fork under a writer");
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(
        writes > 1,
        "the writer ran during the forks ({writes} writes)"
    );
    umount(&mnt).unwrap();
    for id in [&fork.id, &frozen_fork.id] {
        let dev = device(&host, id);
        let _ = host.close(id).unwrap();
        let _ = host.open(id).unwrap();
        fsck_clean(&dev);
        assert_own_fs(&dev, id);
    }
    // Forks leave no snapshot behind; the first snapshot stays.
    assert_eq!(host.snapshots(None).unwrap().len(), 1);

    // Deleting the origin takes its snapshot; every volume's capacity
    // returns.
    assert!(host.delete(&origin.id).unwrap().changed());
    assert!(host.snapshots(None).unwrap().is_empty());
    for id in [&restore.id, &fork.id, &frozen_fork.id] {
        assert!(host.delete(id).unwrap().changed());
    }
    let usage = host.pool_status().unwrap().usage;
    assert_eq!(usage.provisioned, empty.provisioned);
    assert_eq!(usage.volume_count, empty.volume_count);
    assert!(stack.pool.backend.list_thins().unwrap().is_empty());
}

//! Real-kernel tests of the volume data path: `VolumeHost` over LVM,
//! dm-crypt (libcryptsetup), ext4 and jail nodes, on a loop-backed thin
//! pool. Run inside the micro-VM:
//! `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/target/debug/microvm
//!  cargo test -p volume-tests --test real_datapath -- --test-threads=1`.

use fixtures::cmd::Program;
use nix::mount::{mount, umount, MsFlags};
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use volume_core::crypt::{self, CryptError};
use volume_core::fs::{probe, volume_uuid, Signature, UuidPurpose};
use volume_core::host::{
    Encryption, Fault, FaultPlan, FsGrowth, HostError, Progress, Step, VolumeHost,
};
use volume_core::jail::NodeOwner;
use volume_core::keys::{KeyStore, VolumeKey};
use volume_core::names::VolumeId;
use volume_core::units::{Bytes, GIB, MIB};
use volume_tests::stack::{mount_ext4, new_volume, pattern, Stack};

const OWNER: NodeOwner = NodeOwner {
    uid: 4242,
    gid: 4242,
};

/// Nothing of `id` is left: no LV, no mapping, no key, no node.
fn assert_gone(stack: &Stack, host: &VolumeHost, id: &VolumeId) {
    assert!(host.list().unwrap().iter().all(|s| s.id != *id), "LV left");
    assert_eq!(crypt::status(id).unwrap(), None, "mapping left");
    assert!(
        !Path::new("/dev/mapper")
            .join(id.crypt_name().as_str())
            .exists(),
        "mapper node left"
    );
    assert!(stack.keys.load(id).unwrap().is_none(), "key left");
    assert!(!stack.jail().full().exists(), "jail node left");
}

const PATTERN_FILE: &str = "pattern.bin";

#[test]
fn real_test_luks_pattern_through_the_jail_node_survives_close_and_reopen() {
    let stack = Stack::new("dp-roundtrip");
    let host = stack.host();
    let spec = new_volume(Bytes(25 * GIB), Encryption::Luks2);
    let created = host.create(&spec).expect("create");
    assert!(created.changed());
    let status = created.into_inner();
    let mapping = status.device.clone().expect("open after create");
    assert_eq!(
        mapping,
        Path::new("/dev/mapper").join(spec.id.crypt_name().as_str())
    );
    assert!(
        !host.create(&spec).unwrap().changed(),
        "create is idempotent"
    );

    // The LUKS2 header is ours; the filesystem inside is ours.
    let lv_device = host
        .list()
        .unwrap()
        .into_iter()
        .find(|s| s.id == spec.id)
        .unwrap();
    assert_eq!(lv_device.progress, Some(Progress::Ready));
    match probe(&mapping).unwrap() {
        Signature::Ext(sb) => {
            assert_eq!(sb.uuid, volume_uuid(UuidPurpose::Filesystem, &spec.id));
            assert_eq!(sb.block_size, 4096);
        }
        other => panic!("expected ext4, found {other}"),
    }

    // Expose, then write through the jail node (mounting it, as a guest would).
    let jail = stack.jail();
    let node = host
        .expose(&spec.id, &jail, OWNER)
        .expect("expose")
        .into_inner();
    let meta = fs::symlink_metadata(jail.full()).unwrap();
    assert_eq!(meta.rdev(), fs::metadata(&mapping).unwrap().rdev());
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (OWNER.uid, OWNER.gid));
    let data = pattern(0, 8 * MIB as usize);
    mount_ext4(&jail.full(), &stack.mnt());
    {
        let mut file = fs::File::create(stack.mnt().join(PATTERN_FILE)).unwrap();
        file.write_all(&data).unwrap();
        file.sync_all().unwrap();
    }
    umount(&stack.mnt()).unwrap();

    // Close everything, then reopen with a fresh host from the stored key.
    assert!(host.unexpose(&spec.id, &jail).unwrap().changed());
    assert!(host.close(&spec.id).unwrap().changed());
    assert!(!mapping.exists());
    drop(host);
    let host = stack.host();
    let reopened = host.open(&spec.id).expect("open from the stored key");
    assert_eq!(reopened, mapping);
    let again = host.expose(&spec.id, &jail, OWNER).expect("expose again");
    assert_eq!(
        fs::symlink_metadata(jail.full()).unwrap().rdev(),
        fs::metadata(&mapping).unwrap().rdev(),
        "node follows the re-activated mapping (old {}, new {})",
        node.rdev,
        again.inner().rdev
    );
    mount_ext4(&jail.full(), &stack.mnt());
    let mut read_back = Vec::new();
    fs::File::open(stack.mnt().join(PATTERN_FILE))
        .unwrap()
        .read_to_end(&mut read_back)
        .unwrap();
    umount(&stack.mnt()).unwrap();
    assert!(read_back == data, "pattern read back differs");

    // The raw LV holds ciphertext, not the pattern.
    let lv_path = PathBuf::from(format!("/dev/{}/{}", stack.pool.vg, spec.id.lv_name()));
    let mut raw = vec![0u8; 4 << 20];
    {
        let mut lv = fs::File::open(&lv_path).unwrap();
        lv.seek(SeekFrom::Start(0)).unwrap();
        lv.read_exact(&mut raw).unwrap();
    }
    assert!(!raw.windows(64).any(|w| w == &data[..64]));

    assert!(host.delete(&spec.id).unwrap().changed());
    assert_gone(&stack, &host, &spec.id);
}

#[test]
fn real_test_wrong_key_is_a_clear_error_and_leaves_no_mapping() {
    let stack = Stack::new("dp-wrongkey");
    let host = stack.host();
    let spec = new_volume(Bytes(GIB), Encryption::Luks2);
    let _ = host.create(&spec).expect("create");
    let _ = host.close(&spec.id).unwrap();
    let _ = stack.keys.destroy(&spec.id).unwrap();
    stack
        .keys
        .insert(&spec.id, &VolumeKey::generate().unwrap())
        .unwrap();
    let err = host.open(&spec.id).unwrap_err();
    match &err {
        HostError::CryptOpen { source, .. } => {
            assert!(
                matches!(**source, CryptError::WrongKey { .. }),
                "{source:?}"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("wrong key"), "{err}");
    assert_eq!(crypt::status(&spec.id).unwrap(), None);
    // Create with the wrong key never reformats the ready volume.
    assert!(host.create(&spec).is_err());
    let lv_path = PathBuf::from(format!("/dev/{}/{}", stack.pool.vg, spec.id.lv_name()));
    assert_eq!(probe(&lv_path).unwrap(), Signature::Luks);
    let _ = host.delete(&spec.id).unwrap();
    assert_gone(&stack, &host, &spec.id);
}

fn fs_size(mount_point: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(mount_point).unwrap();
    stat.blocks() * stat.fragment_size()
}

#[test]
fn real_test_extend_grows_the_filesystem_offline_and_online() {
    let stack = Stack::new("dp-extend");
    let host = stack.host();
    let spec = new_volume(Bytes(GIB), Encryption::Luks2);
    let status = host.create(&spec).expect("create").into_inner();
    let mapping = status.device.unwrap();
    mount_ext4(&mapping, &stack.mnt());
    let kept = stack.mnt().join("kept");
    let written: Vec<u8> = (0..4 * MIB).map(|i| (i * 7 + 3) as u8).collect();
    fs::write(&kept, &written).unwrap();
    umount(&stack.mnt()).unwrap();

    // Each growth crosses a group descriptor block (one holds 64 groups of
    // 128 MiB, 8 GiB): the filesystem has no reserved descriptor blocks
    // (mkfs `-O ^resize_inode`), so resize2fs offline and the kernel
    // online must make room for new ones.
    // Offline: nothing mounts it.
    let grown = host
        .extend(&spec.id, Bytes(9 * GIB))
        .expect("extend offline");
    assert!(grown.lv.changed());
    assert!(matches!(grown.filesystem, FsGrowth::Grown(action) if action.changed()));
    mount_ext4(&mapping, &stack.mnt());
    let size = fs_size(&stack.mnt());
    assert!(size > 8900 * MIB, "df size {size} after offline grow");

    // Online: mounted here, resize2fs grows it in place.
    let grown = host
        .extend(&spec.id, Bytes(18 * GIB))
        .expect("extend online");
    assert!(matches!(grown.filesystem, FsGrowth::Grown(action) if action.changed()));
    let size = fs_size(&stack.mnt());
    assert!(size > 17900 * MIB, "df size {size} after online grow");
    assert!(
        fs::read(&kept).unwrap() == written,
        "the file written before both growths"
    );
    umount(&stack.mnt()).unwrap();
    Program::find("e2fsck")
        .unwrap()
        .run(["-fn", mapping.to_str().unwrap()])
        .expect("e2fsck -fn: the grown filesystem checks clean");

    // Held open by something this host cannot see as a jail node (a VM
    // given the device path, a mount in another namespace): the filesystem
    // is neither checked nor resized, and the outcome says so.
    let blocks = || match probe(&mapping).unwrap() {
        Signature::Ext(sb) => sb.blocks,
        other => panic!("expected ext4, found {other}"),
    };
    let before = blocks();
    for (holder, flags) in [("an exclusive holder", libc::O_EXCL), ("a plain reader", 0)] {
        let held = OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(&mapping)
            .unwrap();
        let outcome = host
            .extend(&spec.id, Bytes(18 * GIB + 512 * MIB))
            .unwrap_or_else(|e| panic!("extend with {holder}: {e}"));
        match outcome.filesystem {
            FsGrowth::InUse(holders) => {
                assert!(holders.extra_opens >= 1, "{holder}: {holders}");
                assert_eq!(
                    holders.exclusive,
                    flags == libc::O_EXCL,
                    "{holder}: {holders}"
                );
            }
            other => panic!("{holder}: {other:?}"),
        }
        assert_eq!(blocks(), before, "{holder}: the filesystem was resized");
        drop(held);
    }
    // Released: the next extend finishes the job.
    let grown = host.extend(&spec.id, Bytes(18 * GIB + 512 * MIB)).unwrap();
    assert!(matches!(grown.filesystem, FsGrowth::Grown(action) if action.changed()));
    assert!(blocks() > before);

    // Exposed to a VM: the guest grows it.
    let _ = host.expose(&spec.id, &stack.jail(), OWNER).unwrap();
    let left = host.extend(&spec.id, Bytes(19 * GIB)).unwrap();
    assert_eq!(left.filesystem, FsGrowth::LeftToGuest);
    let _ = host.delete(&spec.id).unwrap();
    assert_gone(&stack, &host, &spec.id);
}

#[test]
fn real_test_crash_after_each_create_step_converges_without_reformatting() {
    let stack = Stack::new("dp-crash");
    for step in Step::CREATE_ENCRYPTED {
        let plan = Arc::new(FaultPlan::new());
        plan.at(step, Fault::Crash);
        let host = stack.host().with_faults(plan.clone());
        let spec = new_volume(Bytes(GIB), Encryption::Luks2);
        let err = host.create(&spec).unwrap_err();
        assert!(
            matches!(err, HostError::InjectedCrash { .. }),
            "{step}: {err}"
        );
        // A restart: a fresh host finishes the job.
        let host = stack.host();
        let status = host.create(&spec).expect("re-run").into_inner();
        let mapping = status.device.expect("open");
        match probe(&mapping).unwrap() {
            Signature::Ext(sb) => {
                assert_eq!(sb.uuid, volume_uuid(UuidPurpose::Filesystem, &spec.id))
            }
            other => panic!("{step}: expected ext4, found {other}"),
        }
        // Data written now survives another re-run: nothing is reformatted.
        mount_ext4(&mapping, &stack.mnt());
        fs::write(stack.mnt().join("marker"), step.to_string()).unwrap();
        umount(&stack.mnt()).unwrap();
        assert!(!host.create(&spec).unwrap().changed());
        mount_ext4(&mapping, &stack.mnt());
        assert_eq!(
            fs::read_to_string(stack.mnt().join("marker")).unwrap(),
            step.to_string()
        );
        umount(&stack.mnt()).unwrap();
        let _ = host.delete(&spec.id).unwrap();
        assert_gone(&stack, &host, &spec.id);
    }
}

#[test]
fn real_test_a_failed_step_rolls_back_the_real_stack() {
    let stack = Stack::new("dp-rollback");
    for step in [Step::CryptFormatted, Step::CryptOpened, Step::FsMade] {
        let plan = Arc::new(FaultPlan::new());
        plan.at(step, Fault::Fail);
        let host = stack.host().with_faults(plan);
        let spec = new_volume(Bytes(GIB), Encryption::Luks2);
        let err = host.create(&spec).unwrap_err();
        assert!(
            matches!(err, HostError::InjectedFailure { .. }),
            "{step}: {err}"
        );
        assert_gone(&stack, &host, &spec.id);
    }
    // A failed rollback says so and a re-run still converges.
    let plan = Arc::new(FaultPlan::new());
    plan.at(Step::FsMade, Fault::Fail)
        .at(Step::CryptClosed, Fault::Fail);
    let host = stack.host().with_faults(plan);
    let spec = new_volume(Bytes(GIB), Encryption::Luks2);
    let err = host.create(&spec).unwrap_err();
    assert!(matches!(err, HostError::RollbackFailed { .. }), "{err}");
    let host = stack.host();
    assert!(host.create(&spec).unwrap().changed());
    let _ = host.delete(&spec.id).unwrap();
    assert_gone(&stack, &host, &spec.id);
}

#[test]
fn real_test_plain_volume_and_foreign_jail_nodes() {
    let stack = Stack::new("dp-plain");
    let host = stack.host();
    let spec = new_volume(Bytes(GIB), Encryption::None);
    let status = host.create(&spec).expect("create").into_inner();
    let device = status.device.unwrap();
    assert!(device.starts_with("/dev"));
    assert_eq!(crypt::status(&spec.id).unwrap(), None);
    // A node someone else put at the jail path is refused and kept.
    let jail = stack.jail();
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(jail.full())
        .unwrap();
    let err = host.expose(&spec.id, &jail, OWNER).unwrap_err();
    assert!(matches!(err, HostError::Expose { .. }), "{err}");
    assert!(jail.full().exists());
    fs::remove_file(jail.full()).unwrap();
    let _ = host.expose(&spec.id, &jail, OWNER).unwrap();
    assert_eq!(
        fs::symlink_metadata(jail.full()).unwrap().rdev(),
        fs::metadata(&device).unwrap().rdev()
    );
    let _ = host.delete(&spec.id).unwrap();
    assert_gone(&stack, &host, &spec.id);
}

/// Reproduced: a hard link the jail owner made to its node outlived the
/// unexpose with uid 1000 and mode 0600, and device-mapper reuses minors,
/// so the link later opened another volume's data.
#[test]
fn real_test_a_kept_hard_link_never_opens_the_next_volume_on_the_minor() {
    let stack = Stack::new("dp-links");
    // The jail owner (uid 1000) must be able to reach the jail directory.
    for dir in [stack.scratch.path(), &stack.scratch.path().join("jail")] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dev = stack.scratch.path().join("jail/dev");
    fs::set_permissions(&dev, fs::Permissions::from_mode(0o777)).unwrap();
    let jailed = NodeOwner {
        uid: 1000,
        gid: 1000,
    };
    let host = stack.host();
    let first = new_volume(Bytes(GIB), Encryption::Luks2);
    let _ = host.create(&first).expect("create A");
    let jail = stack.jail();
    let node = host.expose(&first.id, &jail, jailed).unwrap().into_inner();
    let link = dev.join("kept");
    fs::hard_link(jail.full(), &link).unwrap();
    let read_as_jail_owner = |path: &Path| {
        std::process::Command::new("/bin/dd")
            .arg(format!("if={}", path.display()))
            .args(["of=/dev/null", "bs=4096", "count=1"])
            .uid(1000)
            .gid(1000)
            .output()
            .unwrap()
    };
    assert!(
        read_as_jail_owner(&link).status.success(),
        "the jail owner reads its own exposed volume"
    );
    assert!(host.unexpose(&first.id, &jail).unwrap().changed());
    assert!(host.close(&first.id).unwrap().changed());
    // B takes the freed minor (device-mapper hands out the lowest free one).
    let second = new_volume(Bytes(GIB), Encryption::None);
    let device = host
        .create(&second)
        .expect("create B")
        .into_inner()
        .device
        .unwrap();
    assert_eq!(
        fs::metadata(&device).unwrap().rdev(),
        node.rdev.0,
        "B did not reuse A's minor; the scenario needs it"
    );
    let meta = fs::symlink_metadata(&link).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (0, 0, 0),
        "the kept link still grants access"
    );
    let output = read_as_jail_owner(&link);
    assert!(
        !output.status.success(),
        "the kept link read B's data: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = host.delete(&second.id).unwrap();
    let _ = host.delete(&first.id).unwrap();
}

/// Bytes of pool data backing `id`'s thin LV, from the LV's data%.
fn allocated(host: &VolumeHost, id: &VolumeId) -> u64 {
    let volume = host
        .list()
        .unwrap()
        .into_iter()
        .find(|v| v.id == *id)
        .expect("volume listed");
    volume.size.0 / 10_000 * u64::from(volume.data_percent.hundredths())
}

/// Runs `program` and returns its standard output.
fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Space a guest frees comes back to the pool: `rm` plus `fstrim` inside a
/// volume lowers its thin LV's data%, through dm-crypt and without it, also
/// after a grow.
#[test]
fn real_test_fstrim_returns_freed_blocks_to_the_pool() {
    const WRITTEN: u64 = 64 * MIB;
    let stack = Stack::new("dp-discard");
    let host = stack.host();
    for encryption in [Encryption::Luks2, Encryption::None] {
        let spec = new_volume(Bytes(GIB), encryption);
        let device = host.create(&spec).expect("create").into_inner().device;
        let device = device.expect("an open volume has a device");
        // A grow reloads the dm-crypt table, which must keep the discard flag.
        let grown = host
            .extend(&spec.id, Bytes(GIB + 64 * MIB))
            .expect("extend");
        assert!(matches!(grown.filesystem, FsGrowth::Grown(action) if action.changed()));
        // `noinit_itable`: ext4's background inode-table zeroing would
        // allocate pool blocks between the two readings.
        mount(
            Some(&device),
            &stack.mnt(),
            Some("ext4"),
            MsFlags::empty(),
            Some("noinit_itable"),
        )
        .unwrap();
        let file = stack.mnt().join("filler.bin");
        let _ = run(
            "/bin/dd",
            &[
                "if=/dev/urandom",
                &format!("of={}", file.display()),
                "bs=1M",
                &format!("count={}", WRITTEN / MIB),
                "conv=fsync",
            ],
        );
        let written = allocated(&host, &spec.id);
        fs::remove_file(&file).unwrap();
        // The freed blocks are free to trim only once the journal has
        // committed the unlink.
        nix::unistd::sync();
        let trim = run(
            "/usr/sbin/fstrim",
            &["-v", &stack.mnt().display().to_string()],
        );
        let trimmed = allocated(&host, &spec.id);
        eprintln!(
            "{encryption:?}: {} MiB allocated after writing, {} MiB after rm + fstrim ({})",
            written / MIB,
            trimmed / MIB,
            trim.trim()
        );
        assert!(
            written >= WRITTEN,
            "{encryption:?}: {written} after the write"
        );
        assert!(
            written.saturating_sub(trimmed) >= WRITTEN * 7 / 8,
            "{encryption:?}: {written} bytes allocated before, {trimmed} after fstrim"
        );
        umount(&stack.mnt()).unwrap();
        let _ = host.delete(&spec.id).unwrap();
        assert_gone(&stack, &host, &spec.id);
    }
}

//! Times a snapshot of a 25 GiB volume with 1 GiB written against one with
//! 10 MiB written, side by side, on a real kernel (run it in the micro-VM:
//! `target/debug/microvm -- target/debug/bench_snapshot [RUNS]`).
//!
//! A thin snapshot is one message to the pool's metadata: its cost should
//! not grow with the data written. Each run takes one `VolumeHost::snapshot`
//! of each volume (timed: admission report, `lvcreate --snapshot`), then
//! removes it (not timed). Prints the median of each, every run, and the
//! ratio.

use nix::mount::umount;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume_core::backend::lvm::LvmBackend;
use volume_core::backend::ThinBackend;
use volume_core::capacity::CapacityPolicy;
use volume_core::host::{Encryption, NewVolume, NoFreeze, RealDevices, VolumeHost};
use volume_core::keys::LocalKeyDir;
use volume_core::names::{SnapshotId, VolumeId, VolumeName};
use volume_core::units::{Bytes, OvercommitRatio, GIB, MIB};
use volume_tests::bench::{median, seconds_each};
use volume_tests::stack::mount_ext4;
use volume_tests::TestPool;

const SIZE_GIB: u64 = 25;

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("RUNS must be a number"))
        .unwrap_or(5);
    let pool = TestPool::new("bench-snap", Bytes(4 * GIB), Bytes(3 * GIB));
    let _ = pool.backend.ensure_pool().expect("ensure pool");
    let scratch = tempfile::tempdir().expect("scratch dir");
    let backend = LvmBackend::start(pool.spec().clone()).expect("LVM backend");
    // Two 25 GiB volumes and a snapshot of each in a 3 GiB pool: over-commit
    // is not what this measures.
    let policy = CapacityPolicy {
        overcommit: OvercommitRatio::whole(50).expect("valid ratio"),
        ..CapacityPolicy::default()
    };
    let host = VolumeHost::new(
        Arc::new(backend),
        Arc::new(RealDevices::locate().expect("e2fsprogs in the guest")),
        Arc::new(LocalKeyDir::open(scratch.path().join("keys")).expect("key dir")),
        policy,
    );
    let mnt = scratch.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let small = filled_volume(&host, &mnt, 10 * MIB);
    let large = filled_volume(&host, &mnt, GIB);

    let (mut small_times, mut large_times) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        large_times.push(time_snapshot(&host, &large));
        small_times.push(time_snapshot(&host, &small));
    }
    for id in [&small, &large] {
        let _ = host.delete(id).expect("delete");
    }
    println!("snapshot of a {SIZE_GIB} GiB volume, {runs} run(s) each, same pool:");
    println!(
        "  10 MiB written   median {:>6.3} s   runs {}",
        median(&small_times).as_secs_f64(),
        seconds_each(&small_times, 3)
    );
    println!(
        "  1 GiB written    median {:>6.3} s   runs {}",
        median(&large_times).as_secs_f64(),
        seconds_each(&large_times, 3)
    );
    println!(
        "  ratio (1 GiB / 10 MiB): {:.2}",
        median(&large_times).as_secs_f64() / median(&small_times).as_secs_f64()
    );
}

/// A plain 25 GiB ext4 volume with `written` bytes of a file on it, synced.
fn filled_volume(host: &VolumeHost, mnt: &Path, written: u64) -> VolumeId {
    let spec = NewVolume {
        id: VolumeId::generate(),
        name: VolumeName::new("bench").unwrap(),
        size: Bytes(SIZE_GIB * GIB),
        encryption: Encryption::None,
    };
    let device = host
        .create(&spec)
        .expect("create")
        .into_inner()
        .device
        .expect("open");
    mount_ext4(&device, mnt);
    let mut file = std::fs::File::create(mnt.join("fill")).unwrap();
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    for _ in 0..written / MIB {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    umount(mnt).expect("umount");
    let listed = host.list().unwrap();
    let volume = listed.iter().find(|v| v.id == spec.id).unwrap();
    println!(
        "volume {} with {} MiB written: {} of {SIZE_GIB} GiB mapped",
        spec.id,
        written / MIB,
        volume.data_percent
    );
    spec.id
}

fn time_snapshot(host: &VolumeHost, id: &VolumeId) -> Duration {
    let snapshot = SnapshotId::generate();
    let start = Instant::now();
    let taken = host
        .snapshot(id, &snapshot, &mut NoFreeze)
        .expect("snapshot");
    let elapsed = start.elapsed();
    assert!(taken.changed());
    let _ = host.destroy_snapshot(&snapshot).expect("destroy snapshot");
    elapsed
}

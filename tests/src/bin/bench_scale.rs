//! Per-operation cost against the number of volumes on the host, on a real
//! kernel (run it in the micro-VM: `target/debug/microvm --
//! target/debug/bench_scale [--volumes N] [--batch B]`).
//!
//! Times `VolumeHost::create`, `expose`, `extend` and `delete` of one batch
//! of B unencrypted 1 GiB volumes on an empty pool, then fills the pool to N
//! volumes and times the same four operations on a second batch there.
//! Then it removes the fill volumes and times a third batch on the emptied
//! pool, so a drift in the guest's speed between the batches (the build
//! machine is shared) shows as a difference between the two figures at 0.
//! Prints the per-volume median of each operation in each batch, and the
//! change from the mean of the two figures at 0. The fill volumes are made with the backend alone
//! (thin LV with the tags of a ready volume, no filesystem): to LVM and to
//! every report they are volumes like any other, and they cost a fraction of
//! a full create to make.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use volume_core::backend::lvm::LvmBackend;
use volume_core::backend::ThinBackend;
use volume_core::host::{progress, Encryption, NewVolume, Progress, RealDevices, VolumeHost};
use volume_core::jail::{JailPath, NodeOwner};
use volume_core::keys::LocalKeyDir;
use volume_core::names::{VolumeId, VolumeName};
use volume_core::units::{Bytes, GIB};
use volume_tests::bench::BatchArgs;
use volume_tests::TestPool;

const OPERATIONS: [&str; 4] = ["create", "expose", "extend", "delete"];

fn args() -> BatchArgs {
    BatchArgs::parse(200, 10)
}

fn main() {
    let args = args();
    if std::env::var_os("BENCH_TRACE").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter("volume_core=debug")
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_writer(std::io::stderr)
            .init();
    }
    let pool = TestPool::new("scale", Bytes(12 * GIB), Bytes(10 * GIB));
    let _ = pool.backend.ensure_pool().expect("ensure pool");
    let scratch = tempfile::tempdir().expect("scratch dir");
    let backend = Arc::new(LvmBackend::start(pool.spec().clone()).expect("LVM backend"));
    let host = VolumeHost::new(
        backend.clone(),
        Arc::new(RealDevices::locate().expect("tools")),
        Arc::new(LocalKeyDir::open(scratch.path().join("keys")).expect("key dir")),
        volume_core::capacity::CapacityPolicy {
            overcommit: volume_core::units::OvercommitRatio::whole(1000).expect("ratio"),
            ..Default::default()
        },
    );
    std::fs::create_dir(scratch.path().join("jails")).expect("jails dir");

    let first = time_batch(&host, scratch.path(), args.batch);
    let started = Instant::now();
    fill(backend.as_ref(), args.volumes);
    eprintln!(
        "filled the pool to {} volumes in {:.1} s",
        args.volumes,
        started.elapsed().as_secs_f64()
    );
    let last = time_batch(&host, scratch.path(), args.batch);
    let started = Instant::now();
    empty(backend.as_ref());
    eprintln!(
        "removed the fill volumes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let again = time_batch(&host, scratch.path(), args.batch);

    println!(
        "per-volume cost, batches of {} unencrypted 1 GiB volumes, same pool, same guest:",
        args.batch
    );
    println!(
        "  {:<8} {:>12} {:>15} {:>14} {:>8}",
        "op",
        "at 0 volumes",
        format!("at {} volumes", args.volumes),
        "at 0 again",
        "change"
    );
    for (op, ((first, last), again)) in OPERATIONS.iter().zip(first.iter().zip(&last).zip(&again)) {
        let (first, last, again) = (median(first), median(last), median(again));
        let empty = (first + again) / 2.0;
        println!(
            "  {op:<8} {:>10.3} s {:>13.3} s {:>12.3} s {:>+7.1} %",
            first,
            last,
            again,
            (last / empty - 1.0) * 100.0
        );
    }
}

/// Creates, exposes, extends and deletes `batch` volumes, one operation
/// over the whole batch at a time; returns the seconds of each, per
/// operation.
fn time_batch(host: &VolumeHost, scratch: &Path, batch: usize) -> [Vec<f64>; 4] {
    let specs: Vec<NewVolume> = (0..batch)
        .map(|_| NewVolume {
            id: VolumeId::generate(),
            name: VolumeName::new("bench").expect("name"),
            size: Bytes(GIB),
            encryption: Encryption::None,
        })
        .collect();
    let mut times: [Vec<f64>; 4] = Default::default();
    let owner = NodeOwner { uid: 0, gid: 0 };
    let jail = |id: &VolumeId| {
        let root = scratch.join("jails").join(id.as_str());
        std::fs::create_dir_all(&root).expect("jail dir");
        JailPath::new(root, "vdb").expect("jail path")
    };
    for spec in &specs {
        times[0].push(timed(|| {
            assert!(host.create(spec).expect("create").changed())
        }));
    }
    for spec in &specs {
        let jail = jail(&spec.id);
        times[1].push(timed(|| {
            let _ = host.expose(&spec.id, &jail, owner).expect("expose");
        }));
    }
    for spec in &specs {
        times[2].push(timed(|| {
            let _ = host.extend(&spec.id, Bytes(2 * GIB)).expect("extend");
        }));
    }
    for spec in &specs {
        times[3].push(timed(|| {
            assert!(host.delete(&spec.id).expect("delete").changed());
        }));
    }
    times
}

/// Thin LVs with the tags of ready, unencrypted volumes, until the pool
/// holds `count` of ours.
fn fill(backend: &dyn ThinBackend, count: usize) {
    let have = backend.list_thins().expect("list").len();
    let name = VolumeName::new("fill").expect("name");
    let tags = [
        progress::step_tag(Progress::Ready),
        progress::encryption_tag(Encryption::None),
        progress::name_tag(&name),
    ];
    for _ in have..count {
        let lv = VolumeId::generate().lv_name();
        let _ = backend
            .create_thin(&lv, Bytes(GIB), &tags)
            .expect("fill LV");
    }
}

/// Removes the fill volumes (every LV of ours `fill` made: named "fill").
fn empty(backend: &dyn ThinBackend) {
    let name = VolumeName::new("fill").expect("name");
    for volume in backend.list_thins().expect("list") {
        if progress::name(&volume.tags).as_ref() == Some(&name) {
            let _ = backend.remove_thin(&volume.lv).expect("remove fill LV");
        }
    }
}

fn timed(op: impl FnOnce()) -> f64 {
    let start = Instant::now();
    op();
    start.elapsed().as_secs_f64()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

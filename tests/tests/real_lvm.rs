//! Real-kernel device tests of the LVM backend: loop device, VG, a ~3 GiB
//! thin pool and an over-committed 25 GiB thin volume in it.
//!
//! Run inside the micro-VM by `scripts/test-all`; filter with
//! `cargo test -p volume-tests -- real_test_`.

use std::fs::OpenOptions;
use std::io::Write;
use volume_core::actions::{CreateAction, DeleteAction, ExtendAction};
use volume_core::backend::lvm::runner::{CommandLine, LvmRunner};
use volume_core::backend::lvm::{kernel, report};
use volume_core::backend::{BackendError, ThinBackend};
use volume_core::capacity::{CapacityPolicy, Refusal};
use volume_core::health::{PoolHealth, VolumeHealth};
use volume_core::names::{VolumeId, OWNER_TAG};
use volume_core::units::{Bytes, GIB, MIB};
use volume_tests::TestPool;

fn small_pool(test: &str) -> TestPool {
    TestPool::new(test, Bytes(4 * GIB), Bytes(3 * GIB))
}

/// Writes `len` bytes of a non-zero pattern at the start of `device` and
/// flushes them to the pool.
fn write_pattern(device: &std::path::Path, len: u64) {
    let mut file = OpenOptions::new()
        .write(true)
        .open(device)
        .unwrap_or_else(|e| panic!("open {}: {e}", device.display()));
    let chunk = vec![0xA5u8; MIB as usize];
    for _ in 0..(len / MIB) {
        file.write_all(&chunk).expect("write pattern");
    }
    file.sync_all().expect("fsync the thin device");
}

#[test]
fn real_test_ensure_pool_is_idempotent() {
    let pool = small_pool("ensure");
    let first = pool.backend.ensure_pool().expect("first ensure");
    assert!(matches!(first, CreateAction::Created(_)), "{first:?}");
    let status = first.into_inner();
    // The pool is ~3 GiB (LVM rounds to extents and may take a little for
    // metadata), not the whole 4 GiB file.
    assert!(
        status.usage.data_size >= Bytes(3 * GIB - 64 * MIB),
        "{status:?}"
    );
    assert!(
        status.usage.data_size <= Bytes(3 * GIB + 64 * MIB),
        "{status:?}"
    );
    assert!(status.usage.metadata_size > Bytes::ZERO);

    let second = pool.backend.ensure_pool().expect("second ensure");
    assert!(matches!(second, CreateAction::Identity(_)), "{second:?}");

    // A second backend over the same VG (a daemon restart) also sees identity.
    let again = volume_core::backend::lvm::LvmBackend::start(pool.spec().clone()).unwrap();
    assert!(!again.ensure_pool().unwrap().changed());
}

#[test]
fn real_test_overcommitted_thin_volume_lifecycle() {
    let pool = small_pool("lifecycle");
    let _ = pool.backend.ensure_pool().expect("ensure pool");
    let id = VolumeId::generate();
    let lv = id.lv_name();
    let size = Bytes(25 * GIB);

    // Create, then create again: identity, reported in the return type.
    let created = pool
        .backend
        .create_thin(&lv, size, &[])
        .expect("create 25 GiB");
    assert!(matches!(created, CreateAction::Created(_)), "{created:?}");
    let volume = created.into_inner();
    assert_eq!(volume.virtual_size, size);
    assert!(volume.tags.contains(OWNER_TAG));
    let device = volume.device.clone().expect("active thin LV has a device");
    assert!(device.exists(), "{} missing", device.display());
    assert!(!pool.backend.create_thin(&lv, size, &[]).unwrap().changed());

    // Same name, other size: a clear error, and nothing changes.
    let err = pool
        .backend
        .create_thin(&lv, Bytes(26 * GIB), &[])
        .unwrap_err();
    assert!(matches!(err, BackendError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains(lv.as_str()), "{err}");

    // Over-commit: 25 GiB promised by a ~3 GiB pool.
    let before = pool.backend.pool_status().expect("status");
    println!("after create: {}", before.usage);
    assert_eq!(before.usage.provisioned, size);
    assert!(before.usage.provisioned > before.usage.data_size);
    assert_eq!(before.usage.volume_count, 1);

    // Listed, with its usage.
    let listed = pool.backend.list_thins().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].lv, lv);

    // Write 256 MiB: the pool's data% and the volume's data% rise.
    write_pattern(&device, 256 * MIB);
    let after = pool.backend.pool_status().expect("status after write");
    println!("after writing 256 MiB: {}", after.usage);
    assert!(
        after.usage.data_used >= before.usage.data_used + Bytes(200 * MIB),
        "data used {} -> {}",
        before.usage.data_used,
        after.usage.data_used
    );
    assert!(after.usage.data_percent() > before.usage.data_percent());
    let listed = pool.backend.list_thins().unwrap();
    assert!(listed[0].data_percent.hundredths() > 0, "{:?}", listed[0]);

    // Extend, then extend again to the same size: identity.
    let grown = Bytes(30 * GIB);
    assert_eq!(
        pool.backend.extend_thin(&lv, grown).unwrap(),
        ExtendAction::Extended {
            from: size,
            to: grown
        }
    );
    assert!(!pool.backend.extend_thin(&lv, grown).unwrap().changed());
    assert!(matches!(
        pool.backend.extend_thin(&lv, size),
        Err(BackendError::Shrink { .. })
    ));
    assert_eq!(pool.backend.pool_status().unwrap().usage.provisioned, grown);

    // Remove, then remove again: identity.
    assert_eq!(
        pool.backend.remove_thin(&lv).unwrap(),
        DeleteAction::Deleted
    );
    assert_eq!(
        pool.backend.remove_thin(&lv).unwrap(),
        DeleteAction::Identity
    );
    assert!(pool.backend.list_thins().unwrap().is_empty());
    assert_eq!(
        pool.backend.pool_status().unwrap().usage.provisioned,
        Bytes::ZERO
    );
}

#[test]
fn real_test_create_remove_repeats_converge() {
    let pool = small_pool("repeat");
    let _ = pool.backend.ensure_pool().unwrap();
    let lv = VolumeId::generate().lv_name();
    for round in 0..3 {
        assert!(
            pool.backend
                .create_thin(&lv, Bytes(25 * GIB), &[])
                .unwrap()
                .changed(),
            "round {round}"
        );
        assert!(!pool
            .backend
            .create_thin(&lv, Bytes(25 * GIB), &[])
            .unwrap()
            .changed());
        assert!(pool.backend.remove_thin(&lv).unwrap().changed());
        assert!(!pool.backend.remove_thin(&lv).unwrap().changed());
    }
    assert_eq!(pool.backend.pool_status().unwrap().usage.volume_count, 0);
}

#[test]
fn real_test_foreign_lvs_are_never_touched() {
    let pool = small_pool("foreign");
    let _ = pool.backend.ensure_pool().unwrap();
    let runner = LvmRunner::start().unwrap();
    // A thin LV with our name prefix but without our tag, as another tool
    // might make it.
    let impostor = VolumeId::generate().lv_name();
    let line = CommandLine::command("lvcreate")
        .args(["--thin", "-V", "1g", "-n", impostor.as_str()])
        .arg(format!("{}/pool", pool.vg))
        .build()
        .unwrap();
    runner.run(&line).expect("foreign lvcreate");

    assert!(
        pool.backend.list_thins().unwrap().is_empty(),
        "foreign LV listed as ours"
    );
    let err = pool.backend.remove_thin(&impostor).unwrap_err();
    assert!(matches!(err, BackendError::NotOurs { .. }), "{err}");
    let err = pool
        .backend
        .create_thin(&impostor, Bytes(GIB), &[])
        .unwrap_err();
    assert!(matches!(err, BackendError::NotOurs { .. }), "{err}");
    // Its virtual size still counts against the pool.
    assert_eq!(
        pool.backend.pool_status().unwrap().usage.provisioned,
        Bytes(GIB)
    );
}

#[test]
fn real_test_status_parser_on_real_lvs_output() {
    let pool = small_pool("parser");
    let _ = pool.backend.ensure_pool().unwrap();
    let lv = VolumeId::generate().lv_name();
    let _ = pool
        .backend
        .create_thin(&lv, Bytes(25 * GIB), &["vmv1.test=parser".into()])
        .unwrap();

    let runner = LvmRunner::start().unwrap();
    let line = CommandLine::command("lvs")
        .args([
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            report::LV_FIELDS,
        ])
        .arg(pool.vg.as_str())
        .build()
        .unwrap();
    let output = runner.run(&line).expect("lvs");
    println!("real lvs JSON:\n{}", output.report);
    let rows = report::parse_lv_report(&output.report).expect("parse real lvs output");
    let thin = rows
        .iter()
        .find(|r| r.name == lv.as_str())
        .expect("our LV in the report");
    assert_eq!(thin.kind, report::LvKind::Thin);
    assert_eq!(thin.size, Bytes(25 * GIB));
    assert_eq!(thin.pool.as_deref(), Some("pool"));
    assert!(thin.tags.contains("vmv1.test=parser") && thin.tags.contains(OWNER_TAG));
    assert!(thin.active);
    let pool_row = rows
        .iter()
        .find(|r| r.name == "pool")
        .expect("pool in the report");
    assert_eq!(pool_row.kind, report::LvKind::ThinPool);
    assert!(pool_row.data_percent.is_some() && pool_row.metadata_percent.is_some());
}

/// A 128 MiB pool in a VG with room, a 1 GiB ext4 volume in it, and a
/// writer putting 192 MiB (1.5× the pool) into the mounted filesystem: the
/// auto-extender, woken by the pool's low-water event, grows the pool
/// ahead of the writer. No write fails, the pool grew, the filesystem
/// checks clean. Prints how long each growth took from the wake-up.
#[test]
fn real_test_pool_auto_extends_ahead_of_a_writer() {
    use fixtures::cmd::Program;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use volume_core::backend::lvm::LvmBackend;
    use volume_core::pool_growth::{PoolGrowth, PoolGrowthPolicy, PoolPart};
    use volume_core::pool_watch::{AutoExtender, DmEvents, PoolEvents, Wake};
    use volume_core::units::Percent;

    let pool = TestPool::new("autoext", Bytes(GIB), Bytes(128 * MIB));
    let policy = PoolGrowthPolicy::default();
    pool.backend.set_low_water(policy.data.threshold);
    let status = pool.backend.ensure_pool().expect("ensure").into_inner();
    assert_eq!(status.usage.data_size, Bytes(128 * MIB));
    let lv = VolumeId::generate().lv_name();
    let device = pool
        .backend
        .create_thin(&lv, Bytes(GIB), &[])
        .expect("create")
        .into_inner()
        .device
        .expect("active");

    // The pool table carries the low-water mark: 30 % of the data blocks.
    let dmsetup = Program::find("dmsetup").unwrap();
    let dm_pool = format!("{}-pool-tpool", pool.vg.as_str().replace('-', "--"));
    let table = dmsetup.run(["table", dm_pool.as_str()]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let words: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(words.get(2), Some(&"thin-pool"), "{table}");
    // <start> <len> thin-pool <meta> <data> <block size> <low water mark> ...
    let block_sectors: u64 = words[5].parse().unwrap();
    let low_water: u64 = words[6].parse().unwrap();
    let blocks = 128 * MIB / 512 / block_sectors;
    assert_eq!(low_water, blocks * 30 / 100, "{table}");

    Program::find("mkfs.ext4")
        .unwrap()
        .run(["-q", device.to_str().unwrap()])
        .expect("mkfs.ext4");
    let mnt = tempfile::tempdir().unwrap();
    let mount = Program::find("mount").unwrap();
    mount
        .run([device.as_os_str(), mnt.path().as_os_str()])
        .expect("mount");

    // The watcher, as volumed runs it, recording each growth's timing.
    let watcher_backend = Arc::new(LvmBackend::start(pool.spec().clone()).unwrap());
    watcher_backend.set_low_water(policy.data.threshold);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut extender = AutoExtender::new(watcher_backend, policy);
            let mut events = DmEvents::open().expect("device-mapper events");
            let mut seen = Vec::new();
            let mut wake = Wake::Timeout;
            while !stop.load(Ordering::Relaxed) {
                for timed in extender.check().expect("auto-extend check") {
                    seen.push((wake, timed));
                }
                // A fallback tick longer than the test: every growth here
                // is woken by a device-mapper event.
                wake = events.wait(Duration::from_secs(120)).expect("wait");
            }
            seen
        })
    };

    let started = Instant::now();
    let target = mnt.path().join("fill");
    let dd = Program::find("dd").unwrap().run([
        "if=/dev/zero".to_owned(),
        format!("of={}", target.display()),
        "bs=1M".to_owned(),
        "count=192".to_owned(),
        "conv=fsync".to_owned(),
    ]);
    let wrote_in = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    // A new device is a device-mapper event too: it wakes the watcher.
    // LVM refuses a thin LV while the pool is above the autoextend
    // threshold, which the last fsync can leave it at until the watcher's
    // growth lands: retry for a while.
    let second = VolumeId::generate().lv_name();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match pool.backend.create_thin(&second, Bytes(GIB), &[]) {
            Ok(_) => break,
            Err(error)
                if Instant::now() < deadline && error.to_string().contains("reached threshold") =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => panic!("create a second volume: {error}"),
        }
    }
    let seen = watcher.join().expect("watcher thread");
    let after = pool.backend.pool_status().unwrap();
    eprintln!(
        "wrote 192 MiB in {wrote_in:?}; pool now {} data ({}), VG free {}",
        after.usage.data_size,
        after.usage.data_percent(),
        after.vg_free
    );
    for (wake, timed) in &seen {
        eprintln!(
            "  {:?} after a {wake:?} wake: {:?}",
            timed.growth, timed.elapsed
        );
    }
    dd.expect("dd of 192 MiB into a 128 MiB pool: no write error");
    assert!(after.usage.data_size > Bytes(192 * MIB), "{after:?}");
    assert!(after.usage.data_percent() < Percent::FULL, "{after:?}");
    assert!(
        seen.iter()
            .all(|(_, t)| matches!(t.growth, PoolGrowth::Grown { .. })),
        "{seen:?}"
    );
    assert!(
        !seen.is_empty() && seen.iter().all(|(wake, _)| *wake == Wake::Event),
        "every growth was woken by a device-mapper event: {seen:?}"
    );

    Program::find("umount")
        .unwrap()
        .run([mnt.path()])
        .expect("umount");
    Program::find("e2fsck")
        .unwrap()
        .run(["-fn", device.to_str().unwrap()])
        .expect("e2fsck -fn: the filesystem checks clean");

    // Metadata grows online too, and the table keeps its low-water mark.
    let metadata_before = after.usage.metadata_size;
    let grown = pool
        .backend
        .grow_pool(PoolPart::Metadata, Bytes(4 * MIB))
        .expect("grow metadata");
    assert_eq!(
        grown,
        PoolGrowth::Grown {
            part: PoolPart::Metadata,
            from: metadata_before,
            to: metadata_before + Bytes(4 * MIB)
        }
    );
    let status = pool.backend.pool_status().unwrap();
    assert_eq!(status.usage.metadata_size, metadata_before + Bytes(4 * MIB));
    let table = dmsetup.run(["table", dm_pool.as_str()]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let low_water: u64 = table.split_whitespace().nth(6).unwrap().parse().unwrap();
    assert!(low_water > 0, "{table}");

    // More than the VG has: all of it, then VG full, and the pool errors
    // when full instead of queueing I/O that nothing will free.
    let when_full = || {
        let line = CommandLine::command("lvs")
            .args(["--noheadings", "-o", "lv_when_full"])
            .arg(format!("{}/pool", pool.vg))
            .build()
            .unwrap();
        LvmRunner::start().unwrap().run(&line).unwrap().report
    };
    assert!(when_full().contains("queue"), "{}", when_full());
    let free = status.vg_free;
    match pool
        .backend
        .grow_pool(PoolPart::Data, Bytes(100 * GIB))
        .unwrap()
    {
        PoolGrowth::Grown { from, to, .. } => assert_eq!(to, from + free),
        other => panic!("expected the VG's {free} free, got {other:?}"),
    }
    assert_eq!(
        pool.backend
            .grow_pool(PoolPart::Data, Bytes(4 * MIB))
            .unwrap(),
        PoolGrowth::VgFull {
            part: PoolPart::Data,
            size: status.usage.data_size + free
        }
    );
    assert!(when_full().contains("error"), "{}", when_full());
}

/// A tiny pool that errors when full (so writes fail at once instead of
/// queueing for 60 s), filled by a thin LV four times its size: the backend
/// reads `out_of_data` from LVM and from the pool target, promises no more
/// space, and reads healthy again once the pool has grown.
#[test]
fn real_test_a_full_pool_reports_out_of_data_and_no_headroom() {
    let pool = TestPool::new("full", Bytes(512 * MIB), Bytes(64 * MIB));
    let _ = pool.backend.ensure_pool().unwrap();
    let runner = LvmRunner::start().unwrap();
    let pool_lv = format!("{}/pool", pool.vg);
    let run = |args: &[&str]| {
        let line = CommandLine::command(args[0])
            .args(args[1..].iter().copied())
            .build()
            .unwrap();
        runner
            .run(&line)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    };
    // The guest's lvm.conf may already make new pools error when full.
    let line = CommandLine::command("lvchange")
        .args(["--errorwhenfull", "y", pool_lv.as_str()])
        .build()
        .unwrap();
    if let Err(err) = runner.run(&line) {
        assert!(err.to_string().contains("already set"), "{err}");
    }
    let lv = VolumeId::generate().lv_name();
    let volume = pool
        .backend
        .create_thin(&lv, Bytes(256 * MIB), &[])
        .unwrap()
        .into_inner();
    let policy = CapacityPolicy::default();
    let before = pool.backend.pool_status().unwrap();
    assert_eq!(before.usage.health, PoolHealth::Healthy);
    assert!(before.usage.headroom(&policy) > Bytes::ZERO);

    // Write past the pool's end; the kernel refuses what does not fit.
    let device = volume.device.expect("active thin LV");
    let mut file = OpenOptions::new().write(true).open(&device).unwrap();
    let chunk = vec![0x5Au8; MIB as usize];
    let written = (0..100)
        .take_while(|_| file.write_all(&chunk).is_ok())
        .count();
    let synced = file.sync_all();
    assert!(synced.is_err(), "{written} MiB into a 64 MiB pool synced");
    drop(file);

    let full = pool.backend.pool_status().unwrap();
    println!("full: {}", full.usage);
    assert_eq!(full.usage.health, PoolHealth::OutOfData);
    assert_eq!(full.usage.headroom(&policy), Bytes::ZERO);
    assert_eq!(
        full.usage.admit_new(&policy, Bytes(GIB)).unwrap_err(),
        Refusal::PoolUnhealthy {
            health: PoolHealth::OutOfData
        }
    );
    // Both readings say so: the pool target's own status line too.
    assert_eq!(
        kernel::pool_health(pool.vg.as_str(), "pool"),
        Ok(Some(PoolHealth::OutOfData))
    );
    // The thin LV itself has not failed.
    assert_eq!(
        pool.backend.list_thins().unwrap()[0].health,
        VolumeHealth::Healthy
    );

    // Grown online, the pool leaves out-of-data mode.
    run(&["lvextend", "--size", "+64m", &pool_lv]);
    let grown = pool.backend.pool_status().unwrap();
    assert_eq!(grown.usage.health, PoolHealth::Healthy, "{}", grown.usage);
    assert!(grown.usage.headroom(&policy) > Bytes::ZERO);
}

/// No command sends a D-Bus notice. LVM's default (`notify_dbus=1`) opens a
/// system-bus connection after a command that changed metadata, or, in
/// process, after the next command of any kind (the pending notice outlives
/// a change that had it off). A listener stands in for the bus (the guest
/// runs none) and counts the connections of a create and a remove.
#[test]
fn real_test_changes_send_lvm_no_dbus_notice() {
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let bus_dir = std::path::Path::new("/run/dbus");
    let bus = bus_dir.join("system_bus_socket");
    assert!(
        !bus.exists(),
        "{} exists: this test needs a host without a system bus (the micro-VM)",
        bus.display()
    );
    std::fs::create_dir_all(bus_dir).expect("make /run/dbus");
    let listener = UnixListener::bind(&bus).expect("listen where the system bus would be");
    listener.set_nonblocking(true).unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let counter = {
        let (connections, done) = (connections.clone(), done.clone());
        std::thread::spawn(move || {
            // A connection is closed at once, so a notice fails fast
            // instead of waiting for a reply.
            while !done.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) => {
                        connections.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        })
    };

    let pool = small_pool("nodbus");
    let _ = pool.backend.ensure_pool().unwrap();
    let lv = VolumeId::generate().lv_name();
    assert!(pool
        .backend
        .create_thin(&lv, Bytes(GIB), &[])
        .unwrap()
        .changed());
    assert!(pool.backend.remove_thin(&lv).unwrap().changed());

    done.store(true, Ordering::Relaxed);
    counter.join().unwrap();
    let _ = std::fs::remove_file(&bus);
    assert_eq!(
        connections.load(Ordering::Relaxed),
        0,
        "LVM connected to the system bus after a change"
    );
}

/// Changes keep LVM's metadata archive to its newest `retain_min` copies
/// (10, LVM's default) rather than every copy younger than 30 days. The
/// micro-VM's lvm.conf turns archiving off; this test turns it on for its
/// own run and puts the file back after.
#[test]
fn real_test_changes_keep_a_bounded_metadata_archive() {
    struct Restore<'a>(&'a std::path::Path, String);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            if let Err(error) = std::fs::write(self.0, &self.1) {
                eprintln!("cleanup: restore {}: {error}", self.0.display());
            }
        }
    }
    const RETAIN_MIN: usize = 10;
    let conf = std::path::Path::new("/etc/lvm/lvm.conf");
    let original = std::fs::read_to_string(conf).expect("read lvm.conf");
    let off = "    backup = 0\n    archive = 0\n";
    assert!(
        original.contains(off),
        "this test needs the micro-VM's lvm.conf, which turns archiving off; found:\n{original}"
    );
    let _restore = Restore(conf, original.clone());
    std::fs::write(
        conf,
        original.replace(off, "    backup = 1\n    archive = 1\n"),
    )
    .expect("turn LVM's archive on");

    let pool = small_pool("archive");
    let _ = pool.backend.ensure_pool().unwrap();
    let lv = VolumeId::generate().lv_name();
    for _ in 0..7 {
        assert!(pool
            .backend
            .create_thin(&lv, Bytes(GIB), &[])
            .unwrap()
            .changed());
        assert!(pool.backend.remove_thin(&lv).unwrap().changed());
    }
    // LVM names a copy `<vg>_<index>-<random>.vg`.
    let prefix = format!("{}_", pool.vg);
    let archived = std::fs::read_dir("/etc/lvm/archive")
        .expect("LVM's archive directory")
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(".vg")
        })
        .count();
    assert!(
        archived > 0,
        "LVM archived nothing: the test would prove nothing"
    );
    assert!(
        archived <= RETAIN_MIN,
        "{archived} archived copies of {} after 7 creates and removes, more than {RETAIN_MIN}",
        pool.vg
    );
}

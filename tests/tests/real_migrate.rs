//! Real-kernel test of moving a volume between hosts lazily: two hosts'
//! pools (two VGs on loop devices) in one guest, NBD over 127.0.0.1. The
//! destination is driven as volumed drives it, through `VolumeHost`
//! (hydrate, hydration_progress, complete_hydration, list, delete). Run
//! inside the micro-VM:
//! `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/target/debug/microvm
//!  cargo test -p volume-tests --test real_migrate -- --test-threads=1`.

use devicemapper::{DevId, DmFlags, DmName, DmOptions, DM};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume_core::backend::ThinBackend;
use volume_core::cmd::MigrationTools;
use volume_core::crypt::{self, CryptOptions};
use volume_core::host::{
    Encryption, HostError, Hydration, LocalVolume, NewVolume, Progress, RealDevices, VolumeHost,
};
use volume_core::hydration::{migration_tag, HydrationState, RecoveryRate};
use volume_core::keys::{KeyStore, LocalKeyDir, MigrationSecret};
use volume_core::migrate::{raid, Destination, ExportSpec, HydrateSpec, Source};
use volume_core::names::{MigrationId, VolumeId, VolumeName};
use volume_core::units::{Bytes, GIB, MIB};
use volume_tests::TestPool;

/// The bytes at `offset` of the pattern: a position-dependent sequence, so
/// a block read from the wrong place shows.
fn pattern_at(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let at = offset + i;
            (at / 4096 * 7 + at % 251) as u8
        })
        .collect()
}

fn read_at(device: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut file = fs::File::open(device).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut buffer = vec![0; len];
    file.read_exact(&mut buffer).unwrap();
    buffer
}

fn device_size(device: &Path) -> u64 {
    let mut file = fs::File::open(device).unwrap();
    file.seek(SeekFrom::End(0)).unwrap()
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn table_kind(name: &str) -> String {
    let dm = DM::new().unwrap();
    let (_, table) = dm
        .table_status(
            &DevId::Name(DmName::new(name).unwrap()),
            DmOptions::default().set_flags(DmFlags::DM_NOFLUSH | DmFlags::DM_STATUS_TABLE),
        )
        .unwrap();
    table.iter().map(|(_, _, kind, _)| kind.clone()).collect()
}

fn lv_names(backend: &dyn ThinBackend) -> Vec<String> {
    backend
        .list_thins()
        .unwrap()
        .into_iter()
        .map(|volume| volume.lv.to_string())
        .collect()
}

fn listed(host: &VolumeHost, id: &VolumeId) -> LocalVolume {
    host.list()
        .unwrap()
        .into_iter()
        .find(|volume| volume.id == *id)
        .expect("listed")
}

/// `kill -9` of the export's server, as in a crash of the source; returns
/// once it is gone.
fn kill_export(run_dir: &Path, migration: &MigrationId) {
    let pid_file = run_dir.join(migration.as_str()).join("export/qemu-nbd.pid");
    let pid = volume_core::migrate::nbd::running_pid(&pid_file).expect("export running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    while volume_core::migrate::nbd::running_pid(&pid_file).is_some() {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "export still alive"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn real_test_a_volume_hydrates_on_another_host_across_a_source_crash() {
    let tools = MigrationTools::locate().expect("qemu-nbd (qemu-utils) in the guest");
    let source_pool = TestPool::new("mig-src", Bytes(GIB), Bytes(768 * MIB));
    let destination_pool = TestPool::new("mig-dst", Bytes(GIB), Bytes(768 * MIB));
    for pool in [&source_pool, &destination_pool] {
        let _ = pool.backend.ensure_pool().expect("ensure pool");
    }
    let scratch = tempfile::tempdir().unwrap();
    let keys = Arc::new(LocalKeyDir::open(scratch.path().join("keys")).unwrap());
    let source_host = VolumeHost::new(
        Arc::new(volume_core::backend::lvm::LvmBackend::start(source_pool.spec().clone()).unwrap()),
        Arc::new(RealDevices::locate().expect("e2fsprogs in the guest")),
        keys.clone(),
        Default::default(),
    );

    // The source volume, with a pattern written all over it (plaintext,
    // through its dm-crypt mapping). 128 MiB, not the 200 of the issue:
    // under emulation the copy runs at about 3 MiB/s, and every MiB is
    // test time.
    let origin = NewVolume {
        id: VolumeId::generate(),
        name: VolumeName::new("data").unwrap(),
        size: Bytes(128 * MIB),
        encryption: Encryption::Luks2,
    };
    let created = source_host.create(&origin).expect("create").into_inner();
    let source_plain = created.device.expect("source open");
    let plain_size = device_size(&source_plain);
    {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .open(&source_plain)
            .unwrap();
        let chunk = 4 * MIB as usize;
        let mut offset = 0;
        while offset < plain_size {
            let len = chunk.min((plain_size - offset) as usize);
            file.write_all(&pattern_at(offset, len)).unwrap();
            offset += len as u64;
        }
        file.sync_all().unwrap();
    }

    let migration = MigrationId::generate();
    let secret = MigrationSecret::generate().unwrap();
    let run_dir = scratch.path().join("run");
    let export = ExportSpec {
        migration: migration.clone(),
        volume: origin.id.clone(),
        listen: free_port(),
        run_dir: run_dir.clone(),
    };
    let source = Source::new(&source_pool.backend, &tools);
    let exported = source.start(&export, &secret).expect("export");
    assert!(exported.changed());
    assert!(
        !source.start(&export, &secret).unwrap().changed(),
        "a running export is left alone"
    );

    // The destination host, as volumed runs it: usable as soon as
    // `hydrate` returns.
    let destination_keys = Arc::new(LocalKeyDir::open(scratch.path().join("keys-dst")).unwrap());
    let host = VolumeHost::new(
        Arc::new(
            volume_core::backend::lvm::LvmBackend::start(destination_pool.spec().clone()).unwrap(),
        ),
        Arc::new(RealDevices::locate().expect("e2fsprogs in the guest")),
        destination_keys.clone(),
        Default::default(),
    )
    .with_migrations(tools.clone(), run_dir.clone());
    let destination_id = VolumeId::generate();
    let request = Hydration {
        migration: migration.clone(),
        id: destination_id.clone(),
        name: origin.name.clone(),
        origin: origin.id.clone(),
        size: origin.size,
        source: export.listen,
        // 4 MiB/s: slow enough that the steps below happen mid-copy.
        rate: RecoveryRate::from_kib_per_sec(4 * 1024).unwrap(),
        run_dir: run_dir.clone(),
    };
    // What `set_rate` (not a host operation) is given.
    let hydrate = HydrateSpec {
        migration: migration.clone(),
        volume: destination_id.clone(),
        origin: origin.id.clone(),
        size: origin.size,
        source: export.listen,
        rate: request.rate,
        run_dir: run_dir.clone(),
        tags: Vec::new(),
    };
    let key = keys.load(&origin.id).unwrap().expect("source key");
    let destination = Destination::new(&destination_pool.backend, &tools, CryptOptions::default());

    // A hydration that fails leaves nothing on the destination, its key
    // included.
    let refused = Hydration {
        migration: MigrationId::generate(),
        id: VolumeId::generate(),
        ..request.clone()
    };
    let before_any = lv_names(&destination_pool.backend);
    let err = host
        .hydrate(&tools, &refused, &secret, &key)
        .expect_err("another migration's id is not the export's name: the server refuses it");
    assert!(matches!(err, HostError::HydrationStart { .. }), "{err}");
    assert_eq!(
        lv_names(&destination_pool.backend),
        before_any,
        "the failed hydrate rolled back what it made"
    );
    assert!(destination_keys.load(&refused.id).unwrap().is_none());

    // A hydration deleted mid-copy (a cancel: volumed deletes the
    // destination's volume) leaves nothing either. (The same migration
    // and id: its start adopts the header of the export snapshot as this
    // id's, which a new migration would take afresh.)
    let cancelled = host
        .hydrate(&tools, &request, &secret, &key)
        .expect("hydrate");
    assert!(cancelled.changed());
    let shown = listed(&host, &destination_id);
    assert_eq!(shown.progress, Some(Progress::Hydrating));
    assert_eq!(shown.device, Some(crypt::mapping_path(&destination_id)));
    assert_eq!(shown.name.as_ref(), Some(&origin.name));
    let tags = destination_pool
        .backend
        .thin(&destination_id.lv_name())
        .unwrap()
        .unwrap()
        .tags;
    assert!(tags.contains(&migration_tag(&migration)), "{tags:?}");
    assert!(tags.contains("vmv1.enc=luks2"), "{tags:?}");
    // Its source dies first (a cancel stops the export; so does a crash).
    // The copy's read of the network leg is then held by the client's
    // reconnect, and md's resync barrier holds any other I/O to that
    // region behind it: a delete that touched the mapping before it
    // disconnected the network leg waited for ever.
    kill_export(&run_dir, &migration);
    std::thread::sleep(Duration::from_secs(2));
    let stalled = host.hydration_progress(&tools, &request).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let still = host.hydration_progress(&tools, &request).unwrap();
    assert_eq!(
        stalled.copied, still.copied,
        "the copy waits for the source"
    );
    assert!(
        still.copied.0 < 64 * MIB,
        "in md's first barrier unit: {still}"
    );
    let deleted = std::thread::scope(|scope| {
        let deleting = scope.spawn(|| host.delete(&destination_id));
        let started = Instant::now();
        while !deleting.is_finished() && started.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let hung = !deleting.is_finished();
        if hung {
            // Unblock the held I/O so that the test ends and says why.
            let nbd = fs::read_to_string(
                run_dir
                    .join(migration.as_str())
                    .join("hydrate")
                    .join("nbd-device"),
            )
            .unwrap();
            let _ = std::process::Command::new("qemu-nbd")
                .args(["--disconnect", nbd.trim()])
                .status();
        }
        let result = deleting.join().unwrap();
        assert!(
            !hung,
            "a delete of a hydrating volume whose source is gone hung for 120 s ({result:?})"
        );
        result
    });
    assert!(deleted.expect("delete").changed(), "deleted");
    assert!(!host.delete(&destination_id).unwrap().changed());
    assert_eq!(lv_names(&destination_pool.backend), before_any);
    assert!(destination_keys.load(&destination_id).unwrap().is_none());
    assert!(!Path::new("/dev/mapper")
        .join(migration.layer_name().as_str())
        .exists());
    assert!(!run_dir.join(migration.as_str()).join("hydrate").exists());
    assert!(
        source.start(&export, &secret).expect("export").changed(),
        "the killed export is started again"
    );

    let requested = Instant::now();
    let hydrated = host
        .hydrate(&tools, &request, &secret, &key)
        .expect("hydration starts");
    let usable_after = requested.elapsed();
    assert!(hydrated.changed());
    let crypt_device = hydrated.into_inner().device.expect("usable");
    assert_eq!(crypt_device, crypt::mapping_path(&destination_id));
    assert!(
        !host
            .hydrate(&tools, &request, &secret, &key)
            .unwrap()
            .changed(),
        "idempotent"
    );
    assert_eq!(host.open(&destination_id).unwrap(), crypt_device);
    assert!(matches!(
        host.close(&destination_id),
        Err(HostError::HydrationUnfinished { .. })
    ));
    assert!(matches!(
        host.extend(&destination_id, Bytes(origin.size.0 * 2)),
        Err(HostError::HydrationUnfinished { .. })
    ));
    assert_eq!(device_size(&crypt_device), plain_size);
    let meta = read_at(
        &Path::new("/dev")
            .join(destination_pool.vg.as_str())
            .join(migration.meta_lv_name(1).as_str()),
        0,
        4096,
    );
    assert!(
        raid::has_superblock(&meta),
        "the local leg's superblock is written"
    );

    // Read the pattern's tail before hydration reaches it: the copy runs
    // from the start upwards, so these blocks come over the network leg.
    let tail = plain_size - 8 * MIB;
    let before = host.hydration_progress(&tools, &request).unwrap();
    assert_eq!(before.state, HydrationState::Copying, "{before}");
    assert_eq!(before.total, origin.size);
    assert!(
        before.copied.0 < tail,
        "the tail is not local yet: {before}"
    );
    assert!(
        read_at(&crypt_device, tail, 8 * MIB as usize) == pattern_at(tail, 8 * MIB as usize),
        "the tail reads right over NBD"
    );
    eprintln!("usable after {usable_after:?}; {before}");

    // The source crashes: its export dies. Nothing is copied meanwhile, and
    // a read of a block not yet local waits for the source instead of
    // failing or reading zeros.
    kill_export(&run_dir, &migration);
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let stalled = host.hydration_progress(&tools, &request).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let still = host.hydration_progress(&tools, &request).unwrap();
    assert_eq!(
        stalled.copied, still.copied,
        "no copy while the source is down"
    );
    assert!(!still.is_complete());
    assert!(!volume_core::migrate::nbd::source_reachable(
        export.listen,
        Duration::from_secs(1)
    ));
    let waiting_at = (still.copied.0 / (4 * MIB) + 2) * 4 * MIB;
    assert!(waiting_at + 4 * MIB < plain_size, "{still}");
    let crypt_path = crypt_device.clone();
    let reader = std::thread::spawn(move || read_at(&crypt_path, waiting_at, 4 * MIB as usize));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !reader.is_finished(),
        "a read of a block not yet local cannot finish while the source is down"
    );

    // The source comes back: the same snapshot is served again.
    let restarted = source.start(&export, &secret).expect("export restarts");
    assert!(restarted.changed(), "the server was started again");
    assert!(volume_core::migrate::nbd::source_reachable(
        export.listen,
        Duration::from_secs(5)
    ));
    let read = reader.join().unwrap();
    assert!(
        read == pattern_at(waiting_at, 4 * MIB as usize),
        "the waiting read got the right blocks"
    );
    eprintln!("outage {:?}; {still}", outage.elapsed());

    // The destination crashes (its layer and mapping go away) and comes
    // back: open says to hydrate again, which resumes from the layer's
    // superblock, not from zero.
    let before_crash = host.hydration_progress(&tools, &request).unwrap();
    let nbd_device = PathBuf::from(
        fs::read_to_string(
            run_dir
                .join(migration.as_str())
                .join("hydrate")
                .join("nbd-device"),
        )
        .expect("the nbd device is recorded")
        .trim(),
    );
    let _ = crypt::close(&destination_id).unwrap();
    let dm = DM::new().unwrap();
    dm.device_remove(
        &DevId::Name(DmName::new(migration.layer_name().as_str()).unwrap()),
        DmOptions::default(),
    )
    .unwrap();
    let err = host.open(&destination_id).unwrap_err();
    assert!(
        matches!(&err, HostError::Hydrating { migration: m, .. } if *m == migration),
        "{err}"
    );
    assert_eq!(listed(&host, &destination_id).device, None);
    let again = host.hydrate(&tools, &request, &secret, &key).unwrap();
    assert!(again.changed(), "the layer was rebuilt");
    let resumed = host.hydration_progress(&tools, &request).unwrap();
    assert!(
        resumed.copied >= before_crash.copied,
        "resumed at {resumed}, was at {before_crash}: copied again from the start"
    );
    eprintln!("destination restart: was {before_crash}, resumed {resumed}");

    // A higher limit, set while it copies, takes effect without a restart
    // of the copy.
    destination
        .set_rate(&hydrate, RecoveryRate::from_kib_per_sec(64 * 1024).unwrap())
        .expect("set the rate");
    let dm_table = {
        let (_, table) = dm
            .table_status(
                &DevId::Name(DmName::new(migration.layer_name().as_str()).unwrap()),
                DmOptions::default().set_flags(DmFlags::DM_NOFLUSH | DmFlags::DM_STATUS_TABLE),
            )
            .unwrap();
        table[0].3.clone()
    };
    let after_rate = host.hydration_progress(&tools, &request).unwrap();
    assert!(
        dm_table.contains("max_recovery_rate 65536") || after_rate.is_complete(),
        "{dm_table}"
    );
    assert!(!dm_table.contains("rebuild"), "{dm_table}");
    assert!(
        after_rate.copied >= resumed.copied,
        "{after_rate} after {resumed}"
    );

    // Hydration completes.
    let copying = Instant::now();
    let copied_at_start = after_rate.copied;
    loop {
        let progress = host.hydration_progress(&tools, &request).unwrap();
        assert_ne!(progress.state, HydrationState::Failed, "{progress}");
        if progress.is_complete() {
            break;
        }
        assert!(
            copying.elapsed() < Duration::from_secs(600),
            "hydration stuck at {progress}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let rate_mib_s =
        (origin.size.0 - copied_at_start.0) as f64 / MIB as f64 / copying.elapsed().as_secs_f64();
    let completion = host.complete_hydration(&tools, &request).expect("complete");
    let swap = completion.swap.expect("swapped by this call");
    assert_eq!(table_kind(migration.layer_name().as_str()), "linear");
    assert_eq!(
        host.complete_hydration(&tools, &request).unwrap().swap,
        None,
        "idempotent"
    );
    let shown = listed(&host, &destination_id);
    assert_eq!(shown.progress, Some(Progress::Ready));
    assert_eq!(shown.device.as_ref(), Some(&crypt_device));
    let tags = destination_pool
        .backend
        .thin(&destination_id.lv_name())
        .unwrap()
        .unwrap()
        .tags;
    assert!(!tags.contains(&migration_tag(&migration)), "{tags:?}");
    assert!(host
        .hydration_progress(&tools, &request)
        .unwrap()
        .is_complete());
    eprintln!("hydration {rate_mib_s:.1} MiB/s; table swap {swap:?}");

    // Every block matches, read through the direct table with the nbd
    // device gone; the layer's metadata LVs are gone.
    let nbd_name = nbd_device.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        !Path::new("/sys/block").join(&nbd_name).join("pid").exists(),
        "{nbd_name} is disconnected"
    );
    let chunk = 8 * MIB as usize;
    let mut offset = 0;
    while offset < plain_size {
        let len = chunk.min((plain_size - offset) as usize);
        assert!(
            read_at(&crypt_device, offset, len) == read_at(&source_plain, offset, len),
            "destination differs from the source at {offset}"
        );
        offset += len as u64;
    }
    let names = lv_names(&destination_pool.backend);
    assert!(
        !names.iter().any(|name| name.contains("-meta")),
        "{names:?}"
    );

    // The source snapshot is released; the source volume stays (a fork).
    assert!(source.stop(&export).unwrap().changed());
    let names = lv_names(&source_pool.backend);
    assert!(
        !names.contains(&migration.export_lv_name().to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&origin.id.lv_name().to_string()),
        "{names:?}"
    );
    assert!(!run_dir.join(migration.as_str()).join("export").exists());
    assert!(!source.stop(&export).unwrap().changed(), "idempotent");

    // A ready volume now. Its mapping still sits on the direct layer until
    // it is next closed: open finds it, extend grows the layer with the LV
    // (the mapping grows; this volume holds a raw pattern, no filesystem,
    // so the filesystem step fails), close removes the layer, and the
    // next open is dm-crypt on the LV directly.
    assert_eq!(host.open(&destination_id).unwrap(), crypt_device);
    let grown = Bytes(origin.size.0 + 8 * MIB);
    let err = host.extend(&destination_id, grown).unwrap_err();
    assert!(matches!(err, HostError::FsGrow { .. }), "{err}");
    assert_eq!(device_size(&crypt_device), plain_size + 8 * MIB);
    assert!(host.close(&destination_id).unwrap().changed());
    assert!(!Path::new("/dev/mapper")
        .join(migration.layer_name().as_str())
        .exists());
    assert_eq!(host.open(&destination_id).unwrap(), crypt_device);
    let (_, backing) = crypt::status(&destination_id).unwrap().expect("open");
    assert_eq!(
        backing.canonicalize().unwrap(),
        Path::new("/dev")
            .join(destination_pool.vg.as_str())
            .join(destination_id.lv_name().as_str())
            .canonicalize()
            .unwrap()
    );
    assert!(read_at(&crypt_device, tail, 4 * MIB as usize) == pattern_at(tail, 4 * MIB as usize));
    assert!(host.delete(&destination_id).unwrap().changed());
    assert!(!lv_names(&destination_pool.backend).contains(&destination_id.lv_name().to_string()));
    // A move ends here: the source volume goes once every block is local.
    let _ = source_host.delete(&origin.id).expect("delete the source");
    assert!(!lv_names(&source_pool.backend).contains(&origin.id.lv_name().to_string()));
}

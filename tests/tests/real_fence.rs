//! Real-kernel end-to-end test of fencing: a 512 MiB pool in a VG with no
//! room, two mounted ext4 volumes (one encrypted, one plain), the
//! `volumed` binary as a child process and the KV server in this process.
//!
//! Run inside the micro-VM (build `volumed` first):
//! `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/target/debug/microvm
//! cargo test -p volume-tests --test real_fence -- --test-threads=1`

use fixtures::cmd::Program;
use fixtures::loopdev::LoopDevice;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume_control::layout::{Layout, VolumeSpec, VolumeState};
use volume_core::backend::lvm::runner::{CommandLine, LvmRunner};
use volume_core::backend::lvm::SKIP_FENCEABLE;
use volume_core::backend::ThinBackend;
use volume_core::fence::{DmFenceDevices, FenceDevices};
use volume_core::fence_model::{FencePolicy, FenceReason, FenceSample, Zone};
use volume_core::health::PoolHealth;
use volume_core::names::{HostId, VolumeId};
use volume_core::units::{Bytes, Percent, MIB};
use volume_tests::kv::Kv;
use volume_tests::procs::{kek_file, project_binary, wait_for, Guarded};
use volume_tests::TestPool;

const HOST: &str = "h1";
/// volumed's fencing reserve, percent of pool data.
const RESERVE: u32 = 30;
const CONVERGE: Duration = Duration::from_secs(240);
/// Fixed inside the guest, which has its own network namespace.
const METRICS: &str = "127.0.0.1:19109";

fn host() -> HostId {
    HostId::new(HOST).expect("host id")
}

/// A desired record read as volumed reads it (fields other engineers add
/// later take their defaults).
fn spec(size: Bytes, encrypted: bool) -> VolumeSpec {
    serde_json::from_value(serde_json::json!({
        "id": VolumeId::generate(),
        "name": "data",
        "host": HOST,
        "region": "ewr",
        "zone": "ewr-a",
        "size": size,
        "encrypted": encrypted,
        "created_ms": 1,
    }))
    .expect("spec")
}

fn start_volumed(pool: &TestPool, kv: &Kv, scratch: &Path) -> Guarded {
    let kek = kek_file(scratch);
    let mut command = Command::new(project_binary("volumed"));
    command
        .args(["--host", HOST, "--region", "ewr", "--zone", "ewr-a"])
        .args(["--vg", pool.vg.as_str(), "--pool", "pool"])
        .args(["--consul-addr", &kv.addr()])
        .args(["--key-store", "envelope", "--kek-file"])
        .arg(&kek)
        .args(["--listen", METRICS])
        .args(["--heartbeat-interval", "1s", "--retry-max", "2s"])
        // A reserve of 154 MiB, its floor 77 MiB from the edge: the
        // emulated guest is slow and shared, and the filler got 25 MiB past
        // the edge before its suspend took hold (53 MiB with a 1.5 s fence
        // interval). Auto-extend
        // below 100 % - 2 × reserve, so a grown pool gets the fence lifted.
        .args(["--reserve-percent", &RESERVE.to_string()])
        .args(["--fence-interval", "100ms"])
        .args([
            "--autoextend-threshold",
            "60",
            "--autoextend-interval",
            "1s",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    Guarded::spawn("volumed", &mut command)
}

/// `GET /metrics`, the lines naming `metric`.
fn metric_lines(metric: &str) -> Vec<String> {
    let Ok(mut stream) = std::net::TcpStream::connect(METRICS) else {
        return Vec::new();
    };
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .filter(|line| line.starts_with(metric))
        .map(str::to_owned)
        .collect()
}

/// An LVM command as an operator should run it on a host with fenced
/// volumes: with volumed's filter, so its scan skips their devices.
fn lvm(runner: &LvmRunner, words: &[&str]) {
    let line = CommandLine::command(words[0])
        .args(words[1..].iter().copied())
        .config(SKIP_FENCEABLE)
        .build()
        .expect("command line");
    runner
        .run(&line)
        .unwrap_or_else(|e| panic!("{words:?}: {e}"));
}

/// A filesystem mounted for a test on a directory of its own, without the
/// background inode-table zeroing (so its volume allocates only what the
/// test writes). Dropped while still mounted (a failing test), it is
/// detached lazily first: removing the directory through a filesystem on a
/// fenced device would wait in the kernel for a resume that never comes,
/// and the test would hang instead of reporting its failure.
struct Mounted {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Mounted {
    fn new(device: &Path) -> Mounted {
        let dir = tempfile::tempdir().expect("mount point");
        Program::find("mount")
            .unwrap()
            .run([
                "-o".as_ref(),
                "noinit_itable".as_ref(),
                device.as_os_str(),
                dir.path().as_os_str(),
            ])
            .expect("mount");
        Mounted { dir, mounted: true }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn unmount(&mut self) {
        Program::find("umount")
            .unwrap()
            .run([self.dir.path()])
            .expect("umount");
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Program::find("umount")
                .map(|umount| umount.run(["-l".as_ref(), self.dir.path().as_os_str()]));
        }
    }
}

/// Resumes the volumes' fence devices when a failing test unwinds past it,
/// so nothing the test leaves (a blocked writer, a filesystem to unmount)
/// waits on a suspended device, and the failure is reported.
struct ResumeOnUnwind {
    devices: DmFenceDevices,
    volumes: Vec<VolumeId>,
}

impl Drop for ResumeOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in &self.volumes {
                let _ = self.devices.resume(id);
            }
        }
    }
}

/// A child process killed when dropped: a writer blocked on a fenced device
/// dies once the device resumes, instead of outliving a failed test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

/// `dd` of `mib` MiB into `file`, flushed, started.
fn spawn_dd(file: &Path, mib: u64) -> KillOnDrop {
    let child = Command::new(Program::find("dd").unwrap().path())
        .args([
            "if=/dev/zero".to_owned(),
            format!("of={}", file.display()),
            "bs=1M".to_owned(),
            format!("count={mib}"),
            "conv=fsync".to_owned(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("dd");
    KillOnDrop(child)
}

/// `dd` of `mib` MiB into `file`, flushed; returns its exit status. A write
/// that waits on a fenced device fails the test instead of hanging it.
fn write_file(file: &Path, mib: u64) -> std::process::ExitStatus {
    let mut dd = spawn_dd(file, mib);
    wait_for(
        &format!("dd of {mib} MiB into {}", file.display()),
        CONVERGE,
        || dd.0.try_wait().expect("dd"),
    )
}

/// Fill with no room in the VG: only the filler is fenced, with its reason
/// in its status, `in_reserve` in the host record and the metrics; the
/// other volume keeps writing inside the reserve; a volumed restart finds
/// the fence; a PV added to the VG lets the pool grow, the fence goes, the
/// filler's write completes, and both filesystems check clean.
#[test]
fn real_test_fill_with_no_room_fences_only_the_filler() {
    let pool = TestPool::new("fence", Bytes(1024 * MIB), Bytes(512 * MIB));
    let _ = pool.backend.ensure_pool().expect("ensure the pool");
    let runner = LvmRunner::start().expect("LVM");
    // Nothing left in the VG: the pool cannot grow.
    lvm(
        &runner,
        &[
            "lvcreate",
            "-qq",
            "-l",
            "100%FREE",
            "-n",
            "pad",
            pool.vg.as_str(),
        ],
    );
    assert_eq!(pool.backend.pool_status().unwrap().vg_free, Bytes::ZERO);

    let kv = Kv::start(&host());
    let scratch = tempfile::tempdir().expect("scratch dir");
    let mut volumed = start_volumed(&pool, &kv, scratch.path());
    let filler = spec(Bytes(900 * MIB), true);
    let other = spec(Bytes(900 * MIB), false);
    for spec in [&filler, &other] {
        kv.put(
            &Layout::default().desired(&host(), &spec.id),
            &serde_json::to_vec(spec).unwrap(),
        );
    }
    let ready = |id: &VolumeId| {
        wait_for(&format!("{id} to be ready"), CONVERGE, || {
            let status = kv.status(id)?;
            assert_ne!(status.state, VolumeState::Error, "{:?}", status.error);
            (status.state == VolumeState::Ready).then_some(status)
        })
    };
    let filler_status = ready(&filler.id);
    let other_status = ready(&other.id);
    assert_eq!((filler_status.fenced, other_status.fenced), (None, None));
    let filler_dev = PathBuf::from(filler_status.device.expect("device"));
    let other_dev = PathBuf::from(other_status.device.expect("device"));
    let record = wait_for("the host record", CONVERGE, || kv.host_record());
    assert_eq!(record.pool.health, PoolHealth::Healthy);

    let mut filler_mnt = Mounted::new(&filler_dev);
    let mut other_mnt = Mounted::new(&other_dev);
    let _resume_on_unwind = ResumeOnUnwind {
        devices: DmFenceDevices::new(pool.vg.as_str(), "pool"),
        volumes: vec![filler.id.clone(), other.id.clone()],
    };
    assert!(write_file(&other_mnt.path().join("before"), 8).success());

    // Watch the pool as fast as device-mapper answers: when free data
    // crosses into the reserve, and when the filler's mapping is suspended.
    let devices = DmFenceDevices::new(pool.vg.as_str(), "pool");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let filler = filler.id.clone();
        std::thread::spawn(move || {
            let (mut crossed, mut fenced) = (None, None);
            while !stop.load(Ordering::Relaxed) && fenced.is_none() {
                if let Ok(sample) = devices.sample() {
                    let now = Instant::now();
                    if crossed.is_none()
                        && sample.sample.free_percent() <= Percent::from_whole(RESERVE)
                    {
                        crossed = Some(now);
                    }
                    if sample.suspended.contains(&filler) {
                        fenced = Some(now);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (crossed, fenced)
        })
    };

    // 560 MiB into a pool with about 480 MiB free.
    let fill_target = filler_mnt.path().join("fill");
    let mut dd = spawn_dd(&fill_target, 560);
    let fenced = wait_for("the filler to be fenced", CONVERGE, || {
        kv.status(&filler.id)?.fenced
    });
    stop.store(true, Ordering::Relaxed);
    let (crossed, suspended) = watcher.join().expect("watcher");
    if let (Some(crossed), Some(suspended)) = (crossed, suspended) {
        eprintln!(
            "free data crossed into the reserve -> filler suspended: {:?}",
            suspended.saturating_duration_since(crossed)
        );
    }
    assert!(
        matches!(fenced, FenceReason::PoolReserve { reserve, .. } if reserve == Percent::from_whole(RESERVE)),
        "{fenced:?}"
    );
    assert_eq!(kv.status(&other.id).unwrap().fenced, None);
    assert!(
        dd.0.try_wait().unwrap().is_none(),
        "the filler's write waits, it does not fail"
    );
    let record = wait_for("in_reserve in the host record", CONVERGE, || {
        kv.host_record()
            .filter(|r| r.pool.health == PoolHealth::InReserve)
    });
    assert_eq!(record.pool.headroom(&record.policy), Bytes::ZERO);
    wait_for("the fence in the metrics", CONVERGE, || {
        metric_lines("volumed_fenced_volumes ")
            .contains(&"volumed_fenced_volumes 1".to_owned())
            .then_some(())
    });

    // The other volume keeps writing inside the reserve, in its first
    // half (the floor is guarded once more). The fence took hold after
    // the filler's last bio in flight: the room left is settled.
    let settled = DmFenceDevices::new(pool.vg.as_str(), "pool")
        .sample()
        .expect("sample the pool")
        .sample;
    let after_write = FenceSample {
        data_used: Bytes(settled.data_used.0 + 8 * MIB),
        ..settled.clone()
    };
    let policy = FencePolicy::new(Percent::from_whole(RESERVE)).unwrap();
    assert_eq!(
        policy.zone(after_write.free_percent()),
        Zone::Reserve,
        "the filler's fence took hold with {} free, too near the floor for the other \
         volume's write: the guest was slower than this test allows for",
        settled.free_percent()
    );
    assert!(
        write_file(&other_mnt.path().join("during"), 4).success(),
        "the other volume's write failed while the filler was fenced"
    );
    let during = pool.backend.pool_status().unwrap();
    eprintln!("while fenced: {}", during.usage);
    assert_ne!(during.usage.health, PoolHealth::OutOfData);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        kv.status(&other.id).unwrap().fenced,
        None,
        "the other volume was fenced for writing inside the reserve"
    );

    // A crash of volumed leaves the fence in force; the next one finds it.
    let _ = volumed.kill_hard();
    let mut volumed = start_volumed(&pool, &kv, scratch.path());
    wait_for("the fence found after a restart", CONVERGE, || {
        (metric_lines("volumed_fenced_volumes ").contains(&"volumed_fenced_volumes 1".to_owned()))
            .then_some(())
    });
    wait_for("the found fence in the status", CONVERGE, || {
        (kv.status(&filler.id)?.fenced == Some(FenceReason::FoundSuspended)).then_some(())
    });
    assert_eq!(kv.status(&other.id).unwrap().fenced, None);
    assert!(dd.0.try_wait().unwrap().is_none());

    // An operator adds a PV: the pool grows, the fence goes.
    let backing = volume_tests::scratch_dir().join("vmv1test-fence-pv2.img");
    let _ = std::fs::remove_file(&backing);
    let extra = LoopDevice::create_sparse(&backing, 512 * MIB).expect("second loop device");
    let extra_path = extra.device_path().to_str().unwrap().to_owned();
    lvm(&runner, &["vgextend", "-qq", pool.vg.as_str(), &extra_path]);
    let unfenced = wait_for("the fence to go", CONVERGE, || {
        kv.status(&filler.id).filter(|s| s.fenced.is_none())
    });
    assert_eq!(unfenced.state, VolumeState::Ready);
    let status = wait_for("dd to finish", CONVERGE, || dd.0.try_wait().unwrap());
    assert!(status.success(), "the filler's write failed: {status}");
    wait_for("healthy in the host record", CONVERGE, || {
        kv.host_record()
            .filter(|r| r.pool.health == PoolHealth::Healthy)
    });
    assert!(metric_lines("volumed_unfences_total")
        .iter()
        .any(|line| line.contains("space_returned") && line.ends_with(" 1")));
    let grown = pool.backend.pool_status().unwrap();
    eprintln!("after the PV: {}", grown.usage);
    assert!(grown.usage.data_size > Bytes(512 * MIB));

    for (mounted, device) in [(&mut filler_mnt, &filler_dev), (&mut other_mnt, &other_dev)] {
        mounted.unmount();
        Program::find("e2fsck")
            .unwrap()
            .run(["-fn", device.to_str().unwrap()])
            .expect("e2fsck -fn: the filesystem checks clean");
    }
    assert!(volumed.terminate(Duration::from_secs(60)));
    drop(volumed);
    // The mapping volumed left open holds the LV; the VG cannot go before it.
    Program::find("cryptsetup")
        .unwrap()
        .run(["close", filler.id.crypt_name().as_str()])
        .expect("close the filler's mapping");
    // The VG goes before the PV under it.
    drop(pool);
    drop(extra);
}

/// LVM, in process as volumed runs it, never waits on a fenced volume: with
/// an encrypted volume's dm-crypt mapping (mounted, with dirty data) and a
/// plain volume's thin LV suspended as fencing suspends them, the reports,
/// a pool growth and a tag change all finish, and leave both suspended.
#[test]
fn real_test_lvm_never_waits_on_a_fenced_mapping() {
    let pool = TestPool::new("fence-lvm", Bytes(512 * MIB), Bytes(128 * MIB));
    let _ = pool.backend.ensure_pool().expect("ensure the pool");
    let plain = VolumeId::generate();
    let encrypted = VolumeId::generate();
    let mut devices = Vec::new();
    for id in [&plain, &encrypted] {
        let volume = pool
            .backend
            .create_thin(&id.lv_name(), Bytes(256 * MIB), &[])
            .expect("create")
            .into_inner();
        devices.push(volume.device.expect("active"));
    }
    let scratch = tempfile::tempdir().unwrap();
    let key = scratch.path().join("key");
    std::fs::write(&key, [7u8; 64]).unwrap();
    let cryptsetup = Program::find("cryptsetup").unwrap();
    let lv = devices[1].to_str().unwrap();
    let key_arg = key.to_str().unwrap();
    cryptsetup
        .run([
            "luksFormat",
            "-q",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            key_arg,
            lv,
        ])
        .expect("luksFormat");
    let mapping = encrypted.crypt_name();
    cryptsetup
        .run(["open", "--key-file", key_arg, lv, mapping.as_str()])
        .expect("open");
    let mapped = Path::new("/dev/mapper").join(mapping.as_str());
    Program::find("mkfs.ext4")
        .unwrap()
        .run(["-q", mapped.to_str().unwrap()])
        .expect("mkfs");
    let mut mnt = Mounted::new(&mapped);
    // Dirty data that a flushing suspend would write.
    std::fs::write(mnt.path().join("dirty"), vec![1u8; 4 * MIB as usize]).unwrap();

    let fence = DmFenceDevices::new(pool.vg.as_str(), "pool");
    let _resume_on_unwind = ResumeOnUnwind {
        devices: fence.clone(),
        volumes: vec![plain.clone(), encrypted.clone()],
    };
    fence
        .suspend(&plain)
        .expect("suspend the plain volume's LV");
    fence.suspend(&encrypted).expect("suspend the mapping");
    let sample = fence.sample().expect("sample");
    assert!(sample.suspended.contains(&plain) && sample.suspended.contains(&encrypted));

    let (done, finished) = std::sync::mpsc::channel();
    let backend =
        Arc::new(volume_core::backend::lvm::LvmBackend::start(pool.spec().clone()).unwrap());
    {
        let backend = backend.clone();
        let plain = plain.clone();
        std::thread::spawn(move || {
            let step = |what: &'static str| {
                let _ = done.send(what);
            };
            backend.pool_status().expect("pool status");
            step("pool_status");
            backend.list_thins().expect("list");
            step("list_thins");
            backend
                .grow_pool(volume_core::pool_growth::PoolPart::Data, Bytes(8 * MIB))
                .expect("grow the pool");
            step("grow_pool");
            backend
                .retag(&plain.lv_name(), &["vmv1.fence-test".to_owned()], &[])
                .expect("retag");
            step("retag");
        });
    }
    for expected in ["pool_status", "list_thins", "grow_pool", "retag"] {
        let got = finished
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|_| panic!("LVM hung at {expected} with fenced mappings"));
        assert_eq!(got, expected);
    }
    let sample = fence.sample().expect("sample");
    assert!(
        sample.suspended.contains(&plain) && sample.suspended.contains(&encrypted),
        "LVM resumed a fenced device: {:?}",
        sample.suspended
    );
    fence.resume(&encrypted).unwrap();
    fence.resume(&plain).unwrap();
    mnt.unmount();
    Program::find("e2fsck")
        .unwrap()
        .run(["-fn", mapped.to_str().unwrap()])
        .expect("e2fsck -fn");
    cryptsetup.run(["close", mapping.as_str()]).expect("close");
}

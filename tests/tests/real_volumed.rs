//! Real-kernel end-to-end tests of volumed: the embedded KV server in this
//! process, the `volumed` binary as a child process, real LVM thin pools,
//! dm-crypt and ext4 on a loop device.
//!
//! The daemon is found beside this test binary (`target/<profile>/volumed`):
//! run `cargo build -p volumed` first (`scripts/test-all` does). Run inside
//! the micro-VM:
//! `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/target/debug/microvm
//! cargo test -p volume-tests --test real_volumed -- --test-threads=1`

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume_control::layout::{Layout, Ledger, VolumeSpec, VolumeState, VolumeStatus};
use volume_core::backend::ThinBackend;
use volume_core::names::{HostId, Region, VolumeId, VolumeName, Zone};
use volume_core::units::{Bytes, GIB};
use volume_tests::kv::Kv;
use volume_tests::procs::{kek_file, project_binary, wait_for, Guarded};
use volume_tests::TestPool;

const HOST: &str = "h1";
/// Creates under emulation take seconds each; leave room.
const CONVERGE: Duration = Duration::from_secs(240);

fn host() -> HostId {
    HostId::new(HOST).expect("host id")
}

fn spec(size: Bytes) -> VolumeSpec {
    VolumeSpec {
        id: VolumeId::generate(),
        name: VolumeName::new("data").expect("name"),
        host: host(),
        region: Region::new("ewr").expect("region"),
        zone: Zone::new("ewr-a").expect("zone"),
        size,
        encrypted: true,
        created_ms: 1,
        destroy: false,
        source: None,
        snapshots: Default::default(),
        auto_extend: None,
    }
}

/// Everything one daemon run needs from its test.
struct Setup<'a> {
    pool: &'a TestPool,
    kv: &'a Kv,
    scratch: &'a Path,
}

impl Setup<'_> {
    fn jails(&self) -> PathBuf {
        self.scratch.join("jails")
    }

    fn start(&self, extra_env: &[(&str, &Path)]) -> Guarded {
        self.start_with(extra_env, &["--pool-data-size", "3GiB"], true)
    }

    /// With `extra_args` (which must give the pool's data size), and,
    /// without `jails`, no jail nodes: volumed then grows a mounted
    /// filesystem itself, online.
    fn start_with(&self, extra_env: &[(&str, &Path)], extra_args: &[&str], jails: bool) -> Guarded {
        let mut command = self.command(extra_args, jails);
        command.env("RUST_LOG", "info").stdin(Stdio::null());
        for (name, value) in extra_env {
            command.env(name, value);
        }
        Guarded::spawn("volumed", &mut command)
    }

    /// `volumed gc GC_ARGS` with the daemon's settings: whether it exited
    /// 0, and its stdout and stderr.
    fn gc(&self, gc_args: &[&str], extra_args: &[&str]) -> (bool, String) {
        let mut command = self.command(extra_args, false);
        let output = command
            .arg("gc")
            .args(gc_args)
            .stdin(Stdio::null())
            .output()
            .expect("run volumed gc");
        let text = format!(
            "volumed gc {gc_args:?}: {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// The volumed command line for this pool, store and scratch dir.
    fn command(&self, extra_args: &[&str], jails: bool) -> Command {
        let kek = kek_file(self.scratch);
        let mut command = Command::new(project_binary("volumed"));
        command
            .args(["--host", HOST, "--region", "ewr", "--zone", "ewr-a"])
            .args(["--vg", self.pool.vg.as_str(), "--pool", "pool"])
            .arg("--pv")
            .arg(self.pool.loop_path())
            .args(extra_args)
            .args(["--consul-addr", &self.kv.addr()])
            .args(["--key-store", "envelope", "--kek-file"])
            .arg(&kek);
        if jails {
            command.arg("--jails-dir").arg(self.jails()).args([
                "--jail-uid",
                "1000",
                "--jail-gid",
                "1000",
            ]);
        }
        if !extra_args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command.args(["--heartbeat-interval", "2s", "--retry-max", "2s"]);
        command
    }
}

/// SIGKILL, as a crash would.
fn kill_hard(volumed: &mut Guarded) {
    let status = volumed.kill_hard().expect("volumed was running");
    assert!(!status.success(), "volumed survived SIGKILL: {status}");
}

/// SIGTERM; the daemon must exit 0 after its running operations.
fn stop(volumed: &mut Guarded) {
    assert!(
        volumed.terminate(Duration::from_secs(60)),
        "volumed did not exit 0 within 60 s of SIGTERM"
    );
}

fn wait_ready(kv: &Kv, id: &VolumeId) -> VolumeStatus {
    wait_for(&format!("{id} to be ready"), CONVERGE, || {
        let status = kv.status(id)?;
        assert_ne!(
            status.state,
            VolumeState::Error,
            "volume failed: {:?}",
            status.error
        );
        (status.state == VolumeState::Ready).then_some(status)
    })
}

fn our_lvs(pool: &TestPool) -> Vec<VolumeId> {
    pool.backend
        .list_thins()
        .expect("list thin LVs")
        .iter()
        .filter_map(|v| VolumeId::from_lv_name(&v.lv))
        .collect()
}

fn destroy_and_wait(kv: &Kv, pool: &TestPool, spec: &VolumeSpec) {
    let mut destroy = spec.clone();
    destroy.destroy = true;
    kv.put_spec(&destroy);
    wait_for("the destroy commit", CONVERGE, || {
        kv.get(&Layout::default().desired(&host(), &spec.id))
            .is_none()
            .then_some(())
    });
    assert!(kv.status(&spec.id).is_none(), "status left after destroy");
    assert!(
        kv.get(&Layout::default().sealed_key(&spec.id)).is_none(),
        "sealed key left after destroy"
    );
    assert!(!our_lvs(pool).contains(&spec.id), "LV left after destroy");
    assert!(!Path::new("/dev/mapper")
        .join(spec.id.crypt_name().as_str())
        .exists());
}

#[test]
fn real_test_volumed_creates_an_encrypted_ext4_volume_and_destroys_it() {
    let pool = TestPool::new("vd-life", Bytes(4 * GIB), Bytes(3 * GIB));
    let kv = Kv::start(&host());
    let scratch = tempfile::tempdir().expect("scratch dir");
    let setup = Setup {
        pool: &pool,
        kv: &kv,
        scratch: scratch.path(),
    };
    let mut volumed = setup.start(&[]);

    // Over-committed: 10 GiB in a 3 GiB pool, reserved as volctl would.
    let volume = spec(Bytes(10 * GIB));
    kv.put(
        &Layout::default().host_ledger(&host()),
        &serde_json::to_vec(&Ledger {
            reserved: volume.size,
            volumes: 1,
        })
        .expect("ledger JSON"),
    );
    kv.put_spec(&volume);
    let ready = wait_ready(&kv, &volume.id);
    assert!(ready.encrypted);
    assert_eq!(ready.size, Bytes(10 * GIB));
    let device = PathBuf::from(ready.device.expect("device in the status"));
    assert_eq!(
        device,
        Path::new("/dev/mapper").join(volume.id.crypt_name().as_str())
    );
    match volume_core::fs::probe(&device).expect("probe the mapping") {
        volume_core::fs::Signature::Ext(_) => {}
        other => panic!("the mapping holds {other}, not ext4"),
    }
    let lv = pool
        .backend
        .list_thins()
        .expect("list")
        .into_iter()
        .find(|v| VolumeId::from_lv_name(&v.lv).as_ref() == Some(&volume.id))
        .expect("the volume's LV");
    let lv_device = lv.device.expect("active LV");
    assert!(matches!(
        volume_core::fs::probe(&lv_device).expect("probe the LV"),
        volume_core::fs::Signature::Luks
    ));
    // The jail node is the mapping's block device, owned as configured.
    let node = PathBuf::from(ready.node.expect("node in the status"));
    assert_eq!(node, setup.jails().join(volume.id.as_str()).join("vol"));
    let node_meta = std::fs::symlink_metadata(&node).expect("jail node");
    assert!(node_meta.file_type().is_block_device());
    assert_eq!(
        node_meta.rdev(),
        std::fs::metadata(&device).expect("mapping").rdev()
    );
    assert_eq!((node_meta.uid(), node_meta.gid()), (1000, 1000));
    // Only the sealed key is in the store.
    let sealed = kv
        .get(&Layout::default().sealed_key(&volume.id))
        .expect("sealed key");
    assert_eq!(sealed.len(), 1 + 24 + 64 + 16);
    let record = wait_for("the host record", CONVERGE, || {
        kv.host_record().filter(|r| r.pool.volume_count == 1)
    });
    assert!(record.orphans.is_empty());
    assert_eq!(record.pool.provisioned, Bytes(10 * GIB));

    destroy_and_wait(&kv, &pool, &volume);
    assert!(!node.exists(), "jail node left after destroy");
    let ledger: Ledger = serde_json::from_slice(
        &kv.get(&Layout::default().host_ledger(&host()))
            .expect("ledger"),
    )
    .expect("ledger JSON");
    assert_eq!(ledger, Ledger::default());
    stop(&mut volumed);
}

#[test]
fn real_test_volumed_killed_mid_create_converges_after_restart() {
    let pool = TestPool::new("vd-crash", Bytes(4 * GIB), Bytes(3 * GIB));
    let kv = Kv::start(&host());
    let scratch = tempfile::tempdir().expect("scratch dir");
    let setup = Setup {
        pool: &pool,
        kv: &kv,
        scratch: scratch.path(),
    };
    let marker = scratch.path().join("paused");
    let mut volumed = setup.start(&[
        ("VOLUMED_FAULT_PAUSE_AFTER", Path::new("CryptFormatted")),
        ("VOLUMED_FAULT_MARKER", &marker),
    ]);
    let volume = spec(Bytes(2 * GIB));
    kv.put_spec(&volume);
    // The create has made the key, the LV and the LUKS2 header, and holds
    // there: kill -9 now.
    wait_for("the create to reach the LUKS2 format", CONVERGE, || {
        marker.exists().then_some(())
    });
    kill_hard(&mut volumed);
    assert_eq!(our_lvs(&pool), vec![volume.id.clone()]);
    assert_eq!(
        kv.status(&volume.id).expect("status").state,
        VolumeState::Creating
    );

    let mut volumed = setup.start(&[]);
    let ready = wait_ready(&kv, &volume.id);
    assert!(ready.encrypted);
    let device = PathBuf::from(ready.device.expect("device"));
    assert!(matches!(
        volume_core::fs::probe(&device).expect("probe the mapping"),
        volume_core::fs::Signature::Ext(_)
    ));
    let record = wait_for("a fresh host record", CONVERGE, || {
        kv.host_record().filter(|r| r.pool.volume_count == 1)
    });
    assert!(record.orphans.is_empty(), "orphans: {:?}", record.orphans);
    assert_eq!(our_lvs(&pool), vec![volume.id.clone()]);

    destroy_and_wait(&kv, &pool, &volume);
    assert!(our_lvs(&pool).is_empty());
    stop(&mut volumed);
}

/// device-mapper's status of `name`, read without flushing (a pool that
/// queues I/O must not make the read wait): the table's length in sectors
/// and the target's status parameters. With `table`, the table's
/// parameters instead of the status.
fn dm_read(name: &str, table: bool) -> Option<(u64, String)> {
    use devicemapper::{DevId, DmFlags, DmName, DmOptions, DM};
    let dm = DM::new().ok()?;
    let name = DmName::new(name).ok()?;
    let mut flags = DmFlags::DM_NOFLUSH;
    if table {
        flags |= DmFlags::DM_STATUS_TABLE;
    }
    let (_, lines) = dm
        .table_status(&DevId::Name(name), DmOptions::default().set_flags(flags))
        .ok()?;
    let (_, length, _, params) = lines.into_iter().next()?;
    Some((length, params))
}

fn pool_dm_name(pool: &TestPool) -> String {
    format!("{}-pool-tpool", pool.vg.as_str().replace('-', "--"))
}

fn thin_dm_name(pool: &TestPool, id: &VolumeId) -> String {
    format!(
        "{}-{}",
        pool.vg.as_str().replace('-', "--"),
        id.lv_name().as_str().replace('-', "--")
    )
}

/// `(used, total)` of a pool's data (`part` 2) or metadata (`part` 1)
/// blocks, from the pool target's status line.
fn pool_blocks(pool_dm: &str, part: usize) -> Option<(u64, u64)> {
    let (_, params) = dm_read(pool_dm, false)?;
    let (used, total) = params.split_whitespace().nth(part)?.split_once('/')?;
    Some((used.parse().ok()?, total.parse().ok()?))
}

/// A thin LV's `(mapped sectors, size in sectors)`.
fn thin_sectors(thin_dm: &str) -> Option<(u64, u64)> {
    let (length, params) = dm_read(thin_dm, false)?;
    Some((params.split_whitespace().next()?.parse().ok()?, length))
}

/// `GET <path>` on volumed's HTTP endpoint: status code and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to volumed's endpoint");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send the request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status code");
    (code, body.to_owned())
}

/// The pool's health as an operator sees it at `stage`: `volctl hosts`'
/// HEALTH column, `/healthz` and the metrics all say healthy. Returns the
/// pool's data size from the metrics.
fn assert_healthy_everywhere(kv: &Kv, listen: &str, stage: &str) -> Bytes {
    let hosts = volume_tests::procs::volctl(&kv.addr(), &["hosts"]);
    assert!(hosts.status.success(), "{stage}: volctl hosts failed");
    let text = String::from_utf8_lossy(&hosts.stdout).into_owned();
    let header = text.lines().next().unwrap_or_default();
    assert!(
        header.contains(" HEALTH "),
        "{stage}: no HEALTH column: {text}"
    );
    let row = text.lines().nth(1).unwrap_or_default();
    assert!(
        row.split_whitespace().any(|word| word == "healthy"),
        "{stage}: {text}"
    );
    let (code, body) = http_get(listen, "/healthz");
    assert_eq!(code, 200, "{stage}: /healthz {body}");
    assert!(
        body.starts_with("ok\n") && body.contains("pool: healthy"),
        "{stage}: {body}"
    );
    let (code, metrics) = http_get(listen, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("volumed_pool_healthy 1\n"),
        "{stage}: {metrics}"
    );
    assert!(
        metrics.contains("volumed_pool_health{health=\"out_of_data\"} 0\n"),
        "{stage}: {metrics}"
    );
    let size = metrics
        .lines()
        .find_map(|line| line.strip_prefix("volumed_pool_data_size_bytes "))
        .and_then(|value| value.trim().parse().ok())
        .expect("the pool's data size in the metrics");
    eprintln!(
        "{stage}: healthy in volctl hosts, /healthz and metrics; pool data {}",
        Bytes(size)
    );
    Bytes(size)
}

/// When each growth happened, as a sampler thread saw device-mapper.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    pool_crossed: Option<Instant>,
    pool_grown: Option<Instant>,
    /// The pool target reported `out_of_data_space` (writes queued).
    pool_full: Option<Instant>,
    volume_crossed: Option<Instant>,
    volume_grown: Option<Instant>,
    fs_grown: Option<Instant>,
}

/// Every 50 ms until `stop`: the pool's data blocks against its
/// threshold (percent) and first size, the thin LV's mapped share against
/// its threshold and first size, and the mounted filesystem's blocks.
fn sample_growth(
    pool_dm: String,
    thin_dm: String,
    mount: PathBuf,
    pool_threshold: u64,
    volume_threshold: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let (_, pool_total) = pool_blocks(&pool_dm, 2).expect("pool status");
        let (_, thin_size) = thin_sectors(&thin_dm).expect("thin status");
        let fs_blocks = || nix::sys::statvfs::statvfs(&mount).map(|s| s.blocks()).ok();
        let fs_first = fs_blocks().expect("statvfs");
        let mut seen = Seen::default();
        let mark = |at: &mut Option<Instant>, now: bool| {
            if now && at.is_none() {
                *at = Some(Instant::now());
            }
        };
        while !stop.load(Ordering::Relaxed) {
            if let Some((_, params)) = dm_read(&pool_dm, false) {
                mark(&mut seen.pool_full, params.contains("out_of_data_space"));
            }
            if let Some((used, total)) = pool_blocks(&pool_dm, 2) {
                mark(
                    &mut seen.pool_crossed,
                    used * 100 >= pool_total * pool_threshold,
                );
                mark(&mut seen.pool_grown, total > pool_total);
            }
            if let Some((mapped, size)) = thin_sectors(&thin_dm) {
                mark(
                    &mut seen.volume_crossed,
                    mapped * 100 >= thin_size * volume_threshold,
                );
                mark(&mut seen.volume_grown, size > thin_size);
            }
            mark(
                &mut seen.fs_grown,
                fs_blocks().is_some_and(|b| b > fs_first),
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        seen
    })
}

fn between(from: Option<Instant>, to: Option<Instant>) -> String {
    match (from, to) {
        (Some(from), Some(to)) => format!("{:.2?}", to.saturating_duration_since(from)),
        _ => "not seen".to_owned(),
    }
}

/// Issue 10, "fill with room in the VG" and volume auto-extend, through
/// volumed on the real kernel: a 128 MiB pool (VG with ~880 MiB free) holds
/// an encrypted 256 MB volume with auto-extend at 50 % by 1 GB up to
/// 1.256 GB, mounted here (no jail, so volumed grows the ext4 online).
/// 150 MiB written: the volume crosses its threshold and the pool its
/// low-water mark; volumed grows both. Then 200 MiB more, which the first
/// 256 MB could not hold. Every write succeeds, the filesystem checks
/// clean, and the pool is healthy in `volctl hosts`, `/healthz` and the
/// metrics at each stage. Prints the measured timings.
#[test]
fn real_test_volumed_auto_extends_a_filling_volume_and_its_pool() {
    use fixtures::cmd::Program;
    use volume_core::units::{Percent, GB, MIB};
    use volume_core::volume_growth::AutoExtend;

    let pool = TestPool::new("vd-grow", Bytes(GIB), Bytes(128 * MIB));
    let kv = Kv::start(&host());
    let scratch = tempfile::tempdir().expect("scratch dir");
    let setup = Setup {
        pool: &pool,
        kv: &kv,
        scratch: scratch.path(),
    };
    let listen = "127.0.0.1:39181";
    let mut volumed = setup.start_with(
        &[],
        &[
            "--pool-data-size",
            "128MiB",
            "--listen",
            listen,
            "--pool-refresh-interval",
            "1s",
            "--volume-autoextend-interval",
            "1s",
        ],
        false,
    );
    let size = Bytes(256_000_000);
    let limit = size + Bytes(GB);
    let mut volume = spec(size);
    volume.auto_extend =
        Some(AutoExtend::new(Percent::from_whole(50), Bytes(GB), limit, size).expect("settings"));
    kv.put(
        &Layout::default().host_ledger(&host()),
        &serde_json::to_vec(&Ledger {
            reserved: size,
            volumes: 1,
        })
        .expect("ledger JSON"),
    );
    kv.put_spec(&volume);
    let ready = wait_ready(&kv, &volume.id);
    let device = PathBuf::from(ready.device.expect("device"));
    let first_pool = assert_healthy_everywhere(&kv, listen, "before the fill");
    assert_eq!(first_pool, Bytes(128 * MIB));

    let mnt = tempfile::tempdir().expect("mount point");
    Program::find("mount")
        .unwrap()
        .run([device.as_os_str(), mnt.path().as_os_str()])
        .expect("mount the volume");
    let sampling_done = Arc::new(AtomicBool::new(false));
    let sampler = sample_growth(
        pool_dm_name(&pool),
        thin_dm_name(&pool, &volume.id),
        mnt.path().to_owned(),
        70,
        50,
        sampling_done.clone(),
    );
    let dd = Program::find("dd").unwrap();
    let write = |name: &str, mib: u32| {
        let started = Instant::now();
        let result = dd.run([
            "if=/dev/zero".to_owned(),
            format!("of={}", mnt.path().join(name).display()),
            "bs=1M".to_owned(),
            format!("count={mib}"),
            "conv=fsync".to_owned(),
        ]);
        eprintln!("wrote {mib} MiB in {:.2?}", started.elapsed());
        result.unwrap_or_else(|e| panic!("dd of {mib} MiB: a write failed: {e}"));
    };
    write("one", 150);
    let grown = wait_for("the volume to be grown", CONVERGE, || {
        kv.status(&volume.id)
            .filter(|s| s.state == VolumeState::Ready && s.size >= limit)
    });
    assert_eq!(grown.auto_extend_refused, None);
    wait_for("the filesystem to be grown", CONVERGE, || {
        let blocks = nix::sys::statvfs::statvfs(mnt.path()).ok()?;
        (blocks.blocks() * blocks.fragment_size() > 1_000_000_000).then_some(())
    });
    assert_healthy_everywhere(&kv, listen, "after 150 MiB");
    // More than the volume first held: only a grown filesystem takes it.
    write("two", 200);
    sampling_done.store(true, Ordering::Relaxed);
    let seen = sampler.join().expect("sampler");
    eprintln!(
        "threshold crossing to grown pool: {}; to grown volume (LV): {}; to grown filesystem: {}",
        between(seen.pool_crossed, seen.pool_grown),
        between(seen.volume_crossed, seen.volume_grown),
        between(seen.volume_crossed, seen.fs_grown),
    );
    if let Some(full) = seen.pool_full {
        // The pool queues I/O while full with room in the VG, so the
        // writer waits instead of failing; say so.
        eprintln!(
            "the pool was out of data space (I/O queued) {} after the crossing",
            between(seen.pool_crossed, Some(full))
        );
    }
    // What volumed's check reads (device-mapper) is what LVM reports.
    let by_dm = pool
        .backend
        .thin_allocations(&[volume.id.lv_name()])
        .expect("thin allocation");
    let by_lvm = pool
        .backend
        .list_thins()
        .expect("list")
        .into_iter()
        .find(|v| v.lv == volume.id.lv_name())
        .expect("the volume's LV");
    assert_eq!(by_dm.len(), 1);
    assert_eq!(by_dm[0].size, by_lvm.virtual_size);
    let (dm_pct, lvm_pct) = (
        by_dm[0].allocated.hundredths(),
        by_lvm.data_percent.hundredths(),
    );
    // ext4's lazy inode-table init may map a little more between the two reads.
    assert!(dm_pct.abs_diff(lvm_pct) <= 100, "{by_dm:?} vs {by_lvm:?}");
    let last_pool = assert_healthy_everywhere(&kv, listen, "after 350 MiB");
    assert!(last_pool > Bytes(350 * MIB), "pool {last_pool}");
    assert!(seen.pool_grown.is_some() && seen.volume_grown.is_some() && seen.fs_grown.is_some());

    // One step: the limit is one increment away, and 350 MiB of 1.256 GB
    // is under the threshold. The ledger carries it.
    let desired: VolumeSpec = serde_json::from_slice(
        &kv.get(&Layout::default().desired(&host(), &volume.id))
            .expect("desired record"),
    )
    .expect("spec JSON");
    assert_eq!(desired.size, limit);
    let ledger: Ledger = serde_json::from_slice(
        &kv.get(&Layout::default().host_ledger(&host()))
            .expect("ledger"),
    )
    .expect("ledger JSON");
    assert_eq!(ledger.reserved, limit);

    Program::find("umount")
        .unwrap()
        .run([mnt.path()])
        .expect("umount");
    Program::find("e2fsck")
        .unwrap()
        .run(["-fn", device.to_str().expect("UTF-8 path")])
        .expect("e2fsck -fn: the filesystem checks clean");
    destroy_and_wait(&kv, &pool, &volume);
    stop(&mut volumed);
}

/// Issue 10, "metadata near full: it is extended before it runs out",
/// through volumed's own auto-extend thread. A pool with the smallest
/// metadata LVM makes (2 MiB asked, one 4 MiB extent given), its metadata
/// threshold at 50 %. LVM sizes metadata to map every chunk of the pool,
/// so plain writes fill data long before metadata; what fills metadata in
/// practice is sharing broken by snapshots. So: 20,000 chunks of a volume
/// mapped (4 KiB each, block zeroing off so the sparse backing file stays
/// small), then rounds of a thin snapshot and one write per 100 chunks,
/// each write copying a shared btree leaf. (The snapshots are made with
/// the pool's own `create_snap` message: LVM's `lvcreate --snapshot` also
/// wants the dm-snapshot target, which the test guest does not load.) volumed grows the metadata
/// before it is full: every write succeeds and the pool stays healthy.
#[test]
fn real_test_volumed_grows_pool_metadata_before_it_runs_out() {
    use std::os::unix::fs::FileExt;
    use volume_core::backend::lvm::runner::{CommandLine, LvmRunner};
    use volume_core::units::GB;

    let pool = TestPool::new("vd-meta", Bytes(10 * GIB), Bytes(7 * GIB));
    let kv = Kv::start(&host());
    let scratch = tempfile::tempdir().expect("scratch dir");
    let setup = Setup {
        pool: &pool,
        kv: &kv,
        scratch: scratch.path(),
    };
    let listen = "127.0.0.1:39182";
    let mut volumed = setup.start_with(
        &[],
        &[
            "--pool-data-size",
            "7GiB",
            "--pool-metadata-size",
            "2MiB",
            "--metadata-autoextend-threshold",
            "50",
            "--listen",
            listen,
            "--pool-refresh-interval",
            "1s",
        ],
        false,
    );
    let mut volume = spec(Bytes(6 * GB));
    volume.encrypted = false;
    kv.put(
        &Layout::default().host_ledger(&host()),
        &serde_json::to_vec(&Ledger {
            reserved: volume.size,
            volumes: 1,
        })
        .expect("ledger JSON"),
    );
    kv.put_spec(&volume);
    let ready = wait_ready(&kv, &volume.id);
    let device = PathBuf::from(ready.device.expect("device"));
    assert_healthy_everywhere(&kv, listen, "before the writes");

    let lvm = LvmRunner::start().expect("LVM");
    let run_lvm = |args: &[&str]| {
        let line = CommandLine::command(args[0])
            .args(args[1..].iter().copied())
            .build()
            .expect("LVM line");
        lvm.run(&line).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    };
    // Zeroing off: a 4 KiB write maps a whole chunk without writing it.
    run_lvm(&["lvchange", "--zero", "n", &format!("{}/pool", pool.vg)]);
    let pool_dm = pool_dm_name(&pool);
    let (_, table) = dm_read(&pool_dm, true).expect("pool table");
    assert!(table.contains("skip_block_zeroing"), "{table}");
    // <metadata dev> <data dev> <data block size> ...
    let chunk: u64 = table
        .split_whitespace()
        .nth(2)
        .and_then(|sectors| sectors.parse::<u64>().ok())
        .expect("block size")
        * 512;
    let (first_used, first_total) = pool_blocks(&pool_dm, 1).expect("metadata blocks");
    eprintln!("metadata {first_used}/{first_total} blocks, data chunk {chunk} B");

    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&device)
        .expect("open the volume");
    let block = vec![0x5Au8; 4096];
    let mapped: u64 = 20_000;
    let started = Instant::now();
    for i in 0..mapped {
        file.write_all_at(&block, i * chunk)
            .unwrap_or_else(|e| panic!("write at chunk {i}: {e}"));
    }
    file.sync_data().expect("sync the first writes");
    let after_fill = pool_blocks(&pool_dm, 1).expect("metadata blocks");
    eprintln!(
        "{mapped} chunks mapped in {:.1?}: metadata {}/{} blocks",
        started.elapsed(),
        after_fill.0,
        after_fill.1
    );
    let mut crossed_at = None;
    let mut grown_at = None;
    let mut peak = after_fill;
    let dmsetup = fixtures::cmd::Program::find("dmsetup").expect("dmsetup");
    let thin_dm = thin_dm_name(&pool, &volume.id);
    // thin <pool device> <device id>
    let (_, thin_table) = dm_read(&thin_dm, true).expect("thin table");
    let origin: u64 = thin_table
        .split_whitespace()
        .nth(1)
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("thin table {thin_table:?}"));
    for round in 0..16 {
        // The origin is suspended while its snapshot is taken, as LVM does.
        dmsetup.run(["suspend", thin_dm.as_str()]).expect("suspend");
        let snapshot = dmsetup.run([
            "message".to_owned(),
            pool_dm.clone(),
            "0".to_owned(),
            format!("create_snap {} {origin}", 1000 + round),
        ]);
        dmsetup.run(["resume", thin_dm.as_str()]).expect("resume");
        snapshot.unwrap_or_else(|e| panic!("round {round}: create_snap: {e}"));
        for i in (round % 100..mapped).step_by(100) {
            file.write_all_at(&block, i * chunk)
                .unwrap_or_else(|e| panic!("round {round}, write at chunk {i}: {e}"));
        }
        file.sync_data()
            .unwrap_or_else(|e| panic!("round {round}: sync: {e}"));
        let (used, total) = pool_blocks(&pool_dm, 1).expect("metadata blocks");
        eprintln!("round {round}: metadata {used}/{total} blocks");
        if used * peak.1 > peak.0 * total {
            peak = (used, total);
        }
        if crossed_at.is_none() && used * 2 >= first_total {
            crossed_at = Some(Instant::now());
        }
        if total > first_total {
            grown_at = Some(Instant::now());
            break;
        }
    }
    drop(file);
    // The growth may land just after the last round's check.
    let (used, total) = wait_for("the metadata to grow", Duration::from_secs(60), || {
        pool_blocks(&pool_dm, 1).filter(|(_, total)| *total > first_total)
    });
    grown_at.get_or_insert_with(Instant::now);
    // Seen only at each round's end: a crossing and its growth within
    // one round read as one moment (volumed logs its own `elapsed_ms`).
    eprintln!(
        "metadata {used}/{total} blocks after {:.1?}; threshold crossing to grown, at round granularity: {}",
        started.elapsed(),
        between(crossed_at, grown_at)
    );
    assert!(peak.0 < peak.1, "metadata ran out before it grew: {peak:?}");
    assert!(used * 2 < total, "still over the threshold: {used}/{total}");
    assert_eq!(
        volume_core::backend::lvm::kernel::pool_health(pool.vg.as_str(), "pool"),
        Ok(Some(volume_core::health::PoolHealth::Healthy))
    );
    assert_healthy_everywhere(&kv, listen, "after the metadata grew");
    destroy_and_wait(&kv, &pool, &volume);
    stop(&mut volumed);
}

fn snapshot_lvs(pool: &TestPool) -> Vec<volume_core::names::SnapshotId> {
    pool.backend
        .list_thins()
        .expect("list thin LVs")
        .iter()
        .filter_map(|v| volume_core::names::SnapshotId::from_lv_name(&v.lv))
        .collect()
}

fn snapshot_records(kv: &Kv) -> Vec<volume_control::layout::SnapshotSpec> {
    let pairs = kv
        .runtime
        .block_on(
            kv.client
                .get_recurse(&Layout::default().snapshot_desired_prefix(&host())),
        )
        .expect("KV read")
        .value;
    pairs
        .iter()
        .map(|pair| serde_json::from_slice(&pair.value).expect("snapshot record JSON"))
        .collect()
}

fn snapshot_state(
    kv: &Kv,
    id: &volume_core::names::SnapshotId,
) -> Option<volume_control::layout::SnapshotState> {
    let value = kv.get(&Layout::default().snapshot_status(&host(), id))?;
    let status: volume_control::layout::SnapshotStatus =
        serde_json::from_slice(&value).expect("snapshot status JSON");
    Some(status.state)
}

/// kill -9 of volumed right after a snapshot's LV is made and right after
/// a restore adopted its header: each converges on restart with no
/// orphan, volume or snapshot. A snapshot whose record is lost is an
/// orphan that only `volumed gc --yes` deletes. Then scheduled snapshots
/// on a 15 s period with one period of retention, and the origin's destroy
/// taking its snapshots and returning all capacity.
#[test]
fn real_test_volumed_snapshots_converge_after_kill_and_follow_the_schedule() {
    use volume_control::layout::{SnapshotSchedule, SnapshotSpec, SnapshotState, VolumeSource};
    use volume_core::names::SnapshotId;
    let pool = TestPool::new("vd-snap", Bytes(4 * GIB), Bytes(3 * GIB));
    let kv = Kv::start(&host());
    let scratch = tempfile::tempdir().expect("scratch dir");
    let setup = Setup {
        pool: &pool,
        kv: &kv,
        scratch: scratch.path(),
    };
    let args = [
        "--pool-data-size",
        "3GiB",
        "--snapshot-check-interval",
        "1s",
        "--snapshot-period",
        "15s",
    ];
    let taken_marker = scratch.path().join("taken");
    let mut volumed = setup.start_with(
        &[
            ("VOLUMED_FAULT_PAUSE_AFTER", Path::new("SnapshotTaken")),
            ("VOLUMED_FAULT_MARKER", &taken_marker),
        ],
        &args,
        false,
    );
    let origin = spec(Bytes(2 * GIB));
    kv.put_spec(&origin);
    wait_ready(&kv, &origin.id);
    let snapshot = SnapshotSpec {
        id: SnapshotId::generate(),
        volume: origin.id.clone(),
        host: host(),
        size: origin.size,
        created_ms: 1,
        scheduled: false,
        destroy: false,
    };
    kv.put(
        &Layout::default().snapshot_desired(&host(), &snapshot.id),
        &serde_json::to_vec(&snapshot).expect("JSON"),
    );
    wait_for("the snapshot LV made", CONVERGE, || {
        taken_marker.exists().then_some(())
    });
    kill_hard(&mut volumed);
    assert_eq!(snapshot_lvs(&pool), vec![snapshot.id.clone()]);
    assert_eq!(
        snapshot_state(&kv, &snapshot.id),
        Some(SnapshotState::Taking)
    );

    let adopted_marker = scratch.path().join("adopted");
    let mut volumed = setup.start_with(
        &[
            ("VOLUMED_FAULT_PAUSE_AFTER", Path::new("HeaderAdopted")),
            ("VOLUMED_FAULT_MARKER", &adopted_marker),
        ],
        &args,
        false,
    );
    wait_for("the snapshot ready after the restart", CONVERGE, || {
        (snapshot_state(&kv, &snapshot.id) == Some(SnapshotState::Ready)).then_some(())
    });
    assert_eq!(snapshot_lvs(&pool), vec![snapshot.id.clone()], "taken once");
    let mut restored = spec(Bytes(3 * GIB));
    restored.source = Some(VolumeSource::Snapshot {
        snapshot: snapshot.id.clone(),
    });
    kv.put_spec(&restored);
    wait_for("the restore to adopt its header", CONVERGE, || {
        adopted_marker.exists().then_some(())
    });
    kill_hard(&mut volumed);

    let mut volumed = setup.start_with(&[], &args, false);
    let ready = wait_ready(&kv, &restored.id);
    assert_eq!(ready.size, Bytes(3 * GIB));
    let mut ours = our_lvs(&pool);
    ours.sort();
    let mut expected = vec![origin.id.clone(), restored.id.clone()];
    expected.sort();
    assert_eq!(ours, expected);
    let record = wait_for("a host record with both volumes", CONVERGE, || {
        kv.host_record().filter(|r| r.pool.volume_count == 3)
    });
    assert!(record.orphans.is_empty(), "orphans: {:?}", record.orphans);
    // Nor an orphan snapshot: the one snapshot LV is the recorded one.
    assert_eq!(snapshot_lvs(&pool), vec![snapshot.id.clone()]);

    // A snapshot record lost by hand leaves an orphan snapshot LV: the
    // daemon keeps it, `volumed gc` lists it, only `gc --yes` deletes it.
    let snapshot_key = Layout::default().snapshot_desired(&host(), &snapshot.id);
    kv.runtime
        .block_on(kv.client.delete(&snapshot_key))
        .expect("KV delete");
    stop(&mut volumed);
    assert_eq!(
        snapshot_lvs(&pool),
        vec![snapshot.id.clone()],
        "the daemon deleted it"
    );
    let (ok, listed) = setup.gc(&[], &args);
    assert!(
        ok && listed.contains(&format!("{}\t", snapshot.id))
            && listed.contains(&format!("orphan (snapshot of {})", origin.id)),
        "{listed}"
    );
    assert_eq!(
        snapshot_lvs(&pool),
        vec![snapshot.id.clone()],
        "listing deleted it"
    );
    // It was the only record: an empty snapshot prefix looks like lost
    // records, so --yes alone is refused.
    let (ok, refused) = setup.gc(&["--yes"], &args);
    assert!(
        !ok && refused.contains("--allow-empty-desired"),
        "{refused}"
    );
    assert_eq!(
        snapshot_lvs(&pool),
        vec![snapshot.id.clone()],
        "a refusal deleted it"
    );
    let (ok, deleted) = setup.gc(&["--yes", "--allow-empty-desired"], &args);
    assert!(ok && deleted.contains("deleted (snapshot of"), "{deleted}");
    assert!(
        snapshot_lvs(&pool).is_empty(),
        "the orphan snapshot LV is left"
    );
    let mut ours = our_lvs(&pool);
    ours.sort();
    assert_eq!(ours, expected, "gc touched a volume");
    let mut volumed = setup.start_with(&[], &args, false);

    // Scheduled: one per 15 s period, kept one period.
    let mut scheduled = origin.clone();
    scheduled.snapshots = SnapshotSchedule::new(true, 1).expect("schedule");
    kv.put_spec(&scheduled);
    let mut seen: Vec<SnapshotId> = Vec::new();
    wait_for(
        "two scheduled snapshots taken, the first pruned",
        CONVERGE,
        || {
            let now: Vec<SnapshotSpec> = snapshot_records(&kv)
                .into_iter()
                .filter(|s| s.scheduled)
                .collect();
            for s in &now {
                if snapshot_state(&kv, &s.id) == Some(SnapshotState::Ready) && !seen.contains(&s.id)
                {
                    seen.push(s.id.clone());
                }
            }
            let first_gone = seen
                .first()
                .is_some_and(|first| !now.iter().any(|s| s.id == *first));
            (seen.len() >= 2 && first_gone).then_some(())
        },
    );
    assert!(snapshot_records(&kv).iter().filter(|s| s.scheduled).count() <= 2);

    // The origin's destroy takes every snapshot of it; capacity returns.
    destroy_and_wait(&kv, &pool, &scheduled);
    assert!(snapshot_records(&kv).is_empty(), "snapshot records left");
    assert!(snapshot_lvs(&pool).is_empty(), "snapshot LVs left");
    destroy_and_wait(&kv, &pool, &restored);
    let record = wait_for("an empty pool in the host record", CONVERGE, || {
        kv.host_record().filter(|r| r.pool.volume_count == 0)
    });
    assert_eq!(record.pool.provisioned, Bytes::ZERO);
    assert!(record.orphans.is_empty());
    stop(&mut volumed);
}

//! volumed's end-to-end create throughput against a shell loop of the
//! command-line tools, in one guest on a real kernel. Build the binaries of
//! one profile, then run this one in the micro-VM:
//!
//! ```sh
//! cargo build --release -p volumed -p consul-kv-server \
//!   -p volume-tests --bin bench_volumed --bin volumed --bin volkv
//! target/debug/microvm -- target/release/bench_volumed [--volumes N] [--batch B]
//! ```
//!
//! * The script: `lvcreate` of a thin LV plus `mkfs.ext4` with lazy inode
//!   table and journal init, B times (no KV, no key, no jail node).
//! * volumed (found beside this binary, with the bundled KV server `volkv`):
//!   B unencrypted 1 GiB desired records written at once, timed until every
//!   status says ready, which includes the jail node. Repeated in batches
//!   until the host holds N volumes.
//!
//! Prints the per-volume time of the script, of volumed's first and last
//! batch, and the ratios.

use consul_kv::{ClientConfig, ConsulKv};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use volume_control::layout::{Layout, VolumeSpec, VolumeState, VolumeStatus};
use volume_core::cmd::{self, Program};
use volume_core::names::{HostId, Region, VolumeId, VolumeName, Zone};
use volume_core::units::{Bytes, GIB};
use volume_tests::bench::BatchArgs;
use volume_tests::procs::{Guarded, KvServer};
use volume_tests::TestPool;

const HOST: &str = "h1";

fn args() -> BatchArgs {
    let args = BatchArgs::parse(40, 20);
    assert!(args.volumes >= args.batch, "need 1 <= --batch <= --volumes");
    args
}

/// A binary built beside this one (`target/<profile>/<name>`).
fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of this binary");
    let path = exe.parent().expect("binary in a directory").join(name);
    assert!(
        path.is_file(),
        "{} is missing: build volumed and volkv in the same profile first",
        path.display()
    );
    path
}

fn main() {
    let args = args();
    let pool = TestPool::new("vdbench", Bytes(12 * GIB), Bytes(10 * GIB));
    let _ = volume_core::backend::ThinBackend::ensure_pool(&pool.backend).expect("ensure pool");
    let scratch = tempfile::tempdir().expect("scratch dir");

    let script = time_script(&pool, args.batch);

    let kv_dir = scratch.path().join("kv");
    std::fs::create_dir(&kv_dir).expect("KV dir");
    let kv_server = KvServer::start_binary(&sibling("volkv"), &kv_dir);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let kv_addr = kv_server
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let kv = ConsulKv::new(ClientConfig::new(&kv_addr).expect("client config")).expect("client");
    let volumed = start_volumed(&pool, &kv_addr, scratch.path());
    // Timed from a serving daemon: its start-up is not part of a create.
    runtime.block_on(async {
        let record = Layout::default().host_info(&host());
        let deadline = Instant::now() + Duration::from_secs(600);
        while kv.get(&record).await.expect("KV read").value.is_none() {
            assert!(
                Instant::now() < deadline,
                "volumed did not publish its host record"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let mut batches = Vec::new();
    let mut made = 0;
    while made + args.batch <= args.volumes {
        let specs: Vec<VolumeSpec> = (0..args.batch).map(|_| spec()).collect();
        let started = Instant::now();
        runtime.block_on(async {
            for spec in &specs {
                let key = Layout::default().desired(&host(), &spec.id);
                let value = serde_json::to_vec(spec).expect("spec JSON");
                assert!(kv.put(&key, &value).await.expect("KV write"));
            }
        });
        made += args.batch;
        runtime.block_on(wait_ready(&kv, made));
        let per_volume = started.elapsed().as_secs_f64() / args.batch as f64;
        eprintln!("batch up to {made} volumes: {per_volume:.3} s per volume");
        batches.push(per_volume);
    }
    drop(volumed);
    drop(kv_server);

    let first = batches[0];
    let last = *batches.last().expect("one batch");
    println!(
        "unencrypted 1 GiB ext4 volumes, batches of {}, same pool, same guest:",
        args.batch
    );
    println!("  script (lvcreate + lazy mkfs.ext4)         {script:>7.3} s per volume");
    println!("  volumed, KV record to ready + jail node:");
    println!(
        "    first batch (0 -> {:>4} volumes)        {first:>7.3} s per volume",
        args.batch
    );
    println!(
        "    last batch ({:>4} -> {:>4} volumes)     {last:>7.3} s per volume",
        made - args.batch,
        made
    );
    println!(
        "  throughput ratio (script time / volumed time), first batch: {:.2}x",
        script / first
    );
    println!(
        "  last batch against the first: {:+.1} %",
        (last / first - 1.0) * 100.0
    );
}

fn host() -> HostId {
    HostId::new(HOST).expect("host id")
}

fn spec() -> VolumeSpec {
    VolumeSpec {
        id: VolumeId::generate(),
        name: VolumeName::new("bench").expect("name"),
        host: host(),
        region: Region::new("ewr").expect("region"),
        zone: Zone::new("ewr-a").expect("zone"),
        size: Bytes(GIB),
        encrypted: false,
        created_ms: 1,
        destroy: false,
        auto_extend: None,
        source: None,
        snapshots: Default::default(),
    }
}

fn start_volumed(pool: &TestPool, kv_addr: &str, scratch: &Path) -> Guarded {
    let jails = scratch.join("jails");
    std::fs::create_dir(&jails).expect("jails dir");
    let mut command = Command::new(sibling("volumed"));
    command
        .args(["--host", HOST, "--region", "ewr", "--zone", "ewr-a"])
        .args(["--vg", pool.vg.as_str(), "--pool", "pool"])
        .arg("--pv")
        .arg(pool.loop_path())
        .args(["--consul-addr", kv_addr])
        .args(["--key-store", "local", "--key-dir"])
        .arg(scratch.join("keys"))
        .arg("--jails-dir")
        .arg(&jails)
        .args(["--jail-uid", "1000", "--jail-gid", "1000"])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--overcommit", "1000"])
        .env("RUST_LOG", log_filter())
        .stdin(Stdio::null());
    Guarded::spawn("volumed", &mut command)
}

/// volumed's log: warnings, and with `BENCH_TRACE` every LVM command with
/// its time (the runner's debug lines) too.
fn log_filter() -> &'static str {
    if std::env::var_os("BENCH_TRACE").is_some() {
        "warn,volume_core::backend::lvm::runner=debug,volume_core::host=info"
    } else {
        "warn"
    }
}

/// Waits until `count` statuses say ready; any error status ends the run.
async fn wait_ready(kv: &ConsulKv, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let pairs = kv
            .get_recurse(&Layout::default().status_prefix(&host()))
            .await
            .expect("KV read")
            .value;
        let statuses: Vec<VolumeStatus> = pairs
            .iter()
            .filter_map(|pair| serde_json::from_slice(&pair.value).ok())
            .collect();
        if let Some(failed) = statuses.iter().find(|s| s.state == VolumeState::Error) {
            panic!("volume {} failed: {:?}", failed.id, failed.error);
        }
        let ready = statuses
            .iter()
            .filter(|s| s.state == VolumeState::Ready)
            .count();
        if ready >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ready} of {count} ready after an hour"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The shell loop: `lvcreate` and a lazy `mkfs.ext4`, `count` times; the
/// per-volume time. Removes its LVs afterwards (not timed).
fn time_script(pool: &TestPool, count: usize) -> f64 {
    let dirs: Vec<&Path> = cmd::SYSTEM_DIRS.iter().map(Path::new).collect();
    let [lvcreate, lvremove, mkfs] =
        cmd::locate_all(["lvcreate", "lvremove", "mkfs.ext4"], &dirs).expect("CLI tools");
    let udev = std::env::var_os("DM_DISABLE_UDEV");
    let env: Vec<(&str, &OsStr)> = udev
        .as_deref()
        .map(|v| vec![("DM_DISABLE_UDEV", v)])
        .unwrap_or_default();
    let run = |program: &Program, args: &[&str]| {
        program
            .run_with_env(args, &env, &[0])
            .unwrap_or_else(|e| panic!("{e}"));
    };
    let vg = pool.vg.as_str();
    let thin_pool = format!("{vg}/{}", pool.spec().pool);
    let started = Instant::now();
    for i in 0..count {
        let name = format!("script-bench-{i}");
        run(
            &lvcreate,
            &["-q", "-T", &thin_pool, "-V", "1G", "-n", &name],
        );
        run(
            &mkfs,
            &[
                "-q",
                "-b",
                "4096",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                &format!("/dev/{vg}/{name}"),
            ],
        );
    }
    let per_volume = started.elapsed().as_secs_f64() / count as f64;
    for i in 0..count {
        run(&lvremove, &["-q", "-f", &format!("{vg}/script-bench-{i}")]);
    }
    per_volume
}

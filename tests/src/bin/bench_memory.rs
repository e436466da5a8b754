//! volumed's resident memory on a real kernel: through a burst of creates,
//! idle after it, and idle after a restart with those volumes.
//!
//! Runs the `volumed` binary (a release build by default, as shipped) over
//! a loop-backed thin pool and the bundled KV server, writes N desired
//! records at once, and samples `/proc/<pid>/status` every 20 ms until all
//! are ready. `VmHWM` is the kernel's own peak of the resident set, so a
//! spike between two samples still counts. Run it in the micro-VM:
//!
//! ```sh
//! cargo build --release -p volumed --bin volumed
//! cargo build -p volume-tests --bin bench_memory -p consul-kv-server --bin volkv -p fixtures --bin microvm
//! target/debug/microvm -- target/debug/bench_memory [--volumes 100] [--volumed target/release/volumed]
//! ```
//!
//! `--smaps` also prints where the resident memory is, by mapping, after
//! the burst.

use consul_kv::{ClientConfig, ConsulKv};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use volume_control::layout::{HostRecord, Layout, Ledger, VolumeSpec, VolumeState, VolumeStatus};
use volume_core::names::{HostId, Region, VolumeId, VolumeName, Zone};
use volume_core::units::{Bytes, GIB, MIB};
use volume_tests::procs::{kek_file, wait_for, Guarded, KvServer};
use volume_tests::TestPool;

const HOST: &str = "mem1";
const CONVERGE: Duration = Duration::from_secs(1800);

struct Args {
    volumed: PathBuf,
    volumes: usize,
    size: Bytes,
    encrypted: bool,
    idle: Duration,
    smaps: bool,
    extra: Vec<String>,
}

const USAGE: &str = "usage: bench_memory [--volumed PATH] [--volumes N] [--size-mib N] \
[--plain] [--idle-secs S] [--smaps] [-- EXTRA VOLUMED ARGS]";

fn parse_args() -> Args {
    let mut args = Args {
        volumed: default_volumed(),
        volumes: 100,
        size: Bytes(256 * MIB),
        encrypted: true,
        idle: Duration::from_secs(15),
        smaps: false,
        extra: Vec::new(),
    };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let mut value = |name: &str| {
            words
                .next()
                .unwrap_or_else(|| panic!("{name} needs a value; {USAGE}"))
        };
        match word.as_str() {
            "--volumed" => args.volumed = PathBuf::from(value("--volumed")),
            "--volumes" => args.volumes = number(&value("--volumes"), "--volumes"),
            "--size-mib" => {
                args.size = Bytes(number::<u64>(&value("--size-mib"), "--size-mib") * MIB)
            }
            "--idle-secs" => {
                args.idle = Duration::from_secs(number(&value("--idle-secs"), "--idle-secs"))
            }
            "--plain" => args.encrypted = false,
            "--smaps" => args.smaps = true,
            "--" => args.extra = words.by_ref().collect(),
            other => panic!("unknown argument {other:?}; {USAGE}"),
        }
    }
    args
}

fn number<T: std::str::FromStr>(text: &str, name: &str) -> T {
    text.parse()
        .unwrap_or_else(|_| panic!("{name} takes a number, not {text:?}"))
}

/// `target/release/volumed` beside this binary's `target/<profile>/`.
fn default_volumed() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the benchmark");
    exe.parent()
        .and_then(Path::parent)
        .expect("benchmark under target/<profile>/")
        .join("release/volumed")
}

/// One reading of `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    rss: u64,
    hwm: u64,
    locked: u64,
    anon: u64,
    file: u64,
    threads: u64,
}

fn read_status(pid: u32) -> Option<Reading> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Some(Reading {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
        locked: field("VmLck:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
        threads: field("Threads:"),
    })
}

/// Resident KiB and mapping count per kind of mapping, largest first.
type Breakdown = Vec<(String, u64, u64)>;

/// The largest value of each field seen while sampling.
#[derive(Debug, Default)]
struct Peaks {
    max: Reading,
    samples: u64,
    /// `/proc/<pid>/smaps` by mapping at the largest RSS seen while LVM
    /// held memory locked (`VmLck` above 0), if asked for.
    while_locked: Option<(Reading, Breakdown)>,
    /// The same at the largest RSS seen, locked or not (taken again when
    /// the RSS passes the last one by 512 KiB), if asked for.
    at_peak: Option<(Reading, Breakdown)>,
}

struct Sampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<Peaks>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32, smaps: bool) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new(Peaks::default()));
        let thread = {
            let (stop, peaks) = (stop.clone(), peaks.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(r) = read_status(pid) {
                        let mut p = peaks.lock().expect("sampler lock");
                        let m = &mut p.max;
                        m.rss = m.rss.max(r.rss);
                        m.hwm = m.hwm.max(r.hwm);
                        m.locked = m.locked.max(r.locked);
                        m.anon = m.anon.max(r.anon);
                        m.file = m.file.max(r.file);
                        m.threads = m.threads.max(r.threads);
                        p.samples += 1;
                        let larger = p
                            .while_locked
                            .as_ref()
                            .is_none_or(|(seen, _)| r.rss > seen.rss);
                        let past_peak = p
                            .at_peak
                            .as_ref()
                            .is_none_or(|(seen, _)| r.rss >= seen.rss + 512);
                        if smaps && r.locked > 0 && larger {
                            drop(p);
                            let breakdown = smaps_breakdown(pid);
                            peaks.lock().expect("sampler lock").while_locked = Some((r, breakdown));
                        } else if smaps && past_peak {
                            drop(p);
                            let breakdown = smaps_breakdown(pid);
                            peaks.lock().expect("sampler lock").at_peak = Some((r, breakdown));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Sampler {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Peaks {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("sampler thread");
        }
        std::mem::take(&mut *self.peaks.lock().expect("sampler lock"))
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Resident KiB per mapping kind, from `/proc/<pid>/smaps`, largest first.
fn smaps_breakdown(pid: u32) -> Breakdown {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut groups: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (from, to) = first.split_once('-').unwrap_or(("0", "0"));
            let size = u64::from_str_radix(to, 16).unwrap_or(0)
                - u64::from_str_radix(from, 16).unwrap_or(0);
            let perms = words.get(1).copied().unwrap_or("");
            current = match words.get(5) {
                Some(path) => format!("{path} {perms}"),
                // Anonymous: thread stacks and malloc arenas look alike;
                // the mapping size tells them apart.
                None => format!("[anon {perms} {} KiB]", size / 1024),
            };
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            let entry = groups.entry(current.clone()).or_default();
            entry.0 += kib;
            entry.1 += 1;
        }
    }
    let mut list: Breakdown = groups
        .into_iter()
        .map(|(name, (rss, count))| (name, rss, count))
        .collect();
    list.sort_by_key(|entry| std::cmp::Reverse(entry.1));
    list
}

fn smaps_rollup(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter(|line| {
            [
                "Rss:",
                "Anonymous:",
                "Locked:",
                "Private_Dirty:",
                "Shared_Clean:",
            ]
            .iter()
            .any(|name| line.starts_with(name))
        })
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The KV side: a client on its own small runtime.
struct Kv {
    runtime: tokio::runtime::Runtime,
    client: ConsulKv,
    layout: Layout,
}

impl Kv {
    fn new(url: &str) -> Kv {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = ConsulKv::new(ClientConfig::new(url).expect("KV address")).expect("client");
        Kv {
            runtime,
            client,
            layout: Layout::default(),
        }
    }

    fn put(&self, key: &str, bytes: Vec<u8>) {
        assert!(self
            .runtime
            .block_on(self.client.put(key, &bytes))
            .expect("KV write"));
    }

    fn statuses(&self) -> Vec<VolumeStatus> {
        let prefix = self.layout.status_prefix(&host());
        let pairs = self
            .runtime
            .block_on(self.client.get_recurse(&prefix))
            .expect("KV read")
            .value;
        pairs
            .iter()
            .filter_map(|pair| serde_json::from_slice(&pair.value).ok())
            .collect()
    }

    fn host_record(&self) -> Option<HostRecord> {
        let key = self.layout.host_info(&host());
        let pair = self
            .runtime
            .block_on(self.client.get(&key))
            .expect("KV read")
            .value?;
        serde_json::from_slice(&pair.value).ok()
    }
}

fn host() -> HostId {
    HostId::new(HOST).expect("host id")
}

fn ready_count(kv: &Kv) -> usize {
    let statuses = kv.statuses();
    if let Some(failed) = statuses.iter().find(|s| s.state == VolumeState::Error) {
        panic!(
            "volume {} failed: {}",
            failed.id,
            failed.error.as_deref().unwrap_or("no reason given")
        );
    }
    statuses
        .iter()
        .filter(|s| s.state == VolumeState::Ready)
        .count()
}

fn start_volumed(args: &Args, pool: &TestPool, kv_url: &str, scratch: &Path) -> Guarded {
    let kek = kek_file(scratch);
    let mut command = Command::new(&args.volumed);
    command
        .args(["--host", HOST, "--region", "ewr", "--zone", "ewr-a"])
        .args(["--vg", pool.vg.as_str(), "--pool", "pool"])
        .arg("--pv")
        .arg(pool.loop_path())
        .args(["--pool-data-size", "3GiB", "--overcommit", "100"])
        .args(["--consul-addr", kv_url])
        .args(["--key-store", "envelope", "--kek-file"])
        .arg(&kek)
        .arg("--jails-dir")
        .arg(scratch.join("jails"))
        .args(["--jail-uid", "1000", "--jail-gid", "1000"])
        .args(["--heartbeat-interval", "2s"])
        .args(&args.extra)
        // The guest's lvm.conf turns LVM's metadata backups off, which LVM
        // warns about on every change.
        .env("RUST_LOG", "error")
        .stdin(Stdio::null());
    Guarded::spawn("volumed", &mut command)
}

/// Waits for a host record newer than `since_ms` that counts `volumes`.
fn wait_host_record(kv: &Kv, since_ms: u64, volumes: u32) {
    wait_for("volumed's host record", CONVERGE, || {
        kv.host_record()
            .filter(|r| r.heartbeat_ms >= since_ms && r.pool.volume_count == volumes)
    });
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

fn main() {
    let args = parse_args();
    assert!(
        args.volumed.is_file(),
        "{} is missing: build it (cargo build --release -p volumed --bin volumed) or pass --volumed",
        args.volumed.display()
    );
    let scratch = tempfile::tempdir().expect("scratch dir");
    let pool = TestPool::new("mem", Bytes(4 * GIB), Bytes(3 * GIB));
    let kv_server = KvServer::start(&scratch.path().join("kv"));
    let kv = Kv::new(&kv_server.url);
    println!(
        "bench_memory: {}, {} {} volumes of {} MiB",
        args.volumed.display(),
        args.volumes,
        if args.encrypted { "encrypted" } else { "plain" },
        args.size.0 / MIB
    );
    if !args.extra.is_empty() {
        println!("volumed arguments added: {}", args.extra.join(" "));
    }
    if let Ok(value) = std::env::var("MALLOC_ARENA_MAX") {
        println!("MALLOC_ARENA_MAX={value} in volumed's environment");
    }

    // -- Start-up, empty pool.
    let started_ms = now_ms();
    let mut volumed = start_volumed(&args, &pool, &kv_server.url, scratch.path());
    let pid = volumed.pid();
    wait_host_record(&kv, started_ms, 0);
    std::thread::sleep(Duration::from_secs(2));
    let start = read_status(pid).expect("volumed's status");
    println!(
        "started, empty pool:     RSS {} (peak {}), {} threads",
        mib(start.rss),
        mib(start.hwm),
        start.threads
    );

    // -- The burst: every record at once.
    let specs: Vec<VolumeSpec> = (0..args.volumes)
        .map(|_| VolumeSpec {
            id: VolumeId::generate(),
            name: VolumeName::new("mem").expect("name"),
            host: host(),
            region: Region::new("ewr").expect("region"),
            zone: Zone::new("ewr-a").expect("zone"),
            size: args.size,
            encrypted: args.encrypted,
            created_ms: 1,
            destroy: false,
            auto_extend: None,
            source: None,
            snapshots: Default::default(),
        })
        .collect();
    kv.put(
        &kv.layout.host_ledger(&host()),
        serde_json::to_vec(&Ledger {
            reserved: specs.iter().map(|s| s.size).sum(),
            volumes: specs.len() as u32,
        })
        .expect("ledger JSON"),
    );
    let sampler = Sampler::start(pid, args.smaps);
    let burst = Instant::now();
    for spec in &specs {
        kv.put(
            &kv.layout.desired(&host(), &spec.id),
            serde_json::to_vec(spec).expect("spec JSON"),
        );
    }
    let mut last_report = Instant::now();
    let converged = wait_for("every volume to be ready", CONVERGE, || {
        // The guest is emulated: poll gently, the sampler catches the peak.
        std::thread::sleep(Duration::from_secs(1));
        let ready = ready_count(&kv);
        if last_report.elapsed() > Duration::from_secs(30) {
            last_report = Instant::now();
            let now = read_status(pid).unwrap_or_default();
            println!(
                "  {:>4.0} s: {ready}/{} ready, RSS {}, peak {}, locked {}, {} threads",
                burst.elapsed().as_secs_f64(),
                args.volumes,
                mib(now.rss),
                mib(now.hwm),
                mib(now.locked),
                now.threads
            );
        }
        (ready == args.volumes).then(|| burst.elapsed())
    });
    let peaks = sampler.finish();
    let after = read_status(pid).expect("volumed's status");
    println!(
        "burst of {} creates:     ready after {:.1} s ({:.2} s per volume)",
        args.volumes,
        converged.as_secs_f64(),
        converged.as_secs_f64() / args.volumes as f64
    );
    println!(
        "  during the burst:      peak RSS {} (VmHWM), most sampled RSS {} (anon {}, file {}), most locked {} (VmLck), most threads {}, {} samples",
        mib(after.hwm),
        mib(peaks.max.rss),
        mib(peaks.max.anon),
        mib(peaks.max.file),
        mib(peaks.max.locked),
        peaks.max.threads,
        peaks.samples
    );
    println!("  smaps_rollup after:    {}", smaps_rollup(pid));
    if let Some((reading, breakdown)) = &peaks.while_locked {
        println!(
            "  resident by mapping while LVM held memory locked (RSS {}, locked {}; KiB, mappings):",
            mib(reading.rss),
            mib(reading.locked)
        );
        for (name, rss, count) in breakdown.iter().take(25) {
            println!("    {rss:>7} {count:>3}  {name}");
        }
    }
    if let Some((reading, breakdown)) = &peaks.at_peak {
        println!(
            "  resident by mapping at the largest RSS sampled (RSS {}; KiB, mappings):",
            mib(reading.rss)
        );
        for (name, rss, count) in breakdown.iter().take(25) {
            println!("    {rss:>7} {count:>3}  {name}");
        }
    }
    if args.smaps {
        println!("  resident by mapping after the burst (KiB, mappings):");
        for (name, rss, count) in smaps_breakdown(pid).iter().take(25) {
            println!("    {rss:>7} {count:>3}  {name}");
        }
    }
    std::thread::sleep(args.idle);
    let idle = read_status(pid).expect("volumed's status");
    println!(
        "idle {} s after burst:    RSS {} ({} threads)",
        args.idle.as_secs(),
        mib(idle.rss),
        idle.threads
    );
    assert!(
        volumed.terminate(Duration::from_secs(60)),
        "volumed did not stop on SIGTERM"
    );

    // -- Restart with the volumes in place.
    let restarted_ms = now_ms();
    let mut volumed = start_volumed(&args, &pool, &kv_server.url, scratch.path());
    let pid = volumed.pid();
    let sampler = Sampler::start(pid, args.smaps);
    wait_host_record(&kv, restarted_ms, args.volumes as u32);
    std::thread::sleep(args.idle);
    let peaks = sampler.finish();
    let restarted = read_status(pid).expect("volumed's status");
    println!(
        "restart, {} volumes, idle {} s: RSS {} (peak {}, most locked {}), {} threads",
        args.volumes,
        args.idle.as_secs(),
        mib(restarted.rss),
        mib(restarted.hwm),
        mib(peaks.max.locked),
        restarted.threads
    );
    if args.smaps {
        println!("  resident by mapping after the restart (KiB, mappings):");
        for (name, rss, count) in smaps_breakdown(pid).iter().take(25) {
            println!("    {rss:>7} {count:>3}  {name}");
        }
    }
    println!(
        "summary: peak {} through the burst, {} idle after it, {} idle after a restart with {} volumes",
        mib(after.hwm),
        mib(idle.rss),
        mib(restarted.rss),
        args.volumes
    );
    assert!(
        volumed.terminate(Duration::from_secs(60)),
        "volumed did not stop on SIGTERM"
    );
    // Close the mappings so the pool's clean-up can remove the VG.
    for spec in specs.iter().filter(|s| s.encrypted) {
        if let Err(error) = volume_core::crypt::close(&spec.id) {
            eprintln!("cleanup: {error}");
        }
    }
}

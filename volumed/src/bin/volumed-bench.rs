//! volumed's cost with many volumes, on the simulated backend.
//!
//! 1. In process, over one simulated host that outlives daemon restarts:
//!    converge N volumes, restart the daemon and count the LVM reports the
//!    restart costs, then count LVM calls and KV traffic while idle.
//! 2. The `volumed` binary itself (`--sim`), with N volumes: its resident
//!    memory, and its own counters over an idle window.
//!
//! Run: `cargo build -p volumed && target/debug/volumed-bench [--volumes N]
//! [--idle-secs S]` (or a release build for production-like memory).

use clap::Parser;
use consul_kv::{ClientConfig, ConsulKv};
use consul_kv_server::{Server, ServerConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume_control::layout::{Layout, VolumeSpec, VolumeState, VolumeStatus};
use volume_core::backend::sim::SimBackend;
use volume_core::backend::{ThinBackend, ThinPoolSpec};
use volume_core::host::sim::SimDevices;
use volume_core::host::VolumeHost;
use volume_core::keys::LocalKeyDir;
use volume_core::names::{HostId, LvName, Region, VgName, VolumeId, VolumeName, Zone};
use volume_core::units::{Bytes, GIB};
use volumed::config::{Cli, Config, Settings};
use volumed::counting::CountingBackend;
use volumed::daemon::{Running, Setup};
use volumed::metrics::Metrics;

#[derive(Debug, Parser)]
#[command(about = "Measures volumed's restart and idle cost and its memory with many volumes")]
struct Args {
    #[arg(long, default_value_t = 1000)]
    volumes: usize,
    /// Length of each idle window.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Heartbeat interval given to the daemons.
    #[arg(long, default_value = "10s")]
    heartbeat: String,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Failure> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench(args))
}

fn spec(host: &HostId, size: Bytes) -> VolumeSpec {
    VolumeSpec {
        id: VolumeId::generate(),
        name: VolumeName::new("bench").expect("valid name"),
        host: host.clone(),
        region: Region::new("ewr").expect("valid region"),
        zone: Zone::new("ewr-a").expect("valid zone"),
        size,
        encrypted: true,
        created_ms: 0,
        destroy: false,
        source: None,
        snapshots: Default::default(),
        auto_extend: None,
    }
}

async fn put_specs(kv: &ConsulKv, layout: &Layout, specs: &[VolumeSpec]) -> Result<(), Failure> {
    for spec in specs {
        kv.put(
            &layout.desired(&spec.host, &spec.id),
            &serde_json::to_vec(spec)?,
        )
        .await?;
    }
    Ok(())
}

/// Waits until every status under the host's prefix says ready.
async fn wait_ready(
    kv: &ConsulKv,
    layout: &Layout,
    host: &HostId,
    count: usize,
) -> Result<Duration, Failure> {
    let started = Instant::now();
    loop {
        let statuses = kv.get_recurse(&layout.status_prefix(host)).await?.value;
        let statuses: Vec<VolumeStatus> = statuses
            .iter()
            .filter_map(|pair| serde_json::from_slice(&pair.value).ok())
            .collect();
        if let Some(failed) = statuses.iter().find(|s| s.state == VolumeState::Error) {
            return Err(format!(
                "volume {} failed: {}",
                failed.id,
                failed.error.as_deref().unwrap_or("no reason given")
            )
            .into());
        }
        let ready = statuses
            .iter()
            .filter(|status| status.state == VolumeState::Ready)
            .count();
        if ready == count {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("only {ready} of {count} volumes ready after 10 minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn config(host: &str, heartbeat: &str, extra: &[&str]) -> Result<Config, Failure> {
    let mut args = vec![
        "volumed",
        "--sim",
        "--host",
        host,
        "--region",
        "ewr",
        "--zone",
        "ewr-a",
        "--heartbeat-interval",
        heartbeat,
        "--max-volumes",
        "100000",
    ];
    args.extend_from_slice(extra);
    let cli = Cli::try_parse_from(args)?;
    Ok(Config::merge(&cli.options.settings, Settings::default())?)
}

async fn bench(args: Args) -> Result<(), Failure> {
    let server = Server::start(ServerConfig::loopback()).await?;
    let kv = ConsulKv::new(ClientConfig::new(&server.local_addr().to_string())?)?;
    let layout = Layout::default();
    let scratch = tempfile::tempdir()?;
    println!(
        "volumed-bench: {} volumes, idle windows of {}s, heartbeat {}",
        args.volumes, args.idle_secs, args.heartbeat
    );

    // -- 1. In process: restart and idle cost, counted by the simulator.
    let host = HostId::new("bench-a")?;
    let config = config(host.as_str(), &args.heartbeat, &[])?;
    let mut pool_spec = ThinPoolSpec::new(
        VgName::new("vmvg-sim")?,
        LvName::new("pool")?,
        vec![PathBuf::from("/dev/sim0")],
    )?;
    pool_spec.data_size = Some(Bytes(1024 * GIB));
    pool_spec.metadata_size = Some(Bytes(GIB));
    let sim = Arc::new(SimBackend::new(pool_spec));
    let _ = sim.ensure_pool()?;
    let devices = Arc::new(SimDevices::new(sim.clone()));
    let keys = Arc::new(LocalKeyDir::open(scratch.path().join("keys"))?);
    let host_over = |metrics: &Arc<Metrics>| {
        Arc::new(VolumeHost::new(
            Arc::new(CountingBackend::new(sim.clone(), metrics.clone())),
            devices.clone(),
            keys.clone(),
            config.policy,
        ))
    };
    let specs: Vec<VolumeSpec> = (0..args.volumes).map(|_| spec(&host, Bytes(GIB))).collect();
    put_specs(&kv, &layout, &specs).await?;
    let metrics = Arc::new(Metrics::default());
    let volume_host = host_over(&metrics);
    let pool = volume_host.pool_status()?;
    let daemon = Running::spawn(Setup {
        config: config.clone(),
        host: volume_host,
        kv: kv.clone(),
        metrics,
        pool,
        migration: None,
    });
    let converged = wait_ready(&kv, &layout, &host, args.volumes).await?;
    println!(
        "initial converge: {} encrypted volumes created in {:.1}s",
        args.volumes,
        converged.as_secs_f64()
    );
    daemon.stop().await?;

    let before = sim.calls();
    let dm_before = devices.dm_queries();
    let metrics = Arc::new(Metrics::default());
    let volume_host = host_over(&metrics);
    // What the binary does at start: ensure_pool (one report).
    let pool = volume_host.backend().ensure_pool()?.into_inner();
    let started = Instant::now();
    let daemon = Running::spawn(Setup {
        config: config.clone(),
        host: volume_host,
        kv: kv.clone(),
        metrics: metrics.clone(),
        pool,
        migration: None,
    });
    while metrics.watch_updates() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reconciled_after = started.elapsed();
    // Let the settled statuses reach the writer (they are all unchanged).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = sim.calls();
    println!(
        "restart with {} volumes: {} LVM reports, {} LVM changes (ensure_pool + one list), {} device-mapper queries, {} KV writes, full reconcile done {:.0} ms after start",
        args.volumes,
        after.reports - before.reports,
        after.changes - before.changes,
        devices.dm_queries() - dm_before,
        metrics.kv_writes(),
        reconciled_after.as_secs_f64() * 1000.0
    );

    let idle = Duration::from_secs(args.idle_secs);
    let (reports, writes, updates) = (
        sim.calls().reports,
        metrics.kv_writes(),
        metrics.watch_updates(),
    );
    tokio::time::sleep(idle).await;
    println!(
        "idle {}s (in process): {} LVM reports, {} KV writes (host-record heartbeats), {} watch wake-ups",
        args.idle_secs,
        sim.calls().reports - reports,
        metrics.kv_writes() - writes,
        metrics.watch_updates() - updates
    );
    daemon.stop().await?;

    // -- 2. The binary: memory with N volumes, and its own idle counters.
    let binary = std::env::current_exe()?
        .parent()
        .ok_or("the benchmark has no directory")?
        .join("volumed");
    if !binary.exists() {
        return Err(format!(
            "{} is missing: run `cargo build -p volumed` first",
            binary.display()
        )
        .into());
    }
    let listen = free_port()?;
    let host = HostId::new("bench-b")?;
    let specs: Vec<VolumeSpec> = (0..args.volumes).map(|_| spec(&host, Bytes(GIB))).collect();
    put_specs(&kv, &layout, &specs).await?;
    let mut child = Command::new(&binary)
        .args([
            "--sim",
            "--host",
            host.as_str(),
            "--region",
            "ewr",
            "--zone",
            "ewr-a",
            "--pool-data-size",
            "1024GiB",
            "--pool-metadata-size",
            "1GiB",
            "--max-volumes",
            "100000",
            "--heartbeat-interval",
            &args.heartbeat,
            "--consul-addr",
            &server.local_addr().to_string(),
            "--listen",
            &listen.to_string(),
            "--key-dir",
            scratch
                .path()
                .join("keys-b")
                .to_str()
                .ok_or("non-UTF-8 path")?,
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?;
    let result = measure_process(&child, &kv, &layout, &host, args.volumes, listen, idle).await;
    // SAFETY: kill(2) with a pid we spawned and have not reaped; no memory involved.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = wait_exit(&mut child, Duration::from_secs(30))?;
    result?;
    println!("volumed stopped on SIGTERM: {status}");
    server.shutdown().await?;
    Ok(())
}

async fn measure_process(
    child: &Child,
    kv: &ConsulKv,
    layout: &Layout,
    host: &HostId,
    volumes: usize,
    listen: SocketAddr,
    idle: Duration,
) -> Result<(), Failure> {
    let converged = wait_ready(kv, layout, host, volumes).await?;
    println!(
        "volumed --sim process: {volumes} volumes ready after {:.1}s",
        converged.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let scrape = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    let first = http_get(listen, "/metrics").await?;
    tokio::time::sleep(idle).await;
    let second = http_get(listen, "/metrics").await?;
    let (rss, peak) = memory(child.id())?;
    println!(
        "volumed --sim process with {volumes} volumes: RSS {:.1} MiB (peak {:.1} MiB)",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!(
        "idle {}s (process): {} LVM calls, {} KV writes, {} watch wake-ups",
        idle.as_secs(),
        scrape(&second, "volumed_lvm_calls_total ") - scrape(&first, "volumed_lvm_calls_total "),
        scrape(&second, "volumed_kv_writes_total ") - scrape(&first, "volumed_kv_writes_total "),
        scrape(&second, "volumed_watch_updates_total ")
            - scrape(&first, "volumed_watch_updates_total "),
    );
    Ok(())
}

fn free_port() -> Result<SocketAddr, Failure> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// A plain HTTP/1.0 GET: the benchmark needs no client library for one page.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String, Failure> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(error) => return Err(error.into()),
        }
    };
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .ok_or("an answer without a body")?;
    Ok(body)
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory(pid: u32) -> Result<(u64, u64), Failure> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64, Failure> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status").into())
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus, Failure> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            return Err("volumed did not stop within 30s of SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

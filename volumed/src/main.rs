//! volumed: the per-host daemon (see ARCHITECTURE.md and the crate docs).

use clap::Parser;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use volumed::config::{Cli, Command, Config};
use volumed::daemon::{self, Controls, Setup};
use volumed::metrics::Metrics;
use volumed::{gc, http, instance, memory, setup};

fn main() -> ExitCode {
    // Volume keys and the KEK pass through this process: no core dump and
    // no ptrace by an unprivileged user may read them.
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("volumed: cannot make the process non-dumpable: {error}");
        return ExitCode::FAILURE;
    }
    // Before any thread exists.
    let refused = memory::tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, never in the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !refused.is_empty() {
        tracing::warn!(settings = ?refused, "the C library refused these malloc settings");
    }
    let config = match Config::resolve(&cli.options) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("volumed: {error}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    if command == Command::CheckConfig {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("volumed: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let _trim = runtime.spawn(async {
        let mut every = tokio::time::interval(memory::TRIM_INTERVAL);
        loop {
            every.tick().await;
            memory::trim();
        }
    });
    let result = runtime.block_on(async move {
        match command {
            Command::Gc {
                yes,
                allow_empty_desired,
            } => {
                let options = gc::GcOptions {
                    yes,
                    allow_empty_desired,
                };
                run_gc(config, options).await
            }
            _ => run_daemon(config).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("volumed: {error}");
            ExitCode::FAILURE
        }
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// The KV client, key store and host, built on a blocking thread (LVM
/// runs there, and the envelope key store blocks on the runtime).
async fn start(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<(consul_kv::ConsulKv, setup::Built), Failure> {
    let kv = setup::kv_client(config)?;
    let handle = tokio::runtime::Handle::current();
    let built = {
        let config = config.clone();
        let kv = kv.clone();
        tokio::task::spawn_blocking(move || {
            let keys = setup::key_store(&config, &kv, handle)?;
            setup::build(&config, keys, metrics)
        })
        .await??
    };
    Ok((kv, built))
}

async fn run_daemon(config: Config) -> Result<ExitCode, Failure> {
    let _vg_lock = instance::lock_vg(&config.run_dir, &config.vg, &config.host)?;
    let kv = setup::kv_client(&config)?;
    instance::check_host_owner(
        &kv,
        &config.layout,
        &config.host,
        &instance::owner(&config.vg),
        config.heartbeat_interval,
        volumed::worker::now_ms(),
    )
    .await?;
    let metrics = Arc::new(Metrics::default());
    let (kv, built) = start(&config, metrics.clone()).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (resync_tx, resync_rx) = mpsc::unbounded_channel();

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let signals = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = hangup.recv() => {
                    let _ = resync_tx.send(());
                }
            }
        }
        tracing::info!("stop signal received");
        let _ = shutdown_tx.send(true);
    });

    let http_task = match config.listen {
        Some(listen) => {
            let mut stop = shutdown_rx.clone();
            let stall_after = config.heartbeat_interval * 6;
            let (bound, task) = http::serve(listen, metrics.clone(), stall_after, async move {
                let _ = stop.wait_for(|stop| *stop).await;
            })
            .await
            .map_err(|e| format!("cannot listen on {listen} for /metrics: {e}"))?;
            tracing::info!(%bound, "serving /metrics and /healthz");
            Some(task)
        }
        None => None,
    };

    #[cfg(feature = "testing")]
    let timer_only = config.sim;
    #[cfg(not(feature = "testing"))]
    let timer_only = false;
    let room = Arc::new(volume_core::fence::PoolRoom::default());
    let autoextend = volumed::autoextend::spawn(
        built.host.backend().clone(),
        config.growth,
        config.autoextend_interval,
        timer_only,
        room.clone(),
    )
    .map_err(|e| format!("cannot start the pool auto-extend thread: {e}"))?;
    let (fence_tx, fence_rx) = mpsc::unbounded_channel();
    let fences = built
        .host
        .fences()
        .cloned()
        .ok_or("the volume host was built without fences")?;
    let mut fencer =
        volume_core::fence::Fencer::new(built.fence_devices.clone(), config.fence, room, fences);
    let fencer = {
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || {
            volumed::fence::recover(&mut fencer, &metrics);
            fencer
        })
        .await?
    };
    let fencing = volumed::fence::spawn(
        fencer,
        config.fence_interval,
        timer_only,
        metrics.clone(),
        fence_tx,
    )
    .map_err(|e| format!("cannot start the fencing thread: {e}"))?;

    let run = daemon::run(
        Setup {
            config,
            host: built.host,
            kv,
            metrics,
            pool: built.pool,
            migration: built.migration,
        },
        Controls {
            shutdown: shutdown_rx,
            resync: resync_rx,
            fence_changes: Some(fence_rx),
        },
    )
    .await;
    autoextend.stop();
    fencing.stop();
    run?;
    signals.abort();
    if let Some(task) = http_task {
        let _ = task.await;
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_gc(config: Config, options: gc::GcOptions) -> Result<ExitCode, Failure> {
    let yes = options.yes;
    let metrics = Arc::new(Metrics::default());
    let (kv, built) = start(&config, metrics).await?;
    let report = gc::gc_with(&config, &built.host, &kv, options).await?;
    if report.is_empty() {
        println!("no orphans");
        return Ok(ExitCode::SUCCESS);
    }
    let mut failed = false;
    let mut outcome = |deleted: &Option<Result<(), String>>, record_appeared: bool| match deleted {
        None if record_appeared => "kept: its record appeared".to_owned(),
        None => "orphan".to_owned(),
        Some(Ok(())) => "deleted".to_owned(),
        Some(Err(error)) => {
            failed = true;
            format!("delete failed: {error}")
        }
    };
    for orphan in &report.snapshots {
        let snapshot = &orphan.snapshot;
        let what = outcome(&orphan.deleted, orphan.record_appeared);
        println!(
            "{}\t{}\t{what} (snapshot of {})",
            snapshot.id, snapshot.size, snapshot.volume
        );
    }
    for orphan in &report.volumes {
        let volume = &orphan.volume;
        let what = outcome(&orphan.deleted, orphan.record_appeared);
        println!("{}\t{}\t{what}", volume.id, volume.size);
    }
    if !yes {
        println!(
            "{} orphan(s); run `volumed gc --yes` to delete them",
            report.len()
        );
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

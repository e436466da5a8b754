//! The reconcile loop.
//!
//! One task owns all state. It learns the desired records from a watch task
//! (blocking queries, the only KV traffic while idle), the volumes from one
//! `VolumeHost::list` at start (and on a resync), and the results of jobs it
//! spawned. Jobs run at most `max_concurrent` at once, never two for the
//! same volume; a change that arrives while a volume's job runs is picked up
//! when it ends, so operations on one volume run in order.
//!
//! Idle cost: no LVM call and no poll while nothing changes. The heartbeat
//! republishes the host record every `heartbeat_interval` (one KV write)
//! from the cached pool report, which is re-read (one LVM report) after a
//! change, or when older than `pool_refresh_interval`.

use crate::config::Config;
use crate::kv::{self, Guard, WriterCmd, WriterHandle};
use crate::metrics::Metrics;
use crate::migrations::{MigrationEnv, MigrationLoop};
use crate::notify;
use crate::plan::{self, Desired, DesiredSet, Work};
use crate::volume_autoextend::{self, CheckReport, Tracker, Watched};
use crate::worker::{self, Ctx, Event, Failure, Job, Outcome, Retry};
use consul_kv::client::{WatchOptions, WatchUpdate};
use consul_kv::ConsulKv;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use volume_control::layout::{HostRecord, VolumeState, VolumeStatus};
use volume_core::backend::PoolStatus;
use volume_core::fence::Fences;
use volume_core::health::PoolHealth;
use volume_core::host::{self, VolumeHost};
use volume_core::names::VolumeId;

/// What the daemon runs with: the host is built by the caller (LVM or the
/// simulator), the pool already ensured.
pub struct Setup {
    pub config: Config,
    pub host: Arc<VolumeHost>,
    pub kv: ConsulKv,
    pub metrics: Arc<Metrics>,
    /// The pool as `ensure_pool` reported it.
    pub pool: PoolStatus,
    /// This host's part in moves and forks; `None`: it takes none.
    pub migration: Option<Arc<MigrationEnv>>,
}

/// How the outside steers a running daemon.
pub struct Controls {
    /// Becomes `true` to stop gracefully.
    pub shutdown: watch::Receiver<bool>,
    /// Each message re-lists the volumes and reconsiders every one.
    pub resync: mpsc::UnboundedReceiver<()>,
    /// Each message says a volume was fenced or unfenced
    /// ([`crate::fence`]): statuses and the host record are republished.
    pub fence_changes: Option<mpsc::UnboundedReceiver<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("stopped before the volumes could be listed")]
    StoppedBeforeList,
}

/// Longest wait for running jobs at shutdown: they hold LVM and dm-crypt
/// steps that are safe to interrupt only by a crash, never by a cancel.
const JOB_DRAIN: Duration = Duration::from_secs(120);
const FINAL_FLUSH: Duration = Duration::from_secs(5);
/// Changes are gathered this long before the pool is read again.
const REFRESH_DEBOUNCE: Duration = Duration::from_millis(200);
/// ... and this long while other jobs still run: a burst of creates reads
/// the pool every so often, not after each job (each read is a report of
/// the whole VG on the LVM thread the jobs wait for), and once more as
/// soon as the last job is done.
const BUSY_REFRESH_DEBOUNCE: Duration = Duration::from_secs(2);
/// The ledger is checked against the desired records every this many
/// heartbeats (first at start-up); a drift is corrected on the second
/// check that sees it unchanged.
const LEDGER_CHECK_HEARTBEATS: u32 = 3;

#[derive(Debug, Default)]
struct Volume {
    desired: Option<Desired>,
    observed: Option<host::LocalVolume>,
    running: bool,
    /// A newer record or fact arrived while the job ran.
    dirty: bool,
    /// The last job failed; what unblocks it is in `failure.retry`.
    failure: Option<Failure>,
    failures: u32,
    retry_at: Option<Instant>,
    /// The last status handed to the writer (metrics; republished while
    /// the volume is blocked by a failure).
    last_status: Option<(Guard, VolumeStatus)>,
}

struct Daemon {
    config: Config,
    ctx: Arc<Ctx>,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
    volumes: BTreeMap<VolumeId, Volume>,
    /// False until the first desired set arrived: nothing is decided before.
    have_desired: bool,
    stray_logged: BTreeSet<String>,
    pool: PoolStatus,
    pool_read_at: Instant,
    pool_stale: bool,
    refresh_due: Option<Instant>,
    refreshing: bool,
    jobs: Arc<Semaphore>,
    running: usize,
    events_tx: mpsc::UnboundedSender<Event>,
    pool_tx: mpsc::UnboundedSender<Result<PoolStatus, String>>,
    list_tx: mpsc::UnboundedSender<Result<Vec<host::LocalVolume>, String>>,
    kv_down: bool,
    shutting_down: bool,
    /// `<machine id>:<vg>`, published in the host record.
    owner: String,
    ledger_tx: mpsc::UnboundedSender<Result<kv::LedgerReport, kv::CommitError>>,
    ledger_checking: bool,
    /// The drift the last check saw; the next check corrects it if unchanged.
    ledger_drift: Option<kv::LedgerDrift>,
    /// Index of the last desired set applied.
    desired_index: u64,
    /// The watch blocks at an index the store no longer has: start it over.
    restart_watch: bool,
    /// Volume auto-extend between checks.
    volume_growth: Tracker,
    growth_tx: mpsc::UnboundedSender<Result<CheckReport, String>>,
    fences: Option<Arc<Fences>>,
}

/// Runs until `controls.shutdown` turns true; then waits for running jobs
/// and flushes pending writes.
pub async fn run(setup: Setup, mut controls: Controls) -> Result<(), DaemonError> {
    let Setup {
        config,
        host,
        kv,
        metrics,
        pool,
        migration,
    } = setup;
    metrics.set_pool(&pool);
    // A pool already unhealthy at start-up is a transition from the healthy
    // state the operator last saw (or assumes).
    log_health_transition(PoolHealth::Healthy, pool.usage.health);
    metrics.loop_alive();
    let (writer, writer_task) = kv::Writer::spawn(
        kv.clone(),
        config.layout.clone(),
        config.host.clone(),
        metrics.clone(),
        config.retry_max,
    );
    let snapshot_loop = crate::snapshots::SnapshotLoop {
        host: host.clone(),
        kv: kv.clone(),
        layout: config.layout.clone(),
        host_id: config.host.clone(),
        metrics: metrics.clone(),
        period: config.snapshot_period,
        interval: config.snapshot_check_interval,
        watch: WatchOptions {
            wait: config.watch_wait,
            backoff_max: config.retry_max,
            ..WatchOptions::default()
        },
    };
    let snapshot_task = tokio::spawn(snapshot_loop.run(controls.shutdown.clone()));
    let migration_task = migration.clone().map(|env| {
        let migration_loop = MigrationLoop {
            host: host.clone(),
            kv: kv.clone(),
            layout: config.layout.clone(),
            host_id: config.host.clone(),
            metrics: metrics.clone(),
            env,
            watch: WatchOptions {
                wait: config.watch_wait,
                backoff_max: config.retry_max,
                ..WatchOptions::default()
            },
        };
        tokio::spawn(migration_loop.run(controls.shutdown.clone()))
    });
    let ctx = Arc::new(Ctx {
        host,
        kv: kv.clone(),
        layout: config.layout.clone(),
        host_id: config.host.clone(),
        jails: config.jails.clone(),
        metrics: metrics.clone(),
        migration,
        stopping: std::sync::atomic::AtomicBool::new(false),
    });
    if let Some(jails) = &config.jails {
        if let Err(error) = std::fs::create_dir_all(&jails.dir) {
            tracing::error!(dir = %jails.dir.display(), %error, "cannot make the jails directory; exposing will fail");
        }
    }

    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let (pool_tx, mut pool_rx) = mpsc::unbounded_channel();
    let (list_tx, mut list_rx) = mpsc::unbounded_channel();
    let (ledger_tx, mut ledger_rx) = mpsc::unbounded_channel();
    let (growth_tx, mut growth_rx) = mpsc::unbounded_channel();
    let owner = crate::instance::owner(&config.vg);
    let volume_growth = Tracker::new(config.volume_autoextend_interval);
    let mut daemon = Daemon {
        jobs: Arc::new(Semaphore::new(config.max_concurrent)),
        config,
        ctx,
        writer,
        metrics: metrics.clone(),
        volumes: BTreeMap::new(),
        have_desired: false,
        stray_logged: BTreeSet::new(),
        pool,
        pool_read_at: Instant::now(),
        pool_stale: false,
        refresh_due: None,
        refreshing: false,
        running: 0,
        events_tx,
        pool_tx,
        list_tx,
        kv_down: false,
        shutting_down: false,
        owner,
        ledger_tx,
        ledger_checking: false,
        ledger_drift: None,
        desired_index: 0,
        restart_watch: false,
        volume_growth,
        growth_tx,
        fences: None,
    };
    daemon.fences = daemon.ctx.host.fences().cloned();
    let unfence_task = daemon.fences.clone().map(|fences| {
        tokio::spawn(watch_unfence_requests(
            kv.clone(),
            daemon.config.layout.clone(),
            daemon.config.host.clone(),
            fences,
            daemon.config.retry_max,
        ))
    });
    let mut fence_changes = controls.fence_changes.take();

    // The volumes first: one report. A failed list is retried, never read
    // as "no volumes".
    let started = Instant::now();
    let mut failures = 0;
    let listed = loop {
        daemon.start_list();
        let result = tokio::select! {
            result = list_rx.recv() => result.expect("the daemon holds a sender"),
            _ = controls.shutdown.wait_for(|stop| *stop) => {
                return Err(DaemonError::StoppedBeforeList);
            }
        };
        match result {
            Ok(listed) => break listed,
            Err(error) => {
                failures += 1;
                metrics.error("list");
                tracing::error!(%error, "listing the volumes failed; retrying");
                tokio::time::sleep(kv::backoff(failures, daemon.config.retry_max)).await;
            }
        }
    };
    daemon.apply_list(listed);
    metrics.observe("full", started.elapsed());
    daemon.publish_host();
    notify::ready();
    notify::status("serving; waiting for the desired records");
    tracing::info!(
        host = %daemon.config.host,
        volumes = daemon.volumes.len(),
        "volumes listed; watching the desired records"
    );

    let (watch_tx, mut watch_rx) = mpsc::channel(1);
    let prefix = daemon.config.layout.desired_prefix(&daemon.config.host);
    let options = WatchOptions {
        wait: daemon.config.watch_wait,
        backoff_max: daemon.config.retry_max,
        ..WatchOptions::default()
    };
    let start_watch = || {
        tokio::spawn(watch_desired(
            kv.clone(),
            prefix.clone(),
            options.clone(),
            watch_tx.clone(),
        ))
    };
    let mut watch_task = start_watch();

    let mut heartbeat = tokio::time::interval(daemon.config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.reset();
    let mut ledger_check =
        tokio::time::interval(daemon.config.heartbeat_interval * LEDGER_CHECK_HEARTBEATS);
    ledger_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut volume_growth_check = tokio::time::interval(daemon.config.volume_autoextend_interval);
    volume_growth_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watchdog_every = notify::watchdog_interval();
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    let mut drain_deadline: Option<Instant> = None;
    loop {
        metrics.loop_alive();
        if daemon.shutting_down && daemon.running == 0 {
            break;
        }
        let retry_at = daemon.next_retry();
        let refresh_due = daemon.refresh_due;
        tokio::select! {
            _ = controls.shutdown.wait_for(|stop| *stop), if !daemon.shutting_down => {
                tracing::info!(running = daemon.running, "stopping: waiting for running operations");
                notify::stopping();
                daemon.shutting_down = true;
                daemon.ctx.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
                drain_deadline = Some(Instant::now() + JOB_DRAIN);
            }
            () = sleep_until_opt(drain_deadline), if drain_deadline.is_some() => {
                tracing::error!(running = daemon.running, "operations still running at the stop deadline; leaving them to the next start");
                break;
            }
            Some(update) = watch_rx.recv(), if !daemon.shutting_down => daemon.on_watch(update),
            Some(event) = events_rx.recv() => daemon.on_event(event),
            Some(result) = pool_rx.recv() => daemon.on_pool(result),
            Some(result) = list_rx.recv() => {
                match result {
                    Ok(listed) => daemon.apply_list(listed),
                    Err(error) => {
                        metrics.error("list");
                        tracing::error!(%error, "resync: listing the volumes failed; keeping what is known");
                    }
                }
            }
            Some(()) = recv_opt(&mut fence_changes) => daemon.on_fence_change(),
            Some(()) = controls.resync.recv(), if !daemon.shutting_down => {
                tracing::info!("resync: listing the volumes again");
                daemon.writer.send(WriterCmd::Reseed);
                daemon.start_list();
            }
            _ = heartbeat.tick(), if !daemon.shutting_down => daemon.heartbeat(),
            _ = ledger_check.tick(), if !daemon.shutting_down => daemon.check_ledger(),
            Some(result) = ledger_rx.recv() => daemon.on_ledger(result),
            _ = volume_growth_check.tick(), if !daemon.shutting_down => daemon.check_volume_growth(),
            Some(result) = growth_rx.recv() => daemon.on_volume_growth(result),
            _ = watchdog.tick(), if watchdog_every.is_some() => notify::watchdog(),
            () = sleep_until_opt(retry_at), if retry_at.is_some() && !daemon.shutting_down => daemon.retry_due(),
            () = sleep_until_opt(refresh_due), if refresh_due.is_some() && !daemon.shutting_down => {
                daemon.refresh_due = None;
                daemon.refresh_pool();
            }
        }
        if std::mem::take(&mut daemon.restart_watch) {
            watch_task.abort();
            watch_task = start_watch();
        }
    }
    watch_task.abort();
    if let Some(task) = unfence_task {
        task.abort();
    }
    daemon.publish_host();
    if tokio::time::timeout(FINAL_FLUSH, daemon.writer.flush())
        .await
        .is_err()
    {
        tracing::warn!("pending KV writes were not all flushed before the stop");
    }
    drop(daemon);
    let _ = tokio::time::timeout(FINAL_FLUSH, writer_task).await;
    // It stops between passes; a pass in flight holds LVM steps that only
    // a crash may interrupt.
    let _ = tokio::time::timeout(JOB_DRAIN, snapshot_task).await;
    if let Some(task) = migration_task {
        let _ = tokio::time::timeout(JOB_DRAIN, task).await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn recv_opt(rx: &mut Option<mpsc::UnboundedReceiver<()>>) -> Option<()> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Takes `volctl unfence` requests from `<root>/unfence/<host>/`: each is
/// handed to the fencer (lifted at its next check, a no-op for a volume
/// that is not fenced) and deleted, guarded by its index so a newer
/// request for the same volume stays.
async fn watch_unfence_requests(
    kv: ConsulKv,
    layout: volume_control::layout::Layout,
    host: volume_core::names::HostId,
    fences: Arc<Fences>,
    backoff_max: Duration,
) {
    let prefix = layout.unfence_prefix(&host);
    let options = WatchOptions {
        backoff_max,
        ..WatchOptions::default()
    };
    let mut watch = kv.watch_prefix(prefix.clone(), options);
    loop {
        let update = match watch.next().await {
            Ok(update) => update,
            Err(error) => {
                tracing::debug!(%error, "watching unfence requests failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for entry in update.entries {
            let Some(id) = entry
                .key
                .strip_prefix(&prefix)
                .and_then(|rest| VolumeId::new(rest).ok())
            else {
                continue;
            };
            tracing::info!(volume = %id, "unfence requested");
            fences.request_unfence(id);
            if let Err(error) = kv.delete_cas(&entry.key, entry.modify_index).await {
                tracing::warn!(key = %entry.key, %error, "could not delete a handled unfence request");
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Forwards the watch's results; the loop coalesces nothing: each update
/// carries the whole prefix.
async fn watch_desired(
    kv: ConsulKv,
    prefix: String,
    options: WatchOptions,
    tx: mpsc::Sender<Result<WatchUpdate, consul_kv::Error>>,
) {
    let mut watch = kv.watch_prefix(prefix.clone(), options.clone());
    let mut failures = 0;
    loop {
        let result = watch.next().await;
        let failed = result.is_err();
        if tx.send(result).await.is_err() {
            return;
        }
        if failed {
            // The store that answers next may be another one (a fresh data
            // dir at the same address). A blocking read at the old index
            // would sit out the whole wait there before the loss showed,
            // and the host record would keep claiming the lost records.
            // So, after a backoff, start over with a plain read.
            failures += 1;
            tokio::time::sleep(kv::backoff(failures, options.backoff_max)).await;
            watch = kv.watch_prefix(prefix.clone(), options.clone());
        } else {
            failures = 0;
        }
    }
}

impl Daemon {
    fn extent(&self) -> volume_core::units::Bytes {
        self.pool.extent_size.bytes()
    }

    fn start_list(&self) {
        let host = self.ctx.host.clone();
        let tx = self.list_tx.clone();
        tokio::spawn(async move {
            let result = match tokio::task::spawn_blocking(move || host.list()).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(join) => Err(format!("the listing thread failed: {join}")),
            };
            let _ = tx.send(result);
        });
    }

    /// Replaces what is known of every volume not busy in a job, and
    /// reconsiders all of them.
    fn apply_list(&mut self, listed: Vec<host::LocalVolume>) {
        let mut listed: BTreeMap<VolumeId, host::LocalVolume> =
            listed.into_iter().map(|v| (v.id.clone(), v)).collect();
        let ids: BTreeSet<VolumeId> = self
            .volumes
            .keys()
            .cloned()
            .chain(listed.keys().cloned())
            .collect();
        for id in ids {
            let volume = self.volumes.entry(id.clone()).or_default();
            let fresh = listed.remove(&id);
            if volume.running {
                // The job's own result is newer than this list.
                volume.dirty = true;
                continue;
            }
            volume.observed = fresh;
            volume.failure = None;
            volume.retry_at = None;
        }
        self.reconsider_all();
    }

    fn reconsider_all(&mut self) {
        if !self.have_desired {
            self.update_gauges();
            return;
        }
        let ids: Vec<VolumeId> = self.volumes.keys().cloned().collect();
        self.writer
            .send(WriterCmd::Known(ids.iter().cloned().collect()));
        for id in ids {
            self.consider(&id);
        }
        self.update_gauges();
        self.publish_host_soon();
    }

    fn on_watch(&mut self, update: Result<WatchUpdate, consul_kv::Error>) {
        let update = match update {
            Ok(update) => update,
            Err(error) => {
                self.metrics.error("watch");
                self.metrics.set_kv_up(false);
                if !self.kv_down {
                    tracing::warn!(%error, "the KV store is unreachable; serving the volumes as they are, retrying with backoff");
                    notify::status("serving; the KV store is unreachable");
                }
                self.kv_down = true;
                return;
            }
        };
        self.metrics.watch_update();
        self.metrics.set_kv_up(true);
        self.desired_index = update.index;
        let recovered = std::mem::take(&mut self.kv_down);
        if recovered || update.reset {
            // A restarted or replaced store may have lost what was written.
            tracing::info!(
                reset = update.reset,
                "the KV store answers again; republishing"
            );
            self.writer.send(WriterCmd::Reseed);
        }
        let set = plan::parse_desired(&self.config.layout, &self.config.host, &update.entries);
        let first = !self.have_desired;
        self.have_desired = true;
        if first {
            notify::status("serving");
        }
        self.apply_desired(set, first || recovered || update.reset);
        if first {
            self.check_ledger();
        }
    }

    fn apply_desired(&mut self, set: DesiredSet, everything: bool) {
        let DesiredSet {
            mut volumes,
            stray_keys,
        } = set;
        self.metrics.set_stray_keys(stray_keys.len());
        for (key, reason) in &stray_keys {
            if self.stray_logged.insert(key.clone()) {
                self.metrics.error("malformed");
                tracing::warn!(%key, %reason, "a desired key names no volume; ignored");
            }
        }
        let ids: BTreeSet<VolumeId> = self
            .volumes
            .keys()
            .cloned()
            .chain(volumes.keys().cloned())
            .collect();
        for id in ids {
            let new = volumes.remove(&id);
            let volume = self.volumes.entry(id.clone()).or_default();
            let changed = volume.desired != new;
            if changed {
                if let Some(Desired::Malformed { error, .. }) = &new {
                    self.metrics.error("malformed");
                    tracing::warn!(volume = %id, %error, "malformed desired record");
                }
                volume.desired = new;
                volume.failure = None;
                volume.failures = 0;
                volume.retry_at = None;
            }
            if changed || everything {
                self.consider(&id);
            }
        }
        if everything {
            self.writer
                .send(WriterCmd::Known(self.volumes.keys().cloned().collect()));
        }
        self.update_gauges();
        self.publish_host_soon();
    }

    /// Decides what a volume needs and publishes its status or starts its job.
    fn consider(&mut self, id: &VolumeId) {
        let jail = self.ctx.jail_of(id);
        let extent = self.extent();
        let Some(volume) = self.volumes.get_mut(id) else {
            return;
        };
        if volume.running {
            volume.dirty = true;
            return;
        }
        if let Some(failure) = &volume.failure {
            // Blocked until what it waits for happens; its error status
            // stands (sent again: the store may have been replaced).
            if failure.retry != Retry::Backoff || volume.retry_at.is_some() {
                if let Some((guard, status)) = volume.last_status.clone() {
                    self.writer.send(WriterCmd::Status {
                        id: id.clone(),
                        guard,
                        status: Some(status),
                    });
                }
                return;
            }
        }
        let work = plan::decide(
            volume.desired.as_ref(),
            volume.observed.as_ref(),
            jail.as_ref(),
            extent,
        );
        let now = worker::now_ms();
        let desired_index = volume.desired.as_ref().map(Desired::index);
        let spec = volume.desired.as_ref().and_then(Desired::spec).cloned();
        let guard = desired_index.map_or(Guard::NoDesired, Guard::Desired);
        let publish = |state, error| {
            plan::status(
                id,
                state,
                spec.as_ref(),
                volume.observed.as_ref(),
                jail.as_ref(),
                error,
                now,
            )
        };
        match work {
            Work::Settled => {
                let status = publish(VolumeState::Ready, None);
                self.set_status(id, guard, Some(status));
            }
            Work::Orphan => {
                let status = publish(VolumeState::Orphan, None);
                self.set_status(id, Guard::NoDesired, Some(status));
            }
            Work::Refuse(reason) => {
                let status = publish(VolumeState::Error, Some(reason));
                self.set_status(id, guard, Some(status));
            }
            Work::Gone => {
                self.volumes.remove(id);
                self.writer.send(WriterCmd::Status {
                    id: id.clone(),
                    guard: Guard::NoDesired,
                    status: None,
                });
            }
            Work::Converge(_) | Work::Destroy => {
                let Some(desired) = volume.desired.clone() else {
                    return;
                };
                if self.shutting_down {
                    return;
                }
                volume.running = true;
                volume.dirty = false;
                volume.retry_at = None;
                let job = Job {
                    id: id.clone(),
                    desired,
                    observed: volume.observed.clone(),
                    work,
                };
                self.running += 1;
                let ctx = self.ctx.clone();
                let jobs = self.jobs.clone();
                let events = self.events_tx.clone();
                tokio::spawn(async move {
                    let _permit = jobs.acquire_owned().await;
                    let outcome = worker::run(ctx, job, events.clone()).await;
                    let _ = events.send(Event::Done(Box::new(outcome)));
                });
            }
        }
    }

    fn set_status(&mut self, id: &VolumeId, guard: Guard, mut status: Option<VolumeStatus>) {
        if let Some(status) = &mut status {
            status.auto_extend_refused = self.volume_growth.refused.get(id).cloned();
        }
        if let (Some(status), Some(fences)) = (status.as_mut(), &self.fences) {
            status.fenced = fences.reason(id);
        }
        if let Some(volume) = self.volumes.get_mut(id) {
            volume.last_status = status.clone().map(|status| (guard, status));
        }
        self.writer.send(WriterCmd::Status {
            id: id.clone(),
            guard,
            status,
        });
    }

    /// A fence went up or came down: every status says so again, and the
    /// host record's pool health (`in_reserve` while contained) is re-read.
    fn on_fence_change(&mut self) {
        let ids: Vec<VolumeId> = self.volumes.keys().cloned().collect();
        for id in ids {
            let Some(volume) = self.volumes.get(&id) else {
                continue;
            };
            if let Some((guard, status)) = volume.last_status.clone() {
                self.set_status(&id, guard, Some(status));
            }
        }
        self.pool_stale = true;
        self.refresh_pool();
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Progress { id, guard, status } => {
                self.set_status(&id, guard, Some(status));
                self.update_gauges();
            }
            Event::Done(outcome) => self.on_done(*outcome),
        }
    }

    fn on_done(&mut self, outcome: Outcome) {
        self.running = self.running.saturating_sub(1);
        let Outcome {
            id,
            desired_index,
            observed,
            status,
            failure,
            destroyed,
            changed,
        } = outcome;
        if changed {
            self.pool_stale = true;
        }
        if self.pool_stale {
            let soon = Instant::now()
                + if self.running > 0 {
                    BUSY_REFRESH_DEBOUNCE
                } else {
                    REFRESH_DEBOUNCE
                };
            let due = self.refresh_due.get_or_insert(soon);
            *due = (*due).min(soon);
        }
        let retry_max = self.config.retry_max;
        let Some(volume) = self.volumes.get_mut(&id) else {
            return;
        };
        volume.running = false;
        volume.observed = observed;
        if destroyed {
            self.writer.send(WriterCmd::Forget(id.clone()));
            let record_now = volume.desired.as_ref().map(Desired::index);
            if record_now == Some(desired_index) {
                // The watch will report the record gone; until then it is.
                volume.desired = None;
            }
            let again = volume.dirty || record_now != Some(desired_index);
            if again {
                volume.dirty = false;
                self.consider(&id);
            } else {
                self.volumes.remove(&id);
            }
            // Space came free: volumes refused for lack of it try again.
            let waiting: Vec<VolumeId> = self
                .volumes
                .iter()
                .filter(|(_, v)| {
                    v.failure
                        .as_ref()
                        .is_some_and(|f| f.retry == Retry::WhenSpaceFrees)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in waiting {
                if let Some(volume) = self.volumes.get_mut(&id) {
                    volume.failure = None;
                }
                self.consider(&id);
            }
            self.update_gauges();
            self.publish_host_soon();
            return;
        }
        match failure {
            Some(failure) => {
                volume.failures = volume.failures.saturating_add(1);
                if failure.retry == Retry::Backoff {
                    volume.retry_at =
                        Some(Instant::now() + kv::backoff(volume.failures, retry_max));
                }
                volume.failure = Some(failure);
            }
            None => {
                volume.failure = None;
                volume.failures = 0;
                volume.retry_at = None;
            }
        }
        if let Some(status) = status {
            self.set_status(&id, Guard::Desired(desired_index), Some(status));
        }
        let Some(volume) = self.volumes.get_mut(&id) else {
            return;
        };
        let record_now = volume.desired.as_ref().map(Desired::index);
        if volume.dirty || record_now != Some(desired_index) {
            volume.dirty = false;
            if record_now != Some(desired_index) {
                volume.failure = None;
                volume.retry_at = None;
            }
            self.consider(&id);
        }
        self.update_gauges();
        self.publish_host_soon();
    }

    fn next_retry(&self) -> Option<Instant> {
        self.volumes
            .values()
            .filter(|v| !v.running)
            .filter_map(|v| v.retry_at)
            .min()
    }

    fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<VolumeId> = self
            .volumes
            .iter()
            .filter(|(_, v)| !v.running && v.retry_at.is_some_and(|at| at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(volume) = self.volumes.get_mut(&id) {
                volume.retry_at = None;
            }
            self.consider(&id);
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        for volume in self.volumes.values() {
            if let Some((_, status)) = &volume.last_status {
                *counts.entry(status.state.as_str()).or_default() += 1;
            }
        }
        self.metrics.set_volume_states(counts);
        self.metrics.set_orphans(self.orphans().len());
    }

    /// Our volumes with no desired record, valid or not. One whose worker
    /// is still running is not: a destroy's commit deletes the record
    /// before the worker reports back, and the watch may tell us first.
    fn orphans(&self) -> Vec<VolumeId> {
        if !self.have_desired {
            return Vec::new();
        }
        self.volumes
            .iter()
            .filter(|(_, v)| v.desired.is_none() && v.observed.is_some() && !v.running)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn heartbeat(&mut self) {
        let refresh = self.config.pool_refresh_interval;
        let old = !refresh.is_zero() && self.pool_read_at.elapsed() >= refresh;
        if (self.pool_stale || old) && !self.refreshing {
            self.refresh_pool();
        } else {
            self.publish_host();
        }
    }

    /// Reads the pool (one LVM report) and publishes the host record.
    fn refresh_pool(&mut self) {
        if self.refreshing {
            self.refresh_due = Some(Instant::now() + REFRESH_DEBOUNCE);
            return;
        }
        self.refreshing = true;
        self.pool_stale = false;
        let host = self.ctx.host.clone();
        let tx = self.pool_tx.clone();
        tokio::spawn(async move {
            let result = match tokio::task::spawn_blocking(move || host.pool_status()).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(join) => Err(format!("the pool report's thread failed: {join}")),
            };
            let _ = tx.send(result);
        });
    }

    fn on_pool(&mut self, result: Result<PoolStatus, String>) {
        self.refreshing = false;
        match result {
            Ok(pool) => {
                self.metrics.set_pool(&pool);
                log_health_transition(self.pool.usage.health, pool.usage.health);
                self.pool = pool;
                self.pool_read_at = Instant::now();
            }
            Err(error) => {
                self.metrics.error("pool");
                self.pool_stale = true;
                tracing::error!(%error, "reading the pool failed; publishing the last report");
            }
        }
        self.publish_host();
    }

    /// Publishes soon, from a fresh pool report if something changed.
    fn publish_host_soon(&mut self) {
        if self.pool_stale {
            self.refresh_due
                .get_or_insert(Instant::now() + REFRESH_DEBOUNCE);
        } else {
            self.publish_host();
        }
    }

    /// Starts a ledger check, once the desired records have been seen.
    fn check_ledger(&mut self) {
        if !self.have_desired || self.ledger_checking {
            return;
        }
        self.ledger_checking = true;
        let kv = self.ctx.kv.clone();
        let layout = self.config.layout.clone();
        let host = self.config.host.clone();
        let seen = self.ledger_drift;
        let metrics = self.metrics.clone();
        let tx = self.ledger_tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(kv::check_ledger(&kv, &layout, &host, seen, &metrics).await);
        });
    }

    fn on_ledger(&mut self, result: Result<kv::LedgerReport, kv::CommitError>) {
        self.ledger_checking = false;
        self.ledger_drift = None;
        let result = result.map(|report| {
            if report.desired.index < self.desired_index {
                // A replaced or restored store, noticed before the watch:
                // what it holds is the truth now.
                tracing::info!(
                    previous = self.desired_index,
                    current = report.desired.index,
                    "the desired records' index went backwards; resynchronising"
                );
                self.restart_watch = true;
                self.on_watch(Ok(WatchUpdate {
                    index: report.desired.index,
                    entries: report.desired.value,
                    reset: true,
                }));
            }
            report.check
        });
        match result {
            Ok(kv::LedgerCheck::Consistent) => {}
            Ok(kv::LedgerCheck::Drift(drift)) => self.ledger_drift = Some(drift),
            Ok(kv::LedgerCheck::Repaired(drift)) => {
                self.metrics.ledger_repaired();
                tracing::warn!(
                    recorded_reserved = %drift.recorded.reserved,
                    recorded_volumes = drift.recorded.volumes,
                    reserved = %drift.computed.reserved,
                    volumes = drift.computed.volumes,
                    "the ledger disagreed with the desired records; corrected it"
                );
            }
            Ok(kv::LedgerCheck::Unknowable { key }) => {
                tracing::warn!(%key, "a desired record does not parse; the ledger is not checked");
            }
            Err(error) => {
                self.metrics.error("ledger");
                tracing::warn!(%error, "checking the ledger failed; trying again later");
            }
        }
    }

    fn publish_host(&self) {
        self.writer
            .send(WriterCmd::Host(Box::new(self.host_record())));
    }

    fn host_record(&self) -> HostRecord {
        HostRecord {
            id: self.config.host.clone(),
            region: self.config.region.clone(),
            zone: self.config.zone.clone(),
            pool: self.pool.usage,
            policy: self.config.policy,
            heartbeat_ms: worker::now_ms(),
            orphans: self.orphans(),
            owner: Some(self.owner.clone()),
            migration: self.ctx.migration.as_ref().map(|env| env.endpoint.clone()),
        }
    }

    /// Starts a volume auto-extend check when a settled volume has
    /// auto-extend (no LVM or KV call otherwise).
    fn check_volume_growth(&mut self) {
        if !self.have_desired || self.volume_growth.checking {
            return;
        }
        let extent = self.extent();
        let with_rule: Vec<VolumeId> = self
            .volumes
            .iter()
            .filter(|(_, v)| {
                v.desired
                    .as_ref()
                    .and_then(Desired::spec)
                    .is_some_and(|spec| spec.auto_extend.is_some() && !spec.destroy)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in self.volume_growth.retain(&with_rule) {
            self.consider(&id);
        }
        let now = Instant::now();
        let watched: Vec<Watched> = with_rule
            .iter()
            .filter(|id| self.volume_growth.may_try(id, now))
            .filter_map(|id| {
                let volume = &self.volumes[id];
                let Some(Desired::Valid { spec, index }) = &volume.desired else {
                    return None;
                };
                let settled = !volume.running
                    && volume.failure.is_none()
                    && plan::decide(
                        volume.desired.as_ref(),
                        volume.observed.as_ref(),
                        None,
                        extent,
                    ) == Work::Settled;
                settled.then(|| Watched {
                    spec: spec.as_ref().clone(),
                    desired_index: *index,
                })
            })
            .collect();
        if watched.is_empty() {
            return;
        }
        self.volume_growth.checking = true;
        let check = volume_autoextend::check(volume_autoextend::Check {
            volume_host: self.ctx.host.clone(),
            kv: self.ctx.kv.clone(),
            layout: self.config.layout.clone(),
            host: self.host_record(),
            candidates: watched,
            extent,
            max_age: self.config.fs_usage_max_age,
            metrics: self.metrics.clone(),
        });
        let tx = self.growth_tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(check.await);
        });
    }

    fn on_volume_growth(&mut self, result: Result<CheckReport, String>) {
        self.volume_growth.checking = false;
        match result {
            Ok(report) => {
                for id in self.volume_growth.apply(report, &self.metrics) {
                    if !self.volumes.get(&id).is_some_and(|v| v.running) {
                        self.consider(&id);
                    }
                }
            }
            Err(error) => {
                self.metrics.error("volume_autoextend");
                tracing::warn!(%error, "volume auto-extend check failed; trying again next interval");
            }
        }
    }
}

/// One log line when the pool's health changes (never one per heartbeat).
fn log_health_transition(before: PoolHealth, after: PoolHealth) {
    if before == after {
        return;
    }
    if after.takes_writes() {
        tracing::info!(health = %after, previous = %before, "thin pool healthy again");
    } else {
        tracing::warn!(
            health = %after,
            previous = %before,
            reason = after.reason(),
            "thin pool cannot take writes; no new space is promised"
        );
    }
}

/// A daemon running as a task of the current runtime (tests, benchmarks,
/// embedding).
pub struct Running {
    shutdown: watch::Sender<bool>,
    resync: mpsc::UnboundedSender<()>,
    task: tokio::task::JoinHandle<Result<(), DaemonError>>,
}

impl Running {
    pub fn spawn(setup: Setup) -> Running {
        Running::spawn_with_fence_changes(setup, None)
    }

    /// [`Running::spawn`], woken by a fencing thread's changes
    /// ([`crate::fence::spawn`]).
    pub fn spawn_with_fence_changes(
        setup: Setup,
        fence_changes: Option<mpsc::UnboundedReceiver<()>>,
    ) -> Running {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (resync, resync_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(
            setup,
            Controls {
                shutdown: shutdown_rx,
                resync: resync_rx,
                fence_changes,
            },
        ));
        Running {
            shutdown,
            resync,
            task,
        }
    }

    /// Lists the volumes again and reconsiders every one (as SIGHUP does).
    pub fn resync(&self) {
        let _ = self.resync.send(());
    }

    /// Stops gracefully, as SIGTERM does.
    pub async fn stop(self) -> Result<(), DaemonError> {
        let _ = self.shutdown.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
}

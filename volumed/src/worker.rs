//! One job: converge one volume to its desired record, or destroy it.
//!
//! [`VolumeHost`] calls block (LVM, libcryptsetup, mkfs), so each runs on a
//! blocking thread; the daemon bounds how many jobs run at once and never
//! runs two jobs for the same volume.

use crate::config::JailConfig;
use crate::kv::{self, Committed, Guard};
use crate::metrics::Metrics;
use crate::plan::{self, Desired, Steps, Work};
use consul_kv::ConsulKv;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use volume_control::layout::{Layout, VolumeSource, VolumeState, VolumeStatus};
use volume_core::actions::ExtendAction;
use volume_core::host::{self, Encryption, HostError, VolumeHost};
use volume_core::jail::{JailPath, NodeOwner};
use volume_core::keys::KeyError;
use volume_core::names::{HostId, MigrationId, VolumeId};

/// What every job shares.
pub struct Ctx {
    pub host: Arc<VolumeHost>,
    pub kv: ConsulKv,
    pub layout: Layout,
    pub host_id: HostId,
    pub jails: Option<JailConfig>,
    pub metrics: Arc<Metrics>,
    /// This host's part in moves and forks; `None`: it takes none.
    pub migration: Option<Arc<crate::migrations::MigrationEnv>>,
    /// Set at shutdown: jobs still waiting for a slot give up unstarted.
    pub stopping: std::sync::atomic::AtomicBool,
}

impl Ctx {
    /// Where a volume is exposed: `<jails dir>/<volume id>/<node>`.
    pub fn jail_of(&self, id: &VolumeId) -> Option<JailPath> {
        let jails = self.jails.as_ref()?;
        JailPath::new(jails.dir.join(id.as_str()), &jails.node).ok()
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How soon a failed job may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A dependency was away (KV store, a busy mapping): retry with backoff.
    Backoff,
    /// The pool had no room: retry when a destroy frees some.
    WhenSpaceFrees,
    /// Retry when the record changes (or on a resync or restart).
    OnChange,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub retry: Retry,
    /// The metric label of the failing operation.
    pub operation: &'static str,
    pub message: String,
}

/// Sent to the reconcile loop while a job runs and when it ends.
#[derive(Debug)]
pub enum Event {
    /// A status to publish before a long step (creating, extending, ...).
    Progress {
        id: VolumeId,
        guard: Guard,
        status: VolumeStatus,
    },
    Done(Box<Outcome>),
}

#[derive(Debug)]
pub struct Outcome {
    pub id: VolumeId,
    /// The record the job worked from.
    pub desired_index: u64,
    /// The volume as known after the job.
    pub observed: Option<host::LocalVolume>,
    /// The status to publish (guarded by `desired_index`); `None` after a
    /// destroy, whose txn removed it.
    pub status: Option<VolumeStatus>,
    pub failure: Option<Failure>,
    /// The destroy txn committed (or had committed before).
    pub destroyed: bool,
    /// Something on disk changed: the pool report is stale.
    pub changed: bool,
}

pub struct Job {
    pub id: VolumeId,
    pub desired: Desired,
    pub observed: Option<host::LocalVolume>,
    pub work: Work,
}

/// Runs `call` on a blocking thread with the host; a failure comes with
/// how soon it is worth retrying.
pub async fn on_host<T: Send + 'static>(
    host: &Arc<VolumeHost>,
    call: impl FnOnce(&VolumeHost) -> Result<T, HostError> + Send + 'static,
) -> Result<T, (Retry, String)> {
    let host = host.clone();
    match tokio::task::spawn_blocking(move || call(&host)).await {
        Ok(result) => result.map_err(|e| (classify(&e), e.to_string())),
        Err(join) => Err((
            Retry::OnChange,
            format!("the operation's thread failed: {join}"),
        )),
    }
}

/// Which failures are worth retrying without a change of record.
fn classify(error: &HostError) -> Retry {
    match error {
        HostError::KeyCreate { source, .. }
        | HostError::KeyLoad { source, .. }
        | HostError::KeyDestroy { source, .. }
            if matches!(**source, KeyError::Storage { .. }) =>
        {
            Retry::Backoff
        }
        HostError::Admission { .. } => Retry::WhenSpaceFrees,
        // Something held a just-restored volume's device: try again.
        HostError::FsCheck { source, .. }
            if matches!(**source, volume_core::fs::FsError::Busy { .. }) =>
        {
            Retry::Backoff
        }
        // LVM reads, and a mapping or node held by a VM that will stop.
        // The source's export or our nbd client not up yet, or gone for
        // a while: the same steps work once it is back.
        HostError::HydrationStart { .. } => Retry::Backoff,
        HostError::PoolStatus(_)
        | HostError::List(_)
        | HostError::CryptClose { .. }
        | HostError::Unexpose { .. } => Retry::Backoff,
        HostError::RollbackFailed { error, .. } => classify(error),
        _ => Retry::OnChange,
    }
}

struct Run<'a> {
    ctx: &'a Ctx,
    events: &'a mpsc::UnboundedSender<Event>,
    id: VolumeId,
    desired_index: u64,
    jail: Option<JailPath>,
    changed: bool,
}

impl Run<'_> {
    fn progress(
        &self,
        state: VolumeState,
        spec: &volume_control::layout::VolumeSpec,
        observed: Option<&host::LocalVolume>,
    ) {
        let status = plan::status(
            &self.id,
            state,
            Some(spec),
            observed,
            self.jail.as_ref(),
            None,
            now_ms(),
        );
        let _ = self.events.send(Event::Progress {
            id: self.id.clone(),
            guard: Guard::Desired(self.desired_index),
            status,
        });
    }

    fn outcome(
        &self,
        observed: Option<host::LocalVolume>,
        status: Option<VolumeStatus>,
        failure: Option<Failure>,
        destroyed: bool,
    ) -> Outcome {
        Outcome {
            id: self.id.clone(),
            desired_index: self.desired_index,
            observed,
            status,
            failure,
            destroyed,
            changed: self.changed,
        }
    }

    fn failed(
        &self,
        spec: &volume_control::layout::VolumeSpec,
        observed: Option<host::LocalVolume>,
        operation: &'static str,
        (retry, message): (Retry, String),
    ) -> Outcome {
        self.ctx.metrics.error(operation);
        tracing::warn!(volume = %self.id, operation, error = %message, "volume operation failed");
        let status = plan::status(
            &self.id,
            VolumeState::Error,
            Some(spec),
            observed.as_ref(),
            self.jail.as_ref(),
            Some(message.clone()),
            now_ms(),
        );
        self.outcome(
            observed,
            Some(status),
            Some(Failure {
                retry,
                operation,
                message,
            }),
            false,
        )
    }
}

pub async fn run(ctx: Arc<Ctx>, job: Job, events: mpsc::UnboundedSender<Event>) -> Outcome {
    if ctx.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        // Left to the next start, which reconciles everything anyway.
        return Outcome {
            id: job.id,
            desired_index: job.desired.index(),
            observed: job.observed,
            status: None,
            failure: None,
            destroyed: false,
            changed: false,
        };
    }
    let mut run = Run {
        ctx: &ctx,
        events: &events,
        id: job.id.clone(),
        desired_index: job.desired.index(),
        jail: ctx.jail_of(&job.id),
        changed: false,
    };
    let Some(spec) = job.desired.spec().cloned() else {
        // The loop only hands valid records to jobs.
        return run.outcome(job.observed, None, None, false);
    };
    match job.work {
        Work::Converge(steps) => converge(&mut run, &spec, job.observed, steps).await,
        Work::Destroy => destroy(&mut run, &spec, job.observed).await,
        _ => run.outcome(job.observed, None, None, false),
    }
}

async fn converge(
    run: &mut Run<'_>,
    spec: &volume_control::layout::VolumeSpec,
    mut observed: Option<host::LocalVolume>,
    steps: Steps,
) -> Outcome {
    let ctx = run.ctx;
    let id = run.id.clone();
    if steps.create {
        run.progress(VolumeState::Creating, spec, observed.as_ref());
        let started = Instant::now();
        let volume = host::NewVolume {
            id: id.clone(),
            name: spec.name.clone(),
            size: spec.size,
            encryption: if spec.encrypted {
                Encryption::Luks2
            } else {
                Encryption::None
            },
        };
        let mut source = spec.source.clone();
        if let Some(VolumeSource::Migration { id: migration, .. }) = &source {
            let hydrated =
                crate::migrations::hydrated_here(&ctx.kv, &ctx.layout, &ctx.host_id, migration)
                    .await;
            match hydrated {
                // Every block is here and the layer is gone: an
                // existing volume like any other (its create is `Identity`).
                Ok(true) => source = None,
                Ok(false) => {}
                Err(error) => return run.failed(spec, None, "hydrate", error),
            }
        }
        if let Some(VolumeSource::Migration {
            id: migration,
            host: source_host,
            volume: source_volume,
        }) = &source
        {
            return match hydrate(run, spec, (migration, source_host, source_volume)).await {
                Ok(volume) => expose(run, spec, Some(volume), steps).await,
                Err(error) => {
                    run.changed = true;
                    run.failed(spec, None, "hydrate", error)
                }
            };
        }
        let made = on_host(&ctx.host, move |host| match source {
            None => host.create(&volume),
            Some(source) => {
                let (origin, snapshot) = match source {
                    VolumeSource::Snapshot { snapshot } => (None, snapshot),
                    VolumeSource::Fork { volume, snapshot } => (Some(volume), snapshot),
                    VolumeSource::Migration { .. } => {
                        unreachable!("a migration's volume is hydrated above")
                    }
                };
                let restore = host::Restore {
                    snapshot,
                    id: volume.id.clone(),
                    name: volume.name.clone(),
                    size: Some(volume.size),
                };
                match origin {
                    None => host.restore(&restore),
                    Some(origin) => host.fork(&origin, &restore, &mut host::NoFreeze),
                }
            }
        });
        match made.await {
            Ok(created) => {
                run.changed |= created.changed();
                if created.changed() {
                    tracing::info!(volume = %id, size = %spec.size, encrypted = spec.encrypted, "volume created");
                }
                observed = Some(created.into_inner());
                let operation = if spec.source.is_some() {
                    "restore"
                } else {
                    "create"
                };
                ctx.metrics.observe(operation, started.elapsed());
            }
            Err(error) => {
                // A failed create rolled back (or left a resumable half):
                // either way the next attempt starts with a create.
                run.changed = true;
                return run.failed(spec, None, "create", error);
            }
        }
    } else if steps.open {
        let started = Instant::now();
        let open_id = id.clone();
        match on_host(&ctx.host, move |host| host.open(&open_id)).await {
            Ok(device) => {
                if let Some(volume) = observed.as_mut() {
                    volume.device = Some(device);
                }
                ctx.metrics.observe("open", started.elapsed());
            }
            Err(error) => return run.failed(spec, observed, "open", error),
        }
    }
    if let Some(size) = steps.extend_to {
        run.progress(VolumeState::Extending, spec, observed.as_ref());
        let started = Instant::now();
        let extend_id = id.clone();
        match on_host(&ctx.host, move |host| host.extend(&extend_id, size)).await {
            Ok(outcome) => {
                let now = match outcome.lv {
                    ExtendAction::Extended { to, .. } => {
                        run.changed = true;
                        tracing::info!(volume = %id, size = %to, "volume extended");
                        to
                    }
                    ExtendAction::Identity(size) => size,
                };
                if let Some(volume) = observed.as_mut() {
                    volume.size = now;
                }
                ctx.metrics.observe("extend", started.elapsed());
            }
            Err(error) => return run.failed(spec, observed, "extend", error),
        }
    }
    expose(run, spec, observed, steps).await
}

/// The converge's last step: the jail node (when asked), then `ready`.
async fn expose(
    run: &mut Run<'_>,
    spec: &volume_control::layout::VolumeSpec,
    mut observed: Option<host::LocalVolume>,
    steps: Steps,
) -> Outcome {
    let ctx = run.ctx;
    let id = run.id.clone();
    if let (true, Some(jail), Some(jails)) = (steps.expose, run.jail.clone(), &ctx.jails) {
        let started = Instant::now();
        if let Err(error) = make_jail_dir(jail.root()) {
            return run.failed(spec, observed, "expose", (Retry::OnChange, error));
        }
        let owner = NodeOwner {
            uid: jails.uid,
            gid: jails.gid,
        };
        let expose_id = id.clone();
        let expose_jail = jail.clone();
        match on_host(&ctx.host, move |host| {
            host.expose(&expose_id, &expose_jail, owner)
        })
        .await
        {
            Ok(made) => {
                if made.changed() {
                    tracing::info!(volume = %id, node = %jail.full().display(), "volume exposed");
                }
                if let Some(volume) = observed.as_mut() {
                    if !volume.exposed.contains(&jail) {
                        volume.exposed.push(jail);
                    }
                }
                ctx.metrics.observe("expose", started.elapsed());
            }
            Err(error) => return run.failed(spec, observed, "expose", error),
        }
    }
    let status = plan::status(
        &id,
        VolumeState::Ready,
        Some(spec),
        observed.as_ref(),
        run.jail.as_ref(),
        None,
        now_ms(),
    );
    run.outcome(observed, Some(status), None, false)
}

/// Builds a volume coming from another host ([`crate::migrations`]):
/// usable when this returns, copied in the background. `Identity` when it
/// is up already (a re-run after a restart of either end).
async fn hydrate(
    run: &mut Run<'_>,
    spec: &volume_control::layout::VolumeSpec,
    (migration, source_host, source_volume): (&MigrationId, &HostId, &VolumeId),
) -> Result<host::LocalVolume, (Retry, String)> {
    let ctx = run.ctx;
    let Some(env) = ctx.migration.clone() else {
        return Err((
            Retry::OnChange,
            format!(
                "volume {} comes from migration {migration}, but this host takes no part in migrations (start volumed with --migration-listen)",
                spec.id
            ),
        ));
    };
    run.progress(VolumeState::Creating, spec, None);
    let started = Instant::now();
    let waiting = Instant::now();
    let (request, secrets) = loop {
        let prepared =
            crate::migrations::prepare_destination(&ctx.kv, &ctx.layout, &env, migration, spec)
                .await?;
        match prepared {
            Some(prepared) => break prepared,
            None if waiting.elapsed() < crate::migrations::EXPORT_WAIT => {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            None => {
                return Err((
                    Retry::Backoff,
                    format!(
                        "host {source_host} has not exported volume {source_volume} for migration {migration} within {:?}",
                        crate::migrations::EXPORT_WAIT
                    ),
                ))
            }
        }
    };
    let Some(key) = secrets.key else {
        return Err((
            Retry::OnChange,
            format!("migration {migration}'s sealed transfer holds no volume key"),
        ));
    };
    let secret = secrets.secret;
    let made = on_host(&ctx.host, move |host| {
        host.hydrate(&env.tools, &request, &secret, &key)
    })
    .await?;
    if made.changed() {
        run.changed = true;
        tracing::info!(
            volume = %spec.id,
            %migration,
            elapsed_ms = started.elapsed().as_millis() as u64,
            since_request_ms = now_ms().saturating_sub(spec.created_ms),
            "volume usable; hydrating in the background"
        );
    }
    ctx.metrics.observe("hydrate", started.elapsed());
    Ok(made.into_inner())
}

/// The per-volume directory in the jails directory, made if missing.
fn make_jail_dir(root: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o755).create(root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!(
            "could not make the jail directory {}: {e}",
            root.display()
        )),
    }
}

/// Removes the per-volume jail directory if it is empty (anything else in
/// it is not ours to remove).
fn remove_jail_dir(root: PathBuf) {
    match std::fs::remove_dir(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %root.display(), error = %e, "left the jail directory in place")
        }
    }
}

async fn destroy(
    run: &mut Run<'_>,
    spec: &volume_control::layout::VolumeSpec,
    observed: Option<host::LocalVolume>,
) -> Outcome {
    let ctx = run.ctx;
    let id = run.id.clone();
    run.progress(VolumeState::Destroying, spec, observed.as_ref());
    let started = Instant::now();
    if let Some(jail) = run.jail.clone() {
        let unexpose_id = id.clone();
        let unexpose_jail = jail.clone();
        if let Err(error) = on_host(&ctx.host, move |host| {
            host.unexpose(&unexpose_id, &unexpose_jail)
        })
        .await
        {
            return run.failed(spec, observed, "destroy", error);
        }
        remove_jail_dir(jail.root().to_owned());
    }
    let delete_id = id.clone();
    match on_host(&ctx.host, move |host| host.delete(&delete_id)).await {
        Ok(deleted) => {
            run.changed |= deleted.changed();
            if deleted.changed() {
                tracing::info!(volume = %id, "volume deleted");
            }
        }
        Err(error) => {
            run.changed = true;
            return run.failed(spec, None, "destroy", error);
        }
    }
    let committed = kv::commit_destroy(
        &ctx.kv,
        &ctx.layout,
        &ctx.host_id,
        &id,
        spec.size,
        run.desired_index,
        &ctx.metrics,
    )
    .await;
    match committed {
        Ok(Committed::Done) | Ok(Committed::AlreadyGone) => {
            ctx.metrics.observe("destroy", started.elapsed());
            run.outcome(None, None, None, true)
        }
        Ok(Committed::RecordChanged) => run.outcome(None, None, None, false),
        Err(error) => {
            let retry = match error {
                kv::CommitError::LedgerMalformed { .. } => Retry::OnChange,
                _ => Retry::Backoff,
            };
            run.failed(spec, None, "destroy", (retry, error.to_string()))
        }
    }
}

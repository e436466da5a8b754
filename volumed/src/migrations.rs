//! Moves and forks between hosts: this host's part as a source or as a
//! destination (ARCHITECTURE.md, "Move and fork across hosts").
//!
//! volctl writes a [`MigrationSpec`], the destination's `VolumeSpec`
//! (source `migration`) and the destination's reservation in one txn. Then:
//! * **Source** (this loop): seals the migration's secret and the volume
//!   key to the destination's public key at `<root>/keys/<migration>`
//!   (create-only), serves the export (`Source::start`, a snapshot below
//!   dm-crypt: ciphertext only) and reports `exporting {address}`. When
//!   the destination reports `complete` it stops the export; for a move it
//!   then sets `destroy` on the source volume's record (the reconcile loop
//!   deletes it and returns its reservation), never before. Then
//!   `released`, and the sealed transfer is deleted.
//! * **Destination**: the reconcile loop's job builds the volume
//!   ([`prepare_destination`], then `VolumeHost::hydrate`) and exposes it
//!   as soon as it is usable. This loop reports the copy every second
//!   (`hydrating`, or `source_unreachable` when it has not moved for
//!   [`STALL`] and the export's address refuses connections) and, once
//!   every block is local, swaps in the direct table
//!   (`VolumeHost::complete_hydration`) and reports `complete`.
//! * **Cancel** (`cancel: true` on the spec, with `destroy` on the
//!   destination's record): the destination's record is destroyed by the
//!   reconcile loop as any other; the source stops its export.
//!
//! Every step is idempotent, so a restart of either daemon (or a `kill
//! -9`) resumes from the records and what is on the host. Status writes
//! carry a `check-index` on the spec, so a deleted migration gets none.

use crate::config::MigrationConfig;
use crate::metrics::Metrics;
use crate::worker::{now_ms, Retry};
use consul_kv::{ConsulKv, TxnOp, WatchOptions};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use volume_control::layout::{HostRecord, Layout, MigrationEndpoint, VolumeSpec};
use volume_control::migration::{MigrationKind, MigrationSpec, MigrationState, MigrationStatus};
use volume_core::cmd::MigrationTools;
use volume_core::host::{Hydration, VolumeHost};
use volume_core::keys::{KeyStore, MigrationSecret};
use volume_core::migrate::{nbd, ExportSpec, Source};
use volume_core::names::{HostId, MigrationId};
use volume_core::transfer::{
    self, HostKeyPair, HostPublicKey, MigrationSecrets, SealedTransfer, TransferEnd,
};
use volume_core::units::{Bytes, BytesPerSec};

/// How long a destination's job waits for the source to export (its
/// status then says `creating`); after it, the job fails and is retried.
pub const EXPORT_WAIT: Duration = Duration::from_secs(120);
/// The copy has not moved for this long: the source is probed.
pub const STALL: Duration = Duration::from_secs(3);
/// How often a destination reports its copy.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// The backstop pass when nothing hydrates here.
pub const IDLE_PASS: Duration = Duration::from_secs(10);
/// Ports tried above the endpoint's, one per concurrent export.
const EXPORT_PORTS: u16 = 64;

/// What this host needs to take part in migrations.
pub struct MigrationEnv {
    /// The endpoint published in the host record.
    pub endpoint: MigrationEndpoint,
    pub pair: HostKeyPair,
    pub tools: MigrationTools,
    /// The host's key store: the source reads the volume key from it.
    pub keys: Arc<dyn KeyStore>,
    /// Each migration's files go in `<run_dir>/<migration>/`.
    pub run_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationStartError {
    #[error("the migration key {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: transfer::TransferError,
    },
    #[error("migrations need qemu-nbd (qemu-utils): {0}")]
    Tools(#[source] volume_core::cmd::CmdError),
}

impl MigrationEnv {
    /// Loads (or makes) the host key and finds qemu-nbd. Blocking.
    pub fn start(
        config: &MigrationConfig,
        keys: Arc<dyn KeyStore>,
        run_dir: PathBuf,
    ) -> Result<MigrationEnv, MigrationStartError> {
        let loaded = HostKeyPair::load_or_create(&config.key_file).map_err(|source| {
            MigrationStartError::Key {
                path: config.key_file.clone(),
                source,
            }
        })?;
        if loaded.changed() {
            tracing::info!(path = %config.key_file.display(), "made this host's migration key");
        }
        let pair = loaded.into_inner();
        let tools = MigrationTools::locate().map_err(MigrationStartError::Tools)?;
        Ok(MigrationEnv {
            endpoint: MigrationEndpoint {
                address: config.listen,
                public_key: pair.public_key().to_base64(),
            },
            pair,
            tools,
            keys,
            run_dir,
        })
    }
}

/// Runs `call` on a blocking thread; its error as text (never a secret:
/// the library's errors carry none).
async fn blocking<T: Send + 'static, E: std::fmt::Display>(
    call: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(move || call().map_err(|e| e.to_string())).await {
        Ok(result) => result,
        Err(join) => Err(format!("the operation's thread failed: {join}")),
    }
}

/// Everything under `<root>/migrations/`, as one read saw it.
#[derive(Debug, Default)]
pub struct Records {
    /// Each spec with its modify index.
    pub specs: Vec<(MigrationSpec, u64)>,
    pub statuses: BTreeMap<(HostId, MigrationId), MigrationStatus>,
}

impl Records {
    pub fn status(&self, host: &HostId, migration: &MigrationId) -> Option<&MigrationState> {
        self.statuses
            .get(&(host.clone(), migration.clone()))
            .map(|status| &status.state)
    }
}

pub async fn read_records(kv: &ConsulKv, layout: &Layout) -> Result<Records, consul_kv::Error> {
    let pairs = kv.get_recurse(&layout.migrations_prefix()).await?.value;
    let mut records = Records::default();
    for pair in pairs {
        if let Some(id) = layout.parse_migration_key(&pair.key) {
            match serde_json::from_slice::<MigrationSpec>(&pair.value) {
                Ok(spec) if spec.id == id => records.specs.push((spec, pair.modify_index)),
                Ok(_) => {
                    tracing::warn!(key = %pair.key, "migration record names another id; left alone")
                }
                Err(error) => {
                    tracing::warn!(key = %pair.key, %error, "malformed migration record; left alone")
                }
            }
        } else if let Some(key) = layout.parse_migration_status_key(&pair.key) {
            if let Ok(status) = serde_json::from_slice::<MigrationStatus>(&pair.value) {
                records.statuses.insert(key, status);
            }
        }
    }
    Ok(records)
}

/// The record at `key` (`what` names it in errors); a missing one is
/// retried as `missing` says.
async fn read_record<T: serde::de::DeserializeOwned>(
    kv: &ConsulKv,
    key: &str,
    what: &str,
    missing: Retry,
) -> Result<T, (Retry, String)> {
    let found = kv
        .get(key)
        .await
        .map_err(|e| (Retry::Backoff, format!("reading {what}: {e}")))?
        .value;
    let pair = found.ok_or_else(|| (missing, format!("{what} has no record")))?;
    serde_json::from_slice(&pair.value).map_err(|e| {
        (
            Retry::OnChange,
            format!("{what}'s record does not parse: {e}"),
        )
    })
}

async fn host_record(
    kv: &ConsulKv,
    layout: &Layout,
    host: &HostId,
) -> Result<HostRecord, (Retry, String)> {
    let what = format!("host {host}");
    read_record(kv, &layout.host_info(host), &what, Retry::Backoff).await
}

async fn read_spec(
    kv: &ConsulKv,
    layout: &Layout,
    migration: &MigrationId,
) -> Result<MigrationSpec, (Retry, String)> {
    let what = format!("migration {migration}");
    read_record(kv, &layout.migration(migration), &what, Retry::OnChange).await
}

async fn read_transfer(
    kv: &ConsulKv,
    layout: &Layout,
    migration: &MigrationId,
) -> Result<Option<SealedTransfer>, String> {
    let found = kv
        .get(&layout.sealed_migration(migration))
        .await
        .map_err(|e| format!("reading migration {migration}'s sealed transfer: {e}"))?
        .value;
    found
        .map(|pair| {
            serde_json::from_slice(&pair.value)
                .map_err(|e| format!("migration {migration}'s sealed transfer does not parse: {e}"))
        })
        .transpose()
}

/// What `host` last reported of `migration`; `None` when it reported
/// nothing readable yet.
async fn reported_state(
    kv: &ConsulKv,
    layout: &Layout,
    host: &HostId,
    migration: &MigrationId,
) -> Result<Option<MigrationState>, (Retry, String)> {
    let key = layout.migration_status(host, migration);
    let found = kv
        .get(&key)
        .await
        .map_err(|e| (Retry::Backoff, format!("reading {key}: {e}")))?
        .value;
    Ok(found
        .and_then(|pair| serde_json::from_slice::<MigrationStatus>(&pair.value).ok())
        .map(|status| status.state))
}

/// The export's address, from the source's `exporting` status; `None`
/// until the source reports one.
async fn export_address(
    kv: &ConsulKv,
    layout: &Layout,
    spec: &MigrationSpec,
) -> Result<Option<SocketAddr>, (Retry, String)> {
    let state = reported_state(kv, layout, &spec.source.host, &spec.id).await?;
    match state {
        Some(MigrationState::Exporting { address }) => Ok(Some(address)),
        Some(MigrationState::Error { message }) => Err((
            Retry::Backoff,
            format!(
                "the source host {} reports migration {} failed: {message}",
                spec.source.host, spec.id
            ),
        )),
        _ => Ok(None),
    }
}

fn hydration(
    env: &MigrationEnv,
    spec: &MigrationSpec,
    volume: &VolumeSpec,
    source: SocketAddr,
) -> Hydration {
    Hydration {
        migration: spec.id.clone(),
        id: volume.id.clone(),
        name: volume.name.clone(),
        origin: spec.source.volume.clone(),
        size: volume.size,
        source,
        rate: spec.rate,
        run_dir: env.run_dir.clone(),
    }
}

/// What the destination's job needs to build `volume` (whose record names
/// `migration` as its source): the request, and the secret and key opened
/// from the sealed transfer. `None` while the source has not exported
/// and sealed yet (the job waits, see [`EXPORT_WAIT`]).
pub async fn prepare_destination(
    kv: &ConsulKv,
    layout: &Layout,
    env: &Arc<MigrationEnv>,
    migration: &MigrationId,
    volume: &VolumeSpec,
) -> Result<Option<(Hydration, MigrationSecrets)>, (Retry, String)> {
    let spec = read_spec(kv, layout, migration).await?;
    if spec.destination.volume != volume.id || spec.destination.host != volume.host {
        return Err((
            Retry::OnChange,
            format!(
                "migration {migration} is for volume {} on host {}, not {} on {}",
                spec.destination.volume, spec.destination.host, volume.id, volume.host
            ),
        ));
    }
    if spec.cancel {
        return Err((
            Retry::OnChange,
            format!("migration {migration} is cancelled"),
        ));
    }
    let Some(address) = export_address(kv, layout, &spec).await? else {
        return Ok(None);
    };
    let Some(sealed) = read_transfer(kv, layout, migration)
        .await
        .map_err(|e| (Retry::Backoff, e))?
    else {
        return Ok(None);
    };
    let opener = env.clone();
    let id = migration.clone();
    let secrets = blocking(move || {
        transfer::open_transfer(&id, &sealed, TransferEnd::Destination, &opener.pair)
    })
    .await
    .map_err(|e| (Retry::OnChange, e))?;
    Ok(Some((hydration(env, &spec, volume, address), secrets)))
}

/// The address `migration`'s export on `host` uses: the one it reported,
/// else `base` or the first port above it that no other export of this
/// host holds.
pub fn export_port(
    base: SocketAddr,
    host: &HostId,
    migration: &MigrationId,
    records: &Records,
) -> Result<SocketAddr, String> {
    if let Some(MigrationState::Exporting { address }) = records.status(host, migration) {
        return Ok(*address);
    }
    let taken: Vec<SocketAddr> = records
        .statuses
        .iter()
        .filter(|((on, id), _)| on == host && id != migration)
        .filter_map(|(_, status)| match status.state {
            MigrationState::Exporting { address } => Some(address),
            _ => None,
        })
        .collect();
    (0..EXPORT_PORTS)
        .filter_map(|offset| base.port().checked_add(offset))
        .map(|port| SocketAddr::new(base.ip(), port))
        .find(|address| !taken.contains(address))
        .ok_or_else(|| {
            format!("all {EXPORT_PORTS} export ports from {base} are in use by other migrations")
        })
}

/// Whether this host reported `migration` complete: its volume is then
/// an ordinary one (the copying layer is gone, the source released).
pub async fn hydrated_here(
    kv: &ConsulKv,
    layout: &Layout,
    host: &HostId,
    migration: &MigrationId,
) -> Result<bool, (Retry, String)> {
    let state = reported_state(kv, layout, host, migration).await?;
    Ok(state == Some(MigrationState::Complete))
}

/// Where the copy stood at the last report.
struct Sample {
    copied: Bytes,
    at: Instant,
    /// When `copied` last grew.
    moved_at: Instant,
    rate: BytesPerSec,
}

pub struct MigrationLoop {
    pub host: Arc<VolumeHost>,
    pub kv: ConsulKv,
    pub layout: Layout,
    pub host_id: HostId,
    pub metrics: Arc<Metrics>,
    pub env: Arc<MigrationEnv>,
    pub watch: WatchOptions,
}

impl MigrationLoop {
    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let changed = Arc::new(Notify::new());
        let watcher = tokio::spawn(crate::snapshots::wake_on_changes(
            self.kv.clone(),
            self.layout.migrations_prefix(),
            self.watch.clone(),
            changed.clone(),
            "migration",
        ));
        let mut samples = BTreeMap::new();
        loop {
            let hydrating = match self.pass(&mut samples).await {
                Ok(hydrating) => hydrating,
                Err(error) => {
                    self.metrics.error("migration");
                    tracing::warn!(%error, "migration pass failed; trying again");
                    true
                }
            };
            let next = if hydrating { REPORT_EVERY } else { IDLE_PASS };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = changed.notified() => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                watcher.abort();
                return;
            }
        }
    }

    /// One pass over every migration naming this host. `true` while one
    /// hydrates here (the next pass comes after [`REPORT_EVERY`]).
    async fn pass(&self, samples: &mut BTreeMap<MigrationId, Sample>) -> Result<bool, String> {
        let records = read_records(&self.kv, &self.layout)
            .await
            .map_err(|e| format!("reading the migration records: {e}"))?;
        let mut hydrating = false;
        for (spec, index) in &records.specs {
            if spec.source.host == self.host_id {
                if let Err(message) = self.source_step(spec, *index, &records).await {
                    self.failed(spec, *index, &records, message).await;
                }
            }
            if spec.destination.host == self.host_id {
                match self.destination_step(spec, *index, &records, samples).await {
                    Ok(active) => hydrating |= active,
                    Err(message) => {
                        hydrating = true;
                        self.failed(spec, *index, &records, message).await;
                    }
                }
            }
        }
        samples.retain(|id, _| records.specs.iter().any(|(spec, _)| &spec.id == id));
        Ok(hydrating)
    }

    async fn failed(&self, spec: &MigrationSpec, index: u64, records: &Records, message: String) {
        self.metrics.error("migration");
        let state = MigrationState::Error { message };
        if records.status(&self.host_id, &spec.id) != Some(&state) {
            if let MigrationState::Error { message } = &state {
                tracing::warn!(migration = %spec.id, error = %message, "migration step failed");
            }
            let _ = self.put_status(spec, index, state).await;
        }
    }

    async fn put_status(
        &self,
        spec: &MigrationSpec,
        index: u64,
        state: MigrationState,
    ) -> Result<(), String> {
        let status = MigrationStatus {
            id: spec.id.clone(),
            state,
            updated_ms: now_ms(),
        };
        let ops = [
            TxnOp::CheckIndex {
                key: self.layout.migration(&spec.id),
                index,
            },
            TxnOp::Set {
                key: self.layout.migration_status(&self.host_id, &spec.id),
                value: serde_json::to_vec(&status).expect("migration statuses serialize"),
                flags: 0,
            },
        ];
        self.metrics.kv_write();
        match self.kv.txn(&ops).await {
            // The spec changed meanwhile: the next pass reads it.
            Ok(_) | Err(consul_kv::Error::TxnConflict { .. }) => Ok(()),
            Err(other) => Err(format!("writing migration {}'s status: {other}", spec.id)),
        }
    }

    fn export_spec(&self, spec: &MigrationSpec, listen: SocketAddr) -> ExportSpec {
        ExportSpec {
            migration: spec.id.clone(),
            volume: spec.source.volume.clone(),
            listen,
            run_dir: self.env.run_dir.clone(),
        }
    }

    async fn stop_export(&self, spec: &MigrationSpec, listen: SocketAddr) -> Result<(), String> {
        let host = self.host.clone();
        let env = self.env.clone();
        let export = self.export_spec(spec, listen);
        let stopped =
            blocking(move || Source::new(host.backend().as_ref(), &env.tools).stop(&export))
                .await?;
        if stopped.changed() {
            tracing::info!(migration = %spec.id, volume = %spec.source.volume, "export stopped");
        }
        Ok(())
    }

    async fn source_step(
        &self,
        spec: &MigrationSpec,
        index: u64,
        records: &Records,
    ) -> Result<(), String> {
        let mine = records.status(&self.host_id, &spec.id);
        if matches!(
            mine,
            Some(MigrationState::Released | MigrationState::Cancelled)
        ) {
            return Ok(());
        }
        let listen = export_port(self.env.endpoint.address, &self.host_id, &spec.id, records)?;
        let destination = records.status(&spec.destination.host, &spec.id);
        if spec.cancel {
            self.stop_export(spec, listen).await?;
            self.forget_transfer(spec).await?;
            tracing::info!(migration = %spec.id, "migration cancelled; export removed");
            return self
                .put_status(spec, index, MigrationState::Cancelled)
                .await;
        }
        if destination == Some(&MigrationState::Complete) {
            self.stop_export(spec, listen).await?;
            if spec.kind == MigrationKind::Move {
                self.destroy_source(spec).await?;
            }
            self.forget_transfer(spec).await?;
            tracing::info!(migration = %spec.id, kind = ?spec.kind, "migration complete; source released");
            return self.put_status(spec, index, MigrationState::Released).await;
        }
        if self.destination_dropped(spec).await? {
            self.stop_export(spec, listen).await?;
            self.forget_transfer(spec).await?;
            tracing::info!(migration = %spec.id, "the destination volume was destroyed; export removed");
            return self
                .put_status(spec, index, MigrationState::Cancelled)
                .await;
        }
        // A fenced volume's LV is suspended: a snapshot of it would wait
        // for the fence, holding LVM.
        if let Some(reason) = self
            .host
            .fences()
            .and_then(|fences| fences.reason(&spec.source.volume))
        {
            return Err(format!(
                "volume {} is fenced ({reason}); nothing exported: unfence it first",
                spec.source.volume
            ));
        }
        let secret = self.source_secret(spec).await?;
        let host = self.host.clone();
        let env = self.env.clone();
        let export = self.export_spec(spec, listen);
        let starting = Instant::now();
        let started = blocking(move || {
            Source::new(host.backend().as_ref(), &env.tools).start(&export, &secret)
        })
        .await?;
        if started.changed() {
            tracing::info!(
                migration = %spec.id,
                volume = %spec.source.volume,
                %listen,
                since_request_ms = now_ms().saturating_sub(spec.created_ms),
                start_ms = starting.elapsed().as_millis() as u64,
                "exporting"
            );
        }
        if mine != Some(&MigrationState::Exporting { address: listen }) {
            self.put_status(spec, index, MigrationState::Exporting { address: listen })
                .await?;
        }
        Ok(())
    }

    /// Whether the destination's record is gone or being destroyed before
    /// the copy completed (a `volctl destroy` of the new volume, not a
    /// cancel): the export then has no reader left.
    async fn destination_dropped(&self, spec: &MigrationSpec) -> Result<bool, String> {
        let key = self
            .layout
            .desired(&spec.destination.host, &spec.destination.volume);
        let found = self
            .kv
            .get(&key)
            .await
            .map_err(|e| format!("reading {key}: {e}"))?
            .value;
        Ok(match found {
            None => true,
            Some(pair) => serde_json::from_slice::<VolumeSpec>(&pair.value)
                .map(|volume| volume.destroy)
                .unwrap_or(false),
        })
    }

    /// The migration's secret: opened from the sealed transfer, or made
    /// now and sealed (create-only) with the volume key to the
    /// destination's public key, and to ours.
    async fn source_secret(&self, spec: &MigrationSpec) -> Result<MigrationSecret, String> {
        let key = self.layout.sealed_migration(&spec.id);
        for _ in 0..2 {
            if let Some(sealed) = read_transfer(&self.kv, &self.layout, &spec.id).await? {
                let env = self.env.clone();
                let id = spec.id.clone();
                let secrets = blocking(move || {
                    transfer::open_transfer(&id, &sealed, TransferEnd::Source, &env.pair)
                })
                .await?;
                return Ok(secrets.secret);
            }
            let destination = host_record(&self.kv, &self.layout, &spec.destination.host)
                .await
                .map_err(|(_, e)| e)?;
            let endpoint = destination.migration.ok_or_else(|| {
                format!(
                    "destination host {} publishes no migration endpoint (volumed without --migration-listen)",
                    spec.destination.host
                )
            })?;
            let destination_key =
                HostPublicKey::from_base64(&endpoint.public_key).map_err(|e| {
                    format!(
                        "destination host {}'s migration key: {e}",
                        spec.destination.host
                    )
                })?;
            let env = self.env.clone();
            let id = spec.id.clone();
            let volume = spec.source.volume.clone();
            let sealed = blocking(move || -> Result<SealedTransfer, String> {
                let key = env
                    .keys
                    .load(&volume)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        format!("volume {volume} has no key here: only encrypted volumes migrate")
                    })?;
                let secrets = MigrationSecrets {
                    secret: MigrationSecret::generate().map_err(|e| e.to_string())?,
                    key: Some(key),
                };
                transfer::seal_transfer(&id, &secrets, &destination_key, &env.pair.public_key())
                    .map_err(|e| e.to_string())
            })
            .await?;
            let value = serde_json::to_vec(&sealed).expect("sealed transfers serialize");
            self.metrics.kv_write();
            // Lost to a write of ours whose answer was lost: read it back.
            self.kv
                .put_cas(&key, &value, 0)
                .await
                .map_err(|e| format!("writing {key}: {e}"))?;
        }
        Err(format!(
            "migration {}'s sealed transfer was written but cannot be read back",
            spec.id
        ))
    }

    async fn forget_transfer(&self, spec: &MigrationSpec) -> Result<(), String> {
        let key = self.layout.sealed_migration(&spec.id);
        self.metrics.kv_write();
        self.kv
            .delete(&key)
            .await
            .map_err(|e| format!("deleting {key}: {e}"))
    }

    /// A move's last step: the source record's destroy intent (CAS on its
    /// index), only once the destination said `complete`.
    async fn destroy_source(&self, spec: &MigrationSpec) -> Result<(), String> {
        let key = self.layout.desired(&spec.source.host, &spec.source.volume);
        let Some(pair) = self
            .kv
            .get(&key)
            .await
            .map_err(|e| format!("reading {key}: {e}"))?
            .value
        else {
            return Ok(());
        };
        let mut volume: VolumeSpec = serde_json::from_slice(&pair.value)
            .map_err(|e| format!("{key} does not parse: {e}"))?;
        if volume.destroy {
            return Ok(());
        }
        volume.destroy = true;
        let value = serde_json::to_vec(&volume).expect("volume records serialize");
        self.metrics.kv_write();
        let written = self
            .kv
            .put_cas(&key, &value, pair.modify_index)
            .await
            .map_err(|e| format!("writing {key}: {e}"))?;
        if !written {
            return Err(format!("{key} changed meanwhile; trying again"));
        }
        tracing::info!(migration = %spec.id, volume = %spec.source.volume, "moved: the source volume is destroyed");
        Ok(())
    }

    async fn destination_step(
        &self,
        spec: &MigrationSpec,
        index: u64,
        records: &Records,
        samples: &mut BTreeMap<MigrationId, Sample>,
    ) -> Result<bool, String> {
        let mine = records.status(&self.host_id, &spec.id);
        if matches!(
            mine,
            Some(MigrationState::Complete | MigrationState::Cancelled)
        ) {
            return Ok(false);
        }
        if spec.cancel {
            samples.remove(&spec.id);
            return self
                .put_status(spec, index, MigrationState::Cancelled)
                .await
                .map(|()| false);
        }
        let key = self.layout.desired(&self.host_id, &spec.destination.volume);
        let Some(pair) = self
            .kv
            .get(&key)
            .await
            .map_err(|e| format!("reading {key}: {e}"))?
            .value
        else {
            return Ok(false);
        };
        let volume: VolumeSpec = serde_json::from_slice(&pair.value)
            .map_err(|e| format!("{key} does not parse: {e}"))?;
        if volume.destroy {
            return Ok(false);
        }
        let Some(MigrationState::Exporting { address }) =
            records.status(&spec.source.host, &spec.id)
        else {
            // The source has not exported yet; the job waits for it too.
            return Ok(true);
        };
        let request = hydration(&self.env, spec, &volume, *address);
        let host = self.host.clone();
        let env = self.env.clone();
        let probe = request.clone();
        let progress = match blocking(move || host.hydration_progress(&env.tools, &probe)).await {
            Ok(progress) => progress,
            // Not built yet: the reconcile loop's job is on it.
            Err(error) => {
                tracing::debug!(migration = %spec.id, %error, "not hydrating here yet");
                return Ok(true);
            }
        };
        if progress.is_complete() {
            let host = self.host.clone();
            let env = self.env.clone();
            let completion =
                blocking(move || host.complete_hydration(&env.tools, &request)).await?;
            match completion.swap {
                Some(swap) => tracing::info!(
                    migration = %spec.id,
                    volume = %spec.destination.volume,
                    swap_ms = swap.as_secs_f64() * 1000.0,
                    "hydrated; the copying layer is replaced by a direct table"
                ),
                None => tracing::info!(migration = %spec.id, "hydrated"),
            }
            samples.remove(&spec.id);
            self.put_status(spec, index, MigrationState::Complete)
                .await?;
            return Ok(false);
        }
        let now = Instant::now();
        let sample = samples.entry(spec.id.clone()).or_insert(Sample {
            copied: progress.copied,
            at: now,
            moved_at: now,
            rate: BytesPerSec(0),
        });
        if progress.copied != sample.copied {
            let seconds = now.duration_since(sample.at).as_secs_f64();
            let grown = progress.copied.0.saturating_sub(sample.copied.0);
            if seconds > 0.0 {
                sample.rate = BytesPerSec((grown as f64 / seconds) as u64);
            }
            sample.copied = progress.copied;
            sample.at = now;
            sample.moved_at = now;
        }
        let stalled = now.duration_since(sample.moved_at) >= STALL;
        let address = *address;
        let unreachable = stalled
            && !blocking(move || {
                Ok::<_, std::convert::Infallible>(nbd::source_reachable(
                    address,
                    Duration::from_secs(1),
                ))
            })
            .await?;
        let state = if unreachable {
            MigrationState::SourceUnreachable
        } else {
            MigrationState::Hydrating {
                copied: progress.copied,
                total: progress.total,
                rate: if stalled { BytesPerSec(0) } else { sample.rate },
            }
        };
        if unreachable && mine != Some(&MigrationState::SourceUnreachable) {
            tracing::warn!(migration = %spec.id, source = %address, "hydrating: source unreachable; reads of blocks not copied yet wait for it");
        }
        self.put_status(spec, index, state).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exporting(records: &mut Records, host: &str, migration: &MigrationId, port: u16) {
        records.statuses.insert(
            (HostId::new(host).unwrap(), migration.clone()),
            MigrationStatus {
                id: migration.clone(),
                state: MigrationState::Exporting {
                    address: SocketAddr::from(([127, 0, 0, 1], port)),
                },
                updated_ms: 1,
            },
        );
    }

    #[test]
    fn each_export_keeps_its_port_and_a_new_one_takes_the_next_free() {
        let base: SocketAddr = "127.0.0.1:10809".parse().unwrap();
        let h1 = HostId::new("h1").unwrap();
        let (a, b, c) = (
            MigrationId::generate(),
            MigrationId::generate(),
            MigrationId::generate(),
        );
        let mut records = Records::default();
        assert_eq!(export_port(base, &h1, &a, &records).unwrap().port(), 10809);
        exporting(&mut records, "h1", &a, 10809);
        // Another host's exports do not take this host's ports.
        exporting(&mut records, "h2", &c, 10810);
        assert_eq!(export_port(base, &h1, &a, &records).unwrap().port(), 10809);
        assert_eq!(export_port(base, &h1, &b, &records).unwrap().port(), 10810);
        exporting(&mut records, "h1", &b, 10810);
        // A restarted source finds the port it reported, not the base.
        records.statuses.remove(&(h1.clone(), a.clone()));
        assert_eq!(export_port(base, &h1, &b, &records).unwrap().port(), 10810);
        assert_eq!(export_port(base, &h1, &c, &records).unwrap().port(), 10809);
    }

    #[test]
    fn ports_run_out_with_a_clear_error() {
        let base: SocketAddr = "127.0.0.1:10809".parse().unwrap();
        let h1 = HostId::new("h1").unwrap();
        let mut records = Records::default();
        for offset in 0..EXPORT_PORTS {
            exporting(&mut records, "h1", &MigrationId::generate(), 10809 + offset);
        }
        let error = export_port(base, &h1, &MigrationId::generate(), &records).unwrap_err();
        assert!(
            error.contains("all 64 export ports from 127.0.0.1:10809"),
            "{error}"
        );
        // At the top of the port range there is nothing above.
        let top: SocketAddr = "127.0.0.1:65535".parse().unwrap();
        let mut records = Records::default();
        exporting(&mut records, "h1", &MigrationId::generate(), 65535);
        assert!(export_port(top, &h1, &MigrationId::generate(), &records).is_err());
    }
}

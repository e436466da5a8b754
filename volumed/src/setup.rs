//! Start-up: the KV client, the key store, the backend (LVM or the
//! simulator), the tool check, and the pool.

use crate::config::{Config, KeyStoreConfig};
use crate::counting::CountingBackend;
use crate::metrics::Metrics;
use crate::migrations::{MigrationEnv, MigrationStartError};
use crate::sealed::ConsulSealedStorage;
use consul_kv::{ClientConfig, ConsulKv, SecretToken};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;
use volume_core::backend::lvm::LvmBackend;
#[cfg(feature = "testing")]
use volume_core::backend::sim::SimBackend;
use volume_core::backend::{BackendError, PoolStatus, ThinBackend, ThinPoolSpec};
use volume_core::cmd::CmdError;
use volume_core::fence::{DmFenceDevices, FenceDevices, Fences};
#[cfg(feature = "testing")]
use volume_core::host::sim::SimDevices;
#[cfg(feature = "testing")]
use volume_core::host::{FaultInjector, Step};
use volume_core::host::{RealDevices, VolumeDevices, VolumeHost};
use volume_core::keys::{EnvelopeKeyStore, KeyEncryptionKey, KeyError, KeyStore, LocalKeyDir};
use volume_core::names::NameError;

/// One variant per start-up step that can fail.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("KV client: {0}")]
    KvClient(#[source] consul_kv::Error),
    #[error("cannot read the Consul token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tool check failed: {0}")]
    Tools(#[source] CmdError),
    #[error("thin pool spec: {0}")]
    PoolSpec(#[source] NameError),
    #[error("starting the LVM backend failed: {0}")]
    Backend(#[source] BackendError),
    #[error("ensuring the thin pool failed: {0}")]
    Pool(#[source] BackendError),
    #[error("opening the local key store failed: {0}")]
    KeyDir(#[source] KeyError),
    #[error("reading the key-encryption key failed: {0}")]
    Kek(#[source] KeyError),
    #[error("setting up migrations failed: {0}")]
    Migration(#[source] MigrationStartError),
}

const KV_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client from Consul's environment variables, with the configured
/// address and token file taking precedence.
pub fn kv_client(config: &Config) -> Result<ConsulKv, StartError> {
    let address = config.consul_addr.clone();
    let mut client = ClientConfig::from_lookup(|name| match name {
        "CONSUL_HTTP_ADDR" if address.is_some() => address.clone(),
        _ => std::env::var(name).ok(),
    })
    .map_err(StartError::KvClient)?
    .with_request_timeout(KV_REQUEST_TIMEOUT);
    if let Some(path) = &config.consul_token_file {
        let text = std::fs::read_to_string(path).map_err(|source| StartError::TokenFile {
            path: path.clone(),
            source,
        })?;
        let token = text.trim();
        if !token.is_empty() {
            client = client.with_token(SecretToken::new(token));
        }
    }
    ConsulKv::new(client).map_err(StartError::KvClient)
}

/// The key store the configuration names. Must be called off the async
/// workers when it is the envelope store (its calls block on `runtime`).
pub fn key_store(
    config: &Config,
    kv: &ConsulKv,
    runtime: Handle,
) -> Result<Arc<dyn KeyStore>, StartError> {
    Ok(match &config.keys {
        KeyStoreConfig::Local { dir } => {
            Arc::new(LocalKeyDir::open(dir.clone()).map_err(StartError::KeyDir)?)
        }
        KeyStoreConfig::Envelope { kek_file } => {
            let kek = KeyEncryptionKey::from_file(kek_file).map_err(StartError::Kek)?;
            let storage = ConsulSealedStorage::new(kv.clone(), config.layout.clone(), runtime);
            Arc::new(EnvelopeKeyStore::new(kek, storage))
        }
    })
}

pub fn pool_spec(config: &Config) -> Result<ThinPoolSpec, StartError> {
    let mut spec = ThinPoolSpec::new(config.vg.clone(), config.pool.clone(), config.pvs.clone())
        .map_err(StartError::PoolSpec)?;
    spec.data_size = config.pool_data_size;
    spec.metadata_size = config.pool_metadata_size;
    Ok(spec)
}

/// The built data path.
pub struct Built {
    pub host: Arc<VolumeHost>,
    pub pool: PoolStatus,
    /// What the fencing thread acts on (the host follows the same fences).
    pub fence_devices: Arc<dyn FenceDevices>,
    /// With `[migration] listen`: the host key, qemu-nbd and the key store.
    pub migration: Option<Arc<MigrationEnv>>,
    /// The simulated backend, in `--sim` mode (benchmarks read its counts).
    #[cfg(feature = "testing")]
    pub sim: Option<Arc<SimBackend>>,
}

/// Checks the tools, starts the backend, ensures the pool and builds the
/// host. Blocking: LVM runs here.
pub fn build(
    config: &Config,
    keys: Arc<dyn KeyStore>,
    metrics: Arc<Metrics>,
) -> Result<Built, StartError> {
    let spec = pool_spec(config)?;
    let migration = match &config.migration {
        Some(settings) => Some(Arc::new(
            MigrationEnv::start(settings, keys.clone(), config.run_dir.clone())
                .map_err(StartError::Migration)?,
        )),
        None => None,
    };
    let dm_fence: Arc<dyn FenceDevices> = Arc::new(DmFenceDevices::new(
        config.vg.as_str(),
        config.pool.as_str(),
    ));
    #[cfg(feature = "testing")]
    let (raw, devices, sim): (Arc<dyn ThinBackend>, Arc<dyn VolumeDevices>, _) = if config.sim {
        let sim = Arc::new(SimBackend::new(spec));
        let devices = Arc::new(SimDevices::new(sim.clone()));
        (sim.clone(), devices, Some(sim))
    } else {
        let (lvm, devices) = real_backend(spec, config)?;
        (lvm, devices, None)
    };
    #[cfg(feature = "testing")]
    let fence_devices: Arc<dyn FenceDevices> = match &sim {
        Some(sim) => Arc::new(volume_core::fence::sim::SimFenceDevices::new(sim.clone())),
        None => dm_fence,
    };
    #[cfg(not(feature = "testing"))]
    let fence_devices = dm_fence;
    #[cfg(not(feature = "testing"))]
    let (raw, devices) = real_backend(spec, config)?;
    let backend: Arc<dyn ThinBackend> = Arc::new(CountingBackend::new(raw, metrics));
    let pool = backend.ensure_pool().map_err(StartError::Pool)?;
    if pool.changed() {
        tracing::info!(vg = %config.vg, pool = %config.pool, "made the thin pool");
    }
    let pool = pool.into_inner();
    tracing::info!(usage = %pool.usage, "thin pool ready");
    let host = VolumeHost::new(backend, devices, keys, config.policy)
        .with_fences(Arc::new(Fences::default()));
    // A delete of a hydrating volume cancels its hydration with these.
    let host = match &migration {
        Some(env) => host.with_migrations(env.tools.clone(), env.run_dir.clone()),
        None => host,
    };
    #[cfg(feature = "testing")]
    let host = match PauseAfterStep::from_env() {
        Some(pause) => host.with_faults(Arc::new(pause)),
        None => host,
    };
    Ok(Built {
        host: Arc::new(host),
        pool,
        fence_devices,
        migration,
        #[cfg(feature = "testing")]
        sim,
    })
}

/// A backend and the devices above it.
type DataPath = (Arc<dyn ThinBackend>, Arc<dyn VolumeDevices>);

fn real_backend(spec: ThinPoolSpec, config: &Config) -> Result<DataPath, StartError> {
    let devices = RealDevices::locate_with(config.crypt).map_err(StartError::Tools)?;
    let devices = Arc::new(devices);
    let lvm = Arc::new(LvmBackend::start(spec).map_err(StartError::Backend)?);
    // The kernel's low-water event then fires at the auto-extend threshold.
    lvm.set_low_water(config.growth.data.threshold);
    Ok((lvm, devices))
}

/// Test-only fault hook for crash tests on the real stack: with
/// `VOLUMED_FAULT_PAUSE_AFTER=<step>` (e.g. `CryptFormatted`) and
/// `VOLUMED_FAULT_MARKER=<file>`, the first time a volume operation
/// reaches that step the worker writes the marker file and stops there for
/// good, so a test can `kill -9` the daemon at a known point. Only in a
/// build with the `testing` feature.
#[cfg(feature = "testing")]
struct PauseAfterStep {
    step: String,
    marker: PathBuf,
    fired: std::sync::atomic::AtomicBool,
}

#[cfg(feature = "testing")]
impl PauseAfterStep {
    fn from_env() -> Option<PauseAfterStep> {
        let step = std::env::var("VOLUMED_FAULT_PAUSE_AFTER").ok()?;
        let marker = std::env::var_os("VOLUMED_FAULT_MARKER")?;
        tracing::warn!(%step, "fault injection enabled: operations pause for good after this step");
        Some(PauseAfterStep {
            step,
            marker: PathBuf::from(marker),
            fired: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

#[cfg(feature = "testing")]
impl FaultInjector for PauseAfterStep {
    fn after(&self, step: Step) -> Option<volume_core::host::Fault> {
        if step.to_string() != self.step
            || self.fired.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return None;
        }
        if let Err(error) = std::fs::write(&self.marker, step.to_string()) {
            tracing::error!(%error, "cannot write the fault marker");
        }
        loop {
            std::thread::park();
        }
    }
}

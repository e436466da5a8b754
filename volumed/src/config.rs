//! Configuration: a TOML file, environment variables and flags, in rising
//! precedence (flags > env > file > defaults). Every setting is declared
//! once, in [`Settings`]: clap reads flags and env from it, serde the file;
//! figment layers the two, and [`Config::merge`] checks the result and fills
//! in the defaults.
//!
//! No secret is ever a flag or a file field: the Consul ACL token comes from
//! `CONSUL_HTTP_TOKEN` / `CONSUL_HTTP_TOKEN_FILE` (or `kv.token_file`), the
//! key-encryption key from a file.

use clap::{Args, Parser, Subcommand};
use figment::providers::Serialized;
use figment::Figment;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use volume_control::layout::{Layout, DEFAULT_ROOT};
use volume_core::capacity::CapacityPolicy;
use volume_core::crypt::CryptOptions;
use volume_core::fence_model::FencePolicy;
use volume_core::names::{HostId, LvName, Region, VgName, Zone};
use volume_core::pool_growth::{GrowthRule, PoolGrowthPolicy, PoolPart};
use volume_core::units::{Bytes, OvercommitRatio, Percent};

/// Watches this host's desired volumes in Consul KV and converges the host
/// to them.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(flatten)]
    pub options: Options,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Run,
    /// List our LVs that have no desired record; with --yes, delete them.
    Gc {
        /// Really delete the orphans (without it, only list them).
        #[arg(long)]
        yes: bool,
        /// With --yes, delete even when there is no desired record at all
        /// (otherwise refused: it is what a lost KV store looks like).
        #[arg(long, requires = "yes")]
        allow_empty_desired: bool,
    },
    /// Print the resolved configuration and exit.
    CheckConfig,
}

/// The command line: where the file is, and every setting.
#[derive(Debug, Default, Clone, Args)]
pub struct Options {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "VOLUMED_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
}

/// Every setting, declared once: clap reads each field as a flag with its
/// `VOLUMED_*` environment variable, serde reads the same field from the
/// file (the sections are the file's tables). `None` means "not given
/// here"; [`Config::merge`] layers the sources and fills in the defaults.
/// Unknown file keys are refused so typos surface. No secret is a setting.
#[skip_serializing_none]
#[derive(Debug, Default, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// This host's id in the control plane.
    #[arg(long, env = "VOLUMED_HOST", global = true)]
    pub host: Option<String>,
    #[arg(long, env = "VOLUMED_REGION", global = true)]
    pub region: Option<String>,
    #[arg(long, env = "VOLUMED_ZONE", global = true)]
    pub zone: Option<String>,
    #[command(flatten)]
    #[serde(default)]
    pub kv: KvSettings,
    #[command(flatten)]
    #[serde(default)]
    pub pool: PoolSettings,
    #[command(flatten)]
    #[serde(default)]
    pub keys: KeySettings,
    #[command(flatten)]
    #[serde(default)]
    pub crypt: CryptSettings,
    #[command(flatten)]
    #[serde(default)]
    pub jails: JailSettings,
    #[command(flatten)]
    #[serde(default)]
    pub daemon: DaemonSettings,
    #[command(flatten)]
    #[serde(default)]
    pub migration: MigrationSettings,
}

/// `[migration]`: moving and forking volumes to and from other hosts.
#[skip_serializing_none]
#[derive(Debug, Default, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSettings {
    /// Address NBD exports of this host listen on, published in its host
    /// record (without it the host takes no part in moves or forks).
    #[arg(
        id = "migration_listen",
        value_name = "ADDR",
        long = "migration-listen",
        env = "VOLUMED_MIGRATION_LISTEN",
        global = true
    )]
    pub listen: Option<SocketAddr>,
    /// File of this host's X25519 key, made if missing (default
    /// /var/lib/volumed/migration.key).
    #[arg(
        id = "migration_key_file",
        value_name = "FILE",
        long = "migration-key",
        env = "VOLUMED_MIGRATION_KEY",
        global = true
    )]
    pub key_file: Option<PathBuf>,
}

/// `[kv]`: the store.
#[skip_serializing_none]
#[derive(Debug, Default, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSettings {
    /// KV root (default volumes/v1).
    #[arg(
        id = "kv_root",
        value_name = "KV_ROOT",
        long = "kv-root",
        env = "VOLUMED_KV_ROOT",
        global = true
    )]
    pub root: Option<String>,
    /// Consul address, host:port or URL (default: CONSUL_HTTP_ADDR, else 127.0.0.1:8500).
    #[arg(
        id = "consul_addr",
        value_name = "CONSUL_ADDR",
        long = "consul-addr",
        env = "VOLUMED_CONSUL_ADDR",
        global = true
    )]
    pub address: Option<String>,
    /// File holding the Consul ACL token (else CONSUL_HTTP_TOKEN/CONSUL_HTTP_TOKEN_FILE).
    #[arg(
        id = "consul_token_file",
        value_name = "CONSUL_TOKEN_FILE",
        long = "consul-token-file",
        env = "VOLUMED_CONSUL_TOKEN_FILE",
        global = true
    )]
    pub token_file: Option<PathBuf>,
    /// Longest blocking-query wait, e.g. 5m.
    #[arg(long, env = "VOLUMED_WATCH_WAIT", global = true)]
    pub watch_wait: Option<String>,
    /// Longest delay between retries while Consul is unreachable, e.g. 30s.
    #[arg(long, env = "VOLUMED_RETRY_MAX", global = true)]
    pub retry_max: Option<String>,
}

/// `[pool]`: the thin pool and the admission policy.
#[skip_serializing_none]
#[derive(Debug, Default, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// Volume group of the thin pool.
    #[arg(long, env = "VOLUMED_VG", global = true)]
    pub vg: Option<String>,
    /// Thin pool LV name.
    #[arg(
        id = "pool",
        value_name = "POOL",
        long = "pool",
        env = "VOLUMED_POOL",
        global = true
    )]
    pub name: Option<String>,
    /// Physical volume(s) for a VG that does not exist yet (repeat, or comma-separated).
    #[arg(
        id = "pvs",
        value_name = "PVS",
        long = "pv",
        env = "VOLUMED_PVS",
        value_delimiter = ',',
        global = true
    )]
    pub pvs: Option<Vec<PathBuf>>,
    /// Pool data size when the pool is made, e.g. 3GiB (default: the VG's free space).
    #[arg(
        id = "pool_data_size",
        value_name = "POOL_DATA_SIZE",
        long = "pool-data-size",
        env = "VOLUMED_POOL_DATA_SIZE",
        global = true
    )]
    pub data_size: Option<String>,
    /// Pool metadata size when the pool is made, e.g. 1GiB (default: LVM's choice).
    #[arg(
        id = "pool_metadata_size",
        value_name = "POOL_METADATA_SIZE",
        long = "pool-metadata-size",
        env = "VOLUMED_POOL_METADATA_SIZE",
        global = true
    )]
    pub metadata_size: Option<String>,
    /// Over-commit ratio, e.g. 10 or 2.5.
    #[arg(long, env = "VOLUMED_OVERCOMMIT", global = true)]
    pub overcommit: Option<String>,
    /// Refuse new space below this share of free pool data, in percent.
    #[arg(long, env = "VOLUMED_DATA_LOW_WATER", global = true)]
    pub data_low_water: Option<u32>,
    /// Refuse new space below this share of free pool metadata, in percent.
    #[arg(long, env = "VOLUMED_METADATA_LOW_WATER", global = true)]
    pub metadata_low_water: Option<u32>,
    #[arg(long, env = "VOLUMED_MAX_VOLUMES", global = true)]
    pub max_volumes: Option<u32>,
    /// Grow the pool's data once this share is used, in percent (50-100; 100: never), as lvm.conf's thin_pool_autoextend_threshold.
    #[arg(long, env = "VOLUMED_AUTOEXTEND_THRESHOLD", global = true)]
    pub autoextend_threshold: Option<u32>,
    /// Grow the pool's data by this share of its size, in percent, as lvm.conf's thin_pool_autoextend_percent.
    #[arg(long, env = "VOLUMED_AUTOEXTEND_PERCENT", global = true)]
    pub autoextend_percent: Option<u32>,
    /// Grow the pool's metadata once this share is used, in percent (50-100; 100: never).
    #[arg(long, env = "VOLUMED_METADATA_AUTOEXTEND_THRESHOLD", global = true)]
    pub metadata_autoextend_threshold: Option<u32>,
    /// Grow the pool's metadata by this share of its size, in percent.
    #[arg(long, env = "VOLUMED_METADATA_AUTOEXTEND_PERCENT", global = true)]
    pub metadata_autoextend_percent: Option<u32>,
    /// Longest time between two pool checks when no device-mapper event comes, e.g. 2s.
    #[arg(long, env = "VOLUMED_AUTOEXTEND_INTERVAL", global = true)]
    pub autoextend_interval: Option<String>,
    /// Keep this share of pool data for the volumes that did not fill it, in percent (0-50; 0: no fencing): once free data falls into it and the pool cannot grow, the volumes whose allocation grew are fenced.
    #[arg(long, env = "VOLUMED_RESERVE_PERCENT", global = true)]
    pub reserve_percent: Option<u32>,
    /// Longest time between two fencing checks when no device-mapper event comes, e.g. 200ms.
    #[arg(long, env = "VOLUMED_FENCE_INTERVAL", global = true)]
    pub fence_interval: Option<String>,
}

/// `[keys]`: where volume keys live.
#[skip_serializing_none]
#[derive(Debug, Default, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    /// Key store: `local` (a 0700 directory of key files) or `envelope`
    /// (keys sealed under a KEK, kept in the KV store).
    #[arg(
        id = "key_store",
        value_name = "KEY_STORE",
        long = "key-store",
        env = "VOLUMED_KEY_STORE",
        global = true
    )]
    pub store: Option<String>,
    /// Directory of the local key store.
    #[arg(
        id = "key_dir",
        value_name = "KEY_DIR",
        long = "key-dir",
        env = "VOLUMED_KEY_DIR",
        global = true
    )]
    pub dir: Option<PathBuf>,
    /// File of the 32-byte key-encryption key (envelope store).
    #[arg(long, env = "VOLUMED_KEK_FILE", global = true)]
    pub kek_file: Option<PathBuf>,
}

/// `[crypt]`: dm-crypt flags, applied at every open of a mapping (they are
/// not kept in the LUKS2 header, so a change takes effect at the next open).
#[skip_serializing_none]
#[derive(Debug, Default, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptSettings {
    /// Pass discards (a guest's fstrim) through dm-crypt, so freed blocks return to the pool (default true).
    #[arg(long, env = "VOLUMED_ALLOW_DISCARDS", global = true)]
    pub allow_discards: Option<bool>,
    /// Decrypt reads without dm-crypt's workqueue (default true).
    #[arg(long, env = "VOLUMED_NO_READ_WORKQUEUE", global = true)]
    pub no_read_workqueue: Option<bool>,
    /// Encrypt writes without dm-crypt's workqueue (default true).
    #[arg(long, env = "VOLUMED_NO_WRITE_WORKQUEUE", global = true)]
    pub no_write_workqueue: Option<bool>,
}

/// `[jails]`: where ready volumes are exposed.
#[skip_serializing_none]
#[derive(Debug, Default, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailSettings {
    /// Expose each ready volume as `<jails-dir>/<volume id>/<jail-node>`.
    #[arg(
        id = "jails_dir",
        value_name = "JAILS_DIR",
        long = "jails-dir",
        env = "VOLUMED_JAILS_DIR",
        global = true
    )]
    pub dir: Option<PathBuf>,
    #[arg(
        id = "jail_uid",
        value_name = "JAIL_UID",
        long = "jail-uid",
        env = "VOLUMED_JAIL_UID",
        global = true
    )]
    pub uid: Option<u32>,
    #[arg(
        id = "jail_gid",
        value_name = "JAIL_GID",
        long = "jail-gid",
        env = "VOLUMED_JAIL_GID",
        global = true
    )]
    pub gid: Option<u32>,
    /// Node name inside each volume's jail directory (default `vol`).
    #[arg(
        id = "jail_node",
        value_name = "JAIL_NODE",
        long = "jail-node",
        env = "VOLUMED_JAIL_NODE",
        global = true
    )]
    pub node: Option<String>,
}

/// `[daemon]`: the daemon itself.
#[skip_serializing_none]
#[derive(Debug, Default, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    /// Address of the /metrics and /healthz endpoint.
    #[arg(long, env = "VOLUMED_LISTEN", global = true)]
    pub listen: Option<SocketAddr>,
    /// How often the host record is republished, e.g. 10s.
    #[arg(long, env = "VOLUMED_HEARTBEAT_INTERVAL", global = true)]
    pub heartbeat_interval: Option<String>,
    /// How old the cached pool report may get before a heartbeat reads LVM again, e.g. 60s.
    #[arg(long, env = "VOLUMED_POOL_REFRESH_INTERVAL", global = true)]
    pub pool_refresh_interval: Option<String>,
    /// How often volumes with auto-extend are checked against their threshold, e.g. 5s.
    #[arg(long, env = "VOLUMED_VOLUME_AUTOEXTEND_INTERVAL", global = true)]
    pub volume_autoextend_interval: Option<String>,
    /// How long a filesystem usage report from a guest counts, e.g. 60s; older ones fall back to the thin LV's data%.
    #[arg(long, env = "VOLUMED_FS_USAGE_MAX_AGE", global = true)]
    pub fs_usage_max_age: Option<String>,
    /// Volume operations run at once (different volumes only).
    #[arg(long, env = "VOLUMED_MAX_CONCURRENT", global = true)]
    pub max_concurrent: Option<usize>,
    /// How often scheduled snapshots are taken (one per volume per period,
    /// at a time spread by the volume id; retention counts in periods), e.g. 24h.
    #[arg(long, env = "VOLUMED_SNAPSHOT_PERIOD", global = true)]
    pub snapshot_period: Option<String>,
    /// How often the schedule is checked and snapshot records converged
    /// even without a change seen by the watch, e.g. 30s.
    #[arg(long, env = "VOLUMED_SNAPSHOT_CHECK_INTERVAL", global = true)]
    pub snapshot_check_interval: Option<String>,
    /// Directory of the lock that keeps one daemon per volume group (default /run/volumed).
    #[arg(long, env = "VOLUMED_RUN_DIR", global = true)]
    pub run_dir: Option<PathBuf>,
    /// Simulated backend and devices (tests, benchmarks): no LVM, no dm.
    #[cfg(feature = "testing")]
    #[arg(
        long,
        env = "VOLUMED_SIM",
        global = true,
        num_args = 0,
        default_missing_value = "true"
    )]
    pub sim: Option<bool>,
}

/// Where volume keys live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStoreConfig {
    Local {
        dir: PathBuf,
    },
    /// Sealed under the KEK in `kek_file`, kept at `<root>/keys/<volume>`.
    Envelope {
        kek_file: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    pub dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub node: String,
}

/// The resolved, checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub host: HostId,
    pub region: Region,
    pub zone: Zone,
    pub layout: Layout,
    pub consul_addr: Option<String>,
    pub consul_token_file: Option<PathBuf>,
    pub watch_wait: Duration,
    pub retry_max: Duration,
    pub vg: VgName,
    pub pool: LvName,
    pub pvs: Vec<PathBuf>,
    pub pool_data_size: Option<Bytes>,
    pub pool_metadata_size: Option<Bytes>,
    pub policy: CapacityPolicy,
    pub growth: PoolGrowthPolicy,
    /// Longest time between two auto-extend checks without an event.
    pub autoextend_interval: Duration,
    /// The fencing reserve (`pool.reserve_percent`).
    pub fence: FencePolicy,
    /// Longest time between two fencing checks without an event.
    pub fence_interval: Duration,
    pub keys: KeyStoreConfig,
    pub crypt: CryptOptions,
    pub jails: Option<JailConfig>,
    pub listen: Option<SocketAddr>,
    pub heartbeat_interval: Duration,
    pub pool_refresh_interval: Duration,
    /// How often volumes with auto-extend are checked.
    pub volume_autoextend_interval: Duration,
    /// Filesystem usage reports older than this no longer count.
    pub fs_usage_max_age: Duration,
    pub max_concurrent: usize,
    /// One scheduled snapshot per volume per period; a retention of N days
    /// keeps N periods.
    pub snapshot_period: Duration,
    pub snapshot_check_interval: Duration,
    pub run_dir: PathBuf,
    /// `None`: no `[migration] listen`, no part in migrations.
    pub migration: Option<MigrationConfig>,
    #[cfg(feature = "testing")]
    pub sim: bool,
}

/// Where this host's exports listen and where its X25519 key is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    pub listen: SocketAddr,
    pub key_file: PathBuf,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9108";
pub const DEFAULT_KEY_DIR: &str = "/var/lib/volumed/keys";
pub const DEFAULT_MIGRATION_KEY: &str = "/var/lib/volumed/migration.key";
pub const DEFAULT_JAIL_NODE: &str = "vol";
pub const DEFAULT_RUN_DIR: &str = "/run/volumed";
const DEFAULT_WATCH_WAIT: Duration = Duration::from_secs(300);
const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
const DEFAULT_POOL_REFRESH: Duration = Duration::from_secs(60);
const DEFAULT_MAX_CONCURRENT: usize = 4;
const DEFAULT_AUTOEXTEND_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_SNAPSHOT_PERIOD: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_SNAPSHOT_CHECK: Duration = Duration::from_secs(30);
const DEFAULT_VOLUME_AUTOEXTEND_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_FS_USAGE_MAX_AGE: Duration = Duration::from_secs(60);
const DEFAULT_RESERVE_PERCENT: u32 = 10;
/// A fencing check is a few device-mapper ioctls; a writer at 1 GB/s
/// takes 200 MB between two of them, which the reserve must hold.
const DEFAULT_FENCE_INTERVAL: Duration = Duration::from_millis(200);

/// One variant per way a configuration can be wrong; each names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{setting} is required (flag --{flag}, env {env}, or `{file}` in the config file)")]
    Missing {
        setting: &'static str,
        flag: &'static str,
        env: &'static str,
        file: &'static str,
    },
    #[error("{setting} {value:?} is invalid: {reason}")]
    Invalid {
        setting: &'static str,
        value: String,
        reason: String,
    },
}

fn invalid(setting: &'static str, value: &str, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        setting,
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

impl Settings {
    /// The file's settings.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Each setting from `self` where it is given there, else from `below`.
    fn over(&self, below: Settings) -> Settings {
        Figment::from(Serialized::defaults(below))
            .merge(Serialized::defaults(self))
            .extract()
            .expect("two layers of the same settings merge")
    }
}

impl Config {
    /// Flags and env (already merged by clap) over the file named by
    /// `--config`, over the defaults.
    pub fn resolve(options: &Options) -> Result<Config, ConfigError> {
        let file = match &options.config {
            Some(path) => Settings::load(path)?,
            None => Settings::default(),
        };
        Config::merge(&options.settings, file)
    }

    /// `flags` (flags and env) over `file`, checked, with the defaults
    /// filling in what neither gives.
    pub fn merge(flags: &Settings, file: Settings) -> Result<Config, ConfigError> {
        let s = flags.over(file);
        let required = |value: Option<String>,
                        setting: &'static str,
                        flag: &'static str,
                        env: &'static str,
                        file: &'static str| {
            value.ok_or(ConfigError::Missing {
                setting,
                flag,
                env,
                file,
            })
        };
        let host = required(s.host, "host id", "host", "VOLUMED_HOST", "host")?;
        let host = HostId::new(&host).map_err(|e| invalid("host id", &host, e.reason))?;
        let region = required(s.region, "region", "region", "VOLUMED_REGION", "region")?;
        let region = Region::new(&region).map_err(|e| invalid("region", &region, e.reason))?;
        let zone = required(s.zone, "zone", "zone", "VOLUMED_ZONE", "zone")?;
        let zone = Zone::new(&zone).map_err(|e| invalid("zone", &zone, e))?;

        let root = s.kv.root.unwrap_or_else(|| DEFAULT_ROOT.to_owned());
        let layout = Layout::new(&root).map_err(|e| invalid("KV root", &root, e))?;
        let watch_wait = duration_setting("watch wait", s.kv.watch_wait, DEFAULT_WATCH_WAIT)?;
        let retry_max = duration_setting("retry max", s.kv.retry_max, DEFAULT_RETRY_MAX)?;

        #[cfg(feature = "testing")]
        let sim = s.daemon.sim.unwrap_or(false);
        #[cfg(not(feature = "testing"))]
        let sim = false;
        let vg = match s.pool.vg {
            Some(vg) => vg,
            None if sim => "vmvg-sim".to_owned(),
            None => required(None, "volume group", "vg", "VOLUMED_VG", "pool.vg")?,
        };
        let vg = VgName::new(&vg).map_err(|e| invalid("volume group", &vg, e.reason))?;
        let pool = s.pool.name.unwrap_or_else(|| "pool".to_owned());
        let pool = LvName::new(&pool).map_err(|e| invalid("thin pool", &pool, e.reason))?;
        let mut pvs = s.pool.pvs.unwrap_or_default();
        if sim && pvs.is_empty() {
            pvs.push(PathBuf::from("/dev/sim0"));
        }
        let size = |setting, text: Option<String>| match text {
            Some(text) => parse_size(&text)
                .map(Some)
                .map_err(|e| invalid(setting, &text, e)),
            None => Ok(None),
        };
        let pool_data_size = size("pool data size", s.pool.data_size)?;
        let pool_metadata_size = size("pool metadata size", s.pool.metadata_size)?;

        let mut policy = CapacityPolicy::default();
        if let Some(text) = s.pool.overcommit {
            policy.overcommit = text
                .parse::<OvercommitRatio>()
                .map_err(|e| invalid("over-commit ratio", &text, e))?;
        }
        if let Some(pct) = s.pool.data_low_water {
            policy.data_low_water = percent("data low-water mark", pct)?;
        }
        if let Some(pct) = s.pool.metadata_low_water {
            policy.metadata_low_water = percent("metadata low-water mark", pct)?;
        }
        if let Some(max) = s.pool.max_volumes {
            policy.max_volumes = max;
        }
        let defaults = PoolGrowthPolicy::default();
        let rule = |part, default: GrowthRule, threshold: Option<u32>, step: Option<u32>| {
            let threshold = threshold.map_or(default.threshold, Percent::from_whole);
            let step = step.map_or(default.step, Percent::from_whole);
            GrowthRule::new(part, threshold, step).map_err(|e| {
                let (setting, value) = match e {
                    volume_core::pool_growth::GrowthRuleError::Threshold { .. } => {
                        ("auto-extend threshold", threshold)
                    }
                    volume_core::pool_growth::GrowthRuleError::Step { .. } => {
                        ("auto-extend percent", step)
                    }
                };
                invalid(setting, &value.to_string(), e)
            })
        };
        let growth = PoolGrowthPolicy {
            data: rule(
                PoolPart::Data,
                defaults.data,
                s.pool.autoextend_threshold,
                s.pool.autoextend_percent,
            )?,
            metadata: rule(
                PoolPart::Metadata,
                defaults.metadata,
                s.pool.metadata_autoextend_threshold,
                s.pool.metadata_autoextend_percent,
            )?,
        };
        let autoextend_interval = duration_setting(
            "auto-extend interval",
            s.pool.autoextend_interval,
            DEFAULT_AUTOEXTEND_INTERVAL,
        )?;
        if autoextend_interval.is_zero() {
            return Err(invalid("auto-extend interval", "0", "must be positive"));
        }
        let reserve = s.pool.reserve_percent.unwrap_or(DEFAULT_RESERVE_PERCENT);
        let fence = FencePolicy::new(Percent::from_whole(reserve.min(101)))
            .map_err(|e| invalid("pool reserve percent", &reserve.to_string(), e))?;
        let fence_interval = duration_setting(
            "fence interval",
            s.pool.fence_interval,
            DEFAULT_FENCE_INTERVAL,
        )?;
        if fence_interval.is_zero() {
            return Err(invalid("fence interval", "0", "must be positive"));
        }

        let store = s.keys.store.unwrap_or_else(|| "local".to_owned());
        let keys = match store.as_str() {
            "local" => KeyStoreConfig::Local {
                dir: s.keys.dir.unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_DIR)),
            },
            "envelope" => KeyStoreConfig::Envelope {
                kek_file: s.keys.kek_file.ok_or(ConfigError::Missing {
                    setting: "key-encryption key file (envelope key store)",
                    flag: "kek-file",
                    env: "VOLUMED_KEK_FILE",
                    file: "keys.kek_file",
                })?,
            },
            other => return Err(invalid("key store", other, "use `local` or `envelope`")),
        };

        let defaults = CryptOptions::default();
        let crypt = CryptOptions {
            allow_discards: s.crypt.allow_discards.unwrap_or(defaults.allow_discards),
            no_read_workqueue: s
                .crypt
                .no_read_workqueue
                .unwrap_or(defaults.no_read_workqueue),
            no_write_workqueue: s
                .crypt
                .no_write_workqueue
                .unwrap_or(defaults.no_write_workqueue),
        };

        let jails = match s.jails.dir {
            None => None,
            Some(dir) => {
                if !dir.is_absolute() {
                    return Err(invalid(
                        "jails directory",
                        &dir.display().to_string(),
                        "must be an absolute path",
                    ));
                }
                let node = s.jails.node.unwrap_or_else(|| DEFAULT_JAIL_NODE.to_owned());
                if node.is_empty() || node.contains('/') || node == "." || node == ".." {
                    return Err(invalid(
                        "jail node name",
                        &node,
                        "must be one path component",
                    ));
                }
                let id = |value: Option<u32>, setting, flag, env, file| {
                    value.ok_or(ConfigError::Missing {
                        setting,
                        flag,
                        env,
                        file,
                    })
                };
                Some(JailConfig {
                    dir,
                    uid: id(
                        s.jails.uid,
                        "jail node owner uid",
                        "jail-uid",
                        "VOLUMED_JAIL_UID",
                        "jails.uid",
                    )?,
                    gid: id(
                        s.jails.gid,
                        "jail node owner gid",
                        "jail-gid",
                        "VOLUMED_JAIL_GID",
                        "jails.gid",
                    )?,
                    node,
                })
            }
        };

        let listen = match s.daemon.listen {
            Some(addr) => Some(addr),
            None => Some(DEFAULT_LISTEN.parse().expect("valid default address")),
        };
        let heartbeat_interval = duration_setting(
            "heartbeat interval",
            s.daemon.heartbeat_interval,
            DEFAULT_HEARTBEAT,
        )?;
        if heartbeat_interval.is_zero() {
            return Err(invalid("heartbeat interval", "0", "must be positive"));
        }
        let pool_refresh_interval = duration_setting(
            "pool refresh interval",
            s.daemon.pool_refresh_interval,
            DEFAULT_POOL_REFRESH,
        )?;
        let volume_autoextend_interval = duration_setting(
            "volume auto-extend interval",
            s.daemon.volume_autoextend_interval,
            DEFAULT_VOLUME_AUTOEXTEND_INTERVAL,
        )?;
        if volume_autoextend_interval.is_zero() {
            return Err(invalid(
                "volume auto-extend interval",
                "0",
                "must be positive",
            ));
        }
        let fs_usage_max_age = duration_setting(
            "filesystem usage max age",
            s.daemon.fs_usage_max_age,
            DEFAULT_FS_USAGE_MAX_AGE,
        )?;
        let max_concurrent = s.daemon.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT);
        if max_concurrent == 0 {
            return Err(invalid("max concurrent", "0", "must be at least 1"));
        }
        let snapshot_period = duration_setting(
            "snapshot period",
            s.daemon.snapshot_period,
            DEFAULT_SNAPSHOT_PERIOD,
        )?;
        let snapshot_check_interval = duration_setting(
            "snapshot check interval",
            s.daemon.snapshot_check_interval,
            DEFAULT_SNAPSHOT_CHECK,
        )?;
        if snapshot_period < Duration::from_secs(1) {
            return Err(invalid(
                "snapshot period",
                &format!("{snapshot_period:?}"),
                "must be at least 1s",
            ));
        }
        if snapshot_check_interval.is_zero() {
            return Err(invalid("snapshot check interval", "0", "must be positive"));
        }

        Ok(Config {
            host,
            region,
            zone,
            layout,
            consul_addr: s.kv.address,
            consul_token_file: s.kv.token_file,
            watch_wait,
            retry_max,
            vg,
            pool,
            pvs,
            pool_data_size,
            pool_metadata_size,
            policy,
            growth,
            autoextend_interval,
            fence,
            fence_interval,
            keys,
            crypt,
            jails,
            listen,
            heartbeat_interval,
            pool_refresh_interval,
            volume_autoextend_interval,
            fs_usage_max_age,
            max_concurrent,
            snapshot_period,
            snapshot_check_interval,
            run_dir: s
                .daemon
                .run_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR)),
            migration: s.migration.listen.map(|listen| MigrationConfig {
                listen,
                key_file: s
                    .migration
                    .key_file
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_MIGRATION_KEY)),
            }),
            #[cfg(feature = "testing")]
            sim,
        })
    }
}

fn percent(setting: &'static str, pct: u32) -> Result<Percent, ConfigError> {
    if pct > 100 {
        return Err(invalid(setting, &pct.to_string(), "must be 0..=100"));
    }
    Ok(Percent::from_whole(pct))
}

fn duration_setting(
    setting: &'static str,
    text: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match text {
        None => Ok(default),
        Some(text) => parse_duration(&text).map_err(|e| invalid(setting, &text, e)),
    }
}

/// Go duration text (`500ms`, `10s`, `5m`, `1h30m`), as Consul's own
/// settings take it, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    match consul_kv::duration::parse_go_duration(text) {
        Ok(parsed) if !parsed.negative => Ok(parsed.magnitude),
        _ => Err("expected a duration such as 500ms, 10s, 5m or 1h30m".to_owned()),
    }
}

/// `3GiB`, `512MiB`, `3G` (binary, as LVM reads it), `25GB` (decimal), or a
/// bare number of bytes; never zero.
pub fn parse_size(text: &str) -> Result<Bytes, String> {
    let bytes: Bytes = text.parse()?;
    if bytes == Bytes::ZERO {
        return Err("must be larger than 0".to_owned());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use volume_core::units::{GIB, MIB};

    fn options(args: &[&str]) -> Settings {
        let mut full = vec!["volumed"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).unwrap().options.settings
    }

    fn file(text: &str) -> Settings {
        toml::from_str(text).unwrap()
    }

    const FILE: &str = r#"
        host = "h-file"
        region = "ewr"
        zone = "ewr-a"
        [pool]
        vg = "vg0"
        pvs = ["/dev/vdb"]
        overcommit = "2.5"
        data_size = "3GiB"
        [keys]
        store = "envelope"
        kek_file = "/etc/volumed/kek"
        [jails]
        dir = "/srv/jails"
        uid = 1000
        gid = 1001
        [daemon]
        heartbeat_interval = "5s"
    "#;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let config = Config::merge(
            &options(&["--host", "h-flag", "--heartbeat-interval", "2s"]),
            file(FILE),
        )
        .unwrap();
        assert_eq!(config.host.as_str(), "h-flag");
        assert_eq!(config.region.as_str(), "ewr");
        assert_eq!(config.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(config.pool_refresh_interval, DEFAULT_POOL_REFRESH);
        assert_eq!(config.policy.overcommit.thousandths(), 2500);
        assert_eq!(config.pool_data_size, Some(Bytes(3 * GIB)));
        assert_eq!(
            config.keys,
            KeyStoreConfig::Envelope {
                kek_file: "/etc/volumed/kek".into()
            }
        );
        let jails = config.jails.unwrap();
        assert_eq!(
            (jails.uid, jails.gid, jails.node.as_str()),
            (1000, 1001, "vol")
        );
        assert_eq!(config.layout.root(), DEFAULT_ROOT);
        assert_eq!(config.crypt, CryptOptions::default());
        assert!(config.crypt.allow_discards);
    }

    #[test]
    fn discards_can_be_turned_off_from_the_file_or_a_flag() {
        let text = format!("{FILE}\n[crypt]\nallow_discards = false\n");
        let config = Config::merge(&options(&[]), file(&text)).unwrap();
        assert!(!config.crypt.allow_discards);
        assert!(config.crypt.no_read_workqueue && config.crypt.no_write_workqueue);
        let config = Config::merge(&options(&["--allow-discards", "true"]), file(&text)).unwrap();
        assert!(config.crypt.allow_discards);
        let config = Config::merge(&options(&["--allow-discards", "false"]), file(FILE)).unwrap();
        assert!(!config.crypt.allow_discards);
        assert!(Cli::try_parse_from(["volumed", "--allow-discards", "maybe"]).is_err());
    }

    #[test]
    fn migrations_are_off_until_an_export_address_is_given() {
        let config = Config::merge(&options(&[]), file(FILE)).unwrap();
        assert_eq!(config.migration, None);
        // A key file alone does not make a host take part.
        let config = Config::merge(&options(&["--migration-key", "/k"]), file(FILE)).unwrap();
        assert_eq!(config.migration, None);
        let config = Config::merge(
            &options(&["--migration-listen", "10.0.0.5:10809"]),
            file(FILE),
        )
        .unwrap();
        assert_eq!(
            config.migration,
            Some(MigrationConfig {
                listen: "10.0.0.5:10809".parse().unwrap(),
                key_file: DEFAULT_MIGRATION_KEY.into(),
            })
        );
        let text = format!(
            "{FILE}\n[migration]\nlisten = \"127.0.0.1:10809\"\nkey_file = \"/etc/volumed/mig.key\"\n"
        );
        let config = Config::merge(&options(&[]), file(&text)).unwrap();
        assert_eq!(
            config.migration.map(|m| (m.listen.port(), m.key_file)),
            Some((10809, "/etc/volumed/mig.key".into()))
        );
        assert!(Cli::try_parse_from(["volumed", "--migration-listen", "nowhere"]).is_err());
        assert!(toml::from_str::<Settings>("[migration]\nlisten = \"h:1\"").is_err());
    }

    #[test]
    fn missing_and_bad_settings_name_themselves() {
        let err = Config::merge(&options(&[]), Settings::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "host id is required (flag --host, env VOLUMED_HOST, or `host` in the config file)"
        );
        let err = Config::merge(&options(&["--host", "H/1"]), file(FILE)).unwrap_err();
        assert!(
            err.to_string().starts_with("host id \"H/1\" is invalid"),
            "{err}"
        );
        let err = Config::merge(&options(&["--overcommit", "0"]), file(FILE)).unwrap_err();
        assert!(err.to_string().contains("over-commit ratio"), "{err}");
        let err = Config::merge(&options(&["--key-store", "vault"]), file(FILE)).unwrap_err();
        assert!(
            err.to_string().contains("use `local` or `envelope`"),
            "{err}"
        );
        assert!(toml::from_str::<Settings>("hots = \"typo\"").is_err());
    }

    #[test]
    fn auto_extend_settings_come_from_file_and_flags_within_lvms_limits() {
        let text = format!("{FILE}\n");
        let text = text.replace(
            "data_size = \"3GiB\"",
            "data_size = \"3GiB\"\n        autoextend_threshold = 80\n        metadata_autoextend_percent = 50",
        );
        let config = Config::merge(
            &options(&["--autoextend-percent", "10", "--autoextend-interval", "1s"]),
            file(&text),
        )
        .unwrap();
        assert_eq!(config.growth.data.threshold, Percent::from_whole(80));
        assert_eq!(config.growth.data.step, Percent::from_whole(10));
        assert_eq!(config.growth.metadata.threshold, Percent::from_whole(70));
        assert_eq!(config.growth.metadata.step, Percent::from_whole(50));
        assert_eq!(config.autoextend_interval, Duration::from_secs(1));

        let err = Config::merge(
            &options(&["--metadata-autoextend-threshold", "30"]),
            file(FILE),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("auto-extend threshold \"30.00%\" is invalid: metadata"),
            "{err}"
        );
        let err = Config::merge(&options(&["--reserve-percent", "60"]), file(FILE)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pool reserve percent \"60\" is invalid: pool reserve 60.00%: must be 0–50 % of the pool's data (0 turns fencing off)"
        );
        let config = Config::merge(
            &options(&["--reserve-percent", "5", "--fence-interval", "100ms"]),
            file(FILE),
        )
        .unwrap();
        assert_eq!(config.fence.reserve, Percent::from_whole(5));
        assert_eq!(config.fence_interval, Duration::from_millis(100));
        let err = Config::merge(&options(&["--autoextend-percent", "0"]), file(FILE)).unwrap_err();
        assert!(err.to_string().contains("auto-extend percent"), "{err}");
    }

    #[cfg(feature = "testing")]
    #[test]
    fn sim_mode_needs_no_pool_settings() {
        let config = Config::merge(
            &options(&["--sim", "--host", "h1", "--region", "r", "--zone", "z"]),
            Settings::default(),
        )
        .unwrap();
        assert!(config.sim);
        assert_eq!(config.pvs, vec![PathBuf::from("/dev/sim0")]);
        assert_eq!(config.jails, None);
    }

    #[test]
    fn env_sits_between_flags_and_the_file() {
        // Only this test reads this variable's effect.
        std::env::set_var("VOLUMED_MAX_CONCURRENT", "7");
        let text = format!("{FILE}\nmax_concurrent = 3\n");
        let from_env = Config::merge(&options(&[]), file(&text)).unwrap();
        let from_flag = Config::merge(&options(&["--max-concurrent", "9"]), file(&text)).unwrap();
        std::env::remove_var("VOLUMED_MAX_CONCURRENT");
        assert_eq!(from_env.max_concurrent, 7);
        assert_eq!(from_flag.max_concurrent, 9);
        assert_eq!(
            Config::merge(&options(&[]), file(&text))
                .unwrap()
                .max_concurrent,
            3
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let example: Settings = toml::from_str(include_str!("../volumed.example.toml")).unwrap();
        let config = Config::merge(&Settings::default(), example).unwrap();
        assert_eq!(config.host.as_str(), "h1");
        assert_eq!(config.heartbeat_interval, DEFAULT_HEARTBEAT);
        assert!(config.jails.is_some());
    }

    #[test]
    fn units_parse_strictly() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("-5s").is_err());
        assert_eq!(parse_size("512MiB").unwrap(), Bytes(512 * MIB));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1.5G").is_err());
    }
}

//! Prometheus metrics, exposed with `prometheus-client` (OpenMetrics text).
//!
//! Gauges that describe the host (pool, volumes by state, orphans) are set
//! by the reconcile loop from what it already knows; rendering a scrape
//! reads only memory, never LVM or the KV store. Names follow Prometheus
//! conventions, with the unit in the name (`_bytes`, `_percent`,
//! `_seconds`) and `_total` on counters; ARCHITECTURE.md lists them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use volume_control::layout::VolumeState;
use volume_core::backend::PoolStatus;
use volume_core::health::PoolHealth;

/// Upper bounds of the duration histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

/// What the reconcile loop measures the duration of.
pub const OPERATIONS: [&str; 9] = [
    "full",
    "create",
    "open",
    "extend",
    "expose",
    "destroy",
    "restore",
    "snapshot",
    "snapshot_destroy",
];

const STATES: [VolumeState; 6] = [
    VolumeState::Creating,
    VolumeState::Ready,
    VolumeState::Extending,
    VolumeState::Destroying,
    VolumeState::Error,
    VolumeState::Orphan,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabel {
    health: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type Durations = Family<OperationLabel, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Every metric volumed exports.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    registry: Registry,
    pool_data_percent: FloatGauge,
    pool_metadata_percent: FloatGauge,
    pool_data_size: Gauge,
    pool_provisioned: Gauge,
    /// 1 while the pool can take writes.
    pool_healthy: Gauge,
    /// One series per health state, 1 for the current one.
    pool_health: Family<HealthLabel, Gauge>,
    kv_up: Gauge,
    orphans: Gauge,
    stray_keys: Gauge,
    snapshots: Gauge,
    snapshot_bytes: Gauge,
    orphan_snapshots: Gauge,
    volumes: Family<StateLabel, Gauge>,
    durations: Durations,
    errors: Family<KindLabel, Counter>,
    kv_writes: Counter,
    watch_updates: Counter,
    lvm_calls: Counter,
    lvm_changes: Counter,
    ledger_repairs: Counter,
    /// Volume auto-extend steps by outcome (`grown`, `refused`).
    volume_autoextends: Family<OutcomeLabel, Counter>,
    fenced_volumes: Gauge,
    fences: Family<ReasonLabel, Counter>,
    unfences: Family<CauseLabel, Counter>,
    /// Milliseconds since start of the reconcile loop's last turn (liveness).
    loop_alive_ms: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Metrics {
            started: Instant::now(),
            registry: Registry::default(),
            pool_data_percent: FloatGauge::default(),
            pool_metadata_percent: FloatGauge::default(),
            pool_data_size: Gauge::default(),
            pool_provisioned: Gauge::default(),
            pool_healthy: Gauge::default(),
            pool_health: Family::default(),
            kv_up: Gauge::default(),
            orphans: Gauge::default(),
            stray_keys: Gauge::default(),
            snapshots: Gauge::default(),
            snapshot_bytes: Gauge::default(),
            orphan_snapshots: Gauge::default(),
            volumes: Family::default(),
            durations: Durations::new_with_constructor(duration_histogram),
            errors: Family::default(),
            kv_writes: Counter::default(),
            watch_updates: Counter::default(),
            lvm_calls: Counter::default(),
            lvm_changes: Counter::default(),
            ledger_repairs: Counter::default(),
            volume_autoextends: Family::default(),
            fenced_volumes: Gauge::default(),
            fences: Family::default(),
            unfences: Family::default(),
            loop_alive_ms: AtomicU64::new(0),
        };
        // Every state and operation shows, at 0 until it happens.
        for state in STATES {
            let _ = metrics.volumes.get_or_create(&StateLabel {
                state: state.as_str(),
            });
        }
        for operation in OPERATIONS {
            let _ = metrics
                .durations
                .get_or_create(&OperationLabel { operation });
        }
        for health in PoolHealth::ALL {
            let _ = metrics.pool_health.get_or_create(&HealthLabel {
                health: health.as_str(),
            });
        }
        let r = &mut metrics.registry;
        r.register(
            "volumed_pool_healthy",
            "1 while the thin pool can take writes, 0 while it is out of data, read-only, failed or unknown",
            metrics.pool_healthy.clone(),
        );
        r.register(
            "volumed_pool_health",
            "The thin pool's health: 1 for the current state",
            metrics.pool_health.clone(),
        );
        r.register(
            "volumed_pool_data_percent",
            "Share of the thin pool's data space in use",
            metrics.pool_data_percent.clone(),
        );
        r.register(
            "volumed_pool_metadata_percent",
            "Share of the thin pool's metadata space in use",
            metrics.pool_metadata_percent.clone(),
        );
        r.register(
            "volumed_pool_data_size_bytes",
            "Physical data size of the thin pool",
            metrics.pool_data_size.clone(),
        );
        r.register(
            "volumed_pool_provisioned_bytes",
            "Sum of the virtual sizes of the pool's thin volumes",
            metrics.pool_provisioned.clone(),
        );
        r.register(
            "volumed_kv_up",
            "1 when the last KV request succeeded",
            metrics.kv_up.clone(),
        );
        r.register(
            "volumed_orphan_volumes",
            "Our LVs with no desired record (never deleted without gc)",
            metrics.orphans.clone(),
        );
        r.register(
            "volumed_snapshots",
            "Snapshots in the pool",
            metrics.snapshots.clone(),
        );
        r.register(
            "volumed_snapshot_bytes",
            "Virtual size of the snapshots in the pool (what they count in capacity)",
            metrics.snapshot_bytes.clone(),
        );
        r.register(
            "volumed_orphan_snapshots",
            "Our snapshot LVs with no snapshot record (never deleted without gc)",
            metrics.orphan_snapshots.clone(),
        );
        r.register(
            "volumed_stray_desired_keys",
            "Keys under the desired prefix that name no volume",
            metrics.stray_keys.clone(),
        );
        r.register(
            "volumed_volumes",
            "Volumes by state",
            metrics.volumes.clone(),
        );
        r.register(
            "volumed_operation_duration_seconds",
            "Duration of reconcile operations",
            metrics.durations.clone(),
        );
        // Counters: the encoder adds `_total`.
        r.register("volumed_errors", "Failures by kind", metrics.errors.clone());
        r.register(
            "volumed_kv_writes",
            "Writes and transactions sent to the KV store",
            metrics.kv_writes.clone(),
        );
        r.register(
            "volumed_watch_updates",
            "Changes of the desired prefix received",
            metrics.watch_updates.clone(),
        );
        r.register(
            "volumed_lvm_calls",
            "Thin-backend calls (each reads LVM at least once)",
            metrics.lvm_calls.clone(),
        );
        r.register(
            "volumed_lvm_changes",
            "Thin-backend calls that may change LVM state",
            metrics.lvm_changes.clone(),
        );
        r.register(
            "volumed_ledger_repairs",
            "Times the host's ledger disagreed with its desired records and was rewritten",
            metrics.ledger_repairs.clone(),
        );
        for outcome in ["grown", "refused"] {
            let _ = metrics
                .volume_autoextends
                .get_or_create(&OutcomeLabel { outcome });
        }
        r.register(
            "volumed_volume_autoextend",
            "Volume auto-extend steps: grown (size and reservation recorded) or refused (no headroom)",
            metrics.volume_autoextends.clone(),
        );
        r.register(
            "volumed_fenced_volumes",
            "Volumes fenced now (suspended while the pool is in its reserve)",
            metrics.fenced_volumes.clone(),
        );
        r.register(
            "volumed_fences",
            "Volumes fenced, by reason",
            metrics.fences.clone(),
        );
        r.register(
            "volumed_unfences",
            "Volumes unfenced, by cause",
            metrics.unfences.clone(),
        );
        metrics
    }
}

fn gauge_value(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn observe(&self, operation: &'static str, elapsed: Duration) {
        self.durations
            .get_or_create(&OperationLabel { operation })
            .observe(elapsed.as_secs_f64());
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn errors(&self, kind: &'static str) -> u64 {
        self.errors.get_or_create(&KindLabel { kind }).get()
    }

    pub fn set_volume_states(&self, counts: BTreeMap<&'static str, u64>) {
        for state in STATES {
            let count = counts.get(state.as_str()).copied().unwrap_or(0);
            self.volumes
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(gauge_value(count));
        }
    }

    pub fn set_pool(&self, pool: &PoolStatus) {
        let usage = pool.usage;
        self.pool_data_percent
            .set(f64::from(usage.data_percent().hundredths()) / 100.0);
        self.pool_metadata_percent
            .set(f64::from(usage.metadata_percent().hundredths()) / 100.0);
        self.pool_data_size.set(gauge_value(usage.data_size.0));
        self.pool_provisioned.set(gauge_value(usage.provisioned.0));
        self.pool_healthy
            .set(i64::from(usage.health.takes_writes()));
        for health in PoolHealth::ALL {
            self.pool_health
                .get_or_create(&HealthLabel {
                    health: health.as_str(),
                })
                .set(i64::from(health == usage.health));
        }
    }

    /// The pool's health as last read (for `/healthz`).
    pub fn pool_health(&self) -> PoolHealth {
        PoolHealth::ALL
            .into_iter()
            .find(|health| {
                self.pool_health
                    .get_or_create(&HealthLabel {
                        health: health.as_str(),
                    })
                    .get()
                    == 1
            })
            .unwrap_or_default()
    }

    pub fn set_kv_up(&self, up: bool) {
        self.kv_up.set(i64::from(up));
    }

    pub fn kv_up(&self) -> bool {
        self.kv_up.get() == 1
    }

    pub fn set_orphans(&self, count: usize) {
        self.orphans.set(gauge_value(count as u64));
    }

    pub fn orphans(&self) -> u64 {
        u64::try_from(self.orphans.get()).unwrap_or(0)
    }

    /// Snapshots in the pool: how many, their virtual size, and how many
    /// have no record.
    pub fn set_snapshots(&self, count: usize, bytes: u64, orphans: usize) {
        self.snapshots.set(gauge_value(count as u64));
        self.snapshot_bytes.set(gauge_value(bytes));
        self.orphan_snapshots.set(gauge_value(orphans as u64));
    }

    pub fn snapshots(&self) -> (u64, u64, u64) {
        let read = |g: &Gauge| u64::try_from(g.get()).unwrap_or(0);
        (
            read(&self.snapshots),
            read(&self.snapshot_bytes),
            read(&self.orphan_snapshots),
        )
    }

    pub fn set_stray_keys(&self, count: usize) {
        self.stray_keys.set(gauge_value(count as u64));
    }

    pub fn kv_write(&self) {
        self.kv_writes.inc();
    }

    pub fn kv_writes(&self) -> u64 {
        self.kv_writes.get()
    }

    pub fn watch_update(&self) {
        self.watch_updates.inc();
    }

    pub fn watch_updates(&self) -> u64 {
        self.watch_updates.get()
    }

    pub fn lvm_call(&self, changes: bool) {
        self.lvm_calls.inc();
        if changes {
            self.lvm_changes.inc();
        }
    }

    /// Backend calls made through the daemon (each reads LVM at least once).
    pub fn lvm_calls(&self) -> u64 {
        self.lvm_calls.get()
    }

    /// One volume auto-extend step ended so (`grown` or `refused`).
    pub fn volume_autoextend(&self, outcome: &'static str) {
        self.volume_autoextends
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// The ledger disagreed with the desired records and was corrected.
    pub fn set_fenced(&self, count: usize) {
        self.fenced_volumes
            .set(gauge_value(u64::try_from(count).unwrap_or(u64::MAX)));
    }

    pub fn fenced_volumes(&self) -> u64 {
        u64::try_from(self.fenced_volumes.get()).unwrap_or(0)
    }

    pub fn fenced(&self, reason: &'static str) {
        self.fences.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn unfenced(&self, cause: &'static str) {
        self.unfences.get_or_create(&CauseLabel { cause }).inc();
    }

    pub fn ledger_repaired(&self) {
        self.ledger_repairs.inc();
    }

    pub fn loop_alive(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.loop_alive_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the reconcile loop last turned.
    pub fn loop_idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.loop_alive_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// The OpenMetrics text exposition (Prometheus scrapes it as is).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The exposition's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_types_and_labels() {
        let metrics = Metrics::default();
        metrics.observe("create", Duration::from_millis(30));
        metrics.error("create");
        metrics.set_volume_states([("ready", 3)].into_iter().collect());
        let text = metrics.render();
        assert!(text.contains("# TYPE volumed_volumes gauge\n"), "{text}");
        assert!(text.contains("volumed_volumes{state=\"ready\"} 3\n"));
        assert!(text.contains("volumed_volumes{state=\"orphan\"} 0\n"));
        assert!(text.contains(
            "volumed_operation_duration_seconds_bucket{le=\"0.05\",operation=\"create\"} 1\n"
        ));
        assert!(text.contains(
            "volumed_operation_duration_seconds_bucket{le=\"0.01\",operation=\"create\"} 0\n"
        ));
        assert!(text.contains("volumed_operation_duration_seconds_count{operation=\"create\"} 1\n"));
        assert!(text.contains("volumed_errors_total{kind=\"create\"} 1\n"));
        assert!(text.contains("volumed_kv_up 0\n"));
    }
}

//! Prometheus metrics in the text exposition format, written by hand.
//!
//! Gauges that describe the host (pool, volumes by state, orphans) are set
//! by the reconcile loop from what it already knows; rendering a scrape
//! reads only memory, never LVM or the KV store.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use volume_control::layout::VolumeState;
use volume_core::backend::PoolStatus;

/// Upper bounds of the duration histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

#[derive(Debug, Default)]
struct Tables {
    volumes_by_state: BTreeMap<&'static str, u64>,
    durations: BTreeMap<&'static str, Histogram>,
    errors: BTreeMap<&'static str, u64>,
    pool: Option<PoolStatus>,
}

/// Every metric volumed exports.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    tables: Mutex<Tables>,
    kv_up: AtomicBool,
    orphans: AtomicU64,
    stray_keys: AtomicU64,
    kv_writes: AtomicU64,
    watch_updates: AtomicU64,
    lvm_reports: AtomicU64,
    lvm_changes: AtomicU64,
    ledger_repairs: AtomicU64,
    /// Milliseconds since start of the reconcile loop's last turn (liveness).
    loop_alive_ms: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            tables: Mutex::new(Tables::default()),
            kv_up: AtomicBool::new(false),
            orphans: AtomicU64::new(0),
            stray_keys: AtomicU64::new(0),
            kv_writes: AtomicU64::new(0),
            watch_updates: AtomicU64::new(0),
            lvm_reports: AtomicU64::new(0),
            lvm_changes: AtomicU64::new(0),
            ledger_repairs: AtomicU64::new(0),
            loop_alive_ms: AtomicU64::new(0),
        }
    }
}

/// What the reconcile loop measures the duration of.
pub const OPERATIONS: [&str; 6] = ["full", "create", "open", "extend", "expose", "destroy"];

impl Metrics {
    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // Plain counters: a panic elsewhere leaves nothing inconsistent.
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn observe(&self, operation: &'static str, elapsed: Duration) {
        self.tables()
            .durations
            .entry(operation)
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    pub fn error(&self, kind: &'static str) {
        *self.tables().errors.entry(kind).or_default() += 1;
    }

    pub fn errors(&self, kind: &str) -> u64 {
        self.tables().errors.get(kind).copied().unwrap_or(0)
    }

    pub fn set_volume_states(&self, counts: BTreeMap<&'static str, u64>) {
        self.tables().volumes_by_state = counts;
    }

    pub fn set_pool(&self, pool: &PoolStatus) {
        self.tables().pool = Some(pool.clone());
    }

    pub fn set_kv_up(&self, up: bool) {
        self.kv_up.store(up, Ordering::Relaxed);
    }

    pub fn kv_up(&self) -> bool {
        self.kv_up.load(Ordering::Relaxed)
    }

    pub fn set_orphans(&self, count: usize) {
        self.orphans.store(count as u64, Ordering::Relaxed);
    }

    pub fn orphans(&self) -> u64 {
        self.orphans.load(Ordering::Relaxed)
    }

    pub fn set_stray_keys(&self, count: usize) {
        self.stray_keys.store(count as u64, Ordering::Relaxed);
    }

    pub fn kv_write(&self) {
        self.kv_writes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn kv_writes(&self) -> u64 {
        self.kv_writes.load(Ordering::Relaxed)
    }

    pub fn watch_update(&self) {
        self.watch_updates.fetch_add(1, Ordering::Relaxed);
    }

    pub fn watch_updates(&self) -> u64 {
        self.watch_updates.load(Ordering::Relaxed)
    }

    pub fn lvm_call(&self, changes: bool) {
        self.lvm_reports.fetch_add(1, Ordering::Relaxed);
        if changes {
            self.lvm_changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Backend calls made through the daemon (each reads LVM at least once).
    pub fn lvm_calls(&self) -> u64 {
        self.lvm_reports.load(Ordering::Relaxed)
    }

    /// The ledger disagreed with the desired records and was corrected.
    pub fn ledger_repaired(&self) {
        self.ledger_repairs.fetch_add(1, Ordering::Relaxed);
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

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let tables = self.tables();
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        if let Some(pool) = &tables.pool {
            let usage = pool.usage;
            gauge(
                "volumed_pool_data_percent",
                "Share of the thin pool's data space in use.",
                f64::from(usage.data_percent().hundredths()) / 100.0,
            );
            gauge(
                "volumed_pool_metadata_percent",
                "Share of the thin pool's metadata space in use.",
                f64::from(usage.metadata_percent().hundredths()) / 100.0,
            );
            gauge(
                "volumed_pool_data_bytes",
                "Physical data size of the thin pool.",
                usage.data_size.0 as f64,
            );
            gauge(
                "volumed_pool_provisioned_bytes",
                "Sum of the virtual sizes of the pool's thin volumes.",
                usage.provisioned.0 as f64,
            );
        }
        gauge(
            "volumed_kv_up",
            "1 when the last KV request succeeded.",
            if self.kv_up() { 1.0 } else { 0.0 },
        );
        gauge(
            "volumed_orphans",
            "Our LVs with no desired record (never deleted without gc).",
            self.orphans() as f64,
        );
        gauge(
            "volumed_stray_desired_keys",
            "Keys under the desired prefix that name no volume.",
            self.stray_keys.load(Ordering::Relaxed) as f64,
        );
        let _ = writeln!(
            out,
            "# HELP volumed_volumes Volumes by state.\n# TYPE volumed_volumes gauge"
        );
        for state in [
            VolumeState::Creating,
            VolumeState::Ready,
            VolumeState::Extending,
            VolumeState::Destroying,
            VolumeState::Error,
            VolumeState::Orphan,
        ] {
            let count = tables
                .volumes_by_state
                .get(state.as_str())
                .copied()
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "volumed_volumes{{state=\"{}\"}} {count}",
                state.as_str()
            );
        }
        let _ = writeln!(
            out,
            "# HELP volumed_operation_duration_seconds Duration of reconcile operations.\n# TYPE volumed_operation_duration_seconds histogram"
        );
        for operation in OPERATIONS {
            let histogram = tables.durations.get(operation).cloned().unwrap_or_default();
            for (bound, count) in BUCKETS.iter().zip(histogram.counts) {
                let _ = writeln!(
                    out,
                    "volumed_operation_duration_seconds_bucket{{operation=\"{operation}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "volumed_operation_duration_seconds_bucket{{operation=\"{operation}\",le=\"+Inf\"}} {}\nvolumed_operation_duration_seconds_sum{{operation=\"{operation}\"}} {}\nvolumed_operation_duration_seconds_count{{operation=\"{operation}\"}} {}",
                histogram.count, histogram.sum, histogram.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP volumed_errors_total Failures by kind.\n# TYPE volumed_errors_total counter"
        );
        for (kind, count) in &tables.errors {
            let _ = writeln!(out, "volumed_errors_total{{kind=\"{kind}\"}} {count}");
        }
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "volumed_kv_writes_total",
            "Writes and transactions sent to the KV store.",
            self.kv_writes(),
        );
        counter(
            "volumed_watch_updates_total",
            "Changes of the desired prefix received.",
            self.watch_updates(),
        );
        counter(
            "volumed_lvm_calls_total",
            "Thin-backend calls (each reads LVM at least once).",
            self.lvm_calls(),
        );
        counter(
            "volumed_lvm_changes_total",
            "Thin-backend calls that may change LVM state.",
            self.lvm_changes.load(Ordering::Relaxed),
        );
        counter(
            "volumed_ledger_repairs_total",
            "Times the host's ledger disagreed with its desired records and was rewritten.",
            self.ledger_repairs.load(Ordering::Relaxed),
        );
        out
    }
}

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
            "volumed_operation_duration_seconds_bucket{operation=\"create\",le=\"0.05\"} 1\n"
        ));
        assert!(text.contains(
            "volumed_operation_duration_seconds_bucket{operation=\"create\",le=\"0.01\"} 0\n"
        ));
        assert!(text.contains("volumed_operation_duration_seconds_count{operation=\"create\"} 1\n"));
        assert!(text.contains("volumed_errors_total{kind=\"create\"} 1\n"));
        assert!(text.contains("volumed_kv_up 0\n"));
    }
}

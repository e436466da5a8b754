//! Pool auto-extend: grow the thin pool's data and metadata from the VG's
//! free space before a writer meets a full pool.
//!
//! LVM's own `thin_pool_autoextend_*` runs in dmeventd, which many hosts do
//! not run, so the daemon does it: [`AutoExtender::run`] sleeps on
//! device-mapper events ([`DmEvents`]: `DM_DEV_ARM_POLL` and `poll(2)` on
//! the control device, woken by any device's event, among them the pool's
//! low-water-mark event) with a timer as the fallback, and on each wake
//! reads the pool once and grows what [`PoolGrowthPolicy::plan`] asks for.

use crate::backend::{BackendError, PoolStatus, ThinBackend};
use crate::capacity::PoolUsage;
use crate::fence::PoolRoom;
use crate::pool_growth::{PoolGrowth, PoolGrowthPolicy, PoolPart};
use crate::units::Bytes;
use devicemapper::DM;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a wait for pool events failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("opening device-mapper's control device failed: {0}")]
    Open(String),
    #[error("re-arming device-mapper's event poll failed: {0}")]
    Arm(String),
    #[error("polling device-mapper's control device failed: {0}")]
    Poll(nix::Error),
}

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Event,
    Timeout,
}

/// A source of "something may have changed in the pool" wake-ups.
pub trait PoolEvents: Send {
    /// Sleeps until an event arrives or `timeout` passes. An event that
    /// came after the previous wake and before this call ends it at once.
    fn wait(&mut self, timeout: Duration) -> Result<Wake, WatchError>;
}

/// Device-mapper events, all devices at once: the kernel bumps a global
/// event counter for every device's table event (a thin pool raises one
/// when free data falls below its `low_water_mark`, when it runs out of
/// space or changes mode) and for device creation and removal. The control
/// device polls readable once that counter moves past the value the last
/// `DM_DEV_ARM_POLL` recorded. Spurious wakes only cost one pool read.
pub struct DmEvents {
    dm: DM,
}

impl DmEvents {
    /// Opens the control device and arms it: events from now on wake.
    pub fn open() -> Result<DmEvents, WatchError> {
        let dm = DM::new().map_err(|err| WatchError::Open(err.to_string()))?;
        dm.arm_poll()
            .map_err(|err| WatchError::Arm(err.to_string()))?;
        Ok(DmEvents { dm })
    }
}

impl PoolEvents for DmEvents {
    fn wait(&mut self, timeout: Duration) -> Result<Wake, WatchError> {
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.dm.file().as_fd(), PollFlags::POLLIN)];
        let ready = match nix::poll::poll(&mut fds, PollTimeout::from(millis)) {
            Ok(ready) => ready,
            Err(nix::Error::EINTR) => 0,
            Err(err) => return Err(WatchError::Poll(err)),
        };
        if ready == 0 {
            return Ok(Wake::Timeout);
        }
        // Re-arm before the caller reads the pool, so an event during that
        // read wakes the next wait instead of being lost.
        self.dm
            .arm_poll()
            .map_err(|err| WatchError::Arm(err.to_string()))?;
        Ok(Wake::Event)
    }
}

/// Only the timer: for the simulated backend, which has no kernel.
pub struct TimerOnly;

impl PoolEvents for TimerOnly {
    fn wait(&mut self, timeout: Duration) -> Result<Wake, WatchError> {
        std::thread::sleep(timeout);
        Ok(Wake::Timeout)
    }
}

/// One growth and how long it took from the wake that saw the need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedGrowth {
    pub growth: PoolGrowth,
    pub elapsed: Duration,
}

/// Reads the pool and grows it by its [`PoolGrowthPolicy`].
pub struct AutoExtender {
    backend: Arc<dyn ThinBackend>,
    policy: PoolGrowthPolicy,
    /// Parts whose last growth found the VG full: logged once, not per tick.
    vg_full: BTreeSet<PoolPart>,
    /// Where each pool reading says whether the data can still grow (read
    /// by the fencer, [`crate::fence`]).
    room: Option<Arc<PoolRoom>>,
    /// The last reading through LVM and when it was taken: a wake weighs
    /// the pool target's fill against it (see [`AutoExtender::check_fill`]).
    last_read: Option<(PoolStatus, Instant)>,
}

/// How old the last reading through LVM may get before a wake reads LVM
/// again although the pool target asks for nothing: the VG's free space,
/// which says whether the pool can still grow, is only in LVM's report.
pub const FULL_READ_MAX_AGE: Duration = Duration::from_secs(30);

/// At most this many growths back to back before waiting again: a step
/// too small for the writer repeats at once, but never without bound.
const MAX_STEPS_PER_WAKE: usize = 16;

impl AutoExtender {
    pub fn new(backend: Arc<dyn ThinBackend>, policy: PoolGrowthPolicy) -> AutoExtender {
        AutoExtender {
            backend,
            policy,
            vg_full: BTreeSet::new(),
            room: None,
            last_read: None,
        }
    }

    /// Reports after each pool reading whether its data can grow: auto-extend
    /// on and at least one extent free in the VG.
    pub fn with_room(mut self, room: Arc<PoolRoom>) -> AutoExtender {
        self.room = Some(room);
        self
    }

    /// Reads the pool and grows each part past its threshold, again until
    /// every part is below its threshold or the VG is full.
    pub fn check(&mut self) -> Result<Vec<TimedGrowth>, BackendError> {
        let woke = Instant::now();
        let mut done = Vec::new();
        for _ in 0..MAX_STEPS_PER_WAKE {
            let status = self.backend.pool_status()?;
            self.last_read = Some((status.clone(), Instant::now()));
            if let Some(room) = &self.room {
                let can_grow =
                    self.policy.data.enabled() && status.vg_free >= status.extent_size.bytes();
                room.set(can_grow);
            }
            let plan = self.plan(&status.usage, status.vg_free);
            if plan.is_empty() {
                break;
            }
            let mut grew = false;
            for (part, by) in plan {
                let growth = self.backend.grow_pool(part, by)?;
                let elapsed = woke.elapsed();
                match growth {
                    PoolGrowth::Grown { from, to, .. } => {
                        self.vg_full.remove(&part);
                        grew = true;
                        tracing::info!(
                            %part, %from, %to,
                            data_percent = %status.usage.data_percent(),
                            metadata_percent = %status.usage.metadata_percent(),
                            elapsed_ms = elapsed.as_millis() as u64,
                            "grew the thin pool"
                        );
                    }
                    PoolGrowth::VgFull { size, .. } => {
                        if self.vg_full.insert(part) {
                            tracing::warn!(
                                %part, %size,
                                "the thin pool is past its auto-extend threshold and the VG has no free space"
                            );
                        }
                    }
                }
                done.push(TimedGrowth { growth, elapsed });
            }
            if !grew {
                break;
            }
        }
        Ok(done)
    }

    /// What to grow, leaving out a part whose VG was full at its last
    /// growth while the VG still has nothing free.
    fn plan(&self, usage: &PoolUsage, vg_free: Bytes) -> Vec<(PoolPart, Bytes)> {
        self.policy
            .plan(usage)
            .into_iter()
            .filter(|(part, _)| !self.vg_full.contains(part) || vg_free.0 > 0)
            .collect()
    }

    /// A wake's check: the pool target's fill (one device-mapper status, no
    /// LVM command) against the last reading through LVM, and
    /// [`AutoExtender::check`] only when that asks for a growth, the target
    /// cannot be read, or the last reading is [`FULL_READ_MAX_AGE`] old.
    /// Every device's event wakes the watcher (a burst of creates makes
    /// several per volume), and a report through LVM costs more with every
    /// thin LV in the pool.
    pub fn check_fill(&mut self, now: Instant) -> Result<Vec<TimedGrowth>, BackendError> {
        let Some((last, read_at)) = &self.last_read else {
            return self.check();
        };
        if now.saturating_duration_since(*read_at) >= FULL_READ_MAX_AGE {
            return self.check();
        }
        let Some(fill) = self.backend.pool_fill()? else {
            return self.check();
        };
        let usage = PoolUsage {
            data_used: fill.data.of(last.usage.data_size),
            metadata_used: fill.metadata.of(last.usage.metadata_size),
            health: fill.health,
            ..last.usage
        };
        if self.plan(&usage, last.vg_free).is_empty() {
            return Ok(Vec::new());
        }
        self.check()
    }

    /// Checks, then waits for an event or `tick`, until `stop` is set.
    /// A failed check or wait is logged and retried at the next tick.
    pub fn run(&mut self, events: &mut dyn PoolEvents, tick: Duration, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            if let Err(error) = self.check_fill(Instant::now()) {
                tracing::error!(%error, "pool auto-extend check failed");
            }
            if let Err(error) = events.wait(tick) {
                tracing::error!(%error, "waiting for device-mapper events failed; sampling on the timer");
                std::thread::sleep(tick);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim::SimBackend;
    use crate::backend::ThinPoolSpec;
    use crate::names::{LvName, VgName, VolumeId};
    use crate::units::{Bytes, Percent, GIB, MIB};
    use std::path::PathBuf;

    fn sim(data_size: Bytes) -> Arc<SimBackend> {
        let mut spec = ThinPoolSpec::new(
            VgName::new("vg0").unwrap(),
            LvName::new("pool0").unwrap(),
            vec![PathBuf::from("/dev/loop0")],
        )
        .unwrap();
        spec.data_size = Some(data_size);
        let sim = Arc::new(SimBackend::new(spec));
        let _ = sim.ensure_pool().unwrap();
        sim
    }

    /// A 128 MiB pool with 200 MiB free in its VG and one 1 GiB volume.
    fn one_volume_in_a_small_pool() -> (Arc<SimBackend>, LvName, AutoExtender) {
        let sim = sim(Bytes(128 * MIB));
        sim.set_vg_free(Bytes(200 * MIB));
        let lv = VolumeId::generate().lv_name();
        let _ = sim.create_thin(&lv, Bytes(GIB), &[]).unwrap();
        let extender = AutoExtender::new(sim.clone(), PoolGrowthPolicy::default());
        (sim, lv, extender)
    }

    #[test]
    fn a_wake_reads_lvm_only_when_the_fill_asks_for_a_growth_or_the_reading_is_old() {
        let (sim, lv, mut extender) = one_volume_in_a_small_pool();
        let start = Instant::now();
        assert!(extender.check_fill(start).unwrap().is_empty());
        let after_first = sim.calls().reports;
        assert!(
            after_first > 0,
            "the first wake has no reading to weigh against"
        );

        for second in 1..10 {
            let wake = start + Duration::from_secs(second);
            assert!(extender.check_fill(wake).unwrap().is_empty());
        }
        assert_eq!(
            sim.calls().reports,
            after_first,
            "wakes with nothing to grow read the pool target only"
        );

        sim.simulate_write(&lv, Percent::from_hundredths(1172))
            .unwrap();
        let grown = extender
            .check_fill(start + Duration::from_secs(10))
            .unwrap();
        assert!(
            matches!(
                grown.as_slice(),
                [TimedGrowth {
                    growth: PoolGrowth::Grown {
                        part: PoolPart::Data,
                        ..
                    },
                    ..
                }]
            ),
            "a fill past the threshold grows at once: {grown:?}"
        );

        let before_old = sim.calls().reports;
        let _ = extender
            .check_fill(Instant::now() + FULL_READ_MAX_AGE)
            .unwrap();
        assert!(
            sim.calls().reports > before_old,
            "a reading {FULL_READ_MAX_AGE:?} old is taken again through LVM"
        );
    }

    #[test]
    fn a_filling_pool_grows_until_below_the_threshold_then_reports_the_vg_full() {
        let (sim, lv, mut extender) = one_volume_in_a_small_pool();
        assert!(extender.check().unwrap().is_empty(), "an empty pool stays");

        // 120 MiB written into 128 MiB: 94 %, grown at once to below 70 %
        // (more than the 20 % step; rounded up to 4 MiB extents).
        sim.simulate_write(&lv, Percent::from_hundredths(1172))
            .unwrap();
        let grown: Vec<_> = extender
            .check()
            .unwrap()
            .into_iter()
            .map(|t| t.growth)
            .collect();
        assert_eq!(
            grown,
            vec![PoolGrowth::Grown {
                part: PoolPart::Data,
                from: Bytes(128 * MIB),
                to: Bytes(172 * MIB)
            }]
        );
        let status = sim.pool_status().unwrap();
        assert!(status.usage.data_percent() < Percent::from_whole(70));
        assert_eq!(status.vg_free, Bytes(156 * MIB));

        // Written to 100 % of the volume: the VG runs out part-way.
        sim.simulate_write(&lv, Percent::FULL).unwrap();
        let grown: Vec<_> = extender
            .check()
            .unwrap()
            .into_iter()
            .map(|t| t.growth)
            .collect();
        assert_eq!(
            grown.last(),
            Some(&PoolGrowth::VgFull {
                part: PoolPart::Data,
                size: Bytes(328 * MIB)
            })
        );
        assert_eq!(sim.pool_status().unwrap().vg_free, Bytes::ZERO);
        // Once full, later checks do not keep asking LVM.
        let changes = sim.calls().changes;
        assert!(extender.check().unwrap().is_empty());
        assert_eq!(sim.calls().changes, changes);
    }

    #[test]
    fn metadata_past_its_threshold_grows_too() {
        let sim = sim(Bytes(GIB));
        sim.set_vg_free(Bytes(GIB));
        sim.simulate_metadata_use(Bytes(50 * MIB));
        let mut extender = AutoExtender::new(sim.clone(), PoolGrowthPolicy::default());
        let grown: Vec<_> = extender
            .check()
            .unwrap()
            .into_iter()
            .map(|t| t.growth)
            .collect();
        // 51 of 64 MiB (80 %): +12.8 MiB → 16 MiB in extents, once.
        assert_eq!(
            grown,
            vec![PoolGrowth::Grown {
                part: PoolPart::Metadata,
                from: Bytes(64 * MIB),
                to: Bytes(80 * MIB)
            }]
        );
        assert_eq!(sim.pool_status().unwrap().vg_free, Bytes(GIB - 32 * MIB));
    }
}

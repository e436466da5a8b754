//! The fencing thread: [`volume_core::fence::Fencer`] on a dedicated
//! blocking thread, woken by device-mapper events and a short timer (or the
//! timer alone on the simulated backend). It never touches a fenced
//! volume's filesystem; a suspend or resume is one ioctl on its thin LV.
//!
//! Each fence and unfence logs one line, counts in the metrics, and wakes
//! the reconcile loop (through `changed`) to republish the volume's status
//! and the host record.

use crate::metrics::Metrics;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use volume_core::fence::{FenceAction, FenceChange, Fencer};
use volume_core::pool_watch::{DmEvents, PoolEvents, TimerOnly};

/// The running thread; [`FenceThread::stop`] ends it.
pub struct FenceThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Logs and counts one change.
pub fn record(change: &FenceChange, metrics: &Metrics) {
    let elapsed_ms = u64::try_from(change.elapsed.as_millis()).unwrap_or(u64::MAX);
    match change.action {
        FenceAction::Fenced(reason) => {
            metrics.fenced(reason.as_str());
            tracing::warn!(volume = %change.id, reason = %reason, elapsed_ms, "fenced the volume: its I/O waits until space returns");
        }
        FenceAction::Unfenced(cause) => {
            metrics.unfenced(cause.as_str());
            tracing::info!(volume = %change.id, cause = cause.as_str(), elapsed_ms, "unfenced the volume");
        }
    }
}

/// [`Fencer::recover`] at start-up, before the reconcile loop lists the
/// volumes (so a fenced volume is listed as fenced, without reading its
/// suspended LV). A failure is logged; the thread's checks go on.
pub fn recover(fencer: &mut Fencer, metrics: &Metrics) {
    match fencer.recover() {
        Ok(changes) => {
            for change in &changes {
                record(change, metrics);
            }
            metrics.set_fenced(fencer.fences().fenced().len());
        }
        Err(error) => {
            metrics.error("fence");
            tracing::error!(%error, "looking for fenced volumes at start-up failed");
        }
    }
}

/// Starts the thread: a check on every wake (call [`recover`] first).
pub fn spawn(
    mut fencer: Fencer,
    interval: Duration,
    timer_only: bool,
    metrics: Arc<Metrics>,
    changed: UnboundedSender<()>,
) -> std::io::Result<FenceThread> {
    let stop = Arc::new(AtomicBool::new(false));
    let events: Box<dyn PoolEvents> = if timer_only {
        Box::new(TimerOnly)
    } else {
        match DmEvents::open() {
            Ok(events) => Box::new(events),
            Err(error) => {
                tracing::warn!(%error, ?interval, "no device-mapper events; fencing samples on the timer only");
                Box::new(TimerOnly)
            }
        }
    };
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("pool-fence".into())
            .spawn(move || {
                raise_priority();
                let mut events = events;
                // A failing check is logged when its error changes, not on
                // every tick (e.g. while LVM is still making the pool).
                let mut failing: Option<String> = None;
                while !stop.load(Ordering::Relaxed) {
                    match fencer.check() {
                        Ok(changes) => {
                            if failing.take().is_some() {
                                tracing::info!("fencing checks work again");
                            }
                            for change in &changes {
                                record(change, &metrics);
                            }
                            metrics.set_fenced(fencer.fences().fenced().len());
                            if !changes.is_empty() {
                                let _ = changed.send(());
                            }
                        }
                        Err(error) => {
                            metrics.error("fence");
                            let text = error.to_string();
                            if failing.as_deref() != Some(text.as_str()) {
                                tracing::error!(%error, "fencing check failed; trying again at each tick");
                                failing = Some(text);
                            }
                        }
                    }
                    if let Err(error) = events.wait(interval) {
                        tracing::error!(%error, "waiting for device-mapper events failed; sampling on the timer");
                        std::thread::sleep(interval);
                    }
                }
            })?
    };
    Ok(FenceThread {
        stop,
        thread: Some(thread),
    })
}

/// The fencing thread's nice value: a host busy with the filler's own
/// I/O and encryption must still run the check that stops it (measured in
/// the micro-VM: at nice 0 a check once came 6 s late, the pool 2 % past
/// the reserve's edge).
const FENCE_NICE: libc::c_int = -10;

/// Gives this thread [`FENCE_NICE`]; without the privilege it keeps its
/// nice value and says so.
fn raise_priority() {
    // SAFETY: gettid and setpriority take no pointers and change only this
    // thread's scheduling weight (on Linux, PRIO_PROCESS with a thread id
    // applies to that thread alone).
    let result = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, FENCE_NICE)
    };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, nice = FENCE_NICE, "cannot raise the fencing thread's priority; it runs at the default");
    }
}

impl FenceThread {
    /// Ends the thread after its current wait. Fences stay in force: the
    /// next start finds them ([`Fencer::recover`]).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the fencing thread panicked");
            }
        }
    }
}

//! The pool auto-extend thread: [`volume_core::pool_watch::AutoExtender`]
//! on a dedicated blocking thread, woken by device-mapper events (or only
//! by its timer on the simulated backend).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use volume_core::backend::ThinBackend;
use volume_core::fence::PoolRoom;
use volume_core::pool_growth::PoolGrowthPolicy;
use volume_core::pool_watch::{AutoExtender, DmEvents, PoolEvents, TimerOnly};

/// The running thread; [`AutoExtendThread::stop`] ends it.
pub struct AutoExtendThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the thread. Without device-mapper events (no control device, or
/// `timer_only`) it samples on the timer alone, and says so once.
pub fn spawn(
    backend: Arc<dyn ThinBackend>,
    policy: PoolGrowthPolicy,
    interval: Duration,
    timer_only: bool,
    room: Arc<PoolRoom>,
) -> std::io::Result<AutoExtendThread> {
    let stop = Arc::new(AtomicBool::new(false));
    let events: Box<dyn PoolEvents> = if timer_only {
        Box::new(TimerOnly)
    } else {
        match DmEvents::open() {
            Ok(events) => Box::new(events),
            Err(error) => {
                tracing::warn!(%error, ?interval, "no device-mapper events; the pool is sampled on the timer only");
                Box::new(TimerOnly)
            }
        }
    };
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("pool-autoextend".into())
            .spawn(move || {
                let mut events = events;
                AutoExtender::new(backend, policy).with_room(room).run(
                    events.as_mut(),
                    interval,
                    &stop,
                );
            })?
    };
    Ok(AutoExtendThread {
        stop,
        thread: Some(thread),
    })
}

impl AutoExtendThread {
    /// Ends the thread after its current wait (at most one interval).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the pool auto-extend thread panicked");
            }
        }
    }
}

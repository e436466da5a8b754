//! Fault injection between the steps of [`super::VolumeHost`] operations.
//!
//! The host asks its injector after every step. A [`Fault::Fail`] makes the
//! step report failure after doing its work (the worst case for rollback);
//! a [`Fault::Crash`] stops the operation on the spot with no rollback, as
//! if the process died. Only built with the `testing` feature: a production
//! build has no injector and no injected-error variants.

use super::Step;
use std::collections::VecDeque;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Fail,
    Crash,
}

/// Decides, after each step, whether to inject a fault.
pub trait FaultInjector: Send + Sync {
    fn after(&self, step: Step) -> Option<Fault>;
}

/// A queue of planned faults: each fires once, at the first time its step
/// is reached.
#[derive(Debug, Default)]
pub struct FaultPlan {
    planned: Mutex<VecDeque<(Step, Fault)>>,
    fired: Mutex<Vec<(Step, Fault)>>,
}

impl FaultPlan {
    pub fn new() -> FaultPlan {
        FaultPlan::default()
    }

    /// Plans `fault` at the next time `step` is reached.
    pub fn at(&self, step: Step, fault: Fault) -> &FaultPlan {
        self.lock_planned().push_back((step, fault));
        self
    }

    /// Faults that have fired, in order.
    pub fn fired(&self) -> Vec<(Step, Fault)> {
        self.fired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Faults planned but not reached.
    pub fn pending(&self) -> Vec<(Step, Fault)> {
        self.lock_planned().iter().copied().collect()
    }

    fn lock_planned(&self) -> std::sync::MutexGuard<'_, VecDeque<(Step, Fault)>> {
        self.planned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl FaultInjector for FaultPlan {
    fn after(&self, step: Step) -> Option<Fault> {
        let mut planned = self.lock_planned();
        let index = planned.iter().position(|(s, _)| *s == step)?;
        let (step, fault) = planned.remove(index)?;
        self.fired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((step, fault));
        Some(fault)
    }
}

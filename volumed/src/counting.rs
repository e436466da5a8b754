//! A [`ThinBackend`] wrapper that counts calls into the metrics, so the
//! cost of the daemon in LVM calls is visible on the real backend too.

use crate::metrics::Metrics;
use std::path::PathBuf;
use std::sync::Arc;
use volume_core::actions::{CreateAction, DeleteAction, ExtendAction};
use volume_core::backend::{
    BackendError, LvPresence, PoolFill, PoolStatus, ThinAllocation, ThinBackend, ThinCopy,
    ThinPoolSpec, ThinVolume,
};
use volume_core::names::LvName;
use volume_core::pool_growth::{PoolGrowth, PoolPart};
use volume_core::units::Bytes;

pub struct CountingBackend {
    inner: Arc<dyn ThinBackend>,
    metrics: Arc<Metrics>,
}

impl CountingBackend {
    pub fn new(inner: Arc<dyn ThinBackend>, metrics: Arc<Metrics>) -> CountingBackend {
        CountingBackend { inner, metrics }
    }
}

impl ThinBackend for CountingBackend {
    fn spec(&self) -> &ThinPoolSpec {
        self.inner.spec()
    }

    fn ensure_pool(&self) -> Result<CreateAction<PoolStatus>, BackendError> {
        self.metrics.lvm_call(true);
        self.inner.ensure_pool()
    }

    fn pool_status(&self) -> Result<PoolStatus, BackendError> {
        self.metrics.lvm_call(false);
        self.inner.pool_status()
    }

    fn pool_status_and_lv(&self, lv: &LvName) -> Result<(PoolStatus, LvPresence), BackendError> {
        self.metrics.lvm_call(false);
        self.inner.pool_status_and_lv(lv)
    }

    fn create_thin(
        &self,
        lv: &LvName,
        size: Bytes,
        tags: &[String],
    ) -> Result<CreateAction<ThinVolume>, BackendError> {
        self.metrics.lvm_call(true);
        self.inner.create_thin(lv, size, tags)
    }

    fn remove_thin(&self, lv: &LvName) -> Result<DeleteAction, BackendError> {
        self.metrics.lvm_call(true);
        self.inner.remove_thin(lv)
    }

    fn extend_thin(&self, lv: &LvName, size: Bytes) -> Result<ExtendAction, BackendError> {
        self.metrics.lvm_call(true);
        self.inner.extend_thin(lv, size)
    }

    fn list_thins(&self) -> Result<Vec<ThinVolume>, BackendError> {
        self.metrics.lvm_call(false);
        self.inner.list_thins()
    }

    fn thin(&self, lv: &LvName) -> Result<Option<ThinVolume>, BackendError> {
        self.metrics.lvm_call(false);
        self.inner.thin(lv)
    }

    fn tagged(&self, tag: &str) -> Result<Vec<ThinVolume>, BackendError> {
        self.metrics.lvm_call(false);
        self.inner.tagged(tag)
    }

    fn retag(
        &self,
        lv: &LvName,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, BackendError> {
        self.metrics.lvm_call(true);
        self.inner.retag(lv, add, remove)
    }

    fn retag_seen(
        &self,
        seen: &ThinVolume,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, BackendError> {
        self.metrics.lvm_call(true);
        self.inner.retag_seen(seen, add, remove)
    }

    fn activate_thin(&self, lv: &LvName) -> Result<PathBuf, BackendError> {
        self.metrics.lvm_call(true);
        self.inner.activate_thin(lv)
    }

    fn grow_pool(&self, part: PoolPart, by: Bytes) -> Result<PoolGrowth, BackendError> {
        self.metrics.lvm_call(true);
        self.inner.grow_pool(part, by)
    }

    fn snapshot_thin(
        &self,
        origin: &LvName,
        copy: &LvName,
        kind: ThinCopy,
        tags: &[String],
    ) -> Result<CreateAction<ThinVolume>, BackendError> {
        self.metrics.lvm_call(true);
        self.inner.snapshot_thin(origin, copy, kind, tags)
    }

    /// Not counted: on LVM it reads device-mapper, not LVM.
    fn thin_allocations(&self, lvs: &[LvName]) -> Result<Vec<ThinAllocation>, BackendError> {
        self.inner.thin_allocations(lvs)
    }

    fn pool_fill(&self) -> Result<Option<PoolFill>, BackendError> {
        self.inner.pool_fill()
    }
}

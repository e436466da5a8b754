//! volume-core: thin volumes for micro-VM hosts.
//!
//! The model ([`units`], [`names`], [`capacity`], [`actions`]) lives in the
//! `volume-model` crate, which does no I/O; it is re-exported here under its
//! old paths. The [`backend`] trait is the seam to LVM; `backend::sim`
//! (feature `testing`) stands in for it in fast tests. The data path above
//! it: [`keys`] (key custody), [`crypt`] (LUKS2 via libcryptsetup), [`fs`]
//! (ext4), [`jail`] (device nodes in jails), [`cmd`] (the one place external
//! programs run), [`pool_watch`] (pool auto-extend on device-mapper events),
//! [`fence`] (suspending the volumes that fill a pool that cannot grow),
//! [`migrate`] (moving and forking a volume to another host, lazily),
//! [`transfer`] (handing a migration's secrets to the other host, sealed),
//! and [`host`], the [`host::VolumeHost`] API the VM worker
//! links.

pub mod backend;
pub mod cmd;
pub mod crypt;
pub mod fence;
pub mod fs;
pub mod host;
pub mod jail;
pub mod keys;
mod locked;
pub mod migrate;
pub mod pool_watch;
pub mod transfer;

pub use volume_model::fence as fence_model;
pub use volume_model::{
    actions, capacity, health, hydration, names, pool_growth, units, volume_growth,
};

//! volume-model: what vmvol computes, with no I/O and no native
//! dependencies, so that the control plane and the CLI can build anywhere.
//!
//! * [`units`]: byte, sector, extent, percent and ratio newtypes.
//! * [`names`]: checked names and the `vmv1` prefix every device carries.
//! * [`capacity`]: pool usage, policy and the admission decision.
//! * [`health`]: typed pool and volume health.
//! * [`hydration`]: a moved or forked volume's background copy: progress and rate limit.
//! * [`fence`]: which volumes to fence when a pool that cannot grow fills.
//! * [`actions`]: return types that say what an idempotent call did.
//! * [`jail_path`]: the shape check of a jail node path.
//! * [`pool_growth`]: when and by how much volumed grows a thin pool.
//! * [`progress`]: progress and facts recorded as LV tags, and their codec.
//! * [`volume_growth`]: per-volume auto-extend settings and the usage it acts on.
//!
//! The one thing here that touches the OS is [`names::VolumeId::generate`],
//! which draws from the thread-local CSPRNG (seeded by `getrandom`).

pub mod actions;
pub mod capacity;
pub mod fence;
pub mod health;
pub mod hydration;
pub mod jail_path;
pub mod names;
pub mod pool_growth;
pub mod progress;
pub mod units;
pub mod volume_growth;

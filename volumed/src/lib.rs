//! volumed: the per-host daemon (see ARCHITECTURE.md).
//!
//! It watches `<root>/desired/<host>/` in the KV store and converges the
//! host's thin volumes to it through [`volume_core::host::VolumeHost`]:
//! creates (with dm-crypt and ext4 as the record asks), extends, exposes
//! into jails, and destroys only on an explicit destroy intent. It writes
//! each volume's status and the host record (capacity, heartbeat, orphans)
//! back, and serves `/metrics` and `/healthz`.
//!
//! * [`autoextend`]: the thread that grows the thin pool from VG free space.
//! * [`fence`]: the thread that fences the volumes filling a pool that cannot grow.
//! * [`config`]: TOML file, env and flags.
//! * [`plan`]: the pure decisions (what a record means, what a volume needs).
//! * [`daemon`]: the reconcile loop; [`worker`]: one volume's job.
//! * [`kv`]: status and host-record writes, the destroy txn.
//! * [`sealed`]: sealed volume keys in the KV store (envelope key store).
//! * [`gc`]: deleting orphans, only when asked.
//! * [`snapshots`]: snapshot records converged, the schedule and retention.
//! * [`migrations`]: moves and forks, this host's part as a source or destination.
//! * [`instance`]: one daemon per volume group and per host id.
//! * [`memory`]: thread stacks and malloc settings.
//! * [`volume_autoextend`]: growing volumes at their usage threshold.

pub mod autoextend;
pub mod config;
pub mod counting;
pub mod daemon;
pub mod fence;
pub mod gc;
pub mod http;
pub mod instance;
pub mod kv;
pub mod memory;
pub mod metrics;
pub mod migrations;
pub mod notify;
pub mod plan;
pub mod sealed;
pub mod setup;
pub mod snapshots;
pub mod volume_autoextend;
pub mod worker;

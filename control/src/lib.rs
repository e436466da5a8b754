//! The control-plane model shared by `volumed` and `volctl`: the KV layout
//! and its records ([`layout`]), and the pure placement decision
//! ([`placement`]). No I/O: callers do the reads and the txn.

pub mod layout;
pub mod migration;
pub mod placement;

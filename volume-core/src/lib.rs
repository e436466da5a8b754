//! volume-core: thin volumes for micro-VM hosts.
//!
//! The model ([`units`], [`names`], [`capacity`]) does no I/O. The
//! [`backend`] trait is the seam to LVM; [`backend::sim`] stands in for it in
//! fast tests.

pub mod actions;
pub mod backend;
pub mod capacity;
pub mod names;
pub mod units;

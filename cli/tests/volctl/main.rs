//! volctl against an in-process KV server: placement under concurrency,
//! reservations, waits, and the binary's exit codes.

mod binary;
mod common;
mod in_process;
mod migration;
mod race;
mod retry;

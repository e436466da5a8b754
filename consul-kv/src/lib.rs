//! Consul KV and Txn for the volume manager: a typed client
//! ([`client::ConsulKv`]) that talks to a real Consul cluster, and a
//! Consul-compatible single-host server ([`server::Server`], the `volkv`
//! binary) that is the embedded default and what the tests run against.
//!
//! Both follow the project's note on Consul KV semantics (indexes, blocking
//! queries, CAS, transactions, ACL).

pub mod client;
pub mod duration;
pub mod secret;
pub mod server;
pub mod types;

pub use client::{
    BlockingQuery, ClientConfig, ConsulKv, Error, Indexed, PrefixWatch, WatchOptions, WatchUpdate,
};
pub use secret::SecretToken;
pub use types::{KvPair, TxnOp, TxnOpError, TxnResult};

//! Consul KV and Txn for the volume manager: a typed client
//! ([`client::ConsulKv`]) that talks to a real Consul cluster or to the
//! project's own server (crate `consul-kv-server`, binary `volkv`), and the
//! wire types and Go-duration parsing both share.
//!
//! It follows the project's note on Consul KV semantics (indexes, blocking
//! queries, CAS, transactions, ACL).

pub mod backoff;
pub mod client;
pub mod duration;
pub mod secret;
pub mod types;

pub use backoff::Backoff;
pub use client::{
    BlockingQuery, ClientConfig, ConsulKv, Error, Indexed, PrefixWatch, WatchOptions, WatchUpdate,
};
pub use secret::SecretToken;
pub use types::{KvPair, TxnOp, TxnOpError, TxnResult};

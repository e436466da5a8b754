//! Conformance of the bundled server and the client with the project's
//! Consul KV note, through the client and through raw HTTP.

mod acl;
mod binary;
mod blocking;
mod common;
mod compat;
mod kv_client;
mod kv_http;
mod limits;
mod persistence;
mod tls;
mod txn;
mod watch;

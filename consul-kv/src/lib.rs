//! consul-kv

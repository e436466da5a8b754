//! A Consul-compatible KV server for a single host (the embedded default,
//! like `consul agent -dev`, with optional durability and ACL tokens).
//!
//! Implements `GET|PUT|DELETE /v1/kv/<key>` and `PUT /v1/txn` as described
//! in the project's Consul KV note. Sessions are not implemented: PUT with
//! `?acquire`/`?release` answers 501, and the txn verbs `lock`, `unlock` and
//! `check-session` fail their operation with a message saying so.

mod http;
mod persist;
mod state;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use persist::PersistError;

use consul_kv::secret::SecretToken;
use store::Store;

/// Largest value a PUT or a txn operation may carry (Consul's default
/// `kv_max_value_size`).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 512 * 1024;
/// Most operations in one transaction.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// Blocking-query wait when `?wait` is missing.
pub const DEFAULT_QUERY_WAIT: Duration = Duration::from_secs(5 * 60);
/// Longest blocking-query wait (before jitter).
pub const MAX_QUERY_WAIT: Duration = Duration::from_secs(10 * 60);

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub bind: SocketAddr,
    /// Where committed writes are kept; `None` keeps them in memory only.
    pub data_dir: Option<PathBuf>,
    /// Accepted ACL tokens; when empty, no token is required.
    pub acl_tokens: Vec<SecretToken>,
    pub max_value_bytes: usize,
    pub max_txn_ops: usize,
    /// Log size past which it is folded into a snapshot.
    pub compact_log_bytes: u64,
}

impl ServerConfig {
    pub fn new(bind: SocketAddr) -> Self {
        ServerConfig {
            bind,
            data_dir: None,
            acl_tokens: Vec::new(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            compact_log_bytes: 16 * 1024 * 1024,
        }
    }

    /// Listen on `127.0.0.1` with a free port (tests, embedding).
    pub fn loopback() -> Self {
        Self::new(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn with_data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    pub fn with_acl_tokens(mut self, tokens: impl IntoIterator<Item = SecretToken>) -> Self {
        self.acl_tokens = tokens.into_iter().collect();
        self
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] PersistError),
    #[error("server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("server task failed: {0}")]
    Task(String),
}

/// Starts servers.
pub struct Server;

impl Server {
    /// Opens the data directory (replaying it), binds, and serves in a
    /// background task until [`ServerHandle::shutdown`].
    pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
        let data_dir = config.data_dir.clone();
        let compact = config.compact_log_bytes;
        let store = tokio::task::spawn_blocking(move || Store::open(data_dir.as_deref(), compact))
            .await
            .map_err(|e| ServerError::Task(e.to_string()))??;
        let listener =
            TcpListener::bind(config.bind)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.bind,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.bind,
            source,
        })?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let app = Arc::new(http::App {
            store,
            acl_tokens: config.acl_tokens,
            max_value_bytes: config.max_value_bytes,
            max_txn_ops: config.max_txn_ops,
            local_addr,
            shutdown: shutdown_rx.clone(),
        });
        let router = http::router(app);
        let mut stop = shutdown_rx;
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    // An error means the handle was dropped: stop too.
                    let _ = stop.wait_for(|stopping| *stopping).await;
                })
                .await
        });
        tracing::info!(%local_addr, "consul-compatible kv server listening");
        Ok(ServerHandle {
            local_addr,
            shutdown: shutdown_tx,
            task,
        })
    }
}

/// A running server. Dropping it stops the server too, without waiting.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl ServerHandle {
    /// The address actually bound (the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<addr>`, for `CONSUL_HTTP_ADDR` or the client.
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// Stops accepting, ends blocking queries with their current answer,
    /// waits for open requests, and releases the data directory.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.shutdown.send_replace(true);
        self.join().await
    }

    /// Waits until the server stops on its own (an I/O failure).
    pub async fn join(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServerError::Serve(e)),
            Err(e) => Err(ServerError::Task(e.to_string())),
        }
    }
}

//! A Consul-compatible KV server for a single host (the embedded default,
//! like `consul agent -dev`, with optional durability and ACL tokens).
//!
//! Implements `GET|PUT|DELETE /v1/kv/<key>` and `PUT /v1/txn` as described
//! in the project's Consul KV note, plus the minimal `/v1/agent/self`,
//! `/v1/status/leader` and `/v1/status/peers` that clients call at start-up.
//! Sessions are not implemented: `/v1/session/*` and PUT with
//! `?acquire`/`?release` answer 501, and the txn verbs `lock`, `unlock` and
//! `check-session` fail their operation with a message saying so. `?dc=`
//! naming another datacenter answers 500 "No path to datacenter".

mod acl;
mod http;
mod persist;
mod serve;
mod state;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use acl::{read_acl_file, AclFileError, Policy, Rules, TokenRules};
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

/// Longest wait for a request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections at once, before the file limit lowers it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// How long a shutdown waits for requests in flight.
pub const DEFAULT_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);
pub use state::DEFAULT_MAX_TOMBSTONES;
/// Longest wait for a request body.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest key, in bytes (Consul documents no limit of its own).
pub const MAX_KEY_BYTES: usize = 512;
/// Consul's default datacenter name.
pub const DEFAULT_DATACENTER: &str = "dc1";

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub bind: SocketAddr,
    /// Where committed writes are kept; `None` keeps them in memory only.
    pub data_dir: Option<PathBuf>,
    /// Accepted ACL tokens and their rules; when empty, no token is
    /// required, and only a loopback address may be bound.
    pub acl: Vec<TokenRules>,
    pub max_value_bytes: usize,
    pub max_txn_ops: usize,
    /// Log size past which it is folded into a snapshot.
    pub compact_log_bytes: u64,
    /// This server's datacenter name; `?dc=` naming another is refused
    /// with Consul's "No path to datacenter".
    pub datacenter: String,
    /// Longest wait for a request's body once its head arrived.
    pub body_read_timeout: Duration,
    /// Longest wait for a request head, also the idle time after which a
    /// kept-alive connection is closed.
    pub header_read_timeout: Duration,
    /// Most connections open at once (lowered to fit the file limit).
    pub max_connections: usize,
    /// How long a shutdown waits for requests in flight.
    pub shutdown_deadline: Duration,
    /// Most tombstones kept; see ARCHITECTURE.md on reaping.
    pub max_tombstones: usize,
}

impl ServerConfig {
    pub fn new(bind: SocketAddr) -> Self {
        ServerConfig {
            bind,
            data_dir: None,
            acl: Vec::new(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            compact_log_bytes: 16 * 1024 * 1024,
            datacenter: DEFAULT_DATACENTER.to_owned(),
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_deadline: DEFAULT_SHUTDOWN_DEADLINE,
            max_tombstones: state::DEFAULT_MAX_TOMBSTONES,
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

    /// Tokens that may read and write every key.
    pub fn with_acl_tokens(mut self, tokens: impl IntoIterator<Item = SecretToken>) -> Self {
        let first = self.acl.len();
        self.acl.extend(
            tokens
                .into_iter()
                .enumerate()
                .map(|(n, secret)| TokenRules {
                    name: format!("token-file-{}", first + n + 1),
                    secret,
                    rules: Rules::write_all(),
                }),
        );
        self
    }

    /// Tokens with their own rules.
    pub fn with_acl(mut self, tokens: impl IntoIterator<Item = TokenRules>) -> Self {
        self.acl.extend(tokens);
        self
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("refusing to listen on {addr} without ACLs: anyone who can reach it could read and write every key; bind a loopback address, or give ACL tokens (--acl-file)")]
    OpenBindWithoutAcl { addr: SocketAddr },
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
        if config.acl.is_empty() && !config.bind.ip().is_loopback() {
            return Err(ServerError::OpenBindWithoutAcl { addr: config.bind });
        }
        let data_dir = config.data_dir.clone();
        let compact = config.compact_log_bytes;
        let max_tombstones = config.max_tombstones;
        let store = tokio::task::spawn_blocking(move || {
            Store::open(data_dir.as_deref(), compact, max_tombstones)
        })
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
            acl: config.acl,
            max_value_bytes: config.max_value_bytes,
            max_txn_ops: config.max_txn_ops,
            local_addr,
            datacenter: config.datacenter,
            body_read_timeout: config.body_read_timeout,
            shutdown: shutdown_rx.clone(),
        });
        let router = http::router(app);
        let limits = serve::Limits {
            max_connections: serve::effective_connection_cap(config.max_connections),
            header_read_timeout: config.header_read_timeout,
            shutdown_deadline: config.shutdown_deadline,
        };
        let task = tokio::spawn(serve::serve(listener, router, limits, shutdown_rx));
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
    /// waits for open requests up to the shutdown deadline (then closes
    /// them), and releases the data directory.
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

//! `volkv`: the project's Consul-compatible KV server for a single host.
//!
//! `volkv --bind 127.0.0.1:8500 --data-dir DIR [--acl-file F]`
//! prints the address it listens on and stops gracefully on SIGTERM/SIGINT.
//! Without ACLs it listens only on a loopback address.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use consul_kv::SecretToken;
use consul_kv_server::{Server, ServerConfig};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(
    name = "volkv",
    version,
    about = "Consul-compatible KV server (single host)"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port). A non-loopback
    /// address needs ACLs.
    #[arg(long, default_value = "127.0.0.1:8500")]
    bind: SocketAddr,
    /// Directory keeping every committed write; without it, data is lost
    /// on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// ACL file: tokens and their key rules (TOML, see README). Without it
    /// and without --acl-token-file, no token is required.
    #[arg(long)]
    acl_file: Option<PathBuf>,
    /// File of tokens that may read and write every key, one per line
    /// (`#` starts a comment).
    #[arg(long)]
    acl_token_file: Option<PathBuf>,
    /// This server's datacenter; `?dc=` naming another answers 500 "No
    /// path to datacenter", as Consul does.
    #[arg(long, default_value = consul_kv_server::DEFAULT_DATACENTER)]
    datacenter: String,
    /// Longest wait for a request head (Go duration, e.g. `10s`).
    #[arg(long, default_value = "30s", value_parser = go_duration)]
    header_read_timeout: std::time::Duration,
    /// Most connections open at once (lowered to fit the file limit).
    #[arg(long, default_value_t = consul_kv_server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// How long a stop waits for open requests before closing them.
    #[arg(long, default_value = "5s", value_parser = go_duration)]
    shutdown_deadline: std::time::Duration,
}

fn go_duration(text: &str) -> Result<std::time::Duration, String> {
    match consul_kv::duration::parse_go_duration(text) {
        Ok(parsed) if !parsed.negative => Ok(parsed.magnitude),
        _ => Err(format!(
            "{text:?} is not a duration such as 500ms, 10s or 5m"
        )),
    }
}

fn read_tokens(path: &PathBuf) -> Result<Vec<SecretToken>, String> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read ACL token file {}: {e}", path.display()))?,
    );
    let tokens: Vec<SecretToken> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(SecretToken::new)
        .collect();
    if tokens.is_empty() {
        return Err(format!("ACL token file {} holds no token", path.display()));
    }
    Ok(tokens)
}

async fn run(args: Args) -> Result<(), String> {
    let mut config = ServerConfig::new(args.bind);
    config.datacenter = args.datacenter;
    config.header_read_timeout = args.header_read_timeout;
    config.shutdown_deadline = args.shutdown_deadline;
    config.max_connections = args.max_connections;
    if let Some(dir) = args.data_dir {
        config = config.with_data_dir(dir);
    }
    if let Some(path) = &args.acl_file {
        let tokens = consul_kv_server::read_acl_file(path).map_err(|e| e.to_string())?;
        let names: Vec<&str> = tokens.iter().map(|t| t.name.as_str()).collect();
        tracing::info!(tokens = ?names, "ACL file loaded");
        config = config.with_acl(tokens);
    }
    if let Some(path) = &args.acl_token_file {
        config = config.with_acl_tokens(read_tokens(path)?);
    }
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let handle = Server::start(config).await.map_err(|e| e.to_string())?;
    println!("volkv listening on {}", handle.url());
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
        _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
    }
    handle.shutdown().await.map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("volkv: {message}");
            ExitCode::FAILURE
        }
    }
}

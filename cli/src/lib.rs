//! volctl: the operator's client. It only talks to the KV store: it places
//! and reserves volumes atomically ([`reserve`]), records what they should
//! be, and waits for each host's volumed to report ([`wait`]).
//!
//! The binary is a thin `main`; everything here takes a [`ConsulKv`] and a
//! [`Ui`], so tests drive the same code in process.

pub mod args;
pub mod commands;
pub mod error;
pub mod format;
pub mod migrate;
pub mod reserve;
pub mod snapshots;
pub mod store;
pub mod ui;
pub mod wait;

use std::time::Duration;

use consul_kv::{ClientConfig, ConsulKv};
use volume_control::layout::Layout;

pub use args::{Cli, Command, GlobalArgs};
pub use error::{exit, CliError};
pub use store::Ctx;
pub use ui::Ui;

impl Ctx {
    pub fn new(kv: ConsulKv, global: &GlobalArgs) -> Result<Ctx, CliError> {
        let layout =
            Layout::new(&global.kv_root).map_err(|e| CliError::Usage(format!("--kv-root: {e}")))?;
        Ok(Ctx {
            kv,
            layout,
            heartbeat_ttl: Duration::from_secs(global.heartbeat_ttl),
        })
    }
}

/// The client for `--kv-addr` or Consul's environment variables (the
/// token, TLS settings and, without `--kv-addr`, the address).
pub fn client(
    global: &GlobalArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<ConsulKv, CliError> {
    let config = ClientConfig::from_lookup(|name| match (name, &global.kv_addr) {
        ("CONSUL_HTTP_ADDR", Some(addr)) => Some(addr.clone()),
        _ => env(name),
    });
    config
        .and_then(ConsulKv::new)
        .map_err(|e| CliError::Usage(e.to_string()))
}

/// Runs one parsed command line.
pub async fn run(cli: &Cli, kv: ConsulKv, ui: &mut Ui<'_>) -> Result<(), CliError> {
    let ctx = Ctx::new(kv, &cli.global)?;
    match &cli.command {
        Command::Create(args) => commands::create(&ctx, args, ui).await.map(drop),
        Command::List(args) => commands::list(&ctx, args, ui).await.map(drop),
        Command::Show(args) => commands::show(&ctx, args, ui).await.map(drop),
        Command::Destroy(args) => commands::destroy(&ctx, args, ui).await,
        Command::Extend(args) => commands::extend(&ctx, args, ui).await.map(drop),
        Command::Update(args) => commands::update(&ctx, args, ui).await.map(drop),
        Command::Hosts(args) => commands::hosts(&ctx, args, ui).await.map(drop),
        Command::Unfence(args) => commands::unfence(&ctx, args, ui).await,
        Command::Completions(args) => commands::completions(args, ui),
        Command::Snapshots(command) => match command {
            args::SnapshotsCommand::Create(args) => {
                snapshots::create(&ctx, args, ui).await.map(drop)
            }
            args::SnapshotsCommand::List(args) => snapshots::list(&ctx, args, ui).await.map(drop),
            args::SnapshotsCommand::Destroy(args) => snapshots::destroy(&ctx, args, ui).await,
        },
        Command::Fork(args)
            if args.destination.host.is_some() || args.destination.region.is_some() =>
        {
            migrate::fork(&ctx, args, ui).await.map(drop)
        }
        Command::Fork(args) => snapshots::fork(&ctx, args, ui).await,
        Command::Move(args) => migrate::move_volume(&ctx, args, ui).await.map(drop),
        Command::Cancel(args) => migrate::cancel(&ctx, args, ui).await,
    }
}

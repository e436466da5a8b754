//! volumed: the per-host daemon (see ARCHITECTURE.md).

use clap::Parser;

/// Watches this host's desired volumes in Consul KV and converges the host to them.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {}

fn main() {
    let _args = Args::parse();
    eprintln!("volumed: the reconciler is not built yet; see the control-plane issue");
    std::process::exit(2);
}

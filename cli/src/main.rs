//! volctl: the operator's command-line client (see ARCHITECTURE.md).

use clap::Parser;

/// Places, creates, lists and destroys thin volumes across hosts.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {}

fn main() {
    let _args = Args::parse();
    eprintln!("volctl: commands are not built yet; see the volctl issue");
    std::process::exit(2);
}

//! Racing creates at scale: N concurrent creates over M simulated hosts,
//! each one volctl's own placement and reservation transaction against the
//! bundled KV server (volkv, in this process, persisting to a scratch
//! directory with an fsync per commit as in production). Hosts are host
//! records with pool capacity; no volumed runs. Prints the over-commits
//! and lost reservations the audit found (both must be 0), the txn
//! retries, and the time until the last create was placed.
//!
//! Run: `cargo run --release -p volctl --example bench_race -- [--hosts 100]
//! [--creates 1000] [--slots-per-host 10]`

#[path = "../tests/volctl/race.rs"]
mod race;

use std::time::Instant;

use consul_kv::{ClientConfig, ConsulKv};
use consul_kv_server::{Server, ServerConfig};

fn number(args: &[String], name: &str, default: usize) -> usize {
    match args.iter().position(|a| a == name) {
        Some(at) => args
            .get(at + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} takes a number")),
        None => default,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let hosts = number(&args, "--hosts", 100);
    let creates = number(&args, "--creates", 1000);
    let slots = number(&args, "--slots-per-host", creates.div_ceil(hosts.max(1)));
    // Two ends of every connection live in this process.
    raise_file_limit();
    let scratch = tempfile::tempdir().expect("scratch directory");
    // As volkv runs (a worker per core), on its own threads.
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("server runtime");
    let server = server_runtime
        .block_on(Server::start(
            ServerConfig::loopback().with_data_dir(scratch.path().join("kv")),
        ))
        .expect("start the KV server");
    let url = format!("http://{}", server.local_addr());
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let kv = ConsulKv::new(ClientConfig::new(&url).expect("KV address")).expect("client");
    println!(
        "bench_race: {creates} concurrent creates of 1 GB over {hosts} hosts, {slots} slots each ({} in all), volkv with an fsync per commit",
        hosts * slots
    );
    let started = Instant::now();
    let outcome = client_runtime.block_on(race::run(
        &kv,
        race::Race {
            hosts,
            creates,
            slots_per_host: slots,
        },
    ));
    let wall = started.elapsed();
    println!(
        "placed {} | no room {} | gave up on contention {} | other errors {}",
        outcome.placed,
        outcome.no_room,
        outcome.contended,
        outcome.failed.len()
    );
    for error in outcome.failed.iter().take(5) {
        println!("  error: {error}");
    }
    println!(
        "txn retries: {} in all ({:.2} per placed create), at most {} attempts for one create",
        outcome.txn_retries,
        outcome.txn_retries as f64 / outcome.placed.max(1) as f64,
        outcome.most_attempts
    );
    println!(
        "last create placed after {:.2} s; per create: median {:.0} ms, p99 {:.0} ms; audit done after {:.2} s",
        outcome.last_placed_after.as_secs_f64(),
        outcome.median_create.as_secs_f64() * 1000.0,
        outcome.p99_create.as_secs_f64() * 1000.0,
        wall.as_secs_f64()
    );
    println!(
        "over-commits: {} | lost reservations: {}",
        outcome.overcommitted_hosts.len(),
        outcome.lost_reservations.len()
    );
    for line in outcome
        .overcommitted_hosts
        .iter()
        .chain(&outcome.lost_reservations)
        .take(10)
    {
        println!("  {line}");
    }
    server_runtime
        .block_on(server.shutdown())
        .expect("server shutdown");
    let clean = outcome.overcommitted_hosts.is_empty()
        && outcome.lost_reservations.is_empty()
        && outcome.failed.is_empty();
    std::process::exit(if clean { 0 } else { 1 });
}

/// Up to the hard limit: 1,000 connections' client and server ends.
fn raise_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

//! What the daemon's simulator tests share: one host's configuration, its
//! records read from the store, waiting, and volctl in process.
// Each test file uses its own part of this.
#![allow(dead_code)]

use consul_kv::ConsulKv;
use std::time::{Duration, Instant};
use volume_control::layout::{HostRecord, Layout, VolumeStatus};
use volume_core::names::{HostId, VolumeId};
use volumed::config::{Cli, Config, Settings};

pub const HOST: &str = "h1";
pub const WAIT: Duration = Duration::from_secs(20);

/// A simulated host's configuration with short intervals, plus `extra`.
pub fn config(extra: &[&str]) -> Config {
    let mut args = vec![
        "volumed",
        "--sim",
        "--host",
        HOST,
        "--region",
        "ewr",
        "--zone",
        "ewr-a",
        "--heartbeat-interval",
        "1s",
        "--retry-max",
        "1s",
        "--watch-wait",
        "10s",
    ];
    args.extend_from_slice(extra);
    let cli = <Cli as clap::Parser>::try_parse_from(args).unwrap();
    Config::merge(&cli.options.settings, Settings::default()).unwrap()
}

pub fn host_id() -> HostId {
    HostId::new(HOST).unwrap()
}

pub async fn status(kv: &ConsulKv, id: &VolumeId) -> Option<VolumeStatus> {
    let key = Layout::default().status(&host_id(), id);
    let pair = kv.get(&key).await.ok()?.value?;
    Some(serde_json::from_slice(&pair.value).unwrap())
}

pub async fn host_record(kv: &ConsulKv) -> Option<HostRecord> {
    let pair = kv
        .get(&Layout::default().host_info(&host_id()))
        .await
        .ok()?
        .value?;
    Some(serde_json::from_slice(&pair.value).unwrap())
}

pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `volctl <argv>` in process against `kv`: its result and stdout.
pub async fn volctl(kv: &ConsulKv, argv: &[&str]) -> (Result<(), volctl::CliError>, String) {
    let cli = <volctl::Cli as clap::Parser>::try_parse_from(
        std::iter::once("volctl").chain(argv.iter().copied()),
    )
    .unwrap();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let result = volctl::run(&cli, kv.clone(), &mut volctl::Ui::new(&mut out, &mut err)).await;
    (result, String::from_utf8(out).unwrap())
}

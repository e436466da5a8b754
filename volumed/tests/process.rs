//! The `volumed` binary as a process: what only a started daemon shows.

use consul_kv::{ClientConfig, ConsulKv};
use consul_kv_server::{Server, ServerConfig};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use volume_control::layout::{HostRecord, Layout};
use volume_core::capacity::PoolUsage;
use volume_core::names::{HostId, Region, Zone};
use volume_core::units::{Bytes, GIB};

/// A daemon on the simulator, for `host` over `vg`, with its key dir and
/// run dir under `scratch`. The KV store at `kv` may be unreachable: the
/// daemon serves regardless.
fn volumed(scratch: &Path, host: &str, vg: &str, kv: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_volumed"));
    command
        .args([
            "--sim", "--host", host, "--region", "ewr", "--zone", "ewr-a",
        ])
        .args(["--vg", vg, "--consul-addr", kv, "--listen", "127.0.0.1:0"])
        .args(["--heartbeat-interval", "1s", "--retry-max", "1s"])
        .arg("--key-dir")
        .arg(scratch.join("keys"))
        .arg("--run-dir")
        .arg(scratch.join("run"))
        .env_clear()
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Stops `child` when dropped, so a failed assertion leaves no daemon.
struct Guarded(Option<Child>);

impl Guarded {
    fn pid(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until `child` exits by itself, or fails the test after `within`.
fn exits_within(child: Child, within: Duration) -> Output {
    let mut guarded = Guarded(Some(child));
    let deadline = Instant::now() + within;
    loop {
        let child = guarded.0.as_mut().expect("running");
        if child.try_wait().expect("wait").is_some() {
            return guarded
                .0
                .take()
                .expect("running")
                .wait_with_output()
                .unwrap();
        }
        assert!(Instant::now() < deadline, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Gives a started daemon time to get past start-up (or to fail it).
fn settle(daemon: &mut Guarded) {
    std::thread::sleep(Duration::from_millis(1500));
    let child = daemon.0.as_mut().expect("running");
    if let Some(status) = child.try_wait().unwrap() {
        let output = daemon.0.take().unwrap().wait_with_output().unwrap();
        panic!(
            "the daemon exited ({status}): {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

const NOWHERE: &str = "127.0.0.1:1";

#[test]
fn a_second_volumed_for_the_same_vg_refuses_to_start_and_names_the_first() {
    let scratch = tempfile::tempdir().unwrap();
    let mut first = Guarded(Some(
        volumed(scratch.path(), "h1", "vg-one", NOWHERE)
            .spawn()
            .unwrap(),
    ));
    settle(&mut first);

    // Another host id, same VG: two daemons would both drive one pool.
    let second = volumed(scratch.path(), "h2", "vg-one", NOWHERE)
        .spawn()
        .unwrap();
    let output = exits_within(second, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.pid())) && stderr.contains("host h1"),
        "the refusal names the running daemon: {stderr}"
    );

    // Another VG is another pool: that one starts.
    let mut other = Guarded(Some(
        volumed(scratch.path(), "h3", "vg-two", NOWHERE)
            .spawn()
            .unwrap(),
    ));
    settle(&mut other);
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn a_volumed_for_a_host_id_served_elsewhere_refuses_to_start() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime
        .block_on(Server::start(ServerConfig::loopback()))
        .unwrap();
    let addr = server.local_addr().to_string();
    let kv = ConsulKv::new(ClientConfig::new(&addr).unwrap()).unwrap();
    let layout = Layout::default();
    let host = HostId::new("h1").unwrap();
    // The host record of a live daemon on another machine.
    let record = |heartbeat_ms| HostRecord {
        id: host.clone(),
        region: Region::new("ewr").unwrap(),
        zone: Zone::new("ewr-a").unwrap(),
        pool: PoolUsage {
            data_size: Bytes(GIB),
            data_used: Bytes::ZERO,
            metadata_size: Bytes(64 << 20),
            metadata_used: Bytes::ZERO,
            provisioned: Bytes::ZERO,
            volume_count: 0,
            health: Default::default(),
        },
        policy: Default::default(),
        heartbeat_ms,
        orphans: Vec::new(),
        owner: Some("another-machine:vg-one".to_owned()),
        migration: None,
    };
    let put = |record: HostRecord| {
        runtime
            .block_on(kv.put(
                &layout.host_info(&host),
                &serde_json::to_vec(&record).unwrap(),
            ))
            .unwrap();
    };
    put(record(now_ms()));

    let scratch = tempfile::tempdir().unwrap();
    let output = exits_within(
        volumed(scratch.path(), "h1", "vg-one", &addr)
            .spawn()
            .unwrap(),
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("another-machine:vg-one"),
        "the refusal names the running daemon: {stderr}"
    );

    // That daemon stopped long ago (its heartbeat is stale): this one takes over.
    put(record(now_ms() - 3_600_000));
    let mut daemon = Guarded(Some(
        volumed(scratch.path(), "h1", "vg-one", &addr)
            .spawn()
            .unwrap(),
    ));
    settle(&mut daemon);
    drop(daemon);
    runtime.block_on(server.shutdown()).unwrap();
}

/// A non-dumpable process's `/proc/<pid>/*` belongs to root whoever runs it,
/// and no core dump or ptrace of another user can read its keys. Seen from
/// outside: run the daemon as an unprivileged user and look at the owner.
#[test]
fn the_daemon_makes_itself_non_dumpable() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test starts the daemon as another user, which needs root"
    );
    const NOBODY: u32 = 65534;
    let scratch = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(scratch.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let mut command = volumed(scratch.path(), "h1", "vg-one", NOWHERE);
    std::os::unix::process::CommandExt::uid(&mut command, NOBODY);
    std::os::unix::process::CommandExt::gid(&mut command, NOBODY);
    let mut daemon = Guarded(Some(command.spawn().unwrap()));
    settle(&mut daemon);
    // The kernel exempts the /proc/<pid> directory itself, not its files.
    let status_file = std::fs::metadata(format!("/proc/{}/status", daemon.pid())).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t65534")),
        "runs as nobody: {status}"
    );
    assert_eq!(
        status_file.uid(),
        0,
        "/proc/<pid>/status of a dumpable process belongs to its user"
    );
}

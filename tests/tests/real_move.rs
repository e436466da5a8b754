//! End to end on a real kernel: a volume forked and then moved between two
//! volumed hosts (h1, h2 in ewr, each on its own loop-backed thin pool)
//! through one bundled KV server and volctl, across a `kill -9` of the
//! source host's daemon mid-copy.
//!
//! Needs `cargo build -p volumed -p volctl -p consul-kv-server --bins` first,
//! and qemu-nbd (qemu-utils) and the dm-raid module in the guest.
//! Prints the measured times (request to usable, copy rates) for the
//! Performance notes.

use serde_json::Value;
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use volume_core::units::{Bytes, GIB, MIB};
use volume_tests::procs::{self, Guarded, KvServer};
use volume_tests::{scratch_dir, TestPool};

const JAIL_UID: u32 = 1000;
const JAIL_GID: u32 = 1000;
/// The pattern written through the source before the fork.
const PATTERN_BYTES: u64 = 200 * MIB;
/// The fork's and the move's background copy limits, KiB/s.
const FORK_RATE_KIB: u64 = 4096;
const MOVE_RATE_KIB: u64 = 8192;
/// The source volume: 250 MB, written as a record directly (volctl sizes
/// are whole gigabytes, and every MiB copied is test time under
/// emulation). Like any decimal size it is no whole number of extents, nor
/// of 4 KiB sectors: LVM rounds the LV up to 240 MiB, and the destination
/// must copy the LV whole.
const VOLUME_BYTES: u64 = 250_000_000;
/// 240 MiB at about 3 MiB/s (the emulated CPU binds) is 80 s.
const HYDRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// One volumed host: its loop-backed VG and the daemon process, with the
/// arguments it was started with so a restart is the same daemon. The
/// daemon is declared first so it stops before the pool is removed.
struct Host {
    id: &'static str,
    daemon: Guarded,
    args: Vec<OsString>,
    jails: PathBuf,
    _pool: TestPool,
}

impl Host {
    fn start(kv: &KvServer, work: &Path, id: &'static str, zone: &str) -> Host {
        let pool = TestPool::new(&format!("move-{id}"), Bytes(4 * GIB), Bytes(3 * GIB));
        let jails = work.join(format!("jails-{id}"));
        fs::create_dir_all(&jails).unwrap();
        // Built as a command, kept as its arguments for the restart.
        let mut command = Command::new("volumed");
        command
            .args(["--host", id, "--region", "ewr", "--zone", zone])
            .args(["--consul-addr", &kv.url])
            .args(["--vg", pool.vg.as_str(), "--pool", "pool"])
            .arg("--pv")
            .arg(pool.loop_path())
            .args(["--pool-data-size", "3GiB", "--overcommit", "10"])
            .args(["--key-store", "local", "--key-dir"])
            .arg(work.join(format!("keys-{id}")))
            .arg("--jails-dir")
            .arg(&jails)
            .args([
                "--jail-uid",
                &JAIL_UID.to_string(),
                "--jail-gid",
                &JAIL_GID.to_string(),
            ])
            .args(["--heartbeat-interval", "2s", "--listen", "127.0.0.1:0"])
            .arg("--run-dir")
            .arg(work.join(format!("run-{id}")))
            .args(["--migration-listen", &free_port().to_string()])
            .arg("--migration-key")
            .arg(work.join(format!("mig-{id}.key")));
        let args: Vec<OsString> = command.get_args().map(OsString::from).collect();
        let daemon = spawn_volumed(id, &args);
        Host {
            id,
            daemon,
            args,
            jails,
            _pool: pool,
        }
    }

    /// `kill -9`, as a crash would.
    fn crash(&mut self) {
        let status = self.daemon.kill_hard();
        println!("volumed {} killed with SIGKILL: {status:?}", self.id);
    }

    /// The same daemon again, with the same arguments.
    fn restart(&mut self) {
        assert!(!self.daemon.is_running(), "volumed {} still runs", self.id);
        self.daemon = spawn_volumed(self.id, &self.args);
    }

    /// The volume's node in this host's jail directory.
    fn node(&self, volume: &str) -> PathBuf {
        let dir = self.jails.join(volume);
        let node = procs::wait_for(
            &format!("the jail node of {volume} on {}", self.id),
            Duration::from_secs(60),
            || fs::read_dir(&dir).ok()?.flatten().map(|e| e.path()).next(),
        );
        let meta = fs::metadata(&node).unwrap();
        assert!(
            meta.file_type().is_block_device(),
            "{} is not a block device",
            node.display()
        );
        node
    }
}

fn spawn_volumed(id: &str, args: &[OsString]) -> Guarded {
    let mut command = Command::new(procs::project_binary("volumed"));
    command
        .args(args)
        .env("RUST_LOG", "volumed=info,volume_core=info");
    Guarded::spawn(&format!("volumed {id}"), &mut command)
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The 8 bytes at every 8-aligned `offset` are a mix of the offset itself,
/// so a block read from the wrong place, or zeros, never match.
fn pattern_at(offset: u64, len: usize) -> Vec<u8> {
    assert!(offset.is_multiple_of(8) && len.is_multiple_of(8));
    let mut bytes = Vec::with_capacity(len);
    for word in 0..(len as u64 / 8) {
        let at = offset + word * 8;
        bytes.extend_from_slice(&(at.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5).to_le_bytes());
    }
    bytes
}

fn write_pattern(device: &Path) {
    let mut file = fs::OpenOptions::new().write(true).open(device).unwrap();
    let chunk = 8 * MIB;
    for offset in (0..PATTERN_BYTES).step_by(chunk as usize) {
        file.write_all(&pattern_at(offset, chunk as usize)).unwrap();
    }
    file.sync_all().unwrap();
}

fn read_at(device: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut file = fs::File::open(device).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut buffer = vec![0; len];
    file.read_exact(&mut buffer).unwrap();
    buffer
}

/// Compares the whole pattern, chunk by chunk, naming the first chunk off.
fn assert_pattern(device: &Path, what: &str) {
    let chunk = 8 * MIB;
    for offset in (0..PATTERN_BYTES).step_by(chunk as usize) {
        assert!(
            read_at(device, offset, chunk as usize) == pattern_at(offset, chunk as usize),
            "{what}: the pattern differs in the 8 MiB at {offset}"
        );
    }
}

/// `sha256sum` of the whole device.
fn sha256(device: &Path) -> String {
    let output = Command::new("sha256sum").arg(device).output().unwrap();
    assert!(output.status.success(), "sha256sum {}", device.display());
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints the digest first")
        .to_owned()
}

fn stdout_json(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "volctl printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn array(value: Value, what: &str) -> Vec<Value> {
    match value {
        Value::Array(items) => items,
        other => panic!("{what} is not an array: {other}"),
    }
}

fn hosts_json(kv: &KvServer) -> Vec<Value> {
    let output = procs::volctl(&kv.url, &["hosts", "--json"]);
    assert!(output.status.success());
    array(stdout_json(&output), "hosts --json")
}

fn list_json(kv: &KvServer) -> Vec<Value> {
    let output = procs::volctl(&kv.url, &["list", "--json"]);
    assert!(output.status.success());
    array(stdout_json(&output), "list --json")
}

fn show_json(kv: &KvServer, volume: &str) -> Value {
    let output = procs::volctl(&kv.url, &["show", volume, "--json"]);
    assert!(output.status.success(), "show {volume} failed");
    stdout_json(&output)
}

/// The first value under `key` anywhere in `value`, depth first.
fn find_key<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    match value {
        Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|v| find_key(v, key))),
        Value::Array(items) => items.iter().find_map(|v| find_key(v, key)),
        _ => None,
    }
}

/// Every string in `value` that starts with `prefix`.
fn strings_with_prefix(value: &Value, prefix: &str, found: &mut Vec<String>) {
    match value {
        Value::String(text) if text.starts_with(prefix) => found.push(text.clone()),
        Value::Object(map) => map
            .values()
            .for_each(|v| strings_with_prefix(v, prefix, found)),
        Value::Array(items) => items
            .iter()
            .for_each(|v| strings_with_prefix(v, prefix, found)),
        _ => {}
    }
}

/// What `volctl show --json` says of the volume's migration: its state
/// (`hydrating`, `complete`, `source_unreachable`, ...) and the copy's
/// progress where it reports one.
#[derive(Debug, Clone, Default)]
struct Hydration {
    id: Option<String>,
    /// When the destination wrote it (ms since the Unix epoch).
    updated_ms: Option<u64>,
    state: Option<String>,
    copied: Option<u64>,
    total: Option<u64>,
    rate: Option<u64>,
}

fn hydration(show: &Value) -> Hydration {
    let Some(migration) = show.get("migration").filter(|m| !m.is_null()) else {
        return Hydration::default();
    };
    let number = |key| find_key(migration, key).and_then(Value::as_u64);
    Hydration {
        id: migration
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        updated_ms: migration.get("updated_ms").and_then(Value::as_u64),
        state: find_key(migration, "state")
            .and_then(Value::as_str)
            .map(str::to_owned),
        copied: number("copied"),
        total: number("total"),
        rate: number("rate"),
    }
}

/// The text `volctl show` prints on its `hydration:` line, if any.
fn hydration_line(kv: &KvServer, volume: &str) -> Option<String> {
    let output = procs::volctl(&kv.url, &["show", volume]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.trim_start().starts_with("hydration"))
        .map(|line| line.trim().to_owned())
}

fn is_complete(kv: &KvServer, volume: &str) -> bool {
    let show = show_json(kv, volume);
    hydration(&show).state.as_deref() == Some("complete")
        || hydration_line(kv, volume).is_some_and(|line| line.ends_with("complete"))
}

/// Polls `check` every `every` until it returns `Some`, or panics after
/// `timeout` naming `what` (a slower [`procs::wait_for`], since each check
/// runs volctl).
fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(every);
    }
}

/// `kill -9` of the process a qemu-nbd pid file names, as a crash would.
fn kill_from_pid_file(pid_file: &Path) {
    let pid: i32 = fs::read_to_string(pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("kill -9 {pid} from {}: {e}", pid_file.display()));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn mib_per_sec(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / MIB as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The volume `name` on `host` that `known` does not hold yet.
fn new_volume_on(kv: &KvServer, host: &str, name: &str, known: &[&str]) -> Option<String> {
    list_json(kv).into_iter().find_map(|volume| {
        let id = volume.get("id")?.as_str()?;
        (volume.get("host")?.as_str()? == host
            && volume.get("name")?.as_str()? == name
            && !known.contains(&id))
        .then(|| id.to_owned())
    })
}

fn reserved_on(kv: &KvServer, host: &str) -> Option<u64> {
    hosts_json(kv)
        .into_iter()
        .find(|record| record["id"] == host)?
        .pointer("/ledger/reserved")?
        .as_u64()
}

/// Writes an encrypted volume's record and its reservation on `host` in
/// one txn, as `volctl create` does (create-only record, `cas` on the
/// ledger), for a size volctl cannot ask for.
fn reserve_volume(kv: &KvServer, host: &str, zone: &str, name: &str, size: u64) -> String {
    use consul_kv::{ClientConfig, ConsulKv, TxnOp};
    use volume_control::layout::{Layout, Ledger};
    use volume_core::names::{HostId, VolumeId};
    let layout = Layout::default();
    let host_id = HostId::new(host).unwrap();
    let id = VolumeId::generate();
    let spec = serde_json::json!({
        "id": id.as_str(), "name": name, "host": host, "region": "ewr", "zone": zone,
        "size": size, "encrypted": true, "created_ms": 1
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = ConsulKv::new(ClientConfig::new(&kv.url).unwrap()).unwrap();
    runtime.block_on(async {
        let ledger_key = layout.host_ledger(&host_id);
        let found = client.get(&ledger_key).await.unwrap().value;
        let mut ledger: Ledger = found
            .as_ref()
            .map(|pair| serde_json::from_slice(&pair.value).unwrap())
            .unwrap_or_default();
        ledger.reserved = volume_core::units::Bytes(ledger.reserved.0 + size);
        ledger.volumes += 1;
        let value = serde_json::to_vec(&ledger).unwrap();
        // `cas` 0: only if there is no ledger yet.
        let ledger_op = TxnOp::Cas {
            key: ledger_key,
            value,
            flags: 0,
            index: found.as_ref().map_or(0, |pair| pair.modify_index),
        };
        let desired = layout.desired(&host_id, &id);
        client
            .txn(&[
                TxnOp::CheckNotExists {
                    key: desired.clone(),
                },
                ledger_op,
                TxnOp::Set {
                    key: desired,
                    value: serde_json::to_vec(&spec).unwrap(),
                    flags: 0,
                },
            ])
            .await
            .unwrap();
    });
    id.as_str().to_owned()
}

#[test]
fn real_test_fork_and_move_between_hosts_across_a_source_crash() {
    let work = scratch_dir().join("vmv1test-move");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let kv = KvServer::start(&work.join("kv"));
    let mut h1 = Host::start(&kv, &work, "h1", "ewr-a");
    let mut h2 = Host::start(&kv, &work, "h2", "ewr-b");

    // Both hosts publish a record with a migration endpoint.
    poll(
        "two host records with migration endpoints",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let hosts = hosts_json(&kv);
            let ready = hosts
                .iter()
                .filter(|h| h.get("migration").is_some_and(|m| !m.is_null()))
                .count();
            (ready == 2).then_some(())
        },
    );
    let reserved_before = reserved_on(&kv, "h1").expect("h1's ledger");

    // 1. An encrypted 250 MB volume on h1 with a 200 MiB pattern in it,
    // reserved as volctl would.
    let source = reserve_volume(&kv, "h1", "ewr-a", "data", VOLUME_BYTES);
    poll(
        "the source volume to be ready on h1",
        Duration::from_secs(240),
        Duration::from_millis(250),
        || (show_json(&kv, &source)["state"].as_str() == Some("ready")).then_some(()),
    );
    let show = show_json(&kv, &source);
    assert_eq!(show["encrypted"].as_bool(), Some(true), "{show}");
    let source_node = h1.node(&source);
    let started = Instant::now();
    write_pattern(&source_node);
    println!(
        "wrote the {} MiB pattern in {:.1?}",
        PATTERN_BYTES / MIB,
        started.elapsed()
    );
    let source_sha = sha256(&source_node);
    let source_size = fs::File::open(&source_node)
        .unwrap()
        .seek(SeekFrom::End(0))
        .unwrap();
    println!("source {source}: {source_size} bytes, sha256 {source_sha}");

    // 2. Fork to h2; usable there before the copy is done.
    let requested = Instant::now();
    let forked = procs::volctl(
        &kv.url,
        &[
            "fork",
            &source,
            "--host",
            "h2",
            "--rate",
            &FORK_RATE_KIB.to_string(),
            "--detach",
            "--json",
        ],
    );
    assert!(forked.status.success(), "fork failed");
    let forked_json = stdout_json(&forked);
    let mut ids = Vec::new();
    strings_with_prefix(&forked_json, "vol_", &mut ids);
    let fork = match ids.into_iter().find(|id| *id != source) {
        Some(id) => id,
        None => poll(
            "the fork's volume record",
            Duration::from_secs(30),
            Duration::from_millis(500),
            || new_volume_on(&kv, "h2", "data", &[&source]),
        ),
    };
    println!("fork {fork} requested: {forked_json}");
    poll(
        "the fork to be ready on h2",
        Duration::from_secs(240),
        Duration::from_millis(250),
        || (show_json(&kv, &fork)["state"].as_str() == Some("ready")).then_some(()),
    );
    let usable_after = requested.elapsed();
    let fork_node = h2.node(&fork);
    // The end of the pattern, which a 4 MiB/s copy has not reached yet.
    let probe = PATTERN_BYTES - 8 * MIB;
    let read_started = Instant::now();
    let read = read_at(&fork_node, probe, 8 * MIB as usize);
    let read_took = read_started.elapsed();
    let at_read = hydration(&show_json(&kv, &fork));
    assert!(
        read == pattern_at(probe, 8 * MIB as usize),
        "the fork reads other bytes than the source's at {probe} while hydrating"
    );
    assert_ne!(
        at_read.state.as_deref(),
        Some("complete"),
        "the copy finished before the fork was read: {at_read:?}"
    );
    if let Some(copied) = at_read.copied {
        assert!(
            copied < probe,
            "the copy ({copied} bytes) had already passed the probe at {probe}"
        );
    }
    println!(
        "fork: request -> ready {usable_after:.1?}; 8 MiB at {} MiB read from the source \
         through the fork in {read_took:.1?} ({:.1} MiB/s); migration then {at_read:?}",
        probe / MIB,
        mib_per_sec(8 * MIB, read_took)
    );

    // 3. The source's daemon crashes mid-copy and comes back: first the
    // daemon alone (its export runs on in its own process, the copy goes
    // on), then the daemon with its export, as a host crash would take
    // both: the destination reports the source unreachable, and the copy
    // resumes when the restarted daemon serves the export again.
    let before_crash = hydration(&show_json(&kv, &fork));
    h1.crash();
    std::thread::sleep(Duration::from_secs(3));
    let during_crash = hydration(&show_json(&kv, &fork));
    println!(
        "h1's volumed down 3 s: migration before {before_crash:?}, after {during_crash:?}, show says {:?}",
        hydration_line(&kv, &fork)
    );
    h1.restart();
    std::thread::sleep(Duration::from_secs(2));
    h1.crash();
    let export_pid = work
        .join("run-h1")
        .join(
            hydration(&show_json(&kv, &fork))
                .id
                .expect("the migration's id"),
        )
        .join("export/qemu-nbd.pid");
    kill_from_pid_file(&export_pid);
    let killed = Instant::now();
    let unreachable = poll(
        "the fork to report its source unreachable",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let now = hydration(&show_json(&kv, &fork));
            (now.state.as_deref() == Some("source_unreachable")).then_some(now)
        },
    );
    println!(
        "h1's volumed and export killed: source unreachable after {:.1?} ({unreachable:?}), show says {:?}",
        killed.elapsed(),
        hydration_line(&kv, &fork)
    );
    // Meanwhile a read of a block already copied is served locally.
    assert!(
        read_at(&fork_node, 0, MIB as usize) == pattern_at(0, MIB as usize),
        "the fork's first MiB differs while the source is away"
    );
    h1.restart();
    let restarted = Instant::now();
    poll(
        "the copy to resume after the source's restart",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let now = hydration(&show_json(&kv, &fork));
            matches!(now.state.as_deref(), Some("hydrating" | "complete")).then_some(())
        },
    );
    println!(
        "copy resumed {:.1?} after h1's restart",
        restarted.elapsed()
    );

    // 3b. The destination host crashes mid-copy: its daemon, the nbd
    // client and the device-mapper layers all go, as after a reboot. The
    // restarted daemon builds the layers again, and the copy resumes from
    // the layer's own record, not from the start.
    let migration = hydration(&show_json(&kv, &fork))
        .id
        .expect("the migration's id");
    let before_crash = hydration(&show_json(&kv, &fork));
    h2.crash();
    let dmsetup_remove = |name: String| {
        let status = Command::new("dmsetup")
            .args(["remove", &name])
            .status()
            .unwrap();
        assert!(status.success(), "dmsetup remove {name}");
    };
    dmsetup_remove(format!("vmv1-crypt-{fork}"));
    dmsetup_remove(format!("vmv1-hydrate-{migration}"));
    let client = work.join("run-h2").join(&migration).join("hydrate");
    kill_from_pid_file(&client.join("qemu-nbd.pid"));
    if let Ok(device) = fs::read_to_string(client.join("nbd-device")) {
        // What a reboot does to the kernel's side of the connection.
        let _ = Command::new("qemu-nbd")
            .args(["--disconnect", device.trim()])
            .status();
    }
    let copied_before = before_crash.copied.unwrap_or(0);
    let restarted_ms = now_ms();
    h2.restart();
    let restarted = Instant::now();
    // A report the restarted daemon wrote, not the last one before the crash.
    let resumed = poll(
        "the fork's copy to resume on the restarted destination",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || {
            let now = hydration(&show_json(&kv, &fork));
            if now.updated_ms.is_none_or(|at| at <= restarted_ms) {
                return None;
            }
            match now.state.as_deref() {
                Some("complete") => Some(now),
                Some("hydrating") if now.copied.is_some_and(|c| c > 0) => Some(now),
                _ => None,
            }
        },
    );
    println!(
        "h2 crashed at {copied_before} bytes copied; {:.1?} after its restart the copy stood at          {resumed:?}",
        restarted.elapsed()
    );
    assert!(
        resumed.state.as_deref() == Some("complete")
            || resumed.copied.unwrap_or(0) >= copied_before / 2,
        "the restarted destination copied everything again: {copied_before} before, {resumed:?} after"
    );
    h2.node(&fork);

    // 4. The copy completes; the fork holds exactly the source's bytes.
    let mut samples: Vec<(Duration, Hydration)> = Vec::new();
    poll(
        "the fork's hydration to complete",
        HYDRATION_TIMEOUT,
        Duration::from_secs(2),
        || {
            assert!(h1.daemon.is_running(), "volumed h1 died after its restart");
            let show = show_json(&kv, &fork);
            let now = hydration(&show);
            samples.push((requested.elapsed(), now.clone()));
            is_complete(&kv, &fork).then_some(())
        },
    );
    let hydrated_after = requested.elapsed();
    let rates: Vec<u64> = samples.iter().filter_map(|(_, h)| h.rate).collect();
    // What the copy moved: the whole LV (header included) where reported.
    let copied_total = samples
        .iter()
        .rev()
        .find_map(|(_, h)| h.total)
        .unwrap_or(source_size);
    println!(
        "fork: request -> complete {hydrated_after:.1?} ({:.1?} after h1's restart); \
         whole-device average {:.2} MiB/s at a {} KiB/s limit; reported rates {:?} B/s; \
         show: {:?}",
        restarted.elapsed(),
        mib_per_sec(copied_total, hydrated_after),
        FORK_RATE_KIB,
        rates,
        hydration_line(&kv, &fork)
    );
    for (at, sample) in samples.iter().step_by(10) {
        println!("  {at:>8.1?}  {sample:?}");
    }
    let hashed = Instant::now();
    assert_eq!(
        sha256(&fork_node),
        source_sha,
        "the fork differs from its source"
    );
    println!(
        "fork's sha256 matches the source's ({:.1?})",
        hashed.elapsed()
    );
    assert_pattern(&fork_node, "the fork");
    // A fork leaves its source in place.
    assert_eq!(show_json(&kv, &source)["state"].as_str(), Some("ready"));

    // 5. Move the source to h2: it arrives under its name, h1 lets it go.
    let requested = Instant::now();
    let moved = procs::volctl(
        &kv.url,
        &[
            "move",
            &source,
            "--host",
            "h2",
            "--rate",
            &MOVE_RATE_KIB.to_string(),
            "--json",
        ],
    );
    let move_took = requested.elapsed();
    assert!(moved.status.success(), "move failed");
    let moved_json = stdout_json(&moved);
    let mut ids = Vec::new();
    strings_with_prefix(&moved_json, "vol_", &mut ids);
    let target = ids
        .into_iter()
        .find(|id| *id != source && *id != fork)
        .or_else(|| new_volume_on(&kv, "h2", "data", &[&source, &fork]))
        .expect("the moved volume's id");
    println!(
        "move: request -> released {move_took:.1?} (whole-device average {:.2} MiB/s at a {} KiB/s limit): {moved_json}",
        mib_per_sec(source_size, move_took),
        MOVE_RATE_KIB
    );
    let show = show_json(&kv, &target);
    assert_eq!(show["name"].as_str(), Some("data"), "{show}");
    assert_eq!(show["host"].as_str(), Some("h2"), "{show}");
    assert_eq!(show["state"].as_str(), Some("ready"), "{show}");
    let target_node = h2.node(&target);
    assert_eq!(
        sha256(&target_node),
        source_sha,
        "the moved volume differs from its source"
    );
    let gone = Instant::now();
    poll(
        "the source to be gone from h1",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let listed = list_json(&kv);
            (!listed.iter().any(|v| v["id"] == source.as_str())).then_some(())
        },
    );
    assert!(!h1.jails.join(&source).join("vol").exists());
    poll(
        "h1's reservation to be returned",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || (reserved_on(&kv, "h1")? == reserved_before).then_some(()),
    );
    println!(
        "move: source gone and h1's ledger back to {reserved_before} reserved {:.1?} after the move returned",
        gone.elapsed()
    );
    assert_eq!(
        procs::volctl(&kv.url, &["show", &source]).status.code(),
        Some(5)
    );

    // 6. A fork back to h1, cancelled while it copies: both ends are
    // cleaned up and h1's reservation is returned.
    let forked = procs::volctl(
        &kv.url,
        &[
            "fork", &target, "--host", "h1", "--rate", "64", "--detach", "--json",
        ],
    );
    assert!(forked.status.success(), "the second fork failed");
    let forked = stdout_json(&forked);
    let doomed_migration = forked["migration"]["id"]
        .as_str()
        .expect("fork --json names its migration")
        .to_owned();
    let mut ids = Vec::new();
    strings_with_prefix(&forked, "vol_", &mut ids);
    let doomed = ids
        .into_iter()
        .find(|id| *id != target)
        .expect("the second fork's volume id");
    poll(
        "the second fork to be usable on h1",
        Duration::from_secs(240),
        Duration::from_millis(250),
        || (show_json(&kv, &doomed)["state"].as_str() == Some("ready")).then_some(()),
    );
    let export_lvs = |host: &Host| -> Vec<String> {
        let output = Command::new("lvs")
            .args(["--noheadings", "-o", "lv_name"])
            .arg(host._pool.vg.as_str())
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter(|name| name.contains("mig_"))
            .map(str::to_owned)
            .collect()
    };
    assert!(
        !export_lvs(&h2).is_empty(),
        "h2 serves no export snapshot while the fork copies"
    );
    // The source's export dies first (as when the cancel reaches the
    // source before the destination, or the source is gone for good): the
    // destination's teardown must not wait for it.
    let export_pid = work
        .join("run-h2")
        .join(&doomed_migration)
        .join("export/qemu-nbd.pid");
    kill_from_pid_file(&export_pid);
    let cancel_started = Instant::now();
    let cancelled = procs::volctl(&kv.url, &["cancel", &doomed, "--timeout", "120"]);
    assert!(cancelled.status.success(), "cancel failed");
    println!("cancel returned after {:.1?}", cancel_started.elapsed());
    assert!(!list_json(&kv).iter().any(|v| v["id"] == doomed.as_str()));
    assert!(!h1.jails.join(&doomed).join("vol").exists());
    poll(
        "h1's reservation to be returned after the cancel",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || (reserved_on(&kv, "h1")? == reserved_before).then_some(()),
    );
    poll(
        "both ends' migration LVs to be gone",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || (export_lvs(&h1).is_empty() && export_lvs(&h2).is_empty()).then_some(()),
    );
    assert_eq!(
        procs::volctl(&kv.url, &["cancel", &doomed_migration])
            .status
            .code(),
        Some(0),
        "a second cancel is not idempotent"
    );

    for host in [&mut h1, &mut h2] {
        assert!(
            host.daemon.is_running(),
            "volumed {} died during the test",
            host.id
        );
        assert!(
            host.daemon.terminate(Duration::from_secs(20)),
            "volumed {} did not stop cleanly on SIGTERM",
            host.id
        );
    }
}

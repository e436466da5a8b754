//! End to end on a real kernel: one bundled KV server, three volumed hosts on
//! three loop-backed thin pools (h1, h2 in ewr; h3 in ord), and volctl.
//!
//! Needs `cargo build -p volumed -p volctl -p consul-kv-server --bins` first.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use volume_core::units::{Bytes, GIB};
use volume_tests::procs::{self, Guarded, KvServer};
use volume_tests::{scratch_dir, TestPool};

const JAIL_UID: u32 = 1000;
const JAIL_GID: u32 = 1000;

/// One volumed host: its loop-backed VG and the daemon process. The daemon
/// is declared first so it stops before the pool is removed.
struct Host {
    daemon: Guarded,
    jails: PathBuf,
    _pool: TestPool,
}

fn start_host(kv: &KvServer, work: &Path, id: &str, region: &str, zone: &str) -> Host {
    let pool = TestPool::new(&format!("e2e-{id}"), Bytes(4 * GIB), Bytes(3 * GIB));
    let jails = work.join(format!("jails-{id}"));
    let keys = work.join(format!("keys-{id}"));
    std::fs::create_dir_all(&jails).unwrap();
    let mut command = Command::new(procs::project_binary("volumed"));
    command
        .args(["--host", id, "--region", region, "--zone", zone])
        .args(["--consul-addr", &kv.url])
        .args(["--vg", pool.vg.as_str(), "--pool", "pool"])
        .arg("--pv")
        .arg(pool.loop_path())
        .args(["--pool-data-size", "3GiB", "--overcommit", "10"])
        .args(["--key-store", "local", "--key-dir"])
        .arg(&keys)
        .arg("--jails-dir")
        .arg(&jails)
        .args([
            "--jail-uid",
            &JAIL_UID.to_string(),
            "--jail-gid",
            &JAIL_GID.to_string(),
        ])
        .args(["--heartbeat-interval", "2s", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "volumed=info");
    let daemon = Guarded::spawn(&format!("volumed {id}"), &mut command);
    Host {
        daemon,
        jails,
        _pool: pool,
    }
}

fn stdout_json(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "volctl printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn hosts_json(kv: &KvServer) -> Vec<serde_json::Value> {
    let output = procs::volctl(&kv.url, &["hosts", "--json"]);
    assert!(output.status.success());
    match stdout_json(&output) {
        serde_json::Value::Array(hosts) => hosts,
        other => panic!("hosts --json is not an array: {other}"),
    }
}

fn field<'a>(value: &'a serde_json::Value, names: &[&str]) -> &'a serde_json::Value {
    names
        .iter()
        .find_map(|name| value.get(*name))
        .unwrap_or_else(|| panic!("none of {names:?} in {value}"))
}

#[test]
fn real_test_volctl_end_to_end_across_three_hosts() {
    let work = scratch_dir().join("vmv1test-e2e");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let kv = KvServer::start(&work.join("kv"));

    let mut hosts = vec![
        ("h1", start_host(&kv, &work, "h1", "ewr", "ewr-a")),
        ("h2", start_host(&kv, &work, "h2", "ewr", "ewr-b")),
        ("h3", start_host(&kv, &work, "h3", "ord", "ord-a")),
    ];

    // Every host publishes its record once its pool exists.
    procs::wait_for("three host records", Duration::from_secs(120), || {
        (hosts_json(&kv).len() == 3).then_some(())
    });
    let table = procs::volctl(&kv.url, &["hosts"]);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    for id in ["h1", "h2", "h3"] {
        assert!(table.contains(id), "{table}");
    }

    // The design card's command: lands on an ewr host and becomes ready.
    let created = procs::volctl(
        &kv.url,
        &[
            "create",
            "data",
            "--size",
            "25",
            "--region",
            "ewr",
            "--timeout",
            "240",
            "--json",
        ],
    );
    assert!(created.status.success(), "create failed");
    let created = stdout_json(&created);
    let created = created
        .as_array()
        .and_then(|a| a.first())
        .cloned()
        .expect("create --json prints an array");
    let id = field(&created, &["id"]).as_str().unwrap().to_owned();
    let host = field(&created, &["host"]).as_str().unwrap().to_owned();
    assert!(id.starts_with("vol_"), "{created}");
    assert!(
        host == "h1" || host == "h2",
        "placed on {host}, not an ewr host"
    );

    // Its node is in the host's jail directory: a block device owned by the
    // jail's uid:gid, mode 0600.
    let jails = &hosts.iter().find(|(h, _)| *h == host).unwrap().1.jails;
    let node = procs::wait_for("the jail node", Duration::from_secs(30), || {
        let dir = jails.join(&id);
        std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .next()
    });
    let meta = std::fs::metadata(&node).unwrap();
    assert!(
        meta.file_type().is_block_device(),
        "{} is not a block device",
        node.display()
    );
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (JAIL_UID, JAIL_GID, 0o600)
    );

    // list and show agree.
    let list = procs::volctl(&kv.url, &["list", "--region", "ewr", "--json"]);
    assert!(list.status.success());
    assert!(String::from_utf8_lossy(&list.stdout).contains(&id));
    let list_table = procs::volctl(&kv.url, &["list"]);
    assert!(String::from_utf8_lossy(&list_table.stdout).contains("ready"));
    let show = stdout_json(&procs::volctl(&kv.url, &["show", &id, "--json"]));
    assert_eq!(field(&show, &["state"]).as_str(), Some("ready"), "{show}");
    assert_eq!(field(&show, &["encrypted"]).as_bool(), Some(true), "{show}");

    // extend grows it and it comes back ready.
    let extended = procs::volctl(
        &kv.url,
        &["extend", &id, "--size", "30", "--timeout", "240"],
    );
    assert!(extended.status.success(), "extend failed");
    let show = stdout_json(&procs::volctl(&kv.url, &["show", &id, "--json"]));
    assert_eq!(
        field(&show, &["size"]).as_u64(),
        Some(30_000_000_000),
        "{show}"
    );
    assert_eq!(field(&show, &["state"]).as_str(), Some("ready"), "{show}");

    // A full region: the clear error and exit code 3.
    let refused = procs::volctl(
        &kv.url,
        &["create", "huge", "--size", "1000", "--region", "ewr"],
    );
    assert_eq!(refused.status.code(), Some(3));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("no host in ewr can take 1000 GB: 2 hosts, most headroom"),
        "{message}"
    );

    // destroy removes it, and the capacity comes back.
    let destroyed = procs::volctl(&kv.url, &["destroy", &id, "--yes", "--timeout", "240"]);
    assert!(destroyed.status.success(), "destroy failed");
    let missing = procs::volctl(&kv.url, &["show", &id]);
    assert_eq!(missing.status.code(), Some(5));
    assert!(!jails.join(&id).join("vol").exists());
    procs::wait_for(
        "the reservation to be released",
        Duration::from_secs(30),
        || {
            let hosts = hosts_json(&kv);
            let record = hosts.iter().find(|h| h["id"] == host.as_str())?;
            (record.pointer("/ledger/reserved")?.as_u64()? == 0).then_some(())
        },
    );

    for (id, host) in &mut hosts {
        assert!(
            host.daemon.is_running(),
            "volumed {id} died during the test"
        );
        assert!(
            host.daemon.terminate(Duration::from_secs(20)),
            "volumed {id} did not stop cleanly on SIGTERM"
        );
    }
}

//! Host tests of the daemon: the simulated backend and devices, the
//! embedded KV server in process, the daemon as a task.

use consul_kv::{ClientConfig, ConsulKv};
use consul_kv_server::{Server, ServerConfig, ServerHandle};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume_control::layout::{Layout, Ledger, VolumeSpec, VolumeState, VolumeStatus};
use volume_core::backend::sim::SimBackend;
use volume_core::backend::{BackendError, ThinBackend, ThinPoolSpec, ThinVolume};
use volume_core::health::PoolHealth;
use volume_core::host::sim::SimDevices;
use volume_core::host::{self, Encryption, Fault, FaultPlan, Step, VolumeHost};
use volume_core::keys::{EnvelopeKeyStore, KeyEncryptionKey, KeyStore, LocalKeyDir};
use volume_core::names::{HostId, LvName, Region, VgName, VolumeId, VolumeName, Zone};
use volume_core::units::{Bytes, GIB};
use volumed::config::Config;
use volumed::counting::CountingBackend;
use volumed::daemon::{Running, Setup};
use volumed::kv::{commit_destroy, Committed};
use volumed::metrics::Metrics;
use volumed::sealed::ConsulSealedStorage;

mod common;
use common::{host_id, host_record, status, volctl, wait_for, HOST, WAIT};

async fn start_server(bind: SocketAddr, data_dir: Option<&Path>) -> ServerHandle {
    let mut config = ServerConfig::new(bind);
    if let Some(dir) = data_dir {
        config = config.with_data_dir(dir);
    }
    // The port of a just-stopped server may take a moment to free up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Server::start(config.clone()).await {
            Ok(server) => return server,
            Err(error) if Instant::now() < deadline => {
                eprintln!("server start: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("cannot start the KV server: {error}"),
        }
    }
}

fn client(server_addr: SocketAddr) -> ConsulKv {
    ConsulKv::new(
        ClientConfig::new(&server_addr.to_string())
            .unwrap()
            .with_request_timeout(Duration::from_secs(5)),
    )
    .unwrap()
}

fn config(extra: &[&str]) -> Config {
    let mut args = vec!["--max-concurrent", "4"];
    args.extend_from_slice(extra);
    common::config(&args)
}

/// A simulated host that outlives daemons, as a real host outlives a
/// daemon restart.
struct SimHost {
    sim: Arc<SimBackend>,
    devices: Arc<SimDevices>,
    keys: Arc<dyn KeyStore>,
    _key_dir: Option<tempfile::TempDir>,
}

impl SimHost {
    fn new(keys: Arc<dyn KeyStore>, key_dir: Option<tempfile::TempDir>) -> SimHost {
        let mut spec = ThinPoolSpec::new(
            VgName::new("vmvg-sim").unwrap(),
            LvName::new("pool").unwrap(),
            vec![PathBuf::from("/dev/sim0")],
        )
        .unwrap();
        spec.data_size = Some(Bytes(100 * GIB));
        let sim = Arc::new(SimBackend::new(spec));
        let _ = sim.ensure_pool().unwrap();
        let devices = Arc::new(SimDevices::new(sim.clone()));
        SimHost {
            sim,
            devices,
            keys,
            _key_dir: key_dir,
        }
    }

    fn local() -> SimHost {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(LocalKeyDir::open(dir.path().join("keys")).unwrap());
        SimHost::new(keys, Some(dir))
    }

    /// Keys sealed into the KV store. Built off the async workers: the
    /// storage blocks on the runtime.
    fn envelope(kv: &ConsulKv) -> SimHost {
        let storage = ConsulSealedStorage::new(
            kv.clone(),
            Layout::default(),
            tokio::runtime::Handle::current(),
        );
        let keys = Arc::new(EnvelopeKeyStore::new(
            KeyEncryptionKey::generate().unwrap(),
            storage,
        ));
        SimHost::new(keys, None)
    }

    fn volume_host(&self, metrics: &Arc<Metrics>) -> Arc<VolumeHost> {
        let backend = Arc::new(CountingBackend::new(self.sim.clone(), metrics.clone()));
        Arc::new(VolumeHost::new(
            backend,
            self.devices.clone(),
            self.keys.clone(),
            Default::default(),
        ))
    }

    fn lvs(&self) -> Vec<VolumeId> {
        self.sim
            .list_thins()
            .unwrap()
            .iter()
            .filter_map(|v| VolumeId::from_lv_name(&v.lv))
            .collect()
    }
}

struct Daemon {
    running: Running,
    metrics: Arc<Metrics>,
}

fn start_daemon(
    config: Config,
    host: Arc<VolumeHost>,
    kv: ConsulKv,
    metrics: Arc<Metrics>,
) -> Daemon {
    let pool = host.pool_status().unwrap();
    Daemon {
        running: Running::spawn(Setup {
            config,
            host,
            kv,
            metrics: metrics.clone(),
            pool,
            migration: None,
        }),
        metrics,
    }
}

fn spec(size: Bytes, encrypted: bool) -> VolumeSpec {
    VolumeSpec {
        id: VolumeId::generate(),
        name: VolumeName::new("data").unwrap(),
        host: HostId::new(HOST).unwrap(),
        region: Region::new("ewr").unwrap(),
        zone: Zone::new("ewr-a").unwrap(),
        size,
        encrypted,
        created_ms: 1,
        destroy: false,
        source: None,
        snapshots: Default::default(),
        auto_extend: None,
    }
}

async fn put_spec(kv: &ConsulKv, spec: &VolumeSpec) {
    let key = Layout::default().desired(&host_id(), &spec.id);
    assert!(kv
        .put(&key, &serde_json::to_vec(spec).unwrap())
        .await
        .unwrap());
}

async fn status_raw(kv: &ConsulKv, id: &VolumeId) -> Option<Vec<u8>> {
    let key = Layout::default().status(&host_id(), id);
    Some(kv.get(&key).await.unwrap().value?.value)
}

async fn wait_state(kv: &ConsulKv, id: &VolumeId, state: VolumeState) -> VolumeStatus {
    wait_for(&format!("{id} to be {}", state.as_str()), || async {
        status(kv, id).await.filter(|s| s.state == state)
    })
    .await
}

async fn ledger(kv: &ConsulKv) -> (Ledger, u64) {
    let pair = kv
        .get(&Layout::default().host_ledger(&host_id()))
        .await
        .unwrap()
        .value
        .unwrap();
    (
        serde_json::from_slice(&pair.value).unwrap(),
        pair.modify_index,
    )
}

/// Records `spec` with its reservation in one txn, as volctl does: the
/// daemon writes the ledger too (a scheduled snapshot reserves), so a
/// record and a plain ledger put in two steps could lose its write.
async fn put_spec_reserved(kv: &ConsulKv, spec: &VolumeSpec) {
    let layout = Layout::default();
    let key = layout.host_ledger(&host_id());
    loop {
        let pair = kv.get(&key).await.unwrap().value;
        let (index, ledger) = match &pair {
            None => (0, Ledger::default()),
            Some(pair) => (
                pair.modify_index,
                serde_json::from_slice(&pair.value).unwrap(),
            ),
        };
        let after = Ledger {
            reserved: ledger.reserved + spec.size,
            volumes: ledger.volumes + 1,
        };
        let ops = [
            consul_kv::TxnOp::Cas {
                key: key.clone(),
                value: serde_json::to_vec(&after).unwrap(),
                flags: 0,
                index,
            },
            consul_kv::TxnOp::Set {
                key: layout.desired(&host_id(), &spec.id),
                value: serde_json::to_vec(spec).unwrap(),
                flags: 0,
            },
        ];
        match kv.txn(&ops).await {
            Ok(_) => return,
            Err(consul_kv::Error::TxnConflict { .. }) => continue,
            Err(error) => panic!("{error}"),
        }
    }
}

/// The value of the sample named exactly `series` in a metrics page.
fn metric_value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

async fn put_ledger(kv: &ConsulKv, ledger: Ledger) {
    kv.put(
        &Layout::default().host_ledger(&host_id()),
        &serde_json::to_vec(&ledger).unwrap(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_creates_extends_exposes_and_destroys() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let jails = tempfile::tempdir().unwrap();
    let jails_dir = jails.path().join("jails");
    let sim = SimHost::envelope(&kv);
    let metrics = Arc::new(Metrics::default());
    let config = config(&[
        "--jails-dir",
        jails_dir.to_str().unwrap(),
        "--jail-uid",
        "1000",
        "--jail-gid",
        "1001",
    ]);
    let daemon = start_daemon(config, sim.volume_host(&metrics), kv.clone(), metrics);

    // An over-committed encrypted volume and a plain one, reserved as
    // volctl would reserve them.
    let big = spec(Bytes(25 * GIB), true);
    let mut plain = spec(Bytes(GIB), false);
    put_ledger(
        &kv,
        Ledger {
            reserved: big.size + plain.size,
            volumes: 2,
        },
    )
    .await;
    put_spec(&kv, &big).await;
    put_spec(&kv, &plain).await;
    let ready = wait_state(&kv, &big.id, VolumeState::Ready).await;
    assert!(ready.encrypted);
    assert_eq!(ready.size, Bytes(25 * GIB));
    assert_eq!(ready.error, None);
    assert!(ready.device.unwrap().starts_with("/dev/mapper/vmv1-crypt-"));
    let node = PathBuf::from(ready.node.expect("exposed node in the status"));
    assert_eq!(node, jails_dir.join(big.id.as_str()).join("vol"));
    {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::symlink_metadata(&node).unwrap();
        assert!(meta.file_type().is_block_device());
        assert_eq!((meta.uid(), meta.gid()), (1000, 1001));
    }
    let plain_ready = wait_state(&kv, &plain.id, VolumeState::Ready).await;
    assert!(!plain_ready.encrypted);

    // Only ciphertext of the right length is in the store.
    let sealed = kv
        .get(&Layout::default().sealed_key(&big.id))
        .await
        .unwrap()
        .value
        .expect("sealed key stored in KV");
    assert_eq!(sealed.value.len(), 1 + 24 + 64 + 16);
    assert!(kv
        .get(&Layout::default().sealed_key(&plain.id))
        .await
        .unwrap()
        .value
        .is_none());

    // Growth in the record extends the volume.
    let mut grown = big.clone();
    grown.size = Bytes(30 * GIB);
    put_spec(&kv, &grown).await;
    wait_for("the extend", || async {
        status(&kv, &big.id)
            .await
            .filter(|s| s.size == Bytes(30 * GIB) && s.state == VolumeState::Ready)
    })
    .await;

    // The destroy intent removes the volume, its node, key and records,
    // and returns its reservation.
    plain.destroy = true;
    put_spec(&kv, &plain).await;
    wait_for("the destroy commit", || async {
        let desired = kv
            .get(&Layout::default().desired(&host_id(), &plain.id))
            .await
            .ok()?;
        desired.value.is_none().then_some(())
    })
    .await;
    assert!(status(&kv, &plain.id).await.is_none());
    assert!(!sim.lvs().contains(&plain.id));
    assert!(!jails_dir.join(plain.id.as_str()).exists());
    assert_eq!(
        ledger(&kv).await.0,
        Ledger {
            reserved: big.size,
            volumes: 1
        }
    );

    let mut destroy_big = grown.clone();
    destroy_big.destroy = true;
    put_spec(&kv, &destroy_big).await;
    wait_for("the second destroy", || async {
        status(&kv, &big.id).await.is_none().then_some(())
    })
    .await;
    assert!(kv
        .get(&Layout::default().sealed_key(&big.id))
        .await
        .unwrap()
        .value
        .is_none());
    assert!(!node.exists());
    assert_eq!(ledger(&kv).await.0, Ledger::default());
    assert!(sim.lvs().is_empty());

    let record = wait_for("a host record with an empty pool", || async {
        host_record(&kv).await.filter(|r| r.pool.volume_count == 0)
    })
    .await;
    assert!(record.orphans.is_empty());
    assert_eq!(record.pool.data_size, Bytes(100 * GIB));
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_many_volumes_costs_a_constant_number_of_reports() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let count = 200;
    let specs: Vec<VolumeSpec> = (0..count).map(|_| spec(Bytes(GIB), true)).collect();
    for spec in &specs {
        put_spec(&kv, spec).await;
    }
    // Reserved as volctl reserves them: the ledger needs no repair.
    put_ledger(
        &kv,
        Ledger {
            reserved: Bytes(count as u64 * GIB),
            volumes: count as u32,
        },
    )
    .await;
    let metrics = Arc::new(Metrics::default());
    let daemon = start_daemon(config(&[]), sim.volume_host(&metrics), kv.clone(), metrics);
    for spec in &specs {
        wait_state(&kv, &spec.id, VolumeState::Ready).await;
    }
    daemon.running.stop().await.unwrap();
    assert_eq!(sim.lvs().len(), count);

    // A new daemon over the same host: one list, no change, no status write
    // that would change nothing.
    let before = sim.sim.calls();
    let dm_before = sim.devices.dm_queries();
    let metrics = Arc::new(Metrics::default());
    let host = sim.volume_host(&metrics);
    let pool = host.pool_status().unwrap();
    let daemon = Daemon {
        running: Running::spawn(Setup {
            config: config(&[]),
            host,
            kv: kv.clone(),
            metrics: metrics.clone(),
            pool,
            migration: None,
        }),
        metrics,
    };
    wait_for("the restarted daemon to read the records", || async {
        (daemon.metrics.watch_updates() >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = sim.sim.calls();
    assert_eq!(after.changes, before.changes, "a restart changed LVM state");
    // pool_status above, and the daemon's one list.
    assert_eq!(after.reports - before.reports, 2, "{before:?} -> {after:?}");
    assert_eq!(daemon.metrics.lvm_calls(), 2);
    // And one listing of the dm-crypt mappings, not a status per volume.
    assert_eq!(
        sim.devices.dm_queries() - dm_before,
        1,
        "device-mapper queries"
    );
    let writes_after_start = daemon.metrics.kv_writes();
    assert!(writes_after_start <= 2, "{writes_after_start} writes");

    // Idle: no LVM call at all, and only heartbeats written.
    let idle_reports = sim.sim.calls().reports;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(sim.sim.calls().reports, idle_reports);
    let heartbeats = daemon.metrics.kv_writes() - writes_after_start;
    assert!(
        (1..=3).contains(&heartbeats),
        "{heartbeats} writes while idle"
    );
    assert_eq!(daemon.metrics.watch_updates(), 1);
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reported_never_deleted_and_gc_deletes_them_only_when_asked() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    let host = sim.volume_host(&metrics);

    // One LV of ours made behind the daemon's back, one whose record is
    // deleted outright (no destroy intent).
    let stray = spec(Bytes(GIB), false);
    let stray_volume = host::NewVolume {
        id: stray.id.clone(),
        name: stray.name.clone(),
        size: stray.size,
        encryption: Encryption::None,
    };
    let _ = host.create(&stray_volume).unwrap();
    let kept = spec(Bytes(GIB), true);
    put_spec(&kv, &kept).await;
    // A status left behind for a volume with neither record nor LV.
    let ghost = VolumeId::generate();
    kv.put(&Layout::default().status(&host_id(), &ghost), b"{}")
        .await
        .unwrap();
    let config = config(&[]);
    let daemon = start_daemon(config.clone(), host.clone(), kv.clone(), metrics.clone());
    wait_state(&kv, &stray.id, VolumeState::Orphan).await;
    wait_state(&kv, &kept.id, VolumeState::Ready).await;
    wait_for("the stale status to go", || async {
        status_raw(&kv, &ghost).await.is_none().then_some(())
    })
    .await;
    kv.delete(&Layout::default().desired(&host_id(), &kept.id))
        .await
        .unwrap();
    wait_state(&kv, &kept.id, VolumeState::Orphan).await;
    let record = wait_for("both orphans in the host record", || async {
        host_record(&kv).await.filter(|r| r.orphans.len() == 2)
    })
    .await;
    assert!(record.orphans.contains(&stray.id) && record.orphans.contains(&kept.id));
    assert_eq!(metrics.orphans(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sim.lvs().len(), 2, "an orphan was deleted");

    // gc without --yes only lists.
    let listed = volumed::gc::gc(&config, &host, &kv, false).await.unwrap();
    assert_eq!(listed.volumes.len(), 2);
    assert!(listed.volumes.iter().all(|o| o.deleted.is_none()));
    assert_eq!(sim.lvs().len(), 2);
    // With --yes, they go, with their statuses (every record is gone, so
    // the operator says that is meant).
    let options = volumed::gc::GcOptions {
        yes: true,
        allow_empty_desired: true,
    };
    let deleted = volumed::gc::gc_with(&config, &host, &kv, options)
        .await
        .unwrap();
    assert!(deleted
        .volumes
        .iter()
        .all(|o| matches!(o.deleted, Some(Ok(())))));
    assert!(sim.lvs().is_empty());
    assert!(status(&kv, &stray.id).await.is_none());
    // The daemon learns of it on a resync (SIGHUP).
    daemon.running.resync();
    wait_for("no orphans after the resync", || async {
        host_record(&kv).await.filter(|r| r.orphans.is_empty())
    })
    .await;
    assert_eq!(metrics.orphans(), 0);
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_outage_keeps_volumes_and_the_watch_resumes() {
    let data = tempfile::tempdir().unwrap();
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), Some(data.path())).await;
    let addr = server.local_addr();
    let kv = client(addr);
    let sim = SimHost::envelope(&kv);
    let metrics = Arc::new(Metrics::default());
    let daemon = start_daemon(
        config(&[]),
        sim.volume_host(&metrics),
        kv.clone(),
        metrics.clone(),
    );
    let first = spec(Bytes(GIB), true);
    put_spec(&kv, &first).await;
    wait_state(&kv, &first.id, VolumeState::Ready).await;

    server.shutdown().await.unwrap();
    let changes = sim.sim.calls().changes;
    wait_for("the daemon to notice the outage", || async {
        (!metrics.kv_up()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sim.lvs(), vec![first.id.clone()], "a volume went away");
    assert_eq!(sim.sim.calls().changes, changes);

    // The same store comes back: the watch resumes and new work converges.
    let server = start_server(addr, Some(data.path())).await;
    let second = spec(Bytes(GIB), true);
    put_spec(&kv, &second).await;
    wait_state(&kv, &second.id, VolumeState::Ready).await;
    assert!(metrics.kv_up());
    assert_eq!(
        status(&kv, &first.id).await.unwrap().state,
        VolumeState::Ready
    );
    assert_eq!(sim.lvs().len(), 2);
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_store_turns_volumes_into_orphans_never_deletions() {
    let data = tempfile::tempdir().unwrap();
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), Some(data.path())).await;
    let addr = server.local_addr();
    let kv = client(addr);
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    let daemon = start_daemon(
        config(&[]),
        sim.volume_host(&metrics),
        kv.clone(),
        metrics.clone(),
    );
    let volume = spec(Bytes(GIB), true);
    // Enough writes that the fresh store's index is behind the old one.
    put_spec(&kv, &volume).await;
    for i in 0..20 {
        put_ledger(
            &kv,
            Ledger {
                reserved: Bytes(i),
                volumes: 1,
            },
        )
        .await;
    }
    wait_state(&kv, &volume.id, VolumeState::Ready).await;
    server.shutdown().await.unwrap();

    // A store with no data on the same address: the index goes backwards.
    let fresh = tempfile::tempdir().unwrap();
    let server = start_server(addr, Some(fresh.path())).await;
    let orphan = wait_state(&kv, &volume.id, VolumeState::Orphan).await;
    assert!(orphan.encrypted);
    let record = wait_for("the host record on the fresh store", || async {
        host_record(&kv).await.filter(|r| !r.orphans.is_empty())
    })
    .await;
    assert_eq!(record.orphans, vec![volume.id.clone()]);
    assert_eq!(sim.lvs(), vec![volume.id.clone()], "an orphan was deleted");

    // Its record restored: ready again, with no LVM change.
    let changes = sim.sim.calls().changes;
    put_spec(&kv, &volume).await;
    wait_state(&kv, &volume.id, VolumeState::Ready).await;
    assert_eq!(sim.sim.calls().changes, changes);
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_get_an_error_status_and_do_not_stop_the_daemon() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    let daemon = start_daemon(
        config(&[]),
        sim.volume_host(&metrics),
        kv.clone(),
        metrics.clone(),
    );
    let layout = Layout::default();

    let garbage = VolumeId::generate();
    kv.put(&layout.desired(&host_id(), &garbage), b"{\"id\": 42")
        .await
        .unwrap();
    let mut other_host = spec(Bytes(GIB), false);
    other_host.host = HostId::new("h2").unwrap();
    put_spec(&kv, &other_host).await;
    kv.put(
        &format!("{}not-a-volume", layout.desired_prefix(&host_id())),
        b"x",
    )
    .await
    .unwrap();
    let good = spec(Bytes(GIB), false);
    put_spec(&kv, &good).await;

    let error = wait_state(&kv, &garbage, VolumeState::Error).await;
    assert!(error.error.unwrap().starts_with("malformed desired record"),);
    let error = wait_state(&kv, &other_host.id, VolumeState::Error).await;
    assert!(error.error.unwrap().contains("names host h2"));
    wait_state(&kv, &good.id, VolumeState::Ready).await;
    assert_eq!(sim.lvs(), vec![good.id.clone()]);

    // A shrink is refused with a reason; the volume stays as it is.
    let mut shrunk = good.clone();
    shrunk.size = Bytes(GIB / 2);
    put_spec(&kv, &shrunk).await;
    let refused = wait_state(&kv, &good.id, VolumeState::Error).await;
    assert!(refused.error.unwrap().contains("shrinking is refused"));
    assert_eq!(refused.size, Bytes(GIB));

    // A malformed record over a live volume keeps it, and it is no orphan.
    kv.put(&layout.desired(&host_id(), &good.id), b"not json")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sim.lvs(), vec![good.id.clone()]);
    assert_eq!(metrics.orphans(), 0);
    assert!(metrics.errors("malformed") >= 3);

    // Fixed, it converges again.
    put_spec(&kv, &good).await;
    wait_state(&kv, &good.id, VolumeState::Ready).await;
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_create_is_finished_by_the_next_daemon() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::envelope(&kv);
    let metrics = Arc::new(Metrics::default());
    let faults = Arc::new(FaultPlan::new());
    faults.at(Step::CryptFormatted, Fault::Crash);
    let backend = Arc::new(CountingBackend::new(sim.sim.clone(), metrics.clone()));
    let crashing = Arc::new(
        VolumeHost::new(
            backend,
            sim.devices.clone(),
            sim.keys.clone(),
            Default::default(),
        )
        .with_faults(faults.clone()),
    );
    let daemon = start_daemon(config(&[]), crashing, kv.clone(), metrics);
    let volume = spec(Bytes(GIB), true);
    put_spec(&kv, &volume).await;
    let failed = wait_state(&kv, &volume.id, VolumeState::Error).await;
    assert!(failed.error.unwrap().contains("injected crash"));
    assert_eq!(faults.fired(), vec![(Step::CryptFormatted, Fault::Crash)]);
    daemon.running.stop().await.unwrap();
    // The crash left a half-made volume: LV and header, not ready.
    assert_eq!(sim.lvs(), vec![volume.id.clone()]);

    let metrics = Arc::new(Metrics::default());
    let daemon = start_daemon(
        config(&[]),
        sim.volume_host(&metrics),
        kv.clone(),
        metrics.clone(),
    );
    let ready = wait_state(&kv, &volume.id, VolumeState::Ready).await;
    assert!(ready.encrypted && ready.device.is_some());
    assert_eq!(sim.devices.counts(&volume.id).crypt_formats, 1);
    let record = wait_for("the host record", || async { host_record(&kv).await }).await;
    assert!(record.orphans.is_empty());
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destroy_commit_is_atomic_and_never_returns_a_reservation_twice() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let layout = Layout::default();
    let metrics = Metrics::default();
    let volume = spec(Bytes(3 * GIB), true);
    put_spec(&kv, &volume).await;
    let desired = kv
        .get(&layout.desired(&host_id(), &volume.id))
        .await
        .unwrap()
        .value
        .unwrap();
    kv.put(&layout.status(&host_id(), &volume.id), b"{}")
        .await
        .unwrap();
    kv.put(&layout.sealed_key(&volume.id), b"sealed")
        .await
        .unwrap();
    put_ledger(
        &kv,
        Ledger {
            reserved: Bytes(10 * GIB),
            volumes: 4,
        },
    )
    .await;

    // A stale record index: nothing is written.
    let stale = commit_destroy(
        &kv,
        &layout,
        &host_id(),
        &volume.id,
        volume.size,
        desired.modify_index - 1,
        &metrics,
    )
    .await
    .unwrap();
    assert_eq!(stale, Committed::RecordChanged);
    assert_eq!(ledger(&kv).await.0.volumes, 4);

    // Another writer keeps changing the ledger meanwhile (as volctl's
    // creates do); the commit retries on its CAS and counts exactly once.
    let bumper = {
        let kv = kv.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                let (current, index) = ledger(&kv).await;
                let bumped = Ledger {
                    reserved: current.reserved + Bytes(GIB),
                    volumes: current.volumes + 1,
                };
                let _ = kv
                    .put_cas(
                        &Layout::default().host_ledger(&host_id()),
                        &serde_json::to_vec(&bumped).unwrap(),
                        index,
                    )
                    .await;
            }
        })
    };
    let done = commit_destroy(
        &kv,
        &layout,
        &host_id(),
        &volume.id,
        volume.size,
        desired.modify_index,
        &metrics,
    )
    .await
    .unwrap();
    assert_eq!(done, Committed::Done);
    bumper.await.unwrap();
    let (after, _) = ledger(&kv).await;
    let bumps = after.volumes + 1 - 4;
    assert_eq!(
        after.reserved,
        Bytes(10 * GIB) + Bytes(u64::from(bumps) * GIB) - Bytes(3 * GIB)
    );
    for key in [
        layout.desired(&host_id(), &volume.id),
        layout.status(&host_id(), &volume.id),
        layout.sealed_key(&volume.id),
    ] {
        assert!(kv.get(&key).await.unwrap().value.is_none(), "{key} left");
    }

    // A retry after a lost answer finds the record gone: no second refund.
    let again = commit_destroy(
        &kv,
        &layout,
        &host_id(),
        &volume.id,
        volume.size,
        desired.modify_index,
        &metrics,
    )
    .await
    .unwrap();
    assert_eq!(again, Committed::AlreadyGone);
    assert_eq!(ledger(&kv).await.0, after);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_are_served() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    let daemon = start_daemon(
        config(&[]),
        sim.volume_host(&metrics),
        kv.clone(),
        metrics.clone(),
    );
    let volume = spec(Bytes(GIB), false);
    put_spec(&kv, &volume).await;
    wait_state(&kv, &volume.id, VolumeState::Ready).await;

    let (addr, http) = volumed::http::serve(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics.clone(),
        Duration::from_secs(60),
        std::future::pending(),
    )
    .await
    .unwrap();
    let get = |path: &'static str| async move {
        let answer = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    };
    let (code, text) = get("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        text.contains("volumed_volumes{state=\"ready\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("volumed_pool_data_percent "), "{text}");
    assert!(text.contains("volumed_pool_metadata_percent "), "{text}");
    assert!(text.contains("volumed_operation_duration_seconds_count{operation=\"create\"} 1\n"));
    assert!(text.contains("volumed_kv_up 1\n"), "{text}");
    let (code, text) = get("/healthz").await;
    assert_eq!(
        (code, text.as_str()),
        (200, "ok\npool: healthy\nkv: reachable\n")
    );
    http.abort();
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}

/// Log lines of this test binary, for counting transition lines. Global,
/// because the daemon logs from the runtime's worker threads; only the
/// pool-health test reads it, and only lines no other test can produce.
fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        logs
    })
    .clone()
}

struct LogSink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_with(logs: &std::sync::Mutex<Vec<u8>>, needle: &str) -> Vec<String> {
    String::from_utf8_lossy(&logs.lock().unwrap())
        .lines()
        .filter(|line| line.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_pool_shows_everywhere_an_operator_looks() {
    let logs = captured_logs();
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    let daemon = start_daemon(
        config(&["--pool-refresh-interval", "1s"]),
        sim.volume_host(&metrics),
        kv.clone(),
        metrics.clone(),
    );
    let volume = spec(Bytes(GIB), false);
    put_spec(&kv, &volume).await;
    wait_state(&kv, &volume.id, VolumeState::Ready).await;
    let (addr, http) = volumed::http::serve(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics.clone(),
        Duration::from_secs(60),
        std::future::pending(),
    )
    .await
    .unwrap();
    let get = |path: &'static str| async move {
        let answer = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    };
    let (_, text) = get("/metrics").await;
    assert!(text.contains("volumed_pool_healthy 1\n"), "{text}");

    // The pool fills up, as LVM then reports it.
    sim.sim.simulate_pool_health(PoolHealth::OutOfData);
    let record = wait_for("the host record to say out_of_data", || async {
        host_record(&kv)
            .await
            .filter(|record| record.pool.health == PoolHealth::OutOfData)
    })
    .await;
    assert_eq!(record.pool.headroom(&record.policy), Bytes::ZERO);

    let (result, out) = volctl(&kv, &["hosts"]).await;
    result.unwrap();
    let header = out.lines().next().unwrap();
    let row = out.lines().nth(1).unwrap();
    assert!(header.contains("HEALTH"), "{out}");
    assert!(row.contains(" out_of_data "), "{out}");
    assert!(row.contains(" 0 B "), "headroom 0: {out}");
    let (result, out) = volctl(&kv, &["list"]).await;
    result.unwrap();
    assert!(out.contains("pool out_of_data"), "{out}");
    let (result, out) = volctl(&kv, &["show", volume.id.as_str()]).await;
    result.unwrap();
    assert!(out.contains("pool out_of_data"), "{out}");
    let (result, _) = volctl(
        &kv,
        &[
            "create", "more", "--size", "1", "--region", "ewr", "--detach",
        ],
    )
    .await;
    let error = result.unwrap_err();
    let details = error.details().join("\n");
    assert!(
        details.contains("pool health: pool out of data space"),
        "{error}: {details}"
    );

    let (code, text) = get("/healthz").await;
    assert_eq!(code, 503, "{text}");
    assert!(
        text.starts_with("degraded: pool out of data space\n"),
        "{text}"
    );
    let (_, text) = get("/metrics").await;
    assert!(text.contains("volumed_pool_healthy 0\n"), "{text}");
    assert!(
        text.contains("volumed_pool_health{health=\"out_of_data\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("volumed_pool_health{health=\"healthy\"} 0\n"),
        "{text}"
    );

    // Several heartbeats later, still one line for the one transition.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let lines = log_lines_with(&logs, "thin pool cannot take writes");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("health=out_of_data"), "{lines:#?}");

    // Space returns: healthy again everywhere, with one line.
    sim.sim.simulate_pool_health(PoolHealth::Healthy);
    let record = wait_for("the host record to say healthy", || async {
        host_record(&kv)
            .await
            .filter(|record| record.pool.health == PoolHealth::Healthy)
    })
    .await;
    assert!(record.pool.headroom(&record.policy) > Bytes::ZERO);
    let (code, _) = get("/healthz").await;
    assert_eq!(code, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(log_lines_with(&logs, "thin pool healthy again").len(), 1);
    assert_eq!(
        log_lines_with(&logs, "thin pool cannot take writes").len(),
        1
    );

    http.abort();
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}

/// A backend that runs `hook` once, at the first LV removal: the moment a
/// concurrent writer (volctl, the daemon) acts in the middle of a gc.
struct HookBackend {
    inner: Arc<dyn ThinBackend>,
    hook: std::sync::Mutex<Option<RemovalHook>>,
}

type RemovalHook = Box<dyn FnOnce(&LvName) + Send>;

impl ThinBackend for HookBackend {
    fn spec(&self) -> &ThinPoolSpec {
        self.inner.spec()
    }
    fn ensure_pool(
        &self,
    ) -> Result<volume_core::actions::CreateAction<volume_core::backend::PoolStatus>, BackendError>
    {
        self.inner.ensure_pool()
    }
    fn pool_status(&self) -> Result<volume_core::backend::PoolStatus, BackendError> {
        self.inner.pool_status()
    }
    fn create_thin(
        &self,
        lv: &LvName,
        size: Bytes,
        tags: &[String],
    ) -> Result<volume_core::actions::CreateAction<ThinVolume>, BackendError> {
        self.inner.create_thin(lv, size, tags)
    }
    fn remove_thin(&self, lv: &LvName) -> Result<volume_core::actions::DeleteAction, BackendError> {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook(lv);
        }
        self.inner.remove_thin(lv)
    }
    fn extend_thin(
        &self,
        lv: &LvName,
        size: Bytes,
    ) -> Result<volume_core::actions::ExtendAction, BackendError> {
        self.inner.extend_thin(lv, size)
    }
    fn list_thins(&self) -> Result<Vec<ThinVolume>, BackendError> {
        self.inner.list_thins()
    }
    fn thin(&self, lv: &LvName) -> Result<Option<ThinVolume>, BackendError> {
        self.inner.thin(lv)
    }
    fn tagged(&self, tag: &str) -> Result<Vec<ThinVolume>, BackendError> {
        self.inner.tagged(tag)
    }
    fn retag(
        &self,
        lv: &LvName,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, BackendError> {
        self.inner.retag(lv, add, remove)
    }
    fn retag_seen(
        &self,
        seen: &ThinVolume,
        add: &[String],
        remove: &[String],
    ) -> Result<ThinVolume, BackendError> {
        self.inner.retag_seen(seen, add, remove)
    }
    fn activate_thin(&self, lv: &LvName) -> Result<PathBuf, BackendError> {
        self.inner.activate_thin(lv)
    }

    fn grow_pool(
        &self,
        part: volume_core::pool_growth::PoolPart,
        by: Bytes,
    ) -> Result<volume_core::pool_growth::PoolGrowth, BackendError> {
        self.inner.grow_pool(part, by)
    }

    fn snapshot_thin(
        &self,
        origin: &LvName,
        copy: &LvName,
        kind: volume_core::backend::ThinCopy,
        tags: &[String],
    ) -> Result<volume_core::actions::CreateAction<ThinVolume>, BackendError> {
        self.inner.snapshot_thin(origin, copy, kind, tags)
    }
}

fn plain_volume(spec: &VolumeSpec) -> host::NewVolume {
    host::NewVolume {
        id: spec.id.clone(),
        name: spec.name.clone(),
        size: spec.size,
        encryption: Encryption::None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_rechecks_each_orphan_against_the_store_right_before_deleting_it() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    // Two LVs with no record, and one record for a third volume so that
    // the desired prefix is not empty.
    let a = spec(Bytes(GIB), false);
    let b = spec(Bytes(GIB), false);
    let unrelated = spec(Bytes(GIB), false);
    put_spec(&kv, &unrelated).await;
    let runtime = tokio::runtime::Handle::current();
    let hook_kv = kv.clone();
    let (hook_a, hook_b) = (a.clone(), b.clone());
    let hooked = Arc::new(HookBackend {
        inner: sim.sim.clone(),
        // While gc deletes the first orphan, the other one gets its record
        // (a create that landed meanwhile): it is no orphan any more.
        hook: std::sync::Mutex::new(Some(Box::new(move |lv: &LvName| {
            let other = if hook_a.id.lv_name() == *lv {
                hook_b
            } else {
                hook_a
            };
            runtime.block_on(put_spec(&hook_kv, &other));
        }))),
    });
    let host = Arc::new(VolumeHost::new(
        hooked,
        sim.devices.clone(),
        sim.keys.clone(),
        Default::default(),
    ));
    for volume in [&a, &b] {
        let volume = plain_volume(volume);
        let host = host.clone();
        let _ = tokio::task::spawn_blocking(move || host.create(&volume).unwrap())
            .await
            .unwrap();
    }
    let config = config(&[]);
    let outcome = volumed::gc::gc(&config, &host, &kv, true).await.unwrap();
    assert_eq!(outcome.volumes.len(), 2, "{outcome:?}");
    let deleted: Vec<&VolumeId> = outcome
        .volumes
        .iter()
        .filter(|o| matches!(o.deleted, Some(Ok(()))))
        .map(|o| &o.volume.id)
        .collect();
    assert_eq!(deleted.len(), 1, "{outcome:?}");
    let kept = if deleted[0] == &a.id { &b } else { &a };
    assert_eq!(
        sim.lvs(),
        vec![kept.id.clone()],
        "the volume whose record appeared was deleted"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_refuses_an_empty_desired_prefix_while_volumes_exist() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    let host = sim.volume_host(&metrics);
    // A KV loss: the volumes are there, their records are not.
    for _ in 0..3 {
        let volume = plain_volume(&spec(Bytes(GIB), false));
        let host = host.clone();
        let _ = tokio::task::spawn_blocking(move || host.create(&volume).unwrap())
            .await
            .unwrap();
    }
    let config = config(&[]);
    let error = volumed::gc::gc(&config, &host, &kv, true)
        .await
        .expect_err("gc --yes over an empty desired prefix");
    assert!(
        error.to_string().contains("--allow-empty-desired"),
        "the refusal says how to override it: {error}"
    );
    assert_eq!(sim.lvs().len(), 3, "a volume was deleted");
    // Listing is harmless and still works.
    let listed = volumed::gc::gc(&config, &host, &kv, false).await.unwrap();
    assert_eq!(listed.volumes.len(), 3);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_deletes_orphan_snapshots_only_when_asked_and_keeps_those_in_use() {
    use volume_control::layout::{SnapshotSpec, SnapshotState, SnapshotStatus, VolumeSource};
    use volume_core::names::SnapshotId;
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let layout = Layout::default();
    let origin = spec(Bytes(GIB), false);
    put_spec(&kv, &origin).await;
    // A snapshot with its record, two with none, and the snapshot of a
    // fork still in progress (its record names it; its volume is not made).
    let recorded = SnapshotId::generate();
    let (a, b) = (SnapshotId::generate(), SnapshotId::generate());
    let in_fork = SnapshotId::generate();
    let mut fork = spec(Bytes(GIB), false);
    fork.source = Some(VolumeSource::Fork {
        volume: origin.id.clone(),
        snapshot: in_fork.clone(),
    });
    put_spec(&kv, &fork).await;
    let record = {
        let origin = origin.clone();
        move |id: &SnapshotId| SnapshotSpec {
            id: id.clone(),
            volume: origin.id.clone(),
            host: host_id(),
            size: origin.size,
            created_ms: 1,
            scheduled: false,
            destroy: false,
        }
    };
    let put_record = |kv: ConsulKv, spec: SnapshotSpec| async move {
        let key = Layout::default().snapshot_desired(&host_id(), &spec.id);
        assert!(kv
            .put(&key, &serde_json::to_vec(&spec).unwrap())
            .await
            .unwrap());
    };
    put_record(kv.clone(), record(&recorded)).await;
    // Statuses left from records deleted by hand.
    for id in [&a, &b] {
        let status = SnapshotStatus {
            id: id.clone(),
            volume: origin.id.clone(),
            state: SnapshotState::Ready,
            size: origin.size,
            taken: Some(1),
            error: None,
            updated_ms: 1,
        };
        kv.put(
            &layout.snapshot_status(&host_id(), id),
            &serde_json::to_vec(&status).unwrap(),
        )
        .await
        .unwrap();
    }
    let runtime = tokio::runtime::Handle::current();
    let hook_kv = kv.clone();
    let (hook_a, hook_b, hook_record) = (a.clone(), b.clone(), record.clone());
    let hooked = Arc::new(HookBackend {
        inner: sim.sim.clone(),
        // While gc deletes the first orphan snapshot, the other one gets
        // its record: it is no orphan any more.
        hook: std::sync::Mutex::new(Some(Box::new(move |lv: &LvName| {
            let other = if hook_a.lv_name() == *lv {
                hook_b
            } else {
                hook_a
            };
            runtime.block_on(put_record(hook_kv, hook_record(&other)));
        }))),
    });
    let host = Arc::new(VolumeHost::new(
        hooked,
        sim.devices.clone(),
        sim.keys.clone(),
        Default::default(),
    ));
    {
        let host = host.clone();
        let origin = plain_volume(&origin);
        let snapshots = [recorded.clone(), a.clone(), b.clone(), in_fork.clone()];
        tokio::task::spawn_blocking(move || {
            let _ = host.create(&origin).unwrap();
            for snapshot in &snapshots {
                let _ = host
                    .snapshot(&origin.id, snapshot, &mut host::NoFreeze)
                    .unwrap();
            }
        })
        .await
        .unwrap();
    }
    let snapshots_left = || -> std::collections::BTreeSet<SnapshotId> {
        sim.sim
            .list_thins()
            .unwrap()
            .iter()
            .filter_map(|v| SnapshotId::from_lv_name(&v.lv))
            .collect()
    };
    let config = config(&[]);

    // Without --yes: listed, nothing deleted.
    let listed = volumed::gc::gc(&config, &host, &kv, false).await.unwrap();
    let mut orphans: Vec<&SnapshotId> = listed.snapshots.iter().map(|o| &o.snapshot.id).collect();
    orphans.sort();
    let mut expected = vec![&a, &b];
    expected.sort();
    assert_eq!(orphans, expected, "{listed:?}");
    assert!(listed.volumes.is_empty(), "{listed:?}");
    assert!(listed.snapshots.iter().all(|o| o.deleted.is_none()));
    assert_eq!(snapshots_left().len(), 4);

    // --yes: one goes, with its status; the other's record appeared
    // meanwhile and it stays.
    let outcome = volumed::gc::gc(&config, &host, &kv, true).await.unwrap();
    assert_eq!(outcome.snapshots.len(), 2, "{outcome:?}");
    let gone: Vec<&SnapshotId> = outcome
        .snapshots
        .iter()
        .filter(|o| matches!(o.deleted, Some(Ok(()))))
        .map(|o| &o.snapshot.id)
        .collect();
    assert_eq!(gone.len(), 1, "{outcome:?}");
    let gone = gone[0].clone();
    let kept = if gone == a { b.clone() } else { a.clone() };
    assert!(outcome
        .snapshots
        .iter()
        .any(|o| o.snapshot.id == kept && o.record_appeared && o.deleted.is_none()));
    let left = snapshots_left();
    assert!(!left.contains(&gone), "the orphan stayed");
    assert!(
        [&recorded, &kept, &in_fork]
            .iter()
            .all(|id| left.contains(id)),
        "a snapshot in use was deleted: {left:?}"
    );
    let status_of = |id: &SnapshotId| {
        let (kv, key) = (kv.clone(), layout.snapshot_status(&host_id(), id));
        async move { kv.get(&key).await.unwrap().value }
    };
    assert!(status_of(&gone).await.is_none(), "its status stayed");
    assert!(status_of(&kept).await.is_some());

    // Once the fork is ready its snapshot is no longer needed: an orphan.
    // An empty snapshot prefix with orphans left looks like a lost
    // snapshot subtree: refused.
    {
        let host = host.clone();
        let fork = plain_volume(&fork);
        let _ = tokio::task::spawn_blocking(move || host.create(&fork).unwrap())
            .await
            .unwrap();
    }
    kv.delete_tree(&layout.snapshot_desired_prefix(&host_id()))
        .await
        .unwrap();
    let error = volumed::gc::gc(&config, &host, &kv, true)
        .await
        .expect_err("gc --yes over an empty snapshot prefix");
    assert!(
        matches!(
            error,
            volumed::gc::GcError::EmptySnapshotRecords { snapshots: 3, .. }
        ) && error.to_string().contains("--allow-empty-desired"),
        "{error}"
    );
    assert_eq!(snapshots_left().len(), 3, "a snapshot was deleted");
    let options = volumed::gc::GcOptions {
        yes: true,
        allow_empty_desired: true,
    };
    let outcome = volumed::gc::gc_with(&config, &host, &kv, options)
        .await
        .unwrap();
    assert_eq!(outcome.snapshots.len(), 3, "{outcome:?}");
    assert!(snapshots_left().is_empty());
    // The volumes have their records: untouched.
    let mut volumes = sim.lvs();
    volumes.sort();
    let mut expected = vec![origin.id.clone(), fork.id.clone()];
    expected.sort();
    assert_eq!(volumes, expected);

    // No record at all while a snapshot exists: refused, the snapshot
    // counted in the refusal.
    {
        let host = host.clone();
        let (id, snapshot) = (origin.id.clone(), SnapshotId::generate());
        tokio::task::spawn_blocking(move || {
            let _ = host.snapshot(&id, &snapshot, &mut host::NoFreeze).unwrap();
        })
        .await
        .unwrap();
    }
    kv.delete_tree(&layout.desired_prefix(&host_id()))
        .await
        .unwrap();
    let error = volumed::gc::gc(&config, &host, &kv, true)
        .await
        .expect_err("gc --yes over an empty desired prefix");
    assert!(
        matches!(
            error,
            volumed::gc::GcError::EmptyDesired {
                volumes: 2,
                snapshots: 1,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(snapshots_left().len(), 1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kv_loss_the_host_record_lists_the_orphans_at_once() {
    let data = tempfile::tempdir().unwrap();
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), Some(data.path())).await;
    let addr = server.local_addr();
    let kv = client(addr);
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    // The production wait: a blocking read may sit at the server that long.
    let mut config = config(&[]);
    config.watch_wait = Duration::from_secs(300);
    let daemon = start_daemon(
        config,
        sim.volume_host(&metrics),
        kv.clone(),
        metrics.clone(),
    );
    // The old store's index far ahead of what a fresh one reaches soon;
    // the desired prefix's index is that of its newest record.
    for i in 0..200 {
        put_ledger(
            &kv,
            Ledger {
                reserved: Bytes(i),
                volumes: 2,
            },
        )
        .await;
    }
    let volumes = [spec(Bytes(GIB), false), spec(Bytes(GIB), false)];
    for volume in &volumes {
        put_spec(&kv, volume).await;
    }
    for volume in &volumes {
        wait_state(&kv, &volume.id, VolumeState::Ready).await;
    }
    server.shutdown().await.unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let server = start_server(addr, Some(fresh.path())).await;
    let record = wait_for("both orphans in the fresh store's host record", || async {
        host_record(&kv).await.filter(|r| r.orphans.len() == 2)
    })
    .await;
    for volume in &volumes {
        assert!(record.orphans.contains(&volume.id));
    }
    assert_eq!(sim.lvs().len(), 2, "an orphan was deleted");
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_is_recomputed_from_the_desired_records() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    let kept = spec(Bytes(2 * GIB), false);
    let leaked = spec(Bytes(3 * GIB), false);
    put_spec(&kv, &kept).await;
    put_spec(&kv, &leaked).await;
    // The ledger has drifted before the daemon starts.
    put_ledger(
        &kv,
        Ledger {
            reserved: Bytes(40 * GIB),
            volumes: 9,
        },
    )
    .await;
    let daemon = start_daemon(
        config(&[]),
        sim.volume_host(&metrics),
        kv.clone(),
        metrics.clone(),
    );
    wait_for("the ledger repaired at start-up", || async {
        let (now, _) = ledger(&kv).await;
        (now == Ledger {
            reserved: Bytes(5 * GIB),
            volumes: 2,
        })
        .then_some(())
    })
    .await;
    // A record deleted outside the destroy path leaks its reservation
    // until the next repair returns it.
    wait_state(&kv, &leaked.id, VolumeState::Ready).await;
    kv.delete(&Layout::default().desired(&host_id(), &leaked.id))
        .await
        .unwrap();
    wait_for("the leaked reservation returned", || async {
        let (now, _) = ledger(&kv).await;
        (now == Ledger {
            reserved: Bytes(2 * GIB),
            volumes: 1,
        })
        .then_some(())
    })
    .await;
    // Counted once the daemon has seen its CAS land, just after the store.
    let line = |text: &str| {
        text.lines()
            .find(|line| line.starts_with("volumed_ledger_repairs_total "))
            .map(str::to_owned)
    };
    let counted = wait_for("both corrections counted", || async {
        line(&metrics.render()).filter(|l| !l.ends_with(" 0") && !l.ends_with(" 1"))
    })
    .await;
    assert_eq!(
        counted, "volumed_ledger_repairs_total 2",
        "each correction is counted once"
    );
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}

/// Volume auto-extend on the simulator: data% past the threshold grows
/// the volume by the increment, reserved on the ledger, up to the limit
/// and no further; a guest's fresh filesystem report wins over data%; a
/// refused step shows in the status, is logged once and is not retried
/// in a hot loop, and the growth happens once the pool can take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_auto_extend_at_their_threshold_within_the_ledger() {
    use volume_control::layout::FsUsageReport;
    use volume_core::units::{Percent, GB};
    use volume_core::volume_growth::{AutoExtend, FsUsage};
    let logs = captured_logs();
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    let daemon = start_daemon(
        config(&["--volume-autoextend-interval", "200ms"]),
        sim.volume_host(&metrics),
        kv.clone(),
        metrics.clone(),
    );
    let rule = AutoExtend::new(
        Percent::from_whole(80),
        Bytes(GB),
        Bytes(4 * GB),
        Bytes(2 * GB),
    )
    .unwrap();
    let mut filling = spec(Bytes(2 * GB), false);
    filling.auto_extend = Some(rule);
    let mut reported = spec(Bytes(2 * GB), false);
    reported.auto_extend = Some(rule);
    let quiet = spec(Bytes(2 * GB), false);
    put_ledger(
        &kv,
        Ledger {
            reserved: Bytes(6 * GB),
            volumes: 3,
        },
    )
    .await;
    for volume in [&filling, &reported, &quiet] {
        put_spec(&kv, volume).await;
    }
    for volume in [&filling, &reported, &quiet] {
        wait_state(&kv, &volume.id, VolumeState::Ready).await;
    }
    let desired = |id: VolumeId| {
        let kv = kv.clone();
        async move {
            let key = Layout::default().desired(&host_id(), &id);
            let pair = kv.get(&key).await.unwrap().value.unwrap();
            serde_json::from_slice::<VolumeSpec>(&pair.value).unwrap()
        }
    };

    // data% past the threshold: one increment at a time, to the limit.
    sim.sim
        .simulate_write(&filling.id.lv_name(), Percent::from_whole(85))
        .unwrap();
    sim.sim
        .simulate_write(&quiet.id.lv_name(), Percent::from_whole(99))
        .unwrap();
    wait_for("the volume to grow to its limit", || async {
        let status = status(&kv, &filling.id).await?;
        (status.state == VolumeState::Ready && status.size >= Bytes(4 * GB)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(desired(filling.id.clone()).await.size, Bytes(4 * GB));
    assert_eq!(
        ledger(&kv).await.0,
        Ledger {
            reserved: Bytes(8 * GB),
            volumes: 3
        }
    );
    let grew = log_lines_with(&logs, filling.id.as_str());
    let steps: Vec<&String> = grew
        .iter()
        .filter(|line| line.contains("growth recorded"))
        .collect();
    assert_eq!(steps.len(), 2, "{grew:#?}");
    assert!(steps[0].contains("source=allocated"), "{steps:?}");
    // A volume without auto-extend never grows, however full.
    assert_eq!(desired(quiet.id.clone()).await.size, Bytes(2 * GB));

    // The guest says its filesystem is 90 % full while data% reads 10 %.
    sim.sim
        .simulate_write(&reported.id.lv_name(), Percent::from_whole(10))
        .unwrap();
    let report = FsUsageReport::new(
        FsUsage::new(Bytes(1_800_000_000), Bytes(2 * GB)).unwrap(),
        volumed::worker::now_ms(),
    );
    assert!(kv
        .put(
            &Layout::default().fs_usage(&host_id(), &reported.id),
            &report.to_json()
        )
        .await
        .unwrap());
    wait_for("the reported volume to grow", || async {
        let status = status(&kv, &reported.id).await?;
        (status.size >= Bytes(3 * GB)).then_some(())
    })
    .await;
    let lines = log_lines_with(&logs, reported.id.as_str());
    assert!(
        lines
            .iter()
            .any(|line| line.contains("growth recorded") && line.contains("source=filesystem")),
        "{lines:#?}"
    );
    // Its filesystem has not grown with it: the report no longer counts,
    // data% (10 %) does, so no second step.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(desired(reported.id.clone()).await.size, Bytes(3 * GB));

    // No room: refused, shown, logged once, not retried every interval.
    sim.sim.simulate_pool_health(PoolHealth::OutOfData);
    let refusable_from = Instant::now();
    let report = FsUsageReport::new(
        FsUsage::new(Bytes(2_900_000_000), Bytes(3 * GB)).unwrap(),
        volumed::worker::now_ms(),
    );
    kv.put(
        &Layout::default().fs_usage(&host_id(), &reported.id),
        &report.to_json(),
    )
    .await
    .unwrap();
    let refused = wait_for("the refusal in the status", || async {
        status(&kv, &reported.id).await?.auto_extend_refused
    })
    .await;
    assert!(refused.contains("pool health"), "{refused}");
    let (result, out) = volctl(&kv, &["show", reported.id.as_str()]).await;
    result.unwrap();
    assert!(out.contains("auto-extend refused"), "{out}");
    // A refused step is held off for 6 intervals (1.2 s), where every
    // interval would be 5 a second: count against the time since the
    // first refusal could have happened, however slow this machine is.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = metrics.render();
    let refusals = metric_value(
        &text,
        "volumed_volume_autoextend_total{outcome=\"refused\"}",
    );
    let held_off = Duration::from_millis(1200);
    let allowed = 1 + refusable_from.elapsed().as_millis() / held_off.as_millis();
    assert!(
        (1..=allowed).contains(&u128::from(refusals)),
        "{refusals} refusals in {:?}: {text}",
        refusable_from.elapsed()
    );
    let warned = log_lines_with(&logs, reported.id.as_str())
        .into_iter()
        .filter(|line| line.contains("volume auto-extend refused"))
        .count();
    assert_eq!(warned, 1);
    assert_eq!(desired(reported.id.clone()).await.size, Bytes(3 * GB));

    // Room again: the held-off step goes through and the note clears.
    sim.sim.simulate_pool_health(PoolHealth::Healthy);
    wait_for("the step after the refusal", || async {
        let status = status(&kv, &reported.id).await?;
        (status.size >= Bytes(4 * GB) && status.auto_extend_refused.is_none()).then_some(())
    })
    .await;
    assert_eq!(ledger(&kv).await.0.reserved, Bytes(10 * GB));
    let text = metrics.render();
    assert!(
        text.contains("volumed_volume_autoextend_total{outcome=\"grown\"} 4\n"),
        "{text}"
    );
    daemon.running.stop().await.unwrap();
}

/// Every snapshot record of the host and its `ModifyIndex`.
async fn snapshot_records(kv: &ConsulKv) -> Vec<volume_control::layout::SnapshotSpec> {
    let pairs = kv
        .get_recurse(&Layout::default().snapshot_desired_prefix(&host_id()))
        .await
        .unwrap()
        .value;
    volumed::kv::snapshot_records(&pairs)
        .into_iter()
        .map(|(_, record)| record.unwrap().0)
        .collect()
}

async fn snapshot_state(
    kv: &ConsulKv,
    id: &volume_core::names::SnapshotId,
) -> Option<volume_control::layout::SnapshotState> {
    let key = Layout::default().snapshot_status(&host_id(), id);
    let pair = kv.get(&key).await.ok()?.value?;
    let status: volume_control::layout::SnapshotStatus =
        serde_json::from_slice(&pair.value).unwrap();
    Some(status.state)
}

fn snapshot_lvs(sim: &SimHost) -> usize {
    sim.sim
        .list_thins()
        .unwrap()
        .iter()
        .filter(|v| volume_core::names::SnapshotId::from_lv_name(&v.lv).is_some())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_restores_forks_schedules_and_destroys_converge() {
    use volume_control::layout::{SnapshotSchedule, SnapshotSpec, SnapshotState, VolumeSource};
    use volume_core::names::SnapshotId;
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    let daemon = start_daemon(
        config(&[
            "--snapshot-period",
            "2s",
            "--snapshot-check-interval",
            "200ms",
        ]),
        sim.volume_host(&metrics),
        kv.clone(),
        metrics.clone(),
    );
    let layout = Layout::default();
    let mut origin = spec(Bytes(2 * GIB), true);
    origin.snapshots = SnapshotSchedule::new(true, 1).unwrap();
    put_spec_reserved(&kv, &origin).await;
    wait_state(&kv, &origin.id, VolumeState::Ready).await;

    // On demand: a record with its reservation; volumed takes it.
    let on_demand = SnapshotSpec {
        id: SnapshotId::generate(),
        volume: origin.id.clone(),
        host: host_id(),
        size: origin.size,
        created_ms: 1,
        scheduled: false,
        destroy: false,
    };
    assert!(
        volumed::kv::put_snapshot_record(&kv, &layout, &on_demand, &metrics)
            .await
            .unwrap()
    );
    wait_for("the on-demand snapshot ready", || async {
        (snapshot_state(&kv, &on_demand.id).await == Some(SnapshotState::Ready)).then_some(())
    })
    .await;

    // Restore it, bigger, and fork the live volume.
    let mut restored = spec(Bytes(3 * GIB), true);
    restored.source = Some(VolumeSource::Snapshot {
        snapshot: on_demand.id.clone(),
    });
    put_spec_reserved(&kv, &restored).await;
    let mut fork = spec(Bytes(2 * GIB), true);
    fork.source = Some(VolumeSource::Fork {
        volume: origin.id.clone(),
        snapshot: SnapshotId::generate(),
    });
    put_spec_reserved(&kv, &fork).await;
    let ready = wait_state(&kv, &restored.id, VolumeState::Ready).await;
    assert_eq!(ready.size, Bytes(3 * GIB));
    wait_state(&kv, &fork.id, VolumeState::Ready).await;

    // Scheduled every 2 s, kept one period: several taken, old ones pruned.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let scheduled: Vec<SnapshotSpec> = snapshot_records(&kv)
            .await
            .into_iter()
            .filter(|s| s.scheduled)
            .collect();
        assert!(scheduled.len() <= 3, "retention keeps few: {scheduled:?}");
        seen.extend(scheduled.iter().map(|s| s.id.clone()));
        if seen.len() >= 3 && scheduled.len() < seen.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for scheduled snapshots"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (count, bytes, orphans) = metrics.snapshots();
    assert!(count >= 1 && bytes >= 2 * GIB, "{count} {bytes}");
    assert_eq!(orphans, 0);

    // Destroying the origin takes its snapshots, their records and their
    // reservations; the restore and the fork stay.
    let mut destroy = origin.clone();
    destroy.destroy = true;
    put_spec(&kv, &destroy).await;
    wait_for("the origin and its snapshots gone", || async {
        let gone = status(&kv, &origin.id).await.is_none();
        let records = snapshot_records(&kv).await;
        (gone && records.is_empty() && snapshot_lvs(&sim) == 0).then_some(())
    })
    .await;
    assert!(!sim.lvs().contains(&origin.id));
    assert!(sim.lvs().contains(&restored.id) && sim.lvs().contains(&fork.id));
    // Every reservation of the origin and its snapshots came back.
    let (now, _) = ledger(&kv).await;
    assert_eq!(now.reserved, restored.size + fork.size);
    daemon.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volctl_snapshots_restore_fork_update_and_hosts() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    let daemon = start_daemon(
        config(&["--snapshot-check-interval", "100ms"]),
        sim.volume_host(&metrics),
        kv.clone(),
        metrics.clone(),
    );
    wait_for("the host record", || async { host_record(&kv).await }).await;
    let json = |out: &str| serde_json::from_str::<serde_json::Value>(out).unwrap();

    let (result, out) = volctl(
        &kv,
        &["create", "data", "--size", "2", "--region", "ewr", "--json"],
    )
    .await;
    result.unwrap();
    let origin = json(&out)[0]["id"].as_str().unwrap().to_owned();

    let (result, out) = volctl(&kv, &["snapshots", "create", &origin, "--json"]).await;
    result.unwrap();
    let taken = json(&out);
    assert_eq!(taken["state"], "ready", "{out}");
    let snapshot = taken["id"].as_str().unwrap().to_owned();
    let (result, out) = volctl(&kv, &["snapshots", "list", &origin, "--json"]).await;
    result.unwrap();
    assert_eq!(json(&out).as_array().unwrap().len(), 1, "{out}");
    let (result, out) = volctl(&kv, &["hosts", "--json"]).await;
    result.unwrap();
    let host = &json(&out)[0];
    assert_eq!(host["snapshots"], 1, "{out}");
    assert_eq!(host["snapshot_bytes"], 2_000_000_000u64, "{out}");
    assert_eq!(host["ledger"]["reserved"], 4_000_000_000u64, "{out}");
    let (result, out) = volctl(&kv, &["hosts"]).await;
    result.unwrap();
    assert!(
        out.contains("SNAPSHOTS") && out.contains("1 (2 GB)"),
        "{out}"
    );

    // Restore: smaller than the snapshot is refused, bigger is grown.
    let (result, _) = volctl(
        &kv,
        &["create", "small", "--snapshot-id", &snapshot, "--size", "1"],
    )
    .await;
    let error = result.unwrap_err();
    assert_eq!(error.exit_code(), 2, "{error}");
    let (result, out) = volctl(
        &kv,
        &[
            "create",
            "restored",
            "--snapshot-id",
            &snapshot,
            "--size",
            "3",
            "--json",
        ],
    )
    .await;
    result.unwrap();
    assert!(out.contains("\"ready\""), "{out}");
    let (result, out) = volctl(&kv, &["fork", &origin, "--name", "forked", "--json"]).await;
    result.unwrap();
    assert!(out.contains("\"ready\"") && out.contains("forked"), "{out}");
    // The fork's own snapshot is gone again.
    wait_for("only the on-demand snapshot LV left", || async {
        (snapshot_lvs(&sim) == 1).then_some(())
    })
    .await;

    let (result, out) = volctl(
        &kv,
        &[
            "update",
            &origin,
            "--scheduled-snapshots=true",
            "--snapshot-retention",
            "3",
        ],
    )
    .await;
    result.unwrap();
    assert!(
        out.contains("scheduled snapshots: on, kept 3 day(s)"),
        "{out}"
    );

    let (result, out) = volctl(&kv, &["snapshots", "destroy", &snapshot]).await;
    result.unwrap();
    assert!(out.contains("destroyed"), "{out}");
    assert_eq!(snapshot_lvs(&sim), 0);
    let (ledger_now, _) = ledger(&kv).await;
    assert_eq!(ledger_now.reserved, Bytes(7_000_000_000), "2 + 3 + 2 GB");
    let (result, _) = volctl(&kv, &["snapshots", "destroy", &snapshot]).await;
    assert_eq!(result.unwrap_err().exit_code(), 5, "gone: not found");
    daemon.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_records_converge_at_once_not_at_the_next_periodic_check() {
    let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)), None).await;
    let kv = client(server.local_addr());
    let sim = SimHost::local();
    let metrics = Arc::new(Metrics::default());
    // The first LV removal is slow, as under load: `destroy` must still
    // wait for it.
    let hooked = Arc::new(HookBackend {
        inner: sim.sim.clone(),
        hook: std::sync::Mutex::new(Some(Box::new(|_: &LvName| {
            std::thread::sleep(Duration::from_millis(500));
        }))),
    });
    let host = Arc::new(VolumeHost::new(
        hooked,
        sim.devices.clone(),
        sim.keys.clone(),
        Default::default(),
    ));
    // The periodic pass is 10 minutes away: only the watch can be prompt.
    let daemon = start_daemon(
        config(&["--snapshot-check-interval", "600s"]),
        host,
        kv.clone(),
        metrics.clone(),
    );
    wait_for("the host record", || async { host_record(&kv).await }).await;
    let json = |out: &str| serde_json::from_str::<serde_json::Value>(out).unwrap();
    let (result, out) = volctl(
        &kv,
        &["create", "data", "--size", "2", "--region", "ewr", "--json"],
    )
    .await;
    result.unwrap();
    let origin = json(&out)[0]["id"].as_str().unwrap().to_owned();
    let timeout = WAIT.as_secs().to_string();
    for round in 0..2 {
        let started = Instant::now();
        let (result, out) = volctl(
            &kv,
            &[
                "snapshots",
                "create",
                &origin,
                "--json",
                "--timeout",
                &timeout,
            ],
        )
        .await;
        result.unwrap_or_else(|e| panic!("round {round}: snapshots create: {e}"));
        let taken = json(&out);
        assert_eq!(taken["state"], "ready", "{out}");
        let created = started.elapsed();
        let snapshot = taken["id"].as_str().unwrap().to_owned();
        let started = Instant::now();
        let (result, out) = volctl(
            &kv,
            &["snapshots", "destroy", &snapshot, "--timeout", &timeout],
        )
        .await;
        result.unwrap_or_else(|e| panic!("round {round}: snapshots destroy: {e}"));
        assert!(out.contains("destroyed"), "{out}");
        // Destroyed means gone, LV and reservation.
        assert_eq!(snapshot_lvs(&sim), 0, "round {round}: the LV is left");
        assert_eq!(ledger(&kv).await.0.reserved, Bytes(2_000_000_000));
        eprintln!(
            "round {round}: snapshots create {created:.2?}, destroy {:.2?}",
            started.elapsed()
        );
    }
    assert_eq!(snapshot_lvs(&sim), 0);
    let (ledger_now, _) = ledger(&kv).await;
    assert_eq!(
        ledger_now.reserved,
        Bytes(2_000_000_000),
        "the volume alone"
    );
    daemon.running.stop().await.unwrap();
    server.shutdown().await.unwrap();
}
